use std::time::Duration;

use diesel::prelude::*;
use dployr_domain::{StoreError, UserId, UserStore};
use dployr_pg::{PgPool, PgUserStore, PoolConfig};

#[test]
fn a_checkout_that_times_out_is_unavailable() {
    let db = dployr_testkit::database();
    let config = PoolConfig { max_size: 1, connection_timeout: Duration::from_millis(200), ..PoolConfig::default() };
    let pool = PgPool::connect(db.url(), config).unwrap();
    let users = PgUserStore::new(pool.clone());
    let held = pool.get().unwrap();
    let error = users.get(&UserId::generate()).unwrap_err();
    assert!(matches!(error, StoreError::Unavailable { .. }) && error.is_retryable(), "{error}");
    drop(held);
    assert_eq!(users.get(&UserId::generate()).unwrap(), None);
}

#[test]
fn an_unreachable_server_is_unavailable_within_the_connect_timeout() {
    // A port nothing listens on (the testkit's server is elsewhere).
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let config = PoolConfig { connection_timeout: Duration::from_millis(300), ..PoolConfig::default() };
    let error = PgPool::connect(&format!("postgres://nobody@127.0.0.1:{port}/none"), config).unwrap_err();
    assert!(matches!(error, StoreError::Unavailable { .. }), "{error}");
    assert!(!error.to_string().contains("nobody@"), "the URL is not echoed: {error}");
}

#[test]
fn a_zero_sized_pool_is_invalid() {
    let error =
        PgPool::connect("postgres://localhost/x", PoolConfig { max_size: 0, ..PoolConfig::default() }).unwrap_err();
    assert!(matches!(error, StoreError::Invalid { .. }), "{error}");
}

#[test]
fn every_connection_gets_the_configured_statement_timeout() {
    #[derive(QueryableByName)]
    struct Setting {
        #[diesel(sql_type = diesel::sql_types::Text)]
        statement_timeout: String,
    }
    let db = dployr_testkit::database();
    let config = PoolConfig { statement_timeout: Some(Duration::from_millis(1500)), ..PoolConfig::default() };
    let pool = PgPool::connect(db.url(), config).unwrap();
    let setting: Setting = diesel::sql_query("SHOW statement_timeout").get_result(&mut pool.get().unwrap()).unwrap();
    assert_eq!(setting.statement_timeout, "1500ms");
}

#[test]
fn without_the_statement_cache_nothing_stays_prepared_on_the_server() {
    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        count: i64,
    }
    let db = dployr_testkit::database();
    let prepared = |cache: bool| {
        let config = PoolConfig { max_size: 1, prepared_statement_cache: cache, ..PoolConfig::default() };
        let pool = PgPool::connect(db.url(), config).unwrap();
        let users = PgUserStore::new(pool.clone());
        for _ in 0..3 {
            users.get(&UserId::generate()).unwrap();
        }
        let count: Count = diesel::sql_query("SELECT count(*) FROM pg_prepared_statements")
            .get_result(&mut pool.get().unwrap())
            .unwrap();
        count.count
    };
    assert!(prepared(true) > 0, "diesel caches prepared statements by default");
    assert_eq!(prepared(false), 0, "PgBouncer transaction mode needs none left prepared");
}

/// After the server ends every session of the pool (as a restart does),
/// each dead connection fails one call as `Unavailable` and is discarded:
/// the pool serves again at once. Before, diesel's test of a returned
/// connection (its transaction state only) kept the dead connections, and
/// every later call failed.
#[test]
fn connections_whose_sessions_the_server_ended_fail_once_each_then_the_pool_serves_again() {
    let db = dployr_testkit::database();
    let pool = PgPool::connect(db.url(), PoolConfig { max_size: 4, ..PoolConfig::default() }).unwrap();
    let users = PgUserStore::new(pool.clone());
    let mut admin = PgConnection::establish(db.url()).unwrap();
    for round in 0..3 {
        // Every connection open, then every session ended under it.
        drop((0..4).map(|_| pool.get().unwrap()).collect::<Vec<_>>());
        diesel::sql_query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .execute(&mut admin)
        .unwrap();
        let answers: Vec<_> = (0..10).map(|_| users.get(&UserId::generate())).collect();
        let failed = answers.iter().filter(|answer| answer.is_err()).count();
        assert!(failed <= 4, "round {round}: {failed} calls of 10 failed: {answers:?}");
        assert!(answers[4..].iter().all(|answer| matches!(answer, Ok(None))), "round {round}: {answers:?}");
        for error in answers.iter().filter_map(|answer| answer.as_ref().err()) {
            assert!(matches!(error, StoreError::Unavailable { .. }) && error.is_retryable(), "{error}");
        }
    }
}
