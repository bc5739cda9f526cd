//! Read routing against a real primary and a real streaming replica of it
//! (`dployr_testkit::ReplicatedServer`: `pg_basebackup -R`, WAL streamed):
//! which server answers is read from the replica pool's statement counter
//! and from the replica's own statistics (`pg_stat_user_tables`), lag is
//! made by pausing replay, failure by stopping the replica.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection as _;
use diesel::prelude::*;
use diesel::sql_types::BigInt;
use dployr_domain::{
    BootstrapTokenStore, ClusterStore, Email, InstanceStore, NewInstance, NewUser, Nonce, Page, Provider, Role,
    StoreError, Tag, User, UserStore,
};
use dployr_pg::{
    DeadlineConfig, PgBootstrapTokenStore, PgClusterStore, PgInstanceStore, PgPool, PgUserStore, PoolConfig,
    ReplicaConfig, ReplicaSet,
};
use dployr_testkit::replica::SKIP;
use dployr_testkit::{ReplicatedServer, Shutdown};

/// The primary pool (with the replica when asked) and its stores.
struct Routed {
    pool: PgPool,
    users: PgUserStore,
    clusters: PgClusterStore,
    instances: PgInstanceStore,
    tokens: PgBootstrapTokenStore,
}

impl Routed {
    fn new(server: &ReplicatedServer, replicas: Option<ReplicaConfig>) -> Self {
        let config = PoolConfig { max_size: 4, ..PoolConfig::default() };
        let mut pool = PgPool::connect(server.primary_url(), config).unwrap();
        if let Some(replicas) = replicas {
            let urls = [server.replica_url().to_owned()];
            let set = ReplicaSet::connect(&pool, &urls, "replica_urls", config, replicas).unwrap();
            pool = pool.with_replicas(set);
        }
        Self {
            users: PgUserStore::new(pool.clone()),
            clusters: PgClusterStore::new(pool.clone()),
            instances: PgInstanceStore::new(pool.clone()),
            tokens: PgBootstrapTokenStore::new(pool.clone()),
            pool,
        }
    }

    /// Statements sent through the replica's pool so far.
    fn replica_statements(&self) -> u64 {
        let replicas = self.pool.replicas().unwrap();
        replicas.pools().map(|(_, pool)| pool.stats().statements).sum()
    }

    fn in_rotation(&self) -> bool {
        self.pool.replicas().unwrap().status()[0].in_rotation
    }

