//! `DataLayer`: opens the pool, applies pending migrations (unless told
//! not to), picks the key-value backends (one for sessions, one for the
//! one-time records that must be single use), and hands out the stores.

use std::fmt;
use std::sync::{Arc, Once};
use std::time::Duration;

use dployr_domain::{ClusterId, ClusterStore as _, KvBackend, StoreError, StoreResult, UserId, UserStore as _};
#[cfg(feature = "cloudflare")]
use dployr_kv::CloudflareKv;
use dployr_kv::{KvStore, MemoryKv, PgKv, Purger};
use dployr_migrate::{MigrationEvent, MigrationRunner, MigrationSet};
use dployr_pg::{
    FoundTable, IdentityMismatch, PgBootstrapTokenStore, PgClusterStore, PgConnection, PgInstanceStore, PgPool,
    PgUserStore, ReplicaSet, ServerIdentity,
};

use dployr_migrate::MigrateError;

use crate::config::{
    CALL_TIMEOUT_VAR, CANCEL_GRACE_VAR, CANCEL_ON_DEADLINE_VAR, CONNECT_TIMEOUT_VAR, DATABASE_URL_VAR,
    DEADLINE_MARGIN_VAR, DEFAULT_PURGE_EVERY, KEEPALIVES_COUNT_VAR, KEEPALIVES_IDLE_VAR, KEEPALIVES_INTERVAL_VAR,
    KV_ONE_TIME_VAR, KV_PURGE_EVERY_VAR, KV_VAR, MIGRATE_DATABASE_URL_VAR, OTP_TTL_VAR, POOL_SIZE_VAR,
    REPLICA_MAX_LAG_VAR, REPLICA_URLS_VAR, SESSION_TTL_VAR, STATE_TTL_VAR, STATEMENT_CACHE_VAR, STATEMENT_TIMEOUT_VAR,
    TCP_USER_TIMEOUT_VAR,
};
use crate::health::{self, Health};
use crate::{Config, KvBackendConfig, OneTimeKvConfig};

/// The data layer of dployr base: every store, on one pool.
///
/// ```no_run
/// use dployr_data::{DataLayer, Email, NewUser, Provider, UserStore, ClusterStore};
///
/// let data = DataLayer::from_env()?; // DATABASE_URL, DPLOYR_KV, ...
/// let user = data.users().upsert(NewUser::new(Email::parse("ada@example.io")?, Provider::Github))?;
/// let cluster = data.clusters().create_for_owner(&user.id)?;
/// # Ok::<(), dployr_data::StoreError>(())
/// ```
pub struct DataLayer {
    pool: PgPool,
    users: PgUserStore,
    clusters: PgClusterStore,
    instances: PgInstanceStore,
    bootstrap_tokens: PgBootstrapTokenStore,
    kv: KvStore,
    kv_backend: &'static str,
    one_time_kv_backend: &'static str,
    applied_on_open: Vec<String>,
    /// The sessions' TTL: a deleted account remembered longer than this
    /// has no session left to end (see `forget_sessions_to_end`).
    sessions_ttl: Duration,
    /// Where the migrations' status is read for `health()`; never printed.
    migration_url: String,
    /// Whether that is the primary's URL (no migration URL of its own).
    migrations_on_primary: bool,
    /// Whether a migrations probe of `health()` is still running (one
    /// that outlived its bound): then no other starts.
    migrations_probe: health::ProbeInFlight,
    // Dropped with the data layer, which stops the thread.
    _purger: Option<Purger>,
}

/// The warning that one-time records on Cloudflare are not single use is
/// logged once per process, not once per open.
static CLOUDFLARE_ONE_TIME_WARNING: Once = Once::new();

/// A PostgreSQL key-value backend on `pool`, and how often its purger is to
/// run (checked now, started by [`start_purger`] once the migrations ran).
fn postgres_kv(pool: &PgPool, purge_every: Option<Duration>) -> StoreResult<(PgKv, Option<Duration>)> {
    if purge_every.is_some_and(|every| every.is_zero()) {
        return Err(StoreError::Configuration { setting: KV_PURGE_EVERY_VAR, reason: "must not be zero".into() });
    }
    Ok((PgKv::new(pool.clone()), purge_every))
}

/// The setting named when `KvStoreConfig::otp_max_attempts` is refused: no
/// environment variable sets it.
const OTP_MAX_ATTEMPTS_SETTING: &str = "KvStoreConfig::otp_max_attempts";

