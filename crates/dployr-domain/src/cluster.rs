//! Clusters (organisations), their members and roles, and the store that
//! keeps them. The rule the whole module protects: a cluster has exactly
//! one owner.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::{ClusterId, ClusterName, Email, Integrations, Metadata, Page, Paged, Role, StoreResult, UserId};

/// The most bytes a cluster name may have.
pub const MAX_CLUSTER_NAME_BYTES: usize = 1024;

/// A user's membership of a cluster, with what a listing shows of the user.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Member {
    /// The user.
    pub user_id: UserId,
    /// Their e-mail.
    #[serde(deserialize_with = "Email::deserialize_stored")]
    pub email: Email,
    /// Their display name.
    pub name: String,
    /// Their avatar URL.
    pub picture: Option<String>,
    /// Their role here.
    pub role: Role,
    /// When they were added (or invited).
    pub since: DateTime<Utc>,
}

/// A cluster with its members.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cluster {
    /// Its id.
    pub id: ClusterId,
    /// Its name.
    pub name: String,
    /// Free-form data, integrations included.
    #[serde(deserialize_with = "Metadata::deserialize_stored")]
    pub metadata: Metadata,
    /// Members grouped by role, each group ordered by e-mail (by its bytes,
    /// the order of the member pages on every server).
    pub members: BTreeMap<Role, Vec<Member>>,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
}

impl Cluster {
    /// The owner, if the cluster has one (it always does once created through a store).
    pub fn owner(&self) -> Option<&Member> {
        self.members.get(&Role::Owner).and_then(|owners| owners.first())
    }

    /// The members with `role`.
    pub fn with_role(&self, role: Role) -> &[Member] {
        self.members.get(&role).map_or(&[], Vec::as_slice)
    }
}

/// Changes to a cluster; `None` leaves a field as it is.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ClusterPatch {
    /// New name.
    pub name: Option<ClusterName>,
    /// Merged into the stored metadata (top-level keys replace).
    pub metadata: Option<Metadata>,
    /// The desired non-owner membership: role -> users. A user listed under
    /// several roles gets the highest; members not listed (except the owner)
    /// are removed; `Role::Owner` here is invalid (use `transfer_ownership`).
    /// Those removed keep their accounts, invitees who never signed in
    /// included: unlike [`ClusterStore::remove_users`], an update deletes no
    /// user (remove invitees with `remove_users` to have theirs deleted).
    pub roles: Option<BTreeMap<Role, Vec<UserId>>>,
}

/// A cluster as a session or a menu shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterSummary {
    /// Its id.
    pub id: ClusterId,
    /// Its name.
    pub name: String,
    /// Its owner's display name.
    pub owner_name: Option<String>,
}

/// An invitation waiting for the user's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingInvite {
    /// The inviting cluster.
    pub cluster_id: ClusterId,
    /// Its name.
    pub cluster_name: String,
    /// Its owner's display name.
    pub owner_name: Option<String>,
}

/// A GitHub App installation to record on the cluster whose
/// `metadata.gitHub.loginId` matches.
#[derive(Debug, Clone, PartialEq)]
pub struct GitHubIntegration {
    /// The GitHub login (user or organisation) id the cluster was linked with.
    pub login_id: String,
    /// The whole `gitHub` object to store; its `loginId` is set to `login_id`.
    pub settings: Metadata,
}

/// Where clusters and memberships live.
#[cfg_attr(feature = "mock", mockall::automock)]
pub trait ClusterStore: Send + Sync {
    /// The cluster `owner` owns; if none, a new one named after the owner's
    /// e-mail local part. Concurrent calls for one user create one cluster.
    /// A user who owns several (ownership transferred to an owner) gets the
    /// oldest, the one [`owned_cluster`](Self::owned_cluster) names. The
    /// cluster answered always lists `owner` as its owner: one whose
    /// ownership is transferred, or that is deleted, while this call runs is
    /// answered only as it was before (else the next one owned, or a new
    /// one).
    ///
    /// # Errors
    /// `NotFound` for an unknown user.
    fn create_for_owner(&self, owner: &UserId) -> StoreResult<Cluster>;

