//! A frozen server (issue 17): the data layer's PostgreSQL stopped with
//! `SIGSTOP` (postmaster and backends) while 16 threads read and write
//! users and key-value entries. Every call returns within the pool's call
//! bound, every error is `Unavailable`, nothing panics; after the thaw
//! every acknowledged write is there and calls succeed again within 5 s.
//!
//! The server is a private throwaway one (`PrivateServer`): the shared test
//! server is never frozen. The suite runs a 5 s freeze; the 30 s freeze of
//! the issue is the ignored test below:
//!
//! ```sh
//! cargo test -p dployr-tests --test frozen_server -- --ignored --nocapture
//! ```
//!
//! Both print the latency distribution of the calls during the freeze.

#![cfg(test)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use dployr_data::{
    Config, DataLayer, DeadlineConfig, Email, KvBackendConfig, NewUser, PoolConfig, Provider, StoreError, UserStore,
};
use dployr_domain::KvBackend as _;
use dployr_kv::PgKv;
use dployr_testkit::PrivateServer;

const THREADS: usize = 16;

/// Room for a busy machine (2 cores shared with the frozen server's
/// neighbours) on top of the configured bound.
const SLACK: Duration = Duration::from_millis(1500);

/// What one call did.
#[derive(Debug, Clone)]
struct Sample {
    started: Instant,
    took: Duration,
    error: Option<String>,
    unavailable: bool,
}

/// A write that was acknowledged: it must survive the freeze.
#[derive(Debug, Clone)]
enum Acknowledged {
    User(String),
    Kv(String, Vec<u8>),
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn freeze_for(freeze: Duration) {
    let Some(server) = PrivateServer::start().unwrap() else {
        eprintln!("skipped: no local PostgreSQL server binaries to start a private server with");
        return;
    };
    let pool = PoolConfig {
        max_size: 4,
        connection_timeout: Duration::from_secs(2),
        statement_timeout: Some(Duration::from_secs(1)),
        deadline: DeadlineConfig {
            margin: Duration::from_secs(1),
            grace: Duration::from_secs(1),
            ..DeadlineConfig::default()
        },
        ..PoolConfig::default()
    };
    let config = Config::new(server.url())
        .with_pool(pool)
        .with_kv(KvBackendConfig::Postgres { purge_every: None })
        .without_migrations_on_start();
    let data = Arc::new(DataLayer::open(config).unwrap());
    let kv = PgKv::new(data.pool().clone());
    let bound = data.pool().call_bound();

    let stop = Arc::new(AtomicBool::new(false));
    let samples = Arc::new(Mutex::new(Vec::<Sample>::new()));
    let acknowledged = Arc::new(Mutex::new(Vec::<Acknowledged>::new()));
    let workers: Vec<_> = (0..THREADS)
        .map(|worker| {
            let (data, kv, stop) = (Arc::clone(&data), kv.clone(), Arc::clone(&stop));
            let (samples, acknowledged) = (Arc::clone(&samples), Arc::clone(&acknowledged));
            thread::spawn(move || {
                let mut n = 0_u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let started = Instant::now();
                    let address = format!("w{worker}-{n}@example.io");
                    let key = format!("freeze/{worker}/{n}");
                    let outcome: Result<Option<Acknowledged>, StoreError> = match n % 4 {
                        0 => data.users().get_by_email(&Email::parse("nobody@example.io").unwrap()).map(|_| None),
                        1 => data
                            .users()
                            .upsert(NewUser::new(Email::parse(&address).unwrap(), Provider::Github))
                            .map(|_| Some(Acknowledged::User(address))),
                        2 => kv.get(&format!("freeze/{worker}/{}", n - 1)).map(|_| None),
                        _ => kv
                            .put(&key, key.as_bytes(), Some(Duration::from_secs(3600)))
                            .map(|()| Some(Acknowledged::Kv(key.clone(), key.into_bytes()))),
                    };
                    let took = started.elapsed();
                    let (error, unavailable) = match &outcome {
                        Ok(Some(write)) => {
                            acknowledged.lock().unwrap().push(write.clone());
                            (None, false)
                        }
                        Ok(None) => (None, false),
                        Err(error) => (Some(error.to_string()), matches!(error, StoreError::Unavailable { .. })),
                    };
                    samples.lock().unwrap().push(Sample { started, took, error, unavailable });
                    thread::sleep(Duration::from_millis(20));
                }
            })
        })
        .collect();

