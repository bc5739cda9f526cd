//! Connections that stay with the thread that used them last.
//!
//! r2d2 keeps its idle connections in one list and hands out the one
//! returned last. With many threads calling at once, each call then gets
//! whichever connection another thread just returned: a connection, and
//! the server process behind it, moves from thread to thread, and the
//! kernel pays for it on both sides (wake-ups across cores, cold socket
//! state). Measured on 2 cores, 16 threads reading one row in a loop:
//! 60-62k calls/s with a checkout per call, 66-72k/s with each thread
//! keeping one connection, 73-75k/s for pgbench on the same statement;
//! shuffled, each call cost the client about 2 µs and the server about
//! 1.5 µs more CPU (12.9 and 19.0 µs, against 10.7 and 17.5).
//!
//! So a connection a thread gives back is parked in that thread's slot,
//! and the thread's next checkout takes it from there; only a checkout
//! whose slot is empty goes to r2d2. It is the idea of HikariCP's
//! `ConcurrentBag` (a thread's own list first, then the shared one), with
//! the rule that makes it safe with a bounded pool: once a checkout must
//! wait for another thread's connection, nothing stays parked and parked
//! connections may be taken by it, so a parked connection never keeps a
//! caller waiting. (Before that, while the pool is below its size and the
//! server opens connections, a checkout waits a moment for a new one of
//! its own: see `NEW_CONNECTION_FIRST`.)
//!
//! A parked connection counts as idle in [`PgPool::state`] and the pool's
//! statistics. One parked for [`PARKED_AT_MOST`] (its thread stopped
//! calling) goes back to r2d2, whose idle timeout then applies; one that
//! outlived r2d2's `max_lifetime`, or that a failed or expired call marked,
//! is never parked.
//!
//! [`PgPool::state`]: crate::PgPool::state

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::time::{Duration, Instant};

use diesel::r2d2::{Pool, R2D2Connection};

use crate::deadline::{ConnInfo, PgConnectionManager};
use crate::metrics::PoolEvents;
use crate::pool::PgPooledConnection;

/// A connection parked this long without use goes back to r2d2.
pub(crate) const PARKED_AT_MOST: Duration = Duration::from_secs(10);

/// How long, at most (and at most half its wait), a checkout that found no
/// connection free waits for a new one before it asks the other threads
/// for theirs, while the pool is below its size and its last attempt to
/// connect succeeded. A connection takes 1-5 ms on a local network and tens
/// of ms with TLS far away, and the pool opens them one at a time, so a
/// burst of 16 cold threads may wait 16 of them. A server that refused the
/// last attempt (at `max_connections`, refusing the database) costs a call
/// no such wait: it asks the other threads at once.
const NEW_CONNECTION_FIRST: Duration = Duration::from_millis(500);

/// How often the sweeper looks for connections parked too long.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// A connection out of use at least this long is checked, before it is
/// handed out, for a server that ended its session meanwhile (see
/// [`Affinity::check_out`]). A thread calling in a loop takes its
/// connection back sooner and pays nothing.
const CHECK_AFTER_UNUSED: Duration = Duration::from_millis(1);

