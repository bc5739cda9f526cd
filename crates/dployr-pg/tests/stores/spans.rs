//! Each store operation is one `tracing` span named for it, with its exact
//! statement count and duration, and nothing else: no argument, no secret.

use dployr_domain::{BootstrapTokenStore, InstanceStore, NewInstance, NewUser, Provider, UserId, UserStore};
use dployr_testkit::spans::SpanCapture;

use crate::fixture::{Fixture, email};

#[test]
fn each_operation_is_a_span_with_its_name_statement_count_and_duration_only() {
    let f = Fixture::new();
    let (_, cluster) = f.owner("setup@example.io");
    let new = NewInstance { address: "h".try_into().unwrap(), tag: "t".try_into().unwrap(), metadata: None };
    let instance = f.instances.create(&cluster.id, new).unwrap();
    let capture = SpanCapture::default();
    capture.during(|| {
        let user = f.users.upsert(NewUser::new(email("secret.person@example.io"), Provider::Google)).unwrap();
        f.users.get(&user.id).unwrap();
        f.tokens.create(&instance.id, &"very-secret-nonce".try_into().unwrap()).unwrap();
        f.tokens.mark_used(&"very-secret-nonce".try_into().unwrap()).unwrap();
        f.users.delete(&UserId::generate()).unwrap_err();
    });
    let spans = capture.spans();
    let summary: Vec<(&str, &str)> =
        spans.iter().map(|span| (span.fields["op"].as_str(), span.fields["statements"].as_str())).collect();
    assert_eq!(
        summary,
        [
            ("users.upsert", "1"),
            ("users.get", "1"),
            ("bootstrap_tokens.create", "1"),
            ("bootstrap_tokens.mark_used", "1"),
            ("users.delete", "1"),
        ]
    );
    for span in &spans {
        assert_eq!(span.name, "dployr.store");
        assert_eq!(span.fields.keys().map(String::as_str).collect::<Vec<_>>(), ["duration_us", "op", "statements"]);
        assert!(span.fields["duration_us"].parse::<u64>().is_ok(), "{span:?}");
        assert!(!format!("{span:?}").contains("secret"), "a span leaked an argument: {span:?}");
    }
}
