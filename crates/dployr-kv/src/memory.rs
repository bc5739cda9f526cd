//! The in-memory backend: for tests and single-process development. Every
//! operation holds one lock, so all of them, `take`, `increment` and
//! `replace` included, are atomic. Expired entries are never returned and are
//! reclaimed: an index ordered by expiry is swept at every operation, so the
//! map does not grow with dead entries.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use dployr_domain::{
    KvBackend, KvLimits, KvPage, MAX_COUNTER, StoreError, StoreResult, check_max_attempts, counter_at_its_largest,
    not_a_counter, parse_counter,
};

use crate::clock::{Clock, SystemClock};

struct Entry {
    value: Vec<u8>,
    expires_at: Option<SystemTime>,
}

#[derive(Default)]
struct State {
    entries: BTreeMap<String, Entry>,
    /// (expiry, key) of every entry that has one, soonest first.
    expiries: BTreeSet<(SystemTime, String)>,
}

impl State {
    /// Removes every entry whose expiry is at or before `now`.
    fn reclaim(&mut self, now: SystemTime) {
        while let Some((at, _)) = self.expiries.first() {
            if *at > now {
                break;
            }
            if let Some((_, key)) = self.expiries.pop_first() {
                self.entries.remove(&key);
            }
        }
    }

    fn remove(&mut self, key: &str) -> Option<Entry> {
        let entry = self.entries.remove(key)?;
        if let Some(at) = entry.expires_at {
            self.expiries.remove(&(at, key.to_owned()));
        }
        Some(entry)
    }

    /// Adds one to the counter under `key` (a new one starts at 1 and
    /// expires at `new_expiry`; a live one keeps its expiry).
    fn count(&mut self, key: &str, new_expiry: Option<SystemTime>) -> StoreResult<i64> {
        let (count, expires_at) = match self.entries.get(key) {
            None => (1, new_expiry),
            Some(entry) => {
                let current = parse_counter(&entry.value).ok_or_else(|| not_a_counter(key))?;
                if current >= MAX_COUNTER {
                    return Err(counter_at_its_largest(key));
                }
                (current + 1, entry.expires_at)
            }
        };
        self.insert(key, Entry { value: count.to_string().into_bytes(), expires_at });
        Ok(count)
    }

    fn insert(&mut self, key: &str, entry: Entry) {
        self.remove(key);
        if let Some(at) = entry.expires_at {
            self.expiries.insert((at, key.to_owned()));
        }
        self.entries.insert(key.to_owned(), entry);
    }
}

/// A [`KvBackend`] in a `BTreeMap` behind a mutex; cheap to clone, clones
/// share the data. TTLs are honoured to the millisecond against its
/// [`Clock`]; all operations are atomic.
///
/// ```
/// use std::time::Duration;
/// use dployr_domain::KvBackend as _;
/// use dployr_kv::{ManualClock, MemoryKv};
///
/// let clock = ManualClock::new();
/// let kv = MemoryKv::with_clock(clock.clone());
/// kv.put("greeting", b"hello", Some(Duration::from_millis(10)))?;
/// clock.advance(Duration::from_millis(10));
/// assert_eq!(kv.get("greeting")?, None);
/// # Ok::<(), dployr_domain::StoreError>(())
/// ```
#[derive(Clone)]
pub struct MemoryKv {
    state: Arc<Mutex<State>>,
    clock: Arc<dyn Clock>,
}

/// How many entries, never what they hold: values are sessions (a user's
/// id and e-mail) and code digests, which a log must not carry.
impl fmt::Debug for MemoryKv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // try_lock: a Debug called while this thread holds the lock must not deadlock.
        let mut debug = f.debug_struct("MemoryKv");
        if let Ok(state) = self.state.try_lock() {
            debug.field("entries", &state.entries.len());
        }
        debug.finish_non_exhaustive()
    }
}

impl Default for MemoryKv {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryKv {
    /// An empty store on the system clock.
    pub fn new() -> Self {
        Self::with_clock(SystemClock)
    }

    /// An empty store reading the time from `clock`.
    pub fn with_clock(clock: impl Clock + 'static) -> Self {
        Self { state: Arc::new(Mutex::new(State::default())), clock: Arc::new(clock) }
    }

    /// Entries held right now, expired ones not yet reclaimed included (for
    /// tests that prove reclamation).
    pub fn stored_entries(&self) -> usize {
        // Not through `state()`, which would reclaim first.
        self.state.lock().unwrap_or_else(PoisonError::into_inner).entries.len()
    }

    /// Locks the state and reclaims what expired. A panic while the lock was
    /// held cannot leave the maps inconsistent (each change is one insert or
    /// remove pair), so a poisoned lock is taken over.
    fn state(&self) -> MutexGuard<'_, State> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.reclaim(self.clock.now());
        state
    }

    fn expiry(&self, ttl: Option<Duration>) -> StoreResult<Option<SystemTime>> {
        ttl.map(|ttl| {
            self.clock.now().checked_add(ttl).ok_or_else(|| StoreError::invalid("ttl", "overflows the clock"))
        })
        .transpose()
    }
}

impl KvBackend for MemoryKv {
    fn limits(&self) -> KvLimits {
        KvLimits::default()
    }

    fn get(&self, key: &str) -> StoreResult<Option<Vec<u8>>> {
        self.limits().check_key(key)?;
        Ok(self.state().entries.get(key).map(|entry| entry.value.clone()))
    }

