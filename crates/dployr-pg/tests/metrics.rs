//! The pool's statistics and the per-operation latency reach the `metrics`
//! facade: a debugging recorder (installed for this whole test binary,
//! which holds this one test so no other test adds to its counts) sees the
//! same figures as `PgPool::pool_stats`.

#![cfg(test)]

use std::time::Duration;

use diesel::prelude::*;
use dployr_domain::{StoreError, UserId, UserStore};
use dployr_pg::metrics::{
    OPERATION_DURATION, POOL_CHECKOUTS, POOL_CONNECT_FAILURES, POOL_MAX, POOL_OPENED, POOL_TIMEOUTS, POOL_WAITS,
};
use dployr_pg::{PgPool, PgUserStore, PoolConfig};
use metrics::{SharedString, Unit};
use metrics_util::CompositeKey;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};

/// Every series with its value since the last snapshot (taking one resets
/// the debugging recorder's counters and drains its histograms).
type Snapshot = Vec<(CompositeKey, Option<Unit>, Option<SharedString>, DebugValue)>;

fn snapshot(snapshotter: &Snapshotter) -> Snapshot {
    snapshotter.snapshot().into_vec()
}

/// The value of series `name` whose labels include `label`.
fn value<'a>(snapshot: &'a Snapshot, name: &str, label: (&str, &str)) -> Option<&'a DebugValue> {
    snapshot.iter().find_map(|(key, _, _, value)| {
        let key = key.key();
        let labelled = key.labels().any(|l| l.key() == label.0 && l.value() == label.1);
        (key.name() == name && labelled).then_some(value)
    })
}

fn counter(snapshot: &Snapshot, name: &str, label: (&str, &str)) -> u64 {
    match value(snapshot, name, label) {
        Some(DebugValue::Counter(count)) => *count,
        other => panic!("{name}: {other:?}"),
    }
}

#[test]
fn pool_events_and_operation_durations_are_emitted_through_the_metrics_facade() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install().unwrap();

    let db = dployr_testkit::database();
    let config = PoolConfig { max_size: 1, connection_timeout: Duration::from_millis(300), ..PoolConfig::default() };
    let pool = PgPool::connect(db.url(), config).unwrap();
    let users = PgUserStore::new(pool.clone());
    for _ in 0..3 {
        assert_eq!(users.get(&UserId::generate()).unwrap(), None);
    }

    // A checkout that has to wait for another caller's connection.
    let held = pool.get().unwrap();
    let releaser = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        drop(held);
    });
    assert_eq!(users.get(&UserId::generate()).unwrap(), None);
    releaser.join().unwrap();

    // A checkout that times out.
    let held = pool.get().unwrap();
    let error = users.get(&UserId::generate()).unwrap_err();
    assert!(matches!(error, StoreError::Unavailable { .. }), "{error}");
    drop(held);

    let stats = pool.pool_stats();
    assert_eq!((stats.max_size, stats.in_use), (1, 0));
    assert_eq!(stats.checkout_timeouts, 1);
    assert!(stats.waits >= 1, "{stats:?}");
    assert_eq!(stats.connections_opened, 1, "one connection served every call: {stats:?}");
    let primary = ("pool", "primary");
    let seen = snapshot(&snapshotter);
    assert_eq!(counter(&seen, POOL_CHECKOUTS, primary), stats.checkouts);
    assert_eq!(counter(&seen, POOL_TIMEOUTS, primary), 1);
    assert_eq!(counter(&seen, POOL_WAITS, primary), stats.waits);
    assert_eq!(counter(&seen, POOL_OPENED, primary), 1);
    assert!(matches!(value(&seen, POOL_MAX, primary), Some(DebugValue::Gauge(max)) if max.0 == 1.0));
    match value(&seen, OPERATION_DURATION, ("op", "users.get")) {
        Some(DebugValue::Histogram(samples)) => assert_eq!(samples.len(), 5, "one per users.get, the failed one too"),
        other => panic!("{other:?}"),
    }

    // Connections that cannot be made: the database stops accepting them,
    // and the pool's one connection is ended under it.
    // From another database: PostgreSQL refuses this from inside the one it changes.
    let mut admin = PgConnection::establish(&db.url().replace(db.name(), "postgres")).unwrap();
    diesel::sql_query(format!("ALTER DATABASE \"{}\" WITH ALLOW_CONNECTIONS false", db.name()))
        .execute(&mut admin)
        .unwrap();
    diesel::sql_query(format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{}' AND pid <> pg_backend_pid()",
        db.name()
    ))
    .execute(&mut admin)
    .unwrap();
    assert!(users.get(&UserId::generate()).is_err(), "the ended connection fails its statement");
    assert!(users.get(&UserId::generate()).is_err(), "no new connection can be made");
    diesel::sql_query(format!("ALTER DATABASE \"{}\" WITH ALLOW_CONNECTIONS true", db.name()))
        .execute(&mut admin)
        .unwrap();
    let failures = pool.pool_stats().connect_failures;
    assert!(failures >= 1, "{:?}", pool.pool_stats());
    assert_eq!(counter(&snapshot(&snapshotter), POOL_CONNECT_FAILURES, primary), failures);
}
