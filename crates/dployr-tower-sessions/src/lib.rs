//! A [tower-sessions](https://docs.rs/tower-sessions) session store over
//! any dployr key-value backend ([`KvBackend`]: memory, PostgreSQL or
//! Cloudflare Workers KV), so an axum server keeps its sessions where the
//! rest of its sign-in state lives, without writing a `SessionStore` of its
//! own.
//!
//! - **Keys hold a hash.** A record lives under `tower_session:` and the
//!   SHA-256 (hex) of its id, as `KvStore` keeps its sessions, and its
//!   value holds its data and expiry date, not its id: a leaked listing,
//!   dump or backup of the backend holds no usable session id.
//! - **Expiry is the backend's TTL.** A record is written with a TTL of the
//!   time left until its `expiry_date`, raised to the backend's shortest TTL
//!   (Cloudflare: 60 s) and cut to its longest ([`KvLimits`]); a record whose
//!   expiry has passed is never returned, whatever the backend still holds,
//!   and one saved with an expiry already past is deleted. Memory reclaims
//!   expired entries at every call and Cloudflare expires them; PostgreSQL
//!   keeps expired rows (never returned) until they are purged: by the
//!   purger `DataLayer` starts (`DPLOYR_KV_PURGE_EVERY_SECS`, every 300 s
//!   unless set), by `PgKv::spawn_purger`, or, without either, by this
//!   store's [`ExpiredDeletion`] task
//!   (`store.clone().continuously_delete_expired(period)`, with
//!   tower-sessions' `deletion-task` feature), which purges every expired
//!   row of the key-value table, session records or not
//!   ([`KvBackend::delete_expired`]); on memory and Cloudflare it has
//!   nothing to do.
//! - **`create` never overwrites.** As tower-sessions asks, an id that is
//!   taken gets a new random id, and the store tries again. On a backend
//!   with atomic counters (memory, PostgreSQL) an id is claimed with one
//!   (`increment` returns 1 to exactly one caller), so two creates of one id
//!   cannot both win (the claim is one more small entry per session, with
//!   the session's TTL); on Cloudflare the check is a read (of this
//!   process's recent writes first, see below), which two creates of the
//!   same 128-bit random id at once could both pass.
//! - **A save never brings back a deleted session.** tower-sessions calls
//!   `save` only for a session its request loaded (a new one goes through
//!   `create`), so `save` writes the record only over one that is still
//!   there ([`KvBackend::replace`]): a request that loaded a session before
//!   a sign-out (`delete`), a sign-out everywhere or its expiry, and saves
//!   after it, writes no record and leaves no index entry (on memory and
//!   PostgreSQL the entry goes right before the atomic `replace` that finds
//!   the session gone, and is taken back; if that fails too, it names a
//!   gone session, which a sign-out everywhere passes over, until it
//!   expires) and its changes are dropped; the session stays ended. Exact on backends whose
//!   `replace` is atomic ([`KvLimits::atomic`]: memory, PostgreSQL), with
//!   one window at the expiry: the backend counts the TTL from when the
//!   write ran, not from when it was computed, so its entry outlives the
//!   expiry date by the time the record's last write took to reach it (a
//!   millisecond or so; longer where it waited for a pooled connection),
//!   and a save landing in that window keeps the session. Two cases are not
//!   a `save`, and no store can tell them from a new session: an id cycled
//!   ([`Session::cycle_id`](https://docs.rs/tower-sessions/latest/tower_sessions/struct.Session.html#method.cycle_id))
//!   or a session flushed and filled again, in a request that loaded it
//!   before a sign-out everywhere, goes through `create` with what it
//!   loaded and signs the user in again: cycle ids where a request signs a
//!   user in (it loaded no one's session), not to rotate a signed-in one. On
//!   Cloudflare, `replace` is a read then a write, and reads may be stale:
//!   this process never writes back a session it deleted in the last
//!   [`DELETED_SESSION_MEMORY`] (see below), but a save may bring back one
//!   deleted by another process in the last minute, or deleted here while
//!   the save's read and write ran (this process then deletes it again).
//!   And a process that wrote the session within the last
//!   [`STALE_READ_WINDOW`] writes it back without a read, each save
//!   starting that window again: on Cloudflare a sign-out by another
//!   process is undone for as long as this one keeps saving the session
//!   within a minute of its last save (**the rule is off there** for busy
//!   sessions: see "Cloudflare" in `docs/operations.md`). There a save of a
//!   session this process has not written in the window costs a read
//!   before the write.
//! - **Sign out everywhere.** With [`KvSessionStore::with_user_field`], a
//!   record whose data names a user under that field is also recorded in a
//!   per-user index ([`UserSessionIndex`]), and
//!   [`KvSessionStore::delete_user_sessions`] deletes every session of that
//!   user, and no save in flight brings one back (see above): exactly on
//!   memory and PostgreSQL, within Cloudflare's eventual consistency there
//!   (see [`UserSessionIndex`]). It counts the sessions it ended, not those
//!   its index still names that had ended before. A save of a loaded
//!   session (whose id a cookie holds) writes the user's index entry
//!   before the record, and fails with nothing else written if the entry
//!   fails, so no record naming a user is written that the index does not
//!   name, even when every write after it fails (an entry whose record
//!   write then fails names a session of nobody, which that user's
//!   sign-out everywhere ends with theirs). A new session's record (`create`)
//!   goes first: if its entry fails, the record is deleted and `create`
//!   fails (tower-sessions then hands out no cookie naming it); if its own
//!   write failed (which may have landed, its answer lost), the entry is
//!   written all the same, else the record deleted, and `create` fails. A
//!   session saved since under another user (no new id at sign-in) is left
//!   to that user's sign-out; one saved since naming nobody (the field
//!   removed to sign out of it) is still ended, and counted, with its
//!   user's, on every backend, while the user's index entry lasts: the
//!   entry expires with the last save that named them, and a later save
//!   that names nobody does not extend it.
//! - **What is stored loads back.** A record whose data is nested deeper
//!   than serde_json reads (128 levels) is refused by `create` and `save`
//!   as an encoding error, with nothing written, instead of being stored
//!   and then failing every load of its session.
//! - **Blocking.** The backends block, so each call runs on tokio's blocking
//!   pool. A dropped future does not stop a write that started; a call
//!   whose future is dropped before a blocking thread takes it does not run.
//!
//! **Stale reads (Cloudflare).** Workers KV documents that a write may take
//! 60 s "or more" to be seen (no promised bound), and tower-sessions saves and loads a session on
//! every request: read straight from the backend, a session would not load
//! right after sign-in, or load its old version, or still load after
//! sign-out. So on a backend whose [`KvLimits::read_your_writes`] is false,
//! the store remembers, in this process, what it last wrote to each record
//! it saved, created or deleted in the last [`STALE_READ_WINDOW`], and
//! answers `load` from that rather than from the backend while it is that
//! recent (sending no request): a session saved here loads back at once, in
//! its last saved version; one deleted here (or saved with an expiry
//! already past, or signed out everywhere) does not load here again, and a
//! save here does not write it back, for [`DELETED_SESSION_MEMORY`] (90 s,
//! as `KvStore` keeps a sign-out, counted from when the delete returned:
//! the 60 s with a margin, since a stale read here would undo a sign-out);
//! a remembered record past its expiry
//! date never loads, and is not written back either. A save of a record
//! written here in the window writes it without asking the backend (whose
//! stale read may not show it yet). After the window the
//! backend answers again, trusted to have caught up as Cloudflare
//! documents. `create`'s check that an id is free asks the same memory
//! first, and [`KvSessionStore::delete_user_sessions`] also deletes the
//! user's sessions saved here in the window, which a stale listing of the
//! user's index may not show yet. A save that fails leaves the memory as it
//! was. Clones share the memory; each write drops the entries whose window
//! has passed, so it holds the writes of the last window (the deletions of
//! the last 90 s), a copy of each record. On memory and PostgreSQL none is kept.
//!
//! What still does not hold: the memory is this process's only. Another
//! process (another server or region, or a store not cloned from this one)
//! may read for 60 s or more what the backend held before: a session just
//! created may not load there (a request that lands on another server finds
//! no session), a saved one may load in its previous version, a deleted one
//! may still load, and a sign-out everywhere there may miss sessions saved
//! elsewhere that the listing does not show yet (see [`UserSessionIndex`]). Within the
//! window this process prefers its own write even to a newer one made
//! elsewhere. Of two saves of one session at once in this process, the
//! memory may keep one and the backend the other until the window passes
//! (which of two concurrent saves wins is not defined on any backend).
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

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use dployr_domain::{KvBackend, KvLimits, StoreError, StoreResult};
use dployr_kv::{Clock, DELETED_SESSION_MEMORY, RecentWrites, SessionEnd, SystemClock, UserSessionIndex};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use time::OffsetDateTime;
use tower_sessions_core::session::{Id, Record};
use tower_sessions_core::{ExpiredDeletion, SessionStore, session_store};

