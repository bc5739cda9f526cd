//! `StoreError`: the one error every store and key-value backend returns, so
//! a caller handles "not found", "conflict", "bad input" and "try again" the
//! same way whichever store or backend it talks to.

use std::borrow::Cow;
use std::error::Error as StdError;

/// A boxed cause, kept as the `source()` of an error.
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// What went wrong in a store or key-value operation.
///
/// The variants are what a caller can act on: answer 404 ([`NotFound`]),
/// 409 ([`Conflict`]), 400 ([`Invalid`]), retry later ([`Unavailable`]),
/// fix the deployment ([`Configuration`]), or report ([`Backend`]).
///
/// [`NotFound`]: StoreError::NotFound
/// [`Conflict`]: StoreError::Conflict
/// [`Invalid`]: StoreError::Invalid
/// [`Unavailable`]: StoreError::Unavailable
/// [`Configuration`]: StoreError::Configuration
/// [`Backend`]: StoreError::Backend
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The entity the operation needs does not exist.
    #[error("{entity} {key} not found")]
    NotFound {
        /// What kind of thing: `"user"`, `"cluster"`, `"instance"`, `"invite"`, ...
        entity: &'static str,
        /// Which one (an id, an e-mail, a tag); never a secret.
        key: String,
    },

    /// The write would break a uniqueness or ownership rule.
    #[error("{entity} conflict on {field}: {reason}")]
    Conflict {
        /// The entity written: `"instance"`, `"user"`, `"membership"`, ...
        entity: &'static str,
        /// The field whose rule was hit: `"tag"`, `"address"`, `"owner"`, ...
        field: &'static str,
        /// One sentence for a human.
        reason: Cow<'static, str>,
    },

    /// The input was refused before anything was written.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The argument or field at fault: `"email"`, `"metadata"`, `"ttl"`, ...
        field: &'static str,
        /// Why, in one sentence.
        reason: Cow<'static, str>,
    },

    /// The database or backend cannot serve the call right now (pool
    /// checkout timed out, connection lost, backend throttling or down, a
    /// server out of disk space or memory). Retrying later may succeed.
    #[error("unavailable: {reason}")]
    Unavailable {
        /// What was unavailable and for how long it was tried.
        reason: Cow<'static, str>,
        /// The underlying error, when there is one.
        #[source]
        source: Option<BoxError>,
    },

    /// The deployment is misconfigured (wrong credentials, unknown
    /// namespace, a grant missing, a database not migrated): retrying will
    /// not help; `setting` names what to check.
    #[error("configuration error: {reason} (check {setting})")]
    Configuration {
        /// The environment variable or config field to check, e.g. `CLOUDFLARE_API_TOKEN`.
        setting: &'static str,
        /// What the backend said, without secrets.
        reason: Cow<'static, str>,
    },

    /// Anything else: a bug, or a backend error with no better mapping.
    #[error("backend error: {message}")]
    Backend {
        /// What was being done.
        message: Cow<'static, str>,
        /// The underlying error.
        #[source]
        source: Option<BoxError>,
    },
}

impl StoreError {
    /// `NotFound` for `entity` with `key`.
    pub fn not_found(entity: &'static str, key: impl Into<String>) -> Self {
        Self::NotFound { entity, key: key.into() }
    }

    /// `Conflict` on `entity.field`.
    pub fn conflict(entity: &'static str, field: &'static str, reason: impl Into<Cow<'static, str>>) -> Self {
        Self::Conflict { entity, field, reason: reason.into() }
    }

    /// `Invalid` input for `field`.
    pub fn invalid(field: &'static str, reason: impl Into<Cow<'static, str>>) -> Self {
        Self::Invalid { field, reason: reason.into() }
    }

    /// `Unavailable` with a cause.
    pub fn unavailable(reason: impl Into<Cow<'static, str>>, source: impl Into<BoxError>) -> Self {
        Self::Unavailable { reason: reason.into(), source: Some(source.into()) }
    }

    /// `Backend` with a cause.
    pub fn backend(message: impl Into<Cow<'static, str>>, source: impl Into<BoxError>) -> Self {
        Self::Backend { message: message.into(), source: Some(source.into()) }
    }

    /// Whether retrying the same operation later may succeed.
    ///
    /// ```
    /// use dployr_domain::StoreError;
    /// assert!(StoreError::Unavailable { reason: "pool".into(), source: None }.is_retryable());
    /// assert!(!StoreError::invalid("email", "no @").is_retryable());
    /// ```
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Unavailable { .. })
    }
}

/// The result of every store and key-value operation.
pub type StoreResult<T> = Result<T, StoreError>;
