//! Per-cluster statements under the plans a production database runs: once
//! a database holds many clusters, PostgreSQL keeps a prepared statement's
//! generic plan, made without the bound values. A condition that only a
//! custom plan can use (a bound `role = $n` against the partial index of
//! owners) then turns a one-row lookup into a scan of a whole cluster. The
//! test runs each operation on one connection more often than the five
//! custom plans after which PostgreSQL may switch, on a database of many
//! small clusters and one big one, and counts the `user_clusters` rows the
//! server fetched, which is exact, not timed.

use diesel::connection::SimpleConnection as _;
use diesel::prelude::*;
use diesel::sql_types::BigInt;
use dployr_domain::{ClusterId, ClusterStore, Email, Page, Role, UserId};
use dployr_pg::{PgClusterStore, PgPool, PoolConfig};

/// Members of the big cluster: any statement that reads them all stands out.
const BIG: i64 = 20_000;
/// Runs of each operation on one connection.
const RUNS: usize = 8;
/// Small clusters around it: an owner and two developers each.
const SMALL: i64 = 5_000;

/// One operation of the store, given its run's number.
type Operation<'a> = dyn Fn(&PgClusterStore, usize) + 'a;

#[derive(QueryableByName)]
struct Fetched {
    #[diesel(sql_type = BigInt)]
    rows: i64,
    #[diesel(sql_type = BigInt)]
    scans: i64,
}

