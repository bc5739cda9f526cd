//! The key-value conformance suite: plain functions that take a backend
//! fixture and prove the contract of `KvBackend` (and of `KvStore` on top).
//! Every backend's test file calls every function through
//! [`kv_contract_tests!`](crate::kv_contract_tests), so a new backend
//! proves itself by naming a fixture, and no backend gets a private copy.
//!
//! **Guarantees.** Backends differ in what they promise beyond the API
//! ([`Guarantees`]): read-your-writes (a read right after a write sees it),
//! an atomic `take` (of many concurrent takes exactly one gets the value)
//! and an exact `increment` (concurrent increments all return distinct
//! numbers). Each fixture states which hold, and the suite checks exactly
//! those: a guarantee a backend does not make is not tested on it (the
//! Cloudflare tests show instead that the emulator breaks it, as Cloudflare
//! does). The other functions test the API itself; on Cloudflare they run
//! against the emulator with its stale reads switched off.
//!
//! Time is moved by the fixture ([`KvFixture::advance`]): the memory
//! backend's clock, the emulator's clock, or PostgreSQL's `expires_at`
//! shifted back; nothing sleeps. TTLs in the suite are at least 120 s, which
//! every backend accepts (Cloudflare's minimum is 60 s), and checks stay
//! 30 s or more away from an expiry, so whole-second backends never race
//! the boundary.

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use chrono::Utc;
use dployr_domain::{
    ClusterId, ClusterSummary, Email, KvBackend, MAX_TTL, Metadata, Provider, StoreError, User, UserId,
};
use dployr_kv::{Clock, KvStore, OAuthState, SessionId};

/// What a backend promises beyond its API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Guarantees {
    /// A read right after a write, put or delete, in the same process sees it.
    pub read_your_writes: bool,
    /// Of many concurrent `take`s of one key, exactly one gets the value.
    pub atomic_take: bool,
    /// Concurrent `increment`s of one key return distinct, consecutive numbers.
    pub exact_increment: bool,
}

impl Guarantees {
    /// Every guarantee: memory and PostgreSQL.
    pub const ALL: Self = Self { read_your_writes: true, atomic_take: true, exact_increment: true };
    /// None of them: Cloudflare Workers KV (reads up to 60 s stale, no
    /// atomic operations).
    pub const NONE: Self = Self { read_your_writes: false, atomic_take: false, exact_increment: false };
}

/// A backend under test and a way to move its time forward.
pub trait KvFixture {
    /// The backend.
    fn kv(&self) -> Arc<dyn KvBackend>;
    /// Moves the backend's notion of now forward by `by`.
    fn advance(&self, by: Duration);
    /// What the backend promises; the suite checks exactly these.
    fn guarantees(&self) -> Guarantees;
    /// The clock a store that keeps time of its own over this backend
    /// (`KvSessionStore`'s memory of its recent writes) reads, moved by
    /// [`advance`](Self::advance) with the backend's; `None` (the default):
    /// the system clock, for a backend on which such a store keeps none.
    fn clock(&self) -> Option<Arc<dyn Clock>> {
        None
    }
}

/// How many threads the concurrency checks run on.
pub const THREADS: usize = 32;

/// Runs `work(i)` for `0..n` on [`THREADS`] threads released together.
pub fn in_parallel<T: Send>(n: usize, work: impl Fn(usize) -> T + Sync) -> Vec<T> {
    in_parallel_on(THREADS, n, work)
}

/// Runs `work(i)` for `0..n` on `threads` threads released together.
pub fn in_parallel_on<T: Send>(threads: usize, n: usize, work: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let barrier = Barrier::new(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (barrier, work) = (&barrier, &work);
                scope.spawn(move || {
                    barrier.wait();
                    (t..n).step_by(threads).map(work).collect::<Vec<T>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| match h.join() {
                Ok(results) => results,
                Err(panic) => std::panic::resume_unwind(panic),
            })
            .collect()
    })
}

/// The value of `result`, or a panic naming `what` and the error.
#[track_caller]
pub fn ok<T>(result: Result<T, StoreError>, what: &str) -> T {
    match result {
        Ok(value) => value,
        Err(error) => panic!("{what}: {error:?}"),
    }
}

/// Asserts that `result` is `StoreError::Invalid` on `field`.
#[track_caller]
pub fn assert_invalid<T: Debug>(result: Result<T, StoreError>, field: &str) {
    match result {
        Err(StoreError::Invalid { field: got, .. }) if got == field => {}
        other => panic!("expected Invalid on {field}, got {other:?}"),
    }
}

const TTL: Duration = Duration::from_secs(120);

/// Every live key under `prefix`, page by page; also checks each page's size.
pub fn list_all(kv: &dyn KvBackend, prefix: &str, limit: usize) -> (Vec<String>, usize) {
    let mut keys = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let page = ok(kv.list(prefix, limit, cursor.as_deref()), "list");
        pages += 1;
        assert!(page.keys.len() <= limit, "a page of {} keys for limit {limit}", page.keys.len());
        keys.extend(page.keys);
        match page.cursor {
            Some(next) => cursor = Some(next),
            None => return (keys, pages),
        }
        assert!(pages < 10_000, "list never ended");
    }
}

/// A user to put in a session.
pub fn sample_user(n: u32) -> User {
    User {
        id: UserId::generate(),
        email: ok(Email::parse(&format!("user{n}@example.com")), "email"),
        name: format!("User {n}"),
        picture: None,
        provider: Provider::Github,
        metadata: Metadata::new(),
        created_at: Utc::now(),
        updated_at: Utc::now(),
    }
}

/// Clusters to put in a session.
pub fn sample_clusters() -> Vec<ClusterSummary> {
    vec![ClusterSummary { id: ClusterId::generate(), name: "acme".into(), owner_name: Some("Ada".into()) }]
}

/// put, get, overwrite, delete, and deleting a missing key.
pub fn put_get_delete(f: &dyn KvFixture) {
    let kv = f.kv();
    assert_eq!(ok(kv.get("pgd/missing"), "get missing"), None);
    ok(kv.put("pgd/a", b"one", None), "put");
    assert_eq!(ok(kv.get("pgd/a"), "get"), Some(b"one".to_vec()));
    ok(kv.put("pgd/a", b"two", None), "overwrite");
    assert_eq!(ok(kv.get("pgd/a"), "get after overwrite"), Some(b"two".to_vec()));
    ok(kv.delete("pgd/a"), "delete");
    assert_eq!(ok(kv.get("pgd/a"), "get after delete"), None);
    ok(kv.delete("pgd/a"), "deleting a missing key is not an error");
}

/// An entry with a TTL is there before it and gone after it, from get,
/// list and take; an entry without a TTL stays.
pub fn entries_expire_after_their_ttl(f: &dyn KvFixture) {
    let kv = f.kv();
    ok(kv.put("ttl/short", b"v", Some(TTL)), "put with ttl");
    ok(kv.put("ttl/forever", b"v", None), "put without ttl");
    f.advance(TTL / 2);
    assert_eq!(ok(kv.get("ttl/short"), "get before expiry"), Some(b"v".to_vec()));
    f.advance(TTL / 2 + Duration::from_secs(30));
    assert_eq!(ok(kv.get("ttl/short"), "get after expiry"), None);
    assert_eq!(ok(kv.take("ttl/short"), "take after expiry"), None);
    assert_eq!(list_all(kv.as_ref(), "ttl/", 10).0, vec!["ttl/forever".to_owned()]);
    assert_eq!(ok(kv.get("ttl/forever"), "entry without ttl"), Some(b"v".to_vec()));
}

