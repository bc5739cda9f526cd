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
        if !matches!(*flag, "--seconds" | "--threads" | "--seed" | "--clusters") {
            return Err(format!(
                "unknown option `{}` (--seconds, --threads, --seed, --clusters)",
                crate::shown(&[flag])
            )
            .into());
        }
        let value = words.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number: u64 =
            value.parse().map_err(|_| format!("{flag} takes a number, not `{}`", crate::shown(&[value])))?;
        // A run of no time or no thread checks nothing: its verdict would
        // be a false "broke a rule" (the checker walked nothing) or a pass.
        if number == 0 && *flag != "--seed" {
            return Err(format!("{flag} takes a number of at least 1, not 0").into());
        }
        match *flag {
            "--seconds" => config.duration = Duration::from_secs(number),
            "--threads" => config.threads = usize::try_from(number).map_err(|_| "--threads is too large")?,
            "--seed" => config.seed = number,
            _ => config.clusters = usize::try_from(number).map_err(|_| "--clusters is too large")?,
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

#[cfg(test)]
mod tests {
    use super::run;

    fn error(args: &[&str]) -> String {
        run(args).err().map(|e| e.to_string()).unwrap_or_default()
    }

    #[test]
    fn arguments_are_checked_before_any_server_starts() {
        // `--help` and unknown flags are unknown options, not flags that
        // lack a value; no time or no thread is refused, not run and
        // judged.
        assert!(error(&["--help"]).contains("unknown option `--help`"), "{}", error(&["--help"]));
        assert!(error(&["--bogus", "1"]).contains("unknown option `--bogus`"));
        assert!(error(&["--seconds"]).contains("--seconds needs a value"));
        assert!(error(&["--seconds", "x"]).contains("--seconds takes a number, not `x`"));
        assert!(error(&["--seconds", "0"]).contains("--seconds takes a number of at least 1, not 0"));
        assert!(error(&["--threads", "0"]).contains("--threads takes a number of at least 1, not 0"));
        assert!(error(&["--clusters", "0"]).contains("at least 1"));
    }
}
