//! [`ServerIdentity`]: which server and database a connection reached, to
//! tell whether two URLs lead to the same rows (a replica and its primary,
//! the migration URL and `DATABASE_URL`).

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Bool, Text};

/// Which server and database a connection reached: a streaming replica
/// shares its primary's system identifier (`initdb`'s, kept by every base
/// backup) and its databases; a pooler in front of a server answers with
/// that server's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerIdentity {
    /// `current_database()`: the server's name for it, whatever alias a
    /// pooler gave it.
    pub database: String,
    /// `None` where the role may not call `pg_control_system()` (revoked
    /// from PUBLIC by a hardened setup): the database is compared alone.
    pub system_identifier: Option<i64>,
}

/// How two [`ServerIdentity`]s differ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityMismatch {
    /// Another database (of the same server or not).
    Database {
        /// The first identity's.
        this: String,
        /// The second's.
        other: String,
    },
    /// A database of the same name on another server (and not a standby of
    /// it).
    Server {
        /// The first identity's system identifier.
        this: i64,
        /// The second's.
        other: i64,
    },
}

#[derive(QueryableByName)]
struct DatabaseAndPrivilege {
    #[diesel(sql_type = Text)]
    database: String,
    #[diesel(sql_type = Bool)]
    may_read_control: bool,
}

#[derive(QueryableByName)]
struct SystemIdentifier {
    #[diesel(sql_type = BigInt)]
    system_identifier: i64,
}

/// Two statements, not one: PostgreSQL checks the privilege of every
/// function a statement names when it starts, so a `CASE` around the call
/// would still fail for a role the function is revoked from.
const DATABASE_AND_PRIVILEGE: &str = "SELECT current_database()::text AS database, \
     has_function_privilege('pg_control_system()', 'EXECUTE') AS may_read_control";
const SYSTEM_IDENTIFIER: &str = "SELECT system_identifier FROM pg_control_system()";

impl ServerIdentity {
    /// The identity of what `conn` reached: one or two statements, no
    /// transaction, nothing written.
    ///
    /// # Errors
    /// The statements' errors.
    pub fn of(conn: &mut PgConnection) -> QueryResult<Self> {
        let found: DatabaseAndPrivilege = diesel::sql_query(DATABASE_AND_PRIVILEGE).get_result(conn)?;
        let system_identifier = if found.may_read_control {
            Some(diesel::sql_query(SYSTEM_IDENTIFIER).get_result::<SystemIdentifier>(conn)?.system_identifier)
        } else {
            None
        };
        Ok(Self { database: found.database, system_identifier })
    }

    /// How `self` and `other` differ, if they do: the database first, then
    /// the server where both system identifiers are known.
    ///
    /// ```
    /// use dployr_pg::{IdentityMismatch, ServerIdentity};
    ///
    /// let app = ServerIdentity { database: "app".into(), system_identifier: Some(7) };
    /// let standby = ServerIdentity { database: "app".into(), system_identifier: None };
    /// assert_eq!(app.mismatch(&standby), None);
    /// let staging = ServerIdentity { database: "app_staging".into(), system_identifier: Some(7) };
    /// assert!(matches!(app.mismatch(&staging), Some(IdentityMismatch::Database { .. })));
    /// ```
    pub fn mismatch(&self, other: &Self) -> Option<IdentityMismatch> {
        if self.database != other.database {
            return Some(IdentityMismatch::Database { this: self.database.clone(), other: other.database.clone() });
        }
        match (self.system_identifier, other.system_identifier) {
            (Some(this), Some(other)) if this != other => Some(IdentityMismatch::Server { this, other }),
            _ => None,
        }
    }
}

/// Where a session finds a table by its unqualified name (its
/// `search_path`'s first match): two roles of one database whose paths
/// differ may find different tables under one name, or none.
#[derive(Debug, Clone, PartialEq, Eq, QueryableByName)]
pub struct FoundTable {
    /// The table's `pg_class` oid.
    #[diesel(sql_type = BigInt)]
    pub oid: i64,
    /// The schema that holds it.
    #[diesel(sql_type = Text)]
    pub schema: String,
}

impl FoundTable {
    /// The table `conn`'s session finds as `name`, if any: one statement,
    /// nothing written. `name` is bound, not spliced.
    ///
    /// # Errors
    /// The statement's errors.
    pub fn of(conn: &mut PgConnection, name: &str) -> QueryResult<Option<Self>> {
        diesel::sql_query(
            "SELECT c.oid::bigint AS oid, n.nspname::text AS schema FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass($1)",
        )
        .bind::<Text, _>(name)
        .get_result(conn)
        .optional()
    }
}
