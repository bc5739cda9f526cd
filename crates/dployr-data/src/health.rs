//! `DataLayer::health()`: what a health check or a status page asks of the
//! data layer, each answer with how long it took to get: is the primary
//! reachable, is each replica reachable and how far behind, is the
//! key-value backend reachable, are the migrations up to date. Every probe
//! runs within the same bounds as a store call (the pool's call deadline),
//! so a silent server makes `health()` slow by at most that, never hang:
//! when the primary does not answer, the probes that would ask its server
//! again (the key-value backend on PostgreSQL, which shares its pool; the
//! migrations, when their URL is the primary's) are not sent, and say so,
//! instead of each waiting out a bound of its own for the same answer. A
//! silent replica or migration server adds its own bound.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use dployr_domain::{KvBackend, StoreError};
use dployr_migrate::{MigrationRunner, MigrationSet, MigrationState};
use dployr_pg::PgPool;

/// The answer of one probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// Whether it answered.
    pub ok: bool,
    /// How long the probe took.
    pub duration: Duration,
    /// Why not, when it did not (never holds a password).
    pub error: Option<String>,
}

/// One replica: reachable now, and what its lag sampler last measured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaProbe {
    /// `replica-0`, ... in the order of `DPLOYR_DB_REPLICA_URLS`.
    pub name: String,
    /// A `SELECT 1` through its pool.
    pub reachable: Probe,
    /// The replay lag of the last sample (at most two sampling periods
    /// old); `None` when the sample failed or none was taken yet.
    pub lag: Option<Duration>,
    /// Whether it answers replica-safe reads now.
    pub in_rotation: bool,
    /// Why its last lag sample failed, which keeps it out of rotation: the
    /// server is not a replica (`pg_is_in_recovery()` is false), replicates
    /// another server or its URL names another database than the
    /// primary's, does not answer, refused the sampler's credentials, ...
    /// `None` when the last sample succeeded or none was taken yet.
    pub sample_failure: Option<String>,
}

/// Whether the database's migrations are those of this binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationsProbe {
    /// Every embedded migration applied, unchanged. Migrations applied by a
    /// newer release ([`newer`](Self::newer)) do not count against it: in a
    /// rolling deploy the new release migrates while this one still serves,
    /// and every process of this one turning not ready at that moment would
    /// leave nothing ready until the new ones are.
    pub up_to_date: bool,
    /// Migrations of this binary not applied yet.
    pub pending: Vec<String>,
    /// Migrations applied to the database that this binary does not hold,
    /// of versions above its latest (a newer release ran them). This
    /// process serves on; a new one of this release refuses to open there
    /// unless allowed to ([`Config::allowing_a_newer_release`](crate::Config::allowing_a_newer_release)),
    /// and `cargo xtask migrate` refuses them. An unknown one below its latest
    /// (removed from the source, another branch's) is an `error`, as before.
    pub newer: Vec<String>,
    /// How long the probe took.
    pub duration: Duration,
    /// Why not up to date beyond `pending` (an applied migration whose text
    /// changed), or why the status could not be read.
    pub error: Option<String>,
}

/// The data layer's health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// One statement on the primary through the pool, which also finds
    /// that it takes writes (a read-only primary is not ok).
    pub primary: Probe,
    /// Each replica; empty without replicas.
    pub replicas: Vec<ReplicaProbe>,
    /// A read of a missing key on the key-value backend(s) of sessions and
    /// one-time records (on Cloudflare, one API request of the account's budget).
    pub kv: Probe,
    /// The migrations' status, read over a connection of the primary's pool,
    /// or on the migration URL when it has one of its own.
    pub migrations: MigrationsProbe,
}

impl Health {
    /// Whether this process can serve: primary and key-value backend
    /// reachable, migrations up to date. Replicas do not count: without
    /// them reads go to the primary.
    pub fn is_ready(&self) -> bool {
        self.primary.ok && self.kv.ok && self.migrations.up_to_date
    }
}

/// The key the key-value probe reads; it is never written.
const KV_PROBE_KEY: &str = "dployr-health-probe";

fn timed(probe: impl FnOnce() -> Result<(), StoreError>) -> Probe {
    let started = Instant::now();
    let result = probe();
    Probe { ok: result.is_ok(), duration: started.elapsed(), error: result.err().map(|error| error.to_string()) }
}

fn select_one(pool: &PgPool) -> Probe {
    timed(|| pool.ping())
}

