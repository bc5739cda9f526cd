//! `KvStore`: sign-in state on [`KvBackend`]s: sessions, OAuth `state`
//! values and e-mail one-time codes (OTP), done the way the seed should have.
//!
//! - Keys hold the SHA-256 (hex) of a session id or state, never the secret
//!   itself, so a leaked listing of the store yields no usable session.
//! - An OTP is 6 characters of `A-Z0-9` from the thread-local CSPRNG of
//!   `rand` (ChaCha, seeded by the operating system); only a SHA-256 of it,
//!   bound to the e-mail, is stored (OWASP ASVS 2.7.5), and a guess is
//!   compared as its digest, case-insensitively (comparing digests reveals
//!   nothing of the code, whatever the comparison's timing).
//! - At most [`KvStoreConfig::otp_max_attempts`] guesses per code are
//!   evaluated: each guess first increments an atomic counter and is refused
//!   unseen once the counter passes the limit (as Ory Kratos does), so
//!   parallel guesses cannot exceed it. A right guess consumes the code in
//!   the same step (`KvBackend::count_attempt_and_take_if`: one statement on
//!   PostgreSQL), so it works once, and the last guess the limit allows
//!   spends it, right or wrong. A new code's count starts at 0 with the
//!   code's own expiry (`KvBackend::put_and_reset_counter`), so however the
//!   clock steps the count cannot end first and start again beside a live
//!   code. An OAuth state is consumed with `take`.
//!
//! **Two backends.** Those single-use and counting rules are only as exact
//! as the backend's `take` and `increment`. Sessions are long-lived, read
//! often and written once, which suits an eventually consistent store such
//! as Cloudflare Workers KV; OAuth states, codes and attempt counters are
//! written and consumed within seconds and must be counted exactly, which
//! Cloudflare cannot do (no atomic operations, reads up to 60 s stale, one
//! write per second per key). So a store may keep sessions on one backend
//! and the one-time records on another ([`KvStore::with_backends`]); the
//! data layer puts them on PostgreSQL when sessions are on Cloudflare.
//! Put there all the same, they also fail the other way while reads are
//! stale: a code or state just written reads as missing, so the right code
//! is refused (and a state found invalid) until the write shows, up to 60 s
//! "or more"; a new code issued after a lockout likewise.
//!
//! **Sign-out everywhere.** Each session is also recorded in a per-user
//! index in the session backend ([`UserSessionIndex`]), so
//! [`KvStore::delete_user_sessions`] ends every session of a user: exactly
//! on memory and PostgreSQL, and on Cloudflare every session its eventually
//! consistent listing shows (see that type for what that means).
//!
//! **Sign-in and sign-out in this process.** A backend with stale reads may
//! miss a session for a while after it was created (Cloudflare caches the
//! answer "not found" too), or return it for a while after it was deleted
//! (Cloudflare documents 60 s "or more", and promises no bound). The store remembers the sessions this process deleted, for
//! [`DELETED_SESSION_MEMORY`], and never returns them: one who signs out is
//! signed out at once in this process. It also remembers the sessions it
//! created, until a read of the backend shows them and for at most
//! [`CREATED_SESSION_MEMORY`]: while the backend shows nothing (or an older
//! session under the same id), it answers with what it created, so a user
//! who signs in is signed in at once here; every read still asks the
//! backend, so a delete made elsewhere is seen as soon as the backend shows
//! it. (Not before: a session deleted by another process before the
//! backend ever showed it here still reads here until the backend shows
//! it, at most that minute.) A remembered session past its `expires_at` is
//! not returned. Other processes see this one's writes when the backend
//! has propagated them; a sign-out everywhere also ends the sessions this
//! process created in the last [`CREATED_SESSION_MEMORY`] that a stale
//! listing of the user's index does not show yet, whether or not a read
//! has shown them since (Cloudflare shows a key read where it was written
//! sooner than it lists it). On a backend that reads its own writes
//! nothing is remembered.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, FixedOffset, Utc};
use dployr_domain::{ClusterSummary, Email, KvBackend, Provider, StoreError, StoreResult, User, UserId};
use rand::Rng as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::{Clock, RecentWrites, SessionEnd, SystemClock, UserSessionIndex};

/// The characters of a one-time code.
pub const OTP_ALPHABET: &[u8; 36] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
/// How many characters a one-time code has.
pub const OTP_LENGTH: usize = 6;
/// The longest a one-time code may live ([`KvStoreConfig::otp_ttl`]):
/// OWASP ASVS 4.0 (2.7.2) has codes sent out of band expire after 10
/// minutes, which is also the default.
pub const MAX_OTP_TTL: Duration = Duration::from_secs(10 * 60);
/// The longest session id or OAuth state taken, in bytes. A session id
/// travels in a cookie, which browsers keep up to 4096 bytes with its name
/// (RFC 6265, 6.1), and a state in a URL: a longer one was never handed
/// out by a server, and is refused (created) or not found (read) without a
/// call to the backend.
pub const MAX_SECRET_BYTES: usize = 4096;

const SESSION_PREFIX: &str = "session:";
const STATE_PREFIX: &str = "oauth_state:";
const OTP_PREFIX: &str = "otp:";
const OTP_ATTEMPTS_PREFIX: &str = "otp_attempts:";
/// Where the per-user index of sessions lives ([`UserSessionIndex`]).
const USER_SESSIONS_PREFIX: &str = "user_sessions:";
/// Domain separation of the stored OTP hash: SHA-256 of this, the code's
/// key (itself a SHA-256 of the e-mail, so the same code of two people
/// hashes differently), a NUL and the code. Deterministic, so the backend
/// can compare what it stores with what a guess hashes to in the same step
/// that counts the guess (`KvBackend::count_attempt_and_take_if`); a random
/// salt would add nothing against brute force of a 6-character code, which
/// the attempt limit and the 10-minute TTL are what stop.
const OTP_HASH_DOMAIN: &[u8] = b"dployr otp v2\0";

/// How long a store remembers a session it deleted, on a backend whose
/// reads may be stale, so that a stale read cannot bring it back in this
/// process: Cloudflare documents 60 s "or more" before a change is seen
/// everywhere. Counted from when the delete returned (its retries may
/// take seconds). Sized for its 60 s with a margin; a read staler than that
/// (which Cloudflare does not rule out) could bring a session this process
/// deleted back in it, and nothing here can know.
pub const DELETED_SESSION_MEMORY: Duration = Duration::from_secs(90);

