//! One `tracing` span per store operation, named for it, with the number of
//! statements it sent and how long it took. The statements are counted per
//! thread (a store operation runs on the caller's thread from checkout to
//! return), so the figure is exact even when other threads use the pool.
//! Spans carry the operation's name only: never an argument, so never a
//! secret.

use std::cell::Cell;
use std::time::Instant;

use tracing::field::Empty;
use tracing::span::EnteredSpan;

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

fn statements_so_far() -> u64 {
    QUERIES.with(Cell::get).saturating_sub(CONTROL.with(Cell::get))
}

/// The span of one running operation (from [`PgPool::operation`]); it
/// records the statements sent on this thread and the time taken when
/// dropped.
///
/// [`PgPool::operation`]: crate::PgPool::operation
#[derive(Debug)]
#[must_use = "the span measures until it is dropped"]
pub struct Operation {
    span: EnteredSpan,
    name: &'static str,
    started: Instant,
    statements_before: u64,
}

/// Enters the span of operation `name` (e.g. `"clusters.get"`).
pub(crate) fn operation(name: &'static str) -> Operation {
    let span = tracing::debug_span!("dployr.store", op = name, statements = Empty, duration_us = Empty).entered();
    Operation { span, name, started: Instant::now(), statements_before: statements_so_far() }
}

impl Drop for Operation {
    fn drop(&mut self) {
        let statements = statements_so_far() - self.statements_before;
        let elapsed = self.started.elapsed();
        crate::metrics::operation_finished(self.name, elapsed);
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.span.record("statements", statements);
        self.span.record("duration_us", micros);
    }
}
