//! The key-value conformance suite on `PgKv` against a real PostgreSQL,
//! plus what only this backend does: the batched purge of expired rows
//! (tested with a server `TimeZone` far from UTC), the background purger,
//! and one statement per operation.

#![cfg(test)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};
use dployr_domain::KvBackend;
use dployr_kv::PgKv;
use dployr_pg::{PgPool, PoolConfig};
use dployr_testkit::TestDatabase;
use dployr_tests::kv_contract::{Guarantees, KvFixture};

struct Postgres {
    db: TestDatabase,
    kv: PgKv,
}

impl KvFixture for Postgres {
    fn kv(&self) -> Arc<dyn KvBackend> {
        Arc::new(self.kv.clone())
    }

    /// Moving every expiry back is moving now forward.
    fn advance(&self, by: Duration) {
        let mut conn = self.db.connect();
        diesel::sql_query("UPDATE kv_entries SET expires_at = expires_at - make_interval(secs => $1::bigint)")
            .bind::<BigInt, _>(i64::try_from(by.as_secs()).unwrap())
            .execute(&mut conn)
            .unwrap();
    }

    fn guarantees(&self) -> Guarantees {
        Guarantees::ALL
    }
}

fn postgres() -> Postgres {
    let db = dployr_testkit::database();
    let pool = PgPool::connect(db.url(), PoolConfig { max_size: 4, ..PoolConfig::default() }).unwrap();
    Postgres { kv: PgKv::new(pool), db }
}

/// A backend whose session `TimeZone` is UTC+14. diesel sets `UTC` on
/// every new connection, so the pool holds one connection, switched here.
fn postgres_in_kiritimati() -> Postgres {
    let db = dployr_testkit::database();
    let pool = PgPool::connect(db.url(), PoolConfig { max_size: 1, ..PoolConfig::default() }).unwrap();
    diesel::sql_query("SET TimeZone = 'Pacific/Kiritimati'").execute(&mut pool.get().unwrap()).unwrap();
    Postgres { kv: PgKv::new(pool), db }
}

dployr_tests::kv_contract_tests!(postgres());

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

fn rows(pg: &Postgres, filter: &str) -> i64 {
    diesel::sql_query(format!("SELECT count(*) AS n FROM kv_entries WHERE {filter}"))
        .get_result::<Count>(&mut pg.db.connect())
        .unwrap()
        .n
}

#[derive(QueryableByName)]
struct Zone {
    #[diesel(sql_type = Text)]
    zone: String,
}

#[test]
fn purge_removes_expired_rows_in_batches_and_leaves_live_ones_on_a_non_utc_server() {
    let pg = postgres_in_kiritimati();
    let zone = diesel::sql_query("SELECT current_setting('TimeZone') AS zone")
        .get_result::<Zone>(&mut pg.kv.pool().get().unwrap())
        .unwrap();
    assert_eq!(zone.zone, "Pacific/Kiritimati");

    for i in 0..25 {
        pg.kv.put(&format!("dead/{i}"), b"v", Some(Duration::from_secs(60))).unwrap();
    }
    pg.advance(Duration::from_secs(61));
    // Live: one without TTL, and ones a minute and 14 hours (the zone's offset) away.
    pg.kv.put("live/forever", b"v", None).unwrap();
    pg.kv.put("live/minute", b"v", Some(Duration::from_secs(60))).unwrap();
    pg.kv.put("live/fourteen-hours", b"v", Some(Duration::from_secs(14 * 3600))).unwrap();

    assert_eq!(pg.kv.purge_expired_batch(10).unwrap(), 10);
    assert_eq!(rows(&pg, "key LIKE 'dead/%'"), 15);

    let (purged, statements) = statements_of(&pg, 2, || pg.kv.purge_expired(10).unwrap());
    assert_eq!(purged, 15);
    // 10 + 5: two statements, the second one short.
    assert_eq!(statements, 2);
    assert_eq!(rows(&pg, "key LIKE 'dead/%'"), 0);
    assert_eq!(rows(&pg, "key LIKE 'live/%'"), 3);
    assert_eq!(pg.kv.purge_expired(10).unwrap(), 0);
}

#[test]
fn expired_rows_are_invisible_before_the_purge() {
    let pg = postgres();
    pg.kv.put("k", b"v", Some(Duration::from_secs(60))).unwrap();
    pg.advance(Duration::from_secs(61));
    assert_eq!(rows(&pg, "key = 'k'"), 1, "the row is still there");
    assert_eq!(pg.kv.get("k").unwrap(), None);
    assert_eq!(pg.kv.take("k").unwrap(), None);
    assert!(pg.kv.list("", 10, None).unwrap().keys.is_empty());
}