    /// Waits (up to 20 s) until the replica is in rotation or out of it.
    fn wait_until_in_rotation(&self, wanted: bool) -> Duration {
        let started = Instant::now();
        while self.in_rotation() != wanted {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "replica never {} rotation: {:?}",
                if wanted { "entered" } else { "left" },
                self.pool.replicas().unwrap().status()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        started.elapsed()
    }
}

fn start() -> Option<ReplicatedServer> {
    let server = ReplicatedServer::start().unwrap();
    if server.is_none() {
        eprintln!("{SKIP}");
    }
    server
}

fn email(address: &str) -> Email {
    Email::parse(address).unwrap()
}

fn fast_sampling(max_lag: Duration) -> ReplicaConfig {
    ReplicaConfig { max_lag, sample_every: Duration::from_millis(100), ..ReplicaConfig::default() }
}

#[derive(QueryableByName)]
struct Scans {
    #[diesel(sql_type = BigInt)]
    scans: i64,
}

/// Sequential and index scans of the stores' tables that the replica's
/// own statistics counted (none comes from replay or the lag sampler).
fn replica_scans(server: &ReplicatedServer) -> i64 {
    let mut conn = server.connect_replica().unwrap();
    diesel::sql_query(
        "SELECT coalesce(sum(coalesce(seq_scan, 0) + coalesce(idx_scan, 0)), 0)::bigint AS scans \
         FROM pg_stat_user_tables WHERE relname IN ('users', 'clusters', 'user_clusters', 'instances', \
         'bootstrap_tokens', 'cluster_counts')",
    )
    .get_result::<Scans>(&mut conn)
    .unwrap()
    .scans
}

/// Statistics reach the shared view when a backend flushes them, at the
/// latest when it exits: the pools were dropped, so wait for that.
fn replica_scans_after_backends_exit(server: &ReplicatedServer, at_least: i64) -> i64 {
    let started = Instant::now();
    loop {
        let scans = replica_scans(server);
        if scans >= at_least || started.elapsed() > Duration::from_secs(15) {
            return scans;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn replica_safe_reads_are_answered_by_the_replica_and_the_others_never_are() {
    let Some(server) = start() else { return };
    let setup = Routed::new(&server, None);
    let owner = setup.users.upsert(NewUser::new(email("owner@example.io"), Provider::Github)).unwrap();
    let cluster = setup.clusters.create_for_owner(&owner.id).unwrap();
    setup.clusters.add_users(&cluster.id, &[email("invitee@example.io")]).unwrap();
    let tag = Tag::parse("web-1").unwrap();
    let instance = setup
        .instances
        .create(&cluster.id, NewInstance { address: "10.0.0.1".try_into().unwrap(), tag: tag.clone(), metadata: None })
        .unwrap();
    let nonce = Nonce::parse("nonce-1").unwrap();
    setup.tokens.create(&instance.id, &nonce).unwrap();
    drop(setup);
    server.wait_for_replay(Duration::from_secs(10)).unwrap();
    let before = replica_scans(&server);

    let stores = Routed::new(&server, Some(fast_sampling(Duration::from_secs(1))));
    stores.wait_until_in_rotation(true);
    let primary_before = stores.pool.stats().statements;
    let page = Page::first(10);
    assert_eq!(stores.users.get(&owner.id).unwrap().map(|user| user.email), Some(owner.email.clone()));
    assert_eq!(stores.clusters.get(&cluster.id).unwrap().map(|found| found.id), Some(cluster.id));
    assert_eq!(stores.clusters.members(&cluster.id, &page).unwrap().total, 1);
    assert_eq!(stores.clusters.invites(&cluster.id, &page).unwrap().total, 1);
    assert!(stores.clusters.pending_invites(&owner.id).unwrap().is_empty());
    assert_eq!(stores.clusters.owner(&cluster.id).unwrap().map(|member| member.user_id), Some(owner.id));
    assert_eq!(stores.clusters.users_with_role(&cluster.id, Role::Invited).unwrap().len(), 1);
    assert_eq!(stores.instances.get(&instance.id).unwrap().map(|found| found.id), Some(instance.id));
    assert_eq!(stores.instances.list_by_cluster(&cluster.id, &page).unwrap().total, 1);
    assert_eq!(stores.replica_statements(), 9, "the nine replica-safe reads, one statement each, on the replica");
    assert_eq!(stores.pool.stats().statements - primary_before, 0, "none of them on the primary");
    drop(stores);
    let after_safe_reads = replica_scans_after_backends_exit(&server, before + 9);
    assert!(after_safe_reads >= before + 9, "the replica counted their scans: {before} -> {after_safe_reads}");

    let stores = Routed::new(&server, Some(fast_sampling(Duration::from_secs(1))));
    stores.wait_until_in_rotation(true);
    let primary_before = stores.pool.stats().statements;
    assert!(stores.users.get_by_email(&owner.email).unwrap().is_some());
    assert!(stores.clusters.owned_cluster(&owner.id).unwrap().is_some());
    assert_eq!(stores.clusters.role_of(&owner.id, &cluster.id).unwrap(), Some(Role::Owner));
    assert!(stores.clusters.can_read(&owner.id, &cluster.id).unwrap());
    assert!(stores.clusters.can_write(&owner.id, &cluster.id).unwrap());
    assert!(stores.clusters.is_admin(&owner.id, &cluster.id).unwrap());
    assert!(stores.clusters.is_owner(&owner.id, &cluster.id).unwrap());
    stores.clusters.integrations(&cluster.id).unwrap();
    assert!(stores.instances.get_by_tag(&tag).unwrap().is_some());
    assert!(!stores.tokens.is_used(&nonce).unwrap());
    assert_eq!(stores.clusters.user_clusters(&owner.id).unwrap().len(), 1);
    assert_eq!(stores.replica_statements(), 0, "no primary-only read reached the replica");
    assert_eq!(stores.pool.stats().statements - primary_before, 11);
    drop(stores);
    // Flushed at the latest when their backends exit: give them the time
    // the replica-safe reads' scans took to show, and more.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(replica_scans(&server), after_safe_reads, "the replica's own statistics saw no primary-only read");
}

#[test]
fn a_replica_whose_replay_is_paused_beyond_the_bound_is_skipped_within_a_sampling_period() {
    let Some(server) = start() else { return };
    let config = fast_sampling(Duration::from_millis(300));
    let stores = Routed::new(&server, Some(config));
    stores.wait_until_in_rotation(true);

    server.pause_replay().unwrap();
    let late = stores.users.upsert(NewUser::new(email("late@example.io"), Provider::Google)).unwrap();
    // The lag passes max_lag after the write, and the first sample that
    // measures it above the bound takes the replica out: no status ever
    // shows a lag above the bound with the replica still in rotation. (How
    // long that takes in wall time is the sampling period plus the
    // machine's scheduling delay, which a busy machine stretches: it is not
    // asserted, only that it happens, within 20 s.)
    let started = Instant::now();
    loop {
        let status = stores.pool.replicas().unwrap().status().remove(0);
        let above_bound = status.lag.is_some_and(|lag| lag > config.max_lag);
        assert!(!(above_bound && status.in_rotation), "a sample above the bound left it in rotation: {status:?}");
        if !status.in_rotation {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "the paused replica never left rotation: {status:?}");
        std::thread::sleep(Duration::from_millis(5));
    }

    let replica_before = stores.replica_statements();
    let found: Option<User> = stores.users.get(&late.id).unwrap();
    assert_eq!(found.map(|user| user.id), Some(late.id), "the primary answered, with the write");
    assert_eq!(stores.replica_statements(), replica_before, "the lagging replica was not asked");

    server.resume_replay().unwrap();
    stores.wait_until_in_rotation(true);
    assert_eq!(stores.users.get(&late.id).unwrap().map(|user| user.id), Some(late.id));
    assert_eq!(stores.replica_statements(), replica_before + 1, "back in rotation, the replica answered");
}

#[test]
fn a_stopped_replica_fails_over_to_the_primary_with_no_error_to_the_caller() {
    let Some(mut server) = start() else { return };
    // The default sampling (1 s): the reads below come before the sampler
    // can notice, so the read path itself must fail over.
    let stores = Routed::new(&server, Some(ReplicaConfig::default()));
    let user = stores.users.upsert(NewUser::new(email("stays@example.io"), Provider::Google)).unwrap();
    server.wait_for_replay(Duration::from_secs(10)).unwrap();
    stores.wait_until_in_rotation(true);
    assert!(stores.users.get(&user.id).unwrap().is_some());
    assert_eq!(stores.replica_statements(), 1);

    server.stop_replica();
    for _ in 0..5 {
        assert_eq!(stores.users.get(&user.id).unwrap().map(|found| found.id), Some(user.id));
        assert_eq!(stores.clusters.user_clusters(&user.id).unwrap(), Vec::new());
    }
    assert!(!stores.in_rotation(), "{:?}", stores.pool.replicas().unwrap().status());
    let status = &stores.pool.replicas().unwrap().status()[0];
    assert_eq!(status.lag, None, "no lag is reported for a replica that does not answer");
    // Each of the 5 replica-safe reads passed it over: the first found it
    // failing (unless its sampler noticed first), the others skipped it as
    // down (`user_clusters` runs on the primary alone).
    assert_eq!(status.skips.error + status.skips.down, 5, "{status:?}");
    assert!(status.skips.error <= 1, "{status:?}");
    assert_eq!((status.skips.lag, status.skips.not_sampled, status.skips.behind_write), (0, 0, 0), "{status:?}");
}

/// A pool on `server`'s primary with its replica, and its user store:
/// short deadlines, so a read held by a frozen replica ends soon; the
/// default sampling (1 s), so the read path meets a frozen replica before
/// its sampler can take it out of rotation.
fn with_short_deadlines(server: &ReplicatedServer) -> (PgPool, PgUserStore) {
    let config = PoolConfig {
        max_size: 4,
        connection_timeout: Duration::from_millis(500),
        statement_timeout: Some(Duration::from_millis(300)),
        deadline: DeadlineConfig {
            margin: Duration::from_millis(200),
            grace: Duration::from_millis(200),
            ..DeadlineConfig::default()
        },
        ..PoolConfig::default()
    };
    let pool = PgPool::connect(server.primary_url(), config).unwrap();
    let urls = [server.replica_url().to_owned()];
    let set = ReplicaSet::connect(&pool, &urls, "replica_urls", config, ReplicaConfig::default()).unwrap();
    let pool = pool.with_replicas(set);
    let users = PgUserStore::new(pool.clone());
    (pool, users)
}

/// Waits (up to 20 s) until `pool`'s replica is in rotation; when it began.
fn wait_until_in_rotation(pool: &PgPool) -> Instant {
    let started = Instant::now();
    while !pool.replicas().unwrap().status()[0].in_rotation {
        assert!(started.elapsed() < Duration::from_secs(20), "the replica never entered rotation");
        std::thread::sleep(Duration::from_millis(5));
    }
    started
}

#[test]
fn a_frozen_replica_fails_over_to_the_primary_with_no_error_after_its_own_deadline() {
    let Some(server) = start() else { return };
    let (pool, users) = with_short_deadlines(&server);
    let user = users.upsert(NewUser::new(email("frozen@example.io"), Provider::Google)).unwrap();
    server.wait_for_replay(Duration::from_secs(10)).unwrap();
    wait_until_in_rotation(&pool);

    let frozen = server.freeze_replica().unwrap();
    let read = users.get(&user.id);
    drop(frozen);
    assert_eq!(read.unwrap().map(|found| found.id), Some(user.id), "the primary answers what the replica could not");
    let status = &pool.replicas().unwrap().status()[0];
    assert!(status.skips.error + status.skips.down >= 1, "{status:?}");
}

#[test]
fn a_read_held_by_every_replica_and_then_by_the_primary_ends_within_two_call_bounds() {
    let Some(server) = start() else { return };
    // The call bound is 2 s: the server's statement timeout (1 s) ends the
    // primary's run; a frozen replica answers neither it nor the cancel,
    // so each replica run lasts the whole bound, until its socket is cut.
    let config = PoolConfig {
        max_size: 4,
        connection_timeout: Duration::from_millis(500),
        statement_timeout: Some(Duration::from_secs(1)),
        deadline: DeadlineConfig {
            margin: Duration::from_millis(200),
            grace: Duration::from_millis(800),
            ..DeadlineConfig::default()
        },
        ..PoolConfig::default()
    };
    let mut pool = PgPool::connect(server.primary_url(), config).unwrap();
    // Two replicas of the set, both on the testkit's one replica server, so
    // one freeze holds both. Samples 5 s apart: no sample can take either
    // out of rotation while the read runs.
    let urls = [server.replica_url().to_owned(), server.replica_url().to_owned()];
    let sampling = ReplicaConfig { sample_every: Duration::from_secs(5), ..ReplicaConfig::default() };
    let set = ReplicaSet::connect(&pool, &urls, "replica_urls", config, sampling).unwrap();
    pool = pool.with_replicas(set);
    let users = PgUserStore::new(pool.clone());
    let user = users.upsert(NewUser::new(email("held@example.io"), Provider::Google)).unwrap();
    server.wait_for_replay(Duration::from_secs(10)).unwrap();
    let started = Instant::now();
    while !pool.replicas().unwrap().status().iter().all(|replica| replica.in_rotation) {
        assert!(started.elapsed() < Duration::from_secs(20), "the replicas never entered rotation");
        thread::sleep(Duration::from_millis(5));
    }
    // A connection open in each replica pool, so that each replica run
    // waits on its statement (the whole bound), not on a checkout.
    while !pool.replicas().unwrap().pools().all(|(_, replica)| replica.stats().statements > 0) {
        assert_eq!(users.get(&user.id).unwrap().map(|found| found.id), Some(user.id));
        assert!(started.elapsed() < Duration::from_secs(20), "a replica never answered");
    }
    // The primary holds the read too, until its statement timeout.
    let mut locker = PgConnection::establish(server.primary_url()).unwrap();
    locker.batch_execute("BEGIN; LOCK TABLE users IN ACCESS EXCLUSIVE MODE").unwrap();

    let bound = pool.call_bound();
    let frozen = server.freeze_replica().unwrap();
    let read_started = Instant::now();
    let read = users.get(&user.id);
    let elapsed = read_started.elapsed();
    drop(frozen);
    locker.batch_execute("ROLLBACK").unwrap();
    println!("a read held by two replicas and the primary took {elapsed:?} (call bound {bound:?})");
    assert!(read.is_err(), "the primary's statement timeout ends the read: {read:?}");
    // The replicas' runs share one bound and the primary has its own: two
    // in all. Each replica with its own bound made it three, and a third
    // second past (the slack is under the primary's 1 s).
    let slack = Duration::from_millis(600);
    assert!(elapsed <= 2 * bound + slack, "{elapsed:?} is more than two call bounds of {bound:?}");
    let status = pool.replicas().unwrap().status();
    assert!(status.iter().map(|replica| replica.skips.error).sum::<u64>() >= 1, "{status:?}");
}

/// Reads by the replica until one is answered by it alone: one statement
/// on its pool, none on the primary's (a read on a connection the restart
/// ended fails over to the primary, and the connection is discarded).
fn wait_until_the_replica_answers(stores: &Routed, user: &User) -> Duration {
    let started = Instant::now();
    loop {
        let (replica, primary) = (stores.replica_statements(), stores.pool.stats().statements);
        assert_eq!(stores.users.get(&user.id).unwrap().map(|found| found.id), Some(user.id));
        if stores.replica_statements() == replica + 1 && stores.pool.stats().statements == primary {
            return started.elapsed();
        }
        assert!(started.elapsed() < Duration::from_secs(20), "the replica never answered again");
        thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_replica_restarted_under_load_fails_no_read_and_answers_again() {
    let Some(mut server) = start() else { return };
    let stores = Arc::new(Routed::new(&server, Some(fast_sampling(Duration::from_secs(5)))));
    let user = stores.users.upsert(NewUser::new(email("reader@example.io"), Provider::Google)).unwrap();
    server.wait_for_replay(Duration::from_secs(10)).unwrap();
    stores.wait_until_in_rotation(true);
    wait_until_the_replica_answers(&stores, &user);

    // Four threads of replica-safe reads through both restarts.
    let stop = Arc::new(AtomicBool::new(false));
    let (reads, failures) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let (stores, stop, user) = (Arc::clone(&stores), Arc::clone(&stop), user.clone());
            let (reads, failures) = (Arc::clone(&reads), Arc::clone(&failures));
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let found = stores.users.get(&user.id).map(|found| found.map(|found| found.id));
                    let memberships = stores.clusters.user_clusters(&user.id);
                    if found.as_ref().ok() == Some(&Some(user.id)) && memberships.is_ok_and(|m| m.is_empty()) {
                        reads.fetch_add(2, Ordering::Relaxed);
                    } else {
                        failures.fetch_add(1, Ordering::Relaxed);
                        eprintln!("a read failed: {found:?}");
                    }
                }
            })
        })
        .collect();
    for shutdown in [Shutdown::Fast, Shutdown::Immediate] {
        thread::sleep(Duration::from_millis(300));
        server.restart_replica(shutdown, Duration::from_millis(300)).unwrap();
        let took = wait_until_the_replica_answers(&stores, &user);
        println!("after the {shutdown:?} restart, the replica answered again within {took:?}");
    }
    stop.store(true, Ordering::Relaxed);
    for reader in readers {
        reader.join().unwrap();
    }
    let (reads, failures) = (reads.load(Ordering::Relaxed), failures.load(Ordering::Relaxed));
    println!("{reads} reads, {failures} failed");
    assert_eq!(failures, 0, "a read failed while the replica restarted: the primary should have answered it");
    assert!(reads > 100, "{reads} reads");
}

/// The primary writes WAL that holds no commit (checkpoints, the standby
/// snapshots it logs every 15 s, vacuum), and a replica is always a
/// moment behind the primary's newest WAL. Sampled in that moment, with no
/// recent commit to date it by, the replica's lag was bounded by the time
/// since the previous sample (a sampling period), and the default bound
/// (1 s) is one sampling period: the replica left rotation for a period,
/// and `cargo xtask bench` saw routed reads reach the primary. Here the
/// replica is made up to 20 ms behind, two fifths of the time (replay
/// paused while the primary writes WAL without a commit, then resumed),
/// with a bound of 50 ms and samples every 100 ms: it must stay in
/// rotation, its lag measured in milliseconds.
#[test]
fn a_replica_a_moment_behind_on_wal_without_commits_stays_in_rotation() {
    let Some(server) = start() else { return };
    let config = ReplicaConfig {
        max_lag: Duration::from_millis(50),
        sample_every: Duration::from_millis(100),
        ..ReplicaConfig::default()
    };
    let stores = Routed::new(&server, Some(config));
    let mut primary = PgConnection::establish(server.primary_url()).unwrap();
    // Flushed within a millisecond, so streamed at once (the default
    // flushes such WAL every 200 ms).
    diesel::sql_query("ALTER SYSTEM SET wal_writer_delay = '1ms'").execute(&mut primary).unwrap();
    diesel::sql_query("SELECT pg_reload_conf()").execute(&mut primary).unwrap();
    stores.wait_until_in_rotation(true);

    let stop = AtomicBool::new(false);
    let (looked, out) = thread::scope(|scope| {
        scope.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                server.pause_replay().unwrap();
                // A non-transactional message: a WAL record, no transaction, no commit.
                diesel::sql_query("SELECT pg_logical_emit_message(false, 'dployr-test', 'no commit')")
                    .execute(&mut primary)
                    .unwrap();
                thread::sleep(Duration::from_millis(20));
                server.resume_replay().unwrap();
                thread::sleep(Duration::from_millis(30));
            }
        });
        let (mut looked, mut out) = (0, 0);
        let until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < until {
            looked += 1;
            if !stores.in_rotation() {
                out += 1;
            }
            thread::sleep(Duration::from_millis(5));
        }
        stop.store(true, Ordering::Relaxed);
        (looked, out)
    });
    println!("out of rotation at {out} of {looked} looks");
    let status = stores.pool.replicas().unwrap().status();
    // Without the catch-up wait it was out about two fifths of the time;
    // a tenth leaves room for a busy machine's stalls.
    assert!(out * 10 <= looked, "out of rotation at {out} of {looked} looks: {status:?}");
}

