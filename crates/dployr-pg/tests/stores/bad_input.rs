//! Property tests of bad input against real PostgreSQL: hostile e-mails,
//! metadata, names, tags, addresses, nonces and cursors (1000 cases each)
//! never panic; a value is refused with `StoreError::Invalid` naming its
//! field exactly when the field's rule says so; a refused call leaves every
//! table as it was; and what is accepted is stored and read back unchanged.
//!
//! Each property states its rule on its own (the oracle functions below)
//! rather than calling the code under test to decide what to expect.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use diesel::prelude::*;
use dployr_domain::{
    Address, BootstrapTokenStore, ClusterName, ClusterPatch, ClusterStore, Cursor, DisplayName, Email, InstanceStore,
    MAX_ADDRESS_BYTES, MAX_CLUSTER_NAME_BYTES, MAX_EMAIL_BYTES, MAX_METADATA_BYTES, MAX_METADATA_DEPTH, MAX_TAG_BYTES,
    MAX_USER_TEXT_BYTES, Metadata, NewInstance, NewUser, Nonce, Page, Provider, StoreError, Tag, UserPatch, UserStore,
};
use icu_normalizer::ComposingNormalizerBorrowed;
use icu_properties::props::{DefaultIgnorableCodePoint, GeneralCategory as Gc};
use icu_properties::{CodePointMapData, CodePointSetData};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{Value, json};

use crate::fixture::Fixture;

const CASES: u32 = 1000;

/// Runs `property` over `cases` values of `strategy` (or as many as
/// `PROPTEST_CASES` says, to hunt rare inputs: `PROPTEST_CASES=50000`),
/// shrinking a failure to its smallest input. Cases share one database, so
/// each one picks names of its own where it needs fresh rows.
fn check<S: Strategy>(cases: u32, strategy: S, property: impl Fn(S::Value) -> Result<(), TestCaseError>) {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(cases);
    let config = Config { cases, failure_persistence: None, ..Config::default() };
    if let Err(failure) = TestRunner::new(config).run(&strategy, property) {
        panic!("{failure}");
    }
}

/// Text that breaks naive code: SQL, quotes, NUL and other control
/// characters, Unicode whitespace, characters whose lower case is longer
/// than they are, right-to-left overrides, `@`, `%`, `_`, emoji.
const PIECES: &[&str] = &[
    "a",
    "Z",
    "0",
    " ",
    "\t",
    "\n",
    "\r",
    "\0",
    "\u{7}",
    "\u{7f}",
    "\u{85}",
    "\u{a0}",
    "\u{2028}",
    "\u{202e}",
    "\u{feff}",
    "@",
    ".",
    "-",
    "_",
    "%",
    "\\",
    "'",
    "\"",
    "'; DROP TABLE users; --",
    "' OR '1'='1",
    "$$",
    "{}",
    "ß",
    "İ",
    "\u{212a}",
    "Σ",
    "é",
    "日本",
    "🦀",
    "\u{200b}",
    "\u{200d}",
    "\u{301}",
    "\u{3164}",
    "\u{2800}",
    "\u{1d159}",
    "\u{2066}",
    "\u{ff21}",
    "e\u{301}",
];

fn pieces(max: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(PIECES), 0..max).prop_map(|parts| parts.concat())
}

/// A run of one character whose byte length is within a few bytes of
/// `max_bytes`, on either side.
fn near_the_limit(max_bytes: usize) -> impl Strategy<Value = String> {
    (max_bytes.saturating_sub(6)..=max_bytes + 6, prop::sample::select(&["a", "é", "日", "🦀", " "][..]))
        .prop_map(|(bytes, unit)| unit.repeat(bytes.div_ceil(unit.len())))
}

/// Hostile free text for a field of at most `max_bytes` bytes.
fn hostile_text(max_bytes: usize) -> impl Strategy<Value = String> {
    prop_oneof![
        4 => pieces(12),
        3 => any::<String>(),
        2 => "[a-z0-9][a-z0-9 ._-]{0,30}",
        1 => near_the_limit(max_bytes),
    ]
}

/// The rule of a picture URL or a login id, stated independently of
/// `text::check`: blank is showing nothing (no [`visible`] character).
fn acceptable(text: &str, max_bytes: usize, blank_allowed: bool) -> bool {
    (blank_allowed || text.chars().any(visible)) && text.len() <= max_bytes && !text.chars().any(char::is_control)
}

/// The two characters that render blank without any Unicode property
/// saying so: U+2800 BRAILLE PATTERN BLANK and U+1D159 MUSICAL SYMBOL NULL
/// NOTEHEAD. Refused wherever invisible characters are.
fn renders_blank(c: char) -> bool {
    matches!(c, '\u{2800}' | '\u{1d159}')
}

/// Whether `c` shows something: not whitespace, a mark, a default-ignorable,
/// control, format, separator or unassigned code point, nor one that
/// [renders blank](renders_blank).
fn visible(c: char) -> bool {
    !c.is_whitespace()
        && !mark(c)
        && !ignorable(c)
        && !renders_blank(c)
        && !matches!(
            gc(c),
            Gc::Control | Gc::Format | Gc::SpaceSeparator | Gc::LineSeparator | Gc::ParagraphSeparator | Gc::Unassigned
        )
}

fn gc(c: char) -> Gc {
    CodePointMapData::<Gc>::new().get(c)
}

fn ignorable(c: char) -> bool {
    CodePointSetData::new::<DefaultIgnorableCodePoint>().contains(c)
}

fn mark(c: char) -> bool {
    matches!(gc(c), Gc::NonspacingMark | Gc::SpacingMark | Gc::EnclosingMark)
}

/// The identifier rule (tags, addresses, nonces), stated on its own: the
/// NFC form, trimmed, non-empty, within `max_bytes`, with no whitespace,
/// control, format, separator, unassigned, default-ignorable or
/// [blank-rendering](renders_blank) character, not starting with a combining
/// mark. `Some(stored form)` when acceptable.
fn identifier(text: &str, max_bytes: usize) -> Option<String> {
    let normal = ComposingNormalizerBorrowed::new_nfc().normalize(text);
    let value = normal.trim();
    let refused = |c: char| {
        c.is_whitespace()
            || ignorable(c)
            || renders_blank(c)
            || matches!(gc(c), Gc::Control | Gc::Format | Gc::LineSeparator | Gc::ParagraphSeparator | Gc::Unassigned)
    };
    let ok = !value.is_empty()
        && value.len() <= max_bytes
        && !value.chars().any(refused)
        && !value.chars().next().is_some_and(mark);
    ok.then(|| value.to_owned())
}

