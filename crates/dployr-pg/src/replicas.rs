//! Read replicas: PostgreSQL streaming replicas of the primary, each with a
//! pool of its own, that answer the reads [`Read`] classifies as
//! replica-safe while their replay lag is within a bound.
//!
//! **How lag is measured.** A sampler thread per replica asks, at most once
//! per [`ReplicaConfig::sample_every`] (default 1 s, never per query), the
//! primary for `pg_current_wal_flush_lsn()` and then the replica for
//! `pg_last_wal_replay_lsn()` and `clock_timestamp() -
//! pg_last_xact_replay_timestamp()`. Reads only look at the atomics the
//! sampler left, so the check costs a few loads per read.
//!
//! Why LSNs first, then time: `now() - pg_last_xact_replay_timestamp()` alone
//! grows without bound on an idle primary (no new commit to replay), and
//! would take a caught-up replica out of rotation at night. So a replica
//! whose replay position has reached the primary's flushed position (what
//! the primary can have sent) has lag zero (the sample's round trip),
//! whatever the time since the last commit. A replica found behind that
//! position is asked again every 2 ms for up to half a sampling period
//! (500 ms by default): a replica is usually a moment behind the primary's
//! newest WAL, and once it has replayed that far its lag is the time since
//! the primary was there. (Without that, WAL that holds no commit, such as
//! the standby snapshots a primary logs every 15 s, took a replica sampled
//! in that moment out of rotation for a sampling period.) Only a replica
//! still behind after that gets a time, the smaller of two
//! upper bounds of how stale it is: the time since the last commit it
//! replayed (it reflects the primary as of that commit), and the time since
//! the primary was last seen at a position the replica has replayed (kept in
//! a short history of the sampler's primary positions). Under steady writes
//! the first is milliseconds; after an idle spell the second is at most a
//! sampling period. The first compares the replica's clock with the
//! primary's commit timestamps: clock skew between the hosts adds to it.
//!
//! **Which servers count.** A replica must be in recovery
//! (`pg_is_in_recovery()`), reached under the primary's database name, and,
//! where the role may call `pg_control_system()`, share the primary's
//! system identifier: replay positions are a whole server's, so a URL
//! naming another database of the replica's server (or a standby of
//! another primary) would otherwise pass for caught up and answer with
//! another database's rows. Each connection of the sampler checks this
//! once; a server that fails it stays out of rotation, with the reason
//! logged at `warn` (once per new reason) and shown by
//! [`ReplicaStatus::failure`].
//!
//! **What the bound means.** A read goes to a replica whose last sample,
//! taken at most two sampling periods ago, measured a lag within
//! [`ReplicaConfig::max_lag`]. Replication can stall right after a sample, so
//! a replica read is at most `max_lag + 2 × sample_every` stale in the worst
//! case (3 s with the defaults), and usually milliseconds. A replica that
//! failed its sample, whose sampler is stuck, or whose read (or
//! read-your-writes wait) failed for a reason of its own (`Unavailable`,
//! refused credentials, an error of the server such as a table it has not
//! replayed yet), is skipped until a later sample succeeds: the read goes
//! to the next replica, then to the primary, and the caller sees no error.
//! The replica runs of one read share one call deadline, counted from the
//! read's start (a second replica gets what the first left, not a bound of
//! its own), and the primary's run has a deadline of its own, so a read
//! that frozen replicas held takes up to two call bounds
//! ([`PgPool::call_bound`]) however many replicas there are, and is
//! answered.
//!
//! **Read your writes.** After a write, [`PgPool::wal_position`] gives the
//! primary's WAL insert position (which is past the write's commit record);
//! reads inside [`PgPool::reads_after`] go only to a replica that has
//! replayed that far, waiting up to [`ReplicaConfig::read_your_writes_wait`]
//! for the first candidate, and otherwise to the primary.
//! [`PgPool::reads_on_primary`] sends every read of the scope to the
//! primary. Scopes nest: the strictest open scope of the thread holds,
//! whichever was opened last or ends first. Both scopes are per thread (a store call runs on its caller's
//! thread from checkout to return): open the scope on the thread that
//! makes the reads, e.g. inside the `spawn_blocking` closure.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::fmt;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection as _;
use diesel::sql_types::{BigInt, Bool, Nullable};
use diesel::{Connection as _, PgConnection, QueryableByName, RunQueryDsl as _};
use dployr_domain::StoreError;

use crate::PgPool;
use crate::errors::{Failure, Keys};
use crate::identity::{IdentityMismatch, ServerIdentity};
use crate::metrics::{REPLICA_LAG, REPLICA_SKIPS, REPLICA_UP, ROUTED_READS};
use crate::pool::within_limit;

/// How replicas are used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaConfig {
    /// The most replay lag a replica may have to answer reads
    /// (`DPLOYR_DB_REPLICA_MAX_LAG_MS`). Default 1 s.
    pub max_lag: Duration,
    /// How often each replica's lag is measured. Default 1 s; at least 10 ms.
    pub sample_every: Duration,
    /// How long a read in [`PgPool::reads_after`] waits for a replica to
    /// replay the write before it goes to the primary. Default 100 ms:
    /// streaming replication on a LAN replays a commit in about a
    /// millisecond, so a longer wait means a lagging replica, and the
    /// primary answers in less.
    pub read_your_writes_wait: Duration,
}

