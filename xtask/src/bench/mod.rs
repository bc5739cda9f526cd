//! `cargo xtask bench`: the data layer's operations under load, each read
//! next to its physical limit measured in the same run (see `limit`), on a
//! database loaded with `fixture` on the test kit's server
//! (`DPLOYR_TEST_DATABASE_URL`'s, else `DATABASE_URL`'s, else a throwaway
//! PostgreSQL); then the replica run (`replica`) on a primary and replica of
//! its own.
//!
//! Options: `--threads 1,16`, `--seconds 1` (per run), `--rounds 2` (runs of
//! each read and of its limit, alternating, the best of each kept; more
//! rounds steady a ratio on a machine with other work; the replica run keeps
//! its own 5), `--ops <substring>[,...]`
//! (each must match an operation, or be `replica`: `--ops replica` alone runs
//! the replica run and nothing else), `--json <file>`. The row `users.get_by_email (async facade)` runs the
//! same read through `AsyncDataLayer` from as many tokio tasks as the
//! synchronous row has threads (a runtime with a worker per core), in turns
//! with the synchronous store, and the report gives the ratio of the two. It runs itself in release mode: a debug build would
//! measure the compiler's output, not the data layer.
//!
//! Each row also gives the client's CPU time per operation (`usage`: this
//! process's for the store, pgbench's own for its limit), so a ratio below
//! 1 shows how much of the gap is the client's work (decoding, the pool,
//! thread hand-offs) and not the statement's; the async rows give the
//! context switches per call as well.

mod fixture;
mod limit;
mod replica;
mod usage;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use dployr_data::kv::{MemoryKv, PgKv};
use dployr_data::pg::{PgBootstrapTokenStore, PgClusterStore, PgInstanceStore, PgUserStore, RecordStatements};
use dployr_data::{
    AsyncDataLayer, BootstrapTokenStore, ClusterStore, Config, Cursor, DataLayer, Email, InstanceStore,
    KvBackendConfig, KvStore, Metadata, NewInstance, NewUser, Page, PgPool, PoolConfig, Provider, SessionId,
    StoreResult, UserStore,
};
use dployr_migrate::{MigrationRunner, MigrationSet};

use crate::Failure;
use fixture::Fixture;
use limit::{Limit, Recorded};
use usage::Usage;

/// Command-line options.
struct Options {
    threads: Vec<usize>,
    seconds: Duration,
    /// Runs of each read, and of its limit, in turns; the best of each is kept.
    rounds: usize,
    /// The `--ops` substrings other than `replica`; `None` without `--ops`:
    /// every operation.
    filter: Option<Vec<String>>,
    /// Whether the replica run is wanted: without `--ops`, or with `replica`
    /// among them.
    replica: bool,
    /// Absolute: the release build runs in the workspace root.
    json: Option<PathBuf>,
}

impl Options {
    /// Whether the row `name` is wanted.
    fn wanted(&self, name: &str) -> bool {
        self.filter.as_ref().is_none_or(|terms| terms.iter().any(|term| name.contains(term.as_str())))
    }

    /// Whether any row of the main run (the fixture's) is wanted: not for
    /// `--ops replica` alone, which needs none of its clones, migrations
    /// or fixture (the replica run loads a fixture on its own primary).
    fn main_run(&self) -> bool {
        self.filter.as_ref().is_none_or(|terms| !terms.is_empty())
    }
}

/// The `--ops` value split into its substrings, `replica` apart; refused
/// when one matches no row, before anything starts.
fn ops_filter(value: &str) -> Result<(Vec<String>, bool), Failure> {
    let names: Vec<&str> =
        operations().iter().map(|op| op.name).chain([ASYNC_ROW, ASYNC_IN_PLACE_ROW, ASYNC_PAIR_ROW]).collect();
    let (mut terms, mut replica) = (Vec::new(), false);
    for term in value.split(',').map(str::trim) {
        if term == "replica" {
            replica = true;
        } else if !term.is_empty() && names.iter().any(|name| name.contains(term)) {
            terms.push(term.to_owned());
        } else {
            return Err(format!(
                "--ops: `{term}` matches no operation; give substrings of these, separated by commas, or `replica` \
                 (the run with a streaming replica):\n  {}",
                names.join("\n  ")
            )
            .into());
        }
    }
    Ok((terms, replica))
}

