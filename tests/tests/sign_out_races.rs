//! A sign-out everywhere of `KvStore` sessions racing a sign-in under the
//! same session id (a caller that uses an id again, which `create_session`
//! takes: it replaces), made deterministic by a backend that runs the
//! sign-in right after the sign-out's take.

#![cfg(test)]

use std::sync::Arc;
use std::time::Duration;

use dployr_kv::{KvStore, ManualClock, MemoryKv, SessionId};
use dployr_tests::kv_contract::{sample_clusters, sample_user};
use dployr_tests::observed_kv::{ObservedKv, OnceStep};

/// Ada's sign-out everywhere takes her session K; right then (another
/// request) Ada signs in again under the same id, writing K and her entry;
/// the sign-out then removes that entry. K was Ada's, live, in no index:
/// her next sign-out everywhere, begun after every call returned, ended 0
/// and K kept loading. The entry is now written back.
#[test]
fn a_session_created_again_under_its_id_during_the_users_sign_out_everywhere_is_ended_by_the_next() {
    let step = OnceStep::default();
    let store = KvStore::new(Arc::new(ObservedKv::new(Arc::new(MemoryKv::new())).after_take(step.runner())));
    let ada = sample_user(1);
    let id = SessionId::generate();
    store.create_session(&id, &ada, sample_clusters()).unwrap();

    let (signer, id2, ada2) = (store.clone(), id.clone(), ada.clone());
    step.set("session:", move || {
        signer.create_session(&id2, &ada2, sample_clusters()).unwrap();
    });
    let first = store.delete_user_sessions(&ada.id).unwrap();
    assert!(step.ran(), "the sign-in ran during the sign-out");
    assert_eq!(first, 1, "the first session was ended");
    // Created while the sign-out ran: it may survive it ...
    assert!(store.get_session(&id).unwrap().is_some(), "the new session is live");
    // ... but not the next one.
    let second = store.delete_user_sessions(&ada.id).unwrap();
    assert_eq!(second, 1, "Ada's live session was in no index: her next sign-out everywhere ended nothing");
    assert!(store.get_session(&id).unwrap().is_none(), "still loads after a second sign-out everywhere");
}

/// The same through the `Gone` path: Ada signed out of K on its own
/// (`delete_session`, which leaves the entry), then signs out everywhere;
/// while it runs she signs in again under K.
#[test]
fn a_session_created_again_under_a_signed_out_id_during_sign_out_everywhere_is_ended_by_the_next() {
    let step = OnceStep::default();
    let store = KvStore::new(Arc::new(ObservedKv::new(Arc::new(MemoryKv::new())).after_take(step.runner())));
    let ada = sample_user(2);
    let id = SessionId::generate();
    store.create_session(&id, &ada, sample_clusters()).unwrap();
    store.delete_session(&id).unwrap();

    let (signer, id2, ada2) = (store.clone(), id.clone(), ada.clone());
    step.set("session:", move || {
        signer.create_session(&id2, &ada2, sample_clusters()).unwrap();
    });
    let first = store.delete_user_sessions(&ada.id).unwrap();
    assert!(step.ran(), "the sign-in ran during the sign-out");
    assert_eq!(first, 0);
    assert!(store.get_session(&id).unwrap().is_some(), "the new session is live");
    let second = store.delete_user_sessions(&ada.id).unwrap();
    assert_eq!(second, 1, "Ada's live session was in no index: her next sign-out everywhere ended nothing");
    assert!(store.get_session(&id).unwrap().is_none(), "still loads after a second sign-out everywhere");
}

/// A session written again under its id during the sign-out, with less
/// than the backend's shortest TTL (1 ms on memory and PostgreSQL) left on
/// this process's clock: its entry is not written back (the put refused it,
/// and the whole sign-out everywhere answered `Invalid { field: "ttl" }` (a verdict
/// on the input: not retried) after it had ended the sessions).
#[test]
fn a_session_written_again_with_under_a_millisecond_left_does_not_fail_sign_out_everywhere() {
    let step = OnceStep::default();
    let clock = ManualClock::new();
    let store = KvStore::new(Arc::new(ObservedKv::new(Arc::new(MemoryKv::new())).after_take(step.runner())))
        .with_clock(clock.clone());
    let ada = sample_user(2);
    let id = SessionId::generate();
    store.create_session(&id, &ada, sample_clusters()).unwrap();
    let (signer, id2, ada2) = (store.clone(), id.clone(), ada.clone());
    step.set("session:", move || {
        signer.create_session(&id2, &ada2, sample_clusters()).unwrap();
        // Its end is 500 µs away on this process's clock (a clock a little
        // ahead of the writer's does the same near the end of a session).
        clock.advance(Duration::from_secs(7 * 24 * 3600) - Duration::from_micros(500));
    });
    let result = store.delete_user_sessions(&ada.id);
    assert!(result.is_ok(), "sign-out everywhere failed: {result:?}");
}
