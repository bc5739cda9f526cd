//! `Config`: everything the data layer needs to start, from the environment
//! or built in code. A missing or malformed setting is one
//! `StoreError::Configuration` that names the variable to fix.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use dployr_domain::{StoreError, StoreResult};
#[cfg(feature = "cloudflare")]
use dployr_kv::{ACCOUNT_ID_VAR, API_BASE_URL_VAR, API_TOKEN_VAR, CloudflareConfig, NAMESPACE_ID_VAR};
use dployr_kv::{KvStoreConfig, MAX_OTP_TTL};
use dployr_pg::{MAX_KEEPALIVE_SECS, MAX_KEEPALIVES_COUNT, MAX_POOL_SIZE, MAX_TIMEOUT, PoolConfig, ReplicaConfig};

/// The PostgreSQL URL (libpq syntax). Required.
pub const DATABASE_URL_VAR: &str = "DATABASE_URL";
/// `memory`, `postgres` (default) or `cloudflare`.
pub const KV_VAR: &str = "DPLOYR_KV";
/// Where OAuth states, one-time codes and attempt counters live: `postgres`,
/// `memory` or `cloudflare`. Unset: with the sessions, except that with
/// `DPLOYR_KV=cloudflare` they go to PostgreSQL.
pub const KV_ONE_TIME_VAR: &str = "DPLOYR_KV_ONE_TIME";
/// Apply pending migrations when the data layer opens: `true` (default) or `false`.
pub const MIGRATE_ON_START_VAR: &str = "DPLOYR_MIGRATE_ON_START";
/// The PostgreSQL URL the migration runner uses (default: `DATABASE_URL`).
/// Behind a pooler in transaction mode, point it at PostgreSQL directly or at
/// a session-mode pool: the migration lock is a session lock.
pub const MIGRATE_DATABASE_URL_VAR: &str = "DPLOYR_MIGRATE_DATABASE_URL";
/// Let migrations on start open a database that a newer release of this
/// data layer migrated: `false` (default: refused, naming the migrations
/// this binary lacks) or `true` (for rolling deploys and rollbacks of the
/// code; see [`Config::allowing_a_newer_release`]).
pub const MIGRATE_ALLOW_NEWER_RELEASE_VAR: &str = "DPLOYR_MIGRATE_ALLOW_NEWER_RELEASE";
/// PostgreSQL's `lock_timeout` for the migrations' statements, in ms (default
/// 3000): how long a migration may queue live traffic behind a table lock
/// before it rolls back and tries again.
pub const MIGRATE_LOCK_TIMEOUT_VAR: &str = "DPLOYR_MIGRATE_LOCK_TIMEOUT_MS";
/// Most pooled connections (default 10).
pub const POOL_SIZE_VAR: &str = "DPLOYR_DB_POOL_SIZE";
/// How long a connection checkout or the first connect waits, in ms (default 5000).
pub const CONNECT_TIMEOUT_VAR: &str = "DPLOYR_DB_CONNECT_TIMEOUT_MS";
/// `statement_timeout` of every connection in ms; 0 keeps the server's (default 30000).
pub const STATEMENT_TIMEOUT_VAR: &str = "DPLOYR_DB_STATEMENT_TIMEOUT_MS";
/// diesel's prepared statement cache: `true` (default) or `false` (PgBouncer transaction mode).
pub const STATEMENT_CACHE_VAR: &str = "DPLOYR_DB_STATEMENT_CACHE";
/// The client's deadline base of a call in ms; 0 or unset: the statement timeout (docs/operations.md).
pub const CALL_TIMEOUT_VAR: &str = "DPLOYR_DB_CALL_TIMEOUT_MS";
/// Added to the call timeout before the client cancels, in ms (default 1000).
pub const DEADLINE_MARGIN_VAR: &str = "DPLOYR_DB_DEADLINE_MARGIN_MS";
/// How long after the cancel the connection is cut off, in ms (default 1000).
pub const CANCEL_GRACE_VAR: &str = "DPLOYR_DB_CANCEL_GRACE_MS";
/// Send a cancel request when a call's deadline passes: `true` (default) or `false` (PgBouncer transaction mode).
pub const CANCEL_ON_DEADLINE_VAR: &str = "DPLOYR_DB_CANCEL_ON_DEADLINE";
/// TCP keepalives on database connections: `true` (default) or `false`.
pub const KEEPALIVES_VAR: &str = "DPLOYR_DB_KEEPALIVES";
/// Idle seconds before the first keepalive probe (default 10).
pub const KEEPALIVES_IDLE_VAR: &str = "DPLOYR_DB_KEEPALIVES_IDLE_SECS";
/// Seconds between keepalive probes (default 5).
pub const KEEPALIVES_INTERVAL_VAR: &str = "DPLOYR_DB_KEEPALIVES_INTERVAL_SECS";
/// Unanswered keepalive probes before the connection is dead (default 3).
pub const KEEPALIVES_COUNT_VAR: &str = "DPLOYR_DB_KEEPALIVES_COUNT";
/// libpq `tcp_user_timeout` in ms; 0 keeps the system's (default 25000). In
/// force only with keepalives on: a non-zero value with
/// `DPLOYR_DB_KEEPALIVES=false` is refused.
pub const TCP_USER_TIMEOUT_VAR: &str = "DPLOYR_DB_TCP_USER_TIMEOUT_MS";
/// PostgreSQL URLs of streaming replicas, separated by commas and/or
/// whitespace, or one libpq `key=value` string: replica-safe reads go there
/// (docs/ARCHITECTURE.md, "Read routing"). A URL starts only at a
/// `postgres://` or `postgresql://` after a separator, so a `,` in a
/// password stays in its URL (and a multi-host URL, `postgres://r1,r2/app`,
/// stays whole, to be refused when the layer opens: each replica must be
/// one server, docs/operations.md "One server per URL"). Unset: none.
pub const REPLICA_URLS_VAR: &str = "DPLOYR_DB_REPLICA_URLS";
/// The most replay lag a replica may have to answer reads, in ms (default 1000).
pub const REPLICA_MAX_LAG_VAR: &str = "DPLOYR_DB_REPLICA_MAX_LAG_MS";
/// How often the PostgreSQL KV backend purges expired rows, in s; 0 turns it off (default 300).
pub const KV_PURGE_EVERY_VAR: &str = "DPLOYR_KV_PURGE_EVERY_SECS";
/// Session lifetime in s (default 7 days).
pub const SESSION_TTL_VAR: &str = "DPLOYR_SESSION_TTL_SECS";
/// OAuth state lifetime in s (default 600).
pub const STATE_TTL_VAR: &str = "DPLOYR_STATE_TTL_SECS";
/// One-time code lifetime in s (default 600, at most 600: OWASP ASVS 2.7.2).
pub const OTP_TTL_VAR: &str = "DPLOYR_OTP_TTL_SECS";

