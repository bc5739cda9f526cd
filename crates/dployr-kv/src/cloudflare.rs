//! The Cloudflare Workers KV backend: the seed's production store, reached
//! over the REST API v4 with `reqwest`.
//!
//! What Cloudflare allows is checked up front, so a bad call fails with
//! [`StoreError::Invalid`] before any request: keys of 1 to 512 UTF-8 bytes,
//! not `.` or `..`; values up to 25 MiB; TTLs of at least 60 s (a TTL is
//! sent rounded up to whole seconds, plus one so that the server's count in
//! whole seconds never ends an entry early, and one longer than the API
//! takes, 2^31 − 1 s, is clamped to it); list limits of 10 to 1000.
//!
//! **Answers.** Only a 404 with Cloudflare's code 10009 means "no such key".
//! Any other 404 (7003 for an unknown account, 10013 for an unknown
//! namespace, a proxy's HTML page), and code 7000 "No route for that URI"
//! (a base URL without `/client/v4`, which Cloudflare answers with a 400,
//! not a 404), is a [`StoreError::Configuration`] naming what to check:
//! reading it as "missing" would sign every user out silently, and reading
//! the 400 as the caller's bad request would hide the setting to fix. A
//! rejected token (401/403, code 10000, or code 6003 for a token Cloudflare
//! cannot even read) names [`API_TOKEN_VAR`]. A write, a delete or a list
//! is done only if the answer is a 2xx whose envelope says `"success":
//! true`; a 2xx without it (a proxy's 204 without a body, an HTML page) is
//! a [`StoreError::Backend`], never taken as done. (A value read answers
//! with the value's bytes, no envelope.) Redirects are not followed (a
//! client that follows a 303 sends a PUT again as a GET): a 3xx is a
//! [`StoreError::Configuration`] naming [`API_BASE_URL_VAR`], since
//! Cloudflare's API does not redirect and a proxy or a wrong base URL does.
//!
//! **Retries.** Throttling (429), server errors (5xx) and lost connections
//! are retried with exponential backoff and jitter, honouring `retry-after`,
//! bounded in attempts and in total time *including the requests
//! themselves* ([`RetryPolicy`]); then the call fails with
//! [`StoreError::Unavailable`]; a lost connection is reported by its cause
//! alone, without the request's URL (which names the account, the
//! namespace and the key). Each retry is a `tracing` event (target
//! `dployr.kv.cloudflare`: status, attempt, wait), and the client counts its
//! requests, 429s and retries ([`CloudflareKv::request_counts`], and the
//! fields of each operation's `dployr.store` span), because Cloudflare's
//! account budget (1200 requests per 5 minutes, then 5 minutes of 429s) is
//! what a deployment plans against. A 429 with code 10048, the free plan's
//! daily limit of an operation, is not retried: it lasts until 00:00 UTC,
//! so the call fails at once with [`StoreError::Unavailable`] saying so,
//! without spending that budget on retries that cannot succeed.
//!
//! **Consistency.** Workers KV is eventually consistent (a write may take up
//! to 60 s to be seen elsewhere), allows one write per second per key, and
//! has no atomic read-and-delete, counter or conditional write:
//! [`KvBackend::take`] and [`KvBackend::increment`] are a read followed by a
//! write here, so two concurrent takes may both see the value and two
//! concurrent increments may return the same number ([`KvLimits::atomic`] is
//! `false`); [`KvBackend::replace`] is the trait's default, a read then a
//! put, so a delete that lands between them (or that a stale read does not
//! show yet) is undone. One-time records
//! (OAuth state, codes, attempt counters) therefore belong on a consistent
//! backend (see `KvStore::with_backends`).
//!
//! **Time.** The counter keeps its expiry by sending again the absolute
//! `expiration` the server gave it, or near its end a relative
//! `expiration_ttl` computed against the server's clock (its `Date` header),
//! never an absolute time from the local clock: Cloudflare checks "at least
//! 60 s in the future" on its own clock, and a skewed host would be refused.
//! That TTL is the seconds left, sent without the second more a caller's
//! TTL gets, so the expiry stays where it was (later only by the seconds
//! the write takes to land). With less than Cloudflare's 60 s left, the
//! expiry cannot be kept: the counter is written with 60 s, so it ends up to
//! a minute late, never early, and one counted again within its last minute
//! each time lives a minute past that count. A server whose `Date` tells
//! another clock than the one it counts expiries by may refuse the absolute
//! second as too soon: the write is sent again once, as the seconds left
//! (the more of what the local clock and the read's `Date` leave, at least
//! 60), which ends it then or later.
//!
//! **Answers.** A missing key is a 404 whose errors carry code 10009
//! (whichever entry, its code a number or a number as text). A server
//! without the bulk endpoints (405, code 7000, or a 404 naming no
//! Cloudflare error) is read and deleted key by key; where it says so
//! itself (405, 7000) the client does not ask it again. No answer is read
//! past the longest its request can get (a value's GET: 25 MiB, the value
//! limit; any other: 30 MiB, above the longest list or bulk delete): a
//! longer one, a proxy's or a wrong base URL's, is `Backend` at once, not
//! retried, and holds no more memory than that. A bulk read whose values
//! are together too long for that is halved until they fit, down to a
//! `get` per key.
//!
//! **Runtimes.** The HTTP client is `reqwest`'s async one, driven by a
//! private tokio runtime that is created, run and dropped on a thread of its
//! own. A blocking `reqwest` client builds and drops a runtime on the
//! caller's thread, which panics inside `#[tokio::main]`; this one does not,
//! so the backend can be opened, used and dropped from any thread (dropped
//! on a runtime's thread, it does not wait for its runtime to stop). Calls
//! still block the calling thread until the answer comes: from async code,
//! call them in `tokio::task::spawn_blocking`.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dployr_domain::{
    KvBackend, KvLimits, KvPage, MAX_COUNTER, MAX_KEY_BYTES, MAX_VALUE_BYTES, StoreError, StoreResult,
    counter_at_its_largest, not_a_counter, parse_counter,
};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use rand::Rng as _;
use reqwest::header::HeaderMap;
use reqwest::{Client, RequestBuilder};
use serde::Deserialize;

/// Cloudflare's API root.
pub const CLOUDFLARE_API_URL: &str = "https://api.cloudflare.com/client/v4";

/// Environment variable holding the account id.
pub const ACCOUNT_ID_VAR: &str = "CLOUDFLARE_ACCOUNT_ID";
/// Environment variable holding the KV namespace id.
pub const NAMESPACE_ID_VAR: &str = "CLOUDFLARE_KV_NAMESPACE_ID";
/// Environment variable holding the API token.
pub const API_TOKEN_VAR: &str = "CLOUDFLARE_API_TOKEN";
/// Optional environment variable holding the API root (a proxy or a
/// regional endpoint); [`CLOUDFLARE_API_URL`] when unset. It ends in `/client/v4`.
pub const API_BASE_URL_VAR: &str = "CLOUDFLARE_API_BASE_URL";

/// Cloudflare's shortest TTL.
const MIN_TTL: Duration = Duration::from_secs(60);

/// The longest `expiration_ttl` the API takes: 2^31 − 1 seconds (about 68
/// years). Longer TTLs are clamped to it.
pub const MAX_EXPIRATION_TTL_SECS: u64 = i32::MAX as u64;

/// Cloudflare's error codes (the `errors[].code` of an answer) that this
/// client acts on. A missing key, the only 404 that means "missing".
const KEY_NOT_FOUND: u32 = 10009;
/// The API token is unknown or may not use Workers KV.
const AUTHENTICATION_ERROR: u32 = 10000;
/// "Invalid request headers", a 400 whose `error_chain` names the header:
/// 6111 "Invalid format for Authorization header" for a token that is not
/// of Cloudflare's form. The only header this client sets from
/// configuration is the token's, so it names [`API_TOKEN_VAR`].
const INVALID_REQUEST_HEADERS: u32 = 6003;
/// No such KV namespace in the account.
const NAMESPACE_NOT_FOUND: u32 = 10013;
/// No such account.
const ACCOUNT_NOT_FOUND: u32 = 7003;
/// "No route for that URI": a path the API does not have, as a base URL
/// without `/client/v4` makes. Cloudflare answers it with a 400.
const NO_ROUTE: u32 = 7000;
/// "Invalid cursor": a list cursor the API did not hand out (a 400).
const INVALID_CURSOR: u32 = 10007;
/// The free plan's daily limit of an operation is spent (a 429); it lasts
/// until 00:00 UTC, so no retry within a call can succeed.
const DAILY_LIMIT: u32 = 10048;

/// The longest answer read to any request but a value's GET (which may be
/// as long as a value, [`MAX_VALUE_BYTES`]): a bulk delete's list of the
/// keys it did not delete, 10 000 of 512 bytes, each byte a control
/// character that JSON spells `\u00XX` (6 bytes), and a megabyte for the
/// rest, about 30 MiB; a list of 1 000 keys with 1 024 bytes of metadata
/// each is at most 9 MiB. A bulk read whose values make a longer answer is
/// halved (see `read_in_bulk`).
const MAX_ANSWER_BYTES: usize = BULK_DELETE_KEYS * MAX_KEY_BYTES * 6 + 1024 * 1024;