fn options(args: &[&str]) -> Result<Options, Failure> {
    let mut options = Options {
        threads: vec![1, 16],
        seconds: Duration::from_secs(1),
        rounds: DEFAULT_ROUNDS,
        filter: None,
        replica: true,
        json: None,
    };
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = || args.next().copied().ok_or_else(|| format!("{arg} needs a value"));
        match *arg {
            "--threads" => {
                options.threads = value()?
                    .split(',')
                    .map(|n| n.trim().parse::<usize>().map_err(|_| format!("--threads: {n:?} is not a number")))
                    .collect::<Result<_, _>>()?;
                if options.threads.contains(&0) {
                    return Err("--threads: at least 1".into());
                }
            }
            "--seconds" => {
                let secs: u64 = value()?.parse().map_err(|_| "--seconds takes a whole number")?;
                options.seconds = Duration::from_secs(secs.max(1));
            }
            "--rounds" => {
                options.rounds = value()?
                    .parse::<usize>()
                    .ok()
                    .filter(|rounds| *rounds >= 1)
                    .ok_or("--rounds takes a whole number, at least 1")?;
            }
            "--ops" => {
                let (terms, replica) = ops_filter(value()?)?;
                (options.filter, options.replica) = (Some(terms), replica);
            }
            "--json" => {
                // Against the caller's directory, not the workspace root the
                // release build runs in.
                let path = value()?;
                options.json =
                    Some(std::path::absolute(path).map_err(|e| format!("--json: cannot make `{path}` absolute: {e}"))?);
            }
            other => return Err(format!("unknown option {}; see `cargo xtask help`", crate::shown(&[other])).into()),
        }
    }
    Ok(options)
}

/// Entry point: re-runs itself in release mode unless it already is.
pub fn run(args: &[&str]) -> Result<(), Failure> {
    let options = options(args)?;
    if cfg!(debug_assertions) {
        eprintln!("building the benchmark in release mode (the first build takes a few minutes)...");
        // The same arguments, with `--json`'s path made absolute: the
        // release build runs in the workspace root.
        let mut forwarded: Vec<std::ffi::OsString> = Vec::with_capacity(args.len());
        for (i, arg) in args.iter().enumerate() {
            match (i.checked_sub(1).and_then(|before| args.get(before)), &options.json) {
                (Some(&"--json"), Some(path)) => forwarded.push(path.clone().into_os_string()),
                _ => forwarded.push((*arg).into()),
            }
        }
        let status = std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["run", "--quiet", "--release", "-p", "xtask", "--", "bench"])
            .args(forwarded)
            .current_dir(crate::workspace_root())
            .status()?;
        return if status.success() { Ok(()) } else { Err("the release benchmark failed".into()) };
    }
    bench(&options)
}

/// The stores of one pool.
struct Stores {
    pool: PgPool,
    users: PgUserStore,
    clusters: PgClusterStore,
    instances: PgInstanceStore,
    tokens: PgBootstrapTokenStore,
    kv_pg: KvStore,
}

impl Stores {
    fn open(url: &str, config: PoolConfig) -> Result<Self, Failure> {
        let pool = PgPool::connect(url, config)?;
        Ok(Self {
            users: PgUserStore::new(pool.clone()),
            clusters: PgClusterStore::new(pool.clone()),
            instances: PgInstanceStore::new(pool.clone()),
            tokens: PgBootstrapTokenStore::new(pool.clone()),
            kv_pg: KvStore::new(Arc::new(PgKv::new(pool.clone()))),
            pool,
        })
    }
}

/// What every operation may use.
struct Context {
    fixture: Fixture,
    kv_memory: KvStore,
    session: SessionId,
    members_deep: Cursor,
    instances_deep: Cursor,
    counter: AtomicU64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Scale,
}

type Work = dyn Fn(&Stores, &Context) -> StoreResult<()> + Send + Sync;

struct Op {
    name: &'static str,
    kind: Kind,
    /// Whether it goes through PostgreSQL (else: the memory key-value backend).
    postgres: bool,
    work: Arc<Work>,
}

fn op(
    name: &'static str,
    kind: Kind,
    work: impl Fn(&Stores, &Context) -> StoreResult<()> + Send + Sync + 'static,
) -> Op {
    Op { name, kind, postgres: !name.contains("(memory)"), work: Arc::new(work) }
}

