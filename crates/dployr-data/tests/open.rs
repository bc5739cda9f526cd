//! Opening the data layer: configuration errors name the variable, an
//! unreachable database fails within the connect timeout, migrations run on
//! open unless turned off.

#![cfg(test)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use dployr_data::{Config, DataLayer, KvBackendConfig, KvStoreConfig, OneTimeKvConfig, PoolConfig, StoreError};

fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<String, String> = pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    move |name| map.get(name).cloned()
}

fn setting_of(error: &StoreError) -> &'static str {
    match error {
        StoreError::Configuration { setting, .. } => setting,
        other => panic!("not a configuration error: {other}"),
    }
}

#[test]
fn defaults_need_only_database_url() {
    let config = Config::from_vars(vars(&[("DATABASE_URL", "postgres://db/app")])).unwrap();
    assert_eq!(config.database_url, "postgres://db/app");
    assert!(config.migrate_on_start);
    assert_eq!(config.pool, PoolConfig::default());
    assert!(matches!(config.kv, KvBackendConfig::Postgres { purge_every: Some(_) }));
    assert!(!format!("{config:?}").contains("postgres://db/app"), "the URL may hold a password");
}

#[test]
fn every_variable_is_read() {
    let config = Config::from_vars(vars(&[
        ("DATABASE_URL", "postgres://db/app"),
        ("DPLOYR_KV", "memory"),
        ("DPLOYR_DB_POOL_SIZE", "3"),
        ("DPLOYR_DB_CONNECT_TIMEOUT_MS", "750"),
        ("DPLOYR_DB_STATEMENT_TIMEOUT_MS", "0"),
        ("DPLOYR_DB_STATEMENT_CACHE", "false"),
        ("DPLOYR_MIGRATE_ON_START", "no"),
        ("DPLOYR_MIGRATE_ALLOW_NEWER_RELEASE", "true"),
        ("DPLOYR_SESSION_TTL_SECS", "3600"),
        ("DPLOYR_STATE_TTL_SECS", "120"),
        ("DPLOYR_OTP_TTL_SECS", "300"),
    ]))
    .unwrap();
    assert_eq!(config.kv, KvBackendConfig::Memory);
    assert_eq!(config.pool.max_size, 3);
    assert_eq!(config.pool.connection_timeout, Duration::from_millis(750));
    assert_eq!(config.pool.statement_timeout, None);
    assert!(!config.pool.prepared_statement_cache);
    assert!(!config.migrate_on_start);
    assert!(config.migrate_allow_newer_release);
    assert_eq!(config.kv_store.session_ttl, Duration::from_secs(3600));
    assert_eq!(config.kv_store.state_ttl, Duration::from_secs(120));
    assert_eq!(config.kv_store.otp_ttl, Duration::from_secs(300));
}

#[test]
fn the_deadline_and_tcp_variables_are_read() {
    let config = Config::from_vars(vars(&[
        ("DATABASE_URL", "postgres://db/app"),
        ("DPLOYR_DB_CALL_TIMEOUT_MS", "4000"),
        ("DPLOYR_DB_DEADLINE_MARGIN_MS", "1500"),
        ("DPLOYR_DB_CANCEL_GRACE_MS", "2500"),
        ("DPLOYR_DB_CANCEL_ON_DEADLINE", "false"),
        ("DPLOYR_DB_KEEPALIVES_IDLE_SECS", "30"),
        ("DPLOYR_DB_KEEPALIVES_INTERVAL_SECS", "10"),
        ("DPLOYR_DB_KEEPALIVES_COUNT", "6"),
        ("DPLOYR_DB_TCP_USER_TIMEOUT_MS", "0"),
    ]))
    .unwrap();
    let (deadline, network) = (config.pool.deadline, config.pool.network);
    assert_eq!(deadline.call_timeout, Some(Duration::from_secs(4)));
    assert_eq!((deadline.margin, deadline.grace), (Duration::from_millis(1500), Duration::from_millis(2500)));
    assert!(!deadline.cancel);
    assert!(network.keepalives);
    assert_eq!(
        (network.keepalives_idle, network.keepalives_interval),
        (Duration::from_secs(30), Duration::from_secs(10))
    );
    assert_eq!((network.keepalives_count, network.tcp_user_timeout), (6, None));
    let off =
        Config::from_vars(vars(&[("DATABASE_URL", "postgres://db/app"), ("DPLOYR_DB_KEEPALIVES", "off")])).unwrap();
    assert!(!off.pool.network.keepalives);
}