/// The display-text rule (user and cluster names), stated on its own: the
/// NFC form, trimmed, within `max_bytes`, no control, separator or format
/// character but the two joiners, at least one visible character, not
/// starting with a combining mark.
fn display(text: &str, max_bytes: usize) -> Option<String> {
    let normal = ComposingNormalizerBorrowed::new_nfc().normalize(text);
    let value = normal.trim();
    let refused = |c: char| match gc(c) {
        Gc::Control | Gc::LineSeparator | Gc::ParagraphSeparator => true,
        Gc::Format => c != '\u{200c}' && c != '\u{200d}',
        _ => false,
    };
    let ok = value.len() <= max_bytes
        && !value.chars().any(refused)
        && value.chars().any(visible)
        && !value.chars().next().is_some_and(mark);
    ok.then(|| value.to_owned())
}

fn invalid_field(error: &StoreError) -> Option<&'static str> {
    match error {
        StoreError::Invalid { field, .. } => Some(field),
        _ => None,
    }
}

/// A counter for names that must not collide between cases.
fn fresh(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("{prefix}{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

fn fresh_email() -> Email {
    Email::parse(&format!("{}@bad-input.test", fresh("u"))).unwrap()
}

// ---------------------------------------------------------------- e-mails

fn hostile_email() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => (pieces(6), pieces(3), pieces(6)).prop_map(|(local, at, domain)| format!("{local}{at}{domain}")),
        2 => "[ ]{0,2}[A-Za-z0-9._%+-]{1,20}@[A-Za-z0-9.-]{1,20}[ ]{0,2}",
        2 => "[A-Za-z0-9.+-]{1,12}@([a-z0-9-]{1,8}\\.){1,3}[a-z0-9-]{1,6}\\.?",
        1 => (pieces(4), prop::sample::select(&["b\u{fc}cher.de", "xn--bcher-kva.de", "X.IO.", "x.io", "\u{ff58}.io", "a.0x", "a.0X1f", "b.0xg"][..]))
            .prop_map(|(local, domain)| format!("{local}@{domain}")),
        2 => any::<String>(),
        1 => (240usize..260, 1usize..8).prop_map(|(local, domain)| format!("{}@{}", "A".repeat(local), "b".repeat(domain))),
    ]
}

/// The e-mail rule for ASCII input, stated on its own: trimmed and
/// lower-cased, one trailing dot of the domain dropped, a dot-atom local
/// part of 1 to 64 bytes, a domain of at least two LDH labels of 1 to 63
/// bytes (no hyphen first or last; hyphens third and fourth, as host names
/// in use have them, allowed; the last neither all digits nor `0x` and hex
/// digits, what URL parsers read as an IPv4 address), at most 254 bytes.
fn ascii_email(raw: &str) -> Option<String> {
    let email = raw.trim().to_ascii_lowercase();
    let (local, domain) = email.split_once('@')?;
    let domain = domain.strip_suffix('.').unwrap_or(domain);
    let atext = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c);
    let local_ok =
        (1..=64).contains(&local.len()) && local.split('.').all(|atom| !atom.is_empty() && atom.chars().all(atext));
    let labels: Vec<&str> = domain.split('.').collect();
    let label_ok = |label: &&str| {
        (1..=63).contains(&label.len())
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    let domain_ok = labels.len() >= 2
        && domain.len() <= 253
        && labels.iter().all(label_ok)
        && !labels.last().is_some_and(|tld| {
            tld.chars().all(|c| c.is_ascii_digit())
                || tld.strip_prefix("0x").is_some_and(|hex| hex.chars().all(|c| c.is_ascii_hexdigit()))
        });
    let stored = format!("{local}@{domain}");
    (local_ok && domain_ok && stored.len() <= MAX_EMAIL_BYTES).then_some(stored)
}

#[test]
fn hostile_emails_are_invalid_or_stored_normalised_and_found_whatever_their_case() {
    let f = Fixture::new();
    check(CASES, hostile_email(), |raw| {
        // Punycode labels are checked by decoding them: left out of the oracle.
        let ascii = raw.trim().is_ascii()
            && !raw.trim().chars().any(|c| c.is_ascii_control() || c == ' ')
            && !raw.to_ascii_lowercase().contains("xn--");
        let expected = if ascii { ascii_email(&raw) } else { None };
        match Email::parse(&raw) {
            Err(error) => {
                prop_assert_eq!(invalid_field(&error), Some("email"), "{:?} -> {}", raw, error);
                prop_assert_eq!(expected, None, "{:?} was refused: {}", raw, error);
            }
            Ok(email) => {
                if ascii {
                    prop_assert_eq!(Some(email.as_str().to_owned()), expected);
                }
                // Whatever the input, the stored form is a fixed point, within
                // its limits, with nothing invisible and an ASCII domain.
                let again = Email::parse(email.as_str()).ok();
                prop_assert_eq!(again.as_ref(), Some(&email));
                prop_assert!(email.as_str().len() <= MAX_EMAIL_BYTES);
                prop_assert!(email.local_part().len() <= 64);
                prop_assert!(email.domain().is_ascii() && email.domain().contains('.'));
                prop_assert!(!email.as_str().chars().any(|c| c.is_whitespace() || ignorable(c) || gc(c) == Gc::Format));
                let user = f.users.upsert(NewUser::new(email.clone(), Provider::Email)).unwrap();
                prop_assert_eq!(&user.email, &email);
                prop_assert_eq!(user.name.as_str(), email.local_part());
                let shouted = Email::parse(&format!("  {}\t", email.as_str().to_ascii_uppercase())).unwrap();
                let found = f.users.get_by_email(&shouted).unwrap().map(|found| found.id);
                prop_assert_eq!(found, Some(user.id));
            }
        }
        Ok(())
    });
}

// ---------------------------------------------------------------- metadata

/// JSON of every kind, with hostile keys and strings, nested a few levels.
/// Numbers are integers and quarters, which every JSON reader round-trips
/// exactly, so a mismatch can only be the store's.
fn hostile_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<i32>().prop_map(|quarters| Value::from(f64::from(quarters) / 4.0)),
        hostile_text(64).prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(hostile_text(16), inner, 0..6)
                .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
}

