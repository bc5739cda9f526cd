//! The entry point: lock, verify, then apply or revert.

use std::fmt;
use std::thread;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use diesel::connection::{CacheSize, SimpleConnection as _};
use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Bool, Integer, Nullable, Text};
use dployr_domain::{ConnectFailure, ConnectFailureKind};

use crate::conninfo::with_connection_defaults;
use crate::harness::{AppliedRow, DployrHarness, read_applied_rows};
use crate::{MigrateError, MigrationFile, MigrationSet};

diesel::define_sql_function! {
    /// Takes the session-level advisory lock if it is free; never blocks.
    fn pg_try_advisory_lock(key: BigInt) -> Bool;
}
diesel::define_sql_function! {
    /// Releases a session-level advisory lock.
    fn pg_advisory_unlock(key: BigInt) -> Bool;
}

/// Applies the migrations of a [`MigrationSet`] to one database, safely
/// under concurrency.
///
/// Every operation opens its own dedicated connection (never a pooled one,
/// so a lock cannot outlive a failure on a connection that goes back to a
/// pool), waits for the advisory lock by polling `pg_try_advisory_lock` (a
/// session blocked in `pg_advisory_lock` holds a snapshot that `CREATE INDEX
/// CONCURRENTLY` would wait for), and releases it on every path.
///
/// Its connection never caches prepared statements (a pooler in
/// transaction mode would hand them to another client), and the runner
/// refuses to take its session lock through such a pooler at all.
///
/// A migration's *wait* for a table lock is bounded: its statements run
/// under PostgreSQL's `lock_timeout`
/// ([`with_table_lock_timeout`](Self::with_table_lock_timeout), default
/// 3 s), so live traffic queued behind a migration that waits for a lock
/// waits at most that long. A migration (or revert) that ran into it
/// rolled back whole; it is tried again after a pause that doubles, a
/// bounded number of times, and each wait is reported with the lock it
/// waited for and the session holding it. What the timeout does not bound
/// is how long a migration *holds* the locks it took: until it commits. A
/// migration that rewrites or scans a whole table under a strong lock
/// (`ALTER TABLE ... ADD CONSTRAINT` validating every row, a whole-table
/// `UPDATE` after a `DROP TRIGGER`) keeps the queries of that table waiting
/// for all of it; write long ones as steps outside a transaction
/// (`CREATE INDEX CONCURRENTLY`) or as `NOT VALID` followed by `VALIDATE
/// CONSTRAINT`, or run them when traffic allows.
///
/// Its sessions run without `statement_timeout` (a role's or database's
/// would cancel a long migration, and a cancelled `CREATE INDEX
/// CONCURRENTLY` leaves an invalid index), and its connections give up
/// after a connect timeout ([`with_connect_timeout`](Self::with_connect_timeout)).
pub struct MigrationRunner {
    database_url: String,
    set: MigrationSet,
    lock_timeout: Duration,
    table_lock_timeout: Duration,
    lock_attempts: u32,
    connect_timeout: Duration,
    newer_release_allowed: bool,
}

impl fmt::Debug for MigrationRunner {
    // The URL may hold a password: never print it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MigrationRunner")
            .field("database_url", &"<redacted>")
            .field("migrations", &self.set.len())
            .field("lock_timeout", &self.lock_timeout)
            .field("table_lock_timeout", &self.table_lock_timeout)
            .field("lock_attempts", &self.lock_attempts)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

/// Something the runner did, for progress output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationEvent {
    /// Another runner holds the lock; this one waits.
    WaitingForLock,
    /// A migration starts to apply.
    Applying {
        /// Folder name.
        name: String,
    },
    /// A migration applied and was recorded.
    Applied {
        /// Folder name.
        name: String,
        /// Time its `up.sql` took.
        duration: Duration,
    },
    /// A migration or revert ran into `lock_timeout` (live traffic holds a
    /// lock it needs); it rolled back and runs again after `retry_in`.
    LockWait {
        /// Folder name.
        name: String,
        /// The lock it waited for and the session holding it.
        waited_for: String,
        /// The attempt that timed out, from 1.
        attempt: u32,
        /// The pause before the next attempt.
        retry_in: Duration,
    },
    /// Migrations a newer release applied, which this set does not have:
    /// nothing was applied (see [`MigrationRunner::allowing_a_newer_release`]).
    NewerReleaseApplied {
        /// Their folder names, by version.
        names: Vec<String>,
    },
    /// A migration starts to revert.
    Reverting {
        /// Folder name.
        name: String,
    },
    /// A migration reverted and its record was removed.
    Reverted {
        /// Folder name.
        name: String,
        /// Time its `down.sql` took.
        duration: Duration,
    },
}

