//! The totals of the member, invite and instance listings come from
//! `cluster_counts`, which triggers keep in the writing transaction: after
//! every kind of write, each listing's total equals a `count(*)` of its rows.

use diesel::connection::SimpleConnection as _;
use diesel::prelude::*;
use dployr_domain::{
    ClusterId, ClusterPatch, ClusterStore, InstanceStore, NewInstance, Page, Role, StoreError, UserStore,
};

use crate::fixture::{Fixture, email};

/// (members, invites, instances) as the listings report them.
fn reported(f: &Fixture, cluster: &ClusterId) -> (u64, u64, u64) {
    (
        f.clusters.members(cluster, &Page::first(1)).unwrap().total,
        f.clusters.invites(cluster, &Page::first(1)).unwrap().total,
        f.instances.list_by_cluster(cluster, &Page::first(1)).unwrap().total,
    )
}

/// The same, counted.
fn counted(f: &Fixture, cluster: &ClusterId) -> (u64, u64, u64) {
    let count = |sql: &str| u64::try_from(f.count(&sql.replace("$c", &format!("'{cluster}'")))).unwrap();
    (
        count("SELECT count(*) FROM user_clusters WHERE cluster_id = $c AND role <> 'invited'"),
        count("SELECT count(*) FROM user_clusters WHERE cluster_id = $c AND role = 'invited'"),
        count("SELECT count(*) FROM instances WHERE cluster_id = $c"),
    )
}

fn instance(n: u32) -> NewInstance {
    NewInstance {
        address: format!("10.0.0.{n}").as_str().try_into().unwrap(),
        tag: format!("web-{n}").as_str().try_into().unwrap(),
        metadata: None,
    }
}

#[test]
fn listing_totals_follow_every_kind_of_write() {
    let f = Fixture::new();
    let (owner, cluster) = f.owner("owner@example.io");
    let c = cluster.id;
    let expect = |f: &Fixture, totals: (u64, u64, u64), step: &str| {
        assert_eq!(reported(f, &c), totals, "reported after {step}");
        assert_eq!(counted(f, &c), totals, "counted after {step}");
    };
    expect(&f, (1, 0, 0), "create_for_owner");
    let invited =
        f.clusters.add_users(&c, &[email("a@example.io"), email("b@example.io"), email("c@example.io")]).unwrap();
    expect(&f, (1, 3, 0), "add_users");
    f.clusters.accept_invite(&invited[0].user_id, &c).unwrap();
    expect(&f, (2, 2, 0), "accept_invite");
    f.clusters.decline_invite(&invited[1].user_id, &c).unwrap();
    expect(&f, (2, 1, 0), "decline_invite");
    let roles = [(Role::Developer, vec![invited[0].user_id, invited[2].user_id])].into();
    f.clusters.update(&c, ClusterPatch { roles: Some(roles), ..ClusterPatch::default() }).unwrap();
    expect(&f, (3, 0, 0), "update with roles");
    f.clusters.transfer_ownership(&c, &invited[0].user_id, None).unwrap();
    expect(&f, (2, 0, 0), "transfer_ownership removing the previous owner");
    f.users.delete(&owner.id).unwrap();
    f.clusters.remove_users(&c, &[invited[2].user_id]).unwrap();
    expect(&f, (1, 0, 0), "remove_users");
    for n in 0..5 {
        f.instances.create(&c, instance(n)).unwrap();
    }
    let listed = f.instances.list_by_cluster(&c, &Page::first(2)).unwrap();
    f.instances.delete(&listed.items[0].id).unwrap();
    expect(&f, (1, 0, 4), "instances created and deleted");
    // A refused write changes no total.
    let error = f.instances.create(&c, instance(1)).unwrap_err();
    assert!(matches!(error, StoreError::Conflict { .. }), "{error}");
    expect(&f, (1, 0, 4), "a refused instance");

    // A user deleted with memberships in several clusters: each total drops.
    let (_, other) = f.owner("other@example.io");
    f.clusters.add_users(&other.id, &[email("a@example.io")]).unwrap();
    f.clusters.add_users(&c, &[email("many@example.io")]).unwrap();
    f.clusters.add_users(&other.id, &[email("many@example.io")]).unwrap();
    let many = f.users.get_by_email(&email("many@example.io")).unwrap().unwrap();
    f.users.delete(&many.id).unwrap();
    expect(&f, (1, 0, 4), "a member of two clusters deleted");
    assert_eq!(reported(&f, &other.id), counted(&f, &other.id));
    assert_eq!(reported(&f, &other.id), (1, 1, 0));

    // SQL outside the stores keeps them too: an invitation moved between clusters.
    let moved = f.clusters.add_users(&other.id, &[email("move@example.io")]).unwrap().remove(0).user_id;
    assert_eq!(reported(&f, &other.id), (1, 2, 0));
    f.inspect(|conn| {
        conn.batch_execute(&format!(
            "UPDATE user_clusters SET cluster_id = '{c}' WHERE user_id = '{moved}' AND cluster_id = '{}'",
            other.id
        ))
    })
    .unwrap();
    assert_eq!(reported(&f, &other.id), (1, 1, 0));
    assert_eq!(reported(&f, &other.id), counted(&f, &other.id));
    expect(&f, (1, 1, 4), "an invitation moved in by hand");

    // Deleting a cluster removes its totals row with it.
    f.clusters.delete(&c).unwrap();
    assert_eq!(f.count(&format!("SELECT count(*) FROM cluster_counts WHERE cluster_id = '{c}'")), 0);
    assert_eq!(reported(&f, &c), (0, 0, 0), "an unknown cluster lists nothing");
}

