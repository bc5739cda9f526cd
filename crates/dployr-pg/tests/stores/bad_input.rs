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
    BootstrapTokenStore, ClusterPatch, ClusterStore, Cursor, Email, InstanceStore, MAX_ADDRESS_BYTES,
    MAX_CLUSTER_NAME_BYTES, MAX_EMAIL_BYTES, MAX_METADATA_BYTES, MAX_TAG_BYTES, MAX_USER_TEXT_BYTES, Metadata,
    NewInstance, NewUser, Page, Provider, StoreError, UserPatch, UserStore,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{Value, json};

use crate::fixture::Fixture;

const CASES: u32 = 1000;

/// Runs `property` over `CASES` values of `strategy`, shrinking a failure
/// to its smallest input. Cases share one database, so each one picks
/// names of its own where it needs fresh rows.
fn check<S: Strategy>(cases: u32, strategy: S, property: impl Fn(S::Value) -> Result<(), TestCaseError>) {
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

/// The rule of a free-text field, stated independently of `text::check`.
fn acceptable(text: &str, max_bytes: usize, blank_allowed: bool) -> bool {
    (blank_allowed || !text.trim().is_empty()) && text.len() <= max_bytes && !text.chars().any(char::is_control)
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
        2 => any::<String>(),
        1 => (240usize..260, 1usize..8).prop_map(|(local, domain)| format!("{}@{}", "A".repeat(local), "b".repeat(domain))),
    ]
}

/// The e-mail rule: trimmed and lower-cased, at most 254 bytes, no
/// whitespace or control character, exactly one `@` with text both sides.
fn normalised_email(raw: &str) -> Option<String> {
    let email = raw.trim().to_lowercase();
    let ok = email.len() <= MAX_EMAIL_BYTES
        && !email.chars().any(|c| c.is_whitespace() || c.is_control())
        && email.matches('@').count() == 1
        && !email.starts_with('@')
        && !email.ends_with('@');
    ok.then_some(email)
}

