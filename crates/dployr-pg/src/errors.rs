//! PostgreSQL errors as `StoreError`s: the one mapper of the workspace, used
//! by the stores of this crate and by the PostgreSQL key-value backend of
//! `dployr-kv` (through [`store_error`]).
//!
//! An error that names a constraint (or a trigger that raises with
//! `CONSTRAINT = ...`) is mapped by that name, from one table
//! ([`constraint_rule`]); a test reads every constraint and trigger of the
//! migrated schema from the catalog and checks that each has a rule. Other
//! errors are mapped by their class: diesel's `DatabaseErrorKind`, which
//! comes from the SQLSTATE.
//!
//! diesel 2.3 turns only some SQLSTATEs into a kind and exposes no other
//! way to read the code. Deadlocks (40P01), lock timeouts (55P03),
//! cancelled statements (57014), a full disk (53100) and exhausted memory
//! (53200) arrive as `Unknown`, and are told apart by PostgreSQL's
//! untranslated primary message ([`transient_cause`]). That text is stable
//! across server versions but translated when the server's `lc_messages`
//! is not English, so the pool asks for `lc_messages = 'C'` on each new
//! connection (allowed to superusers and to roles granted SET on it); on a
//! server that translates and refuses, these errors surface as `Backend`
//! instead of `Unavailable` (docs/operations.md).

use diesel::result::{DatabaseErrorKind, Error as DieselError};
use dployr_domain::StoreError;

