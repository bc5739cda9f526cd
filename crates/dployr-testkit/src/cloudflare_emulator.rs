//! A Cloudflare Workers KV emulator for tests: Cloudflare cannot be reached
//! from where dployr is built and tested, so this serves, on a loopback
//! port, the subset of the REST API v4 that `dployr_kv::CloudflareKv` calls,
//! with Cloudflare's documented answers (raw bytes on a value read, the JSON
//! envelope elsewhere, its error codes and limits). HTTP is spoken by
//! `tiny_http`; this module only routes and answers.
//!
//! Time is the emulator's own: [`CloudflareEmulator::advance`] moves it, so
//! TTL expiry is tested without sleeping, and it is also the server's clock
//! skew (its `Date` header and every expiry check use it). Expiry counts
//! whole seconds, and a listing page is `limit` keys of the namespace from
//! which expired ones are then left out, so a page may be short or empty
//! and still have a cursor, as Cloudflare documents.
//! [`CloudflareEmulator::fail_next`] makes it answer 429 or 5xx (or any
//! status; a 404 comes as a proxy's HTML page) to exercise retries;
//! [`CloudflareEmulator::fail_next_with_code`] picks the error code too
//! (10048, the free plan's daily limit, on a 429),
//! [`CloudflareEmulator::answer_next_without_envelope`] answers as a proxy
//! may (a 204 without a body, a 200 HTML page) and
//! [`CloudflareEmulator::redirect_next`] with a redirect. A path the API
//! does not have is answered as Cloudflare does: 400, code 7000 "No route
//! for that URI".
//!
//! What Cloudflare documents about its consistency and limits can be switched
//! on, one at a time, so that tests prove the client and `KvStore` against
//! Workers KV as it really behaves, while the conformance suite runs against
//! the plain API: [`CloudflareEmulator::set_stale_reads`] (every read and
//! list sees the namespace as it was that long ago, as a cache in another
//! location does: up to 60 s there),
//! [`CloudflareEmulator::set_stale_lists`] (listings lag more than reads:
//! a key read where it was written shows at once, the listing later),
//! [`CloudflareEmulator::limit_writes_per_key`] (one write per second per
//! key, then 429), and [`CloudflareEmulator::set_request_budget`] (1200
//! requests per 5 minutes per account, then every call refused with 429
//! and `Retry-After` until the window has passed), and
//! [`CloudflareEmulator::set_date_header`] (a `Date` header on another
//! clock than the one expiries are counted by). Keys in a value's path are
//! percent-decoded only where the request says `url_encoded=true`, as on a
//! namespace whose `supports_url_encoding` is false, unless
//! [`CloudflareEmulator::set_namespace_decodes_keys`] says otherwise.
//!
//! ```no_run
//! let cf = dployr_testkit::CloudflareEmulator::start();
//! let url = cf.base_url(); // e.g. http://127.0.0.1:40123/client/v4
//! # drop(url);
//! ```

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::io::Read as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use percent_encoding::percent_decode_str;
use serde_json::{Value, json};
use tiny_http::{Header, Method, Request, Response, Server};

/// Cloudflare's limit on a key, in UTF-8 bytes.
const MAX_KEY_BYTES: usize = 512;
/// Cloudflare's limit on a value, in bytes (25 MiB).
const MAX_VALUE_BYTES: usize = 26_214_400;
/// Cloudflare's shortest TTL, in seconds.
const MIN_TTL_SECS: u64 = 60;

/// The longest `expiration_ttl` Cloudflare takes (2^31 − 1 s).
const MAX_TTL_SECS: u64 = i32::MAX as u64;

#[derive(Debug, Clone)]
struct Stored {
    value: Vec<u8>,
    /// Seconds since the Unix epoch, on the emulator's clock.
    expiration: Option<u64>,
}

/// One write of a key: the value it left (`None`: deleted) and when, in
/// ms on the emulator's clock.
#[derive(Debug)]
struct Version {
    stored: Option<Stored>,
    at_ms: u64,
}

/// Cloudflare's account budget: at most `limit` requests per `window`,
/// then every request refused until `window` has passed.
#[derive(Debug)]
struct Budget {
    limit: usize,
    window: Duration,
    /// When the requests of the current window came, in ms.
    seen: VecDeque<u64>,
    blocked_until_ms: u64,
}

/// An answer given instead of serving a request.
#[derive(Debug, Clone)]
enum Injected {
    /// This status with the code [`fail_next`](CloudflareEmulator::fail_next) gives it.
    Status(u16),
    /// This status with this Cloudflare error code.
    Code(u16, u32),
    /// This status and body as they are, without Cloudflare's envelope.
    Raw(u16, Vec<u8>),
    /// This redirect status, to the request's own URL.
    Redirect(u16),
}