#[test]
fn a_read_after_a_write_sees_the_write_through_its_wal_position() {
    let Some(server) = start() else { return };
    // A bound so loose that the paused replica stays in rotation: only the
    // WAL position keeps the read from a replica that lacks the write.
    let stores = Routed::new(&server, Some(fast_sampling(Duration::from_secs(60))));
    stores.wait_until_in_rotation(true);
    server.pause_replay().unwrap();

    let written = stores.users.upsert(NewUser::new(email("fresh@example.io"), Provider::Google)).unwrap();
    let position = stores.pool.wal_position().unwrap();
    assert_eq!(stores.users.get(&written.id).unwrap(), None, "without the position, the stale replica answers");
    {
        let _scope = stores.pool.reads_after(position);
        let seen = stores.users.get(&written.id).unwrap();
        assert_eq!(seen.map(|user| user.id), Some(written.id), "with it, the read sees the write");
    }
    {
        let _scope = stores.pool.reads_on_primary();
        assert_eq!(stores.users.get(&written.id).unwrap().map(|user| user.id), Some(written.id));
    }

    server.resume_replay().unwrap();
    let replica_before = stores.replica_statements();
    let _scope = stores.pool.reads_after(position);
    assert_eq!(stores.users.get(&written.id).unwrap().map(|user| user.id), Some(written.id));
    assert!(stores.replica_statements() > replica_before, "once replayed, the replica answers it");
}

