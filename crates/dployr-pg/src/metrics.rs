//! What an operator watches: pool statistics and per-operation latency,
//! counted here and emitted through the `metrics` facade. The library
//! installs no exporter: an application that installs a recorder
//! (Prometheus, StatsD, ...) gets these series; one that does not pays a
//! few atomic operations per call. The names are listed in
//! docs/operations.md ("Metrics"), which a test keeps complete.
//!
//! Pool statistics come from r2d2's own hooks: an event handler (a
//! connection opened or closed, a checkout and how long it waited, a
//! checkout that timed out, a checkin) and an error handler (a connection
//! that could not be made). [`PgPool::pool_stats`] reads the same counters.
//!
//! [`PgPool::pool_stats`]: crate::PgPool::pool_stats

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use diesel::r2d2::event::{AcquireEvent, CheckinEvent, CheckoutEvent, ReleaseEvent, TimeoutEvent};
use metrics::{Counter, Gauge, Histogram, Key, Label, Level, Metadata};

/// Histogram, label `op`: the duration of each store operation in seconds
/// (checkout, statements and retries; also when it failed).
pub const OPERATION_DURATION: &str = "dployr_db_operation_duration_seconds";
/// Counter, labels `op` and `server` (`primary` or `replica`): replica-safe
/// reads, by the server that answered.
pub const ROUTED_READS: &str = "dployr_db_routed_reads_total";
/// Counter, labels `replica` and `reason` (`lag`, `down`, `not_sampled`,
/// `error`, `behind_write`): a replica passed over for a replica-safe read.
pub const REPLICA_SKIPS: &str = "dployr_db_replica_skips_total";
/// Gauge, label `replica`: the replay lag measured by the last sample, in
/// seconds; NaN while its samples fail or the last one has aged (no lag is
/// known, and the facade cannot remove a series; [`REPLICA_UP`] is 0 then).
pub const REPLICA_LAG: &str = "dployr_db_replica_lag_seconds";
/// Gauge, label `replica`: 1 when the last sample succeeded, else 0; also 0
/// once a read or [`ReplicaSet::status`](crate::ReplicaSet::status) finds
/// the last sample older than two sampling periods (a sampler held by a
/// server that does not answer), until a sample comes.
pub const REPLICA_UP: &str = "dployr_db_replica_up";
/// Gauge, label `pool`: the most connections the pool opens.
pub const POOL_MAX: &str = "dployr_db_pool_max_connections";
/// Gauge, label `pool`: connections open now.
pub const POOL_CONNECTIONS: &str = "dployr_db_pool_connections";
/// Gauge, label `pool`: connections checked out now.
pub const POOL_IN_USE: &str = "dployr_db_pool_in_use_connections";
/// Gauge, label `pool`: connections open and idle now.
pub const POOL_IDLE: &str = "dployr_db_pool_idle_connections";
/// Counter, label `pool`: checkouts that got a connection.
pub const POOL_CHECKOUTS: &str = "dployr_db_pool_checkouts_total";
/// Histogram, label `pool`: how long each checkout waited, in seconds.
pub const POOL_CHECKOUT_WAIT: &str = "dployr_db_pool_checkout_wait_seconds";
/// Counter, label `pool`: checkouts that waited [`WAITED`] or more (no idle
/// connection: one had to be made, or given back by another caller).
pub const POOL_WAITS: &str = "dployr_db_pool_waits_total";
/// Counter, label `pool`: checkouts that gave up (the caller got `Unavailable`).
pub const POOL_TIMEOUTS: &str = "dployr_db_pool_checkout_timeouts_total";
/// Counter, label `pool`: connections opened.
pub const POOL_OPENED: &str = "dployr_db_pool_connections_opened_total";
/// Counter, label `pool`: connections closed (broken, expired, discarded).
pub const POOL_CLOSED: &str = "dployr_db_pool_connections_closed_total";
/// Counter, label `pool`: attempts to open a connection that failed.
pub const POOL_CONNECT_FAILURES: &str = "dployr_db_pool_connect_failures_total";

/// Every metric the data layer emits, for the document's check.
pub const ALL: &[&str] = &[
    OPERATION_DURATION,
    ROUTED_READS,
    REPLICA_SKIPS,
    REPLICA_LAG,
    REPLICA_UP,
    POOL_MAX,
    POOL_CONNECTIONS,
    POOL_IN_USE,
    POOL_IDLE,
    POOL_CHECKOUTS,
    POOL_CHECKOUT_WAIT,
    POOL_WAITS,
    POOL_TIMEOUTS,
    POOL_OPENED,
    POOL_CLOSED,
    POOL_CONNECT_FAILURES,
];

/// A checkout that took this long found no idle connection: taking an idle
/// one costs microseconds, making one or waiting for a checkin milliseconds.
pub const WAITED: Duration = Duration::from_millis(1);

