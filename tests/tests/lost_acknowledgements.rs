//! Writes whose commit lands while its answer is lost: the session that
//! committed is ended by PostgreSQL while its commit waits for a standby
//! (`synchronous_standby_names` naming one that never comes), which is
//! what a connection cut between the commit and its answer does, made
//! deterministic. The caller gets `Unavailable` ("may or may not be
//! committed", docs/operations.md); what was written must still be found by
//! a sign-out everywhere.

#![cfg(test)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel::sql_types::BigInt;
use dployr_data::kv::PgKv;
use dployr_data::{Config, DataLayer, Email, KvBackendConfig, NewUser, Provider, SessionId, UserStore as _};
use dployr_testkit::PrivateServer;
use tower_sessions_core::SessionStore as _;

fn connect(url: &str) -> PgConnection {
    PgConnection::establish(url).unwrap()
}

fn set_standbys(admin: &mut PgConnection, names: &str) {
    diesel::sql_query(format!("ALTER SYSTEM SET synchronous_standby_names = '{names}'")).execute(admin).unwrap();
    diesel::sql_query("SELECT pg_reload_conf()").execute(admin).unwrap();
}

/// Runs `write` on a thread while commits wait for a standby that never
/// comes; ends the first session whose commit waits (its transaction is
/// committed, its answer lost), then lets later commits through. What
/// `write` returned.
fn first_commit_answer_lost<T: Send + 'static>(
    server: &PrivateServer,
    write: impl FnOnce() -> T + Send + 'static,
) -> T {
    #[derive(QueryableByName)]
    struct Ended {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    let mut admin = connect(server.url());
    set_standbys(&mut admin, "nobody");
    // The reload reaches every backend at its next command.
    std::thread::sleep(Duration::from_millis(300));
    let writer = std::thread::spawn(write);
    let started = Instant::now();
    loop {
        assert!(started.elapsed() < Duration::from_secs(30), "no commit waited for the standby");
        let ended = diesel::sql_query(
            "SELECT count(pg_terminate_backend(pid)) AS n FROM pg_stat_activity WHERE wait_event = 'SyncRep'",
        )
        .get_result::<Ended>(&mut admin)
        .unwrap();
        if ended.n > 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // Commits that wait from now on are let through by the reload.
    diesel::sql_query("ALTER SYSTEM RESET synchronous_standby_names").execute(&mut admin).unwrap();
    diesel::sql_query("SELECT pg_reload_conf()").execute(&mut admin).unwrap();
    writer.join().unwrap()
}

/// `KvStore::create_session` whose session write committed unanswered: the
/// caller is told it failed, and no session is left that a sign-out
/// everywhere cannot end (it was left, unindexed, loading for its TTL).
#[test]
fn a_session_whose_write_lost_its_answer_is_ended_by_sign_out_everywhere() {
    let Some(server) = PrivateServer::start().unwrap() else {
        eprintln!("skipped: no PostgreSQL server binaries");
        return;
    };
    let data = Arc::new(
        DataLayer::open(Config::new(server.url()).with_kv(KvBackendConfig::Postgres { purge_every: None })).unwrap(),
    );
    let user = data.users().upsert(NewUser::new(Email::parse("ada@example.io").unwrap(), Provider::Github)).unwrap();
    let id = SessionId::generate();
    let created = {
        let (data, user, id) = (Arc::clone(&data), user.clone(), id.clone());
        first_commit_answer_lost(&server, move || data.kv().create_session(&id, &user, Vec::new()))
    };
    let error = created.unwrap_err();
    assert!(error.is_retryable(), "{error}");
    data.kv().delete_user_sessions(&user.id).unwrap();
    // Another process, with no memory of this one's writes.
    let other = DataLayer::open(
        Config::new(server.url())
            .with_kv(KvBackendConfig::Postgres { purge_every: None })
            .without_migrations_on_start(),
    )
    .unwrap();
    assert!(other.kv().get_session(&id).unwrap().is_none(), "the session outlived sign-out everywhere");
}

/// An app that keeps the session id at sign-in saves the anonymous session
/// (its cookie given out) with the user in it; the save committed
/// unanswered. The user's index names the record all the same, so the
/// user's sign-out everywhere ends it (it was left loading as theirs).
#[test]
fn a_tower_session_whose_sign_in_save_lost_its_answer_is_ended_by_sign_out_everywhere() {
    let Some(server) = PrivateServer::start().unwrap() else {
        eprintln!("skipped: no PostgreSQL server binaries");
        return;
    };
    let data = DataLayer::open(Config::new(server.url())).unwrap();
    let kv: Arc<dyn dployr_data::KvBackend> = Arc::new(PgKv::new(data.pool().clone()));
    let store = dployr_tower_sessions::KvSessionStore::new(kv).with_user_field("user_id");
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut record = tower_sessions_core::session::Record {
        id: tower_sessions_core::session::Id::default(),
        data: [("oauth_state".to_owned(), serde_json::Value::from("x"))].into_iter().collect(),
        expiry_date: time::OffsetDateTime::now_utc() + time::Duration::hours(1),
    };
    runtime.block_on(store.create(&mut record)).unwrap();
    record.data.insert("user_id".into(), serde_json::Value::from("ada"));
    let saved = {
        let (store, record, runtime) = (store.clone(), record.clone(), runtime.handle().clone());
        first_commit_answer_lost(&server, move || runtime.block_on(store.save(&record)))
    };
    assert!(saved.is_err(), "the save's answer was lost: it cannot have answered Ok");
    runtime.block_on(store.delete_user_sessions("ada")).unwrap();
    let after = runtime.block_on(store.load(&record.id)).unwrap();
    assert!(
        after.is_none_or(|record| record.data.get("user_id") != Some(&serde_json::Value::from("ada"))),
        "the cookie still loads a session signed in as ada after her sign-out everywhere"
    );
}