#[test]
#[cfg(feature = "cloudflare")]
fn cloudflare_takes_its_three_variables_and_hides_the_token() {
    let config = Config::from_vars(vars(&[
        ("DATABASE_URL", "postgres://db/app"),
        ("DPLOYR_KV", "cloudflare"),
        ("CLOUDFLARE_ACCOUNT_ID", "acc"),
        ("CLOUDFLARE_KV_NAMESPACE_ID", "ns"),
        ("CLOUDFLARE_API_TOKEN", "tok-very-secret"),
    ]))
    .unwrap();
    let KvBackendConfig::Cloudflare(cloudflare) = &config.kv else { panic!("{config:?}") };
    assert_eq!((cloudflare.account_id.as_str(), cloudflare.namespace_id.as_str()), ("acc", "ns"));
    assert!(!format!("{config:?}").contains("very-secret"));
}

#[test]
fn a_missing_or_malformed_variable_is_one_error_naming_it() {
    let base = [("DATABASE_URL", "postgres://db/app")];
    let with = |extra: &[(&str, &str)]| {
        let mut all = base.to_vec();
        all.extend_from_slice(extra);
        Config::from_vars(vars(&all)).unwrap_err()
    };
    assert_eq!(setting_of(&Config::from_vars(vars(&[])).unwrap_err()), "DATABASE_URL");
    assert_eq!(setting_of(&Config::from_vars(vars(&[("DATABASE_URL", "  ")])).unwrap_err()), "DATABASE_URL");
    assert_eq!(setting_of(&with(&[("DPLOYR_KV", "redis")])), "DPLOYR_KV");
    let error =
        with(&[("DPLOYR_KV", "cloudflare"), ("CLOUDFLARE_ACCOUNT_ID", "a"), ("CLOUDFLARE_KV_NAMESPACE_ID", "n")]);
    if cfg!(feature = "cloudflare") {
        assert_eq!(setting_of(&error), "CLOUDFLARE_API_TOKEN");
        assert!(error.to_string().contains("CLOUDFLARE_API_TOKEN"), "{error}");
        assert_eq!(setting_of(&with(&[("DPLOYR_KV", "cloudflare")])), "CLOUDFLARE_ACCOUNT_ID");
    } else {
        // Built without the backend, the setting itself is refused.
        assert_eq!(setting_of(&error), "DPLOYR_KV");
    }
    assert_eq!(setting_of(&with(&[("DPLOYR_DB_POOL_SIZE", "ten")])), "DPLOYR_DB_POOL_SIZE");
    assert_eq!(setting_of(&with(&[("DPLOYR_DB_POOL_SIZE", "0")])), "DPLOYR_DB_POOL_SIZE");
    assert_eq!(setting_of(&with(&[("DPLOYR_DB_POOL_SIZE", "262144")])), "DPLOYR_DB_POOL_SIZE");
    assert_eq!(setting_of(&with(&[("DPLOYR_DB_POOL_SIZE", "4294967295")])), "DPLOYR_DB_POOL_SIZE");
    assert!(Config::from_vars(vars(&[base[0], ("DPLOYR_DB_POOL_SIZE", "262143")])).is_ok());
    assert_eq!(setting_of(&with(&[("DPLOYR_DB_CONNECT_TIMEOUT_MS", "-5")])), "DPLOYR_DB_CONNECT_TIMEOUT_MS");
    assert_eq!(setting_of(&with(&[("DPLOYR_MIGRATE_ON_START", "maybe")])), "DPLOYR_MIGRATE_ON_START");
    // libpq would not set it with keepalives off: not silently dropped.
    assert_eq!(
        setting_of(&with(&[("DPLOYR_DB_KEEPALIVES", "false"), ("DPLOYR_DB_TCP_USER_TIMEOUT_MS", "10000")])),
        "DPLOYR_DB_TCP_USER_TIMEOUT_MS"
    );
    let off =
        Config::from_vars(vars(&[base[0], ("DPLOYR_DB_KEEPALIVES", "false"), ("DPLOYR_DB_TCP_USER_TIMEOUT_MS", "0")]));
    assert!(off.is_ok(), "{off:?}");
    let keepalives_off = Config::from_vars(vars(&[base[0], ("DPLOYR_DB_KEEPALIVES", "false")])).unwrap();
    assert_eq!(keepalives_off.pool.network.tcp_user_timeout, None, "the default is not in force without keepalives");
    // Nor a probe's timing, which no probe uses with keepalives off (found
    // by a configuration probe: each was taken and dropped).
    for name in ["DPLOYR_DB_KEEPALIVES_IDLE_SECS", "DPLOYR_DB_KEEPALIVES_INTERVAL_SECS", "DPLOYR_DB_KEEPALIVES_COUNT"] {
        let error = with(&[("DPLOYR_DB_KEEPALIVES", "false"), (name, "30")]);
        assert_eq!(setting_of(&error), name);
        assert!(error.to_string().contains("has no effect with DPLOYR_DB_KEEPALIVES=false"), "{error}");
        let unset = Config::from_vars(vars(&[base[0], ("DPLOYR_DB_KEEPALIVES", "false"), (name, "  ")]));
        assert!(unset.is_ok(), "{name} blank is unset: {unset:?}");
    }
    // A purge period with no PostgreSQL key-value backend purges nothing.
    for kv in [&[("DPLOYR_KV", "memory")][..], &[("DPLOYR_KV", "memory"), ("DPLOYR_KV_ONE_TIME", "memory")][..]] {
        let mut extra = kv.to_vec();
        extra.push(("DPLOYR_KV_PURGE_EVERY_SECS", "60"));
        let error = with(&extra);
        assert_eq!(setting_of(&error), "DPLOYR_KV_PURGE_EVERY_SECS", "{kv:?}");
        assert!(error.to_string().contains("has no effect"), "{error}");
        // Off, what happens anyway, is taken.
        let mut off = base.to_vec();
        off.extend_from_slice(kv);
        off.push(("DPLOYR_KV_PURGE_EVERY_SECS", "0"));
        assert!(Config::from_vars(vars(&off)).is_ok(), "{kv:?}");
    }
    // With one-time records on PostgreSQL beside memory sessions it is in force.
    let one_time_purged = Config::from_vars(vars(&[
        base[0],
        ("DPLOYR_KV", "memory"),
        ("DPLOYR_KV_ONE_TIME", "postgres"),
        ("DPLOYR_KV_PURGE_EVERY_SECS", "60"),
    ]));
    assert!(one_time_purged.is_ok(), "{one_time_purged:?}");
    assert_eq!(
        setting_of(&with(&[("DPLOYR_MIGRATE_ALLOW_NEWER_RELEASE", "newer")])),
        "DPLOYR_MIGRATE_ALLOW_NEWER_RELEASE"
    );
    assert_eq!(setting_of(&with(&[("DPLOYR_OTP_TTL_SECS", "0")])), "DPLOYR_OTP_TTL_SECS");
    assert_eq!(setting_of(&with(&[("DPLOYR_KV_PURGE_EVERY_SECS", "soon")])), "DPLOYR_KV_PURGE_EVERY_SECS");
    assert_eq!(setting_of(&with(&[("DPLOYR_DB_KEEPALIVES_IDLE_SECS", "0")])), "DPLOYR_DB_KEEPALIVES_IDLE_SECS");
    assert_eq!(setting_of(&with(&[("DPLOYR_DB_KEEPALIVES_COUNT", "0")])), "DPLOYR_DB_KEEPALIVES_COUNT");
    assert_eq!(setting_of(&with(&[("DPLOYR_DB_CANCEL_GRACE_MS", "1s")])), "DPLOYR_DB_CANCEL_GRACE_MS");
    // Past PostgreSQL's limit for a timeout (INT_MAX ms), which the pool refuses too.
    for name in [
        "DPLOYR_DB_CONNECT_TIMEOUT_MS",
        "DPLOYR_DB_STATEMENT_TIMEOUT_MS",
        "DPLOYR_DB_CALL_TIMEOUT_MS",
        "DPLOYR_DB_DEADLINE_MARGIN_MS",
        "DPLOYR_DB_CANCEL_GRACE_MS",
        "DPLOYR_DB_TCP_USER_TIMEOUT_MS",
        "DPLOYR_MIGRATE_LOCK_TIMEOUT_MS",
    ] {
        assert_eq!(setting_of(&with(&[(name, "2147483648")])), name);
        let at_the_limit = Config::from_vars(vars(&[base[0], (name, "2147483647")]));
        assert!(at_the_limit.is_ok(), "{name}: {at_the_limit:?}");
    }
    // Past the kernel's limits for keepalives (every connection's
    // `setsockopt` would fail); the limits themselves are taken.
    for (name, past, limit) in [
        ("DPLOYR_DB_KEEPALIVES_IDLE_SECS", "32768", "32767"),
        ("DPLOYR_DB_KEEPALIVES_INTERVAL_SECS", "32768", "32767"),
        ("DPLOYR_DB_KEEPALIVES_COUNT", "128", "127"),
    ] {
        assert_eq!(setting_of(&with(&[(name, past)])), name);
        let at_the_limit = Config::from_vars(vars(&[base[0], (name, limit)]));
        assert!(at_the_limit.is_ok(), "{name}: {at_the_limit:?}");
    }
}

