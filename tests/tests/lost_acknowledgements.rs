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
use dployr_data::{
    ClusterStore as _, Config, DataLayer, Email, KvBackendConfig, NewUser, Provider, SessionId, UserStore as _,
};
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

fn open(server: &PrivateServer) -> DataLayer {
    DataLayer::open(Config::new(server.url()).with_kv(KvBackendConfig::Postgres { purge_every: None })).unwrap()
}

/// Another process, with no memory of the first one's writes.
fn another_process(server: &PrivateServer) -> DataLayer {
    DataLayer::open(
        Config::new(server.url())
            .with_kv(KvBackendConfig::Postgres { purge_every: None })
            .without_migrations_on_start(),
    )
    .unwrap()
}

/// `DataLayer::delete_user` whose account delete committed unanswered: the
/// caller is told `Unavailable` and, checking, reads the account as gone,
/// so it stops there; the account's sessions are ended all the same (they
/// were left loading for their TTL).
#[test]
fn an_account_whose_delete_lost_its_answer_is_signed_out_everywhere() {
    let Some(server) = PrivateServer::start().unwrap() else {
        eprintln!("skipped: no PostgreSQL server binaries");
        return;
    };
    let data = Arc::new(open(&server));
    let user = data.users().upsert(NewUser::new(Email::parse("ada@example.io").unwrap(), Provider::Github)).unwrap();
    let id = SessionId::generate();
    data.kv().create_session(&id, &user, Vec::new()).unwrap();
    let deleted = {
        let (data, user) = (Arc::clone(&data), user.id);
        first_commit_answer_lost(&server, move || data.delete_user(&user))
    };
    assert!(deleted.unwrap_err().is_retryable());
    assert!(data.users().get(&user.id).unwrap().is_none(), "the delete committed");
    assert!(another_process(&server).kv().get_session(&id).unwrap().is_none(), "a deleted account's session loads");
}

/// `DataLayer::remove_users` whose removal committed unanswered, deleting
/// an invitee that never signed in: a session made for the invitee without
/// `users.upsert` is ended all the same.
#[test]
fn an_invitee_whose_removal_lost_its_answer_is_signed_out_everywhere() {
    let Some(server) = PrivateServer::start().unwrap() else {
        eprintln!("skipped: no PostgreSQL server binaries");
        return;
    };
    let data = Arc::new(open(&server));
    let owner = data.users().upsert(NewUser::new(Email::parse("own@example.io").unwrap(), Provider::Github)).unwrap();
    let cluster = data.clusters().create_for_owner(&owner.id).unwrap();
    let invited = data.clusters().add_users(&cluster.id, &[Email::parse("bob@example.io").unwrap()]).unwrap();
    let bob = data.users().get(&invited[0].user_id).unwrap().unwrap();
    let id = SessionId::generate();
    data.kv().create_session(&id, &bob, Vec::new()).unwrap();
    let removed = {
        let (data, cluster, bob) = (Arc::clone(&data), cluster.id, bob.id);
        first_commit_answer_lost(&server, move || data.remove_users(&cluster, &[bob]))
    };
    assert!(removed.unwrap_err().is_retryable());
    assert!(data.users().get(&bob.id).unwrap().is_none(), "the invitee's account was deleted");
    assert!(another_process(&server).kv().get_session(&id).unwrap().is_none(), "a deleted invitee's session loads");
}

/// A delete that found no connection (the server stopped) sent nothing, so
/// nothing can have committed: `delete_user` answers `Unavailable` after
/// one checkout, not a second one for a sign-out that cannot be needed
/// (which doubled the time it took to fail: 10 s against 5 s).
#[test]
fn a_delete_that_found_no_connection_is_not_followed_by_a_sign_out() {
    let Some(server) = PrivateServer::start().unwrap() else {
        eprintln!("skipped: no PostgreSQL server binaries");
        return;
    };
    let data =
        DataLayer::open(Config::new(server.url()).with_kv(KvBackendConfig::Postgres { purge_every: None }).with_pool(
            dployr_data::PoolConfig {
                connection_timeout: Duration::from_millis(500),
                ..dployr_data::PoolConfig::default()
            },
        ))
        .unwrap();
    let user = data.users().upsert(NewUser::new(Email::parse("ada@example.io").unwrap(), Provider::Github)).unwrap();
    drop(server);
    let before = data.pool().pool_stats().checkout_timeouts;
    let deleted = data.delete_user(&user.id);
    assert!(matches!(deleted, Err(dployr_data::StoreError::Unavailable { .. })), "{deleted:?}");
    assert_eq!(data.pool().pool_stats().checkout_timeouts - before, 1, "one checkout waited out, not two");
}
