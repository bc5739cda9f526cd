//! The races a randomized concurrent workload found, made deterministic: a
//! third session holds the row lock that stretches the window, the store
//! call waits on it (seen in `pg_stat_activity`), the competing call runs,
//! and the lock is released. Each test failed on the stores before the owner
//! guard (d9bc8fc); the database guard alone would also stop races 1 and 2,
//! so these tests check the stores' own outcome: a typed error or a correct
//! result, never an ownerless cluster.
//!
//! Also here: deadlocks, serialization failures and statement timeouts are
//! `Unavailable` (retryable), and a transient failure is retried inside the
//! store.

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection as _;
use diesel::prelude::*;
use diesel::result::Error as DieselError;
use dployr_domain::{ClusterStore, Provider, Role, StoreError, UserId, UserPatch, UserStore};
use dployr_pg::{PgPool, PgUserStore, PoolConfig};

use crate::fixture::{Fixture, email};

/// A session outside the stores that holds locks until dropped or committed.
struct LockHolder(PgConnection);

impl LockHolder {
    /// Opens a transaction on a new connection and runs `sql` in it.
    fn hold(f: &Fixture, sql: &str) -> Self {
        let mut conn = f.db.connect();
        conn.batch_execute(&format!("BEGIN; {sql}")).unwrap();
        Self(conn)
    }

    fn release(mut self) {
        self.0.batch_execute("COMMIT").unwrap();
    }
}

/// How many sessions of the fixture's database wait on a lock.
fn lock_waiters(f: &Fixture) -> i64 {
    f.count("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'")
}

/// Waits until `n` sessions of the fixture's database wait on a lock.
fn wait_for_lock_waiters(f: &Fixture, n: i64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let waiting = lock_waiters(f);
        if waiting >= n {
            return;
        }
        assert!(Instant::now() < deadline, "{waiting} of {n} sessions wait on a lock after 20 s");
        thread::sleep(Duration::from_millis(5));
    }
}

fn owners_of(f: &Fixture, cluster: &dployr_domain::ClusterId) -> i64 {
    f.count(&format!("SELECT count(*) FROM user_clusters WHERE cluster_id = '{cluster}' AND role = 'owner'"))
}

fn user_exists(f: &Fixture, user: &UserId) -> bool {
    f.count(&format!("SELECT count(*) FROM users WHERE id = '{user}'")) == 1
}

/// Race 1: `users.delete(U)` checked that U owns nothing, then a transfer
/// made U owner of C (its foreign-key check's key-share lock did not
/// conflict with the delete's lock), and the delete's cascade removed that
/// owner row: C had no owner, and both calls returned `Ok`.
#[test]
fn deleting_a_user_who_is_being_made_owner_is_a_conflict_and_the_cluster_keeps_its_new_owner() {
    let f = Arc::new(Fixture::with_pool_size(4));
    let (_, cluster) = f.owner("owner@example.io");
    let heir = f.user("heir@example.io");
    let holder = LockHolder::hold(&f, &format!("SELECT 1 FROM users WHERE id = '{}' FOR KEY SHARE", heir.id));
    let deleting = {
        let f = Arc::clone(&f);
        thread::spawn(move || f.users.delete(&heir.id))
    };
    wait_for_lock_waiters(&f, 1);
    f.clusters.transfer_ownership(&cluster.id, &heir.id, Some(Role::Admin)).unwrap();
    holder.release();
    let deleted = deleting.join().unwrap();
    assert!(matches!(deleted, Err(StoreError::Conflict { field: "owner", .. })), "{deleted:?}");
    assert!(user_exists(&f, &heir.id));
    assert_eq!(f.clusters.owner(&cluster.id).unwrap().map(|m| m.user_id), Some(heir.id));
}

