//! `SpanCapture`: a `tracing` layer that keeps the fields of every span when
//! it closes, and of every event, so tests can assert what the data layer's
//! spans and events say (and that they never say a secret).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::{Context, SubscriberExt as _};
use tracing_subscriber::registry::LookupSpan;

/// The fields of one span, by name, as text.
pub type SpanFields = BTreeMap<String, String>;

/// A closed span: its name and fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClosedSpan {
    /// The span's name, e.g. `dployr.store`.
    pub name: String,
    /// Its fields.
    pub fields: SpanFields,
}

/// An event: its target and fields (the message is the field `message`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapturedEvent {
    /// The event's target, e.g. `dployr.kv.cloudflare`.
    pub target: String,
    /// Its fields.
    pub fields: SpanFields,
}

/// Collects every span that closes, and every event, while
/// [`SpanCapture::during`] runs.
#[derive(Debug, Clone, Default)]
pub struct SpanCapture(Arc<Mutex<Vec<ClosedSpan>>>, Arc<Mutex<Vec<CapturedEvent>>>);

struct FieldsVisitor<'a>(&'a mut SpanFields);

impl Visit for FieldsVisitor<'_> {
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_owned(), value.to_string());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for SpanCapture {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut fields = SpanFields::new();
        attrs.record(&mut FieldsVisitor(&mut fields));
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(fields);
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            let mut extensions = span.extensions_mut();
            if let Some(fields) = extensions.get_mut::<SpanFields>() {
                values.record(&mut FieldsVisitor(fields));
            }
        }
    }

    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut fields = SpanFields::new();
        event.record(&mut FieldsVisitor(&mut fields));
        let target = event.metadata().target().to_owned();
        self.1.lock().unwrap_or_else(PoisonError::into_inner).push(CapturedEvent { target, fields });
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(&id) {
            let fields = span.extensions().get::<SpanFields>().cloned().unwrap_or_default();
            self.0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(ClosedSpan { name: span.name().to_owned(), fields });
        }
    }
}

impl SpanCapture {
    /// Runs `work` with this capture as the thread's subscriber and returns
    /// its result; the spans that closed meanwhile are in [`spans`](Self::spans).
    pub fn during<T>(&self, work: impl FnOnce() -> T) -> T {
        static ALWAYS_ASKED: std::sync::Once = std::sync::Once::new();
        ALWAYS_ASKED.call_once(|| {
            // Another global subscriber, if a program set one, does as well.
            let _ = tracing::subscriber::set_global_default(AlwaysAsked);
        });
        let subscriber = tracing_subscriber::registry().with(self.clone());
        tracing::subscriber::with_default(subscriber, work)
    }

    /// The spans closed so far, in the order they closed.
    pub fn spans(&self) -> Vec<ClosedSpan> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// The events so far, in the order they came.
    pub fn events(&self) -> Vec<CapturedEvent> {
        self.1.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

/// The global subscriber of a process that captures spans: it records
/// nothing, but tells `tracing` that whether a span or event is wanted
/// depends on the thread ("sometimes"), so no callsite's interest is ever
/// cached as "never". Without it, a thread that registers a callsite (its
/// first span) while another thread installs its capture can store
/// "never", computed before the capture existed, over the capture's
/// "always" (tracing-core computes a callsite's interest, then stores it,
/// without a lock), and that callsite's spans would be missing from
/// captures until the next capture is installed.
struct AlwaysAsked;

impl Subscriber for AlwaysAsked {
    fn register_callsite(&self, _metadata: &'static tracing::Metadata<'static>) -> tracing::subscriber::Interest {
        tracing::subscriber::Interest::sometimes()
    }

    fn enabled(&self, _metadata: &tracing::Metadata<'_>) -> bool {
        false
    }

    fn new_span(&self, _span: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }

    fn record(&self, _span: &Id, _values: &Record<'_>) {}

    fn record_follows_from(&self, _span: &Id, _follows: &Id) {}

    fn event(&self, _event: &Event<'_>) {}

    fn enter(&self, _span: &Id) {}

    fn exit(&self, _span: &Id) {}
}