/// How long, at most, a store answers for a session it created while the
/// backend does not show it yet (Cloudflare's documented 60 s, "or more");
/// it stops as soon as a read of the backend shows it. A session created
/// under an id this process deleted lately is answered for
/// [`DELETED_SESSION_MEMORY`], as long as the deletion was to be kept.
pub const CREATED_SESSION_MEMORY: Duration = Duration::from_secs(60);

/// How long after a delete the backend confirmed a sign-out of the same
/// session is not sent again, on a backend whose reads may be stale:
/// Cloudflare takes one write per second per key, and a sign-out everywhere
/// followed by the sign-out of the request's own session was refused (429)
/// and waited a second, or failed, for a session that was gone (as
/// `dployr-tower-sessions` does for its records).
const DELETE_AGAIN_AFTER: Duration = Duration::from_secs(1);

/// What a store did lately to a session key, on a backend whose reads may
/// be stale.
#[derive(Clone)]
enum SessionWrite {
    /// Created `session` there. Until a read of the backend has `shown` it,
    /// reads answer with it where the backend shows nothing; for the whole
    /// window, a sign-out everywhere ends it whatever a stale listing of
    /// the user's index shows.
    Created { session: Session, shown: bool },
    /// Deleted it: never returned here within the window.
    Deleted,
}

fn sha256_hex(bytes: &[u8]) -> String {
    hashed_key("", bytes)
}

/// `prefix`, then the SHA-256 of `bytes` in lower-case hex: a key that
/// shows no secret. Written into one buffer sized once: `hex::encode`
/// collects its `String` a char at a time, about 2 000 instructions per
/// key (callgrind), on every session read.
fn hashed_key(prefix: &str, bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut digits = [0_u8; 64];
    let mut key = String::with_capacity(prefix.len() + digits.len());
    key.push_str(prefix);
    // Cannot fail: 32 bytes fill 64 digits exactly, and hex digits are ASCII.
    match hex::encode_to_slice(digest, &mut digits).ok().and_then(|()| std::str::from_utf8(&digits).ok()) {
        Some(hex) => key.push_str(hex),
        None => key.push_str(&hex::encode(digest)),
    }
    key
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill(&mut buf[..]);
    hex::encode(buf)
}

macro_rules! secret {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq)]
        pub struct $name(String);

        impl $name {
            /// Wraps a value received from a client (a cookie, a query parameter).
            pub fn new(value: impl Into<String>) -> Self {
                Self(value.into())
            }

            /// The secret itself, to hand to the client. Never log it.
            pub fn expose(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(concat!(stringify!($name), "(<redacted>)"))
            }
        }
    };
}

secret! {
    /// A session id: the secret in the session cookie. `Debug` never shows it.
    SessionId
}

secret! {
    /// The OAuth `state` parameter of one sign-in. `Debug` never shows it.
    OAuthState
}

secret! {
    /// A one-time code sent by e-mail, or a user's guess of it. `Debug`
    /// never shows it.
    OtpCode
}

impl SessionId {
    /// A new session id: 256 bits from the CSPRNG, as 64 hex characters.
    pub fn generate() -> Self {
        Self(random_hex(32))
    }
}

impl OAuthState {
    /// A new state: 256 bits from the CSPRNG, as 64 hex characters.
    pub fn generate() -> Self {
        Self(random_hex(32))
    }
}

impl OtpCode {
    /// A new code: [`OTP_LENGTH`] characters drawn uniformly from
    /// [`OTP_ALPHABET`] by the CSPRNG.
    pub fn generate() -> Self {
        let mut rng = rand::rng();
        Self((0..OTP_LENGTH).map(|_| char::from(OTP_ALPHABET[rng.random_range(0..OTP_ALPHABET.len())])).collect())
    }

    /// The code as compared: trimmed and upper-cased.
    fn normalized(&self) -> String {
        self.0.trim().to_ascii_uppercase()
    }
}

/// What a signed-in browser carries, as stored under its session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// The signed-in user.
    pub user_id: UserId,
    /// Their e-mail, as the user store holds it. Read back without checking
    /// it again (like the stores read `users.email`): a session written
    /// before a stricter e-mail rule must still be readable until it expires.
    #[serde(deserialize_with = "Email::deserialize_stored")]
    pub email: Email,
    /// How they signed in.
    pub provider: Provider,
    /// The clusters they belong to (invitations excluded).
    pub clusters: Vec<ClusterSummary>,
    /// When the session began.
    #[serde(deserialize_with = "stored_timestamp")]
    pub created_at: DateTime<Utc>,
    /// When it ends.
    #[serde(deserialize_with = "stored_timestamp")]
    pub expires_at: DateTime<Utc>,
}

/// Whose a stored session is: the one field of it that
/// [`KvStore::delete_user_sessions`] reads.
#[derive(Deserialize)]
struct SessionOwner {
    user_id: UserId,
}

/// The user a stored session belongs to; `None` if it does not decode.
fn owner_in(value: &[u8]) -> Option<UserId> {
    serde_json::from_slice::<SessionOwner>(value).ok().map(|owner| owner.user_id)
}

/// A session's timestamp as stored. chrono's own `Deserialize` reads every
/// timestamp with its relaxed parser, about 1 900 instructions each
/// (callgrind), a tenth of a session read's own work; what chrono writes
/// (`2026-11-29T05:30:00.123456789Z`) is strict RFC 3339, which
/// `parse_from_rfc3339` reads in about 500. Anything else the relaxed parser
/// takes (a year past 9999, a space for the `T`) is still read by it.
fn stored_timestamp<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<DateTime<Utc>, D::Error> {
    struct Timestamp;
    impl serde::de::Visitor<'_> for Timestamp {
        type Value = DateTime<Utc>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an RFC 3339 timestamp")
        }

        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Self::Value, E> {
            DateTime::parse_from_rfc3339(text)
                .or_else(|_| text.parse::<DateTime<FixedOffset>>())
                .map(|at| at.with_timezone(&Utc))
                .map_err(E::custom)
        }
    }
    deserializer.deserialize_str(Timestamp)
}

/// How long sign-in state lives, and how many OTP guesses are allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvStoreConfig {
    /// Session lifetime. Default 7 days.
    pub session_ttl: Duration,
    /// OAuth state lifetime. Default 10 minutes.
    pub state_ttl: Duration,
    /// One-time code lifetime. Default and most: 10 minutes
    /// ([`MAX_OTP_TTL`]).
    pub otp_ttl: Duration,
    /// Guesses evaluated per code. Default 3.
    pub otp_max_attempts: u32,
}

