//! Statement budgets: every read is exactly one statement; every write is
//! one transaction (an explicit one, or a single statement, which
//! PostgreSQL runs as its own transaction). The counts are exact, so a
//! change that adds a round trip fails here. The single-statement writes
//! that return a row (`instances.create`, `instances.update_metadata`,
//! `bootstrap_tokens.create`, `users.update`) still send one statement but
//! inside an explicit transaction: the row is decoded before the commit, so
//! one that cannot be read back is rolled back instead of committed behind
//! an error (test `writes::a_row_that_cannot_be_decoded_is_rolled_back`).
//!
//! Each measured call is also one `dployr.store` span named for the
//! operation (the budget's name up to ` (`) whose `statements` field is the
//! count measured here: span names are typed by hand in every method, and
//! this is where all of them are checked.

use dployr_domain::{
    BootstrapTokenStore, ClusterPatch, ClusterStore, GitHubIntegration, InstanceStore, Metadata, NewInstance, NewUser,
    Page, Provider, Role, UserPatch, UserStore,
};
use dployr_pg::StatementStats;
use dployr_testkit::spans::SpanCapture;
use serde_json::json;

use crate::fixture::{Fixture, email};

/// (operation, statements, explicit transactions)
type Budget = (&'static str, u64, u64);

/// What one measured call sent, and the (op, statements) of the spans that
/// closed during it.
type Measured = (StatementStats, Vec<(String, String)>);

fn check(
    f: &Fixture,
    budgets: &mut Vec<(Budget, Measured)>,
    name: &'static str,
    statements: u64,
    transactions: u64,
    op: impl FnOnce(),
) {
    let capture = SpanCapture::default();
    let ((), stats) = capture.during(|| f.measure(op));
    let spans = capture
        .spans()
        .into_iter()
        .filter(|span| span.name == "dployr.store")
        .map(|span| (span.fields["op"].clone(), span.fields["statements"].clone()))
        .collect();
    budgets.push(((name, statements, transactions), (stats, spans)));
}

#[test]
fn every_read_is_one_statement_and_every_write_one_transaction() {
    let f = Fixture::with_pool_size(1);
    let mut b = Vec::new();
    let metadata = || Some(Metadata::try_from(json!({"k": "v"})).unwrap());

    // Setup that is itself measured.
    let mut ada = None;
    check(&f, &mut b, "users.upsert (new)", 1, 1, || {
        ada = Some(f.users.upsert(NewUser::new(email("ada@example.io"), Provider::Google)).unwrap());
    });
    let ada = ada.unwrap();
    check(&f, &mut b, "users.upsert (existing, with metadata)", 2, 1, || {
        f.users
            .upsert(NewUser { metadata: metadata(), ..NewUser::new(email("ada@example.io"), Provider::Google) })
            .unwrap();
    });
    let mut cluster = None;
    check(&f, &mut b, "clusters.create_for_owner (new)", 4, 1, || {
        cluster = Some(f.clusters.create_for_owner(&ada.id).unwrap());
    });
    let cluster = cluster.unwrap().id;
    check(&f, &mut b, "clusters.create_for_owner (existing)", 3, 1, || {
        f.clusters.create_for_owner(&ada.id).unwrap();
    });
    let bob = f.user("bob@example.io");
    let mut invited = Vec::new();
    check(&f, &mut b, "clusters.add_users", 4, 1, || {
        invited = f.clusters.add_users(&cluster, &[email("guest@example.io"), email("bob@example.io")]).unwrap();
    });
    check(&f, &mut b, "clusters.accept_invite", 1, 0, || f.clusters.accept_invite(&bob.id, &cluster).unwrap());
    check(&f, &mut b, "clusters.update (name, metadata, roles)", 5, 1, || {
        let patch = ClusterPatch {
            name: Some("renamed".try_into().unwrap()),
            metadata: metadata(),
            roles: Some([(Role::Developer, vec![bob.id]), (Role::Invited, vec![invited[1].user_id])].into()),
        };
        f.clusters.update(&cluster, patch).unwrap();
    });
    check(&f, &mut b, "clusters.install_github_integration (no cluster linked)", 1, 1, || {
        let settings = Metadata::new();
        f.clusters.install_github_integration(GitHubIntegration { login_id: "2".into(), settings }).unwrap();
    });
    let linked = Metadata::try_from(json!({"gitHub": {"loginId": "1"}})).unwrap();
    f.clusters.update(&cluster, ClusterPatch { metadata: Some(linked), ..ClusterPatch::default() }).unwrap();
    check(&f, &mut b, "clusters.install_github_integration", 3, 1, || {
        let settings = Metadata::new();
        f.clusters.install_github_integration(GitHubIntegration { login_id: "1".into(), settings }).unwrap();
    });
    check(&f, &mut b, "users.upsert (existing, with metadata, owns a cluster)", 3, 1, || {
        f.users
            .upsert(NewUser { metadata: metadata(), ..NewUser::new(email("ada@example.io"), Provider::Google) })
            .unwrap();
    });
    check(&f, &mut b, "users.upsert (new, with metadata)", 2, 1, || {
        f.users
            .upsert(NewUser { metadata: metadata(), ..NewUser::new(email("dan@example.io"), Provider::Google) })
            .unwrap();
    });
    check(&f, &mut b, "clusters.transfer_ownership", 4, 1, || {
        f.clusters.transfer_ownership(&cluster, &bob.id, Some(Role::Admin)).unwrap();
    });
    check(&f, &mut b, "clusters.transfer_ownership (previous owner removed)", 5, 1, || {
        f.clusters.transfer_ownership(&cluster, &ada.id, None).unwrap();
    });
    check(&f, &mut b, "clusters.transfer_ownership (already the owner)", 3, 1, || {
        f.clusters.transfer_ownership(&cluster, &ada.id, None).unwrap();
    });
    check(&f, &mut b, "clusters.remove_users (an invitee forgotten)", 5, 1, || {
        f.clusters.remove_users(&cluster, &[invited[1].user_id]).unwrap();
    });
    f.clusters.transfer_ownership(&cluster, &bob.id, Some(Role::Admin)).unwrap();
    check(&f, &mut b, "clusters.remove_users (no invitee)", 4, 1, || {
        f.clusters.remove_users(&cluster, &[ada.id]).unwrap();
    });
    f.clusters.add_users(&cluster, &[email("carol@example.io")]).unwrap();
    let carol = f.users.get_by_email(&email("carol@example.io")).unwrap().unwrap();
    check(&f, &mut b, "clusters.decline_invite", 1, 0, || f.clusters.decline_invite(&carol.id, &cluster).unwrap());

    // Reads.
    check(&f, &mut b, "users.get", 1, 0, || drop(f.users.get(&ada.id).unwrap()));
    check(&f, &mut b, "users.get_by_email", 1, 0, || drop(f.users.get_by_email(&ada.email).unwrap()));
    check(&f, &mut b, "users.missing", 1, 0, || drop(f.users.missing(&[ada.id, carol.id]).unwrap()));
    check(&f, &mut b, "users.sessions_to_end", 1, 0, || drop(f.users.sessions_to_end(&[ada.id, carol.id]).unwrap()));
    let week = std::time::Duration::from_secs(7 * 24 * 60 * 60);
    check(&f, &mut b, "users.sessions_ended", 1, 0, || f.users.sessions_ended(&[ada.id, carol.id], week).unwrap());
    check(&f, &mut b, "users.forget_sessions_to_end", 1, 0, || {
        f.users.forget_sessions_to_end_older_than(week).unwrap();
    });
    check(&f, &mut b, "clusters.get", 1, 0, || drop(f.clusters.get(&cluster).unwrap()));
    check(&f, &mut b, "clusters.pending_invites", 1, 0, || drop(f.clusters.pending_invites(&carol.id).unwrap()));
    check(&f, &mut b, "clusters.owned_cluster", 1, 0, || drop(f.clusters.owned_cluster(&bob.id).unwrap()));
    check(&f, &mut b, "clusters.user_clusters", 1, 0, || drop(f.clusters.user_clusters(&ada.id).unwrap()));
    check(&f, &mut b, "clusters.members", 1, 0, || drop(f.clusters.members(&cluster, &Page::first(20)).unwrap()));
    check(&f, &mut b, "clusters.invites", 1, 0, || drop(f.clusters.invites(&cluster, &Page::first(20)).unwrap()));
    check(&f, &mut b, "clusters.role_of", 1, 0, || {
        f.clusters.role_of(&ada.id, &cluster).unwrap();
    });
    check(&f, &mut b, "clusters.owner", 1, 0, || drop(f.clusters.owner(&cluster).unwrap()));
    check(&f, &mut b, "clusters.users_with_role", 1, 0, || {
        drop(f.clusters.users_with_role(&cluster, Role::Admin).unwrap());
    });
    check(&f, &mut b, "clusters.can_read", 1, 0, || {
        f.clusters.can_read(&ada.id, &cluster).unwrap();
    });
    check(&f, &mut b, "clusters.can_write", 1, 0, || {
        f.clusters.can_write(&ada.id, &cluster).unwrap();
    });
    check(&f, &mut b, "clusters.is_admin", 1, 0, || {
        f.clusters.is_admin(&ada.id, &cluster).unwrap();
    });
    check(&f, &mut b, "clusters.is_owner", 1, 0, || {
        f.clusters.is_owner(&ada.id, &cluster).unwrap();
    });
    check(&f, &mut b, "clusters.integrations", 1, 0, || drop(f.clusters.integrations(&cluster).unwrap()));

    // Instances and tokens.
    let mut instance = None;
    check(&f, &mut b, "instances.create", 1, 1, || {
        let new = NewInstance {
            address: "10.0.0.1".try_into().unwrap(),
            tag: "web".try_into().unwrap(),
            metadata: metadata(),
        };
        instance = Some(f.instances.create(&cluster, new).unwrap());
    });
    let instance = instance.unwrap().id;
    check(&f, &mut b, "instances.get", 1, 0, || drop(f.instances.get(&instance).unwrap()));
    check(&f, &mut b, "instances.get_by_tag", 1, 0, || {
        drop(f.instances.get_by_tag(&"web".try_into().unwrap()).unwrap());
    });
    check(&f, &mut b, "instances.list_by_cluster", 1, 0, || {
        drop(f.instances.list_by_cluster(&cluster, &Page::first(20)).unwrap());
    });
    check(&f, &mut b, "instances.update_metadata", 1, 1, || {
        drop(f.instances.update_metadata(&instance, Metadata::new()).unwrap());
    });
    check(&f, &mut b, "bootstrap_tokens.create", 1, 1, || {
        drop(f.tokens.create(&instance, &"n1".try_into().unwrap()).unwrap());
    });
    check(&f, &mut b, "bootstrap_tokens.mark_used", 1, 0, || {
        assert!(f.tokens.mark_used(&"n1".try_into().unwrap()).unwrap());
    });
    check(&f, &mut b, "bootstrap_tokens.is_used", 1, 0, || {
        assert!(f.tokens.is_used(&"n1".try_into().unwrap()).unwrap());
    });
    check(&f, &mut b, "users.update", 1, 1, || drop(f.users.update(&ada.email, UserPatch::default()).unwrap()));
    check(&f, &mut b, "instances.delete", 1, 0, || f.instances.delete(&instance).unwrap());
    check(&f, &mut b, "clusters.delete", 1, 0, || f.clusters.delete(&cluster).unwrap());
    check(&f, &mut b, "users.delete", 3, 1, || f.users.delete(&carol.id).unwrap());

    let mut report = String::from("operation | statements | transactions\n");
    let mut wrong = Vec::new();
    for ((name, statements, transactions), (stats, spans)) in &b {
        // One span, named for the operation, counting what was measured.
        let op = name.split(" (").next().unwrap_or(name);
        let expected_span = [(op.to_owned(), stats.statements.to_string())];
        if spans.as_slice() != expected_span {
            wrong.push(format!("{name}: expected the one span {expected_span:?}, closed {spans:?}"));
        }
        report.push_str(&format!("{name} | {} | {}\n", stats.statements, stats.transactions));
        if (stats.statements, stats.transactions) != (*statements, *transactions) {
            wrong.push(format!(
                "{name}: expected {statements}/{transactions}, sent {}/{}",
                stats.statements, stats.transactions
            ));
        }
        // A write of several statements must be one transaction.
        if stats.statements > 1 && stats.transactions != 1 {
            wrong.push(format!("{name} is not one transaction"));
        }
    }
    println!("{report}");
    assert!(wrong.is_empty(), "{}\n{report}", wrong.join("\n"));
}

#[test]
fn limits_offsets_and_cursors_are_bound_parameters_never_sql_text() {
    let f = crate::fixture::recording();
    let (_, cluster) = f.owner("ada@example.io");
    f.clusters.add_users(&cluster.id, &[email("zeta9137@example.io"), email("zeta9138@example.io")]).unwrap();
    f.instances
        .create(
            &cluster.id,
            NewInstance { address: "a".try_into().unwrap(), tag: "t".try_into().unwrap(), metadata: None },
        )
        .unwrap();
    let first = f.clusters.invites(&cluster.id, &Page::first(1)).unwrap();
    f.clusters.members(&cluster.id, &Page::offset(9137, 37)).unwrap();
    f.clusters.invites(&cluster.id, &Page::offset(9137, 37)).unwrap();
    f.clusters.invites(&cluster.id, &Page::after(first.next.unwrap(), 37)).unwrap();
    f.instances.list_by_cluster(&cluster.id, &Page::offset(9137, 37)).unwrap();
    let statements = f.pool.recent_statements();
    assert!(statements.iter().all(|sql| !sql.contains("9137") && !sql.contains("zeta")), "{statements:#?}");
    let pages: Vec<&String> = statements.iter().filter(|sql| sql.contains("OFFSET")).collect();
    assert_eq!(pages.len(), 5, "{statements:#?}");
    for sql in pages {
        // The seed spliced `LIMIT ${limit} OFFSET ${offset}` into its SQL.
        assert!(!sql.contains("9137") && !sql.contains("37") && !sql.contains("zeta"), "{sql}");
        assert!(sql.contains("LIMIT $") && sql.contains("OFFSET $"), "{sql}");
    }
}