/// A page past the last item is the one row of an empty page (its item's
/// columns all NULL): no items, and still the listing's total.
#[test]
fn a_page_past_the_last_item_is_empty_and_keeps_the_total() {
    let f = Fixture::new();
    let (_owner, cluster) = f.owner("owner@example.io");
    let c = cluster.id;
    f.clusters.add_users(&c, &[email("a@example.io"), email("b@example.io")]).unwrap();
    for n in 0..3 {
        f.instances.create(&c, instance(n)).unwrap();
    }
    let members = f.clusters.members(&c, &Page::offset(1, 10)).unwrap();
    assert_eq!((members.items.len(), members.total, members.next), (0, 1, None));
    let invites = f.clusters.invites(&c, &Page::offset(2, 10)).unwrap();
    assert_eq!((invites.items.len(), invites.total, invites.next), (0, 2, None));
    let instances = f.instances.list_by_cluster(&c, &Page::offset(3, 10)).unwrap();
    assert_eq!((instances.items.len(), instances.total, instances.next), (0, 3, None));

    // A cursor past the last item (the items after it deleted since) leads
    // to the same empty page.
    let first = f.instances.list_by_cluster(&c, &Page::first(2)).unwrap();
    let rest = f.instances.list_by_cluster(&c, &Page::after(first.next.clone().unwrap(), 3)).unwrap();
    f.instances.delete(&rest.items[0].id).unwrap();
    let after = f.instances.list_by_cluster(&c, &Page::after(first.next.unwrap(), 3)).unwrap();
    assert_eq!((after.items.len(), after.total, after.next), (0, 2, None));
    // Members without a picture (a NULL column) are items, not an empty page.
    let invited = f.clusters.invites(&c, &Page::first(10)).unwrap();
    assert_eq!(invited.items.len(), 2);
    assert!(invited.items.iter().all(|member| member.picture.is_none()));
}

/// A next cursor is given exactly when an item follows the page: a last
/// page that is exactly full has none (it would lead to an empty page).
#[test]
fn a_last_page_that_is_exactly_full_has_no_next_cursor() {
    let f = Fixture::new();
    let (_owner, cluster) = f.owner("owner@example.io");
    let c = cluster.id;
    f.clusters.add_users(&c, &[email("a@example.io"), email("b@example.io"), email("c@example.io")]).unwrap();
    for n in 0..4 {
        f.instances.create(&c, instance(n)).unwrap();
    }
    // Exactly full: by offset, by cursor, and as the only page.
    assert_eq!(f.instances.list_by_cluster(&c, &Page::first(4)).unwrap().next, None);
    assert_eq!(f.instances.list_by_cluster(&c, &Page::offset(2, 2)).unwrap().next, None);
    let first = f.instances.list_by_cluster(&c, &Page::first(2)).unwrap();
    let last = f.instances.list_by_cluster(&c, &Page::after(first.next.unwrap(), 2)).unwrap();
    assert_eq!((last.items.len(), last.next), (2, None));
    assert_eq!(f.clusters.invites(&c, &Page::first(3)).unwrap().next, None);
    assert_eq!(f.clusters.members(&c, &Page::first(1)).unwrap().next, None, "the owner alone");
    // One item more: a cursor, and the page after it holds that item.
    let invites = f.clusters.invites(&c, &Page::first(2)).unwrap();
    let rest = f.clusters.invites(&c, &Page::after(invites.next.unwrap(), 2)).unwrap();
    assert_eq!((rest.items.len(), rest.next), (1, None));
    let instances = f.instances.list_by_cluster(&c, &Page::first(3)).unwrap();
    let rest = f.instances.list_by_cluster(&c, &Page::after(instances.next.unwrap(), 3)).unwrap();
    assert_eq!((rest.items.len(), rest.next), (1, None));
}

