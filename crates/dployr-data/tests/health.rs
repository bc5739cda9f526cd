//! `DataLayer::health()` answers within the call bound whatever a server
//! does (here the migration URL's server accepts the connection and then
//! answers nothing: a frozen host, a stuck proxy), and says the truth of a
//! primary that answers but takes no writes.

#![cfg(test)]

use std::time::{Duration, Instant};

use dployr_data::{Config, DataLayer, DeadlineConfig, KvBackendConfig, PoolConfig};
use dployr_testkit::BlackholeProxy;

#[test]
fn health_answers_within_the_call_bound_when_the_migration_server_answers_nothing() {
    let db = dployr_testkit::database();
    let (proxy, silent) = BlackholeProxy::in_front_of(db.url()).unwrap();
    proxy.blackhole();
    let pool = PoolConfig {
        statement_timeout: Some(Duration::from_millis(500)),
        deadline: DeadlineConfig { call_timeout: Some(Duration::from_millis(500)), ..DeadlineConfig::default() },
        ..PoolConfig::default()
    };
    let config = Config::new(db.url())
        .with_kv(KvBackendConfig::Memory)
        .with_pool(pool)
        .with_migrate_database_url(silent)
        .without_migrations_on_start();
    let data = DataLayer::open(config).unwrap();
    let bound = data.pool().call_bound();
    for _ in 0..2 {
        let started = Instant::now();
        let health = data.health();
        let took = started.elapsed();
        // Before, the probe waited for the runner's connect timeout (10 s).
        assert!(took < bound + Duration::from_secs(3), "health took {took:?} (bound {bound:?}): {health:?}");
        assert!(health.primary.ok && health.kv.ok, "{health:?}");
        assert!(!health.migrations.up_to_date && health.migrations.error.is_some(), "{health:?}");
        assert!(!health.is_ready());
    }
}

/// A primary left read-only (a switchover that keeps the old primary up,
/// `default_transaction_read_only`) answers `SELECT 1` while every write
/// fails: the health says it is not ready, and why.
#[test]
fn health_is_not_ready_on_a_primary_that_answers_but_only_reads() {
    use diesel::RunQueryDsl as _;
    use dployr_data::{NewUser, Provider, StoreError, UserStore as _};

    let db = dployr_testkit::database();
    let config = || Config::new(db.url()).with_kv(KvBackendConfig::Memory).without_migrations_on_start();
    assert!(DataLayer::open(config()).unwrap().health().is_ready());
    let alter = format!("ALTER DATABASE \"{}\" SET default_transaction_read_only = on", db.name());
    diesel::sql_query(alter).execute(&mut db.connect()).unwrap();
    let data = DataLayer::open(config()).unwrap();
    let health = data.health();
    assert!(!health.primary.ok && !health.is_ready(), "{health:?}");
    assert!(health.primary.error.as_deref().is_some_and(|error| error.contains("only reads")), "{health:?}");
    let email = dployr_data::Email::parse("read-only@example.io").unwrap();
    let error = data.users().upsert(NewUser::new(email, Provider::Github)).unwrap_err();
    assert!(matches!(error, StoreError::Unavailable { .. }), "{error}");
}

/// Health checks come in together (a readiness and a liveness probe,
/// several load balancers): each call made while another's probe of the
/// migrations runs gets that probe's answer, not "not answered yet", which
/// turned a healthy process not ready for one caller of every pair.
#[test]
fn health_calls_made_together_are_each_ready() {
    let db = dployr_testkit::database();
    let config = Config::new(db.url()).with_kv(KvBackendConfig::Memory).without_migrations_on_start();
    let data = DataLayer::open(config).unwrap();
    for round in 0..10 {
        let start = std::sync::Barrier::new(4);
        let answers: Vec<_> = std::thread::scope(|scope| {
            let calls: Vec<_> = (0..4)
                .map(|_| {
                    scope.spawn(|| {
                        start.wait();
                        data.health()
                    })
                })
                .collect();
            calls.into_iter().map(|call| call.join().unwrap()).collect()
        });
        for health in answers {
            assert!(health.is_ready(), "round {round}: {health:?}");
        }
    }
}