#[test]
fn hostile_emails_are_invalid_or_stored_normalised_and_found_whatever_their_case() {
    let f = Fixture::new();
    check(CASES, hostile_email(), |raw| {
        let expected = normalised_email(&raw);
        match Email::parse(&raw) {
            Err(error) => {
                prop_assert_eq!(invalid_field(&error), Some("email"), "{:?} -> {}", raw, error);
                prop_assert_eq!(expected, None, "{:?} was refused: {}", raw, error);
            }
            Ok(email) => {
                prop_assert_eq!(Some(email.as_str().to_owned()), expected);
                let user = f.users.upsert(NewUser::new(email.clone(), Provider::Email)).unwrap();
                prop_assert_eq!(&user.email, &email);
                prop_assert_eq!(user.name.as_str(), email.local_part());
                let shouted = Email::parse(&format!("  {}\t", raw.to_ascii_uppercase())).unwrap();
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

#[test]
fn metadata_that_breaks_its_rules_is_invalid_and_accepted_metadata_round_trips() {
    let f = Fixture::new();
    check(CASES, hostile_metadata(), |value| {
        let size = serde_json::to_vec(&value).unwrap().len();
        let acceptable = value.is_object() && !holds_nul(&value) && size <= MAX_METADATA_BYTES;
        match Metadata::try_from(value.clone()) {
            Err(error) => {
                prop_assert_eq!(invalid_field(&error), Some("metadata"), "{}", error);
                prop_assert!(!acceptable, "refused: {}", error);
            }
            Ok(metadata) => {
                prop_assert!(acceptable, "accepted {} bytes, object: {}", size, value.is_object());
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
    check(CASES, hostile_text(MAX_USER_TEXT_BYTES), |name| {
        let fits_user = acceptable(&name, MAX_USER_TEXT_BYTES, false);
        let fits_cluster = acceptable(&name, MAX_CLUSTER_NAME_BYTES, false);
        let before = f.fingerprint();

        let new = NewUser { name: Some(name.clone()), ..NewUser::new(fresh_email(), Provider::Microsoft) };
        match f.users.upsert(new) {
            Ok(user) => {
                prop_assert!(fits_user, "accepted {:?}", name);
                prop_assert_eq!(&f.users.get(&user.id).unwrap().unwrap().name, &name);
            }
            Err(error) => {
                prop_assert_eq!(invalid_field(&error), Some("name"), "{}", error);
                prop_assert!(!fits_user, "refused {:?}: {}", name, error);
                prop_assert_eq!(f.fingerprint(), before.clone());
            }
        }

        let before = f.fingerprint();
        let patch = UserPatch { name: Some(name.clone()), ..UserPatch::default() };
        match f.users.update(&owner.email, patch) {
            Ok(updated) => prop_assert_eq!(updated.map(|user| user.name), Some(name.clone())),
            Err(error) => {
                prop_assert_eq!(invalid_field(&error), Some("name"), "{}", error);
                prop_assert!(!fits_user, "refused {:?}: {}", name, error);
                prop_assert_eq!(f.fingerprint(), before);
            }
        }

        let before = f.fingerprint();
        let patch = ClusterPatch { name: Some(name.clone()), ..ClusterPatch::default() };
        match f.clusters.update(&cluster.id, patch) {
            Ok(updated) => {
                prop_assert!(fits_cluster, "accepted {:?}", name);
                prop_assert_eq!(updated.map(|cluster| cluster.name), Some(name.clone()));
            }
            Err(error) => {
                prop_assert_eq!(invalid_field(&error), Some("name"), "{}", error);
                prop_assert!(!fits_cluster, "refused {:?}: {}", name, error);
                prop_assert_eq!(f.fingerprint(), before);
            }
        }
        Ok(())
    });
}

// ---------------------------------------------------------------- tags and addresses

fn new_instance(address: String, tag: String) -> NewInstance {
    NewInstance { address, tag, metadata: None }
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

    /// A new instance with `value` in this field and a fresh value in the other.
    fn instance(self, value: &str) -> NewInstance {
        match self {
            Self::Tag => new_instance(fresh("10.9.0."), value.to_owned()),
            Self::Address => new_instance(value.to_owned(), fresh("tag-")),
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
    check(CASES, hostile_text(field.max_bytes()), |value| {
        let fits = acceptable(&value, field.max_bytes(), false);
        let taken = fits && field.taken(&f, &value);
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
    check(CASES, hostile_text(MAX_TAG_BYTES), |tag| {
        let lookup = f.instances.get_by_tag(&tag);
        if !acceptable(&tag, MAX_TAG_BYTES, false) {
            prop_assert_eq!(lookup.map_err(|error| invalid_field(&error)).map(|_| ()), Err(Some("tag")));
            return Ok(());
        }
        let instance = match lookup.unwrap() {
            Some(found) => found,
            None => f.instances.create(&cluster.id, InstanceField::Tag.instance(&tag)).unwrap(),
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
    let instance = f.instances.create(&cluster.id, new_instance("10.8.0.1".into(), "nonces".into())).unwrap();
    check(CASES, hostile_text(MAX_TAG_BYTES), |nonce| {
        let fits = acceptable(&nonce, MAX_TAG_BYTES, false);
        let before = f.fingerprint();
        if !fits {
            for result in [
                f.tokens.create(&instance.id, &nonce).map(|_| ()),
                f.tokens.mark_used(&nonce).map(|_| ()),
                f.tokens.is_used(&nonce).map(|_| ()),
            ] {
                let error = result.err().map(|error| invalid_field(&error));
                prop_assert_eq!(error, Some(Some("nonce")), "{:?}", nonce);
            }
            prop_assert_eq!(f.fingerprint(), before);
            return Ok(());
        }
        match f.tokens.create(&instance.id, &nonce) {
            Ok(token) => {
                prop_assert_eq!(&token.nonce, &nonce);
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
/// well-formed base64 of a listing's kind with hostile parts.
fn hostile_cursor() -> impl Strategy<Value = String> {
    let kind = prop::sample::select(&["members", "invites", "instances", "Members", ""][..]);
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
    let encode = |kind: &str, parts: Vec<String>| {
        URL_SAFE_NO_PAD.encode(std::iter::once(kind.to_owned()).chain(parts).collect::<Vec<_>>().join("\n"))
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
        f.instances.create(&cluster.id, new_instance(format!("10.7.0.{n}"), format!("page-{n}"))).unwrap();
    }
    let before = f.fingerprint();
    check(CASES, (hostile_cursor(), any::<u32>()), |(text, limit)| {
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