impl ReplicaConfig {
    /// Refuses, by name, a sampling period under 10 ms (a sampler that
    /// would poll its replica without rest), a `max_lag` of zero (replicas
    /// configured but never read from: any lag at all skips them) and a
    /// period or wait past the pool's [`MAX_TIMEOUT`](crate::MAX_TIMEOUT)
    /// (the clock arithmetic of a read-your-writes wait overflows: a panic).
    fn check(&self) -> Result<(), StoreError> {
        within_limit("replica sample_every", self.sample_every, Duration::from_millis(10))?;
        if self.max_lag.is_zero() {
            return Err(StoreError::invalid("replica max_lag", "must be more than zero"));
        }
        within_limit("replica read_your_writes_wait", self.read_your_writes_wait, Duration::ZERO)
    }
}

impl Default for ReplicaConfig {
    fn default() -> Self {
        Self {
            max_lag: Duration::from_secs(1),
            sample_every: Duration::from_secs(1),
            read_your_writes_wait: Duration::from_millis(100),
        }
    }
}

/// A position in the primary's write-ahead log (a PostgreSQL `pg_lsn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WalPosition(u64);

impl WalPosition {
    /// The position as a byte offset.
    pub fn bytes(self) -> u64 {
        self.0
    }
}

impl fmt::Display for WalPosition {
    /// PostgreSQL's notation, e.g. `0/16B3748`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// What the last sample of a replica found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaStatus {
    /// `replica-0`, `replica-1`, ... in the order of the URLs.
    pub name: String,
    /// The replay lag measured; `None` if the last sample (or read) failed,
    /// none was taken yet, or the last is older than two sampling periods
    /// (a sampler stuck on a silent server).
    pub lag: Option<Duration>,
    /// How long ago the last sample was taken; `None` before the first.
    pub sampled: Option<Duration>,
    /// The WAL position replayed at the last sample.
    pub replayed: WalPosition,
    /// Whether it answers replica-safe reads now.
    pub in_rotation: bool,
    /// Reads that passed it over since the set was opened, by reason (the
    /// same counts as the `dployr_db_replica_skips_total` series).
    pub skips: ReplicaSkips,
    /// Why its last sample failed: the server is not a replica, is a
    /// replica of another server or names another database, does not
    /// answer, refused the sampler's credentials, ... `None` when the last
    /// sample succeeded or none was taken yet.
    pub failure: Option<String>,
}

/// Reads that passed a replica over, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplicaSkips {
    /// Not sampled yet.
    pub not_sampled: u64,
    /// Its last sample failed, or is older than two sampling periods, or a
    /// read failed on it since its last sample (counted once under
    /// `error`, then here until a sample succeeds).
    pub down: u64,
    /// Its last sample measured a lag over the bound.
    pub lag: u64,
    /// A read on it, or a read-your-writes wait for it, failed for a
    /// reason of its own (out of rotation until a sample succeeds), or its
    /// answer could not be decoded (the primary asked instead; it stays in
    /// rotation).
    pub error: u64,
    /// It had not replayed a read-your-writes position within the wait.
    pub behind_write: u64,
}

/// The longest a read waits for a replica's connection before it goes to
/// the next replica or the primary.
const REPLICA_CHECKOUT_WAIT: Duration = Duration::from_secs(1);

/// `lag_us` of a replica whose last sample or read failed.
const FAILED: u64 = u64::MAX;

/// What a sampler leaves for the readers. Three atomics rather than a lock:
/// a reader that sees the lag of one sample and the time of the next
/// decides as either sample would.
#[derive(Debug)]
struct Freshness {
    /// Milliseconds since the set's epoch at the last sample, plus one
    /// (0: never sampled).
    sampled_at_ms: AtomicU64,
    lag_us: AtomicU64,
    replayed: AtomicU64,
    /// Reads that passed it over, by [`Skip`] (its discriminant).
    skips: [AtomicU64; Skip::REASONS],
    /// Why its last sample failed (`None` after a sample that succeeded).
    failure: Mutex<Option<String>>,
    /// The gauges' writer: the sampler (a sample stored and reported as
    /// one step) and the first reader to find the sample aged (checked and
    /// reported as one step), so that neither reports over the other's
    /// newer finding. Holds the `sampled_at_ms` whose ageing was reported.
    gauges: Mutex<u64>,
}

/// One replica: its pool and what its sampler found.
#[derive(Debug)]
struct Replica {
    name: Arc<str>,
    pool: PgPool,
    freshness: Arc<Freshness>,
}

/// Why a replica was passed over (the `reason` label of [`REPLICA_SKIPS`]).
#[derive(Debug, Clone, Copy)]
enum Skip {
    NotSampled,
    Down,
    Lag,
    Error,
    BehindWrite,
}

impl Skip {
    /// How many reasons there are (the last one's discriminant, plus one).
    const REASONS: usize = Self::BehindWrite as usize + 1;