/// The most keys one bulk read takes ("maximum of 100").
const BULK_GET_KEYS: usize = 100;

/// The size below which a bulk read Cloudflare refused to send as text (a
/// value that is not UTF-8) is read key by key rather than halved again.
const BISECT_DOWN_TO: usize = 8;

/// The most keys one bulk delete takes ("an array of up to 10,000 keys").
const BULK_DELETE_KEYS: usize = 10_000;
/// The least time left of a call's `max_elapsed` for which a request is
/// sent: below it, no answer could come in time.
const MIN_REQUEST_TIME: Duration = Duration::from_millis(50);
/// How many bulk deletes a chunk gets when Cloudflare reports keys of it
/// undone (`unsuccessful_keys`, "they should be retried").
const BULK_DELETE_ROUNDS: u32 = 3;

/// How throttled or failed requests are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Most attempts per call, the first included. Default 5.
    pub max_attempts: u32,
    /// Backoff before the second attempt; it doubles each time. Default 200 ms.
    pub initial_backoff: Duration,
    /// Longest backoff between two attempts. Default 5 s.
    pub max_backoff: Duration,
    /// Longest time one call of the backend takes, from its start, every
    /// request, retry and wait included (a `take`'s read and delete, every
    /// chunk of a bulk call): each request's timeout is cut to what is left
    /// of it, and a retry whose wait would use it up is not made. Default
    /// 30 s. (A `KvStore` operation may make two calls: a session and its
    /// index entry.)
    pub max_elapsed: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
            max_elapsed: Duration::from_secs(30),
        }
    }
}

/// Whether waiting `wait` more after `elapsed` reaches `bound`. Saturating:
/// a `Retry-After` comes from the network, and one of `u64::MAX` seconds
/// would overflow `elapsed + wait` (a panic) once a second has passed.
fn beyond(elapsed: Duration, wait: Duration, bound: Duration) -> bool {
    elapsed.saturating_add(wait) >= bound
}

impl RetryPolicy {
    /// The wait before attempt `attempt + 1` (`attempt` counts from 1):
    /// exponential, capped, with "equal jitter" (between half and all of it).
    fn backoff(&self, attempt: u32) -> Duration {
        let exponential = self.initial_backoff.saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
        let capped = exponential.min(self.max_backoff);
        let millis = u64::try_from(capped.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(rand::rng().random_range(millis / 2..=millis))
    }
}

/// Where and as whom the backend talks to Cloudflare.
#[derive(Clone, PartialEq, Eq)]
pub struct CloudflareConfig {
    /// The account id ([`ACCOUNT_ID_VAR`]).
    pub account_id: String,
    /// The Workers KV namespace id ([`NAMESPACE_ID_VAR`]).
    pub namespace_id: String,
    /// An API token with Workers KV Storage edit rights ([`API_TOKEN_VAR`]).
    /// Never printed.
    pub api_token: String,
    /// The API root ([`API_BASE_URL_VAR`]); [`CLOUDFLARE_API_URL`] by default.
    /// `https://`, or `http://` to this machine only (an emulator), without
    /// credentials: the token goes with every request.
    pub base_url: String,
    /// Retries of throttled and failed requests.
    pub retry: RetryPolicy,
    /// Timeout of one HTTP request (cut further by
    /// [`RetryPolicy::max_elapsed`]). Default 10 s.
    pub request_timeout: Duration,
}

impl fmt::Debug for CloudflareConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CloudflareConfig")
            .field("account_id", &self.account_id)
            .field("namespace_id", &self.namespace_id)
            .field("api_token", &"<redacted>")
            .field("base_url", &self.base_url)
            .field("retry", &self.retry)
            .field("request_timeout", &self.request_timeout)
            .finish()
    }
}

impl CloudflareConfig {
    /// A configuration for Cloudflare's API with default retries.
    pub fn new(account_id: impl Into<String>, namespace_id: impl Into<String>, api_token: impl Into<String>) -> Self {
        Self {
            account_id: account_id.into(),
            namespace_id: namespace_id.into(),
            api_token: api_token.into(),
            base_url: CLOUDFLARE_API_URL.to_owned(),
            retry: RetryPolicy::default(),
            request_timeout: Duration::from_secs(10),
        }
    }

    /// Reads [`ACCOUNT_ID_VAR`], [`NAMESPACE_ID_VAR`], [`API_TOKEN_VAR`] and,
    /// if set, [`API_BASE_URL_VAR`].
    ///
    /// # Errors
    /// [`StoreError::Configuration`] naming the first variable that is unset
    /// or empty, or not UTF-8 (never taken as unset: the base URL would be
    /// Cloudflare's own, not the one meant), or a base URL that is not
    /// `http(s)://`.
    pub fn from_env() -> StoreResult<Self> {
        Self::refuse_values_not_utf8()?;
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// [`StoreError::Configuration`] naming the first of this client's
    /// variables whose value in the process environment is not UTF-8.
    ///
    /// # Errors
    /// As said.
    pub fn refuse_values_not_utf8() -> StoreResult<()> {
        for name in [ACCOUNT_ID_VAR, NAMESPACE_ID_VAR, API_TOKEN_VAR, API_BASE_URL_VAR] {
            if let Err(std::env::VarError::NotUnicode(_)) = std::env::var(name) {
                return Err(StoreError::Configuration { setting: name, reason: "is not valid UTF-8".into() });
            }
        }
        Ok(())
    }

    /// [`from_env`](Self::from_env) through `var` (a variable's value,
    /// `None` when unset) instead of the process environment.
    ///
    /// ```
    /// use dployr_kv::CloudflareConfig;
    /// let vars = |name: &str| match name {
    ///     "CLOUDFLARE_ACCOUNT_ID" => Some("acc".to_owned()),
    ///     "CLOUDFLARE_KV_NAMESPACE_ID" => Some("ns".to_owned()),
    ///     "CLOUDFLARE_API_TOKEN" => Some("token".to_owned()),
    ///     "CLOUDFLARE_API_BASE_URL" => Some("https://proxy.example/client/v4/".to_owned()),
    ///     _ => None,
    /// };
    /// let config = CloudflareConfig::from_vars(vars)?;
    /// assert_eq!(config.base_url, "https://proxy.example/client/v4");
    /// # Ok::<(), dployr_domain::StoreError>(())
    /// ```
    ///
    /// # Errors
    /// As [`from_env`](Self::from_env).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> StoreResult<Self> {
        let var = |name: &str| var(name).map(|value| value.trim().to_owned()).filter(|value| !value.is_empty());
        let required = |name: &'static str| {
            var(name).ok_or(StoreError::Configuration { setting: name, reason: "is not set".into() })
        };
        let mut config = Self::new(required(ACCOUNT_ID_VAR)?, required(NAMESPACE_ID_VAR)?, required(API_TOKEN_VAR)?);
        if let Some(base_url) = var(API_BASE_URL_VAR) {
            config.base_url = checked_base_url(&base_url)?.url;
        }
        Ok(config)
    }
}

/// When a spent quota of the `Ratelimit` header frees again, for a 429
/// that carries no `Retry-After`: Cloudflare's REST API lists its quotas
/// there as `"name";r=<remaining>;t=<seconds until it resets>` items, and
/// documents `retry-after` as a later addition. Without it, a call into the
/// 5-minute block that follows a spent account budget would retry for
/// seconds, each attempt refused. The latest reset of the items with none
/// remaining; `None` if no item is spent or the header is absent.
fn spent_quota_resets_in(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let field = |item: &str, name: &str| {
        item.split(';').find_map(|part| part.trim().strip_prefix(name)?.strip_prefix('=')?.trim().parse::<u64>().ok())
    };
    headers
        .get_all("ratelimit")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter(|item| field(item, "r") == Some(0))
        .filter_map(|item| field(item, "t"))
        .max()
        .map(Duration::from_secs)
}

/// `base_url` without a trailing `/`, if it is an `http://` or `https://`
/// URL that parses (one that does not, a space in its host or a port out
/// of range, failed each request before it was sent, which was retried
/// for seconds and reported as a passing `Unavailable`). Plain `http://`
/// is for a local emulator only: to another host the API token would cross
/// the network unencrypted in every request's header. A URL with
/// credentials (`user:password@`) is refused without being shown: they
/// would go with every request and into every error that names the URL.
fn checked_base_url(base_url: &str) -> StoreResult<BaseUrl> {
    // First, and by the text: credentials may come in a malformed
    // spelling no parser finds (`https//user:pw@host`), the API's URL holds
    // no `@`, and every refusal below shows the URL.
    if base_url.contains('@') {
        return Err(StoreError::Configuration {
            setting: API_BASE_URL_VAR,
            reason: "holds credentials (user:password@), which would be sent with every request and shown in \
                     every error naming the URL; give the API's URL alone"
                .into(),
        });
    }
    let trimmed = base_url.trim().trim_end_matches('/');
    let refused = |why: String| StoreError::Configuration {
        setting: API_BASE_URL_VAR,
        reason: format!("is {base_url:?}{why}; give an http(s) URL such as {CLOUDFLARE_API_URL}").into(),
    };
    let scheme = trimmed.split_once("://").map(|(scheme, _)| scheme.to_ascii_lowercase());
    if !matches!(scheme.as_deref(), Some("https" | "http")) {
        return Err(refused(String::new()));
    }
    let url = reqwest::Url::parse(trimmed).map_err(|error| refused(format!(", not a URL ({error})")))?;
    // An IPv6 host comes bracketed (`[::1]`).
    let host = url.host_str().unwrap_or_default().trim_start_matches('[').trim_end_matches(']');
    let on_this_machine =
        host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if url.scheme() == "http" && !on_this_machine {
        return Err(refused(
            ", plain http to another machine: the API token would cross the network unencrypted (http is for an \
             emulator on 127.0.0.1, ::1 or localhost)"
                .into(),
        ));
    }
    Ok(BaseUrl { url: trimmed.to_owned(), on_this_machine })
}

