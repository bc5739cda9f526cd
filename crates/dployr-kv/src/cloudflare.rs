//! The Cloudflare Workers KV backend: the seed's production store, reached
//! over the REST API v4 with `reqwest::blocking`.
//!
//! What Cloudflare allows is checked up front, so a bad call fails with
//! [`StoreError::Invalid`] before any request: keys of 1 to 512 UTF-8 bytes,
//! not `.` or `..`; values up to 25 MiB; TTLs of at least 60 s (a TTL that is
//! not whole seconds is rounded up); list limits of 10 to 1000.
//!
//! Throttling (429) and server errors (5xx) and lost connections are retried
//! with exponential backoff and jitter, honouring `retry-after`, bounded in
//! attempts and in total time ([`RetryPolicy`]); then the call fails with
//! [`StoreError::Unavailable`]. A rejected token (401/403) or an unknown
//! namespace or account is a [`StoreError::Configuration`] naming the
//! variable to check.
//!
//! **Consistency.** Workers KV is eventually consistent, and it has no
//! atomic read-and-delete or counter: [`KvBackend::take`] and
//! [`KvBackend::increment`] are a read followed by a write here, so two
//! concurrent takes may both see the value and two concurrent increments may
//! return the same number ([`KvLimits::atomic`] is `false`). Callers that
//! need single use under concurrency (OTP attempts, OAuth state) get it
//! exactly on the memory and PostgreSQL backends, and best effort here.
//!
//! The client is blocking: from async code call it inside
//! `tokio::task::spawn_blocking`, never directly on a runtime thread.

use std::fmt;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dployr_domain::{KvBackend, KvLimits, KvPage, StoreError, StoreResult, not_a_counter, parse_counter};
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use rand::Rng as _;
use reqwest::blocking::{Client, RequestBuilder};
use reqwest::header::HeaderMap;
use serde::Deserialize;

/// Cloudflare's API root.
pub const CLOUDFLARE_API_URL: &str = "https://api.cloudflare.com/client/v4";

/// Environment variable holding the account id.
pub const ACCOUNT_ID_VAR: &str = "CLOUDFLARE_ACCOUNT_ID";
/// Environment variable holding the KV namespace id.
pub const NAMESPACE_ID_VAR: &str = "CLOUDFLARE_KV_NAMESPACE_ID";
/// Environment variable holding the API token.
pub const API_TOKEN_VAR: &str = "CLOUDFLARE_API_TOKEN";

/// Cloudflare's shortest TTL.
const MIN_TTL: Duration = Duration::from_secs(60);

/// How throttled or failed requests are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Most attempts per call, the first included. Default 5.
    pub max_attempts: u32,
    /// Backoff before the second attempt; it doubles each time. Default 200 ms.
    pub initial_backoff: Duration,
    /// Longest backoff between two attempts. Default 5 s.
    pub max_backoff: Duration,
    /// Longest time a call may spend, waits included; a retry that would
    /// end later is not made. Default 30 s.
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
    /// The API root; [`CLOUDFLARE_API_URL`] except in tests.
    pub base_url: String,
    /// Retries of throttled and failed requests.
    pub retry: RetryPolicy,
    /// Timeout of one HTTP request. Default 10 s.
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

    /// Reads [`ACCOUNT_ID_VAR`], [`NAMESPACE_ID_VAR`] and [`API_TOKEN_VAR`].
    ///
    /// # Errors
    /// [`StoreError::Configuration`] naming the first variable that is unset or empty.
    pub fn from_env() -> StoreResult<Self> {
        let var = |name: &'static str| match std::env::var(name) {
            Ok(value) if !value.trim().is_empty() => Ok(value.trim().to_owned()),
            _ => Err(StoreError::Configuration { setting: name, reason: "is not set".into() }),
        };
        Ok(Self::new(var(ACCOUNT_ID_VAR)?, var(NAMESPACE_ID_VAR)?, var(API_TOKEN_VAR)?))
    }
}

/// A [`KvBackend`] on a Cloudflare Workers KV namespace. `take` and
/// `increment` are not atomic here (see the module documentation).
pub struct CloudflareKv {
    config: CloudflareConfig,
    client: Client,
    /// `{base}/accounts/{account}/storage/kv/namespaces/{namespace}`.
    namespace_url: String,
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
    #[serde(default)]
    errors: Vec<ApiError>,
    #[serde(default)]
    result: Option<serde_json::Value>,
    #[serde(default)]
    result_info: Option<ResultInfo>,
}

