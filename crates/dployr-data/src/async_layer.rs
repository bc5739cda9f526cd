//! `AsyncDataLayer`: the data layer for tokio servers (feature `tokio`).
//!
//! The stores stay synchronous (diesel, r2d2 and the Cloudflare client
//! block); this facade runs each call on tokio's blocking pool, so an axum
//! handler writes `data.users().get_by_email(&email).await?` instead of
//! wrapping every call in `spawn_blocking` by hand, and opening and dropping
//! the data layer inside a runtime are safe too.
//!
//! **Which pool.** Calls run on tokio's own blocking pool
//! (`spawn_blocking`), not on a pool of this crate. What bounds the work on
//! PostgreSQL is the connection pool (`DPLOYR_DB_POOL_SIZE`): calls beyond it
//! wait for a connection, up to `DPLOYR_DB_CONNECT_TIMEOUT_MS`, then fail
//! with `Unavailable`, which is the back-pressure a server wants. A second
//! bound of our own (a semaphore in front of `spawn_blocking`) would queue
//! calls a second time and hide that error; a pool of threads of our own
//! would duplicate tokio's, which already grows and shrinks with the load
//! and is sized by the application (`Builder::max_blocking_threads`,
//! default 512). So the application keeps one knob for threads and one for
//! connections.
//!
//! **Cancellation.** Dropping the future of a call (a client that hung up,
//! a `tokio::time::timeout`, a `select!`) does not cancel it once it has
//! started on the blocking pool: the statement or request runs to its end,
//! and a write commits or rolls back exactly as the synchronous call would
//! (each write is one transaction, so it is never half done). The caller
//! may assume only that: the effect happened entirely or not at all, and it
//! learns which only by reading again. A call whose future is dropped
//! before the blocking pool picked it up may not run at all. What bounds how
//! long a call runs is the data layer's own deadline (`DPLOYR_DB_CALL_TIMEOUT_MS`).
//!
//! **Open and drop.** [`AsyncDataLayer::open`] runs the blocking open
//! (connect, migrations, the key-value backend) on the blocking pool. The
//! last clone dropped inside a runtime hands the data layer to the blocking
//! pool to be dropped there, because dropping it closes connections and
//! joins the purger's thread; outside a runtime it is dropped in place.
//!
//! ```no_run
//! use dployr_data::{AsyncDataLayer, Config, Email, NewUser, Provider};
//!
//! # async fn handler() -> Result<(), dployr_data::StoreError> {
//! let data = AsyncDataLayer::open(Config::from_env()?).await?;
//! let user = data.users().upsert(NewUser::new(Email::parse("ada@example.io")?, Provider::Github)).await?;
//! let cluster = data.clusters().create_for_owner(&user.id).await?;
//! assert!(data.clusters().can_write(&user.id, &cluster.id).await?);
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::sync::Arc;

use dployr_domain::{
    BootstrapToken, BootstrapTokenStore, Cluster, ClusterId, ClusterPatch, ClusterStore, ClusterSummary, Email,
    GitHubIntegration, Instance, InstanceId, InstanceStore, Integrations, Member, Metadata, NewInstance, NewUser,
    Nonce, Page, Paged, PendingInvite, Role, StoreError, StoreResult, Tag, User, UserId, UserPatch, UserStore,
};
use dployr_kv::{OAuthState, OtpCode, Session, SessionId};

use crate::{Config, DataLayer};

/// Holds the data layer and drops it off the runtime's threads.
struct Shared {
    data: Option<DataLayer>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        let Some(data) = self.data.take() else { return };
        match tokio::runtime::Handle::try_current() {
            // Closing connections and joining the purger block: not on a
            // worker. A runtime shutting down drops the task unrun, on its
            // own thread, which may block then; nothing is waiting on it.
            Ok(runtime) => drop(runtime.spawn_blocking(move || drop(data))),
            Err(_) => drop(data),
        }
    }
}

impl Shared {
    fn data(&self) -> StoreResult<&DataLayer> {
        // Only `Drop` takes it, and nothing can call this then.
        self.data
            .as_ref()
            .ok_or_else(|| StoreError::Unavailable { reason: "the data layer was dropped".into(), source: None })
    }
}

/// The data layer for async code: every store method as an `async fn` run on
/// tokio's blocking pool (see the module documentation for the pool,
/// cancellation and drop). Cheap to clone; `Send + Sync`; the errors are the
/// synchronous stores' own [`StoreError`]s.
#[derive(Clone)]
pub struct AsyncDataLayer {
    shared: Arc<Shared>,
}