#[derive(Debug, Default)]
struct State {
    /// Each key's writes, oldest first; only those a stale read may still
    /// see are kept.
    entries: BTreeMap<String, Vec<Version>>,
    /// How far the emulator's clock is ahead of the system clock.
    offset: Duration,
    /// Answers still to give instead of serving: (count, what).
    failures: Option<(u32, Injected)>,
    retry_after_secs: u64,
    /// How old the namespace a read sees is (zero: reads see every write).
    stale_reads: Duration,
    /// How old the namespace a listing sees is, where it lags more than reads.
    stale_lists: Option<Duration>,
    /// When each key was last written, in ms, if writes are limited to one per second per key.
    last_write_ms: Option<HashMap<String, u64>>,
    budget: Option<Budget>,
    /// How many of the keys of the next bulk deletes to report as
    /// unsuccessful, leaving them in place.
    unsuccessful_keys: usize,
    /// Whether a 429 leaves out `Retry-After` (and says when to retry only
    /// in its `Ratelimit` header).
    no_retry_after: bool,
    /// Which clock the `Date` header of each answer tells, if any.
    date_header: DateHeader,
    /// Whether the bulk endpoints answer as paths a server does not have.
    no_bulk_endpoints: bool,
    /// The namespace's `supports_url_encoding`: whether a key in a value's
    /// path is percent-decoded without `url_encoded=true`.
    decodes_keys: bool,
}

/// The clock an answer's `Date` header tells: a client cannot assume that
/// it is the clock the server counts expiries by.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DateHeader {
    /// The emulator's own clock, by which it counts expiries (default).
    #[default]
    EmulatorClock,
    /// The system's clock, whatever [`CloudflareEmulator::advance`] did to
    /// the emulator's (a front server that stamps its own `Date`; what an
    /// emulator whose HTTP server adds the header gives). tiny_http adds
    /// one where an answer has none, so "no `Date`" cannot be emulated.
    SystemClock,
}

impl State {
    fn now_ms(&self) -> u64 {
        // A clock moved past what `SystemTime` holds is later than every expiry.
        SystemTime::now()
            .checked_add(self.offset)
            .map_or(Some(u64::MAX), |now| {
                now.duration_since(UNIX_EPOCH).ok().map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            })
            .unwrap_or(0)
    }

    fn now_secs(&self) -> u64 {
        self.now_ms() / 1000
    }

    fn stale_ms(&self) -> u64 {
        millis(self.stale_reads)
    }

    /// What a read sees of `versions`: the newest write at least
    /// `stale_reads` old, if it is live.
    fn visible<'a>(&self, versions: &'a [Version]) -> Option<&'a Stored> {
        self.visible_from(versions, self.stale_ms())
    }

    /// What a listing sees of `versions`: as a read does, or older where
    /// listings lag more.
    fn listed<'a>(&self, versions: &'a [Version]) -> Option<&'a Stored> {
        let stale_ms = self.stale_lists.map_or(0, millis).max(self.stale_ms());
        self.visible_from(versions, stale_ms)
    }

    /// The newest of `versions` at least `stale_ms` old, if it is live.
    fn visible_from<'a>(&self, versions: &'a [Version], stale_ms: u64) -> Option<&'a Stored> {
        let (now_ms, now) = (self.now_ms(), self.now_secs());
        let horizon = now_ms.saturating_sub(stale_ms);
        versions
            .iter()
            .rev()
            .find(|version| version.at_ms <= horizon)
            .and_then(|version| version.stored.as_ref())
            .filter(|stored| stored.expiration.is_none_or(|at| at > now))
    }

    fn live(&self, key: &str) -> Option<&Stored> {
        self.visible(self.entries.get(key)?)
    }

    /// Records a write (`None`: a delete) and forgets what no read or
    /// listing can see any more.
    fn write(&mut self, key: &str, stored: Option<Stored>) {
        let now_ms = self.now_ms();
        let horizon = now_ms.saturating_sub(self.stale_lists.map_or(0, millis).max(self.stale_ms()));
        let versions = self.entries.entry(key.to_owned()).or_default();
        versions.push(Version { stored, at_ms: now_ms });
        while versions.len() > 1 && versions[1].at_ms <= horizon {
            versions.remove(0);
        }
        if versions.len() == 1 && versions[0].stored.is_none() && versions[0].at_ms <= horizon {
            self.entries.remove(key);
        }
    }

    /// A 429 if this write comes less than a second after the last one to `key`.
    fn throttle_write(&mut self, key: &str) -> Option<Answer> {
        let now_ms = self.now_ms();
        let last = self.last_write_ms.as_mut()?;
        if last.get(key).is_some_and(|at| now_ms < at + 1000) {
            return Some(too_many_requests(1, self.no_retry_after, false));
        }
        last.insert(key.to_owned(), now_ms);
        None
    }

    /// A 429 if the account budget is spent; otherwise counts this request.
    fn spend_budget(&mut self) -> Option<Answer> {
        let now_ms = self.now_ms();
        let no_retry_after = self.no_retry_after;
        let budget = self.budget.as_mut()?;
        let window_ms = u64::try_from(budget.window.as_millis()).unwrap_or(u64::MAX);
        if now_ms < budget.blocked_until_ms {
            return Some(too_many_requests((budget.blocked_until_ms - now_ms).div_ceil(1000), no_retry_after, true));
        }
        while budget.seen.front().is_some_and(|at| *at + window_ms <= now_ms) {
            budget.seen.pop_front();
        }
        if budget.seen.len() >= budget.limit {
            budget.blocked_until_ms = now_ms + window_ms;
            budget.seen.clear();
            return Some(too_many_requests(window_ms.div_ceil(1000), no_retry_after, true));
        }
        budget.seen.push_back(now_ms);
        None
    }
}