thread_local! {
    /// Set while this thread waits the first part of a checkout for a new
    /// connection: a timeout then is not the caller's yet (a parked
    /// connection may still serve it), so the pool's timeout count skips it.
    static FIRST_WAIT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether this thread is in the first part of a checkout's wait (see
/// [`FIRST_WAIT`]).
pub(crate) fn waiting_for_a_new_connection_first() -> bool {
    FIRST_WAIT.with(std::cell::Cell::get)
}

/// The parked connections of one pool, a slot per thread.
pub(crate) struct Affinity {
    /// As many as the pool has connections; a thread's slot is its
    /// [`thread_index`] modulo their number.
    slots: Box<[Slot]>,
    /// Checkouts waiting for another thread's connection (their slot empty,
    /// r2d2 with no idle one, no new one for them): while there are any,
    /// connections go back to r2d2.
    looking: AtomicUsize,
    parked: AtomicU32,
    max_size: u32,
    events: Arc<PoolEvents>,
    /// When a call last found its server read-only and marked the pool's
    /// connections made before then to be replaced ([`saw_read_only`](Self::saw_read_only)):
    /// µs after the pool's clock origin, plus one; 0 never.
    read_only_seen: AtomicU64,
}

/// How often, at most, a read-only server makes the pool replace its
/// connections: after a switchover the first refused write replaces them
/// all (the new ones follow the URL to the server that writes); on a server
/// that stays read-only, writes that fail do not each open a connection, at
/// most the pool's size is opened again per interval.
const READ_ONLY_REPLACE_EVERY: Duration = Duration::from_secs(1);

/// A thread's slot, on a cache line of its own: threads on different
/// cores would otherwise write to one line at every call.
#[repr(align(128))]
struct Slot(Mutex<Option<Parked>>);

/// A connection in a slot, since when.
struct Parked {
    conn: PgPooledConnection,
    since: Instant,
}

impl Affinity {
    /// The slots of a pool of `max_size` connections, swept by the process's sweeper.
    /// What libpq said of the pool's last attempt to open a connection, if
    /// it failed and none opened since; unredacted.
    pub(crate) fn last_connect_error(&self) -> Option<String> {
        self.events.last_connect_error()
    }

    pub(crate) fn new(max_size: u32, events: Arc<PoolEvents>) -> Arc<Self> {
        // The coarse clock's origin is fixed no later than the pool, so that
        // every connection and every mark of the pool counts after it.
        crate::deadline::micros_since_origin(Instant::now());
        let slots = (0..max_size.max(1)).map(|_| Slot(Mutex::new(None))).collect();
        let affinity = Arc::new(Self {
            slots,
            looking: AtomicUsize::new(0),
            parked: AtomicU32::new(0),
            max_size,
            events,
            read_only_seen: AtomicU64::new(0),
        });
        Sweeper::get().register(&affinity);
        affinity
    }

    /// A call found its server read-only (25006): a primary that became a
    /// standby, or the old primary of a switchover left up read-only. Every
    /// connection made before now is replaced at its next checkout, at most
    /// once per [`READ_ONLY_REPLACE_EVERY`].
    pub(crate) fn saw_read_only(&self, now: Instant) {
        let last = self.read_only_seen.load(Ordering::Relaxed);
        let now_micros = crate::deadline::micros_since_origin(now) + 1;
        let due = last == 0 || now_micros.saturating_sub(last) >= READ_ONLY_REPLACE_EVERY.as_micros() as u64;
        if due {
            // One caller of those racing here moves the mark; the others' is as good.
            let _ = self.read_only_seen.compare_exchange(last, now_micros, Ordering::Relaxed, Ordering::Relaxed);
        }
    }

    /// Connections parked now.
    pub(crate) fn parked(&self) -> u32 {
        self.parked.load(Ordering::Relaxed)
    }

    /// A live connection for this thread, and what the pool knows of it:
    /// one from [`take`](Self::take), within `wait`.
    ///
    /// One that rested for [`CHECK_AFTER_UNUSED`] or more is first checked
    /// for a session the server ended meanwhile (a restart, a terminated
    /// backend, a pooler that went away: the server's last message or the
    /// end of the stream waits in its socket), with a peek at the socket,
    /// no round trip. Such a connection is discarded and another taken, so
    /// the restart of a server costs no call that starts after it (before,
    /// every connection the restart ended failed one call). After one more
    /// discard than the pool has connections (the server closing every
    /// new one at once), the next is handed out unchecked, and the call
    /// learns what the server does.
    pub(crate) fn check_out(
        &self,
        pool: &Pool<PgConnectionManager>,
        wait: Duration,
    ) -> Result<(PgPooledConnection, Arc<ConnInfo>), diesel::r2d2::PoolError> {
        let deadline = Instant::now() + wait;
        let mut discarded = 0;
        loop {
            let mut conn = self.take(pool, deadline.saturating_duration_since(Instant::now()))?;
            let info = crate::pool::conn_info(&mut conn).unwrap_or_default();
            let now = Instant::now();
            let on_a_read_only_server = info.made_before(self.read_only_seen.load(Ordering::Relaxed));
            if discarded > self.max_size
                || (!on_a_read_only_server && (!info.unused_for(CHECK_AFTER_UNUSED, now) || !info.closed_by_server()))
            {
                return Ok((conn, info));
            }
            // Returned to r2d2 marked, which drops it (and opens another
            // when its minimum of idle connections asks for one).
            info.discard.store(true, Ordering::Release);
            drop(conn);
            discarded += 1;
        }
    }

    /// A connection for this thread: the one it parked, else an idle one of
    /// r2d2's, else, while the pool is below its size and its last attempt
    /// to connect succeeded, one r2d2 hands out within
    /// [`NEW_CONNECTION_FIRST`] (at most half of `wait`; a new one, usually),
    /// else one another thread parked, else one r2d2 hands out within the
    /// rest of `wait`.
    ///
    /// Only the last two ask the other threads to give their connections
    /// up (`looking`). Asking at every checkout that found its slot empty
    /// (the rule until 2026-12) made the threads returning a connection
    /// meanwhile send it to r2d2, so their next checkouts found their slots
    /// empty too, and so on for good: on 2 cores, 16 threads on a pool of 16
    /// reading one row in a loop, 7-23 % (once 77 %) of the checkouts
    /// missed their own slot for the whole run, against 18 of 54 000 (each
    /// thread's first) with this rule.
    fn take(
        &self,
        pool: &Pool<PgConnectionManager>,
        wait: Duration,
    ) -> Result<PgPooledConnection, diesel::r2d2::PoolError> {
        let own = thread_index().map(|index| index % self.slots.len());
        if let Some(conn) = own.and_then(|slot| self.unpark(slot)) {
            return Ok(conn);
        }
        if let Some(conn) = pool.try_get() {
            // r2d2 reports no event for `try_get`.
            self.events.checked_out(Duration::ZERO);
            return Ok(conn);
        }
        let started = Instant::now();
        if pool.state().connections < self.max_size && !self.events.last_connect_failed() {
            // A new connection, so that the threads that parked theirs keep
            // them. But a server slow to open one must not keep this call
            // waiting long while connections sit parked or come back: after
            // a short wait, the others are asked for theirs (at once when
            // the server refused the last attempt).
            FIRST_WAIT.with(|first| first.set(true));
            let first = pool.get_timeout((wait / 2).min(NEW_CONNECTION_FIRST));
            FIRST_WAIT.with(|first| first.set(false));
            if let Ok(conn) = first {
                return Ok(conn);
            }
        }
        // From here on nothing is parked (see `give_back`), so what the
        // scan below misses goes back to r2d2, where `get_timeout` waits.
        self.looking.fetch_add(1, Ordering::SeqCst);
        let _looking = Looking(&self.looking);
        let start = own.map_or(0, |slot| slot + 1);
        let stolen = (0..self.slots.len()).find_map(|k| self.unpark((start + k) % self.slots.len()));
        match stolen {
            Some(conn) => Ok(conn),
            None => pool.get_timeout(wait.saturating_sub(started.elapsed()).max(Duration::from_millis(1))),
        }
    }

    /// Takes `conn` back from a call that ended: parked in this thread's
    /// slot when it is sound, no checkout waits for another thread's
    /// connection (`looking`) and the slot is free; otherwise returned to r2d2.
    pub(crate) fn give_back(&self, mut conn: PgPooledConnection, info: &ConnInfo, max_lifetime: Option<Duration>) {
        info.given_back(Instant::now());
        let Some(index) = thread_index() else { return };
        if self.looking.load(Ordering::SeqCst) > 0 || !parkable(&mut conn, info, max_lifetime) {
            return;
        }
        let slot = index % self.slots.len();
        if !self.park(slot, conn) {
            return;
        }
        // A checkout that began looking while this one parked may have
        // scanned this slot before: it waits in r2d2, so the connection goes there.
        if self.looking.load(Ordering::SeqCst) > 0 {
            drop(self.unpark(slot));
        }
    }

    /// Parks `conn` in `slot` as a checkin; false (and `conn` returned to
    /// r2d2) when the slot is taken, by another thread of the same slot.
    fn park(&self, slot: usize, conn: PgPooledConnection) -> bool {
        {
            let mut parked = lock(&self.slots[slot].0);
            if parked.is_some() {
                return false;
            }
            *parked = Some(Parked { conn, since: Instant::now() });
            // Counted under the slot's lock, so an unpark right after cannot
            // count down first (the count would wrap below zero for a moment).
            self.parked.fetch_add(1, Ordering::Relaxed);
        }
        self.events.checked_in();
        true
    }

    /// The connection parked in `slot`, if any, as a checkout.
    fn unpark(&self, slot: usize) -> Option<PgPooledConnection> {
        self.unpark_if(slot, |_| true)
    }

    /// The connection parked in `slot` if `wanted` says so, as a checkout.
    fn unpark_if(&self, slot: usize, wanted: impl FnOnce(&Parked) -> bool) -> Option<PgPooledConnection> {
        let parked = {
            let mut slot = lock(&self.slots[slot].0);
            let parked = if slot.as_ref().is_some_and(wanted) { slot.take() } else { None };
            if parked.is_some() {
                self.parked.fetch_sub(1, Ordering::Relaxed);
            }
            parked
        }?;
        self.events.checked_out(Duration::ZERO);
        Some(parked.conn)
    }

    /// Returns to r2d2 every connection parked for [`PARKED_AT_MOST`] or
    /// longer at `now`; how many.
    pub(crate) fn sweep(&self, now: Instant) -> usize {
        (0..self.slots.len())
            .filter_map(|slot| {
                self.unpark_if(slot, |parked| now.saturating_duration_since(parked.since) >= PARKED_AT_MOST)
            })
            .count()
    }
}

/// Whether a connection (`info`, what the call already read of it) may be
/// kept for its thread: what r2d2 checks at a checkin (diesel's broken
/// test, and the call's own mark) and its lifetime. One the pool did not
/// set up (no known age) is not kept.
fn parkable(conn: &mut PgPooledConnection, info: &ConnInfo, max_lifetime: Option<Duration>) -> bool {
    !R2D2Connection::is_broken(&mut **conn)
        && !info.discarded()
        && info.age().is_some_and(|age| max_lifetime.is_none_or(|most| age < most))
}

/// Decrements the count of looking checkouts when one ends, however it ends.
struct Looking<'a>(&'a AtomicUsize);