/// A write changes the totals of the clusters it touches through the
/// primary key of `cluster_counts`, never by reading every cluster's row
/// (`006_counts_by_key`; before it, each membership or instance write
/// scanned the whole table twice). With 2 000 clusters, an instance insert,
/// an invitation and the deletion of a user invited to two clusters each
/// read `cluster_counts` by index only: `pg_stat_xact_user_tables` counts
/// the scans of the writing transaction itself, triggers included.
#[test]
fn a_write_reaches_its_clusters_totals_by_key_however_many_clusters_there_are() {
    let f = Fixture::new();
    let (_, cluster) = f.owner("owner@example.io");
    let (_, other) = f.owner("other@example.io");
    let invited_twice = f.clusters.add_users(&cluster.id, &[email("twice@example.io")]).unwrap().remove(0).user_id;
    f.clusters.add_users(&other.id, &[email("twice@example.io")]).unwrap();
    let bulk_owner = "0000000000000000000000000A";
    f.inspect(|conn| {
        conn.batch_execute(&format!(
            "BEGIN;
             INSERT INTO users (id, email, name, provider) VALUES ('{bulk_owner}', 'bulk@example.io', 'Bulk', 'github');
             INSERT INTO clusters (id, name)
                 SELECT '1' || lpad(n::text, 25, '0'), 'bulk ' || n FROM generate_series(1, 2000) n;
             INSERT INTO user_clusters (user_id, cluster_id, role)
                 SELECT '{bulk_owner}', '1' || lpad(n::text, 25, '0'), 'owner' FROM generate_series(1, 2000) n;
             COMMIT;
             ANALYZE cluster_counts;"
        ))
    })
    .unwrap();
    assert_eq!(f.count("SELECT count(*) FROM cluster_counts"), 2002);

    #[derive(QueryableByName, Debug, PartialEq)]
    struct Scans {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        seq_scan: i64,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        idx_scan: i64,
    }
    // The scans of cluster_counts by one write, in a transaction rolled
    // back. Counted before and after it in that transaction: the view also
    // holds what earlier transactions of the session did until the server
    // flushes them (at most once a second, between transactions).
    let scans_of = |write: &str| -> Scans {
        f.inspect(|conn| {
            let now = |conn: &mut PgConnection| {
                diesel::sql_query(
                    "SELECT coalesce(seq_scan, 0) AS seq_scan, coalesce(idx_scan, 0) AS idx_scan
                       FROM pg_stat_xact_user_tables WHERE relname = 'cluster_counts'",
                )
                .get_result::<Scans>(conn)
                .unwrap()
            };
            conn.batch_execute("BEGIN").unwrap();
            let before = now(conn);
            conn.batch_execute(write).unwrap();
            let after = now(conn);
            conn.batch_execute("ROLLBACK").unwrap();
            Scans { seq_scan: after.seq_scan - before.seq_scan, idx_scan: after.idx_scan - before.idx_scan }
        })
    };
    let c = cluster.id;
    for (write, clusters) in [
        (
            format!(
                "INSERT INTO instances (id, cluster_id, address, tag) VALUES ('{}', '{c}', '10.9.9.9', 'by-key')",
                dployr_domain::InstanceId::generate()
            ),
            1,
        ),
        (format!("INSERT INTO user_clusters (user_id, cluster_id, role) VALUES ('{bulk_owner}', '{c}', 'invited')"), 1),
        (format!("DELETE FROM users WHERE id = '{invited_twice}'"), 2),
    ] {
        let scans = scans_of(&write);
        assert_eq!(scans.seq_scan, 0, "{write}: {scans:?}");
        assert_eq!(scans.idx_scan, clusters, "{write}: one lookup by key per cluster changed: {scans:?}");
    }
    // What the rolled-back writes would have changed stays as it was.
    assert_eq!(reported(&f, &c), (1, 1, 0));
    assert_eq!(reported(&f, &c), counted(&f, &c));
}