impl Default for KvStoreConfig {
    fn default() -> Self {
        Self {
            session_ttl: Duration::from_secs(7 * 24 * 60 * 60),
            state_ttl: Duration::from_secs(10 * 60),
            otp_ttl: Duration::from_secs(10 * 60),
            otp_max_attempts: 3,
        }
    }
}

/// Sessions, OAuth state and one-time codes on a [`KvBackend`].
///
/// ```
/// use std::sync::Arc;
/// use dployr_domain::Email;
/// use dployr_kv::{KvStore, MemoryKv, OAuthState};
///
/// let store = KvStore::new(Arc::new(MemoryKv::new()));
/// let state = OAuthState::generate();
/// store.create_state(&state, "https://app.example/after")?;
/// assert_eq!(store.validate_state(&state)?.as_deref(), Some("https://app.example/after"));
/// assert_eq!(store.validate_state(&state)?, None); // single use
///
/// let email = Email::parse("ada@example.io")?;
/// let code = store.create_otp(&email)?;
/// assert!(store.validate_otp(&email, &code)?);
/// assert!(!store.validate_otp(&email, &code)?); // consumed
/// # Ok::<(), dployr_domain::StoreError>(())
/// ```
#[derive(Clone)]
pub struct KvStore {
    /// Where sessions live.
    kv: Arc<dyn KvBackend>,
    /// Where OAuth states, one-time codes and their attempt counters live.
    one_time: Arc<dyn KvBackend>,
    config: KvStoreConfig,
    /// The sessions this process created or deleted lately, by key. Only
    /// for a session backend whose reads may be stale: on one that reads
    /// its own writes, nothing to remember and no lock on the read path.
    recent_sessions: Option<Arc<RecentWrites<SessionWrite>>>,
    /// The session keys whose delete the backend confirmed within the last
    /// [`DELETE_AGAIN_AFTER`], where reads may be stale (as
    /// `recent_sessions`).
    deleted_lately: Option<Arc<RecentWrites<()>>>,
    /// Which sessions each user has, on the session backend.
    user_sessions: UserSessionIndex,
    /// Where "now" comes from: a session's times, and how long this
    /// process's own session writes are preferred over a stale backend.
    clock: Arc<dyn Clock>,
}

impl fmt::Debug for KvStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KvStore").field("config", &self.config).finish_non_exhaustive()
    }
}

impl KvStore {
    /// A store with everything on `kv` and the default TTLs.
    ///
    /// Everything includes OAuth states and one-time codes: on a backend
    /// whose `take` and `increment` are not atomic (Cloudflare), they are
    /// then neither single use nor counted exactly, and while its reads are
    /// stale one just written reads as missing (see "Two backends" in the
    /// module documentation). Put them on another backend with
    /// [`with_backends`](Self::with_backends), as the data layer does.
    pub fn new(kv: Arc<dyn KvBackend>) -> Self {
        let recent_sessions = Self::session_memory(kv.as_ref());
        let deleted_lately = recent_sessions.is_some().then(Arc::default);
        let user_sessions = UserSessionIndex::new(Arc::clone(&kv), USER_SESSIONS_PREFIX);
        Self {
            one_time: Arc::clone(&kv),
            kv,
            config: KvStoreConfig::default(),
            recent_sessions,
            deleted_lately,
            user_sessions,
            clock: Arc::new(SystemClock),
        }
    }

    /// A store with everything on `kv` and `config`.
    ///
    /// # Errors
    /// As [`with_backends`](Self::with_backends).
    pub fn with_config(kv: Arc<dyn KvBackend>, config: KvStoreConfig) -> StoreResult<Self> {
        Self::with_backends(Arc::clone(&kv), kv, config)
    }

    /// A store with sessions on `sessions` and OAuth states, one-time codes
    /// and attempt counters on `one_time`. Single use and the attempt limit
    /// are exact when `one_time`'s `take` and `increment` are atomic
    /// ([`KvLimits::atomic`](dployr_domain::KvLimits::atomic)).
    ///
    /// ```
    /// use std::sync::Arc;
    /// use dployr_kv::{KvStore, KvStoreConfig, MemoryKv};
    ///
    /// let (sessions, one_time) = (Arc::new(MemoryKv::new()), Arc::new(MemoryKv::new()));
    /// let store = KvStore::with_backends(sessions, one_time, KvStoreConfig::default())?;
    /// assert!(store.one_time_backend().limits().atomic);
    /// # Ok::<(), dployr_domain::StoreError>(())
    /// ```
    ///
    /// # Errors
    /// [`StoreError::Invalid`] on field `session_ttl` when the session TTL
    /// is outside what `sessions` accepts, `state_ttl` or `otp_ttl` when
    /// that TTL is outside what `one_time` accepts, `otp_ttl` when it is
    /// longer than [`MAX_OTP_TTL`], `otp_max_attempts` when no OTP attempt
    /// is allowed.
    pub fn with_backends(
        sessions: Arc<dyn KvBackend>,
        one_time: Arc<dyn KvBackend>,
        config: KvStoreConfig,
    ) -> StoreResult<Self> {
        // Each TTL against the backend that holds it, the error naming the
        // TTL (a caller with three of them must know which to fix).
        for (field, backend, ttl) in [
            ("session_ttl", &sessions, config.session_ttl),
            ("state_ttl", &one_time, config.state_ttl),
            ("otp_ttl", &one_time, config.otp_ttl),
        ] {
            backend.limits().check_ttl(Some(ttl)).map_err(|error| match error {
                StoreError::Invalid { reason, .. } => StoreError::Invalid { field, reason },
                other => other,
            })?;
        }
        if config.otp_ttl > MAX_OTP_TTL {
            return Err(StoreError::invalid(
                "otp_ttl",
                "is longer than 10 minutes, the most OWASP ASVS (2.7.2) lets a one-time code live",
            ));
        }
        if config.otp_max_attempts == 0 {
            return Err(StoreError::invalid("otp_max_attempts", "must be at least 1"));
        }
        let recent_sessions = Self::session_memory(sessions.as_ref());
        let deleted_lately = recent_sessions.is_some().then(Arc::default);
        let user_sessions = UserSessionIndex::new(Arc::clone(&sessions), USER_SESSIONS_PREFIX);
        Ok(Self {
            kv: sessions,
            one_time,
            config,
            recent_sessions,
            deleted_lately,
            user_sessions,
            clock: Arc::new(SystemClock),
        })
    }