/// Race 2: `remove_users(A, [U])` decided that invitee U belonged nowhere
/// else, then a transfer made U owner of B, and the clean-up's delete of U
/// cascaded that owner row away: B had no owner.
#[test]
fn forgetting_an_invitee_who_is_being_made_owner_elsewhere_keeps_the_invitee_and_the_owner() {
    let f = Arc::new(Fixture::with_pool_size(4));
    let (_, a) = f.owner("a-owner@example.io");
    let (_, b) = f.owner("b-owner@example.io");
    let invitee = f.clusters.add_users(&a.id, &[email("invitee@example.io")]).unwrap().remove(0).user_id;
    let holder = LockHolder::hold(&f, &format!("SELECT 1 FROM users WHERE id = '{invitee}' FOR KEY SHARE"));
    let removing = {
        let (f, a) = (Arc::clone(&f), a.id);
        thread::spawn(move || f.clusters.remove_users(&a, &[invitee]))
    };
    wait_for_lock_waiters(&f, 1);
    f.clusters.transfer_ownership(&b.id, &invitee, Some(Role::Admin)).unwrap();
    holder.release();
    removing.join().unwrap().unwrap();
    assert!(user_exists(&f, &invitee), "an owner is not a forgotten invitee");
    assert_eq!(owners_of(&f, &b.id), 1);
    assert_eq!(f.clusters.owner(&b.id).unwrap().map(|m| m.user_id), Some(invitee));
    assert_eq!(f.clusters.role_of(&invitee, &a.id).unwrap(), None, "removed from A all the same");
}

/// Race 3: `users.delete(U)` took U then its membership in A;
/// `remove_users(A, [U])` took that membership then U (for the clean-up):
/// PostgreSQL broke the cycle by aborting one, reported as `Backend`.
#[test]
fn deleting_a_user_while_removing_them_from_a_cluster_does_not_deadlock() {
    let f = Arc::new(Fixture::with_pool_size(4));
    let (_, a) = f.owner("a-owner@example.io");
    let invitee = f.clusters.add_users(&a.id, &[email("invitee@example.io")]).unwrap().remove(0).user_id;
    // Holds the invitee so that the clean-up of remove_users waits with the
    // membership already deleted (before the fix), or before touching it.
    let holder = LockHolder::hold(&f, &format!("SELECT 1 FROM users WHERE id = '{invitee}' FOR KEY SHARE"));
    let removing = {
        let (f, a) = (Arc::clone(&f), a.id);
        thread::spawn(move || f.clusters.remove_users(&a, &[invitee]))
    };
    wait_for_lock_waiters(&f, 1);
    let deleting = {
        let f = Arc::clone(&f);
        thread::spawn(move || f.users.delete(&invitee))
    };
    wait_for_lock_waiters(&f, 2);
    holder.release();
    let removed = removing.join().unwrap();
    let deleted = deleting.join().unwrap();
    assert!(removed.is_ok(), "{removed:?}");
    assert!(matches!(deleted, Ok(()) | Err(StoreError::NotFound { entity: "user", .. })), "{deleted:?}");
    assert!(!user_exists(&f, &invitee));
    assert_eq!(owners_of(&f, &a.id), 1);
}

/// Waits until `call` has finished or waits on a lock: what a test of a
/// missing lock must tell apart without waiting out a timeout.
fn finished_or_waiting<T>(f: &Fixture, call: &thread::JoinHandle<T>) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !call.is_finished() && lock_waiters(f) == 0 {
        assert!(Instant::now() < deadline, "the call neither finished nor waited on a lock in 20 s");
        thread::sleep(Duration::from_millis(5));
    }
}

/// How many of `user`'s memberships keep a name or picture other than the
/// user's own.
fn stale_copies(f: &Fixture, user: &UserId) -> i64 {
    f.count(&format!(
        "SELECT count(*) FROM user_clusters m JOIN users u ON u.id = m.user_id \
          WHERE m.user_id = '{user}' AND (m.name, m.picture) IS DISTINCT FROM (u.name, u.picture)"
    ))
}