/// A base URL [`checked_base_url`] took, and whether it names this machine.
#[derive(Debug)]
struct BaseUrl {
    url: String,
    on_this_machine: bool,
}

/// How many requests the client sent, how many were throttled (429) and
/// how many were retries, since it was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CloudflareRequestCounts {
    /// HTTP requests sent (each retry included): what Cloudflare's account
    /// budget of 1200 per 5 minutes counts.
    pub requests: u64,
    /// Answers that were 429 (throttled: one write per second per key, or
    /// the account budget spent).
    pub throttled: u64,
    /// Requests that were retries of a failed or throttled one.
    pub retries: u64,
}

#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    throttled: AtomicU64,
    retries: AtomicU64,
}

/// The HTTP side: `reqwest`'s async client, run by a tokio runtime that
/// lives on a thread of its own, so that building, using and dropping the
/// backend never builds or drops a runtime on the caller's thread.
struct Transport {
    client: Client,
    runtime: tokio::runtime::Handle,
    /// Dropping it tells the runtime's thread to shut the runtime down.
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// What one HTTP exchange gave, before any retry decision.
struct Raw {
    status: u16,
    headers: HeaderMap,
    body: Vec<u8>,
    /// The answer was longer than the request's limit, and not read past it.
    cut_off: bool,
}

impl Transport {
    /// A client for a base URL; `on_this_machine`: one on 127.0.0.1, ::1 or
    /// localhost (an emulator), reached directly.
    fn start(on_this_machine: bool) -> StoreResult<Self> {
        let mut builder = Client::builder()
            // Cloudflare's API does not redirect; a proxy or a wrong base URL
            // does, and a followed 303 turns a PUT or a DELETE into a GET whose
            // answer would be taken for the write's. A 3xx is reported instead.
            .redirect(reqwest::redirect::Policy::none());
        if on_this_machine {
            // Not through the `HTTP_PROXY` a CI runner exports: a proxy
            // cannot reach this machine's loopback, and would be sent the
            // API token in clear (the base URL may be plain http here).
            builder = builder.no_proxy();
        }
        let client = builder
            .build()
            // Stripped as every reqwest error of this module is (see
            // `request_failure`): a URL it holds is not for the error's text.
            .map_err(|e| StoreError::backend("building the Cloudflare HTTP client", e.without_url()))?;
        let (handle_tx, handle_rx) = mpsc::channel();
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("cloudflare-kv-http".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .thread_name("cloudflare-kv-http")
                    .enable_all()
                    .build();
                match runtime {
                    Ok(runtime) => {
                        // The receiver is gone only if `start` failed; nothing to serve then.
                        let _ = handle_tx.send(Ok(runtime.handle().clone()));
                        // Returns when the transport is dropped (its sender with it).
                        let _ = stopped.recv();
                        runtime.shutdown_timeout(Duration::from_secs(1));
                    }
                    Err(error) => {
                        let _ = handle_tx.send(Err(error));
                    }
                }
            })
            .map_err(|e| StoreError::backend("starting the Cloudflare HTTP thread", e))?;
        let runtime = match handle_rx.recv() {
            Ok(Ok(handle)) => handle,
            Ok(Err(error)) => return Err(StoreError::backend("starting the Cloudflare HTTP runtime", error)),
            Err(error) => return Err(StoreError::backend("starting the Cloudflare HTTP runtime", error)),
        };
        Ok(Self { client, runtime, stop: Some(stop), thread: Some(thread) })
    }

    /// Sends `request` on the private runtime and waits for the whole
    /// answer, or for its first `limit` bytes: a longer one is cut off
    /// there (and its connection dropped), so that no answer, a proxy's or
    /// a wrong base URL's endless one included, holds more memory than the
    /// longest this request can legitimately get.
    fn exchange(&self, request: RequestBuilder, limit: usize) -> Result<Raw, String> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.runtime.spawn(async move {
            let result = async {
                let mut response = request.send().await?;
                let status = response.status().as_u16();
                let headers = response.headers().clone();
                let mut body = Vec::new();
                let declared = response.content_length().and_then(|length| usize::try_from(length).ok());
                let mut cut_off = declared.is_some_and(|length| length > limit);
                while !cut_off && let Some(chunk) = response.chunk().await? {
                    if body.len() + chunk.len() > limit {
                        cut_off = true;
                    } else {
                        body.extend_from_slice(&chunk);
                    }
                }
                Ok::<_, reqwest::Error>(Raw { status, headers, body, cut_off })
            }
            .await;
            // The caller waits for this; it is gone only if it panicked.
            let _ = tx.send(result);
        });
        match rx.recv() {
            Ok(Ok(raw)) => Ok(raw),
            Ok(Err(error)) => Err(request_failure(error)),
            Err(_) => Err("the HTTP runtime stopped".to_owned()),
        }
    }
}

/// What a request that got no answer says: reqwest's error and its causes
/// (connect, TLS, timeout), which say why, without the request's URL, which
/// reqwest's `Display` appends and which names the account, the namespace
/// and the key. The text goes into [`StoreError::Unavailable`] and the
/// retry's log line, and from there into whatever logs or answers them.
fn request_failure(error: reqwest::Error) -> String {
    let error = error.without_url();
    let mut text = format!("request failed: {error}");
    let mut cause = std::error::Error::source(&error);
    while let Some(error) = cause {
        text.push_str(": ");
        text.push_str(&error.to_string());
        cause = error.source();
    }
    text
}

impl Drop for Transport {
    fn drop(&mut self) {
        drop(self.stop.take());
        // On a tokio runtime's thread (a worker, or `block_on`), joining
        // would hold that thread for as long as the private runtime takes to
        // shut down (up to a second with requests in flight). The thread
        // ends on its own once told to stop, so it is left to finish there.
        if tokio::runtime::Handle::try_current().is_ok() {
            return;
        }
        if let Some(thread) = self.thread.take() {
            // The thread only shuts its runtime down; a panic there leaves nothing to clean.
            let _ = thread.join();
        }
    }
}

/// A [`KvBackend`] on a Cloudflare Workers KV namespace. `take` and
/// `increment` are not atomic here (see the module documentation).
pub struct CloudflareKv {
    config: CloudflareConfig,
    transport: Transport,
    counters: Counters,
    /// `{base}/accounts/{account}/storage/kv/namespaces/{namespace}`.
    namespace_url: String,
    /// Set once `POST .../bulk/get` answered as a path the server does not
    /// have: later bulk reads go key by key at once.
    no_bulk_get: AtomicBool,
    /// The same for `POST .../bulk/delete`.
    no_bulk_delete: AtomicBool,
}

impl fmt::Debug for CloudflareKv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CloudflareKv").field("config", &self.config).finish_non_exhaustive()
    }
}

/// What came back from Cloudflare, once retries are over.
struct Reply {
    status: u16,
    headers: HeaderMap,
    body: Vec<u8>,
}

#[derive(Deserialize, Default)]
struct Envelope {
    /// "Whether the API call was successful": `false` with `errors`, which
    /// the API documents as an answer of its own, whatever the status.
    #[serde(default)]
    success: Option<bool>,
    /// Read leniently ([`ApiError::from_value`]): one odd entry (a code
    /// as text, no code at all, `null` for the list) must not hide the
    /// others, a missing key's 10009 among them.
    #[serde(default, deserialize_with = "lenient_errors")]
    errors: Vec<ApiError>,
    #[serde(default)]
    result: Option<serde_json::Value>,
    #[serde(default)]
    result_info: Option<ResultInfo>,
}

/// One entry of an answer's `errors`.
struct ApiError {
    /// Its code: a number, as Cloudflare sends it, or a number as text.
    code: Option<u32>,
    message: String,
    /// The causes Cloudflare nests under some errors (6003's names the header).
    error_chain: Vec<ApiError>,
}

impl ApiError {
    /// Whatever an entry holds, as much of it as can be read.
    fn from_value(value: &serde_json::Value) -> Self {
        let code = match value.get("code") {
            Some(serde_json::Value::Number(code)) => code.as_u64().and_then(|code| u32::try_from(code).ok()),
            Some(serde_json::Value::String(code)) => code.trim().parse().ok(),
            _ => None,
        };
        let message = match value.get("message") {
            Some(serde_json::Value::String(message)) => message.clone(),
            Some(serde_json::Value::Null) | None => String::new(),
            Some(other) => other.to_string(),
        };
        let error_chain = match value.get("error_chain") {
            Some(serde_json::Value::Array(causes)) => causes.iter().map(Self::from_value).collect(),
            _ => Vec::new(),
        };
        Self { code, message, error_chain }
    }
}