fn operations() -> Vec<Op> {
    let next = |c: &Context| c.counter.fetch_add(1, Ordering::Relaxed);
    vec![
        op("users.get_by_email", Kind::Read, |s, c| s.users.get_by_email(&c.fixture.owner_email).map(drop)),
        op("users.get", Kind::Read, |s, c| s.users.get(&c.fixture.owner).map(drop)),
        op("clusters.get (50 members)", Kind::Read, |s, c| s.clusters.get(&c.fixture.team).map(drop)),
        op("clusters.role_of", Kind::Read, |s, c| s.clusters.role_of(&c.fixture.owner, &c.fixture.team).map(drop)),
        op("clusters.can_write", Kind::Read, |s, c| s.clusters.can_write(&c.fixture.owner, &c.fixture.team).map(drop)),
        op("clusters.user_clusters", Kind::Read, |s, c| s.clusters.user_clusters(&c.fixture.owner).map(drop)),
        op("clusters.members (page of 20)", Kind::Read, |s, c| {
            s.clusters.members(&c.fixture.team, &Page::first(20)).map(drop)
        }),
        op("instances.list_by_cluster (page of 20)", Kind::Read, |s, c| {
            s.instances.list_by_cluster(&c.fixture.team, &Page::first(20)).map(drop)
        }),
        op("kv.get_session (postgres)", Kind::Read, |s, c| s.kv_pg.get_session(&c.session).map(drop)),
        op("kv.get_session (memory)", Kind::Read, |_, c| c.kv_memory.get_session(&c.session).map(drop)),
        op("users.upsert (existing, with metadata)", Kind::Write, move |s, c| {
            let n = next(c);
            let email = Email::parse(&format!("signin{}@bench.io", 1 + n % fixture::SIGN_IN_USERS as u64))?;
            let metadata = Metadata::try_from(serde_json::json!({ "lastSignIn": n }))?;
            s.users.upsert(NewUser { metadata: Some(metadata), ..NewUser::new(email, Provider::Google) }).map(drop)
        }),
        op("instances.create", Kind::Write, move |s, c| {
            let n = next(c);
            let new = NewInstance {
                address: format!("bench-{n}.example").try_into()?,
                tag: format!("bench-{n}").try_into()?,
                metadata: None,
            };
            s.instances.create(&c.fixture.team, new).map(drop)
        }),
        // Invitations, all into one cluster: its listing totals are one row
        // that every membership write of the cluster changes.
        op("clusters.add_users (one new e-mail, one cluster)", Kind::Write, move |s, c| {
            let invitee = Email::parse(&format!("invitee{}@bench.io", next(c)))?;
            s.clusters.add_users(&c.fixture.deep_instances, &[invitee]).map(drop)
        }),
        op("bootstrap_tokens.mark_used", Kind::Write, move |s, c| {
            let n = 1 + next(c) % fixture::TOKENS as u64;
            s.tokens.mark_used(&format!("nonce-{n}").try_into()?).map(drop)
        }),
        op("kv.create_session (postgres)", Kind::Write, |s, c| {
            let user = dployr_data::User {
                id: c.fixture.owner,
                email: c.fixture.owner_email.clone(),
                name: "Owner".into(),
                picture: None,
                provider: Provider::Github,
                metadata: Metadata::new(),
                created_at: chrono::Utc::now(),
                updated_at: chrono::Utc::now(),
            };
            s.kv_pg.create_session(&SessionId::generate(), &user, Vec::new()).map(drop)
        }),
        op("kv.create_otp + validate_otp (postgres)", Kind::Write, move |s, c| {
            let email = Email::parse(&format!("otp{}@bench.io", next(c)))?;
            let code = s.kv_pg.create_otp(&email)?;
            s.kv_pg.validate_otp(&email, &code).map(drop)
        }),
        op("clusters.members, first page (100 000 members)", Kind::Scale, |s, c| {
            s.clusters.members(&c.fixture.deep_members, &Page::first(20)).map(drop)
        }),
        op("clusters.members, page 90 000 rows deep", Kind::Scale, |s, c| {
            s.clusters.members(&c.fixture.deep_members, &Page::after(c.members_deep.clone(), 20)).map(drop)
        }),
        op("instances.list_by_cluster, first page (100 000)", Kind::Scale, |s, c| {
            s.instances.list_by_cluster(&c.fixture.deep_instances, &Page::first(20)).map(drop)
        }),
        op("instances.list_by_cluster, page 90 000 rows deep", Kind::Scale, |s, c| {
            s.instances.list_by_cluster(&c.fixture.deep_instances, &Page::after(c.instances_deep.clone(), 20)).map(drop)
        }),
    ]
}

/// Measurements of each read (and of its limit) without `--rounds`; the
/// best is kept.
const DEFAULT_ROUNDS: usize = 2;

/// How long an operation runs unmeasured before each measurement.
const WARM_UP: Duration = Duration::from_millis(200);

/// How many calls each thread makes unmeasured at least, however long they
/// take: the first run at 16 threads opens 15 connections one after
/// another (the pool opens one at a time per URL), which can take longer
/// than [`WARM_UP`].
const WARM_UP_CALLS: u32 = 50;

/// One measured run.
#[derive(Clone, Copy)]
struct Measured {
    ops: u64,
    ops_per_sec: f64,
    p50: Duration,
    p99: Duration,
    statements_per_op: f64,
    /// This process's CPU time per operation: the client's side of a call.
    cpu_per_op: Duration,
    /// This process's context switches per operation.
    switches_per_op: f64,
}

