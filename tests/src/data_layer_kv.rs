//! The key-value backends a `DataLayer` opens with, for the tests that run
//! one story on each of them (the async facade's, `delete_user`'s).

use std::time::Duration;

use dployr_data::kv::RetryPolicy;
use dployr_data::{CloudflareConfig, Config, KvBackendConfig};
use dployr_testkit::{CloudflareEmulator, TestDatabase};

/// A key-value backend of the data layer.
#[derive(Debug, Clone, Copy)]
pub enum Kv {
    /// In this process.
    Memory,
    /// The `kv_entries` table of the test database (the default).
    Postgres,
    /// Workers KV, emulated on a loopback port, with short retry waits.
    Cloudflare,
}

/// A configuration on `db` with `kv`, and the emulator that must outlive
/// the data layer opened with it.
pub fn config(db: &TestDatabase, kv: Kv) -> (Config, Option<CloudflareEmulator>) {
    let config = Config::new(db.url());
    match kv {
        Kv::Memory => (config.with_kv(KvBackendConfig::Memory), None),
        Kv::Postgres => (config, None),
        Kv::Cloudflare => {
            let emulator = CloudflareEmulator::start();
            let cloudflare = CloudflareConfig {
                base_url: emulator.base_url().to_owned(),
                retry: RetryPolicy { initial_backoff: Duration::from_millis(10), ..RetryPolicy::default() },
                ..CloudflareConfig::new(emulator.account_id(), emulator.namespace_id(), emulator.api_token())
            };
            (config.with_kv(KvBackendConfig::Cloudflare(cloudflare)), Some(emulator))
        }
    }
}