/// A top-level value for metadata: mostly objects, some of them within a few
/// bytes of the size limit, and every other kind of JSON.
fn hostile_metadata() -> impl Strategy<Value = Value> {
    prop_oneof![
        5 => prop::collection::btree_map(hostile_text(16), hostile_json(), 0..8)
            .prop_map(|map| Value::Object(map.into_iter().collect())),
        2 => hostile_json(),
        1 => (MAX_METADATA_BYTES - 16..=MAX_METADATA_BYTES + 16)
            .prop_map(|bytes| json!({ "big": "x".repeat(bytes - r#"{"big":""}"#.len()) })),
    ]
}

fn holds_nul(value: &Value) -> bool {
    match value {
        Value::String(text) => text.contains('\0'),
        Value::Array(items) => items.iter().any(holds_nul),
        Value::Object(map) => map.iter().any(|(key, value)| key.contains('\0') || holds_nul(value)),
        Value::Null | Value::Bool(_) | Value::Number(_) => false,
    }
}

/// Bytes of `value` as PostgreSQL prints it back from `jsonb`: the size the
/// schema bounds, asked of the server itself.
fn stored_bytes(f: &Fixture, value: &Value) -> usize {
    #[derive(QueryableByName)]
    struct Size {
        #[diesel(sql_type = diesel::sql_types::Integer)]
        bytes: i32,
    }
    let sql = "SELECT octet_length($1::jsonb::text) AS bytes";
    let text = serde_json::to_string(value).unwrap();
    let size = f.inspect(|conn| {
        diesel::sql_query(sql).bind::<diesel::sql_types::Text, _>(&text).get_result::<Size>(conn).unwrap()
    });
    usize::try_from(size.bytes).unwrap()
}

#[test]
fn metadata_that_breaks_its_rules_is_invalid_and_accepted_metadata_round_trips() {
    let f = Fixture::new();
    check(CASES, hostile_metadata(), |value| {
        let acceptable = value.is_object() && !holds_nul(&value) && stored_bytes(&f, &value) <= MAX_METADATA_BYTES;
        match Metadata::try_from(value.clone()) {
            Err(error) => {
                prop_assert_eq!(invalid_field(&error), Some("metadata"), "{}", error);
                prop_assert!(!acceptable, "refused: {}", error);
            }
            Ok(metadata) => {
                prop_assert!(acceptable, "accepted {} bytes as stored", stored_bytes(&f, &value));
                let new = NewUser { metadata: Some(metadata.clone()), ..NewUser::new(fresh_email(), Provider::Github) };
                let user = f.users.upsert(new).unwrap();
                prop_assert_eq!(&user.metadata, &metadata);
                let stored = f.users.get(&user.id).unwrap().unwrap();
                prop_assert_eq!(stored.metadata, metadata);
            }
        }
        Ok(())
    });
}

/// Metadata of many numbers, most of which PostgreSQL prints far longer
/// than serde_json writes them (`1.7976931348623157e308` as 309 digits),
/// in counts that put its stored size on both sides of the limit while its
/// compact JSON stays within it.
fn long_printing_metadata() -> impl Strategy<Value = Value> {
    let number = prop_oneof![
        3 => prop::sample::select(&[f64::MAX, f64::MIN, 5e-324, -f64::MIN_POSITIVE, 1e300, 1e-300, 1e20][..]),
        2 => (1u32..1000, -320i32..300).prop_map(|(digits, exponent)| f64::from(digits) * 10f64.powi(exponent)),
        1 => any::<i64>().prop_map(|n| n as f64),
    ]
    .prop_filter("finite, not a whole float PostgreSQL gives back as an integer", |x| {
        x.is_finite() && !comes_back_as_an_integer(&Value::from(*x))
    });
    prop::collection::vec(number, 100..400).prop_map(|numbers| {
        Value::Object(numbers.into_iter().enumerate().map(|(i, x)| (format!("n{i}"), Value::from(x))).collect())
    })
}

#[test]
fn metadata_is_measured_as_postgresql_stores_it_so_whatever_is_accepted_fits_a_new_row() {
    let f = Fixture::new();
    check(CASES, long_printing_metadata(), |value| {
        prop_assert!(serde_json::to_vec(&value).unwrap().len() <= MAX_METADATA_BYTES);
        let stored = stored_bytes(&f, &value);
        let before = f.fingerprint();
        match Metadata::try_from(value.clone()) {
            Err(error) => {
                prop_assert_eq!(invalid_field(&error), Some("metadata"), "{}", error);
                prop_assert!(stored > MAX_METADATA_BYTES, "refused at {} bytes stored: {}", stored, error);
                prop_assert!(error.to_string().contains(&stored.to_string()), "names the size: {}", error);
                prop_assert_eq!(f.fingerprint(), before);
            }
            Ok(metadata) => {
                prop_assert!(stored <= MAX_METADATA_BYTES, "accepted {} bytes stored", stored);
                let new = NewUser { metadata: Some(metadata.clone()), ..NewUser::new(fresh_email(), Provider::Github) };
                let user = f.users.upsert(new).unwrap();
                prop_assert!(f.users.get(&user.id).unwrap().unwrap().metadata == metadata);
            }
        }
        Ok(())
    });
}

/// A number anywhere in f64, i64 and u64, with the awkward ones often.
fn any_number() -> impl Strategy<Value = Value> {
    let special = prop::sample::select(
        &[
            f64::MAX,
            f64::MIN,
            f64::MIN_POSITIVE,
            5e-324,
            -5e-324,
            1e16,
            1e15,
            1e19,
            1e20,
            -0.0,
            1.79e308,
            0.1,
            1.5e-7,
            // Either side of what an i64 or a u64 holds: whole floats within
            // come back from PostgreSQL as integers, those beyond as floats.
            -9_223_372_036_854_775_808.0,
            -9.25e18,
            18_446_744_073_709_551_616.0,
            18_446_744_073_709_549_568.0,
        ][..],
    );
    prop_oneof![
        any::<f64>().prop_filter("finite", |x| x.is_finite()).prop_map(Value::from),
        special.prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (any::<i32>(), -20i32..20).prop_map(|(n, e)| Value::from(f64::from(n) * 10f64.powi(e))),
    ]
}

/// A number as JSON text, possibly beyond what f64 holds.
fn number_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<number_text_parts::Parts>().prop_map(number_text_parts::text),
        any::<f64>().prop_filter("finite", |x| x.is_finite()).prop_map(|x| format!("{x:e}")),
        any::<u64>().prop_map(|n| n.to_string()),
        Just("1e400".to_owned()),
        Just("-1e-400".to_owned()),
        Just("123456789012345678901234567890".to_owned()),
    ]
}

mod number_text_parts {
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    pub struct Parts(bool, u64, Option<u32>, i32);

    impl Arbitrary for Parts {
        type Parameters = ();
        type Strategy = BoxedStrategy<Self>;

        fn arbitrary_with((): ()) -> Self::Strategy {
            (any::<bool>(), any::<u64>(), prop::option::of(any::<u32>()), -340i32..340)
                .prop_map(|(negative, whole, fraction, exponent)| Parts(negative, whole, fraction, exponent))
                .boxed()
        }
    }

    pub fn text(Parts(negative, whole, fraction, exponent): Parts) -> String {
        let sign = if negative { "-" } else { "" };
        let fraction = fraction.map(|f| format!(".{f}")).unwrap_or_default();
        format!("{sign}{whole}{fraction}e{exponent}")
    }
}

/// `leaf` nested `depth` levels deep in all (the top-level object counts),
/// alternating arrays and objects; built without recursion.
fn nested(depth: usize, leaf: Value) -> Value {
    // Built by moving, not with `json!`, which would copy the inner value
    // through serialization at each level (quadratic in the depth).
    let object = |key: &str, value: Value| Value::Object(std::iter::once((key.to_owned(), value)).collect());
    let mut value = leaf;
    for level in 1..depth {
        value = if level % 2 == 0 { object("o", value) } else { Value::Array(vec![value]) };
    }
    object("top", value)
}

/// Nesting depth of `value` without recursion.
fn depth_of(value: &Value) -> usize {
    let mut deepest = 0;
    let mut stack = vec![(value, 1)];
    while let Some((value, depth)) = stack.pop() {
        match value {
            Value::Array(items) => {
                deepest = deepest.max(depth);
                stack.extend(items.iter().map(|item| (item, depth + 1)));
            }
            Value::Object(map) => {
                deepest = deepest.max(depth);
                stack.extend(map.values().map(|item| (item, depth + 1)));
            }
            _ => {}
        }
    }
    deepest
}

/// The floats PostgreSQL gives back as integers: those serde_json writes
/// with an exponent (PostgreSQL prints the same digits without one) whose
/// printed value is whole and within `i64::MIN..=u64::MAX`, which serde_json
/// then reads as an integer. (The printed value, not the float: serde_json
/// writes `i64::MIN as f64` as `-9.223372036854776e18`, whose digits are
/// below `i64::MIN` and come back as the same float.)
fn comes_back_as_an_integer(value: &Value) -> bool {
    let mut stack = vec![value];
    while let Some(value) = stack.pop() {
        match value {
            Value::Number(n) if n.is_f64() => {
                let text = n.to_string();
                let integer = text.contains('e').then(|| printed_integer(&text)).flatten();
                if integer.is_some_and(|i| (i128::from(i64::MIN)..=i128::from(u64::MAX)).contains(&i)) {
                    return true;
                }
            }
            Value::Array(items) => stack.extend(items),
            Value::Object(map) => stack.extend(map.values()),
            _ => {}
        }
    }
    false
}

/// The whole number that the JSON number `text` (`-1.5e3`) denotes, if it
/// is whole and an `i128` holds it.
fn printed_integer(text: &str) -> Option<i128> {
    let (mantissa, exponent) = text.split_once(['e', 'E']).unwrap_or((text, "0"));
    let (negative, mantissa) = mantissa.strip_prefix('-').map_or((false, mantissa), |rest| (true, rest));
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let fraction = fraction.trim_end_matches('0');
    let zeros = exponent.parse::<i64>().ok()? - i64::try_from(fraction.len()).ok()?;
    let zeros = usize::try_from(zeros).ok().filter(|&zeros| zeros <= 40)?;
    let magnitude: i128 = format!("{whole}{fraction}{}", "0".repeat(zeros)).parse().ok()?;
    Some(if negative { -magnitude } else { magnitude })
}

/// Either refused as `Invalid { field: "metadata" }` with nothing written,
/// or stored and read back equal (as a `serde_json::Value`) to what was sent.
fn stored_equal_or_refused(
    f: &Fixture,
    sent: Option<&Value>,
    metadata: Result<Metadata, StoreError>,
    refuse: bool,
) -> Result<(), TestCaseError> {
    let before = f.fingerprint();
    match metadata {
        Err(error) => {
            prop_assert_eq!(invalid_field(&error), Some("metadata"), "{}", error);
            prop_assert!(refuse, "refused: {}", error);
            prop_assert_eq!(f.fingerprint(), before);
        }
        Ok(metadata) => {
            prop_assert!(!refuse, "accepted what cannot read back equal");
            if let Some(sent) = sent {
                prop_assert!(metadata.to_value() == *sent);
            }
            let new = NewUser { metadata: Some(metadata.clone()), ..NewUser::new(fresh_email(), Provider::Github) };
            let user = f.users.upsert(new).unwrap();
            let stored = f.users.get(&user.id).unwrap().unwrap().metadata;
            prop_assert!(stored.to_value() == metadata.to_value(), "{:?} came back as {:?}", metadata, stored);
            let by_email = f.users.get_by_email(&user.email).unwrap().unwrap().metadata;
            prop_assert!(by_email == metadata);
        }
    }
    Ok(())
}

/// Runs `work` on a thread with a stack for values 10 000 levels deep,
/// which serde_json drops and clones by recursion.
fn with_deep_stack(work: impl FnOnce() + Send + 'static) {
    let handle = std::thread::Builder::new().stack_size(1 << 30).spawn(work).unwrap();
    if let Err(panic) = handle.join() {
        std::panic::resume_unwind(panic);
    }
}

#[test]
fn metadata_of_any_depth_and_any_number_is_refused_or_read_back_equal() {
    with_deep_stack(|| {
        let f = Fixture::new();
        let depth = prop_oneof![1usize..=80, 1usize..=10_000, 120usize..=140];
        check(CASES, (depth, any_number()), |(depth, number)| {
            let sent = nested(depth, number);
            prop_assert_eq!(depth_of(&sent), depth.max(1));
            let refuse = depth > MAX_METADATA_DEPTH || comes_back_as_an_integer(&sent);
            stored_equal_or_refused(&f, Some(&sent), Metadata::try_from(sent.clone()), refuse)
        });
    });
}

#[test]
fn metadata_sent_as_json_text_is_refused_or_read_back_equal() {
    with_deep_stack(|| {
        let f = Fixture::new();
        let depth = prop_oneof![1usize..=80, 1usize..=10_000, 120usize..=140];
        check(CASES, (depth, number_text()), |(depth, number)| {
            let text = format!("{{\"top\": {}{number}{}}}", "[".repeat(depth - 1), "]".repeat(depth - 1));
            // What serde_json makes of the text (it stops at 128 levels and at numbers beyond f64).
            let parsed: Option<Value> = serde_json::from_str(&text).ok();
            let refuse = parsed
                .as_ref()
                .is_none_or(|value| depth_of(value) > MAX_METADATA_DEPTH || comes_back_as_an_integer(value))
                || !serde_json_keeps_exactly(&f, &number);
            stored_equal_or_refused(&f, parsed.as_ref(), text.parse::<Metadata>(), refuse)
        });
    });
}

/// Whether serde_json reads the number `literal` as exactly its value,
/// decided by PostgreSQL's `numeric`: an integer literal within `i64` or
/// `u64` stays an integer; anything else becomes the nearest `f64`, kept
/// when serde_json writes that float back as a number equal to `literal`.
fn serde_json_keeps_exactly(f: &Fixture, literal: &str) -> bool {
    if !literal.contains(['.', 'e', 'E']) && (literal.parse::<i64>().is_ok() || literal.parse::<u64>().is_ok()) {
        return true;
    }
    let Some(read) = literal.parse::<f64>().ok().and_then(serde_json::Number::from_f64) else { return false };
    f.count(&format!("SELECT ('{literal}'::numeric = '{read}'::numeric)::int::bigint AS count")) == 1
}

/// Bytes of `{"k0": "xx", "k1": "xxx"}` as PostgreSQL prints a jsonb object
/// of these keys and string lengths (ASCII only, so no escapes).
fn jsonb_text_bytes(entries: &[(String, usize)]) -> usize {
    let pairs: usize = entries.iter().map(|(key, len)| key.len() + 2 + 2 + len + 2).sum();
    2 + pairs + 2 * entries.len().saturating_sub(1)
}

#[test]
fn a_merge_that_would_pass_the_stored_bound_is_invalid_and_writes_nothing() {
    const STORED_LIMIT: usize = 128 * 1024;
    let f = Fixture::new();
    // A few sign-ins with new keys each; past the bound one is refused, and
    // the user and the cluster they own keep what they had.
    let strategy = prop::collection::vec(1usize..MAX_METADATA_BYTES - 16, 1..5);
    check(256, strategy, |sizes| {
        let (user, cluster) = f.owner(fresh_email().as_str());
        let mut stored: Vec<(String, usize)> = Vec::new();
        for size in sizes {
            let key = fresh("k");
            let metadata = Metadata::try_from(json!({ key.clone(): "x".repeat(size) })).unwrap();
            let mut after = stored.clone();
            after.push((key, size));
            let fits = jsonb_text_bytes(&after) <= STORED_LIMIT;
            let before = f.fingerprint();
            let new = NewUser { metadata: Some(metadata), ..NewUser::new(user.email.clone(), Provider::Google) };
            match f.users.upsert(new) {
                Ok(updated) => {
                    prop_assert!(fits, "{} bytes stored", jsonb_text_bytes(&after));
                    prop_assert_eq!(updated.metadata.as_map().len(), after.len());
                    stored = after;
                }
                Err(error) => {
                    prop_assert_eq!(invalid_field(&error), Some("metadata"), "{}", error);
                    prop_assert!(!fits, "refused at {} bytes: {}", jsonb_text_bytes(&after), error);
                    prop_assert_eq!(f.fingerprint(), before);
                }
            }
        }
        let keys = f.clusters.get(&cluster.id).unwrap().unwrap().metadata.as_map().len();
        prop_assert_eq!(keys, stored.len(), "the owned cluster got exactly the accepted merges");
        Ok(())
    });
}

// ---------------------------------------------------------------- names

#[test]
fn names_that_break_their_rules_are_invalid_and_write_nothing() {
    let f = Fixture::new();
    let (owner, cluster) = f.owner("owner@bad-input.test");
    check(CASES, hostile_text(MAX_USER_TEXT_BYTES), |raw| {
        // A name that breaks the rule cannot be made, so no store sees it.
        let user_name = match (DisplayName::parse(&raw), display(&raw, MAX_USER_TEXT_BYTES)) {
            (Ok(name), Some(expected)) => {
                prop_assert_eq!(name.as_str(), expected.as_str());
                name
            }
            (Err(error), None) => {
                prop_assert_eq!(invalid_field(&error), Some("name"), "{}", error);
                return Ok(());
            }
            (got, expected) => {
                prop_assert!(false, "{:?}: got {:?}, the rule says {:?}", raw, got, expected);
                unreachable!()
            }
        };
        let cluster_name = ClusterName::parse(&raw).unwrap();
        let expected = display(&raw, MAX_CLUSTER_NAME_BYTES);
        prop_assert_eq!(expected.as_deref(), Some(cluster_name.as_str()));

        let new = NewUser { name: Some(user_name.clone()), ..NewUser::new(fresh_email(), Provider::Microsoft) };
        let user = f.users.upsert(new).unwrap();
        let stored = f.users.get(&user.id).unwrap().unwrap().name;
        prop_assert_eq!(stored.as_str(), user_name.as_str());

        let patch = UserPatch { name: Some(user_name.clone()), ..UserPatch::default() };
        let updated = f.users.update(&owner.email, patch).unwrap();
        prop_assert_eq!(updated.map(|user| user.name), Some(user_name.into_string()));

        let patch = ClusterPatch { name: Some(cluster_name.clone()), ..ClusterPatch::default() };
        let updated = f.clusters.update(&cluster.id, patch).unwrap();
        prop_assert_eq!(updated.map(|cluster| cluster.name), Some(cluster_name.into_string()));
        Ok(())
    });
}

// ---------------------------------------------------------------- tags and addresses

fn new_instance(address: &str, tag: &str) -> NewInstance {
    NewInstance { address: Address::parse(address).unwrap(), tag: Tag::parse(tag).unwrap(), metadata: None }
}

/// Which unique text field of an instance a property varies.
#[derive(Clone, Copy)]
enum InstanceField {
    Tag,
    Address,
}

impl InstanceField {
    fn name(self) -> &'static str {
        match self {
            Self::Tag => "tag",
            Self::Address => "address",
        }
    }

    fn max_bytes(self) -> usize {
        match self {
            Self::Tag => MAX_TAG_BYTES,
            Self::Address => MAX_ADDRESS_BYTES,
        }
    }

    /// The field's value made from `raw`, or the `Invalid` error.
    fn parse(self, raw: &str) -> Result<String, StoreError> {
        match self {
            Self::Tag => Tag::parse(raw).map(Tag::into_string),
            Self::Address => Address::parse(raw).map(Address::into_string),
        }
    }

    /// A new instance with `value` (already acceptable) in this field and a fresh value in the other.
    fn instance(self, value: &str) -> NewInstance {
        match self {
            Self::Tag => new_instance(&fresh("10.9.0."), value),
            Self::Address => new_instance(value, &fresh("tag-")),
        }
    }

    /// Whether an instance already has `value` in this field.
    fn taken(self, f: &Fixture, value: &str) -> bool {
        use dployr_pg::schema::instances;
        let column_matches = match self {
            Self::Tag => instances::table.filter(instances::tag.eq(value)).into_boxed(),
            Self::Address => instances::table.filter(instances::address.eq(value)).into_boxed(),
        };
        f.inspect(|conn| diesel::select(diesel::dsl::exists(column_matches)).get_result::<bool>(conn).unwrap())
    }

    fn of(self, instance: &dployr_domain::Instance) -> &str {
        match self {
            Self::Tag => &instance.tag,
            Self::Address => &instance.address,
        }
    }
}

/// Hostile values in one unique field of `instances.create`: invalid ones
/// are `Invalid` naming the field, taken ones a `Conflict` naming it,
/// neither writes, and an accepted one is stored as given.
fn unique_instance_field_refuses_bad_and_taken_values(field: InstanceField) {
    let f = Fixture::new();
    let (_, cluster) = f.owner("owner@bad-input.test");
    check(CASES, hostile_text(field.max_bytes()), |raw| {
        let expected = identifier(&raw, field.max_bytes());
        let value = match field.parse(&raw) {
            Ok(value) => value,
            Err(error) => {
                prop_assert_eq!(invalid_field(&error), Some(field.name()), "{}", error);
                prop_assert_eq!(expected, None, "refused {:?}: {}", raw, error);
                return Ok(());
            }
        };
        prop_assert_eq!(Some(&value), expected.as_ref(), "{:?}", raw);
        let fits = true;
        let taken = field.taken(&f, &value);
        let before = f.fingerprint();
        match f.instances.create(&cluster.id, field.instance(&value)) {
            Ok(instance) => {
                prop_assert!(fits && !taken, "accepted {:?}", value);
                let stored = f.instances.get(&instance.id).unwrap().unwrap();
                prop_assert_eq!(field.of(&stored), value.as_str());
            }
            Err(StoreError::Conflict { entity: "instance", field: conflicting, .. }) => {
                prop_assert_eq!(conflicting, field.name());
                prop_assert!(taken, "conflict on a free value {:?}", value);
                prop_assert_eq!(f.fingerprint(), before);
            }
            Err(error) => {
                prop_assert_eq!(invalid_field(&error), Some(field.name()), "{}", error);
                prop_assert!(!fits, "refused {:?}: {}", value, error);
                prop_assert_eq!(f.fingerprint(), before);
            }
        }
        Ok(())
    });
}

#[test]
fn tags_that_break_their_rules_are_invalid_taken_ones_conflict_and_neither_writes() {
    unique_instance_field_refuses_bad_and_taken_values(InstanceField::Tag);
}

#[test]
fn addresses_that_break_their_rules_are_invalid_taken_ones_conflict_and_neither_writes() {
    unique_instance_field_refuses_bad_and_taken_values(InstanceField::Address);
}

#[test]
fn get_by_tag_finds_any_stored_tag_and_refuses_one_that_breaks_the_rules() {
    let f = Fixture::new();
    let (_, cluster) = f.owner("owner@bad-input.test");
    check(CASES, hostile_text(MAX_TAG_BYTES), |raw| {
        let Ok(tag) = Tag::parse(&raw) else {
            prop_assert_eq!(identifier(&raw, MAX_TAG_BYTES), None);
            return Ok(());
        };
        // Any spelling that normalises to a stored tag finds it: `" web-1 "` finds `web-1`.
        let lookup = f.instances.get_by_tag(&tag);
        let instance = match lookup.unwrap() {
            Some(found) => found,
            None => f.instances.create(&cluster.id, InstanceField::Tag.instance(tag.as_str())).unwrap(),
        };
        let found = f.instances.get_by_tag(&tag).unwrap().map(|found| found.id);
        prop_assert_eq!(found, Some(instance.id));
        Ok(())
    });
}

// ---------------------------------------------------------------- nonces

#[test]
fn nonces_that_break_their_rules_are_invalid_in_every_operation_and_write_nothing() {
    let f = Fixture::new();
    let (_, cluster) = f.owner("owner@bad-input.test");
    let instance = f.instances.create(&cluster.id, new_instance("10.8.0.1", "nonces")).unwrap();
    check(CASES, hostile_text(MAX_TAG_BYTES), |raw| {
        let expected = identifier(&raw, MAX_TAG_BYTES);
        let before = f.fingerprint();
        let nonce = match Nonce::parse(&raw) {
            Ok(nonce) => nonce,
            Err(error) => {
                // No operation can be called with it: the type is the check.
                prop_assert_eq!(invalid_field(&error), Some("nonce"), "{:?}", raw);
                prop_assert_eq!(expected, None, "refused {:?}", raw);
                return Ok(());
            }
        };
        prop_assert_eq!(Some(nonce.as_str()), expected.as_deref(), "{:?}", raw);
        match f.tokens.create(&instance.id, &nonce) {
            Ok(token) => {
                prop_assert_eq!(token.nonce.as_str(), nonce.as_str());
                prop_assert!(!f.tokens.is_used(&nonce).unwrap());
                prop_assert!(f.tokens.mark_used(&nonce).unwrap());
                prop_assert!(!f.tokens.mark_used(&nonce).unwrap());
            }
            Err(StoreError::Conflict { field: "nonce", .. }) => {
                prop_assert_eq!(f.fingerprint(), before);
                prop_assert!(f.tokens.is_used(&nonce).unwrap(), "issued earlier and used then");
            }
            Err(error) => prop_assert!(false, "{:?} refused: {}", nonce, error),
        }
        Ok(())
    });
}

// ---------------------------------------------------------------- cursors and offsets

/// Cursor text of every shape: random text, base64 of random bytes, and
/// well-formed base64 of a listing's kind (of `cluster`, of none, of a
/// misspelt one) with hostile parts.
fn hostile_cursor(cluster: &str) -> impl Strategy<Value = String> {
    let kind = prop::sample::select(vec![
        format!("members {cluster}"),
        format!("invites {cluster}"),
        format!("instances {cluster}"),
        "members".to_owned(),
        "Members".to_owned(),
        String::new(),
    ]);
    let number = prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        (-40_000i64..40_000).prop_map(|n| n.to_string()),
        (-300_000_000_000_000_000i64..300_000_000_000_000_000).prop_map(|n| n.to_string()),
        Just("1732752000000000".to_owned()),
        pieces(4),
    ];
    let part = prop_oneof![
        pieces(6),
        any::<String>(),
        "[a-z0-9@.]{1,20}",
        "[0-9A-Z]{26}",
        (pieces(3), prop::sample::select(&["\0", "\u{1}", "\r", "\u{85}"][..]))
            .prop_map(|(text, control)| format!("{text}{control}@x.io")),
    ];
    let encode = |kind: String, parts: Vec<String>| {
        URL_SAFE_NO_PAD.encode(std::iter::once(kind).chain(parts).collect::<Vec<_>>().join("\n"))
    };
    prop_oneof![
        2 => any::<String>(),
        2 => prop::collection::vec(any::<u8>(), 0..64).prop_map(|bytes| URL_SAFE_NO_PAD.encode(bytes)),
        2 => (kind.clone(), prop::collection::vec(prop_oneof![number.clone(), part.clone()], 0..4))
            .prop_map(move |(kind, parts)| encode(kind, parts)),
        6 => (kind, number, part).prop_map(move |(kind, number, part)| encode(kind, vec![number, part])),
    ]
}