/// Refused by name before any replica is contacted (so no replicated
/// server is needed): a sampler with no rest between samples, a lag bound
/// that skips every replica, and waits whose clock arithmetic would
/// overflow (a panic on a read-your-writes read).
#[test]
fn a_replica_config_out_of_range_is_refused_by_name_before_connecting() {
    let db = dployr_testkit::database();
    let config = PoolConfig { max_size: 1, ..PoolConfig::default() };
    let pool = PgPool::connect(db.url(), config).unwrap();
    let unused = ["postgres://nobody@127.0.0.1:1/none".to_owned()];
    let too_long = Duration::from_millis(i32::MAX as u64 + 1);
    for (field, replicas) in [
        ("replica sample_every", ReplicaConfig { sample_every: Duration::from_millis(9), ..ReplicaConfig::default() }),
        ("replica sample_every", ReplicaConfig { sample_every: too_long, ..ReplicaConfig::default() }),
        ("replica max_lag", ReplicaConfig { max_lag: Duration::ZERO, ..ReplicaConfig::default() }),
        (
            "replica read_your_writes_wait",
            ReplicaConfig { read_your_writes_wait: Duration::MAX, ..ReplicaConfig::default() },
        ),
    ] {
        match ReplicaSet::connect(&pool, &unused, "replica_urls", config, replicas) {
            Err(StoreError::Invalid { field: named, .. }) => assert_eq!(named, field, "{replicas:?}"),
            other => panic!("{field}: {other:?}"),
        }
    }
}

