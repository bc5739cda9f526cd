//! The key-value backend trait: the one small interface that sessions, OAuth
//! state and one-time codes are stored through, so the same `KvStore` runs on
//! memory, Cloudflare Workers KV or PostgreSQL, and consumers can mock it.
//!
//! The trait is synchronous like every store of the data layer; it is
//! `Send + Sync`, so an async caller wraps a call in `spawn_blocking`:
//!
//! ```text
//! let kv: Arc<dyn KvBackend> = ...;
//! let value = tokio::task::spawn_blocking(move || kv.get("session:...")).await??;
//! ```
//!
//! The rules every backend shares (key and TTL checks) live here as plain
//! functions of [`KvLimits`], so input is refused with [`StoreError::Invalid`]
//! the same way, before anything is sent or written.

use std::time::Duration;

use crate::{StoreError, StoreResult};

/// Longest key any backend accepts, in UTF-8 bytes (Cloudflare's limit).
pub const MAX_KEY_BYTES: usize = 512;

/// Largest value any backend accepts, in bytes (Cloudflare's 25 MiB).
pub const MAX_VALUE_BYTES: usize = 25 * 1024 * 1024;

/// Longest TTL any backend accepts: 100 years (beyond that, timestamps of
/// some backends overflow, and nothing in dployr lives that long).
pub const MAX_TTL: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);

/// Longest [`KvBackend::list`] cursor accepted, in bytes.
pub const MAX_CURSOR_BYTES: usize = 4096;

/// One page of keys from [`KvBackend::list`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KvPage {
    /// Keys of this page, in ascending order of their UTF-8 bytes. A page may
    /// be empty while `cursor` is still `Some` (Cloudflare does that).
    pub keys: Vec<String>,
    /// Where the next page starts; `None` on the last page.
    pub cursor: Option<String>,
}

/// What a backend accepts and what it does atomically, so callers and the
/// conformance suite can adapt (e.g. use a TTL the backend allows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLimits {
    /// Shortest TTL accepted (Cloudflare: 60 s).
    pub min_ttl: Duration,
    /// Longest TTL accepted.
    pub max_ttl: Duration,
    /// Longest key, in UTF-8 bytes.
    pub max_key_bytes: usize,
    /// Largest value, in bytes.
    pub max_value_bytes: usize,
    /// Smallest `limit` [`KvBackend::list`] accepts (Cloudflare: 10).
    pub min_list_limit: usize,
    /// Largest `limit` [`KvBackend::list`] accepts (Cloudflare: 1000).
    pub max_list_limit: usize,
    /// Whether [`KvBackend::take`], [`KvBackend::increment`] and
    /// [`KvBackend::replace`] are atomic: `true` on memory and PostgreSQL,
    /// `false` on Cloudflare (read then write).
    pub atomic: bool,
    /// Whether a read always sees the last write that returned (true on
    /// memory and PostgreSQL; false on Cloudflare, whose reads may be up to
    /// 60 s stale).
    pub read_your_writes: bool,
}

impl KvLimits {
    /// Refuses an empty key, `.` and `..`, a key longer than
    /// [`max_key_bytes`](Self::max_key_bytes), and a key holding a NUL byte
    /// (PostgreSQL text cannot store it, so no backend takes it).
    ///
    /// ```
    /// use dployr_domain::{KvLimits, StoreError};
    /// let limits = KvLimits::default();
    /// assert!(limits.check_key("session:abc").is_ok());
    /// assert!(matches!(limits.check_key(""), Err(StoreError::Invalid { field: "key", .. })));
    /// assert!(limits.check_key(&"k".repeat(513)).is_err());
    /// ```
    ///
    /// # Errors
    /// [`StoreError::Invalid`] on field `key`.
    pub fn check_key(&self, key: &str) -> StoreResult<()> {
        if key.is_empty() {
            return Err(StoreError::invalid("key", "must not be empty"));
        }
        if key == "." || key == ".." {
            return Err(StoreError::invalid("key", "must not be `.` or `..`"));
        }
        if key.len() > self.max_key_bytes {
            return Err(StoreError::invalid(
                "key",
                format!("is {} bytes long, at most {} allowed", key.len(), self.max_key_bytes),
            ));
        }
        if key.contains('\0') {
            return Err(StoreError::invalid("key", "must not contain a NUL byte"));
        }
        Ok(())
    }