/// `errors` as a list of entries, each read by [`ApiError::from_value`];
/// anything but a list (`null`, a text) as none.
fn lenient_errors<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<ApiError>, D::Error> {
    Ok(match <serde_json::Value as Deserialize>::deserialize(deserializer)? {
        serde_json::Value::Array(entries) => entries.iter().map(ApiError::from_value).collect(),
        _ => Vec::new(),
    })
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.code {
            Some(code) => write!(f, "code {code}: {}", self.message)?,
            None => write!(f, "{}", self.message)?,
        }
        for cause in &self.error_chain {
            write!(f, " ({cause})")?;
        }
        Ok(())
    }
}

#[derive(Deserialize)]
struct ResultInfo {
    #[serde(default)]
    cursor: Option<String>,
}

#[derive(Deserialize)]
struct ListedKey {
    name: String,
}

/// The `result` of a bulk read: each key asked for with its value (as
/// text), or `null` (or absent) when it has none.
#[derive(Deserialize)]
struct BulkValues {
    #[serde(default)]
    values: std::collections::HashMap<String, Option<serde_json::Value>>,
}

/// The `result` of a bulk delete: the keys it did not fully delete, which
/// "should be retried".
#[derive(Deserialize, Default)]
struct BulkDeleted {
    #[serde(default)]
    unsuccessful_keys: Option<Vec<String>>,
}

impl Reply {
    fn envelope(&self) -> Envelope {
        serde_json::from_slice(&self.body).unwrap_or_default()
    }

    /// The code of the first error that has one.
    fn error_code(&self) -> Option<u32> {
        self.envelope().errors.iter().find_map(|e| e.code)
    }

    /// Whether the body is the API's JSON envelope (it says `success`).
    fn has_envelope(&self) -> bool {
        self.envelope().success.is_some()
    }

    /// Whether any error of the answer has `code`.
    fn has_error_code(&self, code: u32) -> bool {
        self.envelope().errors.iter().any(|e| e.code == Some(code))
    }

    fn error_text(&self) -> String {
        let envelope = self.envelope();
        match envelope.errors.first() {
            Some(e) => format!("HTTP {}, {e}", self.status),
            None => format!("HTTP {} without a Cloudflare error envelope", self.status),
        }
    }

    fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// A success of an endpoint that answers with an envelope (write,
    /// delete, list; not the read of a value, whose body is the value): a
    /// 2xx status and `"success": true` in the envelope. Anything less (a
    /// `false`, or no envelope: a proxy's 204 without a body, an HTML page)
    /// is not Cloudflare saying it was done, and a write or a delete taken
    /// as done on it would be lost silently.
    fn is_enveloped_success(&self) -> bool {
        self.is_success() && self.envelope().success == Some(true)
    }

    /// Where a redirect points, scheme, host and port only: the rest of a
    /// `Location` may repeat the request's path, which names the key.
    fn redirect_origin(&self) -> Option<String> {
        let location = self.headers.get(reqwest::header::LOCATION)?.to_str().ok()?;
        let url = reqwest::Url::parse(location).ok()?;
        Some(url.origin().ascii_serialization()).filter(|origin| origin != "null")
    }

    /// Whether the server answered as one that does not have the path or
    /// the method asked for: 405, Cloudflare's "No route for that URI"
    /// (7000), or a 404 that names no Cloudflare error (a router's page).
    /// A 404 naming an unknown account or namespace is not this.
    fn is_no_such_endpoint(&self) -> bool {
        self.says_no_such_endpoint() || (self.status == 404 && self.envelope().errors.iter().all(|e| e.code.is_none()))
    }

    /// Whether the server said itself that it has no such path or method
    /// (405, or code 7000): unlike a bare 404, which a proxy or an edge
    /// may give for a while, not a passing answer.
    fn says_no_such_endpoint(&self) -> bool {
        self.status == 405 || self.has_error_code(NO_ROUTE)
    }

    fn is_missing_key(&self) -> bool {
        self.status == 404 && self.has_error_code(KEY_NOT_FOUND)
    }

    /// The server's clock, from its `Date` header, in seconds since the epoch.
    fn server_now(&self) -> Option<u64> {
        let date = self.headers.get(reqwest::header::DATE)?.to_str().ok()?;
        let at = httpdate::parse_http_date(date).ok()?;
        at.duration_since(UNIX_EPOCH).ok().map(|d| d.as_secs())
    }
}

/// When a written value ends.
#[derive(Debug, Clone, Copy)]
enum Expiry {
    /// At least this long after the server receives it (`expiration_ttl`,
    /// rounded up by [`ttl_secs`]).
    After(Duration),
    /// This many whole seconds after the second the server receives it in
    /// (`expiration_ttl` as it is, at least 60): the seconds left to an
    /// expiry on the server's whole-second clock, which a second more would
    /// move later on each write.
    Left(u64),
    /// At this second since the epoch on the server's clock (`expiration`).
    At(u64),
}

/// Seconds added to the room an absolute expiry must leave: the `Date` a
/// reply carries is truncated to the second, and the reply and the write
/// take time on the way.
const EXPIRY_SLACK: Duration = Duration::from_secs(5);

/// The expiry a counter's next write keeps: the one it was read with (the
/// same second, absolute, while at least `room` seconds are left on the
/// server's clock; else relative, the seconds left), or `ttl` when the read
/// carried no expiry Cloudflare's way (no `expiration` header, or one that
/// does not parse: a proxy may strip it), so that a counter written with a
/// TTL is never written again without one. A counter written without a
/// TTL, and counted without one, keeps none.
///
/// The seconds left are `at` less the second the read's `Date` names (the
/// ceiling of what is left, as that second is truncated), sent without the
/// second more a caller's TTL gets: the write lands in that second or a
/// later one, and the server adds them to it, so the entry ends at `at`, or
/// by the seconds the write took later, never earlier. Under 60 s left,
/// Cloudflare takes no such TTL and the write sends its minimum, 60 s: the
/// expiry moves later (by under a minute), as it cannot be kept.
fn kept_expiry(stored: &Stored, ttl: Option<Duration>, room: u64) -> Option<Expiry> {
    let Some(at) = stored.expiration else { return ttl.map(Expiry::After) };
    Some(match stored.server_now {
        Some(now) if at >= now.saturating_add(room) => Expiry::At(at),
        now => Expiry::Left(at.saturating_sub(now.unwrap_or_else(unix_now))),
    })
}

/// How long a `Retry-After` asks to wait: whole seconds (what Cloudflare
/// sends), or an HTTP date (what a proxy on the way may send), counted from
/// the answer's own `Date` (`server_now`, seconds since the epoch), so that
/// a clock of the proxy's set apart from ours does not turn one second into
/// minutes; without a `Date`, from our clock. A date already past asks for
/// no wait.
fn retry_after(value: &str, server_now: Option<u64>) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    let now = server_now.map_or_else(std::time::SystemTime::now, |secs| UNIX_EPOCH + Duration::from_secs(secs));
    Some(at.duration_since(now).unwrap_or_default())
}

/// What a path segment must have percent-encoded: everything but letters,
/// digits, `-._~` (RFC 3986's unreserved characters) and `:` and `@`
/// (allowed in a path segment as they are).
const PATH_SEGMENT: &AsciiSet =
    &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~').remove(b':').remove(b'@');

/// A key, account or namespace id as one segment of a URL's path.
///
/// The stores' own keys (`session:`, hex digits, `_`) go as they are: a
/// namespace whose `supports_url_encoding` is false stores the path's text
/// without decoding it, so a `:` sent as `%3A` would be stored as those three
/// characters there, and listing the prefix, or a bulk call naming the key,
/// would never find it (Cloudflare's schema of a namespace; wrangler met it,
/// cloudflare/workers-sdk#7997). Keys that need escaping go with
/// `url_encoded=true` as well (see `CloudflareKv::value_url`).
fn encode(segment: &str) -> String {
    utf8_percent_encode(segment, PATH_SEGMENT).to_string()
}