/// Scopes nest: the strictest open scope of the thread holds, whichever
/// was opened last or ends first. A looser scope opened inside a stricter
/// one, or a scope dropped before one opened after it, used to put the
/// thread's floor back to its own, sending a read that must see a write to
/// the stale replica.
#[test]
fn nested_read_scopes_hold_the_strictest_floor_whichever_ends_first() {
    let Some(server) = start() else { return };
    let stores = Routed::new(&server, Some(fast_sampling(Duration::from_secs(60))));
    stores.wait_until_in_rotation(true);
    let before_the_write = stores.pool.wal_position().unwrap();
    server.pause_replay().unwrap();
    let written = stores.users.upsert(NewUser::new(email("nested@example.io"), Provider::Google)).unwrap();
    let after_the_write = stores.pool.wal_position().unwrap();
    let sees_the_write = |what: &str| {
        let found = stores.users.get(&written.id).unwrap().map(|user| user.id);
        assert_eq!(found, Some(written.id), "{what}: the read went to the stale replica");
    };
    assert_eq!(stores.users.get(&written.id).unwrap(), None, "outside every scope, the stale replica answers");
    {
        let _primary = stores.pool.reads_on_primary();
        let _older = stores.pool.reads_after(before_the_write);
        sees_the_write("an earlier position inside the primary's scope");
    }
    {
        let _newer = stores.pool.reads_after(after_the_write);
        let _older = stores.pool.reads_after(before_the_write);
        sees_the_write("an earlier position inside a later one");
    }
    {
        let first = stores.pool.reads_after(after_the_write);
        let _second = stores.pool.reads_on_primary();
        drop(first);
        sees_the_write("the primary's scope after an earlier scope ended first");
    }
    assert_eq!(stores.users.get(&written.id).unwrap(), None, "every scope ended: the stale replica answers again");
    server.resume_replay().unwrap();
}