/// What a pool did since it was opened, and what it holds now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolStats {
    /// The most connections it opens (`DPLOYR_DB_POOL_SIZE`).
    pub max_size: u32,
    /// Connections open now.
    pub connections: u32,
    /// Open connections not checked out now.
    pub idle: u32,
    /// Connections checked out now.
    pub in_use: u32,
    /// Checkouts that got a connection.
    pub checkouts: u64,
    /// Checkouts that waited [`WAITED`] or more.
    pub waits: u64,
    /// Checkouts that timed out.
    pub checkout_timeouts: u64,
    /// Connections opened.
    pub connections_opened: u64,
    /// Connections closed.
    pub connections_closed: u64,
    /// Connection attempts that failed.
    pub connect_failures: u64,
}

/// What the `metrics` macros give a series: this module as its target.
static METADATA: Metadata<'static> = Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

/// The series of one pool, their keys (name and `pool` label) made once:
/// the macros build a key, and allocate its labels, at every event, which
/// was a sixth of the client's instructions in a one-row read (callgrind).
/// The recorder is still asked for the series at every event, so one
/// installed after the pool opened gets them.
struct Series {
    connections: Key,
    in_use: Key,
    idle: Key,
    checkouts: Key,
    checkout_wait: Key,
    waits: Key,
    timeouts: Key,
    opened: Key,
    closed: Key,
    connect_failures: Key,
}

impl Series {
    fn of(pool: &Arc<str>) -> Self {
        let key = |name: &'static str| Key::from_parts(name, vec![Label::new("pool", Arc::clone(pool))]);
        Self {
            connections: key(POOL_CONNECTIONS),
            in_use: key(POOL_IN_USE),
            idle: key(POOL_IDLE),
            checkouts: key(POOL_CHECKOUTS),
            checkout_wait: key(POOL_CHECKOUT_WAIT),
            waits: key(POOL_WAITS),
            timeouts: key(POOL_TIMEOUTS),
            opened: key(POOL_OPENED),
            closed: key(POOL_CLOSED),
            connect_failures: key(POOL_CONNECT_FAILURES),
        }
    }
}

/// The installed recorder's counter for `key`.
fn counter(key: &Key) -> Counter {
    ::metrics::with_recorder(|recorder| recorder.register_counter(key, &METADATA))
}

/// The installed recorder's gauge for `key`.
fn gauge(key: &Key) -> Gauge {
    ::metrics::with_recorder(|recorder| recorder.register_gauge(key, &METADATA))
}

/// The installed recorder's histogram for `key`.
fn histogram(key: &Key) -> Histogram {
    ::metrics::with_recorder(|recorder| recorder.register_histogram(key, &METADATA))
}

/// The counters behind [`PoolStats`], fed by r2d2's hooks.
pub(crate) struct PoolEvents {
    /// The `pool` label: `primary`, `replica-0`, ...
    pub(crate) name: Arc<str>,
    series: Series,
    max_size: u32,
    checkouts: AtomicU64,
    checkins: AtomicU64,
    waits: AtomicU64,
    timeouts: AtomicU64,
    opened: AtomicU64,
    closed: AtomicU64,
    connect_failures: AtomicU64,
    /// Whether the last attempt to open a connection failed (none yet: false).
    pub(crate) last_connect_failed: AtomicBool,
    /// What libpq said of the last failed attempt to open a connection,
    /// unredacted (it may hold the password): cleared when one opens. Told,
    /// redacted, to every checkout that times out while it lasts: r2d2
    /// hands its own copy to the first such checkout only.
    last_connect_error: std::sync::Mutex<Option<String>>,
}

impl fmt::Debug for PoolEvents {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolEvents").field("name", &self.name).finish_non_exhaustive()
    }
}

impl PoolEvents {
    pub(crate) fn new(name: &str, max_size: u32) -> Arc<Self> {
        let name: Arc<str> = name.into();
        let events = Arc::new(Self {
            series: Series::of(&name),
            name,
            max_size,
            checkouts: AtomicU64::new(0),
            checkins: AtomicU64::new(0),
            waits: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            opened: AtomicU64::new(0),
            closed: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            last_connect_failed: AtomicBool::new(false),
            last_connect_error: std::sync::Mutex::new(None),
        });
        ::metrics::gauge!(POOL_MAX, "pool" => Arc::clone(&events.name)).set(f64::from(max_size));
        events
    }

    /// The statistics, with what is open and idle now: r2d2's `State`,
    /// plus the connections parked by their threads (idle too).
    pub(crate) fn stats(&self, state: &diesel::r2d2::State, parked: u32) -> PoolStats {
        let idle = state.idle_connections.saturating_add(parked).min(state.connections);
        PoolStats {
            max_size: self.max_size,
            connections: state.connections,
            idle,
            in_use: state.connections.saturating_sub(idle),
            checkouts: self.checkouts.load(Ordering::Relaxed),
            waits: self.waits.load(Ordering::Relaxed),
            checkout_timeouts: self.timeouts.load(Ordering::Relaxed),
            connections_opened: self.opened.load(Ordering::Relaxed),
            connections_closed: self.closed.load(Ordering::Relaxed),
            connect_failures: self.connect_failures.load(Ordering::Relaxed),
        }
    }

