//! Statements counted per thread, for the span of each store operation
//! ([`Operation`](crate::Operation)): a store operation runs on the
//! caller's thread from checkout to return, so the difference of two
//! readings is exact even when other threads use the pool.

use std::cell::Cell;

thread_local! {
    /// Statements this thread started, transaction control included.
    static QUERIES: Cell<u64> = const { Cell::new(0) };
    /// BEGIN / COMMIT / ROLLBACK / savepoints this thread sent.
    static CONTROL: Cell<u64> = const { Cell::new(0) };
}

/// Called by the pool's instrumentation for every statement started.
pub(crate) fn count_query() {
    QUERIES.with(|n| n.set(n.get() + 1));
}

/// Called by the pool's instrumentation for every transaction control statement.
pub(crate) fn count_control() {
    CONTROL.with(|n| n.set(n.get() + 1));
}

/// Statements this thread sent so far, transaction control not counted.
pub(crate) fn statements_so_far() -> u64 {
    QUERIES.with(Cell::get).saturating_sub(CONTROL.with(Cell::get))
}
