//! A [tower-sessions](https://docs.rs/tower-sessions) session store over
//! any dployr key-value backend ([`KvBackend`]: memory, PostgreSQL or
//! Cloudflare Workers KV), so an axum server keeps its sessions where the
//! rest of its sign-in state lives, without writing a `SessionStore` of its
//! own.
//!
//! - **Keys hold a hash.** A record lives under `tower_session:` and the
//!   SHA-256 (hex) of its id, as `KvStore` keeps its sessions: a leaked
//!   listing of the backend holds no usable session id.
//! - **Expiry is the backend's TTL.** A record is written with a TTL of the
//!   time left until its `expiry_date`, raised to the backend's shortest TTL
//!   (Cloudflare: 60 s) and cut to its longest ([`KvLimits`]); a record whose
//!   expiry has passed is never returned, whatever the backend still holds,
//!   and one saved with an expiry already past is deleted. Every dployr
//!   backend drops expired entries itself (memory sweeps them, PostgreSQL's
//!   purger deletes them, Cloudflare expires them), so this store needs no
//!   [`ExpiredDeletion`](tower_sessions_core::ExpiredDeletion) task.
//! - **`create` never overwrites.** As tower-sessions asks, an id that is
//!   taken gets a new random id, and the store tries again. On a backend
//!   with atomic counters (memory, PostgreSQL) an id is claimed with one
//!   (`increment` returns 1 to exactly one caller), so two creates of one id
//!   cannot both win (the claim is one more small entry per session, with
//!   the session's TTL); on Cloudflare the check is a read, which two
//!   creates of the same 128-bit random id at once could both pass.
//! - **Sign out everywhere.** With [`KvSessionStore::with_user_field`], a
//!   record whose data names a user under that field is also recorded in a
//!   per-user index ([`UserSessionIndex`]), and
//!   [`KvSessionStore::delete_user_sessions`] deletes every session of that
//!   user: exactly on memory and PostgreSQL, within Cloudflare's eventual
//!   consistency there (see [`UserSessionIndex`]).
//! - **Blocking.** The backends block, so each call runs on tokio's blocking
//!   pool. A dropped future does not stop a write that started.
//!
//! On Cloudflare, whose reads may be up to 60 s stale, a deleted session may
//! still load in another process for that long (`KvStore` additionally
//! remembers its own deletions; this store does not).
//!
//! ```
//! use std::sync::Arc;
//! use dployr_kv::MemoryKv;
//! use dployr_tower_sessions::KvSessionStore;
//!
//! // With axum: SessionManagerLayer::new(store) from tower-sessions.
//! let store = KvSessionStore::new(Arc::new(MemoryKv::new())).with_user_field("user_id");
//! # let _ = store;
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use dployr_domain::{KvBackend, KvLimits, StoreError, StoreResult};
use dployr_kv::UserSessionIndex;
use sha2::{Digest as _, Sha256};
use time::OffsetDateTime;
use tower_sessions_core::session::{Id, Record};
use tower_sessions_core::{SessionStore, session_store};

/// Prefix of the keys of session records.
const RECORD_PREFIX: &str = "tower_session:";
/// Prefix of the keys that claim an id on backends with atomic counters.
const CLAIM_PREFIX: &str = "tower_session_claim:";
/// Prefix of the per-user index of sessions.
const USER_INDEX_PREFIX: &str = "tower_user_sessions:";
/// How many taken ids `create` replaces before it gives up: with 128-bit
/// random ids even a second one means something else is wrong.
const CREATE_ATTEMPTS: usize = 8;

/// A tower-sessions [`SessionStore`] on a dployr [`KvBackend`] (see the
/// crate documentation). Cheap to clone; clones share the backend.
#[derive(Clone)]
pub struct KvSessionStore {
    inner: Arc<Inner>,
}