/// A TTL in whole seconds as Cloudflare takes it: rounded up, plus one
/// second, at least 60, at most [`MAX_EXPIRATION_TTL_SECS`]. The second
/// more is for the server's count: it keeps whole seconds (`expiration` is
/// seconds since the epoch), so a TTL counted from the start of the second
/// a write lands in would end the entry up to a second before its TTL; an
/// entry must live at least its TTL (a session read back checks its own
/// expiry, so a second more costs nothing).
fn ttl_secs(ttl: Duration) -> u64 {
    (ttl.as_secs().saturating_add(u64::from(ttl.subsec_nanos() > 0)).saturating_add(1))
        .clamp(MIN_TTL.as_secs(), MAX_EXPIRATION_TTL_SECS)
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// One backend operation: its `dployr.store` span (`op`, and on close
/// `requests`, `throttled`, `retries`, `duration_us`) and its counts.
struct Call {
    span: tracing::span::EnteredSpan,
    started: Instant,
    requests: u64,
    throttled: u64,
    retries: u64,
    /// The last request's answer was longer than its limit (see
    /// [`Transport::exchange`]): a bulk read halves its keys then.
    cut_off: bool,
}

impl Call {
    fn start(op: &'static str) -> Self {
        use tracing::field::Empty;
        let span = tracing::debug_span!(
            "dployr.store",
            op = op,
            requests = Empty,
            throttled = Empty,
            retries = Empty,
            duration_us = Empty
        )
        .entered();
        Self { span, started: Instant::now(), requests: 0, throttled: 0, retries: 0, cut_off: false }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        let micros = u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.span.record("requests", self.requests);
        self.span.record("throttled", self.throttled);
        self.span.record("retries", self.retries);
        self.span.record("duration_us", micros);
    }
}

impl CloudflareKv {
    /// A client for the namespace in `config`. No request is made yet; a
    /// thread with the HTTP runtime is started.
    ///
    /// # Errors
    /// [`StoreError::Configuration`] for an empty id or token, a token with
    /// a character other than visible ASCII, or a base URL that is not
    /// `http(s)://`; [`StoreError::Backend`] if the HTTP client
    /// or its thread cannot be started.
    pub fn new(config: CloudflareConfig) -> StoreResult<Self> {
        for (value, setting) in [
            (&config.account_id, ACCOUNT_ID_VAR),
            (&config.namespace_id, NAMESPACE_ID_VAR),
            (&config.api_token, API_TOKEN_VAR),
        ] {
            if value.trim().is_empty() {
                return Err(StoreError::Configuration { setting, reason: "is empty".into() });
            }
        }
        // The token travels in a header, which cannot carry a control
        // character: refused here, once, it would otherwise fail every
        // request before it is sent, and be retried as a passing failure.
        // Cloudflare's tokens are visible ASCII; anything else is a paste
        // gone wrong.
        if !config.api_token.bytes().all(|byte| byte.is_ascii_graphic()) {
            return Err(StoreError::Configuration {
                setting: API_TOKEN_VAR,
                reason: "holds a character an API token cannot have (a space, a control character or one \
                         outside ASCII)"
                    .into(),
            });
        }
        let base_url = checked_base_url(&config.base_url)?;
        let namespace_url = format!(
            "{}/accounts/{}/storage/kv/namespaces/{}",
            base_url.url,
            encode(&config.account_id),
            encode(&config.namespace_id)
        );
        Ok(Self {
            config,
            transport: Transport::start(base_url.on_this_machine)?,
            counters: Counters::default(),
            namespace_url,
            no_bulk_get: AtomicBool::new(false),
            no_bulk_delete: AtomicBool::new(false),
        })
    }

    /// Requests sent, 429s received and retries made since this client was
    /// created (what to watch against Cloudflare's account budget).
    pub fn request_counts(&self) -> CloudflareRequestCounts {
        CloudflareRequestCounts {
            requests: self.counters.requests.load(Ordering::Relaxed),
            throttled: self.counters.throttled.load(Ordering::Relaxed),
            retries: self.counters.retries.load(Ordering::Relaxed),
        }
    }

    /// The URL of `key`'s value, with `url_encoded=true`: it tells
    /// Cloudflare to decode the key in the path whatever the namespace's
    /// `supports_url_encoding` says (as wrangler sends it since
    /// cloudflare/workers-sdk#12213), so a key holding `/`, `%` or `?` is
    /// stored as written on every namespace, and found by listing its prefix.
    fn value_url(&self, key: &str) -> String {
        format!("{}/values/{}?url_encoded=true", self.namespace_url, encode(key))
    }

    /// Sends the request `build` makes, retrying 429, 5xx and transport
    /// failures within the [`RetryPolicy`]; any other answer is returned.
    /// Each request's timeout is the configured one cut to what is left of
    /// `max_elapsed`, so the call ends within `max_elapsed`.
    ///
    /// An answer longer than `limit` bytes is [`StoreError::Backend`], not
    /// retried, with `call.cut_off` set: no answer to this request can be
    /// that long, so what answered is not Cloudflare's API (or a bulk read
    /// asked for more than one answer should carry, which halves its keys).
    fn send(
        &self,
        call: &mut Call,
        op: &'static str,
        limit: usize,
        build: impl Fn(&Client) -> RequestBuilder,
    ) -> StoreResult<Reply> {
        let policy = self.config.retry;
        // The call's start, not this request's: `max_elapsed` bounds a whole
        // call (a take's read and delete, every chunk of a bulk call).
        let started = call.started;
        call.cut_off = false;
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            let left = policy.max_elapsed.saturating_sub(started.elapsed());
            // An earlier request of the call spent its bound: a request with
            // no time to be answered would only cost the account's budget
            // (and a write could still land after the caller was told it
            // failed).
            if left < MIN_REQUEST_TIME {
                return Err(StoreError::Unavailable {
                    reason: format!(
                        "Cloudflare KV {op}: the call's max_elapsed ({:?}) was spent before this request",
                        policy.max_elapsed
                    )
                    .into(),
                    source: None,
                });
            }
            let timeout = self.config.request_timeout.min(left);
            call.requests += 1;
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            if attempt > 1 {
                call.retries += 1;
                self.counters.retries.fetch_add(1, Ordering::Relaxed);
            }
            let request = build(&self.transport.client).bearer_auth(&self.config.api_token).timeout(timeout);
            let (last_failure, status, retry_after) = match self.transport.exchange(request, limit) {
                Ok(raw) if raw.cut_off => {
                    call.cut_off = true;
                    return Err(StoreError::Backend {
                        message: format!(
                            "Cloudflare KV {op}: the answer (status {}) was longer than {limit} bytes, more than any \
                             answer to this request, and was not read further: is the base URL Cloudflare's API?",
                            raw.status
                        )
                        .into(),
                        source: None,
                    });
                }
                Ok(raw) => {
                    let reply = Reply { status: raw.status, headers: raw.headers, body: raw.body };
                    if reply.status != 429 && !(500..600).contains(&reply.status) {
                        return Ok(reply);
                    }
                    if reply.status == 429 {
                        call.throttled += 1;
                        self.counters.throttled.fetch_add(1, Ordering::Relaxed);
                        // Spent until 00:00 UTC: retries cannot succeed and
                        // would spend the account's 5-minute budget.
                        if reply.has_error_code(DAILY_LIMIT) {
                            return Err(StoreError::Unavailable {
                                reason: format!(
                                    "Cloudflare KV {op}: the daily limit of the free plan for this operation is \
                                     spent; it resets at 00:00 UTC ({})",
                                    reply.error_text()
                                )
                                .into(),
                                source: None,
                            });
                        }
                    }
                    let retry_after = reply
                        .headers
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| retry_after(v, reply.server_now()))
                        .or_else(|| (reply.status == 429).then(|| spent_quota_resets_in(&reply.headers)).flatten());
                    (reply.error_text(), reply.status, retry_after)
                }
                Err(failure) => (failure, 0, None),
            };
            let wait = policy.backoff(attempt).max(retry_after.unwrap_or_default());
            let elapsed = started.elapsed();
            if attempt >= policy.max_attempts
                || beyond(elapsed, wait.saturating_add(MIN_REQUEST_TIME), policy.max_elapsed)
            {
                let asked = match retry_after {
                    Some(asked) if status == 429 && beyond(elapsed, asked, policy.max_elapsed) => format!(
                        "; Cloudflare asked to wait {asked:?} (after 1200 requests in 5 minutes the account is refused for 5 minutes)"
                    ),
                    Some(asked) if beyond(elapsed, asked, policy.max_elapsed) => {
                        format!("; the answer asked to wait {asked:?}")
                    }
                    _ => String::new(),
                };
                return Err(StoreError::Unavailable {
                    reason: format!(
                        "Cloudflare KV {op}: gave up after {attempt} attempts in {elapsed:?}, last: {last_failure}{asked}"
                    )
                    .into(),
                    source: None,
                });
            }
            tracing::warn!(
                target: "dployr.kv.cloudflare",
                op,
                status,
                attempt,
                wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                "retrying a Cloudflare KV request: {last_failure}"
            );
            std::thread::sleep(wait);
        }
    }

    /// Turns a non-2xx answer (or a 2xx one whose envelope does not say
    /// `"success": true`) into the error a caller can act on.
    fn failure(&self, op: &'static str, reply: &Reply) -> StoreError {
        let text = reply.error_text();
        match (reply.status, reply.error_code()) {
            // A 403 without the API's envelope is not the API's answer: a
            // firewall rule of the edge ("Error 1020 Access denied") or a
            // proxy refused the request before any token was checked.
            (403, None) if !reply.has_envelope() => StoreError::Backend {
                message: format!(
                    "Cloudflare KV {op}: refused before it reached the API ({text}): a firewall rule of \
                     Cloudflare's edge or a proxy on the way, not the API token"
                )
                .into(),
                source: None,
            },
            (401 | 403, _) | (_, Some(AUTHENTICATION_ERROR | INVALID_REQUEST_HEADERS)) => StoreError::Configuration {
                setting: API_TOKEN_VAR,
                reason: format!("Cloudflare refused the API token on {op} ({text})").into(),
            },
            (_, Some(NAMESPACE_NOT_FOUND)) => StoreError::Configuration {
                setting: NAMESPACE_ID_VAR,
                reason: format!("Cloudflare knows no KV namespace {} ({text})", self.config.namespace_id).into(),
            },
            (_, Some(ACCOUNT_NOT_FOUND)) => StoreError::Configuration {
                setting: ACCOUNT_ID_VAR,
                reason: format!("Cloudflare knows no account {} ({text})", self.config.account_id).into(),
            },
            (300..=399, _) => StoreError::Configuration {
                setting: API_BASE_URL_VAR,
                reason: format!(
                    "{op} answered a redirect (HTTP {}{}) at base URL {}: Cloudflare's API does not redirect; \
                     check {API_BASE_URL_VAR} (the https:// URL ending in /client/v4, not a proxy that redirects)",
                    reply.status,
                    reply.redirect_origin().map(|origin| format!(" to {origin}")).unwrap_or_default(),
                    self.config.base_url
                )
                .into(),
            },
            (404, _) | (_, Some(NO_ROUTE)) => StoreError::Configuration {
                setting: API_BASE_URL_VAR,
                reason: format!(
                    "{op} answered {text} at base URL {}: not Workers KV of account {} and namespace {}; \
                     check {API_BASE_URL_VAR} (it ends in /client/v4), {ACCOUNT_ID_VAR} and {NAMESPACE_ID_VAR}",
                    self.config.base_url, self.config.account_id, self.config.namespace_id
                )
                .into(),
            },
            (413, _) => StoreError::invalid("value", format!("refused by Cloudflare ({text})")),
            (414, _) => StoreError::invalid("key", format!("refused by Cloudflare ({text})")),
            // A list cursor Cloudflare does not know: the caller's, as
            // memory and PostgreSQL would take or refuse it by its field.
            (400, Some(INVALID_CURSOR)) => {
                StoreError::invalid("cursor", format!("refused by Cloudflare on {op} ({text})"))
            }
            (400, _) => StoreError::invalid("request", format!("refused by Cloudflare on {op} ({text})")),
            _ => StoreError::Backend { message: format!("Cloudflare KV {op}: {text}").into(), source: None },
        }
    }

    /// GET of a value: the value, its `expiration` (seconds since the
    /// epoch) and the server's clock when it answered.
    fn read(&self, call: &mut Call, key: &str) -> StoreResult<Option<Stored>> {
        self.limits().check_key(key)?;
        let url = self.value_url(key);
        let reply = self.send(call, "get", MAX_VALUE_BYTES, |c| c.get(&url))?;
        if reply.is_missing_key() {
            return Ok(None);
        }
        if !reply.is_success() {
            return Err(self.failure("get", &reply));
        }
        let expiration = reply.headers.get("expiration").and_then(|v| v.to_str().ok()).and_then(expiration_secs);
        let server_now = reply.server_now();
        Ok(Some(Stored { value: reply.body, expiration, server_now }))
    }

    /// PUT of a value, with its expiry (a relative TTL is clamped to what
    /// Cloudflare takes).
    fn write(&self, call: &mut Call, key: &str, value: &[u8], expiry: Option<Expiry>) -> StoreResult<()> {
        let url = self.value_url(key);
        let query: Vec<(&str, String)> = match expiry {
            Some(Expiry::After(ttl)) => vec![("expiration_ttl", ttl_secs(ttl).to_string())],
            Some(Expiry::Left(secs)) => {
                vec![("expiration_ttl", secs.clamp(MIN_TTL.as_secs(), MAX_EXPIRATION_TTL_SECS).to_string())]
            }
            Some(Expiry::At(at)) => vec![("expiration", at.to_string())],
            None => Vec::new(),
        };
        let reply = self.send(call, "put", MAX_ANSWER_BYTES, |c| {
            c.put(&url)
                .query(&query)
                .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                .body(value.to_vec())
        })?;
        if !reply.is_enveloped_success() {
            return Err(self.failure("put", &reply));
        }
        Ok(())
    }

    /// A POST of `body` as JSON to `url` (a bulk endpoint), retried as
    /// [`send`](Self::send) retries; the answer's envelope, which must say
    /// `"success": true`; or `None` where the server does not serve `url`
    /// ([`Reply::is_no_such_endpoint`]). Where the server says so itself
    /// (405, code 7000), `missing` remembers it for this client's later
    /// calls; a bare 404 (which a proxy may give for a while) does not set
    /// it: the next call asks again, so one passing answer never turns
    /// every later sign-out everywhere into a request per key.
    fn post_json_where_served(
        &self,
        call: &mut Call,
        op: &'static str,
        url: &str,
        body: &impl serde::Serialize,
        missing: &AtomicBool,
    ) -> StoreResult<Option<Envelope>> {
        if missing.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let body = serde_json::to_vec(body)
            .map_err(|e| StoreError::backend(format!("Cloudflare KV {op}: encoding the request"), e))?;
        let reply = self.send(call, op, MAX_ANSWER_BYTES, |c| {
            c.post(url).header(reqwest::header::CONTENT_TYPE, "application/json").body(body.clone())
        })?;
        if reply.is_no_such_endpoint() {
            tracing::warn!(
                target: "dployr.kv.cloudflare",
                op,
                status = reply.status,
                "Cloudflare KV: no bulk endpoint here; key by key instead"
            );
            if reply.says_no_such_endpoint() {
                missing.store(true, Ordering::Relaxed);
            }
            return Ok(None);
        }
        if !reply.is_enveloped_success() {
            return Err(self.failure(op, &reply));
        }
        Ok(Some(reply.envelope()))
    }

    /// The values of `chunk` (at most [`BULK_GET_KEYS`] checked keys),
    /// appended to `values` in order: one bulk read, or key by key where the
    /// server has no bulk endpoint, and then `false`, so that the rest of
    /// the call goes key by key without asking again.
    /// A 400 for checked keys is a value Cloudflare cannot send as text
    /// (bytes that are not UTF-8, written by something other than this
    /// layer), not the caller's mistake; else one such value would fail
    /// every call that reads it in bulk (the user's sign-out everywhere,
    /// for good). Such a chunk is halved, each half read the same way, and
    /// one of at most [`BISECT_DOWN_TO`] keys is read key by key: a few
    /// requests more for one such value, about a third more than key by key
    /// where every value is one.
    fn read_in_bulk(&self, call: &mut Call, chunk: &[String], values: &mut Vec<Option<Vec<u8>>>) -> StoreResult<bool> {
        let url = format!("{}/bulk/get", self.namespace_url);
        let asked = serde_json::json!({ "keys": chunk, "type": "text" });
        let envelope = match self.post_json_where_served(call, "get_many", &url, &asked, &self.no_bulk_get) {
            Ok(Some(envelope)) => envelope,
            Ok(None) => {
                self.read_key_by_key(call, chunk, values)?;
                return Ok(false);
            }
            Err(error) => {
                // Halved: a chunk with a value Cloudflare cannot send as
                // text (a 400), down to a few keys; one whose values are
                // too long together for one answer, down to one key. What
                // is left is read as `get` reads it.
                let too_long = std::mem::take(&mut call.cut_off);
                let not_text = matches!(error, StoreError::Invalid { field: "request", .. });
                if !too_long && !not_text {
                    return Err(error);
                }
                let key_by_key_up_to = if too_long { 1 } else { BISECT_DOWN_TO };
                if chunk.len() <= key_by_key_up_to {
                    self.read_key_by_key(call, chunk, values)?;
                    return Ok(true);
                }
                let (first, second) = chunk.split_at(chunk.len() / 2);
                if self.read_in_bulk(call, first, values)? {
                    return self.read_in_bulk(call, second, values);
                }
                self.read_key_by_key(call, second, values)?;
                return Ok(false);
            }
        };
        let found: BulkValues = serde_json::from_value(envelope.result.unwrap_or_default())
            .map_err(|e| StoreError::backend("Cloudflare KV get_many: unreadable values", e))?;
        for key in chunk {
            values.push(match found.values.get(key) {
                None | Some(None | Some(serde_json::Value::Null)) => None,
                Some(Some(serde_json::Value::String(text))) => Some(text.clone().into_bytes()),
                // Asked as text, a value comes as a string; anything else is
                // not an answer to trust.
                Some(Some(other)) => {
                    return Err(StoreError::backend(
                        "Cloudflare KV get_many",
                        format!("a value came back as {other}, not as text"),
                    ));
                }
            });
        }
        Ok(true)
    }

    /// The values of `keys`, appended to `values` in order, each read as
    /// [`get`](KvBackend::get) reads it.
    fn read_key_by_key(&self, call: &mut Call, keys: &[String], values: &mut Vec<Option<Vec<u8>>>) -> StoreResult<()> {
        for key in keys {
            values.push(self.read(call, key)?.map(|stored| stored.value));
        }
        Ok(())
    }

    fn remove(&self, call: &mut Call, key: &str) -> StoreResult<()> {
        self.limits().check_key(key)?;
        let url = self.value_url(key);
        let reply = self.send(call, "delete", MAX_ANSWER_BYTES, |c| c.delete(&url))?;
        if reply.is_missing_key() || reply.is_enveloped_success() {
            return Ok(());
        }
        Err(self.failure("delete", &reply))
    }
}

