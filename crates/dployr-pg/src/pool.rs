//! The connection pool every PostgreSQL store (and the PostgreSQL key-value
//! backend) shares: r2d2 over diesel's `PgConnection`, with a statement
//! timeout set once per new connection and a statement counter, so tests can
//! assert how many statements an operation sends.
//!
//! Connection-time failures come from libpq, not from a statement, so they
//! are classified here rather than in `errors`: when the pool opens, a
//! malformed URL, refused credentials or a missing database are
//! `Configuration` at once (retrying would not help), and only a refused,
//! unreachable or silent server is `Unavailable`. After that, a checkout
//! that gets no connection is `Unavailable` whatever the cause: the URL
//! worked, and what reads as permanent may pass (a name that does not
//! resolve while a container restarts, an LDAP outage). libpq's text is redacted before it goes anywhere (it may
//! echo the URL, password included), and no error keeps libpq's or r2d2's
//! error as its source.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use diesel::PgConnection;
use diesel::RunQueryDsl as _;
use diesel::connection::{CacheSize, Connection as _, Instrumentation, InstrumentationEvent, SimpleConnection as _};
use diesel::r2d2::{CustomizeConnection, Pool, PooledConnection};
use dployr_domain::{ConnectFailure, ConnectFailureKind, StoreError};

use crate::affinity::Affinity;
use crate::conninfo::{NetworkConfig, with_network_parameters};
use crate::deadline::{ConnInfo, DeadlineConfig, DeadlineStats, Deadlines, PgConnectionManager};
use crate::errors::{Failure, Keys};
use crate::identity::ServerIdentity;
use crate::metrics::{ErrorHandler, EventHandler, PoolEvents, PoolStats};
use crate::operation::Operation;
use crate::replicas::ReplicaSet;

/// A connection checked out of a [`PgPool`]; it goes back when dropped.
pub type PgPooledConnection = PooledConnection<PgConnectionManager>;

/// How the pool is sized and how long it waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolConfig {
    /// Most connections open at once (r2d2 `max_size`). Default 10.
    pub max_size: u32,
    /// How long a checkout (and the first connect) waits before failing with
    /// [`StoreError::Unavailable`]. Default 5 s.
    pub connection_timeout: Duration,
    /// PostgreSQL's `statement_timeout` for every connection; `None` leaves
    /// the server's setting. Default 30 s.
    pub statement_timeout: Option<Duration>,
    /// What the pool keeps of the last statements sent, for
    /// [`PgPool::recent_statements`]. Default [`RecordStatements::Off`].
    pub record_statements: RecordStatements,
    /// Keep diesel's cache of prepared statements (default on). Turn it off
    /// behind PgBouncer in transaction mode, where a prepared statement
    /// may not exist on the server connection the next transaction gets.
    pub prepared_statement_cache: bool,
    /// TCP keepalives, `tcp_user_timeout` and libpq's `connect_timeout`,
    /// added to the URL unless it sets them.
    pub network: NetworkConfig,
    /// The client's own deadline of every store call.
    pub deadline: DeadlineConfig,
}

/// The most connections a pool may have: PostgreSQL's own ceiling on
/// `max_connections` (`MAX_BACKENDS`, 2^18 − 1). The pool keeps a slot per
/// connection up front, so a size no server can fill would only cost memory
/// (four billion slots for `u32::MAX`, more than a machine has).
pub const MAX_POOL_SIZE: u32 = 262_143;

/// The longest wait or timeout a pool takes: PostgreSQL's own limit for
/// `statement_timeout` (`INT_MAX` milliseconds, about 24.8 days), which is
/// also libpq's for `tcp_user_timeout`. Longer ones would be refused by the
/// server or libpq at every connection, or overflow the clock arithmetic of
/// a checkout, a call deadline or a replica's wait.
pub const MAX_TIMEOUT: Duration = Duration::from_millis(i32::MAX as u64);

/// Refuses, naming `field`, a timeout or wait outside `least ..=`
/// [`MAX_TIMEOUT`]: the one range check of the pool's, the network's and
/// the replicas' settings.
pub(crate) fn within_limit(field: &'static str, value: Duration, least: Duration) -> Result<(), StoreError> {
    if value < least || value > MAX_TIMEOUT {
        return Err(StoreError::invalid(
            field,
            format!("{value:?} is outside {least:?} ..= {MAX_TIMEOUT:?} (PostgreSQL's limit)"),
        ));
    }
    Ok(())
}

