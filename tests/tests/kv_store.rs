//! `KvStore`'s security and concurrency promises: no raw secret in any key
//! or value of any backend, redacted `Debug`, well-distributed one-time
//! codes, and, under 32+ threads, at most 3 evaluated OTP guesses and one
//! successful `validate_state`: on memory, on PostgreSQL, and on the
//! configuration `DPLOYR_KV=cloudflare` with its default one-time backend,
//! against an emulated Cloudflare that behaves as documented (reads 2 s
//! stale, one write per second per key).

#![cfg(test)]

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use dployr_data::{Config, DataLayer, KvBackendConfig};
use dployr_domain::{Email, KvBackend};
use dployr_kv::{
    CloudflareConfig, CloudflareKv, KvStore, MemoryKv, OAuthState, OTP_ALPHABET, OtpCode, PgKv, SessionId,
};
use dployr_kv::{KvStoreConfig, RetryPolicy};
use dployr_pg::{PgPool, PoolConfig};
use dployr_testkit::CloudflareEmulator;
use dployr_testkit::TestDatabase;
use dployr_tests::kv_contract::{in_parallel, list_all, sample_clusters, sample_user};
use dployr_tests::observed_kv::ObservedKv;

/// Every key and value in the backend, as text.
fn dump(kv: &dyn KvBackend) -> Vec<(String, String)> {
    list_all(kv, "", 1000)
        .0
        .into_iter()
        .map(|key| {
            let value = kv.get(&key).unwrap().unwrap_or_default();
            (key, String::from_utf8_lossy(&value).into_owned())
        })
        .collect()
}

/// After a session, a state and a code are created, no key or value in the
/// backend holds the session id, the state, the code, or the e-mail in a key.
fn no_key_or_value_holds_a_raw_secret(kv: &Arc<dyn KvBackend>) {
    let store = KvStore::new(Arc::clone(kv));
    let id = SessionId::generate();
    let user = sample_user(1);
    store.create_session(&id, &user, sample_clusters()).unwrap();
    let state = OAuthState::generate();
    store.create_state(&state, "https://app.example/next").unwrap();
    let email = Email::parse("ada@example.com").unwrap();
    let code = store.create_otp(&email).unwrap();

    let entries = dump(kv.as_ref());
    // The session, its entry in the user's index, the state, the code and
    // its count of attempts.
    assert_eq!(entries.len(), 5);
    for (key, value) in &entries {
        assert!(!key.contains(&user.id.to_string()), "key {key} holds the user's id");
        assert!(!key.contains(user.email.as_str()), "key {key} holds the user's e-mail");
        for secret in [id.expose(), state.expose(), code.expose()] {
            assert!(!key.contains(secret), "key {key} holds a secret");
            assert!(!value.contains(secret), "value of {key} holds a secret");
        }
        assert!(!key.contains("ada@example.com"), "key {key} holds the e-mail");
    }
    assert!(store.get_session(&id).unwrap().is_some());
}

#[test]
fn memory_holds_no_raw_session_id_state_or_code() {
    no_key_or_value_holds_a_raw_secret(&(Arc::new(MemoryKv::new()) as Arc<dyn KvBackend>));
}

#[test]
fn postgres_holds_no_raw_session_id_state_or_code() {
    let (_db, kv) = pg();
    no_key_or_value_holds_a_raw_secret(&kv);
}

#[test]
fn cloudflare_holds_no_raw_session_id_state_or_code() {
    let emulator = CloudflareEmulator::start();
    let config = CloudflareConfig::new(emulator.account_id(), emulator.namespace_id(), emulator.api_token());
    let config = CloudflareConfig { base_url: emulator.base_url().to_owned(), ..config };
    no_key_or_value_holds_a_raw_secret(&(Arc::new(CloudflareKv::new(config).unwrap()) as Arc<dyn KvBackend>));
}