/// Race 4: a transfer of ownership to a user who was not a member copied
/// their profile while a change of their name was in progress; the
/// change's trigger, which updates the user's memberships, had already run
/// and could not see the new one: the owner was listed under the old name
/// until the next change (before `007_profile_copy_lock`). (`add_users`
/// happened to wait: its insert of the invitee's user waits on the unique
/// e-mail of a row being updated; the test checks it all the same.)
#[test]
fn a_user_made_owner_or_invited_while_their_profile_changes_is_listed_with_the_new_profile() {
    let f = Arc::new(Fixture::with_pool_size(4));
    let (_, cluster) = f.owner("owner@example.io");
    let heir = f.user("heir@example.io");
    let change =
        format!("UPDATE users SET name = 'New Name', picture = 'https://example.io/new.png' WHERE id = '{}'", heir.id);
    let holder = LockHolder::hold(&f, &change);
    let transferring = {
        let (f, cluster, heir) = (Arc::clone(&f), cluster.id, heir.id);
        thread::spawn(move || f.clusters.transfer_ownership(&cluster, &heir, Some(Role::Admin)))
    };
    finished_or_waiting(&f, &transferring);
    holder.release();
    transferring.join().unwrap().unwrap();
    assert_eq!(stale_copies(&f, &heir.id), 0);
    let owner = f.clusters.owner(&cluster.id).unwrap().unwrap();
    assert_eq!((owner.user_id, owner.name.as_str()), (heir.id, "New Name"));
    assert_eq!(owner.picture.as_deref(), Some("https://example.io/new.png"));

    let invitee = f.user("invitee@example.io");
    let holder = LockHolder::hold(&f, &format!("UPDATE users SET name = 'Newer Name' WHERE id = '{}'", invitee.id));
    let inviting = {
        let (f, cluster) = (Arc::clone(&f), cluster.id);
        thread::spawn(move || f.clusters.add_users(&cluster, &[email("invitee@example.io")]))
    };
    finished_or_waiting(&f, &inviting);
    holder.release();
    let invited = inviting.join().unwrap().unwrap();
    assert_eq!(invited.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(), ["Newer Name"]);
    assert_eq!(stale_copies(&f, &invitee.id), 0);
}

/// Race 5, the other order: a change of the name committed while a
/// membership that had copied the old one was not yet committed, so the
/// change's trigger could not see it.
#[test]
fn a_profile_changed_while_the_user_is_being_invited_reaches_the_new_membership() {
    let f = Arc::new(Fixture::with_pool_size(4));
    let (_, cluster) = f.owner("owner@example.io");
    let invitee = f.user("invitee@example.io");
    let holder = LockHolder::hold(
        &f,
        &format!(
            "INSERT INTO user_clusters (user_id, cluster_id, role) VALUES ('{}', '{}', 'invited')",
            invitee.id, cluster.id
        ),
    );
    let renaming = {
        let f = Arc::clone(&f);
        thread::spawn(move || {
            let patch = UserPatch {
                name: Some("New Name".try_into().unwrap()),
                picture: Some("https://example.io/new.png".into()),
                ..UserPatch::default()
            };
            f.users.update(&email("invitee@example.io"), patch)
        })
    };
    finished_or_waiting(&f, &renaming);
    holder.release();
    renaming.join().unwrap().unwrap().unwrap();
    assert_eq!(stale_copies(&f, &invitee.id), 0);
    let listed = f.clusters.get(&cluster.id).unwrap().unwrap();
    let member = listed.members.values().flatten().find(|m| m.user_id == invitee.id).unwrap();
    assert_eq!((member.name.as_str(), member.picture.as_deref()), ("New Name", Some("https://example.io/new.png")));
}

/// Race 6: `clusters.update`'s roles add a member while their name is being
/// changed. The roles now share-lock the users they list (before any
/// membership), so they wait for the change, copy the new name, and do not
/// deadlock with the change's own update of the user's memberships.
#[test]
fn roles_given_while_the_users_profile_changes_copy_the_new_profile() {
    let f = Arc::new(Fixture::with_pool_size(4));
    let (_, cluster) = f.owner("owner@example.io");
    let developer = f.user("developer@example.io");
    let holder = LockHolder::hold(&f, &format!("UPDATE users SET name = 'New Name' WHERE id = '{}'", developer.id));
    let updating = {
        let (f, cluster, developer) = (Arc::clone(&f), cluster.id, developer.id);
        thread::spawn(move || {
            let roles = [(Role::Developer, vec![developer])].into_iter().collect();
            f.clusters.update(&cluster, dployr_domain::ClusterPatch { roles: Some(roles), ..Default::default() })
        })
    };
    finished_or_waiting(&f, &updating);
    holder.release();
    let updated = updating.join().unwrap().unwrap().unwrap();
    let member = updated.members.values().flatten().find(|m| m.user_id == developer.id).unwrap();
    assert_eq!((member.name.as_str(), member.role), ("New Name", Role::Developer));
    assert_eq!(stale_copies(&f, &developer.id), 0);
}

/// The error a raw diesel statement returns, mapped by the workspace's one mapper.
fn mapped<T: std::fmt::Debug>(result: QueryResult<T>) -> StoreError {
    dployr_pg::store_error(result.unwrap_err())
}