#[test]
fn purge_refuses_a_batch_size_below_one() {
    let pg = postgres();
    assert!(matches!(pg.kv.purge_expired(0), Err(dployr_domain::StoreError::Invalid { field: "batch_size", .. })));
}

#[test]
fn background_purger_purges_and_stops_when_dropped() {
    let pg = postgres();
    for i in 0..5 {
        pg.kv.put(&format!("dead/{i}"), b"v", Some(Duration::from_secs(60))).unwrap();
    }
    pg.kv.put("live", b"v", None).unwrap();
    pg.advance(Duration::from_secs(61));
    let purger = pg.kv.spawn_purger(Duration::from_millis(20), 2).unwrap();
    // Wait for the purge itself, bounded so a broken purger fails instead of hanging.
    let deadline = Instant::now() + Duration::from_secs(30);
    while rows(&pg, "key LIKE 'dead/%'") > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(rows(&pg, "key LIKE 'dead/%'"), 0);
    assert_eq!(rows(&pg, "key = 'live'"), 1);
    drop(purger);
    // After the drop no purge runs: a row expired now stays until purged by hand.
    pg.kv.put("dead/late", b"v", Some(Duration::from_secs(60))).unwrap();
    pg.advance(Duration::from_secs(61));
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(rows(&pg, "key = 'dead/late'"), 1);
}