fn measure(
    stores: &Arc<Stores>,
    context: &Arc<Context>,
    op: &Op,
    threads: usize,
    seconds: Duration,
) -> Result<Measured, Failure> {
    // Warm-up, not measured, on every thread that is then measured: as many
    // connections opened as the run uses, each with its statements
    // prepared, caches hot. (pgbench, the limit, opens its connections
    // before its clock starts too; a warm-up on one thread left the first
    // run at N threads opening N-1 connections inside its measured time.)
    let warm_up = Instant::now() + WARM_UP;
    // The measuring threads and this one: warmed up, then started together
    // once this thread has taken the figures the run is measured from.
    let warmed = Arc::new(Barrier::new(threads + 1));
    let start = Arc::new(Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (stores, context, work, warmed, start) = (
                Arc::clone(stores),
                Arc::clone(context),
                Arc::clone(&op.work),
                Arc::clone(&warmed),
                Arc::clone(&start),
            );
            std::thread::spawn(move || -> StoreResult<Vec<u32>> {
                // A failure here is reported after the barriers, so that
                // no thread waits for one that returned early.
                let (mut warm, mut calls) = (Ok(()), 0);
                while warm.is_ok() && (Instant::now() < warm_up || calls < WARM_UP_CALLS) {
                    warm = work(&stores, &context);
                    calls += 1;
                }
                warmed.wait();
                start.wait();
                warm?;
                let deadline = Instant::now() + seconds;
                let mut latencies = Vec::with_capacity(65_536);
                while Instant::now() < deadline {
                    let began = Instant::now();
                    work(&stores, &context)?;
                    latencies.push(u32::try_from(began.elapsed().as_micros()).unwrap_or(u32::MAX));
                }
                Ok(latencies)
            })
        })
        .collect();
    warmed.wait();
    let before = stores.pool.stats();
    let usage = Usage::of_this_process();
    start.wait();
    let usage = usage?;
    let mut latencies = Vec::new();
    for handle in handles {
        latencies.extend(handle.join().map_err(|_| "a benchmark thread panicked")??);
    }
    let usage = Usage::of_this_process()? - usage;
    Ok(Measured::of(latencies, seconds, (stores.pool.stats() - before).statements, usage))
}

impl Measured {
    /// The figures of one run: every call's latency in µs, the run's
    /// length, the statements the pool sent and the process's usage meanwhile.
    fn of(mut latencies: Vec<u32>, seconds: Duration, statements: u64, usage: Usage) -> Self {
        latencies.sort_unstable();
        let ops = latencies.len() as u64;
        let at = |q: f64| {
            Duration::from_micros(u64::from(latencies.get(((ops as f64 - 1.0) * q) as usize).copied().unwrap_or(0)))
        };
        Self {
            ops,
            ops_per_sec: ops as f64 / seconds.as_secs_f64(),
            p50: at(0.50),
            p99: at(0.99),
            statements_per_op: if ops == 0 { 0.0 } else { statements as f64 / ops as f64 },
            cpu_per_op: usage.cpu_per(ops),
            switches_per_op: usage.switches_per(ops),
        }
    }
}

/// The name of the async facade's row, next to the synchronous `users.get_by_email`.
const ASYNC_ROW: &str = "users.get_by_email (async facade)";

/// The same through the facade that runs calls in place (`AsyncDataLayer::in_place`).
const ASYNC_IN_PLACE_ROW: &str = "users.get_by_email (async facade, in place)";

/// The synchronous `users.get_by_email`, measured in turns with [`ASYNC_ROW`].
const ASYNC_PAIR_ROW: &str = "users.get_by_email (sync, paired with async)";

/// `users.get_by_email` through [`AsyncDataLayer`] from `tasks` tokio tasks
/// on a multi-thread runtime with a worker per core: what an axum server
/// does, measured like [`measure`] measures threads.
fn measure_async(data: &AsyncDataLayer, email: &Email, tasks: usize, seconds: Duration) -> Result<Measured, Failure> {
    let workers = std::thread::available_parallelism().map_or(2, usize::from);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(workers).enable_all().build()?;
    let pool = data.blocking().pool().clone();
    runtime.block_on(async {
        // Warm-up, not measured, on every task that is then measured (as
        // `measure` does): connections opened, the facade's threads running.
        let warm_up = Instant::now() + WARM_UP;
        let warmed = Arc::new(tokio::sync::Barrier::new(tasks + 1));
        let start = Arc::new(tokio::sync::Barrier::new(tasks + 1));
        let handles: Vec<_> = (0..tasks)
            .map(|_| {
                let (users, email, warmed, start) =
                    (data.users(), email.clone(), Arc::clone(&warmed), Arc::clone(&start));
                tokio::spawn(async move {
                    let (mut warm, mut calls) = (Ok(()), 0);
                    while warm.is_ok() && (Instant::now() < warm_up || calls < WARM_UP_CALLS) {
                        warm = users.get_by_email(&email).await.map(drop);
                        calls += 1;
                    }
                    warmed.wait().await;
                    start.wait().await;
                    warm?;
                    let deadline = Instant::now() + seconds;
                    let mut latencies = Vec::with_capacity(65_536);
                    while Instant::now() < deadline {
                        let began = Instant::now();
                        users.get_by_email(&email).await?;
                        latencies.push(u32::try_from(began.elapsed().as_micros()).unwrap_or(u32::MAX));
                    }
                    Ok::<_, dployr_data::StoreError>(latencies)
                })
            })
            .collect();
        warmed.wait().await;
        let before = pool.stats();
        let usage = Usage::of_this_process();
        start.wait().await;
        let usage = usage?;
        let mut latencies = Vec::new();
        for handle in handles {
            latencies.extend(handle.await.map_err(|_| "a benchmark task panicked")??);
        }
        let usage = Usage::of_this_process()? - usage;
        Ok(Measured::of(latencies, seconds, (pool.stats() - before).statements, usage))
    })
}