/// The key-value backends `health()` probes.
#[derive(Clone, Copy)]
pub(crate) struct KvBackends<'a> {
    pub(crate) sessions: &'a Arc<dyn KvBackend>,
    pub(crate) one_time: &'a Arc<dyn KvBackend>,
    /// Whether either is the PostgreSQL backend on the primary's pool.
    pub(crate) on_primary: bool,
}

/// Where `health()` reads the migrations' status.
#[derive(Clone, Copy)]
pub(crate) struct MigrationsSource<'a> {
    pub(crate) url: &'a str,
    /// Whether `url` is the primary's.
    pub(crate) on_primary: bool,
    pub(crate) in_flight: &'a ProbeInFlight,
}

/// The answer of a probe not sent because the primary's server did not
/// answer `primary`'s probe.
fn not_sent(primary: &Probe) -> String {
    format!(
        "not probed: it asks the primary's server, which the primary's probe could not reach ({})",
        primary.error.as_deref().unwrap_or("no answer")
    )
}

pub(crate) fn check(pool: &PgPool, kv: KvBackends<'_>, migrations: MigrationsSource<'_>) -> Health {
    let started = Instant::now();
    let answered = pool.ping_writable();
    // Down, not merely read-only (whose probe answered, and whose server
    // still serves reads and the migrations' status).
    let primary_down = matches!(&answered, Err(StoreError::Unavailable { .. }))
        && !answered.as_ref().is_err_and(dployr_pg::PgPool::is_read_only_answer);
    let primary = Probe {
        ok: answered.is_ok(),
        duration: started.elapsed(),
        error: answered.err().map(|error| error.to_string()),
    };
    let replicas = pool.replicas().map_or_else(Vec::new, |replicas| {
        let status = replicas.status();
        replicas
            .pools()
            .zip(status)
            .map(|((name, replica), status)| ReplicaProbe {
                name: name.to_owned(),
                reachable: select_one(replica),
                lag: status.lag,
                in_rotation: status.in_rotation,
                sample_failure: status.failure,
            })
            .collect()
    });
    let kv_probe = if primary_down && kv.on_primary {
        Probe { ok: false, duration: Duration::ZERO, error: Some(not_sent(&primary)) }
    } else {
        timed(|| {
            kv.sessions.get(KV_PROBE_KEY)?;
            if !Arc::ptr_eq(kv.sessions, kv.one_time) {
                kv.one_time.get(KV_PROBE_KEY)?;
            }
            Ok(())
        })
    };
    let migrations = if primary_down && migrations.on_primary {
        MigrationsProbe {
            up_to_date: false,
            pending: Vec::new(),
            newer: Vec::new(),
            duration: Duration::ZERO,
            error: Some(not_sent(&primary)),
        }
    } else {
        // On the primary, over one of its pool's connections: a probe that
        // needed a connection of its own failed wherever the pool could
        // serve but no new connection could be had (a role's or the
        // server's connection limit reached), and turned every process not
        // ready at once.
        let through = migrations.on_primary.then(|| pool.clone());
        migrations_within(migrations.url, through, pool.call_bound(), migrations.in_flight)
    };
    Health { primary, replicas, kv: kv_probe, migrations }
}

/// A data layer's probe of the migrations: whether one is running, and the
/// last answer, shared with the probe's thread. Concurrent `health()` calls
/// (a readiness and a liveness probe, several load balancers) share one
/// probe: a call that finds one running waits for its answer instead of
/// being told "not answered yet", which turned a healthy process not ready.
#[derive(Debug, Default)]
pub(crate) struct ProbeInFlight(Arc<(Mutex<ProbeSlot>, Condvar)>);

#[derive(Debug, Default)]
struct ProbeSlot {
    /// The number of the probe running now, if one is.
    running: Option<u64>,
    /// The number given to the last probe started.
    started: u64,
    /// The last answer and the number of the probe that gave it.
    answer: Option<(u64, MigrationsProbe)>,
}

fn lock(slot: &Mutex<ProbeSlot>) -> MutexGuard<'_, ProbeSlot> {
    // The slot holds no invariant a panic could break half-way.
    slot.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The migrations' status within `bound`. The status is read over a