impl fmt::Display for MigrationEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::WaitingForLock => f.write_str("waiting for another migration runner to finish"),
            Self::Applying { name } => write!(f, "applying {name}"),
            Self::Applied { name, duration } => write!(f, "applied  {name} ({duration:.1?})"),
            Self::LockWait { name, waited_for, attempt, retry_in } => write!(
                f,
                "{name}: attempt {attempt} ran into lock_timeout waiting for {waited_for}; rolled back, again in {retry_in:.1?}"
            ),
            Self::NewerReleaseApplied { names } => write!(
                f,
                "applied by a newer release, not in this binary: {}; every migration of this binary is applied, \
                 nothing to do",
                names.join(", ")
            ),
            Self::Reverting { name } => write!(f, "reverting {name}"),
            Self::Reverted { name, duration } => write!(f, "reverted {name} ({duration:.1?})"),
        }
    }
}

/// A migration that a run applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedMigration {
    /// Folder name.
    pub name: String,
    /// Version (folder name up to the first `_`).
    pub version: String,
    /// Time its `up.sql` took.
    pub duration: Duration,
}

/// Where one migration stands in a database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationState {
    /// In the binary, not applied yet.
    Pending,
    /// Applied; `checksum_matches` is false if the file changed since.
    Applied {
        /// When it was applied.
        applied_at: DateTime<Utc>,
        /// How long it took.
        duration: Duration,
        /// False if `up.sql` differs from the text that was applied.
        checksum_matches: bool,
    },
    /// Applied to the database but not in this binary.
    MissingFromSource {
        /// When it was applied.
        applied_at: DateTime<Utc>,
    },
}

/// One line of [`MigrationRunner::status`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationStatus {
    /// Folder name.
    pub name: String,
    /// Version.
    pub version: String,
    /// Applied, pending, or applied but missing from the binary.
    pub state: MigrationState,
}

impl MigrationRunner {
    /// The advisory lock key every dployr runner takes ("dployr" in ASCII,
    /// then 1). Advisory locks are per database, so runners on other
    /// databases never wait for each other.
    pub const LOCK_KEY: i64 = 0x6470_6c6f_7972_0001;

    /// Default time to wait for another runner's lock.
    pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(300);

    /// Default `lock_timeout` of the migrations' statements.
    pub const DEFAULT_TABLE_LOCK_TIMEOUT: Duration = Duration::from_secs(3);

    /// Default number of attempts of a migration that runs into `lock_timeout`.
    pub const DEFAULT_LOCK_ATTEMPTS: u32 = 5;

    /// Default time one connection of the runner may take to open.
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

    /// A runner for `set` on the database at `database_url`.
    pub fn new(database_url: impl Into<String>, set: MigrationSet) -> Self {
        Self {
            database_url: database_url.into(),
            set,
            lock_timeout: Self::DEFAULT_LOCK_TIMEOUT,
            table_lock_timeout: Self::DEFAULT_TABLE_LOCK_TIMEOUT,
            lock_attempts: Self::DEFAULT_LOCK_ATTEMPTS,
            connect_timeout: Self::DEFAULT_CONNECT_TIMEOUT,
            newer_release_allowed: false,
        }
    }

    /// PostgreSQL's `lock_timeout` for the migrations' statements: how long
    /// a migration may wait for a table lock, with every query that needs
    /// the same table queued behind it, before it rolls back and tries
    /// again. At least 1 ms, at most PostgreSQL's limit (2^31 − 1 ms, about
    /// 24.8 days; `SET lock_timeout` refuses more).
    #[must_use]
    pub fn with_table_lock_timeout(mut self, timeout: Duration) -> Self {
        self.table_lock_timeout =
            timeout.clamp(Duration::from_millis(1), Duration::from_millis(Self::MAX_TABLE_LOCK_TIMEOUT_MS));
        self
    }

    /// The longest `lock_timeout` PostgreSQL takes, in milliseconds.
    pub const MAX_TABLE_LOCK_TIMEOUT_MS: u64 = i32::MAX as u64;

    /// How many times a migration (or a revert) that runs into
    /// `lock_timeout` is tried in all (at least 1). Only migrations that run
    /// in a transaction are tried again; one outside a transaction fails at
    /// its first timeout.
    #[must_use]
    pub fn with_lock_attempts(mut self, attempts: u32) -> Self {
        self.lock_attempts = attempts.max(1);
        self
    }

    /// Lets [`run_pending`](Self::run_pending) find migrations of a newer
    /// release applied: when every migration the set does not have is
    /// newer than the set's latest, and every one of the set's is applied
    /// unchanged, the run applies nothing and reports them
    /// ([`MigrationEvent::NewerReleaseApplied`]) instead of refusing with
    /// [`MigrateError::MissingFromSource`]. For migrations on start: in a
    /// rolling deploy (or after a rollback of the code) a process of the
    /// older release that starts after the newer one migrated has nothing
    /// to apply, and refusing would keep it from starting. An unknown
    /// migration older than the set's latest (another branch's, or one
    /// removed from the source), a changed one, or one of the set's still
    /// pending beside a newer one, is refused all the same; reverts are
    /// never allowed past a newer release's migrations. Off by default.
    #[must_use]
    pub fn allowing_a_newer_release(mut self) -> Self {
        self.newer_release_allowed = true;
        self
    }