impl PoolConfig {
    /// Refuses, by name, what r2d2 would panic on, what PostgreSQL would
    /// read otherwise than meant (a `statement_timeout` under 1 ms is sent
    /// as 0, which the server takes for "no timeout") and what the call
    /// deadline's arithmetic cannot hold.
    fn check(&self) -> Result<(), StoreError> {
        const ONE_MS: Duration = Duration::from_millis(1);
        if self.max_size == 0 {
            return Err(StoreError::invalid("pool max_size", "must be at least 1"));
        }
        if self.max_size > MAX_POOL_SIZE {
            return Err(StoreError::invalid(
                "pool max_size",
                format!("{} is more connections than any PostgreSQL server serves ({MAX_POOL_SIZE})", self.max_size),
            ));
        }
        within_limit("pool connection_timeout", self.connection_timeout, ONE_MS)?;
        if let Some(timeout) = self.statement_timeout {
            within_limit("pool statement_timeout", timeout, ONE_MS)?;
        }
        if let Some(timeout) = self.deadline.call_timeout {
            within_limit("deadline call_timeout", timeout, ONE_MS)?;
        }
        within_limit("deadline margin", self.deadline.margin, Duration::ZERO)?;
        within_limit("deadline grace", self.deadline.grace, Duration::ZERO)?;
        self.network.check()
    }
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            max_size: 10,
            connection_timeout: Duration::from_secs(5),
            statement_timeout: Some(Duration::from_secs(30)),
            record_statements: RecordStatements::Off,
            prepared_statement_cache: true,
            network: NetworkConfig::default(),
            deadline: DeadlineConfig::default(),
        }
    }
}

/// What a pool keeps of the last statements it sent, for
/// [`PgPool::recent_statements`]: for tests, debugging and benchmarks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RecordStatements {
    /// Nothing (the default): recording formats every statement.
    #[default]
    Off,
    /// The SQL text, never the bound values.
    Sql,
    /// The SQL text and the bound values (diesel's `-- binds: [...]`
    /// suffix), for benchmarks that replay the exact statements. Values may
    /// be personal data: never in production.
    SqlWithBinds,
}

/// Statements and transactions sent through a pool since it was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatementStats {
    /// Statements sent, not counting `BEGIN`, `COMMIT`, `ROLLBACK` and savepoints.
    pub statements: u64,
    /// Outermost transactions begun.
    pub transactions: u64,
}

impl std::ops::Sub for StatementStats {
    type Output = Self;

    fn sub(self, before: Self) -> Self {
        // Saturating: a reading taken while other threads begin or end
        // transactions may count one of their control statements a moment
        // before the statement itself, so two readings need not be ordered.
        Self {
            statements: self.statements.saturating_sub(before.statements),
            transactions: self.transactions.saturating_sub(before.transactions),
        }
    }
}

#[derive(Debug, Default)]
struct Counters {
    /// Every query diesel starts, transaction control included.
    queries: AtomicU64,
    /// Transaction control statements (BEGIN, COMMIT, ROLLBACK, SAVEPOINT ...).
    control: AtomicU64,
    transactions: AtomicU64,
    /// The SQL of recent statements, when recording is on.
    recent: Option<Mutex<VecDeque<String>>>,
    /// Whether `recent` keeps bound values.
    record_binds: bool,
}

/// How many statements [`PgPool::recent_statements`] keeps.
const RECENT_STATEMENTS: usize = 256;

/// The diesel instrumentation installed on each pooled connection; it also
/// carries what the deadlines know of the connection.
struct CountingInstrumentation(Arc<Counters>, Arc<ConnInfo>);

/// What the pool learnt about `conn` when it was made; `None` for a
/// connection the pool did not set up.
pub(crate) fn conn_info(conn: &mut PgConnection) -> Option<Arc<ConnInfo>> {
    conn.instrumentation()
        .downcast_ref::<CountingInstrumentation>()
        .map(|instrumentation| Arc::clone(&instrumentation.1))
}

