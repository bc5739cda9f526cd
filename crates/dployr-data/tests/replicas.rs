//! The data layer with read replicas: the variables, a replica that is down
//! or misnamed at start, and `health()` against a real primary and
//! streaming replica.

#![cfg(test)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use dployr_data::{Config, DataLayer, KvBackendConfig, ReplicaConfig, StoreError};
use dployr_testkit::ReplicatedServer;
use dployr_testkit::replica::SKIP;

fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<String, String> = pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    move |name| map.get(name).cloned()
}

#[test]
fn the_replica_variables_are_read_and_the_urls_never_printed() {
    let config = Config::from_vars(vars(&[
        ("DATABASE_URL", "postgres://db/app"),
        ("DPLOYR_DB_REPLICA_URLS", " postgres://u:secret-1@r1/app , postgres://u:secret-2@r2/app ,"),
        ("DPLOYR_DB_REPLICA_MAX_LAG_MS", "250"),
    ]))
    .unwrap();
    assert_eq!(config.replica_urls, ["postgres://u:secret-1@r1/app", "postgres://u:secret-2@r2/app"]);
    assert_eq!(config.replicas.max_lag, Duration::from_millis(250));
    assert!(!format!("{config:?}").contains("secret"), "{config:?}");
    let defaults = Config::from_vars(vars(&[("DATABASE_URL", "postgres://db/app")])).unwrap();
    assert!(defaults.replica_urls.is_empty());
    assert_eq!(defaults.replicas.max_lag, Duration::from_secs(1));
    for bad in ["1s", "0", "-5", "99999999999999999999999", "1\u{0}0"] {
        let error =
            Config::from_vars(vars(&[("DATABASE_URL", "x"), ("DPLOYR_DB_REPLICA_MAX_LAG_MS", bad)])).unwrap_err();
        assert!(
            matches!(error, StoreError::Configuration { setting: "DPLOYR_DB_REPLICA_MAX_LAG_MS", .. }),
            "{bad:?}: {error}"
        );
    }
}

#[test]
fn a_replica_url_that_is_not_a_url_is_refused_naming_the_variable_and_no_secret() {
    let db = dployr_testkit::database();
    for bad in ["not a url", "postgres://u:secret-9@127.0.0.1:1/x\u{0}y", "mysql://u:secret-9@host/db"] {
        let config = Config::new(db.url()).with_kv(KvBackendConfig::Memory).with_replicas([bad.to_owned()]);
        match DataLayer::open(config) {
            Err(error) => {
                assert!(
                    matches!(error, StoreError::Configuration { setting: "DPLOYR_DB_REPLICA_URLS", .. }),
                    "{bad:?}: {error}"
                );
                assert!(!format!("{error} {error:?}").contains("secret-9"), "{bad:?}: {error:?}");
            }
            // Taken as a replica that is down: out of rotation, never read.
            Ok(data) => {
                let health = data.health();
                assert!(!health.replicas[0].in_rotation, "{bad:?}: {health:?}");
                assert!(!format!("{health:?}").contains("secret-9"), "{bad:?}: {health:?}");
            }
        }
    }
}

/// A replica's freshness is measured on one server (its sampler's
/// connection): a URL libpq may open on any of several hosts could read
/// from one nobody measured, so it is refused, and each replica gets a URL.
#[test]
fn a_replica_url_naming_several_hosts_is_refused_naming_the_variable_and_no_secret() {
    let db = dployr_testkit::database();
    let several = [
        "postgres://u:secret-9@127.0.0.1:1,127.0.0.1:2/x".to_owned(),
        "postgres://u:secret-9@/x?host=127.0.0.1%2C127.0.0.2&port=1".to_owned(),
        "postgres://u:secret-9@127.0.0.1%2C127.0.0.2:1/x".to_owned(),
        "host=127.0.0.1,127.0.0.2 port=1 password=secret-9 dbname=x".to_owned(),
    ];
    for url in several {
        let config = Config::new(db.url()).with_kv(KvBackendConfig::Memory).with_replicas([url.clone()]);
        let error = DataLayer::open(config).map(drop).unwrap_err();
        assert!(
            matches!(error, StoreError::Configuration { setting: "DPLOYR_DB_REPLICA_URLS", .. })
                && error.to_string().contains("several hosts"),
            "{url:?}: {error}"
        );
        assert!(!format!("{error} {error:?}").contains("secret-9"), "{url:?}: {error:?}");
    }
}