    /// How long to wait for another runner's lock before giving up.
    #[must_use]
    pub fn with_lock_timeout(mut self, lock_timeout: Duration) -> Self {
        self.lock_timeout = lock_timeout;
        self
    }

    /// How long opening one connection may take before it fails with
    /// [`MigrateError::Connect`] (libpq's `connect_timeout`: whole seconds,
    /// rounded up, at least 2). A `connect_timeout` in the database URL, or
    /// `PGCONNECT_TIMEOUT` in the environment, wins over it, and a
    /// connection that names a service (`service=`, `PGSERVICE`) gets
    /// nothing added. Without one, a server that accepts the connection and
    /// never answers would hold [`status`](Self::status) indefinitely.
    #[must_use]
    pub fn with_connect_timeout(mut self, connect_timeout: Duration) -> Self {
        self.connect_timeout = connect_timeout;
        self
    }

    /// The migrations this runner applies.
    pub fn migrations(&self) -> &MigrationSet {
        &self.set
    }

    /// A connection of its own to the migration database, opened as the
    /// runner opens its own (its connect timeout and keepalives, no
    /// prepared-statement cache, errors classified and without the
    /// password): for a caller's checks before it migrates, such as
    /// whether this URL reaches the database its stores use.
    ///
    /// # Errors
    /// [`MigrateError::Connect`].
    pub fn connection(&self) -> Result<PgConnection, MigrateError> {
        self.connect()
    }

    /// Every migration of the set and every applied one, with its state.
    /// Reads only; takes no lock and creates nothing.
    ///
    /// # Errors
    /// [`MigrateError::Connect`] or [`MigrateError::Database`]; as [`status_on`](Self::status_on).
    pub fn status(&self) -> Result<Vec<MigrationStatus>, MigrateError> {
        let mut conn = self.connect()?;
        self.status_on(&mut conn)
    }

    /// [`status`](Self::status), read over `conn`, a connection to the
    /// migration database that the caller already holds (one of a pool):
    /// two reads, no lock, no setting changed, and this runner's URL is not
    /// used.
    ///
    /// # Errors
    /// [`MigrateError::Database`] if a read fails;
    /// [`MigrateError::ForeignMigrationsTable`] for a `_migrations` table
    /// this runner did not make.
    pub fn status_on(&self, conn: &mut PgConnection) -> Result<Vec<MigrationStatus>, MigrateError> {
        let exists = diesel::select(diesel::dsl::sql::<Bool>("to_regclass('_migrations') IS NOT NULL"))
            .get_result::<bool>(conn)
            .map_err(|source| MigrateError::Database { context: "looking for _migrations", source })?;
        let applied = if exists { read_applied_rows(conn)? } else { Vec::new() };

        let mut lines: Vec<MigrationStatus> = self
            .set
            .iter()
            .map(|file| {
                let state = match applied.iter().find(|row| row.version == file.version()) {
                    Some(row) => MigrationState::Applied {
                        applied_at: row.applied_at,
                        duration: duration_of(row),
                        checksum_matches: check(file, row).is_ok(),
                    },
                    None => MigrationState::Pending,
                };
                MigrationStatus { name: file.name().to_owned(), version: file.version().to_owned(), state }
            })
            .collect();
        lines.extend(applied.iter().filter(|row| self.set.get(&row.version).is_none()).map(|row| MigrationStatus {
            name: row.name.clone(),
            version: row.version.clone(),
            state: MigrationState::MissingFromSource { applied_at: row.applied_at },
        }));
        lines.sort_by(|a, b| a.version.cmp(&b.version));
        Ok(lines)
    }

    /// Applies every pending migration in version order, under the lock,
    /// after verifying the applied ones. Returns what it applied (nothing if
    /// another runner got there first).
    ///
    /// # Errors
    /// Verification errors ([`MigrateError::ChecksumMismatch`],
    /// [`MigrateError::MissingFromSource`], [`MigrateError::OutOfOrder`])
    /// before anything runs; [`MigrateError::SchemaWithoutHistory`] when
    /// nothing is recorded and the first migration finds what it creates
    /// already there (PostgreSQL's "already exists", untranslated); then
    /// [`MigrateError::MigrationFailed`] for the first migration that fails
    /// (earlier ones stay applied, the failing one leaves nothing).
    pub fn run_pending(
        &self,
        progress: &mut dyn FnMut(&MigrationEvent),
    ) -> Result<Vec<AppliedMigration>, MigrateError> {
        self.locked(self.newer_release_allowed, progress, |harness, applied, progress| {
            let pending: Vec<&MigrationFile> =
                self.set.iter().filter(|file| !applied.iter().any(|row| row.version == file.version())).collect();
            refuse_out_of_order(&pending, applied)?;
            let mut done = Vec::with_capacity(pending.len());
            for file in pending {
                let duration = self.apply_one(harness, file, progress).map_err(|error| match error {
                    MigrateError::MigrationFailed(failure)
                        if applied.is_empty() && done.is_empty() && failure.message.contains(" already exists") =>
                    {
                        MigrateError::SchemaWithoutHistory(failure)
                    }
                    other => other,
                })?;
                done.push(AppliedMigration {
                    name: file.name().to_owned(),
                    version: file.version().to_owned(),
                    duration,
                });
            }
            Ok(done)
        })
    }