#[test]
fn a_deadlock_is_unavailable_and_retryable() {
    let f = Fixture::new();
    let (ada, bob) = (f.user("ada@example.io"), f.user("bob@example.io"));
    let (url, ada_id, bob_id) = (f.db.url().to_owned(), ada.id.to_string(), bob.id.to_string());
    let lock = |conn: &mut PgConnection, id: &str| {
        diesel::sql_query("SELECT 1 FROM users WHERE id = $1 FOR UPDATE")
            .bind::<diesel::sql_types::Text, _>(id)
            .execute(conn)
    };
    let mut first = PgConnection::establish(&url).unwrap();
    first.batch_execute("BEGIN").unwrap();
    lock(&mut first, &ada_id).unwrap();
    let second = thread::spawn(move || {
        let mut conn = PgConnection::establish(&url).unwrap();
        conn.transaction::<_, DieselError, _>(|conn| {
            lock(conn, &bob_id)?;
            lock(conn, &ada_id)
        })
    });
    wait_for_lock_waiters(&f, 1);
    // The cycle: one of the two is aborted with 40P01.
    let first_result = lock(&mut first, &bob.id.to_string());
    let second_result = second.join().unwrap();
    let error = match (first_result, second_result) {
        (Err(error), _) | (_, Err(error)) => dployr_pg::store_error(error),
        (Ok(_), Ok(_)) => panic!("no deadlock"),
    };
    assert!(matches!(&error, StoreError::Unavailable { reason, .. } if reason.contains("40P01")), "{error}");
    assert!(error.is_retryable());
}

#[test]
fn a_serialization_failure_is_unavailable_and_retryable() {
    let f = Fixture::new();
    f.user("ada@example.io");
    let mut first = f.db.connect();
    let mut second = f.db.connect();
    let update = "UPDATE users SET name = 'changed'";
    first.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM users").unwrap();
    second.batch_execute(update).unwrap();
    let error = mapped(first.batch_execute(update));
    assert!(matches!(&error, StoreError::Unavailable { reason, .. } if reason.contains("40001")), "{error}");
    assert!(error.is_retryable());
}

#[test]
fn a_statement_cancelled_by_statement_timeout_is_unavailable_and_writes_nothing() {
    let f = Fixture::new();
    let ada = f.user("ada@example.io");
    let config = PoolConfig { statement_timeout: Some(Duration::from_millis(200)), ..PoolConfig::default() };
    let users = PgUserStore::new(PgPool::connect(f.db.url(), config).unwrap());
    let holder = LockHolder::hold(&f, &format!("SELECT 1 FROM users WHERE id = '{}' FOR UPDATE", ada.id));
    let patch = UserPatch { name: Some("Renamed".try_into().unwrap()), ..UserPatch::default() };
    let error = users.update(&ada.email, patch).unwrap_err();
    holder.release();
    assert!(
        matches!(&error, StoreError::Unavailable { reason, .. } if reason.contains("statement_timeout")),
        "{error}"
    );
    assert_eq!(f.users.get(&ada.id).unwrap().unwrap().name, ada.name);
}

/// A deadlock with a session outside the stores, once: the store's
/// transaction is aborted, runs again and succeeds; the caller sees `Ok`.
#[test]
fn a_transaction_aborted_by_a_deadlock_runs_again_and_succeeds() {
    let f = Arc::new(Fixture::with_pool_size(2));
    if !f.db.superuser() {
        eprintln!("skipped: setting deadlock_timeout needs a superuser");
        return;
    }
    let (owner, cluster) = f.owner("owner@example.io");
    let heir = f.user("heir@example.io");
    // The outside session holds the heir's membership row... and, once the
    // store holds the cluster row, asks for it: a cycle.
    f.clusters.add_users(&cluster.id, std::slice::from_ref(&heir.email)).unwrap();
    f.clusters.accept_invite(&heir.id, &cluster.id).unwrap();
    let mut outside = f.db.connect();
    // PostgreSQL aborts the transaction whose deadlock check runs while the
    // cycle exists: the store's (1 s after it starts waiting), as long as the
    // outside session checks much later.
    outside
        .batch_execute(&format!(
            "SET deadlock_timeout = '60s'; BEGIN; SELECT 1 FROM user_clusters WHERE user_id = '{}' AND cluster_id = '{}' FOR UPDATE",
            heir.id, cluster.id
        ))
        .unwrap();
    let transferring = {
        let (f, cluster, heir) = (Arc::clone(&f), cluster.id, heir.id);
        thread::spawn(move || f.clusters.transfer_ownership(&cluster, &heir, Some(Role::Admin)))
    };
    wait_for_lock_waiters(&f, 1);
    // The store holds the cluster row and waits for the heir's membership;
    // now the outside session asks for the cluster row.
    let outside_result =
        outside.batch_execute(&format!("SELECT 1 FROM clusters WHERE id = '{}' FOR UPDATE", cluster.id));
    outside.batch_execute("ROLLBACK").unwrap();
    // The store's deadlock check ran first and PostgreSQL aborted its
    // transaction: the outside session got its lock...
    outside_result.unwrap();
    // ...and the store ran the transaction again.
    transferring.join().unwrap().unwrap();
    assert_eq!(f.clusters.owner(&cluster.id).unwrap().map(|m| m.user_id), Some(heir.id));
    assert_eq!(f.clusters.role_of(&owner.id, &cluster.id).unwrap(), Some(Role::Admin));
}