#[test]
fn debug_never_shows_a_session_id_otp_or_state() {
    let id = SessionId::generate();
    let state = OAuthState::generate();
    let code = OtpCode::generate();
    for (shown, secret) in
        [(format!("{id:?}"), id.expose()), (format!("{state:?}"), state.expose()), (format!("{code:?}"), code.expose())]
    {
        assert!(!shown.contains(secret), "{shown}");
        assert!(shown.contains("redacted"), "{shown}");
    }
}

#[test]
fn session_ids_carry_at_least_128_bits_and_do_not_repeat() {
    let ids: HashSet<String> = (0..1000).map(|_| SessionId::generate().expose().to_owned()).collect();
    assert_eq!(ids.len(), 1000);
    for id in &ids {
        assert_eq!(id.len(), 64, "256 bits as hex");
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
    }
}

#[test]
fn a_thousand_otps_use_every_character_and_repeat_no_more_than_chance_allows() {
    let store = KvStore::new(Arc::new(MemoryKv::new()));
    let codes: Vec<String> = (0..1000)
        .map(|i| store.create_otp(&Email::parse(&format!("u{i}@example.com")).unwrap()).unwrap().expose().to_owned())
        .collect();
    for code in &codes {
        assert_eq!(code.len(), 6);
        assert!(code.bytes().all(|b| OTP_ALPHABET.contains(&b)), "{code}");
    }
    // 1000 draws from 36^6 ≈ 2.2e9 codes: a repeat has probability ≈ 2e-4.
    let distinct: HashSet<&String> = codes.iter().collect();
    assert!(codes.len() - distinct.len() <= 1, "{} repeats", codes.len() - distinct.len());
    // 6000 characters over 36: about 167 each, standard deviation about 13.
    let mut counts: BTreeMap<u8, usize> = BTreeMap::new();
    for b in codes.iter().flat_map(|c| c.bytes()) {
        *counts.entry(b).or_default() += 1;
    }
    assert_eq!(counts.len(), 36, "every character of A-Z0-9 appears");
    for (ch, n) in counts {
        assert!((100..=240).contains(&n), "{} appears {n} times", char::from(ch));
    }
}

fn parallel_otp_guesses_evaluate_at_most_three(kv: Arc<dyn KvBackend>) {
    parallel_otp_guesses_evaluate_at_most_three_beside(Arc::clone(&kv), kv);
}

/// The same with sessions on `sessions` and one-time records on `one_time`.
fn parallel_otp_guesses_evaluate_at_most_three_beside(sessions: Arc<dyn KvBackend>, one_time: Arc<dyn KvBackend>) {
    // The OTP guesses the backend evaluates: a read of a code (the composed
    // path), or an attempt the backend counted within the limit (its own
    // one-step path, whose comparison cannot be seen from here: a guess
    // counted within the limit is one it compared).
    let code_reads = Arc::new(AtomicUsize::new(0));
    let (on_read, on_attempt) = (Arc::clone(&code_reads), Arc::clone(&code_reads));
    let counting = ObservedKv::new(one_time)
        .on_get(move |key| {
            if key.starts_with("otp:") {
                on_read.fetch_add(1, Ordering::SeqCst);
            }
        })
        .on_attempt(move |count, limit| {
            if count <= limit {
                on_attempt.fetch_add(1, Ordering::SeqCst);
            }
        });
    let store = KvStore::with_backends(sessions, Arc::new(counting), KvStoreConfig::default()).unwrap();
    let email = Email::parse("race@example.com").unwrap();
    let code = store.create_otp(&email).unwrap();
    let wrong = OtpCode::new(if code.expose() == "AAAAAA" { "BBBBBB" } else { "AAAAAA" });
    // 100 guessers, each a wrong guess then the right one.
    let results = in_parallel(100, |_| {
        let first = store.validate_otp(&email, &wrong).unwrap();
        let second = store.validate_otp(&email, &code).unwrap();
        (first, second)
    });
    assert!(results.iter().all(|(first, _)| !first), "a wrong guess succeeded");
    let successes = results.iter().filter(|(_, second)| *second).count();
    let evaluated = code_reads.load(Ordering::SeqCst);
    assert!(evaluated <= 3, "{evaluated} guesses were evaluated");
    assert!(successes <= 1, "{successes} successes");
}