    fn as_str(self) -> &'static str {
        match self {
            Self::NotSampled => "not_sampled",
            Self::Down => "down",
            Self::Lag => "lag",
            Self::Error => "error",
            Self::BehindWrite => "behind_write",
        }
    }
}

/// The replicas of a primary pool, each with its sampler thread; the
/// threads stop when the set is dropped (with the last clone of the pool).
pub struct ReplicaSet {
    replicas: Vec<Replica>,
    config: ReplicaConfig,
    epoch: Instant,
    next: AtomicUsize,
    /// Dropping these ends the samplers' waits at once.
    _stop: Vec<mpsc::Sender<()>>,
}

impl fmt::Debug for ReplicaSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplicaSet").field("replicas", &self.replicas).field("config", &self.config).finish()
    }
}

/// Which reads of this thread may go where (see [`PgPool::reads_after`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Floor {
    Any,
    AtLeast(u64),
    Primary,
}

impl Floor {
    /// The stricter of two floors: the primary over any position, a later
    /// position over an earlier one.
    fn strictest(self, other: Self) -> Self {
        match (self, other) {
            (Floor::Primary, _) | (_, Floor::Primary) => Floor::Primary,
            (Floor::AtLeast(a), Floor::AtLeast(b)) => Floor::AtLeast(a.max(b)),
            (Floor::AtLeast(a), Floor::Any) | (Floor::Any, Floor::AtLeast(a)) => Floor::AtLeast(a),
            (Floor::Any, Floor::Any) => Floor::Any,
        }
    }
}

thread_local! {
    /// The floors of this thread's open scopes, each under its scope's
    /// number: the strictest of them holds, so a scope opened inside
    /// another never loosens it, and one dropped out of order takes only
    /// its own floor away.
    static SCOPES: RefCell<Vec<(u64, Floor)>> = const { RefCell::new(Vec::new()) };
    /// The number of this thread's next scope.
    static NEXT_SCOPE: Cell<u64> = const { Cell::new(0) };
}

/// The floor this thread's reads are held to: the strictest of its open
/// scopes' ([`Floor::Any`] outside every scope).
fn current_floor() -> Floor {
    SCOPES.with(|scopes| scopes.borrow().iter().fold(Floor::Any, |floor, (_, scope)| floor.strictest(*scope)))
}

/// A scope in which this thread's replica-safe reads are held to a floor,
/// together with every other scope of the thread still open (the strictest
/// holds); dropped, it takes its own floor away, in whatever order scopes
/// end. Not `Send`: the floor belongs to the thread that opened it.
#[derive(Debug)]
#[must_use = "the scope ends when this is dropped"]
pub struct ReadScope {
    number: u64,
    _thread: PhantomData<*const ()>,
}

impl ReadScope {
    fn enter(floor: Floor) -> Self {
        let number = NEXT_SCOPE.with(|next| {
            let number = next.get();
            next.set(number.wrapping_add(1));
            number
        });
        SCOPES.with(|scopes| scopes.borrow_mut().push((number, floor)));
        Self { number, _thread: PhantomData }
    }
}

impl Drop for ReadScope {
    fn drop(&mut self) {
        SCOPES.with(|scopes| scopes.borrow_mut().retain(|(number, _)| *number != self.number));
    }
}

#[derive(QueryableByName)]
struct PrimaryPosition {
    #[diesel(sql_type = BigInt)]
    lsn: i64,
}

#[derive(QueryableByName)]
struct ReplicaPosition {
    #[diesel(sql_type = Bool)]
    in_recovery: bool,
    #[diesel(sql_type = Nullable<BigInt>)]
    replayed: Option<i64>,
    #[diesel(sql_type = Nullable<BigInt>)]
    since_replayed_commit_us: Option<i64>,
}

/// The primary's flushed position: what it may have sent to replicas.
const PRIMARY_POSITION: &str = "SELECT (pg_current_wal_flush_lsn() - '0/0'::pg_lsn)::bigint AS lsn";
/// The primary's insert position, past every commit record written so far.
const WRITE_POSITION: &str = "SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint AS lsn";
const REPLICA_POSITION: &str = "SELECT pg_is_in_recovery() AS in_recovery, \
     (pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::bigint AS replayed, \
     (extract(epoch FROM clock_timestamp() - pg_last_xact_replay_timestamp()) * 1000000)::bigint \
     AS since_replayed_commit_us";

