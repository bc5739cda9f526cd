//! Behind PgBouncer in transaction mode (issue 12, defect 3): the documented
//! settings restart and serve the seed story; migrations on start never
//! trip over a prepared statement another client left; an unsafe setting
//! is refused with the setting to change, never served with wrong answers.
//!
//! PgBouncer is a separate package: without it these tests say so and pass,
//! except under CI (`CI` set), where `.ci/run` installs it and its absence
//! fails them. `cargo xtask pgbouncer` runs the multi-process version.

#![cfg(test)]

use std::time::Duration;

use dployr_data::{Config, DataLayer, DeadlineConfig, KvBackendConfig, KvStoreConfig, PoolConfig, StoreError};
use dployr_testkit::TestDatabase;
use dployr_testkit::pgbouncer::{self, PgBouncer, PoolMode};
use dployr_tests::seed_story;

/// A database of its own behind a PgBouncer of its own in transaction
/// mode, or `None` (with a note) where PgBouncer is not installed.
fn behind_pgbouncer(migrated: bool) -> Option<(TestDatabase, PgBouncer)> {
    if pgbouncer::find().is_none() {
        assert!(std::env::var_os("CI").is_none(), "CI must install pgbouncer (apt-get install pgbouncer)");
        eprintln!("skipped: pgbouncer is not installed (apt-get install pgbouncer)");
        return None;
    }
    let server = dployr_testkit::server().unwrap();
    let Some(port) = server.local_port() else {
        eprintln!("skipped: needs the testkit's own server (DATABASE_URL is set)");
        return None;
    };
    let db = if migrated { dployr_testkit::database() } else { dployr_testkit::empty_database() };
    let bouncer = PgBouncer::start(port, "postgres", PoolMode::Transaction).unwrap();
    Some((db, bouncer))
}

/// What docs/operations.md prescribes behind a transaction pooler.
fn documented_pool() -> PoolConfig {
    PoolConfig {
        prepared_statement_cache: false,
        statement_timeout: None,
        deadline: DeadlineConfig { cancel: false, ..DeadlineConfig::default() },
        ..PoolConfig::default()
    }
}

#[test]
fn a_start_through_pgbouncer_with_the_statement_cache_on_is_refused_naming_the_setting() {
    let Some((db, bouncer)) = behind_pgbouncer(true) else { return };
    let config = Config::new(bouncer.url_for(db.name())).with_kv(KvBackendConfig::Memory).without_migrations_on_start();
    let error = DataLayer::open(config).map(drop).unwrap_err();
    assert!(matches!(error, StoreError::Configuration { setting: "DPLOYR_DB_STATEMENT_CACHE", .. }), "{error}");
    assert!(error.to_string().contains("transaction"), "{error}");
}

/// A replica's pool has the primary's settings: a replica reached through
/// a pooler in transaction mode is refused as the primary would be, naming
/// the setting and the replica, though the primary is reached directly; the
/// settings the docs prescribe there open.
#[test]
fn a_replica_behind_pgbouncer_with_the_statement_cache_on_is_refused_naming_the_setting() {
    let Some((db, bouncer)) = behind_pgbouncer(true) else { return };
    let config = || {
        Config::new(db.url())
            .with_replicas([bouncer.url_for(db.name())])
            .with_kv(KvBackendConfig::Memory)
            .without_migrations_on_start()
    };
    let error = DataLayer::open(config()).map(drop).unwrap_err();
    assert!(matches!(error, StoreError::Configuration { setting: "DPLOYR_DB_STATEMENT_CACHE", .. }), "{error}");
    assert!(error.to_string().contains("replica-0 of DPLOYR_DB_REPLICA_URLS"), "{error}");
    let data = DataLayer::open(config().with_pool(documented_pool()));
    assert!(data.is_ok(), "{:?}", data.map(drop));
}

#[test]
fn a_start_through_pgbouncer_with_a_per_connection_statement_timeout_is_refused_naming_the_setting() {
    let Some((db, bouncer)) = behind_pgbouncer(true) else { return };
    let pool = PoolConfig { prepared_statement_cache: false, ..PoolConfig::default() };
    let config = Config::new(bouncer.url_for(db.name())).with_pool(pool).without_migrations_on_start();
    let error = DataLayer::open(config).map(drop).unwrap_err();
    assert!(matches!(error, StoreError::Configuration { setting: "DPLOYR_DB_STATEMENT_TIMEOUT_MS", .. }), "{error}");
}