#[test]
fn cursors_not_handed_out_by_a_listing_are_invalid_never_a_backend_error() {
    let f = Fixture::new();
    let (_, cluster) = f.owner("owner@bad-input.test");
    let emails: Vec<Email> = (0..5).map(|n| Email::parse(&format!("m{n}@bad-input.test")).unwrap()).collect();
    f.clusters.add_users(&cluster.id, &emails).unwrap();
    for n in 0..5 {
        f.instances.create(&cluster.id, new_instance(&format!("10.7.0.{n}"), &format!("page-{n}"))).unwrap();
    }
    let before = f.fingerprint();
    check(CASES, (hostile_cursor(&cluster.id.to_string()), any::<u32>()), |(text, limit)| {
        let page = Page::after(Cursor::new(text.clone()), limit);
        let results = [
            f.clusters.members(&cluster.id, &page).map(|paged| paged.items.len()),
            f.clusters.invites(&cluster.id, &page).map(|paged| paged.items.len()),
            f.instances.list_by_cluster(&cluster.id, &page).map(|paged| paged.items.len()),
        ];
        for result in results {
            match result {
                Ok(items) => prop_assert!(items <= 5),
                Err(error) => prop_assert_eq!(invalid_field(&error), Some("cursor"), "{:?}: {}", text, error),
            }
        }
        Ok(())
    });
    assert_eq!(f.fingerprint(), before, "listings wrote nothing");
}

