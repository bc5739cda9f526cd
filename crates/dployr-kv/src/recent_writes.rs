//! [`RecentWrites`]: what this process wrote lately under each key of a
//! backend whose reads may be stale.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// What this process wrote lately under each key (a value, or a mark of a
/// delete: whatever `V` says), each for a window of its own, on a backend
/// whose reads may be stale ([`KvLimits::read_your_writes`] is false): a
/// read of such a backend may return what was there before this process's
/// own write, so the stores keep their writes here for as long as the
/// backend may lag and decide, key by key, which of the two answers.
///
/// [`KvStore`](crate::KvStore) keeps its session creations and deletes
/// here; `dployr-tower-sessions` its record writes. Their read policies
/// differ (the first still asks the backend on every read, the second
/// prefers its own write for the window), so this type only remembers and
/// answers; it does not read the backend.
///
/// Bounded by the writes of the longest window: each call that remembers
/// drops what has ended, oldest first, without a scan of the map. Entries
/// are dropped in the order they were remembered, so one with a short
/// window waits, at most, for those remembered before it with longer ones;
/// an entry whose window has passed is never answered.
///
/// Times are given by the caller on a clock that never steps
/// ([`Clock::monotonic`](crate::Clock::monotonic)): a window is time that
/// passed here, which a step of the wall clock must not cut short.
///
/// Clones of a store share one memory through an `Arc`; every method takes
/// a short lock (no backend call is made under it).
///
/// [`KvLimits::read_your_writes`]: dployr_domain::KvLimits::read_your_writes
///
/// # Examples
/// ```
/// use std::time::Duration;
/// use dployr_kv::RecentWrites;
///
/// let recent: RecentWrites<Option<&str>> = RecentWrites::new();
/// // Times are those of a clock that never steps (`Clock::monotonic`).
/// let now = Duration::from_secs(1_000);
/// recent.remember("session:a", Some("written"), now, Duration::from_secs(60));
/// recent.remember("session:b", None, now, Duration::from_secs(90)); // deleted
/// assert_eq!(recent.get("session:a", now), Some(Some("written")));
/// assert_eq!(recent.get("session:a", now + Duration::from_secs(60)), None);
/// assert_eq!(recent.get("session:b", now + Duration::from_secs(60)), Some(None));
/// ```
pub struct RecentWrites<V> {
    entries: Mutex<Entries<V>>,
}

struct Entries<V> {
    by_key: HashMap<String, Entry<V>>,
    /// The keys in the order they were remembered, with when each ends.
    order: VecDeque<(Duration, String)>,
}

struct Entry<V> {
    value: V,
    /// Until when it counts, on the caller's monotonic clock.
    until: Duration,
}

impl<V> Entries<V> {
    /// Drops what ended by `now`, oldest first (an entry remembered again
    /// since is kept: its end is another).
    fn forget_ended(&mut self, now: Duration) {
        while let Some((until, _)) = self.order.front()
            && *until <= now
        {
            if let Some((until, key)) = self.order.pop_front()
                && self.by_key.get(&key).is_some_and(|entry| entry.until == until)
            {
                self.by_key.remove(&key);
            }
        }
    }

    /// The entry under `key`, if its window has not passed at `now`.
    fn live(&self, key: &str, now: Duration) -> Option<&V> {
        self.by_key.get(key).filter(|entry| entry.until > now).map(|entry| &entry.value)
    }
}

impl<V> Default for RecentWrites<V> {
    fn default() -> Self {
        Self { entries: Mutex::new(Entries { by_key: HashMap::new(), order: VecDeque::new() }) }
    }
}

impl<V> fmt::Debug for RecentWrites<V> {
    /// The number of keys only: the values are sessions, which hold secrets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecentWrites").field("keys", &self.len()).finish()
    }
}

impl<V> RecentWrites<V> {
    /// An empty memory.
    pub fn new() -> Self {
        Self::default()
    }

    /// The entries. Every change leaves the map and the queue consistent at
    /// each step (a key in the map without its place in the queue is never
    /// left), so a lock poisoned by a panic elsewhere is taken over.
    fn entries(&self) -> MutexGuard<'_, Entries<V>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Remembers `value` under `key` from `now` for `window`, in place of
    /// what was remembered there, and drops what has ended.
    pub fn remember(&self, key: &str, value: V, now: Duration, window: Duration) {
        self.remember_unless(key, value, now, window, |_| false);
    }

    /// As [`remember`](Self::remember), unless what is remembered under
    /// `key` and has not ended satisfies `keep`: then it is left as it is,
    /// and `false` returned. One lock for the check and the write, so no
    /// other call comes between them.
    pub fn remember_unless(
        &self,
        key: &str,
        value: V,
        now: Duration,
        window: Duration,
        keep: impl FnOnce(&V) -> bool,
    ) -> bool {
        // A clock at its end (a test's) remembers nothing for long: the
        // entry ends at once.
        let until = now.checked_add(window).unwrap_or(now);
        let mut entries = self.entries();
        entries.forget_ended(now);
        if entries.live(key, now).is_some_and(keep) {
            return false;
        }
        entries.order.push_back((until, key.to_owned()));
        entries.by_key.insert(key.to_owned(), Entry { value, until });
        true
    }

