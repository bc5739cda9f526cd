use dployr_domain::{BootstrapTokenStore, InstanceId, InstanceStore, NewInstance, Nonce, StoreError};

use crate::fixture::Fixture;

fn instance(f: &Fixture) -> InstanceId {
    let (_, cluster) = f.owner("ada@example.io");
    f.instances
        .create(
            &cluster.id,
            NewInstance { address: "10.0.0.1".try_into().unwrap(), tag: "web".try_into().unwrap(), metadata: None },
        )
        .unwrap()
        .id
}

#[test]
fn a_token_is_unused_until_marked_and_marks_once() {
    let f = Fixture::new();
    let instance = instance(&f);
    let token = f.tokens.create(&instance, &"nonce-1".try_into().unwrap()).unwrap();
    assert_eq!((token.instance_id, token.used_at), (instance, None));
    assert!(!f.tokens.is_used(&"nonce-1".try_into().unwrap()).unwrap());
    assert!(f.tokens.mark_used(&"nonce-1".try_into().unwrap()).unwrap());
    assert!(f.tokens.is_used(&"nonce-1".try_into().unwrap()).unwrap());
    assert!(!f.tokens.mark_used(&"nonce-1".try_into().unwrap()).unwrap());
}

#[test]
fn an_unknown_nonce_counts_as_used_and_cannot_be_marked() {
    let f = Fixture::new();
    assert!(f.tokens.is_used(&"never-issued".try_into().unwrap()).unwrap());
    assert!(!f.tokens.mark_used(&"never-issued".try_into().unwrap()).unwrap());
}

#[test]
fn a_duplicate_nonce_is_a_conflict_and_an_unknown_instance_not_found() {
    let f = Fixture::new();
    let instance = instance(&f);
    f.tokens.create(&instance, &"nonce-1".try_into().unwrap()).unwrap();
    let error = f.tokens.create(&instance, &"nonce-1".try_into().unwrap()).unwrap_err();
    assert!(matches!(error, StoreError::Conflict { field: "nonce", .. }), "{error}");
    let error = f.tokens.create(&InstanceId::generate(), &"nonce-2".try_into().unwrap()).unwrap_err();
    assert!(matches!(error, StoreError::NotFound { entity: "instance", .. }), "{error}");
    for bad in ["", "  ", "a\u{0}b"] {
        let error = Nonce::parse(bad).unwrap_err();
        assert!(matches!(error, StoreError::Invalid { field: "nonce", .. }), "{error}");
    }
    assert_eq!(f.count("SELECT count(*) FROM bootstrap_tokens"), 1);
}
