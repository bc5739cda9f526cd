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

/// `mark_used` is true exactly once per nonce: a used token that went with
/// its instance leaves its nonce spent, so a token made again with it (for
/// another instance) is refused, and the nonce never marks again. An
/// unused token's nonce was never spent and may be issued again.
#[test]
fn a_used_nonce_stays_spent_after_its_instance_is_deleted() {
    let f = Fixture::new();
    let (_, cluster) = f.owner("ada@example.io");
    let new_instance = |tag: &str, address: &str| {
        let new = NewInstance { address: address.try_into().unwrap(), tag: tag.try_into().unwrap(), metadata: None };
        f.instances.create(&cluster.id, new).unwrap().id
    };
    let nonce: Nonce = "nonce-spent".try_into().unwrap();
    let unused: Nonce = "nonce-unused".try_into().unwrap();
    let first = new_instance("first", "10.0.0.1");
    f.tokens.create(&first, &nonce).unwrap();
    f.tokens.create(&first, &unused).unwrap();
    assert!(f.tokens.mark_used(&nonce).unwrap());
    f.instances.delete(&first).unwrap();

    let second = new_instance("second", "10.0.0.2");
    let error = f.tokens.create(&second, &nonce).unwrap_err();
    assert!(matches!(error, StoreError::Conflict { field: "nonce", .. }), "{error}");
    assert!(!f.tokens.mark_used(&nonce).unwrap(), "the nonce marked a second time");
    assert!(f.tokens.is_used(&nonce).unwrap());

    f.tokens.create(&second, &unused).unwrap();
    assert!(f.tokens.mark_used(&unused).unwrap());
}
