//! Where the memory backend reads the time from, so tests advance time by
//! hand instead of sleeping until a TTL passes.

use std::fmt;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A source of the current time.
pub trait Clock: Send + Sync + fmt::Debug {
    /// Now, on the wall clock: what expiry dates are compared with.
    fn now(&self) -> SystemTime;

    /// Now on a clock that never steps, as time since a point of this
    /// clock's choosing: what spans measured in this process (how long a
    /// write is remembered) are counted on, so that a step of the wall
    /// clock (an NTP correction, a virtual machine resumed) neither ends
    /// them early nor stretches them. By default the wall clock's time
    /// since 1970, so that a test clock moved by hand moves both;
    /// [`SystemClock`] answers from [`Instant`].
    fn monotonic(&self) -> Duration {
        self.now().duration_since(UNIX_EPOCH).unwrap_or_default()
    }
}

/// A shared clock is a clock: a fixture hands out `Arc<dyn Clock>`.
impl<C: Clock + ?Sized> Clock for Arc<C> {
    fn now(&self) -> SystemTime {
        (**self).now()
    }

    fn monotonic(&self) -> Duration {
        (**self).monotonic()
    }
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }

    fn monotonic(&self) -> Duration {
        static START: OnceLock<Instant> = OnceLock::new();
        START.get_or_init(Instant::now).elapsed()
    }
}

/// A clock that only moves when told to; clones share the time.
///
/// ```
/// use std::time::Duration;
/// use dployr_kv::{Clock as _, ManualClock};
///
/// let clock = ManualClock::new();
/// let before = clock.now();
/// clock.advance(Duration::from_millis(1500));
/// assert_eq!(clock.now().duration_since(before).ok(), Some(Duration::from_millis(1500)));
/// ```
#[derive(Debug, Clone)]
pub struct ManualClock {
    now: Arc<Mutex<SystemTime>>,
}

impl ManualClock {
    /// A clock standing at the current system time.
    pub fn new() -> Self {
        Self { now: Arc::new(Mutex::new(SystemTime::now())) }
    }

    /// Moves the clock forward by `by`; past the latest time the system
    /// can represent (`Duration::MAX` to expire everything), it stops there.
    pub fn advance(&self, by: Duration) {
        let mut now = self.now.lock().unwrap_or_else(PoisonError::into_inner);
        *now = latest_after(*now, by);
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.now.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// `from + by`, or the latest time the system represents if that is later.
fn latest_after(from: SystemTime, by: Duration) -> SystemTime {
    if let Some(later) = from.checked_add(by) {
        return later;
    }
    // Halve the step until it fits: at most 64 halvings of a `Duration`.
    let (mut at, mut step) = (from, by);
    while !step.is_zero() {
        match at.checked_add(step) {
            Some(later) => at = later,
            None => step /= 2,
        }
    }
    at
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, SystemTime};

    use dployr_domain::KvBackend as _;

    use super::{Clock, ManualClock, SystemClock};
    use crate::MemoryKv;

    #[test]
    fn a_manual_clock_moves_its_monotonic_time_with_its_wall_time_and_a_shared_one_moves_both() {
        let clock = ManualClock::new();
        let shared: Arc<dyn Clock> = Arc::new(clock.clone());
        let (wall, monotonic) = (shared.now(), shared.monotonic());
        assert_eq!(monotonic, wall.duration_since(SystemTime::UNIX_EPOCH).unwrap());
        clock.advance(Duration::from_millis(1500));
        assert_eq!(shared.now().duration_since(wall).unwrap(), Duration::from_millis(1500));
        assert_eq!(shared.monotonic() - monotonic, Duration::from_millis(1500));
    }

    #[test]
    fn the_system_clock_reads_the_time_now_and_its_monotonic_time_moves_forward() {
        let before = SystemTime::now();
        let (wall, monotonic) = (SystemClock.now(), SystemClock.monotonic());
        std::thread::sleep(Duration::from_millis(5));
        assert!(wall >= before && SystemTime::now() >= wall, "{wall:?} is not the time now");
        assert!(SystemClock.monotonic() >= monotonic + Duration::from_millis(5));
    }

    #[test]
    fn a_manual_clock_moved_by_any_duration_stops_at_the_latest_time_and_everything_has_expired() {
        let clock = ManualClock::new();
        let kv = MemoryKv::with_clock(clock.clone());
        kv.put("short", b"v", Some(Duration::from_secs(60))).unwrap();
        kv.put("long", b"v", Some(Duration::from_secs(100 * 365 * 24 * 3600))).unwrap();
        let before = clock.now();
        clock.advance(Duration::MAX);
        assert!(clock.now() > before);
        clock.advance(Duration::MAX);
        assert_eq!(kv.get("short").unwrap(), None);
        assert_eq!(kv.get("long").unwrap(), None);
    }
}
