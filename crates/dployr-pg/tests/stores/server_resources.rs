//! A server out of disk space or memory: its refusal of a write is "retry
//! later" (`Unavailable`), not "report it" (`Backend`), nothing of the write
//! is kept, reads go on, and the same connections write again once the
//! server can.
//!
//! Test triggers raise the server's own errors, with the SQLSTATE and the
//! text PostgreSQL 15 sends: `could not extend file "...": No space left on
//! device` is what a server whose data disk filled under the stores sent
//! (a 64 MB tmpfs filled by a table of filler; every growing write then
//! failed so, and wrote again once the filler was dropped). A full disk
//! cannot be made here without root, a trigger can.

use diesel::connection::SimpleConnection as _;
use dployr_domain::{
    BootstrapTokenStore as _, ClusterStore as _, InstanceStore as _, NewInstance, NewUser, Nonce, Provider, StoreError,
    UserStore as _,
};

use crate::fixture::{Fixture, email};

/// The tables a store inserts into, each refusing every insert from now on
/// with `sqlstate` and `message` (its `%s` the table's oid, as the server
/// names a table's file).
fn refuse_inserts(f: &Fixture, sqlstate: &str, message: &str) {
    let message = message.replace("%s", "' || TG_RELID || '");
    let mut sql = format!(
        "CREATE OR REPLACE FUNCTION test_server_refuses() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
           RAISE EXCEPTION USING ERRCODE = '{sqlstate}', MESSAGE = '{message}', HINT = 'Check free disk space.'; \
         END $$;"
    );
    for table in ["users", "clusters", "user_clusters", "instances", "bootstrap_tokens"] {
        sql += &format!(
            "DROP TRIGGER IF EXISTS test_refuses ON {table}; \
             CREATE TRIGGER test_refuses BEFORE INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION test_server_refuses();"
        );
    }
    f.inspect(|conn| conn.batch_execute(&sql).unwrap());
}

fn accept_inserts(f: &Fixture) {
    f.inspect(|conn| conn.batch_execute("DROP FUNCTION test_server_refuses() CASCADE").unwrap());
}

fn is_unavailable_saying(error: &StoreError, words: &str) -> bool {
    matches!(error, StoreError::Unavailable { reason, .. } if reason.contains(words))
}

#[test]
fn a_write_refused_for_a_full_disk_is_unavailable_keeps_nothing_and_passes_once_space_is_freed() {
    let f = Fixture::new();
    let (ada, cluster) = f.owner("ada@example.io");
    let instance = f.instance(&cluster.id, "10.0.0.1", "web-1");
    // An account with no cluster yet (a user owns one cluster:
    // `create_for_owner` of an owner gives back the one they have).
    let lin = f.user("lin@example.io");
    let opened = f.pool.pool_stats().connections_opened;
    refuse_inserts(&f, "53100", "could not extend file \"base/16729/%s\": No space left on device");
    let before = f.fingerprint();

    let new_instance =
        || NewInstance { address: "10.0.0.2".try_into().unwrap(), tag: "web-2".try_into().unwrap(), metadata: None };
    let writes = |f: &Fixture| {
        vec![
            ("users.upsert", f.users.upsert(NewUser::new(email("grace@example.io"), Provider::Github)).map(drop)),
            // Two statements: the cluster's row goes in, its owner's
            // membership is refused; the cluster must not stay.
            ("clusters.create_for_owner", f.clusters.create_for_owner(&lin.id).map(drop)),
            ("clusters.add_users", f.clusters.add_users(&cluster.id, &[email("invitee@example.io")]).map(drop)),
            ("instances.create", f.instances.create(&cluster.id, new_instance()).map(drop)),
            ("bootstrap_tokens.create", f.tokens.create(&instance.id, &Nonce::parse("nonce-1").unwrap()).map(drop)),
        ]
    };
    for (operation, result) in writes(&f) {
        let error = result.expect_err(operation);
        assert!(is_unavailable_saying(&error, "out of disk space (53100)"), "{operation}: {error:?}");
        assert!(error.is_retryable(), "{operation}");
        assert!(!dployr_pg::may_have_committed(&error), "{operation}: the server refused it, nothing committed");
    }
    assert_eq!(f.fingerprint(), before, "every refused write was rolled back whole");
    // Reads go on.
    assert_eq!(f.users.get_by_email(&ada.email).unwrap().map(|user| user.id), Some(ada.id));
    assert_eq!(
        f.clusters.get(&cluster.id).unwrap().map(|found| found.members.values().map(Vec::len).sum::<usize>()),
        Some(1),
        "its owner alone"
    );

    // Memory, the other resource a server can run out of.
    refuse_inserts(&f, "53200", "out of memory");
    let error = f.users.upsert(NewUser::new(email("grace@example.io"), Provider::Github)).unwrap_err();
    assert!(is_unavailable_saying(&error, "out of memory (53200)"), "{error:?}");
    assert_eq!(f.fingerprint(), before);

    // Space freed: the same writes pass, on the connections the pool had.
    accept_inserts(&f);
    for (operation, result) in writes(&f) {
        result.unwrap_or_else(|error| panic!("{operation} once space is freed: {error:?}"));
    }
    assert_eq!(f.pool.pool_stats().connections_opened, opened, "no connection was dropped for a full disk");
}