    fn put(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> StoreResult<()> {
        let limits = self.limits();
        limits.check_put(key, value, ttl)?;
        let expires_at = self.expiry(ttl)?;
        self.state().insert(key, Entry { value: value.to_vec(), expires_at });
        Ok(())
    }

    /// Under the one lock: no delete lands between the check and the write.
    fn replace(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> StoreResult<bool> {
        let limits = self.limits();
        limits.check_put(key, value, ttl)?;
        let expires_at = self.expiry(ttl)?;
        // `state()` has reclaimed what expired: an entry still there is live.
        let mut state = self.state();
        if !state.entries.contains_key(key) {
            return Ok(false);
        }
        state.insert(key, Entry { value: value.to_vec(), expires_at });
        Ok(true)
    }

    fn delete(&self, key: &str) -> StoreResult<()> {
        self.limits().check_key(key)?;
        self.state().remove(key);
        Ok(())
    }

    fn list(&self, prefix: &str, limit: usize, cursor: Option<&str>) -> StoreResult<KvPage> {
        let limits = self.limits();
        limits.check_list_limit(limit)?;
        limits.check_prefix(prefix)?;
        limits.check_cursor(cursor)?;
        let state = self.state();
        let start = match cursor {
            Some(after) if after >= prefix => Bound::Excluded(after.to_owned()),
            _ => Bound::Included(prefix.to_owned()),
        };
        let mut keys: Vec<String> = state
            .entries
            .range((start, Bound::Unbounded))
            .map(|(key, _)| key)
            .take_while(|key| key.starts_with(prefix))
            .take(limit + 1)
            .cloned()
            .collect();
        let more = keys.len() > limit;
        keys.truncate(limit);
        let cursor = if more { keys.last().cloned() } else { None };
        Ok(KvPage { keys, cursor })
    }

    fn take(&self, key: &str) -> StoreResult<Option<Vec<u8>>> {
        self.limits().check_key(key)?;
        Ok(self.state().remove(key).map(|entry| entry.value))
    }

    fn increment(&self, key: &str, ttl: Option<Duration>) -> StoreResult<i64> {
        let limits = self.limits();
        limits.check_key(key)?;
        limits.check_ttl(ttl)?;
        let new_expiry = self.expiry(ttl)?;
        self.state().count(key, new_expiry)
    }

    /// Under the one lock, so the whole attempt is atomic.
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
        limits.check_ttl(ttl)?;
        check_max_attempts(max_attempts)?;
        let new_expiry = self.expiry(ttl)?;
        let mut state = self.state();
        let count = state.count(attempts_key, new_expiry)?;
        let taken = count <= max_attempts
            && state.entries.get(key).is_some_and(|entry| entry.value == expected)
            && state.remove(key).is_some();
        if !taken && count >= max_attempts {
            // Spent: a count that ended before the value cannot start again for it.
            state.remove(key);
        }
        Ok((count, taken))
    }

    /// Under the one lock: no attempt sees the new value with the old count.
    fn put_and_reset_counter(
        &self,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
        counter_key: &str,
    ) -> StoreResult<()> {
        let limits = self.limits();
        limits.check_put(key, value, ttl)?;
        limits.check_counter_key(key, counter_key)?;
        let expires_at = self.expiry(ttl)?;
        let mut state = self.state();
        state.insert(key, Entry { value: value.to_vec(), expires_at });
        state.insert(counter_key, Entry { value: b"0".to_vec(), expires_at });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use dployr_domain::{KvBackend as _, KvPage};

    use super::MemoryKv;

    fn page(keys: &[&str], cursor: Option<&str>) -> KvPage {
        KvPage { keys: keys.iter().map(|&key| key.to_owned()).collect(), cursor: cursor.map(str::to_owned) }
    }

    #[test]
    fn a_page_that_ends_at_the_last_matching_key_has_no_cursor() {
        let kv = MemoryKv::new();
        for key in ["p/1", "p/2", "p/3", "q"] {
            kv.put(key, b"v", None).unwrap();
        }
        assert_eq!(kv.list("p/", 3, None).unwrap(), page(&["p/1", "p/2", "p/3"], None));
        assert_eq!(kv.list("p/", 2, None).unwrap(), page(&["p/1", "p/2"], Some("p/2")));
        assert_eq!(kv.list("p/", 2, Some("p/2")).unwrap(), page(&["p/3"], None));
        assert_eq!(kv.list("p/", 1, Some("p/2")).unwrap(), page(&["p/3"], None));
    }

    #[test]
    fn a_cursor_that_sorts_before_the_prefix_lists_the_prefix_from_its_start() {
        let kv = MemoryKv::new();
        for key in ["a/1", "b/1", "b/2"] {
            kv.put(key, b"v", None).unwrap();
        }
        assert_eq!(kv.list("b/", 10, Some("a")).unwrap(), page(&["b/1", "b/2"], None));
        assert_eq!(kv.list("b/", 10, Some("b/1")).unwrap(), page(&["b/2"], None));
    }

    #[test]
    fn debug_shows_how_many_entries_never_a_key_or_value() {
        let kv = MemoryKv::new();
        kv.put("session:secret-key", b"{\"email\":\"ada@example.io\"}", Some(Duration::from_secs(60))).unwrap();
        let shown = format!("{kv:?}");
        assert_eq!(shown, "MemoryKv { entries: 1, .. }");
    }
}