fn position(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

impl ReplicaSet {
    /// Opens a pool on each replica URL (named `replica-0`, ... in order)
    /// with `pool` settings, and starts a sampler per replica against
    /// `primary`. A replica that does not answer now is not an error (it is
    /// left out of rotation until it does); one whose URL is malformed or
    /// refused is.
    ///
    /// # Errors
    /// [`StoreError::Configuration`] naming `setting` for a malformed URL,
    /// refused credentials or a missing database on a replica;
    /// [`StoreError::Invalid`] naming the field for a sampling period
    /// outside 10 ms ..= `INT_MAX` ms, a `max_lag` of zero or a
    /// read-your-writes wait past `INT_MAX` ms;
    /// [`StoreError::Backend`] if a thread cannot be started.
    pub fn connect(
        primary: &PgPool,
        urls: &[String],
        setting: &'static str,
        pool: crate::PoolConfig,
        config: ReplicaConfig,
    ) -> Result<Self, StoreError> {
        config.check()?;
        let epoch = Instant::now();
        let mut replicas = Vec::with_capacity(urls.len());
        let mut stop = Vec::with_capacity(urls.len());
        for (index, url) in urls.iter().enumerate() {
            let name: Arc<str> = format!("replica-{index}").into();
            // The lag and the read-your-writes position are measured on the
            // sampler's connection; a pool whose connections libpq may open
            // on another of several hosts would read from a server whose
            // staleness nobody measured.
            if dployr_domain::libpq::names_several_hosts(url) {
                return Err(StoreError::Configuration {
                    setting,
                    reason: format!(
                        "{name} names several hosts: its lag is measured on one server while its reads could go \
                         to another, unmeasured; give each replica a URL of its own"
                    )
                    .into(),
                });
            }
            // A replica that stopped would hold each read for the whole
            // checkout wait before it falls back: at most a second there.
            let replica_config =
                crate::PoolConfig { connection_timeout: pool.connection_timeout.min(REPLICA_CHECKOUT_WAIT), ..pool };
            let replica_pool = PgPool::open_replica(url, setting, replica_config, &name)?;
            let freshness = Arc::new(Freshness {
                sampled_at_ms: AtomicU64::new(0),
                lag_us: AtomicU64::new(FAILED),
                replayed: AtomicU64::new(0),
                skips: Default::default(),
                failure: Mutex::new(None),
                gauges: Mutex::new(0),
            });
            let (sender, receiver) = mpsc::channel();
            let sampler = Sampler {
                name: Arc::clone(&name),
                primary_url: Arc::clone(&primary.database_url),
                replica_url: Arc::clone(&replica_pool.database_url),
                every: config.sample_every,
                epoch,
                freshness: Arc::clone(&freshness),
                history: VecDeque::new(),
                primary: None,
                primary_identity: None,
                replica: None,
            };
            std::thread::Builder::new()
                .name(format!("dployr-{name}-lag"))
                .spawn(move || sampler.run(&receiver))
                .map_err(|error| StoreError::backend("starting a replica lag sampler thread", error))?;
            stop.push(sender);
            replicas.push(Replica { name, pool: replica_pool, freshness });
        }
        Ok(Self { replicas, config, epoch, next: AtomicUsize::new(0), _stop: stop })
    }

    /// How the replicas are used.
    pub fn config(&self) -> ReplicaConfig {
        self.config
    }

    /// The pool of each replica, by name.
    pub fn pools(&self) -> impl Iterator<Item = (&str, &PgPool)> {
        self.replicas.iter().map(|replica| (&*replica.name, &replica.pool))
    }

    /// What the last sample of each replica found.
    pub fn status(&self) -> Vec<ReplicaStatus> {
        let now_ms = self.now_ms();
        self.replicas
            .iter()
            .map(|replica| {
                let freshness = &replica.freshness;
                let sampled_at = freshness.sampled_at_ms.load(Ordering::Relaxed);
                let lag_us = freshness.lag_us.load(Ordering::Relaxed);
                // A sample older than two periods is a sampler stuck on a
                // silent server: its lag says nothing of the replica now.
                let stale = now_ms.saturating_sub(sampled_at) > self.fresh_for_ms();
                ReplicaStatus {
                    name: replica.name.to_string(),
                    lag: (sampled_at != 0 && lag_us != FAILED && !stale).then(|| Duration::from_micros(lag_us)),
                    sampled: (sampled_at != 0).then(|| Duration::from_millis(now_ms.saturating_sub(sampled_at))),
                    replayed: WalPosition(freshness.replayed.load(Ordering::Relaxed)),
                    in_rotation: self.usable(replica, now_ms).is_ok(),
                    skips: {
                        let count = |skip: Skip| freshness.skips[skip as usize].load(Ordering::Relaxed);
                        ReplicaSkips {
                            not_sampled: count(Skip::NotSampled),
                            down: count(Skip::Down),
                            lag: count(Skip::Lag),
                            error: count(Skip::Error),
                            behind_write: count(Skip::BehindWrite),
                        }
                    },
                    failure: freshness.failure.lock().unwrap_or_else(PoisonError::into_inner).clone(),
                }
            })
            .collect()
    }

    /// How long a sample counts, in ms: two sampling periods.
    fn fresh_for_ms(&self) -> u64 {
        2 * u64::try_from(self.config.sample_every.as_millis()).unwrap_or(u64::MAX / 4)
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX).saturating_add(1)
    }

    /// Whether the last sample lets `replica` answer a read now.
    fn usable(&self, replica: &Replica, now_ms: u64) -> Result<(), Skip> {
        let freshness = &replica.freshness;
        let sampled_at = freshness.sampled_at_ms.load(Ordering::Relaxed);
        if sampled_at == 0 {
            return Err(Skip::NotSampled);
        }
        let lag = freshness.lag_us.load(Ordering::Relaxed);
        if lag == FAILED {
            return Err(Skip::Down);
        }
        // A sampler stuck on a silent server leaves an old sample behind:
        // that replica is as good as down. Its gauges would go on showing
        // the last sample (up, caught up) for as long as the sampler waits,
        // so the first look at the aged sample sets them to down; the next
        // sample sets them again.
        if now_ms.saturating_sub(sampled_at) > self.fresh_for_ms() {
            let mut aged_reported = freshness.gauges.lock().unwrap_or_else(PoisonError::into_inner);
            // Still the sample found aged (none came since), and not yet reported.
            if *aged_reported != sampled_at && freshness.sampled_at_ms.load(Ordering::Relaxed) == sampled_at {
                *aged_reported = sampled_at;
                report_sample(&replica.name, None);
            }
            return Err(Skip::Down);
        }
        if u128::from(lag) > self.config.max_lag.as_micros() {
            return Err(Skip::Lag);
        }
        Ok(())
    }

    fn skipped(replica: &Replica, skip: Skip) {
        replica.freshness.skips[skip as usize].fetch_add(1, Ordering::Relaxed);
        ::metrics::counter!(REPLICA_SKIPS, "replica" => Arc::clone(&replica.name), "reason" => skip.as_str())
            .increment(1);
    }

    /// The replicas that may answer this thread's next replica-safe read,
    /// in the order to try them (round robin from the next one): not under
    /// [`PgPool::reads_on_primary`], sampled, and within the bound. This is
    /// the whole check a read makes before it runs (atomics and a clock
    /// read), so `cargo xtask bench` times it through [`check`](Self::check).
    fn candidates(&self) -> impl Iterator<Item = &Replica> + '_ {
        let count = if current_floor() == Floor::Primary { 0 } else { self.replicas.len() };
        let start = if count == 0 { 0 } else { self.next.fetch_add(1, Ordering::Relaxed) };
        let now_ms = self.now_ms();
        (0..count)
            .map(move |offset| &self.replicas[(start + offset) % count])
            .filter(move |replica| self.usable(replica, now_ms).map_err(|skip| Self::skipped(replica, skip)).is_ok())
    }

    /// The replica the next replica-safe read of this thread would go to,
    /// by the same check a read makes; `None`: the primary. It takes a turn
    /// of the round robin, as a read does.
    pub fn check(&self) -> Option<&str> {
        self.candidates().next().map(|replica| &*replica.name)
    }

    /// Runs a replica-safe read on the first usable replica (round robin),
    /// moving on when one fails for a reason of its own (`Unavailable`,
    /// refused credentials, or an error of the server, such as a table a
    /// replica behind a migration does not have yet), which takes it out of
    /// rotation until its sampler succeeds again; a verdict on the input
    /// (`Invalid`) is the answer, as the primary would give it. `Ok(None)`
    /// when no replica may answer: the caller goes to the primary.
    ///
    /// Every replica run of the read (and its read-your-writes wait) shares
    /// the one deadline of a call that `started` then: frozen replicas hold
    /// a read for one call bound in all, however many there are, and the
    /// primary's run after them, with a deadline of its own, keeps the read
    /// within two. Once that deadline has passed, the replicas not tried
    /// yet are left alone (not taken out of rotation for it).
    pub(crate) fn read<T, E: Into<Failure>>(
        &self,
        op: &'static str,
        started: Instant,
        keys: Keys<'_>,
        work: &mut impl FnMut(&mut PgConnection) -> Result<T, E>,
    ) -> Result<Option<T>, StoreError> {
        let floor = current_floor();
        for replica in self.candidates() {
            if replica.pool.deadline_passed(started) {
                return Ok(None);
            }
            if let Floor::AtLeast(lsn) = floor
                && replica.freshness.replayed.load(Ordering::Relaxed) < lsn
            {
                // The first usable replica is the one worth waiting for;
                // the primary answers before a second wait would end.
                match self.wait_for(replica, lsn, started) {
                    Ok(true) => {}
                    Ok(false) => {
                        Self::skipped(replica, Skip::BehindWrite);
                        return Ok(None);
                    }
                    Err(()) => {
                        // It failed while waited for (frozen, cut off): out
                        // of rotation, so that the next reads after a write
                        // do not each wait for it again.
                        replica.freshness.lag_us.store(FAILED, Ordering::Relaxed);
                        Self::skipped(replica, Skip::Error);
                        return Ok(None);
                    }
                }
            }
            match replica.pool.run_statement_since(started, keys, &mut *work) {
                Ok(value) => {
                    ::metrics::counter!(ROUTED_READS, "op" => op, "server" => "replica").increment(1);
                    return Ok(Some(value));
                }
                // A replica that refuses its credentials now (a password
                // rotated, a role dropped), or fails the statement for a
                // reason of its own (a table a migration added that it has
                // not replayed yet, a read error of its disk), is a replica
                // down for this read: the primary answers, as for one that
                // does not answer.
                Err(
                    error @ (StoreError::Unavailable { .. }
                    | StoreError::Configuration { .. }
                    | StoreError::Backend { .. }),
                ) if !matches!(error, StoreError::Backend { .. }) || refused_by_the_server(&error) => {
                    // Out of rotation until its sampler succeeds again.
                    replica.freshness.lag_us.store(FAILED, Ordering::Relaxed);
                    Self::skipped(replica, Skip::Error);
                }
                // An answer this binary cannot decode: the replica's when
                // its schema is behind (a column whose type a migration
                // changed, not replayed there yet), the row's when the
                // primary holds it too. The primary is asked (it answers, or
                // gives the caller the same error), and the replica stays
                // in rotation: one bad row must not send every read of
                // every replica to the primary.
                Err(StoreError::Backend { .. }) => Self::skipped(replica, Skip::Error),
                Err(other) => return Err(other),
            }
        }
        Ok(None)
    }

    /// Waits (polling every millisecond, within the configured wait and the
    /// deadline of the read that `started` then) until `replica` has
    /// replayed `lsn`: whether it has; `Err` if it failed meanwhile.
    fn wait_for(&self, replica: &Replica, lsn: u64, started: Instant) -> Result<bool, ()> {
        let until = Instant::now() + self.config.read_your_writes_wait;
        let waited =
            replica.pool.bounded_since(started, |conn| replayed_up_to(conn, lsn, until, Duration::from_millis(1)));
        let (found, _) = waited.map_err(drop)?;
        let replayed = found.replayed.map_or(0, position);
        replica.freshness.replayed.fetch_max(replayed, Ordering::Relaxed);
        Ok(replayed >= lsn)
    }
}

