//! [`Operation`]: the one way store code reaches the database. An operation
//! is opened by name ([`PgPool::operation`]), carries what its errors need
//! (the rows it references), measures itself in a `tracing` span, and runs
//! its statement or transaction on a pooled connection within the call
//! deadline, running it again when it failed for a passing reason. The
//! stores of this crate and the PostgreSQL key-value backend of `dployr-kv`
//! all go through it, so a deadline, a retry rule or a span field is
//! written once.

use std::time::{Duration, Instant};

use diesel::PgConnection;
use diesel::result::QueryResult;
use dployr_domain::StoreError;
use tracing::field::Empty;
use tracing::span::EnteredSpan;

use crate::PgPool;
use crate::errors::{Failure, Keys};
use crate::routes::{Read, Route};

/// How many times an operation runs a transaction (or statement) that failed
/// for a passing reason: a deadlock, a serialization failure, a lock not
/// available, or a race the store itself detected.
const ATTEMPTS: u32 = 5;

/// One running store operation, from [`PgPool::operation`]: a `tracing`
/// span `dployr.store` with the operation's name (e.g. `"clusters.get"`),
/// which records when dropped how many statements this thread sent
/// meanwhile (exact, whatever other threads do) and how long it took.
/// Spans carry the name only, never arguments, so never a secret.
#[must_use = "the operation runs through `run` and is measured until it is dropped"]
pub struct Operation<'p> {
    pool: &'p PgPool,
    name: &'static str,
    /// For a read: where it may go (see `routes`); `None` for a write.
    read: Option<Read>,
    /// Whether running it twice is the same as once (a read): then a call
    /// whose connection was lost under it runs once more, on another.
    idempotent: bool,
    /// The rows this operation references, by entity, so a foreign key that
    /// finds one missing is `NotFound` naming it: `("cluster", id)`.
    references: Vec<(&'static str, String)>,
    span: EnteredSpan,
    started: Instant,
    statements_before: u64,
}

impl std::fmt::Debug for Operation<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The keys are ids, but nothing of an operation's input is printed.
        f.debug_struct("Operation").field("span", &self.span).finish_non_exhaustive()
    }
}

impl<'p> Operation<'p> {
    pub(crate) fn new(pool: &'p PgPool, name: &'static str) -> Self {
        let span = tracing::debug_span!("dployr.store", op = name, statements = Empty, duration_us = Empty).entered();
        Self {
            pool,
            name,
            read: None,
            idempotent: false,
            references: Vec::new(),
            span,
            started: Instant::now(),
            statements_before: crate::trace::statements_so_far(),
        }
    }

    /// The operation of the store read `read`, named for it, which
    /// [`run`](Self::run) sends where [`Read::route`] allows (a replica, or
    /// the primary).
    pub(crate) fn read(pool: &'p PgPool, read: Read) -> Self {
        let mut operation = Self::new(pool, read.name());
        operation.read = Some(read);
        operation.idempotent = true;
        operation
    }

    /// Marks this operation as one that running twice does the same as
    /// running once (a read, or a write whose second run changes nothing):
    /// when the connection is lost under its statement (the server
    /// restarted, crashed or ended the session mid-call), [`run`](Self::run)
    /// runs it once more on another connection, waiting for one as a
    /// checkout does, instead of failing with `Unavailable`. Store reads are
    /// marked already.
    pub fn idempotent(mut self) -> Self {
        self.idempotent = true;
        self
    }

    /// Names a row this operation references (`"cluster"`, its id), so a
    /// foreign-key violation on it is `NotFound` with that key.
    pub(crate) fn referencing(mut self, entity: &'static str, key: &impl ToString) -> Self {
        self.references.push((entity, key.to_string()));
        self
    }