impl Instrumentation for CountingInstrumentation {
    fn on_connection_event(&mut self, event: InstrumentationEvent<'_>) {
        // diesel reports BEGIN/COMMIT/ROLLBACK both as a transaction event and
        // as a StartQuery; count the former so they can be subtracted.
        match event {
            InstrumentationEvent::StartQuery { query, .. } => {
                self.0.queries.fetch_add(1, Ordering::Relaxed);
                crate::trace::count_query();
                if let Some(recent) = &self.0.recent {
                    // diesel's text is the SQL, then `-- binds: [...]`; keep the SQL only.
                    let text = query.to_string();
                    let sql = if self.0.record_binds {
                        text
                    } else {
                        text.split(" -- binds: ").next().unwrap_or_default().to_owned()
                    };
                    let mut recent = recent.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    if recent.len() == RECENT_STATEMENTS {
                        recent.pop_front();
                    }
                    recent.push_back(sql);
                }
            }
            InstrumentationEvent::BeginTransaction { depth, .. } => {
                self.0.control.fetch_add(1, Ordering::Relaxed);
                crate::trace::count_control();
                if depth.get() == 1 {
                    self.0.transactions.fetch_add(1, Ordering::Relaxed);
                }
            }
            InstrumentationEvent::CommitTransaction { .. } | InstrumentationEvent::RollbackTransaction { .. } => {
                self.0.control.fetch_add(1, Ordering::Relaxed);
                crate::trace::count_control();
            }
            _ => {}
        }
    }
}

#[derive(Debug)]
struct Customizer {
    statement_timeout: Option<Duration>,
    prepared_statement_cache: bool,
    counters: Arc<Counters>,
}

impl CustomizeConnection<PgConnection, diesel::r2d2::Error> for Customizer {
    fn on_acquire(&self, conn: &mut PgConnection) -> Result<(), diesel::r2d2::Error> {
        // One round trip: the statement timeout, untranslated messages
        // where the role may ask for them, so errors diesel leaves `Unknown`
        // can be classified (see `errors`; a role that may not keeps the
        // server's setting), and READ COMMITTED for the statements sent
        // outside a transaction (a transaction names it in its BEGIN): one
        // that waited on a row lock then reads the holder's commit instead
        // of failing to serialize, whatever default the database sets. And
        // durable commits where the database or role turned them off
        // (`synchronous_commit = off`, a common tuning): a write answered
        // `Ok` must survive a crash of the server, or a token marked used
        // once is marked used again after it, and a sign-out or a removal
        // from a cluster is undone. Any other level (`local`, `remote_write`,
        // `remote_apply`) is the operator's and is kept.
        //
        // With a statement timeout of the pool's, the batch first sets none:
        // PostgreSQL's timer, started for the batch under the role's or the
        // database's value, runs on through the batch's statements until a
        // zero stops it, so a short one there (`1ms`) cancelled this setup
        // and no connection ever opened; the pool's own comes last.
        let mut setup = String::new();
        if self.statement_timeout.is_some() {
            setup.push_str("SET statement_timeout = 0; ");
        }
        setup.push_str(REFUSE_REPLICA_SESSIONS);
        setup.push_str(
            " DO $$ BEGIN SET lc_messages = 'C'; EXCEPTION WHEN insufficient_privilege THEN NULL; END $$; \
             SET default_transaction_isolation = 'read committed'; \
             DO $$ BEGIN IF current_setting('synchronous_commit') = 'off' THEN SET synchronous_commit = 'on'; \
             END IF; END $$;",
        );
        if let Some(timeout) = self.statement_timeout {
            setup.push_str(&format!(" SET statement_timeout = {};", timeout.as_millis()));
        }
        conn.batch_execute(&setup).map_err(diesel::r2d2::Error::QueryError)?;
        if !self.prepared_statement_cache {
            conn.set_prepared_statement_cache_size(CacheSize::Disabled);
        }
        // Installed after the SET, so only the stores' own statements count.
        conn.set_instrumentation(CountingInstrumentation(
            Arc::clone(&self.counters),
            crate::deadline::take_identified(),
        ));
        Ok(())
    }
}

/// How many times [`PgPool::behind_transaction_pooler`] makes its setting
/// and looks for it from another connection before it answers `false`: on
/// PostgreSQL directly, 3 round trips of each connection at start; behind
/// a transaction pooler, a miss each time is far rarer than one miss.
pub(crate) const POOLER_PROBES: usize = 3;