/// A TTL or attempt limit the key-value store refuses is a setting to change: named by its
/// variable, and, once the backends are chosen, by the backend whose limit
/// refused it and the variable that chose it (`sessions`, `one_time`: their
/// names; `one_time_chosen_by`: `DPLOYR_KV_ONE_TIME`, or `DPLOYR_KV` where
/// one-time records follow the sessions), since the same TTL may pass on
/// another backend.
fn kv_setting_error(error: StoreError, backends: Option<(&str, &str)>, one_time_chosen_by: &str) -> StoreError {
    let on = |reason: std::borrow::Cow<'static, str>, chosen_by: &str, backend: Option<&str>| match backend {
        Some(backend) => format!("{reason} (the backend chosen by {chosen_by}: {backend})").into(),
        None => reason,
    };
    let (sessions, one_time) = (backends.map(|(sessions, _)| sessions), backends.map(|(_, one_time)| one_time));
    match error {
        StoreError::Invalid { field, reason } => match field {
            "session_ttl" => {
                StoreError::Configuration { setting: SESSION_TTL_VAR, reason: on(reason, KV_VAR, sessions) }
            }
            "state_ttl" => {
                StoreError::Configuration { setting: STATE_TTL_VAR, reason: on(reason, one_time_chosen_by, one_time) }
            }
            "otp_ttl" => {
                StoreError::Configuration { setting: OTP_TTL_VAR, reason: on(reason, one_time_chosen_by, one_time) }
            }
            // No variable sets it: named by the field a `Config` built in
            // code sets, so that every refusal of `open` is `Configuration`.
            "otp_max_attempts" => StoreError::Configuration { setting: OTP_MAX_ATTEMPTS_SETTING, reason },
            field => StoreError::Invalid { field, reason },
        },
        other => other,
    }
}

/// The settings that are wrong whatever the servers say (a TTL no backend
/// takes, a one-time code living past 10 minutes, a zero purge period,
/// one-time records on Cloudflare without the sessions there), refused
/// before anything connects: with the database down, a permanent mistake
/// must not come back as a retryable `Unavailable`. What depends on the
/// backend (Cloudflare's 60 s shortest TTL) is checked once it is built.
fn refuse_settings_no_server_could_take(config: &Config) -> StoreResult<()> {
    // The store's own rules, on backends that add none of theirs.
    KvStore::with_backends(Arc::new(MemoryKv::new()), Arc::new(MemoryKv::new()), config.kv_store)
        .map_err(|error| kv_setting_error(error, None, KV_ONE_TIME_VAR))?;
    let zero_purge = |every: &Option<Duration>| every.is_some_and(|every| every.is_zero());
    if matches!(&config.kv, KvBackendConfig::Postgres { purge_every } if zero_purge(purge_every))
        || matches!(&config.one_time_kv, OneTimeKvConfig::Postgres { purge_every } if zero_purge(purge_every))
    {
        return Err(StoreError::Configuration { setting: KV_PURGE_EVERY_VAR, reason: "must not be zero".into() });
    }
    if matches!(config.one_time_kv, OneTimeKvConfig::Cloudflare) && !config.kv.is_cloudflare() {
        return Err(one_time_on_cloudflare_alone());
    }
    Ok(())
}

/// One-time records on Cloudflare need the sessions there.
fn one_time_on_cloudflare_alone() -> StoreError {
    StoreError::Configuration {
        setting: KV_ONE_TIME_VAR,
        reason: "is cloudflare, which needs the sessions on Cloudflare (DPLOYR_KV=cloudflare)".into(),
    }
}

/// Forgets the deleted accounts remembered longer than the sessions' TTL
/// (`sessions_to_end`, `027_sessions_to_end_by_age`): those deleted through
/// the stores directly or by hand, which no sign-out of the data layer
/// forgets by name, are bounded so to one TTL's worth of deletions (and,
/// between opens, by each sign-out's forget, which takes them too). One
/// statement at open; a failure (a read-only server with migrations off, a
/// schema older than 024) only warns: it costs rows, never a sign-out.
fn forget_sessions_to_end(users: &PgUserStore, sessions_ttl: Duration) {
    match users.forget_sessions_to_end_older_than(sessions_ttl) {
        Ok(0) => {}
        Ok(forgotten) => {
            tracing::debug!(forgotten, "dployr.store: forgot deleted accounts older than the sessions' TTL");
        }
        Err(error) => {
            tracing::warn!(%error, "dployr.store: could not forget the deleted accounts older than the sessions' TTL");
        }
    }
}

/// Starts the purger of `kv` every `every`.
fn start_purger(kv: &PgKv, every: Duration) -> StoreResult<Purger> {
    kv.spawn_purger(every, dployr_kv::PURGE_BATCH).map_err(|e| match e {
        StoreError::Invalid { reason, .. } => StoreError::Configuration { setting: KV_PURGE_EVERY_VAR, reason },
        other => other,
    })
}

