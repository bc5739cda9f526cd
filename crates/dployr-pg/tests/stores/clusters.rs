use std::collections::BTreeMap;

use dployr_domain::{
    ClusterId, ClusterPatch, ClusterStore, Cursor, GitHubIntegration, InstanceStore, Metadata, NewUser,
    NotificationEvent, Page, Provider, Role, StoreError, UserId, UserStore,
};
use serde_json::json;

use crate::fixture::{Fixture, email};

fn roles(entries: &[(Role, &[UserId])]) -> ClusterPatch {
    ClusterPatch {
        roles: Some(entries.iter().map(|(role, users)| (*role, users.to_vec())).collect()),
        ..Default::default()
    }
}

/// A cluster owned by owner@example.io with members `(address, role)`.
fn cluster_with(f: &Fixture, members: &[(&str, Role)]) -> (ClusterId, BTreeMap<String, UserId>) {
    let (owner, cluster) = f.owner("owner@example.io");
    let mut ids = BTreeMap::from([("owner@example.io".to_owned(), owner.id)]);
    let mut wanted: BTreeMap<Role, Vec<UserId>> = BTreeMap::new();
    for (address, role) in members {
        let user = f.user(address);
        ids.insert((*address).to_owned(), user.id);
        wanted.entry(*role).or_default().push(user.id);
    }
    f.clusters.update(&cluster.id, ClusterPatch { roles: Some(wanted), ..Default::default() }).unwrap();
    (cluster.id, ids)
}

#[test]
fn create_for_owner_names_the_cluster_after_the_email_and_makes_the_user_owner() {
    let f = Fixture::new();
    let (user, cluster) = f.owner("Ada.Lovelace@Example.io");
    assert_eq!(cluster.name, "ada.lovelace");
    assert_eq!(cluster.owner().map(|m| m.user_id), Some(user.id));
    assert_eq!(f.clusters.get(&cluster.id).unwrap(), Some(cluster));
}

#[test]
fn create_for_owner_returns_the_cluster_the_user_already_owns() {
    let f = Fixture::new();
    let (user, first) = f.owner("ada@example.io");
    let again = f.clusters.create_for_owner(&user.id).unwrap();
    assert_eq!(again.id, first.id);
    assert_eq!(f.count("SELECT count(*) FROM clusters"), 1);
}

#[test]
fn create_for_owner_of_an_unknown_user_is_not_found() {
    let f = Fixture::new();
    let error = f.clusters.create_for_owner(&UserId::generate()).unwrap_err();
    assert!(matches!(error, StoreError::NotFound { entity: "user", .. }), "{error}");
    assert_eq!(f.count("SELECT count(*) FROM clusters"), 0);
}

#[test]
fn get_groups_members_by_role_in_one_cluster_and_unknown_is_none() {
    let f = Fixture::new();
    let (id, ids) = cluster_with(
        &f,
        &[("zed@example.io", Role::Viewer), ("amy@example.io", Role::Viewer), ("dev@example.io", Role::Developer)],
    );
    let cluster = f.clusters.get(&id).unwrap().unwrap();
    let viewers: Vec<&str> = cluster.with_role(Role::Viewer).iter().map(|m| m.email.as_str()).collect();
    assert_eq!(viewers, ["amy@example.io", "zed@example.io"]);
    assert_eq!(cluster.with_role(Role::Developer)[0].user_id, ids["dev@example.io"]);
    assert_eq!(cluster.owner().unwrap().user_id, ids["owner@example.io"]);
    assert_eq!(f.clusters.get(&ClusterId::generate()).unwrap(), None);
}

#[test]
fn get_lists_each_role_in_the_order_of_the_member_pages() {
    let f = Fixture::new();
    // Written newest-first by e-mail, one invitation at a time, so the rows'
    // physical order is the reverse of the listing order.
    let addresses: Vec<String> = (0..30).rev().map(|n| format!("m{n:02}-{}@example.io", 29 - n)).collect();
    let (owner, cluster) = f.owner("owner@example.io");
    for address in &addresses {
        let user = f.user(address);
        let mut cluster_now = f.clusters.get(&cluster.id).unwrap().unwrap();
        let mut wanted: BTreeMap<Role, Vec<UserId>> = BTreeMap::new();
        for (role, members) in std::mem::take(&mut cluster_now.members) {
            if role != Role::Owner {
                wanted.entry(role).or_default().extend(members.iter().map(|m| m.user_id));
            }
        }
        wanted.entry(if address.contains("-1") { Role::Developer } else { Role::Viewer }).or_default().push(user.id);
        f.clusters.update(&cluster.id, ClusterPatch { roles: Some(wanted), ..Default::default() }).unwrap();
    }
    let got = f.clusters.get(&cluster.id).unwrap().unwrap();
    let from_get: Vec<(Role, String)> = got
        .members
        .iter()
        .rev() // highest rank first, as the pages list
        .flat_map(|(role, members)| members.iter().map(|m| (*role, m.email.as_str().to_owned())))
        .collect();
    let paged = f.clusters.members(&cluster.id, &Page::first(100)).unwrap();
    let from_pages: Vec<(Role, String)> = paged.items.iter().map(|m| (m.role, m.email.as_str().to_owned())).collect();
    assert_eq!(from_get, from_pages);
    assert_eq!(from_get.len(), 31);
    assert_eq!(got.owner().unwrap().user_id, owner.id);
    let mut sorted = from_get.clone();
    sorted.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    assert_eq!(from_get, sorted, "highest role first, then e-mail");
}