    /// Reverts the applied migration with the highest version (its
    /// `down.sql`). Returns its name, or `None` if nothing is applied.
    ///
    /// # Errors
    /// As [`MigrationRunner::run_pending`], and [`MigrateError::NoDownFile`].
    pub fn revert_last(&self, progress: &mut dyn FnMut(&MigrationEvent)) -> Result<Option<String>, MigrateError> {
        self.locked(false, progress, |harness, applied, progress| {
            Ok(self.revert_last_locked(harness, applied, progress)?.map(|file| file.name().to_owned()))
        })
    }

    /// Reverts, newest first and under one lock, every applied migration
    /// whose version is above `target` (`None`: all of them). Returns their
    /// names, in the order reverted.
    ///
    /// # Errors
    /// As [`MigrationRunner::revert_last`]; [`MigrateError::Source`] when
    /// `target` is not the version of an applied migration.
    pub fn revert_to(
        &self,
        target: Option<&str>,
        progress: &mut dyn FnMut(&MigrationEvent),
    ) -> Result<Vec<String>, MigrateError> {
        self.locked(false, progress, |harness, applied, progress| {
            if let Some(target) = target
                && !applied.iter().any(|row| row.version == target)
            {
                return Err(MigrateError::Source(format!(
                    "no applied migration has version {target}; `migrate status` lists them"
                )));
            }
            let mut reverted = Vec::new();
            let mut remaining = applied.to_vec();
            while remaining.last().is_some_and(|last| target.is_none_or(|target| last.version.as_str() > target)) {
                let Some(file) = self.revert_last_locked(harness, &remaining, progress)? else { break };
                reverted.push(file.name().to_owned());
                remaining.pop();
            }
            Ok(reverted)
        })
    }

    /// Reverts the last applied migration and applies it again, under one
    /// lock. Returns its name, or `None` if nothing is applied.
    ///
    /// # Errors
    /// As [`MigrationRunner::revert_last`].
    pub fn redo(&self, progress: &mut dyn FnMut(&MigrationEvent)) -> Result<Option<String>, MigrateError> {
        self.locked(false, progress, |harness, applied, progress| {
            let Some(file) = self.revert_last_locked(harness, applied, progress)? else {
                return Ok(None);
            };
            self.apply_one(harness, file, progress)?;
            Ok(Some(file.name().to_owned()))
        })
    }

    /// Returns the migration it reverted.
    fn revert_last_locked(
        &self,
        harness: &mut DployrHarness<'_>,
        applied: &[AppliedRow],
        progress: &mut dyn FnMut(&MigrationEvent),
    ) -> Result<Option<&MigrationFile>, MigrateError> {
        let Some(last) = applied.last() else {
            return Ok(None);
        };
        // verify() already proved every applied row is in the set.
        let file =
            self.set.get(&last.version).ok_or_else(|| MigrateError::MissingFromSource { name: last.name.clone() })?;
        progress(&MigrationEvent::Reverting { name: file.name().to_owned() });
        let duration = self.retrying_lock_timeouts(harness, file, progress, |harness| harness.revert(file))?;
        progress(&MigrationEvent::Reverted { name: file.name().to_owned(), duration });
        Ok(Some(file))
    }

    /// The database URL with the runner's connect timeout and keepalives
    /// (those it does not set itself).
    fn connection_url(&self) -> String {
        with_connection_defaults(&self.database_url, self.connect_timeout, |name| std::env::var(name).ok())
    }

    /// A dedicated connection without a prepared-statement cache: named
    /// statements left on a pooled server connection would collide with the
    /// next client's (`prepared statement "__diesel_stmt_1" already exists`).
    fn connect(&self) -> Result<PgConnection, MigrateError> {
        // Errors are told and redacted against the URL as the operator
        // wrote it; the parameters added to it hold no secret.
        let mut conn = PgConnection::establish(&self.connection_url()).map_err(|error| {
            MigrateError::Connect(match &error {
                diesel::ConnectionError::InvalidCString(_) => {
                    ConnectFailure::new(ConnectFailureKind::MalformedUrl, "the URL holds a NUL byte")
                }
                other => ConnectFailure::classify(&other.to_string(), &self.database_url),
            })
        })?;
        conn.set_prepared_statement_cache_size(CacheSize::Disabled);
        Ok(conn)
    }