#[derive(Deserialize)]
struct ApiError {
    code: u32,
    #[serde(default)]
    message: String,
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

impl Reply {
    fn envelope(&self) -> Envelope {
        serde_json::from_slice(&self.body).unwrap_or_default()
    }

    fn error_code(&self) -> Option<u32> {
        self.envelope().errors.first().map(|e| e.code)
    }

    fn error_text(&self) -> String {
        let envelope = self.envelope();
        match envelope.errors.first() {
            Some(e) => format!("HTTP {}, code {}: {}", self.status, e.code, e.message),
            None => format!("HTTP {}", self.status),
        }
    }
}

fn encode(segment: &str) -> String {
    utf8_percent_encode(segment, NON_ALPHANUMERIC).to_string()
}

fn ttl_secs(ttl: Duration) -> u64 {
    ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0)
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl CloudflareKv {
    /// A client for the namespace in `config`. No request is made yet.
    ///
    /// # Errors
    /// [`StoreError::Configuration`] for an empty id or token;
    /// [`StoreError::Backend`] if the HTTP client cannot be built.
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
        let client = Client::builder()
            .timeout(config.request_timeout)
            .build()
            .map_err(|e| StoreError::backend("building the Cloudflare HTTP client", e))?;
        let namespace_url = format!(
            "{}/accounts/{}/storage/kv/namespaces/{}",
            config.base_url.trim_end_matches('/'),
            encode(&config.account_id),
            encode(&config.namespace_id)
        );
        Ok(Self { config, client, namespace_url })
    }

    fn value_url(&self, key: &str) -> String {
        format!("{}/values/{}", self.namespace_url, encode(key))
    }

    /// Sends the request `build` makes, retrying 429, 5xx and transport
    /// failures within the [`RetryPolicy`]; any other answer is returned.
    fn send(&self, op: &'static str, build: impl Fn(&Client) -> RequestBuilder) -> StoreResult<Reply> {
        let policy = self.config.retry;
        let started = Instant::now();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (last_failure, retry_after) = match build(&self.client).bearer_auth(&self.config.api_token).send() {
                Ok(response) => {
                    let status = response.status().as_u16();
                    let headers = response.headers().clone();
                    let retryable = status == 429 || (500..600).contains(&status);
                    if !retryable {
                        let body = response
                            .bytes()
                            .map_err(|e| StoreError::unavailable(format!("Cloudflare KV {op}: reading the answer"), e))?
                            .to_vec();
                        return Ok(Reply { status, headers, body });
                    }
                    let retry_after = headers
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(Duration::from_secs);
                    (format!("HTTP {status}"), retry_after)
                }
                Err(error) => (format!("request failed: {error}"), None),
            };
            let wait = policy.backoff(attempt).max(retry_after.unwrap_or_default());
            let elapsed = started.elapsed();
            if attempt >= policy.max_attempts || elapsed + wait > policy.max_elapsed {
                return Err(StoreError::Unavailable {
                    reason: format!(
                        "Cloudflare KV {op}: gave up after {attempt} attempts in {elapsed:?}, last: {last_failure}"
                    )
                    .into(),
                    source: None,
                });
            }
            std::thread::sleep(wait);
        }
    }

    /// Turns a non-2xx answer into the error a caller can act on.
    fn failure(&self, op: &'static str, reply: &Reply) -> StoreError {
        let text = reply.error_text();
        match (reply.status, reply.error_code()) {
            (401 | 403, _) | (_, Some(10000)) => StoreError::Configuration {
                setting: API_TOKEN_VAR,
                reason: format!("Cloudflare refused the API token on {op} ({text})").into(),
            },
            (_, Some(10013)) => StoreError::Configuration {
                setting: NAMESPACE_ID_VAR,
                reason: format!("Cloudflare knows no KV namespace {} ({text})", self.config.namespace_id).into(),
            },
            (_, Some(7003)) => StoreError::Configuration {
                setting: ACCOUNT_ID_VAR,
                reason: format!("Cloudflare knows no account {} ({text})", self.config.account_id).into(),
            },
            (413, _) => StoreError::invalid("value", format!("refused by Cloudflare ({text})")),
            (414, _) => StoreError::invalid("key", format!("refused by Cloudflare ({text})")),
            (400, _) => StoreError::invalid("request", format!("refused by Cloudflare on {op} ({text})")),
            _ => StoreError::Backend { message: format!("Cloudflare KV {op}: {text}").into(), source: None },
        }
    }

    /// GET of a value with its `expiration` (seconds since the epoch).
    fn read(&self, key: &str) -> StoreResult<Option<(Vec<u8>, Option<u64>)>> {
        self.limits().check_key(key)?;
        let url = self.value_url(key);
        let reply = self.send("get", |c| c.get(&url))?;
        if reply.status == 404 && !matches!(reply.error_code(), Some(10013 | 7003)) {
            return Ok(None);
        }
        if !(200..300).contains(&reply.status) {
            return Err(self.failure("get", &reply));
        }
        let expiration =
            reply.headers.get("expiration").and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok());
        Ok(Some((reply.body, expiration)))
    }

    /// PUT of a value with either a TTL or an absolute expiration.
    fn write(&self, key: &str, value: &[u8], expiry: Expiry) -> StoreResult<()> {
        let url = self.value_url(key);
        let query: Vec<(&str, String)> = match expiry {
            Expiry::Never => vec![],
            Expiry::Ttl(ttl) => vec![("expiration_ttl", ttl_secs(ttl).to_string())],
            Expiry::At(at) => vec![("expiration", at.to_string())],
        };
        let reply = self.send("put", |c| {
            c.put(&url)
                .query(&query)
                .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                .body(value.to_vec())
        })?;
        if !(200..300).contains(&reply.status) {
            return Err(self.failure("put", &reply));
        }
        Ok(())
    }
}