    /// Runs one read (or a single-statement write) on a pooled connection,
    /// outside any explicit transaction, within the call deadline (see
    /// [`DeadlineConfig`](crate::DeadlineConfig)): the checkout and `work`
    /// together end by `statement_timeout` + margin (+ grace if the server
    /// does not answer the cancel), and a connection whose call overran is
    /// discarded. A statement that failed for a passing reason (it was
    /// rolled back) runs again, up to five times in all; an
    /// [idempotent](Self::idempotent) one whose connection was lost under it
    /// runs once more, on another connection, within what is left of the
    /// call's deadline, and so does any statement the connection prepared
    /// before a migration changed its result type (refused before it did
    /// anything; the connection is discarded).
    /// Errors are mapped as [`store_error`](crate::store_error) maps them.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] naming the deadline when it passed, or
    /// when no connection came in time; `work`'s error, mapped, otherwise.
    pub fn run<T>(&self, mut work: impl FnMut(&mut PgConnection) -> QueryResult<T>) -> Result<T, StoreError> {
        // The deadline counts from when the operation opened, the one
        // instant both runs on the primary share (a run again stays within
        // the call's bound), and so do all the replica runs of a read.
        let mut started = self.started;
        if let Some(read) = self.read
            && read.route() == Route::Replica
            && let Some(replicas) = &self.pool.replicas
        {
            if let Some(value) = replicas.read(read.name(), started, &self.references, &mut work)? {
                return Ok(value);
            }
            ::metrics::counter!(crate::metrics::ROUTED_READS, "op" => read.name(), "server" => "primary").increment(1);
            // The replicas that failed (frozen, cut off) may have used
            // their whole deadline: the primary gets a deadline of its own,
            // so that the read is answered, not refused for time the
            // replicas spent.
            started = Instant::now();
        }
        let mut answer = match self.pool.run_statement_since(started, &self.references, &mut work) {
            Err(error) if self.idempotent && crate::errors::lost_connection(&error) => {
                // The connection is discarded already; nothing was changed.
                tracing::debug!(op = self.name, %error, "dployr.store: connection lost under a read; running it again");
                self.pool.run_statement_since(started, &self.references, &mut work)
            }
            answer => answer,
        };
        // Refused before it did anything, a write too; the connection is
        // discarded already, and the next may be another the pool kept
        // from before the migration (see `PgPool::stale_reruns`).
        for _ in 0..self.pool.stale_reruns() {
            match &answer {
                Err(error) if crate::errors::stale_statement(error) => {
                    tracing::debug!(op = self.name, %error, "dployr.store: a prepared statement went stale; running it again");
                    answer = self.pool.run_statement_since(started, &self.references, &mut work);
                }
                _ => break,
            }
        }
        answer
    }

    /// Runs `work` in one transaction, rolled back on any error, as
    /// [`run`](Self::run) runs a statement; a transaction that failed for a
    /// passing reason runs again, whole, so `work` must hold no state of its
    /// own across attempts.
    pub(crate) fn transaction<T>(
        &self,
        work: impl FnMut(&mut PgConnection) -> Result<T, Failure>,
    ) -> Result<T, StoreError> {
        self.pool.run_transaction(&self.references, work)
    }
}

/// Runs `attempt` until it succeeds, fails for a lasting reason, or has
/// run [`ATTEMPTS`] times; waits a little, with jitter, between attempts so
/// that the transactions that collided do not collide again. `keys` name the
/// rows a foreign-key error may find missing.
pub(crate) fn retrying<T>(keys: Keys<'_>, mut attempt: impl FnMut() -> Result<T, Failure>) -> Result<T, StoreError> {
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

impl Drop for Operation<'_> {
    fn drop(&mut self) {
        let statements = crate::trace::statements_so_far() - self.statements_before;
        let elapsed = self.started.elapsed();
        crate::metrics::operation_finished(self.name, elapsed);
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.span.record("statements", statements);
        self.span.record("duration_us", micros);
    }
}

#[cfg(test)]
mod tests {
    use diesel::prelude::*;
    use diesel::sql_types::{Bool, Integer};

    use crate::{PgPool, PoolConfig};

