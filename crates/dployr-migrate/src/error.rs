//! The one error type of the runner: every variant names the migration it is
//! about, so an operator knows which file to open.

use std::fmt;
use std::time::Duration;

/// What went wrong while checking or applying migrations.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The database could not be reached. The failure is classified (a
    /// malformed URL or refused credentials are not worth retrying) and
    /// libpq's text is redacted: it may echo the URL, password included.
    #[error("cannot connect to the database: {0}")]
    Connect(dployr_domain::ConnectFailure),

    /// The migration URL goes through a pooler in transaction mode
    /// (PgBouncer `pool_mode = transaction`): the migration lock is a
    /// session lock, which such a pooler does not keep.
    #[error(
        "the migration database URL goes through a connection pooler in transaction mode (session state \
         set on one connection showed up on another): the migration lock needs a session of its own; \
         point the migrations at PostgreSQL directly or at a session-mode pool (DPLOYR_MIGRATE_DATABASE_URL)"
    )]
    TransactionPooler,

    /// A migration (or its revert) waited for a table lock longer than the
    /// runner's `lock_timeout`, on every attempt: live traffic holds it.
    /// Nothing of the attempts was kept (a reverted migration stays applied).
    #[error(
        "migration {name} could not take its locks: {attempts} attempts of {lock_timeout:?} each ran into lock_timeout; \
         last wait: {waited_for}. Retry when the traffic is lower, or raise the lock timeout"
    )]
    LockNotAvailable {
        /// The folder name of the migration.
        name: String,
        /// How many times it was tried.
        attempts: u32,
        /// PostgreSQL's `lock_timeout` of each attempt.
        lock_timeout: Duration,
        /// The lock it waited for and who held it, as seen from another session.
        waited_for: String,
    },

    /// A migration file holds no statement, only comments (a fresh
    /// `migrate new` template): PostgreSQL would answer "empty query".
    #[error("migration {name}/{file} holds no SQL statement yet (only comments): write the change, then run again")]
    EmptyFile {
        /// The folder name of the migration.
        name: String,
        /// `up.sql` or `down.sql`.
        file: &'static str,
    },

    /// A migration that runs in a transaction holds a statement that would
    /// end or nest it (`COMMIT`, `BEGIN`, ...): refused before it runs, since
    /// what came before it would stay committed and unrecorded.
    #[error(
        "migration {name}/{file} holds {article} {statement} statement: it runs in the transaction that also \
         records it, so remove the statement (or, for one statement that cannot run in a transaction, set \
         run_in_transaction = false in its metadata.toml)",
        article = article(statement)
    )]
    TransactionControl {
        /// The folder name of the migration.
        name: String,
        /// `up.sql` or `down.sql`.
        file: &'static str,
        /// The statement's keywords (`COMMIT`, `START TRANSACTION`, ...).
        statement: &'static str,
    },

    /// A migration that runs outside a transaction (`run_in_transaction =
    /// false`) is one statement, and that statement is transaction control:
    /// a `BEGIN` would leave a transaction open that its bookkeeping then
    /// joins and never commits; the others do nothing or fail. Refused
    /// before it runs.
    #[error(
        "migration {name}/{file} is {article} {statement} statement: it runs outside a transaction, as one statement, \
         where that opens a transaction nothing commits or does nothing; remove it",
        article = article(statement)
    )]
    TransactionControlOutside {
        /// The folder name of the migration.
        name: String,
        /// `up.sql` or `down.sql`.
        file: &'static str,
        /// The statement's keywords (`BEGIN`, `START TRANSACTION`, ...).
        statement: &'static str,
    },

    /// A migration ended the transaction it runs in (a `COMMIT` or
    /// `ROLLBACK` that the check before the run did not find): what it ran
    /// may be committed (before that statement, and after it, each statement
    /// then its own transaction), and it is not recorded. The run stops at
    /// it.
    #[error(
        "migration {name}/{file} ended the transaction it runs in (a COMMIT or ROLLBACK in its text): what it \
         ran may be committed, before that statement and after it, and it is not recorded; remove the statement, \
         check the database by hand, then run again{}",
        cause.as_ref().map(|cause| format!(" (then: {cause})")).unwrap_or_default()
    )]
    EndedItsTransaction {
        /// The folder name of the migration.
        name: String,
        /// `up.sql` or `down.sql`.
        file: &'static str,
        /// The file's own error, when a statement after the end failed.
        cause: Option<Box<MigrateError>>,
    },

    /// The migration database answers but takes no writes: a standby (in
    /// recovery: a replica, or a primary failing over) or a server whose
    /// sessions are read-only (`default_transaction_read_only`). Found
    /// before the lock is taken or anything runs, rather than as the first
    /// migration's failure.
    #[error(
        "the migration database answers but only reads ({}): migrations need the primary; point \
         DPLOYR_MIGRATE_DATABASE_URL (or DATABASE_URL) at it, or try again once a failover has ended",
        match (in_recovery, set_by) {
            (true, _) => "a standby, in recovery".to_owned(),
            (false, Some(source)) => format!(
                "default_transaction_read_only is on, set for this connection ({source}): the URL's options, \
                 the role or the database; retrying will not change it"
            ),
            (false, None) => "default_transaction_read_only is on".to_owned(),
        }
    )]
    ReadOnlyServer {
        /// Whether the server is in recovery (`pg_is_in_recovery()`).
        in_recovery: bool,
        /// Where `default_transaction_read_only` was set, when it was set
        /// for this connection rather than the server (`pg_settings.source`:
        /// `client` for the URL's options or `PGOPTIONS`, `user`,
        /// `database` or `database user` for `ALTER ROLE` / `ALTER
        /// DATABASE`): a setting to change, not a failover to wait out.
        /// `None` on a standby, or when the server's configuration set it.
        set_by: Option<String>,
    },

    /// Another runner held the migration lock for longer than the timeout.
    #[error(
        "another migration runner held the lock for {waited:?}; giving up (raise the lock timeout if its migrations are long)"
    )]
    LockTimeout {
        /// How long this runner waited.
        waited: Duration,
    },

    /// A migration that is recorded as applied has different text now.
    #[error(
        "migration {name}: up.sql changed after it was applied (recorded checksum {recorded}, file now {current}); add a new migration instead of editing an applied one"
    )]
    ChecksumMismatch {
        /// The folder name of the migration.
        name: String,
        /// The checksum stored in `_migrations` when it was applied.
        recorded: String,
        /// The checksum of the text in this binary.
        current: String,
    },

    /// The migration applied under this version had another folder name.
    #[error(
        "migration {current} was applied as {recorded} (same version {version}); renaming an applied migration is refused, as editing one is"
    )]
    Renamed {
        /// The version both names share.
        version: String,
        /// The name recorded in `_migrations`.
        recorded: String,
        /// The folder name in this binary.
        current: String,
    },

    /// A migration is recorded as applied but this binary does not have it.
    #[error(
        "migration {name} is applied to the database but missing from this binary (is the binary older than the database?)"
    )]
    MissingFromSource {
        /// The name recorded in `_migrations`.
        name: String,
    },

    /// A migration of this binary is not applied while a later one of it
    /// is: its row was deleted from `_migrations`, or it was added with a
    /// version below one already applied (another branch's, merged late).
    /// Applying it now would run it on a schema it was not written for, so
    /// [`run_pending`](crate::MigrationRunner::run_pending) refuses before
    /// anything runs.
    #[error(
        "migration {pending} is not applied but the later {applied} is: applying it out of order is refused \
         (if its row was deleted from _migrations, restore the row; if it is new, give it a version after {applied})"
    )]
    OutOfOrder {
        /// The folder name of the earliest such pending migration.
        pending: String,
        /// The folder name of the latest applied migration.
        applied: String,
    },

    /// The first migration failed because what it creates is already
    /// there, while `_migrations` records no migration at all: the schema
    /// was made without this runner's history (`_migrations` dropped or
    /// emptied, or a restore that left its rows out), or the database holds
    /// another application's objects under the same names. Nothing was
    /// applied; applying the migrations again is not the fix.
    #[error(
        "migration {} failed in {}: {}; yet _migrations records no migration: was _migrations dropped or \
         emptied (restore its rows from a backup; do not apply the migrations again), or does this database \
         hold another application's objects of these names?",
        .0.name, .0.file, .0.message
    )]
    SchemaWithoutHistory(Box<MigrationFailure>),

    /// A migration's SQL failed; nothing of it was kept if it ran in a
    /// transaction. Boxed: it is large, and errors travel by value.
    #[error(transparent)]
    MigrationFailed(Box<MigrationFailure>),

    /// A migration cannot be reverted because it has no `down.sql`.
    #[error("migration {name} has no down.sql, so it cannot be reverted")]
    NoDownFile {
        /// The folder name of the migration.
        name: String,
    },

    /// The migrations folder could not be read or is malformed.
    #[error("cannot read migrations: {0}")]
    Source(String),

    /// The database has a `_migrations` table that this runner did not
    /// make, and whose rows it cannot read: the original TypeScript data
    /// layer's (`filename`, `applied_at`), or another tool's under the same
    /// name. Nothing was changed.
    #[error(
        "the database has a _migrations table that this runner did not make (its columns: {list}{whose}), \
         so it cannot tell what is applied; nothing was changed. Check the schema that table records (the \
         original's runner stopped inside its first migration, leaving part of it), rename the table \
         (ALTER TABLE _migrations RENAME TO _migrations_before) and run again",
        list = columns.join(", "),
        whose = if columns.iter().any(|c| c == "filename") { ": the original TypeScript data layer's" } else { "" }
    )]
    ForeignMigrationsTable {
        /// The columns the table has, in order.
        columns: Vec<String>,
    },

    /// Any other database error, with what the runner was doing.
    #[error("{context}: {source}")]
    Database {
        /// What the runner was doing.
        context: &'static str,
        /// The underlying error.
        #[source]
        source: diesel::result::Error,
    },
}

