//! The bookkeeping of applied migrations in the `_migrations` table (the
//! original data layer's name).
//!
//! diesel's own harness keeps `__diesel_schema_migrations(version, run_on)`;
//! ours adds what the runner needs to refuse edited files and to report
//! timings: the name, a checksum of `up.sql`, `applied_at` as TIMESTAMPTZ
//! and the execution time.
//!
//! The harness applies one migration at a time and does not lock, so it is
//! private: only [`crate::MigrationRunner`], which takes the advisory lock
//! and verifies checksums first, calls it. It is deliberately not diesel's
//! `MigrationHarness`, nor is a `MigrationSet` a diesel `MigrationSource`:
//! with diesel's blanket harness on every connection, either would let
//! `conn.run_pending_migrations(..)` apply migrations with no lock, no
//! checksum and into diesel's own table.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use diesel::connection::SimpleConnection;
use diesel::pg::{Pg, PgConnection};
use diesel::prelude::*;

use crate::sql_lexer::{Token, tokens};
use crate::{MigrateError, MigrationFile, MigrationSet};

diesel::table! {
    /// One row per applied migration.
    _migrations (version) {
        version -> Text,
        name -> Text,
        checksum -> Text,
        applied_at -> Timestamptz,
        duration_ms -> BigInt,
    }
}

/// The bookkeeping table, created only where it is missing: `CREATE TABLE IF NOT EXISTS` alone
/// asks for the right to create in the schema before it looks, which a role
/// that is not the schema's owner lacks on PostgreSQL 15 (`public` no longer
/// grants it), so every start of an up-to-date database failed.
const CREATE_TABLE: &str = "DO $$ BEGIN IF to_regclass('_migrations') IS NULL THEN
CREATE TABLE IF NOT EXISTS _migrations (
    version     TEXT        PRIMARY KEY,
    name        TEXT        NOT NULL,
    checksum    TEXT        NOT NULL,
    applied_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    duration_ms BIGINT      NOT NULL
);
END IF; END $$";

/// A row of `_migrations`.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = _migrations, check_for_backend(Pg))]
pub(crate) struct AppliedRow {
    pub(crate) version: String,
    pub(crate) name: String,
    pub(crate) checksum: String,
    pub(crate) applied_at: DateTime<Utc>,
    pub(crate) duration_ms: i64,
}

/// Applies and reverts migrations of one [`MigrationSet`] on one connection,
/// recording each in `_migrations` in the same transaction as its SQL.
pub(crate) struct DployrHarness<'a> {
    conn: &'a mut PgConnection,
    set: &'a MigrationSet,
    /// The SQL that gives the session the runner's settings, run again
    /// after every file (see [`end_the_files_settings`]).
    session_settings: String,
    backend_pid: Option<i32>,
}

impl std::fmt::Debug for DployrHarness<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DployrHarness").field("migrations", &self.set.len()).finish_non_exhaustive()
    }
}

impl<'a> DployrHarness<'a> {
    /// Wraps a connection whose session `session_settings` (SQL) has
    /// configured, creating `_migrations` if it does not exist.
    ///
    /// # Errors
    /// [`MigrateError::Database`] if the table cannot be created.
    pub(crate) fn new(
        conn: &'a mut PgConnection,
        set: &'a MigrationSet,
        session_settings: String,
    ) -> Result<Self, MigrateError> {
        conn.batch_execute(CREATE_TABLE)
            .map_err(|source| MigrateError::Database { context: "creating _migrations", source })?;
        Ok(Self { conn, set, session_settings, backend_pid: None })
    }

    /// The server process of the connection, for the runner's lock watcher.
    pub(crate) fn set_backend_pid(&mut self, pid: i32) {
        self.backend_pid = Some(pid);
    }

    pub(crate) fn backend_pid(&self) -> Option<i32> {
        self.backend_pid
    }

    /// Every row of `_migrations`, by version.
    pub(crate) fn applied_rows(&mut self) -> Result<Vec<AppliedRow>, MigrateError> {
        read_applied_rows(self.conn)
    }

    /// Applies one migration and records it; returns the execution time.
    pub(crate) fn apply(&mut self, migration: &MigrationFile) -> Result<Duration, MigrateError> {
        let sql = migration.up_sql();
        run_file(self.conn, &self.session_settings, migration, "up.sql", sql, |conn, elapsed| {
            record(conn, migration, elapsed)
        })
    }

