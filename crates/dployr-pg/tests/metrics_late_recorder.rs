//! A recorder installed after the pool opened still gets the pool's series:
//! the pool builds each series' key once, but asks the recorder for the
//! series at every event. (A test binary of its own: `metrics.rs` installs
//! a global recorder and counts every event of its binary.)

#![cfg(test)]

use dployr_domain::{UserId, UserStore};
use dployr_pg::metrics::{POOL_CHECKOUTS, POOL_IN_USE};
use dployr_pg::{PgPool, PgUserStore, PoolConfig};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};

#[test]
fn a_recorder_installed_after_the_pool_opened_gets_its_checkouts() {
    let db = dployr_testkit::database();
    let pool = PgPool::connect(db.url(), PoolConfig { max_size: 1, ..PoolConfig::default() }).unwrap();
    let users = PgUserStore::new(pool.clone());
    assert_eq!(users.get(&UserId::generate()).unwrap(), None, "a call before any recorder");

    // Checkouts and checkins happen on the calling thread, so a recorder of
    // this thread's sees them.
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        for _ in 0..3 {
            assert_eq!(users.get(&UserId::generate()).unwrap(), None);
        }
    });
    let seen = snapshotter.snapshot().into_vec();
    let series = |name: &str| {
        seen.iter().find_map(|(key, _, _, value)| {
            let key = key.key();
            let primary = key.labels().any(|label| label.key() == "pool" && label.value() == "primary");
            (key.name() == name && primary).then_some(value)
        })
    };
    assert_eq!(series(POOL_CHECKOUTS), Some(&DebugValue::Counter(3)));
    assert!(matches!(series(POOL_IN_USE), Some(DebugValue::Gauge(in_use)) if in_use.0 == 0.0));
}