#[test]
fn a_pool_setting_built_in_code_that_the_pool_refuses_names_the_variable_of_that_setting() {
    // Refused before any connection: no server is needed.
    let open = |pool: PoolConfig| DataLayer::open(Config::new("postgres://app@127.0.0.1:1/dployr").with_pool(pool));
    for (pool, variable) in [
        (PoolConfig { max_size: 0, ..PoolConfig::default() }, "DPLOYR_DB_POOL_SIZE"),
        (PoolConfig { connection_timeout: Duration::ZERO, ..PoolConfig::default() }, "DPLOYR_DB_CONNECT_TIMEOUT_MS"),
        (
            PoolConfig { statement_timeout: Some(Duration::from_micros(10)), ..PoolConfig::default() },
            "DPLOYR_DB_STATEMENT_TIMEOUT_MS",
        ),
    ] {
        match open(pool) {
            Err(StoreError::Configuration { setting, .. }) => assert_eq!(setting, variable),
            other => panic!("expected a configuration error naming {variable}, got {other:?}"),
        }
    }
}

/// Key-value settings that no server could take are refused before any
/// connection, naming their variable: with the database down, a permanent
/// mistake must not come back as a retryable `Unavailable`.
#[test]
fn a_key_value_setting_no_server_could_take_is_refused_before_connecting_naming_its_variable() {
    let down = || Config::new("postgres://app@127.0.0.1:1/dployr");
    let kv_store = |kv_store: KvStoreConfig| Config { kv_store, ..down().with_kv(KvBackendConfig::Memory) };
    for (config, variable) in [
        (
            kv_store(KvStoreConfig { otp_ttl: Duration::from_secs(601), ..KvStoreConfig::default() }),
            "DPLOYR_OTP_TTL_SECS",
        ),
        (
            kv_store(KvStoreConfig { session_ttl: Duration::ZERO, ..KvStoreConfig::default() }),
            "DPLOYR_SESSION_TTL_SECS",
        ),
        (
            kv_store(KvStoreConfig { state_ttl: Duration::from_secs(u64::MAX), ..KvStoreConfig::default() }),
            "DPLOYR_STATE_TTL_SECS",
        ),
        (down().with_kv(KvBackendConfig::Postgres { purge_every: Some(Duration::ZERO) }), "DPLOYR_KV_PURGE_EVERY_SECS"),
        (down().with_kv(KvBackendConfig::Memory).with_one_time_kv(OneTimeKvConfig::Cloudflare), "DPLOYR_KV_ONE_TIME"),
        // Set in code only (no variable): named by its field, as documented
        // (it was `Invalid`, which `open` does not list: a docs audit).
        (
            kv_store(KvStoreConfig { otp_max_attempts: 0, ..KvStoreConfig::default() }),
            "KvStoreConfig::otp_max_attempts",
        ),
    ] {
        match DataLayer::open(config) {
            Err(StoreError::Configuration { setting, .. }) => assert_eq!(setting, variable),
            other => panic!("expected a configuration error naming {variable}, got {other:?}"),
        }
    }
    let past = Config::from_vars(vars(&[("DATABASE_URL", "postgres://db/app"), ("DPLOYR_OTP_TTL_SECS", "601")]));
    assert!(matches!(past, Err(StoreError::Configuration { setting: "DPLOYR_OTP_TTL_SECS", .. })), "{past:?}");
    let limit = Config::from_vars(vars(&[("DATABASE_URL", "postgres://db/app"), ("DPLOYR_OTP_TTL_SECS", "600")]));
    assert!(limit.is_ok(), "{limit:?}");
}