/// Dropping the purger in the middle of a long pass (expired rows left by
/// an outage) stops it after its current batch: the drop joins the
/// thread, and waited for the whole pass before.
#[test]
fn a_purger_dropped_in_the_middle_of_a_long_pass_stops_after_its_batch() {
    let pg = postgres();
    const ROWS: i64 = 20_000;
    diesel::sql_query(
        "INSERT INTO kv_entries (key, value, expires_at)
         SELECT 'dead/' || n, '\\x00', now() - interval '1 hour' FROM generate_series(1, $1) AS n",
    )
    .bind::<BigInt, _>(ROWS)
    .execute(&mut pg.db.connect())
    .unwrap();
    // One row a statement: the pass is 20 000 statements long.
    let purger = pg.kv.spawn_purger(Duration::from_millis(1), 1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while rows(&pg, "key LIKE 'dead/%'") == ROWS {
        assert!(Instant::now() < deadline, "the purger did not start within 30 s");
        std::thread::sleep(Duration::from_millis(1));
    }
    drop(purger);
    let left = rows(&pg, "key LIKE 'dead/%'");
    assert!(left > ROWS / 2, "the drop waited for the pass: {left} of {ROWS} rows left");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(rows(&pg, "key LIKE 'dead/%'"), left, "no purge after the drop");
}

/// What `op` returns and how many statements of its own it sent, given it
/// checks a connection out `checkouts` times: what a bare checkout sends
/// (r2d2 may test the connection) is not the operation's.
fn statements_of<T>(pg: &Postgres, checkouts: u64, op: impl FnOnce() -> T) -> (T, u64) {
    let stats = || pg.kv.pool().stats();
    let before = stats();
    drop(pg.kv.pool().get().unwrap());
    let per_checkout = (stats() - before).statements;
    let before = stats();
    let value = op();
    let spent = stats() - before;
    assert_eq!(spent.transactions, 0, "no transaction needed");
    (value, spent.statements - checkouts * per_checkout)
}

#[test]
fn every_operation_is_one_statement() {
    let pg = postgres();
    let one = |name: &str, op: &dyn Fn()| assert_eq!(statements_of(&pg, 1, op).1, 1, "{name}");
    one("put", &|| pg.kv.put("k", b"v", Some(Duration::from_secs(60))).unwrap());
    one("get", &|| assert!(pg.kv.get("k").unwrap().is_some()));
    one("list", &|| assert_eq!(pg.kv.list("", 10, None).unwrap().keys.len(), 1));
    one("take", &|| assert!(pg.kv.take("k").unwrap().is_some()));
    one("increment", &|| assert_eq!(pg.kv.increment("c", None).unwrap(), 1));
    one("delete", &|| pg.kv.delete("c").unwrap());
    // An attempt at a one-time value: counted, compared and taken in one.
    pg.kv.put("code", b"right", None).unwrap();
    let ttl = Some(Duration::from_secs(60));
    one("count_attempt_and_take_if (wrong)", &|| {
        assert_eq!(pg.kv.count_attempt_and_take_if("tries", ttl, 2, "code", b"wrong").unwrap(), (1, false));
    });
    one("count_attempt_and_take_if (right)", &|| {
        assert_eq!(pg.kv.count_attempt_and_take_if("tries", ttl, 2, "code", b"right").unwrap(), (2, true));
    });
    pg.kv.put("code", b"right", None).unwrap();
    one("count_attempt_and_take_if (past the limit)", &|| {
        assert_eq!(pg.kv.count_attempt_and_take_if("tries", ttl, 2, "code", b"right").unwrap(), (3, false));
    });
    assert_eq!(pg.kv.get("code").unwrap(), None, "past the limit, the value is spent, not taken");
    // A new one-time value with its count restarted: one statement, so no
    // attempt sees the new value with the old count.
    one("put_and_reset_counter", &|| pg.kv.put_and_reset_counter("code", b"new", ttl, "tries").unwrap());
    assert_eq!(pg.kv.count_attempt_and_take_if("tries", ttl, 2, "code", b"new").unwrap(), (1, true));
    // And a new code of the store: one statement, where it was two.
    let store = dployr_kv::KvStore::new(Arc::new(pg.kv.clone()));
    let email = dployr_domain::Email::parse("one@example.com").unwrap();
    one("KvStore::create_otp", &|| drop(store.create_otp(&email).unwrap()));
}

/// Without a purger (`PgKv::new` starts none; `DPLOYR_KV_PURGE_EVERY_SECS=0`
/// turns the data layer's off), the rows of expired tower-sessions records
/// stay: the store's `ExpiredDeletion` task deletes them, and only them.
#[test]
fn the_tower_sessions_deletion_task_purges_expired_session_rows_and_keeps_live_ones() {
    use dployr_tower_sessions::KvSessionStore;
    use tower_sessions_core::session::Record;
    use tower_sessions_core::{ExpiredDeletion as _, SessionStore as _};

    let pg = postgres();
    let store = KvSessionStore::new(Arc::new(pg.kv.clone())).with_user_field("user_id");
    let record = |user: &str| Record {
        id: Default::default(),
        data: [("user_id".to_owned(), serde_json::Value::from(user))].into_iter().collect(),
        expiry_date: time::OffsetDateTime::now_utc() + time::Duration::hours(1),
    };
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let mut expiring: Vec<Record> = (0..5).map(|i| record(&format!("user-{i}"))).collect();
    for r in &mut expiring {
        runtime.block_on(store.create(r)).unwrap();
    }
    let expired_rows = rows(&pg, "true");
    assert!(expired_rows >= 5, "{expired_rows} rows for 5 sessions");
    pg.advance(Duration::from_secs(2 * 3600));
    let mut live = record("user-live");
    runtime.block_on(store.create(&mut live)).unwrap();
    let live_rows = rows(&pg, "true") - expired_rows;

    assert_eq!(rows(&pg, "expires_at <= now()"), expired_rows, "expired rows stay without a purge");
    runtime.block_on(store.delete_expired()).unwrap();
    assert_eq!(rows(&pg, "expires_at <= now()"), 0, "the task purged every expired row");
    assert_eq!(rows(&pg, "true"), live_rows, "and only those");
    assert_eq!(runtime.block_on(store.load(&live.id)).unwrap(), Some(live));
}

/// Sessions and one-time records share the table, their purge periods set
/// apart in code (the sessions' off, the one-time records' on): one purger
/// serves the table, at the shorter period. The one-time records' period
/// was dropped, no purger ran, and expired rows stayed on disk.
#[test]
fn one_purger_serves_the_table_at_the_shorter_period_of_sessions_and_one_time_records() {
    use dployr_data::{Config, DataLayer, KvBackendConfig, OAuthState, OneTimeKvConfig};
    let pg = postgres();
    let config = Config::new(pg.db.url())
        .with_kv(KvBackendConfig::Postgres { purge_every: None })
        .with_one_time_kv(OneTimeKvConfig::Postgres { purge_every: Some(Duration::from_millis(50)) });
    let data = DataLayer::open(config).unwrap();
    for _ in 0..5 {
        data.kv().create_state(&OAuthState::generate(), "https://app.example/").unwrap();
    }
    pg.advance(Duration::from_secs(3600));
    // Waited for, bounded so a purger that never runs fails instead of hanging.
    let deadline = Instant::now() + Duration::from_secs(30);
    while rows(&pg, "true") > 0 {
        assert!(Instant::now() < deadline, "expired one-time rows were never purged");
        std::thread::sleep(Duration::from_millis(20));
    }
}