    /// Reads the time from `clock` instead of the system's: when a session
    /// begins and ends, and how long this process prefers its own session
    /// writes over a backend with stale reads. For tests that move time by
    /// hand along with the backend's. The store gets a memory of its own
    /// (empty): times remembered on the old clock mean nothing on the new.
    #[must_use]
    pub fn with_clock(mut self, clock: impl Clock + 'static) -> Self {
        self.clock = Arc::new(clock);
        self.recent_sessions = Self::session_memory(self.kv.as_ref());
        self.deleted_lately = self.recent_sessions.is_some().then(Arc::default);
        self
    }

    /// Now, on the store's clock, within chrono's range: a clock moved to
    /// the end of `SystemTime` (`ManualClock::advance(Duration::MAX)`, "to
    /// expire everything") is the last instant chrono holds, where chrono's
    /// own conversion panics.
    fn now(&self) -> DateTime<Utc> {
        let since_epoch = self.clock.now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        i64::try_from(since_epoch.as_micros())
            .ok()
            .and_then(DateTime::from_timestamp_micros)
            .unwrap_or(DateTime::<Utc>::MAX_UTC)
    }

    /// The backend that holds sessions.
    pub fn backend(&self) -> &Arc<dyn KvBackend> {
        &self.kv
    }

    /// The backend that holds OAuth states, one-time codes and attempt counters.
    pub fn one_time_backend(&self) -> &Arc<dyn KvBackend> {
        &self.one_time
    }

    /// A memory of the sessions this process creates and deletes, for a
    /// backend whose reads may be stale.
    fn session_memory(sessions: &dyn KvBackend) -> Option<Arc<RecentWrites<SessionWrite>>> {
        (!sessions.limits().read_your_writes).then(Arc::default)
    }

    /// Remembers what this process did to the session under `key`: created
    /// it (for at most [`CREATED_SESSION_MEMORY`], or [`DELETED_SESSION_MEMORY`]
    /// over a deletion of its own) or deleted it (for [`DELETED_SESSION_MEMORY`]).
    fn remember(&self, key: &str, written: SessionWrite) {
        let Some(memory) = &self.recent_sessions else { return };
        let now = self.clock.monotonic();
        let window = match written {
            // Over a deletion, as long as the deletion was to be kept: once
            // the memory ends, a read that stale would answer the
            // signed-out session.
            SessionWrite::Created { .. } if matches!(memory.get(key, now), Some(SessionWrite::Deleted)) => {
                DELETED_SESSION_MEMORY
            }
            SessionWrite::Created { .. } => CREATED_SESSION_MEMORY,
            SessionWrite::Deleted => DELETED_SESSION_MEMORY,
        };
        memory.remember(key, written, now, window);
    }

    /// Starts the window of a deletion remembered under `key` again, once
    /// the delete returned (its retries may have taken seconds), unless a
    /// session was created under the key meanwhile: that one stays.
    fn deleted_now(&self, key: &str) {
        let Some(memory) = &self.recent_sessions else { return };
        memory.remember_unless(key, SessionWrite::Deleted, self.clock.monotonic(), DELETED_SESSION_MEMORY, |written| {
            matches!(written, SessionWrite::Created { .. })
        });
    }

    /// Notes that the backend confirmed the delete of the session under
    /// `key` just now.
    fn confirmed_deleted(&self, key: &str) {
        if let Some(lately) = &self.deleted_lately {
            lately.remember(key, (), self.clock.monotonic(), DELETE_AGAIN_AFTER);
        }
    }

    /// Whether this process deleted the session under `key`, confirmed by
    /// the backend, within the last [`DELETE_AGAIN_AFTER`], and has not
    /// created it again since: a delete sent again would only wait for the
    /// backend's per-key write limit.
    fn deleted_lately(&self, key: &str) -> bool {
        self.deleted_lately.as_ref().is_some_and(|lately| lately.get(key, self.clock.monotonic()).is_some())
            && matches!(self.recent(key), Some(SessionWrite::Deleted))
    }

    /// Notes that a read of the backend showed the session this process
    /// created under `key`: reads of it no longer answer from the memory,
    /// but a sign-out everywhere still finds it there (the listing of the
    /// user's index may lag the key). A remembered delete stays.
    fn shown_by_backend(&self, key: &str) {
        if let Some(memory) = &self.recent_sessions {
            memory.update(key, self.clock.monotonic(), |written| {
                if let SessionWrite::Created { shown, .. } = written {
                    *shown = true;
                }
            });
        }
    }

    /// What this process did lately to the session under `key`, if anything
    /// (else: ask the backend).
    fn recent(&self, key: &str) -> Option<SessionWrite> {
        self.recent_sessions.as_ref()?.get(key, self.clock.monotonic())
    }

    /// The sessions of `user` this process created lately (and has not
    /// deleted since), with their keys and whether the backend showed them.
    fn created_here(&self, user: &UserId) -> Vec<(String, Session, bool)> {
        let Some(memory) = &self.recent_sessions else { return Vec::new() };
        memory.filter_live(self.clock.monotonic(), |key, written| match written {
            SessionWrite::Created { session, shown } if session.user_id == *user => {
                Some((key.to_owned(), session.clone(), *shown))
            }
            _ => None,
        })
    }

    fn session_key(id: &SessionId) -> String {
        hashed_key(SESSION_PREFIX, id.0.as_bytes())
    }

    fn state_key(state: &OAuthState) -> String {
        hashed_key(STATE_PREFIX, state.0.as_bytes())
    }

    fn otp_keys(email: &Email) -> (String, String) {
        let hashed = sha256_hex(email.as_str().as_bytes());
        (format!("{OTP_PREFIX}{hashed}"), format!("{OTP_ATTEMPTS_PREFIX}{hashed}"))
    }

    fn ttl_as_chrono(ttl: Duration) -> StoreResult<chrono::Duration> {
        chrono::Duration::from_std(ttl).map_err(|_| StoreError::invalid("ttl", "too large"))
    }