/// A value as read, with what its expiry needs.
struct Stored {
    value: Vec<u8>,
    expiration: Option<u64>,
    server_now: Option<u64>,
}

impl KvBackend for CloudflareKv {
    fn limits(&self) -> KvLimits {
        KvLimits {
            min_ttl: MIN_TTL,
            min_list_limit: 10,
            max_list_limit: 1000,
            atomic: false,
            read_your_writes: false,
            ..KvLimits::default()
        }
    }

    fn get(&self, key: &str) -> StoreResult<Option<Vec<u8>>> {
        let mut call = Call::start("kv.cloudflare.get");
        Ok(self.read(&mut call, key)?.map(|stored| stored.value))
    }

    fn put(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> StoreResult<()> {
        let mut call = Call::start("kv.cloudflare.put");
        let limits = self.limits();
        limits.check_put(key, value, ttl)?;
        self.write(&mut call, key, value, ttl.map(Expiry::After))
    }

    fn delete(&self, key: &str) -> StoreResult<()> {
        let mut call = Call::start("kv.cloudflare.delete");
        self.remove(&mut call, key)
    }

    /// One bulk read (`POST .../bulk/get`, values as text) per 100 keys,
    /// instead of a request per key: a sign-out everywhere of a user with
    /// hundreds of sessions would otherwise spend the account's budget of
    /// 1200 requests per 5 minutes, after which Cloudflare refuses every
    /// call for minutes. Reads are as stale as a single read's. A server
    /// without the endpoint (405, code 7000, or a 404 naming no Cloudflare
    /// error) is read key by key, each answered as [`get`](KvBackend::get) would.
    /// A hundred Cloudflare refuses to send as text (a value that is not
    /// UTF-8, which this layer never writes) is halved and each half read in
    /// bulk again, down to a few keys read as `get` reads them: one such
    /// value among a hundred costs at most 16 requests, not a hundred, all within
    /// the call's `max_elapsed`.
    fn get_many(&self, keys: &[String]) -> StoreResult<Vec<Option<Vec<u8>>>> {
        let mut call = Call::start("kv.cloudflare.get_many");
        let limits = self.limits();
        for key in keys {
            limits.check_key(key)?;
        }
        let mut values = Vec::with_capacity(keys.len());
        for (index, chunk) in keys.chunks(BULK_GET_KEYS).enumerate() {
            if !self.read_in_bulk(&mut call, chunk, &mut values)? {
                // No bulk endpoint here: the rest of this call key by key,
                // without asking again per hundred.
                let rest = keys.get((index + 1) * BULK_GET_KEYS..).unwrap_or_default();
                self.read_key_by_key(&mut call, rest, &mut values)?;
                break;
            }
        }
        Ok(values)
    }

    /// One bulk delete (`POST .../bulk/delete`) per 10 000 keys, in order;
    /// the keys Cloudflare says it did not fully delete are deleted again,
    /// as it asks, in bulk: up to 3 requests a chunk, within the call's
    /// `max_elapsed`, then `Unavailable`. A server without the endpoint is
    /// asked key by key, as [`delete`](KvBackend::delete) would.
    fn delete_many(&self, keys: &[String]) -> StoreResult<()> {
        let mut call = Call::start("kv.cloudflare.delete_many");
        let limits = self.limits();
        for key in keys {
            limits.check_key(key)?;
        }
        let url = format!("{}/bulk/delete", self.namespace_url);
        for (index, chunk) in keys.chunks(BULK_DELETE_KEYS).enumerate() {
            // Keys Cloudflare reports undone "should be retried": in bulk
            // again, a request for all of them (one at a time, a few
            // thousand would spend the account's 1200 requests per 5
            // minutes and block every call for 5 minutes), a few rounds at
            // most, within the call's `max_elapsed`.
            let mut to_delete: Vec<String> = chunk.to_vec();
            for round in 1..=BULK_DELETE_ROUNDS {
                let Some(envelope) =
                    self.post_json_where_served(&mut call, "delete_many", &url, &to_delete, &self.no_bulk_delete)?
                else {
                    // A server without bulk deletes: key by key, as `delete`
                    // deletes, this chunk's keys still to delete and every
                    // later chunk's.
                    let later = &keys[keys.len().min((index + 1) * BULK_DELETE_KEYS)..];
                    for key in to_delete.iter().chain(later) {
                        self.remove(&mut call, key)?;
                    }
                    return Ok(());
                };
                let deleted: BulkDeleted = envelope
                    .result
                    .filter(|result| !result.is_null())
                    .map(serde_json::from_value)
                    .transpose()
                    .map_err(|e| StoreError::backend("Cloudflare KV delete_many: unreadable answer", e))?
                    .unwrap_or_default();
                // Only keys of this request: an answer naming others is not
                // a reason to delete them.
                let asked: std::collections::HashSet<&str> = to_delete.iter().map(String::as_str).collect();
                let undone: Vec<String> = deleted
                    .unsuccessful_keys
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|key| asked.contains(key.as_str()))
                    .collect();
                if undone.is_empty() {
                    break;
                }
                let pause = self.config.retry.backoff(round);
                if round == BULK_DELETE_ROUNDS
                    || beyond(
                        call.started.elapsed(),
                        pause.saturating_add(MIN_REQUEST_TIME),
                        self.config.retry.max_elapsed,
                    )
                {
                    return Err(StoreError::Unavailable {
                        reason: format!(
                            "Cloudflare KV delete_many: {} keys still reported undone after {round} bulk deletes",
                            undone.len()
                        )
                        .into(),
                        source: None,
                    });
                }
                std::thread::sleep(pause);
                to_delete = undone;
            }
        }
        Ok(())
    }

