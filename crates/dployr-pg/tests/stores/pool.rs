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