/// A pool of PostgreSQL connections. Cheap to clone; clones share the pool.
///
/// ```no_run
/// use dployr_pg::{PgPool, PoolConfig};
///
/// let pool = PgPool::connect("postgres://localhost/dployr-local", PoolConfig::default())?;
/// let conn = pool.get()?;
/// # Ok::<(), dployr_domain::StoreError>(())
/// ```
#[derive(Clone)]
pub struct PgPool {
    pub(crate) inner: Pool<PgConnectionManager>,
    counters: Arc<Counters>,
    connection_timeout: Duration,
    deadlines: Arc<Deadlines>,
    /// The URL (with the network parameters), kept to redact what libpq
    /// echoes of it in later checkout errors and for the pooler probe;
    /// never printed.
    pub(crate) database_url: Arc<str>,
    /// The setting the URL came from, which connection errors name
    /// ([`PgPool::connect_as`]).
    setting: &'static str,
    /// r2d2's events, counted (see `metrics`).
    events: Arc<PoolEvents>,
    /// The connections parked by the threads that used them last (see `affinity`).
    pub(crate) affinity: Arc<Affinity>,
    /// Where replica-safe reads may go (see `replicas`).
    pub(crate) replicas: Option<Arc<ReplicaSet>>,
}

/// The setting a connection error of [`PgPool::connect`] names; the data
/// layer renames it after the variable the URL came from.
pub const DATABASE_URL_SETTING: &str = "database_url";

/// An error text that was redacted before it was kept: the `source()` of
/// pool errors, in place of libpq's or r2d2's error (whose text may hold the
/// password).
#[derive(Debug)]
pub(crate) struct Redacted(pub(crate) String);

impl fmt::Display for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Redacted {}

/// What [`probe_connection`] reads of the database's sessions.
struct ProbedSettings {
    /// `server_encoding`.
    encoding: String,
    /// `session_replication_role`, as the database or role sets it.
    replication_role: String,
}

/// Why the pool refuses sessions that run with `session_replication_role =
/// replica` (see [`REFUSE_REPLICA_SESSIONS`]).
const REPLICA_SESSIONS: &str = "sessions run with session_replication_role = replica (set on the database or \
    the role): triggers and foreign-key actions are off, so the rules the schema enforces (one owner per \
    cluster, memberships and tokens deleted with their user or instance, listing totals, update times) would \
    not hold; ALTER DATABASE ... RESET session_replication_role (or ALTER ROLE ... RESET)";

/// Refuses, in a connection's setup, a session that runs as a replica's
/// (triggers and foreign-key actions off): the check at open covers the
/// database as it was then; this covers a setting made afterwards, for
/// each connection the pool opens. `local` fires ordinary triggers and
/// passes.
const REFUSE_REPLICA_SESSIONS: &str = "DO $$ BEGIN IF current_setting('session_replication_role') = 'replica' \
    THEN RAISE EXCEPTION 'dployr: this session runs with session_replication_role = replica: triggers and \
    foreign-key actions are off; the data layer refuses it (RESET session_replication_role on the database \
    or role)'; END IF; END $$;";

/// Makes one connection to `database_url` on a thread of its own and waits
/// at most `timeout` for it: libpq itself has no default connect timeout,
/// and a host that drops packets would hold the caller for minutes.
///
/// # Errors
/// The classified, redacted failure.
fn probe_connection(database_url: &str, timeout: Duration) -> Result<Option<ProbedSettings>, ConnectFailure> {
    let (sender, receiver) = mpsc::channel();
    let url = database_url.to_owned();
    let spawned = std::thread::Builder::new().name("dployr-pg-connect".into()).spawn(move || {
        let result = PgConnection::establish(&url).map(|mut conn| {
            // The settings the pool refuses, on the probe's own connection
            // (not counted as a store statement). `None` if the query
            // fails: the pool's own connections then say what is wrong.
            diesel::select(diesel::dsl::sql::<(diesel::sql_types::Text, diesel::sql_types::Text)>(
                "current_setting('server_encoding'), current_setting('session_replication_role')",
            ))
            .get_result::<(String, String)>(&mut conn)
            .ok()
            .map(|(encoding, replication_role)| ProbedSettings { encoding, replication_role })
        });
        let _receiver_gone = sender.send(result);
    });
    if let Err(error) = spawned {
        return Err(ConnectFailure::new(
            ConnectFailureKind::Other,
            format!("cannot start a thread to connect: {error}"),
        ));
    }
    match receiver.recv_timeout(timeout) {
        Ok(Ok(encoding)) => Ok(encoding),
        Ok(Err(error)) => Err(classify(&error, database_url)),
        Err(_) => Err(ConnectFailure::new(
            ConnectFailureKind::TimedOut,
            format!("no answer within {timeout:?} (a host that drops packets, or a firewall)"),
        )),
    }
}