    /// Refuses a [`KvBackend::list`] prefix no key can start with: longer
    /// than [`max_key_bytes`](Self::max_key_bytes) or holding a NUL byte,
    /// which [`check_key`](Self::check_key) refuses in every key (and which
    /// PostgreSQL cannot even receive in text). An empty prefix lists all.
    ///
    /// ```
    /// use dployr_domain::{KvLimits, StoreError};
    /// let limits = KvLimits::default();
    /// assert!(limits.check_prefix("").is_ok());
    /// assert!(matches!(limits.check_prefix("a\0"), Err(StoreError::Invalid { field: "prefix", .. })));
    /// ```
    ///
    /// # Errors
    /// [`StoreError::Invalid`] on field `prefix`.
    pub fn check_prefix(&self, prefix: &str) -> StoreResult<()> {
        if prefix.len() > self.max_key_bytes {
            return Err(StoreError::invalid(
                "prefix",
                format!("is {} bytes long; no key is longer than {}", prefix.len(), self.max_key_bytes),
            ));
        }
        if prefix.contains('\0') {
            return Err(StoreError::invalid("prefix", "must not contain a NUL byte"));
        }
        Ok(())
    }

    /// Refuses a [`KvBackend::list`] cursor no page can have handed out:
    /// one holding a NUL byte (memory and PostgreSQL cursors are keys,
    /// Cloudflare's are base64), or longer than 4 KiB.
    ///
    /// ```
    /// use dployr_domain::{KvLimits, StoreError};
    /// let limits = KvLimits::default();
    /// assert!(limits.check_cursor(Some("page/09")).is_ok());
    /// assert!(matches!(limits.check_cursor(Some("\0")), Err(StoreError::Invalid { field: "cursor", .. })));
    /// ```
    ///
    /// # Errors
    /// [`StoreError::Invalid`] on field `cursor`.
    pub fn check_cursor(&self, cursor: Option<&str>) -> StoreResult<()> {
        let Some(cursor) = cursor else { return Ok(()) };
        if cursor.len() > MAX_CURSOR_BYTES {
            return Err(StoreError::invalid("cursor", format!("is longer than {MAX_CURSOR_BYTES} bytes")));
        }
        if cursor.contains('\0') {
            return Err(StoreError::invalid("cursor", "must not contain a NUL byte"));
        }
        Ok(())
    }

    /// Refuses a value larger than [`max_value_bytes`](Self::max_value_bytes).
    ///
    /// # Errors
    /// [`StoreError::Invalid`] on field `value`.
    pub fn check_value(&self, value: &[u8]) -> StoreResult<()> {
        if value.len() > self.max_value_bytes {
            return Err(StoreError::invalid(
                "value",
                format!("is {} bytes long, at most {} allowed", value.len(), self.max_value_bytes),
            ));
        }
        Ok(())
    }

    /// Refuses a TTL outside `min_ttl..=max_ttl` (zero included).
    ///
    /// ```
    /// use std::time::Duration;
    /// use dployr_domain::KvLimits;
    /// let cloudflare = KvLimits { min_ttl: Duration::from_secs(60), ..KvLimits::default() };
    /// assert!(cloudflare.check_ttl(Some(Duration::from_secs(59))).is_err());
    /// assert!(cloudflare.check_ttl(Some(Duration::from_secs(60))).is_ok());
    /// assert!(cloudflare.check_ttl(None).is_ok());
    /// ```
    ///
    /// # Errors
    /// [`StoreError::Invalid`] on field `ttl`.
    pub fn check_ttl(&self, ttl: Option<Duration>) -> StoreResult<()> {
        let Some(ttl) = ttl else { return Ok(()) };
        if ttl.is_zero() {
            return Err(StoreError::invalid("ttl", "must not be zero"));
        }
        if ttl < self.min_ttl {
            return Err(StoreError::invalid(
                "ttl",
                format!("{ttl:?} is below this backend's minimum of {:?}", self.min_ttl),
            ));
        }
        if ttl > self.max_ttl {
            return Err(StoreError::invalid("ttl", format!("{ttl:?} is above the maximum of {:?}", self.max_ttl)));
        }
        Ok(())
    }