/// One line of the report.
struct Row {
    name: &'static str,
    threads: usize,
    measured: Measured,
    limit: Option<Limit>,
}

fn bench(options: &Options) -> Result<(), Failure> {
    let started = Instant::now();
    let progress = |text: &str| eprintln!("[{:>5.1}s] {text}", started.elapsed().as_secs_f64());
    if options.main_run() {
        main_run(options, &progress)?;
    }
    let replica_run = if options.replica { replica::run(&options.threads, options.seconds, &progress)? } else { None };
    if options.replica && replica_run.is_none() && !options.main_run() {
        // `--ops replica` alone: nothing was measured, and no `--json` written.
        return Err("the replica run could not start (the reason is printed above): nothing was measured".into());
    }
    if let Some((replica_rows, check_costs)) = replica_run {
        replica::report(&replica_rows, &check_costs);
        if let Some(path) = &options.json {
            // Added to what the main run wrote, if it ran; else on its own.
            let mut json: serde_json::Value = if options.main_run() {
                serde_json::from_str(&std::fs::read_to_string(path)?)?
            } else {
                serde_json::json!({
                    "cores": std::thread::available_parallelism().map_or(0, usize::from),
                    "seconds_per_run": options.seconds.as_secs(),
                })
            };
            json["replica"] = replica_rows
                .iter()
                .map(|row| {
                    serde_json::json!({
                        "read": row.name,
                        "threads": row.threads,
                        "primary_per_sec": row.primary,
                        "routed_per_sec": row.routed,
                        "replica_direct_per_sec": row.direct,
                        "check_cost": 1.0 - row.routed / row.direct.max(1.0),
                        "answered_by_replica": row.replica_share,
                    })
                })
                .collect();
            json["replica_check_ns"] = check_costs
                .iter()
                .map(|cost| serde_json::json!({"threads": cost.threads, "nanos_per_check": cost.nanos}))
                .collect();
            std::fs::write(path, serde_json::to_string_pretty(&json)?)?;
            if options.main_run() {
                println!("added the replica run to {}", path.display());
            } else {
                println!("wrote {}", path.display());
            }
        }
    }
    progress("done");
    Ok(())
}