/// The classified, redacted form of a diesel connection error.
pub(crate) fn classify(error: &diesel::ConnectionError, database_url: &str) -> ConnectFailure {
    match error {
        diesel::ConnectionError::InvalidCString(_) => {
            ConnectFailure::new(ConnectFailureKind::MalformedUrl, "the URL holds a NUL byte")
        }
        other => ConnectFailure::classify(&other.to_string(), database_url),
    }
}

impl fmt::Debug for PgPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URL may hold a password: not printed. Idle counts the
        // connections kept for their threads, as `state` does.
        let (connections, idle) = self.state();
        f.debug_struct("PgPool").field("connections", &connections).field("idle", &idle).finish_non_exhaustive()
    }
}

impl PgPool {
    /// Opens a pool on `database_url` and checks that one connection can be
    /// made within `config.connection_timeout`.
    ///
    /// # Errors
    /// [`StoreError::Invalid`] naming the field, before any connection is
    /// tried, for a zero pool size, a timeout outside what PostgreSQL and
    /// the clock take, or a [`NetworkConfig`](crate::NetworkConfig) setting
    /// the kernel or libpq would refuse at every connection;
    /// [`StoreError::Configuration`] naming [`DATABASE_URL_SETTING`] at once
    /// for a malformed URL, refused credentials or a missing database or
    /// role; [`StoreError::Unavailable`] when the server refused the
    /// connection, could not be reached or did not answer in time (the
    /// message says which). Messages carry libpq's reason, redacted: never
    /// the password.
    pub fn connect(database_url: &str, config: PoolConfig) -> Result<Self, StoreError> {
        Self::connect_as(database_url, DATABASE_URL_SETTING, config)
    }

    /// [`connect`](Self::connect), with connection errors naming `setting`
    /// (the variable the URL came from, e.g. `DATABASE_URL`).
    ///
    /// # Errors
    /// As [`connect`](Self::connect).
    pub fn connect_as(database_url: &str, setting: &'static str, config: PoolConfig) -> Result<Self, StoreError> {
        let pool = Self::open(database_url, setting, config, "primary", Probe::Required)?;
        // One checkout proves the URL works and fails fast, with the reason, when it does not.
        drop(pool.get()?);
        Ok(pool)
    }

    /// A replica's pool: as [`connect_as`](Self::connect_as), except that a
    /// server that does not answer now is no error (the replica set keeps
    /// it out of rotation until it does).
    pub(crate) fn open_replica(
        database_url: &str,
        setting: &'static str,
        config: PoolConfig,
        name: &str,
    ) -> Result<Self, StoreError> {
        Self::open(database_url, setting, config, name, Probe::ConfigurationOnly)
    }