    /// Stores a session for `user` under `session_id` for the session TTL.
    ///
    /// # Errors
    /// [`StoreError::Invalid`] on field `session_id` when the id is empty or
    /// longer than [`MAX_SECRET_BYTES`], on field `clusters` when the
    /// session, with these clusters, is larger than the backend takes;
    /// backend errors. After a backend error the session may be there all
    /// the same (its write landed, its answer lost): it is named in its
    /// user's index, so a sign-out everywhere ends it (unless the entry's
    /// write failed too: a session written again under an id handed out
    /// before is then named by its earlier entry only until that entry
    /// expires); hand out no cookie for it.
    pub fn create_session(
        &self,
        session_id: &SessionId,
        user: &User,
        clusters: Vec<ClusterSummary>,
    ) -> StoreResult<Session> {
        let _span = operation("kv.create_session");
        check_secret("session_id", session_id.expose())?;
        let created_at = self.now();
        let session = Session {
            user_id: user.id,
            email: user.email.clone(),
            provider: user.provider,
            clusters,
            created_at,
            // Saturating: only a clock at chrono's end overflows here, and
            // a session made then is expired already.
            expires_at: created_at
                .checked_add_signed(Self::ttl_as_chrono(self.config.session_ttl)?)
                .unwrap_or(DateTime::<Utc>::MAX_UTC),
        };
        let value = serde_json::to_vec(&session).map_err(|e| StoreError::backend("encoding a session", e))?;
        // What makes a session large is the clusters it lists (the rest is
        // bounded): name them, not the backend's `value`.
        check_value_size(self.kv.as_ref(), "clusters", &value)?;
        let key = Self::session_key(session_id);
        if let Err(error) = self.kv.put(&key, &value, Some(self.config.session_ttl)) {
            // The write may have landed all the same, its answer lost (a
            // connection cut after the commit, a Cloudflare request that
            // timed out once taken, which may even land later): the
            // session is named in its user's index, so that signing out
            // everywhere finds it. Not taken back: what is under the id
            // may be another call's session, written meanwhile and handed
            // out, or the one this call meant to replace. A refusal of the
            // input or the settings wrote nothing.
            if !matches!(error, StoreError::Invalid { .. } | StoreError::Configuration { .. }) {
                let _ignored = self.user_sessions.add(&user.id.to_string(), &key, Some(self.config.session_ttl));
            }
            return Err(error);
        }
        // After the session, so that an entry listed by
        // `delete_user_sessions` never names a session still to be written.
        if let Err(error) = self.user_sessions.add(&user.id.to_string(), &key, Some(self.config.session_ttl)) {
            // The caller gets an error and hands out no cookie: take the
            // session back too, so no session is left that signing out
            // everywhere could not find. If this delete fails as well, a
            // new session is unreachable (its id was never given out) and
            // expires with its TTL; one written again under an id handed
            // out before (a refresh) stays named by its earlier entry only
            // until that entry's TTL, which ends before the new one's: a
            // known gap, closed only by a second entry write per session.
            self.remember(&key, SessionWrite::Deleted);
            let _ignored = self.kv.delete(&key);
            return Err(error);
        }
        // Read back from here while a stale backend may not show it (and a
        // session this process deleted under the same id is replaced: the
        // memory of that delete no longer hides it, see `remember`).
        self.remember(&key, SessionWrite::Created { session: session.clone(), shown: false });
        Ok(session)
    }

    /// The session under `session_id`; `None` if there is none or it
    /// expired, and for an id no session can have (empty, or longer than
    /// [`MAX_SECRET_BYTES`]), without asking the backend.
    ///
    /// # Errors
    /// Backend errors; [`StoreError::Backend`] if the stored session cannot be read.
    pub fn get_session(&self, session_id: &SessionId) -> StoreResult<Option<Session>> {
        let _span = operation("kv.get_session");
        if check_secret("session_id", session_id.expose()).is_err() {
            return Ok(None);
        }
        let key = Self::session_key(session_id);
        let stored = match self.recent(&key) {
            // Deleted here: a stale read must not bring it back.
            Some(SessionWrite::Deleted) => None,
            // Created here and not shown by the backend yet: the backend is
            // asked all the same, so that a delete made elsewhere is seen as
            // soon as the backend shows it; only while it shows nothing, or
            // an older session under the same id, does this process answer
            // with what it created.
            Some(SessionWrite::Created { session: created, shown: false }) => match self.read_session(&key)? {
                Some(found) if found.created_at >= created.created_at => {
                    self.shown_by_backend(&key);
                    Some(found)
                }
                _ => Some(created),
            },
            Some(SessionWrite::Created { shown: true, .. }) | None => self.read_session(&key)?,
        };
        // The backend's TTL is the rule; this also covers a backend whose
        // expiry is coarser than ours (Cloudflare rounds to seconds), and a
        // session remembered here past its end. `expires_at` was written by
        // the clock of the process that created the session: a clock set
        // behind there (or ahead here) cuts the session short, never makes
        // it outlive the backend's TTL.
        Ok(stored.filter(|session| session.expires_at > self.now()))
    }

    /// Whether the backend holds a session under `key` and, if it decodes,
    /// whose: `None` if it holds none, `Some(None)` if it is unreadable.
    fn owner_in_backend(&self, key: &str) -> StoreResult<Option<Option<UserId>>> {
        Ok(self.kv.get(key)?.map(|value| owner_in(&value)))
    }

    /// The session stored under `key`, as the backend answers.
    fn read_session(&self, key: &str) -> StoreResult<Option<Session>> {
        let Some(value) = self.kv.get(key)? else { return Ok(None) };
        serde_json::from_slice(&value).map(Some).map_err(|e| StoreError::backend("decoding a stored session", e))
    }

    /// Ends the session; ending a missing one is not an error. This
    /// process never returns it again, even from a backend with stale reads
    /// (see the module documentation). Its entry in the user's index stays
    /// until it expires with the session: removing it would cost a read to
    /// learn whose session it was, and a stale entry only makes
    /// [`delete_user_sessions`](Self::delete_user_sessions) delete a key
    /// that is already gone.
    ///
    /// On a backend whose reads may be stale (Cloudflare), a session this
    /// process deleted, confirmed by the backend, less than a second ago,
    /// and has not created again since, is not deleted again: the request
    /// would only wait for Cloudflare's limit of one write per second per
    /// key (a sign-out everywhere followed by the request's own sign-out).
    /// A session another process created under the same id within that
    /// second would stay; ids are random secrets
    /// ([`SessionId::generate`]).
    ///
    /// # Errors
    /// Backend errors.
    pub fn delete_session(&self, session_id: &SessionId) -> StoreResult<()> {
        let _span = operation("kv.delete_session");
        // No session has such an id: nothing to end.
        if check_secret("session_id", session_id.expose()).is_err() {
            return Ok(());
        }
        let key = Self::session_key(session_id);
        if self.deleted_lately(&key) {
            return Ok(());
        }
        self.remember(&key, SessionWrite::Deleted);
        let deleted = self.kv.delete(&key);
        self.deleted_now(&key);
        if deleted.is_ok() {
            self.confirmed_deleted(&key);
        }
        deleted
    }

