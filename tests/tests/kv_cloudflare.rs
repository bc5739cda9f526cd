//! The key-value conformance suite on `CloudflareKv` through the testkit's
//! emulator (which states no guarantee beyond the API: see
//! `kv_contract`), plus the client's own duties: retries of 429 and 5xx
//! within bounds, configuration errors that name the variable to check,
//! limits refused before any request, request counts, and a token that
//! never shows in `Debug`. A few tests switch on what Cloudflare documents
//! (stale reads, one write per second per key, the account request budget)
//! or speak to the emulator directly, to prove it behaves like Cloudflare's
//! documentation says and that the guarantees the suite does not claim for
//! Cloudflare really do not hold there.
//!
//! The session store's contract runs twice: on the plain API with the rest
//! of the suite, and with stale reads switched on ([`stale_reads`]), where
//! the tower-sessions store answers from its memory of its own recent
//! writes.

#![cfg(test)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use dployr_domain::{KvBackend, StoreError};
use dployr_kv::{Clock, CloudflareConfig, CloudflareKv, CloudflareRequestCounts, KvStore, OAuthState, RetryPolicy};
use dployr_testkit::CloudflareEmulator;
use dployr_tests::kv_contract::{Guarantees, KvFixture, assert_invalid};

struct Cloudflare {
    emulator: CloudflareEmulator,
    kv: Arc<CloudflareKv>,
    clock: EmulatorClock,
}

impl KvFixture for Cloudflare {
    fn kv(&self) -> Arc<dyn KvBackend> {
        self.kv.clone()
    }

    fn advance(&self, by: Duration) {
        self.emulator.advance(by);
        self.clock.advance(by);
    }

    fn guarantees(&self) -> Guarantees {
        Guarantees::NONE
    }

    fn clock(&self) -> Option<Arc<dyn Clock>> {
        Some(Arc::new(self.clock.clone()))
    }
}

/// The emulator's clock, for a store over it: the system clock plus how far
/// the fixture moved the emulator's, so both move together.
#[derive(Debug, Clone, Default)]
struct EmulatorClock {
    ahead: Arc<Mutex<Duration>>,
}

impl EmulatorClock {
    fn advance(&self, by: Duration) {
        *self.ahead.lock().unwrap() += by;
    }
}

impl Clock for EmulatorClock {
    fn now(&self) -> SystemTime {
        SystemTime::now() + *self.ahead.lock().unwrap()
    }
}

fn config_for(emulator: &CloudflareEmulator) -> CloudflareConfig {
    CloudflareConfig {
        base_url: emulator.base_url().to_owned(),
        retry: RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(100),
            max_elapsed: Duration::from_secs(5),
        },
        ..CloudflareConfig::new(emulator.account_id(), emulator.namespace_id(), emulator.api_token())
    }
}

fn cloudflare() -> Cloudflare {
    let emulator = CloudflareEmulator::start();
    let kv = Arc::new(CloudflareKv::new(config_for(&emulator)).unwrap());
    Cloudflare { emulator, kv, clock: EmulatorClock::default() }
}

/// How stale the emulator's reads are in the tests that switch them on:
/// well within Cloudflare's 60 s, and long enough that no test outruns it.
const STALE: Duration = Duration::from_secs(30);

/// [`cloudflare`] with reads [`STALE`] behind the writes.
fn cloudflare_with_stale_reads() -> Cloudflare {
    let cf = cloudflare();
    cf.emulator.set_stale_reads(STALE);
    cf
}

dployr_tests::kv_contract_tests!(cloudflare());

/// The tower-sessions store's contract, unchanged, with every read of the
/// backend [`STALE`] behind the writes.
mod stale_reads {
    use super::cloudflare_with_stale_reads;

    dployr_tests::session_store_contract_tests!(cloudflare_with_stale_reads());
}

#[test]
fn two_429s_then_success_is_success() {
    let cf = cloudflare();
    cf.kv.put("k", b"v", None).unwrap();
    cf.emulator.set_retry_after(0);
    cf.emulator.fail_next(2, 429);
    let before = cf.emulator.requests();
    assert_eq!(cf.kv.get("k").unwrap(), Some(b"v".to_vec()));
    assert_eq!(cf.emulator.requests() - before, 3);
}

#[test]
fn retry_after_of_a_429_is_waited_for_and_then_succeeds() {
    let cf = cloudflare();
    cf.emulator.fail_next(1, 429); // retry-after: 1
    let before = cf.emulator.requests();
    cf.kv.put("k", b"v", None).unwrap();
    assert_eq!(cf.emulator.requests() - before, 2);
}

#[test]
fn endless_500s_end_in_unavailable_within_the_attempt_bound() {
    let cf = cloudflare();
    cf.emulator.fail_next(u32::MAX, 500);
    let before = cf.emulator.requests();
    let result = cf.kv.get("k");
    assert!(matches!(result, Err(StoreError::Unavailable { .. })), "{result:?}");
    assert_eq!(cf.emulator.requests() - before, 5, "max_attempts is 5");
}