    /// The cluster with its members grouped by role.
    fn get(&self, id: &ClusterId) -> StoreResult<Option<Cluster>>;

    /// Applies `patch` in one transaction; `None` for an unknown cluster.
    ///
    /// # Errors
    /// `Invalid` when `roles` names a user under the owner role (an empty
    /// owner list asks for nothing), or under the invited role a user who
    /// is already a member past it (field `role`: a member never goes back
    /// to invited; one who accepted meanwhile makes the same call
    /// `Invalid`); `NotFound` for an unknown user in `roles`. The owner is untouched: listed under another
    /// role, they stay the owner (ownership moves only by
    /// [`transfer_ownership`](Self::transfer_ownership)).
    fn update(&self, id: &ClusterId, patch: ClusterPatch) -> StoreResult<Option<Cluster>>;

    /// Deletes the cluster, its memberships, instances and their tokens.
    ///
    /// # Errors
    /// `NotFound` for an unknown cluster (also when a first call that
    /// failed with `Unavailable` had deleted it).
    fn delete(&self, id: &ClusterId) -> StoreResult<()>;

    /// Replaces `metadata.gitHub` of the cluster linked to the integration's
    /// login id (of several, the oldest, by creation then id); `None` if no
    /// cluster is.
    ///
    /// The link is whatever `metadata.gitHub.loginId` holds, as written:
    /// the store cannot tell a verified GitHub login from one typed in.
    /// Whoever may write a cluster's metadata ([`update`](Self::update), or
    /// a sign-in's metadata merged by `UserStore::upsert` into the clusters
    /// the user runs) can link it to any login, and the oldest such cluster
    /// receives that login's installation. A control plane lets only its
    /// verified GitHub sign-in write `gitHub`. (A unique login per cluster
    /// cannot be asked of the database: one sign-in's metadata goes to
    /// every cluster its user owns or administers.)
    ///
    /// # Errors
    /// [`StoreError::Invalid`](crate::StoreError::Invalid) naming `loginId` for a blank or oversized
    /// login id; naming `metadata` for settings over the bounds of
    /// [`Metadata`](crate::Metadata) **with the `loginId` entry the store
    /// adds to them** (settings of exactly
    /// [`MAX_METADATA_BYTES`](crate::MAX_METADATA_BYTES) are refused: the
    /// entry takes its bytes too), or for a cluster whose metadata the
    /// merge would take past the schema's stored bound (nothing written).
    fn install_github_integration(&self, integration: GitHubIntegration) -> StoreResult<Option<Cluster>>;

    /// Invites these e-mails: unknown ones become users with provider
    /// `email`; each gets role `invited` unless already a member. Returns
    /// the membership of each e-mail afterwards.
    ///
    /// # Errors
    /// `Invalid` on field `email` when any address is one
    /// [`Email::check`](crate::Email::check) refuses (nothing is written);
    /// `NotFound` for an unknown cluster.
    fn add_users(&self, cluster: &ClusterId, emails: &[Email]) -> StoreResult<Vec<Member>>;

    /// Removes these members (ids of users who are not members are
    /// ignored); those it removed that an invitation made and that never
    /// signed in (provider `email`, no `users.upsert` since) and are left in
    /// no cluster are deleted. An account that signed in (by one-time code
    /// too, whose provider is also `email`) is never deleted by it, nor one
    /// that was not a member of this cluster. (Of the accounts made before
    /// migration `016_first_sign_in`, only those that show a sign-in are
    /// known to have signed in: one signed in by code that only held
    /// invitations then is taken for an invitee.) A
    /// deleted invitee's sessions are not this store's: `dployr-data`'s
    /// `DataLayer::remove_users` ends them too.
    ///
    /// # Errors
    /// `Conflict` (field `owner`) if one of them owns the cluster, nothing
    /// removed; `NotFound` for an unknown cluster.
    fn remove_users(&self, cluster: &ClusterId, users: &[UserId]) -> StoreResult<()>;