    /// Reverts one applied migration and deletes its row; returns the time
    /// its `down.sql` took.
    pub(crate) fn revert(&mut self, migration: &MigrationFile) -> Result<Duration, MigrateError> {
        let down =
            migration.down_sql().ok_or_else(|| MigrateError::NoDownFile { name: migration.name().to_owned() })?;
        run_file(self.conn, &self.session_settings, migration, "down.sql", down, |conn, _| {
            diesel::delete(_migrations::table.find(migration.version()))
                .execute(conn)
                .map(drop)
                .map_err(|source| MigrateError::Database { context: "removing the migration from _migrations", source })
        })
    }
}

pub(crate) fn read_applied_rows(conn: &mut PgConnection) -> Result<Vec<AppliedRow>, MigrateError> {
    match _migrations::table.select(AppliedRow::as_select()).order(_migrations::version.asc()).load(conn) {
        Ok(rows) => Ok(rows),
        // Looked at only when the read failed, so a run pays nothing for it.
        Err(source) => match columns_of_another_shape(conn) {
            Some(columns) => Err(MigrateError::ForeignMigrationsTable { columns }),
            None => Err(MigrateError::Database { context: "reading _migrations", source }),
        },
    }
}

/// The columns of `_migrations` when it lacks one this runner records (a
/// table another tool made under the name, such as the original TypeScript
/// data layer's `_migrations(filename, applied_at)`); `None` when it has
/// them all, or when they cannot be read.
fn columns_of_another_shape(conn: &mut PgConnection) -> Option<Vec<String>> {
    let columns = diesel::select(diesel::dsl::sql::<diesel::sql_types::Array<diesel::sql_types::Text>>(
        "coalesce((SELECT array_agg(attname::text ORDER BY attnum) FROM pg_attribute \
         WHERE attrelid = to_regclass('_migrations') AND attnum > 0 AND NOT attisdropped), '{}')",
    ))
    .get_result::<Vec<String>>(conn)
    .ok()?;
    let ours = ["version", "name", "checksum", "applied_at", "duration_ms"];
    let lacks_one = ours.iter().any(|column| !columns.iter().any(|found| found == column));
    (lacks_one && !columns.is_empty()).then_some(columns)
}

/// Runs one file of `migration` and then its bookkeeping, both in one
/// transaction unless the migration opts out; every setting the file made
/// ends before the bookkeeping (`session_settings`: the runner's own).
fn run_file(
    conn: &mut PgConnection,
    session_settings: &str,
    migration: &MigrationFile,
    file: &'static str,
    sql: &str,
    bookkeeping: impl FnOnce(&mut PgConnection, Duration) -> Result<(), MigrateError>,
) -> Result<Duration, MigrateError> {
    if !holds_a_statement(sql) {
        return Err(MigrateError::EmptyFile { name: migration.name().to_owned(), file });
    }
    let failed = |e| MigrateError::failed(migration.name(), file, sql, e);
    if let Some(statement) = crate::transaction_control::first_transaction_control(sql) {
        let name = migration.name().to_owned();
        return Err(if migration.run_in_transaction() {
            MigrateError::TransactionControl { name, file, statement }
        } else {
            MigrateError::TransactionControlOutside { name, file, statement }
        });
    }
    if migration.run_in_transaction() {
        return run_in_a_transaction(conn, session_settings, migration, file, sql, bookkeeping);
    }
    // Outside a transaction the file goes through the extended protocol as
    // one prepared statement: PostgreSQL refuses a text with more than one
    // command there before running any of it. (A simple-protocol batch would
    // run as one implicit transaction, which CREATE INDEX CONCURRENTLY
    // refuses.) If the bookkeeping then fails, the statement stays done but
    // unrecorded: the error says so through its context.
    //
    // A concurrent build (`CREATE INDEX CONCURRENTLY`, `REINDEX ...
    // CONCURRENTLY`) waits for every transaction writing its table, and
    // queues nobody behind it while it waits: the runner's lock_timeout,
    // which bounds how long a migration waiting for a lock holds up the
    // traffic queued behind it, would only cut it short and leave an
    // invalid index behind. It runs without one (the runner's comes back
    // with its other settings after the file).
    holds_the_migration_lock(conn)?;
    if builds_concurrently(sql) {
        conn.batch_execute("SET lock_timeout = 0")
            .map_err(|source| MigrateError::Database { context: "lifting lock_timeout", source })?;
    }
    let started = Instant::now();
    let ran = diesel::sql_query(sql).execute(conn).map(drop).map_err(failed);
    let elapsed = started.elapsed();
    // Whether it ran or failed: a failed statement rolled back what it set,
    // but not the lock_timeout lifted above.
    let ended = end_the_files_settings(conn, session_settings);
    // The statement's own error first: it names the file and position.
    ran?;
    ended?;
    bookkeeping(conn, elapsed)?;
    Ok(elapsed)
}

