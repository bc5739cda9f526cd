use dployr_domain::{
    ClusterStore, DisplayName, Email, Metadata, NewUser, Provider, Role, StoreError, UserPatch, UserStore,
};
use serde_json::json;

use crate::fixture::{Fixture, email};

fn metadata(value: serde_json::Value) -> Metadata {
    Metadata::try_from(value).unwrap()
}

#[test]
fn upsert_creates_a_user_named_after_the_local_part_when_no_name_is_given() {
    let f = Fixture::new();
    let user = f.users.upsert(NewUser::new(email("Grace.Hopper@Navy.MIL"), Provider::Github)).unwrap();
    assert_eq!(user.email.as_str(), "grace.hopper@navy.mil");
    assert_eq!(user.name, "grace.hopper");
    assert_eq!(user.provider, Provider::Github);
    assert!(user.metadata.is_empty());
    assert_eq!(f.users.get(&user.id).unwrap(), Some(user));
}

#[test]
fn re_sign_in_without_metadata_keeps_metadata_name_and_picture() {
    let f = Fixture::new();
    let first = f
        .users
        .upsert(NewUser {
            name: Some("Ada".try_into().unwrap()),
            picture: Some("https://img.example/ada.png".into()),
            metadata: Some(metadata(json!({"theme": "dark", "plan": "team"}))),
            ..NewUser::new(email("ada@example.io"), Provider::Google)
        })
        .unwrap();
    let again = f.users.upsert(NewUser::new(email("ADA@example.io"), Provider::Github)).unwrap();
    assert_eq!(again.id, first.id);
    assert_eq!(again.name, "Ada");
    assert_eq!(again.picture.as_deref(), Some("https://img.example/ada.png"));
    assert_eq!(again.provider, Provider::Github);
    assert_eq!(again.metadata, first.metadata);
    // A provider that sends an empty picture gives none.
    let blank = NewUser { picture: Some(String::new()), ..NewUser::new(email("ada@example.io"), Provider::Google) };
    assert_eq!(f.users.upsert(blank).unwrap().picture.as_deref(), Some("https://img.example/ada.png"));
    let new = NewUser { picture: Some("  ".into()), ..NewUser::new(email("new@example.io"), Provider::Google) };
    assert_eq!(f.users.upsert(new).unwrap().picture, None);
}

#[test]
fn an_update_with_a_blank_picture_removes_the_picture_and_stores_no_blank() {
    let f = Fixture::new();
    let (owner, cluster) = f.owner("ada@example.io");
    let ada = owner.email.clone();
    let set = |picture: Option<&str>| {
        let patch = UserPatch { picture: picture.map(str::to_owned), ..UserPatch::default() };
        f.users.update(&ada, patch).unwrap().unwrap().picture
    };
    assert_eq!(set(Some("https://img.example/ada.png")).as_deref(), Some("https://img.example/ada.png"));
    assert_eq!(set(None).as_deref(), Some("https://img.example/ada.png"), "no picture given keeps it");
    // Invisible characters show nothing either: as blank as an empty one.
    for blank in ["", "   ", "\u{200b}", "\u{2800}", "\u{3164}", " \u{feff} "] {
        set(Some("https://img.example/ada.png"));
        assert_eq!(set(Some(blank)), None, "{blank:?} removes it");
        assert_eq!(f.count(&format!("SELECT count(*) FROM users WHERE id = '{}' AND picture IS NULL", owner.id)), 1);
    }
    // Control characters are refused, not taken as blank.
    let tab = UserPatch { picture: Some("\t".into()), ..UserPatch::default() };
    assert!(matches!(f.users.update(&ada, tab), Err(StoreError::Invalid { field: "picture", .. })));
    let member = f.clusters.get(&cluster.id).unwrap().unwrap().members[&Role::Owner][0].clone();
    assert_eq!(member.picture, None, "the membership's copy too");
}

