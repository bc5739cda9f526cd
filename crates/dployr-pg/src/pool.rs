//! The connection pool every PostgreSQL store (and the PostgreSQL key-value
//! backend) shares: r2d2 over diesel's `PgConnection`, with a statement
//! timeout set once per new connection and a statement counter, so tests can
//! assert how many statements an operation sends.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use diesel::PgConnection;
use diesel::connection::{CacheSize, Connection as _, Instrumentation, InstrumentationEvent, SimpleConnection as _};
use diesel::r2d2::{CustomizeConnection, Pool, PooledConnection};
use dployr_domain::StoreError;

use crate::conninfo::{NetworkConfig, with_network_parameters};
use crate::deadline::{ConnInfo, DeadlineConfig, DeadlineStats, Deadlines, PgConnectionManager};
use crate::errors::{Failure, Keys};

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
    /// Keep the SQL text (never the bound values) of the last statements
    /// sent, for [`PgPool::recent_statements`]: for tests and debugging.
    /// Default off: it formats every statement.
    pub record_statements: bool,
    /// With [`record_statements`](Self::record_statements), keep the bound
    /// values too (diesel's `-- binds: [...]` suffix). For benchmarks that
    /// replay the exact statements; values may be personal data, so never
    /// turn this on in production. Default off.
    pub record_binds: bool,
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

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            max_size: 10,
            connection_timeout: Duration::from_secs(5),
            statement_timeout: Some(Duration::from_secs(30)),
            record_statements: false,
            record_binds: false,
            prepared_statement_cache: true,
            network: NetworkConfig::default(),
            deadline: DeadlineConfig::default(),
        }
    }
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
        Self { statements: self.statements - before.statements, transactions: self.transactions - before.transactions }
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
        // One round trip: the statement timeout, and untranslated messages
        // where the role may ask for them, so errors diesel leaves `Unknown`
        // can be classified (see `errors`); a role that may not keeps the
        // server's setting.
        let mut setup =
            String::from("DO $$ BEGIN SET lc_messages = 'C'; EXCEPTION WHEN insufficient_privilege THEN NULL; END $$;");
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
    inner: Pool<PgConnectionManager>,
    counters: Arc<Counters>,
    connection_timeout: Duration,
    deadlines: Arc<Deadlines>,
}

impl fmt::Debug for PgPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URL may hold a password: not printed.
        f.debug_struct("PgPool").field("state", &self.inner.state()).finish_non_exhaustive()
    }
}

impl PgPool {
    /// Opens a pool on `database_url` and checks that one connection can be
    /// made within `config.connection_timeout`.
    ///
    /// # Errors
    /// [`StoreError::Invalid`] for a zero pool size; [`StoreError::Unavailable`]
    /// when no connection could be made in time (the message carries
    /// PostgreSQL's reason, without the URL).
    pub fn connect(database_url: &str, config: PoolConfig) -> Result<Self, StoreError> {
        if config.max_size == 0 {
            return Err(StoreError::invalid("pool max_size", "must be at least 1"));
        }
        let counters = Arc::new(Counters {
            recent: config.record_statements.then(|| Mutex::new(VecDeque::new())),
            record_binds: config.record_binds,
            ..Counters::default()
        });
        let customizer = Customizer {
            statement_timeout: config.statement_timeout,
            prepared_statement_cache: config.prepared_statement_cache,
            counters: Arc::clone(&counters),
        };
        let url = with_network_parameters(database_url, &config.network, config.connection_timeout);
        let deadline_counters = Arc::default();
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
            .build_unchecked(PgConnectionManager::new(&url, Arc::clone(&deadline_counters)));
        let deadlines = Deadlines::new(
            config.deadline,
            config.statement_timeout,
            config.connection_timeout,
            &url,
            deadline_counters,
        );
        let pool =
            Self { inner, counters, connection_timeout: config.connection_timeout, deadlines: Arc::new(deadlines) };
        // One checkout proves the URL works and fails fast, with the reason, when it does not.
        drop(pool.get()?);
        Ok(pool)
    }