#[test]
fn an_unreachable_database_is_unavailable_naming_database_url_within_the_connect_timeout() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let timeout = Duration::from_millis(500);
    let config = Config::new(format!("postgres://app:hunter2@127.0.0.1:{port}/dployr"))
        .with_pool(PoolConfig { connection_timeout: timeout, ..PoolConfig::default() });
    let started = Instant::now();
    let error = DataLayer::open(config).unwrap_err();
    let waited = started.elapsed();
    assert!(matches!(error, StoreError::Unavailable { .. }), "{error}");
    assert!(error.to_string().contains("DATABASE_URL") && !error.to_string().contains("hunter2"), "{error}");
    // Not a timing assertion of speed: a bound that shows the timeout is honoured at all.
    assert!(waited < timeout * 20, "waited {waited:?}");
}

#[test]
fn open_applies_pending_migrations_once_and_can_skip_them() {
    let db = dployr_testkit::empty_database();
    let skipped =
        DataLayer::open(Config::new(db.url()).with_kv(KvBackendConfig::Memory).without_migrations_on_start()).unwrap();
    assert!(skipped.applied_on_open().is_empty());
    drop(skipped);
    let data = DataLayer::open(Config::new(db.url()).with_kv(KvBackendConfig::Memory)).unwrap();
    // Every migration the binary embeds, in order (never a list written here,
    // which the next migration would make wrong).
    let embedded: Vec<String> =
        dployr_migrate::MigrationSet::embedded().unwrap().iter().map(|m| m.name().to_owned()).collect();
    assert_eq!(data.applied_on_open(), embedded);
    drop(data);
    let again = DataLayer::open(Config::new(db.url())).unwrap();
    assert!(again.applied_on_open().is_empty());
    assert_eq!(again.kv_backend(), "postgres");
}