/// Runs `sql` and its bookkeeping in one transaction
/// ([`run_in_its_transaction`]), and answers with the error of the file
/// when it failed, even when the rollback failed too.
fn run_in_a_transaction(
    conn: &mut PgConnection,
    session_settings: &str,
    migration: &MigrationFile,
    file: &'static str,
    sql: &str,
    bookkeeping: impl FnOnce(&mut PgConnection, Duration) -> Result<(), MigrateError>,
) -> Result<Duration, MigrateError> {
    // What the transaction's work ended as, kept here: when the file ended
    // the transaction itself, diesel's rollback fails (`NotInTransaction`)
    // and diesel answers with that error in place of the work's.
    let mut outcome = None;
    let committed = conn.transaction(|conn| {
        let ran = run_in_its_transaction(conn, session_settings, migration, file, sql, bookkeeping);
        let failed = ran.is_err();
        outcome = Some(ran);
        if failed { Err(diesel::result::Error::RollbackTransaction) } else { Ok(()) }
    });
    match (outcome, committed) {
        (Some(Ok(elapsed)), Ok(())) => Ok(elapsed),
        (Some(Err(error)), _) => Err(error),
        (Some(Ok(_)) | None, Err(source)) => {
            Err(MigrateError::Database { context: "beginning or committing the migration's transaction", source })
        }
        (None, Ok(())) => Err(MigrateError::Database {
            context: "beginning or committing the migration's transaction",
            source: diesel::result::Error::NotInTransaction,
        }),
    }
}

/// The transactional part of [`run_file`]: the file, in the transaction
/// the caller opened, then its bookkeeping. A savepoint taken before the
/// file tells whether the transaction is still the runner's after it: the
/// lexer's check refuses every `COMMIT` or `ROLLBACK` it finds, and this is
/// what remains if one got past it (a file ending the transaction leaves
/// no savepoint to release or roll back to): the run stops there, naming
/// the file, before anything is recorded.
fn run_in_its_transaction(
    conn: &mut PgConnection,
    session_settings: &str,
    migration: &MigrationFile,
    file: &'static str,
    sql: &str,
    bookkeeping: impl FnOnce(&mut PgConnection, Duration) -> Result<(), MigrateError>,
) -> Result<Duration, MigrateError> {
    const SAVEPOINT: &str = "dployr_migration_file";
    holds_the_migration_lock(conn)?;
    conn.batch_execute(&format!("SAVEPOINT {SAVEPOINT}"))
        .map_err(|source| MigrateError::Database { context: "taking a savepoint before the migration", source })?;
    let started = Instant::now();
    let ended_its_transaction = |cause: Option<MigrateError>| MigrateError::EndedItsTransaction {
        name: migration.name().to_owned(),
        file,
        cause: cause.map(Box::new),
    };
    if let Err(source) = conn.batch_execute(sql) {
        let error = MigrateError::failed(migration.name(), file, sql, source);
        // Rolled back to the savepoint: the file failed inside the
        // transaction, which rolls back whole. No savepoint: the file ended
        // the transaction before it failed.
        return Err(match conn.batch_execute(&format!("ROLLBACK TO SAVEPOINT {SAVEPOINT}")) {
            Err(_) if !error.is_connection_lost() => ended_its_transaction(Some(error)),
            _ => error,
        });
    }
    if let Err(source) = conn.batch_execute(&format!("RELEASE SAVEPOINT {SAVEPOINT}")) {
        let error = MigrateError::Database { context: "releasing the savepoint after the migration", source };
        // A connection lost after the file ran ended nothing of its own:
        // nothing is committed, and a retry runs it whole.
        return Err(if error.is_connection_lost() { error } else { ended_its_transaction(None) });
    }
    // Constraints the file's data left deferred (the schema's one-owner
    // guard is checked at commit) are checked now, so that a refusal is the
    // file's error, naming it, and not the commit's after the bookkeeping.
    conn.batch_execute("SET CONSTRAINTS ALL IMMEDIATE")
        .map_err(|source| MigrateError::failed(migration.name(), file, sql, source))?;
    let elapsed = started.elapsed();
    // In the file's transaction: if it rolls back, so does every setting
    // the file made, and the session is the runner's again.
    end_the_files_settings(conn, session_settings)?;
    bookkeeping(conn, elapsed)?;
    Ok(elapsed)
}