struct Inner {
    backend: Arc<dyn KvBackend>,
    /// The data field naming a record's user, and the index of their sessions.
    users: Option<(String, UserSessionIndex)>,
}

impl fmt::Debug for KvSessionStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KvSessionStore")
            .field("user_field", &self.inner.users.as_ref().map(|(field, _)| field))
            .finish_non_exhaustive()
    }
}

impl KvSessionStore {
    /// A store of tower-sessions records on `backend`.
    pub fn new(backend: Arc<dyn KvBackend>) -> Self {
        Self { inner: Arc::new(Inner { backend, users: None }) }
    }

    /// Indexes each record by the user named in its data under `field` (a
    /// string, e.g. what `session.insert("user_id", id.to_string())` stores),
    /// so that [`delete_user_sessions`](Self::delete_user_sessions) can end
    /// them all. A record without that field is not indexed.
    #[must_use]
    pub fn with_user_field(self, field: impl Into<String>) -> Self {
        let index = UserSessionIndex::new(Arc::clone(&self.inner.backend), USER_INDEX_PREFIX);
        Self { inner: Arc::new(Inner { backend: Arc::clone(&self.inner.backend), users: Some((field.into(), index)) }) }
    }

    /// The backend the records live on.
    pub fn backend(&self) -> &Arc<dyn KvBackend> {
        &self.inner.backend
    }

    /// Deletes every session whose data named `user` under the user field
    /// ("sign out of all devices") and returns how many were listed. Exact
    /// on memory and PostgreSQL for every session saved before the call; on
    /// Cloudflare, sessions saved in the last minute may be missed (see
    /// [`UserSessionIndex`]).
    ///
    /// # Errors
    /// [`StoreError::Configuration`] when the store has no user field
    /// ([`with_user_field`](Self::with_user_field)); backend errors, after
    /// which a second call finishes the job.
    pub async fn delete_user_sessions(&self, user: &str) -> StoreResult<usize> {
        let user = user.to_owned();
        self.blocking(move |inner| {
            let Some((_, index)) = &inner.users else {
                return Err(StoreError::Configuration {
                    setting: "KvSessionStore::with_user_field",
                    reason: "is not set, so sessions are not indexed by user".into(),
                });
            };
            index.delete_all(&user, |key| inner.backend.delete(key))
        })
        .await
    }

    /// Runs `call` on tokio's blocking pool: every backend call blocks.
    async fn blocking<T: Send + 'static>(
        &self,
        call: impl FnOnce(&Inner) -> StoreResult<T> + Send + 'static,
    ) -> StoreResult<T> {
        let inner = Arc::clone(&self.inner);
        match tokio::task::spawn_blocking(move || call(&inner)).await {
            Ok(result) => result,
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            Err(error) => Err(StoreError::Unavailable {
                reason: "the runtime is shutting down; the session call did not run".into(),
                source: Some(Box::new(error)),
            }),
        }
    }
}

fn hashed(id: &Id) -> String {
    hex::encode(Sha256::digest(id.to_string().as_bytes()))
}

fn record_key(id: &Id) -> String {
    format!("{RECORD_PREFIX}{}", hashed(id))
}

/// The TTL to write a record expiring at `expiry` with, now: the time left,
/// within what the backend accepts; `None` when it has expired already.
fn ttl_until(expiry: OffsetDateTime, limits: &KvLimits) -> Option<Duration> {
    let left = expiry - OffsetDateTime::now_utc();
    if !left.is_positive() {
        return None;
    }
    // Whole milliseconds, rounded up, so the backend never drops it early.
    let millis = u64::try_from(left.whole_milliseconds()).unwrap_or(u64::MAX).saturating_add(1);
    Some(Duration::from_millis(millis).clamp(limits.min_ttl, limits.max_ttl))
}