/// A replica that fails a read for a reason of its own (here: the table
/// the read names is missing on it, as after a migration it has not
/// replayed yet) passes the read to the primary, with no error to the
/// caller, and leaves rotation until a sample succeeds.
#[test]
fn a_replica_failing_a_read_with_an_error_of_its_own_falls_back_to_the_primary() {
    let Some(server) = start() else { return };
    let stores = Routed::new(&server, Some(fast_sampling(Duration::from_secs(60))));
    let user = stores.users.upsert(NewUser::new(email("moved@example.io"), Provider::Google)).unwrap();
    let mut primary = PgConnection::establish(server.primary_url()).unwrap();
    primary.batch_execute("ALTER TABLE users RENAME TO users_away").unwrap();
    server.wait_for_replay(Duration::from_secs(10)).unwrap();
    server.pause_replay().unwrap();
    primary.batch_execute("ALTER TABLE users_away RENAME TO users").unwrap();
    stores.wait_until_in_rotation(true);

    let found = stores.users.get(&user.id);
    server.resume_replay().unwrap();
    assert_eq!(found.unwrap().map(|found| found.id), Some(user.id), "the primary answers what the replica could not");
    let status = &stores.pool.replicas().unwrap().status()[0];
    assert_eq!(status.skips.error, 1, "{status:?}");
}

