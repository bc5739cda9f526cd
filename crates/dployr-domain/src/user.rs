//! Users: the accounts that sign in, and the store that keeps them.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::{DisplayName, Email, Metadata, Provider, StoreResult, UserId};

/// The most bytes a user's name or picture URL may have.
pub const MAX_USER_TEXT_BYTES: usize = 1024;

/// A user account.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct User {
    /// Its id.
    pub id: UserId,
    /// Its e-mail, unique and never changed.
    #[serde(deserialize_with = "Email::deserialize_stored")]
    pub email: Email,
    /// Display name; the e-mail's local part unless one was given.
    pub name: String,
    /// Avatar URL.
    pub picture: Option<String>,
    /// How the user last signed in.
    pub provider: Provider,
    /// Free-form data, merged on each sign-in that brings some.
    #[serde(deserialize_with = "Metadata::deserialize_stored")]
    pub metadata: Metadata,
    /// When the account was created.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
}

/// What a sign-in knows about a user: the input of [`UserStore::upsert`].
#[derive(Debug, Clone, PartialEq)]
pub struct NewUser {
    /// The e-mail that identifies the user.
    pub email: Email,
    /// Display name, if the provider gave one.
    pub name: Option<DisplayName>,
    /// Avatar URL, if the provider gave one.
    pub picture: Option<String>,
    /// The provider of this sign-in.
    pub provider: Provider,
    /// Data to merge into the stored metadata.
    pub metadata: Option<Metadata>,
}

impl NewUser {
    /// A sign-in with nothing but an e-mail and a provider.
    pub fn new(email: Email, provider: Provider) -> Self {
        Self { email, name: None, picture: None, provider, metadata: None }
    }
}

/// Changes to a user; `None` leaves a field as it is.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct UserPatch {
    /// New display name.
    pub name: Option<DisplayName>,
    /// New avatar URL; a blank one removes the picture (none is stored).
    pub picture: Option<String>,
    /// New provider.
    pub provider: Option<Provider>,
    /// Merged into the stored metadata (top-level keys replace).
    pub metadata: Option<Metadata>,
}

/// Where users live.
#[cfg_attr(feature = "mock", mockall::automock)]
pub trait UserStore: Send + Sync {
    /// The sign-in path: creates the user, or updates the one with this
    /// e-mail: keeps name and picture unless new ones are given (a blank
    /// picture counts as none given: the stored one stays, as in the
    /// original's `picture || null`; [`update`](Self::update) is the way to
    /// remove one), sets the
    /// provider, merges the given metadata into the stored object (and,
    /// in the same transaction, into every cluster the user owns or
    /// administers).
    ///
    /// Those clusters are the ones the user runs when the upsert begins (a
    /// demotion that commits meanwhile takes a cluster out): a promotion to
    /// owner or admin that commits while the upsert runs is not included,
    /// and that cluster gets the metadata at the user's next sign-in with
    /// it. Finding them again after the user's row is locked would take the
    /// locks out of the order every write keeps (clusters, then users), or
    /// one more statement per sign-in.
    ///
    /// # Errors
    /// `Invalid` on field `email` for an address [`Email::check`](crate::Email::check)
    /// refuses (one made by `Email::from_stored`, not in its normal form),
    /// on `metadata` or `picture` for those a write refuses; nothing is written.
    fn upsert(&self, user: NewUser) -> StoreResult<User>;

    /// The user with this id.
    fn get(&self, id: &UserId) -> StoreResult<Option<User>>;

    /// The user with this e-mail (already normalised by [`Email`]).
    fn get_by_email(&self, email: &Email) -> StoreResult<Option<User>>;

    /// Applies `patch` to the user with this e-mail; `None` if there is none.
    fn update(&self, email: &Email, patch: UserPatch) -> StoreResult<Option<User>>;

    /// Deletes a user and their memberships.
    ///
    /// # Errors
    /// `NotFound` if there is no such user; `Conflict` (field `owner`) while
    /// they own a cluster.
    fn delete(&self, id: &UserId) -> StoreResult<()>;
}
