use std::time::Duration;

use diesel::prelude::*;
use dployr_domain::{Email, NewUser, Provider, StoreError, UserId, UserStore};
use dployr_pg::{MAX_KEEPALIVE_SECS, MAX_KEEPALIVES_COUNT, NetworkConfig, PgPool, PgUserStore, PoolConfig};

#[test]
fn a_checkout_that_times_out_is_unavailable() {
    let db = dployr_testkit::database();
    let config = PoolConfig { max_size: 1, connection_timeout: Duration::from_millis(200), ..PoolConfig::default() };
    let pool = PgPool::connect(db.url(), config).unwrap();
    let users = PgUserStore::new(pool.clone());
    let held = pool.get().unwrap();
    let error = users.get(&UserId::generate()).unwrap_err();
    assert!(matches!(error, StoreError::Unavailable { .. }) && error.is_retryable(), "{error}");
    drop(held);
    assert_eq!(users.get(&UserId::generate()).unwrap(), None);
}

#[test]
fn an_unreachable_server_is_unavailable_within_the_connect_timeout() {
    // A port nothing listens on (the testkit's server is elsewhere).
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let config = PoolConfig { connection_timeout: Duration::from_millis(300), ..PoolConfig::default() };
    let error = PgPool::connect(&format!("postgres://nobody@127.0.0.1:{port}/none"), config).unwrap_err();
    assert!(matches!(error, StoreError::Unavailable { .. }), "{error}");
    assert!(!error.to_string().contains("nobody@"), "the URL is not echoed: {error}");
}

#[test]
fn a_zero_sized_pool_is_invalid() {
    let error =
        PgPool::connect("postgres://localhost/x", PoolConfig { max_size: 0, ..PoolConfig::default() }).unwrap_err();
    assert!(matches!(error, StoreError::Invalid { .. }), "{error}");
}

#[test]
fn a_pool_larger_than_any_server_can_serve_is_invalid_and_the_largest_one_opens() {
    use dployr_pg::MAX_POOL_SIZE;

    for max_size in [MAX_POOL_SIZE + 1, u32::MAX] {
        let config = PoolConfig { max_size, ..PoolConfig::default() };
        let error = PgPool::connect("postgres://localhost/x", config).unwrap_err();
        assert!(matches!(error, StoreError::Invalid { field: "pool max_size", .. }), "{error}");
    }
    let db = dployr_testkit::database();
    let pool = PgPool::connect(db.url(), PoolConfig { max_size: MAX_POOL_SIZE, ..PoolConfig::default() }).unwrap();
    drop(pool.get().unwrap());
}

#[test]
fn every_connection_gets_the_configured_statement_timeout() {
    #[derive(QueryableByName)]
    struct Setting {
        #[diesel(sql_type = diesel::sql_types::Text)]
        statement_timeout: String,
    }
    let db = dployr_testkit::database();
    let config = PoolConfig { statement_timeout: Some(Duration::from_millis(1500)), ..PoolConfig::default() };
    let pool = PgPool::connect(db.url(), config).unwrap();
    let setting: Setting = diesel::sql_query("SHOW statement_timeout").get_result(&mut pool.get().unwrap()).unwrap();
    assert_eq!(setting.statement_timeout, "1500ms");
}

#[test]
fn without_the_statement_cache_nothing_stays_prepared_on_the_server() {
    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        count: i64,
    }
    let db = dployr_testkit::database();
    let prepared = |cache: bool| {
        let config = PoolConfig { max_size: 1, prepared_statement_cache: cache, ..PoolConfig::default() };
        let pool = PgPool::connect(db.url(), config).unwrap();
        let users = PgUserStore::new(pool.clone());
        for _ in 0..3 {
            users.get(&UserId::generate()).unwrap();
        }
        let count: Count = diesel::sql_query("SELECT count(*) FROM pg_prepared_statements")
            .get_result(&mut pool.get().unwrap())
            .unwrap();
        count.count
    };
    assert!(prepared(true) > 0, "diesel caches prepared statements by default");
    assert_eq!(prepared(false), 0, "PgBouncer transaction mode needs none left prepared");
}