/// A primary that answers nothing (a frozen host, a dropped link), with the
/// key-value backend and the migrations on the same server: the probes that
/// would ask it again are not sent, so `health()` answers within one call
/// bound, not one per probe.
#[test]
fn health_answers_within_one_call_bound_when_the_primary_answers_nothing() {
    let db = dployr_testkit::database();
    let (proxy, silent) = BlackholeProxy::in_front_of(db.url()).unwrap();
    let pool = PoolConfig {
        statement_timeout: Some(Duration::from_millis(500)),
        deadline: DeadlineConfig { call_timeout: Some(Duration::from_millis(500)), ..DeadlineConfig::default() },
        ..PoolConfig::default()
    };
    let config = Config::new(&silent)
        .with_kv(KvBackendConfig::Postgres { purge_every: None })
        .with_pool(pool)
        .without_migrations_on_start();
    let data = DataLayer::open(config).unwrap();
    assert!(data.health().is_ready());
    proxy.blackhole();
    let bound = data.pool().call_bound();
    let started = Instant::now();
    let health = data.health();
    let took = started.elapsed();
    // Before, the primary's, the key-value backend's and the migrations'
    // probes each waited out the bound, one after another.
    assert!(took < bound + Duration::from_millis(1500), "health took {took:?} (bound {bound:?}): {health:?}");
    assert!(!health.primary.ok && !health.kv.ok && !health.migrations.up_to_date, "{health:?}");
    for skipped in [&health.kv.error, &health.migrations.error] {
        assert!(skipped.as_deref().is_some_and(|error| error.starts_with("not probed")), "{health:?}");
    }
    proxy.restore();
    let mut ready = data.health();
    let until = Instant::now() + Duration::from_secs(10);
    while !ready.is_ready() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(100));
        ready = data.health();
    }
    assert!(ready.is_ready(), "ready again once the primary answers: {ready:?}");
}

/// A connection limit reached (a role's `CONNECTION LIMIT`, the server's
/// `max_connections`) by the pool's own connections: the process
/// serves, and its health says ready. The probe of the migrations opened a
/// connection of its own on every call, which the limit refused: every
/// process turned not ready together while each served.
#[test]
fn health_is_ready_while_the_roles_connection_limit_is_reached_by_its_own_pool() {
    use diesel::connection::SimpleConnection as _;
    use dployr_data::{Email, NewUser, Provider, UserStore as _};

    let db = dployr_testkit::database();
    if !db.superuser() {
        eprintln!("skipped: making a role with a connection limit needs a superuser");
        return;
    }
    let server = dployr_testkit::server().unwrap();
    let role = format!("dployr_limited_{}", db.name().replace(|c: char| !c.is_ascii_alphanumeric(), "_"));
    db.connect()
        .batch_execute(&format!(
            "CREATE ROLE \"{role}\" LOGIN; \
             GRANT ALL ON ALL TABLES IN SCHEMA public TO \"{role}\"; \
             GRANT USAGE ON SCHEMA public TO \"{role}\""
        ))
        .unwrap();
    let url = server.url_with(db.name(), &[("user", role.as_str())]);
    let config = Config::new(url.clone())
        .with_kv(KvBackendConfig::Memory)
        .with_pool(PoolConfig { max_size: 2, ..PoolConfig::default() })
        .without_migrations_on_start();
    let data = DataLayer::open(config).unwrap();
    // The pool opens its second connection when two are asked for at once.
    drop((data.pool().get().unwrap(), data.pool().get().unwrap()));
    assert_eq!(data.pool().state().0, 2);
    // Another client of the role, and then the limit is reached.
    let other = <diesel::PgConnection as diesel::Connection>::establish(&url).unwrap();
    db.connect().batch_execute(&format!("ALTER ROLE \"{role}\" CONNECTION LIMIT 3")).unwrap();
    data.users().upsert(NewUser::new(Email::parse("limited@example.io").unwrap(), Provider::Github)).unwrap();
    let health = data.health();
    drop((data, other));
    db.connect().batch_execute(&format!("DROP OWNED BY \"{role}\"; DROP ROLE \"{role}\"")).unwrap();
    assert!(health.is_ready(), "{health:?}");
}