#[test]
fn a_start_through_pgbouncer_that_would_cancel_at_a_deadline_is_refused_naming_the_setting() {
    // The cancel goes to the backend pid read when the connection was made,
    // which PgBouncer may have handed to another client since.
    let Some((db, bouncer)) = behind_pgbouncer(true) else { return };
    let pool = PoolConfig { deadline: DeadlineConfig::default(), ..documented_pool() };
    let config = Config::new(bouncer.url_for(db.name())).with_pool(pool).without_migrations_on_start();
    let error = DataLayer::open(config).map(drop).unwrap_err();
    assert!(matches!(error, StoreError::Configuration { setting: "DPLOYR_DB_CANCEL_ON_DEADLINE", .. }), "{error}");
}

/// A migration start refused behind a transaction pooler leaves no session
/// setting of its runner's (`statement_timeout = 0`, its `lock_timeout`) on
/// a server connection the pooler hands other clients: the role's or the
/// database's `statement_timeout`, which the docs prescribe there, holds.
#[test]
fn a_migration_start_refused_behind_pgbouncer_leaves_no_setting_on_other_clients_connections() {
    use diesel::connection::SimpleConnection as _;
    use diesel::prelude::*;
    let Some((db, bouncer)) = behind_pgbouncer(true) else { return };
    db.connect().batch_execute(&format!("ALTER DATABASE \"{}\" SET statement_timeout = '30s'", db.name())).unwrap();
    let url = bouncer.url_for(db.name());
    let timeouts_seen = || -> Vec<String> {
        (0..5)
            .map(|_| {
                let mut conn = PgConnection::establish(&url).unwrap();
                conn.set_prepared_statement_cache_size(diesel::connection::CacheSize::Disabled);
                diesel::select(diesel::dsl::sql::<diesel::sql_types::Text>("current_setting('statement_timeout')"))
                    .get_result(&mut conn)
                    .unwrap()
            })
            .collect()
    };
    assert!(timeouts_seen().iter().all(|seen| seen == "30s"));
    let config = Config::new(&url).with_kv(KvBackendConfig::Memory).with_pool(documented_pool());
    let error = DataLayer::open(config).map(drop).unwrap_err();
    assert!(matches!(error, StoreError::Configuration { setting: "DPLOYR_MIGRATE_DATABASE_URL", .. }), "{error}");
    let seen = timeouts_seen();
    assert!(seen.iter().all(|seen| seen == "30s"), "the refused runner's settings reached other clients: {seen:?}");
}

#[test]
fn migrations_on_start_through_pgbouncer_never_trip_over_a_prepared_statement_left_by_another_client() {
    // The settings: the statement cache off, migrations on start on
    // the same URL. Each start either works or is refused naming the
    // variable that fixes it; never "prepared statement ... already exists".
    let Some((db, bouncer)) = behind_pgbouncer(false) else { return };
    for start in 1..=3 {
        let config = Config::new(bouncer.url_for(db.name())).with_pool(documented_pool());
        match DataLayer::open(config) {
            Ok(data) => seed_story::run(&data, &format!("m{start}"), 3).unwrap(),
            Err(StoreError::Configuration { setting: "DPLOYR_MIGRATE_DATABASE_URL", .. }) => {}
            Err(other) => panic!("start {start}: {other}"),
        }
    }
}

#[test]
fn the_documented_settings_restart_three_times_behind_pgbouncer_and_serve_the_seed_story_from_16_threads() {
    let Some((db, bouncer)) = behind_pgbouncer(false) else { return };
    let embedded: Vec<String> =
        dployr_migrate::MigrationSet::embedded().unwrap().iter().map(|m| m.name().to_owned()).collect();
    let attempts = KvStoreConfig::default().otp_max_attempts;
    for start in 0..3 {
        let config = Config::new(bouncer.url_for(db.name()))
            .with_migrate_database_url(db.url())
            .with_pool(PoolConfig { connection_timeout: Duration::from_secs(10), ..documented_pool() });
        let data = DataLayer::open(config).unwrap();
        let expected: &[String] = if start == 0 { &embedded } else { &[] };
        assert_eq!(data.applied_on_open(), expected, "start {start}");
        let failures: Vec<String> = std::thread::scope(|scope| {
            let runs: Vec<_> = (0..16)
                .map(|thread| {
                    let data = &data;
                    scope.spawn(move || {
                        (0..3)
                            .filter_map(|run| {
                                seed_story::run(data, &format!("s{start}t{thread}r{run}"), attempts).err()
                            })
                            .map(|failure| format!("{failure:?}"))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            runs.into_iter().flat_map(|run| run.join().unwrap()).collect()
        });
        assert_eq!(failures, Vec::<String>::new(), "start {start}");
    }
}