/// connection of `pool` (the primary's) or of its own (the migration
/// URL's), which a server that accepts and then answers nothing would hold
/// past any connect timeout (and the pool's statement timeout, if any):
/// so it is read on a thread of its own, and a probe that has not answered
/// within `bound` is reported as such. That thread ends when its
/// connection does (keepalives notice a dead peer); until then no other
/// probe starts, so a frozen server costs one thread, not one per call:
/// a call made meanwhile waits, within its own `bound`, for that probe's
/// answer.
fn migrations_within(url: &str, pool: Option<PgPool>, bound: Duration, in_flight: &ProbeInFlight) -> MigrationsProbe {
    let started = Instant::now();
    let unanswered = |error: String| MigrationsProbe {
        up_to_date: false,
        pending: Vec::new(),
        newer: Vec::new(),
        duration: started.elapsed(),
        error: Some(error),
    };
    let (slot, answered) = &*in_flight.0;
    let mut state = lock(slot);
    let awaited = match state.running {
        Some(running) => running,
        None => {
            let number = state.started + 1;
            let (url, shared) = (url.to_owned(), Arc::clone(&in_flight.0));
            let spawned = std::thread::Builder::new().name("dployr-health-migrations".into()).spawn(move || {
                // A panic must still end the probe: else it stays running
                // and every later call waits out its bound for nothing.
                let probe = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| migrations(&url, pool, bound)))
                    .unwrap_or_else(|_| MigrationsProbe {
                        up_to_date: false,
                        pending: Vec::new(),
                        newer: Vec::new(),
                        duration: Duration::ZERO,
                        error: Some("the probe of the migrations panicked".into()),
                    });
                let (slot, answered) = &*shared;
                let mut state = lock(slot);
                state.running = None;
                state.answer = Some((number, probe));
                answered.notify_all();
            });
            if let Err(error) = spawned {
                return unanswered(format!("could not start the probe's thread: {error}"));
            }
            state.started = number;
            state.running = Some(number);
            number
        }
    };
    let deadline = started + bound;
    loop {
        if let Some((number, probe)) = &state.answer
            && *number >= awaited
        {
            return probe.clone();
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return unanswered(format!("the migrations' status did not come within {bound:?}"));
        }
        state = answered.wait_timeout(state, left).unwrap_or_else(PoisonError::into_inner).0;
    }
}

/// The migrations' status read over a connection of `pool` (the primary's,
/// when the migrations are there), else on `url`, giving up on a
/// connection that does not open within `bound` (the probe's own bound: a
/// thread left behind by a probe that outlived it ends no later than it
/// must).
fn migrations(url: &str, pool: Option<PgPool>, bound: Duration) -> MigrationsProbe {
    let started = Instant::now();
    let status = MigrationSet::embedded().map_err(|error| error.to_string()).and_then(|set| {
        let runner = MigrationRunner::new(url, set).with_connect_timeout(bound);
        match pool {
            Some(pool) => {
                let mut conn = pool.get().map_err(|error| error.to_string())?;
                runner.status_on(&mut conn).map_err(|error| error.to_string())
            }
            None => runner.status().map_err(|error| error.to_string()),
        }
    });
    let duration = started.elapsed();
    let lines = match status {
        Ok(lines) => lines,
        Err(error) => {
            return MigrationsProbe {
                up_to_date: false,
                pending: Vec::new(),
                newer: Vec::new(),
                duration,
                error: Some(error),
            };
        }
    };
    let pending: Vec<String> =
        lines.iter().filter(|line| line.state == MigrationState::Pending).map(|line| line.name.clone()).collect();
    // Versions are numbers (`015`) or timestamps: compared as numbers where
    // both are, else as text.
    let order = |a: &str, b: &str| match (a.parse::<u128>(), b.parse::<u128>()) {
        (Ok(a), Ok(b)) => a.cmp(&b),
        _ => a.cmp(b),
    };
    let latest_here = lines
        .iter()
        .filter(|line| !matches!(line.state, MigrationState::MissingFromSource { .. }))
        .map(|line| line.version.as_str())
        .max_by(|a, b| order(a, b));
    // As migrations on start tell a newer release's (one rule for both).
    let is_newer = |version: &str| latest_here.is_none_or(|latest| dployr_migrate::is_newer_version(version, latest));
    let newer: Vec<String> = lines
        .iter()
        .filter(|line| matches!(line.state, MigrationState::MissingFromSource { .. }) && is_newer(&line.version))
        .map(|line| line.name.clone())
        .collect();
    // An unknown migration below this binary's latest is not a newer
    // release's: one removed from the source, or another branch's.
    let problems: Vec<String> = lines
        .iter()
        .filter_map(|line| match line.state {
            MigrationState::Applied { checksum_matches: false, .. } => {
                Some(format!("{} changed since applied", line.name))
            }
            MigrationState::MissingFromSource { .. } if !is_newer(&line.version) => {
                Some(format!("{} applied but not in this binary, older than its latest", line.name))
            }
            _ => None,
        })
        .collect();
    MigrationsProbe {
        up_to_date: pending.is_empty() && problems.is_empty(),
        pending,
        newer,
        duration,
        error: (!problems.is_empty()).then(|| problems.join("; ")),
    }
}