#[test]
fn re_sign_in_with_metadata_merges_it_and_new_name_replaces() {
    let f = Fixture::new();
    f.users
        .upsert(NewUser {
            metadata: Some(metadata(json!({"theme": "dark", "plan": "team"}))),
            ..NewUser::new(email("ada@example.io"), Provider::Google)
        })
        .unwrap();
    let merged = f
        .users
        .upsert(NewUser {
            name: Some("Ada L.".try_into().unwrap()),
            metadata: Some(metadata(json!({"plan": "pro", "locale": "en"}))),
            ..NewUser::new(email("ada@example.io"), Provider::Google)
        })
        .unwrap();
    assert_eq!(merged.name, "Ada L.");
    assert_eq!(merged.metadata.to_value(), json!({"theme": "dark", "plan": "pro", "locale": "en"}));
}

#[test]
fn sign_in_metadata_reaches_clusters_the_user_owns_or_administers_only() {
    let f = Fixture::new();
    let (ada, owned) = f.owner("ada@example.io");
    let (bob, administered) = f.owner("bob@example.io");
    let (_, viewed) = f.owner("cy@example.io");
    f.clusters.add_users(&administered.id, &[email("ada@example.io")]).unwrap();
    f.clusters.accept_invite(&ada.id, &administered.id).unwrap();
    f.clusters
        .update(
            &administered.id,
            dployr_domain::ClusterPatch { roles: Some([(Role::Admin, vec![ada.id])].into()), ..Default::default() },
        )
        .unwrap();
    f.clusters.add_users(&viewed.id, &[email("ada@example.io")]).unwrap();
    f.clusters.accept_invite(&ada.id, &viewed.id).unwrap();

    f.users
        .upsert(NewUser {
            metadata: Some(metadata(json!({"gitHub": {"loginId": "77"}}))),
            ..NewUser::new(email("ada@example.io"), Provider::Github)
        })
        .unwrap();

    let github = |id| f.clusters.get(id).unwrap().unwrap().metadata.get("gitHub").cloned();
    assert_eq!(github(&owned.id), Some(json!({"loginId": "77"})));
    assert_eq!(github(&administered.id), Some(json!({"loginId": "77"})));
    assert_eq!(github(&viewed.id), None);
    assert_eq!(f.users.get(&bob.id).unwrap().unwrap().metadata, Metadata::new());
}

#[test]
fn get_by_email_finds_the_user_whatever_the_case_of_the_address() {
    let f = Fixture::new();
    let user = f.user("a@x.io");
    assert_eq!(f.users.get_by_email(&email("A@X.io")).unwrap().map(|u| u.id), Some(user.id));
    assert_eq!(f.users.get_by_email(&email("  a@X.IO ")).unwrap().map(|u| u.id), Some(user.id));
}

#[test]
fn get_of_unknown_users_is_none() {
    let f = Fixture::new();
    assert_eq!(f.users.get(&dployr_domain::UserId::generate()).unwrap(), None);
    assert_eq!(f.users.get_by_email(&email("nobody@example.io")).unwrap(), None);
}

#[test]
fn update_patches_given_fields_and_merges_metadata() {
    let f = Fixture::new();
    let user = f
        .users
        .upsert(NewUser {
            metadata: Some(metadata(json!({"a": 1}))),
            ..NewUser::new(email("ada@example.io"), Provider::Google)
        })
        .unwrap();
    let updated = f
        .users
        .update(
            &user.email,
            UserPatch {
                name: Some("Countess".try_into().unwrap()),
                metadata: Some(metadata(json!({"b": 2}))),
                ..UserPatch::default()
            },
        )
        .unwrap()
        .unwrap();
    assert_eq!(updated.name, "Countess");
    assert_eq!(updated.provider, Provider::Google);
    assert_eq!(updated.email, user.email);
    assert_eq!(updated.metadata.to_value(), json!({"a": 1, "b": 2}));
    assert!(updated.updated_at >= user.updated_at);
}

#[test]
fn update_with_a_bad_name_is_invalid_and_changes_nothing() {
    let f = Fixture::new();
    let user = f.user("ada@example.io");
    let error = DisplayName::parse("a\u{0}").unwrap_err();
    assert!(matches!(error, StoreError::Invalid { field: "name", .. }), "{error}");
    assert_eq!(f.users.get(&user.id).unwrap().unwrap().name, "ada");
}

#[test]
fn update_of_an_unknown_email_is_none() {
    let f = Fixture::new();
    assert_eq!(f.users.update(&email("nobody@example.io"), UserPatch::default()).unwrap(), None);
}