/// A replica whose answer this binary cannot decode (here its
/// `users.metadata` is still `json` where the primary's is `jsonb`, as
/// after a migration that changed the column's type and that it has not
/// replayed yet) is not the caller's failure: the primary answers. The
/// replica stays in rotation (an undecodable answer may be the row's, see
/// the next test).
#[test]
fn a_replica_answer_that_cannot_be_decoded_falls_back_to_the_primary() {
    let Some(server) = start() else { return };
    let stores = Routed::new(&server, Some(fast_sampling(Duration::from_secs(60))));
    let user = stores.users.upsert(NewUser::new(email("retyped@example.io"), Provider::Google)).unwrap();
    let mut primary = PgConnection::establish(server.primary_url()).unwrap();
    primary
        .batch_execute(
            "ALTER TABLE users RENAME TO users_typed; \
             CREATE VIEW users AS SELECT id, email, name, picture, provider, metadata::json AS metadata, \
             created_at, updated_at, first_signed_in_at FROM users_typed",
        )
        .unwrap();
    server.wait_for_replay(Duration::from_secs(10)).unwrap();
    server.pause_replay().unwrap();
    primary.batch_execute("DROP VIEW users; ALTER TABLE users_typed RENAME TO users").unwrap();
    stores.wait_until_in_rotation(true);

    let before = stores.replica_statements();
    let found = stores.users.get(&user.id);
    let on_replica = stores.replica_statements() - before;
    server.resume_replay().unwrap();
    assert_eq!(found.unwrap().map(|found| found.id), Some(user.id), "the primary answers what the replica could not");
    assert_eq!(on_replica, 1, "the replica was asked first");
    let status = &stores.pool.replicas().unwrap().status()[0];
    assert_eq!(status.skips.error, 1, "{status:?}");
    assert!(status.in_rotation, "{status:?}");
}

/// A row nobody can decode (a number past a 64-bit float's range, written
/// by hand with the schema's check dropped): the caller gets the error, as
/// from the primary, and the replica stays in rotation, so the next read
/// still goes to it, not every read to the primary.
#[test]
fn a_row_that_cannot_be_decoded_anywhere_is_the_callers_error_and_the_replica_stays_in_rotation() {
    let Some(server) = start() else { return };
    let stores = Routed::new(&server, Some(fast_sampling(Duration::from_secs(60))));
    let owner = stores.users.upsert(NewUser::new(email("owner@example.io"), Provider::Google)).unwrap();
    let cluster = stores.clusters.create_for_owner(&owner.id).unwrap();
    let new_instance = |tag: &str| NewInstance {
        address: format!("{tag}.example:22").parse().unwrap(),
        tag: tag.parse().unwrap(),
        metadata: None,
    };
    let bad = stores.instances.create(&cluster.id, new_instance("bad")).unwrap();
    let good = stores.instances.create(&cluster.id, new_instance("good")).unwrap();
    let mut primary = PgConnection::establish(server.primary_url()).unwrap();
    let constraints: Vec<String> = diesel::sql_query(
        "SELECT conname AS name FROM pg_constraint WHERE conrelid = 'instances'::regclass AND contype = 'c' \
         AND conname LIKE '%metadata%'",
    )
    .load::<Named>(&mut primary)
    .unwrap()
    .into_iter()
    .map(|row| row.name)
    .collect();
    for name in constraints {
        primary.batch_execute(&format!("ALTER TABLE instances DROP CONSTRAINT {name}")).unwrap();
    }
    diesel::sql_query("UPDATE instances SET metadata = '{\"x\": 1e400}' WHERE id = $1")
        .bind::<diesel::sql_types::Text, _>(bad.id.to_string())
        .execute(&mut primary)
        .unwrap();
    server.wait_for_replay(Duration::from_secs(10)).unwrap();
    stores.wait_until_in_rotation(true);

    let answer = stores.instances.get(&bad.id);
    assert!(matches!(answer, Err(StoreError::Backend { .. })), "{answer:?}");
    let status = stores.pool.replicas().unwrap().status().remove(0);
    assert!(status.in_rotation, "{status:?}");
    let before = stores.replica_statements();
    assert!(stores.instances.get(&good.id).unwrap().is_some());
    assert_eq!(stores.replica_statements() - before, 1, "the next read goes to the replica");
}

#[derive(QueryableByName)]
struct Named {
    #[diesel(sql_type = diesel::sql_types::Text)]
    name: String,
}

/// A pool on `primary` reading from the one replica at `replica`, sampled
/// every 100 ms.
fn with_one_replica(primary: &str, replica: &str) -> PgPool {
    let config = PoolConfig { max_size: 2, ..PoolConfig::default() };
    let pool = PgPool::connect(primary, config).unwrap();
    let urls = [replica.to_owned()];
    let set = ReplicaSet::connect(&pool, &urls, "replica_urls", config, fast_sampling(Duration::from_secs(1))).unwrap();
    pool.with_replicas(set)
}