fn parallel_validate_state_gives_exactly_one_some(kv: Arc<dyn KvBackend>) {
    parallel_validate_state_gives_exactly_one_some_on(&KvStore::new(kv));
}

fn parallel_validate_state_gives_exactly_one_some_on(store: &KvStore) {
    let state = OAuthState::generate();
    store.create_state(&state, "https://app.example/next").unwrap();
    let results = in_parallel(50, |_| store.validate_state(&state).unwrap());
    assert_eq!(results.iter().filter(|r| r.is_some()).count(), 1);
}

fn pg() -> (TestDatabase, Arc<dyn KvBackend>) {
    let db = dployr_testkit::database();
    let pool = PgPool::connect(db.url(), PoolConfig { max_size: 16, ..PoolConfig::default() }).unwrap();
    (db, Arc::new(PgKv::new(pool)))
}

#[test]
fn memory_parallel_otp_guesses_evaluate_at_most_three() {
    parallel_otp_guesses_evaluate_at_most_three(Arc::new(MemoryKv::new()));
}

#[test]
fn memory_parallel_validate_state_gives_exactly_one_some() {
    parallel_validate_state_gives_exactly_one_some(Arc::new(MemoryKv::new()));
}

#[test]
fn postgres_parallel_otp_guesses_evaluate_at_most_three() {
    let (_db, kv) = pg();
    parallel_otp_guesses_evaluate_at_most_three(kv);
}

#[test]
fn postgres_parallel_validate_state_gives_exactly_one_some() {
    let (_db, kv) = pg();
    parallel_validate_state_gives_exactly_one_some(kv);
}

#[test]
fn store_refuses_ttls_the_backend_cannot_hold() {
    let config = dployr_kv::KvStoreConfig { otp_ttl: Duration::ZERO, ..Default::default() };
    assert!(KvStore::with_config(Arc::new(MemoryKv::new()), config).is_err());
}

/// OWASP ASVS 2.7.2: a code sent by e-mail expires within 10 minutes, so
/// a store is not opened with a longer one-time code TTL (shorter ones are
/// the operator's choice).
#[test]
fn a_one_time_code_ttl_past_ten_minutes_is_refused() {
    let config = |otp_ttl| KvStoreConfig { otp_ttl, ..KvStoreConfig::default() };
    let open = |otp_ttl| KvStore::with_backends(Arc::new(MemoryKv::new()), Arc::new(MemoryKv::new()), config(otp_ttl));
    assert_eq!(dployr_kv::MAX_OTP_TTL, Duration::from_secs(600));
    assert!(open(dployr_kv::MAX_OTP_TTL).is_ok());
    assert!(open(Duration::from_secs(60)).is_ok());
    for too_long in [dployr_kv::MAX_OTP_TTL + Duration::from_millis(1), Duration::from_secs(24 * 3600)] {
        match open(too_long) {
            Err(dployr_domain::StoreError::Invalid { field: "otp_ttl", reason }) => {
                assert!(reason.contains("10 minutes"), "{reason}");
            }
            other => panic!("{too_long:?}: expected Invalid on otp_ttl, got {other:?}"),
        }
    }
}

#[test]
fn a_refused_ttl_is_named_by_which_of_the_three_it_is() {
    let two_centuries = Duration::from_secs(200 * 365 * 24 * 3600);
    let defaults = KvStoreConfig::default;
    for (field, config) in [
        ("session_ttl", KvStoreConfig { session_ttl: two_centuries, ..defaults() }),
        ("state_ttl", KvStoreConfig { state_ttl: two_centuries, ..defaults() }),
        ("otp_ttl", KvStoreConfig { otp_ttl: Duration::ZERO, ..defaults() }),
    ] {
        match KvStore::with_backends(Arc::new(MemoryKv::new()), Arc::new(MemoryKv::new()), config) {
            Err(dployr_domain::StoreError::Invalid { field: named, .. }) => assert_eq!(named, field),
            other => panic!("{field}: expected Invalid, got {other:?}"),
        }
    }
}