#[test]
fn bad_input_is_invalid_and_writes_nothing() {
    let f = Fixture::new();
    for bad in ["", "no-at", "a@b@c", "a @b.io", "a\u{0}@b.io", "@b.io", "a@"] {
        assert!(matches!(Email::parse(bad), Err(StoreError::Invalid { field: "email", .. })), "{bad:?}");
    }
    assert!(Email::parse(&format!("{}@x.io", "a".repeat(250))).is_err());
    assert!(Metadata::try_from(json!("string")).is_err());
    assert!(Metadata::try_from(json!({"big": "x".repeat(70 * 1024)})).is_err());
    assert!(matches!(DisplayName::parse("Ada\u{0}"), Err(StoreError::Invalid { field: "name", .. })));
    assert!(matches!(DisplayName::parse(&"n".repeat(2000)), Err(StoreError::Invalid { field: "name", .. })));
    assert_eq!(f.count("SELECT count(*) FROM users"), 0);
}

#[test]
fn sql_looking_strings_are_stored_as_text() {
    let f = Fixture::new();
    let name = "Robert'); DROP TABLE users; --";
    let user = f
        .users
        .upsert(NewUser {
            name: Some(name.try_into().unwrap()),
            ..NewUser::new(email("bobby@tables.io"), Provider::Email)
        })
        .unwrap();
    assert_eq!(f.users.get(&user.id).unwrap().unwrap().name, name);
    assert_eq!(f.count("SELECT count(*) FROM users"), 1);
}

#[test]
fn delete_removes_a_user_and_their_memberships() {
    let f = Fixture::new();
    let (_, cluster) = f.owner("owner@example.io");
    let members = f.clusters.add_users(&cluster.id, &[email("guest@example.io")]).unwrap();
    f.users.delete(&members[0].user_id).unwrap();
    assert_eq!(f.users.get(&members[0].user_id).unwrap(), None);
    assert_eq!(f.count("SELECT count(*) FROM user_clusters"), 1);
}

#[test]
fn delete_of_an_unknown_user_is_not_found() {
    let f = Fixture::new();
    let error = f.users.delete(&dployr_domain::UserId::generate()).unwrap_err();
    assert!(matches!(error, StoreError::NotFound { entity: "user", .. }), "{error}");
}

#[test]
fn delete_of_a_cluster_owner_is_a_conflict() {
    let f = Fixture::new();
    let (owner, _) = f.owner("owner@example.io");
    let error = f.users.delete(&owner.id).unwrap_err();
    assert!(matches!(error, StoreError::Conflict { entity: "user", field: "owner", .. }), "{error}");
    assert!(f.users.get(&owner.id).unwrap().is_some());
}

/// The cases of `docs/EMAIL.md`: spellings of one address sign in as one
/// user (and are invited as that user); look-alikes are refused before any
/// store sees them; `+tags` are users of their own.
#[test]
fn spellings_of_one_address_are_one_user_and_look_alikes_are_refused() {
    let f = Fixture::new();
    let one_user: &[&[&str]] = &[
        &["A@x.io", "a@x.io", " a@X.IO\t"],
        &["caf\u{e9}@x.io", "cafe\u{301}@x.io"],
        &["user@b\u{fc}cher.de", "user@xn--bcher-kva.de", "user@B\u{dc}CHER.DE"],
        &["dot@x.io.", "dot@x.io"],
        &["\u{212a}im@x.io", "kim@x.io"],
    ];
    let (_, cluster) = f.owner("owner@x.io");
    for spellings in one_user {
        let first = f.users.upsert(NewUser::new(email(spellings[0]), Provider::Google)).unwrap();
        for spelling in &spellings[1..] {
            let again = f.users.upsert(NewUser::new(email(spelling), Provider::Github)).unwrap();
            assert_eq!(again.id, first.id, "{spelling:?} is {:?}", spellings[0]);
            assert_eq!(f.users.get_by_email(&email(spelling)).unwrap().map(|u| u.id), Some(first.id));
        }
        let invited = f.clusters.add_users(&cluster.id, &spellings.iter().map(|s| email(s)).collect::<Vec<_>>());
        assert_eq!(invited.unwrap().iter().map(|m| m.user_id).collect::<Vec<_>>(), vec![first.id]);
    }
    let tagged = f.users.upsert(NewUser::new(email("a+work@x.io"), Provider::Google)).unwrap();
    assert_ne!(Some(tagged.id), f.users.get_by_email(&email("a@x.io")).unwrap().map(|u| u.id));
    for refused in ["admin\u{200b}@x.io", "\u{202e}nimda@x.io", "a@b", ".@.", "do..uble@x.io"] {
        assert!(matches!(Email::parse(refused), Err(StoreError::Invalid { field: "email", .. })), "{refused:?}");
    }
    assert!(Email::parse(&format!("{}@x.io", "l".repeat(65))).is_err());
    assert!(Email::parse(&format!("a@{}.io", "l".repeat(64))).is_err());
}