/// The status of the replica of `pool` once a sample of it failed.
fn first_failed_sample(pool: &PgPool) -> dployr_pg::ReplicaStatus {
    let started = Instant::now();
    loop {
        let status = pool.replicas().unwrap().status().remove(0);
        if status.failure.is_some() {
            return status;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "never sampled: {status:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A replica URL naming another database of the replica's server (a typo,
/// a staging database): the replay positions are the server's, so it would
/// pass for caught up; it never enters rotation, and says why.
#[test]
fn a_replica_url_naming_another_database_never_enters_rotation_and_says_why() {
    let Some(server) = start() else { return };
    let mut primary = PgConnection::establish(server.primary_url()).unwrap();
    primary.batch_execute("CREATE DATABASE staging").unwrap();
    server.wait_for_replay(Duration::from_secs(10)).unwrap();
    let (base, _) = server.replica_url().rsplit_once('/').unwrap();
    let pool = with_one_replica(server.primary_url(), &format!("{base}/staging"));
    let users = PgUserStore::new(pool.clone());
    let user = users.upsert(NewUser::new(email("real@example.io"), Provider::Google)).unwrap();

    let status = first_failed_sample(&pool);
    // Sampled several times more: it stays out.
    std::thread::sleep(Duration::from_millis(500));
    let later = pool.replicas().unwrap().status().remove(0);
    assert!(!status.in_rotation && !later.in_rotation, "{status:?} {later:?}");
    let failure = later.failure.unwrap_or_default();
    assert!(failure.contains("\"staging\"") && failure.contains("another database"), "{failure}");
    assert_eq!(users.get(&user.id).unwrap().map(|found| found.id), Some(user.id));
}

/// A role that may not call `pg_control_system()` (revoked from PUBLIC by
/// a hardened setup) still gets its replica in rotation: the database name
/// is compared alone. (PostgreSQL checks a function's privilege when the
/// statement starts, even inside a `CASE` that would not call it.)
#[test]
fn a_replica_enters_rotation_for_a_role_that_may_not_read_the_control_file() {
    let Some(server) = start() else { return };
    let mut primary = PgConnection::establish(server.primary_url()).unwrap();
    primary
        .batch_execute(
            "CREATE ROLE hardened LOGIN; GRANT SELECT ON ALL TABLES IN SCHEMA public TO hardened; \
             REVOKE EXECUTE ON FUNCTION pg_control_system() FROM PUBLIC",
        )
        .unwrap();
    server.wait_for_replay(Duration::from_secs(10)).unwrap();
    let as_hardened = |url: &str| url.replacen("postgres@", "hardened@", 1);
    let pool = with_one_replica(&as_hardened(server.primary_url()), &as_hardened(server.replica_url()));
    let started = Instant::now();
    while !pool.replicas().unwrap().status()[0].in_rotation {
        let status = pool.replicas().unwrap().status().remove(0);
        assert!(started.elapsed() < Duration::from_secs(20), "never entered rotation: {status:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The primary's own URL given as a replica's is never in rotation, and
/// its status says why (it used to say nothing above debug logs).
#[test]
fn a_server_that_is_not_a_replica_stays_out_of_rotation_and_says_why() {
    let Some(server) = start() else { return };
    let pool = with_one_replica(server.primary_url(), server.primary_url());
    let status = first_failed_sample(&pool);
    assert!(!status.in_rotation, "{status:?}");
    assert!(status.failure.as_deref().unwrap_or_default().contains("not a replica"), "{status:?}");
}

/// A replica that fails while a read after a write waits for it (frozen
/// here) leaves rotation, as one that fails a read does: the reads after
/// it do not each wait for it again until a sample succeeds.
#[test]
fn a_replica_failing_while_a_read_waits_for_its_replay_leaves_rotation() {
    let Some(server) = start() else { return };
    let (pool, users) = with_short_deadlines(&server);
    let started = wait_until_in_rotation(&pool);

    let frozen = server.freeze_replica().unwrap();
    let user = users.upsert(NewUser::new(email("waited@example.io"), Provider::Google)).unwrap();
    let position = pool.wal_position().unwrap();
    let read = {
        let _scope = pool.reads_after(position);
        users.get(&user.id)
    };
    let status = pool.replicas().unwrap().status().remove(0);
    // Its sampler is stuck on it too: once its last sample is older than
    // two periods, no lag is reported for it (that sample's lag says
    // nothing of the replica now).
    let stuck = loop {
        let status = pool.replicas().unwrap().status().remove(0);
        if status.sampled.is_some_and(|age| age > 2 * ReplicaConfig::default().sample_every) {
            break status;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the sample never aged: {status:?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    drop(frozen);
    assert_eq!(read.unwrap().map(|found| found.id), Some(user.id), "the primary answers");
    assert!(!status.in_rotation, "{status:?}");
    assert_eq!((status.skips.error, status.skips.behind_write), (1, 0), "{status:?}");
    assert_eq!((stuck.lag, stuck.in_rotation), (None, false), "{stuck:?}");
}