/// Prefix of the keys of session records.
const RECORD_PREFIX: &str = "tower_session:";
/// Prefix of the keys that claim an id on backends with atomic counters.
const CLAIM_PREFIX: &str = "tower_session_claim:";
/// Prefix of the per-user index of sessions.
const USER_INDEX_PREFIX: &str = "tower_user_sessions:";
/// How many taken ids `create` replaces before it gives up: with 128-bit
/// random ids even a second one means something else is wrong.
const CREATE_ATTEMPTS: usize = 8;

/// How long, on a backend whose reads may be stale, this process prefers
/// what it wrote to a record over what the backend answers: Cloudflare
/// documents that a write may take 60 s "or more" to be seen: after that the
/// backend's answer is taken to be at least as new as this process's write,
/// which a staler read (not ruled out) would break. (`KvLimits`
/// states no staleness bound, only that reads may be stale.)
pub const STALE_READ_WINDOW: Duration = Duration::from_secs(60);

/// A tower-sessions [`SessionStore`] on a dployr [`KvBackend`] (see the
/// crate documentation). Cheap to clone; clones share the backend and the
/// memory of recent writes.
#[derive(Clone)]
pub struct KvSessionStore {
    inner: Arc<Inner>,
}

#[derive(Clone)]
struct Inner {
    backend: Arc<dyn KvBackend>,
    /// The data field naming a record's user, and the index of their sessions.
    users: Option<(String, UserSessionIndex)>,
    /// Where "now" comes from: expiry dates, TTLs and the memory's window.
    clock: Arc<dyn Clock>,
    /// This process's recent writes, on a backend whose reads may be stale;
    /// `None` on one that reads its own writes (nothing to remember, and no
    /// lock on the read path). An `Arc` so that a store rebuilt by
    /// `with_user_field` keeps what it remembered (`with_clock` starts a
    /// new one: its times are another clock's).
    recent: Option<Arc<RecentWrites<Written>>>,
    /// The record keys whose delete the backend confirmed within the last
    /// [`DELETE_AGAIN_AFTER`], where reads may be stale (as `recent`).
    deleted_lately: Option<Arc<RecentWrites<()>>>,
}

/// How long after a delete the backend confirmed a sign-out of the same
/// session is not sent again, on a backend whose reads may be stale:
/// Cloudflare takes one write per second per key, and a sign-out everywhere
/// followed by the sign-out of the request's own session (the example's
/// `flush`) was refused (429) and waited a second, or failed, for a record
/// that was gone.
const DELETE_AGAIN_AFTER: Duration = Duration::from_secs(1);

/// What this process last wrote to a record's key.
#[derive(Clone)]
enum Written {
    Record(Remembered),
    /// Found through this memory by a sign-out everywhere whose delete the
    /// backend has not confirmed yet: it does not load, but a second
    /// sign-out, after an error, finds it again.
    Deleting(Remembered),
    Deleted,
}

/// A record as this process last wrote it, and the user whose index names
/// its key from a write of this process: the user its data named then,
/// kept when a later save names nobody (the entry stays, and their
/// sign-out everywhere ends it, as it does a record the listing shows).
#[derive(Clone)]
struct Remembered {
    record: Record,
    indexed_for: Option<String>,
}

/// How [`Inner::write`] writes a record.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Writing {
    /// A new record, from `create`, under an id it found free: written
    /// whatever the backend holds.
    New,
    /// A record a request loaded, from `save` (tower-sessions saves only
    /// those): written only over a record that is still there, so that a
    /// session that ended while the request ran (signed out, signed out
    /// everywhere, expired) is not brought back by it.
    Loaded,
}

impl fmt::Debug for KvSessionStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KvSessionStore")
            .field("user_field", &self.inner.users.as_ref().map(|(field, _)| field))
            .field("remembers_recent_writes", &self.inner.recent.is_some())
            .finish_non_exhaustive()
    }
}

impl KvSessionStore {
    /// A store of tower-sessions records on `backend`.
    ///
    /// On a backend whose reads may be stale
    /// ([`KvLimits::read_your_writes`] is false), it remembers its own
    /// writes for [`STALE_READ_WINDOW`], its deletions for
    /// [`DELETED_SESSION_MEMORY`] (see the crate documentation).
    pub fn new(backend: Arc<dyn KvBackend>) -> Self {
        let recent = (!backend.limits().read_your_writes).then(Arc::default);
        let deleted_lately = recent.is_some().then(Arc::default);
        Self { inner: Arc::new(Inner { backend, users: None, clock: Arc::new(SystemClock), recent, deleted_lately }) }
    }

    /// Indexes each record by the user named in its data under `field` (a
    /// string, e.g. what `session.insert("user_id", id.to_string())` stores),
    /// so that [`delete_user_sessions`](Self::delete_user_sessions) can end
    /// them all. A record without that field is not indexed, nor one whose
    /// field is not a string (a number, `null`): a warning says so, once.
    #[must_use]
    pub fn with_user_field(self, field: impl Into<String>) -> Self {
        let mut inner = Arc::unwrap_or_clone(self.inner);
        inner.users = Some((field.into(), UserSessionIndex::new(Arc::clone(&inner.backend), USER_INDEX_PREFIX)));
        Self { inner: Arc::new(inner) }
    }

    /// Reads the time from `clock` instead of the system's: whether a
    /// record's expiry date has passed, the TTL it is written with, and how
    /// long this process's writes are preferred over a stale backend. For
    /// tests that move time by hand along with the backend's (tower-sessions
    /// sets expiry dates from the system clock).
    #[must_use]
    pub fn with_clock(self, clock: impl Clock + 'static) -> Self {
        let mut inner = Arc::unwrap_or_clone(self.inner);
        inner.clock = Arc::new(clock);
        // Times remembered on the old clock mean nothing on the new one.
        inner.recent = (!inner.backend.limits().read_your_writes).then(Arc::default);
        inner.deleted_lately = inner.recent.is_some().then(Arc::default);
        Self { inner: Arc::new(inner) }
    }

    /// The backend the records live on.
    pub fn backend(&self) -> &Arc<dyn KvBackend> {
        &self.inner.backend
    }