    fn list(&self, prefix: &str, limit: usize, cursor: Option<&str>) -> StoreResult<KvPage> {
        let mut call = Call::start("kv.cloudflare.list");
        let limits = self.limits();
        limits.check_list_limit(limit)?;
        limits.check_prefix(prefix)?;
        limits.check_cursor(cursor)?;
        let url = format!("{}/keys", self.namespace_url);
        let mut query = vec![("prefix", prefix.to_owned()), ("limit", limit.to_string())];
        if let Some(cursor) = cursor.filter(|c| !c.is_empty()) {
            query.push(("cursor", cursor.to_owned()));
        }
        let reply = self.send(&mut call, "list", MAX_ANSWER_BYTES, |c| c.get(&url).query(&query))?;
        if !reply.is_enveloped_success() {
            return Err(self.failure("list", &reply));
        }
        let envelope: Envelope = serde_json::from_slice(&reply.body)
            .map_err(|e| StoreError::backend("Cloudflare KV list: unreadable answer", e))?;
        let listed: Vec<ListedKey> = serde_json::from_value(envelope.result.unwrap_or_default())
            .map_err(|e| StoreError::backend("Cloudflare KV list: unreadable keys", e))?;
        let cursor = envelope.result_info.and_then(|info| info.cursor).filter(|c| !c.is_empty());
        Ok(KvPage { keys: listed.into_iter().map(|k| k.name).collect(), cursor })
    }

    /// A read, then a delete: **not atomic** on Cloudflare.
    fn take(&self, key: &str) -> StoreResult<Option<Vec<u8>>> {
        let mut call = Call::start("kv.cloudflare.take");
        let Some(stored) = self.read(&mut call, key)? else { return Ok(None) };
        self.remove(&mut call, key)?;
        Ok(Some(stored.value))
    }

    /// A read, then a write that keeps the counter's expiry: **not atomic**
    /// on Cloudflare. The expiry is sent again as the same second, an
    /// absolute time of the server's own, while Cloudflare still takes it
    /// when the write lands (60 s ahead, after this call's retries);
    /// closer to its end it is sent as the seconds left on the server's
    /// clock (its `Date` header; the local clock only if it sends none),
    /// which keeps it unless the write lands a second or more after the
    /// read; and if less than Cloudflare's 60 s minimum is left, the expiry
    /// cannot be kept: the counter lives 60 s more from this write (it ends
    /// late, never early). A read that carries no expiry (no `expiration`
    /// header: a proxy may strip it) writes the counter again with `ttl`,
    /// so that it never loses its end, though it may then end later than it
    /// would have.
    fn increment(&self, key: &str, ttl: Option<Duration>) -> StoreResult<i64> {
        let mut call = Call::start("kv.cloudflare.increment");
        let limits = self.limits();
        limits.check_key(key)?;
        limits.check_ttl(ttl)?;
        let mut read_at = None;
        let (count, expiry) = match self.read(&mut call, key)? {
            None => (1, ttl.map(Expiry::After)),
            Some(stored) => {
                read_at = stored.server_now;
                let current = parse_counter(&stored.value).ok_or_else(|| not_a_counter(key))?;
                if current >= MAX_COUNTER {
                    return Err(counter_at_its_largest(key));
                }
                // The write may land after this call's retries; its `Date`
                // is truncated to the second and the reply took a while to
                // come: a few seconds more keep an absolute expiry 60 s ahead.
                let room = MIN_TTL.saturating_add(self.config.retry.max_elapsed).saturating_add(EXPIRY_SLACK).as_secs();
                (current + 1, kept_expiry(&stored, ttl, room))
            }
        };
        let value = count.to_string();
        match (self.write(&mut call, key, value.as_bytes(), expiry), expiry) {
            // The server refused the same second, as less than 60 s ahead
            // on the clock it counts expiries by, which its `Date` header
            // did not tell (a proxy's `Date`, a clock stepped since, an
            // emulator's two clocks): sent again as seconds left, the more
            // of what our clock and the read's `Date` leave, at least
            // Cloudflare's 60. Refused as too soon, any of these ends after
            // that second; refused for another reason, the more of the two
            // clocks' counts still does not end it before the read's clock
            // said.
            (Err(StoreError::Invalid { field: "request", .. }), Some(Expiry::At(at))) => {
                let left = at.saturating_sub(unix_now()).max(at.saturating_sub(read_at.unwrap_or(u64::MAX)));
                self.write(&mut call, key, value.as_bytes(), Some(Expiry::Left(left)))?;
            }
            (written, _) => written?,
        }
        Ok(count)
    }
}