/// Every variable of the data layer's own that [`Config::from_env`] reads
/// (Cloudflare's are checked where `DPLOYR_KV` is cloudflare, by
/// `CloudflareConfig::refuse_values_not_utf8`, with the `cloudflare` feature).
const ALL_VARS: [&str; 26] = [
    DATABASE_URL_VAR,
    KV_VAR,
    KV_ONE_TIME_VAR,
    MIGRATE_ON_START_VAR,
    MIGRATE_DATABASE_URL_VAR,
    MIGRATE_LOCK_TIMEOUT_VAR,
    MIGRATE_ALLOW_NEWER_RELEASE_VAR,
    POOL_SIZE_VAR,
    CONNECT_TIMEOUT_VAR,
    STATEMENT_TIMEOUT_VAR,
    STATEMENT_CACHE_VAR,
    CALL_TIMEOUT_VAR,
    DEADLINE_MARGIN_VAR,
    CANCEL_GRACE_VAR,
    CANCEL_ON_DEADLINE_VAR,
    KEEPALIVES_VAR,
    KEEPALIVES_IDLE_VAR,
    KEEPALIVES_INTERVAL_VAR,
    KEEPALIVES_COUNT_VAR,
    TCP_USER_TIMEOUT_VAR,
    REPLICA_URLS_VAR,
    REPLICA_MAX_LAG_VAR,
    KV_PURGE_EVERY_VAR,
    SESSION_TTL_VAR,
    STATE_TTL_VAR,
    OTP_TTL_VAR,
];

/// Which key-value backend holds sessions, OAuth state and one-time codes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvBackendConfig {
    /// In this process's memory: tests and single-process development.
    Memory,
    /// The `kv_entries` table of the data layer's own database.
    Postgres {
        /// How often a background thread purges expired rows; `None`: never
        /// (run `PgKv::purge_expired` yourself), unless the one-time records
        /// are on PostgreSQL with a period of their own: one purger serves
        /// the table, at the shorter period set.
        purge_every: Option<Duration>,
    },
    /// A Cloudflare Workers KV namespace.
    #[cfg(feature = "cloudflare")]
    Cloudflare(CloudflareConfig),
}

impl KvBackendConfig {
    /// Whether sessions go to Cloudflare.
    pub(crate) fn is_cloudflare(&self) -> bool {
        #[cfg(feature = "cloudflare")]
        return matches!(self, Self::Cloudflare(_));
        #[cfg(not(feature = "cloudflare"))]
        false
    }
}

/// Where OAuth states, one-time codes and their attempt counters live.
/// They must be single use and counted exactly, which needs a backend with
/// atomic `take` and `increment`: PostgreSQL or memory, not Cloudflare.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum OneTimeKvConfig {
    /// With the sessions ([`Config::kv`]), except that with Cloudflare
    /// sessions they go to PostgreSQL. The default.
    #[default]
    Default,
    /// The `kv_entries` table of the data layer's own database.
    Postgres {
        /// How often a background thread purges expired rows; `None`: never.
        /// When the sessions are on PostgreSQL too, one purger serves the
        /// table, at the shorter of the two periods set.
        purge_every: Option<Duration>,
    },
    /// In this process's memory: a single process only.
    Memory,
    /// The Cloudflare namespace of the sessions: an explicit opt-in that
    /// does **not** enforce single use or the attempt limit (reads up to
    /// 60 s stale, no atomic operations); a warning is logged once.
    Cloudflare,
}