/// Refuses to go on unless the server connection running this statement
/// holds the migration lock. The pooler probe before the lock can miss a
/// transaction pooler (a busy pool hands the probe's second client another
/// server connection); then the lock was taken on some server connection
/// and each migration would run on whichever comes, beside another
/// runner's. Checked inside each migration's transaction, which a
/// transaction pooler keeps on one server connection, so a migration in a
/// transaction either runs under the lock or not at all. One outside a
/// transaction (`run_in_transaction = false`) is checked just before it,
/// in a statement of its own, which behind such a pooler may reach another
/// server connection than the migration's: there the check is best effort.
fn holds_the_migration_lock(conn: &mut PgConnection) -> Result<(), MigrateError> {
    let key = crate::MigrationRunner::LOCK_KEY;
    // pg_locks shows a bigint advisory key as its high and low halves.
    let (high, low) = ((key >> 32) & 0xffff_ffff, key & 0xffff_ffff);
    let held = diesel::select(diesel::dsl::sql::<diesel::sql_types::Bool>(&format!(
        "EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted \
         AND classid::bigint = {high} AND objid::bigint = {low} AND objsubid = 1)"
    )))
    .get_result::<bool>(conn)
    .map_err(|source| MigrateError::Database { context: "checking the migration lock", source })?;
    if held { Ok(()) } else { Err(MigrateError::TransactionPooler) }
}

/// Ends every setting a migration file made for its session and gives it
/// the runner's settings (`session_settings`) again. A plain `SET` outlives
/// the transaction that made it: a pasted `pg_dump` header (`SET
/// lock_timeout = 0`, an empty search path, `SET session_replication_role
/// = replica`, ...) would otherwise run the bookkeeping, with its
/// unqualified `_migrations`, and every later migration of the run with
/// no lock timeout, or with triggers and foreign keys off. `RESET ALL`
/// leaves the session's user and role, hence the two other `RESET`s. And
/// `DISCARD TEMP` drops the file's temporary tables, which would otherwise
/// stand in the way of (or in for) a later file's tables of that name.
fn end_the_files_settings(conn: &mut PgConnection, session_settings: &str) -> Result<(), MigrateError> {
    conn.batch_execute(&format!("RESET ALL; RESET SESSION AUTHORIZATION; RESET ROLE; DISCARD TEMP; {session_settings}"))
        .map_err(|source| MigrateError::Database { context: "ending the migration's session settings", source })
}

/// Whether `sql` names `CONCURRENTLY` as a word (a concurrent index build
/// or drop); in a comment, a string or a quoted name it does not count.
fn builds_concurrently(sql: &str) -> bool {
    tokens(sql).any(|token| matches!(token, Token::Word(word) if word.eq_ignore_ascii_case("CONCURRENTLY")))
}

/// Whether `sql` holds anything but whitespace, `;` and comments.
/// PostgreSQL answers a text without a statement with "empty query" and no
/// hint of the file.
fn holds_a_statement(sql: &str) -> bool {
    tokens(sql).any(|token| token != Token::Semicolon)
}

