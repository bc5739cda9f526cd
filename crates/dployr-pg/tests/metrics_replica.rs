//! A replica's gauges under a sampler that a silent server holds: they do
//! not go on showing the last sample. (A test binary of its own: the
//! sampler writes its gauges from its own thread, so only a global recorder
//! sees them, and `metrics.rs` counts every event of its binary.)

#![cfg(test)]

use std::time::{Duration, Instant};

use dployr_pg::metrics::{REPLICA_LAG, REPLICA_UP};
use dployr_pg::{PgPool, PoolConfig, ReplicaConfig, ReplicaSet};
use dployr_testkit::ReplicatedServer;
use dployr_testkit::replica::SKIP;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};

#[test]
fn a_replica_whose_sampler_is_held_by_a_frozen_server_is_down_in_the_gauges() {
    let Some(server) = ReplicatedServer::start().unwrap() else {
        eprintln!("{SKIP}");
        return;
    };
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install().unwrap();

    let config = PoolConfig { max_size: 2, ..PoolConfig::default() };
    let pool = PgPool::connect(server.primary_url(), config).unwrap();
    let sampling = ReplicaConfig { sample_every: Duration::from_millis(100), ..ReplicaConfig::default() };
    let urls = [server.replica_url().to_owned()];
    let set = ReplicaSet::connect(&pool, &urls, "replica_urls", config, sampling).unwrap();
    let status = || set.status().remove(0);
    let until_rotation_is = |wanted: bool| {
        let started = Instant::now();
        while status().in_rotation != wanted {
            assert!(started.elapsed() < Duration::from_secs(20), "in rotation never became {wanted}: {:?}", status());
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    until_rotation_is(true);

    // Every process of the replica stopped: the sampler's next statement
    // waits on its socket, and its last sample (up, caught up) ages.
    let frozen = server.freeze_replica().unwrap();
    until_rotation_is(false);
    // One snapshot, taken while the sampler is held: it reads each gauge
    // as last set (and resets it, so it is taken once).
    let seen = snapshotter.snapshot().into_vec();
    let held = status();
    // Thawed, the sampler's held statement is answered and a new sample
    // comes: what is asserted below was all read before.
    drop(frozen);
    let gauge = |name: &str| {
        seen.iter().find_map(|(key, _, _, value)| match value {
            DebugValue::Gauge(value) if key.key().name() == name => Some(value.0),
            _ => None,
        })
    };
    assert_eq!(gauge(REPLICA_UP), Some(0.0), "a replica out of rotation for an aged sample is down");
    assert!(gauge(REPLICA_LAG).is_some_and(f64::is_nan), "no lag is known: {:?}", gauge(REPLICA_LAG));
    assert_eq!(held.lag, None, "{held:?}");

    until_rotation_is(true);
}