#[test]
fn update_renames_and_merges_metadata() {
    let f = Fixture::new();
    let (_, cluster) = f.owner("ada@example.io");
    f.clusters
        .update(
            &cluster.id,
            ClusterPatch { metadata: Some(Metadata::try_from(json!({"a": 1, "b": 1})).unwrap()), ..Default::default() },
        )
        .unwrap();
    let updated = f
        .clusters
        .update(
            &cluster.id,
            ClusterPatch {
                name: Some("Analytical Engines".try_into().unwrap()),
                metadata: Some(Metadata::try_from(json!({"b": 2})).unwrap()),
                roles: None,
            },
        )
        .unwrap()
        .unwrap();
    assert_eq!(updated.name, "Analytical Engines");
    assert_eq!(updated.metadata.to_value(), json!({"a": 1, "b": 2}));
    assert_eq!(updated.owner().unwrap().email.as_str(), "ada@example.io");
}

#[test]
fn update_roles_gives_the_highest_listed_role_removes_unlisted_and_keeps_the_owner() {
    let f = Fixture::new();
    let (id, ids) = cluster_with(
        &f,
        &[("a@example.io", Role::Viewer), ("b@example.io", Role::Viewer), ("c@example.io", Role::Admin)],
    );
    let (a, b, owner) = (ids["a@example.io"], ids["b@example.io"], ids["owner@example.io"]);
    let cluster = f
        .clusters
        .update(&id, roles(&[(Role::Viewer, &[a, b]), (Role::Developer, &[a]), (Role::Admin, &[owner])]))
        .unwrap()
        .unwrap();
    assert_eq!(f.clusters.role_of(&a, &id).unwrap(), Some(Role::Developer));
    assert_eq!(f.clusters.role_of(&b, &id).unwrap(), Some(Role::Viewer));
    assert_eq!(f.clusters.role_of(&ids["c@example.io"], &id).unwrap(), None);
    assert_eq!(f.clusters.role_of(&owner, &id).unwrap(), Some(Role::Owner));
    assert_eq!(cluster.members.values().map(Vec::len).sum::<usize>(), 3);
}

#[test]
fn update_roles_naming_an_owner_is_invalid_and_changes_nothing_and_an_empty_owner_list_is_no_request() {
    let f = Fixture::new();
    let (id, ids) = cluster_with(&f, &[("a@example.io", Role::Viewer)]);
    let error = f.clusters.update(&id, roles(&[(Role::Owner, &[ids["a@example.io"]])])).unwrap_err();
    assert!(matches!(error, StoreError::Invalid { field: "roles", .. }), "{error}");
    assert_eq!(f.clusters.role_of(&ids["a@example.io"], &id).unwrap(), Some(Role::Viewer));
    // An empty owner list names nobody: every role's list, as a client sends them all.
    let a = ids["a@example.io"];
    f.clusters.update(&id, roles(&[(Role::Owner, &[]), (Role::Admin, &[a])])).unwrap();
    assert_eq!(f.clusters.role_of(&a, &id).unwrap(), Some(Role::Admin));
    assert_eq!(f.clusters.role_of(&ids["owner@example.io"], &id).unwrap(), Some(Role::Owner));
}

#[test]
fn update_roles_back_to_invited_is_invalid_and_rolls_back() {
    let f = Fixture::new();
    let (id, ids) = cluster_with(&f, &[("a@example.io", Role::Viewer)]);
    let error = f
        .clusters
        .update(
            &id,
            ClusterPatch {
                name: Some("renamed".try_into().unwrap()),
                ..roles(&[(Role::Invited, &[ids["a@example.io"]])])
            },
        )
        .unwrap_err();
    assert!(matches!(error, StoreError::Invalid { field: "role", .. }), "{error}");
    assert_eq!(f.clusters.get(&id).unwrap().unwrap().name, "owner");
}

#[test]
fn update_roles_with_an_unknown_user_is_not_found_and_unknown_cluster_is_none() {
    let f = Fixture::new();
    let (id, _) = cluster_with(&f, &[]);
    let error = f.clusters.update(&id, roles(&[(Role::Viewer, &[UserId::generate()])])).unwrap_err();
    assert!(matches!(error, StoreError::NotFound { entity: "user", .. }), "{error}");
    assert_eq!(f.clusters.update(&ClusterId::generate(), ClusterPatch::default()).unwrap(), None);
}

#[test]
fn delete_cascades_to_memberships_instances_and_tokens() {
    let f = Fixture::new();
    let (id, _) = cluster_with(&f, &[("a@example.io", Role::Viewer)]);
    let instance = f
        .instances
        .create(
            &id,
            dployr_domain::NewInstance {
                address: "10.0.0.1".try_into().unwrap(),
                tag: "web".try_into().unwrap(),
                metadata: None,
            },
        )
        .unwrap();
    dployr_domain::BootstrapTokenStore::create(&f.tokens, &instance.id, &"nonce-1".try_into().unwrap()).unwrap();
    f.clusters.delete(&id).unwrap();
    for table in ["clusters", "user_clusters", "instances", "bootstrap_tokens"] {
        assert_eq!(f.count(&format!("SELECT count(*) FROM {table}")), 0, "{table}");
    }
    assert_eq!(f.count("SELECT count(*) FROM users"), 2);
    let error = f.clusters.delete(&id).unwrap_err();
    assert!(matches!(error, StoreError::NotFound { entity: "cluster", .. }), "{error}");
}