    /// Refuses a connection that goes through a pooler in transaction mode:
    /// a setting made on `conn` outside a transaction is looked for from a
    /// second connection. Directly on PostgreSQL (or through a session-mode
    /// pool) a session's settings are its own, so this never refuses a
    /// direct connection; through a transaction pooler the second client is
    /// usually handed the server connection the first just used.
    fn refuse_transaction_pooler(&self, conn: &mut PgConnection, other: &mut PgConnection) -> Result<(), MigrateError> {
        let token = format!("{:016x}", rand::random::<u64>());
        conn.batch_execute(&format!("SET dployr.pooler_probe = '{token}'"))
            .map_err(|source| MigrateError::Database { context: "probing for a connection pooler", source })?;
        let seen: Option<String> =
            diesel::select(diesel::dsl::sql::<Nullable<Text>>("current_setting('dployr.pooler_probe', true)"))
                .get_result(other)
                .map_err(|source| MigrateError::Database { context: "probing for a connection pooler", source })?;
        if seen.as_deref() == Some(token.as_str()) {
            return Err(MigrateError::TransactionPooler);
        }
        Ok(())
    }

    /// The SQL that gives a session the runner's settings: set once on the
    /// runner's connection, and again after every migration file, which may
    /// have changed them.
    ///
    /// - `lock_timeout`, so that a migration waiting for a table lock holds
    ///   up the traffic queued behind it for at most that long;
    /// - no `statement_timeout`: one set on the role or the database (as
    ///   behind a transaction pooler) would cancel a long migration, and a
    ///   cancelled `CREATE INDEX CONCURRENTLY` leaves an invalid index. The
    ///   waits for locks are bounded by `lock_timeout` already. Set first:
    ///   the timer PostgreSQL started for this batch under the inherited
    ///   value keeps running through the batch's later statements unless a
    ///   zero stops it (a database's `statement_timeout = '1ms'` cancelled
    ///   the `DO` block that came first, on every start);
    /// - no `idle_in_transaction_session_timeout`: the runner is idle in a
    ///   migration's transaction between its file and its `_migrations`
    ///   row, and a short one of the role or the database ended the session
    ///   there (the run failing as a lost connection, on every start);
    /// - no `idle_session_timeout` (PostgreSQL 14+) nor `transaction_timeout`
    ///   (17+): one set on the role or the database would end the runner's
    ///   session while it waits between lock-timeout attempts (releasing
    ///   the migration lock mid-run) or a long migration's transaction; on
    ///   an older server, where the setting does not exist, nothing is set;
    /// - a session that runs as a replica's (`session_replication_role =
    ///   replica` set on the database or the role) is refused: triggers and
    ///   foreign-key actions are off there, and a migration's data changes
    ///   would skip them;
    /// - untranslated messages where the role may ask for them (the
    ///   lock-timeout error is told by its text);
    /// - what diesel sets when it opens a connection, which the `RESET ALL`
    ///   after a file undoes: the UTF-8 client encoding its text is sent
    ///   and read in (a database's own may be another), and time zone UTC,
    ///   so that every file of a run sees the same;
    /// - `standard_conforming_strings = on` (PostgreSQL's default, which a
    ///   database, role or URL may turn off): the runner reads a file's
    ///   strings so before running it (`'\'` is a whole string), and with it
    ///   off PostgreSQL would read past where the runner's check stopped.
    fn session_settings(&self) -> String {
        format!(
            "SET statement_timeout = 0; SET idle_in_transaction_session_timeout = 0; \
             DO $$ BEGIN IF current_setting('session_replication_role') = 'replica' THEN RAISE EXCEPTION \
             'sessions of this database or role run with session_replication_role = replica: triggers and \
             foreign-key actions are off, and migrations would skip what they do (RESET \
             session_replication_role on the database or role)'; END IF; END $$; \
             DO $$ BEGIN SET lc_messages = 'C'; EXCEPTION WHEN insufficient_privilege THEN NULL; END $$; \
             SET lock_timeout = {}; \
             DO $$ BEGIN SET idle_session_timeout = 0; EXCEPTION WHEN undefined_object THEN NULL; END $$; \
             DO $$ BEGIN SET transaction_timeout = 0; EXCEPTION WHEN undefined_object THEN NULL; END $$; \
             SET CLIENT_ENCODING TO 'UTF8'; SET TIME ZONE 'UTC'; SET standard_conforming_strings = on",
            self.table_lock_timeout.as_millis()
        )
    }

