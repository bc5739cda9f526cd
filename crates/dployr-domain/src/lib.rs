//! The vocabulary of the dployr data layer: types, ids, the shared error and
//! the store traits. Nothing in this crate does I/O or knows diesel, so any
//! crate of a larger workspace can depend on it alone, take `&dyn
//! ClusterStore` in its handlers, and unit-test them with the generated
//! mocks (feature `mock`: `MockUserStore`, `MockClusterStore`,
//! `MockInstanceStore`, `MockBootstrapTokenStore`).

mod cluster;
pub mod connection;
mod email;
mod error;
mod ids;
mod instance;
mod integrations;
mod kv;
pub mod libpq;
mod metadata;
mod page;
mod role;
pub mod text;
mod user;

#[cfg(feature = "mock")]
pub use cluster::MockClusterStore;
pub use cluster::{
    Cluster, ClusterPatch, ClusterStore, ClusterSummary, GitHubIntegration, MAX_CLUSTER_NAME_BYTES, Member,
    PendingInvite,
};
pub use connection::{ConnectFailure, ConnectFailureKind};
pub use email::{Email, MAX_EMAIL_BYTES, MAX_LOCAL_PART_BYTES};
pub use error::{BoxError, StoreError, StoreResult};
pub use ids::{ClusterId, InstanceId, UserId};
pub use instance::{
    BootstrapToken, BootstrapTokenStore, Instance, InstanceStore, MAX_ADDRESS_BYTES, MAX_TAG_BYTES, NewInstance,
};
#[cfg(feature = "mock")]
pub use instance::{MockBootstrapTokenStore, MockInstanceStore};
pub use integrations::{
    EmailIntegrations, Integrations, NotificationEvent, NotificationIntegration, NotificationIntegrations,
    RemoteIntegrations,
};
#[cfg(feature = "mock")]
pub use kv::MockKvBackend;
pub use kv::{
    KvBackend, KvLimits, KvPage, MAX_COUNTER, MAX_CURSOR_BYTES, MAX_KEY_BYTES, MAX_TTL, MAX_VALUE_BYTES,
    check_max_attempts, counter_at_its_largest, not_a_counter, parse_counter,
};
pub use metadata::{MAX_METADATA_BYTES, MAX_METADATA_DEPTH, Metadata};
pub use page::{Cursor, MAX_PAGE_LIMIT, Page, PageStart, Paged};
pub use role::{Provider, Role};
pub use text::{Address, ClusterName, DisplayName, Nonce, Tag};
#[cfg(feature = "mock")]
pub use user::MockUserStore;
pub use user::{MAX_USER_TEXT_BYTES, NewUser, User, UserPatch, UserStore};