/// How the data layer starts.
///
/// ```
/// use dployr_data::{Config, KvBackendConfig};
///
/// let config = Config::new("postgres://localhost/dployr-local").with_kv(KvBackendConfig::Memory);
/// assert!(config.migrate_on_start);
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Config {
    /// The PostgreSQL URL. `Debug` does not show it (it may hold a password).
    pub database_url: String,
    /// Pool size and timeouts.
    pub pool: PoolConfig,
    /// The key-value backend of sessions (and, by default, of everything).
    pub kv: KvBackendConfig,
    /// The key-value backend of OAuth states, one-time codes and attempt counters.
    pub one_time_kv: OneTimeKvConfig,
    /// TTLs and OTP attempts of the key-value store.
    pub kv_store: KvStoreConfig,
    /// Apply pending migrations on open (the seed's behaviour). Default true.
    pub migrate_on_start: bool,
    /// The URL the migration runner uses; `None`: [`database_url`](Self::database_url).
    /// `Debug` does not show it.
    pub migrate_database_url: Option<String>,
    /// `lock_timeout` of the migrations' statements (default 3 s).
    pub migrate_lock_timeout: Duration,
    /// Whether migrations on start accept a database a newer release
    /// migrated (default false: an applied migration missing from the
    /// binary stops the start, naming it).
    pub migrate_allow_newer_release: bool,
    /// URLs of streaming replicas of `database_url`, each with a pool of
    /// the same settings; empty: every read goes to the primary. `Debug`
    /// does not show them.
    pub replica_urls: Vec<String>,
    /// The lag bound and sampling of the replicas.
    pub replicas: ReplicaConfig,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("database_url", &"<redacted>")
            .field("pool", &self.pool)
            .field("kv", &self.kv)
            .field("one_time_kv", &self.one_time_kv)
            .field("kv_store", &self.kv_store)
            .field("migrate_on_start", &self.migrate_on_start)
            .field("migrate_database_url", &self.migrate_database_url.as_ref().map(|_| "<redacted>"))
            .field("migrate_lock_timeout", &self.migrate_lock_timeout)
            .field("migrate_allow_newer_release", &self.migrate_allow_newer_release)
            .field("replica_urls", &self.replica_urls.iter().map(|_| "<redacted>").collect::<Vec<_>>())
            .field("replicas", &self.replicas)
            .finish()
    }
}

/// The default purge period of the PostgreSQL key-value backend.
pub(crate) const DEFAULT_PURGE_EVERY: Duration = Duration::from_secs(300);

impl Config {
    /// Defaults around `database_url`: the PostgreSQL key-value backend,
    /// migrations on start, a pool of 10.
    pub fn new(database_url: impl Into<String>) -> Self {
        Self {
            database_url: database_url.into(),
            pool: PoolConfig::default(),
            kv: KvBackendConfig::Postgres { purge_every: Some(DEFAULT_PURGE_EVERY) },
            one_time_kv: OneTimeKvConfig::Default,
            kv_store: KvStoreConfig::default(),
            migrate_on_start: true,
            migrate_database_url: None,
            migrate_lock_timeout: dployr_migrate::MigrationRunner::DEFAULT_TABLE_LOCK_TIMEOUT,
            migrate_allow_newer_release: false,
            replica_urls: Vec::new(),
            replicas: ReplicaConfig::default(),
        }
    }

    /// The same, with replica-safe reads going to streaming replicas of the
    /// primary at `urls` (PostgreSQL's own streaming replication), each
    /// with a pool like the primary's.
    ///
    /// ```
    /// use dployr_data::Config;
    ///
    /// let config = Config::new("postgres://db-primary/app").with_replicas(["postgres://db-replica-1/app"]);
    /// assert_eq!(config.replica_urls.len(), 1);
    /// ```
    #[must_use]
    pub fn with_replicas<S: Into<String>>(mut self, urls: impl IntoIterator<Item = S>) -> Self {
        self.replica_urls = urls.into_iter().map(Into::into).collect();
        self
    }

    /// The same, with another lag bound and sampling for the replicas.
    #[must_use]
    pub fn with_replica_config(mut self, replicas: ReplicaConfig) -> Self {
        self.replicas = replicas;
        self
    }

    /// The same, with the migrations on another URL (PostgreSQL directly,
    /// when `database_url` goes through a pooler in transaction mode).
    #[must_use]
    pub fn with_migrate_database_url(mut self, url: impl Into<String>) -> Self {
        self.migrate_database_url = Some(url.into());
        self
    }

    /// The URL the migration runner uses.
    pub fn migration_url(&self) -> &str {
        self.migrate_database_url.as_deref().unwrap_or(&self.database_url)
    }