    /// Deletes every session whose data named `user` under the user field
    /// ("sign out of all devices") and returns how many live sessions it
    /// ended: those listed in the user's index whose record was there and
    /// not past its expiry date (an entry whose session had ended before,
    /// signed out on its own, is removed but not counted) and, on a backend
    /// with stale reads, those this process saved in the last
    /// [`STALE_READ_WINDOW`] (each counted once). Exact on memory and
    /// PostgreSQL for every session saved before the call, and a save in
    /// flight does not bring one back; on Cloudflare, sessions saved by
    /// other processes that the listing does not show yet (60 s "or more")
    /// may be missed (see [`UserSessionIndex`]), the deleted ones may still
    /// load in other processes for as long, and a stale read may count an ended
    /// session as live or a live one as ended (it is deleted all the same).
    /// Not final on Cloudflare: a process that wrote a session in the last
    /// 60 s trusts its own write, and each save it makes writes the record
    /// back and trusts it 60 s more, so a device that keeps changing its
    /// session within 60 s of the last change stays signed in (see
    /// "Cloudflare" in `docs/operations.md`).
    ///
    /// # Errors
    /// [`StoreError::Configuration`] when the store has no user field
    /// ([`with_user_field`](Self::with_user_field)); backend errors, after
    /// which a second call finishes the job.
    pub async fn delete_user_sessions(&self, user: &str) -> StoreResult<usize> {
        let user = user.to_owned();
        self.blocking(move |inner| {
            let Some((field, index)) = &inner.users else {
                return Err(StoreError::Configuration {
                    setting: "KvSessionStore::with_user_field",
                    reason: "is not set, so sessions are not indexed by user".into(),
                });
            };
            let mut listed = HashSet::new();
            let mut deleted = if inner.backend.limits().atomic {
                index.delete_all(
                    &user,
                    |key| {
                        listed.insert(key.to_owned());
                        let found = inner.listed_session(key, field, &user)?;
                        // A session saved since under another user (who signed in on
                        // it without a new id) is theirs: its entry here is stale.
                        if found == Listed::AnotherUsers {
                            return Ok(SessionEnd::AnotherUsers);
                        }
                        // Deleted even if it read as gone: a stale read may miss a
                        // live one. Counted only if it was there, and only by the
                        // one of several sign-outs at once that took it.
                        Ok(if inner.end_key(key)? && found == Listed::Live {
                            SessionEnd::Ended
                        } else {
                            SessionEnd::Gone
                        })
                    },
                    // A record is never written again under an id once ended
                    // here: `save` replaces only a record still there, and
                    // `create` claims its id first.
                    |_| Ok(None),
                )?
            } else {
                // Cloudflare: in bulk, as `KvStore::delete_user_sessions`
                // does (one read per 100 records, one delete per 10 000
                // records, then one per 10 000 index entries), not a read and
                // two deletes per record, which for a user of a few hundred
                // sign-ins spent the account's 1200 requests per 5 minutes.
                let keys = index.session_keys(&user)?;
                listed.extend(keys.iter().cloned());
                let to_read: Vec<String> =
                    keys.iter().filter(|key| inner.recent_write(key).is_none()).cloned().collect();
                let read: HashMap<&str, Option<Vec<u8>>> =
                    to_read.iter().map(String::as_str).zip(inner.backend.get_many(&to_read)?).collect();
                let mut ended = Vec::new();
                let mut live = 0;
                for key in &keys {
                    let found =
                        inner.listed_session_read(key, field, &user, |key| Ok(read.get(key).cloned().flatten()))?;
                    if found == Listed::AnotherUsers {
                        continue;
                    }
                    ended.push(key.clone());
                    live += usize::from(found == Listed::Live);
                }
                // Remembered as deleted before the delete, as a single
                // delete is: a save in flight then writes nothing back (see
                // the module documentation), and this process never loads
                // them again. Records first, in a call of their own (see
                // `KvStore::delete_user_sessions`).
                for key in &ended {
                    inner.remember(key, Written::Deleted);
                }
                let deleted = inner.backend.delete_many(&ended);
                for key in &ended {
                    inner.deleted_now(key);
                }
                deleted?;
                for key in &ended {
                    inner.confirmed_deleted(key);
                }
                // Not the entries of another user's sessions (see
                // `UserSessionIndex::delete_all`).
                let entries: Vec<String> = ended.iter().map(|key| index.entry_key(&user, key)).collect();
                inner.backend.delete_many(&entries)?;
                live
            };
            // A stale listing may not show yet the entries of sessions saved
            // in the last minute; those saved here are in the memory.
            if let Some(recent) = &inner.recent {
                for (key, record) in records_of(recent, &user, inner.clock.as_ref()) {
                    if listed.contains(&key) {
                        continue;
                    }
                    // Found only through the memory, it stays findable there
                    // until the backend confirmed the delete, so that a second
                    // call after an error finds it again.
                    inner.remember(&key, Written::Deleting(record));
                    inner.backend.delete(&key)?;
                    inner.remember(&key, Written::Deleted);
                    inner.confirmed_deleted(&key);
                    index.remove(&user, &key)?;
                    deleted += 1;
                }
            }
            Ok(deleted)
        })
        .await
    }

    /// How many record keys the memory of this process's recent writes
    /// holds, live or not yet dropped (0 where the backend reads its own
    /// writes). Not part of the API: for tests that check its bound.
    #[doc(hidden)]
    pub fn remembered_writes(&self) -> usize {
        self.inner.recent.as_ref().map_or(0, |recent| recent.len())
    }

    /// Runs `call` on tokio's blocking pool: every backend call blocks.
    async fn blocking<T: Send + 'static>(
        &self,
        call: impl FnOnce(&Inner) -> StoreResult<T> + Send + 'static,
    ) -> StoreResult<T> {
        let inner = Arc::clone(&self.inner);
        // Closed when this future is dropped: a call its caller stopped
        // waiting for before a blocking thread took it does not run (tokio
        // does not cancel a blocking task that has not started).
        let (waiting, _caller) = tokio::sync::oneshot::channel::<()>();
        let work = move || {
            if waiting.is_closed() {
                return Err(StoreError::Unavailable {
                    reason: "the caller stopped waiting before the session call started; it did not run".into(),
                    source: None,
                });
            }
            call(&inner)
        };
        match tokio::task::spawn_blocking(work).await {
            Ok(result) => result,
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            Err(error) => Err(StoreError::Unavailable {
                reason: "the runtime is shutting down; the session call did not run".into(),
                source: Some(Box::new(error)),
            }),
        }
    }
}

/// Now on `clock`, within `time`'s range: a clock moved to the end of
/// `SystemTime` (`ManualClock::advance(Duration::MAX)`, "to expire
/// everything") is the last instant `time` holds, where its own conversion
/// panics.
fn now_on(clock: &dyn Clock) -> OffsetDateTime {
    let since_epoch = clock.now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    i128::try_from(since_epoch.as_nanos())
        .ok()
        .and_then(|nanos| OffsetDateTime::from_unix_timestamp_nanos(nanos).ok())
        .unwrap_or(time::PrimitiveDateTime::MAX.assume_utc())
}

/// The records `recent` holds as written (or being deleted) within the
/// window that this process indexed for `user` (their data names `user`,
/// or named them and then nobody: [`Remembered`]) and whose expiry date
/// has not passed on `clock`, with their keys.
fn records_of(recent: &RecentWrites<Written>, user: &str, clock: &dyn Clock) -> Vec<(String, Remembered)> {
    let expiry_now = now_on(clock);
    recent.filter_live(clock.monotonic(), |key, written| match written {
        Written::Record(remembered) | Written::Deleting(remembered)
            if remembered.record.expiry_date > expiry_now && remembered.indexed_for.as_deref() == Some(user) =>
        {
            Some((key.to_owned(), remembered.clone()))
        }
        _ => None,
    })
}