/// `add_users(B, [e])` found the user of `e` and was inserting their
/// membership when the user was deleted (their foreign-key check waited for
/// the delete): the invitation is for the e-mail, so the store runs the
/// transaction again and invites a new user of that e-mail (it reported
/// `NotFound` with the cluster's id as the user's key).
#[test]
fn an_invitee_deleted_while_being_invited_is_invited_afresh() {
    let f = Arc::new(Fixture::with_pool_size(4));
    let (_, a) = f.owner("a-owner@example.io");
    let (_, b) = f.owner("b-owner@example.io");
    let first = f.clusters.add_users(&a.id, &[email("guest@example.io")]).unwrap().remove(0).user_id;
    let mut deleter = f.db.connect();
    deleter.batch_execute(&format!("BEGIN; SELECT 1 FROM users WHERE id = '{first}' FOR UPDATE")).unwrap();
    let inviting = {
        let (f, b) = (Arc::clone(&f), b.id);
        thread::spawn(move || f.clusters.add_users(&b, &[email("guest@example.io")]))
    };
    wait_for_lock_waiters(&f, 1);
    deleter.batch_execute(&format!("DELETE FROM users WHERE id = '{first}'; COMMIT")).unwrap();
    let invited = inviting.join().unwrap().unwrap();
    assert_eq!(invited.len(), 1);
    assert_eq!(invited[0].role, Role::Invited);
    assert_ne!(invited[0].user_id, first);
    assert_eq!(f.users.get_by_email(&email("guest@example.io")).unwrap().unwrap().provider, Provider::Email);
}

#[test]
fn an_invitee_deleted_before_its_membership_is_written_is_invited_afresh_not_dropped() {
    let f = Arc::new(Fixture::with_pool_size(4));
    let (_, a) = f.owner("a-owner@example.io");
    let (_, b) = f.owner("b-owner@example.io");
    let first = f.clusters.add_users(&a.id, &[email("guest@example.io")]).unwrap().remove(0).user_id;
    // A gate right after add_users' invitee insert, which met the existing
    // invitee and locked nothing: a statement trigger waits on an advisory
    // lock the test holds.
    f.db.connect()
        .batch_execute(
            "CREATE FUNCTION gate() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN PERFORM pg_advisory_xact_lock(4242); RETURN NULL; END $$; \
             CREATE TRIGGER gate AFTER INSERT ON users FOR EACH STATEMENT EXECUTE FUNCTION gate();",
        )
        .unwrap();
    let gate = LockHolder::hold(&f, "SELECT pg_advisory_xact_lock(4242)");
    let inviting = {
        let (f, b) = (Arc::clone(&f), b.id);
        thread::spawn(move || f.clusters.add_users(&b, &[email("guest@example.io")]))
    };
    wait_for_lock_waiters(&f, 1);
    // Cluster A's clean-up deletes the invitee it no longer holds.
    f.clusters.remove_users(&a.id, &[first]).unwrap();
    gate.release();
    let invited = inviting.join().unwrap().unwrap();
    assert_eq!(invited.len(), 1, "the invitation was dropped: {invited:?}");
    assert_eq!(invited[0].role, Role::Invited);
    assert_ne!(invited[0].user_id, first);
    assert_eq!(f.clusters.role_of(&invited[0].user_id, &b.id).unwrap(), Some(Role::Invited));
}