    /// Checks a connection out. The connection is the caller's until it is
    /// dropped, with no client deadline: store code uses
    /// [`bounded`](Self::bounded) instead.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when none is free or can be made within
    /// the connection timeout.
    pub fn get(&self) -> Result<PgPooledConnection, StoreError> {
        self.inner.get_timeout(self.connection_timeout).map_err(|e| StoreError::Unavailable {
            reason: format!("no PostgreSQL connection within {:?}", self.connection_timeout).into(),
            source: Some(Box::new(e)),
        })
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

    /// The SQL text (without bound values) of up to the last 256 statements,
    /// oldest first; empty unless [`PoolConfig::record_statements`] is on.
    pub fn recent_statements(&self) -> Vec<String> {
        self.counters.recent.as_ref().map_or_else(Vec::new, |recent| {
            recent.lock().unwrap_or_else(std::sync::PoisonError::into_inner).iter().cloned().collect()
        })
    }

    /// Enters a `tracing` span `dployr.store` for the operation `name` (e.g.
    /// `"kv.get"`): when the returned guard drops, the span records how many
    /// statements this thread sent meanwhile (exact, whatever other threads
    /// do) and how long it took. Spans carry the name only, never arguments.
    pub fn operation(&self, name: &'static str) -> crate::Operation {
        crate::trace::operation(name)
    }

    /// Runs `work` on a pooled connection within the call deadline (see
    /// [`DeadlineConfig`]): the checkout and `work` together end by
    /// `statement_timeout` + margin (+ grace if the server does not answer
    /// the cancel), and a connection whose call overran is discarded.
    /// Errors are mapped by [`store_error`](crate::store_error).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] naming the deadline when it passed, or
    /// when no connection came in time; `work`'s error otherwise.
    pub fn bounded<T>(
        &self,
        work: impl FnOnce(&mut PgConnection) -> Result<T, diesel::result::Error>,
    ) -> Result<T, StoreError> {
        self.deadlines.bounded(&self.inner, |conn| work(conn).map_err(crate::store_error))
    }

    /// What the call deadlines did so far, and how many connections the pool
    /// discarded.
    pub fn deadline_stats(&self) -> DeadlineStats {
        self.deadlines.stats()
    }

    /// The longest a [`bounded`](Self::bounded) call (every store call) may
    /// take: call timeout + margin + grace.
    pub fn call_bound(&self) -> Duration {
        self.deadlines.bound()
    }

    /// Connections open now, and how many of them are idle.
    pub fn state(&self) -> (u32, u32) {
        let state = self.inner.state();
        (state.connections, state.idle_connections)
    }
}

/// How many times a store runs a transaction (or statement) that failed for
/// a passing reason: a deadlock, a serialization failure, a lock not
/// available, or a race the store itself detected.
const ATTEMPTS: u32 = 3;

impl PgPool {
    /// Runs one read (or a single-statement write) on a pooled connection,
    /// outside any explicit transaction. `keys` names the rows a foreign key
    /// may find missing. A statement that failed for a passing reason (it
    /// was rolled back) runs again, up to [`ATTEMPTS`] times in all.
    pub(crate) fn run<T, E: Into<Failure>>(
        &self,
        keys: Keys<'_>,
        mut work: impl FnMut(&mut PgConnection) -> Result<T, E>,
    ) -> Result<T, StoreError> {
        self.deadlines.bounded(&self.inner, |conn| retrying(keys, || work(conn).map_err(Into::into)))
    }

    /// Runs `work` in one transaction, rolled back on any error; a
    /// transaction that failed for a passing reason runs again, whole, up to
    /// [`ATTEMPTS`] times in all, so `work` must hold no state of its own
    /// across attempts.
    pub(crate) fn transaction<T>(
        &self,
        keys: Keys<'_>,
        mut work: impl FnMut(&mut PgConnection) -> Result<T, Failure>,
    ) -> Result<T, StoreError> {
        use diesel::Connection as _;
        self.deadlines.bounded(&self.inner, |conn| retrying(keys, || conn.transaction(&mut work)))
    }
}

/// Runs `attempt` until it succeeds, fails for a lasting reason, or has run
/// [`ATTEMPTS`] times; waits a little, with jitter, between attempts so
/// that the transactions that collided do not collide again.
fn retrying<T>(keys: Keys<'_>, mut attempt: impl FnMut() -> Result<T, Failure>) -> Result<T, StoreError> {
    let mut attempts = 0;
    loop {
        attempts += 1;
        match attempt() {
            Ok(value) => return Ok(value),
            Err(failure) if attempts < ATTEMPTS && failure.is_worth_retrying() => {
                let wait = Duration::from_micros(rand::random_range(1_000..=5_000) * u64::from(attempts));
                tracing::debug!(attempt = attempts, wait_us = wait.as_micros() as u64, failure = ?failure, "dployr.store retry");
                std::thread::sleep(wait);
            }
            Err(failure) => return Err(failure.into_store_error(keys)),
        }
    }
}