    thread::sleep(Duration::from_secs(1));
    let frozen_at = Instant::now();
    let frozen = server.freeze().unwrap();
    thread::sleep(freeze);
    frozen.thaw();
    let thawed_at = Instant::now();
    thread::sleep(Duration::from_secs(6));
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.join().expect("a worker panicked");
    }

    let samples = samples.lock().unwrap().clone();
    // Calls that overlapped the freeze.
    let during: Vec<&Sample> =
        samples.iter().filter(|s| s.started + s.took >= frozen_at && s.started <= thawed_at).collect();
    let mut latencies: Vec<Duration> = during.iter().map(|s| s.took).collect();
    latencies.sort();
    let errors = during.iter().filter(|s| s.error.is_some()).count();
    eprintln!(
        "freeze {freeze:?}, bound {bound:?}: {} calls overlapped the freeze ({errors} errors); \
         latency p50 {:?}, p99 {:?}, max {:?}",
        during.len(),
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or_default(),
    );
    assert!(errors > 0, "calls failed during the freeze: {during:?}");

    // Every call, before, during and after, within the bound.
    let slowest = samples.iter().max_by_key(|s| s.took).unwrap();
    assert!(slowest.took <= bound + SLACK, "a call took {:?} (bound {bound:?}): {slowest:?}", slowest.took);
    // Every error Unavailable.
    let other: Vec<&Sample> = samples.iter().filter(|s| s.error.is_some() && !s.unavailable).collect();
    assert!(other.is_empty(), "errors other than Unavailable: {other:?}");

    // After the thaw: calls started 5 s after it all succeed, and the first
    // success came within 5 s.
    let first_success = samples
        .iter()
        .filter(|s| s.started >= thawed_at && s.error.is_none())
        .map(|s| s.started + s.took - thawed_at)
        .min()
        .expect("no call succeeded after the thaw");
    let late_failures: Vec<&Sample> =
        samples.iter().filter(|s| s.started >= thawed_at + Duration::from_secs(5) && s.error.is_some()).collect();
    eprintln!("first success {first_success:?} after the thaw; deadline stats {:?}", data.pool().deadline_stats());
    assert!(first_success <= Duration::from_secs(5), "{first_success:?}");
    assert!(late_failures.is_empty(), "calls still failing 5 s after the thaw: {late_failures:?}");

    // Every acknowledged write is there.
    let acknowledged = acknowledged.lock().unwrap().clone();
    let mut missing = Vec::new();
    for write in &acknowledged {
        match write {
            Acknowledged::User(address) => {
                if data.users().get_by_email(&Email::parse(address).unwrap()).unwrap().is_none() {
                    missing.push(address.clone());
                }
            }
            Acknowledged::Kv(key, value) => {
                if kv.get(key).unwrap().as_ref() != Some(value) {
                    missing.push(key.clone());
                }
            }
        }
    }
    eprintln!("{} acknowledged writes, all checked after the thaw", acknowledged.len());
    assert!(missing.is_empty(), "acknowledged writes lost: {missing:?}");
}

#[test]
fn calls_during_a_five_second_freeze_end_within_the_bound_and_acknowledged_writes_survive() {
    freeze_for(Duration::from_secs(5));
}

#[test]
#[ignore = "30 s freeze of issue 17; run with --ignored"]
fn calls_during_a_thirty_second_freeze_end_within_the_bound_and_acknowledged_writes_survive() {
    freeze_for(Duration::from_secs(30));
}