    /// The same, with another key-value backend.
    #[must_use]
    pub fn with_kv(mut self, kv: KvBackendConfig) -> Self {
        self.kv = kv;
        self
    }

    /// The same, with another backend for one-time records.
    #[must_use]
    pub fn with_one_time_kv(mut self, one_time_kv: OneTimeKvConfig) -> Self {
        self.one_time_kv = one_time_kv;
        self
    }

    /// The same, with another pool configuration.
    #[must_use]
    pub fn with_pool(mut self, pool: PoolConfig) -> Self {
        self.pool = pool;
        self
    }

    /// The same, without migrations on open.
    #[must_use]
    pub fn without_migrations_on_start(mut self) -> Self {
        self.migrate_on_start = false;
        self
    }

    /// The same, but a database that a newer release migrated opens, with
    /// nothing applied and a warning naming the migrations this binary
    /// lacks, where every one of them is newer than its latest and every
    /// one of its own is applied unchanged (a restart of an old process
    /// during a rolling deploy; every process after a rollback of the
    /// code). Anything else missing from the binary still stops the start.
    /// Off by default: the runner refuses any applied migration missing
    /// from the binary, naming it.
    ///
    /// ```
    /// use dployr_data::Config;
    ///
    /// assert!(!Config::new("postgres://localhost/app").migrate_allow_newer_release);
    /// assert!(Config::new("postgres://localhost/app").allowing_a_newer_release().migrate_allow_newer_release);
    /// ```
    #[must_use]
    pub fn allowing_a_newer_release(mut self) -> Self {
        self.migrate_allow_newer_release = true;
        self
    }

    /// Reads the configuration from the process environment (the variables
    /// are the `*_VAR` constants of this module).
    ///
    /// # Errors
    /// [`StoreError::Configuration`] naming the first variable that is
    /// missing or malformed.
    pub fn from_env() -> StoreResult<Self> {
        // A value that is not UTF-8 is malformed, never "unset": it would
        // otherwise be replaced by the default without a word.
        let not_unicode = |name: &'static str| match std::env::var(name) {
            Err(std::env::VarError::NotUnicode(_)) => Err(configuration(name, "is not valid UTF-8")),
            _ => Ok(()),
        };
        for name in ALL_VARS {
            not_unicode(name)?;
        }
        // Cloudflare's, where they are used, before they are read: taken
        // as unset, the required ones would say "is not set", and the base
        // URL would be Cloudflare's own (the API token sent past the proxy
        // meant).
        #[cfg(feature = "cloudflare")]
        if std::env::var(KV_VAR).is_ok_and(|kv| kv.trim().eq_ignore_ascii_case("cloudflare")) {
            CloudflareConfig::refuse_values_not_utf8()?;
        }
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// Reads the configuration through `var` (a variable's value, `None` when
    /// unset): [`from_env`](Self::from_env) without the process environment.
    ///
    /// ```
    /// use dployr_data::Config;
    /// use dployr_domain::StoreError;
    ///
    /// let vars = |name: &str| match name {
    ///     "DATABASE_URL" => Some("postgres://db/app".to_owned()),
    ///     "DPLOYR_KV" => Some("redis".to_owned()),
    ///     _ => None,
    /// };
    /// let error = Config::from_vars(vars).unwrap_err();
    /// assert!(matches!(error, StoreError::Configuration { setting: "DPLOYR_KV", .. }));
    /// ```
    ///
    /// # Errors
    /// As [`from_env`](Self::from_env).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> StoreResult<Self> {
        let var = |name: &str| var(name).map(|value| value.trim().to_owned()).filter(|value| !value.is_empty());
        let database_url = var(DATABASE_URL_VAR).ok_or_else(|| {
            configuration(DATABASE_URL_VAR, "is not set; give the PostgreSQL URL, e.g. postgres://user@host/dployr")
        })?;
        let mut config = Self::new(database_url);

