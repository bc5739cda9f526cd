//! Instances (the machines of a cluster) and their single-use bootstrap
//! tokens, with the stores that keep them.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::{Address, ClusterId, InstanceId, Metadata, Nonce, Page, Paged, StoreResult, Tag};

/// The most bytes an instance address may have.
pub const MAX_ADDRESS_BYTES: usize = 1024;
/// The most bytes an instance tag or a bootstrap nonce may have.
pub const MAX_TAG_BYTES: usize = 255;

/// A machine of a cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    /// Its id.
    pub id: InstanceId,
    /// The cluster it belongs to.
    pub cluster_id: ClusterId,
    /// Where it is reached; unique.
    pub address: String,
    /// Its short name; unique.
    pub tag: String,
    /// Free-form data.
    #[serde(deserialize_with = "Metadata::deserialize_stored")]
    pub metadata: Metadata,
    /// When it was registered.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
}

/// The input of [`InstanceStore::create`].
#[derive(Debug, Clone, PartialEq)]
pub struct NewInstance {
    /// Where it is reached; unique.
    pub address: Address,
    /// Its short name; unique.
    pub tag: Tag,
    /// Free-form data.
    pub metadata: Option<Metadata>,
}

/// Where instances live.
#[cfg_attr(feature = "mock", mockall::automock)]
pub trait InstanceStore: Send + Sync {
    /// Registers an instance in a cluster.
    ///
    /// # Errors
    /// `Conflict` naming `address` or `tag` when one is taken; `NotFound`
    /// for an unknown cluster; `Invalid` on `metadata` for metadata made by
    /// [`Metadata::from_stored`] that a write refuses (checked again here).
    /// (Bad text cannot reach it: [`Address`] and [`Tag`] are checked when
    /// they are made.)
    fn create(&self, cluster: &ClusterId, instance: NewInstance) -> StoreResult<Instance>;

    /// The instance with this id.
    fn get(&self, id: &InstanceId) -> StoreResult<Option<Instance>>;

    /// The instance with this tag.
    fn get_by_tag(&self, tag: &Tag) -> StoreResult<Option<Instance>>;

    /// Replaces the metadata; `None` for an unknown instance.
    ///
    /// # Errors
    /// `Invalid` on `metadata`, as [`create`](Self::create).
    fn update_metadata(&self, id: &InstanceId, metadata: Metadata) -> StoreResult<Option<Instance>>;

    /// Deletes the instance and its tokens.
    ///
    /// # Errors
    /// `NotFound` for an unknown instance (also when a first call that
    /// failed with `Unavailable` had deleted it).
    fn delete(&self, id: &InstanceId) -> StoreResult<()>;

    /// The cluster's instances, newest first. An unknown cluster has none:
    /// an empty page with a total of 0, not `NotFound`.
    ///
    /// # Errors
    /// `Invalid` on `cursor` for a cursor that is not one of this listing
    /// (another listing's, another cluster's, or not a cursor at all), and on
    /// `offset` for an offset past what a page can skip.
    fn list_by_cluster(&self, cluster: &ClusterId, page: &Page) -> StoreResult<Paged<Instance>>;
}

/// A single-use token an instance presents when it first connects. Its
/// `Debug` hides the nonce (see [`Nonce`]).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootstrapToken {
    /// The instance it bootstraps.
    pub instance_id: InstanceId,
    /// Its nonce; unique.
    pub nonce: String,
    /// When it was used; `None` while unused.
    pub used_at: Option<DateTime<Utc>>,
    /// When it was issued.
    pub created_at: DateTime<Utc>,
}

impl fmt::Debug for BootstrapToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BootstrapToken")
            .field("instance_id", &self.instance_id)
            .field("nonce", &format_args!("<redacted>"))
            .field("used_at", &self.used_at)
            .field("created_at", &self.created_at)
            .finish()
    }
}

/// Where bootstrap tokens live.
#[cfg_attr(feature = "mock", mockall::automock)]
pub trait BootstrapTokenStore: Send + Sync {
    /// Issues a token for an instance.
    ///
    /// # Errors
    /// `Conflict` (field `nonce`) for a nonce in use (a token holds it) or
    /// spent (a used token held it, also after that token was deleted); a
    /// nonce whose token was deleted unused may be issued again. `NotFound`
    /// for an unknown instance.
    fn create(&self, instance: &InstanceId, nonce: &Nonce) -> StoreResult<BootstrapToken>;

    /// Marks the token used: `true` for exactly one caller per nonce, also
    /// under concurrency; `false` if it was used already or does not exist.
    /// A nonce no token can have is refused when the [`Nonce`] is made.
    ///
    /// A call that fails `Unavailable` (the connection lost, the server
    /// restarting) may have marked the token before its answer was lost;
    /// then no call ever answers `true` for it, and a retry answers
    /// `false`. Treat such a token as spent, as a caller who never learned
    /// the answer must: issue a new one (a new nonce) rather than retry.
    fn mark_used(&self, nonce: &Nonce) -> StoreResult<bool>;

    /// Whether the token was used; an unknown nonce counts as used.
    fn is_used(&self, nonce: &Nonce) -> StoreResult<bool>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tokens_debug_hides_its_nonce_and_shows_the_rest() {
        let token = BootstrapToken {
            instance_id: InstanceId::generate(),
            nonce: "n-5ecret-8f2c1e".to_owned(),
            used_at: None,
            created_at: Utc::now(),
        };
        let shown = format!("{token:?} {:?} {:#?}", Nonce::parse(&token.nonce).unwrap(), token);
        assert!(!shown.contains("5ecret"), "{shown}");
        assert!(shown.contains(&token.instance_id.to_string()) && shown.contains("used_at"), "{shown}");
    }
}