#[test]
fn a_ttl_its_backend_refuses_is_a_configuration_error_naming_its_variable() {
    let db = dployr_testkit::database();
    let two_centuries = Duration::from_secs(200 * 365 * 24 * 3600);
    let mut sessions = Config::new(db.url()).with_kv(KvBackendConfig::Memory);
    sessions.kv_store.session_ttl = two_centuries;
    let error = DataLayer::open(sessions).unwrap_err();
    assert_eq!(setting_of(&error), "DPLOYR_SESSION_TTL_SECS", "{error}");
    for (variable, set) in [
        (
            "DPLOYR_STATE_TTL_SECS",
            (|c: &mut Config| c.kv_store.state_ttl = Duration::from_secs(u64::MAX)) as fn(&mut Config),
        ),
        ("DPLOYR_OTP_TTL_SECS", |c: &mut Config| c.kv_store.otp_ttl = Duration::from_secs(u64::MAX)),
    ] {
        let mut config = Config::new(db.url());
        set(&mut config);
        let error = DataLayer::open(config).unwrap_err();
        assert_eq!(setting_of(&error), variable, "{error}");
        assert!(error.to_string().contains("maximum"), "says why: {error}");
    }
}

#[test]
#[cfg(feature = "cloudflare")]
fn a_session_ttl_below_cloudflares_minute_is_a_configuration_error_naming_its_variable() {
    let db = dployr_testkit::database();
    let emulator = dployr_testkit::CloudflareEmulator::start();
    let cloudflare = dployr_data::CloudflareConfig {
        base_url: emulator.base_url().to_owned(),
        ..dployr_data::CloudflareConfig::new(emulator.account_id(), emulator.namespace_id(), emulator.api_token())
    };
    let mut config = Config::new(db.url()).with_kv(KvBackendConfig::Cloudflare(cloudflare));
    config.kv_store.session_ttl = Duration::from_secs(30);
    let error = DataLayer::open(config).unwrap_err();
    assert_eq!(setting_of(&error), "DPLOYR_SESSION_TTL_SECS", "{error}");
    assert!(error.to_string().contains("minimum"), "says why: {error}");
}

/// A key-value setting the data layer refuses is refused before the
/// migrations run: a process that does not start must not have migrated a
/// shared database (in a rolling deploy, under the release still serving).
#[test]
fn a_refused_key_value_setting_leaves_an_empty_database_unmigrated() {
    use diesel::RunQueryDsl as _;
    use dployr_data::OneTimeKvConfig;

    let db = dployr_testkit::empty_database();
    let mut ttl = Config::new(db.url());
    ttl.kv_store.session_ttl = Duration::from_secs(200 * 365 * 24 * 3600);
    let one_time_on_cloudflare =
        Config::new(db.url()).with_kv(KvBackendConfig::Memory).with_one_time_kv(OneTimeKvConfig::Cloudflare);
    let mut purge = Config::new(db.url());
    purge.kv = KvBackendConfig::Postgres { purge_every: Some(Duration::ZERO) };
    for (config, variable) in [
        (ttl, "DPLOYR_SESSION_TTL_SECS"),
        (one_time_on_cloudflare, "DPLOYR_KV_ONE_TIME"),
        (purge, "DPLOYR_KV_PURGE_EVERY_SECS"),
    ] {
        let error = DataLayer::open(config).unwrap_err();
        assert_eq!(setting_of(&error), variable, "{error}");
        let tables = diesel::sql_query(
            "SELECT 1 FROM pg_tables WHERE schemaname = 'public' AND tablename IN ('users', '_migrations')",
        )
        .execute(&mut db.connect())
        .unwrap();
        assert_eq!(tables, 0, "{variable}: migrated before the setting was refused");
    }
}