#[test]
fn otp_guess_is_counted_before_the_code_is_read() {
    // The store hands the whole attempt to the backend, which counts it
    // before comparing; with the counter down, the guess fails with it.
    let mut kv = dployr_domain::MockKvBackend::new();
    kv.expect_limits().returning(dployr_domain::KvLimits::default);
    kv.expect_count_attempt_and_take_if()
        .times(1)
        .returning(|_, _, _, _, _| Err(dployr_domain::StoreError::Unavailable { reason: "down".into(), source: None }));
    let store = KvStore::new(Arc::new(kv));
    let result = store.validate_otp(&Email::parse("a@example.com").unwrap(), &OtpCode::new("ABC123"));
    assert!(matches!(result, Err(dployr_domain::StoreError::Unavailable { .. })));
}

#[test]
fn otp_guess_past_the_limit_is_refused_unseen() {
    let mut kv = dployr_domain::MockKvBackend::new();
    kv.expect_limits().returning(dployr_domain::KvLimits::default);
    kv.expect_count_attempt_and_take_if()
        .withf(|attempts_key, _, max, code_key, _| {
            attempts_key.starts_with("otp_attempts:") && *max == 3 && code_key.starts_with("otp:")
        })
        .times(1)
        .returning(|_, _, _, _, _| Ok((4, false)));
    let store = KvStore::new(Arc::new(kv));
    assert!(!store.validate_otp(&Email::parse("a@example.com").unwrap(), &OtpCode::new("ABC123")).unwrap());
}

#[test]
fn kv_operations_are_spans_without_any_secret_and_postgres_ones_count_statements() {
    let db = dployr_testkit::database();
    let pool = PgPool::connect(db.url(), PoolConfig::default()).unwrap();
    let store = KvStore::new(Arc::new(PgKv::new(pool)));
    let user = sample_user(1);
    let (id, state, email) = (SessionId::generate(), OAuthState::generate(), Email::parse("ada@example.com").unwrap());
    let capture = dployr_testkit::spans::SpanCapture::default();
    let code = capture.during(|| {
        store.create_session(&id, &user, sample_clusters()).unwrap();
        store.get_session(&id).unwrap().unwrap();
        store.create_state(&state, "https://app.example/next").unwrap();
        store.validate_state(&state).unwrap().unwrap();
        let code = store.create_otp(&email).unwrap();
        assert!(store.validate_otp(&email, &code).unwrap());
        code
    });
    let spans = capture.spans();
    let ops: Vec<(&str, &str, Option<&str>)> = spans
        .iter()
        .map(|s| (s.name.as_str(), s.fields["op"].as_str(), s.fields.get("statements").map(String::as_str)))
        .collect();
    assert_eq!(
        ops,
        [
            ("dployr.store", "kv.postgres.put", Some("1")),
            // The session's entry in the user's index of sessions.
            ("dployr.store", "kv.postgres.put", Some("1")),
            ("dployr.kv", "kv.create_session", None),
            ("dployr.store", "kv.postgres.get", Some("1")),
            ("dployr.kv", "kv.get_session", None),
            ("dployr.store", "kv.postgres.put", Some("1")),
            ("dployr.kv", "kv.create_state", None),
            ("dployr.store", "kv.postgres.take", Some("1")),
            ("dployr.kv", "kv.validate_state", None),
            // The new code stored and its count restarted in one statement.
            ("dployr.store", "kv.postgres.put_and_reset_counter", Some("1")),
            ("dployr.kv", "kv.create_otp", None),
            // A guess: counted, compared and (right) consumed in one statement.
            ("dployr.store", "kv.postgres.count_attempt_and_take_if", Some("1")),
            ("dployr.kv", "kv.validate_otp", None),
        ]
    );
    let text = format!("{spans:?}");
    for secret in [id.expose(), state.expose(), code.expose(), "ada@example.com", "app.example"] {
        assert!(!text.contains(secret), "a span holds {secret}");
    }
}