impl fmt::Debug for AsyncDataLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("AsyncDataLayer").field(&self.shared.data).finish()
    }
}

impl DataLayer {
    /// This data layer for async code. Does not block: call it anywhere.
    pub fn into_async(self) -> AsyncDataLayer {
        AsyncDataLayer { shared: Arc::new(Shared { data: Some(self) }) }
    }
}

/// Runs `call` on the blocking pool with the data layer.
async fn blocking<T: Send + 'static>(
    shared: &Arc<Shared>,
    call: impl FnOnce(&DataLayer) -> StoreResult<T> + Send + 'static,
) -> StoreResult<T> {
    let shared = Arc::clone(shared);
    match tokio::task::spawn_blocking(move || call(shared.data()?)).await {
        Ok(result) => result,
        // A panic in a store is a bug: it goes on in the caller, as it
        // would have in a synchronous call.
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        Err(error) => Err(StoreError::Unavailable {
            reason: "the runtime is shutting down; the call did not run".into(),
            source: Some(Box::new(error)),
        }),
    }
}

impl AsyncDataLayer {
    /// Opens the data layer ([`DataLayer::open`]: connect, migrations, the
    /// key-value backends) on the blocking pool.
    ///
    /// # Errors
    /// As [`DataLayer::open`]; [`StoreError::Unavailable`] when the runtime
    /// shuts down meanwhile.
    pub async fn open(config: Config) -> StoreResult<Self> {
        match tokio::task::spawn_blocking(move || DataLayer::open(config)).await {
            Ok(opened) => opened.map(DataLayer::into_async),
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            Err(error) => Err(StoreError::Unavailable {
                reason: "the runtime is shutting down; the data layer was not opened".into(),
                source: Some(Box::new(error)),
            }),
        }
    }

    /// Opens the data layer from the environment ([`Config::from_env`]).
    ///
    /// # Errors
    /// As [`Config::from_env`] and [`AsyncDataLayer::open`].
    pub async fn from_env() -> StoreResult<Self> {
        Self::open(Config::from_env()?).await
    }

    /// The synchronous data layer, for what this facade does not cover
    /// (the pool's statistics, the backends' names). Its calls block: keep
    /// them off the runtime's workers.
    ///
    /// # Errors
    /// Never in practice: [`StoreError::Unavailable`] only while dropping.
    pub fn blocking(&self) -> StoreResult<&DataLayer> {
        self.shared.data()
    }

    /// Runs `call` with the synchronous data layer on the blocking pool, as
    /// every method of this facade does: for several calls that must share
    /// one thread, such as reads inside a read-your-writes scope (the scopes
    /// of [`PgPool::reads_after`](crate::PgPool::reads_after) and
    /// [`PgPool::reads_on_primary`](crate::PgPool::reads_on_primary) hold
    /// for the thread that opened them, and each call of this facade may
    /// run on another one).
    ///
    /// ```no_run
    /// # async fn page(data: dployr_data::AsyncDataLayer, cluster: dployr_data::ClusterId) -> dployr_data::StoreResult<()> {
    /// use dployr_data::{ClusterStore, Page};
    /// // After a write: the next page sees it, from a replica that has
    /// // replayed it or from the primary.
    /// let position = data.run(|data| data.pool().wal_position()).await?;
    /// let members = data
    ///     .run(move |data| {
    ///         let _fresh = data.pool().reads_after(position);
    ///         data.clusters().members(&cluster, &Page::first(20))
    ///     })
    ///     .await?;
    /// # drop(members);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// What `call` returns; [`StoreError::Unavailable`] when the runtime
    /// shuts down before it runs.
    pub async fn run<T: Send + 'static>(
        &self,
        call: impl FnOnce(&DataLayer) -> StoreResult<T> + Send + 'static,
    ) -> StoreResult<T> {
        blocking(&self.shared, call).await
    }

    /// Users ([`UserStore`]).
    pub fn users(&self) -> AsyncUserStore {
        AsyncUserStore { shared: Arc::clone(&self.shared) }
    }

    /// Clusters and memberships ([`ClusterStore`]).
    pub fn clusters(&self) -> AsyncClusterStore {
        AsyncClusterStore { shared: Arc::clone(&self.shared) }
    }

    /// Instances ([`InstanceStore`]).
    pub fn instances(&self) -> AsyncInstanceStore {
        AsyncInstanceStore { shared: Arc::clone(&self.shared) }
    }

    /// Bootstrap tokens ([`BootstrapTokenStore`]).
    pub fn bootstrap_tokens(&self) -> AsyncBootstrapTokenStore {
        AsyncBootstrapTokenStore { shared: Arc::clone(&self.shared) }
    }

    /// Sessions, OAuth state and one-time codes ([`KvStore`](crate::KvStore)).
    pub fn kv(&self) -> AsyncKvStore {
        AsyncKvStore { shared: Arc::clone(&self.shared) }
    }
}