/// Every operation (of those wanted) on the fixture, next to its limit,
/// with the tooling's timings (database clones, migrations).
fn main_run(options: &Options, progress: &dyn Fn(&str)) -> Result<(), Failure> {
    progress("starting PostgreSQL");
    let server = dployr_testkit::server()?;
    let bindir = server.bindir().map(PathBuf::from).or_else(dployr_testkit::local::find_bindir);

    // Tooling: a per-test database clone (median of 100) and a migration to head.
    progress("timing 100 per-test database clones");
    let mut clones = Vec::new();
    for _ in 0..100 {
        let began = Instant::now();
        let db = dployr_testkit::try_database()?;
        clones.push(began.elapsed());
        drop(db);
    }
    progress("timing migrations of an empty database to head (median of 10)");
    let mut migrations = Vec::new();
    for _ in 0..10 {
        let db = dployr_testkit::try_empty_database()?;
        let began = Instant::now();
        MigrationRunner::new(db.url(), MigrationSet::embedded()?).run_pending(&mut |_| {})?;
        migrations.push(began.elapsed());
    }

    progress(
        "loading the fixture (100 000 members, 100 000 instances, 100 000 sessions, 200 000 tokens, 10 000 small clusters)",
    );
    let db = dployr_testkit::try_database()?;
    let fixture = fixture::load(&mut db.connect())?;
    let max_threads = options.threads.iter().copied().max().unwrap_or(1);
    let pool_config = PoolConfig { max_size: u32::try_from(max_threads)?, ..PoolConfig::default() };
    let stores = Arc::new(Stores::open(db.url(), pool_config)?);
    let recording = Stores::open(
        db.url(),
        PoolConfig { max_size: 1, record_statements: RecordStatements::SqlWithBinds, ..PoolConfig::default() },
    )?;

    let kv_memory = KvStore::new(Arc::new(MemoryKv::new()));
    let session = SessionId::generate();
    let owner = stores.users.get(&fixture.owner)?.ok_or("the fixture's owner is missing")?;
    stores.kv_pg.create_session(&session, &owner, stores.clusters.user_clusters(&owner.id)?)?;
    kv_memory.create_session(&session, &owner, Vec::new())?;
    // The cursors of pages 90 000 rows deep: the page after row 90 000.
    let members_deep = stores
        .clusters
        .members(&fixture.deep_members, &Page::offset(89_999, 1))?
        .next
        .ok_or("no deep member cursor")?;
    let instances_deep = stores
        .instances
        .list_by_cluster(&fixture.deep_instances, &Page::offset(89_999, 1))?
        .next
        .ok_or("no deep instance cursor")?;
    let context =
        Arc::new(Context { fixture, kv_memory, session, members_deep, instances_deep, counter: AtomicU64::new(0) });

    let ops: Vec<Op> = operations().into_iter().filter(|op| options.wanted(op.name)).collect();
    let total = ops.len() * options.threads.len();
    let mut rows = Vec::new();
    for op in &ops {
        // The statement a read sends, with its values, for pgbench.
        let statement = if op.kind != Kind::Write && op.postgres {
            (op.work)(&recording, &context)?;
            let text = recording.pool.recent_statements().pop().ok_or("nothing was recorded")?;
            Some(Recorded::parse(&text)?)
        } else {
            None
        };
        for &threads in &options.threads {
            progress(&format!("[{}/{total}] {} at {threads} thread(s)", rows.len() + 1, op.name));
            // Store and limit alternate, `--rounds` times each; the best of each
            // is kept, so a moment of interference on this shared machine
            // does not decide a ratio.
            let mut measured: Option<Measured> = None;
            let mut limit: Option<Limit> = None;
            // Reads are compared with their limit: best of `--rounds`. Writes and
            // the deep-page pairs are compared with nothing or each other: one.
            let rounds = if op.kind == Kind::Read { options.rounds } else { 1 };
            for _ in 0..rounds {
                let round = measure(&stores, &context, op, threads, options.seconds)?;
                if measured.is_none_or(|best| round.ops_per_sec > best.ops_per_sec) {
                    measured = Some(round);
                }
                if let (Some(statement), Some(bindir)) = (&statement, &bindir) {
                    let round = limit::pgbench(bindir, db.url(), statement, threads, options.seconds)?;
                    if limit.is_none_or(|best| round.per_sec > best.per_sec) {
                        limit = Some(round);
                    }
                }
            }
            let measured = measured.ok_or("no round was measured")?;
            rows.push(Row { name: op.name, threads, measured, limit });
        }
    }

    // The three async rows are measured together: any of them asks for all.
    if [ASYNC_ROW, ASYNC_IN_PLACE_ROW, ASYNC_PAIR_ROW].iter().any(|name| options.wanted(name)) {
        // A data layer of its own on the same database, with a pool as large
        // as the synchronous stores' (migrations are already applied).
        let config = Config::new(db.url()).with_kv(KvBackendConfig::Memory).with_pool(pool_config);
        let data = DataLayer::open(config)?.into_async();
        let sync_op = operations().into_iter().find(|op| op.name == "users.get_by_email").ok_or("no sync row")?;
        for &threads in &options.threads {
            progress(&format!("{ASYNC_ROW} at {threads} task(s), alternating with in place and the synchronous store"));
            // The async facade (its threads, then in place) and the
            // synchronous store alternate, `--rounds` times each, best of each
            // kept: on a shared machine all face the same interference, and
            // the ratios compare like with like.
            let in_place = data.in_place();
            let (mut measured, mut in_place_best, mut sync_best): (
                Option<Measured>,
                Option<Measured>,
                Option<Measured>,
            ) = (None, None, None);
            let keep_best = |best: &mut Option<Measured>, round: Measured| {
                if best.is_none_or(|best| round.ops_per_sec > best.ops_per_sec) {
                    *best = Some(round);
                }
            };
            for _ in 0..options.rounds {
                keep_best(&mut measured, measure_async(&data, &context.fixture.owner_email, threads, options.seconds)?);
                keep_best(
                    &mut in_place_best,
                    measure_async(&in_place, &context.fixture.owner_email, threads, options.seconds)?,
                );
                keep_best(&mut sync_best, measure(&stores, &context, &sync_op, threads, options.seconds)?);
            }
            let (measured, in_place_best, sync_best) =
                (measured.ok_or("no round")?, in_place_best.ok_or("no round")?, sync_best.ok_or("no round")?);
            rows.push(Row { name: ASYNC_ROW, threads, measured, limit: None });
            rows.push(Row { name: ASYNC_IN_PLACE_ROW, threads, measured: in_place_best, limit: None });
            rows.push(Row { name: ASYNC_PAIR_ROW, threads, measured: sync_best, limit: None });
        }
    }

    report(&rows, &clones, &migrations, options)
}