/// Overwriting an entry without a TTL makes it permanent; with a new TTL,
/// the new one counts.
pub fn overwrite_replaces_the_ttl(f: &dyn KvFixture) {
    let kv = f.kv();
    ok(kv.put("ttl2/a", b"1", Some(TTL)), "put");
    ok(kv.put("ttl2/a", b"2", None), "overwrite without ttl");
    ok(kv.put("ttl2/b", b"1", None), "put");
    ok(kv.put("ttl2/b", b"2", Some(TTL)), "overwrite with ttl");
    f.advance(TTL + Duration::from_secs(30));
    assert_eq!(ok(kv.get("ttl2/a"), "get a"), Some(b"2".to_vec()));
    assert_eq!(ok(kv.get("ttl2/b"), "get b"), None);
}

/// `replace` writes only over a live value: a missing key and an expired
/// one are left without a value (and `false` comes back); a live one takes
/// the new value and the new TTL, which counts from the replace, or none.
pub fn replace_writes_only_over_a_live_value(f: &dyn KvFixture) {
    let kv = f.kv();
    assert!(!ok(kv.replace("repl/missing", b"new", Some(TTL)), "replace missing"));
    assert_eq!(ok(kv.get("repl/missing"), "get missing"), None, "a replace of a missing key wrote it");
    ok(kv.put("repl/expiring", b"old", Some(TTL)), "put expiring");
    ok(kv.put("repl/longer", b"old", Some(TTL)), "put longer");
    ok(kv.put("repl/forever", b"old", None), "put forever");
    ok(kv.put("repl/ending", b"old", Some(TTL)), "put ending");
    f.advance(TTL / 2);
    // At 60 s: `longer` and `forever` get a TTL that ends at 180 s, `ending` none.
    assert!(ok(kv.replace("repl/longer", b"new", Some(TTL)), "replace longer"));
    assert!(ok(kv.replace("repl/forever", b"new", Some(TTL)), "replace forever"));
    assert!(ok(kv.replace("repl/ending", b"new", None), "replace ending"));
    assert_eq!(ok(kv.get("repl/longer"), "get longer"), Some(b"new".to_vec()));
    f.advance(TTL / 2 + Duration::from_secs(30));
    // At 150 s: the values put with a TTL at 0 s would be gone.
    assert!(!ok(kv.replace("repl/expiring", b"new", Some(TTL)), "replace expired"));
    assert_eq!(ok(kv.get("repl/expiring"), "get expired"), None, "a replace of an expired key wrote it");
    assert_eq!(ok(kv.get("repl/longer"), "get longer at 150 s"), Some(b"new".to_vec()), "the old TTL still counts");
    assert_eq!(ok(kv.get("repl/forever"), "get forever at 150 s"), Some(b"new".to_vec()));
    assert_eq!(ok(kv.get("repl/ending"), "get ending at 150 s"), Some(b"new".to_vec()), "the old TTL still counts");
    f.advance(TTL / 2);
    // At 210 s: the TTL given by the replace has passed.
    assert_eq!(ok(kv.get("repl/longer"), "get longer at 210 s"), None, "the new TTL did not count");
    assert_eq!(ok(kv.get("repl/forever"), "get forever at 210 s"), None, "the new TTL did not count");
    assert_eq!(ok(kv.get("repl/ending"), "get ending at 210 s"), Some(b"new".to_vec()), "replaced without a TTL");
    assert_eq!(list_all(kv.as_ref(), "repl/", 10).0, vec!["repl/ending".to_owned()]);
}

/// `replace` refuses a bad key, a value too large and a TTL out of range
/// as `put` does, before anything is written: the live value stays.
pub fn replace_refuses_what_put_refuses_before_writing(f: &dyn KvFixture) {
    let kv = f.kv();
    let limits = kv.limits();
    ok(kv.put("repl-bad/k", b"kept", None), "put");
    assert_invalid(kv.replace("repl-bad/k", b"v", Some(Duration::ZERO)), "ttl");
    if limits.min_ttl > Duration::from_millis(1) {
        assert_invalid(kv.replace("repl-bad/k", b"v", Some(limits.min_ttl - Duration::from_secs(1))), "ttl");
    }
    assert_invalid(kv.replace("repl-bad/k", b"v", Some(MAX_TTL + Duration::from_secs(1))), "ttl");
    assert_invalid(kv.replace("repl-bad/k", &vec![0u8; limits.max_value_bytes + 1], None), "value");
    assert_eq!(ok(kv.get("repl-bad/k"), "get"), Some(b"kept".to_vec()), "a refused replace wrote");
    let long = "k".repeat(513);
    for key in ["", ".", "..", long.as_str(), "nul\0byte"] {
        assert_invalid(kv.replace(key, b"v", None), "key");
    }
    assert_eq!(list_all(kv.as_ref(), "", 1000).0, vec!["repl-bad/k".to_owned()]);
}

/// Where promised: a delete racing replaces of one key wins for good. In
/// each round a live key is deleted on one thread while the others replace
/// it: each replace lands before the delete (and is deleted with the
/// value) or after it (and finds nothing), so the key is always gone at
/// the end. A replace that checks, lets the delete in, then writes brings
/// the key back. Then, with the delete done first, every replace finds
/// nothing.
pub fn a_delete_racing_replaces_wins_where_promised(f: &dyn KvFixture) {
    if !(f.guarantees().atomic_take && f.guarantees().exact_increment) {
        return;
    }
    let kv = f.kv();
    for round in 0..50 {
        let key = format!("repl-race/{round}");
        ok(kv.put(&key, b"live", Some(TTL)), "put");
        let results = in_parallel_on(8, 8, |n| {
            if n == 0 {
                ok(kv.delete(&key), "delete");
                None
            } else {
                Some(ok(kv.replace(&key, format!("v{n}").as_bytes(), Some(TTL)), "replace"))
            }
        });
        assert_eq!(ok(kv.get(&key), "get"), None, "round {round}: a replace brought back a deleted key: {results:?}");
    }
    ok(kv.put("repl-race/after", b"live", Some(TTL)), "put");
    ok(kv.delete("repl-race/after"), "delete");
    let replaced =
        in_parallel(THREADS, |n| ok(kv.replace("repl-race/after", format!("v{n}").as_bytes(), None), "replace"));
    assert!(replaced.iter().all(|replaced| !replaced), "a replace after the delete wrote");
    assert_eq!(ok(kv.get("repl-race/after"), "get after"), None);
}