impl Drop for Looking<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A slot holds an Option; a panic cannot leave it half-written.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Small numbers for the live threads: a thread takes the smallest free
/// one and frees it when it ends, so threads alive together never share a
/// number, and slots follow threads without hashing collisions.
#[derive(Debug, Default)]
struct Indexes {
    /// Freed by ended threads.
    free: BinaryHeap<Reverse<usize>>,
    /// The next never used.
    next: usize,
}

impl Indexes {
    fn claim(&mut self) -> usize {
        self.free.pop().map_or_else(
            || {
                self.next += 1;
                self.next - 1
            },
            |Reverse(index)| index,
        )
    }

    fn free(&mut self, index: usize) {
        self.free.push(Reverse(index));
    }
}

static INDEXES: Mutex<Indexes> = Mutex::new(Indexes { free: BinaryHeap::new(), next: 0 });

/// A thread's number, freed when the thread ends.
struct ThreadIndex(usize);

impl Drop for ThreadIndex {
    fn drop(&mut self) {
        lock(&INDEXES).free(self.0);
    }
}

thread_local! {
    static THREAD_INDEX: ThreadIndex = ThreadIndex(lock(&INDEXES).claim());
}

/// This thread's number; `None` while the thread is ending (its
/// thread-locals are gone), when checkouts go to r2d2 alone.
fn thread_index() -> Option<usize> {
    THREAD_INDEX.try_with(|index| index.0).ok()
}

