//! `cargo xtask pgbouncer`: the deployment behind PgBouncer in transaction
//! mode, as processes: a throwaway PostgreSQL, a PgBouncer in front of it,
//! and the application started as separate processes (`cargo xtask
//! seed-load`, the seed story from many threads) with the settings
//! docs/operations.md gives. It checks that a start with the statement
//! cache on is refused, that the application restarts three times with
//! migrations on start (applied by the first start only), and that three
//! processes of 16 threads each run the seed story with no error and no
//! rule violation (single-use OAuth state, OTP attempt limit, single-use
//! codes and tokens). Everything it started is stopped on every path.

use std::process::{Command, Output, Stdio};
use std::time::Instant;

use dployr_data::{DataLayer, KvStoreConfig};
use dployr_testkit::pgbouncer::{PgBouncer, PoolMode};
use dployr_tests::seed_story::{self, Failure as StoryFailure};

use crate::Failure;

/// What one `seed-load` process reports, on its last line of output.
#[derive(Debug, Default, Clone, Copy)]
struct Figures {
    applied_on_open: usize,
    stories: usize,
    errors: usize,
    violations: usize,
}

impl Figures {
    const PREFIX: &str = "seed-load:";

    fn line(&self) -> String {
        format!(
            "{} applied_on_open={} stories={} errors={} violations={}",
            Self::PREFIX,
            self.applied_on_open,
            self.stories,
            self.errors,
            self.violations
        )
    }

    fn parse(output: &str) -> Option<Self> {
        let line = output.lines().rev().find(|line| line.starts_with(Self::PREFIX))?;
        let mut figures = Self::default();
        for pair in line.split_whitespace().skip(1) {
            let (key, value) = pair.split_once('=')?;
            let value: usize = value.parse().ok()?;
            match key {
                "applied_on_open" => figures.applied_on_open = value,
                "stories" => figures.stories = value,
                "errors" => figures.errors = value,
                "violations" => figures.violations = value,
                _ => return None,
            }
        }
        Some(figures)
    }
}