/// Refuses a migration URL of its own (`DPLOYR_MIGRATE_DATABASE_URL`) that
/// is malformed or reaches another database than `DATABASE_URL`: one
/// naming another (a typo, a pooler's alias mapped elsewhere) would be
/// migrated instead, `health()` would read the migrations there and call
/// them up to date, and every store call would fail. With migrations on,
/// one that cannot be reached fails the start as the migrations would;
/// with them off, it is only `health()`'s, so the start goes on with a
/// warning and `health()` reports it in `migrations.error`. One connection
/// of the runner's (one or two statements) and one or two statements on
/// the pool.
///
/// Returns the runner's connection (`None` when it could not be reached
/// with migrations off), for [`check_migration_tables`] once migrations ran.
fn check_migration_database(
    pool: &PgPool,
    runner: &MigrationRunner,
    migrate_on_start: bool,
) -> StoreResult<Option<PgConnection>> {
    let identity = runner.connection().map_err(|e| migrate_error(e, MIGRATE_DATABASE_URL_VAR)).and_then(|mut conn| {
        ServerIdentity::of(&mut conn).map(|identity| (identity, conn)).map_err(|e| {
            StoreError::unavailable(format!("reading the identity of {MIGRATE_DATABASE_URL_VAR}'s database"), e)
        })
    });
    let (identity, conn) = match identity {
        Ok(found) => found,
        Err(StoreError::Unavailable { reason, .. }) if !migrate_on_start => {
            tracing::warn!(
                target: "dployr.migrate",
                "{MIGRATE_DATABASE_URL_VAR} not checked at start (migrations are off; health() reports it): {reason}"
            );
            return Ok(None);
        }
        Err(error) => return Err(error),
    };
    let reason = match identity.mismatch(&pool.server_identity()?) {
        None => return Ok(Some(conn)),
        Some(IdentityMismatch::Database { this, other }) => format!(
            "reaches database {this:?} while {DATABASE_URL_VAR} reaches {other:?}: migrations would go to another \
             database than the stores use"
        ),
        Some(IdentityMismatch::Server { this, other }) => format!(
            "reaches a database of another server (system identifier {this}) than {DATABASE_URL_VAR} \
             (system identifier {other}): migrations would go to another database than the stores use"
        ),
    };
    Err(StoreError::Configuration { setting: MIGRATE_DATABASE_URL_VAR, reason: reason.into() })
}

/// Refuses a migration URL whose role finds the migrated tables in another
/// schema than `DATABASE_URL`'s role does: the same database, but their
/// `search_path`s differ (a migration role that owns a schema of its own
/// name, which `"$user"` puts first), so migrations made tables the stores
/// never see, `health()` read them and called them up to date, and every
/// store call failed (a helper's probe). Compared by what each session
/// finds (`to_regclass`), not by where it would create: a service role
/// with an empty schema of its own name still finds the tables further
/// down its path. Nothing to compare while the migration role finds no
/// `_migrations` (migrations off on an empty database: `health()` says
/// they are pending). One statement on `conn` (the runner's) and one on
/// the pool.
fn check_migration_tables(pool: &PgPool, conn: &mut PgConnection) -> StoreResult<()> {
    let unavailable = |error| StoreError::unavailable("finding _migrations from both URLs", error);
    let Some(migrated) = FoundTable::of(conn, "_migrations").map_err(unavailable)? else { return Ok(()) };
    let mut pooled = pool.get()?;
    let found = FoundTable::of(&mut pooled, "_migrations").map_err(unavailable)?;
    if found.as_ref() == Some(&migrated) {
        return Ok(());
    }
    let found = found.map_or_else(|| "none".to_owned(), |table| format!("the one in schema {:?}", table.schema));
    Err(StoreError::Configuration {
        setting: MIGRATE_DATABASE_URL_VAR,
        reason: format!(
            "its role finds _migrations in schema {:?}, while {DATABASE_URL_VAR}'s role finds {found}: their \
             search_path differ (as with a migration role that owns a schema of its own name), so the stores \
             would not use the tables migrations make; give both roles the same search_path",
            migrated.schema
        )
        .into(),
    })
}

/// A migration error as the shared error: connection failures classified
/// as the pool's are, a transaction pooler as the setting to change.
fn migrate_error(error: MigrateError, setting: &'static str) -> StoreError {
    // The role may not create what migrations make, or its search_path
    // names no schema to create in: a grant or a setting to change, which
    // no retry will (PostgreSQL's untranslated messages).
    if let Some(hint) = privilege_or_search_path(&error) {
        return StoreError::Configuration {
            setting,
            reason: format!("applying migrations on start: {error}; {hint}").into(),
        };
    }
    match error {
        MigrateError::Connect(failure) => match failure.into_store_error(setting) {
            StoreError::Unavailable { reason, source } => {
                StoreError::Unavailable { reason: format!("applying migrations on start: {reason}").into(), source }
            }
            other => other,
        },
        MigrateError::TransactionPooler => StoreError::Configuration {
            setting: MIGRATE_DATABASE_URL_VAR,
            reason: format!("applying migrations on start: {error}").into(),
        },
        // Read-only by the URL's options, the role or the database: a
        // setting to change, which no retry will.
        MigrateError::ReadOnlyServer { set_by: Some(_), .. } => {
            StoreError::Configuration { setting, reason: format!("applying migrations on start: {error}").into() }
        }
        // A standby, or a primary switched over: a later start may find
        // the primary there.
        MigrateError::LockTimeout { .. }
        | MigrateError::LockNotAvailable { .. }
        | MigrateError::ReadOnlyServer { .. } => StoreError::Unavailable {
            reason: format!("applying migrations on start: {error}").into(),
            source: Some(Box::new(error)),
        },
        // A restart or failover under the runner: the files are not at
        // fault, and a later start finishes the job.
        lost if lost.is_connection_lost() => StoreError::Unavailable {
            reason: format!("applying migrations on start: the connection was lost ({lost})").into(),
            source: Some(Box::new(lost)),
        },
        other => StoreError::backend(format!("applying migrations on start: {other}"), other),
    }
}