#[test]
fn install_github_integration_replaces_the_linked_clusters_github_entry() {
    let f = Fixture::new();
    let (_, linked) = f.owner("ada@example.io");
    let (_, other) = f.owner("bob@example.io");
    let metadata = Metadata::try_from(json!({"gitHub": {"loginId": "42", "old": true}, "plan": "team"})).unwrap();
    f.clusters.update(&linked.id, ClusterPatch { metadata: Some(metadata), ..Default::default() }).unwrap();
    let settings = Metadata::try_from(json!({"installationId": "9001"})).unwrap();
    let cluster =
        f.clusters.install_github_integration(GitHubIntegration { login_id: "42".into(), settings }).unwrap().unwrap();
    assert_eq!(cluster.id, linked.id);
    assert_eq!(
        cluster.metadata.to_value(),
        json!({"gitHub": {"loginId": "42", "installationId": "9001"}, "plan": "team"})
    );
    assert!(f.clusters.get(&other.id).unwrap().unwrap().metadata.is_empty());
    let unknown = GitHubIntegration { login_id: "43".into(), settings: Metadata::new() };
    assert_eq!(f.clusters.install_github_integration(unknown).unwrap(), None);
}

#[test]
fn add_users_invites_new_and_existing_users_and_keeps_members_roles() {
    let f = Fixture::new();
    let (id, ids) = cluster_with(&f, &[("dev@example.io", Role::Developer)]);
    let existing = f.user("known@example.io");
    let members = f
        .clusters
        .add_users(
            &id,
            &[email("New@Example.io"), email("known@example.io"), email("dev@example.io"), email("new@example.io")],
        )
        .unwrap();
    let summary: Vec<(&str, Role)> = members.iter().map(|m| (m.email.as_str(), m.role)).collect();
    assert_eq!(
        summary,
        [("dev@example.io", Role::Developer), ("known@example.io", Role::Invited), ("new@example.io", Role::Invited)]
    );
    assert_eq!(members[1].user_id, existing.id);
    let created = f.users.get_by_email(&email("new@example.io")).unwrap().unwrap();
    assert_eq!((created.provider, created.name.as_str()), (Provider::Email, "new"));
    assert_eq!(f.clusters.role_of(&ids["dev@example.io"], &id).unwrap(), Some(Role::Developer));
}

#[test]
fn add_users_to_an_unknown_cluster_is_not_found_and_creates_no_user() {
    let f = Fixture::new();
    let error = f.clusters.add_users(&ClusterId::generate(), &[email("new@example.io")]).unwrap_err();
    assert!(matches!(error, StoreError::NotFound { entity: "cluster", .. }), "{error}");
    assert_eq!(f.count("SELECT count(*) FROM users"), 0);
}

#[test]
fn remove_users_removes_memberships_and_forgets_never_activated_invitees() {
    let f = Fixture::new();
    let (id, ids) = cluster_with(&f, &[("dev@example.io", Role::Developer)]);
    let invited = f.clusters.add_users(&id, &[email("guest@example.io")]).unwrap()[0].user_id;
    f.clusters.remove_users(&id, &[invited, ids["dev@example.io"]]).unwrap();
    assert_eq!(f.users.get(&invited).unwrap(), None);
    assert!(f.users.get(&ids["dev@example.io"]).unwrap().is_some());
    assert_eq!(f.clusters.role_of(&ids["dev@example.io"], &id).unwrap(), None);
}

#[test]
fn remove_users_keeps_an_invitee_who_is_still_in_another_cluster() {
    let f = Fixture::new();
    let (_, first) = f.owner("ada@example.io");
    let (_, second) = f.owner("bob@example.io");
    let guest = f.clusters.add_users(&first.id, &[email("guest@example.io")]).unwrap()[0].user_id;
    f.clusters.add_users(&second.id, &[email("guest@example.io")]).unwrap();
    f.clusters.remove_users(&first.id, &[guest]).unwrap();
    assert!(f.users.get(&guest).unwrap().is_some());
}

#[test]
fn remove_users_forgets_only_invitees_it_removed_from_this_cluster_never_an_account_of_another() {
    let f = Fixture::new();
    let (id, _) = cluster_with(&f, &[]);
    // E-mail accounts in no cluster (an invitee who declined their only
    // invitation, a user signed in by one-time code): neither is a member
    // of `id`, so naming them there must not touch their accounts.
    let (_, elsewhere) = f.owner("bob@example.io");
    let declined = f.clusters.add_users(&elsewhere.id, &[email("declined@example.io")]).unwrap()[0].user_id;
    f.clusters.decline_invite(&declined, &elsewhere.id).unwrap();
    let signed_in = f.users.upsert(NewUser::new(email("otp@example.io"), Provider::Email)).unwrap().id;
    let ours = f.clusters.add_users(&id, &[email("ours@example.io")]).unwrap()[0].user_id;
    f.clusters.remove_users(&id, &[declined, signed_in, ours]).unwrap();
    assert!(f.users.get(&declined).unwrap().is_some(), "an account in no cluster, never a member of this one");
    assert!(f.users.get(&signed_in).unwrap().is_some(), "signed in, never a member of this one");
    assert_eq!(f.users.get(&ours).unwrap(), None, "this cluster's invitee, left in no cluster, is forgotten");
}

