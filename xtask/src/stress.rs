//! `cargo xtask stress`: the randomized concurrent workload of
//! `dployr_tests::stress` with its invariant checker, for as long and as
//! wide as asked, on a throwaway PostgreSQL (or a database cloned on
//! `DATABASE_URL`'s server). Exits non-zero on any invariant violation,
//! `Backend` or `Invalid` error, panic, or deadlock.

use std::time::Duration;

use dployr_tests::stress::{self, StressConfig};

use crate::Failure;

/// Parses `--seconds N --threads N --seed S` and runs the workload.
pub fn run(args: &[&str]) -> Result<(), Failure> {
    let mut config = StressConfig {
        duration: Duration::from_secs(60),
        threads: 32,
        seed: rand::random(),
        ..StressConfig::default()
    };
    let mut words = args.iter();
    while let Some(flag) = words.next() {
        let value = words.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number: u64 = value.parse().map_err(|_| format!("{flag} takes a number, not `{value}`"))?;
        match *flag {
            "--seconds" => config.duration = Duration::from_secs(number),
            "--threads" => config.threads = usize::try_from(number).map_err(|_| "--threads is too large")?.max(1),
            "--seed" => config.seed = number,
            "--clusters" => config.clusters = usize::try_from(number).map_err(|_| "--clusters is too large")?.max(1),
            other => return Err(format!("unknown option `{other}` (--seconds, --threads, --seed, --clusters)").into()),
        }
    }
    println!(
        "stress: {} threads for {} s on {} clusters, seed {} (replay with --seed {})",
        config.threads,
        config.duration.as_secs(),
        config.clusters,
        config.seed,
        config.seed
    );
    let db = dployr_testkit::try_database()?;
    let report = stress::run(db.url(), config);
    println!("{report}");
    if report.is_clean() { Ok(()) } else { Err("the workload broke a rule (see above)".into()) }
}