#[test]
fn a_sign_in_whose_metadata_would_overfill_a_cluster_it_runs_is_invalid_saying_so_and_writes_nothing() {
    let f = Fixture::new();
    let (owner, cluster) = f.owner("ada@example.io");
    // Two merges of 60 KiB fill the cluster's metadata close to its 128 KiB.
    for key in ["a", "b"] {
        let patch = dployr_domain::ClusterPatch {
            metadata: Some(metadata(json!({ key: "x".repeat(60 * 1024) }))),
            ..Default::default()
        };
        f.clusters.update(&cluster.id, patch).unwrap();
    }
    let sign_in = NewUser {
        metadata: Some(metadata(json!({"c": "y".repeat(20 * 1024)}))),
        ..NewUser::new(owner.email.clone(), Provider::Github)
    };
    let error = f.users.upsert(sign_in).unwrap_err();
    match &error {
        StoreError::Invalid { field: "metadata", reason } => assert!(reason.contains("cluster"), "{error}"),
        other => panic!("expected Invalid metadata, got {other}"),
    }
    assert_eq!(f.users.get(&owner.id).unwrap().unwrap().metadata, owner.metadata, "the user's row is untouched");
    assert!(f.clusters.get(&cluster.id).unwrap().unwrap().metadata.get("c").is_none());
}

/// An account deleted through the store (or by hand) is remembered as one
/// that `DataLayer`'s sign-out deletes is, but no sign-out forgets it by
/// name: `sessions_to_end` grew by a row per such account for good (a
/// helper's soak). Once older than the sessions' TTL, no session made
/// before the delete is left, and both the forget by age and each
/// sign-out's forget take it; a younger one stays.
#[test]
fn deleted_accounts_older_than_the_sessions_ttl_are_forgotten_and_younger_ones_kept() {
    use diesel::RunQueryDsl as _;
    use std::time::Duration;
    let f = Fixture::new();
    let week = Duration::from_secs(7 * 24 * 60 * 60);
    let [old, young, older, kept] =
        ["old", "young", "older", "kept"].map(|name| f.user(&format!("{name}@example.io")).id);
    for id in [old, young, older, kept] {
        f.users.delete(&id).unwrap();
    }
    let all = [old, young, older, kept];
    let mut sorted = all;
    sorted.sort_unstable();
    assert_eq!(f.users.sessions_to_end(&all).unwrap(), sorted);
    let mut conn = f.db.connect();
    let mut age = |id: &dployr_domain::UserId, by: &str| {
        diesel::sql_query(format!(
            "UPDATE sessions_to_end SET deleted_at = now() - interval '{by}' WHERE user_id = '{id}'"
        ))
        .execute(&mut conn)
        .unwrap();
    };
    age(&old, "7 days 1 second");
    age(&young, "6 days 23 hours");
    assert_eq!(f.users.forget_sessions_to_end_older_than(week).unwrap(), 1);
    let mut left = vec![young, older, kept];
    left.sort_unstable();
    assert_eq!(f.users.sessions_to_end(&all).unwrap(), left);

    // A sign-out's forget takes the old ones too, beside those it names.
    age(&older, "30 days");
    f.users.sessions_ended(&[kept], week).unwrap();
    assert_eq!(f.users.sessions_to_end(&all).unwrap(), [young]);

    // A TTL past any a backend takes (and the longest) forgets nothing young.
    assert_eq!(f.users.forget_sessions_to_end_older_than(Duration::MAX).unwrap(), 0);
    assert_eq!(f.users.forget_sessions_to_end_older_than(Duration::ZERO).unwrap(), 1);
    assert_eq!(f.users.sessions_to_end(&all).unwrap(), []);
}