    fn open(
        database_url: &str,
        setting: &'static str,
        config: PoolConfig,
        name: &str,
        probe: Probe,
    ) -> Result<Self, StoreError> {
        config.check()?;
        let url = with_network_parameters(database_url, &config.network, config.connection_timeout);
        // One direct attempt first: r2d2 would retry a wrong password until
        // the timeout and then report a timeout.
        match probe_connection(&url, config.connection_timeout).map_err(|failure| failure.into_store_error(setting)) {
            // Text the stores accept (names, e-mails, metadata) is Unicode:
            // a database in another encoding refuses or mangles what it
            // cannot hold, which would surface as the caller's bad input
            // on some writes only. Refused once, here, naming the setting.
            Ok(Some(ProbedSettings { encoding, .. })) if encoding != "UTF8" => {
                return Err(StoreError::Configuration {
                    setting,
                    reason: format!(
                        "the database's encoding is {encoding}; the data layer needs UTF8 \
                         (CREATE DATABASE ... ENCODING 'UTF8' TEMPLATE template0)"
                    )
                    .into(),
                });
            }
            // Triggers and foreign-key actions off: open would succeed and
            // every later write break the schema's rules silently.
            Ok(Some(ProbedSettings { replication_role, .. })) if replication_role == "replica" => {
                return Err(StoreError::Configuration { setting, reason: REPLICA_SESSIONS.into() });
            }
            Ok(_) => {}
            Err(StoreError::Unavailable { reason, .. }) if probe == Probe::ConfigurationOnly => {
                tracing::warn!(pool = name, %reason, "dployr.replica does not answer; out of rotation until it does");
            }
            Err(error) => return Err(error),
        }
        let counters = Arc::new(Counters {
            recent: (config.record_statements != RecordStatements::Off).then(|| Mutex::new(VecDeque::new())),
            record_binds: config.record_statements == RecordStatements::SqlWithBinds,
            ..Counters::default()
        });
        let customizer = Customizer {
            statement_timeout: config.statement_timeout,
            prepared_statement_cache: config.prepared_statement_cache,
            counters: Arc::clone(&counters),
        };
        let deadline_counters = Arc::default();
        let events = PoolEvents::new(name, config.max_size);
        let inner = Pool::builder()
            .max_size(config.max_size)
            .min_idle(Some(0))
            .connection_timeout(config.connection_timeout)
            // r2d2 would send `SELECT 1` before handing out each connection:
            // a second round trip for every one-statement read. A connection
            // that died is instead noticed when it fails (Unavailable, so the
            // caller retries) and then discarded by diesel's broken check.
            .test_on_check_out(false)
            .connection_customizer(Box::new(customizer))
            // r2d2's default handler logs each failed connect through `log`,
            // with libpq's unredacted text; the checkout error reports it.
            .error_handler(Box::new(ErrorHandler(Arc::clone(&events))))
            .event_handler(Box::new(EventHandler(Arc::clone(&events))))
            .build_unchecked(PgConnectionManager::new(&url, Arc::clone(&deadline_counters)));
        let deadlines = Deadlines::new(
            config.deadline,
            config.statement_timeout,
            config.connection_timeout,
            &url,
            deadline_counters,
        );
        let pool = Self {
            inner,
            counters,
            connection_timeout: config.connection_timeout,
            deadlines: Arc::new(deadlines),
            database_url: url.into(),
            setting,
            affinity: Affinity::new(config.max_size, Arc::clone(&events)),
            events,
            replicas: None,
        };
        Ok(pool)
    }

    /// Checks a connection out. The connection is the caller's until it is
    /// dropped, with no client deadline: store code runs through an
    /// [`operation`](Self::operation) instead.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when none is free or can be made within
    /// the connection timeout.
    pub fn get(&self) -> Result<PgPooledConnection, StoreError> {
        self.affinity.check_out(&self.inner, self.connection_timeout).map(|(conn, _)| conn).map_err(|e| {
            self.deadlines.checkout_failed(&e.to_string(), self.affinity.last_connect_error(), self.connection_timeout)
        })
    }