    /// Whether the pool's last attempt to open a connection failed: the
    /// server may open none for a while (see `crate::affinity`).
    pub(crate) fn last_connect_failed(&self) -> bool {
        self.last_connect_failed.load(Ordering::Relaxed)
    }

    /// What libpq said of the last attempt to open a connection, if it
    /// failed and none opened since; unredacted.
    pub(crate) fn last_connect_error(&self) -> Option<String> {
        self.last_connect_error.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    fn set_last_connect_error(&self, error: Option<String>) {
        *self.last_connect_error.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = error;
    }

    /// A connection handed out after waiting `waited`: by r2d2, or from
    /// the slot of a thread (`crate::affinity`).
    pub(crate) fn checked_out(&self, waited: Duration) {
        self.checkouts.fetch_add(1, Ordering::Relaxed);
        counter(&self.series.checkouts).increment(1);
        histogram(&self.series.checkout_wait).record(waited.as_secs_f64());
        if waited >= WAITED {
            self.waits.fetch_add(1, Ordering::Relaxed);
            counter(&self.series.waits).increment(1);
        }
        self.set_gauges();
    }

    /// A connection given back: to r2d2, or parked in its thread's slot.
    pub(crate) fn checked_in(&self) {
        self.checkins.fetch_add(1, Ordering::Relaxed);
        self.set_gauges();
    }

    /// The gauges, from the counters (the handlers have no access to the pool's state).
    fn set_gauges(&self) {
        let open = self.opened.load(Ordering::Relaxed).saturating_sub(self.closed.load(Ordering::Relaxed));
        let in_use = self.checkouts.load(Ordering::Relaxed).saturating_sub(self.checkins.load(Ordering::Relaxed));
        gauge(&self.series.connections).set(open as f64);
        gauge(&self.series.in_use).set(in_use as f64);
        gauge(&self.series.idle).set(open.saturating_sub(in_use) as f64);
    }
}

/// r2d2's event handler of a pool.
#[derive(Debug)]
pub(crate) struct EventHandler(pub(crate) Arc<PoolEvents>);

impl diesel::r2d2::HandleEvent for EventHandler {
    fn handle_acquire(&self, _event: AcquireEvent) {
        self.0.last_connect_failed.store(false, Ordering::Relaxed);
        self.0.set_last_connect_error(None);
        self.0.opened.fetch_add(1, Ordering::Relaxed);
        counter(&self.0.series.opened).increment(1);
        self.0.set_gauges();
    }

    fn handle_release(&self, _event: ReleaseEvent) {
        self.0.closed.fetch_add(1, Ordering::Relaxed);
        counter(&self.0.series.closed).increment(1);
        self.0.set_gauges();
    }

    fn handle_checkout(&self, event: CheckoutEvent) {
        self.0.checked_out(event.duration());
    }

    fn handle_timeout(&self, _event: TimeoutEvent) {
        // r2d2 reports it on the thread that waited: a wait the affinity
        // layer may still answer with a parked connection is not the
        // caller's timeout (see `affinity`), so it is not counted.
        if crate::affinity::waiting_for_a_new_connection_first() {
            return;
        }
        self.0.timeouts.fetch_add(1, Ordering::Relaxed);
        counter(&self.0.series.timeouts).increment(1);
    }

    fn handle_checkin(&self, _event: CheckinEvent) {
        self.0.checked_in();
    }
}

/// r2d2's error handler of a pool: counts failed connection attempts,
/// keeps the last one's text for the checkouts that time out, and logs
/// nothing (libpq's text may hold the password; the checkout error reports
/// it redacted).
#[derive(Debug)]
pub(crate) struct ErrorHandler(pub(crate) Arc<PoolEvents>);

impl<E: fmt::Display> diesel::r2d2::HandleError<E> for ErrorHandler {
    fn handle_error(&self, error: E) {
        self.0.set_last_connect_error(Some(error.to_string()));
        self.0.last_connect_failed.store(true, Ordering::Relaxed);
        self.0.connect_failures.fetch_add(1, Ordering::Relaxed);
        counter(&self.0.series.connect_failures).increment(1);
    }
}

/// Records one operation's duration (called once, when its span ends).
pub(crate) fn operation_finished(op: &'static str, duration: Duration) {
    ::metrics::histogram!(OPERATION_DURATION, "op" => op).record(duration.as_secs_f64());
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_operations_guide_lists_every_metric() {
        let guide = include_str!("../../../docs/operations.md");
        for name in super::ALL {
            assert!(guide.contains(&format!("`{name}`")), "docs/operations.md does not list {name}");
        }
    }
}
