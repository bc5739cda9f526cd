//! Session writes that fail (the backend unavailable, nothing written):
//! what a failed call does after it must leave other sessions alone. A
//! backend over memory whose writes fail on demand ([`ObservedKv`]), which
//! can run another caller's step in the middle of a failing write.

#![cfg(test)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use dployr_domain::{KvBackend, StoreError};
use dployr_kv::{KvStore, MemoryKv, SessionId};
use dployr_tests::kv_contract::sample_user;
use dployr_tests::observed_kv::ObservedKv;
use tower_sessions_core::SessionStore as _;

/// What runs inside a failing write (another caller's step).
type Step = Box<dyn FnOnce() + Send>;

/// How many writes fail from now on, and a step to run inside the first.
#[derive(Clone, Default)]
struct Failures {
    left: Arc<AtomicUsize>,
    during: Arc<Mutex<Option<Step>>>,
}

/// A backend over memory whose next `failures.left` writes (`put`,
/// `replace`) fail `Unavailable` with nothing written.
fn flaky(failures: &Failures) -> Arc<dyn KvBackend> {
    let failures = failures.clone();
    Arc::new(ObservedKv::new(Arc::new(MemoryKv::new())).failing_writes(move |_| {
        failures.left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).ok()?;
        let step = failures.during.lock().unwrap().take();
        if let Some(step) = step {
            step();
        }
        Some(StoreError::Unavailable { reason: "injected: the backend did not answer".into(), source: None })
    }))
}

/// Two `create_session` calls under one id at once (a caller that uses the
/// id again, which `delete_user_sessions` documents): one fails without
/// writing (Unavailable), the other succeeds while the first is in flight
/// and its caller hands out the cookie. The failed call's follow-up delete
/// removes the session the successful call wrote. (A first version of
/// the follow-up after a failed write took the session back.)
#[test]
fn a_failed_create_session_does_not_delete_the_session_a_concurrent_create_wrote() {
    let failures = Failures::default();
    let kv = flaky(&failures);
    let store = KvStore::new(kv.clone());
    let other_process = KvStore::new(kv.clone());
    let (ada, bob) = (sample_user(1), sample_user(2));
    let id = SessionId::generate();
    {
        let (id, bob) = (id.clone(), bob.clone());
        let other = KvStore::new(kv.clone());
        *failures.during.lock().unwrap() = Some(Box::new(move || {
            other.create_session(&id, &bob, vec![]).unwrap();
        }));
    }
    failures.left.store(1, Ordering::SeqCst);
    let failed = store.create_session(&id, &ada, vec![]);
    assert!(failed.is_err(), "{failed:?}");
    let loaded = other_process.get_session(&id).unwrap();
    assert_eq!(
        loaded.map(|s| s.user_id),
        Some(bob.id),
        "the session a successful create_session wrote was deleted by a concurrent failed one"
    );
}

