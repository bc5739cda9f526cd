//! `DataLayer::delete_user`: closing an account signs its user out
//! everywhere, on every key-value backend; a refused delete signs no one
//! out; a user already gone is still signed out, so a call that failed
//! half-way is finished by calling again.

#![cfg(test)]

use std::time::Duration;

use dployr_data::{
    CloudflareConfig, ClusterStore as _, Config, DataLayer, Email, KvBackendConfig, NewUser, Provider, SessionId,
    StoreError, User, UserId, UserStore as _,
};
use dployr_kv::RetryPolicy;
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

/// A new cluster with an invitee (an account made by the invitation) who
/// signed in twice: the cluster's id, the invitee and their sessions.
fn a_signed_in_invitee(data: &DataLayer) -> (dployr_data::ClusterId, User, Vec<SessionId>) {
    let owner = user(data, "owner@example.io");
    let cluster = data.clusters().create_for_owner(&owner.id).unwrap();
    let invited = data.clusters().add_users(&cluster.id, &[Email::parse("guest@example.io").unwrap()]).unwrap();
    let guest = data.users().get(&invited[0].user_id).unwrap().unwrap();
    let sessions = sign_in(data, &guest, 2);
    (cluster.id, guest, sessions)
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
    assert_eq!(data.users().sessions_to_end(&[ada.id]).unwrap(), [], "the account is no longer to sign out");
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

/// An invitee who signed in by one-time code (provider `email`) and whom a
/// cluster's removal leaves in no cluster is deleted by `remove_users`:
/// `DataLayer::remove_users` ends their sessions too; a member who keeps
/// an account keeps their sessions.
fn removing_an_invitee_whose_account_goes_ends_their_sessions(kv: Kv) {
    let db = dployr_testkit::database();
    let (data, _emulator) = open(&db, kv);
    let owner = user(&data, "owner@example.io");
    let cluster = data.clusters().create_for_owner(&owner.id).unwrap();
    let emails = [Email::parse("guest@example.io").unwrap(), Email::parse("kept@example.io").unwrap()];
    let invited = data.clusters().add_users(&cluster.id, &emails).unwrap();
    let guest = data.users().get(&invited[0].user_id).unwrap().unwrap();
    let kept = user(&data, "kept@example.io");
    assert_eq!(guest.provider, Provider::Email);
    let (guests, kepts) = (sign_in(&data, &guest, 2), sign_in(&data, &kept, 1));
    assert_eq!(data.remove_users(&cluster.id, &[guest.id, kept.id]).unwrap(), 2, "{kv:?}");
    assert_eq!(data.users().get(&guest.id).unwrap(), None, "{kv:?}: the invitee's account is gone");
    assert_eq!(signed_in(&data, &guests), 0, "{kv:?}: a session names an account that is gone");
    assert_eq!(signed_in(&data, &kepts), 1, "{kv:?}: a member with an account stays signed in");
}

#[test]
fn removing_an_invitee_whose_account_goes_ends_their_sessions_on_memory() {
    removing_an_invitee_whose_account_goes_ends_their_sessions(Kv::Memory);
}

#[test]
fn removing_an_invitee_whose_account_goes_ends_their_sessions_on_postgres() {
    removing_an_invitee_whose_account_goes_ends_their_sessions(Kv::Postgres);
}

#[test]
fn removing_an_invitee_whose_account_goes_ends_their_sessions_on_emulated_cloudflare() {
    removing_an_invitee_whose_account_goes_ends_their_sessions(Kv::Cloudflare);
}

#[test]
fn a_removal_whose_sign_out_did_not_happen_is_finished_by_calling_again() {
    let db = dployr_testkit::database();
    let (data, _emulator) = open(&db, Kv::Postgres);
    let (cluster, guest, sessions) = a_signed_in_invitee(&data);
    // What a call whose second step failed leaves: the account gone, its
    // sessions not (the store alone does not end them).
    data.clusters().remove_users(&cluster, &[guest.id]).unwrap();
    assert_eq!(data.users().get(&guest.id).unwrap(), None);
    assert_eq!(signed_in(&data, &sessions), 2);
    assert_eq!(data.remove_users(&cluster, &[guest.id]).unwrap(), 2);
    assert_eq!(signed_in(&data, &sessions), 0);
}

/// A retry after the cluster itself was deleted still ends the sessions
/// the first call left (its sign-out failed), then answers the cluster's
/// `NotFound`: the caller's retry is the only way to end them.
#[test]
fn a_removal_whose_sign_out_did_not_happen_is_finished_by_calling_again_after_the_cluster_is_gone() {
    let db = dployr_testkit::database();
    let (data, _emulator) = open(&db, Kv::Postgres);
    let (cluster, guest, sessions) = a_signed_in_invitee(&data);
    // What a call whose second step failed leaves, and then the cluster
    // deleted before the caller tried again.
    data.clusters().remove_users(&cluster, &[guest.id]).unwrap();
    data.clusters().delete(&cluster).unwrap();
    assert_eq!(signed_in(&data, &sessions), 2);
    match data.remove_users(&cluster, &[guest.id]) {
        Err(StoreError::NotFound { entity: "cluster", .. }) => {}
        other => panic!("expected the cluster not found, got {other:?}"),
    }
    assert_eq!(signed_in(&data, &sessions), 0, "the second call finished the job");
}

/// On Cloudflare, removing more invitees than the account's request budget
/// holds (1200 per 5 minutes, scaled down here) fails half-way with the
/// backend's 429; each call again starts with the accounts the last one
/// did not reach, so each goes further and one finishes: every session
/// ended, no account left to sign out. (Before `024_sessions_to_end`, every
/// retry listed the same accounts from the first and spent the budget on
/// them, and the removal never finished.) Ids that never were accounts
/// cost no request.
#[test]
fn a_removal_beyond_the_cloudflare_request_budget_is_finished_by_calls_that_each_go_further() {
    let db = dployr_testkit::database();
    let emulator = CloudflareEmulator::start();
    let cloudflare = CloudflareConfig {
        base_url: emulator.base_url().to_owned(),
        retry: RetryPolicy {
            initial_backoff: Duration::from_millis(10),
            max_elapsed: Duration::from_millis(200),
            ..RetryPolicy::default()
        },
        ..CloudflareConfig::new(emulator.account_id(), emulator.namespace_id(), emulator.api_token())
    };
    let data = DataLayer::open(Config::new(db.url()).with_kv(KvBackendConfig::Cloudflare(cloudflare))).unwrap();
    let owner = user(&data, "owner@example.io");
    let cluster = data.clusters().create_for_owner(&owner.id).unwrap();
    let emails: Vec<Email> = (0..40).map(|i| Email::parse(&format!("guest-{i}@example.io")).unwrap()).collect();
    let invitees: Vec<UserId> =
        data.clusters().add_users(&cluster.id, &emails).unwrap().iter().map(|member| member.user_id).collect();
    let mut sessions = Vec::new();
    for id in invitees.iter().step_by(4) {
        sessions.extend(sign_in(&data, &data.users().get(id).unwrap().unwrap(), 1));
    }

    emulator.set_request_budget(Some((15, Duration::from_secs(2))));
    let mut left = invitees.len();
    let mut calls = 0;
    loop {
        calls += 1;
        let result = data.remove_users(&cluster.id, &invitees);
        let now_left = data.users().sessions_to_end(&invitees).unwrap().len();
        match result {
            Ok(_) => {
                assert_eq!(now_left, 0, "call {calls} answered Ok with accounts left to sign out");
                break;
            }
            Err(StoreError::Unavailable { .. }) => {
                assert!(now_left < left, "call {calls} went no further: {now_left} of {left} accounts left");
                left = now_left;
            }
            Err(other) => panic!("call {calls}: expected Ok or the budget's Unavailable, got {other:?}"),
        }
        assert!(calls < 20, "{left} accounts still to sign out after {calls} calls");
        // The budget's window passes.
        std::thread::sleep(Duration::from_millis(2100));
    }
    assert!(calls >= 3, "the budget did not bite: {calls} call(s)");
    emulator.set_request_budget(None);
    assert_eq!(signed_in(&data, &sessions), 0);
    for id in &invitees {
        assert_eq!(data.users().get(id).unwrap(), None);
    }

    let strangers: Vec<UserId> = (0..50).map(|_| UserId::generate()).collect();
    let before = emulator.requests();
    assert_eq!(data.remove_users(&cluster.id, &strangers).unwrap(), 0);
    assert_eq!(emulator.requests() - before, 0, "ids that never were accounts cost no request");
}

/// Accounts deleted through the stores directly (whose callers keep their
/// sessions) are remembered as `delete_user`'s are, and no sign-out
/// forgets them by name: `sessions_to_end` grew by one row per such
/// account for good (a helper's soak). `open` forgets those older than the
/// sessions' TTL, which no session made before the delete outlives; a
/// younger one stays, and `remove_users` naming it still ends its sessions.
#[test]
fn open_forgets_accounts_deleted_through_the_stores_once_older_than_the_sessions_ttl() {
    use diesel::RunQueryDsl as _;
    let db = dployr_testkit::database();
    let (config, _emulator) = config(&db, Kv::Postgres);
    let session_ttl = config.kv_store.session_ttl;
    let data = DataLayer::open(config.clone()).unwrap();
    let (cluster, guest, sessions) = a_signed_in_invitee(&data);
    let old = user(&data, "old@example.io");
    data.users().delete(&old.id).unwrap();
    data.clusters().remove_users(&cluster, &[guest.id]).unwrap();
    assert_eq!(data.users().sessions_to_end(&[old.id, guest.id]).unwrap().len(), 2);
    let mut conn = db.connect();
    diesel::sql_query(format!(
        "UPDATE sessions_to_end SET deleted_at = now() - make_interval(secs => {}) WHERE user_id = '{}'",
        session_ttl.as_secs() + 1,
        old.id
    ))
    .execute(&mut conn)
    .unwrap();
    drop(data);

    let data = DataLayer::open(config).unwrap();
    assert_eq!(data.users().sessions_to_end(&[old.id, guest.id]).unwrap(), [guest.id]);
    assert_eq!(signed_in(&data, &sessions), 2);
    assert_eq!(data.remove_users(&cluster, &[guest.id]).unwrap(), 2);
    assert_eq!(signed_in(&data, &sessions), 0);
    assert_eq!(data.users().sessions_to_end(&[old.id, guest.id]).unwrap(), []);
}