/// What to change when migrations fail for a privilege the migration
/// role lacks or a `search_path` with no schema to create in; `None` for
/// any other failure.
fn privilege_or_search_path(error: &MigrateError) -> Option<&'static str> {
    let message = match error {
        // diesel shows a database error as PostgreSQL's message alone.
        MigrateError::Database { source, .. } => source.to_string(),
        MigrateError::MigrationFailed(failure) | MigrateError::SchemaWithoutHistory(failure) => failure.message.clone(),
        _ => return None,
    };
    if message.starts_with("no schema has been selected to create in") {
        Some(
            "the role's search_path names no schema that exists: set one (ALTER ROLE ... SET search_path = public) \
             or create it",
        )
    } else if message.starts_with("permission denied for ") || message.starts_with("must be owner of ") {
        Some(
            "the migration role lacks a privilege: migrate as the owner of the database and its schema (with \
             DPLOYR_MIGRATE_DATABASE_URL, keeping DATABASE_URL for the service role), or GRANT CREATE ON SCHEMA \
             public TO the role (PostgreSQL 15 no longer grants it to every role)",
        )
    } else {
        None
    }
}

/// The variable of the pool setting that `PoolConfig`'s check names as
/// `field` (a configuration built in code names no variable, but says which
/// one would set it): each refused setting by its own name.
fn pool_setting_variable(field: &str) -> &'static str {
    match field {
        "pool connection_timeout" => CONNECT_TIMEOUT_VAR,
        "pool statement_timeout" => STATEMENT_TIMEOUT_VAR,
        "deadline call_timeout" => CALL_TIMEOUT_VAR,
        "deadline margin" => DEADLINE_MARGIN_VAR,
        "deadline grace" => CANCEL_GRACE_VAR,
        "network keepalives_idle" => KEEPALIVES_IDLE_VAR,
        "network keepalives_interval" => KEEPALIVES_INTERVAL_VAR,
        "network keepalives_count" => KEEPALIVES_COUNT_VAR,
        "network tcp_user_timeout" => TCP_USER_TIMEOUT_VAR,
        "network connect_timeout" => CONNECT_TIMEOUT_VAR,
        _ => POOL_SIZE_VAR,
    }
}

/// Behind a pooler in transaction mode, a prepared statement or a session
/// setting made on one server connection is met by another client (wrong
/// answers, `prepared statement "__diesel_stmt_1" already exists`) or
/// missing for this one, and a cancel at a call's deadline, sent to the
/// backend its connection had when it was made, may stop another client's
/// statement: such a start is refused, naming the setting. `url` says which
/// URL `pool` connects to (`DATABASE_URL`, or a replica of
/// `DPLOYR_DB_REPLICA_URLS`, whose pools have the same settings).
fn refuse_unsafe_pooling(pool: &PgPool, config: &Config, url: &str) -> StoreResult<()> {
    let cache = config.pool.prepared_statement_cache;
    let timeout = config.pool.statement_timeout.is_some();
    let cancel = config.pool.deadline.cancel;
    if !cache && !timeout && !cancel {
        return Ok(());
    }
    if !pool.behind_transaction_pooler()? {
        return Ok(());
    }
    let pooler = format!(
        "{url} goes through a connection pooler in transaction mode (PgBouncer pool_mode = transaction: \
         session state set on one connection showed up on another)"
    );
    if cache {
        return Err(StoreError::Configuration {
            setting: STATEMENT_CACHE_VAR,
            reason: format!(
                "{pooler}; prepared statements would reach other clients and give wrong answers: \
                 set {STATEMENT_CACHE_VAR}=false"
            )
            .into(),
        });
    }
    if timeout {
        return Err(StoreError::Configuration {
            setting: STATEMENT_TIMEOUT_VAR,
            reason: format!(
                "{pooler}; a statement_timeout set per connection would land on other clients' sessions: \
                 set it on the role (ALTER ROLE app SET statement_timeout = '30s') and {STATEMENT_TIMEOUT_VAR}=0"
            )
            .into(),
        });
    }
    Err(StoreError::Configuration {
        setting: CANCEL_ON_DEADLINE_VAR,
        reason: format!(
            "{pooler}; a cancel at a call's deadline goes to the server connection this connection had when \
             it was made, which may be serving another client by then: set {CANCEL_ON_DEADLINE_VAR}=false \
             (the socket shutdown still bounds every call)"
        )
        .into(),
    })
}

