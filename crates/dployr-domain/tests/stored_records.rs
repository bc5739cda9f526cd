//! What a store returns serializes and deserializes back equal, whatever
//! the schema let it grow to: metadata merged past the 64 KiB a single
//! write may bring (the schema stores up to 128 KiB), one level deeper
//! than a write may nest (`install_github_integration` wraps the settings
//! it was given in `gitHub`), or as deep as the schema takes from SQL
//! written by hand (100 levels, `025_metadata_nesting_with_room`), also in
//! a page. The limits of a write are for what comes in.

#![cfg(test)]

use std::collections::BTreeMap;

use chrono::Utc;
use dployr_domain::{
    Cluster, ClusterId, Email, Instance, InstanceId, MAX_METADATA_BYTES, MAX_METADATA_DEPTH, Member, Metadata, Paged,
    Provider, Role, User, UserId,
};
use serde_json::{Value, json};

/// An object as the schema may hold it after two merges of 40 KiB each.
fn merged_past_a_writes_limit() -> Value {
    let chunk = "x".repeat(40 * 1024);
    json!({"a": chunk, "b": chunk})
}

/// `{"gitHub": settings}` with settings as deep as a write may nest.
fn one_level_deeper_than_a_write() -> Value {
    let mut settings = json!("leaf");
    for _ in 0..MAX_METADATA_DEPTH {
        settings = json!({ "k": settings });
    }
    json!({ "gitHub": settings })
}

/// An object nested 100 levels, itself included: the most the schema takes
/// (`*_metadata_readable`, 025).
fn as_deep_as_the_schema_takes() -> Value {
    let mut nested = json!("leaf");
    for _ in 0..100 {
        nested = json!({ "k": nested });
    }
    nested
}

#[test]
fn stored_records_round_trip_through_serde_whatever_the_schema_let_their_metadata_grow_to() {
    for stored in [merged_past_a_writes_limit(), one_level_deeper_than_a_write(), as_deep_as_the_schema_takes()] {
        assert!(Metadata::try_from(stored.clone()).is_err(), "a write could not bring this itself");
        let metadata = Metadata::from_stored(stored);
        let user = User {
            id: UserId::generate(),
            email: Email::parse("ada@example.io").unwrap(),
            name: "Ada".into(),
            picture: None,
            provider: Provider::Github,
            metadata: metadata.clone(),
            created_at: Utc::now(),
            updated_at: Utc::now(),
        };
        let text = serde_json::to_string(&user).unwrap();
        assert_eq!(serde_json::from_str::<User>(&text).unwrap(), user);
        let cluster = Cluster {
            id: ClusterId::generate(),
            name: "ada".into(),
            metadata: metadata.clone(),
            members: BTreeMap::new(),
            created_at: Utc::now(),
            updated_at: Utc::now(),
        };
        let text = serde_json::to_string(&cluster).unwrap();
        assert_eq!(serde_json::from_str::<Cluster>(&text).unwrap(), cluster);
        let instance = Instance {
            id: InstanceId::generate(),
            cluster_id: cluster.id,
            address: "10.0.0.1".into(),
            tag: "one".into(),
            metadata,
            created_at: Utc::now(),
            updated_at: Utc::now(),
        };
        let text = serde_json::to_string(&instance).unwrap();
        assert_eq!(serde_json::from_str::<Instance>(&text).unwrap(), instance);
        let page = Paged { items: vec![instance], total: 1, next: None };
        let text = serde_json::to_string(&page).unwrap();
        assert_eq!(serde_json::from_str::<Paged<Instance>>(&text).unwrap(), page);
    }
}

#[test]
fn metadata_that_comes_in_keeps_the_limits_of_a_write() {
    for stored in [merged_past_a_writes_limit(), one_level_deeper_than_a_write()] {
        assert!(serde_json::from_value::<Metadata>(stored).is_err());
    }
    let fits = json!({"a": "x".repeat(MAX_METADATA_BYTES / 2)});
    assert!(serde_json::from_value::<Metadata>(fits).is_ok());
}

#[test]
fn a_user_or_member_with_an_address_stored_under_an_older_rule_round_trips() {
    // `a@b` was stored before addresses needed a domain of two labels; it
    // stays readable (Email::from_stored), so it must deserialize back too.
    let email = Email::from_stored("a@b".into());
    assert!(Email::parse("a@b").is_err(), "today's rule refuses it");
    let user = User {
        id: UserId::generate(),
        email: email.clone(),
        name: "a".into(),
        picture: None,
        provider: Provider::Email,
        metadata: Metadata::new(),
        created_at: Utc::now(),
        updated_at: Utc::now(),
    };
    let text = serde_json::to_string(&user).unwrap();
    assert_eq!(serde_json::from_str::<User>(&text).unwrap(), user);
    let member =
        Member { user_id: user.id, email, name: "a".into(), picture: None, role: Role::Viewer, since: Utc::now() };
    let text = serde_json::to_string(&member).unwrap();
    assert_eq!(serde_json::from_str::<Member>(&text).unwrap(), member);
    // What comes in as an address keeps today's rule.
    assert!(serde_json::from_str::<Email>("\"a@b\"").is_err());
}