/// "an" before a statement's keywords that begin with a vowel (`END`,
/// `ABORT`), "a" before the others.
fn article(statement: &str) -> &'static str {
    if statement.starts_with(['A', 'E', 'I', 'O', 'U']) { "an" } else { "a" }
}

impl From<diesel::result::Error> for MigrateError {
    fn from(source: diesel::result::Error) -> Self {
        Self::Database { context: "migration bookkeeping", source }
    }
}

/// The details of a failed migration: which file, and what PostgreSQL said.
#[derive(Debug, thiserror::Error)]
#[error("migration {name}/{file} failed{at}: {message}{detail}{hint}",
    at = position.map(|p| format!(" at {p}")).unwrap_or_default(),
    detail = detail.as_deref().map(|d| format!(" (detail: {d})")).unwrap_or_default(),
    hint = hint.as_deref().map(|h| format!(" (hint: {h})")).unwrap_or_default())]
pub struct MigrationFailure {
    /// The folder name of the migration.
    pub name: String,
    /// `up.sql` or `down.sql`.
    pub file: &'static str,
    /// PostgreSQL's message.
    pub message: String,
    /// PostgreSQL's detail, if any.
    pub detail: Option<String>,
    /// PostgreSQL's hint, if any.
    pub hint: Option<String>,
    /// Where in the file PostgreSQL located the error, if it did.
    pub position: Option<SqlPosition>,
    /// The underlying error.
    #[source]
    pub source: diesel::result::Error,
}