    /// Changes what is remembered under `key`, if its window has not passed
    /// at `now`, in place: its window stays as it was.
    pub fn update(&self, key: &str, now: Duration, change: impl FnOnce(&mut V)) {
        let mut entries = self.entries();
        if let Some(entry) = entries.by_key.get_mut(key).filter(|entry| entry.until > now) {
            change(&mut entry.value);
        }
    }

    /// How many keys are held, ended or not yet dropped.
    pub fn len(&self) -> usize {
        self.entries().by_key.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<V: Clone> RecentWrites<V> {
    /// What is remembered under `key`, if its window has not passed at `now`.
    pub fn get(&self, key: &str, now: Duration) -> Option<V> {
        self.entries().live(key, now).cloned()
    }

    /// What `pick` makes of each entry whose window has not passed at
    /// `now` (with its key), where it makes something; in no order.
    pub fn filter_live<T>(&self, now: Duration, mut pick: impl FnMut(&str, &V) -> Option<T>) -> Vec<T> {
        self.entries()
            .by_key
            .iter()
            .filter(|(_, entry)| entry.until > now)
            .filter_map(|(key, entry)| pick(key, &entry.value))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    fn at(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    #[test]
    fn an_entry_is_answered_within_its_window_and_not_after() {
        let recent = RecentWrites::new();
        recent.remember("k", 1, at(100), MINUTE);
        assert_eq!(recent.get("k", at(159)), Some(1));
        assert_eq!(recent.get("k", at(160)), None);
        assert_eq!(recent.filter_live(at(160), |_, v| Some(*v)), Vec::<i32>::new());
    }

    #[test]
    fn remembering_drops_every_entry_that_ended_and_keeps_one_remembered_again() {
        let recent = RecentWrites::new();
        for n in 0..20 {
            recent.remember(&format!("k{n}"), n, at(100), MINUTE);
        }
        // Remembered again later: its earlier place in the queue ends, it does not.
        recent.remember("k3", 33, at(130), MINUTE);
        recent.remember("later", 0, at(170), MINUTE);
        assert_eq!(recent.len(), 2);
        assert_eq!(recent.get("k3", at(170)), Some(33));
    }

    #[test]
    fn an_entry_is_dropped_once_those_remembered_before_it_with_longer_windows_end() {
        let recent = RecentWrites::new();
        recent.remember("long", 1, at(100), Duration::from_secs(90));
        recent.remember("short", 2, at(101), MINUTE);
        recent.remember("k", 3, at(170), MINUTE);
        // Not answered once ended, though still held behind the longer one.
        assert_eq!(recent.get("short", at(170)), None);
        assert_eq!(recent.len(), 3);
        recent.remember("k", 3, at(190), MINUTE);
        assert_eq!(recent.len(), 1);
    }

    #[test]
    fn remember_unless_leaves_a_live_entry_it_is_told_to_keep() {
        let recent = RecentWrites::new();
        recent.remember("k", "deleted", at(100), MINUTE);
        assert!(!recent.remember_unless("k", "saved", at(110), MINUTE, |v| *v == "deleted"));
        assert_eq!(recent.get("k", at(110)), Some("deleted"));
        // Once ended, it no longer stands in the way.
        assert!(recent.remember_unless("k", "saved", at(160), MINUTE, |v| *v == "deleted"));
        assert_eq!(recent.get("k", at(160)), Some("saved"));
    }

    #[test]
    fn update_changes_a_live_entry_and_keeps_its_window() {
        let recent = RecentWrites::new();
        recent.remember("k", 1, at(100), MINUTE);
        recent.update("k", at(130), |v| *v = 2);
        assert_eq!(recent.get("k", at(159)), Some(2));
        assert_eq!(recent.get("k", at(160)), None);
        recent.update("k", at(160), |v| *v = 3);
        recent.remember("k2", 0, at(100), MINUTE);
        assert_eq!(recent.filter_live(at(100), |key, v| (key == "k").then_some(*v)), vec![2]);
    }

    #[test]
    fn a_window_past_the_clock_s_end_remembers_nothing() {
        let recent = RecentWrites::new();
        recent.remember("k", 1, at(100), Duration::MAX);
        assert_eq!(recent.get("k", at(100)), None);
    }

    #[test]
    fn debug_shows_no_value() {
        let recent = RecentWrites::new();
        recent.remember("k", "secret session", at(100), MINUTE);
        let shown = format!("{recent:?}");
        assert!(!shown.contains("secret"), "{shown}");
        assert!(shown.contains("keys: 1"), "{shown}");
    }
}