#[test]
fn endless_503s_end_in_unavailable_within_the_time_bound() {
    let emulator = CloudflareEmulator::start();
    let mut config = config_for(&emulator);
    config.retry = RetryPolicy {
        max_attempts: u32::MAX,
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(200),
        max_elapsed: Duration::from_millis(800),
    };
    let kv = CloudflareKv::new(config).unwrap();
    emulator.fail_next(u32::MAX, 503);
    let result = kv.put("k", b"v", None);
    assert!(matches!(result, Err(StoreError::Unavailable { .. })), "{result:?}");
    // 800 ms of waits of 25..200 ms each: more than one try, far fewer than unbounded.
    let tries = emulator.requests();
    assert!((2..=40).contains(&tries), "{tries} tries");
}

#[test]
fn a_401_is_a_configuration_error_naming_the_token_variable() {
    let cf = cloudflare();
    cf.emulator.fail_next(1, 401);
    let before = cf.emulator.requests();
    match cf.kv.get("k") {
        Err(StoreError::Configuration { setting, .. }) => assert_eq!(setting, "CLOUDFLARE_API_TOKEN"),
        other => panic!("expected a configuration error, got {other:?}"),
    }
    assert_eq!(cf.emulator.requests() - before, 1, "a 401 is not retried");
}

#[test]
fn a_wrong_token_is_a_configuration_error_naming_the_token_variable() {
    let emulator = CloudflareEmulator::start();
    let config = CloudflareConfig { api_token: "wrong".into(), ..config_for(&emulator) };
    let kv = CloudflareKv::new(config).unwrap();
    let error = kv.put("k", b"v", None).unwrap_err();
    assert!(matches!(error, StoreError::Configuration { setting: "CLOUDFLARE_API_TOKEN", .. }), "{error:?}");
    assert!(!error.to_string().contains("wrong"));
}

#[test]
fn an_unknown_namespace_is_a_configuration_error_naming_the_namespace_variable() {
    let emulator = CloudflareEmulator::start();
    let config = CloudflareConfig { namespace_id: "0000".into(), ..config_for(&emulator) };
    let kv = CloudflareKv::new(config).unwrap();
    for result in [kv.get("k").map(drop), kv.put("k", b"v", None), kv.list("", 10, None).map(drop)] {
        assert!(
            matches!(result, Err(StoreError::Configuration { setting: "CLOUDFLARE_KV_NAMESPACE_ID", .. })),
            "{result:?}"
        );
    }
}

#[test]
fn limits_are_refused_before_any_request() {
    let cf = cloudflare();
    let before = cf.emulator.requests();
    assert_invalid(cf.kv.put("k", b"v", Some(Duration::from_secs(59))), "ttl");
    assert_invalid(cf.kv.put(&"k".repeat(513), b"v", None), "key");
    assert_invalid(cf.kv.put("..", b"v", None), "key");
    assert_invalid(cf.kv.put("k", &vec![0; 26_214_401], None), "value");
    assert_invalid(cf.kv.list("", 9, None), "limit");
    assert_eq!(cf.emulator.requests(), before);
}

#[test]
fn take_and_counter_are_reported_as_not_atomic() {
    assert!(!cloudflare().kv.limits().atomic);
}

#[test]
fn debug_of_config_and_client_never_shows_the_token() {
    let cf = cloudflare();
    let token = cf.emulator.api_token().to_owned();
    let config = config_for(&cf.emulator);
    for shown in [format!("{config:?}"), format!("{:?}", cf.kv), format!("{config:#?}")] {
        assert!(!shown.contains(&token), "{shown}");
        assert!(shown.contains("redacted"), "{shown}");
    }
}

#[test]
fn config_from_env_names_the_missing_variable() {
    // The variables are not set where the tests run.
    if std::env::var_os("CLOUDFLARE_ACCOUNT_ID").is_none() {
        let error = CloudflareConfig::from_env().unwrap_err();
        assert!(matches!(error, StoreError::Configuration { setting: "CLOUDFLARE_ACCOUNT_ID", .. }));
    }
}

/// A raw request to the emulator: (status, body).
fn raw(emulator: &CloudflareEmulator, method: reqwest::Method, path: &str, body: Vec<u8>) -> (u16, String) {
    let url = format!(
        "{}/accounts/{}/storage/kv/namespaces/{}/{path}",
        emulator.base_url(),
        emulator.account_id(),
        emulator.namespace_id()
    );
    let response = reqwest::blocking::Client::new()
        .request(method, url)
        .bearer_auth(emulator.api_token())
        .body(body)
        .send()
        .unwrap();
    (response.status().as_u16(), response.text().unwrap())
}