fn hashed(id: &Id) -> String {
    hex::encode(Sha256::digest(id.to_string().as_bytes()))
}

fn record_key(id: &Id) -> String {
    format!("{RECORD_PREFIX}{}", hashed(id))
}

/// The TTL to write a record expiring at `expiry` with at `now`: the time
/// left, within what the backend accepts; `None` when it has expired already.
fn ttl_until(expiry: OffsetDateTime, now: OffsetDateTime, limits: &KvLimits) -> Option<Duration> {
    let left = expiry - now;
    if !left.is_positive() {
        return None;
    }
    // Whole milliseconds, rounded up, so the backend never drops it early.
    let millis = u64::try_from(left.whole_milliseconds()).unwrap_or(u64::MAX).saturating_add(1);
    Some(Duration::from_millis(millis).clamp(limits.min_ttl, limits.max_ttl))
}

/// What a sign-out everywhere finds under a session key its user's index
/// lists ([`Inner::listed_session`]).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Listed {
    /// No record, or one past its expiry date: the session ended before.
    Gone,
    /// A record whose data names another user: the entry is stale.
    AnotherUsers,
    /// A session of the user's, ended by the sign-out.
    Live,
}

impl Inner {
    /// Now, on the store's clock, as expiry dates are written.
    fn now(&self) -> OffsetDateTime {
        now_on(self.clock.as_ref())
    }

    /// `record`, written under `key`, as this process remembers it: with
    /// the user its data names, else the one a write of this process
    /// indexed it for before (see [`Remembered`]).
    fn written(&self, key: &str, record: &Record) -> Written {
        let indexed_for = match self.user_of(record) {
            Some((_, user)) => Some(user.to_owned()),
            None => match self.recent_write(key) {
                Some(Written::Record(earlier)) => earlier.indexed_for,
                _ => None,
            },
        };
        Written::Record(Remembered { record: record.clone(), indexed_for })
    }

