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
//!
//! `seed-load` exits non-zero when any story failed, so the `pgbouncer`
//! command reads a child's exit status first and its summary line second.

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
    /// Worker threads that panicked: the stories each had left never ran,
    /// so each counts as one failure of its own.
    panicked: usize,
}

impl Figures {
    const PREFIX: &str = "seed-load:";

    fn line(&self) -> String {
        format!(
            "{} applied_on_open={} stories={} errors={} violations={} panicked={}",
            Self::PREFIX,
            self.applied_on_open,
            self.stories,
            self.errors,
            self.violations,
            self.panicked
        )
    }

    /// Failed stories, plus one per panicked worker.
    fn failures(&self) -> usize {
        self.errors + self.violations + self.panicked
    }

    fn add(&mut self, other: &Self) {
        self.stories += other.stories;
        self.errors += other.errors;
        self.violations += other.violations;
        self.panicked += other.panicked;
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
                "panicked" => figures.panicked = value,
                _ => return None,
            }
        }
        Some(figures)
    }
}

/// `cargo xtask seed-load [--threads N] [--runs N] [--label L]`: opens the
/// data layer from the environment (migrations on start as configured) and
/// runs the seed story `runs` times on each of `threads` threads; the last
/// line sums it up. Failures are printed (at most 5 of them). Exits
/// non-zero when a story failed or a worker thread panicked.
pub fn seed_load(args: &[&str]) -> Result<(), Failure> {
    let (mut threads, mut runs, mut label) = (16_usize, 5_usize, "load".to_owned());
    let mut rest = args;
    while let [flag, value, tail @ ..] = rest {
        match *flag {
            "--threads" => threads = count("seed-load", flag, value)?,
            "--runs" => runs = count("seed-load", flag, value)?,
            "--label" => (*value).clone_into(&mut label),
            other => {
                return Err(format!(
                    "seed-load: unknown option `{}` (accepted: --threads N, --runs N, --label L)",
                    crate::shown(&[other])
                )
                .into());
            }
        }
        rest = tail;
    }
    if !rest.is_empty() {
        return Err(format!("seed-load: {rest:?} lacks a value").into());
    }
    let data = DataLayer::from_env()?;
    let attempts = KvStoreConfig::default().otp_max_attempts;
    let pid = std::process::id();
    // Per worker: its failed stories, or `None` if it panicked (the panic
    // message is already on stderr, from the panic hook).
    let outcomes: Vec<Option<Vec<StoryFailure>>> = std::thread::scope(|scope| {
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
        handles.into_iter().map(|handle| handle.join().ok()).collect()
    });
    let panicked = outcomes.iter().filter(|outcome| outcome.is_none()).count();
    let failures: Vec<StoryFailure> = outcomes.into_iter().flatten().flatten().collect();
    for failure in failures.iter().take(5) {
        eprintln!("{label}: {failure:?}");
    }
    let figures = Figures {
        applied_on_open: data.applied_on_open().len(),
        stories: threads * runs,
        errors: failures.iter().filter(|f| matches!(f, StoryFailure::Error(_))).count(),
        violations: failures.iter().filter(|f| matches!(f, StoryFailure::Violation(_))).count(),
        panicked,
    };
    println!("{}", figures.line());
    if figures.failures() > 0 {
        return Err(format!(
            "seed-load {label}: {} failure(s) in {} stories: {} error(s), {} rule violation(s), {} worker thread(s) \
             panicked (each counted as one failure; the stories it had left did not run)",
            figures.failures(),
            figures.stories,
            figures.errors,
            figures.violations,
            figures.panicked
        )
        .into());
    }
    Ok(())
}

/// `value` as a count, or an error naming `command`'s `flag`.
fn count(command: &str, flag: &str, value: &str) -> Result<usize, Failure> {
    match value.parse() {
        // No thread or no run checks nothing, and would pass.
        Ok(0) => Err(format!("{command}: {flag} takes a whole number of at least 1, not 0").into()),
        Ok(count) => Ok(count),
        Err(_) => Err(format!("{command}: {flag} takes a whole number, not `{value}`").into()),
    }
}

/// Whether `name` is a variable of the application's configuration
/// (`DPLOYR_*`, `CLOUDFLARE_*`, `DATABASE_URL`) or of libpq's (`PG*`: a
/// `PGOPTIONS` PgBouncer refuses, a `PGSSLMODE` the check's server does not
/// offer): the children get none of the user's, only the check's own.
fn is_configuration(name: &std::ffi::OsStr) -> bool {
    let name = name.as_encoded_bytes();
    name == b"DATABASE_URL"
        || name.starts_with(b"DPLOYR_")
        || name.starts_with(b"CLOUDFLARE_")
        || name.starts_with(b"PG")
}

/// Starts `cargo xtask seed-load` (this very binary) with `env` as its
/// whole configuration: a `DPLOYR_KV=cloudflare` with real credentials in
/// the user's shell would send the load to their Cloudflare account, a
/// `DPLOYR_MIGRATE_ON_START=false` would fail the restarts for no reason
/// of the deployment's.
fn seed_load_process(env: &[(&str, String)], args: &[&str]) -> Result<std::process::Child, Failure> {
    let mut command = Command::new(std::env::current_exe()?);
    command.arg("seed-load").args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    for (name, _) in std::env::vars_os() {
        if is_configuration(&name) {
            command.env_remove(name);
        }
    }
    command.envs(env.iter().map(|(k, v)| (k, v)));
    Ok(command.spawn()?)
}