/// The process's one sweeper thread, started with the first pool.
struct Sweeper {
    pools: Mutex<Vec<Weak<Affinity>>>,
}

impl Sweeper {
    fn get() -> &'static Self {
        static SWEEPER: OnceLock<&'static Sweeper> = OnceLock::new();
        SWEEPER.get_or_init(|| {
            let sweeper: &'static Sweeper = Box::leak(Box::new(Sweeper { pools: Mutex::new(Vec::new()) }));
            let started = std::thread::Builder::new().name("dployr-pg-sweeper".into()).spawn(|| sweeper.run());
            if let Err(error) = started {
                // Parked connections then stay with their threads until taken.
                tracing::error!("dployr.store: cannot start the thread that returns parked connections: {error}");
            }
            sweeper
        })
    }

    fn register(&self, affinity: &Arc<Affinity>) {
        lock(&self.pools).push(Arc::downgrade(affinity));
    }

    fn run(&self) {
        loop {
            std::thread::sleep(SWEEP_EVERY);
            let live: Vec<Arc<Affinity>> = {
                let mut pools = lock(&self.pools);
                pools.retain(|pool| pool.strong_count() > 0);
                pools.iter().filter_map(Weak::upgrade).collect()
            };
            let now = Instant::now();
            for affinity in live {
                affinity.sweep(now);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::conn_info;

    /// A server that stays read-only makes the pool replace its connections
    /// at most once per interval, not once per refused write.
    #[test]
    fn a_read_only_server_moves_the_replacement_mark_at_most_once_per_interval() {
        let affinity = Affinity::new(4, PoolEvents::new("test.read_only", 4));
        let mark = || affinity.read_only_seen.load(Ordering::Relaxed);
        assert_eq!(mark(), 0);
        let first = Instant::now();
        affinity.saw_read_only(first);
        let marked = mark();
        assert_ne!(marked, 0);
        affinity.saw_read_only(first + READ_ONLY_REPLACE_EVERY / 2);
        assert_eq!(mark(), marked, "moved again within the interval");
        affinity.saw_read_only(first + READ_ONLY_REPLACE_EVERY);
        assert!(mark() > marked, "not moved once the interval passed");
    }

    #[test]
    fn threads_alive_together_have_different_indexes() {
        let here = thread_index().unwrap();
        let barrier = Arc::new(std::sync::Barrier::new(8));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let barrier = Arc::clone(&barrier);
                std::thread::spawn(move || {
                    let index = thread_index().unwrap();
                    // All eight alive at once while they read their index.
                    barrier.wait();
                    index
                })
            })
            .collect();
        let mut seen: Vec<usize> = threads.into_iter().map(|thread| thread.join().unwrap()).collect();
        seen.push(here);
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 9, "nine threads alive together, nine indexes: {seen:?}");
    }

    /// A pool of `max_size` with two connections open: one held by this
    /// thread, one parked in the next thread's slot (with two, the slot
    /// that is not this thread's).
    fn pool_with_a_connection_parked_in_another_slot(
        db: &dployr_testkit::TestDatabase,
        max_size: u32,
    ) -> (crate::PgPool, PgPooledConnection) {
        let config = crate::PoolConfig {
            max_size,
            connection_timeout: Duration::from_millis(300),
            ..crate::PoolConfig::default()
        };
        let pool = crate::PgPool::connect(db.url(), config).unwrap();
        let held = pool.get().unwrap();
        let other = (thread_index().unwrap() + 1) % max_size as usize;
        let (kept, _) = pool.affinity.check_out(&pool.inner, Duration::from_millis(300)).unwrap();
        assert!(pool.affinity.park(other, kept));
        assert_eq!(pool.state(), (2, 1), "the parked connection idle");
        (pool, held)
    }

    #[test]
    fn a_checkout_with_nothing_else_free_takes_a_connection_parked_for_another_thread() {
        let db = dployr_testkit::database();
        let (pool, _held) = pool_with_a_connection_parked_in_another_slot(&db, 2);
        // This thread's slot is empty, r2d2 has no idle one, and the pool is
        // at its size: without taking the other slot's, this times out.
        let taken = pool.affinity.check_out(&pool.inner, Duration::from_millis(300));
        assert!(taken.is_ok(), "{:?}", taken.err());
        assert_eq!((pool.affinity.parked(), pool.state()), (0, (2, 0)));
    }

    #[test]
    fn below_its_size_a_checkout_opens_a_connection_and_leaves_another_threads_parked_one() {
        let db = dployr_testkit::database();
        let (pool, _held) = pool_with_a_connection_parked_in_another_slot(&db, 3);
        // Time enough for a new connection (the first wait is at most 500 ms of it).
        let taken = pool.affinity.check_out(&pool.inner, Duration::from_secs(5));
        assert!(taken.is_ok(), "{:?}", taken.err());
        assert_eq!((pool.affinity.parked(), pool.state().0), (1, 3), "a new connection; the parked one stays");
    }

    #[test]
    fn after_a_failed_attempt_to_connect_a_checkout_takes_a_parked_connection_without_waiting_for_a_new_one() {
        let db = dployr_testkit::database();
        let (pool, _held) = pool_with_a_connection_parked_in_another_slot(&db, 3);
        // As r2d2's error handler leaves it after a refused connection.
        pool.affinity.events.last_connect_failed.store(true, Ordering::Relaxed);
        let taken = pool.affinity.check_out(&pool.inner, Duration::from_secs(5));
        assert!(taken.is_ok(), "{:?}", taken.err());
        // Had it waited for a new connection (the server opens them), the
        // parked one would still be parked.
        assert_eq!(pool.affinity.parked(), 0, "the parked connection served the checkout");
    }

    #[test]
    fn a_connection_parked_too_long_goes_back_to_the_pool() {
        let db = dployr_testkit::database();
        let (pool, _held) = pool_with_a_connection_parked_in_another_slot(&db, 2);
        assert_eq!(pool.affinity.sweep(Instant::now()), 0, "parked a moment ago");
        assert_eq!(pool.affinity.sweep(Instant::now() + PARKED_AT_MOST), 1);
        assert_eq!(pool.affinity.parked(), 0);
        assert_eq!(pool.state(), (2, 1), "idle in r2d2 now, where its idle timeout applies");
        assert!(pool.inner.try_get().is_some(), "r2d2 hands it out");
    }

    #[test]
    fn a_connection_a_call_marked_or_left_in_a_transaction_is_not_parked() {
        let db = dployr_testkit::database();
        let pool = crate::PgPool::connect(db.url(), crate::PoolConfig::default()).unwrap();
        let mut conn = pool.get().unwrap();
        let info = conn_info(&mut conn).unwrap();
        info.discard.store(true, Ordering::Release);
        pool.affinity.give_back(conn, &info, None);
        assert_eq!((pool.affinity.parked(), pool.state()), (0, (0, 0)), "discarded by r2d2");

        let mut conn = pool.get().unwrap();
        // Begun through diesel, which tracks it (a `BEGIN` sent as text it would not see).
        <diesel::connection::AnsiTransactionManager as diesel::connection::TransactionManager<_>>::begin_transaction(
            &mut *conn,
        )
        .unwrap();
        let info = conn_info(&mut conn).unwrap();
        pool.affinity.give_back(conn, &info, None);
        assert_eq!((pool.affinity.parked(), pool.state()), (0, (0, 0)), "discarded by r2d2");

        let mut conn = pool.get().unwrap();
        let info = conn_info(&mut conn).unwrap();
        pool.affinity.give_back(conn, &info, Some(Duration::ZERO));
        assert_eq!((pool.affinity.parked(), pool.state().0), (0, 1), "past its lifetime: to r2d2, not parked");

        let mut conn = pool.get().unwrap();
        let info = conn_info(&mut conn).unwrap();
        pool.affinity.give_back(conn, &info, None);
        assert_eq!((pool.affinity.parked(), pool.state()), (1, (1, 1)), "a sound one is parked");
    }

    #[test]
    fn the_smallest_freed_index_is_claimed_first() {
        let mut indexes = Indexes::default();
        let claimed: Vec<usize> = (0..4).map(|_| indexes.claim()).collect();
        assert_eq!(claimed, [0, 1, 2, 3]);
        indexes.free(2);
        indexes.free(1);
        assert_eq!((indexes.claim(), indexes.claim(), indexes.claim()), (1, 2, 4));
    }
}