        if let Some(size) = parsed::<u32>(&var, POOL_SIZE_VAR, "a number of connections")? {
            if size == 0 {
                return Err(configuration(POOL_SIZE_VAR, "must be at least 1"));
            }
            if size > MAX_POOL_SIZE {
                return Err(configuration(
                    POOL_SIZE_VAR,
                    format!("must be at most {MAX_POOL_SIZE} (PostgreSQL's most connections)"),
                ));
            }
            config.pool.max_size = size;
        }
        if let Some(ms) = parsed::<u64>(&var, CONNECT_TIMEOUT_VAR, "milliseconds")? {
            within_postgres_limit(CONNECT_TIMEOUT_VAR, ms)?;
            if ms == 0 {
                return Err(configuration(CONNECT_TIMEOUT_VAR, "must be at least 1 ms"));
            }
            config.pool.connection_timeout = Duration::from_millis(ms);
        }
        if let Some(ms) = parsed::<u64>(&var, STATEMENT_TIMEOUT_VAR, "milliseconds")? {
            within_postgres_limit(STATEMENT_TIMEOUT_VAR, ms)?;
            config.pool.statement_timeout = (ms > 0).then(|| Duration::from_millis(ms));
        }
        if let Some(cache) = flag(&var, STATEMENT_CACHE_VAR)? {
            config.pool.prepared_statement_cache = cache;
        }
        read_timeouts(&var, &mut config.pool)?;
        if let Some(urls) = var(REPLICA_URLS_VAR) {
            if !has_url_scheme(&urls) && lists_key_value_strings(&urls) {
                // Once read as a list; libpq would now read it as one
                // replica whose `dbname` swallows the rest, silently.
                return Err(configuration(
                    REPLICA_URLS_VAR,
                    "lists key=value strings separated by commas; give the replicas as postgres:// URLs \
                     (separated by commas or spaces), or one key=value string"
                        .to_owned(),
                ));
            }
            config.replica_urls = replica_urls(&urls);
        }
        if let Some(ms) = parsed::<u64>(&var, REPLICA_MAX_LAG_VAR, "milliseconds")? {
            // 0 would skip every replica whose last sample saw any lag at
            // all: replicas configured but silently never read from.
            if ms == 0 {
                return Err(configuration(REPLICA_MAX_LAG_VAR, "must be at least 1 ms"));
            }
            config.replicas.max_lag = Duration::from_millis(ms);
        }
        if let Some(migrate) = flag(&var, MIGRATE_ON_START_VAR)? {
            config.migrate_on_start = migrate;
        }
        if let Some(allow) = flag(&var, MIGRATE_ALLOW_NEWER_RELEASE_VAR)? {
            config.migrate_allow_newer_release = allow;
        }
        config.migrate_database_url = var(MIGRATE_DATABASE_URL_VAR);
        if let Some(ms) = parsed::<u64>(&var, MIGRATE_LOCK_TIMEOUT_VAR, "milliseconds")? {
            if ms == 0 {
                return Err(configuration(MIGRATE_LOCK_TIMEOUT_VAR, "must be at least 1 ms"));
            }
            within_postgres_limit(MIGRATE_LOCK_TIMEOUT_VAR, ms)?;
            config.migrate_lock_timeout = Duration::from_millis(ms);
        }
        for (name, ttl) in [
            (SESSION_TTL_VAR, &mut config.kv_store.session_ttl),
            (STATE_TTL_VAR, &mut config.kv_store.state_ttl),
            (OTP_TTL_VAR, &mut config.kv_store.otp_ttl),
        ] {
            if let Some(secs) = parsed::<u64>(&var, name, "seconds")? {
                if secs == 0 {
                    return Err(configuration(name, "must be at least 1 second"));
                }
                if name == OTP_TTL_VAR && secs > MAX_OTP_TTL.as_secs() {
                    return Err(configuration(
                        name,
                        "is longer than 600 s (10 minutes), the most OWASP ASVS (2.7.2) lets a one-time code live",
                    ));
                }
                *ttl = Duration::from_secs(secs);
            }
        }

        let purge_every = parsed::<u64>(&var, KV_PURGE_EVERY_VAR, "seconds")?;
        let purge_every_set = purge_every.is_some();
        let purge_every = match purge_every {
            Some(0) => None,
            Some(secs) => Some(Duration::from_secs(secs)),
            None => Some(DEFAULT_PURGE_EVERY),
        };
        // Matched in any case, quoted as given.
        let kv_setting = var(KV_VAR);
        config.kv = match kv_setting.as_deref().map(str::to_ascii_lowercase).as_deref() {
            None | Some("postgres") => KvBackendConfig::Postgres { purge_every },
            Some("memory") => KvBackendConfig::Memory,
            #[cfg(not(feature = "cloudflare"))]
            Some("cloudflare") => {
                return Err(configuration(
                    KV_VAR,
                    "is cloudflare, but dployr-data was built without its `cloudflare` feature",
                ));
            }
            #[cfg(feature = "cloudflare")]
            Some("cloudflare") => {
                let required = |name: &'static str| {
                    var(name).ok_or_else(|| configuration(name, "is not set, and DPLOYR_KV=cloudflare needs it"))
                };
                required(ACCOUNT_ID_VAR)?;
                required(NAMESPACE_ID_VAR)?;
                required(API_TOKEN_VAR)?;
                KvBackendConfig::Cloudflare(CloudflareConfig::from_vars(var)?)
            }
            Some(_) => {
                let given = kv_setting.unwrap_or_default();
                return Err(configuration(KV_VAR, format!("is {given:?}; use memory, postgres or cloudflare")));
            }
        };
        #[cfg(feature = "cloudflare")]
        if var(API_BASE_URL_VAR).is_some() && !config.kv.is_cloudflare() {
            tracing::debug!("{API_BASE_URL_VAR} is set but {KV_VAR} is not cloudflare; it is not used");
        }
        let one_time_setting = var(KV_ONE_TIME_VAR);
        config.one_time_kv = match one_time_setting.as_deref().map(str::to_ascii_lowercase).as_deref() {
            None if purge_every_set && config.kv.is_cloudflare() => OneTimeKvConfig::Postgres { purge_every },
            None => OneTimeKvConfig::Default,
            Some("postgres") => OneTimeKvConfig::Postgres { purge_every },
            Some("memory") => OneTimeKvConfig::Memory,
            Some("cloudflare") if config.kv.is_cloudflare() => OneTimeKvConfig::Cloudflare,
            Some("cloudflare") => {
                return Err(configuration(KV_ONE_TIME_VAR, "is cloudflare, which needs DPLOYR_KV=cloudflare"));
            }
            Some(_) => {
                let given = one_time_setting.unwrap_or_default();
                return Err(configuration(
                    KV_ONE_TIME_VAR,
                    format!("is {given:?}; use postgres, memory or cloudflare (not single use)"),
                ));
            }
        };
        // A period with no PostgreSQL backend to purge would silently be in
        // force nowhere (`0`, off, is what happens anyway).
        let purged = matches!(config.kv, KvBackendConfig::Postgres { .. })
            || matches!(config.one_time_kv, OneTimeKvConfig::Postgres { .. });
        if purge_every_set && purge_every.is_some() && !purged {
            return Err(configuration(
                KV_PURGE_EVERY_VAR,
                "has no effect: neither the sessions nor the one-time records are on PostgreSQL, whose expired rows it \
                 purges; unset it (or set 0)",
            ));
        }
        Ok(config)
    }
}

