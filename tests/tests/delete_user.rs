//! `DataLayer::delete_user`: closing an account signs its user out
//! everywhere, on every key-value backend; a refused delete signs no one
//! out; a user already gone is still signed out, so a call that failed
//! half-way is finished by calling again.

#![cfg(test)]

use dployr_data::{
    ClusterStore as _, DataLayer, Email, NewUser, Provider, SessionId, StoreError, User, UserId, UserStore as _,
};
use dployr_testkit::{CloudflareEmulator, TestDatabase};
use dployr_tests::data_layer_kv::{Kv, config};

/// The data layer on `db` with `kv`, and the emulator that must outlive it.
fn open(db: &TestDatabase, kv: Kv) -> (DataLayer, Option<CloudflareEmulator>) {
    let (config, emulator) = config(db, kv);
    (DataLayer::open(config).unwrap(), emulator)
}

fn user(data: &DataLayer, address: &str) -> User {
    data.users().upsert(NewUser::new(Email::parse(address).unwrap(), Provider::Github)).unwrap()
}

/// `count` new sessions of `user`.
fn sign_in(data: &DataLayer, user: &User, count: usize) -> Vec<SessionId> {
    (0..count)
        .map(|_| {
            let id = SessionId::generate();
            data.kv().create_session(&id, user, Vec::new()).unwrap();
            id
        })
        .collect()
}

fn signed_in(data: &DataLayer, sessions: &[SessionId]) -> usize {
    sessions.iter().filter(|id| data.kv().get_session(id).unwrap().is_some()).count()
}

fn deleting_a_user_ends_their_sessions_and_only_theirs(kv: Kv) {
    let db = dployr_testkit::database();
    let (data, _emulator) = open(&db, kv);
    let (ada, bob) = (user(&data, "ada@example.io"), user(&data, "bob@example.io"));
    let (adas, bobs) = (sign_in(&data, &ada, 3), sign_in(&data, &bob, 2));
    assert_eq!(data.delete_user(&ada.id).unwrap(), 3, "{kv:?}");
    assert_eq!(data.users().get(&ada.id).unwrap(), None, "{kv:?}");
    assert_eq!(signed_in(&data, &adas), 0, "{kv:?}");
    assert_eq!(signed_in(&data, &bobs), 2, "{kv:?}: another user's sessions stay");
}

#[test]
fn deleting_a_user_ends_their_sessions_and_only_theirs_on_memory() {
    deleting_a_user_ends_their_sessions_and_only_theirs(Kv::Memory);
}

#[test]
fn deleting_a_user_ends_their_sessions_and_only_theirs_on_postgres() {
    deleting_a_user_ends_their_sessions_and_only_theirs(Kv::Postgres);
}

#[test]
fn deleting_a_user_ends_their_sessions_and_only_theirs_on_emulated_cloudflare() {
    deleting_a_user_ends_their_sessions_and_only_theirs(Kv::Cloudflare);
}

#[test]
fn a_refused_delete_signs_no_one_out() {
    let db = dployr_testkit::database();
    let (data, _emulator) = open(&db, Kv::Postgres);
    let owner = user(&data, "owner@example.io");
    data.clusters().create_for_owner(&owner.id).unwrap();
    let sessions = sign_in(&data, &owner, 2);
    match data.delete_user(&owner.id) {
        Err(StoreError::Conflict { field: "owner", .. }) => {}
        other => panic!("expected a conflict on owner, got {other:?}"),
    }
    assert!(data.users().get(&owner.id).unwrap().is_some());
    assert_eq!(signed_in(&data, &sessions), 2);
}

#[test]
fn a_user_already_gone_is_still_signed_out_and_reported_not_found() {
    let db = dployr_testkit::database();
    let (data, _emulator) = open(&db, Kv::Postgres);
    let ada = user(&data, "ada@example.io");
    let sessions = sign_in(&data, &ada, 2);
    // What a call that failed after its first step leaves: the user gone,
    // the sessions there.
    data.users().delete(&ada.id).unwrap();
    assert_eq!(signed_in(&data, &sessions), 2);
    match data.delete_user(&ada.id) {
        Err(StoreError::NotFound { entity: "user", .. }) => {}
        other => panic!("expected the user not found, got {other:?}"),
    }
    assert_eq!(signed_in(&data, &sessions), 0, "the second call finished the job");
    match data.delete_user(&UserId::generate()) {
        Err(StoreError::NotFound { entity: "user", .. }) => {}
        other => panic!("expected the user not found, got {other:?}"),
    }
}

#[tokio::test(flavor = "current_thread")]
async fn the_async_facade_deletes_a_user_and_their_sessions() {
    let db = dployr_testkit::database();
    let (data, _emulator) = open(&db, Kv::Memory);
    let ada = user(&data, "ada@example.io");
    let sessions = sign_in(&data, &ada, 2);
    let data = data.into_async();
    assert_eq!(data.delete_user(&ada.id).await.unwrap(), 2);
    for id in &sessions {
        assert_eq!(data.kv().get_session(id).await.unwrap(), None);
    }
    assert!(matches!(data.delete_user(&ada.id).await, Err(StoreError::NotFound { .. })));
}