/// A person signed in by e-mail one-time code has provider `email`, as an
/// invitee has: removed from their last cluster, they lost the account
/// itself (id, profile, metadata). Only an account an invitation made and
/// that never signed in is forgotten; one that signed in after the
/// invitation (an invitee accepting, or not) is kept.
#[test]
fn remove_users_keeps_an_email_account_that_signed_in_and_forgets_one_that_never_did() {
    let f = Fixture::new();
    let (id, _) = cluster_with(&f, &[]);
    // Signed in first, then invited and accepted.
    let member = f.users.upsert(NewUser::new(email("otp@example.io"), Provider::Email)).unwrap().id;
    f.clusters.add_users(&id, &[email("otp@example.io")]).unwrap();
    f.clusters.accept_invite(&member, &id).unwrap();
    // Invited first, then signed in by code, invitation still pending.
    let guest = f.clusters.add_users(&id, &[email("later@example.io")]).unwrap()[0].user_id;
    let signed_in = f.users.upsert(NewUser::new(email("later@example.io"), Provider::Email)).unwrap();
    assert_eq!(signed_in.id, guest, "the invitation's account is the one that signs in");
    let never = f.clusters.add_users(&id, &[email("never@example.io")]).unwrap()[0].user_id;
    f.clusters.remove_users(&id, &[member, guest, never]).unwrap();
    assert!(f.users.get(&member).unwrap().is_some(), "signed in and accepted: the account stays");
    assert!(f.users.get(&guest).unwrap().is_some(), "signed in, invitation pending: the account stays");
    assert_eq!(f.users.get(&never).unwrap(), None, "never signed in: forgotten");
    assert_eq!(f.clusters.role_of(&member, &id).unwrap(), None);
}

#[test]
fn remove_users_including_the_owner_is_a_conflict_and_removes_nobody() {
    let f = Fixture::new();
    let (id, ids) = cluster_with(&f, &[("dev@example.io", Role::Developer)]);
    let error = f.clusters.remove_users(&id, &[ids["dev@example.io"], ids["owner@example.io"]]).unwrap_err();
    assert!(matches!(error, StoreError::Conflict { field: "owner", .. }), "{error}");
    assert_eq!(f.clusters.role_of(&ids["dev@example.io"], &id).unwrap(), Some(Role::Developer));
    let error = f.clusters.remove_users(&ClusterId::generate(), &[]).unwrap_err();
    assert!(matches!(error, StoreError::NotFound { entity: "cluster", .. }), "{error}");
}

#[test]
fn accept_invite_makes_a_viewer_once_and_otherwise_is_not_found() {
    let f = Fixture::new();
    let (id, ids) = cluster_with(&f, &[]);
    let guest = f.clusters.add_users(&id, &[email("guest@example.io")]).unwrap()[0].user_id;
    f.clusters.accept_invite(&guest, &id).unwrap();
    assert_eq!(f.clusters.role_of(&guest, &id).unwrap(), Some(Role::Viewer));
    for (user, cluster) in [(guest, id), (ids["owner@example.io"], id), (guest, ClusterId::generate())] {
        let error = f.clusters.accept_invite(&user, &cluster).unwrap_err();
        assert!(matches!(error, StoreError::NotFound { entity: "invite", .. }), "{error}");
    }
}

#[test]
fn decline_invite_removes_the_invitation_and_otherwise_is_not_found() {
    let f = Fixture::new();
    let (id, ids) = cluster_with(&f, &[]);
    let guest = f.clusters.add_users(&id, &[email("guest@example.io")]).unwrap()[0].user_id;
    f.clusters.decline_invite(&guest, &id).unwrap();
    assert_eq!(f.clusters.role_of(&guest, &id).unwrap(), None);
    let error = f.clusters.decline_invite(&guest, &id).unwrap_err();
    assert!(matches!(error, StoreError::NotFound { entity: "invite", .. }), "{error}");
    let error = f.clusters.decline_invite(&ids["owner@example.io"], &id).unwrap_err();
    assert!(matches!(error, StoreError::NotFound { .. }), "{error}");
}

#[test]
fn pending_invites_name_the_cluster_and_its_owner() {
    let f = Fixture::new();
    let ada = f
        .users
        .upsert(NewUser {
            name: Some("Ada".try_into().unwrap()),
            ..NewUser::new(email("ada@example.io"), Provider::Google)
        })
        .unwrap();
    let cluster = f.clusters.create_for_owner(&ada.id).unwrap();
    let (guest, own) = f.owner("guest@example.io");
    f.clusters.add_users(&cluster.id, &[email("guest@example.io")]).unwrap();
    let invites = f.clusters.pending_invites(&guest.id).unwrap();
    assert_eq!(invites.len(), 1);
    assert_eq!(
        (invites[0].cluster_id, invites[0].cluster_name.as_str(), invites[0].owner_name.as_deref()),
        (cluster.id, "ada", Some("Ada"))
    );
    let summaries = f.clusters.user_clusters(&guest.id).unwrap();
    assert_eq!(summaries.iter().map(|s| s.id).collect::<Vec<_>>(), [own.id], "invitations are not memberships");
    assert!(f.clusters.pending_invites(&UserId::generate()).unwrap().is_empty());
}

#[test]
fn transfer_ownership_demotes_the_previous_owner_to_admin_by_request() {
    let f = Fixture::new();
    let (id, ids) = cluster_with(&f, &[("dev@example.io", Role::Developer)]);
    f.clusters.transfer_ownership(&id, &ids["dev@example.io"], Some(Role::Admin)).unwrap();
    assert_eq!(f.clusters.owner(&id).unwrap().unwrap().user_id, ids["dev@example.io"]);
    assert_eq!(f.clusters.role_of(&ids["owner@example.io"], &id).unwrap(), Some(Role::Admin));
    assert_eq!(f.count("SELECT count(*) FROM user_clusters WHERE role = 'owner'"), 1);
}