/// A zero TTL, one below the backend's minimum and one above the maximum
/// are refused, and nothing is written.
pub fn ttl_out_of_range_is_invalid(f: &dyn KvFixture) {
    let kv = f.kv();
    let limits = kv.limits();
    assert_invalid(kv.put("ttlbad", b"v", Some(Duration::ZERO)), "ttl");
    if limits.min_ttl > Duration::from_millis(1) {
        assert_invalid(kv.put("ttlbad", b"v", Some(limits.min_ttl - Duration::from_secs(1))), "ttl");
    }
    assert_invalid(kv.put("ttlbad", b"v", Some(MAX_TTL + Duration::from_secs(1))), "ttl");
    assert_invalid(kv.increment("ttlbad", Some(Duration::ZERO)), "ttl");
    assert_eq!(ok(kv.get("ttlbad"), "get"), None);
}

/// Empty, `.`, `..`, over-long and NUL-holding keys are refused by every
/// operation before anything is written.
pub fn bad_keys_are_invalid(f: &dyn KvFixture) {
    let kv = f.kv();
    let long = "k".repeat(513);
    for key in ["", ".", "..", long.as_str(), "nul\0byte"] {
        assert_invalid(kv.put(key, b"v", None), "key");
        assert_invalid(kv.get(key), "key");
        assert_invalid(kv.delete(key), "key");
        assert_invalid(kv.take(key), "key");
        assert_invalid(kv.increment(key, None), "key");
    }
    assert_eq!(list_all(kv.as_ref(), "", 1000).0, Vec::<String>::new());
}

/// The bulk calls answer as the single ones do: values in the order of the
/// keys asked (missing and expired keys `None`, unusual keys included),
/// every key removed, a missing key no error, and a bad key refused before
/// anything is read or removed.
pub fn bulk_reads_and_deletes_answer_as_single_calls(f: &dyn KvFixture) {
    let kv = f.kv();
    let keys: Vec<String> =
        (0..130).map(|i| if i % 10 == 3 { format!("bulk/odd {i}/ключ?%") } else { format!("bulk/{i:03}") }).collect();
    for (i, key) in keys.iter().enumerate() {
        if i % 3 != 0 {
            ok(kv.put(key, format!("v{i}").as_bytes(), Some(if i % 3 == 1 { TTL } else { TTL * 10 })), key);
        }
    }
    f.advance(TTL + Duration::from_secs(30));
    let values = ok(kv.get_many(&keys), "get_many");
    assert_eq!(values.len(), keys.len());
    for (i, (key, value)) in keys.iter().zip(&values).enumerate() {
        let expected = (i % 3 == 2).then(|| format!("v{i}").into_bytes());
        assert_eq!(value, &expected, "{key}");
    }
    assert_eq!(ok(kv.get_many(&[]), "get_many of nothing"), Vec::<Option<Vec<u8>>>::new());
    let with_a_bad_key = vec!["bulk/002".to_owned(), String::new()];
    assert_invalid(kv.get_many(&with_a_bad_key), "key");
    assert_invalid(kv.delete_many(&with_a_bad_key), "key");
    assert!(ok(kv.get("bulk/002"), "get").is_some(), "a refused delete_many removed a key");
    ok(kv.delete_many(&keys), "delete_many");
    assert!(ok(kv.get_many(&keys), "get_many after delete_many").iter().all(Option::is_none));
    ok(kv.delete_many(&keys), "delete_many of missing keys");
}

/// Keys with spaces, slashes, `%`, unicode, URL syntax and exactly 512
/// bytes round-trip through put, get, list and delete.
pub fn unusual_keys_round_trip(f: &dyn KvFixture) {
    let kv = f.kv();
    let max = format!("odd/{}", "é".repeat(254)); // 4 + 508 = 512 bytes
    assert_eq!(max.len(), 512);
    let keys = [
        "odd/with space",
        "odd/a/b/c",
        "odd/100%",
        "odd/%2F%20",
        "odd/ключ-日本-🎉",
        "odd/?x=y&z=1#frag",
        "odd/+plus",
        "odd/back\\slash",
        max.as_str(),
    ];
    for (i, key) in keys.iter().enumerate() {
        ok(kv.put(key, format!("v{i}").as_bytes(), None), key);
    }
    for (i, key) in keys.iter().enumerate() {
        assert_eq!(ok(kv.get(key), key), Some(format!("v{i}").into_bytes()), "{key}");
    }
    let expected: BTreeSet<String> = keys.iter().map(|k| (*k).to_owned()).collect();
    let listed: BTreeSet<String> = list_all(kv.as_ref(), "odd/", 10).0.into_iter().collect();
    assert_eq!(listed, expected);
    for key in keys {
        ok(kv.delete(key), key);
        assert_eq!(ok(kv.get(key), key), None, "{key}");
    }
}

/// An empty value, a 1 MiB value holding every byte, and a value at the
/// limit round-trip; one byte more is refused.
pub fn empty_and_large_values_round_trip(f: &dyn KvFixture) {
    let kv = f.kv();
    ok(kv.put("val/empty", b"", None), "put empty");
    assert_eq!(ok(kv.get("val/empty"), "get empty"), Some(Vec::new()));
    let large: Vec<u8> = (0..1024 * 1024).map(|i: u32| (i % 251) as u8).collect();
    ok(kv.put("val/large", &large, None), "put 1 MiB");
    assert_eq!(ok(kv.get("val/large"), "get 1 MiB"), Some(large));
    // Exactly at the limit: where the backend's own check meets the store's
    // (PostgreSQL's CHECK on the column, Cloudflare's 25 MiB).
    let at_limit = vec![7u8; kv.limits().max_value_bytes];
    ok(kv.put("val/at-limit", &at_limit, None), "put at the limit");
    assert_eq!(ok(kv.get("val/at-limit"), "get at the limit").map(|v| v.len()), Some(at_limit.len()));
    ok(kv.delete("val/at-limit"), "delete at the limit");
    let too_large = vec![0u8; kv.limits().max_value_bytes + 1];
    assert_invalid(kv.put("val/too-large", &too_large, None), "value");
    assert_eq!(ok(kv.get("val/too-large"), "get"), None);
}

/// Listing by prefix walks several cursor pages, in byte order, and never
/// returns a key outside the prefix (`LIKE` wildcards in it are literal).
pub fn list_by_prefix_across_cursor_pages(f: &dyn KvFixture) {
    let kv = f.kv();
    let mut expected: Vec<String> = (0..25).map(|i| format!("page/{i:02}")).collect();
    for key in &expected {
        ok(kv.put(key, b"v", None), key);
    }
    for decoy in ["pagf/0", "pag", "page", "other/page/1", "Page/1"] {
        ok(kv.put(decoy, b"v", None), decoy);
    }
    let (keys, pages) = list_all(kv.as_ref(), "page/", 10);
    expected.sort();
    assert_eq!(keys, expected);
    assert!(pages >= 3, "25 keys in pages of 10 took {pages} pages");

    for key in ["w%c/1", "w%c/2", "wXc/3", "w_c/4", "w\\c/5"] {
        ok(kv.put(key, b"v", None), key);
    }
    assert_eq!(list_all(kv.as_ref(), "w%c/", 10).0, vec!["w%c/1".to_owned(), "w%c/2".to_owned()]);
    assert_eq!(list_all(kv.as_ref(), "w_c/", 10).0, vec!["w_c/4".to_owned()]);
    assert_eq!(list_all(kv.as_ref(), "w\\c/", 10).0, vec!["w\\c/5".to_owned()]);
}