/// Whether `db` holds none of the data layer's tables.
fn unmigrated(db: &dployr_testkit::TestDatabase) -> bool {
    use diesel::RunQueryDsl as _;
    diesel::sql_query("SELECT 1 FROM pg_tables WHERE schemaname = 'public' AND tablename IN ('users', '_migrations')")
        .execute(&mut db.connect())
        .unwrap()
        == 0
}

/// A migration URL naming another database than `DATABASE_URL` (a typo, a
/// pooler's alias mapped elsewhere) is refused before anything is migrated,
/// with migrations on or off. It used to migrate the other database, report
/// it up to date in `health()`, and leave every store call failing
/// (`relation "users" does not exist`).
#[test]
fn a_migration_url_that_reaches_another_database_is_refused_before_anything_is_migrated() {
    let (stores, other) = (dployr_testkit::empty_database(), dployr_testkit::empty_database());
    for migrate_on_start in [true, false] {
        let mut config =
            Config::new(stores.url()).with_kv(KvBackendConfig::Memory).with_migrate_database_url(other.url());
        config.migrate_on_start = migrate_on_start;
        let error = DataLayer::open(config).unwrap_err();
        assert_eq!(setting_of(&error), "DPLOYR_MIGRATE_DATABASE_URL", "{error}");
        let message = error.to_string();
        assert!(message.contains(other.name()) && message.contains(stores.name()), "{message}");
        assert!(unmigrated(&stores) && unmigrated(&other), "migrated on start: {migrate_on_start}");
    }
}

/// The same database reached by another URL (another host spelling, other
/// parameters) is the stores' database: it opens and migrates it.
#[test]
fn a_migration_url_that_reaches_the_same_database_another_way_migrates_it() {
    let db = dployr_testkit::empty_database();
    let url = db.url().replace("127.0.0.1", "localhost");
    let other_spelling = format!("{url}{}application_name=dployr-migrate", if url.contains('?') { '&' } else { '?' });
    assert_ne!(other_spelling, db.url());
    let data = DataLayer::open(Config::new(db.url()).with_migrate_database_url(other_spelling)).unwrap();
    assert!(!data.applied_on_open().is_empty());
    assert!(data.health().migrations.up_to_date);
}

/// A malformed migration URL is a configuration error naming its variable
/// with migrations off too (it was accepted, and only `health()` said so).
/// One that cannot be reached then only costs a warning: it is
/// `health()`'s alone, which reports it.
#[test]
fn with_migrations_off_a_malformed_migration_url_is_refused_and_an_unreachable_one_is_left_to_health() {
    let db = dployr_testkit::database();
    let malformed = Config::new(db.url()).with_migrate_database_url("garbage").without_migrations_on_start();
    let error = DataLayer::open(malformed).unwrap_err();
    assert_eq!(setting_of(&error), "DPLOYR_MIGRATE_DATABASE_URL", "{error}");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let unreachable = Config::new(db.url())
        .with_migrate_database_url(format!("postgres://app:hunter2@127.0.0.1:{port}/dployr"))
        .without_migrations_on_start();
    let data = DataLayer::open(unreachable).unwrap();
    let health = data.health();
    assert!(!health.migrations.up_to_date, "{health:?}");
    assert!(health.migrations.error.is_some_and(|error| !error.contains("hunter2")));
}

/// A database made read-only for its connections (`ALTER DATABASE ... SET
/// default_transaction_read_only`, or the URL's options, or the role) is a
/// setting to change: `Configuration`, which an orchestrator does not
/// retry. It was `Unavailable`, as a standby's is, and restarts never
/// ended.
#[test]
fn a_database_set_read_only_for_its_connections_is_a_configuration_error_not_unavailable() {
    let db = dployr_testkit::empty_database();
    db.set_for_new_sessions("default_transaction_read_only", "on");
    let error = DataLayer::open(Config::new(db.url()).with_kv(KvBackendConfig::Memory)).unwrap_err();
    assert_eq!(setting_of(&error), "DATABASE_URL", "{error}");
    assert!(error.to_string().contains("default_transaction_read_only"), "{error}");
    assert!(unmigrated(&db));
}