/// The seconds since the epoch of an `expiration` header: a whole number,
/// as Cloudflare sends it, or one with a fraction (the API describes the
/// field as a number), rounded up so that an entry is never taken to end
/// before it does; `None` for anything else.
fn expiration_secs(header: &str) -> Option<u64> {
    let header = header.trim();
    if let Ok(secs) = header.parse::<u64>() {
        return Some(secs);
    }
    let secs = header.parse::<f64>().ok().filter(|secs| secs.is_finite() && *secs >= 0.0)?.ceil();
    // Past u64's range (2^64 as a float) a cast would saturate: no such expiry.
    (secs < 18_446_744_073_709_551_616.0).then_some(secs as u64)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use dployr_domain::{KvBackend as _, StoreError};

    use super::{
        CloudflareConfig, CloudflareKv, Expiry, RetryPolicy, Stored, beyond, checked_base_url, expiration_secs,
        kept_expiry,
    };

    #[test]
    fn an_expiration_header_is_whole_seconds_or_a_number_rounded_up() {
        assert_eq!(expiration_secs("1700000060"), Some(1_700_000_060));
        assert_eq!(expiration_secs(" 1700000060 "), Some(1_700_000_060));
        assert_eq!(expiration_secs("1700000060.0"), Some(1_700_000_060));
        assert_eq!(expiration_secs("1700000060.25"), Some(1_700_000_061));
        assert_eq!(expiration_secs("1.7e9"), Some(1_700_000_000));
        for refused in ["", "soon", "-1", "-0.5", "NaN", "inf", "1e30"] {
            assert_eq!(expiration_secs(refused), None, "{refused}");
        }
    }

    #[test]
    fn a_base_url_that_does_not_parse_is_a_configuration_error() {
        for base in ["https://exa mple.com/client/v4", "https://example.com:99999/client/v4", "http://[::1/client/v4"] {
            let refused = checked_base_url(base);
            assert!(
                matches!(&refused, Err(StoreError::Configuration { setting: "CLOUDFLARE_API_BASE_URL", .. })),
                "{base}: {refused:?}"
            );
        }
        assert_eq!(
            checked_base_url("https://api.cloudflare.com/client/v4/").unwrap().url,
            "https://api.cloudflare.com/client/v4"
        );
    }

    #[test]
    fn a_spent_quota_of_the_ratelimit_header_tells_when_to_retry() {
        let headers = |value: &str| {
            let mut headers = reqwest::header::HeaderMap::new();
            headers.insert("ratelimit", value.parse().unwrap());
            headers
        };
        assert_eq!(super::spent_quota_resets_in(&headers("\"default\";r=0;t=300")), Some(Duration::from_secs(300)));
        assert_eq!(
            super::spent_quota_resets_in(&headers("\"burst\";r=0;t=30, \"default\";r=0;t=120")),
            Some(Duration::from_secs(120))
        );
        assert_eq!(super::spent_quota_resets_in(&headers("\"default\";r=50;t=30")), None, "quota left");
        assert_eq!(super::spent_quota_resets_in(&headers("garbage;;r=;t=x")), None);
        assert_eq!(super::spent_quota_resets_in(&reqwest::header::HeaderMap::new()), None);
    }

    #[test]
    fn plain_http_is_refused_but_to_this_machine_and_credentials_are_refused_unshown() {
        for local in ["http://127.0.0.1:8787/client/v4", "http://[::1]:8787/client/v4", "http://LOCALHOST/client/v4"] {
            assert!(checked_base_url(local).is_ok_and(|base| base.on_this_machine), "{local}");
        }
        for remote in
            ["http://api.cloudflare.com/client/v4", "http://10.0.0.7:8080/client/v4", "http://[2001:db8::1]/v4"]
        {
            let refused = checked_base_url(remote).unwrap_err();
            assert!(refused.to_string().contains("unencrypted"), "{remote}: {refused}");
        }
        for with_credentials in ["https://proxy:s3cret@gateway.example/client/v4", "http://user@127.0.0.1/client/v4"] {
            let refused = checked_base_url(with_credentials).unwrap_err();
            assert!(matches!(refused, StoreError::Configuration { setting: "CLOUDFLARE_API_BASE_URL", .. }));
            assert!(
                !refused.to_string().contains("s3cret") && refused.to_string().contains("credentials"),
                "{refused}"
            );
        }
        // Refused for another reason first, they are not shown either.
        for refused_otherwise in [
            "ftp://user:s3cret@api.cloudflare.com/client/v4",
            "https://user:s3cret@api.cloudflare.com:99999/client/v4",
            "https://user:s3cret@api cloudflare.com/client/v4",
            "https://user:s3cret@@host/client/v4",
            "https//user:s3cret@api.cloudflare.com/client/v4",
            "https:////user:s3cret@api.cloudflare.com:99999/client/v4",
            "user:s3cret@api.cloudflare.com",
        ] {
            let refused = checked_base_url(refused_otherwise).unwrap_err().to_string();
            assert!(!refused.contains("s3cret"), "{refused}");
        }
        // The scheme, as URLs go, in any case.
        assert_eq!(
            checked_base_url("HTTPS://api.cloudflare.com/client/v4").unwrap().url,
            "HTTPS://api.cloudflare.com/client/v4"
        );
        assert!(checked_base_url("HTTP://127.0.0.1:8787/client/v4").is_ok());
    }

    fn stored(expiration: Option<u64>, server_now: Option<u64>) -> Stored {
        Stored { value: b"1".to_vec(), expiration, server_now }
    }

    #[test]
    fn a_counter_read_without_its_expiry_is_written_again_with_the_ttl_not_forever() {
        let ttl = Duration::from_secs(600);
        assert!(matches!(kept_expiry(&stored(None, Some(1_000)), Some(ttl), 96), Some(Expiry::After(t)) if t == ttl));
        assert!(kept_expiry(&stored(None, Some(1_000)), None, 96).is_none(), "written without a TTL, kept without");
    }

    #[test]
    fn a_counter_keeps_the_second_it_ends_while_room_is_left_then_what_is_left() {
        assert!(matches!(kept_expiry(&stored(Some(1_200), Some(1_000)), None, 96), Some(Expiry::At(1_200))));
        // The seconds left as they are, without a second more: counted
        // again in the same second, the counter ends at 1_070 still.
        assert!(matches!(kept_expiry(&stored(Some(1_070), Some(1_000)), None, 96), Some(Expiry::Left(70))));
        assert!(matches!(kept_expiry(&stored(Some(1_050), Some(1_000)), None, 96), Some(Expiry::Left(50))));
    }

    #[test]
    fn a_wait_too_long_for_any_clock_is_beyond_every_bound_without_overflowing() {
        let a_second_and_a_half_in = Duration::from_millis(1500);
        let bound = Duration::from_secs(30);
        assert!(beyond(a_second_and_a_half_in, Duration::from_secs(u64::MAX), bound));
        assert!(beyond(Duration::MAX, Duration::MAX, bound));
        assert!(!beyond(a_second_and_a_half_in, Duration::from_secs(1), bound));
        assert!(beyond(Duration::from_secs(29), Duration::from_secs(1), bound));
    }

    /// A base URL where nothing listens: a port the system gave and took back.
    fn closed_port_url() -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        format!("http://127.0.0.1:{port}/client/v4")
    }

    /// `error`'s text and the text of every error in its source chain.
    fn texts_of_chain(error: &StoreError) -> Vec<String> {
        let mut texts = vec![error.to_string()];
        let mut source = std::error::Error::source(error);
        while let Some(cause) = source {
            texts.push(cause.to_string());
            source = cause.source();
        }
        texts
    }

    #[test]
    fn a_request_that_fails_in_transport_names_neither_the_account_nor_the_namespace_nor_the_key() {
        // Alphanumeric, as Cloudflare's ids are: the URL percent-encodes
        // anything else, which would hide a leak from `contains`.
        let (account, namespace, key) = ("f037e56e89293a05", "0f2ac74b498b4802", "sessionabc123");
        let config = CloudflareConfig {
            base_url: closed_port_url(),
            retry: RetryPolicy {
                max_attempts: 2,
                initial_backoff: Duration::from_millis(1),
                max_backoff: Duration::from_millis(1),
                max_elapsed: Duration::from_secs(5),
            },
            ..CloudflareConfig::new(account, namespace, "token")
        };
        let kv = CloudflareKv::new(config).unwrap();
        let error = kv.get(key).unwrap_err();
        assert!(matches!(error, StoreError::Unavailable { .. }), "{error:?}");
        let texts = texts_of_chain(&error);
        // Without its URL, the failure still says why (hyper's "tcp connect error").
        assert!(texts[0].contains("request failed: error sending request"), "{texts:?}");
        assert!(texts[0].contains("connect"), "the cause is said: {texts:?}");
        for text in &texts {
            for secret in [account, namespace, key] {
                assert!(!text.contains(secret), "{secret:?} in {text:?} of {texts:?}");
            }
        }
    }
}