/// The type of an argument as the async method takes it: `&T` for `& T`,
/// `T` for `move T`.
macro_rules! arg_type {
    (& $ty:ty) => {
        &$ty
    };
    (move $ty:ty) => {
        $ty
    };
}

/// The argument as the blocking closure owns it.
macro_rules! owned_arg {
    (& $arg:ident) => {
        ToOwned::to_owned($arg)
    };
    (move $arg:ident) => {
        $arg
    };
}

/// The argument as the synchronous method takes it, from the owned one.
macro_rules! passed_arg {
    (& $arg:ident) => {
        &$arg
    };
    (move $arg:ident) => {
        $arg
    };
}

/// One async store: a struct named `$name` and, for each row of the table,
/// an `async fn` that runs the synchronous method of the same name on the
/// store `$getter` of [`DataLayer`] on the blocking pool. An argument is
/// written `name: & Type` when the method borrows it (it is cloned for the
/// blocking pool) and `name: move Type` when it takes it.
macro_rules! async_store {
    (
        $(#[$struct_doc:meta])*
        $name:ident => $getter:ident {
            $(
                $(#[$doc:meta])*
                fn $method:ident($($arg:ident : $pass:tt $ty:ty),*) -> $ret:ty;
            )*
        }
    ) => {
        $(#[$struct_doc])*
        #[derive(Clone)]
        pub struct $name {
            shared: Arc<Shared>,
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(stringify!($name))
            }
        }

        impl $name {
            $(
                $(#[$doc])*
                #[doc = ""]
                #[doc = concat!(
                    "Runs `", stringify!($getter), "().", stringify!($method),
                    "` on the blocking pool; a dropped future does not cancel a call that started ",
                    "(see the [module documentation](crate::AsyncDataLayer))."
                )]
                ///
                /// # Errors
                /// Those of the synchronous method; [`StoreError::Unavailable`]
                /// when the runtime shuts down before the call ran.
                pub async fn $method(&self, $($arg: arg_type!($pass $ty)),*) -> StoreResult<$ret> {
                    $(let $arg = owned_arg!($pass $arg);)*
                    blocking(&self.shared, move |data| data.$getter().$method($(passed_arg!($pass $arg)),*)).await
                }
            )*
        }
    };
}

async_store! {
    /// [`UserStore`] as async methods; from [`AsyncDataLayer::users`].
    AsyncUserStore => users {
        /// Creates the user, or updates the one with this e-mail (the sign-in path).
        fn upsert(user: move NewUser) -> User;
        /// The user with this id.
        fn get(id: &UserId) -> Option<User>;
        /// The user with this e-mail.
        fn get_by_email(email: &Email) -> Option<User>;
        /// Applies `patch` to the user with this e-mail; `None` if there is none.
        fn update(email: &Email, patch: move UserPatch) -> Option<User>;
        /// Deletes a user and their memberships.
        fn delete(id: &UserId) -> ();
    }
}

async_store! {
    /// [`ClusterStore`] as async methods; from [`AsyncDataLayer::clusters`].
    AsyncClusterStore => clusters {
        /// The cluster `owner` owns; if none, a new one.
        fn create_for_owner(owner: &UserId) -> Cluster;
        /// The cluster with its members grouped by role.
        fn get(id: &ClusterId) -> Option<Cluster>;
        /// Applies `patch` in one transaction; `None` for an unknown cluster.
        fn update(id: &ClusterId, patch: move ClusterPatch) -> Option<Cluster>;
        /// Deletes the cluster, its memberships, instances and their tokens.
        fn delete(id: &ClusterId) -> ();
        /// Replaces `metadata.gitHub` of the cluster linked to the integration's login id.
        fn install_github_integration(integration: move GitHubIntegration) -> Option<Cluster>;
        /// Invites these e-mails; returns the membership of each afterwards.
        fn add_users(cluster: &ClusterId, emails: &[Email]) -> Vec<Member>;
        /// Removes these members (and invitees left in no cluster).
        fn remove_users(cluster: &ClusterId, users: &[UserId]) -> ();
        /// Turns an invitation into a `viewer` membership.
        fn accept_invite(user: &UserId, cluster: &ClusterId) -> ();
        /// Removes an invitation.
        fn decline_invite(user: &UserId, cluster: &ClusterId) -> ();
        /// The invitations waiting for this user.
        fn pending_invites(user: &UserId) -> Vec<PendingInvite>;
        /// Makes `new_owner` the owner; the previous owner gets `previous_owner_becomes`.
        fn transfer_ownership(cluster: &ClusterId, new_owner: &UserId, previous_owner_becomes: move Option<Role>) -> ();
        /// The cluster this user owns.
        fn owned_cluster(user: &UserId) -> Option<ClusterSummary>;
        /// The clusters this user belongs to (invitations excluded).
        fn user_clusters(user: &UserId) -> Vec<ClusterSummary>;
        /// Members (invitations excluded), highest role first, then by e-mail; one page.
        fn members(cluster: &ClusterId, page: &Page) -> Paged<Member>;
        /// Invitations, by e-mail; one page.
        fn invites(cluster: &ClusterId, page: &Page) -> Paged<Member>;
        /// This user's role in this cluster.
        fn role_of(user: &UserId, cluster: &ClusterId) -> Option<Role>;
        /// The owner.
        fn owner(cluster: &ClusterId) -> Option<Member>;
        /// The members with exactly `role`, by e-mail.
        fn users_with_role(cluster: &ClusterId, role: move Role) -> Vec<Member>;
        /// Viewer or above.
        fn can_read(user: &UserId, cluster: &ClusterId) -> bool;
        /// Developer or above.
        fn can_write(user: &UserId, cluster: &ClusterId) -> bool;
        /// Admin or owner.
        fn is_admin(user: &UserId, cluster: &ClusterId) -> bool;
        /// Owner.
        fn is_owner(user: &UserId, cluster: &ClusterId) -> bool;
        /// The integrations recorded in the cluster's metadata.
        fn integrations(cluster: &ClusterId) -> Integrations;
    }
}

async_store! {
    /// [`InstanceStore`] as async methods; from [`AsyncDataLayer::instances`].
    AsyncInstanceStore => instances {
        /// Registers an instance in a cluster.
        fn create(cluster: &ClusterId, instance: move NewInstance) -> Instance;
        /// The instance with this id.
        fn get(id: &InstanceId) -> Option<Instance>;
        /// The instance with this tag.
        fn get_by_tag(tag: &Tag) -> Option<Instance>;
        /// Replaces the metadata; `None` for an unknown instance.
        fn update_metadata(id: &InstanceId, metadata: move Metadata) -> Option<Instance>;
        /// Deletes the instance and its tokens.
        fn delete(id: &InstanceId) -> ();
        /// The cluster's instances, newest first; one page.
        fn list_by_cluster(cluster: &ClusterId, page: &Page) -> Paged<Instance>;
    }
}

async_store! {
    /// [`BootstrapTokenStore`] as async methods; from [`AsyncDataLayer::bootstrap_tokens`].
    AsyncBootstrapTokenStore => bootstrap_tokens {
        /// Issues a token for an instance.
        fn create(instance: &InstanceId, nonce: &Nonce) -> BootstrapToken;
        /// Marks the token used: `true` for exactly one caller per nonce.
        fn mark_used(nonce: &Nonce) -> bool;
        /// Whether the token was used; an unknown nonce counts as used.
        fn is_used(nonce: &Nonce) -> bool;
    }
}

async_store! {
    /// [`KvStore`](crate::KvStore) as async methods; from [`AsyncDataLayer::kv`].
    AsyncKvStore => kv {
        /// Stores a session for `user` under `session_id` for the session TTL.
        fn create_session(session_id: &SessionId, user: &User, clusters: move Vec<ClusterSummary>) -> Session;
        /// The session under `session_id`; `None` if there is none or it expired.
        fn get_session(session_id: &SessionId) -> Option<Session>;
        /// Ends the session; ending a missing one is not an error.
        fn delete_session(session_id: &SessionId) -> ();
        /// Ends every session of `user` and returns how many were listed.
        fn delete_user_sessions(user: &UserId) -> usize;
        /// Remembers `state` and where to go after the sign-in.
        fn create_state(state: &OAuthState, redirect_url: &str) -> ();
        /// Consumes `state`: its redirect URL the first time, `None` after that.
        fn validate_state(state: &OAuthState) -> Option<String>;
        /// A new one-time code for `email`, replacing any previous one.
        fn create_otp(email: &Email) -> OtpCode;
        /// Whether `code` is the current code of `email` (counted, then compared; consumed when right).
        fn validate_otp(email: &Email, code: &OtpCode) -> bool;
    }
}