    /// What [`KvBackend::put`] checks: the key, the value and the TTL.
    ///
    /// # Errors
    /// [`StoreError::Invalid`] on field `key`, `value` or `ttl`.
    pub fn check_put(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> StoreResult<()> {
        self.check_key(key)?;
        self.check_value(value)?;
        self.check_ttl(ttl)
    }

    /// Refuses a counter key that [`check_key`](Self::check_key) refuses,
    /// or that is the key of the value it counts attempts at: what
    /// [`KvBackend::put_and_reset_counter`] checks beside
    /// [`check_put`](Self::check_put), before writing.
    ///
    /// ```
    /// use dployr_domain::KvLimits;
    /// assert!(KvLimits::default().check_counter_key("otp:a", "otp-tries:a").is_ok());
    /// assert!(KvLimits::default().check_counter_key("otp:a", "otp:a").is_err());
    /// ```
    ///
    /// # Errors
    /// [`StoreError::Invalid`] on field `counter_key`.
    pub fn check_counter_key(&self, key: &str, counter_key: &str) -> StoreResult<()> {
        self.check_key(counter_key).map_err(|error| match error {
            StoreError::Invalid { reason, .. } => StoreError::Invalid { field: "counter_key", reason },
            other => other,
        })?;
        if counter_key == key {
            return Err(StoreError::invalid("counter_key", "must not be the key of the value it counts attempts at"));
        }
        Ok(())
    }

    /// Refuses a list `limit` outside `min_list_limit..=max_list_limit`.
    ///
    /// # Errors
    /// [`StoreError::Invalid`] on field `limit`.
    pub fn check_list_limit(&self, limit: usize) -> StoreResult<()> {
        if limit < self.min_list_limit.max(1) || limit > self.max_list_limit {
            return Err(StoreError::invalid(
                "limit",
                format!("{limit} is outside {}..={}", self.min_list_limit.max(1), self.max_list_limit),
            ));
        }
        Ok(())
    }
}

impl Default for KvLimits {
    /// The limits of a backend that can do everything: 1 ms TTLs, lists of
    /// 1 to 1000 keys, atomic take and counter, reads that see every write.
    fn default() -> Self {
        Self {
            min_ttl: Duration::from_millis(1),
            max_ttl: MAX_TTL,
            max_key_bytes: MAX_KEY_BYTES,
            max_value_bytes: MAX_VALUE_BYTES,
            min_list_limit: 1,
            max_list_limit: 1000,
            atomic: true,
            read_your_writes: true,
        }
    }
}

/// A key-value backend: memory, Cloudflare Workers KV, PostgreSQL.
///
/// Keys are non-empty UTF-8 strings of at most [`MAX_KEY_BYTES`] bytes;
/// values are bytes. An entry written with a TTL is never returned once the
/// TTL has passed. Every method refuses bad input with
/// [`StoreError::Invalid`] before writing anything (see [`KvLimits`]).
/// Each backend documents which operations are atomic on it
/// ([`KvLimits::atomic`]).
#[cfg_attr(feature = "mock", mockall::automock)]
pub trait KvBackend: Send + Sync {
    /// What this backend accepts.
    fn limits(&self) -> KvLimits;

    /// The value under `key`, or `None` if there is none or it expired.
    ///
    /// # Errors
    /// [`StoreError::Invalid`] for a bad key; `Unavailable`/`Backend`/`Configuration` from the backend.
    fn get(&self, key: &str) -> StoreResult<Option<Vec<u8>>>;

