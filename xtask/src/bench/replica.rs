//! The run with one replica: a primary and a real streaming replica
//! (`dployr_testkit::ReplicatedServer`), the replica-safe reads routed to
//! it, next to the same reads on a pool opened straight on the replica
//! (same server, same statement, no routing and no lag check). The
//! difference is what routing and the lag check cost per read; every
//! routed read must have been answered by the replica (its pool's
//! statement count) and none by the primary.

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use dployr_data::pg::{PgClusterStore, PgInstanceStore, PgUserStore, ReplicaSet};
use dployr_data::{ClusterStore, InstanceStore, Page, PgPool, PoolConfig, ReplicaConfig, StoreResult, UserStore};
use dployr_testkit::ReplicatedServer;

use super::fixture::{self, Fixture};
use crate::Failure;

/// Stores over one pool.
struct Stores {
    users: PgUserStore,
    clusters: PgClusterStore,
    instances: PgInstanceStore,
}

impl Stores {
    fn new(pool: &PgPool) -> Self {
        Self {
            users: PgUserStore::new(pool.clone()),
            clusters: PgClusterStore::new(pool.clone()),
            instances: PgInstanceStore::new(pool.clone()),
        }
    }
}

type Read = fn(&Stores, &Fixture) -> StoreResult<()>;

fn reads() -> Vec<(&'static str, Read)> {
    vec![
        ("users.get", |s, f| s.users.get(&f.owner).map(drop)),
        ("clusters.pending_invites", |s, f| s.clusters.pending_invites(&f.owner).map(drop)),
        ("clusters.members (page of 20)", |s, f| s.clusters.members(&f.team, &Page::first(20)).map(drop)),
        ("instances.list_by_cluster (page of 20)", |s, f| {
            s.instances.list_by_cluster(&f.team, &Page::first(20)).map(drop)
        }),
    ]
}

/// Reads per second of `read` on `threads` threads for `seconds`, and how
/// many reads were made in all (the warm-up's too).
fn rate(
    stores: &Arc<Stores>,
    fixture: &Arc<Fixture>,
    read: Read,
    threads: usize,
    seconds: Duration,
) -> Result<(f64, u64), Failure> {
    let warm_up = Instant::now() + Duration::from_millis(200);
    let mut warm_up_reads = 0;
    while Instant::now() < warm_up {
        read(stores, fixture)?;
        warm_up_reads += 1;
    }
    let start = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (stores, fixture, start) = (Arc::clone(stores), Arc::clone(fixture), Arc::clone(&start));
            std::thread::spawn(move || -> StoreResult<u64> {
                start.wait();
                let deadline = Instant::now() + seconds;
                let mut done = 0;
                while Instant::now() < deadline {
                    read(&stores, &fixture)?;
                    done += 1;
                }
                Ok(done)
            })
        })
        .collect();
    let mut total = 0;
    for handle in handles {
        total += handle.join().map_err(|_| "a benchmark thread panicked")??;
    }
    Ok((total as f64 / seconds.as_secs_f64(), total + warm_up_reads))
}

/// Rounds of each pair, alternating; the best of each is kept.
const ROUNDS: usize = 5;

/// One line of the replica run.
pub struct ReplicaRow {
    pub name: &'static str,
    pub threads: usize,
    pub primary: f64,
    pub routed: f64,
    pub direct: f64,
    pub replica_share: f64,
}

/// The rows of the replica run, and the check's cost per thread count.
pub type ReplicaRun = (Vec<ReplicaRow>, Vec<CheckCost>);

/// What the routing check costs on its own, in nanoseconds per read.
pub struct CheckCost {
    pub threads: usize,
    pub nanos: f64,
}

/// Times `ReplicaSet::check` (the whole decision a routed read makes before
/// it runs: thread scope, round robin, sample age, lag) on `threads` threads
/// at once, a million calls each.
fn check_cost(pool: &PgPool, threads: usize) -> Result<CheckCost, Failure> {
    const CALLS: u32 = 1_000_000;
    let replicas = pool.replicas().ok_or("no replicas")?;
    let start = Barrier::new(threads);
    let elapsed: Vec<Duration> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    start.wait();
                    let began = Instant::now();
                    let mut routed = 0_u32;
                    for _ in 0..CALLS {
                        routed += u32::from(std::hint::black_box(replicas.check()).is_some());
                    }
                    (began.elapsed(), routed)
                })
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|handle| handle.join().ok())
            .filter(|(_, routed)| *routed == CALLS)
            .map(|(d, _)| d)
            .collect()
    });
    if elapsed.len() != threads {
        return Err("a check thread failed or found the replica out of rotation".into());
    }
    let mean = elapsed.iter().sum::<Duration>().as_secs_f64() / threads as f64;
    Ok(CheckCost { threads, nanos: mean * 1e9 / f64::from(CALLS) })
}