    /// Ends every session of `user` ("sign out of all devices") and returns
    /// how many it ended: live sessions, not index entries of sessions that
    /// had ended before (on Cloudflare, a stale read may count a live one
    /// as ended; it is deleted all the same). A session whose id was used again for another
    /// user ([`create_session`](Self::create_session) with an id of theirs)
    /// is that user's, and is left. Work: one list request per 1000
    /// sessions; then on memory and PostgreSQL two reads and two deletes
    /// (each one statement) per session (the second read: whether it was
    /// written again under its id meanwhile, its entry then written back); on Cloudflare, whose account allows 1200
    /// requests per 5 minutes, one bulk read per 100 sessions and two bulk
    /// deletes per 10 000 (the sessions, then their index entries; see
    /// [`KvBackend::get_many`], [`KvBackend::delete_many`]). Exact on memory and PostgreSQL for every
    /// session created before the call, once the sign-outs everywhere of
    /// the user running at the same time have returned (one of them may
    /// write back an entry another passed); on Cloudflare, a session the
    /// eventually consistent listing does not show yet may be missed (see
    /// [`UserSessionIndex`]): Cloudflare documents "60 seconds or more" and
    /// promises no bound. Those this process created in the last
    /// [`CREATED_SESSION_MEMORY`] are found in its memory of them; older
    /// ones, and those of other processes, only once the listing shows
    /// them, so call it again later to catch them. This process never
    /// returns the deleted sessions again, even from a stale backend.
    ///
    /// # Errors
    /// Backend errors; the sessions not reached yet stay, and a second call
    /// finishes the job.
    pub fn delete_user_sessions(&self, user: &UserId) -> StoreResult<usize> {
        let _span = operation("kv.delete_user_sessions");
        let mut listed = HashSet::new();
        let mut ended = if self.kv.limits().atomic {
            self.user_sessions.delete_all(
                &user.to_string(),
                |key| {
                    listed.insert(key.to_owned());
                    let found = self.owner_of(key, |key| self.owner_in_backend(key))?;
                    if let Some(Some(owner)) = found
                        && owner != *user
                    {
                        return Ok(SessionEnd::AnotherUsers);
                    }
                    self.remember(key, SessionWrite::Deleted);
                    // Counted only if it was there: an entry whose session ended
                    // before (signed out on its own) is removed, not counted.
                    Ok(if self.end_session(key)? && found.is_some() { SessionEnd::Ended } else { SessionEnd::Gone })
                },
                // A `create_session` under the same id (a caller that uses
                // it again) may have written the session again, and its
                // entry before the removal: written back then.
                |key| {
                    Ok(self
                        .kv
                        .get(key)?
                        // One that does not decode is no session of theirs to index.
                        .and_then(|value| serde_json::from_slice::<Session>(&value).ok())
                        .filter(|session| session.user_id == *user)
                        .and_then(|session| {
                            // Under the backend's shortest TTL it ends before
                            // an entry could be written for it.
                            (session.expires_at - self.now())
                                .to_std()
                                .ok()
                                .filter(|left| *left >= self.kv.limits().min_ttl)
                        }))
                },
            )?
        } else {
            let keys = self.user_sessions.session_keys(&user.to_string())?;
            listed.extend(keys.iter().cloned());
            self.end_listed_in_bulk(user, &keys)?
        };
        // A stale listing may not show yet the entries of sessions created
        // in the last minute; those created here are in the memory. Each
        // stays there (and loads here) until the backend took its delete,
        // so a second call after an error finds it again.
        for (key, session, shown) in self.created_here(user) {
            if listed.contains(&key) || session.expires_at <= self.now() {
                continue;
            }
            // One the backend showed since may have been ended elsewhere
            // (deleted all the same, counted only if it is still there) or
            // replaced by another user's session under the same id (theirs:
            // left, as in the listed loop above).
            let live = if shown {
                match self.owner_in_backend(&key)? {
                    Some(Some(owner)) if owner != *user => continue,
                    found => found.is_some(),
                }
            } else {
                true
            };
            let ended_here = self.end_session(&key)?;
            self.remember(&key, SessionWrite::Deleted);
            self.user_sessions.remove(&user.to_string(), &key)?;
            ended += usize::from(live && ended_here);
        }
        Ok(ended)
    }

    /// Whose the session under `key` is, for a sign-out everywhere: what this process created or deleted lately, else what
    /// `in_backend` reads. `None`: gone (or, on a stale backend, not seen
    /// yet); `Some(None)`: there but unreadable. A session the caller used
    /// again for another user's session is still listed under this user:
    /// that session is not theirs to end.
    fn owner_of(
        &self,
        key: &str,
        in_backend: impl FnOnce(&str) -> StoreResult<Option<Option<UserId>>>,
    ) -> StoreResult<Option<Option<UserId>>> {
        Ok(match self.recent(key) {
            Some(SessionWrite::Created { session, shown: false }) => {
                (session.expires_at > self.now()).then_some(Some(session.user_id))
            }
            Some(SessionWrite::Deleted) => None,
            Some(SessionWrite::Created { shown: true, .. }) | None => in_backend(key)?,
        })
    }