/// The summary of a `seed-load` child that exited with success; a child
/// that did not (a failed story, a panicked worker, a refused start) is an
/// error carrying all it printed, its summary line included.
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
    const ACCEPTED: &str = "accepted: --threads N, --runs N";
    let (mut threads, mut runs) = (16_usize, 5_usize);
    let mut words = args.iter();
    while let Some(flag) = words.next() {
        let mut value = || words.next().ok_or_else(|| format!("pgbouncer: {flag} needs a value ({ACCEPTED})"));
        match *flag {
            "--threads" => threads = count("pgbouncer", flag, value()?)?,
            "--runs" => runs = count("pgbouncer", flag, value()?)?,
            other => {
                return Err(format!("pgbouncer: unknown argument `{}` ({ACCEPTED})", crate::shown(&[other])).into());
            }
        }
    }
    // Before anything touches a server: on a server named by one of these,
    // `dployr_testkit::server()` would build and migrate a template
    // database there first and leave it behind.
    let set: Vec<&str> = ["DPLOYR_TEST_DATABASE_URL", "DATABASE_URL"]
        .into_iter()
        .filter(|var| std::env::var_os(var).is_some_and(|value| !value.to_string_lossy().trim().is_empty()))
        .collect();
    if !set.is_empty() {
        return Err(format!(
            "cargo xtask pgbouncer starts a PostgreSQL of its own and uses no other: unset {}",
            set.join(" and ")
        )
        .into());
    }
    let started = Instant::now();
    let server = dployr_testkit::server()?;
    // PgBouncer is pointed at the loopback port of a server this process
    // started; xtask's test kit has no Docker fallback, so this only fails
    // if that changes.
    let port = server.local_port().ok_or(
        "cargo xtask pgbouncer needs a PostgreSQL started from the local server binaries, and the test kit \
         started none",
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
        // Set, not left to the defaults: the restarts check migrations on
        // start, and the load the PostgreSQL key-value backend.
        ("DPLOYR_MIGRATE_ON_START", "true".into()),
        ("DPLOYR_KV", "postgres".into()),
    ];

    // 1. The statement cache left on: refused, naming the setting.
    let unsafe_env: Vec<(&str, String)> =
        documented.iter().filter(|(k, _)| *k != "DPLOYR_DB_STATEMENT_CACHE").cloned().collect();
    let refused = seed_load_process(&unsafe_env, &["--threads", "1", "--runs", "1"])?.wait_with_output()?;
    let refusal = String::from_utf8_lossy(&refused.stderr);
    // A child that printed its summary line opened the data layer: not a
    // refusal, whatever its exit status (it fails when a story fails too).
    let ran = Figures::parse(&String::from_utf8_lossy(&refused.stdout)).is_some();
    if ran || refused.status.success() || !refusal.contains("DPLOYR_DB_STATEMENT_CACHE") {
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
        totals.add(&figures);
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
                load.add(&figures);
            }
            // Every child is waited for (none is left running) before the
            // first failure is returned.
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
    // A child with a failure already exited non-zero; this guards against
    // a summary that says otherwise.
    if totals.failures() + load.failures() > 0 {
        return Err("errors, rule violations or panicked workers behind PgBouncer (see above)".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_line_reads_back_with_its_panicked_workers() {
        let figures = Figures { applied_on_open: 3, stories: 80, errors: 1, violations: 2, panicked: 1 };
        let parsed = Figures::parse(&format!("noise\n{}\n", figures.line())).unwrap();
        assert_eq!((parsed.applied_on_open, parsed.stories, parsed.errors, parsed.violations), (3, 80, 1, 2));
        assert_eq!(parsed.failures(), 4);
    }

    #[test]
    fn arguments_are_checked_before_any_server_starts() {
        let error = |args: &[&str]| run(args).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(error(&["--help"]).contains("unknown argument `--help` (accepted: --threads N, --runs N)"));
        assert!(error(&["--threads", "x"]).contains("--threads takes a whole number, not `x`"));
        assert!(error(&["--runs"]).contains("--runs needs a value"));
        assert!(error(&["--threads", "0"]).contains("--threads takes a whole number of at least 1, not 0"));
        assert!(error(&["--runs", "0"]).contains("--runs takes a whole number of at least 1, not 0"));
        let error = seed_load(&["--runs", "-1"]).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(error.contains("seed-load: --runs takes a whole number"), "{error}");
    }

    #[test]
    fn the_users_configuration_is_not_passed_to_the_children() {
        for name in
            ["DATABASE_URL", "DPLOYR_KV", "DPLOYR_MIGRATE_ON_START", "CLOUDFLARE_API_TOKEN", "PGPASSWORD", "PGOPTIONS"]
        {
            assert!(is_configuration(name.as_ref()), "{name}");
        }
        for name in ["PATH", "RUST_LOG", "DATABASE_URLS"] {
            assert!(!is_configuration(name.as_ref()), "{name}");
        }
    }
}