#[test]
fn emulator_answers_like_cloudflare_documents() {
    let emulator = CloudflareEmulator::start();
    let (status, body) = raw(&emulator, reqwest::Method::GET, "values/missing", vec![]);
    assert_eq!(status, 404);
    assert!(body.contains("10009"), "{body}");
    let (status, body) = raw(&emulator, reqwest::Method::PUT, "values/k?expiration_ttl=59", b"v".to_vec());
    assert_eq!(status, 400);
    assert!(body.contains("Expiration TTL must be at least 60"), "{body}");
    let (status, _) = raw(&emulator, reqwest::Method::PUT, &format!("values/{}", "k".repeat(513)), b"v".to_vec());
    assert_eq!(status, 414);
    let (status, _) = raw(&emulator, reqwest::Method::PUT, "values/k", vec![0; 26_214_401]);
    assert_eq!(status, 413);
    let (status, _) = raw(&emulator, reqwest::Method::PUT, "values/", b"v".to_vec());
    assert_eq!(status, 400, "empty key");
    let (status, _) = raw(&emulator, reqwest::Method::GET, "keys?limit=9", vec![]);
    assert_eq!(status, 400);
    let (status, body) = raw(&emulator, reqwest::Method::GET, "keys", vec![]);
    assert_eq!(status, 200);
    assert!(body.contains(r#""cursor":"""#), "last page has an empty cursor: {body}");
}

#[test]
fn stale_reads_let_a_taken_value_be_taken_again_as_on_cloudflare() {
    let cf = cloudflare();
    cf.emulator.set_stale_reads(Duration::from_secs(2));
    cf.kv.put("once", b"v", None).unwrap();
    assert_eq!(cf.kv.get("once").unwrap(), None, "a fresh write is not seen for 2 s");
    cf.emulator.advance(Duration::from_secs(3));
    assert_eq!(cf.kv.take("once").unwrap(), Some(b"v".to_vec()));
    assert_eq!(cf.kv.take("once").unwrap(), Some(b"v".to_vec()), "the delete is not seen for 2 s");
    cf.emulator.advance(Duration::from_secs(3));
    assert_eq!(cf.kv.take("once").unwrap(), None);
}

#[test]
fn one_time_records_on_cloudflare_are_not_single_use_with_stale_reads() {
    let cf = cloudflare();
    cf.emulator.set_stale_reads(Duration::from_secs(2));
    let store = KvStore::new(cf.kv.clone());
    let state = OAuthState::generate();
    store.create_state(&state, "https://app.example/next").unwrap();
    cf.emulator.advance(Duration::from_secs(3));
    assert!(store.validate_state(&state).unwrap().is_some());
    assert!(store.validate_state(&state).unwrap().is_some(), "why DPLOYR_KV_ONE_TIME=cloudflare is opt-in only");
}

#[test]
fn a_second_write_to_a_key_within_a_second_is_throttled_then_retried() {
    let cf = cloudflare();
    cf.emulator.limit_writes_per_key(true);
    let before = cf.kv.request_counts();
    cf.kv.put("k", b"1", None).unwrap();
    cf.kv.put("k", b"2", None).unwrap();
    cf.kv.put("other", b"1", None).unwrap();
    let after = cf.kv.request_counts();
    assert!(after.throttled - before.throttled >= 1, "{after:?}");
    assert_eq!(after.retries - before.retries, after.throttled - before.throttled, "each 429 was retried once");
    assert_eq!(after.requests - before.requests, 3 + after.retries - before.retries);
    assert_eq!(cf.kv.get("k").unwrap(), Some(b"2".to_vec()));
}

#[test]
fn a_spent_request_budget_fails_at_once_and_recovers_after_the_window() {
    let cf = cloudflare();
    cf.emulator.set_request_budget(Some((10, Duration::from_secs(300))));
    for _ in 0..10 {
        cf.kv.get("k").unwrap();
    }
    let started = std::time::Instant::now();
    let error = cf.kv.get("k").unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(1), "a 5-minute Retry-After is not slept through");
    assert!(matches!(error, StoreError::Unavailable { .. }), "{error:?}");
    assert!(error.to_string().contains("asked to wait 300s"), "{error}");
    assert_eq!(cf.kv.request_counts(), CloudflareRequestCounts { requests: 11, throttled: 1, retries: 0 });
    cf.emulator.advance(Duration::from_secs(301));
    assert_eq!(cf.kv.get("k").unwrap(), None);
}

#[test]
fn each_operation_span_counts_its_requests_429s_and_retries() {
    let cf = cloudflare();
    cf.kv.put("k", b"v", None).unwrap();
    cf.emulator.set_retry_after(0);
    cf.emulator.fail_next(1, 429);
    let capture = dployr_testkit::spans::SpanCapture::default();
    capture.during(|| cf.kv.take("k").unwrap());
    let spans = capture.spans();
    let take = spans.iter().find(|s| s.fields["op"] == "kv.cloudflare.take").unwrap();
    let field = |name: &str| take.fields.get(name).map(String::as_str);
    assert_eq!((field("requests"), field("throttled"), field("retries")), (Some("3"), Some("1"), Some("1")));
}