/// A pool of four with every connection open and given back, its user
/// store, and a connection of its own to end the pool's sessions from.
fn four_open_connections(db: &dployr_testkit::TestDatabase) -> (PgPool, PgUserStore, PgConnection) {
    let pool = PgPool::connect(db.url(), PoolConfig { max_size: 4, ..PoolConfig::default() }).unwrap();
    drop((0..4).map(|_| pool.get().unwrap()).collect::<Vec<_>>());
    let admin = PgConnection::establish(db.url()).unwrap();
    (PgPool::clone(&pool), PgUserStore::new(pool), admin)
}

/// After the server ends every session of the pool (as a restart does),
/// without waiting for the ends to show: a write that meets a connection
/// whose end has not shown yet fails once as `Unavailable` (it may have
/// committed, so it is not run again) and the connection is discarded; the
/// pool serves again at once. Before, diesel's test of a returned
/// connection (its transaction state only) kept the dead connections, and
/// every later call failed.
#[test]
fn sessions_ended_under_the_pool_fail_at_most_one_write_per_connection_then_the_pool_serves_again() {
    let db = dployr_testkit::database();
    let (pool, users, mut admin) = four_open_connections(&db);
    for round in 0..3 {
        drop((0..4).map(|_| pool.get().unwrap()).collect::<Vec<_>>());
        terminate_other_sessions(&mut admin);
        let answers: Vec<_> = (0..10)
            .map(|n| {
                let email = Email::parse(&format!("round{round}-{n}@example.io")).unwrap();
                users.upsert(NewUser::new(email, Provider::Github))
            })
            .collect();
        let failed = answers.iter().filter(|answer| answer.is_err()).count();
        assert!(failed <= 4, "round {round}: {failed} calls of 10 failed: {answers:?}");
        assert!(answers[4..].iter().all(Result::is_ok), "round {round}: {answers:?}");
        for error in answers.iter().filter_map(|answer| answer.as_ref().err()) {
            assert!(matches!(error, StoreError::Unavailable { .. }) && error.is_retryable(), "{error}");
        }
    }
}

/// Asks the server to end every other session of the database; returns
/// before their processes are gone (`pg_terminate_backend` signals them).
fn terminate_other_sessions(admin: &mut PgConnection) {
    diesel::sql_query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .execute(admin)
    .unwrap();
}