    /// Turns an invitation into a `viewer` membership.
    ///
    /// # Errors
    /// `NotFound` (entity `invite`) when the user has no invitation to the
    /// cluster: none was made, it was declined or withdrawn, or it was
    /// accepted already (also by a first call that failed with
    /// `Unavailable`).
    fn accept_invite(&self, user: &UserId, cluster: &ClusterId) -> StoreResult<()>;

    /// Removes an invitation.
    ///
    /// # Errors
    /// `NotFound` (entity `invite`) when the user has no invitation to the
    /// cluster.
    fn decline_invite(&self, user: &UserId, cluster: &ClusterId) -> StoreResult<()>;

    /// The invitations waiting for this user, oldest cluster first (by
    /// creation, then id).
    fn pending_invites(&self, user: &UserId) -> StoreResult<Vec<PendingInvite>>;

    /// Makes `new_owner` the owner; the previous owner gets
    /// `previous_owner_becomes` (`None`: removed from the cluster).
    /// `new_owner` may be any user: a member of any role, an invitee (whose
    /// invitation becomes the ownership) or a user not yet in the cluster.
    /// Transferring to the current owner changes nothing.
    ///
    /// # Errors
    /// `Invalid` for `Some(Role::Owner)` or `Some(Role::Invited)`;
    /// `NotFound` for an unknown cluster or user.
    fn transfer_ownership(
        &self,
        cluster: &ClusterId,
        new_owner: &UserId,
        previous_owner_becomes: Option<Role>,
    ) -> StoreResult<()>;

    /// The cluster this user owns; of several, the oldest (by creation,
    /// then id), the one [`create_for_owner`](Self::create_for_owner) returns.
    fn owned_cluster(&self, user: &UserId) -> StoreResult<Option<ClusterSummary>>;

    /// The clusters this user belongs to (invitations excluded), oldest
    /// first (by creation, then id).
    fn user_clusters(&self, user: &UserId) -> StoreResult<Vec<ClusterSummary>>;

    /// Members (invitations excluded), highest role first, then by e-mail.
    /// An unknown cluster has none: an empty page with a total of 0, not
    /// `NotFound` (one statement, which does not look for the cluster).
    fn members(&self, cluster: &ClusterId, page: &Page) -> StoreResult<Paged<Member>>;

    /// Invitations, by e-mail; an unknown cluster has none, as in
    /// [`members`](Self::members).
    fn invites(&self, cluster: &ClusterId, page: &Page) -> StoreResult<Paged<Member>>;

    /// This user's role in this cluster.
    fn role_of(&self, user: &UserId, cluster: &ClusterId) -> StoreResult<Option<Role>>;

    /// The owner.
    fn owner(&self, cluster: &ClusterId) -> StoreResult<Option<Member>>;

    /// The members with exactly `role`, by e-mail.
    fn users_with_role(&self, cluster: &ClusterId, role: Role) -> StoreResult<Vec<Member>>;

    /// Viewer or above.
    fn can_read(&self, user: &UserId, cluster: &ClusterId) -> StoreResult<bool>;

    /// Developer or above.
    fn can_write(&self, user: &UserId, cluster: &ClusterId) -> StoreResult<bool>;

    /// Admin or owner.
    fn is_admin(&self, user: &UserId, cluster: &ClusterId) -> StoreResult<bool>;

    /// Owner.
    fn is_owner(&self, user: &UserId, cluster: &ClusterId) -> StoreResult<bool>;

    /// The integrations recorded in the cluster's metadata.
    ///
    /// # Errors
    /// `NotFound` for an unknown cluster.
    fn integrations(&self, cluster: &ClusterId) -> StoreResult<Integrations>;
}