fn median(samples: &[Duration]) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    sorted.get(sorted.len() / 2).copied().unwrap_or_default()
}

fn report(rows: &[Row], clones: &[Duration], migrations: &[Duration], options: &Options) -> Result<(), Failure> {
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    println!(
        "\ndployr data layer benchmark: {cores} cores; reads: best of {} runs of {} s each for the store and for its limit\n\
         (pgbench -M prepared of the same statement with as many clients as threads), alternating\n",
        options.rounds,
        options.seconds.as_secs()
    );
    println!(
        "{:<48} {:>7} {:>10} {:>9} {:>9} {:>9} {:>9} {:>10} {:>9} {:>7}",
        "operation", "threads", "ops/s", "p50", "p99", "stmts/op", "cpu/op", "limit/s", "cpu/op", "ratio"
    );
    let micros = |d: Duration| format!("{:.0} µs", d.as_secs_f64() * 1e6);
    for row in rows {
        let m = row.measured;
        let (limit, limit_cpu, ratio) = match row.limit {
            Some(limit) => (
                format!("{:.0}", limit.per_sec),
                format!("{:.1} µs", limit.cpu_per_op.as_secs_f64() * 1e6),
                format!("{:.2}", m.ops_per_sec / limit.per_sec),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        println!(
            "{:<48} {:>7} {:>10.0} {:>9} {:>9} {:>9.2} {:>9} {:>10} {:>9} {:>7}",
            row.name,
            row.threads,
            m.ops_per_sec,
            micros(m.p50),
            micros(m.p99),
            m.statements_per_op,
            format!("{:.1} µs", m.cpu_per_op.as_secs_f64() * 1e6),
            limit,
            limit_cpu,
            ratio
        );
    }
    println!(
        "(cpu/op: CPU time of the client per operation, user and system: this process for the store, \
         pgbench's process for its limit; the server's is in neither)"
    );
    let mut scale = Vec::new();
    for (deep, first, label) in [
        (
            "clusters.members, page 90 000 rows deep",
            "clusters.members, first page (100 000 members)",
            "clusters.members",
        ),
        (
            "instances.list_by_cluster, page 90 000 rows deep",
            "instances.list_by_cluster, first page (100 000)",
            "instances.list_by_cluster",
        ),
    ] {
        for &threads in &options.threads {
            let find = |name: &str| rows.iter().find(|r| r.name == name && r.threads == threads).map(|r| r.measured);
            if let (Some(deep), Some(first)) = (find(deep), find(first)) {
                let ratio = deep.p50.as_secs_f64() / first.p50.as_secs_f64().max(1e-9);
                println!(
                    "deep page / first page, {label}, {threads} thread(s): p50 {} / {} = {ratio:.2}",
                    micros(deep.p50),
                    micros(first.p50)
                );
                scale.push(serde_json::json!({"operation": label, "threads": threads, "deep_over_first_p50": ratio}));
            }
        }
    }
    // A page's cost must not grow with its cluster: the first page of the
    // 100 000-row clusters next to the same page of the 50-member team.
    let mut big_over_small = Vec::new();
    for (big, small, label) in [
        ("clusters.members, first page (100 000 members)", "clusters.members (page of 20)", "clusters.members"),
        (
            "instances.list_by_cluster, first page (100 000)",
            "instances.list_by_cluster (page of 20)",
            "instances.list_by_cluster",
        ),
    ] {
        for &threads in &options.threads {
            let find = |name: &str| rows.iter().find(|r| r.name == name && r.threads == threads).map(|r| r.measured);
            if let (Some(big), Some(small)) = (find(big), find(small)) {
                let ratio = big.p50.as_secs_f64() / small.p50.as_secs_f64().max(1e-9);
                println!(
                    "100 000-row cluster / 50-member cluster, first page, {label}, {threads} thread(s): p50 {} / {} = {ratio:.2}",
                    micros(big.p50),
                    micros(small.p50)
                );
                big_over_small
                    .push(serde_json::json!({"operation": label, "threads": threads, "big_over_small_p50": ratio}));
            }
        }
    }
    let mut async_over_sync = Vec::new();
    for &threads in &options.threads {
        let find = |name: &str| rows.iter().find(|r| r.name == name && r.threads == threads).map(|r| r.measured);
        if let (Some(async_facade), Some(in_place), Some(sync)) =
            (find(ASYNC_ROW), find(ASYNC_IN_PLACE_ROW), find(ASYNC_PAIR_ROW))
        {
            let ratio = async_facade.ops_per_sec / sync.ops_per_sec.max(1e-9);
            let in_place_ratio = in_place.ops_per_sec / sync.ops_per_sec.max(1e-9);
            println!(
                "async facade / sync store, users.get_by_email, {threads} task(s) / thread(s): {:.0} / {:.0} ops/s = {ratio:.2}; \
                 in place: {:.0} / {:.0} ops/s = {in_place_ratio:.2}",
                async_facade.ops_per_sec, sync.ops_per_sec, in_place.ops_per_sec, sync.ops_per_sec
            );
            let cost = |m: Measured| format!("{:.1} µs, {:.2}", m.cpu_per_op.as_secs_f64() * 1e6, m.switches_per_op);
            println!(
                "  client CPU and context switches per call: facade {}; in place {}; sync store {}",
                cost(async_facade),
                cost(in_place),
                cost(sync)
            );
            async_over_sync.push(serde_json::json!({
                "threads": threads,
                "async_over_sync_ops": ratio,
                "in_place_over_sync_ops": in_place_ratio,
                "client_cpu_per_op_us": {
                    "async_facade": async_facade.cpu_per_op.as_secs_f64() * 1e6,
                    "in_place": in_place.cpu_per_op.as_secs_f64() * 1e6,
                    "sync": sync.cpu_per_op.as_secs_f64() * 1e6,
                },
                "client_switches_per_op": {
                    "async_facade": async_facade.switches_per_op,
                    "in_place": in_place.switches_per_op,
                    "sync": sync.switches_per_op,
                },
            }));
        }
    }
    println!("per-test database clone: median {} of {}", micros(median(clones)), clones.len());
    println!("migration of an empty database to head: median {} of {}", micros(median(migrations)), migrations.len());

    if let Some(path) = &options.json {
        let json = serde_json::json!({
            "cores": cores,
            "seconds_per_run": options.seconds.as_secs(),
            "rounds": options.rounds,
            "rows": rows.iter().map(|row| serde_json::json!({
                "operation": row.name,
                "threads": row.threads,
                "ops": row.measured.ops,
                "ops_per_sec": row.measured.ops_per_sec,
                "p50_us": row.measured.p50.as_micros() as u64,
                "p99_us": row.measured.p99.as_micros() as u64,
                "statements_per_op": row.measured.statements_per_op,
                "client_cpu_per_op_us": row.measured.cpu_per_op.as_secs_f64() * 1e6,
                "client_switches_per_op": row.measured.switches_per_op,
                "limit_ops_per_sec": row.limit.map(|limit| limit.per_sec),
                "limit_client_cpu_per_op_us": row.limit.map(|limit| limit.cpu_per_op.as_secs_f64() * 1e6),
                "ratio_to_limit": row.limit.map(|limit| row.measured.ops_per_sec / limit.per_sec),
            })).collect::<Vec<_>>(),
            "deep_over_first": scale,
            "big_over_small": big_over_small,
            "async_over_sync": async_over_sync,
            "clone_median_us": median(clones).as_micros() as u64,
            "migration_median_us": median(migrations).as_micros() as u64,
        });
        std::fs::write(path, serde_json::to_string_pretty(&json)?)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_that_match_no_operation_are_refused_before_anything_starts() {
        let error = options(&["--ops", "users.get,no-such-op"]).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(error.contains("--ops: `no-such-op` matches no operation"), "{error}");
        assert!(error.contains("users.get_by_email") && error.contains("replica"), "{error}");
        // A trailing comma would be an empty substring, which matches everything.
        assert!(options(&["--ops", "users.get,"]).is_err());
    }

    #[test]
    fn ops_replica_alone_skips_the_main_run() {
        let replica = options(&["--ops", "replica"]).unwrap();
        assert!(replica.replica && !replica.main_run());
        let both = options(&["--ops", "replica, users.get"]).unwrap();
        assert!(both.replica && both.main_run() && both.wanted("users.get") && !both.wanted("instances.create"));
        let some = options(&["--ops", "users.get"]).unwrap();
        assert!(!some.replica && some.main_run());
        let all = options(&[]).unwrap();
        assert!(all.replica && all.main_run() && all.wanted("instances.create"));
    }

    #[test]
    fn rounds_default_to_two_and_must_be_a_whole_number_of_at_least_one() {
        assert_eq!(options(&[]).unwrap().rounds, 2);
        assert_eq!(options(&["--rounds", "5"]).unwrap().rounds, 5);
        for refused in ["0", "-1", "2.5", "", "many"] {
            let error = options(&["--rounds", refused]).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(error.contains("--rounds takes a whole number, at least 1"), "{refused:?}: {error}");
        }
        assert!(options(&["--rounds"]).is_err());
    }

    #[test]
    fn a_relative_json_path_is_made_absolute_against_the_current_directory() {
        let json = options(&["--json", "out/bench.json"]).unwrap().json.unwrap();
        assert_eq!(json, std::env::current_dir().unwrap().join("out/bench.json"));
        assert_eq!(options(&["--json", "/tmp/b.json"]).unwrap().json.unwrap(), PathBuf::from("/tmp/b.json"));
    }
}