#[test]
fn not_found_names_the_missing_entitys_own_key() {
    let f = Fixture::new();
    let (_, cluster) = f.owner("owner@example.io");
    let ghost = UserId::generate();
    let error = f.clusters.transfer_ownership(&cluster.id, &ghost, None).unwrap_err();
    assert!(matches!(&error, StoreError::NotFound { entity: "user", key } if *key == ghost.to_string()), "{error}");
    let gone = f.owner("gone@example.io").1.id;
    f.clusters.delete(&gone).unwrap();
    let error = f.clusters.transfer_ownership(&gone, &ghost, None).unwrap_err();
    assert!(matches!(&error, StoreError::NotFound { entity: "cluster", key } if *key == gone.to_string()), "{error}");
    let new =
        dployr_domain::NewInstance { address: "h".try_into().unwrap(), tag: "t".try_into().unwrap(), metadata: None };
    let error = dployr_domain::InstanceStore::create(&f.instances, &gone, new).unwrap_err();
    assert!(matches!(&error, StoreError::NotFound { entity: "cluster", key } if *key == gone.to_string()), "{error}");
    let instance = dployr_domain::InstanceId::generate();
    let error = dployr_domain::BootstrapTokenStore::create(&f.tokens, &instance, &"n".try_into().unwrap()).unwrap_err();
    assert!(
        matches!(&error, StoreError::NotFound { entity: "instance", key } if *key == instance.to_string()),
        "{error}"
    );
}

/// A pool of `max_size` connections to the fixture's database, made to
/// default to REPEATABLE READ (as a database, a role or a connection string
/// may) before the pool opens any.
fn pool_defaulting_to_repeatable_read(f: &Fixture, max_size: u32) -> PgPool {
    f.db.connect()
        .batch_execute(
            "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET default_transaction_isolation = %L',
                                        current_database(), 'repeatable read'); END $$;",
        )
        .unwrap();
    PgPool::connect(f.db.url(), PoolConfig { max_size, ..PoolConfig::default() }).unwrap()
}

/// The stores' lock reasoning (a call that waited on a lock reads what the
/// holder committed) holds at READ COMMITTED, PostgreSQL's default, which a
/// database, a role or the connection string may change: at REPEATABLE
/// READ, the second of two first sign-ins of one user read from a snapshot
/// taken before the first one's cluster existed, and made a second one.
/// Every store transaction runs at READ COMMITTED, whatever the default.
#[test]
fn two_first_sign_ins_make_one_cluster_where_the_database_defaults_to_repeatable_read() {
    let f = Fixture::new();
    let ada = f.user("ada@example.io");
    let pool = pool_defaulting_to_repeatable_read(&f, 2);
    let clusters = Arc::new(dployr_pg::PgClusterStore::new(pool));
    let holder = LockHolder::hold(&f, &format!("SELECT 1 FROM users WHERE id = '{}' FOR UPDATE", ada.id));
    let calls: Vec<_> = (0..2)
        .map(|_| {
            let (clusters, ada) = (Arc::clone(&clusters), ada.id);
            thread::spawn(move || clusters.create_for_owner(&ada))
        })
        .collect();
    // Both have begun (and, at REPEATABLE READ, taken their snapshot).
    wait_for_lock_waiters(&f, 2);
    holder.release();
    let made: Vec<_> = calls.into_iter().map(|call| call.join().unwrap().unwrap().id).collect();
    assert_eq!(made[0], made[1], "both calls answer the one cluster");
    assert_eq!(
        f.count(&format!("SELECT count(*) FROM user_clusters WHERE user_id = '{}' AND role = 'owner'", ada.id)),
        1
    );
}

/// The statements sent outside a transaction (a bootstrap token's
/// `mark_used`, the key-value backend's counters) take the connection's
/// default: the pool sets it to READ COMMITTED when it opens a connection,
/// in the same round trip as its other settings, so that a statement that
/// waited on a row lock re-reads it instead of failing to serialize.
#[test]
fn pooled_connections_default_to_read_committed_where_the_database_defaults_to_repeatable_read() {
    let f = Fixture::new();
    let pool = pool_defaulting_to_repeatable_read(&f, 1);
    let mut conn = pool.get().unwrap();
    let level: String =
        diesel::select(diesel::dsl::sql::<diesel::sql_types::Text>("current_setting('transaction_isolation')"))
            .get_result(&mut *conn)
            .unwrap();
    assert_eq!(level, "read committed");
}

