//! PostgreSQL errors as `StoreError`s, decided by the error's class (diesel's
//! `DatabaseErrorKind`, which comes from the SQLSTATE) and the name of the
//! constraint, never by matching message text, which changes with the
//! server's version and `lc_messages`.

use diesel::result::{DatabaseErrorKind, Error as DieselError};
use dployr_domain::StoreError;

/// A failure inside a store transaction: a database error not yet mapped,
/// or a store error decided by the store's own logic. diesel's
/// `transaction` needs an error type that it can build from its own error,
/// and `StoreError` lives in a crate that does not know diesel.
#[derive(Debug)]
pub(crate) enum Failure {
    Db(DieselError),
    Store(StoreError),
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

impl Failure {
    /// The store error, with `parent` as the key of a missing referenced row.
    pub(crate) fn into_store_error(self, parent: &str) -> StoreError {
        match self {
            Self::Db(error) => map(error, parent),
            Self::Store(error) => error,
        }
    }
}

/// Maps a diesel error. `parent` is the key of the row the operation
/// references (a cluster id for `instances.create`, ...), reported when a
/// foreign key finds it missing.
pub(crate) fn map(error: DieselError, parent: &str) -> StoreError {
    let DieselError::DatabaseError(kind, info) = &error else {
        return match error {
            DieselError::BrokenTransactionManager => {
                StoreError::unavailable("the connection's transaction state broke", error)
            }
            other => StoreError::backend("PostgreSQL query failed", other),
        };
    };
    let constraint = info.constraint_name().unwrap_or_default().to_owned();
    match kind {
        DatabaseErrorKind::UniqueViolation => {
            let (entity, field) = unique_constraint(&constraint);
            StoreError::conflict(entity, field, format!("another {entity} has this {field}"))
        }
        DatabaseErrorKind::ForeignKeyViolation => StoreError::not_found(referenced_entity(&constraint), parent),
        DatabaseErrorKind::CheckViolation | DatabaseErrorKind::NotNullViolation => {
            let (field, reason) = check_constraint(&constraint);
            StoreError::invalid(field, reason)
        }
        DatabaseErrorKind::ClosedConnection | DatabaseErrorKind::UnableToSendCommand => {
            StoreError::unavailable("the PostgreSQL connection was lost", error)
        }
        DatabaseErrorKind::SerializationFailure => {
            StoreError::unavailable("a concurrent transaction conflicted; retry", error)
        }
        DatabaseErrorKind::ReadOnlyTransaction => {
            StoreError::unavailable("the server is read-only (a standby?)", error)
        }
        _ => StoreError::backend("PostgreSQL refused the statement", error),
    }
}

fn unique_constraint(constraint: &str) -> (&'static str, &'static str) {
    match constraint {
        "users_email_key" => ("user", "email"),
        "users_pkey" => ("user", "id"),
        "clusters_pkey" => ("cluster", "id"),
        "user_clusters_pkey" => ("membership", "user"),
        "user_clusters_one_owner_per_cluster" => ("membership", "owner"),
        "instances_pkey" => ("instance", "id"),
        "instances_address_key" => ("instance", "address"),
        "instances_tag_key" => ("instance", "tag"),
        "bootstrap_tokens_pkey" => ("bootstrap token", "nonce"),
        _ => ("row", "key"),
    }
}

fn referenced_entity(constraint: &str) -> &'static str {
    match constraint {
        "user_clusters_user_id_fkey" => "user",
        "user_clusters_cluster_id_fkey" | "instances_cluster_id_fkey" => "cluster",
        "bootstrap_tokens_instance_id_fkey" => "instance",
        _ => "referenced row",
    }
}

fn check_constraint(constraint: &str) -> (&'static str, &'static str) {
    match constraint {
        "users_email_check" => ("email", "is not a valid stored e-mail"),
        "users_email_immutable" => ("email", "cannot change"),
        "users_name_check" => ("name", "is too long"),
        "users_provider_check" => ("provider", "is not a known provider"),
        "users_metadata_check" | "clusters_metadata_check" | "instances_metadata_check" => {
            ("metadata", "must be a JSON object")
        }
        "users_metadata_size" | "clusters_metadata_size" | "instances_metadata_size" => {
            ("metadata", "would be larger than 128 KiB once merged with what is stored")
        }
        "users_id_check" | "clusters_id_check" | "instances_id_check" => ("id", "is not a ULID"),
        "clusters_name_check" => ("name", "is empty or too long"),
        "user_clusters_role_check" => ("role", "is not a known role"),
        "user_clusters_no_return_to_invited" => ("role", "a member cannot go back to invited"),
        "instances_address_check" => ("address", "is empty or too long"),
        "instances_tag_check" => ("tag", "is empty or too long"),
        "bootstrap_tokens_nonce_check" => ("nonce", "is empty or too long"),
        _ => ("input", "breaks a rule of the schema"),
    }
}