    /// Gives `conn` the [`session_settings`](Self::session_settings);
    /// returns its backend pid. A server that only reads is refused here,
    /// before the lock.
    fn configure_session(&self, conn: &mut PgConnection) -> Result<i32, MigrateError> {
        conn.batch_execute(&self.session_settings())
            .map_err(|source| MigrateError::Database { context: "configuring the runner's session", source })?;
        let (pid, read_only, in_recovery, source) = diesel::select(diesel::dsl::sql::<(Integer, Bool, Bool, Text)>(
            "pg_backend_pid(), current_setting('transaction_read_only')::bool, pg_is_in_recovery(), \
                 coalesce((SELECT source FROM pg_settings WHERE name = 'default_transaction_read_only'), '')",
        ))
        .get_result::<(i32, bool, bool, String)>(conn)
        .map_err(|source| MigrateError::Database { context: "reading the backend pid", source })?;
        if read_only || in_recovery {
            // Set for this connection (its URL, its role, its database), it
            // stays however often the start is retried; set in the server's
            // configuration (a switchover's old primary), it may not.
            let per_connection = ["client", "user", "database", "database user"].contains(&source.as_str());
            let set_by = (!in_recovery && per_connection).then_some(source);
            return Err(MigrateError::ReadOnlyServer { in_recovery, set_by });
        }
        Ok(pid)
    }

    /// Applies one migration, reporting before and after, retrying lock
    /// timeouts ([`retrying_lock_timeouts`](Self::retrying_lock_timeouts)).
    fn apply_one(
        &self,
        harness: &mut DployrHarness<'_>,
        file: &MigrationFile,
        progress: &mut dyn FnMut(&MigrationEvent),
    ) -> Result<Duration, MigrateError> {
        progress(&MigrationEvent::Applying { name: file.name().to_owned() });
        let duration = self.retrying_lock_timeouts(harness, file, progress, |harness| harness.apply(file))?;
        progress(&MigrationEvent::Applied { name: file.name().to_owned(), duration });
        Ok(duration)
    }