/// Cloudflare as it behaves (reads 2 s stale, one write per second per key),
/// through the configuration `DPLOYR_KV=cloudflare` with the default
/// one-time backend, i.e. what `DataLayer::open` builds.
struct CloudflareDeployment {
    emulator: CloudflareEmulator,
    data: DataLayer,
    _db: TestDatabase,
}

fn cloudflare_as_documented() -> CloudflareEmulator {
    let emulator = CloudflareEmulator::start();
    emulator.set_stale_reads(Duration::from_secs(2));
    emulator.limit_writes_per_key(true);
    emulator
}

fn cloudflare_config(emulator: &CloudflareEmulator) -> CloudflareConfig {
    CloudflareConfig {
        base_url: emulator.base_url().to_owned(),
        retry: RetryPolicy { initial_backoff: Duration::from_millis(20), ..RetryPolicy::default() },
        ..CloudflareConfig::new(emulator.account_id(), emulator.namespace_id(), emulator.api_token())
    }
}

fn cloudflare_deployment() -> CloudflareDeployment {
    let (db, emulator) = (dployr_testkit::database(), cloudflare_as_documented());
    let config = Config::new(db.url()).with_kv(KvBackendConfig::Cloudflare(cloudflare_config(&emulator)));
    let data = DataLayer::open(config).unwrap();
    assert_eq!((data.kv_backend(), data.one_time_kv_backend()), ("cloudflare", "postgres"));
    CloudflareDeployment { emulator, data, _db: db }
}

#[test]
fn cloudflare_deployment_validates_a_state_once_under_50_parallel_validations() {
    let cf = cloudflare_deployment();
    parallel_validate_state_gives_exactly_one_some_on(cf.data.kv());
}

#[test]
fn cloudflare_deployment_evaluates_at_most_three_of_100_parallel_guesses() {
    // The data layer's two backends, with the one-time one counted.
    let cf = cloudflare_deployment();
    let (sessions, one_time) = (Arc::clone(cf.data.kv().backend()), Arc::clone(cf.data.kv().one_time_backend()));
    parallel_otp_guesses_evaluate_at_most_three_beside(sessions, one_time);
}

#[test]
fn cloudflare_deployment_accepts_a_new_code_right_after_a_lockout() {
    let cf = cloudflare_deployment();
    let store = cf.data.kv();
    let email = Email::parse("locked@example.com").unwrap();
    let code = store.create_otp(&email).unwrap();
    let wrong = OtpCode::new(if code.expose() == "AAAAAA" { "BBBBBB" } else { "AAAAAA" });
    for _ in 0..3 {
        assert!(!store.validate_otp(&email, &wrong).unwrap());
    }
    assert!(!store.validate_otp(&email, &code).unwrap(), "locked out");
    let fresh = store.create_otp(&email).unwrap();
    assert!(store.validate_otp(&email, &fresh).unwrap(), "a new code right after the lockout");
}

#[test]
fn cloudflare_deployment_never_returns_a_deleted_session_in_the_same_process() {
    let cf = cloudflare_deployment();
    let store = cf.data.kv();
    let id = SessionId::generate();
    let session = store.create_session(&id, &sample_user(3), sample_clusters()).unwrap();
    cf.emulator.advance(Duration::from_secs(3)); // the write has propagated
    assert_eq!(store.get_session(&id).unwrap(), Some(session));
    store.delete_session(&id).unwrap();
    assert_eq!(store.get_session(&id).unwrap(), None);
    // Cloudflare itself still answers with the session: the read is stale.
    assert_eq!(list_all(store.backend().as_ref(), "session:", 10).0.len(), 1, "reads are not stale");
    let other_process = KvStore::new(Arc::clone(store.backend()));
    assert!(other_process.get_session(&id).unwrap().is_some(), "another process sees it until it propagates");
    cf.emulator.advance(Duration::from_secs(3));
    assert_eq!(other_process.get_session(&id).unwrap(), None);
}