/// A short idle-in-transaction timeout that a database (or role) sets for
/// every session does not stop migrations on open: the runner turns it
/// off for its own session, which is idle in a migration's transaction
/// between the file and its `_migrations` row. Failed every start before
/// (a helper's probe). (A 1 ms `statement_timeout` of the database is not
/// tested here: diesel's own setup of each new connection runs under it,
/// so a busy machine fails the connection itself now and then.)
#[test]
fn a_database_with_a_one_millisecond_idle_in_transaction_timeout_migrates_on_open_and_serves() {
    use dployr_data::{Email, UserStore as _};
    let db = dployr_testkit::empty_database();
    db.set_for_new_sessions("idle_in_transaction_session_timeout", "'1ms'");
    let data = DataLayer::open(Config::new(db.url()).with_kv(KvBackendConfig::Memory)).unwrap();
    assert!(!unmigrated(&db));
    // One statement, outside a transaction. The pool keeps a database's
    // idle-in-transaction timeout (its transactions are never idle but for
    // a thread the machine does not run): writes under `1ms` are the
    // operator's to avoid.
    assert_eq!(data.users().get_by_email(&Email::parse("ada@example.io").unwrap()).unwrap(), None);
}

/// A database (or role) whose sessions run with `session_replication_role
/// = replica` has triggers and foreign-key actions off: open used to
/// succeed, `health()` called it ready, and then a deleted user stayed
/// listed as a member and a deleted instance's token could still be
/// spent (a helper's probe). Refused at open as a setting to change,
/// naming it, before anything is migrated.
#[test]
fn a_database_whose_sessions_run_with_triggers_off_is_refused_at_open_naming_the_setting() {
    let db = dployr_testkit::empty_database();
    if !db.superuser() {
        eprintln!("skipped: setting session_replication_role needs a superuser");
        return;
    }
    db.set_for_new_sessions("session_replication_role", "replica");
    let error = DataLayer::open(Config::new(db.url()).with_kv(KvBackendConfig::Memory)).unwrap_err();
    assert_eq!(setting_of(&error), "DATABASE_URL", "{error}");
    assert!(error.to_string().contains("session_replication_role = replica"), "{error}");
    assert!(unmigrated(&db));
    // `local` fires ordinary triggers: accepted.
    db.set_for_new_sessions("session_replication_role", "local");
    DataLayer::open(Config::new(db.url()).with_kv(KvBackendConfig::Memory)).unwrap();
}

/// A migration role that owns a schema of its own name (`"$user"` comes
/// first in the default `search_path`) creates the tables there, where the
/// service role of `DATABASE_URL` never looks: migrations ran, `health()`
/// called them up to date and every store call failed (a helper's probe).
/// Refused as a setting to change, naming the migration URL and both
/// schemas; a service role with an empty schema of its own name still
/// finds the tables further down its path, and is not refused.
#[test]
fn a_migration_role_whose_search_path_puts_the_tables_where_the_service_role_does_not_look_is_refused() {
    use diesel::connection::SimpleConnection as _;
    use dployr_data::UserStore as _;

    let db = dployr_testkit::empty_database();
    if !db.superuser() {
        eprintln!("skipped: making roles needs a superuser");
        return;
    }
    let server = dployr_testkit::server().unwrap();
    let suffix = db.name().replace(|c: char| !c.is_ascii_alphanumeric(), "_");
    let (migrator, service) = (format!("dployr_mig_{suffix}"), format!("dployr_svc_{suffix}"));
    db.connect()
        .batch_execute(&format!(
            "CREATE ROLE \"{migrator}\" LOGIN; CREATE ROLE \"{service}\" LOGIN; \
             CREATE SCHEMA \"{migrator}\" AUTHORIZATION \"{migrator}\"; \
             GRANT CREATE, USAGE ON SCHEMA public TO \"{migrator}\"; \
             GRANT USAGE ON SCHEMA \"{migrator}\", public TO \"{service}\"; \
             ALTER DEFAULT PRIVILEGES FOR ROLE \"{migrator}\" GRANT ALL ON TABLES TO \"{service}\"; \
             ALTER DEFAULT PRIVILEGES FOR ROLE \"{migrator}\" GRANT ALL ON SEQUENCES TO \"{service}\""
        ))
        .unwrap();
    let migrate_url = server.url_with(db.name(), &[("user", migrator.as_str())]);
    let service_url = server.url_with(db.name(), &[("user", service.as_str())]);
    let config = |migrate_url: &str| {
        Config::new(service_url.clone()).with_kv(KvBackendConfig::Memory).with_migrate_database_url(migrate_url)
    };
    let error = DataLayer::open(config(&migrate_url)).unwrap_err();
    assert_eq!(setting_of(&error), "DPLOYR_MIGRATE_DATABASE_URL", "{error}");
    assert!(error.to_string().contains(&format!("schema \"{migrator}\"")), "{error}");
    assert!(error.to_string().contains("search_path"), "{error}");

    // Migrated into public instead (the migration role's schema left
    // aside): the service role with an empty schema of its own name finds
    // the tables in public, and serves.
    db.connect()
        .batch_execute(&format!(
            "DROP SCHEMA \"{migrator}\" CASCADE; CREATE SCHEMA \"{service}\" AUTHORIZATION \"{service}\""
        ))
        .unwrap();
    let data = DataLayer::open(config(&migrate_url)).unwrap();
    assert!(data.users().get_by_email(&dployr_data::Email::parse("ada@example.io").unwrap()).unwrap().is_none());
    drop(data);
    db.connect()
        .batch_execute(&format!(
            "DROP SCHEMA \"{service}\" CASCADE; DROP OWNED BY \"{service}\"; DROP OWNED BY \"{migrator}\"; \
             DROP ROLE \"{migrator}\"; DROP ROLE \"{service}\""
        ))
        .unwrap();
}