    /// The user a record's data names under the user field, if any.
    fn user_of<'r>(&self, record: &'r Record) -> Option<(&UserSessionIndex, &'r str)> {
        let (field, index) = self.users.as_ref()?;
        let named = record.data.get(field)?;
        if !named.is_string() {
            // Not indexed, as documented; `session.insert("user_id", 42)`
            // is easy to write, and its sessions would outlive every sign
            // out everywhere without a word: said once.
            static NOT_A_STRING: std::sync::Once = std::sync::Once::new();
            NOT_A_STRING.call_once(|| {
                tracing::warn!(
                    field = field.as_str(),
                    "dployr.tower_sessions: a session's user field is not a string; such sessions are not indexed, \
                     and delete_user_sessions does not end them: store the user id as a string"
                );
            });
        }
        named.as_str().map(|user| (index, user))
    }

    /// What the record under `key`, which `user`'s index lists, is (as this
    /// process last wrote it, if lately, else as the backend answers): gone
    /// (absent, or past its expiry date), another user's (its data names
    /// someone else under `field`), or a live session of `user`'s. A record
    /// that is unreadable or names nobody is live: a session all the same.
    fn listed_session(&self, key: &str, field: &str, user: &str) -> StoreResult<Listed> {
        self.listed_session_read(key, field, user, |key| self.backend.get(key))
    }

    /// [`listed_session`](Self::listed_session), reading the backend with
    /// `read` (a value a bulk read already fetched).
    fn listed_session_read(
        &self,
        key: &str,
        field: &str,
        user: &str,
        read: impl FnOnce(&str) -> StoreResult<Option<Vec<u8>>>,
    ) -> StoreResult<Listed> {
        let record = match self.stored_read(key, read) {
            Ok(Some(record)) => record,
            Ok(None) => return Ok(Listed::Gone),
            Err(StoreError::Backend { message, .. }) if message.starts_with("decoding") => return Ok(Listed::Live),
            Err(other) => return Err(other),
        };
        if record.data.get(field).and_then(serde_json::Value::as_str).is_some_and(|named| named != user) {
            return Ok(Listed::AnotherUsers);
        }
        if record.expiry_date <= self.now() {
            return Ok(Listed::Gone);
        }
        Ok(Listed::Live)
    }

    /// The record under `key`: as this process last wrote it, if lately
    /// (this process's write is newer than what a stale read returns), else
    /// as the backend answers; `None` if deleted or absent.
    ///
    /// # Errors
    /// Backend errors; `Backend` ("decoding") for a record that does not decode.
    fn stored(&self, key: &str) -> StoreResult<Option<Stored>> {
        self.stored_read(key, |key| self.backend.get(key))
    }

    /// [`stored`](Self::stored), reading the backend with `read`.
    fn stored_read(
        &self,
        key: &str,
        read: impl FnOnce(&str) -> StoreResult<Option<Vec<u8>>>,
    ) -> StoreResult<Option<Stored>> {
        match self.recent_write(key) {
            Some(Written::Record(Remembered { record, .. })) => {
                Ok(Some(Stored { data: record.data, expiry_date: record.expiry_date }))
            }
            Some(Written::Deleting(_) | Written::Deleted) => Ok(None),
            None => match read(key)? {
                Some(value) => serde_json::from_slice(&value)
                    .map(Some)
                    .map_err(|e| StoreError::backend("decoding a session record", e)),
                None => Ok(None),
            },
        }
    }

    /// Remembers what this process wrote under `key`, where reads may be
    /// stale: a deletion for [`DELETED_SESSION_MEMORY`] (90 s, as
    /// `KvStore` does: Cloudflare's 60 s "or more", with a margin), the
    /// rest for [`STALE_READ_WINDOW`].
    fn remember(&self, key: &str, written: Written) {
        if let Some(recent) = &self.recent {
            let window = if matches!(written, Written::Deleted) { DELETED_SESSION_MEMORY } else { STALE_READ_WINDOW };
            recent.remember(key, written, self.clock.monotonic(), window);
        }
    }

    /// Starts the window of a deletion remembered under `key` again, once
    /// the delete returned (its retries may have taken seconds), unless the
    /// key was written meanwhile: that write stays.
    fn deleted_now(&self, key: &str) {
        if let Some(recent) = &self.recent {
            recent.remember_unless(key, Written::Deleted, self.clock.monotonic(), DELETED_SESSION_MEMORY, |written| {
                !matches!(written, Written::Deleted)
            });
        }
    }

    /// What this process wrote under `key` lately, where reads may be stale.
    fn recent_write(&self, key: &str) -> Option<Written> {
        self.recent.as_ref()?.get(key, self.clock.monotonic())
    }

    /// Deletes the record under `key`. Remembered first, as `KvStore` does
    /// with sessions: even if the delete fails, this process does not load
    /// the record again (the caller signed out); the error still says that
    /// other processes may. Remembered again once the delete returned, so
    /// the window counts from when it landed, however long its retries took.
    fn delete_key(&self, key: &str) -> StoreResult<()> {
        self.remember(key, Written::Deleted);
        let deleted = self.backend.delete(key);
        self.deleted_now(key);
        if deleted.is_ok() {
            self.confirmed_deleted(key);
        }
        deleted
    }

    /// Notes that the backend confirmed the delete of `key` just now.
    fn confirmed_deleted(&self, key: &str) {
        if let Some(lately) = &self.deleted_lately {
            lately.remember(key, (), self.clock.monotonic(), DELETE_AGAIN_AFTER);
        }
    }

    /// Ends the session under `key` (tower-sessions' `delete`, a sign-out):
    /// its record, unless this process deleted it, confirmed, within the
    /// last [`DELETE_AGAIN_AFTER`] and has not written it since (sent
    /// again, the delete would only wait for the backend's per-key limit).
    fn sign_out(&self, key: &str) -> StoreResult<()> {
        let deleted_lately =
            self.deleted_lately.as_ref().is_some_and(|lately| lately.get(key, self.clock.monotonic()).is_some());
        if deleted_lately && matches!(self.recent_write(key), Some(Written::Deleted)) {
            return Ok(());
        }
        self.delete_key(key)
    }

    /// Deletes the record under `key` for a sign-out everywhere; whether
    /// this call ended it: where the backend's `take` is atomic, only one of
    /// several calls at once takes it (so their counts add up); elsewhere
    /// every caller that read it live counts it.
    fn end_key(&self, key: &str) -> StoreResult<bool> {
        self.remember(key, Written::Deleted);
        let ended = if self.backend.limits().atomic {
            self.backend.take(key).map(|taken| taken.is_some())
        } else {
            self.backend.delete(key).map(|()| true)
        };
        self.deleted_now(key);
        ended
    }

    /// Writes `record` back, as tower-sessions saves a session its request
    /// loaded: only over a record that is still there (see
    /// [`Writing::Loaded`]).
    fn save(&self, record: &Record) -> StoreResult<()> {
        self.write(record, None, Writing::Loaded)
    }

    /// Writes `record` and its user's index entry, `writing` it as new or
    /// as loaded; one with an expiry already past is deleted instead.
    /// `encoded` is the record as [`encode_within`] gives it, when the
    /// caller has it already (`create`: the value holds no id, so one
    /// encoding serves every id tried).
    fn write(&self, record: &Record, encoded: Option<&[u8]>, writing: Writing) -> StoreResult<()> {
        let key = record_key(&record.id);
        let Some(ttl) = ttl_until(record.expiry_date, self.now(), &self.backend.limits()) else {
            // Saved already expired: it must not load again.
            return self.delete_key(&key);
        };
        let value = match encoded {
            Some(value) => std::borrow::Cow::Borrowed(value),
            None => std::borrow::Cow::Owned(encode_within(record, &self.backend.limits())?),
        };
        // A loaded session's id is in the visitor's cookie already: its
        // record, once it names a user, must be in the user's index, even if
        // every write after it fails (a pool with no connection free fails
        // the entry and then the delete that would take the record back).
        // So its entry goes right before the record's write, once whatever
        // can tell the session ended without a write has been asked (this
        // process's memory, or the read of a backend whose `replace` is
        // a read and a write): a save dropped there writes nothing. A failed
        // entry fails the save with nothing else written. An entry whose
        // record write then fails names a record of nobody (which the
        // user's sign-out everywhere ends and counts) or none (passed
        // over). A new session's record goes first (see `UserSessionIndex`):
        // its id reaches no cookie unless the whole save succeeds.
        let entry_written = std::cell::Cell::new(false);
        let entry_first = || {
            if writing == Writing::Loaded
                && let Some((index, user)) = self.user_of(record)
            {
                index.add(user, &key, Some(ttl))?;
                entry_written.set(true);
            }
            Ok(())
        };
        let written = match self.write_record(&key, &value, ttl, writing, entry_first) {
            Ok(written) => written,
            Err(error) => {
                if writing == Writing::New {
                    self.after_a_failed_record_write(record, &key, ttl, &error);
                }
                return Err(error);
            }
        };
        if !written {
            // The session ended after its request loaded it (signed out,
            // signed out everywhere, or expired): the request's changes
            // are dropped, and no index entry or memory of a write is left
            // to name a session that is gone. Only an atomic `replace`
            // decides after the entry was written: the entry is taken back
            // (if that fails, it names nothing until it expires). There a
            // record found gone stays gone, so the entry is no other
            // save's; elsewhere the verdict came before any write, and an
            // entry of the key may be another process's, for a session it
            // wrote back.
            if entry_written.get() {
                self.remove_entry(record, &key);
            }
            return Ok(());
        }
        // Only once the backend took it (a failed write leaves what this
        // process knew before), and with the window counted from now, when
        // the write landed.
        let remembered = match (&self.recent, writing) {
            (None, _) => true,
            (Some(recent), Writing::New) => {
                recent.remember(&key, self.written(&key, record), self.clock.monotonic(), STALE_READ_WINDOW);
                true
            }
            // A delete remembered now, where none was before the write, came
            // in while it wrote, and wins.
            (Some(recent), Writing::Loaded) => recent.remember_unless(
                &key,
                self.written(&key, record),
                self.clock.monotonic(),
                STALE_READ_WINDOW,
                |written| matches!(written, Written::Deleted | Written::Deleting(_)),
            ),
        };
        if !remembered {
            // Deleted here while this save wrote: the delete wins, also in
            // the backend, where this write may have landed after it. The
            // index entry this save wrote first stays: it names no record,
            // which a sign-out everywhere passes over, until it expires.
            // Taking it back could take another process's entry for the
            // same key, written for a save of its own that a stale read let
            // through, and leave that record in no index.
            return self.backend.delete(&key);
        }
        // A new record's entry, after the record (see `UserSessionIndex`
        // for why that order).
        if writing == Writing::New
            && let Some((index, user)) = self.user_of(record)
            && let Err(error) = index.add(user, &key, Some(ttl))
        {
            // A record its user's index does not name would survive their
            // sign-out everywhere: it is taken back, unless the index names
            // it already or that cannot be told, and the caller gets the
            // error. If the delete fails too, the record stays, named by
            // no cookie: `create` failed, so tower-sessions hands out none.
            if !index.contains(user, &key).unwrap_or(false) {
                let _ignored = self.delete_key(&key);
            }
            return Err(error);
        }
        Ok(())
    }

    /// Takes back the index entry a save of the loaded `record` wrote
    /// before an atomic `replace` found its session gone; best effort:
    /// an entry left names nothing, which a sign-out everywhere passes
    /// over, until it expires with the record's TTL.
    fn remove_entry(&self, record: &Record, key: &str) {
        if let Some((index, user)) = self.user_of(record) {
            let _ignored = index.remove(user, key);
        }
    }

    /// After the write of `record` under `key` failed: the write may have
    /// landed all the same, its answer lost (a connection cut after the
    /// commit, a Cloudflare request that timed out once taken, which may
    /// even land later), and a record naming a user that the user's index
    /// does not name would survive their sign-out everywhere. So the entry
    /// is written (it names no record if the write did not land, which a
    /// sign-out everywhere passes over); if that fails too, and the index
    /// does not name it already (or that cannot be told), the record is
    /// taken back (the session ends, as a sign-out would), as after a
    /// failed entry. A refusal of the input or the settings wrote nothing.
    /// Only a new record's write comes here: `create` claims an id that no
    /// write of this process holds, so no earlier entry of it can be
    /// relied on.
    fn after_a_failed_record_write(&self, record: &Record, key: &str, ttl: Duration, error: &StoreError) {
        if matches!(error, StoreError::Invalid { .. } | StoreError::Configuration { .. }) {
            return;
        }
        if let Some((index, user)) = self.user_of(record)
            && index.add(user, key, Some(ttl)).is_err()
            && !index.contains(user, key).unwrap_or(false)
        {
            let _ignored = self.delete_key(key);
        }
    }

    /// Stores `value` under the record key `key` for `ttl`, and whether it
    /// did: a new record always; a loaded one only over a record that is
    /// still there. Where reads may be stale, this process's memory of its
    /// writes answers first: a record it deleted lately is not written (a
    /// stale read may still show it), one it wrote lately, and whose expiry
    /// date has not passed, is overwritten (a stale read may not show it
    /// yet); otherwise the backend's [`KvBackend::replace`] decides,
    /// atomically where [`KvLimits::atomic`] says so. `before_writing` runs
    /// right before the write, once nothing short of it can tell that the
    /// record is not to be written; its error fails the call, nothing
    /// written.
    fn write_record(
        &self,
        key: &str,
        value: &[u8],
        ttl: Duration,
        writing: Writing,
        before_writing: impl FnOnce() -> StoreResult<()>,
    ) -> StoreResult<bool> {
        if writing == Writing::New {
            before_writing()?;
            self.backend.put(key, value, Some(ttl))?;
            return Ok(true);
        }
        match self.recent_write(key) {
            Some(Written::Deleted | Written::Deleting(_)) => Ok(false),
            Some(Written::Record(stored)) if stored.record.expiry_date <= self.now() => Ok(false),
            Some(Written::Record(_)) => {
                before_writing()?;
                self.backend.put(key, value, Some(ttl))?;
                Ok(true)
            }
            // Cloudflare keeps an entry 60 s at least and rounds its TTL up:
            // past the record's own expiry date it may still hold it, and a
            // save from a request that loaded it before then (in another
            // process: this one remembers its writes) would bring an ended
            // session back. Its `replace` is a read then a put anyway: the
            // read's expiry date is the rule here.
            None if !self.backend.limits().atomic => match self.backend.get(key)? {
                None => Ok(false),
                Some(stored) if expiry_of(&stored).is_some_and(|at| at <= self.now()) => Ok(false),
                Some(_) => {
                    before_writing()?;
                    self.backend.put(key, value, Some(ttl))?;
                    Ok(true)
                }
            },
            None => {
                before_writing()?;
                self.backend.replace(key, value, Some(ttl))
            }
        }
    }

    /// Whether `id` is free: claimed by this call on a backend with atomic
    /// counters, else not holding a record (as this process last wrote it,
    /// if lately, else as the backend answers).
    fn claim(&self, id: &Id, ttl: Duration) -> StoreResult<bool> {
        if self.backend.limits().atomic
            && self.backend.increment(&format!("{CLAIM_PREFIX}{}", hashed(id)), Some(ttl))? != 1
        {
            return Ok(false);
        }
        let key = record_key(id);
        match self.recent_write(&key) {
            // Taken even if its expiry date has passed or its delete is
            // unconfirmed: the backend may still hold it, and a new id
            // costs nothing.
            Some(Written::Record(_) | Written::Deleting(_)) => Ok(false),
            Some(Written::Deleted) => Ok(true),
            None => Ok(self.backend.get(&key)?.is_none()),
        }
    }

    fn create(&self, mut record: Record) -> StoreResult<Record> {
        let limits = self.backend.limits();
        let Some(ttl) = ttl_until(record.expiry_date, self.now(), &limits) else {
            // Nothing to keep, but the id handed back must be free all the
            // same: tower-sessions keeps it, and a later save under it with
            // a new expiry date would write over the session that holds it.
            let claim_for = limits.min_ttl.max(Duration::from_secs(60));
            for _ in 0..CREATE_ATTEMPTS {
                if self.claim(&record.id, claim_for)? {
                    return Ok(record);
                }
                record.id = Id::default();
            }
            return Err(StoreError::conflict(
                "session",
                "id",
                format!("{CREATE_ATTEMPTS} random session ids in a row were taken"),
            ));
        };
        // Before an id is claimed: a record `save` will refuse (too deep to
        // decode, too large for the backend) leaves nothing, not even the claim.
        let value = encode_within(&record, &limits)?;
        for _ in 0..CREATE_ATTEMPTS {
            if self.claim(&record.id, ttl)? {
                self.write(&record, Some(&value), Writing::New)?;
                return Ok(record);
            }
            record.id = Id::default();
        }
        Err(StoreError::conflict("session", "id", format!("{CREATE_ATTEMPTS} random session ids in a row were taken")))
    }

    fn load(&self, id: &Id) -> StoreResult<Option<Record>> {
        let Some(Stored { data, expiry_date }) = self.stored(&record_key(id))? else { return Ok(None) };
        // The TTL may have been raised to the backend's minimum, a backend
        // may expire coarsely, and the memory knows no TTL: the record's own
        // expiry decides.
        Ok((expiry_date > self.now()).then_some(Record { id: *id, data, expiry_date }))
    }
}