    /// A sign-out everywhere of the listed sessions `keys` of `user` on a
    /// backend without atomic takes (Cloudflare), in bulk: one read per 100
    /// sessions and one delete per 10 000 sessions, then one per 10 000 of
    /// their index entries (so that after an error a second call finds what
    /// is left),
    /// instead of a read and two deletes per session, which for a user of a
    /// few hundred sign-ins spent the account's 1200 requests per 5 minutes
    /// and left every call of the deployment refused for minutes. Returns
    /// how many live sessions of `user` it ended.
    fn end_listed_in_bulk(&self, user: &UserId, keys: &[String]) -> StoreResult<usize> {
        let to_read: Vec<String> = keys
            .iter()
            .filter(|key| matches!(self.recent(key), Some(SessionWrite::Created { shown: true, .. }) | None))
            .cloned()
            .collect();
        let read: HashMap<&str, Option<Option<UserId>>> = to_read
            .iter()
            .map(String::as_str)
            .zip(self.kv.get_many(&to_read)?.into_iter().map(|value| value.map(|value| owner_in(&value))))
            .collect();
        let mut sessions = Vec::new();
        let mut ended = 0;
        for key in keys {
            let found = self.owner_of(key, |key| Ok(read.get(key).cloned().flatten()))?;
            // Another user's now: neither it nor its entry is deleted (see
            // `UserSessionIndex::delete_all`).
            if let Some(Some(owner)) = found
                && owner != *user
            {
                continue;
            }
            sessions.push(key.clone());
            // Deleted even if it read as gone (a stale read may miss a live
            // one); counted only if it was there.
            ended += usize::from(found.is_some());
        }
        // Remembered as deleted before the delete, as `delete_session` does:
        // this process never returns them again, even from a stale backend
        // or after a delete that failed part-way (a second call deletes
        // them all the same, without counting them again).
        for key in &sessions {
            self.remember(key, SessionWrite::Deleted);
        }
        // Two calls, sessions first: one bulk delete is in no order (and
        // Cloudflare may report keys of it undone), and an entry gone
        // before its session would leave a live session no later sign-out
        // finds.
        let deleted = self.kv.delete_many(&sessions);
        for key in &sessions {
            self.deleted_now(key);
        }
        deleted?;
        for key in &sessions {
            self.confirmed_deleted(key);
        }
        let entries: Vec<String> =
            sessions.iter().map(|key| self.user_sessions.entry_key(&user.to_string(), key)).collect();
        self.kv.delete_many(&entries)?;
        Ok(ended)
    }

    /// Deletes the session under `key` for a sign-out everywhere; whether
    /// this call is the one that ended it. Where the backend's `take` is
    /// atomic, only one of several calls ending the same session at once
    /// (two sign-outs everywhere, `DataLayer::delete_user` beside one) takes
    /// it, so their counts add up to the sessions ended, not twice one of
    /// them; elsewhere (Cloudflare) a delete, and every caller that read it
    /// live counts it.
    fn end_session(&self, key: &str) -> StoreResult<bool> {
        if self.kv.limits().atomic {
            Ok(self.kv.take(key)?.is_some())
        } else {
            self.kv.delete(key)?;
            self.confirmed_deleted(key);
            Ok(true)
        }
    }

    /// Remembers `state` and where to go after the sign-in, for the state TTL.
    ///
    /// # Errors
    /// [`StoreError::Invalid`] on field `state` when the state is empty or
    /// longer than [`MAX_SECRET_BYTES`], on field `redirect_url` when it is
    /// larger than the backend takes; backend errors.
    pub fn create_state(&self, state: &OAuthState, redirect_url: &str) -> StoreResult<()> {
        let _span = operation("kv.create_state");
        check_secret("state", state.expose())?;
        check_value_size(self.one_time.as_ref(), "redirect_url", redirect_url.as_bytes())?;
        self.one_time.put(&Self::state_key(state), redirect_url.as_bytes(), Some(self.config.state_ttl))
    }

    /// Consumes `state`: its redirect URL the first time, `None` after that
    /// or once it expired, and for a state none can be (empty, or longer
    /// than [`MAX_SECRET_BYTES`]) without asking the backend. Atomic where
    /// the backend's `take` is.
    ///
    /// # Errors
    /// Backend errors. After [`StoreError::Unavailable`] the state may be
    /// consumed all the same (its take landed, the answer lost): a second
    /// call then answers `None`. Treat the sign-in as failed and start a
    /// new one.
    pub fn validate_state(&self, state: &OAuthState) -> StoreResult<Option<String>> {
        let _span = operation("kv.validate_state");
        if check_secret("state", state.expose()).is_err() {
            return Ok(None);
        }
        let Some(value) = self.one_time.take(&Self::state_key(state))? else { return Ok(None) };
        String::from_utf8(value).map(Some).map_err(|e| StoreError::backend("decoding a stored OAuth state", e))
    }

    /// A new one-time code for `email`, replacing any previous one (and its
    /// attempt count), valid for the OTP TTL.
    ///
    /// # Errors
    /// [`StoreError::Invalid`] on field `email` for an address not in the
    /// form [`Email::parse`] gives (one made with [`Email::from_stored`]):
    /// its code could never be validated, as the address the user types is
    /// parsed into another key. Backend errors.
    pub fn create_otp(&self, email: &Email) -> StoreResult<OtpCode> {
        let _span = operation("kv.create_otp");
        email.check()?;
        let code = OtpCode::generate();
        let (code_key, attempts_key) = Self::otp_keys(email);
        let stored = otp_hash(&code_key, &code.normalized());
        // One step where the backend allows: an attempt racing this is
        // counted against the code it is compared with, so no code is
        // compared more times than the limit.
        self.one_time.put_and_reset_counter(&code_key, &stored, Some(self.config.otp_ttl), &attempts_key)?;
        Ok(code)
    }

    /// Whether `code` is the current code of `email`. The attempt is counted
    /// before anything is compared; past the limit every guess is false.
    /// A right guess consumes the code, and so does the last wrong guess
    /// the limit allows (a new code is needed after it).
    ///
    /// # Errors
    /// Backend errors. After [`StoreError::Unavailable`] the guess may be
    /// counted, and a right one the code consumed, all the same (the write
    /// landed, the answer lost): a second call with the same code then
    /// answers `false`. Ask for a new code.
    pub fn validate_otp(&self, email: &Email, code: &OtpCode) -> StoreResult<bool> {
        let _span = operation("kv.validate_otp");
        let (code_key, attempts_key) = Self::otp_keys(email);
        let given = otp_hash(&code_key, &code.normalized());
        // The attempt is counted before anything is compared, and only the
        // call that deletes this very code succeeds (one statement on
        // PostgreSQL). The count stays until it expires or a new code
        // replaces it: resetting it on success would let guesses racing
        // this one be evaluated.
        let (_, taken) = self.one_time.count_attempt_and_take_if(
            &attempts_key,
            Some(self.config.otp_ttl),
            i64::from(self.config.otp_max_attempts),
            &code_key,
            &given,
        )?;
        Ok(taken)
    }
}

/// Refuses a session id or OAuth state (`field`) that no server hands out:
/// empty (a missing cookie or parameter read as `""`, which every client
/// would share), or longer than [`MAX_SECRET_BYTES`].
fn check_secret(field: &'static str, secret: &str) -> StoreResult<()> {
    if secret.is_empty() {
        return Err(StoreError::invalid(field, "is empty"));
    }
    if secret.len() > MAX_SECRET_BYTES {
        return Err(StoreError::Invalid {
            field,
            reason: format!("is {} bytes long, more than {MAX_SECRET_BYTES}", secret.len()).into(),
        });
    }
    Ok(())
}

