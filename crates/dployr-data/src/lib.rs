//! The facade of the dployr data layer: a [`Config`] in (from the
//! environment or built in code); a [`DataLayer`] out, with the pool opened,
//! pending migrations applied (the seed's behaviour, unless turned off), the
//! key-value backend chosen (`memory`, `postgres` or `cloudflare`), and the
//! stores and the [`KvStore`] ready.
//!
//! It re-exports what a user needs for the common case, so depending on this
//! crate alone is enough; the layered crates (`dployr-domain`, `dployr-pg`,
//! `dployr-kv`, `dployr-migrate`) stay usable on their own, also re-exported
//! here as modules.
//!
//! The API is synchronous (diesel, r2d2 and the Cloudflare client block).
//! Every store is `Send + Sync`: an async server shares the `DataLayer` in an
//! `Arc` and calls it through `spawn_blocking`, or, with the `tokio`
//! feature, uses [`AsyncDataLayer`] (`DataLayer::into_async`), whose stores
//! have the same methods as `async fn`s.

#[cfg(feature = "tokio")]
mod async_layer;
mod config;
mod health;
mod layer;

pub use config::{
    CALL_TIMEOUT_VAR, CANCEL_GRACE_VAR, CANCEL_ON_DEADLINE_VAR, CONNECT_TIMEOUT_VAR, Config, DATABASE_URL_VAR,
    DEADLINE_MARGIN_VAR, KEEPALIVES_COUNT_VAR, KEEPALIVES_IDLE_VAR, KEEPALIVES_INTERVAL_VAR, KEEPALIVES_VAR,
    KV_ONE_TIME_VAR, KV_PURGE_EVERY_VAR, KV_VAR, KvBackendConfig, MIGRATE_ALLOW_NEWER_RELEASE_VAR,
    MIGRATE_DATABASE_URL_VAR, MIGRATE_LOCK_TIMEOUT_VAR, MIGRATE_ON_START_VAR, OTP_TTL_VAR, OneTimeKvConfig,
    POOL_SIZE_VAR, REPLICA_MAX_LAG_VAR, REPLICA_URLS_VAR, SESSION_TTL_VAR, STATE_TTL_VAR, STATEMENT_CACHE_VAR,
    STATEMENT_TIMEOUT_VAR, TCP_USER_TIMEOUT_VAR,
};
pub use health::{Health, MigrationsProbe, Probe, ReplicaProbe};
pub use layer::DataLayer;

#[cfg(feature = "tokio")]
pub use async_layer::{
    AsyncBootstrapTokenStore, AsyncClusterStore, AsyncDataLayer, AsyncInstanceStore, AsyncKvStore, AsyncUserStore,
};

// Named one by one, so the facade's root holds what a user of the stores
// needs and no backend helper (`parse_counter`, `text`, ...): those stay in
// `domain`.
pub use dployr_domain::{
    Address, BootstrapToken, BootstrapTokenStore, Cluster, ClusterId, ClusterName, ClusterPatch, ClusterStore,
    ClusterSummary, Cursor, DisplayName, Email, EmailIntegrations, GitHubIntegration, Instance, InstanceId,
    InstanceStore, Integrations, KvBackend, KvLimits, KvPage, MAX_ADDRESS_BYTES, MAX_CLUSTER_NAME_BYTES,
    MAX_EMAIL_BYTES, MAX_METADATA_BYTES, MAX_METADATA_DEPTH, MAX_PAGE_LIMIT, MAX_TAG_BYTES, MAX_USER_TEXT_BYTES,
    Member, Metadata, NewInstance, NewUser, Nonce, NotificationEvent, NotificationIntegration,
    NotificationIntegrations, Page, PageStart, Paged, PendingInvite, Provider, RemoteIntegrations, Role, StoreError,
    StoreResult, Tag, User, UserId, UserPatch, UserStore,
};
#[cfg(feature = "cloudflare")]
pub use dployr_kv::CloudflareConfig;
pub use dployr_kv::{KvStore, KvStoreConfig, OAuthState, OtpCode, Session, SessionId};
pub use dployr_pg::{
    DeadlineConfig, NetworkConfig, PgPool, PoolConfig, PoolStats, ReadScope, ReplicaConfig, ReplicaSkips,
    ReplicaStatus, WalPosition,
};

pub use dployr_domain as domain;
pub use dployr_kv as kv;
pub use dployr_migrate as migrate;
pub use dployr_pg as pg;

/// The README's Rust code blocks, compiled as doctests so they cannot rot.
#[doc = include_str!("../../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