    /// Runs one file of `file` (`run`: its apply or its revert). One that
    /// ran into `lock_timeout` in a transaction rolled back whole, its
    /// bookkeeping with it, and is tried again, up to `lock_attempts` times,
    /// with a pause that doubles; one outside a transaction may have done
    /// part of its work, and fails at once.
    fn retrying_lock_timeouts(
        &self,
        harness: &mut DployrHarness<'_>,
        file: &MigrationFile,
        progress: &mut dyn FnMut(&MigrationEvent),
        mut run: impl FnMut(&mut DployrHarness<'_>) -> Result<Duration, MigrateError>,
    ) -> Result<Duration, MigrateError> {
        let connection_url = self.connection_url();
        let mut pause = Duration::from_millis(250);
        let mut attempt = 0;
        // What a watcher saw last, of any attempt, and on which: on a busy
        // machine one attempt's watcher may connect too late to see its wait.
        let mut last_seen: Option<(u32, String)> = None;
        loop {
            attempt += 1;
            let watcher = LockWatcher::start(&connection_url, harness.backend_pid());
            let result = run(harness);
            if let Some(seen) = watcher.finish() {
                last_seen = Some((attempt, seen));
            }
            match result {
                Ok(duration) => return Ok(duration),
                Err(error) if is_lock_timeout(&error) => {
                    let waited_for = match &last_seen {
                        Some((seen_on, seen)) if *seen_on == attempt => seen.clone(),
                        Some((seen_on, seen)) => format!("{seen} (as seen on attempt {seen_on})"),
                        None => "a lock (not seen by the watcher)".to_owned(),
                    };
                    if attempt >= self.lock_attempts || !file.run_in_transaction() {
                        return Err(MigrateError::LockNotAvailable {
                            name: file.name().to_owned(),
                            attempts: attempt,
                            lock_timeout: self.table_lock_timeout,
                            waited_for,
                        });
                    }
                    let retry_in = pause + Duration::from_millis(rand::random_range(0..=pause.as_millis() as u64 / 4));
                    progress(&MigrationEvent::LockWait { name: file.name().to_owned(), waited_for, attempt, retry_in });
                    thread::sleep(retry_in);
                    pause = (pause * 2).min(Duration::from_secs(8));
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Runs `work` on a dedicated connection holding the migration lock,
    /// after verifying the applied migrations (read once, under the lock, and
    /// handed to `work`) against the set.
    fn locked<T>(
        &self,
        newer_release_allowed: bool,
        progress: &mut dyn FnMut(&MigrationEvent),
        work: impl FnOnce(&mut DployrHarness<'_>, &[AppliedRow], &mut dyn FnMut(&MigrationEvent)) -> Result<T, MigrateError>,
    ) -> Result<T, MigrateError> {
        // The probe's second connection is opened first, so the runner's
        // waits a round trip, not a connect, before its settings (a short
        // `idle_session_timeout` of the role or the database would end it);
        // and the settings come after the probe, never on a server
        // connection of a transaction pooler that other clients get next.
        let mut other = self.connect()?;
        let mut conn = self.connect()?;
        self.refuse_transaction_pooler(&mut conn, &mut other)?;
        drop(other);
        let backend_pid = self.configure_session(&mut conn)?;
        self.acquire_lock(&mut conn, progress)?;
        let result = DployrHarness::new(&mut conn, &self.set, self.session_settings()).and_then(|mut harness| {
            harness.set_backend_pid(backend_pid);
            let applied = harness.applied_rows()?;
            let newer = verify(&self.set, &applied, newer_release_allowed)?;
            if !newer.is_empty() {
                progress(&MigrationEvent::NewerReleaseApplied { names: newer });
            }
            work(&mut harness, &applied, progress)
        });
        // The lock is session-level: it would also go when `conn` drops at
        // the end of this function, even if the unlock below cannot run
        // (a broken connection). Unlocking explicitly just makes it prompt.
        match diesel::select(pg_advisory_unlock(Self::LOCK_KEY)).get_result::<bool>(&mut conn) {
            Err(unlock_error) => result
                .and(Err(MigrateError::Database { context: "releasing the migration lock", source: unlock_error })),
            // Not held by this session: the statements went to another
            // server connection (a transaction pooler the probe missed).
            Ok(false) => result.and(Err(MigrateError::TransactionPooler)),
            Ok(true) => result,
        }
    }

    fn acquire_lock(
        &self,
        conn: &mut PgConnection,
        progress: &mut dyn FnMut(&MigrationEvent),
    ) -> Result<(), MigrateError> {
        let started = Instant::now();
        let mut pause = Duration::from_millis(20);
        let mut told = false;
        loop {
            let locked = diesel::select(pg_try_advisory_lock(Self::LOCK_KEY))
                .get_result::<bool>(conn)
                .map_err(|source| MigrateError::Database { context: "taking the migration lock", source })?;
            if locked {
                return Ok(());
            }
            let waited = started.elapsed();
            if waited >= self.lock_timeout {
                return Err(MigrateError::LockTimeout { waited });
            }
            if !told {
                progress(&MigrationEvent::WaitingForLock);
                told = true;
            }
            thread::sleep(pause.min(self.lock_timeout - waited));
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }
}

/// Refuses, by name, an applied migration whose text changed or that the set
/// does not have. Runs before anything is applied or reverted. With
/// `newer_release_allowed`, unknown migrations all newer than the set's
/// latest, with every migration of the set applied, are no refusal: their
/// names are returned (see [`MigrationRunner::allowing_a_newer_release`]).
fn verify(
    set: &MigrationSet,
    applied: &[AppliedRow],
    newer_release_allowed: bool,
) -> Result<Vec<String>, MigrateError> {
    let latest = set.iter().map(MigrationFile::version).max_by(|a, b| version_order(a, b));
    let mut newer = Vec::new();
    for row in applied {
        match set.get(&row.version) {
            Some(file) => check(file, row)?,
            None if newer_release_allowed && latest.is_some_and(|latest| is_newer_version(&row.version, latest)) => {
                newer.push(row.name.clone());
            }
            None => return Err(MigrateError::MissingFromSource { name: row.name.clone() }),
        }
    }
    // One of the set's still pending beside a newer release's: the newer
    // release never had it (another branch); its schema is unknown here.
    let all_applied = set.iter().all(|file| applied.iter().any(|row| row.version == file.version()));
    match newer.first() {
        Some(name) if !all_applied => Err(MigrateError::MissingFromSource { name: name.clone() }),
        _ => Ok(newer),
    }
}

/// Refuses a pending migration older than an applied one (see
/// [`MigrateError::OutOfOrder`]), naming the earliest such and the latest
/// applied. Runs after [`verify`], so every applied row is the set's (or a
/// newer release's, and then nothing of the set is pending).
fn refuse_out_of_order(pending: &[&MigrationFile], applied: &[AppliedRow]) -> Result<(), MigrateError> {
    let Some(latest) = applied.iter().max_by(|a, b| version_order(&a.version, &b.version)) else { return Ok(()) };
    let earliest = pending
        .iter()
        .filter(|file| version_order(file.version(), &latest.version).is_lt())
        .min_by(|a, b| version_order(a.version(), b.version()));
    match earliest {
        Some(file) => Err(MigrateError::OutOfOrder { pending: file.name().to_owned(), applied: latest.name.clone() }),
        None => Ok(()),
    }
}

/// The order of two versions: as numbers where both are (`015`, a
/// timestamp), else as text; as `health()` compares them.
fn version_order(a: &str, b: &str) -> std::cmp::Ordering {
    match (a.parse::<u128>(), b.parse::<u128>()) {
        (Ok(a), Ok(b)) => a.cmp(&b),
        _ => a.cmp(b),
    }
}

/// Whether the migration version `version` is a newer release's than
/// `latest`: after it both as a number and as text (the order in which a
/// set applies its migrations), and a number where `latest` is one. A
/// version of another width (`0016` beside `015`) is newer by one order
/// and not the other, and is not; nor is one another tool named (`v016`,
/// `015a` beside `015`).
///
/// ```
/// use dployr_migrate::is_newer_version;
/// assert!(is_newer_version("016", "015") && is_newer_version("20260101120000", "20251231000000"));
/// assert!(!is_newer_version("0016", "015") && !is_newer_version("015", "015"));
/// assert!(!is_newer_version("v016", "015") && !is_newer_version("015a", "015"));
/// ```
pub fn is_newer_version(version: &str, latest: &str) -> bool {
    let numbered_as_latest = latest.parse::<u128>().is_err() || version.parse::<u128>().is_ok();
    numbered_as_latest && version_order(version, latest).is_gt() && version > latest
}

/// The rule for one applied migration: same folder name, same `up.sql`.
/// [`MigrationRunner::status`] shows it, [`verify`] enforces it.
fn check(file: &MigrationFile, row: &AppliedRow) -> Result<(), MigrateError> {
    if file.name() != row.name {
        return Err(MigrateError::Renamed {
            version: row.version.clone(),
            recorded: row.name.clone(),
            current: file.name().to_owned(),
        });
    }
    if file.checksum() != row.checksum {
        return Err(MigrateError::ChecksumMismatch {
            name: file.name().to_owned(),
            recorded: row.checksum.clone(),
            current: file.checksum().to_owned(),
        });
    }
    Ok(())
}

/// Whether a migration failed for a lock it could not have: `lock_timeout`
/// expired (55P03), or PostgreSQL broke a deadlock with a write beside it
/// by aborting the migration (40P01: the stores take their table locks in
/// the order their statements run, which a migration locking several
/// tables cannot always match). Either way it rolled back whole and may
/// run again. Told by PostgreSQL's untranslated messages.
fn is_lock_timeout(error: &MigrateError) -> bool {
    matches!(error, MigrateError::MigrationFailed(failure)
        if failure.message == "canceling statement due to lock timeout"
            || failure.message.starts_with("could not obtain lock on ")
            || failure.message == "deadlock detected")
}

/// Watches, from a second session, which lock the runner's backend waits
/// for, so that a lock timeout can name the lock and who held it.
struct LockWatcher {
    stop: std::sync::mpsc::Sender<()>,
    thread: Option<thread::JoinHandle<Option<String>>>,
}

impl LockWatcher {
    /// How often the watcher looks.
    const EVERY: Duration = Duration::from_millis(50);

    /// What `pid` waits for: lock mode, object, and the blocking sessions.
    const QUERY: &str = "SELECT l.mode || ' on ' || coalesce('table ' || l.relation::regclass::text, l.locktype) \
        || coalesce(', held by ' || (SELECT string_agg('pid ' || b.pid || ' (' \
        || coalesce(nullif(b.application_name, ''), 'no application_name') || ', ' || b.state || ': ' \
        || left(b.query, 80) || ')', '; ') FROM pg_stat_activity b WHERE b.pid = ANY (pg_blocking_pids(l.pid))), '') \
        AS waiting FROM pg_locks l WHERE l.pid = $1 AND NOT l.granted LIMIT 1";

    /// `connection_url`: the runner's, with its connect timeout, so that
    /// [`finish`](Self::finish) never waits long for a connection.
    fn start(connection_url: &str, pid: Option<i32>) -> Self {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let url = connection_url.to_owned();
        let thread = pid.and_then(|pid| {
            thread::Builder::new()
                .name("dployr-migrate-lock-watcher".into())
                .spawn(move || {
                    let mut conn = PgConnection::establish(&url).ok()?;
                    conn.set_prepared_statement_cache_size(CacheSize::Disabled);
                    let mut seen = None;
                    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(Self::EVERY) {
                        let waiting: Option<String> = diesel::sql_query(Self::QUERY)
                            .bind::<Integer, _>(pid)
                            .get_result::<WaitRow>(&mut conn)
                            .optional()
                            .ok()
                            .flatten()
                            .map(|row| row.waiting);
                        if waiting.is_some() {
                            seen = waiting;
                        }
                    }
                    seen
                })
                .ok()
        });
        Self { stop, thread }
    }

    /// Stops watching; the last lock seen waited for, if any.
    fn finish(mut self) -> Option<String> {
        let _already_stopped = self.stop.send(());
        self.thread.take().and_then(|thread| thread.join().ok().flatten())
    }
}

#[derive(QueryableByName)]
struct WaitRow {
    #[diesel(sql_type = Text)]
    waiting: String,
}

fn duration_of(row: &AppliedRow) -> Duration {
    Duration::from_millis(u64::try_from(row.duration_ms).unwrap_or(0))
}