struct Shared {
    account_id: String,
    namespace_id: String,
    api_token: String,
    state: Mutex<State>,
    requests: AtomicU64,
}

impl Shared {
    /// The state; a panic in a handler cannot leave it half-changed (each
    /// change is one map operation), so a poisoned lock is taken over.
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A running emulator; it stops when dropped.
pub struct CloudflareEmulator {
    shared: Arc<Shared>,
    server: Arc<Server>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    base_url: String,
}

impl fmt::Debug for CloudflareEmulator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CloudflareEmulator").field("base_url", &self.base_url).finish_non_exhaustive()
    }
}

impl CloudflareEmulator {
    /// Starts an emulator on a free loopback port with a random account id,
    /// namespace id and API token.
    ///
    /// # Panics
    /// If no loopback port can be bound: a test cannot go on without it.
    pub fn start() -> Self {
        let server = match Server::http("127.0.0.1:0") {
            Ok(server) => Arc::new(server),
            Err(error) => panic!("cannot start the Cloudflare KV emulator: {error}"),
        };
        let port = server.server_addr().to_ip().map_or(0, |addr| addr.port());
        let shared = Arc::new(Shared {
            account_id: random_hex(16),
            namespace_id: random_hex(16),
            api_token: random_hex(20),
            state: Mutex::new(State { retry_after_secs: 1, ..State::default() }),
            requests: AtomicU64::new(0),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (server, shared, stop) = (Arc::clone(&server), Arc::clone(&shared), Arc::clone(&stop));
            std::thread::Builder::new()
                .name("cloudflare-emulator".into())
                .spawn(move || serve(&server, &shared, &stop))
                .unwrap_or_else(|error| panic!("cannot start the emulator thread: {error}"))
        };
        Self { shared, server, stop, thread: Some(thread), base_url: format!("http://127.0.0.1:{port}/client/v4") }
    }

    /// The API root, like `https://api.cloudflare.com/client/v4`.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// The account the emulator serves.
    pub fn account_id(&self) -> &str {
        &self.shared.account_id
    }

    /// The namespace the emulator serves; any other answers 10013.
    pub fn namespace_id(&self) -> &str {
        &self.shared.namespace_id
    }

    /// The bearer token it accepts (40 hexadecimal digits); another token of
    /// that form answers 403 / 10000, one of another form (not 40 letters,
    /// digits, `-` or `_`) 400 / 6003, as Cloudflare answers each.
    pub fn api_token(&self) -> &str {
        &self.shared.api_token
    }

    /// Moves the emulator's clock forward, so entries with a TTL expire.
    /// Without a matching move of the client's clock, this is the server's
    /// clock skew: Cloudflare checks expirations on its own clock.
    pub fn advance(&self, by: Duration) {
        let mut state = self.shared.state();
        state.offset = state.offset.saturating_add(by);
    }

    /// Makes every value read and list see the namespace as it was `delay`
    /// ago (zero, the default: reads see every write at once). Cloudflare
    /// documents up to 60 s before a write is seen in other locations.
    pub fn set_stale_reads(&self, delay: Duration) {
        self.shared.state().stale_reads = delay;
    }

    /// Makes every listing see the namespace as it was `delay` ago, while
    /// reads keep [`set_stale_reads`](Self::set_stale_reads)' delay (the
    /// longer of the two counts for listings): Cloudflare serves a key read
    /// where it was written at once as a rule, and documents listings as
    /// eventually consistent, cached apart from the keys.
    pub fn set_stale_lists(&self, delay: Duration) {
        self.shared.state().stale_lists = Some(delay);
    }

    /// Allows one write (put or delete) per second per key, as Cloudflare
    /// does; a faster one is answered 429 with `Retry-After: 1`. Off by default.
    pub fn limit_writes_per_key(&self, on: bool) {
        self.shared.state().last_write_ms = on.then(HashMap::new);
    }

    /// Refuses requests beyond `limit` per `window`, as Cloudflare's account
    /// budget does (1200 per 5 minutes): once it is spent, every request is
    /// answered 429 with a `Retry-After` of the rest of the block, which
    /// lasts `window`. `None` (the default) turns it off.
    pub fn set_request_budget(&self, budget: Option<(usize, Duration)>) {
        self.shared.state().budget =
            budget.map(|(limit, window)| Budget { limit, window, seen: VecDeque::new(), blocked_until_ms: 0 });
    }

    /// Answers every 429 without a `Retry-After` header: one of a spent
    /// quota (the account budget, an injected 429) says when it resets only
    /// in the `Ratelimit` header (`"default";r=0;t=<seconds>`), as
    /// Cloudflare's REST API lists its quotas (`retry-after` is documented
    /// as a later addition); a key's one write per second, nothing at all.
    /// Off by default.
    pub fn omit_retry_after(&self, on: bool) {
        self.shared.state().no_retry_after = on;
    }

    /// Serves no bulk endpoint (`POST .../bulk/get`, `.../bulk/delete`):
    /// they answer 404 with a plain page, as a server whose router lacks
    /// them does (an older API, a proxy, an emulator of the basic calls).
    /// Off by default.
    pub fn without_bulk_endpoints(&self, on: bool) {
        self.shared.state().no_bulk_endpoints = on;
    }

    /// Whether the namespace percent-decodes a key written in a value's path
    /// when the request does not say `url_encoded=true`: Cloudflare's
    /// namespace field `supports_url_encoding` ("True if keys written on the
    /// URL will be URL-decoded before storing"). Off by default, as on a
    /// namespace where it is false: such a namespace stores `a%3Ab` as those
    /// five characters, and a client that escapes more than it must then
    /// never finds its keys by listing their prefix. With `url_encoded=true`
    /// every key is decoded.
    pub fn set_namespace_decodes_keys(&self, on: bool) {
        self.shared.state().decodes_keys = on;
    }

    /// Which clock the `Date` header of later answers tells
    /// ([`DateHeader::EmulatorClock`] by default).
    pub fn set_date_header(&self, date: DateHeader) {
        self.shared.state().date_header = date;
    }

    /// Leaves the next `n` keys that bulk deletes are asked for in place and
    /// reports them in the answer's `unsuccessful_keys`, which Cloudflare's
    /// API documents as keys "that failed to be fully updated. They should
    /// be retried." (The rest of each request is deleted.)
    pub fn fail_bulk_delete_keys(&self, n: usize) {
        self.shared.state().unsuccessful_keys = n;
    }

    /// Answers the next `n` requests with `status` instead of serving them:
    /// 429 carries code 971 and a `retry-after` header, 401/403 code 10000,
    /// anything else code 10001 (200 too: `"success": false` in a 200, which
    /// the API's envelope allows).
    pub fn fail_next(&self, n: u32, status: u16) {
        self.inject(n, Injected::Status(status));
    }

    /// Answers the next `n` requests with `status` and Cloudflare's error
    /// envelope carrying `code` (a 429 also carries a `retry-after`
    /// header): 10048 on a 429 is the free plan's daily limit of an
    /// operation, which lasts until 00:00 UTC.
    pub fn fail_next_with_code(&self, n: u32, status: u16, code: u32) {
        self.inject(n, Injected::Code(status, code));
    }

    /// Answers the next `n` requests with `status` and `body` as they are,
    /// without Cloudflare's envelope, as a proxy or a wrong host may: a 204
    /// with no body, a 200 HTML page. Nothing is served.
    pub fn answer_next_without_envelope(&self, n: u32, status: u16, body: &[u8]) {
        self.inject(n, Injected::Raw(status, body.to_vec()));
    }

    /// Answers the next `n` requests with the redirect `status` (301, 302,
    /// 303, 307, 308) to the request's own URL, as a proxy may: a client
    /// that follows a 303 sends a PUT again as a GET.
    pub fn redirect_next(&self, n: u32, status: u16) {
        self.inject(n, Injected::Redirect(status));
    }

    fn inject(&self, n: u32, injected: Injected) {
        self.shared.state().failures = (n > 0).then_some((n, injected));
    }

    /// The `retry-after` seconds sent with a 429 (default 1).
    pub fn set_retry_after(&self, secs: u64) {
        self.shared.state().retry_after_secs = secs;
    }

    /// Requests received so far, failed ones included.
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// Every live key, with its value, as last written (stale reads aside;
    /// for tests that look at what was stored).
    pub fn entries(&self) -> Vec<(String, Vec<u8>)> {
        let state = self.shared.state();
        let now = state.now_secs();
        state
            .entries
            .iter()
            .filter_map(|(key, versions)| Some((key, versions.last()?.stored.as_ref()?)))
            .filter(|(_, stored)| stored.expiration.is_none_or(|at| at > now))
            .map(|(key, stored)| (key.clone(), stored.value.clone()))
            .collect()
    }
}

impl Drop for CloudflareEmulator {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.server.unblock();
        if let Some(thread) = self.thread.take() {
            // A panicked handler thread has nothing left to clean up.
            let _ = thread.join();
        }
    }
}

