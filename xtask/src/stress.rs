//! `cargo xtask stress`: the randomized concurrent workload of
//! `dployr_tests::stress` with its invariant checker, for as long and as
//! wide as asked, on a database cloned on the test server, chosen as the
//! tests choose it: `DPLOYR_TEST_DATABASE_URL`'s server, else
//! `DATABASE_URL`'s, else a throwaway PostgreSQL. Exits non-zero on any
//! invariant violation, `Backend` or `Invalid` error, panic, or deadlock.
//!
//! Its defaults (32 threads, 60 s) are wider and longer than the test's
//! (16 threads, 10 s, `StressConfig::default()`): a seed from `cargo test`
//! replays with `--seed S --threads 16 --seconds 10 --clusters 4`.

use std::time::Duration;

use dployr_tests::stress::{self, StressConfig};

use crate::Failure;

/// Parses `--seconds N --threads N --seed S --clusters N` and runs the workload.
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