/// The Cloudflare requests of each sign-in step, as docs/operations.md
/// gives them: (step, with one-time records on PostgreSQL, on Cloudflare).
#[test]
fn cloudflare_requests_per_step_are_those_in_the_operations_guide() {
    let db = dployr_testkit::database();
    let pool = PgPool::connect(db.url(), PoolConfig::default()).unwrap();
    let pg: Arc<dyn KvBackend> = Arc::new(PgKv::new(pool));
    let mut measured = Vec::new();
    for one_time_on_cloudflare in [false, true] {
        let emulator = CloudflareEmulator::start();
        let cf = Arc::new(CloudflareKv::new(cloudflare_config(&emulator)).unwrap());
        let one_time = if one_time_on_cloudflare { cf.clone() as Arc<dyn KvBackend> } else { Arc::clone(&pg) };
        let store = KvStore::with_backends(cf.clone(), one_time, KvStoreConfig::default()).unwrap();
        let requests = |step: &dyn Fn()| {
            let before = cf.request_counts().requests;
            step();
            cf.request_counts().requests - before
        };
        let (user, id, state) = (sample_user(9), SessionId::generate(), OAuthState::generate());
        let email = Email::parse(&format!("budget{}@example.com", u8::from(one_time_on_cloudflare))).unwrap();
        let oauth_sign_in = requests(&|| {
            store.create_state(&state, "https://app.example/next").unwrap();
            store.validate_state(&state).unwrap().unwrap();
            store.create_session(&id, &user, vec![]).unwrap();
        });
        // Where it was made and elsewhere (another server) alike: the
        // process that made it asks the backend too.
        let elsewhere = KvStore::with_backends(cf.clone(), Arc::clone(&pg), KvStoreConfig::default()).unwrap();
        let session_read = requests(&|| drop(store.get_session(&id).unwrap().unwrap()));
        assert_eq!(requests(&|| drop(elsewhere.get_session(&id).unwrap().unwrap())), session_read);
        let otp_sign_in = requests(&|| {
            let code = store.create_otp(&email).unwrap();
            assert!(store.validate_otp(&email, &code).unwrap());
            store.create_session(&SessionId::generate(), &user, vec![]).unwrap();
        });
        let code = store.create_otp(&email).unwrap();
        let wrong_guess = requests(&|| {
            let wrong = OtpCode::new(if code.expose() == "AAAAAA" { "BBBBBB" } else { "AAAAAA" });
            assert!(!store.validate_otp(&email, &wrong).unwrap());
        });
        let sign_out = requests(&|| store.delete_session(&id).unwrap());
        // Two sessions made by another process (none in this one's memory).
        let everywhere_user = sample_user(10);
        for _ in 0..2 {
            elsewhere.create_session(&SessionId::generate(), &everywhere_user, vec![]).unwrap();
        }
        let sign_out_everywhere = requests(&|| assert_eq!(store.delete_user_sessions(&everywhere_user.id).unwrap(), 2));
        measured.push((oauth_sign_in, session_read, otp_sign_in, wrong_guess, sign_out, sign_out_everywhere));
    }
    // (OAuth sign-in, session read, OTP sign-in, a wrong OTP guess, sign-out,
    // sign-out everywhere of 2 sessions: 1 list, 1 bulk read, 2 bulk deletes)
    assert_eq!(measured, [(2, 1, 2, 0, 1, 4), (5, 1, 9, 3, 1, 4)]);
}

/// A session written under an older e-mail rule (here `a@b`, which today's
/// `Email::parse` refuses) still reads back until it expires.
#[test]
fn a_session_with_an_address_of_an_older_rule_still_reads_back() {
    use std::sync::Arc;

    use dployr_domain::KvBackend as _;
    use dployr_kv::{KvStore, MemoryKv, SessionId};

    let kv = Arc::new(MemoryKv::new());
    let store = KvStore::new(kv.clone());
    let id = SessionId::generate();
    let session = store.create_session(&id, &dployr_tests::kv_contract::sample_user(1), Vec::new()).unwrap();
    let key = kv.list("session:", 10, None).unwrap().keys.remove(0);
    let mut stored: serde_json::Value = serde_json::from_slice(&kv.get(&key).unwrap().unwrap()).unwrap();
    stored["email"] = "old@rule".into();
    kv.put(&key, &serde_json::to_vec(&stored).unwrap(), None).unwrap();
    let read = store.get_session(&id).unwrap().unwrap();
    assert_eq!((read.user_id, read.email.as_str()), (session.user_id, "old@rule"));
}