/// Keys come back sorted by their UTF-8 bytes (upper case before lower
/// case, ASCII before other scripts), whatever the database's collation.
pub fn list_is_in_utf8_byte_order(f: &dyn KvFixture) {
    let kv = f.kv();
    for key in ["ord/é", "ord/a", "ord/Z", "ord/B", "ord/ä", "ord/_", "ord/1"] {
        ok(kv.put(key, b"v", None), key);
    }
    let (keys, _) = list_all(kv.as_ref(), "ord/", 1000);
    let mut by_bytes = keys.clone();
    by_bytes.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    assert_eq!(keys, by_bytes);
    assert_eq!(keys.first().map(String::as_str), Some("ord/1"));
}

/// A list limit outside the backend's range is refused.
pub fn list_limit_out_of_range_is_invalid(f: &dyn KvFixture) {
    let kv = f.kv();
    let limits = kv.limits();
    assert_invalid(kv.list("", 0, None), "limit");
    assert_invalid(kv.list("", limits.max_list_limit + 1, None), "limit");
    assert!(kv.list("", limits.min_list_limit.max(1), None).is_ok());
}

/// A `list` prefix or cursor no key can match (a NUL byte, or a prefix
/// longer than any key) is refused as `Invalid` naming the argument, the
/// same on every backend, never sent on (PostgreSQL cannot receive a NUL in
/// text) and never an empty page.
pub fn list_prefix_and_cursor_with_refused_characters_are_invalid(f: &dyn KvFixture) {
    let kv = f.kv();
    ok(kv.put("nul/a", b"v", None), "put");
    let limit = kv.limits().min_list_limit.max(10);
    let too_long = "p".repeat(kv.limits().max_key_bytes + 1);
    for prefix in ["\0", "nul/\0", "\0nul/", too_long.as_str()] {
        assert_invalid(kv.list(prefix, limit, None), "prefix");
    }
    for cursor in ["\0", "nul/a\0", "\0nul/a"] {
        assert_invalid(kv.list("nul/", limit, Some(cursor)), "cursor");
    }
    assert_eq!(list_all(kv.as_ref(), "nul/", limit).0, vec!["nul/a".to_owned()]);
}

/// `KvStore` names the caller's argument, not the backend's `value`, when
/// what it is given is too large to store.
pub fn kv_store_names_the_argument_that_is_too_large(f: &dyn KvFixture) {
    let kv = f.kv();
    let store = KvStore::new(Arc::clone(&kv));
    let max = kv.limits().max_value_bytes;
    let state = OAuthState::generate();
    assert_invalid(store.create_state(&state, &"u".repeat(max + 1)), "redirect_url");
    assert_eq!(ok(store.validate_state(&state), "validate"), None);
    let name = "n".repeat(max / 2 + 1);
    let clusters =
        (0..2).map(|_| ClusterSummary { id: ClusterId::generate(), name: name.clone(), owner_name: None }).collect();
    assert_invalid(store.create_session(&SessionId::generate(), &sample_user(1), clusters), "clusters");
}

/// `take` returns the value once and removes it.
pub fn take_returns_the_value_once(f: &dyn KvFixture) {
    let kv = f.kv();
    ok(kv.put("take/a", b"secret", Some(TTL)), "put");
    assert_eq!(ok(kv.take("take/a"), "first take"), Some(b"secret".to_vec()));
    assert_eq!(ok(kv.get("take/a"), "get after take"), None);
    assert_eq!(ok(kv.take("take/a"), "second take"), None);
    assert_eq!(ok(kv.take("take/missing"), "take missing"), None);
}

/// `count_attempt_and_take_if` counts every attempt, takes only the exact
/// value, only within the limit, and only once; an expired value is gone.
pub fn attempt_take_counts_compares_and_consumes(f: &dyn KvFixture) {
    let kv = f.kv();
    ok(kv.put("once/code", b"right", Some(TTL)), "put");
    let attempt =
        |value: &[u8]| ok(kv.count_attempt_and_take_if("once/tries", Some(TTL), 3, "once/code", value), "attempt");
    assert_eq!(attempt(b"wrong"), (1, false));
    assert_eq!(attempt(b"righ"), (2, false), "a prefix is not the value");
    assert_eq!(ok(kv.get("once/code"), "get"), Some(b"right".to_vec()), "wrong guesses take nothing");
    assert_eq!(attempt(b"right"), (3, true));
    assert_eq!(ok(kv.get("once/code"), "get after"), None);
    ok(kv.put("once/code", b"right", Some(TTL)), "put again");
    assert_eq!(attempt(b"right"), (4, false), "past the limit even the right value is refused");
    // A new counter (as after a new code) counts from 1 again; expired values are gone.
    ok(kv.delete("once/tries"), "reset");
    ok(kv.put("once/short", b"v", Some(TTL)), "put short");
    f.advance(TTL + Duration::from_secs(1));
    let expired = ok(kv.count_attempt_and_take_if("once/tries", Some(TTL), 3, "once/short", b"v"), "expired");
    assert_eq!(expired, (1, false));
}

/// The last attempt the limit allows spends the value, right or wrong, so
/// a count lost after it (deleted by hand, say) cannot give the value more
/// attempts than the limit.
pub fn the_last_attempt_the_limit_allows_spends_the_value(f: &dyn KvFixture) {
    let kv = f.kv();
    ok(kv.put("spent/code", b"right", Some(TTL)), "put");
    let attempt =
        |value: &[u8]| ok(kv.count_attempt_and_take_if("spent/tries", Some(TTL), 3, "spent/code", value), "attempt");
    assert_eq!(attempt(b"wrong"), (1, false));
    assert_eq!(attempt(b"wrong"), (2, false));
    assert_eq!(ok(kv.get("spent/code"), "get"), Some(b"right".to_vec()), "spent before the limit");
    assert_eq!(attempt(b"wrong"), (3, false));
    assert_eq!(ok(kv.get("spent/code"), "get at the limit"), None, "the last wrong guess left the value usable");
    // The count ends before the value would have.
    ok(kv.delete("spent/tries"), "the counter ends");
    assert_eq!(attempt(b"right"), (1, false), "a fresh count gave a spent value more guesses");
}