fn random_hex(bytes: usize) -> String {
    (0..bytes).map(|_| format!("{:02x}", rand::random::<u8>())).collect()
}

fn serve(server: &Server, shared: &Shared, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        match server.recv_timeout(Duration::from_millis(100)) {
            Ok(Some(request)) => {
                shared.requests.fetch_add(1, Ordering::SeqCst);
                let mut request = request;
                let response = answer(shared, &mut request);
                // The client may have gone away; nothing to do about it.
                let _ = request.respond(response);
            }
            Ok(None) => {}
            Err(_) => break,
        }
    }
}

type Answer = Response<std::io::Cursor<Vec<u8>>>;

fn header(name: &str, value: &str) -> Option<Header> {
    Header::from_bytes(name.as_bytes(), value.as_bytes()).ok()
}

fn envelope(status: u16, body: &Value) -> Answer {
    let mut response = Response::from_data(body.to_string().into_bytes()).with_status_code(status);
    if let Some(h) = header("Content-Type", "application/json") {
        response.add_header(h);
    }
    response
}

/// Cloudflare's error codes the emulator answers with (as the API does).
const AUTHENTICATION_ERROR: u32 = 10000;
const INVALID_REQUEST_HEADERS: u32 = 6003;
const NAMESPACE_NOT_FOUND: u32 = 10013;
const KEY_NOT_FOUND: u32 = 10009;
const RATE_LIMITED: u32 = 971;
const DAILY_LIMIT: u32 = 10048;
const NO_ROUTE: u32 = 7000;