#[test]
fn transfer_ownership_with_none_removes_the_previous_owner() {
    let f = Fixture::new();
    let (id, ids) = cluster_with(&f, &[("dev@example.io", Role::Developer)]);
    f.clusters.transfer_ownership(&id, &ids["dev@example.io"], None).unwrap();
    assert_eq!(f.clusters.role_of(&ids["owner@example.io"], &id).unwrap(), None);
    assert!(f.clusters.is_owner(&ids["dev@example.io"], &id).unwrap());
}

#[test]
fn transfer_ownership_to_an_invitee_a_non_member_or_the_owner_itself_keeps_exactly_one_owner() {
    let f = Fixture::new();
    let (id, ids) = cluster_with(&f, &[]);
    let owner = ids["owner@example.io"];
    let invitee = f.clusters.add_users(&id, &[email("guest@example.io")]).unwrap()[0].user_id;
    f.clusters.transfer_ownership(&id, &invitee, Some(Role::Admin)).unwrap();
    assert_eq!(f.clusters.role_of(&invitee, &id).unwrap(), Some(Role::Owner), "the invitation became the ownership");
    assert_eq!(f.clusters.role_of(&owner, &id).unwrap(), Some(Role::Admin));
    let outsider = f.user("outsider@example.io").id;
    f.clusters.transfer_ownership(&id, &outsider, None).unwrap();
    assert_eq!(f.clusters.role_of(&outsider, &id).unwrap(), Some(Role::Owner));
    assert_eq!(f.clusters.role_of(&invitee, &id).unwrap(), None, "None removes the previous owner");
    f.clusters.transfer_ownership(&id, &outsider, Some(Role::Viewer)).unwrap();
    assert_eq!(f.clusters.users_with_role(&id, Role::Owner).unwrap().len(), 1);
    assert_eq!(f.clusters.role_of(&outsider, &id).unwrap(), Some(Role::Owner), "to the owner itself: nothing changes");
    let page = f.clusters.members(&id, &Page::first(10)).unwrap();
    assert_eq!(page.total, 2, "{page:?}");
}

#[test]
fn transfer_ownership_refuses_owner_or_invited_for_the_previous_owner_and_unknown_parties() {
    let f = Fixture::new();
    let (id, ids) = cluster_with(&f, &[("dev@example.io", Role::Developer)]);
    for role in [Role::Owner, Role::Invited] {
        let error = f.clusters.transfer_ownership(&id, &ids["dev@example.io"], Some(role)).unwrap_err();
        assert!(matches!(error, StoreError::Invalid { .. }), "{error}");
    }
    let error = f.clusters.transfer_ownership(&id, &UserId::generate(), Some(Role::Admin)).unwrap_err();
    assert!(matches!(error, StoreError::NotFound { entity: "user", .. }), "{error}");
    let error =
        f.clusters.transfer_ownership(&ClusterId::generate(), &ids["dev@example.io"], Some(Role::Admin)).unwrap_err();
    assert!(matches!(error, StoreError::NotFound { entity: "cluster", .. }), "{error}");
    assert!(f.clusters.is_owner(&ids["owner@example.io"], &id).unwrap(), "nothing changed");
}

#[test]
fn owned_cluster_and_user_clusters_summarise_with_the_owners_name() {
    let f = Fixture::new();
    let (id, ids) = cluster_with(&f, &[("dev@example.io", Role::Developer)]);
    let owned = f.clusters.owned_cluster(&ids["owner@example.io"]).unwrap().unwrap();
    assert_eq!((owned.id, owned.owner_name.as_deref()), (id, Some("owner")));
    assert_eq!(f.clusters.owned_cluster(&ids["dev@example.io"]).unwrap(), None);
    let theirs = f.clusters.user_clusters(&ids["dev@example.io"]).unwrap();
    assert_eq!(theirs, [owned]);
    assert!(f.clusters.user_clusters(&UserId::generate()).unwrap().is_empty());
}

#[test]
fn a_user_owning_two_clusters_gets_the_older_cluster_from_owned_cluster_and_create_for_owner_alike() {
    let f = Fixture::new();
    // Bob's cluster is the older; Ada joins it after making her own, then is
    // given it: she owns two, and her membership of Bob's is the younger.
    let (bob, older) = f.owner("bob@example.io");
    let (ada, younger) = f.owner("ada@example.io");
    f.clusters.update(&older.id, roles(&[(Role::Developer, &[ada.id])])).unwrap();
    f.clusters.transfer_ownership(&older.id, &ada.id, Some(Role::Admin)).unwrap();
    assert!(f.clusters.is_owner(&ada.id, &older.id).unwrap() && f.clusters.is_owner(&ada.id, &younger.id).unwrap());
    assert_eq!(f.clusters.owned_cluster(&ada.id).unwrap().map(|c| c.id), Some(older.id));
    assert_eq!(f.clusters.create_for_owner(&ada.id).unwrap().id, older.id, "the same cluster as owned_cluster");
    assert_eq!(f.count("SELECT count(*) FROM clusters"), 2, "nothing created");
    assert_eq!(f.clusters.owned_cluster(&bob.id).unwrap(), None);
}

