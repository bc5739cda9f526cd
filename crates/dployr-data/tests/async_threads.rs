//! How many threads the async facade starts: one per connection its pools
//! may open, up to a bound, so a pool of thousands does not start
//! thousands. A test binary of its own: it counts this process's threads,
//! which another test's facade would add to.

#![cfg(test)]
#![cfg(all(feature = "tokio", target_os = "linux"))]

use dployr_data::{Config, DataLayer, Email, KvBackendConfig, PoolConfig};

/// The threads of this process whose name starts with `prefix` (Linux
/// keeps the first 15 bytes of a thread's name).
fn threads_named(prefix: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter(|task| {
            let comm = task.as_ref().unwrap().path().join("comm");
            std::fs::read_to_string(comm).unwrap_or_default().starts_with(prefix)
        })
        .count()
}

/// As [`threads_named`], once it stopped changing: a thread names itself
/// when it starts, a moment after it was spawned.
fn settled_count_of_threads_named(prefix: &str) -> usize {
    let mut count = threads_named(prefix);
    for _ in 0..200 {
        std::thread::sleep(std::time::Duration::from_millis(50));
        let now = threads_named(prefix);
        if now == count {
            break;
        }
        count = now;
    }
    count
}

#[test]
fn a_pool_of_thousands_of_connections_starts_at_most_256_threads() {
    let db = dployr_testkit::database();
    let pool = PoolConfig { max_size: 2000, ..PoolConfig::default() };
    let data = DataLayer::open(Config::new(db.url()).with_kv(KvBackendConfig::Memory).with_pool(pool)).unwrap();
    let before = threads_named("dployr-call-");
    let data = data.into_async();
    assert_eq!(settled_count_of_threads_named("dployr-call-") - before, 256);
    // Calls beyond 256 at once wait in the queue; one call is served.
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let nobody = Email::parse("nobody@example.io").unwrap();
    assert_eq!(runtime.block_on(data.users().get_by_email(&nobody)).unwrap(), None);
}