/// A count already past the limit (a counter left there before, a spend
/// that failed) spends the value at the next wrong attempt, as the one that
/// reached the limit would: Cloudflare's spent it only on landing exactly
/// on the limit. A limit below 1 is refused before anything is counted.
pub fn an_attempt_past_the_limit_spends_the_value_and_a_limit_below_one_is_refused(f: &dyn KvFixture) {
    let kv = f.kv();
    ok(kv.put("past/code", b"right", Some(TTL)), "put");
    ok(kv.put("past/tries", b"5", Some(TTL)), "a count past the limit");
    let attempt = ok(kv.count_attempt_and_take_if("past/tries", Some(TTL), 3, "past/code", b"wrong"), "attempt");
    assert_eq!(attempt, (6, false));
    assert_eq!(ok(kv.get("past/code"), "get"), None, "a value left to guess past the limit");
    ok(kv.put("zero/code", b"right", Some(TTL)), "put");
    for max_attempts in [0, -1, i64::MIN] {
        assert_invalid(
            kv.count_attempt_and_take_if("zero/tries", Some(TTL), max_attempts, "zero/code", b"x"),
            "max_attempts",
        );
    }
    // A bad TTL and a limit below 1: the TTL is named, on every backend.
    assert_invalid(kv.count_attempt_and_take_if("zero/tries", Some(Duration::ZERO), 0, "zero/code", b"x"), "ttl");
    assert_eq!(ok(kv.get("zero/tries"), "counter"), None, "counted an attempt with a limit below 1");
    assert_eq!(ok(kv.get("zero/code"), "value"), Some(b"right".to_vec()));
}

/// A counter at its largest (18 digits, what a counter holds) is refused
/// one more, and stays as it was: it was written as 19 digits, which the
/// next increment then called "not a counter".
pub fn a_counter_at_its_largest_is_refused_one_more_and_kept(f: &dyn KvFixture) {
    let kv = f.kv();
    let largest = dployr_domain::MAX_COUNTER.to_string();
    ok(kv.put("big/count", largest.as_bytes(), Some(TTL)), "put");
    for _ in 0..2 {
        match kv.increment("big/count", Some(TTL)) {
            Err(StoreError::Invalid { field: "key", reason }) => assert!(reason.contains("at its largest"), "{reason}"),
            other => panic!("expected the counter at its largest to be refused, got {other:?}"),
        }
    }
    assert_invalid(kv.count_attempt_and_take_if("big/count", Some(TTL), 3, "big/code", b"x"), "key");
    assert_eq!(ok(kv.get("big/count"), "get"), Some(largest.into_bytes()));
    ok(kv.put("big/next", (dployr_domain::MAX_COUNTER - 1).to_string().as_bytes(), Some(TTL)), "put");
    assert_eq!(ok(kv.increment("big/next", Some(TTL)), "the last one"), dployr_domain::MAX_COUNTER);
}

/// With two bad arguments, every backend names the same one: the value's
/// key, value and TTL are checked before the counter's key.
pub fn put_and_reset_counter_names_the_same_bad_argument_on_every_backend(f: &dyn KvFixture) {
    let kv = f.kv();
    assert_invalid(kv.put_and_reset_counter("", b"v", Some(TTL), ""), "key");
    assert_invalid(kv.put_and_reset_counter("k", b"v", Some(Duration::ZERO), ""), "ttl");
}

/// The count a new value starts with ends when the value does, not a TTL
/// after its first attempt: however the clock moves, the value never
/// outlives its count (which would start again at 1 with the value there).
pub fn a_restarted_count_ends_with_its_value(f: &dyn KvFixture) {
    let kv = f.kv();
    ok(kv.put_and_reset_counter("shared/code", b"right", Some(TTL), "shared/tries"), "put and reset");
    f.advance(TTL / 2);
    let attempt = ok(kv.count_attempt_and_take_if("shared/tries", Some(TTL), 3, "shared/code", b"wrong"), "attempt");
    assert_eq!(attempt, (1, false));
    f.advance(TTL / 2 + Duration::from_secs(2));
    assert_eq!(ok(kv.get("shared/code"), "value after its TTL"), None);
    assert_eq!(ok(kv.get("shared/tries"), "count after the value's TTL"), None, "the count outlived its value");
}

/// An attempt whose keys are bad (the value's key empty, or the counter's
/// key the value's own) is refused before anything is counted or taken.
pub fn an_attempt_with_bad_keys_is_refused_before_it_is_counted(f: &dyn KvFixture) {
    let kv = f.kv();
    assert_invalid(kv.count_attempt_and_take_if("bad/tries", Some(TTL), 3, "", b"x"), "key");
    assert_eq!(ok(kv.get("bad/tries"), "counter"), None, "counted before the key was checked");
    assert_invalid(kv.count_attempt_and_take_if("bad/same", Some(TTL), 3, "bad/same", b"1"), "counter_key");
    assert_eq!(ok(kv.get("bad/same"), "same key"), None, "counted an attempt at its own counter");
}

/// A new value with its count of attempts restarted: the value replaced,
/// with its own TTL, and the counter back at 0 with the same TTL, so the
/// next attempt counts 1 and may take it, and the count ends with the
/// value. A bad counter key, or one that is the value's own key, is
/// refused before anything is written.
pub fn put_and_reset_counter_replaces_the_value_and_restarts_the_count(f: &dyn KvFixture) {
    let kv = f.kv();
    ok(kv.put("reset/code", b"old", Some(TTL)), "put");
    for n in 1..=3 {
        assert_eq!(ok(kv.increment("reset/tries", Some(TTL)), "count"), n);
    }
    ok(kv.put_and_reset_counter("reset/code", b"new", Some(TTL), "reset/tries"), "put and reset");
    assert_eq!(ok(kv.get("reset/code"), "get"), Some(b"new".to_vec()));
    assert_eq!(ok(kv.get("reset/tries"), "counter"), Some(b"0".to_vec()));
    let attempt = ok(kv.count_attempt_and_take_if("reset/tries", Some(TTL), 3, "reset/code", b"new"), "attempt");
    assert_eq!(attempt, (1, true));
    // With no counter to delete, and expiring with its own TTL.
    ok(kv.put_and_reset_counter("reset/short", b"v", Some(TTL), "reset/none"), "put and reset, no counter");
    assert_eq!(ok(kv.get("reset/short"), "get short"), Some(b"v".to_vec()));
    f.advance(TTL + Duration::from_secs(1));
    assert_eq!(ok(kv.get("reset/short"), "get short after its TTL"), None);
    assert_invalid(kv.put_and_reset_counter("reset/bad", b"v", Some(TTL), ""), "counter_key");
    assert_invalid(kv.put_and_reset_counter("reset/bad", b"v", Some(TTL), "reset/bad"), "counter_key");
    assert_invalid(kv.put_and_reset_counter("reset/bad", b"v", Some(Duration::ZERO), "reset/c"), "ttl");
    assert_eq!(ok(kv.get("reset/bad"), "nothing written"), None);
}

/// The counter starts at 1, counts up, is readable as digits, keeps the
/// expiry it was created with, and starts again at 1 once expired.
pub fn counter_counts_and_restarts_after_expiry(f: &dyn KvFixture) {
    let kv = f.kv();
    assert_eq!(ok(kv.increment("ctr/a", Some(TTL)), "first"), 1);
    assert_eq!(ok(kv.increment("ctr/a", Some(TTL)), "second"), 2);
    f.advance(Duration::from_secs(30));
    assert_eq!(ok(kv.increment("ctr/a", Some(TTL)), "third"), 3);
    assert_eq!(ok(kv.get("ctr/a"), "get"), Some(b"3".to_vec()));
    // Created at 0 with 120 s: gone at 150 s although incremented at 30 s.
    f.advance(TTL);
    assert_eq!(ok(kv.get("ctr/a"), "get after expiry"), None);
    assert_eq!(ok(kv.increment("ctr/a", Some(TTL)), "after expiry"), 1);
    assert_eq!(ok(kv.increment("ctr/forever", None), "no ttl"), 1);
    ok(kv.put("ctr/text", b"not a number", None), "put");
    assert_invalid(kv.increment("ctr/text", None), "key");
    assert_eq!(ok(kv.get("ctr/text"), "left alone"), Some(b"not a number".to_vec()));
}

