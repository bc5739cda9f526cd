//! `DataLayer::health()` answers within the call bound whatever a server
//! does: here the migration URL's server accepts the connection and then
//! answers nothing (a frozen host, a stuck proxy).

#![cfg(test)]

use std::time::{Duration, Instant};

use dployr_data::{Config, DataLayer, DeadlineConfig, KvBackendConfig, PoolConfig};
use dployr_testkit::BlackholeProxy;

#[test]
fn health_answers_within_the_call_bound_when_the_migration_server_answers_nothing() {
    let db = dployr_testkit::database();
    let (proxy, silent) = BlackholeProxy::in_front_of(db.url()).unwrap();
    proxy.blackhole();
    let pool = PoolConfig {
        statement_timeout: Some(Duration::from_millis(500)),
        deadline: DeadlineConfig { call_timeout: Some(Duration::from_millis(500)), ..DeadlineConfig::default() },
        ..PoolConfig::default()
    };
    let config = Config::new(db.url())
        .with_kv(KvBackendConfig::Memory)
        .with_pool(pool)
        .with_migrate_database_url(silent)
        .without_migrations_on_start();
    let data = DataLayer::open(config).unwrap();
    let bound = data.pool().call_bound();
    for _ in 0..2 {
        let started = Instant::now();
        let health = data.health();
        let took = started.elapsed();
        // Before, the probe waited for the runner's connect timeout (10 s).
        assert!(took < bound + Duration::from_secs(3), "health took {took:?} (bound {bound:?}): {health:?}");
        assert!(health.primary.ok && health.kv.ok, "{health:?}");
        assert!(!health.migrations.up_to_date && health.migrations.error.is_some(), "{health:?}");
        assert!(!health.is_ready());
    }
}