#[test]
fn a_session_whose_index_entry_fails_is_taken_back_and_the_caller_gets_the_error() {
    use std::sync::Mutex;
    let mut kv = dployr_domain::MockKvBackend::new();
    kv.expect_limits().returning(dployr_domain::KvLimits::default);
    let written: Arc<Mutex<Vec<String>>> = Arc::default();
    let deleted: Arc<Mutex<Vec<String>>> = Arc::default();
    let log = Arc::clone(&written);
    kv.expect_put().times(2).returning(move |key, _, _| {
        log.lock().unwrap().push(key.to_owned());
        if key.starts_with("user_sessions:") {
            Err(dployr_domain::StoreError::Unavailable { reason: "down".into(), source: None })
        } else {
            Ok(())
        }
    });
    let log = Arc::clone(&deleted);
    kv.expect_delete().times(1).returning(move |key| {
        log.lock().unwrap().push(key.to_owned());
        Ok(())
    });
    let store = KvStore::new(Arc::new(kv));
    let result = store.create_session(&SessionId::generate(), &sample_user(1), sample_clusters());
    assert!(matches!(result, Err(dployr_domain::StoreError::Unavailable { .. })), "{result:?}");
    let written = written.lock().unwrap();
    assert!(written[0].starts_with("session:") && written[1].starts_with("user_sessions:"), "{written:?}");
    assert_eq!(*deleted.lock().unwrap(), [written[0].clone()], "the session written first is deleted");
}

/// A backend without atomic takes, as Cloudflare, whose bulk delete fails
/// half-way after removing the keys it was given in reverse order (one
/// bulk delete promises no order): the sessions' delete fails, then works.
struct BulkFailingKv {
    inner: MemoryKv,
    fail_next_bulk_delete: std::sync::atomic::AtomicBool,
}