/// A `KvStore` over the fixture's backend, on the fixture's clock where it
/// has one (so that its sessions' times and its memory of its own session
/// writes move with the backend's time).
fn kv_store(f: &dyn KvFixture) -> KvStore {
    let store = KvStore::new(f.kv());
    match f.clock() {
        Some(clock) => store.with_clock(clock),
        None => store,
    }
}

/// A session is found until its TTL passes, then `get_session` is `None`.
pub fn sessions_expire(f: &dyn KvFixture) {
    let store = kv_store(f);
    let id = SessionId::generate();
    let user = sample_user(1);
    let session = ok(store.create_session(&id, &user, sample_clusters()), "create_session");
    assert_eq!(session.user_id, user.id);
    assert_eq!(ok(store.get_session(&id), "get_session"), Some(session.clone()));
    assert_eq!(ok(store.get_session(&SessionId::generate()), "unknown session"), None);
    f.advance(Duration::from_secs(7 * 24 * 3600 - 60));
    assert_eq!(ok(store.get_session(&id), "get_session before expiry"), Some(session));
    f.advance(Duration::from_secs(90));
    assert_eq!(ok(store.get_session(&id), "get_session after expiry"), None);
}

/// A deleted session is gone.
pub fn deleted_sessions_are_gone(f: &dyn KvFixture) {
    let store = kv_store(f);
    let id = SessionId::generate();
    ok(store.create_session(&id, &sample_user(2), vec![]), "create_session");
    ok(store.delete_session(&id), "delete_session");
    assert_eq!(ok(store.get_session(&id), "get_session"), None);
}

/// Signing a user out everywhere ends each of their sessions, whether
/// already ended one by one or not, and nobody else's; it counts those it
/// ended, not those that had ended before.
pub fn delete_user_sessions_ends_every_session_of_that_user_only(f: &dyn KvFixture) {
    let store = kv_store(f);
    let (ada, bob) = (sample_user(3), sample_user(4));
    let ada_sessions: Vec<SessionId> = (0..5).map(|_| SessionId::generate()).collect();
    for id in &ada_sessions {
        ok(store.create_session(id, &ada, sample_clusters()), "create ada's session");
    }
    let bobs = SessionId::generate();
    ok(store.create_session(&bobs, &bob, vec![]), "create bob's session");
    ok(store.delete_session(&ada_sessions[0]), "sign out of one device");

    assert_eq!(ok(store.delete_user_sessions(&ada.id), "delete_user_sessions"), 4, "one had ended before");
    for id in &ada_sessions {
        assert_eq!(ok(store.get_session(id), "ada's session after sign-out everywhere"), None);
    }
    assert!(ok(store.get_session(&bobs), "bob's session").is_some());
    assert_eq!(ok(store.delete_user_sessions(&ada.id), "again"), 0, "the index is empty once done");
    assert_eq!(ok(store.delete_user_sessions(&sample_user(5).id), "a user with none"), 0);
}

/// A session id used again for another user's session (ids are the
/// caller's: `SessionId::new`) leaves the first user's index entry naming
/// it; signing that user out everywhere must not end the other user's
/// session, and signing the other user out must.
pub fn a_session_id_reused_for_another_user_is_ended_only_with_that_user(f: &dyn KvFixture) {
    let store = kv_store(f);
    let (ada, bob) = (sample_user(8), sample_user(9));
    let id = SessionId::generate();
    ok(store.create_session(&id, &ada, vec![]), "ada's session");
    ok(store.create_session(&id, &bob, vec![]), "bob's session, under the same id");
    assert_eq!(ok(store.delete_user_sessions(&ada.id), "ada signs out everywhere"), 0);
    assert_eq!(ok(store.get_session(&id), "bob's session").map(|s| s.user_id), Some(bob.id));
    assert_eq!(ok(store.delete_user_sessions(&bob.id), "bob signs out everywhere"), 1);
    assert_eq!(ok(store.get_session(&id), "after bob's sign-out"), None);
}

/// A user's index entries expire with their sessions: nothing to prune.
pub fn user_session_index_entries_expire_with_their_sessions(f: &dyn KvFixture) {
    let store = kv_store(f);
    let user = sample_user(6);
    ok(store.create_session(&SessionId::generate(), &user, vec![]), "create_session");
    f.advance(Duration::from_secs(7 * 24 * 3600 + 90));
    assert_eq!(list_all(f.kv().as_ref(), "user_sessions:", 10).0, Vec::<String>::new());
    assert_eq!(ok(store.delete_user_sessions(&user.id), "delete_user_sessions"), 0);
}

/// Sessions created for one user on 4 threads at once are all recorded,
/// and all ended by one sign-out everywhere: each has an index entry of its
/// own, so no concurrent sign-in overwrites another's (on every backend;
/// 4 threads, which the single-threaded Cloudflare emulator serves in time
/// on a loaded machine).
pub fn concurrent_sign_ins_of_one_user_are_all_signed_out(f: &dyn KvFixture) {
    let store = kv_store(f);
    let user = sample_user(7);
    let ids = in_parallel_on(4, 40, |_| {
        let id = SessionId::generate();
        ok(store.create_session(&id, &user, vec![]), "create_session");
        id
    });
    assert_eq!(ok(store.delete_user_sessions(&user.id), "delete_user_sessions"), 40);
    for id in &ids {
        assert_eq!(ok(store.get_session(id), "get_session"), None);
    }
}

/// OAuth state validates once, and not after 10 minutes.
pub fn oauth_state_is_single_use_and_expires(f: &dyn KvFixture) {
    let store = kv_store(f);
    let state = OAuthState::generate();
    ok(store.create_state(&state, "https://app.example/next"), "create_state");
    assert_eq!(ok(store.validate_state(&state), "first"), Some("https://app.example/next".to_owned()));
    assert_eq!(ok(store.validate_state(&state), "second"), None);
    let late = OAuthState::generate();
    ok(store.create_state(&late, "https://app.example/late"), "create_state");
    f.advance(Duration::from_secs(10 * 60 + 30));
    assert_eq!(ok(store.validate_state(&late), "after expiry"), None);
}

