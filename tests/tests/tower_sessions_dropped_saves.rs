//! tower-sessions saves dropped because their session ended (signed out,
//! signed out everywhere, expired), on the emulated Cloudflare: they send
//! no write, and they never take back an index entry that another
//! process's save wrote for the live session. A first version of the
//! entry-first save (the entry written before a loaded session's record)
//! took the entry back after every dropped save: these tests, from the
//! review of that version, failed against it.

#![cfg(test)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use dployr_kv::{Clock, CloudflareConfig, CloudflareKv, RetryPolicy};
use dployr_testkit::CloudflareEmulator;
use dployr_tower_sessions::KvSessionStore;
use time::OffsetDateTime;
use tower_sessions_core::SessionStore as _;
use tower_sessions_core::session::{Id, Record};

/// The emulator's clock as the stores read it: the real one, plus what the
/// test advanced the emulator by.
#[derive(Debug, Clone, Default)]
struct EmulatorClock {
    ahead: Arc<Mutex<Duration>>,
}

impl Clock for EmulatorClock {
    fn now(&self) -> SystemTime {
        SystemTime::now() + *self.ahead.lock().unwrap()
    }
}

/// An emulated Cloudflare namespace, its client, and the clock the stores
/// over it read.
struct Cf {
    emulator: CloudflareEmulator,
    kv: Arc<CloudflareKv>,
    clock: EmulatorClock,
}

impl Cf {
    fn start() -> Self {
        let emulator = CloudflareEmulator::start();
        let config = CloudflareConfig {
            base_url: emulator.base_url().to_owned(),
            retry: RetryPolicy {
                max_attempts: 5,
                initial_backoff: Duration::from_millis(10),
                max_backoff: Duration::from_millis(100),
                max_elapsed: Duration::from_secs(5),
            },
            ..CloudflareConfig::new(emulator.account_id(), emulator.namespace_id(), emulator.api_token())
        };
        let kv = Arc::new(CloudflareKv::new(config).unwrap());
        Self { emulator, kv, clock: EmulatorClock::default() }
    }

    /// Moves the emulator's clock and the stores' clock together.
    fn advance(&self, by: Duration) {
        self.emulator.advance(by);
        *self.clock.ahead.lock().unwrap() += by;
    }

    /// A store as one server process holds it (not a clone: its own memory).
    fn process(&self) -> KvSessionStore {
        KvSessionStore::new(self.kv.clone()).with_user_field("user_id").with_clock(self.clock.clone())
    }

    /// A record expiring in `secs` whose data holds `data`.
    fn record(&self, secs: i64, data: &[(&str, &str)]) -> Record {
        Record {
            id: Id::default(),
            data: data.iter().map(|(k, v)| ((*k).to_owned(), serde_json::Value::from(*v))).collect(),
            expiry_date: OffsetDateTime::from(self.clock.now()) + time::Duration::seconds(secs),
        }
    }

    /// `record` with an expiry `secs` from now (as a request saving it sets).
    fn expiring_in(&self, record: &Record, secs: i64) -> Record {
        Record { expiry_date: OffsetDateTime::from(self.clock.now()) + time::Duration::seconds(secs), ..record.clone() }
    }
}

/// Ada's session X (OnInactivity, 100 s left) is created by process P1.
/// Her device makes a request to P1 at t=80 that extends it by an hour
/// (v2, naming Ada). Another request of hers, on P2, loaded X at t=99 from
/// Cloudflare's cache (stale by 30 s: v1, not expired yet) and saves at
/// t=101: its read (stale, v1, expiry passed) finds the session ended, so
/// the save is dropped. It took back Ada's index entry of X, which P1's
/// save wrote for the live v2 (the review's first finding). Once the windows passed,
/// Ada's sign-out everywhere (from any process) finds no entry: X, live and
/// naming Ada, survives it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_save_dropped_on_a_stale_expired_read_leaves_the_entry_of_the_live_session() {
    let cf = Cf::start();
    cf.emulator.set_stale_reads(Duration::from_secs(30));
    let (p1, p2) = (cf.process(), cf.process());
    let mut x = cf.record(100, &[("user_id", "ada"), ("theme", "v1")]);
    p1.create(&mut x).await.unwrap();

    cf.advance(Duration::from_secs(80));
    let mut v2 = cf.expiring_in(&x, 3600);
    v2.data.insert("theme".into(), "v2".into());
    p1.save(&v2).await.unwrap();

    cf.advance(Duration::from_secs(19));
    let loaded = p2.load(&x.id).await.unwrap().expect("P2's request loads X (v1, from the stale cache)");
    assert_eq!(loaded.data["theme"], "v1");
    cf.advance(Duration::from_secs(2));
    let mut saved = cf.expiring_in(&loaded, 3600);
    saved.data.insert("theme".into(), "p2".into());
    p2.save(&saved).await.unwrap();

    // Long after every window: a new process sees v2, Ada's, live.
    cf.advance(Duration::from_secs(200));
    let p3 = cf.process();
    let before = p3.load(&x.id).await.unwrap();
    assert_eq!(before.as_ref().map(|r| r.data["user_id"].clone()), Some("ada".into()), "X is Ada's and live");
    let ended = p3.delete_user_sessions("ada").await.unwrap();
    let after = p3.load(&x.id).await.unwrap();
    assert!(
        after.is_none(),
        "Ada's sign-out everywhere (begun long after every save returned) ended {ended}; X still loads: {:?}",
        after.map(|r| r.data)
    );
}