/// The URL schemes libpq takes (case-sensitive, as libpq compares them).
const URL_SCHEMES: [&str; 2] = ["postgres://", "postgresql://"];

fn has_url_scheme(value: &str) -> bool {
    let value = value.trim_start_matches(|c: char| c == ',' || c.is_whitespace());
    URL_SCHEMES.iter().any(|scheme| value.starts_with(scheme))
}

/// Whether a `key=value` string goes on, after a `,` outside quotes, with
/// another `keyword =`: a list of such strings, as the variable once took
/// (`host=r1 dbname=app,host=r2 dbname=app`). A multi-host value
/// (`host=r1,r2`) has no `=` after its comma's word.
fn lists_key_value_strings(value: &str) -> bool {
    let mut quoted = false;
    let mut chars = value.char_indices().peekable();
    while let Some((at, c)) = chars.next() {
        match c {
            '\\' => {
                chars.next();
            }
            '\'' => quoted = !quoted,
            ',' if !quoted => {
                let rest = value[at + 1..].trim_start();
                let word_len = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len());
                if word_len > 0 && rest[word_len..].trim_start().starts_with('=') {
                    return true;
                }
            }
            _ => {}
        }
    }
    false
}

/// The replicas of a `DPLOYR_DB_REPLICA_URLS` value: URLs, each from a
/// `postgres://` or `postgresql://` at the start or after a separator (`,`
/// and/or whitespace) to the next such one, without the separators around
/// it; or, when the value does not start with a URL, the value as one
/// `key=value` string (`host=r1,r2 dbname=app` is one replica of two hosts).
/// Empty entries are skipped.
///
/// Splitting on every comma cut multi-host URLs apart, and a password with
/// a raw `,` in two, whose first half libpq then echoed as a port where no
/// redaction knew it for a password.
fn replica_urls(value: &str) -> Vec<String> {
    let is_separator = |c: char| c == ',' || c.is_whitespace();
    let value = value.trim_matches(is_separator);
    if value.is_empty() {
        return Vec::new();
    }
    if !has_url_scheme(value) {
        return vec![value.to_owned()];
    }
    let starts_url = |at: usize| URL_SCHEMES.iter().any(|scheme| value[at..].starts_with(scheme));
    let mut urls = Vec::new();
    let mut start = 0;
    for (at, _) in value.char_indices() {
        if at == 0 || !value[..at].ends_with(is_separator) || !starts_url(at) {
            continue;
        }
        let url = value[start..at].trim_end_matches(is_separator);
        if may_end_here(url) {
            urls.push(url.to_owned());
            start = at;
        }
    }
    urls.push(value[start..].to_owned());
    urls
}

/// Whether `url` may be a whole URL rather than the start of one cut at a
/// scheme inside its password (`postgres://app:s3cr3t`, cut from
/// `postgres://app:s3cr3t, postgres://...`): not when it has neither user
/// info nor a path and libpq would read a port that is not a number in it.
/// libpq's error would echo that "port", and the pool redacts only what
/// this URL says is a password. Kept whole, the value is refused all the
/// same, with the password redacted.
fn may_end_here(url: &str) -> bool {
    let Some(after_scheme) = URL_SCHEMES.iter().find_map(|scheme| url.strip_prefix(scheme)) else { return true };
    if after_scheme.contains(['@', '/']) {
        return true;
    }
    let hosts = after_scheme.split('?').next().unwrap_or_default();
    hosts.split(',').all(|host| {
        // `[::1]:5433`, `db:5433` or `db`.
        let after_host = match host.strip_prefix('[') {
            Some(bracketed) => bracketed.split_once(']').map_or("", |(_, after)| after),
            None => host,
        };
        after_host.split_once(':').is_none_or(|(_, port)| port.bytes().all(|byte| byte.is_ascii_digit()))
    })
}