/// A record's data: tower-sessions' `Record::data`, whose alias is private.
type Data = std::collections::HashMap<String, serde_json::Value>;

/// A record as it is stored: its data and expiry date, in tower-sessions'
/// own encoding of them, but not its id. The id is the session's secret
/// (the cookie is its text): the key holds only its hash, so that a leaked
/// listing, dump, backup or replica of the backend hands out no live
/// session, and the value must not hold it either. `load` knows the id it
/// was asked for. (Records written before held the `id`: it is ignored.)
#[derive(Serialize, Deserialize)]
struct Stored {
    data: Data,
    expiry_date: OffsetDateTime,
}

/// The expiry date of a stored record, read without its data; `None` for
/// a value that is not one (written by another release, or by hand: the
/// save goes on, as a replace would).
fn expiry_of(stored: &[u8]) -> Option<OffsetDateTime> {
    #[derive(Deserialize)]
    struct Expiry {
        expiry_date: OffsetDateTime,
    }
    serde_json::from_slice::<Expiry>(stored).ok().map(|expiry| expiry.expiry_date)
}

/// What [`encode`] writes: [`Stored`], borrowed from a record, and an `id`
/// of 0 in place of the record's. The previous release decodes a whole
/// `Record`, which needs the field: given 0, it finds the record is not
/// the one it was asked for and answers no session (the user signs in
/// again) instead of failing every load of the session, in a rolling
/// deploy or after a rollback. It holds nothing of the session's.
#[derive(Serialize)]
struct StoredRef<'a> {
    id: i128,
    data: &'a Data,
    expiry_date: OffsetDateTime,
}

/// `record` as it is stored ([`Stored`]): JSON that decodes back, or an
/// encoding error. serde_json writes data nested deeper than it reads (it
/// stops at 128 levels): such a record would be written, and then every
/// load of its session would fail (in other processes at once, in this one
/// once its memory of the write has passed), its user stuck with a broken
/// session until it expired.
fn encode(record: &Record) -> StoreResult<Vec<u8>> {
    // serde_json writes any depth, recursing on this thread's stack: a few
    // thousand levels overflow it, which aborts the process. Far deeper
    // than it reads back is refused before; the decode below draws the
    // exact line.
    if record.data.values().any(|value| nests_deeper_than(value, WRITE_DEPTH_GUARD)) {
        return Err(StoreError::Backend {
            message: format!(
                "encoding a session record: it would not decode back (nested deeper than {WRITE_DEPTH_GUARD} levels)"
            )
            .into(),
            source: None,
        });
    }
    let stored = StoredRef { id: 0, data: &record.data, expiry_date: record.expiry_date };
    let value = serde_json::to_vec(&stored).map_err(|e| StoreError::backend("encoding a session record", e))?;
    serde_json::from_slice::<Stored>(&value)
        .map_err(|e| StoreError::backend("encoding a session record: it would not decode back", e))?;
    Ok(value)
}