    /// Stores `value` under `key`, replacing any value, expiring after `ttl`
    /// (`None`: never).
    ///
    /// # Errors
    /// [`StoreError::Invalid`] for a bad key, value or TTL; backend errors.
    fn put(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> StoreResult<()>;

    /// Stores `value` under `key`, expiring after `ttl` (`None`: never), as
    /// [`put`](Self::put) does, but only if `key` holds a live (unexpired)
    /// value; returns whether it did. A missing or expired key is left
    /// without a value. This is how a record that may have been deleted
    /// meanwhile is written back without bringing it back: a session saved
    /// by a request that loaded it before a sign-out. Atomic where
    /// [`KvLimits::atomic`] says so: once a [`delete`](Self::delete) of
    /// `key` has returned, no replace puts a value back, however they
    /// interleave.
    ///
    /// The default is [`get`](Self::get), then [`put`](Self::put) if there
    /// was a value: a delete that lands between the two is undone. Memory
    /// does it under one lock, PostgreSQL in one statement.
    ///
    /// # Errors
    /// [`StoreError::Invalid`] for a bad key, value or TTL, before anything
    /// is read or written; backend errors.
    fn replace(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> StoreResult<bool> {
        self.limits().check_put(key, value, ttl)?;
        if self.get(key)?.is_none() {
            return Ok(false);
        }
        self.put(key, value, ttl)?;
        Ok(true)
    }

    /// Removes `key`; removing a missing key is not an error.
    ///
    /// # Errors
    /// [`StoreError::Invalid`] for a bad key; backend errors.
    fn delete(&self, key: &str) -> StoreResult<()>;

    /// The values under `keys`, in their order (`None`: missing or
    /// expired), as [`get`](Self::get) reads each: the same consistency,
    /// no snapshot across keys. For reading many small text records at
    /// once (the sessions a sign-out everywhere checks): Cloudflare answers
    /// up to 100 keys a request, as text (a hundred holding a value that is
    /// not UTF-8 are read one by one there). The default reads them one by
    /// one.
    ///
    /// # Errors
    /// [`StoreError::Invalid`] for a bad key, before anything is read;
    /// backend errors.
    fn get_many(&self, keys: &[String]) -> StoreResult<Vec<Option<Vec<u8>>>> {
        let limits = self.limits();
        for key in keys {
            limits.check_key(key)?;
        }
        keys.iter().map(|key| self.get(key)).collect()
    }

    /// Removes every key of `keys`; a missing key is not an error. In no
    /// promised order: Cloudflare removes up to 10 000 keys a request, all
    /// at once, and may report some of them undone (deleted again there, in
    /// bulk). After an error any of them may remain, so a caller that must
    /// not remove some keys before others makes two calls. The default
    /// deletes them one by one.
    ///
    /// # Errors
    /// [`StoreError::Invalid`] for a bad key, before anything is removed;
    /// backend errors.
    fn delete_many(&self, keys: &[String]) -> StoreResult<()> {
        let limits = self.limits();
        for key in keys {
            limits.check_key(key)?;
        }
        keys.iter().try_for_each(|key| self.delete(key))
    }

    /// Up to `limit` live keys starting with `prefix`, in ascending byte
    /// order, from `cursor` (a cursor returned by the previous page) on.
    ///
    /// # Errors
    /// [`StoreError::Invalid`] for a limit outside the backend's range, or a
    /// prefix or cursor that [`KvLimits::check_prefix`] or
    /// [`KvLimits::check_cursor`] refuses; backend errors.
    #[expect(clippy::needless_lifetimes, reason = "mockall's automock needs the lifetime inside `Option<&str>` named")]
    fn list<'a>(&self, prefix: &str, limit: usize, cursor: Option<&'a str>) -> StoreResult<KvPage>;

    /// Removes `key` and returns the value it held, if any and not expired.
    /// Atomic where [`KvLimits::atomic`] says so: of many concurrent takes
    /// of one key, exactly one gets the value.
    ///
    /// # Errors
    /// [`StoreError::Invalid`] for a bad key; backend errors.
    fn take(&self, key: &str) -> StoreResult<Option<Vec<u8>>>;

    /// Adds one to the counter under `key` and returns the new value. A
    /// missing or expired counter starts at 1 with `ttl`; an existing one
    /// keeps its expiry. The value is stored as ASCII decimal digits.
    /// Atomic where [`KvLimits::atomic`] says so. One exception: a backend
    /// that reads a counter's expiry from a header a proxy may strip
    /// (Cloudflare) cannot tell a counter stored without expiry from one
    /// whose expiry was lost on the way, and gives it `ttl` (never leaving
    /// a counter without end that should have one); there, a counter meant
    /// to last is written with [`put`](Self::put), not counted with a TTL.
    ///
    /// # Errors
    /// [`StoreError::Invalid`] for a bad key or TTL, or when the key holds a
    /// value that is not a counter or a counter at [`MAX_COUNTER`] (nothing
    /// written); backend errors.
    fn increment(&self, key: &str, ttl: Option<Duration>) -> StoreResult<i64>;

    /// Counts one attempt under `attempts_key` (as [`increment`](Self::increment)
    /// with `ttl`) and, only when that count is at most `max_attempts`,
    /// deletes the entry under `key` if its value is exactly `expected`.
    /// Once the count reaches `max_attempts`, an attempt that did not take
    /// the entry deletes it whatever it holds: the entry is spent, and a
    /// new one needs a new count
    /// ([`put_and_reset_counter`](Self::put_and_reset_counter), whose count
    /// ends with the entry). Returns the
    /// count and whether this call took the entry: of many concurrent calls
    /// with the right value, one does. This is how a one-time code is
    /// checked: the attempt is counted before anything is compared, and a
    /// right guess consumes it.
    ///
    /// The default is [`increment`](Self::increment), [`get`](Self::get), a
    /// [`take`](Self::take) that succeeds only if it took `expected`, and a
    /// [`delete`](Self::delete) of a spent entry; PostgreSQL does it in one
    /// statement, memory under one lock.
    ///
    /// # Errors
    /// [`StoreError::Invalid`] for a bad key, a counter key that is the
    /// entry's own, or a `max_attempts` below 1, before anything is
    /// counted; as
    /// [`increment`](Self::increment) and [`take`](Self::take).
    fn count_attempt_and_take_if(
        &self,
        attempts_key: &str,
        ttl: Option<Duration>,
        max_attempts: i64,
        key: &str,
        expected: &[u8],
    ) -> StoreResult<(i64, bool)> {
        let limits = self.limits();
        limits.check_key(key)?;
        limits.check_counter_key(key, attempts_key)?;
        // As memory and PostgreSQL order their checks, so that a call with
        // two bad arguments is refused naming the same one everywhere.
        limits.check_ttl(ttl)?;
        check_max_attempts(max_attempts)?;
        let attempts = self.increment(attempts_key, ttl)?;
        let taken = attempts <= max_attempts
            && self.get(key)?.as_deref() == Some(expected)
            && self.take(key)?.as_deref() == Some(expected);
        // Every attempt past the limit spends it again, not only the one
        // that reached it: a count that passed the limit without landing on
        // it (one that was there before, an attempt whose delete failed)
        // must not leave the value to be guessed.
        if !taken && attempts >= max_attempts {
            self.delete(key)?;
        }
        Ok((attempts, taken))
    }

    /// Stores `value` under `key` (as [`put`](Self::put)) and restarts the
    /// counter under `counter_key` at `0`, with the same TTL: how a new
    /// one-time code replaces the old one and restarts its count of
    /// attempts. The count then ends exactly when the value does (on the
    /// backend's clock, wherever it steps), so it cannot end first and
    /// start again with the value still there. Atomic where
    /// [`KvLimits::atomic`] says so: no
    /// [`count_attempt_and_take_if`](Self::count_attempt_and_take_if) is
    /// counted under the old count and compared with the new value, so the
    /// new value is compared with at most `max_attempts` attempts.
    ///
    /// The default is [`put`](Self::put) of the value, then of the counter:
    /// an attempt that lands between the two is counted under the count
    /// that is then restarted, and compared with the new value uncounted.
    /// PostgreSQL does it in one statement, memory under one lock.
    ///
    /// # Errors
    /// [`StoreError::Invalid`] for a bad key, value, TTL or counter key, or
    /// a counter key that is `key` itself, before anything is written;
    /// backend errors.
    fn put_and_reset_counter(
        &self,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
        counter_key: &str,
    ) -> StoreResult<()> {
        // In the order every backend checks them, so a call with two bad
        // arguments is refused naming the same one everywhere.
        self.limits().check_put(key, value, ttl)?;
        self.limits().check_counter_key(key, counter_key)?;
        self.put(key, value, ttl)?;
        self.put(counter_key, b"0", ttl)
    }

    /// Deletes the entries whose TTL has passed and returns how many, on a
    /// backend that keeps them until something deletes them (PostgreSQL's
    /// rows, in bounded batches). An expired entry is never returned either
    /// way: this gives its space back. The default, for backends that drop
    /// expired entries themselves (memory reclaims them at every call,
    /// Cloudflare expires them), does nothing and returns 0.
    ///
    /// # Errors
    /// Backend errors; entries deleted before one stay deleted.
    fn delete_expired(&self) -> StoreResult<u64> {
        Ok(0)
    }
}

/// Parses a counter value as written by [`KvBackend::increment`]: ASCII
/// decimal digits, at most 18 of them.
///
/// ```
/// assert_eq!(dployr_domain::parse_counter(b"42"), Some(42));
/// assert_eq!(dployr_domain::parse_counter(b"x"), None);
/// ```
pub fn parse_counter(value: &[u8]) -> Option<i64> {
    if value.is_empty() || value.len() > 18 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// The largest count a counter holds: 18 digits, what [`parse_counter`]
/// reads. [`KvBackend::increment`] of a counter there is refused
/// ([`counter_at_its_largest`]) rather than written as 19 digits that the
/// next increment would take for "not a counter".
pub const MAX_COUNTER: i64 = 999_999_999_999_999_999;

/// The error of [`KvBackend::increment`] on a counter at [`MAX_COUNTER`].
pub fn counter_at_its_largest(key: &str) -> StoreError {
    StoreError::invalid("key", format!("{key:?} holds a counter at its largest, {MAX_COUNTER}"))
}

/// Refuses a `max_attempts` below 1 for
/// [`KvBackend::count_attempt_and_take_if`]: no attempt could take the
/// value, and backends would spend it at different counts.
///
/// # Errors
/// [`StoreError::Invalid`] on field `max_attempts`.
pub fn check_max_attempts(max_attempts: i64) -> StoreResult<()> {
    if max_attempts < 1 {
        return Err(StoreError::invalid("max_attempts", format!("is {max_attempts}; at least 1")));
    }
    Ok(())
}

/// The error of [`KvBackend::increment`] on a key that holds something else.
pub fn not_a_counter(key: &str) -> StoreError {
    StoreError::invalid("key", format!("{key:?} holds a value that is not a counter"))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use super::*;
    use crate::text::tests::invalid_reason;

    #[test]
    fn a_key_of_exactly_the_maximum_bytes_is_accepted_and_one_byte_more_refused() {
        let limits = KvLimits::default();
        assert!(limits.check_key(&"k".repeat(MAX_KEY_BYTES)).is_ok());
        // Bytes, not characters: 256 two-byte letters are at the limit.
        assert!(limits.check_key(&"\u{e9}".repeat(MAX_KEY_BYTES / 2)).is_ok());
        let (field, reason) = invalid_reason(limits.check_key(&"k".repeat(MAX_KEY_BYTES + 1)));
        assert_eq!((field, reason.as_str()), ("key", "is 513 bytes long, at most 512 allowed"));
    }

    #[test]
    fn only_the_keys_dot_and_dot_dot_are_refused_not_keys_made_of_more_dots() {
        let limits = KvLimits::default();
        for refused in [".", ".."] {
            assert_eq!(invalid_reason(limits.check_key(refused)).0, "key", "{refused}");
        }
        for accepted in ["...", ".a", "a.", "..a"] {
            assert!(limits.check_key(accepted).is_ok(), "{accepted}");
        }
    }

    #[test]
    fn a_prefix_as_long_as_the_longest_key_is_accepted_and_one_byte_more_refused() {
        let limits = KvLimits::default();
        assert!(limits.check_prefix(&"p".repeat(MAX_KEY_BYTES)).is_ok());
        assert!(limits.check_prefix("session:").is_ok());
        assert_eq!(invalid_reason(limits.check_prefix(&"p".repeat(MAX_KEY_BYTES + 1))).0, "prefix");
    }

    #[test]
    fn a_cursor_of_exactly_4_kib_is_accepted_and_one_byte_more_refused() {
        let limits = KvLimits::default();
        assert!(limits.check_cursor(None).is_ok());
        assert!(limits.check_cursor(Some(&"c".repeat(MAX_CURSOR_BYTES))).is_ok());
        assert_eq!(invalid_reason(limits.check_cursor(Some(&"c".repeat(MAX_CURSOR_BYTES + 1)))).0, "cursor");
    }

    #[test]
    fn a_value_of_exactly_25_mib_is_accepted_and_one_byte_more_refused() {
        let limits = KvLimits::default();
        let mut value = vec![0_u8; 25 * 1024 * 1024];
        assert!(limits.check_value(&value).is_ok());
        assert!(limits.check_value(b"").is_ok());
        value.push(0);
        let (field, reason) = invalid_reason(limits.check_value(&value));
        assert_eq!((field, reason.as_str()), ("value", "is 26214401 bytes long, at most 26214400 allowed"));
    }

    #[test]
    fn a_ttl_of_exactly_the_maximum_of_100_years_is_accepted_and_one_second_more_refused() {
        let limits = KvLimits::default();
        let hundred_years = Duration::from_secs(100 * 365 * 24 * 60 * 60);
        assert!(limits.check_ttl(Some(hundred_years)).is_ok());
        assert_eq!(invalid_reason(limits.check_ttl(Some(hundred_years + Duration::from_secs(1)))).0, "ttl");
        // The default minimum, a millisecond, is accepted; zero never is.
        assert!(limits.check_ttl(Some(Duration::from_millis(1))).is_ok());
        let (field, reason) = invalid_reason(limits.check_ttl(Some(Duration::ZERO)));
        assert_eq!((field, reason.as_str()), ("ttl", "must not be zero"));
    }

    #[test]
    fn a_list_limit_is_accepted_from_the_minimum_to_the_maximum_inclusive() {
        let cloudflare = KvLimits { min_list_limit: 10, ..KvLimits::default() };
        for accepted in [10, 11, 999, 1000] {
            assert!(cloudflare.check_list_limit(accepted).is_ok(), "{accepted}");
        }
        for refused in [0, 9, 1001] {
            let (field, reason) = invalid_reason(cloudflare.check_list_limit(refused));
            assert_eq!((field, reason), ("limit", format!("{refused} is outside 10..=1000")));
        }
        // A minimum of 0 still refuses an empty page.
        let no_minimum = KvLimits { min_list_limit: 0, ..KvLimits::default() };
        assert!(no_minimum.check_list_limit(1).is_ok());
        assert_eq!(invalid_reason(no_minimum.check_list_limit(0)).1, "0 is outside 1..=1000");
    }

    #[test]
    fn a_counter_is_one_to_eighteen_ascii_digits_and_nothing_else() {
        assert_eq!(parse_counter(b"0"), Some(0));
        assert_eq!(parse_counter(b"7"), Some(7));
        assert_eq!(parse_counter(b"999999999999999999"), Some(MAX_COUNTER));
        for refused in [&b""[..], b"1000000000000000000", b"-1", b"+1", b" 1", b"1 ", b"1x", b"\xd9\xa1"] {
            assert_eq!(parse_counter(refused), None, "{refused:?}");
        }
    }

    #[test]
    fn max_attempts_of_one_is_accepted_and_below_one_refused() {
        assert!(check_max_attempts(1).is_ok());
        assert!(check_max_attempts(5).is_ok());
        for refused in [0, -1, i64::MIN] {
            let (field, reason) = invalid_reason(check_max_attempts(refused));
            assert_eq!((field, reason), ("max_attempts", format!("is {refused}; at least 1")));
        }
    }

    /// A backend that implements only what a backend must, so the trait's
    /// default methods are the ones tested (no TTLs: nothing expires).
    #[derive(Default)]
    struct Plain {
        entries: Mutex<BTreeMap<String, Vec<u8>>>,
    }

    impl Plain {
        fn entries(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Vec<u8>>> {
            self.entries.lock().unwrap()
        }
    }

    impl KvBackend for Plain {
        fn limits(&self) -> KvLimits {
            KvLimits::default()
        }

        fn get(&self, key: &str) -> StoreResult<Option<Vec<u8>>> {
            Ok(self.entries().get(key).cloned())
        }

        fn put(&self, key: &str, value: &[u8], _ttl: Option<Duration>) -> StoreResult<()> {
            self.entries().insert(key.to_owned(), value.to_vec());
            Ok(())
        }

        fn delete(&self, key: &str) -> StoreResult<()> {
            self.entries().remove(key);
            Ok(())
        }

        fn list(&self, _prefix: &str, _limit: usize, _cursor: Option<&str>) -> StoreResult<KvPage> {
            unimplemented!("not used by the default methods")
        }

        fn take(&self, key: &str) -> StoreResult<Option<Vec<u8>>> {
            Ok(self.entries().remove(key))
        }

        fn increment(&self, key: &str, _ttl: Option<Duration>) -> StoreResult<i64> {
            let mut entries = self.entries();
            let count = match entries.get(key) {
                None => 1,
                Some(value) => parse_counter(value).ok_or_else(|| not_a_counter(key))? + 1,
            };
            entries.insert(key.to_owned(), count.to_string().into_bytes());
            Ok(count)
        }
    }

    const TTL: Option<Duration> = Some(Duration::from_secs(600));

    #[test]
    fn by_default_a_wrong_guess_within_the_limit_is_counted_and_leaves_the_value() {
        let kv = Plain::default();
        kv.put("otp:a", b"123456", TTL).unwrap();
        assert_eq!(kv.count_attempt_and_take_if("otp-tries:a", TTL, 3, "otp:a", b"000000").unwrap(), (1, false));
        assert_eq!(kv.count_attempt_and_take_if("otp-tries:a", TTL, 3, "otp:a", b"111111").unwrap(), (2, false));
        assert_eq!(kv.get("otp:a").unwrap().as_deref(), Some(&b"123456"[..]));
        assert_eq!(kv.get("otp-tries:a").unwrap().as_deref(), Some(&b"2"[..]));
        // The right guess, still within the limit, takes it, once.
        assert_eq!(kv.count_attempt_and_take_if("otp-tries:a", TTL, 3, "otp:a", b"123456").unwrap(), (3, true));
        assert_eq!(kv.get("otp:a").unwrap(), None);
        assert_eq!(kv.count_attempt_and_take_if("otp-tries:a", TTL, 3, "otp:a", b"123456").unwrap(), (4, false));
    }

    #[test]
    fn by_default_the_last_attempt_the_limit_allows_spends_the_value_when_it_does_not_take_it() {
        let kv = Plain::default();
        kv.put("otp:a", b"123456", TTL).unwrap();
        assert_eq!(kv.count_attempt_and_take_if("otp-tries:a", TTL, 2, "otp:a", b"000000").unwrap(), (1, false));
        assert_eq!(kv.get("otp:a").unwrap().as_deref(), Some(&b"123456"[..]));
        assert_eq!(kv.count_attempt_and_take_if("otp-tries:a", TTL, 2, "otp:a", b"000000").unwrap(), (2, false));
        assert_eq!(kv.get("otp:a").unwrap(), None, "the last allowed wrong guess left the value");
        // A value put back without restarting the count is spent by the next attempt, right or not.
        kv.put("otp:a", b"123456", TTL).unwrap();
        assert_eq!(kv.count_attempt_and_take_if("otp-tries:a", TTL, 2, "otp:a", b"123456").unwrap(), (3, false));
        assert_eq!(kv.get("otp:a").unwrap(), None, "an attempt past the limit left the value");
    }

    #[test]
    fn by_default_a_right_guess_on_the_first_attempt_takes_the_value() {
        let kv = Plain::default();
        kv.put("otp:a", b"123456", TTL).unwrap();
        assert_eq!(kv.count_attempt_and_take_if("otp-tries:a", TTL, 1, "otp:a", b"123456").unwrap(), (1, true));
        assert_eq!(kv.get("otp:a").unwrap(), None);
    }
}