#[derive(Clone, Copy)]
enum Expiry {
    Never,
    Ttl(Duration),
    At(u64),
}

impl KvBackend for CloudflareKv {
    fn limits(&self) -> KvLimits {
        KvLimits { min_ttl: MIN_TTL, min_list_limit: 10, max_list_limit: 1000, atomic: false, ..KvLimits::default() }
    }

    fn get(&self, key: &str) -> StoreResult<Option<Vec<u8>>> {
        Ok(self.read(key)?.map(|(value, _)| value))
    }

    fn put(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> StoreResult<()> {
        let limits = self.limits();
        limits.check_key(key)?;
        limits.check_value(value)?;
        limits.check_ttl(ttl)?;
        self.write(key, value, ttl.map_or(Expiry::Never, Expiry::Ttl))
    }

    fn delete(&self, key: &str) -> StoreResult<()> {
        self.limits().check_key(key)?;
        let url = self.value_url(key);
        let reply = self.send("delete", |c| c.delete(&url))?;
        if reply.status == 404 && reply.error_code() == Some(10009) {
            return Ok(());
        }
        if !(200..300).contains(&reply.status) {
            return Err(self.failure("delete", &reply));
        }
        Ok(())
    }

    fn list(&self, prefix: &str, limit: usize, cursor: Option<&str>) -> StoreResult<KvPage> {
        self.limits().check_list_limit(limit)?;
        let url = format!("{}/keys", self.namespace_url);
        let mut query = vec![("prefix", prefix.to_owned()), ("limit", limit.to_string())];
        if let Some(cursor) = cursor.filter(|c| !c.is_empty()) {
            query.push(("cursor", cursor.to_owned()));
        }
        let reply = self.send("list", |c| c.get(&url).query(&query))?;
        if !(200..300).contains(&reply.status) {
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
        let Some((value, _)) = self.read(key)? else { return Ok(None) };
        self.delete(key)?;
        Ok(Some(value))
    }

    /// A read, then a write that keeps the counter's expiry: **not atomic**
    /// on Cloudflare. If less than Cloudflare's 60 s minimum is left, the
    /// counter lives 60 s more.
    fn increment(&self, key: &str, ttl: Option<Duration>) -> StoreResult<i64> {
        let limits = self.limits();
        limits.check_key(key)?;
        limits.check_ttl(ttl)?;
        let (count, expiry) = match self.read(key)? {
            None => (1, ttl.map_or(Expiry::Never, Expiry::Ttl)),
            Some((value, expiration)) => {
                let current = parse_counter(&value).ok_or_else(|| not_a_counter(key))?;
                let expiry = match expiration {
                    None => Expiry::Never,
                    Some(at) if at >= unix_now() + MIN_TTL.as_secs() => Expiry::At(at),
                    Some(_) => Expiry::Ttl(MIN_TTL),
                };
                (current + 1, expiry)
            }
        };
        self.write(key, count.to_string().as_bytes(), expiry)?;
        Ok(count)
    }
}