/// Past this many levels of arrays and objects, a record's data is refused
/// before it is serialized: well past the 128 serde_json reads back, well
/// short of what overflows a thread's stack.
const WRITE_DEPTH_GUARD: usize = 200;

/// Whether `value` nests arrays and objects more than `levels` deep; its
/// own recursion is at most `levels` deep.
fn nests_deeper_than(value: &serde_json::Value, levels: usize) -> bool {
    match value {
        serde_json::Value::Array(items) => levels == 0 || items.iter().any(|item| nests_deeper_than(item, levels - 1)),
        serde_json::Value::Object(map) => levels == 0 || map.values().any(|item| nests_deeper_than(item, levels - 1)),
        serde_json::Value::Null
        | serde_json::Value::Bool(_)
        | serde_json::Value::Number(_)
        | serde_json::Value::String(_) => false,
    }
}

/// [`encode`], refused as an encoding error when the backend would not take
/// the value: the record is too large, which is the caller's data, not a
/// failure of the backend.
fn encode_within(record: &Record, limits: &KvLimits) -> StoreResult<Vec<u8>> {
    let value = encode(record)?;
    limits.check_value(&value).map_err(|e| StoreError::backend("encoding a session record: it is too large", e))?;
    Ok(value)
}

/// A store error as tower-sessions' own: encoding and decoding as theirs,
/// the rest as a backend error with our message.
#[expect(clippy::needless_pass_by_value, reason = "called as `map_err(session_error)`")]
fn session_error(error: StoreError) -> session_store::Error {
    // Encoding and decoding errors are the caller's data, not the
    // backend's: their text is theirs, without `StoreError`'s "backend error".
    let text = |message: &str, source: &Option<dployr_domain::BoxError>| match source {
        Some(source) => format!("{message}: {source}"),
        None => message.to_owned(),
    };
    match &error {
        StoreError::Backend { message, source } if message.starts_with("encoding") => {
            session_store::Error::Encode(text(message, source))
        }
        StoreError::Backend { message, source } if message.starts_with("decoding") => {
            session_store::Error::Decode(text(message, source))
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
        self.blocking(move |inner| inner.sign_out(&record_key(&id))).await.map_err(session_error)
    }
}

/// Purges the backend's expired entries ([`KvBackend::delete_expired`]):
/// on PostgreSQL, expired rows of the key-value table in batches, up to
/// 100 000 a pass (see the crate documentation for when a server needs
/// it); on memory and Cloudflare, nothing. A failure that may pass (the
/// server restarting, no connection in time) is logged and answered `Ok`,
/// so that tower-sessions' `continuously_delete_expired`, which ends at
/// its first error, tries again at its next period; any other failure is
/// the error.
#[async_trait]
impl ExpiredDeletion for KvSessionStore {
    async fn delete_expired(&self) -> session_store::Result<()> {
        match self.blocking(|inner| inner.backend.delete_expired()).await {
            Ok(_) => Ok(()),
            Err(error) if error.is_retryable() => {
                tracing::warn!(%error, "dployr.tower_sessions: purge of expired records failed; tried again next period");
                Ok(())
            }
            Err(error) => Err(session_error(error)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use dployr_domain::KvPage;
    use dployr_kv::MemoryKv;

    use super::*;

    /// Memory, whose writes to the per-user index fail (a backend that
    /// refused one request of two).
    struct IndexWritesFail(MemoryKv);

    /// Memory whose purge fails with the error the function makes.
    struct PurgeFails(MemoryKv, fn() -> StoreError);

    /// The calls both forward to memory.
    macro_rules! forwarded_to_memory {
        () => {
            fn limits(&self) -> KvLimits {
                self.0.limits()
            }
            fn get(&self, key: &str) -> StoreResult<Option<Vec<u8>>> {
                self.0.get(key)
            }
            fn delete(&self, key: &str) -> StoreResult<()> {
                self.0.delete(key)
            }
            fn list(&self, prefix: &str, limit: usize, cursor: Option<&str>) -> StoreResult<KvPage> {
                self.0.list(prefix, limit, cursor)
            }
            fn take(&self, key: &str) -> StoreResult<Option<Vec<u8>>> {
                self.0.take(key)
            }
            fn increment(&self, key: &str, ttl: Option<Duration>) -> StoreResult<i64> {
                self.0.increment(key, ttl)
            }
        };
    }

    impl KvBackend for IndexWritesFail {
        forwarded_to_memory!();
        fn put(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> StoreResult<()> {
            if key.starts_with(USER_INDEX_PREFIX) {
                return Err(StoreError::Unavailable { reason: "refused for the test".into(), source: None });
            }
            self.0.put(key, value, ttl)
        }
    }

    impl KvBackend for PurgeFails {
        forwarded_to_memory!();
        fn put(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> StoreResult<()> {
            self.0.put(key, value, ttl)
        }
        fn delete_expired(&self) -> StoreResult<u64> {
            Err((self.1)())
        }
    }

    /// A call whose future is dropped while it waits for a blocking thread
    /// (a request a timeout ended) does not run when a thread frees up:
    /// nothing is written.
    #[test]
    fn a_call_dropped_before_a_blocking_thread_took_it_does_not_run() {
        let runtime = tokio::runtime::Builder::new_current_thread().max_blocking_threads(1).build().unwrap();
        runtime.block_on(async {
            let backend = Arc::new(MemoryKv::new());
            let store = KvSessionStore::new(backend.clone());
            let (release, released) = std::sync::mpsc::channel::<()>();
            let holder = tokio::task::spawn_blocking(move || released.recv());
            let mut new = record(&[("theme", "dark")]);
            let mut create = Box::pin(store.create(&mut new));
            let first_poll = std::future::poll_fn(|cx| std::task::Poll::Ready(create.as_mut().poll(cx))).await;
            assert!(first_poll.is_pending(), "the only blocking thread is held");
            drop(create);
            drop(release);
            let _ = holder.await.unwrap();
            // The dropped call's task runs (and returns) before this one.
            tokio::task::spawn_blocking(|| ()).await.unwrap();
            assert_eq!(backend.list("", 100, None).unwrap().keys, Vec::<String>::new(), "the dropped call ran");
        });
    }

    /// The deletion task survives a failure that may pass (tower-sessions'
    /// `continuously_delete_expired` ends at its first error): logged and
    /// answered `Ok`; any other failure is its error.
    #[tokio::test]
    async fn the_deletion_task_outlives_a_purge_failure_that_may_pass() {
        let passing = || StoreError::Unavailable { reason: "the server is restarting".into(), source: None };
        let store = KvSessionStore::new(Arc::new(PurgeFails(MemoryKv::new(), passing)));
        assert!(store.delete_expired().await.is_ok());
        let lasting = || StoreError::Backend { message: "a broken table".into(), source: None };
        let store = KvSessionStore::new(Arc::new(PurgeFails(MemoryKv::new(), lasting)));
        assert!(matches!(store.delete_expired().await, Err(session_store::Error::Backend(_))));
    }

    /// Across a rolling deploy or a rollback: a record the previous release
    /// wrote (with its id) loads here, and one written here decodes as the
    /// previous release decodes it (a whole `Record`), with an id that
    /// matches no session, instead of failing.
    #[test]
    fn records_read_across_releases_the_old_with_its_id_and_the_new_with_id_zero() {
        let mut written_before = record(&[("theme", "dark")]);
        written_before.id = Id(123_456_789);
        let old_value = serde_json::to_vec(&written_before).unwrap();
        let stored: Stored = serde_json::from_slice(&old_value).unwrap();
        assert_eq!((stored.data, stored.expiry_date), (written_before.data.clone(), written_before.expiry_date));

        let new_value = encode(&written_before).unwrap();
        let as_before: Record = serde_json::from_slice(&new_value).unwrap();
        assert_eq!(as_before.id, Id(0));
        assert_eq!((as_before.data, as_before.expiry_date), (written_before.data, written_before.expiry_date));
    }

    /// A record expiring in an hour whose data holds `pairs`.
    fn record(pairs: &[(&str, &str)]) -> Record {
        Record {
            id: Id::default(),
            data: pairs.iter().map(|(k, v)| ((*k).to_owned(), serde_json::Value::from(*v))).collect(),
            expiry_date: OffsetDateTime::now_utc() + time::Duration::hours(1),
        }
    }

    #[tokio::test]
    async fn a_save_whose_user_index_entry_fails_is_an_error_and_leaves_no_record_a_sign_out_could_miss() {
        let store = KvSessionStore::new(Arc::new(IndexWritesFail(MemoryKv::new()))).with_user_field("user_id");
        // Created anonymous (no index entry), then ada signs in on it.
        let mut record = record(&[]);
        store.create(&mut record).await.unwrap();
        let anonymous = record.clone();
        record.data.insert("user_id".to_owned(), serde_json::Value::from("ada"));
        assert!(store.save(&record).await.is_err(), "the index entry was refused");
        // The entry goes first: refused, nothing else is written, and the
        // session is still the anonymous one (no record naming ada that her
        // index does not name).
        assert_eq!(store.load(&record.id).await.unwrap(), Some(anonymous));
    }

    #[tokio::test]
    async fn a_signed_in_session_whose_index_refresh_fails_stays_signed_in() {
        let memory = MemoryKv::new();
        let mut record = record(&[("user_id", "ada")]);
        // Created with its entry, on a backend that still took index writes.
        let healthy = KvSessionStore::new(Arc::new(memory.clone())).with_user_field("user_id");
        healthy.create(&mut record).await.unwrap();
        let store = KvSessionStore::new(Arc::new(IndexWritesFail(memory))).with_user_field("user_id");
        assert!(store.save(&record).await.is_err(), "the refresh of the entry was refused");
        assert_eq!(store.load(&record.id).await.unwrap(), Some(record.clone()), "still signed in, still indexed");
        assert_eq!(healthy.delete_user_sessions("ada").await.unwrap(), 1, "and signed out everywhere as before");
    }

    #[tokio::test]
    async fn no_memory_of_writes_is_kept_on_a_backend_that_reads_its_writes() {
        let store = KvSessionStore::new(Arc::new(MemoryKv::new()));
        let mut record = record(&[]);
        store.create(&mut record).await.unwrap();
        store.save(&record).await.unwrap();
        assert_eq!(store.load(&record.id).await.unwrap(), Some(record.clone()));
        store.delete(&record.id).await.unwrap();
        assert_eq!(store.remembered_writes(), 0);
        assert!(format!("{store:?}").contains("remembers_recent_writes: false"));
    }

    /// What runs in the middle of a write.
    type Hook = Box<dyn FnOnce() + Send>;

    /// Memory that reads as if stale (as Cloudflare does, so the store
    /// keeps its memory of writes), with what a test asks of it: a hook run
    /// just before the next session record is written (a delete that lands
    /// while a save writes), reads of index entries that never show them
    /// yet (a Cloudflare read within a minute of the write), and writes of
    /// index entries that fail while `fail_index_puts` is set.
    #[derive(Default)]
    struct StaleMemory {
        kv: MemoryKv,
        before_record_put: Mutex<Option<Hook>>,
        hide_index_reads: bool,
        fail_index_puts: std::sync::atomic::AtomicBool,
    }

    impl KvBackend for StaleMemory {
        fn limits(&self) -> KvLimits {
            KvLimits { atomic: false, read_your_writes: false, ..self.kv.limits() }
        }
        fn get(&self, key: &str) -> StoreResult<Option<Vec<u8>>> {
            if self.hide_index_reads && key.starts_with(USER_INDEX_PREFIX) { Ok(None) } else { self.kv.get(key) }
        }
        fn put(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> StoreResult<()> {
            if key.starts_with(USER_INDEX_PREFIX) && self.fail_index_puts.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(StoreError::Unavailable { reason: "throttled".into(), source: None });
            }
            let hook =
                if key.starts_with(RECORD_PREFIX) { self.before_record_put.lock().unwrap().take() } else { None };
            if let Some(hook) = hook {
                hook();
            }
            self.kv.put(key, value, ttl)
        }
        fn delete(&self, key: &str) -> StoreResult<()> {
            self.kv.delete(key)
        }
        fn list(&self, prefix: &str, limit: usize, cursor: Option<&str>) -> StoreResult<KvPage> {
            self.kv.list(prefix, limit, cursor)
        }
        fn take(&self, key: &str) -> StoreResult<Option<Vec<u8>>> {
            self.kv.take(key)
        }
        fn increment(&self, key: &str, ttl: Option<Duration>) -> StoreResult<i64> {
            self.kv.increment(key, ttl)
        }
    }

    /// A save of a signed-in session whose index entry this process wrote
    /// a moment ago fails to refresh the entry: the session stays signed
    /// in (the save fails). The index read that decided it is stale and
    /// did not show the entry, so the record was deleted: a sign-out.
    #[tokio::test]
    async fn a_failed_index_refresh_keeps_a_session_whose_entry_this_process_wrote() {
        let backend = Arc::new(StaleMemory { hide_index_reads: true, ..StaleMemory::default() });
        let store = KvSessionStore::new(backend.clone()).with_user_field("user_id");
        let mut record = record(&[("user_id", "ada")]);
        store.create(&mut record).await.unwrap();
        backend.fail_index_puts.store(true, std::sync::atomic::Ordering::SeqCst);
        let before = record.clone();
        record.data.insert("theme".into(), "dark".into());
        assert!(store.save(&record).await.is_err(), "the save says its refresh failed");
        // The entry goes first: its failure fails the save before the
        // record is written; the session stays as it was.
        assert_eq!(store.load(&record.id).await.unwrap(), Some(before), "and the session stays");
        // A record no entry of this process names is taken back, as before.
        let mut other = super::tests::record(&[("user_id", "bob")]);
        assert!(store.create(&mut other).await.is_err());
        assert_eq!(store.load(&other.id).await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_delete_in_this_process_while_a_save_writes_wins_despite_stale_reads() {
        let backend = Arc::new(StaleMemory::default());
        let store = KvSessionStore::new(backend.clone());
        let mut record = record(&[("theme", "light")]);
        store.create(&mut record).await.unwrap();
        // The sign-out lands after the save found the session there (in
        // its memory of writes) and before its write.
        let (inner, key) = (Arc::clone(&store.inner), record_key(&record.id));
        *backend.before_record_put.lock().unwrap() = Some(Box::new(move || inner.delete_key(&key).unwrap()));
        record.data.insert("theme".to_owned(), serde_json::Value::from("dark"));
        store.save(&record).await.unwrap();
        assert!(backend.before_record_put.lock().unwrap().is_none(), "the delete ran during the save");
        assert_eq!(store.load(&record.id).await.unwrap(), None, "signed in again here");
        assert_eq!(backend.kv.get(&record_key(&record.id)).unwrap(), None, "signed in again in the backend");
    }
}