/// Ends every other session of the database and waits until the server
/// processes are gone.
fn end_other_sessions(admin: &mut PgConnection) {
    #[derive(QueryableByName)]
    struct Left {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        left: i64,
    }
    terminate_other_sessions(admin);
    let count = "SELECT count(*) AS left FROM pg_stat_activity \
                 WHERE datname = current_database() AND pid <> pg_backend_pid()";
    for _ in 0..500 {
        if diesel::sql_query(count).get_result::<Left>(admin).unwrap().left == 0 {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("the ended sessions' processes did not go");
}

/// A connection whose session the server ended while it rested (what a
/// restart, `pg_terminate_backend` or a pooler that went away does) is found
/// out at checkout by a peek at its socket, and replaced: no call fails on
/// it, neither on the connection parked for this thread nor on r2d2's idle
/// ones. Before, each such connection failed one call.
#[test]
fn connections_the_server_ended_while_they_rested_are_replaced_before_a_call_uses_them() {
    let db = dployr_testkit::database();
    let (pool, users, mut admin) = four_open_connections(&db);
    for round in 0..3 {
        // Every connection open, one of them parked for this thread by a call.
        drop((0..4).map(|_| pool.get().unwrap()).collect::<Vec<_>>());
        assert_eq!(users.get(&UserId::generate()).unwrap(), None);
        let discarded = pool.deadline_stats().discarded;
        end_other_sessions(&mut admin);
        let answers: Vec<_> = (0..10).map(|_| users.get(&UserId::generate())).collect();
        assert!(answers.iter().all(|answer| matches!(answer, Ok(None))), "round {round}: {answers:?}");
        let replaced = pool.deadline_stats().discarded - discarded;
        assert!(replaced >= 1, "round {round}: no ended connection was found out ({replaced})");
    }
}

/// The server process behind a pool's call, by `pg_backend_pid()`.
fn backend_of_a_call(pool: &PgPool) -> Result<i32, StoreError> {
    pool.operation("test.backend_pid")
        .run(|conn| diesel::select(diesel::dsl::sql::<diesel::sql_types::Integer>("pg_backend_pid()")).get_result(conn))
}

/// Two threads calling in turns each keep the connection (and the server
/// process) they used last. r2d2 alone hands each call the connection
/// returned last, which is the other thread's: the processes would alternate.
#[test]
fn threads_calling_in_turns_each_keep_their_own_connection() {
    let db = dployr_testkit::database();
    // A thread's slot is its process-wide number modulo the pool's size,
    // and the other tests of this binary hold numbers too: in a pool of 4,
    // the two threads here shared a slot whenever their numbers differed by
    // 4 (CI, once). 64 slots keep them apart; connections open on demand.
    let pool = PgPool::connect(db.url(), PoolConfig { max_size: 64, ..PoolConfig::default() }).unwrap();
    let turns = std::sync::Arc::new(std::sync::Barrier::new(2));
    let threads: Vec<_> = (0..2)
        .map(|me| {
            let (pool, turns) = (pool.clone(), std::sync::Arc::clone(&turns));
            std::thread::spawn(move || {
                let mut backends = Vec::new();
                for turn in 0..20 {
                    if turn % 2 == me {
                        backends.push(backend_of_a_call(&pool).unwrap());
                    }
                    turns.wait();
                }
                backends
            })
        })
        .collect();
    let backends: Vec<Vec<i32>> = threads.into_iter().map(|thread| thread.join().unwrap()).collect();
    for (thread, seen) in backends.iter().enumerate() {
        assert!(seen.iter().all(|pid| *pid == seen[0]), "thread {thread} moved between processes: {seen:?}");
    }
    assert_ne!(backends[0][0], backends[1][0], "the two threads shared one connection: {backends:?}");
    let stats = pool.pool_stats();
    assert_eq!((stats.connections, stats.idle, stats.in_use), (2, 2, 0), "kept connections count as idle: {stats:?}");
}

/// A connection kept for a thread that stopped calling does not keep
/// another thread waiting: with a pool of one, the other thread takes it
/// at once (its checkout would otherwise time out), and so does the first
/// thread when it calls again.
#[test]
fn a_connection_kept_for_an_idle_thread_serves_another_thread_at_once() {
    let db = dployr_testkit::database();
    let config = PoolConfig { max_size: 1, connection_timeout: Duration::from_millis(300), ..PoolConfig::default() };
    let pool = PgPool::connect(db.url(), config).unwrap();
    let (call_again, go) = std::sync::mpsc::channel::<()>();
    let (called, done) = std::sync::mpsc::channel();
    let idle_thread = {
        let pool = pool.clone();
        std::thread::spawn(move || {
            called.send(backend_of_a_call(&pool)).unwrap();
            // Alive and idle, its connection kept, until told to call again.
            go.recv().unwrap();
            called.send(backend_of_a_call(&pool)).unwrap();
        })
    };
    let first = done.recv().unwrap().unwrap();
    assert_eq!(pool.state(), (1, 1), "the one connection, kept for the idle thread, is idle");
    for _ in 0..3 {
        assert_eq!(backend_of_a_call(&pool).unwrap(), first, "this thread took the idle thread's connection");
    }
    call_again.send(()).unwrap();
    assert_eq!(done.recv().unwrap().unwrap(), first, "and the idle thread took it back");
    idle_thread.join().unwrap();
    let stats = pool.pool_stats();
    assert_eq!((stats.connections, stats.in_use, stats.checkout_timeouts, stats.connections_opened), (1, 0, 0, 1));
}

/// A server that opens no new connection (at `max_connections`, or, as
/// here, refusing the database for a moment) while the pool is below its
/// size and another thread keeps an idle connection: the call takes that
/// connection within the checkout timeout instead of failing `Unavailable`
/// after waiting for a new one (the kept connection went back only when
/// its thread had been idle for 10 s).
#[test]
fn a_call_takes_a_connection_kept_for_an_idle_thread_when_the_server_opens_no_new_one() {
    let db = dployr_testkit::database();
    // Many slots, so the two threads' slots differ (a slot is a thread's
    // index modulo the size): the call must find the kept connection in
    // another thread's slot, not in its own.
    let config = PoolConfig { max_size: 64, connection_timeout: Duration::from_millis(600), ..PoolConfig::default() };
    let pool = PgPool::connect(db.url(), config).unwrap();
    let (finish, finished) = std::sync::mpsc::channel::<()>();
    let (called, done) = std::sync::mpsc::channel();
    let idle_thread = {
        let pool = pool.clone();
        std::thread::spawn(move || {
            called.send(backend_of_a_call(&pool)).unwrap();
            // Alive and idle, its connection kept, until the test ends.
            finished.recv().unwrap();
        })
    };
    let kept = done.recv().unwrap().unwrap();
    let stats = pool.pool_stats();
    assert_eq!((stats.connections, stats.in_use), (1, 0), "one connection, kept for the idle thread");
    // From another database: a session cannot refuse connections to its own.
    let mut admin = PgConnection::establish(&db.url().replacen(&format!("/{}", db.name()), "/postgres", 1)).unwrap();
    diesel::sql_query(format!("ALTER DATABASE \"{}\" ALLOW_CONNECTIONS false", db.name())).execute(&mut admin).unwrap();
    let answer = std::thread::spawn({
        let pool = pool.clone();
        move || backend_of_a_call(&pool)
    })
    .join()
    .unwrap();
    diesel::sql_query(format!("ALTER DATABASE \"{}\" ALLOW_CONNECTIONS true", db.name())).execute(&mut admin).unwrap();
    finish.send(()).unwrap();
    idle_thread.join().unwrap();
    assert_eq!(answer.unwrap(), kept, "the kept connection served the call");
    assert_eq!(pool.pool_stats().checkout_timeouts, 0, "no caller timed out");
}

/// More threads than connections, calling with pauses, some ending early
/// with their connection kept: no call waits out the checkout timeout
/// (a connection kept for one thread while another waits would), and
/// afterwards every connection is idle and the pool never grew past its size.
#[test]
fn more_threads_than_connections_never_wait_out_the_timeout_for_a_kept_connection() {
    let db = dployr_testkit::database();
    let config = PoolConfig { max_size: 3, connection_timeout: Duration::from_secs(2), ..PoolConfig::default() };
    let pool = PgPool::connect(db.url(), config).unwrap();
    let threads: Vec<_> = (0..12u64)
        .map(|n| {
            let pool = pool.clone();
            std::thread::spawn(move || {
                // Threads 0-3 end early, leaving their connection kept.
                let calls = if n < 4 { 5 } else { 150 };
                let mut failures = Vec::new();
                for call in 0..calls {
                    if let Err(error) = backend_of_a_call(&pool) {
                        failures.push(error.to_string());
                    }
                    // 0-1 ms pauses, different per thread and call.
                    std::thread::sleep(Duration::from_micros((n * 131 + call * 37) % 1000));
                }
                failures
            })
        })
        .collect();
    let failures: Vec<String> = threads.into_iter().flat_map(|thread| thread.join().unwrap()).collect();
    assert!(failures.is_empty(), "{} calls failed: {:?}", failures.len(), &failures[..failures.len().min(3)]);
    let stats = pool.pool_stats();
    assert!(stats.connections_opened <= 3, "{stats:?}");
    assert_eq!((stats.in_use, stats.idle, stats.checkout_timeouts), (0, stats.connections, 0), "{stats:?}");
}

/// Timeouts a pool cannot honour are refused by name when it opens, before
/// any connection: r2d2 panicked on a zero checkout timeout, PostgreSQL
/// reads a `statement_timeout` under 1 ms as "none", and a call deadline past
/// what a clock holds panicked in the first call.
/// Opening a pool with each configuration fails as `Invalid`, naming its field.
fn assert_each_refused_by_name(url: &str, refused: impl IntoIterator<Item = (&'static str, PoolConfig)>) {
    for (field, config) in refused {
        match PgPool::connect(url, config) {
            Err(StoreError::Invalid { field: named, .. }) => assert_eq!(named, field, "{config:?}"),
            other => panic!("{field}: {other:?}"),
        }
    }
}

#[test]
fn a_pool_config_with_timeouts_out_of_range_is_refused_by_name() {
    let db = dployr_testkit::database();
    let forever = Duration::MAX;
    let too_long = Duration::from_millis(i32::MAX as u64 + 1);
    let deadline = |deadline: dployr_pg::DeadlineConfig| PoolConfig { deadline, ..PoolConfig::default() };
    let refused = [
        ("pool max_size", PoolConfig { max_size: 0, ..PoolConfig::default() }),
        ("pool connection_timeout", PoolConfig { connection_timeout: Duration::ZERO, ..PoolConfig::default() }),
        ("pool connection_timeout", PoolConfig { connection_timeout: forever, ..PoolConfig::default() }),
        (
            "pool statement_timeout",
            PoolConfig { statement_timeout: Some(Duration::from_micros(999)), ..PoolConfig::default() },
        ),
        ("pool statement_timeout", PoolConfig { statement_timeout: Some(too_long), ..PoolConfig::default() }),
        (
            "deadline call_timeout",
            deadline(dployr_pg::DeadlineConfig { call_timeout: Some(Duration::ZERO), ..Default::default() }),
        ),
        (
            "deadline call_timeout",
            deadline(dployr_pg::DeadlineConfig { call_timeout: Some(forever), ..Default::default() }),
        ),
        ("deadline margin", deadline(dployr_pg::DeadlineConfig { margin: forever, ..Default::default() })),
        ("deadline grace", deadline(dployr_pg::DeadlineConfig { grace: too_long, ..Default::default() })),
    ];
    assert_each_refused_by_name(db.url(), refused);
    // The longest timeouts and a zero margin are taken, and the pool serves.
    let longest = Duration::from_millis(i32::MAX as u64);
    let edges = PoolConfig {
        statement_timeout: Some(longest),
        deadline: dployr_pg::DeadlineConfig {
            call_timeout: Some(longest),
            margin: Duration::ZERO,
            grace: longest,
            ..Default::default()
        },
        ..PoolConfig::default()
    };
    let pool = PgPool::connect(db.url(), edges).unwrap();
    assert_eq!(PgUserStore::new(pool).get(&UserId::generate()).unwrap(), None);
}

/// A keepalive setting the kernel refuses, or a libpq timeout past a C
/// `int`, would make every connection fail as if the server were down
/// (`setsockopt(TCP_KEEPIDLE) failed: Invalid argument`): refused by name
/// when the pool opens. The largest values the kernel takes, and the zeros
/// the pool rounds up, connect and serve.
#[test]
fn a_network_config_the_kernel_or_libpq_would_refuse_is_refused_by_name() {
    let db = dployr_testkit::database();
    let network = |network: NetworkConfig| PoolConfig { network, ..PoolConfig::default() };
    let too_long = Duration::from_millis(i32::MAX as u64 + 1);
    let past_keepalive = Duration::from_secs(MAX_KEEPALIVE_SECS) + Duration::from_millis(1);
    let refused = [
        ("network keepalives_idle", network(NetworkConfig { keepalives_idle: past_keepalive, ..Default::default() })),
        ("network keepalives_idle", network(NetworkConfig { keepalives_idle: Duration::MAX, ..Default::default() })),
        (
            "network keepalives_interval",
            network(NetworkConfig { keepalives_interval: Duration::from_secs(40_000), ..Default::default() }),
        ),
        (
            "network keepalives_count",
            network(NetworkConfig { keepalives_count: MAX_KEEPALIVES_COUNT + 1, ..Default::default() }),
        ),
        ("network keepalives_count", network(NetworkConfig { keepalives_count: u32::MAX, ..Default::default() })),
        (
            "network tcp_user_timeout",
            network(NetworkConfig { tcp_user_timeout: Some(Duration::from_micros(999)), ..Default::default() }),
        ),
        ("network tcp_user_timeout", network(NetworkConfig { tcp_user_timeout: Some(too_long), ..Default::default() })),
        (
            "network connect_timeout",
            network(NetworkConfig { connect_timeout: Some(Duration::MAX), ..Default::default() }),
        ),
    ];
    assert_each_refused_by_name(db.url(), refused);
    let longest = Duration::from_millis(i32::MAX as u64);
    for edges in [
        NetworkConfig {
            keepalives_idle: Duration::from_secs(MAX_KEEPALIVE_SECS),
            keepalives_interval: Duration::from_secs(MAX_KEEPALIVE_SECS),
            keepalives_count: MAX_KEEPALIVES_COUNT,
            tcp_user_timeout: Some(longest),
            connect_timeout: Some(longest),
            ..Default::default()
        },
        NetworkConfig {
            keepalives_idle: Duration::ZERO,
            keepalives_interval: Duration::ZERO,
            keepalives_count: 0,
            tcp_user_timeout: Some(Duration::from_millis(1)),
            ..Default::default()
        },
    ] {
        let pool = PgPool::connect(db.url(), network(edges)).unwrap();
        assert_eq!(PgUserStore::new(pool).get(&UserId::generate()).unwrap(), None, "{edges:?}");
    }
}

/// A database in another encoding than UTF8 would refuse or mangle the
/// Unicode text the stores accept, on some writes only, as the caller's bad
/// input: the pool refuses it when it opens, naming the setting.
#[test]
fn a_database_not_in_utf8_is_a_configuration_error_when_the_pool_opens() {
    let db = dployr_testkit::database();
    let latin1 = format!("{}_latin1", db.name());
    let create =
        format!("CREATE DATABASE \"{latin1}\" ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0");
    diesel::sql_query(create).execute(&mut db.connect()).unwrap();
    let url = dployr_testkit::server().unwrap().url_with(&latin1, &[]);
    let opened = PgPool::connect(&url, PoolConfig::default());
    diesel::sql_query(format!("DROP DATABASE \"{latin1}\" WITH (FORCE)")).execute(&mut db.connect()).unwrap();
    match opened {
        Err(StoreError::Configuration { setting: "database_url", reason }) => {
            assert!(reason.contains("LATIN1") && reason.contains("UTF8"), "{reason}");
        }
        other => panic!("expected a configuration error, got {other:?}"),
    }
    assert!(PgPool::connect(db.url(), PoolConfig::default()).is_ok(), "a UTF8 database opens");
}

/// A switchover that leaves the old primary up and read-only: the health
/// probe finds it so (no write comes to be refused while the process is out
/// of rotation), and the connections made before are replaced, so that the
/// next probe reaches the server the URL names now. Here the pool's one
/// session is made read-only, as the old primary's sessions are; a new one
/// is not.
#[test]
fn a_primary_that_the_health_probe_finds_read_only_has_its_connections_replaced() {
    let db = dployr_testkit::database();
    let pool = PgPool::connect(db.url(), PoolConfig { max_size: 1, ..PoolConfig::default() }).unwrap();
    pool.operation("test.read_only")
        .run(|conn| diesel::sql_query("SET default_transaction_read_only = on").execute(conn))
        .unwrap();
    let refused = pool.ping_writable().unwrap_err();
    assert!(
        matches!(refused, StoreError::Unavailable { .. }) && refused.to_string().contains("only reads"),
        "{refused}"
    );
    pool.ping_writable().expect("the next probe runs on a new connection");
}

/// `pg_current_wal_lsn()` on a primary demoted under the pool fails with
/// "recovery is in progress" (55000): a server that only reads for now,
/// retryable, not a permanent backend error. (Raised here by hand: the
/// test server is not a standby.)
#[test]
fn recovery_in_progress_is_a_read_only_server_and_retryable() {
    let db = dployr_testkit::database();
    let pool = PgPool::connect(db.url(), PoolConfig::default()).unwrap();
    let error = pool
        .operation("test.recovery")
        .run(|conn| {
            diesel::sql_query("DO $$ BEGIN RAISE EXCEPTION 'recovery is in progress' USING ERRCODE = '55000'; END $$")
                .execute(conn)
        })
        .unwrap_err();
    assert!(matches!(error, StoreError::Unavailable { .. }) && error.is_retryable(), "{error}");
    assert!(error.to_string().contains("read-only"), "{error}");
}

/// A database dropped (or renamed during a switch) after the pool opened:
/// the URL worked, and the cause may pass, so a call's checkout is a
/// retryable `Unavailable` (at open the same cause is `Configuration`),
/// not a panic nor a `Backend` error.
#[test]
fn a_database_dropped_under_an_open_pool_is_unavailable_and_retryable() {
    let db = dployr_testkit::database();
    let doomed = format!("{}_dropped", db.name());
    diesel::sql_query(format!("CREATE DATABASE \"{doomed}\"")).execute(&mut db.connect()).unwrap();
    let url = dployr_testkit::server().unwrap().url_with(&doomed, &[]);
    let config = PoolConfig { connection_timeout: Duration::from_millis(500), ..PoolConfig::default() };
    let pool = PgPool::connect(&url, config).unwrap();
    let one = || {
        pool.operation("test.one")
            .idempotent()
            .run(|conn| diesel::select(1.into_sql::<diesel::sql_types::Integer>()).get_result::<i32>(conn))
    };
    assert_eq!(one().unwrap(), 1);
    diesel::sql_query(format!("DROP DATABASE \"{doomed}\" WITH (FORCE)")).execute(&mut db.connect()).unwrap();
    let error = one().unwrap_err();
    assert!(matches!(error, StoreError::Unavailable { .. }) && error.is_retryable(), "{error}");
    let checkout = pool.get().map(drop).unwrap_err();
    assert!(matches!(checkout, StoreError::Unavailable { .. }), "{checkout}");
}

/// While the server refuses new connections, every call that times out
/// waiting for one says why in its reason (what `health()` shows), not
/// only the first: r2d2 hands libpq's last error to one waiter.
#[test]
fn every_checkout_that_times_out_while_the_server_refuses_connections_tells_why() {
    let db = dployr_testkit::database();
    let config = PoolConfig { max_size: 4, connection_timeout: Duration::from_millis(400), ..PoolConfig::default() };
    let pool = PgPool::connect(db.url(), config).unwrap();
    let one = |pool: &PgPool| {
        pool.operation("test.one")
            .idempotent()
            .run(|conn| diesel::select(1.into_sql::<diesel::sql_types::Integer>()).get_result::<i32>(conn))
    };
    assert_eq!(one(&pool).unwrap(), 1);
    // From another database: a session cannot refuse connections to its own.
    let mut admin = PgConnection::establish(&db.url().replacen(&format!("/{}", db.name()), "/postgres", 1)).unwrap();
    diesel::sql_query(format!("ALTER DATABASE \"{}\" ALLOW_CONNECTIONS false", db.name())).execute(&mut admin).unwrap();
    diesel::sql_query(format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{}' AND pid <> pg_backend_pid()",
        db.name()
    ))
    .execute(&mut admin)
    .unwrap();
    let errors: Vec<StoreError> = std::thread::scope(|scope| {
        let calls: Vec<_> = (0..6).map(|_| scope.spawn(|| one(&pool))).collect();
        calls.into_iter().map(|call| call.join().unwrap().unwrap_err()).collect()
    });
    diesel::sql_query(format!("ALTER DATABASE \"{}\" ALLOW_CONNECTIONS true", db.name())).execute(&mut admin).unwrap();
    let timed_out: Vec<&StoreError> =
        errors.iter().filter(|error| error.to_string().contains("no PostgreSQL connection within")).collect();
    assert!(timed_out.len() >= 4, "most calls wait for a new connection: {errors:#?}");
    for error in timed_out {
        assert!(matches!(error, StoreError::Unavailable { .. }) && error.is_retryable(), "{error}");
        let text = error.to_string();
        assert!(
            text.contains("the last attempt to connect failed")
                && text.contains("is not currently accepting connections"),
            "the reason says why: {text}"
        );
        assert!(!text.contains('\n'), "on one line: {text:?}");
    }
    assert_eq!(one(&pool).unwrap(), 1, "serves again once the server accepts connections");
}