#[test]
fn any_offset_and_limit_give_a_page_or_invalid_offset() {
    let f = Fixture::new();
    let (_, cluster) = f.owner("owner@bad-input.test");
    check(CASES, (any::<u64>(), any::<u32>()), |(offset, limit)| {
        let page = Page::offset(offset, limit);
        for result in [
            f.clusters.members(&cluster.id, &page).map(|paged| (paged.items.len(), paged.total)),
            f.instances.list_by_cluster(&cluster.id, &page).map(|paged| (paged.items.len(), paged.total)),
        ] {
            match result {
                Ok((items, _)) => prop_assert!(offset <= i64::MAX as u64 && items <= 1),
                Err(error) => {
                    prop_assert_eq!(invalid_field(&error), Some("offset"), "{}", error);
                    prop_assert!(offset > i64::MAX as u64);
                }
            }
        }
        Ok(())
    });
}

/// The cluster metadata a GitHub login id selects is a map key too: the
/// same text rule holds there.
#[test]
fn github_login_ids_that_break_their_rules_are_invalid() {
    let f = Fixture::new();
    check(CASES, hostile_text(255), |login_id| {
        let fits = acceptable(&login_id, 255, false);
        let integration = dployr_domain::GitHubIntegration { login_id: login_id.clone(), settings: Metadata::new() };
        match f.clusters.install_github_integration(integration) {
            Ok(found) => prop_assert!(fits && found.is_none(), "{:?}", login_id),
            Err(error) => {
                prop_assert_eq!(invalid_field(&error), Some("loginId"), "{}", error);
                prop_assert!(!fits, "refused {:?}: {}", login_id, error);
            }
        }
        Ok(())
    });
}