/// Refuses a timeout past PostgreSQL's limit for `statement_timeout`
/// (`INT_MAX` ms, about 24.8 days), which the pool refuses too, naming the
/// variable that set it.
fn within_postgres_limit(name: &'static str, ms: u64) -> StoreResult<()> {
    let most = MAX_TIMEOUT.as_millis();
    if u128::from(ms) > most {
        return Err(configuration(name, format!("must be at most {most} ms (PostgreSQL's limit)")));
    }
    Ok(())
}

/// The call deadline and the TCP settings of the pool (issue 17).
fn read_timeouts(var: &impl Fn(&str) -> Option<String>, pool: &mut PoolConfig) -> StoreResult<()> {
    let millis = |name| {
        let ms = parsed::<u64>(var, name, "milliseconds")?;
        ms.map(|ms| within_postgres_limit(name, ms)).transpose()?;
        Ok::<_, StoreError>(ms.map(Duration::from_millis))
    };
    // Keepalive times: what the kernel takes (`setsockopt` fails past it,
    // and with it every connection).
    let seconds = |name| {
        let secs = parsed::<u64>(var, name, "seconds")?;
        if let Some(secs) = secs.filter(|secs| !(1..=MAX_KEEPALIVE_SECS).contains(secs)) {
            return Err(configuration(
                name,
                format!("is {secs}; must be 1 ..= {MAX_KEEPALIVE_SECS} seconds (the kernel's limit)"),
            ));
        }
        Ok(secs.map(Duration::from_secs))
    };
    if let Some(timeout) = millis(CALL_TIMEOUT_VAR)? {
        pool.deadline.call_timeout = (!timeout.is_zero()).then_some(timeout);
    }
    if let Some(margin) = millis(DEADLINE_MARGIN_VAR)? {
        pool.deadline.margin = margin;
    }
    if let Some(grace) = millis(CANCEL_GRACE_VAR)? {
        pool.deadline.grace = grace;
    }
    if let Some(cancel) = flag(var, CANCEL_ON_DEADLINE_VAR)? {
        pool.deadline.cancel = cancel;
    }
    if let Some(keepalives) = flag(var, KEEPALIVES_VAR)? {
        pool.network.keepalives = keepalives;
    }
    if let Some(idle) = seconds(KEEPALIVES_IDLE_VAR)? {
        pool.network.keepalives_idle = idle;
    }
    if let Some(interval) = seconds(KEEPALIVES_INTERVAL_VAR)? {
        pool.network.keepalives_interval = interval;
    }
    if let Some(count) = parsed::<u32>(var, KEEPALIVES_COUNT_VAR, "a number of probes")? {
        if !(1..=MAX_KEEPALIVES_COUNT).contains(&count) {
            return Err(configuration(
                KEEPALIVES_COUNT_VAR,
                format!("is {count}; must be 1 ..= {MAX_KEEPALIVES_COUNT} (the kernel's limit)"),
            ));
        }
        pool.network.keepalives_count = count;
    }
    // Without keepalives no probe is sent: a probe's timing asked for with
    // them off would silently not be in force.
    if !pool.network.keepalives {
        for name in [KEEPALIVES_IDLE_VAR, KEEPALIVES_INTERVAL_VAR, KEEPALIVES_COUNT_VAR] {
            if var(name).is_some() {
                return Err(configuration(
                    name,
                    format!(
                        "has no effect with {KEEPALIVES_VAR}=false (no probe is sent): unset it or turn keepalives on"
                    ),
                ));
            }
        }
    }
    match millis(TCP_USER_TIMEOUT_VAR)? {
        // libpq sets `tcp_user_timeout` only on connections with keepalives
        // on: asked for with them off, it would silently not be in force.
        Some(timeout) if !timeout.is_zero() && !pool.network.keepalives => {
            return Err(configuration(
                TCP_USER_TIMEOUT_VAR,
                format!(
                    "has no effect with {KEEPALIVES_VAR}=false (libpq sets it only with keepalives on): \
                     set it to 0 or turn keepalives on"
                ),
            ));
        }
        Some(timeout) => pool.network.tcp_user_timeout = (!timeout.is_zero()).then_some(timeout),
        // Not in force without keepalives: the configuration says so.
        None if !pool.network.keepalives => pool.network.tcp_user_timeout = None,
        None => {}
    }
    Ok(())
}

fn configuration(setting: &'static str, reason: impl Into<std::borrow::Cow<'static, str>>) -> StoreError {
    StoreError::Configuration { setting, reason: reason.into() }
}

fn parsed<T: FromStr>(var: &impl Fn(&str) -> Option<String>, name: &'static str, unit: &str) -> StoreResult<Option<T>> {
    var(name)
        .map(|text| text.parse::<T>().map_err(|_| configuration(name, format!("is {text:?}, not {unit}"))))
        .transpose()
}