/// Whether `error` (a `Backend` error) is the server's refusal of the
/// statement (an SQLSTATE), not a failure to decode its answer.
fn refused_by_the_server(error: &StoreError) -> bool {
    let StoreError::Backend { source: Some(source), .. } = error else { return false };
    matches!(source.downcast_ref::<diesel::result::Error>(), Some(diesel::result::Error::DatabaseError(..)))
}

/// Asks a replica for its position (on `conn`) every `poll` until it has
/// replayed `lsn`, `until` passes, or it turns out not to be in recovery:
/// its last answer, and when that came. The read-your-writes wait and the
/// sampler's catch-up both wait this way.
fn replayed_up_to(
    conn: &mut PgConnection,
    lsn: u64,
    until: Instant,
    poll: Duration,
) -> diesel::QueryResult<(ReplicaPosition, Instant)> {
    loop {
        let found: ReplicaPosition = diesel::sql_query(REPLICA_POSITION).get_result(conn)?;
        let now = Instant::now();
        if found.replayed.map_or(0, position) >= lsn || now >= until || !found.in_recovery {
            return Ok((found, now));
        }
        std::thread::sleep(poll);
    }
}

/// Sets the gauges of `replica` from its last sample: the `lag` it
/// measured, `None` when the sample failed. A failed sample sets the lag to
/// NaN, not to nothing: the `metrics` facade cannot remove a series, and the
/// last lag measured, kept, would show a replica that does not answer as
/// caught up (NaN is a gap on a graph, and over no alert's threshold).
fn report_sample(replica: &Arc<str>, lag: Option<Duration>) {
    let (lag_seconds, up) = match lag {
        Some(lag) => (lag.as_secs_f64(), 1.0),
        None => (f64::NAN, 0.0),
    };
    ::metrics::gauge!(REPLICA_LAG, "replica" => Arc::clone(replica)).set(lag_seconds);
    ::metrics::gauge!(REPLICA_UP, "replica" => Arc::clone(replica)).set(up);
}