    /// Runs an operation whose first run ends its own session under it (as
    /// a restart or `pg_terminate_backend` does mid-call): the answer, and
    /// the server processes each run saw.
    fn a_call_whose_first_session_ends_under_it(
        idempotent: bool,
    ) -> (Result<i32, dployr_domain::StoreError>, Vec<i32>) {
        let db = dployr_testkit::database();
        let pool = PgPool::connect(db.url(), PoolConfig::default()).unwrap();
        let mut backends = Vec::new();
        let operation = pool.operation("test.session_ends_under_it");
        let operation = if idempotent { operation.idempotent() } else { operation };
        let answer = operation.run(|conn| {
            let pid = diesel::select(diesel::dsl::sql::<Integer>("pg_backend_pid()")).get_result::<i32>(conn)?;
            backends.push(pid);
            if backends.len() == 1 {
                diesel::select(diesel::dsl::sql::<Bool>("pg_terminate_backend(pg_backend_pid())")).execute(conn)?;
            }
            Ok(pid)
        });
        (answer, backends)
    }

    /// The deadline passed (the cancel found the session idle and did
    /// nothing), then the server answered: a verdict on the input is given
    /// as it is, a retryable `Unavailable` only for what may pass.
    #[test]
    fn a_verdict_on_the_input_that_arrives_after_the_deadline_is_not_turned_into_unavailable() {
        use std::time::Duration;

        use diesel::sql_types::Text;
        use dployr_domain::StoreError;

        let db = dployr_testkit::database();
        let deadline = crate::DeadlineConfig {
            call_timeout: Some(Duration::from_millis(100)),
            margin: Duration::from_millis(50),
            grace: Duration::from_secs(30),
            cancel: true,
        };
        let pool = PgPool::connect(db.url(), PoolConfig { deadline, ..PoolConfig::default() }).unwrap();
        let late = |statement: &'static str, value: &'static str| {
            pool.operation("test.late_answer").run(|conn| {
                std::thread::sleep(Duration::from_millis(400));
                diesel::select(diesel::dsl::sql::<Text>(statement).bind::<Text, _>(value)).get_result::<String>(conn)
            })
        };
        let refused = late("", "a\u{0}b").unwrap_err();
        assert!(matches!(refused, StoreError::Invalid { .. }), "{refused}");
        let failed = late("(1/0)::text || ", "x").unwrap_err();
        assert!(matches!(failed, StoreError::Unavailable { .. }), "{failed}");
        assert_eq!(pool.deadline_stats().discarded, 2, "each expired call's connection is discarded all the same");
    }

    /// A session whose server only reads (here set on the session itself,
    /// as a primary switched over to read-only sets it on every session)
    /// fails its write and is discarded: the next call, on a pool of one,
    /// runs on a new session, which follows the URL to a server that writes.
    #[test]
    fn a_connection_whose_server_only_reads_is_discarded_after_the_write_it_refused() {
        let db = dployr_testkit::database();
        let pool = PgPool::connect(db.url(), PoolConfig { max_size: 1, ..PoolConfig::default() }).unwrap();
        let pid = || diesel::select(diesel::dsl::sql::<Integer>("pg_backend_pid()"));
        let mut refused_on = None;
        let error = pool
            .operation("test.read_only")
            .run(|conn| {
                refused_on = Some(pid().get_result::<i32>(conn)?);
                diesel::sql_query("SET default_transaction_read_only = on").execute(conn)?;
                diesel::sql_query("DELETE FROM users WHERE false").execute(conn)
            })
            .unwrap_err();
        assert!(error.is_retryable() && error.to_string().contains("read-only"), "{error}");
        let next = pool.operation("test.read_only").run(|conn| pid().get_result::<i32>(conn)).unwrap();
        assert_ne!(Some(next), refused_on, "the read-only session was handed out again");
    }

    #[test]
    fn an_idempotent_call_whose_connection_is_lost_under_it_runs_again_on_another() {
        let (answer, backends) = a_call_whose_first_session_ends_under_it(true);
        assert_eq!(backends.len(), 2, "{backends:?}");
        assert_ne!(backends[0], backends[1], "the second run had a connection of its own");
        assert_eq!(answer.unwrap(), backends[1]);
    }

    #[test]
    fn any_other_call_whose_connection_is_lost_under_it_fails_unavailable_and_is_not_run_again() {
        let (answer, backends) = a_call_whose_first_session_ends_under_it(false);
        assert_eq!(backends.len(), 1, "a write may have committed: it is not run again");
        let error = answer.unwrap_err();
        assert!(crate::errors::lost_connection(&error) && error.is_retryable(), "{error}");
    }
}