/// A failure inside a store transaction: a database error not yet mapped,
/// a store error decided by the store's own logic, or a race the store
/// detected that a new attempt resolves. diesel's `transaction` needs an
/// error type that it can build from its own error, and `StoreError` lives
/// in a crate that does not know diesel.
#[derive(Debug)]
pub(crate) enum Failure {
    Db(DieselError),
    Store(StoreError),
    /// A concurrent write changed what this transaction relied on; the
    /// transaction rolled back and may simply run again (the pool does, a
    /// bounded number of times).
    Retry(&'static str),
}

impl From<DieselError> for Failure {
    fn from(error: DieselError) -> Self {
        Self::Db(error)
    }
}

impl From<StoreError> for Failure {
    fn from(error: StoreError) -> Self {
        Self::Store(error)
    }
}

/// The keys of the rows an operation references, by entity, so a foreign
/// key that finds a row missing names that row: `[("cluster", id)]`.
pub(crate) type Keys<'a> = &'a [(&'static str, String)];

impl Failure {
    /// Whether running the whole transaction again may succeed: a
    /// serialization failure, a deadlock, a lock that was not available, or
    /// a race the store detected. Never a statement timeout (a new attempt
    /// would wait as long again) nor a lost connection (the commit may have
    /// happened).
    pub(crate) fn is_worth_retrying(&self) -> bool {
        match self {
            Self::Db(error) => matches!(
                transient_cause(error),
                Some(Transient::Serialization | Transient::Deadlock | Transient::LockNotAvailable)
            ),
            Self::Store(_) => false,
            Self::Retry(_) => true,
        }
    }

    /// The store error, with `keys` naming the rows a foreign key may miss.
    pub(crate) fn into_store_error(self, keys: Keys<'_>) -> StoreError {
        match self {
            Self::Db(error) => map(error, keys),
            Self::Store(error) => error,
            Self::Retry(reason) => {
                StoreError::Unavailable { reason: format!("{reason}; retried, still conflicting").into(), source: None }
            }
        }
    }
}

/// Maps a diesel error from any PostgreSQL statement of the workspace to
/// the shared [`StoreError`]. A foreign-key violation becomes `NotFound`
/// naming the missing entity, without its key (which only the caller knows);
/// a privilege the session's role lacks, or a table, column, function or
/// type the database lacks, `Configuration` naming
/// [`DATABASE_URL_SETTING`](crate::DATABASE_URL_SETTING) (the stores name
/// the setting their pool's URL came from instead).
///
/// ```
/// use diesel::result::Error;
/// use dployr_domain::StoreError;
///
/// let error = dployr_pg::store_error(Error::BrokenTransactionManager);
/// assert!(matches!(error, StoreError::Unavailable { .. }));
/// ```
pub fn store_error(error: DieselError) -> StoreError {
    map(error, &[])
}

/// Why a statement failed for a reason that passes: retrying later may succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transient {
    /// 40001: a serializable or repeatable-read transaction lost a race.
    Serialization,
    /// 40P01: PostgreSQL broke a lock cycle by aborting this transaction.
    Deadlock,
    /// 55P03: `NOWAIT`, or `lock_timeout` expired.
    LockNotAvailable,
    /// 57014: `statement_timeout` expired, or the statement was cancelled.
    Cancelled,
    /// The connection is gone (server restart, network).
    ConnectionLost,
    /// 25006: the server only reads (a standby, or a promoted primary's old self).
    ReadOnly,
    /// 53100: the server could not write a file, its disk (or quota) full.
    /// The statement was refused and its transaction rolled back; the
    /// server goes on serving reads, and writes succeed again once space is
    /// freed, on the same connections.
    DiskFull,
    /// 53200: the server could not allocate memory, or its lock table is
    /// full ("out of shared memory"). The statement was refused.
    OutOfMemory,
    /// 0A000 "cached plan must not change result type": a statement this
    /// connection prepared earlier returns columns of another type now (a
    /// migration changed one). It fails so on that connection at every
    /// run, before it does anything; a new connection prepares it afresh.
    StaleStatement,
}

impl Transient {
    fn reason(self) -> &'static str {
        match self {
            Self::Serialization => "a concurrent transaction conflicted (serialization failure, 40001); retry",
            Self::Deadlock => "PostgreSQL aborted a deadlocked transaction (40P01); retry",
            Self::LockNotAvailable => "a lock was not available in time (55P03); retry",
            Self::Cancelled => "the statement was cancelled: statement_timeout or a cancel request (57014)",
            Self::ConnectionLost => "the PostgreSQL connection was lost",
            Self::ReadOnly => "the server is read-only (a standby?)",
            Self::DiskFull => "the PostgreSQL server is out of disk space (53100); retry once space is freed",
            Self::OutOfMemory => "the PostgreSQL server is out of memory (53200); retry later",
            Self::StaleStatement => {
                "a statement the connection prepared no longer matches the schema (a migration changed a column's \
                 type); the connection is discarded"
            }
        }
    }
}

/// The passing cause of `error`, if it has one.
pub(crate) fn transient_cause(error: &DieselError) -> Option<Transient> {
    let DieselError::DatabaseError(kind, info) = error else {
        return matches!(error, DieselError::BrokenTransactionManager).then_some(Transient::ConnectionLost);
    };
    match kind {
        DatabaseErrorKind::SerializationFailure => Some(Transient::Serialization),
        DatabaseErrorKind::ClosedConnection | DatabaseErrorKind::UnableToSendCommand => Some(Transient::ConnectionLost),
        DatabaseErrorKind::ReadOnlyTransaction => Some(Transient::ReadOnly),
        DatabaseErrorKind::Unknown => unknown_cause(info.message()),
        _ => None,
    }
}

/// The SQLSTATEs diesel leaves `Unknown`, by PostgreSQL's untranslated
/// primary message (see the module's documentation for why text).
fn unknown_cause(message: &str) -> Option<Transient> {
    if message == "deadlock detected" {
        Some(Transient::Deadlock)
    } else if message.starts_with("could not obtain lock on ") || message == "canceling statement due to lock timeout" {
        Some(Transient::LockNotAvailable)
    } else if message.starts_with("canceling statement due to ") {
        Some(Transient::Cancelled)
    } else if message == "recovery is in progress" {
        // 55000, from a function a standby cannot run (`pg_current_wal_lsn`
        // on a primary demoted under the pool): read-only, as 25006 is.
        Some(Transient::ReadOnly)
    } else if message.ends_with(": No space left on device")
        || message.ends_with(": Disk quota exceeded")
        || (message.starts_with("could not extend file ") && message.contains(": wrote only "))
    {
        // 53100, from a write of a table's file or a temporary file: `could
        // not extend file "base/16384/16742": No space left on device` (the
        // C library's text for ENOSPC, as `lc_messages = 'C'` gives it), or
        // a short write. It passes once space is freed: `Unavailable`, not
        // `Backend`, which says "report it".
        Some(Transient::DiskFull)
    } else if message == "out of memory" || message == "out of shared memory" {
        // 53200: palloc's failure, or the lock table full.
        Some(Transient::OutOfMemory)
    } else if message == "cached plan must not change result type" {
        Some(Transient::StaleStatement)
    } else {
        None
    }
}

/// Why PostgreSQL refused a bound value's text, by its untranslated primary
/// message (diesel leaves these SQLSTATEs `Unknown`): text the server cannot
/// store. The stores' own checks refuse such input first, naming the field;
/// this catches what reaches a statement unchecked (an `Email` or `Metadata`
/// made by a `from_stored` constructor, a database whose encoding is not
/// UTF-8), which is the caller's input, not a failure of the backend.
fn refused_text(message: &str) -> Option<&'static str> {
    if message.starts_with("invalid byte sequence for encoding ") {
        // 22021, for a NUL byte in text.
        Some("holds a byte sequence PostgreSQL cannot store in text (a NUL character?)")
    } else if message == "unsupported Unicode escape sequence" {
        // 22P05, for "\u0000" in a JSON string cast to jsonb.
        Some("holds a NUL character (\\u0000) in JSON, which PostgreSQL cannot store")
    } else if message.starts_with("character with byte sequence ") {
        // 22P05, for a character the database's encoding lacks.
        Some("holds a character the database's encoding cannot represent")
    } else {
        None
    }
}