/// A replica's sampler: its own two connections (never the pools', so a
/// full pool cannot starve it and its queries count in no pool's
/// statistics), reopened after a failure.
struct Sampler {
    name: Arc<str>,
    primary_url: Arc<str>,
    replica_url: Arc<str>,
    every: Duration,
    epoch: Instant,
    freshness: Arc<Freshness>,
    /// The primary's positions at the last samples, oldest first.
    history: VecDeque<(Instant, u64)>,
    primary: Option<PgConnection>,
    /// What the primary's connection answered of [`ServerIdentity`].
    primary_identity: Option<ServerIdentity>,
    replica: Option<PgConnection>,
}

/// Why a replica whose identity differs from its primary's so cannot be
/// one of it.
fn replica_mismatch(mismatch: &IdentityMismatch) -> String {
    match mismatch {
        IdentityMismatch::Database { this, other } => {
            format!(
                "its URL names database {this:?} while the primary's names {other:?}: its rows are another database's"
            )
        }
        IdentityMismatch::Server { this, other } => {
            format!("it is a replica of another server (system identifier {this}, the primary's {other})")
        }
    }
}

/// How many primary positions a sampler remembers (a minute at 1 s).
const HISTORY: usize = 64;

/// How often a sampler asks a replica found behind the primary's position
/// whether it has replayed that far; it asks for up to half a sampling
/// period. (50 ms at most, as it was, still let a replica whose replay was
/// held up by a busy machine, two cores under `cargo xtask bench`'s sixteen
/// threads after its writes, leave rotation for a period on WAL without a
/// commit: 6 936 routed reads reached the primary in one run.)
const CATCH_UP_POLL: Duration = Duration::from_millis(2);

