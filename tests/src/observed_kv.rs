//! [`ObservedKv`]: a key-value backend that passes every call to another
//! and tells the test what it saw, for the tests that count what a store
//! asks of its backend (one-time-code guesses compared, codes read); and
//! that lets a test run a step of another caller right after a read or a
//! take, or fail a write or a delete, to make a race or a fault happen at one exact
//! point.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use dployr_domain::{KvBackend, KvLimits, KvPage, StoreError, StoreResult};

/// Called with each key read.
type OnGet = Box<dyn Fn(&str) + Send + Sync>;
/// Called with the count a guess was given and the limit it was checked against.
type OnAttempt = Box<dyn Fn(i64, i64) + Send + Sync>;
/// Called with a key after it was read or taken.
type AfterRead = Box<dyn Fn(&str) + Send + Sync>;
/// Called with a key before it is written: the error to fail the write
/// with, before anything is written, or `None` to write it.
type FailWrite = Box<dyn Fn(&str) -> Option<StoreError> + Send + Sync>;

/// Every call goes to `inner` unchanged (its own atomic steps included:
/// `replace`, `count_attempt_and_take_if`, `put_and_reset_counter`), and
/// the hooks see each read's key and each counted guess.
pub struct ObservedKv {
    inner: Arc<dyn KvBackend>,
    on_get: OnGet,
    on_attempt: OnAttempt,
    after_get: AfterRead,
    after_take: AfterRead,
    fail_write: FailWrite,
    fail_delete: FailWrite,
}

impl ObservedKv {
    /// `inner`, seen by nothing yet.
    pub fn new(inner: Arc<dyn KvBackend>) -> Self {
        Self {
            inner,
            on_get: Box::new(|_| {}),
            on_attempt: Box::new(|_, _| {}),
            after_get: Box::new(|_| {}),
            after_take: Box::new(|_| {}),
            fail_write: Box::new(|_| None),
            fail_delete: Box::new(|_| None),
        }
    }

    /// Calls `step` with the key of every read, once the read is done (its
    /// answer not returned yet).
    #[must_use]
    pub fn after_get(mut self, step: impl Fn(&str) + Send + Sync + 'static) -> Self {
        self.after_get = Box::new(step);
        self
    }

    /// Calls `step` with the key of every take, once the take is done.
    #[must_use]
    pub fn after_take(mut self, step: impl Fn(&str) + Send + Sync + 'static) -> Self {
        self.after_take = Box::new(step);
        self
    }

    /// Asks `fail` before every `put` and `replace`: an error it gives fails
    /// the write, nothing written.
    #[must_use]
    pub fn failing_writes(mut self, fail: impl Fn(&str) -> Option<StoreError> + Send + Sync + 'static) -> Self {
        self.fail_write = Box::new(fail);
        self
    }

    /// Asks `fail` before every `delete`: an error it gives fails the
    /// delete, nothing deleted.
    #[must_use]
    pub fn failing_deletes(mut self, fail: impl Fn(&str) -> Option<StoreError> + Send + Sync + 'static) -> Self {
        self.fail_delete = Box::new(fail);
        self
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
        let value = self.inner.get(key);
        (self.after_get)(key);
        value
    }

    fn put(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> StoreResult<()> {
        if let Some(error) = (self.fail_write)(key) {
            return Err(error);
        }
        self.inner.put(key, value, ttl)
    }

    fn replace(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> StoreResult<bool> {
        if let Some(error) = (self.fail_write)(key) {
            return Err(error);
        }
        self.inner.replace(key, value, ttl)
    }

    fn delete(&self, key: &str) -> StoreResult<()> {
        if let Some(error) = (self.fail_delete)(key) {
            return Err(error);
        }
        self.inner.delete(key)
    }

    fn list(&self, prefix: &str, limit: usize, cursor: Option<&str>) -> StoreResult<KvPage> {
        self.inner.list(prefix, limit, cursor)
    }

    fn take(&self, key: &str) -> StoreResult<Option<Vec<u8>>> {
        let value = self.inner.take(key);
        (self.after_take)(key);
        value
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

/// A step of another caller, run once at the first key with its prefix:
/// give [`OnceStep::runner`] to [`ObservedKv::after_get`] or
/// [`ObservedKv::after_take`], then [`OnceStep::set`] the step.
#[derive(Clone, Default)]
pub struct OnceStep {
    slot: Arc<Mutex<Option<(&'static str, Step)>>>,
}

/// What a [`OnceStep`] runs.
type Step = Box<dyn FnOnce() + Send>;

impl OnceStep {
    /// Runs `step` at the next key that starts with `prefix`, once.
    pub fn set(&self, prefix: &'static str, step: impl FnOnce() + Send + 'static) {
        *self.slot.lock().unwrap_or_else(PoisonError::into_inner) = Some((prefix, Box::new(step)));
    }

    /// Whether the step ran (none is waiting).
    pub fn ran(&self) -> bool {
        self.slot.lock().unwrap_or_else(PoisonError::into_inner).is_none()
    }

    /// The hook that runs the step when its key comes.
    pub fn runner(&self) -> impl Fn(&str) + Send + Sync + 'static {
        let slot = Arc::clone(&self.slot);
        move |key| {
            let step = {
                let mut slot = slot.lock().unwrap_or_else(PoisonError::into_inner);
                if slot.as_ref().is_some_and(|(prefix, _)| key.starts_with(prefix)) { slot.take() } else { None }
            };
            if let Some((_, step)) = step {
                step();
            }
        }
    }
}