/// Refuses a value `backend` would refuse, naming the caller's argument
/// `field` that made it too large instead of the backend's `value`.
fn check_value_size(backend: &dyn KvBackend, field: &'static str, value: &[u8]) -> StoreResult<()> {
    backend.limits().check_value(value).map_err(|error| match error {
        StoreError::Invalid { reason, .. } => StoreError::Invalid { field, reason },
        other => other,
    })
}

/// The `tracing` span of one `KvStore` operation, named for it, with its
/// duration; it never carries an argument (ids, codes and states are secrets).
struct Operation {
    span: tracing::span::EnteredSpan,
    started: std::time::Instant,
}

fn operation(name: &'static str) -> Operation {
    let span = tracing::debug_span!("dployr.kv", op = name, duration_us = tracing::field::Empty).entered();
    Operation { span, started: std::time::Instant::now() }
}

impl Drop for Operation {
    fn drop(&mut self) {
        let micros = u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.span.record("duration_us", micros);
    }
}

fn otp_hash(code_key: &str, normalized_code: &str) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(OTP_HASH_DOMAIN);
    hasher.update(code_key.as_bytes());
    hasher.update([0]);
    hasher.update(normalized_code.as_bytes());
    hasher.finalize().into()
}

#[cfg(test)]
mod tests {
    use chrono::{DateTime, TimeZone as _, Utc};
    use dployr_domain::{Email, Provider, UserId};

    use super::{Session, hashed_key};

    fn session_at(created_at: DateTime<Utc>, expires_at: DateTime<Utc>) -> Session {
        Session {
            user_id: UserId::generate(),
            email: Email::parse("ada@example.com").unwrap(),
            provider: Provider::Github,
            clusters: Vec::new(),
            created_at,
            expires_at,
        }
    }

    #[test]
    fn a_code_for_an_address_not_in_parsed_form_is_refused_as_it_could_never_be_validated() {
        let store = super::KvStore::new(std::sync::Arc::new(crate::MemoryKv::new()));
        for unchecked in ["Ada@Example.IO", "ada@example.io.", "", "\0ada@example.io"] {
            let refused = store.create_otp(&Email::from_stored(unchecked.into()));
            assert!(
                matches!(refused, Err(dployr_domain::StoreError::Invalid { field: "email", .. })),
                "{unchecked:?}: {refused:?}"
            );
        }
        // The address as the user types it, parsed, gets a code that validates.
        let typed = Email::parse("Ada@Example.IO").unwrap();
        let code = store.create_otp(&typed).unwrap();
        assert!(store.validate_otp(&Email::parse("ada@example.io").unwrap(), &code).unwrap());
    }

    #[test]
    fn a_session_reads_back_exactly_what_was_written_to_the_nanosecond() {
        let created_at =
            Utc.with_ymd_and_hms(2026, 11, 29, 5, 30, 0).unwrap() + chrono::Duration::nanoseconds(123_456_789);
        for session in [
            session_at(created_at, created_at + chrono::Duration::days(7)),
            // Whole seconds (no fraction written), and the last instant RFC 3339 can write.
            session_at(
                Utc.with_ymd_and_hms(1970, 1, 1, 0, 0, 0).unwrap(),
                Utc.with_ymd_and_hms(9999, 12, 31, 23, 59, 59).unwrap(),
            ),
            // Past year 9999 chrono writes `+10000-...`, which only its relaxed parser reads.
            session_at(created_at, Utc.with_ymd_and_hms(10_000, 1, 1, 0, 0, 0).unwrap()),
        ] {
            let stored = serde_json::to_vec(&session).unwrap();
            assert_eq!(serde_json::from_slice::<Session>(&stored).unwrap(), session);
        }
    }

    #[test]
    fn a_session_timestamp_chrono_reads_is_read_whatever_its_rfc3339_spelling() {
        let user = UserId::generate();
        let stored = |created: &str, expires: &str| {
            format!(
                r#"{{"user_id":"{user}","email":"ada@example.com","provider":"github","clusters":[],"created_at":"{created}","expires_at":"{expires}"}}"#
            )
        };
        let expected = Utc.with_ymd_and_hms(2026, 11, 29, 5, 30, 0).unwrap();
        // A space for the `T`, a lower-case `t` and `z`, an offset instead of `Z`.
        for (created, expires) in [
            ("2026-11-29 05:30:00Z", "2026-11-29t05:30:00z"),
            ("2026-11-29T07:30:00+02:00", "2026-11-29T05:30:00.000Z"),
        ] {
            let session: Session = serde_json::from_str(&stored(created, expires)).unwrap();
            assert_eq!((session.created_at, session.expires_at), (expected, expected), "{created} / {expires}");
        }
        for bad in ["2026-11-29", "yesterday", "2026-13-01T00:00:00Z", ""] {
            let error = serde_json::from_str::<Session>(&stored(bad, bad)).unwrap_err();
            assert!(error.is_data(), "{bad}: {error}");
        }
        let error = serde_json::from_str::<Session>(
            &stored("2026-11-29T05:30:00Z", "2026-11-29T05:30:00Z")
                .replace(r#""created_at":"2026-11-29T05:30:00Z""#, r#""created_at":1764394200"#),
        )
        .unwrap_err();
        assert!(error.to_string().contains("an RFC 3339 timestamp"), "{error}");
    }

    #[test]
    fn a_stored_id_that_is_not_a_ulid_fails_the_decode_naming_the_entity() {
        let stored = r#"{"user_id":"not-a-ulid","email":"ada@example.com","provider":"github","clusters":[],"created_at":"2026-11-29T05:30:00Z","expires_at":"2026-11-29T05:30:00Z"}"#;
        let error = serde_json::from_str::<Session>(stored).unwrap_err();
        assert!(error.to_string().contains("user id"), "{error}");
        // An escaped id (serde_json then hands over a copy, not a borrow) still reads.
        let id = UserId::generate().to_string();
        let escaped = stored.replace("not-a-ulid", &format!("\\u00{:x}{}", id.as_bytes()[0], &id[1..]));
        assert_eq!(serde_json::from_str::<Session>(&escaped).unwrap().user_id.to_string(), id);
    }

    #[test]
    fn a_hashed_key_is_its_prefix_and_the_lower_case_hex_sha256_so_stored_keys_stay_found() {
        // SHA-256("abc"), from FIPS 180-2's own example.
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(hashed_key("session:", b"abc"), format!("session:{abc}"));
        assert_eq!(hashed_key("", b"abc"), abc);
    }
}