/// A migration role whose `search_path` names no schema that exists, or
/// that may not create in the schema (a role that does not own the
/// database, on PostgreSQL 15, which no longer grants CREATE on `public`
/// to every role), is a setting to change, naming the URL's variable and
/// what to do; it was `Backend` (a helper's probe). Nothing is migrated.
#[test]
fn a_migration_role_with_no_schema_to_create_in_or_no_right_to_create_is_a_configuration_error() {
    use diesel::connection::SimpleConnection as _;
    let db = dployr_testkit::empty_database();
    db.set_for_new_sessions("search_path", "nosuchschema");
    let error = DataLayer::open(Config::new(db.url()).with_kv(KvBackendConfig::Memory)).unwrap_err();
    db.set_for_new_sessions("search_path", "DEFAULT");
    assert_eq!(setting_of(&error), "DATABASE_URL", "{error}");
    assert!(error.to_string().contains("search_path names no schema"), "{error}");
    assert!(unmigrated(&db));

    if !db.superuser() {
        eprintln!("skipped: making a role needs a superuser");
        return;
    }
    let role = format!("dployr_nocreate_{}", db.name().replace(|c: char| !c.is_ascii_alphanumeric(), "_"));
    db.connect().batch_execute(&format!("CREATE ROLE \"{role}\" LOGIN")).unwrap();
    let url = dployr_testkit::server().unwrap().url_with(db.name(), &[("user", role.as_str())]);
    let error = DataLayer::open(Config::new(url).with_kv(KvBackendConfig::Memory)).unwrap_err();
    db.connect().batch_execute(&format!("DROP ROLE \"{role}\"")).unwrap();
    assert_eq!(setting_of(&error), "DATABASE_URL", "{error}");
    assert!(error.to_string().contains("GRANT CREATE ON SCHEMA public"), "{error}");
    assert!(unmigrated(&db));
}

/// With migrations off on a database they were never applied to (no deploy
/// step ran them), the data layer opens, `health()` says they are pending,
/// and a store call is a setting to fix naming `DATABASE_URL`, saying how
/// to check the migrations; it was `Backend` ("PostgreSQL refused the
/// statement", `relation "users" does not exist`), which says "report it".
#[test]
fn with_migrations_off_a_store_call_on_an_unmigrated_database_is_a_configuration_error() {
    use dployr_data::UserStore as _;
    let db = dployr_testkit::empty_database();
    let config = Config::new(db.url()).with_kv(KvBackendConfig::Memory).without_migrations_on_start();
    let data = DataLayer::open(config).unwrap();
    assert!(!data.health().migrations.up_to_date);
    let email = dployr_data::Email::parse("ada@example.io").unwrap();
    let error = data.users().get_by_email(&email).unwrap_err();
    assert_eq!(setting_of(&error), "DATABASE_URL", "{error}");
    let message = error.to_string();
    assert!(message.contains("relation \"users\" does not exist") && message.contains("migrate status"), "{message}");
    assert!(unmigrated(&db));
}