impl Sampler {
    fn run(mut self, stop: &mpsc::Receiver<()>) {
        loop {
            let sample = self.sample();
            let now_ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX).saturating_add(1);
            // Stored and reported as one step against a reader that found
            // the previous sample aged (see `Freshness::gauges`).
            let gauges = self.freshness.gauges.lock().unwrap_or_else(PoisonError::into_inner);
            match sample {
                Ok((lag, replayed)) => {
                    *self.freshness.failure.lock().unwrap_or_else(PoisonError::into_inner) = None;
                    let lag_us = u64::try_from(lag.as_micros()).unwrap_or(FAILED - 1);
                    self.freshness.replayed.fetch_max(replayed, Ordering::Relaxed);
                    self.freshness.lag_us.store(lag_us, Ordering::Relaxed);
                    report_sample(&self.name, Some(lag));
                }
                Err(reason) => {
                    // Warned once per new reason (a replica down for an
                    // hour would otherwise log every sampling period), so a
                    // misconfigured replica is seen without debug logs.
                    let mut failure = self.freshness.failure.lock().unwrap_or_else(PoisonError::into_inner);
                    if failure.as_deref() == Some(reason.as_str()) {
                        tracing::debug!(replica = %self.name, %reason, "dployr.replica sample failed");
                    } else {
                        tracing::warn!(replica = %self.name, %reason, "dployr.replica out of rotation");
                        *failure = Some(reason);
                    }
                    drop(failure);
                    self.freshness.lag_us.store(FAILED, Ordering::Relaxed);
                    report_sample(&self.name, None);
                    // Reconnect next time: the failure may have broken them.
                    self.primary = None;
                    self.replica = None;
                }
            }
            self.freshness.sampled_at_ms.store(now_ms, Ordering::Relaxed);
            drop(gauges);
            match stop.recv_timeout(self.every) {
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    /// A connection of the sampler's own. No session setting is made on it
    /// (behind a transaction pooler it would land on other clients); a
    /// server that stops answering is bounded by the URL's `connect_timeout`,
    /// keepalives and `tcp_user_timeout`, and meanwhile its sample ages and
    /// the replica leaves the rotation.
    fn connect(url: &str) -> Result<PgConnection, String> {
        PgConnection::establish(url).map_err(|error| crate::pool::classify(&error, url).to_string())
    }

    /// The replica's lag and replayed position, or why they are unknown.
    fn sample(&mut self) -> Result<(Duration, u64), String> {
        let primary = match &mut self.primary {
            Some(conn) => conn,
            slot => {
                let conn = slot.insert(Self::connect(&self.primary_url)?);
                self.primary_identity =
                    Some(ServerIdentity::of(conn).map_err(|error| format!("the primary's identity: {error}"))?);
                conn
            }
        };
        let primary_at = Instant::now();
        let primary_lsn = position(
            diesel::sql_query(PRIMARY_POSITION)
                .get_result::<PrimaryPosition>(primary)
                .map_err(|error| format!("the primary's position: {error}"))?
                .lsn,
        );
        self.history.push_back((primary_at, primary_lsn));
        if self.history.len() > HISTORY {
            self.history.pop_front();
        }
        let replica = match &mut self.replica {
            Some(conn) => conn,
            slot => {
                let conn = slot.insert(Self::connect(&self.replica_url)?);
                // Checked once per connection (each failure reconnects):
                // the replay positions compared below are a whole server's,
                // so a URL naming another database of the replica's server,
                // or a standby of another primary far enough along, would
                // otherwise pass for caught up and answer with other rows.
                let identity = ServerIdentity::of(conn).map_err(|error| format!("the replica's identity: {error}"))?;
                if let Some(mismatch) = self.primary_identity.as_ref().and_then(|primary| identity.mismatch(primary)) {
                    return Err(format!("not a replica of the primary's database: {}", replica_mismatch(&mismatch)));
                }
                conn
            }
        };
        // A replica is usually a moment behind the primary's newest WAL
        // (streaming and replay take a few milliseconds), and WAL that holds
        // no commit (checkpoints, standby snapshots, vacuum) leaves no
        // commit time to date it by: the bounds below would then give a
        // whole sampling period, beyond the default bound. Asked again a few
        // times, it has replayed that far, and its lag is known to within
        // the wait.
        let catch_up_until = Instant::now() + self.every / 2;
        let (found, now) = replayed_up_to(replica, primary_lsn, catch_up_until, CATCH_UP_POLL)
            .map_err(|error| format!("the replica's position: {error}"))?;
        if !found.in_recovery {
            return Err("the server is not a replica (pg_is_in_recovery() is false)".into());
        }
        let replayed = found.replayed.map_or(0, position);
        if replayed >= primary_lsn {
            // Caught up with where the primary was when asked.
            return Ok((now.saturating_duration_since(primary_at), replayed));
        }
        let since_commit = found.since_replayed_commit_us.map(|us| Duration::from_micros(position(us)));
        let since_position = self
            .history
            .iter()
            .rev()
            .find(|(_, lsn)| *lsn <= replayed)
            .map(|(at, _)| now.saturating_duration_since(*at));
        match (since_commit, since_position) {
            (Some(a), Some(b)) => Ok((a.min(b), replayed)),
            (Some(lag), None) | (None, Some(lag)) => Ok((lag, replayed)),
            (None, None) => Err("behind the primary, by an unknown time (no commit replayed yet)".into()),
        }
    }
}

/// What [`PgPool::ping_writable`] answers of a server that only reads.
const ANSWERS_BUT_ONLY_READS: &str =
    "the primary answers but only reads (a standby, a switched-over primary, or default_transaction_read_only)";

impl PgPool {
    /// The same pool, with replica-safe reads going to `replicas`.
    #[must_use]
    pub fn with_replicas(mut self, replicas: ReplicaSet) -> Self {
        self.replicas = Some(Arc::new(replicas));
        self
    }

    /// One `SELECT 1` within the call deadline: whether the server answers
    /// (for health checks).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when it does not.
    pub fn ping(&self) -> Result<(), StoreError> {
        self.bounded(|conn| conn.batch_execute("SELECT 1"))
    }

    /// One statement within the call deadline: whether the server answers
    /// and takes writes (for the health of a primary). A standby, or a
    /// primary left read-only by a switchover or by
    /// `default_transaction_read_only`, answers `SELECT 1` while every
    /// write fails.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when it does not answer, or only reads.
    pub fn ping_writable(&self) -> Result<(), StoreError> {
        let read_only = self.bounded(|conn| {
            diesel::select(diesel::dsl::sql::<diesel::sql_types::Bool>(
                "current_setting('transaction_read_only')::bool",
            ))
            .get_result::<bool>(conn)
        })?;
        if read_only {
            // As a refused write does: the connections made before now are
            // replaced (at most once a second), so that after a switchover
            // that left the old primary up and read-only, a process whose
            // health keeps it out of rotation (no write comes to refuse)
            // reaches the new primary by the next probe.
            self.affinity.saw_read_only(Instant::now());
            return Err(StoreError::Unavailable { reason: ANSWERS_BUT_ONLY_READS.into(), source: None });
        }
        Ok(())
    }

    /// Whether `error`, from [`ping_writable`](Self::ping_writable), says
    /// the server answered but only reads (rather than that it did not
    /// answer, or no connection came).
    pub fn is_read_only_answer(error: &StoreError) -> bool {
        matches!(error, StoreError::Unavailable { reason, source: None } if reason == ANSWERS_BUT_ONLY_READS)
    }

    /// The replicas, if any.
    pub fn replicas(&self) -> Option<&ReplicaSet> {
        self.replicas.as_deref()
    }

    /// The primary's WAL position now, for [`reads_after`](Self::reads_after)
    /// once a write returned: one statement on the primary.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] if the primary does not answer.
    pub fn wal_position(&self) -> Result<WalPosition, StoreError> {
        self.bounded(|conn| diesel::sql_query(WRITE_POSITION).get_result::<PrimaryPosition>(conn))
            .map(|found| WalPosition(position(found.lsn)))
    }

    /// Until the returned scope is dropped, this thread's replica-safe reads
    /// see every write up to `position` (from [`wal_position`](Self::wal_position)):
    /// a replica that has not replayed it yet is waited for briefly, then
    /// the primary answers.
    pub fn reads_after(&self, position: WalPosition) -> ReadScope {
        ReadScope::enter(Floor::AtLeast(position.0))
    }

    /// Until the returned scope is dropped, every read of this thread goes
    /// to the primary: for a request that wrote and reads no further than
    /// its own answer.
    pub fn reads_on_primary(&self) -> ReadScope {
        ReadScope::enter(Floor::Primary)
    }
}

#[cfg(test)]
mod tests {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    use super::*;

    /// The lag and up gauges of `replica-0` as `recorder` holds them (in
    /// one snapshot, which resets the debugging recorder's gauges to 0).
    fn lag_and_up(recorder: &DebuggingRecorder) -> (Option<f64>, Option<f64>) {
        let seen = recorder.snapshotter().snapshot().into_vec();
        let gauge = |name: &str| {
            seen.iter().find_map(|(key, _, _, value)| {
                let key = key.key();
                let ours = key.labels().any(|label| label.key() == "replica" && label.value() == "replica-0");
                match value {
                    DebugValue::Gauge(value) if key.name() == name && ours => Some(value.0),
                    _ => None,
                }
            })
        };
        (gauge(REPLICA_LAG), gauge(REPLICA_UP))
    }

    #[test]
    fn a_failed_sample_leaves_no_lag_in_the_gauge_only_nan_beside_up_at_zero() {
        let recorder = DebuggingRecorder::new();
        let replica: Arc<str> = "replica-0".into();
        metrics::with_local_recorder(&recorder, || {
            report_sample(&replica, Some(Duration::from_millis(2)));
            report_sample(&replica, None);
        });
        let (lag, up) = lag_and_up(&recorder);
        assert!(lag.is_some_and(f64::is_nan), "no lag is known, not the last one measured: {lag:?}");
        assert_eq!(up, Some(0.0));

        metrics::with_local_recorder(&recorder, || report_sample(&replica, Some(Duration::from_millis(3))));
        assert_eq!(lag_and_up(&recorder), (Some(0.003), Some(1.0)), "a sample that succeeds again sets both");
    }
}