impl KvBackend for BulkFailingKv {
    fn limits(&self) -> dployr_domain::KvLimits {
        dployr_domain::KvLimits { atomic: false, ..self.inner.limits() }
    }
    fn get(&self, key: &str) -> dployr_domain::StoreResult<Option<Vec<u8>>> {
        self.inner.get(key)
    }
    fn put(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> dployr_domain::StoreResult<()> {
        self.inner.put(key, value, ttl)
    }
    fn delete(&self, key: &str) -> dployr_domain::StoreResult<()> {
        self.inner.delete(key)
    }
    fn list(
        &self,
        prefix: &str,
        limit: usize,
        cursor: Option<&str>,
    ) -> dployr_domain::StoreResult<dployr_domain::KvPage> {
        self.inner.list(prefix, limit, cursor)
    }
    fn take(&self, key: &str) -> dployr_domain::StoreResult<Option<Vec<u8>>> {
        self.inner.take(key)
    }
    fn increment(&self, key: &str, ttl: Option<Duration>) -> dployr_domain::StoreResult<i64> {
        self.inner.increment(key, ttl)
    }
    fn delete_many(&self, keys: &[String]) -> dployr_domain::StoreResult<()> {
        if self.fail_next_bulk_delete.swap(false, Ordering::SeqCst) {
            for key in keys.iter().rev().take(keys.len() / 2) {
                self.inner.delete(key)?;
            }
            return Err(dployr_domain::StoreError::Unavailable { reason: "half done".into(), source: None });
        }
        keys.iter().try_for_each(|key| self.inner.delete(key))
    }
}

/// A sign-out everywhere whose bulk delete fails half-way leaves every
/// session it did not end findable: no index entry goes before its session,
/// and a second call ends and counts the rest (on a backend that reads its
/// own writes, where the store keeps no memory of its writes).
#[test]
fn a_bulk_sign_out_that_fails_half_way_leaves_what_it_did_not_end_to_the_next_call() {
    let kv = Arc::new(BulkFailingKv { inner: MemoryKv::new(), fail_next_bulk_delete: false.into() });
    let store = KvStore::new(Arc::clone(&kv) as Arc<dyn KvBackend>);
    let user = sample_user(11);
    let ids: Vec<SessionId> = (0..4).map(|_| SessionId::generate()).collect();
    for id in &ids {
        store.create_session(id, &user, vec![]).unwrap();
    }
    kv.fail_next_bulk_delete.store(true, Ordering::SeqCst);
    assert!(store.delete_user_sessions(&user.id).is_err());
    let live = ids.iter().filter(|id| store.get_session(id).unwrap().is_some()).count();
    assert_eq!(live, 2, "the half the failed call did not delete is live, and read as live here");
    assert_eq!(store.delete_user_sessions(&user.id).unwrap(), live, "the second call ends and counts the rest");
    for id in &ids {
        assert_eq!(store.get_session(id).unwrap(), None);
        assert_eq!(KvStore::new(Arc::clone(&kv) as Arc<dyn KvBackend>).get_session(id).unwrap(), None);
    }
}

/// A clock moved to the end of time (`ManualClock::advance(Duration::MAX)`,
/// which its documentation offers "to expire everything") expires every
/// session and record; neither store panics converting it to a date.
#[test]
fn a_clock_moved_to_the_end_of_time_expires_everything_and_panics_nowhere() {
    use dployr_kv::ManualClock;
    use dployr_tower_sessions::KvSessionStore;
    use tower_sessions_core::SessionStore as _;
    use tower_sessions_core::session::{Id, Record};

    let clock = ManualClock::new();
    let kv: Arc<dyn KvBackend> = Arc::new(MemoryKv::with_clock(clock.clone()));
    let store = KvStore::new(Arc::clone(&kv)).with_clock(clock.clone());
    let sessions = KvSessionStore::new(Arc::clone(&kv)).with_user_field("user_id").with_clock(clock.clone());
    let user = sample_user(12);
    let before = SessionId::generate();
    store.create_session(&before, &user, vec![]).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let mut record = Record {
        id: Id::default(),
        data: [("user_id".to_owned(), serde_json::Value::from("ada"))].into_iter().collect(),
        expiry_date: time::OffsetDateTime::now_utc() + time::Duration::hours(1),
    };
    runtime.block_on(sessions.create(&mut record)).unwrap();
    clock.advance(Duration::MAX);
    assert_eq!(store.get_session(&before).unwrap(), None);
    // A new session there may be refused (its TTL passes the end of the
    // backend's clock), as a typed error, not a panic.
    match store.create_session(&SessionId::generate(), &user, vec![]) {
        Ok(_) | Err(dployr_domain::StoreError::Invalid { field: "ttl", .. }) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(store.delete_user_sessions(&user.id).unwrap(), 0, "nothing live at the end of time");
    assert_eq!(runtime.block_on(sessions.load(&record.id)).unwrap(), None);
    runtime.block_on(sessions.delete_user_sessions("ada")).unwrap();
}

/// A session id no server hands out (empty, or longer than
/// `MAX_SECRET_BYTES`) is answered absent without a read of the backend.
#[test]
fn a_session_id_no_server_hands_out_is_absent_without_a_read() {
    let reads = Arc::new(AtomicUsize::new(0));
    let observed = ObservedKv::new(Arc::new(MemoryKv::new())).on_get({
        let reads = Arc::clone(&reads);
        move |_| {
            reads.fetch_add(1, Ordering::Relaxed);
        }
    });
    let store = KvStore::new(Arc::new(observed));
    let oversized = "s".repeat(dployr_kv::MAX_SECRET_BYTES + 1);
    for id in ["", oversized.as_str()] {
        assert_eq!(store.get_session(&SessionId::new(id)).unwrap(), None);
    }
    assert_eq!(reads.load(Ordering::Relaxed), 0, "the backend was read");
    assert_eq!(store.get_session(&SessionId::generate()).unwrap(), None);
    assert_eq!(reads.load(Ordering::Relaxed), 1, "an id that may be a session is looked up");
}