/// Whether PostgreSQL refused a statement for naming a table, column,
/// function or type the database does not have (42P01, 42703, 42883,
/// 42704, by their untranslated messages): the URL names a database the
/// migrations were not applied to (`DPLOYR_MIGRATE_ON_START=false` and no
/// deploy step ran them), a `search_path` that does not find them, or a
/// schema a later release migrated past what this one reads; a setting to
/// fix, not a failure to report. A prepared statement the
/// server does not know (26000, behind a transaction pooler) is not one.
fn missing_from_the_schema(message: &str) -> bool {
    ["relation \"", "column ", "function ", "type \""]
        .iter()
        .any(|kind| message.starts_with(kind) && message.ends_with(" does not exist"))
}

/// Whether PostgreSQL refused a statement for a privilege the session's
/// role lacks (42501, by its untranslated message: diesel leaves it
/// `Unknown`): a grant missing, or a row-level security policy of the
/// deployment's, not a failure to report nor one that passes.
fn missing_privilege(message: &str) -> bool {
    message.starts_with("permission denied for ")
        || message.starts_with("new row violates row-level security policy")
        || message.starts_with("must be owner of ")
}

/// What a named constraint (or a trigger raising under that name) means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rule {
    /// A unique key: another `entity` has this `field`.
    Unique { entity: &'static str, field: &'static str },
    /// A foreign key: the referenced `entity` does not exist.
    References { entity: &'static str },
    /// A rule on one field's value.
    Check { field: &'static str, reason: &'static str },
    /// The one-owner rule of a cluster.
    Owner { reason: &'static str },
}

/// The rule behind every constraint and raising trigger of the schema.
pub(crate) fn constraint_rule(name: &str) -> Option<Rule> {
    use Rule::{Check, Owner, References, Unique};
    const METADATA_OBJECT: Rule = Check { field: "metadata", reason: "must be a JSON object" };
    const METADATA_SIZE: Rule =
        Check { field: "metadata", reason: "would be larger than 128 KiB once merged with what is stored" };
    const ID: Rule = Check { field: "id", reason: "is not a ULID" };
    Some(match name {
        "users_pkey" => Unique { entity: "user", field: "id" },
        "users_email_key" => Unique { entity: "user", field: "email" },
        "clusters_pkey" => Unique { entity: "cluster", field: "id" },
        "user_clusters_pkey" => Unique { entity: "membership", field: "user" },
        "user_clusters_one_owner_per_cluster" => Unique { entity: "membership", field: "owner" },
        "instances_pkey" => Unique { entity: "instance", field: "id" },
        "instances_address_key" => Unique { entity: "instance", field: "address" },
        "instances_tag_key" => Unique { entity: "instance", field: "tag" },
        // A nonce is used once, also after its token went with its
        // instance (014_spent_nonces_remembered).
        "bootstrap_tokens_pkey" | "bootstrap_tokens_nonce_not_spent" | "spent_nonces_pkey" => {
            Unique { entity: "bootstrap token", field: "nonce" }
        }
        "kv_entries_pkey" => Unique { entity: "kv entry", field: "key" },
        // Never raised: the delete trigger inserts with ON CONFLICT DO
        // NOTHING (024_sessions_to_end).
        "sessions_to_end_pkey" => Unique { entity: "account to sign out", field: "user" },
        "cluster_counts_pkey" => Unique { entity: "cluster counts", field: "cluster" },
        "user_clusters_user_id_fkey" => References { entity: "user" },
        "user_clusters_cluster_id_fkey" | "instances_cluster_id_fkey" => References { entity: "cluster" },
        "bootstrap_tokens_instance_id_fkey" => References { entity: "instance" },
        "cluster_counts_cluster_id_fkey" => References { entity: "cluster" },
        "users_email_check" => Check { field: "email", reason: "is not a valid stored e-mail" },
        "users_email_immutable" => Check { field: "email", reason: "cannot change" },
        "users_name_check" => Check { field: "name", reason: "is too long" },
        "users_provider_check" => Check { field: "provider", reason: "is not a known provider" },
        "users_metadata_check" | "clusters_metadata_check" | "instances_metadata_check" => METADATA_OBJECT,
        "users_metadata_size" | "instances_metadata_size" => METADATA_SIZE,
        // Also met by a user's sign-in, which merges its metadata into each
        // cluster the user runs: the message says whose metadata is full.
        "clusters_metadata_size" => Check {
            field: "metadata",
            reason: "would make a cluster's metadata larger than 128 KiB once merged with what it stores (a \
                     sign-in with metadata also merges it into every cluster its user owns or administers)",
        },
        "users_id_check" | "clusters_id_check" | "instances_id_check" => ID,
        "clusters_name_check" => Check { field: "name", reason: "is empty or too long" },
        "user_clusters_role_check" => Check { field: "role", reason: "is not a known role" },
        "user_clusters_no_return_to_invited" => Check { field: "role", reason: "a member cannot go back to invited" },
        "instances_address_check" => Check { field: "address", reason: "is empty or too long" },
        "instances_tag_check" => Check { field: "tag", reason: "is empty or too long" },
        "bootstrap_tokens_nonce_check" => Check { field: "nonce", reason: "is empty or too long" },
        "kv_entries_key_check" => Check { field: "key", reason: "must be 1 to 512 bytes long" },
        "cluster_counts_not_negative" => Check { field: "count", reason: "a listing total went below zero" },
        "kv_entries_value_check" => Check { field: "value", reason: "is larger than 25 MiB" },
        // The stores store a blank picture as none (011_blank_pictures_and_spent_tokens).
        "users_picture_check" | "user_clusters_picture_check" => {
            Check { field: "picture", reason: "is blank (none is stored instead)" }
        }
        // `mark_used` sets `used_at` only where it is NULL; only
        // hand-written SQL can meet this one.
        "bootstrap_tokens_used_once" => Check { field: "used_at", reason: "a used token stays used" },
        "bootstrap_tokens_used_keep_nonce" => Check { field: "nonce", reason: "a used token keeps its nonce" },
        // No store writes either time; only hand-written SQL can meet these.
        "users_updated_at_check"
        | "clusters_updated_at_check"
        | "user_clusters_updated_at_check"
        | "instances_updated_at_check"
        | "bootstrap_tokens_updated_at_check"
        | "kv_entries_updated_at_check" => Check { field: "updated_at", reason: "would come before created_at" },
        "user_clusters_owner_kept" => {
            Owner { reason: "the owner's membership goes only with the cluster; transfer ownership first" }
        }
        "clusters_have_an_owner" | "clusters_created_with_an_owner" => {
            Owner { reason: "a cluster must keep exactly one owner" }
        }
        // TRUNCATE, which no store sends (010_guards_for_hand_written_sql).
        "user_clusters_after_truncate" => Owner { reason: "a cluster must keep exactly one owner" },
        "cluster_counts_after_truncate" | "instances_after_truncate" => {
            Check { field: "count", reason: "a listing total would no longer count its rows" }
        }
        // Writes no store makes: the triggers keep these (013_counts_and_copies_kept).
        "cluster_counts_kept_by_triggers" => {
            Check { field: "count", reason: "listing totals are kept by the database" }
        }
        "user_clusters_profile_is_a_copy" => {
            Check { field: "member", reason: "a membership's name and picture are copies of its user's" }
        }
        // Only hand-written SQL can meet these (016_first_sign_in,
        // 017_rows_the_stores_can_read): the stores set first_signed_in_at
        // once, write times of now, and refuse metadata past 64 levels.
        "users_first_signed_in_at_set_once" => {
            Check { field: "first_signed_in_at", reason: "an account's first sign-in is set once" }
        }
        // Only hand-written SQL can meet these either (021_spent_nonces_guarded).
        "spent_nonces_kept_by_triggers" => {
            Check { field: "nonce", reason: "spent nonces are remembered by the database" }
        }
        "bootstrap_tokens_used_at_check" => Check { field: "used_at", reason: "would come before created_at" },
        "users_first_signed_in_at_check" => {
            Check { field: "first_signed_in_at", reason: "would come before created_at" }
        }
        "users_times_readable"
        | "clusters_times_readable"
        | "user_clusters_times_readable"
        | "instances_times_readable"
        | "bootstrap_tokens_times_readable" => {
            Check { field: "time", reason: "must be within the years 1 to 9999, where the stores read it" }
        }
        "users_metadata_readable" | "clusters_metadata_readable" | "instances_metadata_readable" => {
            // 017, tightened by 025.
            Check {
                field: "metadata",
                reason: "is nested more than 100 levels, past what a record holding it reads back (serde_json stops at 128)",
            }
        }
        // 019_metadata_numbers_readable: `Metadata` holds 64-bit floats.
        "users_metadata_numbers_readable"
        | "clusters_metadata_numbers_readable"
        | "instances_metadata_numbers_readable" => Check {
            field: "metadata",
            reason: "holds a number past a 64-bit float's range, which the stores cannot read; send it as a string",
        },
        _ => return None,
    })
}

/// Whether `error` says that the connection it ran on is gone (the server
/// ended the session, the socket broke): such a connection must be
/// discarded, never handed out again. diesel's own test
/// (`R2D2Connection::is_broken`) looks only at the transaction state, so a
/// pooled connection whose session a server restart ended would otherwise
/// fail every call it is given, for good.
pub(crate) fn lost_connection(error: &StoreError) -> bool {
    passing_cause(error) == Some(Transient::ConnectionLost)
}

/// Whether a write that failed with `error` may have committed all the
/// same: the connection was lost while it ran (a restart, a crash, its
/// session ended), so its commit may have landed with the answer lost. A
/// checkout that found no connection, a call the deadline cut off (the
/// server did not answer, so nothing points to a commit), a statement the
/// server refused and a transaction rolled back did not, or give no sign of
/// it.
///
/// ```
/// use dployr_domain::StoreError;
///
/// let no_connection = StoreError::Unavailable { reason: "no PostgreSQL connection within 5s".into(), source: None };
/// assert!(!dployr_pg::may_have_committed(&no_connection));
/// ```
pub fn may_have_committed(error: &StoreError) -> bool {
    lost_connection(error)
}

/// Whether `error` says that a statement the connection prepared no longer
/// matches the schema ([`Transient::StaleStatement`]): the connection must
/// be discarded (diesel keeps its prepared statements for the connection's
/// life, so it would fail that statement at every call), and the call may
/// run again on another, as the statement was refused before it did
/// anything (in a transaction, the transaction rolled back).
pub(crate) fn stale_statement(error: &StoreError) -> bool {
    passing_cause(error) == Some(Transient::StaleStatement)
}

/// Whether `error` says that the server only reads (25006). A primary that
/// became read-only (a switchover that leaves the old primary up,
/// `default_transaction_read_only`) keeps its open sessions; a new
/// connection follows the URL (DNS, `target_session_attrs=read-write`) to
/// the server that writes now, while a kept one would fail every write and
/// serve old data for as long as the pool keeps it: the pool replaces its
/// connections (`Affinity::saw_read_only`).
pub(crate) fn read_only_server(error: &StoreError) -> bool {
    passing_cause(error) == Some(Transient::ReadOnly)
}

/// The passing cause behind an `Unavailable` mapped from a diesel error.
fn passing_cause(error: &StoreError) -> Option<Transient> {
    let StoreError::Unavailable { source: Some(source), .. } = error else { return None };
    source.downcast_ref::<DieselError>().and_then(transient_cause)
}

/// Maps a diesel error; `keys` names the rows the operation references, for
/// a foreign key that finds one missing.
pub(crate) fn map(error: DieselError, keys: Keys<'_>) -> StoreError {
    if let Some(cause) = transient_cause(&error) {
        return match cause {
            Transient::ConnectionLost if matches!(error, DieselError::BrokenTransactionManager) => {
                StoreError::unavailable("the connection's transaction state broke", error)
            }
            cause => StoreError::unavailable(cause.reason(), error),
        };
    }
    let DieselError::DatabaseError(kind, info) = &error else {
        return StoreError::backend("PostgreSQL query failed", error);
    };
    if let Some(rule) = info.constraint_name().and_then(constraint_rule) {
        return match rule {
            Rule::Unique { entity, field } => {
                StoreError::conflict(entity, field, format!("another {entity} has this {field}"))
            }
            Rule::References { entity } => {
                let key = keys.iter().find(|(named, _)| *named == entity).map_or("(unnamed)", |(_, key)| key.as_str());
                StoreError::not_found(entity, key)
            }
            Rule::Check { field, reason } => StoreError::invalid(field, reason),
            Rule::Owner { reason } => StoreError::conflict("membership", "owner", reason),
        };
    }
    if let Some(reason) = refused_text(info.message()) {
        return StoreError::invalid("input", reason);
    }
    if missing_from_the_schema(info.message()) {
        return StoreError::Configuration {
            setting: crate::DATABASE_URL_SETTING,
            reason: format!(
                "the database's schema lacks what the stores use: {} (its migrations not applied, or a later \
                 release's applied that this one predates: `cargo xtask migrate status` tells)",
                info.message()
            )
            .into(),
        };
    }
    if missing_privilege(info.message()) {
        // The pool renames the setting to the one its URL came from
        // (`PgPool::named`).
        return StoreError::Configuration {
            setting: crate::DATABASE_URL_SETTING,
            reason: format!(
                "the URL's role lacks a privilege: {} (docs/operations.md lists the grants the stores need)",
                info.message()
            )
            .into(),
        };
    }
    match kind {
        DatabaseErrorKind::UniqueViolation => StoreError::conflict("row", "key", "a unique key refused the write"),
        DatabaseErrorKind::ForeignKeyViolation => StoreError::not_found("referenced row", "(unnamed)"),
        DatabaseErrorKind::CheckViolation | DatabaseErrorKind::NotNullViolation => {
            StoreError::invalid("input", "breaks a rule of the schema")
        }
        _ => StoreError::backend("PostgreSQL refused the statement", error),
    }
}

#[cfg(test)]
mod tests {
    use diesel::prelude::*;
    use diesel::sql_types::Text;

    use super::*;

    /// The names a raising trigger function gives its errors: each
    /// `CONSTRAINT = 'name'`, and the trigger's own name for `CONSTRAINT =
    /// TG_NAME`; `None` if it raises an exception without naming one.
    fn raised_names(trigger: &str, body: &str) -> Option<Vec<String>> {
        let raises = body.matches("RAISE EXCEPTION").count();
        let mut names = Vec::new();
        for (at, marker) in body.match_indices("CONSTRAINT = ") {
            let rest = &body[at + marker.len()..];
            if let Some(quoted) = rest.strip_prefix('\'') {
                names.push(quoted.split('\'').next().unwrap_or_default().to_owned());
            } else if rest.starts_with("TG_NAME") {
                names.push(trigger.to_owned());
            }
        }
        (names.len() >= raises).then_some(names)
    }

    #[test]
    fn every_constraint_and_raising_trigger_of_the_schema_has_a_rule() {
        let db = dployr_testkit::database();
        let mut conn = db.connect();
        let constraints: Vec<String> = diesel::dsl::sql::<Text>(
            "SELECT conname::text FROM pg_constraint
              WHERE connamespace = 'public'::regnamespace AND conrelid <> '_migrations'::regclass
             UNION
             SELECT i.indexrelid::regclass::text FROM pg_index i
              JOIN pg_class t ON t.oid = i.indrelid AND t.relnamespace = 'public'::regnamespace
              WHERE i.indisunique AND t.relname <> '_migrations'
             ORDER BY 1",
        )
        .load(&mut conn)
        .unwrap();
        let triggers: Vec<(String, String)> = diesel::dsl::sql::<(Text, Text)>(
            "SELECT t.tgname::text, p.prosrc FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid
              WHERE NOT t.tgisinternal ORDER BY 1",
        )
        .load(&mut conn)
        .unwrap();
        assert!(constraints.len() > 30 && triggers.len() > 5, "{constraints:?} {triggers:?}");
        let mut unmapped: Vec<String> =
            constraints.iter().filter(|name| constraint_rule(name).is_none()).cloned().collect();
        for (trigger, body) in &triggers {
            match raised_names(trigger, body) {
                None => unmapped.push(format!("trigger {trigger} raises without naming a constraint")),
                Some(names) => {
                    unmapped.extend(names.into_iter().filter(|name| constraint_rule(name).is_none()));
                }
            }
        }
        assert_eq!(unmapped, Vec::<String>::new(), "give these a Rule in constraint_rule");
    }

    #[test]
    fn postgresql_messages_of_the_unknown_class_are_told_apart() {
        assert_eq!(unknown_cause("deadlock detected"), Some(Transient::Deadlock));
        assert_eq!(
            unknown_cause("could not obtain lock on row in relation \"users\""),
            Some(Transient::LockNotAvailable)
        );
        assert_eq!(unknown_cause("canceling statement due to lock timeout"), Some(Transient::LockNotAvailable));
        assert_eq!(unknown_cause("canceling statement due to statement timeout"), Some(Transient::Cancelled));
        assert_eq!(unknown_cause("canceling statement due to user request"), Some(Transient::Cancelled));
        assert_eq!(unknown_cause("invalid byte sequence for encoding \"UTF8\": 0x00"), None);
        // A full disk, in the forms PostgreSQL 15 words it: the first as a
        // server whose data disk filled under the stores sent it.
        for full in [
            "could not extend file \"base/16729/16742\": No space left on device",
            "could not extend file \"base/16729/16832_fsm\": No space left on device",
            "could not extend file \"base/16384/16742\": wrote only 4096 of 8192 bytes at block 12",
            "could not write to file \"base/pgsql_tmp/pgsql_tmp1234.0\": No space left on device",
            "could not write block 118 of temporary file: No space left on device",
            "could not extend file \"base/16384/16742\": Disk quota exceeded",
        ] {
            assert_eq!(unknown_cause(full), Some(Transient::DiskFull), "{full}");
        }
        assert_eq!(unknown_cause("out of memory"), Some(Transient::OutOfMemory));
        assert_eq!(unknown_cause("out of shared memory"), Some(Transient::OutOfMemory));
        assert_eq!(unknown_cause("cached plan must not change result type"), Some(Transient::StaleStatement));
        // Other file errors are not a full disk: a missing or unreadable
        // file does not pass by itself.
        assert_eq!(unknown_cause("could not open file \"base/16384/16742\": No such file or directory"), None);
        assert_eq!(unknown_cause("could not extend file \"base/16384/16742\": Input/output error"), None);
    }

    #[test]
    fn postgresql_messages_of_a_setting_to_fix_are_told_apart() {
        // A missing grant or a row-level security policy of the
        // deployment's; not a NUL in text nor a unique key.
        for refused in [
            "permission denied for table spent_nonces",
            "permission denied for schema public",
            "new row violates row-level security policy for table \"users\"",
            "must be owner of table users",
        ] {
            assert!(missing_privilege(refused), "{refused}");
        }
        assert!(!missing_privilege("duplicate key value violates unique constraint \"users_email_key\""));
        // A schema without what the stores use; not a statement a pooler lost.
        for missing in [
            "relation \"users\" does not exist",
            "column users.first_signed_in_at does not exist",
            "column \"tag\" of relation \"instances\" does not exist",
            "function dployr_counts_kept() does not exist",
            "type \"citext\" does not exist",
        ] {
            assert!(missing_from_the_schema(missing), "{missing}");
        }
        assert!(!missing_from_the_schema("prepared statement \"__diesel_stmt_3\" does not exist"));
        assert!(!missing_from_the_schema("database \"app\" does not exist"));
    }

    #[test]
    fn text_postgresql_cannot_store_is_invalid_input_not_a_backend_failure() {
        let db = dployr_testkit::database();
        let mut conn = db.connect();
        let nul_in_text =
            diesel::dsl::sql::<Text>("SELECT ").bind::<Text, _>("a\u{0}b").get_result::<String>(&mut conn);
        let nul_in_json = diesel::dsl::sql::<Text>("SELECT (")
            .bind::<Text, _>(r#"{"k": "a\u0000b"}"#)
            .sql("::jsonb)::text")
            .get_result::<String>(&mut conn);
        for (what, result) in [("NUL in text", nul_in_text), ("\\u0000 in jsonb", nul_in_json)] {
            let error = map(result.expect_err(what), &[]);
            assert!(matches!(error, StoreError::Invalid { field: "input", .. }), "{what}: {error:?}");
        }
        // Still usable: these refusals end the statement, not the session.
        let fine: String = diesel::dsl::sql::<Text>("SELECT 'ok'").get_result(&mut conn).unwrap();
        assert_eq!(fine, "ok");
    }
}