/// A session of ada's exists under an id; a create_session under the same
/// id (a refresh of her clusters) fails without writing. Her session, which
/// her cookie names, is deleted: a transient failure signs her out. (A
/// first version of the follow-up deleted it.)
#[test]
fn a_failed_create_session_over_a_live_session_does_not_end_it() {
    let failures = Failures::default();
    let kv = flaky(&failures);
    let store = KvStore::new(kv.clone());
    let ada = sample_user(1);
    let id = SessionId::generate();
    store.create_session(&id, &ada, vec![]).unwrap();
    failures.left.store(1, Ordering::SeqCst);
    assert!(store.create_session(&id, &ada, vec![]).is_err());
    assert!(KvStore::new(kv).get_session(&id).unwrap().is_some(), "a failed refresh signed the session out");
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// A tower-sessions store over a backend whose writes fail on demand, and
/// a session of Ada's created on it (record and index entry written).
fn ada_signed_in_on_tower_sessions()
-> (tokio::runtime::Runtime, Failures, dployr_tower_sessions::KvSessionStore, tower_sessions_core::session::Record) {
    let rt = runtime();
    let failures = Failures::default();
    let store = dployr_tower_sessions::KvSessionStore::new(flaky(&failures)).with_user_field("user_id");
    let mut record = tower_sessions_core::session::Record {
        id: tower_sessions_core::session::Id::default(),
        data: [("user_id".to_owned(), serde_json::Value::from("ada"))].into_iter().collect(),
        expiry_date: time::OffsetDateTime::now_utc() + time::Duration::hours(1),
    };
    rt.block_on(store.create(&mut record)).unwrap();
    (rt, failures, store, record)
}

/// A signed-in tower session (record and index entry written) is saved
/// again; the record write fails (nothing written), and so does the index
/// write after it; the delete goes through. The session, still named by
/// its index entry, is deleted: the user is signed out by a failed save.
/// The same failure after a *successful* record write keeps the session
/// (it checks `index.contains`; test
/// `a_signed_in_session_whose_index_refresh_fails_stays_signed_in`).
#[test]
fn a_signed_in_tower_session_whose_save_fails_twice_stays_signed_in() {
    let (rt, failures, store, mut record) = ada_signed_in_on_tower_sessions();
    record.data.insert("theme".into(), serde_json::Value::from("dark"));
    failures.left.store(2, Ordering::SeqCst);
    assert!(rt.block_on(store.save(&record)).is_err());
    assert!(rt.block_on(store.load(&record.id)).unwrap().is_some(), "a failed save signed ada out");
}

/// Control: one failure only (the record write; the index write after it
/// passes) keeps the session.
#[test]
fn control_a_signed_in_tower_session_whose_save_fails_once_stays_signed_in() {
    let (rt, failures, store, record) = ada_signed_in_on_tower_sessions();
    failures.left.store(1, Ordering::SeqCst);
    assert!(rt.block_on(store.save(&record)).is_err());
    assert!(rt.block_on(store.load(&record.id)).unwrap().is_some());
}

/// A visitor holds the cookie of an anonymous session and signs in as Ada;
/// from the save on, the pool has no connection free for anything but the
/// record (the index entry and the delete that would take the record back
/// fail). The save fails, but the record naming Ada was left in no index:
/// it loaded after her sign-out everywhere (found with 150 sign-ins at
/// once on a pool of one connection, 1 session in 750 left). The entry of
/// a loaded session's save now goes first: a failed entry writes nothing.
#[test]
fn a_sign_in_whose_index_entry_and_clean_up_fail_leaves_no_session_of_the_user() {
    let rt = runtime();
    let outage = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let unavailable = || StoreError::Unavailable { reason: "injected: no connection free".into(), source: None };
    let (writes_down, deletes_down) = (outage.clone(), outage.clone());
    let kv: Arc<dyn KvBackend> = Arc::new(
        ObservedKv::new(Arc::new(MemoryKv::new()))
            // Every write but the record's own (the session key) fails.
            .failing_writes(move |key| {
                (writes_down.load(Ordering::SeqCst) && !key.starts_with("tower_session:")).then(unavailable)
            })
            .failing_deletes(move |_| deletes_down.load(Ordering::SeqCst).then(unavailable)),
    );
    let store = dployr_tower_sessions::KvSessionStore::new(kv).with_user_field("user_id");
    let mut record = tower_sessions_core::session::Record {
        id: tower_sessions_core::session::Id::default(),
        data: Default::default(),
        expiry_date: time::OffsetDateTime::now_utc() + time::Duration::hours(1),
    };
    rt.block_on(store.create(&mut record)).unwrap();
    record.data.insert("user_id".into(), serde_json::Value::from("ada"));
    outage.store(true, Ordering::SeqCst);
    assert!(rt.block_on(store.save(&record)).is_err(), "the save fails");
    outage.store(false, Ordering::SeqCst);

    rt.block_on(store.delete_user_sessions("ada")).unwrap();
    let left = rt.block_on(store.load(&record.id)).unwrap();
    assert!(
        left.as_ref().is_none_or(|record| !record.data.contains_key("user_id")),
        "a session naming Ada loads after her sign-out everywhere: {:?}",
        left.map(|record| record.data)
    );
}