/// A session id or OAuth state no server hands out (empty: a missing
/// cookie or parameter read as `""`, which every client would share; or
/// longer than a browser keeps) is refused when created, and is found
/// nowhere when read, taken or ended; nothing is written for it.
pub fn empty_or_oversized_session_ids_and_states_are_refused_and_found_nowhere(f: &dyn KvFixture) {
    let store = kv_store(f);
    let user = sample_user(10);
    let oversized = "s".repeat(dployr_kv::MAX_SECRET_BYTES + 1);
    for bad in ["", oversized.as_str()] {
        assert_invalid(store.create_session(&SessionId::new(bad), &user, vec![]), "session_id");
        assert_eq!(ok(store.get_session(&SessionId::new(bad)), "get_session"), None);
        ok(store.delete_session(&SessionId::new(bad)), "delete_session");
        assert_invalid(store.create_state(&OAuthState::new(bad), "https://app.example/next"), "state");
        assert_eq!(ok(store.validate_state(&OAuthState::new(bad)), "validate_state"), None);
    }
    assert_eq!(list_all(f.kv().as_ref(), "", 1000).0, Vec::<String>::new(), "nothing was written");
    assert_eq!(ok(store.delete_user_sessions(&user.id), "delete_user_sessions"), 0);
    // The longest taken is taken, and single use as any other.
    let longest = "s".repeat(dployr_kv::MAX_SECRET_BYTES);
    ok(store.create_session(&SessionId::new(longest.as_str()), &user, vec![]), "the longest session id");
    assert!(ok(store.get_session(&SessionId::new(longest.as_str())), "get_session").is_some());
    ok(store.create_state(&OAuthState::new(longest.as_str()), "https://app.example/next"), "the longest state");
    assert!(ok(store.validate_state(&OAuthState::new(longest.as_str())), "validate_state").is_some());
    assert_eq!(ok(store.validate_state(&OAuthState::new(longest)), "again"), None);
}

/// A one-time code validates once, case-insensitively; three wrong guesses
/// burn it; a new code replaces the old one; codes expire.
pub fn otp_rules_hold(f: &dyn KvFixture) {
    let store = kv_store(f);
    let email = ok(Email::parse("otp@example.com"), "email");
    let code = ok(store.create_otp(&email), "create_otp");
    let lower = dployr_kv::OtpCode::new(code.expose().to_ascii_lowercase());
    assert!(ok(store.validate_otp(&email, &lower), "right, lower case"));
    assert!(!ok(store.validate_otp(&email, &code), "reused"));

    let code = ok(store.create_otp(&email), "create_otp");
    let wrong = dployr_kv::OtpCode::new(if code.expose() == "AAAAAA" { "BBBBBB" } else { "AAAAAA" });
    for _ in 0..3 {
        assert!(!ok(store.validate_otp(&email, &wrong), "wrong"));
    }
    assert!(!ok(store.validate_otp(&email, &code), "right after three wrong"));

    let old = ok(store.create_otp(&email), "create_otp");
    let new = ok(store.create_otp(&email), "create_otp again");
    if old != new {
        assert!(!ok(store.validate_otp(&email, &old), "replaced code"));
    }
    assert!(ok(store.validate_otp(&email, &new), "new code after a wrong guess"));

    let code = ok(store.create_otp(&email), "create_otp");
    f.advance(Duration::from_secs(10 * 60 + 30));
    assert!(!ok(store.validate_otp(&email, &code), "expired code"));
}

/// The guarantees stated agree with what the backend reports: `atomic` in
/// its limits is exactly "atomic take and exact increment".
pub fn stated_guarantees_match_the_backends_limits(f: &dyn KvFixture) {
    let g = f.guarantees();
    assert_eq!(f.kv().limits().atomic, g.atomic_take && g.exact_increment, "{g:?}");
    assert_eq!(f.kv().limits().read_your_writes, g.read_your_writes, "{g:?}");
}

/// Where promised: each write, overwrite and delete is seen by the very
/// next read, get and list alike.
pub fn read_your_writes_where_promised(f: &dyn KvFixture) {
    if !f.guarantees().read_your_writes {
        return;
    }
    let kv = f.kv();
    for round in 0..5 {
        let value = format!("v{round}");
        ok(kv.put("ryw/k", value.as_bytes(), Some(TTL)), "put");
        assert_eq!(ok(kv.get("ryw/k"), "get after put"), Some(value.into_bytes()));
        assert_eq!(list_all(kv.as_ref(), "ryw/", 10).0, vec!["ryw/k".to_owned()]);
        ok(kv.delete("ryw/k"), "delete");
        assert_eq!(ok(kv.get("ryw/k"), "get after delete"), None);
        assert_eq!(list_all(kv.as_ref(), "ryw/", 10).0, Vec::<String>::new());
    }
}

/// Where takes are atomic: two sign-outs everywhere of one user at once
/// (two processes, or `DataLayer::delete_user` beside one) end each
/// session once between them, so their counts add up to the sessions
/// there were, not twice some of them.
pub fn sign_outs_everywhere_at_once_count_each_session_once_where_promised(f: &dyn KvFixture) {
    if !f.guarantees().atomic_take {
        return;
    }
    let stores = [kv_store(f), kv_store(f)];
    let user = sample_user(8);
    for round in 0..30 {
        let ids: Vec<SessionId> = (0..5).map(|_| SessionId::generate()).collect();
        for id in &ids {
            ok(stores[round % 2].create_session(id, &user, vec![]), "create_session");
        }
        let counts = in_parallel_on(2, 2, |i| ok(stores[i].delete_user_sessions(&user.id), "delete_user_sessions"));
        assert_eq!(counts.iter().sum::<usize>(), 5, "round {round}: the two counts {counts:?}");
        for id in &ids {
            assert_eq!(ok(stores[0].get_session(id), "get_session"), None);
        }
    }
}

/// Where promised: of 50 concurrent takes of one key, exactly one gets it.
pub fn parallel_takes_give_exactly_one_value_where_promised(f: &dyn KvFixture) {
    if !f.guarantees().atomic_take {
        return;
    }
    let kv = f.kv();
    ok(kv.put("race/take", b"once", Some(TTL)), "put");
    let results = in_parallel(50, |_| ok(kv.take("race/take"), "take"));
    assert_eq!(results.iter().flatten().count(), 1);
}

/// Where promised: 100 concurrent increments return 1 to 100, each once.
pub fn parallel_increments_are_exact_where_promised(f: &dyn KvFixture) {
    if !f.guarantees().exact_increment {
        return;
    }
    let kv = f.kv();
    let mut results = in_parallel(100, |_| ok(kv.increment("race/counter", Some(TTL)), "increment"));
    results.sort_unstable();
    assert_eq!(results, (1..=100).collect::<Vec<i64>>());
}

/// Where promised: of 40 concurrent guesses of one code with a limit of 10,
/// half right and half wrong, every guess is counted once (the counts are 1
/// to 40), exactly one right guess within the limit takes the code, and no
/// guess past the limit does.
pub fn parallel_guesses_are_each_counted_and_take_the_code_once_where_promised(f: &dyn KvFixture) {
    if !(f.guarantees().atomic_take && f.guarantees().exact_increment) {
        return;
    }
    let kv = f.kv();
    ok(kv.put("race/code", b"right", Some(TTL)), "put");
    let results = in_parallel(40, |n| {
        let guess: &[u8] = if n % 2 == 0 { b"right" } else { b"wrong" };
        (ok(kv.count_attempt_and_take_if("race/tries", Some(TTL), 10, "race/code", guess), "attempt"), n)
    });
    let mut counts: Vec<i64> = results.iter().map(|((count, _), _)| *count).collect();
    counts.sort_unstable();
    assert_eq!(counts, (1..=40).collect::<Vec<i64>>(), "every guess counted once");
    let takers: Vec<_> = results.iter().filter(|((_, took), _)| *took).collect();
    assert!(takers.len() <= 1, "the code was taken more than once: {takers:?}");
    for ((count, _), n) in &takers {
        assert!(*count <= 10 && n % 2 == 0, "a guess past the limit or a wrong one took the code: {takers:?}");
    }
    let first_right_in_limit = results.iter().any(|((count, _), n)| *count <= 10 && n % 2 == 0);
    assert_eq!(takers.len(), usize::from(first_right_in_limit), "a right guess within the limit takes the code");
    let left = ok(kv.get("race/code"), "get after");
    assert_eq!(left, None, "taken, or spent by the attempts past the limit");
}