#[test]
fn a_replica_that_is_down_at_start_is_left_out_but_a_misnamed_one_is_refused() {
    let db = dployr_testkit::database();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let down = format!("postgres://nobody@127.0.0.1:{port}/none");
    let config = Config::new(db.url()).with_kv(KvBackendConfig::Memory).with_replicas([down]);
    let data = DataLayer::open(config).unwrap();
    let health = data.health();
    assert!(health.is_ready(), "{health:?}");
    assert!(!health.replicas[0].reachable.ok && !health.replicas[0].in_rotation, "{health:?}");

    let missing = db.url().replace(db.name(), "no_such_database");
    let config = Config::new(db.url()).with_kv(KvBackendConfig::Memory).with_replicas([missing]);
    let error = DataLayer::open(config).unwrap_err();
    assert!(matches!(error, StoreError::Configuration { setting: "DPLOYR_DB_REPLICA_URLS", .. }), "{error}");
}

/// A server that is not a replica (here the primary's own URL) is
/// reachable but never in rotation, and `health()` says why.
#[test]
fn health_says_why_a_server_that_is_not_a_replica_is_out_of_rotation() {
    let db = dployr_testkit::database();
    let fast = ReplicaConfig { sample_every: Duration::from_millis(20), ..Default::default() };
    let config =
        Config::new(db.url()).with_kv(KvBackendConfig::Memory).with_replicas([db.url()]).with_replica_config(fast);
    let data = DataLayer::open(config).unwrap();
    let started = Instant::now();
    let health = loop {
        let health = data.health();
        if health.replicas[0].sample_failure.is_some() || started.elapsed() > Duration::from_secs(20) {
            break health;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let replica = &health.replicas[0];
    assert!(replica.reachable.ok && !replica.in_rotation, "{health:?}");
    assert!(replica.sample_failure.as_deref().is_some_and(|why| why.contains("not a replica")), "{health:?}");
    assert!(health.is_ready(), "{health:?}");
}

#[test]
fn health_reports_a_database_whose_migrations_are_pending() {
    let db = dployr_testkit::empty_database();
    let config = Config::new(db.url()).with_kv(KvBackendConfig::Memory).without_migrations_on_start();
    let health = DataLayer::open(config).unwrap().health();
    assert!(health.primary.ok && health.kv.ok, "{health:?}");
    assert!(!health.migrations.up_to_date && !health.migrations.pending.is_empty(), "{health:?}");
    assert!(!health.is_ready());
}

/// By default an applied migration missing from the binary stops the
/// start, naming it, whatever its version (the spec's rule).
#[test]
fn a_start_on_a_database_with_a_migration_missing_from_the_binary_is_refused_naming_it() {
    use diesel::connection::SimpleConnection as _;
    let db = dployr_testkit::database();
    db.connect()
        .batch_execute(
            "INSERT INTO _migrations (version, name, checksum, duration_ms) \
             VALUES ('999', '999_of_a_newer_release', 'abc', 1)",
        )
        .unwrap();
    let error = DataLayer::open(Config::new(db.url()).with_kv(KvBackendConfig::Memory)).map(drop).unwrap_err();
    assert!(error.to_string().contains("999_of_a_newer_release"), "{error}");
    assert!(!error.is_retryable(), "{error:?}");
}

/// Opted into, a process of the older release that starts after a newer
/// one migrated (a restart during a rolling deploy, a rollback of the code)
/// has nothing to apply and opens, as its running processes stay ready; an
/// unknown migration older than its latest is refused all the same.
#[test]
fn a_start_allowing_a_newer_release_after_one_migrated_opens_with_nothing_to_apply() {
    use diesel::connection::SimpleConnection as _;
    let db = dployr_testkit::database();
    let config = || Config::new(db.url()).with_kv(KvBackendConfig::Memory).allowing_a_newer_release();
    db.connect()
        .batch_execute(
            "INSERT INTO _migrations (version, name, checksum, duration_ms) \
             VALUES ('999', '999_of_a_newer_release', 'abc', 1)",
        )
        .unwrap();
    let data = DataLayer::open(config()).unwrap();
    assert!(data.applied_on_open().is_empty());
    assert!(data.health().is_ready(), "{:?}", data.health());
    drop(data);

    db.connect()
        .batch_execute(
            "INSERT INTO _migrations (version, name, checksum, duration_ms) VALUES ('0015', '0015_x', 'a', 1)",
        )
        .unwrap();
    let error = DataLayer::open(config()).map(drop).unwrap_err();
    assert!(error.to_string().contains("0015_x"), "{error}");
}

/// In a rolling deploy the new release migrates while this one still
/// serves: a migration this binary does not hold is reported, and this
/// process stays ready (every process of the old release turning not ready
/// at once would leave nothing ready until the new ones are). One whose
/// applied text changed is still not ready.
#[test]
fn health_stays_ready_after_a_newer_release_migrated_and_names_its_migrations() {
    use diesel::connection::SimpleConnection as _;
    let db = dployr_testkit::database();
    let data = DataLayer::open(Config::new(db.url()).with_kv(KvBackendConfig::Memory)).unwrap();
    db.connect()
        .batch_execute(
            "INSERT INTO _migrations (version, name, checksum, duration_ms) \
             VALUES ('999', '999_of_a_newer_release', 'abc', 1)",
        )
        .unwrap();
    let health = data.health();
    assert!(health.is_ready(), "{health:?}");
    assert_eq!(health.migrations.newer, ["999_of_a_newer_release"], "{health:?}");
    assert!(health.migrations.up_to_date && health.migrations.error.is_none(), "{health:?}");
    db.connect()
        .batch_execute(
            "INSERT INTO _migrations (version, name, checksum, duration_ms) VALUES ('0015', '0015_x', 'a', 1)",
        )
        .unwrap();
    let health = data.health();
    assert!(
        !health.is_ready() && health.migrations.error.as_deref().is_some_and(|e| e.contains("0015_x")),
        "{health:?}"
    );
    db.connect().batch_execute("DELETE FROM _migrations WHERE version = '0015'").unwrap();
    db.connect().batch_execute("UPDATE _migrations SET checksum = 'edited' WHERE version = '000'").unwrap();
    let health = data.health();
    assert!(
        !health.is_ready() && health.migrations.error.as_deref().is_some_and(|e| e.contains("000_init")),
        "{health:?}"
    );
}

#[test]
fn health_reports_the_primary_each_replica_with_its_lag_the_kv_backend_and_the_migrations() {
    let Some(mut server) = ReplicatedServer::start().unwrap() else {
        eprintln!("{SKIP}");
        return;
    };
    let replicas = ReplicaConfig { sample_every: Duration::from_millis(100), ..ReplicaConfig::default() };
    let config = Config::new(server.primary_url()).with_replicas([server.replica_url()]).with_replica_config(replicas);
    let data = DataLayer::open(config).unwrap();
    let started = Instant::now();
    let mut health = data.health();
    while !health.replicas[0].in_rotation && started.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(20));
        health = data.health();
    }
    assert!(health.is_ready(), "{health:?}");
    assert!(health.primary.ok && health.kv.ok && health.migrations.up_to_date, "{health:?}");
    let replica = &health.replicas[0];
    assert_eq!(replica.name, "replica-0");
    assert!(replica.reachable.ok && replica.in_rotation, "{health:?}");
    assert!(replica.lag.is_some_and(|lag| lag <= Duration::from_secs(1)), "{health:?}");
    assert!(health.primary.duration > Duration::ZERO && health.migrations.duration > Duration::ZERO);

    server.stop_replica();
    let health = data.health();
    assert!(!health.replicas[0].reachable.ok, "{health:?}");
    assert!(health.replicas[0].reachable.error.is_some());
    assert!(health.is_ready(), "the primary serves every read without the replica: {health:?}");
}

/// A replica setting built in code that the replicas refuse is a setting to
/// change, named by its variable (or, where it has none, its field), as
/// every other setting `DataLayer::open` refuses.
#[test]
fn a_replica_setting_the_replicas_refuse_is_a_configuration_error_naming_it() {
    let db = dployr_testkit::database();
    let open = |replicas: ReplicaConfig| {
        DataLayer::open(
            Config::new(db.url())
                .with_kv(KvBackendConfig::Memory)
                .with_replicas(["postgres://app@127.0.0.1:1/dployr"])
                .with_replica_config(replicas)
                .without_migrations_on_start(),
        )
        .map(drop)
    };
    let zero_lag = open(ReplicaConfig { max_lag: Duration::ZERO, ..Default::default() });
    assert!(
        matches!(zero_lag, Err(StoreError::Configuration { setting: "DPLOYR_DB_REPLICA_MAX_LAG_MS", .. })),
        "{zero_lag:?}"
    );
    let busy = open(ReplicaConfig { sample_every: Duration::from_millis(1), ..Default::default() });
    assert!(matches!(busy, Err(StoreError::Configuration { setting: "replica sample_every", .. })), "{busy:?}");
}