/// A request of Ada's loaded X; her sign-out everywhere in this process
/// ends X; the request then saves (tower-sessions saves every request with
/// OnInactivity): the process remembers the delete and sends nothing. (The
/// first version sent a put of her index entry and its delete within the
/// second, which Cloudflare's one write per second per key throttled.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_save_of_a_session_signed_out_here_sends_no_request() {
    let cf = Cf::start();
    cf.emulator.limit_writes_per_key(true);
    let store = cf.process();
    let mut x = cf.record(3600, &[("user_id", "ada")]);
    store.create(&mut x).await.unwrap();
    cf.advance(Duration::from_secs(2));
    let loaded = store.load(&x.id).await.unwrap().unwrap();
    assert_eq!(store.delete_user_sessions("ada").await.unwrap(), 1);
    let before = cf.emulator.requests();
    store.save(&cf.expiring_in(&loaded, 3600)).await.unwrap();
    assert_eq!(cf.emulator.requests() - before, 0, "a save of a session this process deleted sent requests");
}

/// Same, the session ended by another process: the save's one read finds
/// it gone, and nothing is written (the first version sent a put of the
/// entry, the read and the entry's delete, throttled).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_save_of_a_session_ended_elsewhere_sends_one_read() {
    let cf = Cf::start();
    cf.emulator.limit_writes_per_key(true);
    let (p1, p2) = (cf.process(), cf.process());
    let mut x = cf.record(3600, &[("user_id", "ada")]);
    p1.create(&mut x).await.unwrap();
    cf.advance(Duration::from_secs(61));
    let loaded = p2.load(&x.id).await.unwrap().unwrap();
    p1.delete(&x.id).await.unwrap();
    cf.advance(Duration::from_secs(2));
    let before = cf.emulator.requests();
    p2.save(&cf.expiring_in(&loaded, 3600)).await.unwrap();
    assert_eq!(cf.emulator.requests() - before, 1, "a dropped save sent more than its read");
}

/// No stale read needed. Ada's session X lives on process P1 (created
/// there). P signs her out everywhere while one of her requests on P had
/// X loaded; right after, a request of hers on P1 saves X (P1 trusts its
/// own write of the last minute and writes it back with its entry: the
/// hole docs/operations.md documents, "stays signed in while the device
/// keeps changing its session within 60 s"). Then P's request saves: P
/// remembers the delete and drops the save. The first version also
/// deleted Ada's entry of X, the one P1's save had just written: the device
/// stopped, and minutes later a sign-out everywhere from any process found
/// no entry, and X, Ada's, survived it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_save_leaves_the_entry_another_process_wrote_back_for_the_next_sign_out_everywhere() {
    let cf = Cf::start();
    let (p, p1) = (cf.process(), cf.process());
    let mut x = cf.record(3600, &[("user_id", "ada"), ("theme", "v1")]);
    p1.create(&mut x).await.unwrap();
    cf.advance(Duration::from_secs(1));
    let on_p = p.load(&x.id).await.unwrap().expect("P's request loads X");
    cf.advance(Duration::from_secs(1));
    assert_eq!(p.delete_user_sessions("ada").await.unwrap(), 1);
    cf.advance(Duration::from_secs(1));
    let mut b = cf.expiring_in(&x, 3600);
    b.data.insert("theme".into(), "from P1".into());
    p1.save(&b).await.unwrap(); // written back: the documented hole
    cf.advance(Duration::from_secs(1));
    p.save(&cf.expiring_in(&on_p, 3600)).await.unwrap(); // dropped: P remembers the delete

    cf.advance(Duration::from_secs(300));
    let p3 = cf.process();
    assert!(p3.load(&x.id).await.unwrap().is_some(), "X is back (the documented hole)");
    let ended = p3.delete_user_sessions("ada").await.unwrap();
    let left = p3.load(&x.id).await.unwrap();
    assert!(
        left.is_none(),
        "a sign-out everywhere begun minutes after every save returned ended {ended}; X, Ada's, still loads: {:?}",
        left.map(|r| r.data)
    );
}