/// A right guess racing a new value is counted with the value it compares:
/// if it takes the new value, it was counted under the restarted count,
/// never under the count the reset deletes (which would let the new value
/// be compared with more attempts than the limit). The old count starts at
/// 5, so a guess counted under it counts 6 or more, and one counted after
/// the reset at most 3. Where the backend promises atomic one-time
/// operations.
pub fn a_guess_racing_a_new_value_is_counted_with_the_value_it_takes_where_promised(f: &dyn KvFixture) {
    if !(f.guarantees().atomic_take && f.guarantees().exact_increment) {
        return;
    }
    let kv = f.kv();
    for round in 0..50 {
        let (code, tries) = (format!("racing/code{round}"), format!("racing/tries{round}"));
        ok(kv.put(&code, b"old", Some(TTL)), "put");
        for _ in 0..5 {
            ok(kv.increment(&tries, Some(TTL)), "count");
        }
        // One thread writes the new value and restarts the count; the
        // others guess the new value at the same moment.
        let results = in_parallel_on(4, 4, |n| {
            if n == 0 {
                ok(kv.put_and_reset_counter(&code, b"new", Some(TTL), &tries), "put and reset");
                None
            } else {
                Some(ok(kv.count_attempt_and_take_if(&tries, Some(TTL), 10, &code, b"new"), "attempt"))
            }
        });
        for (count, taken) in results.into_iter().flatten() {
            assert!(
                !taken || count <= 3,
                "round {round}: a guess counted {count} under the old count took the new value"
            );
        }
    }
}

/// Defines one `#[test]` per conformance function (those of this module and,
/// through [`session_store_contract_tests!`](crate::session_store_contract_tests),
/// of [`session_store_contract`](crate::session_store_contract)), each on a
/// fresh fixture from `$fixture` (an expression evaluated per test).
#[macro_export]
macro_rules! kv_contract_tests {
    ($fixture:expr) => {
        $crate::kv_contract_tests!(@each $fixture;
            put_get_delete,
            entries_expire_after_their_ttl,
            overwrite_replaces_the_ttl,
            replace_writes_only_over_a_live_value,
            replace_refuses_what_put_refuses_before_writing,
            a_delete_racing_replaces_wins_where_promised,
            ttl_out_of_range_is_invalid,
            bad_keys_are_invalid,
            unusual_keys_round_trip,
            empty_and_large_values_round_trip,
            list_by_prefix_across_cursor_pages,
            list_is_in_utf8_byte_order,
            list_limit_out_of_range_is_invalid,
            list_prefix_and_cursor_with_refused_characters_are_invalid,
            kv_store_names_the_argument_that_is_too_large,
            take_returns_the_value_once,
            attempt_take_counts_compares_and_consumes,
            the_last_attempt_the_limit_allows_spends_the_value,
            a_restarted_count_ends_with_its_value,
            an_attempt_with_bad_keys_is_refused_before_it_is_counted,
            an_attempt_past_the_limit_spends_the_value_and_a_limit_below_one_is_refused,
            a_counter_at_its_largest_is_refused_one_more_and_kept,
            put_and_reset_counter_names_the_same_bad_argument_on_every_backend,
            counter_counts_and_restarts_after_expiry,
            put_and_reset_counter_replaces_the_value_and_restarts_the_count,
            sessions_expire,
            deleted_sessions_are_gone,
            delete_user_sessions_ends_every_session_of_that_user_only,
            a_session_id_reused_for_another_user_is_ended_only_with_that_user,
            user_session_index_entries_expire_with_their_sessions,
            concurrent_sign_ins_of_one_user_are_all_signed_out,
            bulk_reads_and_deletes_answer_as_single_calls,
            sign_outs_everywhere_at_once_count_each_session_once_where_promised,
            oauth_state_is_single_use_and_expires,
            empty_or_oversized_session_ids_and_states_are_refused_and_found_nowhere,
            otp_rules_hold,
            stated_guarantees_match_the_backends_limits,
            read_your_writes_where_promised,
            parallel_takes_give_exactly_one_value_where_promised,
            parallel_increments_are_exact_where_promised,
            parallel_guesses_are_each_counted_and_take_the_code_once_where_promised,
            a_guess_racing_a_new_value_is_counted_with_the_value_it_takes_where_promised
        );
        $crate::session_store_contract_tests!($fixture);
    };
    (@each $fixture:expr; $($name:ident),*) => {
        $(
            #[test]
            fn $name() {
                let fixture = $fixture;
                $crate::kv_contract::$name(&fixture);
            }
        )*
    };
}

/// Defines one `#[test]` per function of
/// [`session_store_contract`](crate::session_store_contract), each on a fresh
/// fixture from `$fixture`: called by
/// [`kv_contract_tests!`](crate::kv_contract_tests), and alone for a
/// fixture on which only the session store's contract holds (Cloudflare with
/// stale reads, where the backend's own read-your-writes cases cannot).
#[macro_export]
macro_rules! session_store_contract_tests {
    ($fixture:expr) => {
        $crate::session_store_contract_tests!(@each $fixture;
            session_store_round_trips_create_save_load_delete,
            session_store_create_never_overwrites_a_taken_id,
            session_store_create_of_an_expired_record_never_hands_back_a_taken_id,
            session_store_concurrent_creates_of_one_id_get_distinct_ids_where_atomic,
            session_store_expired_records_never_load,
            session_store_the_deletion_task_keeps_live_records,
            session_store_expiry_is_kept_within_the_backends_ttl_range,
            session_store_keys_hold_no_session_or_user_id,
            session_store_values_hold_no_session_id,
            session_store_deletes_every_session_of_one_user_only,
            session_store_a_session_that_changed_user_is_ended_only_with_its_current_user,
            session_store_a_session_that_dropped_its_user_is_ended_by_their_sign_out_everywhere,
            session_store_refuses_a_record_it_could_not_load_back,
            session_store_a_save_after_the_session_was_deleted_does_not_bring_it_back,
            session_store_sign_out_everywhere_counts_only_sessions_that_were_live,
            session_store_sign_outs_everywhere_at_once_count_each_session_once_where_atomic
        );
    };
    (@each $fixture:expr; $($name:ident),*) => {
        $(
            #[test]
            fn $name() {
                let fixture = $fixture;
                $crate::session_store_contract::$name(&fixture);
            }
        )*
    };
}