/// Settings `Metadata` accepts at its bound are refused once the store adds
/// their `loginId`, by an error that says so (it used to name a size the
/// caller never sent), before any statement.
#[test]
fn github_settings_at_the_metadata_bound_are_refused_naming_the_login_id_the_store_adds() {
    let f = Fixture::new();
    let filler = "x".repeat(MAX_METADATA_BYTES - r#"{"k": ""}"#.len());
    let mut map = serde_json::Map::new();
    map.insert("k".into(), serde_json::Value::String(filler));
    let settings = Metadata::from_map(map).expect("exactly at the bound");
    let integration = dployr_domain::GitHubIntegration { login_id: "4242".into(), settings };
    let error = f.clusters.install_github_integration(integration).unwrap_err();
    assert_eq!(invalid_field(&error), Some("metadata"), "{error}");
    assert!(error.to_string().contains("with the `loginId` entry the store adds"), "{error}");
}

/// More than PostgreSQL's protocol allows a statement's parameters (65 535,
/// a 16-bit count) if each listed user took four of them, or even one.
const LONGER_THAN_A_STATEMENT_HAS_PARAMETERS: usize = 70_000;

#[test]
fn every_write_that_takes_a_list_takes_one_longer_than_a_statement_has_parameters() {
    use dployr_domain::Role;

    let f = Fixture::new();
    let (owner, cluster) = f.owner("owner@example.io");
    let n = LONGER_THAN_A_STATEMENT_HAS_PARAMETERS;
    let emails: Vec<Email> = (0..n).map(|i| Email::parse(&format!("invitee-{i}@example.io")).unwrap()).collect();
    let invited = f.clusters.add_users(&cluster.id, &emails).unwrap();
    assert_eq!(invited.len(), n);
    assert!(invited.iter().all(|member| member.role == Role::Invited));
    let ids: Vec<_> = invited.iter().map(|member| member.user_id).collect();
    let viewers =
        ClusterPatch { roles: Some([(Role::Viewer, ids.clone())].into_iter().collect()), ..Default::default() };
    let updated = f.clusters.update(&cluster.id, viewers).unwrap().unwrap();
    assert_eq!(updated.with_role(Role::Viewer).len(), n);
    f.clusters.remove_users(&cluster.id, &ids).unwrap();
    let left = f.clusters.get(&cluster.id).unwrap().unwrap();
    assert_eq!(left.members.values().map(Vec::len).sum::<usize>(), 1);
    assert_eq!(f.count("SELECT count(*) FROM users"), 1, "the invitees who never signed in are forgotten");
    assert_eq!(f.clusters.owner(&cluster.id).unwrap().map(|m| m.user_id), Some(owner.id));
}

#[test]
fn roles_naming_thousands_of_unknown_users_are_not_found_naming_the_first_ten() {
    use dployr_domain::{Role, UserId};

    let f = Fixture::new();
    let (_, cluster) = f.owner("owner@example.io");
    let unknown: Vec<UserId> = (0..LONGER_THAN_A_STATEMENT_HAS_PARAMETERS).map(|_| UserId::generate()).collect();
    let before = f.fingerprint();
    let patch = ClusterPatch { roles: Some([(Role::Viewer, unknown)].into_iter().collect()), ..Default::default() };
    match f.clusters.update(&cluster.id, patch) {
        Err(StoreError::NotFound { entity: "user", key }) => {
            assert!(key.ends_with(&format!(" and {} more", LONGER_THAN_A_STATEMENT_HAS_PARAMETERS - 10)), "{key}");
            assert_eq!(key.matches(", ").count(), 9, "{key}");
        }
        other => panic!("expected the users not found, got {other:?}"),
    }
    assert_eq!(f.fingerprint(), before);
}

/// Text that does not compress (PostgreSQL compresses what it indexes).
fn random_hex(bytes: usize) -> String {
    use rand::Rng as _;
    let mut rng = rand::rng();
    (0..bytes / 2).map(|_| format!("{:02x}", rng.random::<u8>())).collect()
}

#[test]
fn github_keys_of_any_size_metadata_takes_are_stored_and_looked_up() {
    let f = Fixture::new();
    let (_, cluster) = f.owner("owner@example.io");
    // Far past a btree entry's 2704 bytes, within metadata's 64 KiB.
    let installation = random_hex(6_000);
    let metadata: Metadata =
        serde_json::from_value(json!({ "gitHub": { "loginId": "42", "installationId": installation } })).unwrap();
    let patch = ClusterPatch { metadata: Some(metadata), ..ClusterPatch::default() };
    let updated = f.clusters.update(&cluster.id, patch).unwrap().unwrap();
    assert_eq!(updated.metadata.as_map()["gitHub"]["installationId"], json!(installation));
    let settings: Metadata = serde_json::from_value(json!({ "installationId": random_hex(5_000) })).unwrap();
    let integration = dployr_domain::GitHubIntegration { login_id: "42".into(), settings };
    let found = f.clusters.install_github_integration(integration).unwrap().expect("the linked cluster");
    assert_eq!(found.id, cluster.id);
    let long_login = random_hex(4_000);
    let metadata: Metadata = serde_json::from_value(json!({ "gitHub": { "loginId": long_login } })).unwrap();
    let patch = ClusterPatch { metadata: Some(metadata), ..ClusterPatch::default() };
    f.clusters.update(&cluster.id, patch).unwrap().unwrap();
}

/// Records deserialized from JSON (a cache, another service's answer) hold
/// metadata and e-mails no write checked (`Metadata::from_stored`,
/// `Email::from_stored`). Given back to a write or a lookup, what breaks a
/// rule is refused as invalid input, by name where the store can name it,
/// never as a failure of the backend, and nothing is written.
#[test]
fn unchecked_metadata_and_emails_from_records_are_invalid_input_and_nothing_is_written() {
    let f = Fixture::new();
    let (user, cluster) = f.owner("records@example.io");
    let instance = f
        .instances
        .create(
            &cluster.id,
            NewInstance {
                address: Address::parse("10.9.8.7").unwrap(),
                tag: Tag::parse("records").unwrap(),
                metadata: None,
            },
        )
        .unwrap();
    let unchecked = [
        json!({ "k": "a\u{0}b" }),
        json!({ "a\u{0}": 1 }),
        nested(MAX_METADATA_DEPTH + 70, json!(1)),
        json!({ "big": 1e16 }),
        json!({ "long": "x".repeat(MAX_METADATA_BYTES) }),
    ];
    let before = f.fingerprint();
    for value in unchecked {
        let metadata = Metadata::from_stored(value);
        let shown = format!("{:.60}", serde_json::to_string(&metadata).unwrap());
        let new_user = NewUser { metadata: Some(metadata.clone()), ..NewUser::new(fresh_email(), Provider::Github) };
        let user_patch = UserPatch { metadata: Some(metadata.clone()), ..UserPatch::default() };
        let cluster_patch = ClusterPatch { metadata: Some(metadata.clone()), ..ClusterPatch::default() };
        let new_instance = NewInstance {
            address: Address::parse("10.9.8.6").unwrap(),
            tag: Tag::parse("records-2").unwrap(),
            metadata: Some(metadata.clone()),
        };
        let results = [
            ("users.upsert", f.users.upsert(new_user).map(drop)),
            ("users.update", f.users.update(&user.email, user_patch).map(drop)),
            ("clusters.update", f.clusters.update(&cluster.id, cluster_patch).map(drop)),
            ("instances.create", f.instances.create(&cluster.id, new_instance).map(drop)),
            ("instances.update_metadata", f.instances.update_metadata(&instance.id, metadata).map(drop)),
        ];
        for (write, result) in results {
            let error = result.expect_err(write);
            assert_eq!(invalid_field(&error), Some("metadata"), "{write} of {shown}: {error}");
        }
    }
    assert_eq!(f.fingerprint(), before);
    // An e-mail with a NUL, looking a user up: refused by name.
    let with_nul = Email::from_stored("a\u{0}b@example.io".into());
    let error = f.users.get_by_email(&with_nul).unwrap_err();
    assert_eq!(invalid_field(&error), Some("email"), "{error}");
    let error = f.users.update(&with_nul, UserPatch::default()).unwrap_err();
    assert_eq!(invalid_field(&error), Some("email"), "{error}");
    // Addresses Email::parse would not give back as they are: written, each
    // would be a second account beside the normalised one, or one nobody
    // can sign in with.
    for unnormalised in [
        "Records@example.io",
        "records\u{200b}@example.io",
        "cafe\u{301}@example.io",
        "a@b\u{fc}cher.de",
        "a@b",
        "\u{3000}@example.io",
        " records@example.io",
    ] {
        let email = Email::from_stored(unnormalised.into());
        let upserted = f.users.upsert(NewUser::new(email.clone(), Provider::Github)).map(drop);
        let invited = f.clusters.add_users(&cluster.id, &[fresh_email(), email]).map(drop);
        for (write, result) in [("users.upsert", upserted), ("clusters.add_users", invited)] {
            let error = result.expect_err(write);
            assert_eq!(invalid_field(&error), Some("email"), "{write} of {unnormalised:?}: {error}");
        }
    }
    assert_eq!(f.fingerprint(), before);
}