    /// Whether the URL goes through a connection pooler in transaction mode
    /// (PgBouncer `pool_mode = transaction`), where session state does not
    /// stay with a client: a setting made outside a transaction on a pooled
    /// connection is looked for from a second, new connection. Directly on
    /// PostgreSQL a session's settings are its own, so this is never true
    /// there; through a transaction pooler the new client is usually handed
    /// the server connection the first one just used (PgBouncer reuses them
    /// last in, first out), but not always (another client of the pooler,
    /// the pool's own connections opening, took it in between): the setting
    /// is made and looked for up to 3 times (`POOLER_PROBES`), each time
    /// anew, so a miss there is the chance of that many misses in a row.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] if either connection fails.
    pub fn behind_transaction_pooler(&self) -> Result<bool, StoreError> {
        let probe_error =
            |error: diesel::result::Error| StoreError::unavailable("probing for a connection pooler", error);
        let mut conn = self.get()?;
        let mut other = PgConnection::establish(&self.database_url)
            .map_err(|error| classify(&error, &self.database_url).into_store_error(self.setting))?;
        other.set_prepared_statement_cache_size(CacheSize::Disabled);
        for _ in 0..POOLER_PROBES {
            let token = format!("{:016x}", rand::random::<u64>());
            conn.batch_execute(&format!("SET dployr.pooler_probe = '{token}'")).map_err(probe_error)?;
            let seen: Option<String> = diesel::select(diesel::dsl::sql::<
                diesel::sql_types::Nullable<diesel::sql_types::Text>,
            >("current_setting('dployr.pooler_probe', true)"))
            .get_result(&mut other)
            .map_err(probe_error)?;
            // Whoever gets that server connection next should not see it.
            let _best_effort = conn.batch_execute("RESET dployr.pooler_probe");
            if seen.as_deref() == Some(token.as_str()) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Which server and database this pool's connections reach
    /// ([`ServerIdentity`]): one or two statements on a connection of the
    /// pool, no transaction.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when no connection can be had or the
    /// statements fail.
    pub fn server_identity(&self) -> Result<ServerIdentity, StoreError> {
        let mut conn = self.get()?;
        ServerIdentity::of(&mut conn).map_err(|error| StoreError::unavailable("reading the server's identity", error))
    }

    /// Statements and transactions sent through this pool so far.
    pub fn stats(&self) -> StatementStats {
        let queries = self.counters.queries.load(Ordering::Relaxed);
        let control = self.counters.control.load(Ordering::Relaxed);
        StatementStats {
            statements: queries.saturating_sub(control),
            transactions: self.counters.transactions.load(Ordering::Relaxed),
        }
    }

    /// The SQL text (with bound values only under
    /// [`RecordStatements::SqlWithBinds`]) of up to the last 256 statements,
    /// oldest first; empty unless [`PoolConfig::record_statements`] says to keep them.
    pub fn recent_statements(&self) -> Vec<String> {
        self.counters.recent.as_ref().map_or_else(Vec::new, |recent| {
            recent.lock().unwrap_or_else(std::sync::PoisonError::into_inner).iter().cloned().collect()
        })
    }

    /// Opens the store operation `name` (e.g. `"kv.get"`): the one way
    /// store code reaches the database. See [`Operation`].
    pub fn operation(&self, name: &'static str) -> Operation<'_> {
        Operation::new(self, name)
    }

    /// Opens the store read `read`, named for it, whose `run` goes where the
    /// read may go (`routes`): a replica when there are replicas and the read
    /// is replica-safe, else this pool.
    pub(crate) fn read(&self, read: crate::Read) -> Operation<'_> {
        Operation::read(self, read)
    }

    /// Runs `work` on a pooled connection of this pool within the call
    /// deadline, once; errors mapped by [`store_error`](crate::store_error).
    pub(crate) fn bounded<T>(
        &self,
        work: impl FnOnce(&mut PgConnection) -> Result<T, diesel::result::Error>,
    ) -> Result<T, StoreError> {
        self.bounded_since(Instant::now(), work)
    }

    /// [`bounded`](Self::bounded) for a call that `started` then: within
    /// what is left of its deadline.
    pub(crate) fn bounded_since<T>(
        &self,
        started: Instant,
        work: impl FnOnce(&mut PgConnection) -> Result<T, diesel::result::Error>,
    ) -> Result<T, StoreError> {
        self.deadlines
            .bounded(&self.inner, &self.affinity, started, |conn| work(conn).map_err(crate::store_error))
            .map_err(|error| self.named(error))
    }

    /// `error` with a setting the mapper named as [`DATABASE_URL_SETTING`]
    /// (a privilege the role lacks, a schema without what the stores use)
    /// renamed to the setting this pool's URL came from (`DATABASE_URL` in
    /// a `DataLayer`).
    fn named(&self, error: StoreError) -> StoreError {
        match error {
            StoreError::Configuration { setting: DATABASE_URL_SETTING, reason } => {
                StoreError::Configuration { setting: self.setting, reason }
            }
            other => other,
        }
    }

    /// Whether the deadline of a call that `started` then has passed on
    /// this pool: one more run would be refused before it ran.
    pub(crate) fn deadline_passed(&self, started: Instant) -> bool {
        self.deadlines.passed(started)
    }

    /// Runs one statement on this pool (not routed), again after a passing
    /// failure, within what is left of the deadline of a call that `started`
    /// then: what [`Operation::run`] does on the primary, and on a replica.
    pub(crate) fn run_statement_since<T, E: Into<Failure>>(
        &self,
        started: Instant,
        keys: Keys<'_>,
        mut work: impl FnMut(&mut PgConnection) -> Result<T, E>,
    ) -> Result<T, StoreError> {
        self.deadlines
            .bounded(&self.inner, &self.affinity, started, |conn| {
                crate::operation::retrying(keys, || work(conn).map_err(Into::into))
            })
            .map_err(|error| self.named(error))
    }

    /// Runs one transaction on this pool within the call deadline, again,
    /// whole, after a passing failure, and once more on another connection
    /// when a statement its connection prepared went stale (it rolled back).
    pub(crate) fn run_transaction<T>(
        &self,
        keys: Keys<'_>,
        mut work: impl FnMut(&mut PgConnection) -> Result<T, Failure>,
    ) -> Result<T, StoreError> {
        let started = Instant::now();
        let mut answer = self.run_transaction_since(started, keys, &mut work);
        // Each stale run discarded its connection, and the next may be
        // handed another the pool kept from before the migration: at most
        // as many runs again as the pool holds connections.
        for _ in 0..self.stale_reruns() {
            match &answer {
                Err(error) if crate::errors::stale_statement(error) => {
                    tracing::debug!(%error, "dployr.store: a prepared statement went stale; running the transaction again");
                    answer = self.run_transaction_since(started, keys, &mut work);
                }
                _ => break,
            }
        }
        answer
    }

    /// How many times a call whose prepared statement went stale runs
    /// again: once for each connection the pool may hold, each of which
    /// may have prepared it before the migration.
    pub(crate) fn stale_reruns(&self) -> u32 {
        self.inner.max_size()
    }

    /// One run of [`run_transaction`](Self::run_transaction), within the
    /// deadline of a call that `started` then.
    fn run_transaction_since<T>(
        &self,
        started: Instant,
        keys: Keys<'_>,
        mut work: impl FnMut(&mut PgConnection) -> Result<T, Failure>,
    ) -> Result<T, StoreError> {
        self.deadlines
            .bounded(&self.inner, &self.affinity, started, |conn| {
                // READ COMMITTED whatever the database, role or connection string
                // set as the default: the stores' lock order relies on a call
                // that waited on a lock reading what its holder committed (at
                // REPEATABLE READ, two first sign-ins made two clusters). Named
                // in the BEGIN itself, so it costs no statement and holds behind
                // a pooler too.
                crate::operation::retrying(keys, || conn.build_transaction().read_committed().run(&mut work))
            })
            .map_err(|error| self.named(error))
    }

    /// What the call deadlines did so far, and how many connections the pool
    /// discarded.
    pub fn deadline_stats(&self) -> DeadlineStats {
        self.deadlines.stats()
    }

    /// How long a checkout waits for a connection before failing with
    /// [`StoreError::Unavailable`] ([`PoolConfig::connection_timeout`]).
    pub fn connection_timeout(&self) -> Duration {
        self.connection_timeout
    }

    /// The longest one run of a store call ([`Operation::run`]) may take:
    /// call timeout + margin + grace. A replica-safe read that failing
    /// replicas held (all of them together within one bound, counted from
    /// the read's start) runs again on the primary within a bound of its
    /// own, so it may take twice this, never more.
    pub fn call_bound(&self) -> Duration {
        self.deadlines.bound()
    }

    /// What the pool did since it opened (checkouts, waits, timeouts,
    /// connections opened and failed) and what it holds now.
    pub fn pool_stats(&self) -> PoolStats {
        self.events.stats(&self.inner.state(), self.affinity.parked())
    }

    /// The pool's name in metrics and health: `primary`, `replica-0`, ...
    pub fn name(&self) -> &str {
        &self.events.name
    }

    /// Connections open now, and how many of them are idle (in the pool,
    /// or kept for the thread that used them last).
    pub fn state(&self) -> (u32, u32) {
        let stats = self.pool_stats();
        (stats.connections, stats.idle)
    }
}

/// Whether opening a pool needs the server to answer now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Probe {
    /// Every failure is an error (the primary).
    Required,
    /// Only a configuration error is (a replica may be down for now).
    ConfigurationOnly,
}