/// Whether `token` has the form of a Cloudflare API token (40 characters of
/// letters, digits, `-` and `_`). Cloudflare answers a bearer token of
/// another form before looking it up, with a 400 of its own.
fn is_token_shaped(token: &str) -> bool {
    token.len() == 40 && token.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Cloudflare's answer to an `Authorization` header it cannot read: a 400,
/// code 6003 with the header named in its `error_chain` (6111).
fn malformed_authorization() -> Answer {
    envelope(
        400,
        &json!({
            "success": false,
            "errors": [{
                "code": INVALID_REQUEST_HEADERS,
                "message": "Invalid request headers",
                "error_chain": [{ "code": 6111, "message": "Invalid format for Authorization header" }]
            }],
            "messages": [],
            "result": null
        }),
    )
}

fn error(status: u16, code: u32, message: &str) -> Answer {
    envelope(
        status,
        &json!({ "success": false, "errors": [{ "code": code, "message": message }], "messages": [], "result": null }),
    )
}

fn ok(result: &Value) -> Answer {
    envelope(200, &json!({ "success": true, "errors": [], "messages": [], "result": result }))
}

/// The answer, with a `Date` header on the emulator's clock (as a server
/// whose clock is skewed would send), or as [`DateHeader`] says.
fn answer(shared: &Shared, request: &mut Request) -> Answer {
    let mut response = route(shared, request);
    // HTTP dates end with year 9999 (`httpdate` panics past it); a clock
    // moved further still sends the last one.
    const LAST_HTTP_DATE_MS: u64 = 253_402_300_799_000;
    let state = shared.state();
    let now = match state.date_header {
        DateHeader::EmulatorClock => UNIX_EPOCH + Duration::from_millis(state.now_ms().min(LAST_HTTP_DATE_MS)),
        DateHeader::SystemClock => SystemTime::now(),
    };
    drop(state);
    if let Some(h) = header("Date", &httpdate::fmt_http_date(now)) {
        response.add_header(h);
    }
    response
}

fn route(shared: &Shared, request: &mut Request) -> Answer {
    {
        let mut state = shared.state();
        if let Some((n, injected)) = state.failures.take() {
            let answer = injected_failure(&injected, request.url(), state.retry_after_secs, state.no_retry_after);
            state.failures = (n > 1).then_some((n - 1, injected));
            return answer;
        }
        if let Some(refused) = state.spend_budget() {
            return refused;
        }
    }
    let authorization =
        request.headers().iter().find(|h| h.field.equiv("Authorization")).map(|h| h.value.as_str().to_owned());
    let token = authorization.as_deref().and_then(|value| value.strip_prefix("Bearer "));
    if !token.is_some_and(is_token_shaped) {
        return malformed_authorization();
    }
    if token != Some(shared.api_token.as_str()) {
        return error(403, AUTHENTICATION_ERROR, "Authentication error");
    }
    let url = request.url().to_owned();
    let (path, query) = url.split_once('?').unwrap_or((url.as_str(), ""));
    let query: BTreeMap<String, String> = url::form_urlencoded::parse(query.as_bytes()).into_owned().collect();
    let Some(rest) = path.strip_prefix("/client/v4/accounts/") else {
        return no_route();
    };
    let mut parts = rest.splitn(6, '/');
    let (account, storage, kv, namespaces, namespace, tail) =
        (parts.next(), parts.next(), parts.next(), parts.next(), parts.next(), parts.next());
    if (storage, kv, namespaces) != (Some("storage"), Some("kv"), Some("namespaces")) {
        return no_route();
    }
    if account != Some(shared.account_id.as_str()) {
        return error(404, 7003, "Could not route to /accounts, perhaps your object identifier is invalid?");
    }
    if namespace != Some(shared.namespace_id.as_str()) {
        return error(404, NAMESPACE_NOT_FOUND, "namespace not found");
    }
    let tail = tail.unwrap_or_default();
    if tail == "bulk/get" || tail == "bulk/delete" {
        if shared.state().no_bulk_endpoints {
            return raw_answer(404, b"<html><body>Not Found</body></html>".to_vec());
        }
        if request.method() != &Method::Post {
            return error(405, AUTHENTICATION_ERROR, "method not allowed");
        }
        let mut body = Vec::new();
        // One byte past the limit tells a body over it from one at it: a
        // body cut short would be parsed as something it is not.
        if request.as_reader().take(BULK_BODY_BYTES + 1).read_to_end(&mut body).is_err() {
            return error(400, 10001, "could not read the request body");
        }
        if body.len() as u64 > BULK_BODY_BYTES {
            return error(413, 10011, "the request body is larger than 100 MB");
        }
        return if tail == "bulk/get" { bulk_get(shared, &body) } else { bulk_delete(shared, &body) };
    }
    if tail == "keys" {
        return match request.method() {
            Method::Get => list(shared, &query),
            _ => error(405, AUTHENTICATION_ERROR, "method not allowed"),
        };
    }
    let Some(encoded) = tail.strip_prefix("values/") else {
        return no_route();
    };
    let decoded = query.get("url_encoded").is_some_and(|v| v == "true") || shared.state().decodes_keys;
    let key = if decoded {
        let Ok(key) = percent_decode_str(encoded).decode_utf8() else {
            return error(400, 10021, "key is not valid UTF-8");
        };
        key.into_owned()
    } else {
        encoded.to_owned()
    };
    if key.is_empty() || key == "." || key == ".." {
        return error(400, 10020, "Invalid key: a key must not be empty, `.` or `..`");
    }
    if key.len() > MAX_KEY_BYTES {
        return error(414, 10033, "UTF-8 encoded length of key exceeds 512 bytes");
    }
    match request.method() {
        Method::Get => get(shared, &key),
        Method::Put => {
            let mut body = Vec::new();
            let read = request.as_reader().take(MAX_VALUE_BYTES as u64 + 1).read_to_end(&mut body);
            if read.is_err() {
                return error(400, 10001, "could not read the request body");
            }
            put(shared, &key, body, &query)
        }
        Method::Delete => {
            let mut state = shared.state();
            if let Some(refused) = state.throttle_write(&key) {
                return refused;
            }
            state.write(&key, None);
            ok(&Value::Null)
        }
        _ => error(405, AUTHENTICATION_ERROR, "method not allowed"),
    }
}

/// Cloudflare's answer to a path the API does not have (a base URL
/// without `/client/v4`): a 400, not a 404, as reported in
/// terraform-provider-cloudflare#1097 ("HTTP status 400: No route for that
/// URI (7000)").
fn no_route() -> Answer {
    error(400, NO_ROUTE, "No route for that URI")
}

/// Cloudflare's 429: code 971 and a `Retry-After` in seconds; with
/// `no_retry_after`, none, and for a spent quota (`quota`, not a key's one
/// write per second) the same wait in the `Ratelimit` header.
fn too_many_requests(retry_after_secs: u64, no_retry_after: bool, quota: bool) -> Answer {
    let refused = error(429, RATE_LIMITED, "Please wait and consider throttling your request speed");
    if no_retry_after {
        return if quota { with_spent_quota(refused, retry_after_secs) } else { refused };
    }
    with_retry_after(refused, retry_after_secs)
}

/// `response` with a `Ratelimit` header saying its quota is spent for `secs`.
fn with_spent_quota(mut response: Answer, secs: u64) -> Answer {
    if let Some(h) = header("Ratelimit", &format!("\"default\";r=0;t={secs}")) {
        response.add_header(h);
    }
    response
}

fn with_retry_after(mut response: Answer, retry_after_secs: u64) -> Answer {
    if let Some(h) = header("Retry-After", &retry_after_secs.to_string()) {
        response.add_header(h);
    }
    response
}

/// `status` and `body` as they are; an HTML page if there is a body.
fn raw_answer(status: u16, body: Vec<u8>) -> Answer {
    let has_body = !body.is_empty();
    let mut response = Response::from_data(body).with_status_code(status);
    if has_body && let Some(h) = header("Content-Type", "text/html") {
        response.add_header(h);
    }
    response
}

fn injected_failure(injected: &Injected, url: &str, retry_after_secs: u64, no_retry_after: bool) -> Answer {
    match *injected {
        Injected::Status(429) => too_many_requests(retry_after_secs, no_retry_after, true),
        // What a proxy or a wrong host answers: no Cloudflare envelope.
        Injected::Status(404) => raw_answer(404, b"<html><body><h1>404 Not Found</h1></body></html>".to_vec()),
        Injected::Status(status @ (401 | 403)) => error(status, AUTHENTICATION_ERROR, "Authentication error"),
        Injected::Status(status) => error(status, 10001, "Internal server error"),
        Injected::Code(status, code) => {
            let message = match code {
                DAILY_LIMIT => "free usage limit for this operation for today",
                RATE_LIMITED => "Please wait and consider throttling your request speed",
                _ => "injected failure",
            };
            let answer = error(status, code, message);
            match (status, no_retry_after) {
                (429, false) => with_retry_after(answer, retry_after_secs),
                (429, true) => with_spent_quota(answer, retry_after_secs),
                _ => answer,
            }
        }
        Injected::Raw(status, ref body) => raw_answer(status, body.clone()),
        Injected::Redirect(status) => {
            let mut response = raw_answer(status, Vec::new());
            if let Some(h) = header("Location", url) {
                response.add_header(h);
            }
            response
        }
    }
}

/// The most request body a bulk call takes: Cloudflare's documented limit of
/// a bulk write's body, 100 MB. (10 000 keys of 512 bytes each, escaped as
/// JSON, reach about 30 MB: `\u0001` is six bytes for one.)
const BULK_BODY_BYTES: u64 = 100 * 1000 * 1000;

/// Why Cloudflare would refuse `key` in a bulk body, if it would.
fn refused_key(key: &str) -> Option<Answer> {
    if key.is_empty() || key == "." || key == ".." {
        return Some(error(400, 10020, "Invalid key: a key must not be empty, `.` or `..`"));
    }
    (key.len() > MAX_KEY_BYTES).then(|| error(414, 10033, "UTF-8 encoded length of key exceeds 512 bytes"))
}

/// `POST .../bulk/get`: `{"keys": [...up to 100], "type": "text"}` answered
/// with `{"values": {key: value or null}}`, each read as a single read
/// sees it (stale reads included). Values must be text, as Cloudflare
/// documents ("Keys must contain text-based values").
fn bulk_get(shared: &Shared, body: &[u8]) -> Answer {
    let asked: Option<(Vec<String>, Option<String>)> = serde_json::from_slice::<Value>(body).ok().and_then(|body| {
        let keys: Option<Vec<String>> =
            body.get("keys")?.as_array()?.iter().map(|key| key.as_str().map(str::to_owned)).collect();
        let kind = body.get("type").and_then(Value::as_str).map(str::to_owned);
        Some((keys?, kind))
    });
    let Some((keys, kind)) = asked else {
        return error(400, 10001, "the body is not {\"keys\": [...]}");
    };
    if keys.is_empty() || keys.len() > 100 {
        return error(400, 10001, "keys: between 1 and 100 keys");
    }
    if kind.as_deref().is_some_and(|kind| kind != "text") {
        return error(400, 10001, "the emulator answers type text only");
    }
    if let Some(refused) = keys.iter().find_map(|key| refused_key(key)) {
        return refused;
    }
    let state = shared.state();
    let mut values = serde_json::Map::new();
    for key in &keys {
        let value = match state.live(key) {
            None => Value::Null,
            Some(stored) => match std::str::from_utf8(&stored.value) {
                Ok(text) => Value::String(text.to_owned()),
                Err(_) => return error(400, 10001, "a value asked for as text is not text"),
            },
        };
        values.insert(key.clone(), value);
    }
    ok(&json!({ "values": values }))
}

/// `POST .../bulk/delete`: a JSON array of up to 10 000 keys, each deleted
/// as a single delete would be (one write per second per key: a key written
/// in the last second refuses the whole request with a 429, nothing
/// deleted).
fn bulk_delete(shared: &Shared, body: &[u8]) -> Answer {
    let Ok(keys) = serde_json::from_slice::<Vec<String>>(body) else {
        return error(400, 10001, "the body is not an array of keys");
    };
    if keys.len() > 10_000 {
        return error(400, 10001, "at most 10000 keys");
    }
    if let Some(refused) = keys.iter().find_map(|key| refused_key(key)) {
        return refused;
    }
    let mut state = shared.state();
    let now_ms = state.now_ms();
    if let Some(last) = &state.last_write_ms
        && keys.iter().any(|key| last.get(key).is_some_and(|at| now_ms < at + 1000))
    {
        return too_many_requests(1, state.no_retry_after, false);
    }
    let failing = state.unsuccessful_keys.min(keys.len());
    state.unsuccessful_keys -= failing;
    let (unsuccessful, deleted) = keys.split_at(failing);
    for key in deleted {
        if let Some(last) = state.last_write_ms.as_mut() {
            last.insert(key.clone(), now_ms);
        }
        state.write(key, None);
    }
    ok(&json!({ "successful_key_count": deleted.len(), "unsuccessful_keys": unsuccessful }))
}

fn get(shared: &Shared, key: &str) -> Answer {
    let state = shared.state();
    let Some(stored) = state.live(key) else {
        return error(404, KEY_NOT_FOUND, "get: 'key not found'");
    };
    let mut response = Response::from_data(stored.value.clone());
    if let Some(h) = header("Content-Type", "application/octet-stream") {
        response.add_header(h);
    }
    if let Some(h) = stored.expiration.and_then(|at| header("Expiration", &at.to_string())) {
        response.add_header(h);
    }
    response
}

fn put(shared: &Shared, key: &str, value: Vec<u8>, query: &BTreeMap<String, String>) -> Answer {
    if value.len() > MAX_VALUE_BYTES {
        return error(413, 10011, "Value length of 26214401 exceeds limit of 26214400");
    }
    let mut state = shared.state();
    let now = state.now_secs();
    let expiration = if let Some(ttl) = query.get("expiration_ttl") {
        match ttl.parse::<u64>() {
            Ok(ttl) if (MIN_TTL_SECS..=MAX_TTL_SECS).contains(&ttl) => Some(now + ttl),
            Ok(ttl) if ttl > MAX_TTL_SECS => {
                return error(
                    400,
                    10019,
                    &format!("Invalid expiration_ttl of {ttl}. Expiration TTL must be at most {MAX_TTL_SECS}."),
                );
            }
            _ => {
                return error(
                    400,
                    10019,
                    &format!("Invalid expiration_ttl of {ttl}. Expiration TTL must be at least {MIN_TTL_SECS}."),
                );
            }
        }
    } else if let Some(at) = query.get("expiration") {
        match at.parse::<u64>() {
            Ok(at) if at >= now + MIN_TTL_SECS => Some(at),
            _ => {
                return error(
                    400,
                    10019,
                    &format!(
                        "Invalid expiration of {at}. Expiration times must be at least {MIN_TTL_SECS} seconds in the future."
                    ),
                );
            }
        }
    } else {
        None
    };
    if let Some(refused) = state.throttle_write(key) {
        return refused;
    }
    state.write(key, Some(Stored { value, expiration }));
    ok(&Value::Null)
}

/// `duration` in whole milliseconds, saturating.
fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn list(shared: &Shared, query: &BTreeMap<String, String>) -> Answer {
    let limit = match query.get("limit").map(|l| l.parse::<usize>()) {
        None => 1000,
        Some(Ok(limit)) if (10..=1000).contains(&limit) => limit,
        Some(_) => return error(400, 10026, "Invalid key limit: must be between 10 and 1000"),
    };
    let prefix = query.get("prefix").cloned().unwrap_or_default();
    let after = match query.get("cursor").filter(|c| !c.is_empty()) {
        None => None,
        Some(cursor) => match hex::decode(cursor).ok().and_then(|bytes| String::from_utf8(bytes).ok()) {
            Some(after) => Some(after),
            None => return error(400, 10007, "Invalid cursor"),
        },
    };
    let state = shared.state();
    // As Cloudflare documents: a page is `limit` keys of the namespace's
    // listing, from which the deleted and expired ones are then left out,
    // so a page may hold fewer keys than asked, none at all, and still
    // have a cursor (a client must follow the cursor, never stop at a short
    // or empty page).
    let mut scanned: Vec<(&String, Option<&Stored>)> = state
        .entries
        .iter()
        .filter(|(key, _)| key.starts_with(&prefix) && after.as_ref().is_none_or(|after| *key > after))
        .map(|(key, versions)| (key, state.listed(versions)))
        .take(limit + 1)
        .collect();
    let more = scanned.len() > limit;
    scanned.truncate(limit);
    let cursor = match (more, scanned.last()) {
        (true, Some((key, _))) => hex::encode(key.as_bytes()),
        _ => String::new(),
    };
    let page: Vec<(&String, &Stored)> = scanned.into_iter().filter_map(|(key, stored)| Some((key, stored?))).collect();
    let keys: Vec<Value> = page
        .iter()
        .map(|(key, stored)| match stored.expiration {
            Some(at) => json!({ "name": key, "expiration": at }),
            None => json!({ "name": key }),
        })
        .collect();
    envelope(
        200,
        &json!({
            "success": true, "errors": [], "messages": [], "result": keys,
            "result_info": { "count": keys.len(), "cursor": cursor },
        }),
    )
}