#[test]
fn clusters_made_at_the_same_instant_come_in_id_order_wherever_a_users_clusters_are_chosen_or_listed() {
    use diesel::prelude::*;
    use dployr_pg::schema::clusters;

    let f = Fixture::new();
    let (ada, _) = f.owner("ada@example.io");
    let (_, bobs) = f.owner("bob@example.io");
    let (_, carols) = f.owner("carol@example.io");
    let dan = f.user("dan@example.io");
    let github = Metadata::try_from(json!({"gitHub": {"loginId": "7"}})).unwrap();
    let mut ids = Vec::new();
    for cluster in f.inspect(|conn| clusters::table.select(clusters::id).load::<String>(conn).unwrap()) {
        let id: ClusterId = cluster.parse().unwrap();
        f.clusters.update(&id, ClusterPatch { metadata: Some(github.clone()), ..Default::default() }).unwrap();
        f.clusters.add_users(&id, &[email("dan@example.io")]).unwrap();
        ids.push(id);
    }
    f.clusters.transfer_ownership(&bobs.id, &ada.id, Some(Role::Admin)).unwrap();
    f.clusters.transfer_ownership(&carols.id, &ada.id, Some(Role::Admin)).unwrap();
    ids.sort();
    // One instant for all three; then the first by id is written again, so
    // that it lies last in the table and a scan meets it last.
    f.inspect(|conn| {
        diesel::sql_query("UPDATE clusters SET created_at = '2026-01-01T00:00:00Z'").execute(conn).unwrap();
        diesel::sql_query(format!("UPDATE clusters SET name = 'first' WHERE id = '{}'", ids[0])).execute(conn).unwrap();
    });
    let listed =
        |summaries: Vec<dployr_domain::ClusterSummary>| summaries.into_iter().map(|c| c.id).collect::<Vec<_>>();
    assert_eq!(listed(f.clusters.user_clusters(&ada.id).unwrap()), ids);
    let pending: Vec<ClusterId> =
        f.clusters.pending_invites(&dan.id).unwrap().into_iter().map(|i| i.cluster_id).collect();
    assert_eq!(pending, ids);
    assert_eq!(f.clusters.owned_cluster(&ada.id).unwrap().map(|c| c.id), Some(ids[0]));
    assert_eq!(f.clusters.create_for_owner(&ada.id).unwrap().id, ids[0]);
    let settings = Metadata::try_from(json!({"installationId": "1"})).unwrap();
    let installed =
        f.clusters.install_github_integration(GitHubIntegration { login_id: "7".into(), settings }).unwrap();
    assert_eq!(installed.map(|c| c.id), Some(ids[0]));
}

#[test]
fn members_sort_by_role_rank_then_email_not_by_role_name() {
    let f = Fixture::new();
    let (id, _) = cluster_with(
        &f,
        &[
            ("b-viewer@example.io", Role::Viewer),
            ("a-viewer@example.io", Role::Viewer),
            ("z-admin@example.io", Role::Admin),
            ("m-dev@example.io", Role::Developer),
        ],
    );
    f.clusters.add_users(&id, &[email("invitee@example.io")]).unwrap();
    let page = f.clusters.members(&id, &Page::first(10)).unwrap();
    let order: Vec<&str> = page.items.iter().map(|m| m.email.as_str()).collect();
    // The seed's alphabetical sort of role names put admin before owner and developer first.
    assert_eq!(
        order,
        ["owner@example.io", "z-admin@example.io", "m-dev@example.io", "a-viewer@example.io", "b-viewer@example.io"]
    );
    assert_eq!(page.total, 5);
    assert_eq!(page.next, None);
}

#[test]
fn members_page_through_every_member_once_by_cursor_and_by_offset() {
    let f = Fixture::new();
    let members: Vec<(String, Role)> = (0..23)
        .map(|i| (format!("user{i:02}@example.io"), if i % 3 == 0 { Role::Developer } else { Role::Viewer }))
        .collect();
    let refs: Vec<(&str, Role)> = members.iter().map(|(e, r)| (e.as_str(), *r)).collect();
    let (id, _) = cluster_with(&f, &refs);
    let all = f.clusters.members(&id, &Page::first(100)).unwrap().items;
    assert_eq!(all.len(), 24);

    let mut by_cursor = Vec::new();
    let mut page = Page::first(5);
    loop {
        let paged = f.clusters.members(&id, &page).unwrap();
        assert_eq!(paged.total, 24);
        by_cursor.extend(paged.items);
        match paged.next {
            Some(next) => page = Page::after(next, 5),
            None => break,
        }
    }
    assert_eq!(by_cursor, all);

    let by_offset: Vec<_> =
        (0..5).flat_map(|n| f.clusters.members(&id, &Page::offset(n * 5, 5)).unwrap().items).collect();
    assert_eq!(by_offset, all);
    let beyond = f.clusters.members(&id, &Page::offset(1000, 5)).unwrap();
    assert_eq!((beyond.items.len(), beyond.total, beyond.next), (0, 24, None));
}

#[test]
fn a_cursor_that_does_not_decode_is_invalid() {
    let f = Fixture::new();
    let (id, _) = cluster_with(&f, &[]);
    for text in ["", "garbage!", "bWVtYmVycwp4CnkKeg", "'; DROP TABLE users; --"] {
        let error = f.clusters.members(&id, &Page::after(Cursor::new(text), 5)).unwrap_err();
        assert!(matches!(error, StoreError::Invalid { field: "cursor", .. }), "{text}: {error}");
    }
    let invites_cursor = {
        f.clusters.add_users(&id, &[email("a@example.io"), email("b@example.io")]).unwrap();
        f.clusters.invites(&id, &Page::first(1)).unwrap().next.unwrap()
    };
    let error = f.clusters.members(&id, &Page::after(invites_cursor, 5)).unwrap_err();
    assert!(matches!(error, StoreError::Invalid { field: "cursor", .. }), "{error}");
}