/// Whether a session other than `conn`'s is connected to its database.
fn others_connected(conn: &mut PgConnection) -> bool {
    #[derive(QueryableByName)]
    struct Others {
        #[diesel(sql_type = BigInt)]
        others: i64,
    }
    let others: Others = diesel::sql_query(
        "SELECT count(*) AS others FROM pg_stat_activity
          WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .get_result(conn)
    .unwrap();
    others.others > 0
}

/// Rows of `user_clusters` fetched so far by sequential and index scans,
/// and how many scans, as the statistics collector reports them.
fn fetched(conn: &mut PgConnection) -> Fetched {
    diesel::sql_query(
        "SELECT (seq_tup_read + coalesce(idx_tup_fetch, 0))::bigint AS rows,
                (seq_scan + coalesce(idx_scan, 0))::bigint AS scans
           FROM pg_stat_user_tables WHERE relname = 'user_clusters'",
    )
    .get_result(conn)
    .unwrap()
}

#[test]
fn per_cluster_reads_and_the_owner_transfer_fetch_their_rows_not_the_cluster_under_generic_plans() {
    let db = dployr_testkit::database();
    let mut inspector = db.connect();
    let owner = "1".repeat(26);
    let big = "2".repeat(26);
    let small = "3".repeat(26);
    let member = format!("4{}", "0".repeat(24) + "1");
    inspector
        .batch_execute(&format!(
            "INSERT INTO users (id, email, name, provider) VALUES ('{owner}', 'owner@example.io', 'Owner', 'github');
             INSERT INTO users (id, email, name, provider)
                 SELECT '4' || lpad(n::text, 25, '0'), 'm' || n || '@example.io', 'M' || n, 'email'
                 FROM generate_series(1, {BIG}) n;
             INSERT INTO clusters (id, name) VALUES ('{big}', 'big'), ('{small}', 'small');
             INSERT INTO user_clusters (user_id, cluster_id, role) VALUES
                 ('{owner}', '{big}', 'owner'), ('{member}', '{small}', 'owner');
             INSERT INTO user_clusters (user_id, cluster_id, role)
                 SELECT '4' || lpad(n::text, 25, '0'), '{big}', 'viewer' FROM generate_series(1, {BIG}) n;
             -- Many small clusters, as in production, so that the statistics
             -- expect a few rows per cluster (with two clusters a generic plan
             -- would rightly expect half the table whatever the statement).
             INSERT INTO users (id, email, name, provider)
                 SELECT '5' || lpad(n::text, 25, '0'), 's' || n || '@example.io', 'S' || n, 'email'
                 FROM generate_series(1, {SMALL}) n;
             INSERT INTO clusters (id, name) SELECT '6' || lpad(n::text, 25, '0'), 's' || n FROM generate_series(1, {SMALL}) n;
             INSERT INTO user_clusters (user_id, cluster_id, role)
                 SELECT '5' || lpad(n::text, 25, '0'), '6' || lpad(n::text, 25, '0'), 'owner' FROM generate_series(1, {SMALL}) n;
             INSERT INTO user_clusters (user_id, cluster_id, role)
                 SELECT '5' || lpad(((n + i) % {SMALL} + 1)::text, 25, '0'), '6' || lpad(n::text, 25, '0'), 'developer'
                 FROM generate_series(1, {SMALL}) n, generate_series(1, 2) i;
             ANALYZE;"
        ))
        .unwrap();
    // The setup's own reads of user_clusters (5 002 rows: the triggers'
    // checks of the rows it inserted) are counted when this session reports
    // its statistics, which PostgreSQL puts off when it reported less than
    // a second before: once, on a loaded machine, they landed in the count
    // of clusters.add_users (628 rows a call). Report them now (PostgreSQL
    // 15 and later), as this session goes idle after the statement.
    inspector
        .batch_execute(
            "DO $$ BEGIN
                 IF current_setting('server_version_num')::int >= 150000 THEN
                     PERFORM pg_stat_force_next_flush();
                 END IF;
             END $$;",
        )
        .unwrap();

    let (big, member, owner) =
        (ClusterId::parse(&big).unwrap(), UserId::parse(&member).unwrap(), UserId::parse(&owner).unwrap());
    let operations: [(&str, &Operation<'_>); 12] = [
        ("clusters.user_clusters", &|clusters, _| {
            assert_eq!(clusters.user_clusters(&member).unwrap().len(), 2, "the small cluster it owns and the big one");
        }),
        ("clusters.owner", &|clusters, _| {
            let owner = clusters.owner(&big).unwrap().map(|o| o.email.as_str().to_owned());
            assert_eq!(owner.as_deref(), Some("owner@example.io"));
        }),
        ("clusters.users_with_role", &|clusters, _| {
            assert!(clusters.users_with_role(&big, Role::Admin).unwrap().is_empty());
        }),
        ("clusters.role_of", &|clusters, _| {
            assert_eq!(clusters.role_of(&member, &big).unwrap(), Some(Role::Viewer));
        }),
        ("clusters.members", &|clusters, _| {
            let page = clusters.members(&big, &Page::first(20)).unwrap();
            assert_eq!((page.items.len(), page.total), (20, BIG as u64 + 1));
        }),
        ("clusters.add_users", &|clusters, run| {
            let invited = Email::parse(&format!("new{run}@example.io")).unwrap();
            assert_eq!(clusters.add_users(&big, &[invited]).unwrap().len(), 1);
        }),
        ("clusters.invites", &|clusters, _| {
            assert_eq!(clusters.invites(&big, &Page::first(20)).unwrap().items.len(), RUNS);
        }),
        ("clusters.remove_users", &|clusters, _| {
            let invited = clusters.invites(&big, &Page::first(1)).unwrap().items[0].user_id;
            clusters.remove_users(&big, &[invited]).unwrap();
        }),
        ("clusters.pending_invites", &|clusters, _| {
            assert!(clusters.pending_invites(&member).unwrap().is_empty());
        }),
        ("clusters.owned_cluster", &|clusters, _| {
            assert!(clusters.owned_cluster(&member).unwrap().is_some());
        }),
        ("clusters.can_write", &|clusters, _| {
            assert!(!clusters.can_write(&member, &big).unwrap());
        }),
        ("clusters.transfer_ownership", &|clusters, run| {
            let to = if run % 2 == 0 { &member } else { &owner };
            clusters.transfer_ownership(&big, to, Some(Role::Viewer)).unwrap();
        }),
    ];
    let mut report = Vec::new();
    for (name, operation) in operations {
        let before = fetched(&mut inspector);
        // One connection: its prepared statements run RUNS times, past the
        // five custom plans after which PostgreSQL may keep the generic one.
        let pool = PgPool::connect(db.url(), PoolConfig { max_size: 1, ..PoolConfig::default() }).unwrap();
        let clusters = PgClusterStore::new(pool.clone());
        for run in 0..RUNS {
            operation(&clusters, run);
        }
        // A backend reports what it has not reported yet when it ends, and
        // leaves pg_stat_activity only after that: close the pool's
        // connection and wait until it is gone. (Waiting for the first new
        // scan instead could stop at a report made midway, and leave the
        // rest to be counted against the next operation.)
        drop(clusters);
        drop(pool);
        for _ in 0..100 {
            if !others_connected(&mut inspector) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let after = fetched(&mut inspector);
        assert!(after.scans > before.scans, "{name}: the pool's statistics never arrived");
        report.push((name, (after.rows - before.rows) / RUNS as i64));
    }
    assert!(
        report.iter().all(|(_, rows)| *rows < 100),
        "rows of user_clusters fetched per call on a cluster of {BIG} members: {report:?}"
    );
}

#[test]
fn a_role_update_whose_list_only_a_custom_plan_hashes_is_never_prepared() {
    let db = dployr_testkit::database();
    let mut inspector = db.connect();
    inspector
        .batch_execute(
            "INSERT INTO users (id, email, name, provider)
                 SELECT '4' || lpad(n::text, 25, '0'), 'm' || n || '@example.io', 'M' || n, 'email'
                 FROM generate_series(1, 3) n;
             INSERT INTO clusters (id, name) VALUES ('2222222222222222222222222A', 'c');
             INSERT INTO user_clusters (user_id, cluster_id, role) VALUES
                 ('40000000000000000000000001', '2222222222222222222222222A', 'owner');",
        )
        .unwrap();
    let cluster = ClusterId::parse("2222222222222222222222222A").unwrap();
    let listed =
        [UserId::parse("40000000000000000000000002").unwrap(), UserId::parse("40000000000000000000000003").unwrap()];
    // One connection, run past the five custom plans after which a prepared
    // statement may be given its generic plan.
    let pool = PgPool::connect(db.url(), PoolConfig { max_size: 1, ..PoolConfig::default() }).unwrap();
    let clusters = PgClusterStore::new(pool.clone());
    for run in 0..RUNS {
        let role = if run % 2 == 0 { Role::Viewer } else { Role::Developer };
        let patch = dployr_domain::ClusterPatch {
            roles: Some([(role, listed.to_vec())].into_iter().collect()),
            ..dployr_domain::ClusterPatch::default()
        };
        let updated = clusters.update(&cluster, patch).unwrap().unwrap();
        assert_eq!(updated.members.values().map(Vec::len).sum::<usize>(), 3, "{:?}", updated.members);
    }
    #[derive(QueryableByName)]
    struct Prepared {
        #[diesel(sql_type = diesel::sql_types::Text)]
        statement: String,
    }
    let mut conn = pool.get().unwrap();
    let prepared: Vec<Prepared> =
        diesel::sql_query("SELECT statement FROM pg_prepared_statements").load(&mut *conn).unwrap();
    assert!(!prepared.is_empty(), "the update's other statements are prepared");
    assert!(
        prepared.iter().all(|p| !p.statement.contains("<> ALL(")),
        "the set-roles statement was prepared, so a generic plan may compare every member with every listed user"
    );
}