impl Inner {
    /// The user a record's data names under the user field, if any.
    fn user_of<'r>(&self, record: &'r Record) -> Option<(&UserSessionIndex, &'r str)> {
        let (field, index) = self.users.as_ref()?;
        record.data.get(field)?.as_str().map(|user| (index, user))
    }

    fn save(&self, record: &Record) -> StoreResult<()> {
        let key = record_key(&record.id);
        let Some(ttl) = ttl_until(record.expiry_date, &self.backend.limits()) else {
            // Saved already expired: it must not load again.
            return self.backend.delete(&key);
        };
        let value = serde_json::to_vec(record).map_err(|e| StoreError::backend("encoding a session record", e))?;
        self.backend.put(&key, &value, Some(ttl))?;
        // After the record (see `UserSessionIndex` for why that order).
        if let Some((index, user)) = self.user_of(record) {
            index.add(user, &key, Some(ttl))?;
        }
        Ok(())
    }

    /// Whether `id` is free: claimed by this call on a backend with atomic
    /// counters, else not holding a record.
    fn claim(&self, id: &Id, ttl: Duration) -> StoreResult<bool> {
        if self.backend.limits().atomic
            && self.backend.increment(&format!("{CLAIM_PREFIX}{}", hashed(id)), Some(ttl))? != 1
        {
            return Ok(false);
        }
        Ok(self.backend.get(&record_key(id))?.is_none())
    }

    fn create(&self, mut record: Record) -> StoreResult<Record> {
        let limits = self.backend.limits();
        let Some(ttl) = ttl_until(record.expiry_date, &limits) else {
            // Nothing to keep: an id is still due, and one that was never stored is free.
            return Ok(record);
        };
        for _ in 0..CREATE_ATTEMPTS {
            if self.claim(&record.id, ttl)? {
                self.save(&record)?;
                return Ok(record);
            }
            record.id = Id::default();
        }
        Err(StoreError::conflict("session", "id", format!("{CREATE_ATTEMPTS} random session ids in a row were taken")))
    }

    fn load(&self, id: &Id) -> StoreResult<Option<Record>> {
        let Some(value) = self.backend.get(&record_key(id))? else { return Ok(None) };
        let record: Record =
            serde_json::from_slice(&value).map_err(|e| StoreError::backend("decoding a session record", e))?;
        // The TTL may have been raised to the backend's minimum, and a
        // backend may expire coarsely: the record's own expiry decides.
        Ok((record.id == *id && record.expiry_date > OffsetDateTime::now_utc()).then_some(record))
    }
}

/// A store error as tower-sessions' own: encoding and decoding as theirs,
/// the rest as a backend error with our message.
#[expect(clippy::needless_pass_by_value, reason = "called as `map_err(session_error)`")]
fn session_error(error: StoreError) -> session_store::Error {
    match &error {
        StoreError::Backend { message, .. } if message.starts_with("encoding") => {
            session_store::Error::Encode(error.to_string())
        }
        StoreError::Backend { message, .. } if message.starts_with("decoding") => {
            session_store::Error::Decode(error.to_string())
        }
        _ => session_store::Error::Backend(error.to_string()),
    }
}

#[async_trait]
impl SessionStore for KvSessionStore {
    async fn create(&self, session_record: &mut Record) -> session_store::Result<()> {
        let record = session_record.clone();
        *session_record = self.blocking(move |inner| inner.create(record)).await.map_err(session_error)?;
        Ok(())
    }

    async fn save(&self, session_record: &Record) -> session_store::Result<()> {
        let record = session_record.clone();
        self.blocking(move |inner| inner.save(&record)).await.map_err(session_error)
    }

    async fn load(&self, session_id: &Id) -> session_store::Result<Option<Record>> {
        let id = *session_id;
        self.blocking(move |inner| inner.load(&id)).await.map_err(session_error)
    }

    async fn delete(&self, session_id: &Id) -> session_store::Result<()> {
        let id = *session_id;
        self.blocking(move |inner| inner.backend.delete(&record_key(&id))).await.map_err(session_error)
    }
}