/// A cursor is a position in one cluster's listing: handed to another
/// cluster's, it would skip that cluster's members before its position.
#[test]
fn a_cursor_of_another_clusters_listing_is_invalid() {
    let f = Fixture::new();
    let (first, _) = cluster_with(&f, &[("m@example.io", Role::Viewer), ("n@example.io", Role::Viewer)]);
    let (_, second) = f.owner("other@example.io");
    f.clusters.add_users(&first, &[email("x@example.io"), email("y@example.io")]).unwrap();
    f.clusters.add_users(&second.id, &[email("a@example.io"), email("z@example.io")]).unwrap();
    let members_cursor = f.clusters.members(&first, &Page::first(1)).unwrap().next.unwrap();
    let invites_cursor = f.clusters.invites(&first, &Page::first(1)).unwrap().next.unwrap();
    let members = f.clusters.members(&second.id, &Page::after(members_cursor.clone(), 5));
    assert!(matches!(members, Err(StoreError::Invalid { field: "cursor", .. })), "{members:?}");
    let invites = f.clusters.invites(&second.id, &Page::after(invites_cursor, 5));
    assert!(matches!(invites, Err(StoreError::Invalid { field: "cursor", .. })), "{invites:?}");
    assert_eq!(f.clusters.members(&first, &Page::after(members_cursor, 5)).unwrap().items.len(), 2);
}

#[test]
fn invites_list_only_invitations_by_email() {
    let f = Fixture::new();
    let (id, _) = cluster_with(&f, &[("dev@example.io", Role::Developer)]);
    f.clusters.add_users(&id, &[email("zz@example.io"), email("aa@example.io")]).unwrap();
    let invites = f.clusters.invites(&id, &Page::first(10)).unwrap();
    let order: Vec<(&str, Role)> = invites.items.iter().map(|m| (m.email.as_str(), m.role)).collect();
    assert_eq!(order, [("aa@example.io", Role::Invited), ("zz@example.io", Role::Invited)]);
    assert_eq!(invites.total, 2);
    assert_eq!(f.clusters.invites(&ClusterId::generate(), &Page::first(10)).unwrap().total, 0);
}

#[test]
fn role_owner_users_with_role_and_permission_checks_follow_the_rank_order() {
    let f = Fixture::new();
    let (id, ids) = cluster_with(
        &f,
        &[("admin@example.io", Role::Admin), ("dev@example.io", Role::Developer), ("viewer@example.io", Role::Viewer)],
    );
    let invited = f.clusters.add_users(&id, &[email("invited@example.io")]).unwrap()[0].user_id;
    let stranger = f.user("stranger@example.io").id;
    let check = |user: &UserId| {
        (
            f.clusters.can_read(user, &id).unwrap(),
            f.clusters.can_write(user, &id).unwrap(),
            f.clusters.is_admin(user, &id).unwrap(),
            f.clusters.is_owner(user, &id).unwrap(),
        )
    };
    assert_eq!(check(&ids["owner@example.io"]), (true, true, true, true));
    assert_eq!(check(&ids["admin@example.io"]), (true, true, true, false));
    assert_eq!(check(&ids["dev@example.io"]), (true, true, false, false));
    assert_eq!(check(&ids["viewer@example.io"]), (true, false, false, false));
    assert_eq!(check(&invited), (false, false, false, false));
    assert_eq!(check(&stranger), (false, false, false, false));
    assert_eq!(f.clusters.role_of(&invited, &id).unwrap(), Some(Role::Invited));
    assert_eq!(f.clusters.role_of(&stranger, &id).unwrap(), None);
    assert_eq!(f.clusters.owner(&id).unwrap().unwrap().user_id, ids["owner@example.io"]);
    assert_eq!(f.clusters.owner(&ClusterId::generate()).unwrap(), None);
    let devs = f.clusters.users_with_role(&id, Role::Developer).unwrap();
    assert_eq!(devs.iter().map(|m| m.user_id).collect::<Vec<_>>(), [ids["dev@example.io"]]);
}

#[test]
fn integrations_read_the_metadata_with_default_notification_events() {
    let f = Fixture::new();
    let (_, cluster) = f.owner("ada@example.io");
    let metadata = Metadata::try_from(json!({
        "gitLab": {"token": "t"},
        "resendMail": {"apiKey": "k"},
        "slack": {"webhook": "https://hooks.example/s"},
        "customWebhook": {"url": "https://example.io/hook", "events": ["instance.created"]},
    }))
    .unwrap();
    f.clusters.update(&cluster.id, ClusterPatch { metadata: Some(metadata), ..Default::default() }).unwrap();
    let integrations = f.clusters.integrations(&cluster.id).unwrap();
    assert_eq!(integrations.remote.git_lab, Some(json!({"token": "t"})));
    assert_eq!(integrations.remote.git_hub, None);
    assert_eq!(integrations.email.resend_mail, Some(json!({"apiKey": "k"})));
    assert_eq!(integrations.notification.slack.unwrap().events, NotificationEvent::DEFAULTS);
    assert_eq!(integrations.notification.custom_webhook.unwrap().events, [NotificationEvent::InstanceCreated]);
    let error = f.clusters.integrations(&ClusterId::generate()).unwrap_err();
    assert!(matches!(error, StoreError::NotFound { entity: "cluster", .. }), "{error}");
}