impl fmt::Debug for DataLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DataLayer")
            .field("pool", &self.pool)
            .field("kv_backend", &self.kv_backend)
            .field("one_time_kv_backend", &self.one_time_kv_backend)
            .field("applied_on_open", &self.applied_on_open)
            .finish_non_exhaustive()
    }
}

impl DataLayer {
    /// Opens the data layer from the environment ([`Config::from_env`]).
    ///
    /// # Errors
    /// As [`Config::from_env`] and [`DataLayer::open`].
    pub fn from_env() -> StoreResult<Self> {
        Self::open(Config::from_env()?)
    }

    /// Opens the pool (failing within the connect timeout if the database
    /// does not answer), refuses a pooler in transaction mode with settings
    /// that would give wrong answers there, builds the key-value backends
    /// and checks their settings, then (only then: a process that refuses
    /// its settings migrates nothing) applies pending migrations if
    /// configured, starts the key-value purger, and forgets the deleted
    /// accounts remembered for a sign-out longer than the sessions' TTL
    /// (one statement; see [`remove_users`](Self::remove_users)).
    ///
    /// # Errors
    /// [`StoreError::Configuration`] naming `DATABASE_URL` (or
    /// `DPLOYR_MIGRATE_DATABASE_URL`) at once for a malformed URL, refused
    /// credentials or a missing database or role, and naming the setting to
    /// change behind a transaction pooler; [`StoreError::Unavailable`] naming
    /// the URL's variable when the server refused the connection, could not
    /// be reached or did not answer in time; [`StoreError::Configuration`]
    /// naming `DPLOYR_MIGRATE_DATABASE_URL` when that URL reaches another
    /// database than `DATABASE_URL` (checked with migrations off too, before
    /// anything is migrated); [`StoreError::Configuration`]
    /// for settings the backends refuse; [`StoreError::Backend`] when a
    /// migration fails (its message names the migration). No message, and
    /// no error in a `source()` chain, holds a password.
    pub fn open(config: Config) -> StoreResult<Self> {
        refuse_settings_no_server_could_take(&config)?;
        let pool =
            PgPool::connect_as(&config.database_url, DATABASE_URL_VAR, config.pool).map_err(|error| match error {
                StoreError::Invalid { field, reason } => {
                    StoreError::Configuration { setting: pool_setting_variable(field), reason }
                }
                other => other,
            })?;
        refuse_unsafe_pooling(&pool, &config, DATABASE_URL_VAR)?;
        let pool = if config.replica_urls.is_empty() {
            pool
        } else {
            let replicas =
                ReplicaSet::connect(&pool, &config.replica_urls, REPLICA_URLS_VAR, config.pool, config.replicas)
                    .map_err(|error| match error {
                        // A replica setting refused is a setting to change, by
                        // its variable where it has one, else its field.
                        StoreError::Invalid { field: "replica max_lag", reason } => {
                            StoreError::Configuration { setting: REPLICA_MAX_LAG_VAR, reason }
                        }
                        StoreError::Invalid { field, reason } if field.starts_with("replica ") => {
                            StoreError::Configuration { setting: field, reason }
                        }
                        other => other,
                    })?;
            // Each replica's pool has the primary's settings: behind a
            // transaction pooler they are as unsafe there.
            // A replica that does not answer now is left out until it does
            // (`ReplicaSet::connect`), not probed: its start is not refused.
            for (name, replica) in replicas.pools() {
                match refuse_unsafe_pooling(replica, &config, &format!("{name} of {REPLICA_URLS_VAR}")) {
                    Err(StoreError::Unavailable { reason, .. }) => tracing::warn!(
                        target: "dployr.replicas",
                        replica = name,
                        "not probed for a transaction pooler: it does not answer ({reason})"
                    ),
                    refused => refused?,
                }
            }
            pool.with_replicas(replicas)
        };
        let migration_url = config.migration_url().to_owned();

        type Backend = (Arc<dyn KvBackend>, &'static str);
        let Config { kv: kv_config, one_time_kv, kv_store, .. } = config;
        let sessions_on_cloudflare = kv_config.is_cloudflare();
        // Every setting is checked (backends built, TTLs against their
        // limits) before the migrations write anything: a setting refused
        // after them would have migrated a shared database for a process
        // that does not start. The purger, which deletes from the
        // key-value table, starts after them.
        let mut purge: Option<(PgKv, Duration)> = None;
        let mut sessions_on_postgres: Option<PgKv> = None;
        let sessions: Backend = match kv_config {
            KvBackendConfig::Memory => (Arc::new(MemoryKv::new()), "memory"),
            KvBackendConfig::Postgres { purge_every } => {
                let (kv, every) = postgres_kv(&pool, purge_every)?;
                purge = every.map(|every| (kv.clone(), every));
                sessions_on_postgres = Some(kv.clone());
                (Arc::new(kv), "postgres")
            }
            #[cfg(feature = "cloudflare")]
            KvBackendConfig::Cloudflare(cloudflare) => (Arc::new(CloudflareKv::new(cloudflare)?), "cloudflare"),
        };
        let mut postgres_one_time = |purge_every: Option<Duration>| -> StoreResult<Backend> {
            let (kv, every) = postgres_kv(&pool, purge_every)?;
            if let Some(sessions_kv) = &sessions_on_postgres {
                // One table, one purger: at the shorter of the two periods
                // (the one-time records' may be set apart in code).
                if let Some(every) = every {
                    purge = Some(match purge.take() {
                        Some((kv, current)) => (kv, current.min(every)),
                        None => (sessions_kv.clone(), every),
                    });
                }
                return Ok((Arc::clone(&sessions.0), "postgres"));
            }
            purge = every.map(|every| (kv.clone(), every));
            Ok((Arc::new(kv), "postgres"))
        };
        let one_time_chosen_by = if matches!(one_time_kv, OneTimeKvConfig::Default) && !sessions_on_cloudflare {
            KV_VAR
        } else {
            KV_ONE_TIME_VAR
        };
        let one_time: Backend = match (one_time_kv, sessions_on_cloudflare) {
            (OneTimeKvConfig::Default, true) => postgres_one_time(Some(DEFAULT_PURGE_EVERY))?,
            (OneTimeKvConfig::Default, false) => (Arc::clone(&sessions.0), sessions.1),
            (OneTimeKvConfig::Postgres { purge_every }, _) => postgres_one_time(purge_every)?,
            (OneTimeKvConfig::Memory, _) => (Arc::new(MemoryKv::new()), "memory"),
            (OneTimeKvConfig::Cloudflare, true) => {
                CLOUDFLARE_ONE_TIME_WARNING.call_once(|| {
                    tracing::warn!(
                        "{KV_ONE_TIME_VAR}=cloudflare: OAuth states and one-time codes are on Cloudflare Workers KV, \
                         which does not enforce single use or the attempt limit (reads up to 60 s stale, no atomic \
                         operations), and may refuse a right code or a valid state while its write is not seen yet; \
                         use postgres unless you accept that"
                    );
                });
                (Arc::clone(&sessions.0), "cloudflare")
            }
            (OneTimeKvConfig::Cloudflare, false) => return Err(one_time_on_cloudflare_alone()),
        };
        let kv = KvStore::with_backends(Arc::clone(&sessions.0), Arc::clone(&one_time.0), kv_store)
            .map_err(|error| kv_setting_error(error, Some((sessions.1, one_time.1)), one_time_chosen_by))?;
        let (kv_backend, one_time_kv_backend) = (sessions.1, one_time.1);

        let migrations = MigrationSet::embedded()
            .map_err(|e| StoreError::backend(format!("reading the embedded migrations: {e}"), e))?;
        let mut runner =
            MigrationRunner::new(&migration_url, migrations).with_table_lock_timeout(config.migrate_lock_timeout);
        let mut migration_conn = if config.migrate_database_url.is_some() {
            check_migration_database(&pool, &runner, config.migrate_on_start)?
        } else {
            None
        };
        let applied_on_open = if config.migrate_on_start {
            let setting =
                if config.migrate_database_url.is_some() { MIGRATE_DATABASE_URL_VAR } else { DATABASE_URL_VAR };
            // Opted into: a newer release's migrations (a rolling deploy, a
            // rollback of the code) leave this release nothing to apply: it
            // starts, and says so; health() reports them as `migrations.newer`.
            if config.migrate_allow_newer_release {
                runner = runner.allowing_a_newer_release();
            }
            let applied = runner
                .run_pending(&mut |event| match event {
                    MigrationEvent::NewerReleaseApplied { .. } => tracing::warn!(target: "dployr.migrate", "{event}"),
                    _ => tracing::info!(target: "dployr.migrate", "{event}"),
                })
                .map_err(|e| migrate_error(e, setting))?;
            applied.into_iter().map(|migration| migration.name).collect()
        } else {
            Vec::new()
        };
        if let Some(conn) = migration_conn.as_mut() {
            check_migration_tables(&pool, conn)?;
        }

        let purger = purge.map(|(kv, every)| start_purger(&kv, every)).transpose()?;
        let sessions_ttl = kv_store.session_ttl;
        let users = PgUserStore::new(pool.clone());
        forget_sessions_to_end(&users, sessions_ttl);

        Ok(Self {
            users,
            clusters: PgClusterStore::new(pool.clone()),
            instances: PgInstanceStore::new(pool.clone()),
            bootstrap_tokens: PgBootstrapTokenStore::new(pool.clone()),
            pool,
            kv,
            kv_backend,
            one_time_kv_backend,
            applied_on_open,
            sessions_ttl,
            migrations_on_primary: migration_url == config.database_url,
            migration_url,
            migrations_probe: health::ProbeInFlight::default(),
            _purger: purger,
        })
    }

    /// Users (implements [`UserStore`](dployr_domain::UserStore)).
    pub fn users(&self) -> &PgUserStore {
        &self.users
    }

    /// Clusters and memberships (implements [`ClusterStore`](dployr_domain::ClusterStore)).
    pub fn clusters(&self) -> &PgClusterStore {
        &self.clusters
    }

    /// Instances (implements [`InstanceStore`](dployr_domain::InstanceStore)).
    pub fn instances(&self) -> &PgInstanceStore {
        &self.instances
    }

    /// Bootstrap tokens (implements [`BootstrapTokenStore`](dployr_domain::BootstrapTokenStore)).
    pub fn bootstrap_tokens(&self) -> &PgBootstrapTokenStore {
        &self.bootstrap_tokens
    }

    /// Sessions, OAuth state and one-time codes.
    pub fn kv(&self) -> &KvStore {
        &self.kv
    }

    /// Deletes a user's account and signs them out everywhere: the user
    /// ([`UserStore::delete`](dployr_domain::UserStore::delete): refused
    /// while they own a cluster; their memberships go with them), then every
    /// session of theirs ([`KvStore::delete_user_sessions`]). Returns how
    /// many sessions were ended.
    ///
    /// The two stores cannot share a transaction, so these are two steps, in
    /// this order: a delete that is refused signs no one out. If ending the
    /// sessions fails, the user is already gone and the error is the
    /// key-value backend's; call again: for a user who no longer exists the
    /// sessions are still ended, and the answer is then `NotFound`.
    ///
    /// Not reached: sessions kept outside [`kv`](Self::kv) (a tower-sessions
    /// store has its own `delete_user_sessions`); a session written from a
    /// copy of the user read before the delete (a sign-in finishing at that
    /// moment), which lives until its TTL, so code that must not serve a
    /// deleted user checks the user, not only the session (on the primary
    /// where replicas are configured: `users.get` is replica-safe, so a
    /// replica up to its lag bound behind may still show the user; read it
    /// under [`PgPool::reads_on_primary`](dployr_pg::PgPool::reads_on_primary)); and on
    /// Cloudflare, whose listings lag (60 s "or more", no promised bound),
    /// sessions its listing does not show yet (see
    /// [`KvStore::delete_user_sessions`]).
    ///
    /// ```no_run
    /// # fn close(data: &dployr_data::DataLayer, user: &dployr_data::UserId) -> dployr_data::StoreResult<()> {
    /// let ended = data.delete_user(user)?;
    /// println!("account closed, {ended} session(s) ended");
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// `Conflict` (field `owner`) while the user owns a cluster, with
    /// nothing deleted and no session ended; `NotFound` for a user who does
    /// not exist, after ending any sessions they still have; the key-value
    /// backend's errors from the second step. `Unavailable` from the first
    /// step because the connection was lost under it
    /// ([`may_have_committed`](dployr_pg::may_have_committed)) may hide a
    /// delete that committed, its answer lost: the call then looks whether
    /// the account is gone and, if so, ends its sessions before answering
    /// (one more statement, on a new connection, and one that forgets the
    /// account once its sessions are ended; none after a checkout that
    /// found no connection or a call the deadline cut off); call again
    /// until `Ok` or `NotFound` all the same.
    pub fn delete_user(&self, user: &UserId) -> StoreResult<usize> {
        let user = std::slice::from_ref(user);
        match self.users.delete(&user[0]) {
            Ok(()) => self.sign_out(user),
            Err(not_found @ StoreError::NotFound { .. }) => {
                // Whether or not an earlier call deleted it: one listing,
                // and sessions made for an id that never was an account
                // end too.
                self.sign_out(user)?;
                Err(not_found)
            }
            Err(lost) if dployr_pg::may_have_committed(&lost) => {
                // The delete may have committed, its answer lost: a caller
                // who then reads the account as gone would stop there, its
                // sessions live for their TTL. Ended now if it is gone.
                let _ignored = self.sign_out_deleted(user);
                Err(lost)
            }
            Err(refused) => Err(refused),
        }
    }

    /// Removes members from a cluster as
    /// [`ClusterStore::remove_users`](dployr_domain::ClusterStore::remove_users)
    /// does, and signs out everywhere the accounts that call deletes
    /// (invitees it removed that never signed in and are left in no
    /// cluster: a session made for one without `users.upsert` would name an
    /// account that is gone). Returns how many sessions were ended.
    ///
    /// Two steps, as [`delete_user`](Self::delete_user): the removal, then
    /// the sign-out of every listed account that was deleted and whose
    /// sessions are not yet ended. The statement that deletes an account
    /// remembers it (table `sessions_to_end`, in the same transaction), the
    /// sign-out forgets it once its sessions are ended, and one statement
    /// finds those of the list still remembered: those this call deleted,
    /// and those a call that failed half-way deleted and did not sign out.
    /// If ending the sessions fails, the accounts are already gone and the
    /// error is the key-value backend's; calling again with the same ids
    /// finishes it, starting with the accounts the failed call did not
    /// reach, even once the cluster itself is gone: the sign-out runs then
    /// too, and the answer is the cluster's `NotFound`.
    ///
    /// The cost of that: one key-value listing per account still to sign
    /// out, and none for an id that never was an account or whose sessions
    /// an earlier call ended. On Cloudflare each listing is a request of
    /// the account's 1200 per 5 minutes: removing more invitees than that
    /// at once spends the budget, fails with the backend's `Unavailable`
    /// (HTTP 429), and is finished by calling again once the budget is
    /// back, each call going further. An account deleted otherwise (through
    /// the stores directly, or by hand) is remembered too, and forgotten
    /// once older than the sessions' TTL (at `open`, and by the forget of
    /// each sign-out here), when no session made before its delete is left:
    /// listed here before then, its sessions are ended. Not reached:
    /// sessions made for an id that never was an account (ended by
    /// [`delete_user`](Self::delete_user)),
    /// and those of accounts deleted before migration
    /// `024_sessions_to_end`, which no statement remembered.
    ///
    /// # Errors
    /// As `remove_users` (`Conflict` on field `owner` when one of them owns
    /// the cluster, nothing removed and no one signed out; `NotFound` for a
    /// cluster that does not exist, after signing out the listed accounts
    /// an earlier call deleted and did not sign out); the key-value
    /// backend's errors from the second step. After `Unavailable` from a
    /// removal whose connection was lost under it, which may have committed
    /// unanswered, the listed accounts it deleted are signed out before
    /// answering, as
    /// [`delete_user`](Self::delete_user) does.
    pub fn remove_users(&self, cluster: &ClusterId, users: &[UserId]) -> StoreResult<usize> {
        match self.clusters.remove_users(cluster, users) {
            Ok(()) => self.sign_out_deleted(users),
            // The cluster was deleted after a call whose sign-out failed:
            // its accounts are gone with their sessions still there, and
            // this retry is the caller's only way to end them.
            Err(not_found @ StoreError::NotFound { .. }) => {
                self.sign_out_deleted(users)?;
                Err(not_found)
            }
            // The removal may have committed, its answer lost (see
            // `delete_user`).
            Err(lost) if dployr_pg::may_have_committed(&lost) => {
                let _ignored = self.sign_out_deleted(users);
                Err(lost)
            }
            Err(refused) => Err(refused),
        }
    }

    /// Ends every session of the accounts among `users` that were deleted
    /// and whose sessions are not yet ended (`users.sessions_to_end`);
    /// returns how many sessions it ended. See [`sign_out`](Self::sign_out).
    fn sign_out_deleted(&self, users: &[UserId]) -> StoreResult<usize> {
        let pending = self.users.sessions_to_end(users)?;
        self.sign_out(&pending)
    }

    /// Ends every session of `users`, one account after another, then
    /// forgets the accounts whose sessions it ended among those to end
    /// (`users.sessions_ended`, one statement): up to the first failure, so
    /// that a retry after a failure half-way (on Cloudflare, the account's
    /// request budget spent) starts where this one stopped instead of
    /// listing the same accounts again. Returns how many sessions it ended.
    fn sign_out(&self, users: &[UserId]) -> StoreResult<usize> {
        let mut ended = 0;
        let mut done = 0;
        let mut failed = None;
        for user in users {
            match self.kv.delete_user_sessions(user) {
                Ok(count) => {
                    ended += count;
                    done += 1;
                }
                Err(error) => {
                    failed = Some(error);
                    break;
                }
            }
        }
        if let Err(error) = self.users.sessions_ended(&users[..done], self.sessions_ttl) {
            // Their sessions are ended; a row left costs a retry naming
            // the account one listing more, nothing else.
            tracing::warn!(%error, accounts = done, "dployr.store: could not forget the accounts whose sessions were ended");
        }
        match failed {
            Some(error) => Err(error),
            None => Ok(ended),
        }
    }

    /// The name of the key-value backend of sessions: `memory`, `postgres` or `cloudflare`.
    pub fn kv_backend(&self) -> &'static str {
        self.kv_backend
    }

    /// The name of the key-value backend of OAuth states, one-time codes and
    /// attempt counters: `memory`, `postgres` or `cloudflare`.
    pub fn one_time_kv_backend(&self) -> &'static str {
        self.one_time_kv_backend
    }

    /// The connection pool the stores share.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Primary, replicas, key-value backend and migrations, each probed now
    /// with its duration (see [`Health`]). Never fails: a probe that fails
    /// says so in its answer.
    pub fn health(&self) -> Health {
        health::check(
            &self.pool,
            health::KvBackends {
                sessions: self.kv.backend(),
                one_time: self.kv.one_time_backend(),
                on_primary: self.kv_backend == "postgres" || self.one_time_kv_backend == "postgres",
            },
            health::MigrationsSource {
                url: &self.migration_url,
                on_primary: self.migrations_on_primary,
                in_flight: &self.migrations_probe,
            },
        )
    }

    /// The migrations this `open` applied (empty when the database was
    /// current or migrations on start were off).
    pub fn applied_on_open(&self) -> &[String] {
        &self.applied_on_open
    }
}
