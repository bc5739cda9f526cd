//! Races of the tower-sessions store that a random mix meets only by
//! chance, made deterministic by a backend that runs a step of another
//! request right after one read ([`ObservedKv`]).

#![cfg(test)]

use std::sync::Arc;

use dployr_domain::KvBackend;
use dployr_kv::{MemoryKv, PgKv};
use dployr_pg::{PgPool, PoolConfig};
use dployr_tests::observed_kv::{ObservedKv, OnceStep};
use dployr_tower_sessions::KvSessionStore;
use time::OffsetDateTime;
use tower_sessions_core::SessionStore as _;
use tower_sessions_core::session::{Id, Record};

/// Ada signs in, then Bob on the same session (no new id), so Ada's index
/// still names it. Ada's sign-out everywhere reads the record (Bob's, so
/// passed over); right then the session is saved naming Ada again, which
/// writes her entry again. The sign-out removed that entry after it, so the
/// session was Ada's, live, in no index: her next sign-out everywhere, begun
/// after every call returned, ended 0 and left it loading.
fn a_session_saved_back_to_its_user_during_their_sign_out_everywhere_is_ended_by_the_next(inner: Arc<dyn KvBackend>) {
    let step = OnceStep::default();
    let backend: Arc<dyn KvBackend> = Arc::new(ObservedKv::new(inner).after_get(step.runner()));
    let store = KvSessionStore::new(backend).with_user_field("user_id");
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut session = Record {
        id: Id::default(),
        data: [("user_id".to_owned(), serde_json::Value::from("ada"))].into_iter().collect(),
        expiry_date: OffsetDateTime::now_utc() + time::Duration::hours(1),
    };
    runtime.block_on(store.create(&mut session)).unwrap();
    session.data.insert("user_id".into(), "bob".into());
    runtime.block_on(store.save(&session)).unwrap();

    let mut back_to_ada = session.clone();
    back_to_ada.data.insert("user_id".into(), "ada".into());
    let (saver, saved) = (store.clone(), back_to_ada.clone());
    step.set("tower_session:", move || {
        // Another request, on a runtime of its own (this runs on a
        // blocking thread of the sign-out's).
        let request = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(saver.save(&saved)).unwrap();
        });
        request.join().unwrap();
    });
    let first = runtime.block_on(store.delete_user_sessions("ada")).unwrap();
    assert!(step.ran(), "the save ran during the sign-out");
    assert_eq!(first, 0, "the session was Bob's when the sign-out read it");
    assert_eq!(runtime.block_on(store.load(&session.id)).unwrap(), Some(back_to_ada), "Ada's, live");

    let second = runtime.block_on(store.delete_user_sessions("ada")).unwrap();
    assert_eq!(second, 1, "Ada's live session was in no index");
    assert_eq!(runtime.block_on(store.load(&session.id)).unwrap(), None);
}

#[test]
fn on_memory_a_session_saved_back_to_its_user_during_their_sign_out_everywhere_is_ended_by_the_next() {
    a_session_saved_back_to_its_user_during_their_sign_out_everywhere_is_ended_by_the_next(Arc::new(MemoryKv::new()));
}

#[test]
fn on_postgres_a_session_saved_back_to_its_user_during_their_sign_out_everywhere_is_ended_by_the_next() {
    let db = dployr_testkit::database();
    let pool = PgPool::connect(db.url(), PoolConfig::default()).unwrap();
    a_session_saved_back_to_its_user_during_their_sign_out_everywhere_is_ended_by_the_next(Arc::new(PgKv::new(pool)));
}