#[test]
fn reads_of_an_unknown_cluster_are_empty_none_or_false_and_integrations_not_found() {
    let f = Fixture::new();
    let user = f.user("ada@example.io").id;
    let unknown = ClusterId::generate();
    let members = f.clusters.members(&unknown, &Page::first(20)).unwrap();
    assert_eq!((members.items.len(), members.total, members.next), (0, 0, None));
    assert!(f.clusters.users_with_role(&unknown, Role::Viewer).unwrap().is_empty());
    assert_eq!(f.clusters.role_of(&user, &unknown).unwrap(), None);
    let checks = [
        f.clusters.can_read(&user, &unknown).unwrap(),
        f.clusters.can_write(&user, &unknown).unwrap(),
        f.clusters.is_admin(&user, &unknown).unwrap(),
        f.clusters.is_owner(&user, &unknown).unwrap(),
    ];
    assert_eq!(checks, [false; 4]);
    let error = f.clusters.integrations(&unknown).unwrap_err();
    assert!(matches!(error, StoreError::NotFound { entity: "cluster", .. }), "{error}");
}

#[test]
fn a_page_larger_than_the_cap_holds_at_most_one_hundred_members() {
    let f = Fixture::new();
    let (_, cluster) = f.owner("owner@example.io");
    let emails: Vec<_> = (0..150).map(|n| email(&format!("m{n:03}@example.io"))).collect();
    f.clusters.add_users(&cluster.id, &emails).unwrap();
    let invites = f.clusters.invites(&cluster.id, &Page::first(10_000)).unwrap();
    assert_eq!((invites.items.len(), invites.total), (100, 150));
    let rest = f.clusters.invites(&cluster.id, &Page::after(invites.next.unwrap(), 10_000)).unwrap();
    assert_eq!((rest.items.len(), rest.next), (50, None));
}

#[test]
fn a_members_new_name_and_picture_show_in_every_member_listing_at_once() {
    let f = Fixture::new();
    let (owner, cluster) = f.owner("owner@example.io");
    let ada = f.user("ada@example.io");
    f.clusters.update(&cluster.id, roles(&[(Role::Admin, &[ada.id])])).unwrap();
    let patch = dployr_domain::UserPatch {
        name: Some("Ada Lovelace".try_into().unwrap()),
        picture: Some("https://example.io/ada.png".into()),
        ..dployr_domain::UserPatch::default()
    };
    f.users.update(&ada.email, patch).unwrap();
    let shown = |member: &dployr_domain::Member| (member.name.clone(), member.picture.clone());
    let expected = ("Ada Lovelace".to_owned(), Some("https://example.io/ada.png".to_owned()));
    let got = f.clusters.get(&cluster.id).unwrap().unwrap();
    assert_eq!(shown(&got.members[&Role::Admin][0]), expected);
    let page = f.clusters.members(&cluster.id, &dployr_domain::Page::first(10)).unwrap();
    assert_eq!(page.items.iter().find(|m| m.user_id == ada.id).map(shown), Some(expected.clone()));
    assert_eq!(f.clusters.users_with_role(&cluster.id, Role::Admin).unwrap().first().map(shown), Some(expected));
    // A sign-in that brings no name keeps it; the owner's listing follows theirs too.
    f.users.upsert(dployr_domain::NewUser::new(email("owner@example.io"), dployr_domain::Provider::Github)).unwrap();
    assert_eq!(f.clusters.owner(&cluster.id).unwrap().unwrap().name, owner.name);
}

/// `clusters.get` carries the cluster's metadata and update time as text
/// in the columns of a member's e-mail and picture: what it returns equals
/// diesel's own decoding of the row, for metadata of every JSON shape and
/// for times before 1970, before 2000 and with odd microseconds.
#[test]
fn get_returns_the_clusters_metadata_and_times_exactly_as_stored() {
    use chrono::{DateTime, Utc};
    use diesel::prelude::*;
    let f = Fixture::new();
    let (_, cluster) = f.owner("owner@example.io");
    let metadata = json!({
        "text": "a \"quoted\" \\ line\nbreak, tab\t, NUL-free unicode: žluťoučký 🦀 \u{2028}",
        "numbers": [0, -1, 1.5, 1e300, -2.5e-300, 9007199254740993_u64, i64::MIN],
        "nested": {"a": {"b": {"c": [[], {}, null, true, false]}}},
        "": "empty key",
    });
    let patch = ClusterPatch {
        metadata: Some(Metadata::from_map(metadata.as_object().unwrap().clone()).unwrap()),
        ..Default::default()
    };
    f.clusters.update(&cluster.id, patch).unwrap();
    for updated_at in
        ["1969-12-31 23:59:59.999999+00", "1999-12-31 23:59:59.000001+00", "2026-11-28 12:34:56.789012+00", "now()"]
    {
        let at = if updated_at == "now()" { updated_at.to_owned() } else { format!("'{updated_at}'") };
        f.inspect(|conn| {
            diesel::sql_query(format!("UPDATE clusters SET updated_at = {at} WHERE id = '{}'", cluster.id))
                .execute(conn)
                .unwrap()
        });
        let (stored_metadata, created_at, stored_updated_at): (serde_json::Value, DateTime<Utc>, DateTime<Utc>) = f
            .inspect(|conn| {
                dployr_pg::schema::clusters::table
                    .find(cluster.id.to_string())
                    .select((
                        dployr_pg::schema::clusters::metadata,
                        dployr_pg::schema::clusters::created_at,
                        dployr_pg::schema::clusters::updated_at,
                    ))
                    .first(conn)
                    .unwrap()
            });
        let got = f.clusters.get(&cluster.id).unwrap().unwrap();
        assert_eq!(got.metadata.to_value(), stored_metadata, "{updated_at}");
        assert_eq!((got.created_at, got.updated_at), (created_at, stored_updated_at), "{updated_at}");
    }
}