impl MigrateError {
    /// Whether the connection to the server was lost under the runner (a
    /// restart, a failover, a session ended by an administrator) rather than
    /// a file or the database refusing something: worth running again
    /// later. A file that runs in a transaction left nothing (it commits
    /// with its row); one that runs outside (`run_in_transaction = false`)
    /// may have been cut part-way and runs again whole: an index it was
    /// building `CONCURRENTLY` is left invalid, to be dropped first.
    pub fn is_connection_lost(&self) -> bool {
        use diesel::result::{DatabaseErrorKind, Error as DieselError};
        let source = match self {
            Self::MigrationFailed(failure) => &failure.source,
            Self::Database { source, .. } => source,
            _ => return false,
        };
        match source {
            DieselError::DatabaseError(
                DatabaseErrorKind::ClosedConnection | DatabaseErrorKind::UnableToSendCommand,
                _,
            )
            | DieselError::BrokenTransactionManager => true,
            // What libpq and the server say as the session ends (57P01-57P03
            // and a dropped socket), untranslated: the runner's session sets
            // `lc_messages` to C where it may.
            DieselError::DatabaseError(_, info) => {
                let message = info.message();
                message.starts_with("terminating connection")
                    || message.starts_with("server closed the connection")
                    || message.starts_with("no connection to the server")
                    || message.starts_with("could not receive data from server")
                    || message == "the database system is shutting down"
                    || message == "the database system is starting up"
            }
            _ => false,
        }
    }

    /// Builds [`MigrateError::MigrationFailed`] from a database error while
    /// running `sql`, turning PostgreSQL's character offset into a line and column.
    pub(crate) fn failed(name: &str, file: &'static str, sql: &str, source: diesel::result::Error) -> Self {
        let (message, detail, hint, position) = match &source {
            diesel::result::Error::DatabaseError(_, info) => (
                info.message().to_owned(),
                info.details().map(str::to_owned),
                info.hint().map(str::to_owned),
                info.statement_position().and_then(|p| SqlPosition::locate(sql, p)),
            ),
            other => (other.to_string(), None, None, None),
        };
        Self::MigrationFailed(Box::new(MigrationFailure {
            name: name.to_owned(),
            file,
            message,
            detail,
            hint,
            position,
            source,
        }))
    }
}

/// A line and column (both from 1) in a migration file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SqlPosition {
    /// Line, from 1.
    pub line: usize,
    /// Column in characters, from 1.
    pub column: usize,
}

impl SqlPosition {
    /// Locates PostgreSQL's 1-based *character* offset in `sql`.
    fn locate(sql: &str, offset: i32) -> Option<Self> {
        let index = usize::try_from(offset).ok()?.checked_sub(1)?;
        let mut position = Self { line: 1, column: 1 };
        for ch in sql.chars().take(index) {
            if ch == '\n' {
                position.line += 1;
                position.column = 1;
            } else {
                position.column += 1;
            }
        }
        Some(position)
    }
}

impl fmt::Display for SqlPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}, column {}", self.line, self.column)
    }
}

#[cfg(test)]
mod tests {
    use super::SqlPosition;

    #[test]
    fn position_counts_lines_and_characters_not_bytes() {
        let sql = "SELECT 1;\nSELECT é, oops;";
        // PostgreSQL's offset 21 is the 'o' of "oops" (characters, from 1).
        assert_eq!(SqlPosition::locate(sql, 21), Some(SqlPosition { line: 2, column: 11 }));
        assert_eq!(SqlPosition::locate(sql, 1), Some(SqlPosition { line: 1, column: 1 }));
        assert_eq!(SqlPosition::locate(sql, 0), None);
    }
}
