//! Each store operation is one `tracing` span named for it, with its exact
//! statement count and duration, and nothing else: no argument, no secret.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use dployr_domain::{BootstrapTokenStore, NewUser, Provider, UserStore};
use tracing::Subscriber;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::{Context, SubscriberExt as _};
use tracing_subscriber::registry::LookupSpan;

use crate::fixture::{Fixture, email};

type Fields = BTreeMap<String, String>;

/// Collects the fields of every span when it closes.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<(String, Fields)>>>);

struct FieldsVisitor<'a>(&'a mut Fields);

impl Visit for FieldsVisitor<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Capture {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut fields = Fields::new();
        attrs.record(&mut FieldsVisitor(&mut fields));
        ctx.span(id).unwrap().extensions_mut().insert(fields);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let span = ctx.span(id).unwrap();
        let mut extensions = span.extensions_mut();
        values.record(&mut FieldsVisitor(extensions.get_mut::<Fields>().unwrap()));
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let span = ctx.span(&id).unwrap();
        let fields = span.extensions().get::<Fields>().cloned().unwrap_or_default();
        self.0.lock().unwrap().push((span.name().to_owned(), fields));
    }
}

#[test]
fn each_operation_is_a_span_with_its_name_statement_count_and_duration_only() {
    let f = Fixture::new();
    let (_, cluster) = f.owner("setup@example.io");
    let instance = dployr_domain::InstanceStore::create(
        &f.instances,
        &cluster.id,
        dployr_domain::NewInstance { address: "h".into(), tag: "t".into(), metadata: None },
    )
    .unwrap();
    let capture = Capture::default();
    let subscriber = tracing_subscriber::registry().with(capture.clone());
    tracing::subscriber::with_default(subscriber, || {
        let user = f.users.upsert(NewUser::new(email("secret.person@example.io"), Provider::Google)).unwrap();
        f.users.get(&user.id).unwrap();
        f.tokens.create(&instance.id, "very-secret-nonce").unwrap();
        f.tokens.mark_used("very-secret-nonce").unwrap();
        f.users.delete(&dployr_domain::UserId::generate()).unwrap_err();
    });
    let spans = capture.0.lock().unwrap().clone();
    let summary: Vec<(&str, &str)> =
        spans.iter().map(|(_, fields)| (fields["op"].as_str(), fields["statements"].as_str())).collect();
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
    for (name, fields) in &spans {
        assert_eq!(name, "dployr.store");
        assert_eq!(fields.keys().map(String::as_str).collect::<Vec<_>>(), ["duration_us", "op", "statements"]);
        assert!(fields["duration_us"].parse::<u64>().is_ok(), "{fields:?}");
        let text = format!("{fields:?}");
        assert!(!text.contains("secret"), "a span leaked an argument: {text}");
    }
}
