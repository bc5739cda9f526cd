//! [`ObservedKv`]: a key-value backend that passes every call to another
//! and tells the test what it saw, for the tests that count what a store
//! asks of its backend (one-time-code guesses compared, codes read).

use std::sync::Arc;
use std::time::Duration;

use dployr_domain::{KvBackend, KvLimits, KvPage, StoreResult};

/// Called with each key read.
type OnGet = Box<dyn Fn(&str) + Send + Sync>;
/// Called with the count a guess was given and the limit it was checked against.
type OnAttempt = Box<dyn Fn(i64, i64) + Send + Sync>;

/// Every call goes to `inner` unchanged (its own atomic steps included:
/// `replace`, `count_attempt_and_take_if`, `put_and_reset_counter`), and
/// the hooks see each read's key and each counted guess.
pub struct ObservedKv {
    inner: Arc<dyn KvBackend>,
    on_get: OnGet,
    on_attempt: OnAttempt,
}

impl ObservedKv {
    /// `inner`, seen by nothing yet.
    pub fn new(inner: Arc<dyn KvBackend>) -> Self {
        Self { inner, on_get: Box::new(|_| {}), on_attempt: Box::new(|_, _| {}) }
    }

    /// Calls `seen` with the key of every read.
    #[must_use]
    pub fn on_get(mut self, seen: impl Fn(&str) + Send + Sync + 'static) -> Self {
        self.on_get = Box::new(seen);
        self
    }

    /// Calls `seen` with the count each guess was given and its limit.
    #[must_use]
    pub fn on_attempt(mut self, seen: impl Fn(i64, i64) + Send + Sync + 'static) -> Self {
        self.on_attempt = Box::new(seen);
        self
    }
}

impl KvBackend for ObservedKv {
    fn limits(&self) -> KvLimits {
        self.inner.limits()
    }

    fn get(&self, key: &str) -> StoreResult<Option<Vec<u8>>> {
        (self.on_get)(key);
        self.inner.get(key)
    }

    fn put(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> StoreResult<()> {
        self.inner.put(key, value, ttl)
    }

    fn replace(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> StoreResult<bool> {
        self.inner.replace(key, value, ttl)
    }

    fn delete(&self, key: &str) -> StoreResult<()> {
        self.inner.delete(key)
    }

    fn list(&self, prefix: &str, limit: usize, cursor: Option<&str>) -> StoreResult<KvPage> {
        self.inner.list(prefix, limit, cursor)
    }

    fn take(&self, key: &str) -> StoreResult<Option<Vec<u8>>> {
        self.inner.take(key)
    }

    fn increment(&self, key: &str, ttl: Option<Duration>) -> StoreResult<i64> {
        self.inner.increment(key, ttl)
    }

    fn count_attempt_and_take_if(
        &self,
        attempts_key: &str,
        ttl: Option<Duration>,
        max_attempts: i64,
        key: &str,
        expected: &[u8],
    ) -> StoreResult<(i64, bool)> {
        let (count, taken) = self.inner.count_attempt_and_take_if(attempts_key, ttl, max_attempts, key, expected)?;
        (self.on_attempt)(count, max_attempts);
        Ok((count, taken))
    }

    fn put_and_reset_counter(
        &self,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
        counter_key: &str,
    ) -> StoreResult<()> {
        self.inner.put_and_reset_counter(key, value, ttl, counter_key)
    }

    fn delete_expired(&self) -> StoreResult<u64> {
        self.inner.delete_expired()
    }
}