/// A database (or role) may turn durable commits off for speed; a
/// `mark_used` answered `true` there was lost with a crash of the server,
/// and answered `true` again after it. The pool's connections commit
/// durably whatever the default, and keep a stricter level set there.
#[test]
fn pooled_connections_commit_durably_where_the_database_turned_it_off_and_keep_a_stricter_level() {
    let f = Fixture::new();
    let level_where_the_database_says = |level: &str| -> String {
        f.db.connect()
            .batch_execute(&format!(
                "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET synchronous_commit = %L',
                                            current_database(), '{level}'); END $$;"
            ))
            .unwrap();
        let pool = PgPool::connect(f.db.url(), PoolConfig { max_size: 1, ..PoolConfig::default() }).unwrap();
        let mut conn = pool.get().unwrap();
        diesel::select(diesel::dsl::sql::<diesel::sql_types::Text>("current_setting('synchronous_commit')"))
            .get_result(&mut *conn)
            .unwrap()
    };
    assert_eq!(level_where_the_database_says("off"), "on");
    assert_eq!(level_where_the_database_says("remote_apply"), "remote_apply");
    assert_eq!(level_where_the_database_says("local"), "local");
}

/// Spins for `micros` microseconds: a sleep's granularity is too coarse to
/// sweep a window of one round trip.
fn spin(micros: i64) {
    let until = Instant::now() + Duration::from_micros(micros.unsigned_abs());
    while Instant::now() < until {
        std::hint::spin_loop();
    }
}

/// What may happen to the cluster a user owns while that user signs in.
#[derive(Clone, Copy, Debug)]
enum Taken {
    /// Its ownership goes to another member, the user staying an admin.
    Transferred,
    /// It is deleted.
    Deleted,
}

/// `create_for_owner(U)` found the cluster U owned, then read it with a
/// second statement, which under READ COMMITTED sees what committed in
/// between: a transfer of its ownership (answered: a cluster U does not
/// own) or its deletion (answered: `NotFound("cluster")`). Neither call
/// waits for the other, so no lock can hold the window open: the test
/// sweeps the second call's start across the first one's statements, a
/// few microseconds a round, both ways.
fn a_sign_in_answers_a_cluster_the_user_owns_while_it_is(taken: Taken) {
    const ROUNDS: i64 = 300;
    let f = Arc::new(Fixture::with_pool_size(4));
    let mut others = 0;
    for round in 0..ROUNDS {
        let (owner, cluster) = f.owner(&format!("owner-{round}@example.io"));
        let other = f.clusters.add_users(&cluster.id, &[email(&format!("other-{round}@example.io"))]).unwrap();
        let other = other[0].user_id;
        f.clusters.accept_invite(&other, &cluster.id).unwrap();
        // The other call starts from 5 ms before the sign-in (long enough
        // for it to end first on a busy machine) to 1 ms after, 20 µs a
        // round.
        let offset = (round - 250) * 20;
        let start = Arc::new(std::sync::Barrier::new(2));
        let taking = {
            let (f, start, cluster) = (Arc::clone(&f), Arc::clone(&start), cluster.id);
            thread::spawn(move || {
                start.wait();
                spin(offset.max(0));
                match taken {
                    Taken::Transferred => f.clusters.transfer_ownership(&cluster, &other, Some(Role::Admin)),
                    Taken::Deleted => f.clusters.delete(&cluster),
                }
            })
        };
        start.wait();
        spin((-offset).max(0));
        let signed_in = f.clusters.create_for_owner(&owner.id);
        taking.join().unwrap().unwrap();
        let signed_in = signed_in.unwrap_or_else(|e| panic!("round {round} ({taken:?}, offset {offset} µs): {e:?}"));
        assert_eq!(
            signed_in.owner().map(|m| m.user_id),
            Some(owner.id),
            "round {round} ({taken:?}, offset {offset} µs): the cluster answered is not the user's own"
        );
        others += usize::from(signed_in.id != cluster.id);
    }
    // The sweep covered both orders: some sign-ins came after the cluster
    // was taken, and made the user a new one.
    assert!(others > 0, "no sign-in came after the cluster was {taken:?}: the sweep missed");
}

#[test]
fn a_sign_in_answers_a_cluster_the_user_owns_while_its_ownership_is_transferred() {
    a_sign_in_answers_a_cluster_the_user_owns_while_it_is(Taken::Transferred);
}

#[test]
fn a_sign_in_makes_a_new_cluster_while_the_one_the_user_owned_is_deleted() {
    a_sign_in_answers_a_cluster_the_user_owns_while_it_is(Taken::Deleted);
}