fn flag(var: &impl Fn(&str) -> Option<String>, name: &'static str) -> StoreResult<Option<bool>> {
    var(name)
        .map(|text| match text.to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Ok(true),
            "0" | "false" | "no" | "off" => Ok(false),
            _ => Err(configuration(name, format!("is {text:?}; use true or false"))),
        })
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The replicas `Config::from_vars` reads from `value` of
    /// `DPLOYR_DB_REPLICA_URLS`.
    fn replicas_of(value: &str) -> Vec<String> {
        let value = value.to_owned();
        let vars = move |name: &str| match name {
            DATABASE_URL_VAR => Some("postgres://db/app".to_owned()),
            REPLICA_URLS_VAR => Some(value.clone()),
            _ => None,
        };
        Config::from_vars(vars).unwrap().replica_urls
    }

    /// A backend name is matched in any case, but an unknown one is quoted
    /// as the operator wrote it (it was quoted lower-cased: "postgresql"
    /// for `Postgresql`, a value found nowhere in their settings).
    #[test]
    fn an_unknown_key_value_backend_is_quoted_as_given() {
        for (variable, given) in [(KV_VAR, " Postgresql "), (KV_ONE_TIME_VAR, "Redis")] {
            let vars = |name: &str| match name {
                DATABASE_URL_VAR => Some("postgres://db/app".to_owned()),
                _ if name == variable => Some(given.to_owned()),
                _ => None,
            };
            match Config::from_vars(vars) {
                Err(StoreError::Configuration { setting, reason }) => {
                    assert_eq!(setting, variable);
                    assert!(reason.contains(&format!("is {:?};", given.trim())), "{reason}");
                }
                other => panic!("{variable}={given:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_multi_host_replica_url_is_one_replica() {
        let url = "postgres://r1,r2:5433/app?target_session_attrs=standby";
        assert_eq!(replicas_of(url), [url]);
        assert_eq!(
            replicas_of(&format!("{url},postgresql://app@[::1]:5432,r3/app")),
            [url, "postgresql://app@[::1]:5432,r3/app"]
        );
    }

    #[test]
    fn a_list_of_key_value_strings_is_refused_naming_the_variable() {
        let vars = |name: &str| match name {
            DATABASE_URL_VAR => Some("postgres://db/app".to_owned()),
            REPLICA_URLS_VAR => Some("host=r1 dbname=app,host=r2 dbname=app".to_owned()),
            _ => None,
        };
        let error = Config::from_vars(vars).unwrap_err();
        assert!(error.to_string().contains(REPLICA_URLS_VAR), "{error}");
        assert_eq!(replicas_of("host=r1,r2 dbname=app password='a,b=c'"), ["host=r1,r2 dbname=app password='a,b=c'"]);
    }

    #[test]
    fn a_key_value_replica_is_one_replica() {
        assert_eq!(replicas_of("host=r1,r2 dbname=app"), ["host=r1,r2 dbname=app"]);
        assert_eq!(replicas_of(" host=r1 port=5432,5433 dbname=app ,"), ["host=r1 port=5432,5433 dbname=app"]);
    }

    #[test]
    fn a_comma_in_a_url_password_stays_in_its_url() {
        assert_eq!(
            replicas_of("postgres://app:se,cret@r1/app,postgres://app:a,b,c@r2/app"),
            ["postgres://app:se,cret@r1/app", "postgres://app:a,b,c@r2/app"]
        );
    }

    #[test]
    fn a_scheme_after_a_separator_in_a_password_does_not_cut_it() {
        // libpq reads no password here (its user info ends before a `/`),
        // but `postgres://app:s3cr3t` alone would make it echo `s3cr3t` as
        // a port that is not a number, where no redaction knows it.
        let value = "postgres://app:s3cr3t, postgres://x@r2/app";
        assert_eq!(replicas_of(value), [value]);
        assert_eq!(replicas_of("postgres://app:s3?x postgres://r2/app"), ["postgres://app:s3?x postgres://r2/app"]);
        assert_eq!(
            replicas_of("postgres://r1:5432,[::1]:5433, postgres://r2?sslmode=require,postgres://r3"),
            ["postgres://r1:5432,[::1]:5433", "postgres://r2?sslmode=require", "postgres://r3"]
        );
    }

    #[test]
    fn urls_are_separated_by_commas_or_whitespace_and_empty_entries_are_skipped() {
        let expected = ["postgres://r1/app", "postgresql://r2/app", "postgres://r3/app"];
        for value in [
            "postgres://r1/app,postgresql://r2/app,postgres://r3/app",
            " postgres://r1/app , postgresql://r2/app ,, postgres://r3/app ,",
            ",postgres://r1/app postgresql://r2/app\n\tpostgres://r3/app",
        ] {
            assert_eq!(replicas_of(value), expected, "{value:?}");
        }
        assert!(replicas_of(" , ,").is_empty());
    }
}