/// Runs the reads on the primary, routed to the replica, and straight on
/// the replica; `Ok(None)` (with the reason printed) without local server
/// binaries.
pub fn run(threads: &[usize], seconds: Duration, progress: &dyn Fn(&str)) -> Result<Option<ReplicaRun>, Failure> {
    progress("starting a primary and a streaming replica (pg_basebackup -R)");
    let Some(server) = ReplicatedServer::start()? else {
        eprintln!("replica run {}", dployr_testkit::replica::SKIP);
        return Ok(None);
    };
    let mut conn = diesel::Connection::establish(server.primary_url())?;
    let fixture = Arc::new(fixture::load(&mut conn)?);
    server.wait_for_replay(Duration::from_secs(120))?;

    let max_threads = threads.iter().copied().max().unwrap_or(1);
    let config = PoolConfig { max_size: u32::try_from(max_threads)?, ..PoolConfig::default() };
    let primary_pool = PgPool::connect(server.primary_url(), config)?;
    let routed_pool = PgPool::connect(server.primary_url(), config)?;
    let urls = [server.replica_url().to_owned()];
    let routed_pool = {
        let set = ReplicaSet::connect(&routed_pool, &urls, "replica", config, ReplicaConfig::default())?;
        routed_pool.with_replicas(set)
    };
    let direct_pool = PgPool::connect(server.replica_url(), config)?;
    let started = Instant::now();
    while !routed_pool.replicas().is_some_and(|set| set.status().iter().all(|status| status.in_rotation)) {
        if started.elapsed() > Duration::from_secs(30) {
            return Err("the replica did not enter rotation within 30 s".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let replica_statements = || -> u64 {
        routed_pool.replicas().map_or(0, |set| set.pools().map(|(_, pool)| pool.stats().statements).sum())
    };
    let (primary, routed, direct) = (
        Arc::new(Stores::new(&primary_pool)),
        Arc::new(Stores::new(&routed_pool)),
        Arc::new(Stores::new(&direct_pool)),
    );

    let mut rows = Vec::new();
    for (name, read) in reads() {
        for &threads in threads {
            progress(&format!("replica run: {name} at {threads} thread(s)"));
            let (mut best_primary, mut best_routed, mut best_direct) = (0.0_f64, 0.0_f64, 0.0_f64);
            let (on_primary_before, on_replica_before) = (routed_pool.stats().statements, replica_statements());
            let mut routed_reads = 0;
            for _ in 0..ROUNDS {
                best_direct = best_direct.max(rate(&direct, &fixture, read, threads, seconds)?.0);
                let (routed_rate, reads) = rate(&routed, &fixture, read, threads, seconds)?;
                routed_reads += reads;
                best_routed = best_routed.max(routed_rate);
                best_primary = best_primary.max(rate(&primary, &fixture, read, threads, seconds)?.0);
            }
            let on_primary = routed_pool.stats().statements - on_primary_before;
            let on_replica = replica_statements() - on_replica_before;
            if on_primary > 0 {
                let status = routed_pool.replicas().map(ReplicaSet::status).unwrap_or_default();
                return Err(format!(
                    "{name}: {on_primary} routed reads reached the primary; the replica's status and reads that \
                     passed it over since it was opened, by reason: {status:?}"
                )
                .into());
            }
            let replica_share = on_replica as f64 / routed_reads.max(1) as f64;
            rows.push(ReplicaRow {
                name,
                threads,
                primary: best_primary,
                routed: best_routed,
                direct: best_direct,
                replica_share,
            });
        }
    }
    progress("replica run: timing the routing check alone");
    let costs = threads.iter().map(|&threads| check_cost(&routed_pool, threads)).collect::<Result<Vec<_>, _>>()?;
    Ok(Some((rows, costs)))
}

/// Prints the run's table.
pub fn report(rows: &[ReplicaRow], costs: &[CheckCost]) {
    println!(
        "\nwith one streaming replica: the same read on the primary, routed (replica within 1000 ms, lag sampled once a\n\
         second), and on a pool straight on the replica; check cost = 1 - routed / straight (best of {ROUNDS} alternating runs)\n"
    );
    println!(
        "{:<40} {:>7} {:>10} {:>10} {:>10} {:>11} {:>10}",
        "read", "threads", "primary/s", "routed/s", "replica/s", "check cost", "on replica"
    );
    for row in rows {
        println!(
            "{:<40} {:>7} {:>10.0} {:>10.0} {:>10.0} {:>10.1}% {:>9.0}%",
            row.name,
            row.threads,
            row.primary,
            row.routed,
            row.direct,
            (1.0 - row.routed / row.direct.max(1.0)) * 100.0,
            row.replica_share * 100.0
        );
    }
    println!(
        "\nthe routing check alone (ReplicaSet::check: scope, round robin, sample age, lag; a million calls per thread),\n\
         against the mean time of one routed read at the same thread count (threads / routed reads per second):"
    );
    for cost in costs {
        let reads: Vec<&ReplicaRow> = rows.iter().filter(|row| row.threads == cost.threads).collect();
        let share: Vec<String> = reads
            .iter()
            .map(|row| {
                let read_nanos = cost.threads as f64 / row.routed.max(1.0) * 1e9;
                format!("{} {:.3}%", row.name, cost.nanos / read_nanos * 100.0)
            })
            .collect();
        println!("  {} thread(s): {:.0} ns per check; of a read: {}", cost.threads, cost.nanos, share.join(", "));
    }
}