/// `cargo xtask seed-load [--threads N] [--runs N] [--label L]`: opens the
/// data layer from the environment (migrations on start as configured) and
/// runs the seed story `runs` times on each of `threads` threads; the last
/// line sums it up. Failures are printed (at most 5 of them).
pub fn seed_load(args: &[&str]) -> Result<(), Failure> {
    let (mut threads, mut runs, mut label) = (16_usize, 5_usize, "load".to_owned());
    let mut rest = args;
    while let [flag, value, tail @ ..] = rest {
        match *flag {
            "--threads" => threads = value.parse()?,
            "--runs" => runs = value.parse()?,
            "--label" => (*value).clone_into(&mut label),
            other => return Err(format!("seed-load: unknown option {other}").into()),
        }
        rest = tail;
    }
    if !rest.is_empty() {
        return Err(format!("seed-load: {rest:?} lacks a value").into());
    }
    let data = DataLayer::from_env()?;
    let attempts = KvStoreConfig::default().otp_max_attempts;
    let pid = std::process::id();
    let failures: Vec<StoryFailure> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|thread| {
                let (data, label) = (&data, &label);
                scope.spawn(move || {
                    (0..runs)
                        .filter_map(|run| {
                            seed_story::run(data, &format!("{label}-{pid}-t{thread}-r{run}"), attempts).err()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|handle| handle.join().unwrap_or_default()).collect()
    });
    for failure in failures.iter().take(5) {
        eprintln!("{label}: {failure:?}");
    }
    let figures = Figures {
        applied_on_open: data.applied_on_open().len(),
        stories: threads * runs,
        errors: failures.iter().filter(|f| matches!(f, StoryFailure::Error(_))).count(),
        violations: failures.iter().filter(|f| matches!(f, StoryFailure::Violation(_))).count(),
    };
    println!("{}", figures.line());
    Ok(())
}

/// Starts `cargo xtask seed-load` (this very binary) with `env`.
fn seed_load_process(env: &[(&str, String)], args: &[&str]) -> Result<std::process::Child, Failure> {
    let mut command = Command::new(std::env::current_exe()?);
    command.arg("seed-load").args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    for var in [
        "DATABASE_URL",
        "DPLOYR_MIGRATE_DATABASE_URL",
        "DPLOYR_DB_STATEMENT_CACHE",
        "DPLOYR_DB_STATEMENT_TIMEOUT_MS",
        "DPLOYR_DB_CANCEL_ON_DEADLINE",
    ] {
        command.env_remove(var);
    }
    command.envs(env.iter().map(|(k, v)| (k, v)));
    Ok(command.spawn()?)
}

fn figures_of(what: &str, output: &Output) -> Result<Figures, Failure> {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        return Err(format!("{what} failed ({}):\n{stdout}{stderr}", output.status).into());
    }
    if !stderr.trim().is_empty() {
        eprint!("{stderr}");
    }
    Figures::parse(&stdout).ok_or_else(|| format!("{what}: no summary line in its output:\n{stdout}").into())
}

pub fn run(args: &[&str]) -> Result<(), Failure> {
    let (mut threads, mut runs) = (16_usize, 5_usize);
    let mut rest = args;
    while let [flag, value, tail @ ..] = rest {
        match *flag {
            "--threads" => threads = value.parse()?,
            "--runs" => runs = value.parse()?,
            other => return Err(format!("pgbouncer: unknown option {other}").into()),
        }
        rest = tail;
    }
    let started = Instant::now();
    let server = dployr_testkit::server()?;
    let port = server.local_port().ok_or(
        "cargo xtask pgbouncer starts a PostgreSQL of its own: unset DATABASE_URL and DPLOYR_TEST_DATABASE_URL",
    )?;
    let db = dployr_testkit::try_empty_database()?;
    // Dropped (stopped) on every path out of this function.
    let bouncer = PgBouncer::start(port, "postgres", PoolMode::Transaction)?;
    println!(
        "PostgreSQL on 127.0.0.1:{port}, PgBouncer {} (pool_mode = transaction) on 127.0.0.1:{}, database {}",
        bouncer.pid(),
        bouncer.port(),
        db.name()
    );
    let documented: Vec<(&str, String)> = vec![
        ("DATABASE_URL", bouncer.url_for(db.name())),
        ("DPLOYR_MIGRATE_DATABASE_URL", db.url().to_owned()),
        ("DPLOYR_DB_STATEMENT_CACHE", "false".into()),
        ("DPLOYR_DB_STATEMENT_TIMEOUT_MS", "0".into()),
        ("DPLOYR_DB_CANCEL_ON_DEADLINE", "false".into()),
    ];

    // 1. The statement cache left on: refused, naming the setting.
    let unsafe_env: Vec<(&str, String)> =
        documented.iter().filter(|(k, _)| *k != "DPLOYR_DB_STATEMENT_CACHE").cloned().collect();
    let refused = seed_load_process(&unsafe_env, &["--threads", "1", "--runs", "1"])?.wait_with_output()?;
    let refusal = String::from_utf8_lossy(&refused.stderr);
    if refused.status.success() || !refusal.contains("DPLOYR_DB_STATEMENT_CACHE") {
        return Err(format!("a start with the statement cache on was not refused:\n{refusal}").into());
    }
    println!("statement cache on: refused ({})", refusal.trim());

    // 2. Three restarts with migrations on start.
    let mut applied = Vec::new();
    let mut totals = Figures::default();
    for start in 1..=3 {
        let label = format!("restart{start}");
        let output = seed_load_process(&documented, &["--threads", "4", "--runs", "2", "--label", &label])?
            .wait_with_output()?;
        let figures = figures_of(&format!("start {start}"), &output)?;
        println!("start {start}: {}", figures.line());
        applied.push(figures.applied_on_open);
        totals.stories += figures.stories;
        totals.errors += figures.errors;
        totals.violations += figures.violations;
    }
    let embedded = dployr_migrate::MigrationSet::embedded()?.len();
    if applied != [embedded, 0, 0] {
        return Err(format!("migrations applied per start: {applied:?}, expected [{embedded}, 0, 0]").into());
    }

    // 3. Three processes at once, `threads` threads each.
    let load_started = Instant::now();
    let (threads_arg, runs_arg) = (threads.to_string(), runs.to_string());
    let children: Vec<_> = (1..=3)
        .map(|process| {
            let label = format!("process{process}");
            seed_load_process(&documented, &["--threads", &threads_arg, "--runs", &runs_arg, "--label", &label])
        })
        .collect::<Result<_, _>>()?;
    let mut load = Figures::default();
    let mut first_error = None;
    for (process, child) in children.into_iter().enumerate() {
        match child
            .wait_with_output()
            .map_err(Failure::from)
            .and_then(|o| figures_of(&format!("process {}", process + 1), &o))
        {
            Ok(figures) => {
                println!("process {}: {}", process + 1, figures.line());
                load.stories += figures.stories;
                load.errors += figures.errors;
                load.violations += figures.violations;
            }
            Err(error) => first_error = first_error.or(Some(error)),
        }
    }
    if let Some(error) = first_error {
        return Err(error);
    }
    let load_time = load_started.elapsed();
    println!(
        "\nrestarts: 3 starts, migrations applied {applied:?}, {} stories, {} errors, {} rule violations",
        totals.stories, totals.errors, totals.violations
    );
    println!(
        "load: 3 processes x {threads} threads x {runs} runs = {} stories in {:.1?} ({:.0} stories/s), {} errors, {} rule violations",
        load.stories,
        load_time,
        load.stories as f64 / load_time.as_secs_f64(),
        load.errors,
        load.violations
    );
    println!("total {:.1?}", started.elapsed());
    if totals.errors + totals.violations + load.errors + load.violations > 0 {
        return Err("errors or rule violations behind PgBouncer (see above)".into());
    }
    Ok(())
}