fn record(conn: &mut PgConnection, migration: &MigrationFile, elapsed: Duration) -> Result<(), MigrateError> {
    let duration_ms = i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX);
    diesel::insert_into(_migrations::table)
        .values((
            _migrations::version.eq(migration.version()),
            _migrations::name.eq(migration.name()),
            _migrations::checksum.eq(migration.checksum()),
            _migrations::duration_ms.eq(duration_ms),
        ))
        .execute(conn)
        .map_err(|source| MigrateError::Database { context: "recording the migration in _migrations", source })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use diesel::connection::SimpleConnection as _;
    use diesel::prelude::*;

    use super::{builds_concurrently, holds_a_statement, run_in_a_transaction};
    use crate::{MigrateError, MigrationRunner, MigrationSet};

    /// Runs `sql` as a migration's transactional part the way `run_file`
    /// does after its check of the text, which this skips: what the
    /// runner does when a `COMMIT` gets past that check. Returns the answer,
    /// whether the bookkeeping ran, and whether table `b` exists after.
    fn run_unchecked(sql: &str) -> (Result<std::time::Duration, MigrateError>, bool, bool) {
        let db = dployr_testkit::empty_database();
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("001_b")).unwrap();
        std::fs::write(dir.path().join("001_b/up.sql"), sql).unwrap();
        let set = MigrationSet::from_dir(dir.path()).unwrap();
        let migration = set.get("001").unwrap();
        let mut conn = db.connect();
        conn.batch_execute(&format!("SELECT pg_advisory_lock({})", MigrationRunner::LOCK_KEY)).unwrap();
        let recorded = Cell::new(false);
        let answer = run_in_a_transaction(&mut conn, "SET TIME ZONE 'UTC'", migration, "up.sql", sql, |_, _| {
            recorded.set(true);
            Ok(())
        });
        let b_exists = diesel::select(diesel::dsl::sql::<diesel::sql_types::Bool>("to_regclass('b') IS NOT NULL"))
            .get_result(&mut conn)
            .unwrap();
        (answer, recorded.get(), b_exists)
    }

    #[test]
    fn a_file_that_ends_its_transaction_unseen_is_named_and_not_recorded() {
        // A statement failing after the COMMIT: its error is kept as the
        // cause (diesel's failed rollback used to replace it).
        let (answer, recorded, b_exists) = run_unchecked("CREATE TABLE b (id int);\nCOMMIT;\nSELECT 1/0;");
        match answer {
            Err(MigrateError::EndedItsTransaction { ref name, file: "up.sql", cause: Some(ref cause) }) => {
                assert_eq!(name, "001_b");
                assert!(cause.to_string().contains("division by zero"), "{cause}");
            }
            other => panic!("expected EndedItsTransaction with the file's error, got {other:?}"),
        }
        assert!(!recorded && b_exists, "what ran before the COMMIT stays; nothing is recorded");
        // Nothing failing after it: still refused, before the bookkeeping.
        let (answer, recorded, _) = run_unchecked("CREATE TABLE b (id int);\nCOMMIT;\nCREATE TABLE c (id int);");
        assert!(matches!(answer, Err(MigrateError::EndedItsTransaction { cause: None, .. })), "{answer:?}");
        assert!(!recorded);
        // Ended and begun again: the savepoint is gone all the same.
        let (answer, recorded, _) =
            run_unchecked("CREATE TABLE b (id int);\nCOMMIT;\nBEGIN;\nCREATE TABLE c (id int);");
        assert!(matches!(answer, Err(MigrateError::EndedItsTransaction { cause: None, .. })), "{answer:?}");
        assert!(!recorded);
    }

    #[test]
    fn a_file_failing_inside_its_transaction_is_its_own_error_and_leaves_nothing() {
        let (answer, recorded, b_exists) = run_unchecked("CREATE TABLE b (id int);\nSELECT 1/0;");
        assert!(matches!(answer, Err(MigrateError::MigrationFailed(_))), "{answer:?}");
        assert!(!recorded && !b_exists);
        let (answer, recorded, b_exists) = run_unchecked("CREATE TABLE b (id int);");
        assert!(answer.is_ok() && recorded && b_exists, "{answer:?}");
    }

    #[test]
    fn only_a_statement_that_names_concurrently_builds_concurrently() {
        assert!(builds_concurrently("CREATE INDEX CONCURRENTLY a_idx ON a (x);"));
        assert!(builds_concurrently("-- lead\ncreate unique index concurrently a_idx on a (x)"));
        assert!(builds_concurrently("DROP INDEX CONCURRENTLY a-b"));
        assert!(!builds_concurrently("VACUUM FULL a; -- not CONCURRENTLY"));
        assert!(!builds_concurrently("/* CONCURRENTLY */ ALTER TYPE mood ADD VALUE 'meh'"));
        assert!(!builds_concurrently("SELECT 4/2 - 1"));
    }

    #[test]
    fn concurrently_in_a_string_or_a_nested_comment_is_not_a_concurrent_build() {
        assert!(!builds_concurrently("COMMENT ON INDEX a_idx IS 'built concurrently'"));
        assert!(!builds_concurrently("/* outer /* inner */ CONCURRENTLY */ ALTER TYPE mood ADD VALUE 'meh'"));
        assert!(!builds_concurrently("ALTER TYPE mood ADD VALUE $v$ concurrently $v$"));
        assert!(builds_concurrently("CREATE INDEX /* a -- b */ CONCURRENTLY a_idx ON a ((x || '/*'))"));
        assert!(builds_concurrently("CREATE INDEX \"--\" ON a (x); /* */ CREATE INDEX CONCURRENTLY b ON a (y)"));
    }

    #[test]
    fn a_file_of_nested_comments_holds_no_statement() {
        assert!(!holds_a_statement("/* outer /* inner */ still the comment */\n;\n-- done"));
        assert!(!holds_a_statement(" ;; \n"));
        assert!(holds_a_statement("/* lead */ SELECT 1"));
        assert!(holds_a_statement("-- lead\nSELECT '*/'"));
    }
}
