//! A small control plane of dployr base on axum: what a Rust service on this
//! data layer looks like in practice. The data layer is used through
//! [`AsyncDataLayer`] (no `spawn_blocking` by hand), sessions are
//! tower-sessions records kept on the data layer's own key-value backend by
//! [`KvSessionStore`], and the routes tell the story of a user:
//!
//! | route | what it does |
//! |---|---|
//! | `POST /sign-in/code` `{"email"}` | sends a one-time code (here: to the [`CodeSink`], the console in `main`); at most [`MAX_CODES_PER_WINDOW`] per address per [`CODE_WINDOW`], then 429 with `Retry-After` |
//! | `POST /sign-in` `{"email","code"}` | checks the code (3 guesses), signs in: a new session id, the user in it; a client that hangs up once the code is checked may have spent it with no session saved (the server drops the request's future), and asks for a new code |
//! | `GET /me` | who is signed in |
//! | `POST /clusters` | the caller's cluster (created on first call) |
//! | `POST /clusters/{id}/members` `{"emails"}` | invites at most [`MAX_INVITES_PER_REQUEST`] addresses; only for developers and above (middleware calling `can_write`); answers each address with its role, never the profile of an account it names |
//! | `GET /clusters/{id}/members?limit=&cursor=` | members, one page at a time, with the cursor of the next page; `limit` (default 20) is brought within 1 to 100 (`Page::first`); one that is not a whole number of 0 to 4294967295 is a 400 |
//! | `GET /invites`, `POST /invites/{id}/accept` | the caller's invitations, and accepting one (as viewer) |
//! | `POST /oauth/start` `{"redirect"}`, `GET /oauth/callback?state=` | an OAuth state made and checked once; the redirect is a path of this site of at most [`MAX_REDIRECT_BYTES`] |
//! | `POST /sign-out` | ends this session |
//! | `POST /sign-out/everywhere` | ends every session of the caller, on every device |
//!
//! The session cookie is `SameSite=Lax` (the OAuth provider's redirect back
//! must carry it) and `Secure` when [`CookieTransport::HttpsOnly`] is asked
//! for (`main` reads [`SECURE_COOKIE_VAR`]). An error the client cannot act
//! on (a backend's, the session store's) is answered without its text, which
//! goes to the log (`tracing`). Every error, axum's own rejections and
//! unknown routes included, is answered as `{"error": ...}` with at most
//! [`MAX_ERROR_MESSAGE_CHARS`] characters of message; the exceptions are
//! hyper's `414` and `431`, sent with no body before any route sees a URL
//! or headers too long. A request is answered `408` after
//! [`REQUEST_TIMEOUT`], and [`serve`] closes a connection that does not
//! finish its headers within [`HEADER_READ_TIMEOUT`]. A session whose user
//! no longer exists is ended and answered 401 by every route that needs a
//! signed-in user.
//!
//! The tests in `tests/http.rs` drive the whole story over HTTP.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::uri::Authority;
use axum::http::{HeaderValue, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use dployr_data::{
    AsyncDataLayer, ClusterId, Cursor, Email, KvStoreConfig, NewUser, OAuthState, OtpCode, Page, Provider, StoreError,
    User, UserId,
};
use dployr_tower_sessions::KvSessionStore;
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use tower_http::timeout::TimeoutLayer;
use tower_sessions::cookie::SameSite;
use tower_sessions::{Expiry, Session, SessionManagerLayer, session, session_store};

/// The session field that names the signed-in user; the session store
/// indexes sessions by it, which is what signing out everywhere uses.
pub const USER_FIELD: &str = "user_id";

/// Where one-time codes go: an e-mail in a real service, the console in
/// this example's `main`, a channel in its tests.
pub type CodeSink = Arc<dyn Fn(&Email, &OtpCode) + Send + Sync>;

/// What every handler shares.
#[derive(Clone)]
struct App {
    data: AsyncDataLayer,
    sessions: KvSessionStore,
    send_code: CodeSink,
    lifetimes: SessionLifetimes,
}

/// How long the example's sessions live after they were last written.
/// tower-sessions writes a session when it changes (a sign-in, an OAuth
/// start), not on a request that only reads it: a signed-in session ends
/// this long after its sign-in however busy it is, unless something writes
/// it again. (`SessionManagerLayer::with_always_save` would extend it on
/// every request, for one write per request: on Cloudflare, against the
/// account's request budget and its one write per second per key.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLifetimes {
    /// Every session, a signed-in one in particular: the data layer's
    /// session lifetime (`DPLOYR_SESSION_TTL_SECS`, 7 days by default).
    pub signed_in: Duration,
    /// A session that `POST /oauth/start` made for a browser not signed in,
    /// which holds only the pending state: the state's own lifetime
    /// (`DPLOYR_STATE_TTL_SECS`, 10 minutes), so that anonymous starts leave
    /// no record behind for days.
    pub anonymous: Duration,
}

impl SessionLifetimes {
    /// The lifetimes of the data layer's key-value settings.
    pub fn of(config: &KvStoreConfig) -> Self {
        Self { signed_in: config.session_ttl, anonymous: config.state_ttl }
    }
}

/// `lifetime` as tower-sessions' inactivity expiry (a lifetime past what
/// its time type holds is its longest).
fn on_inactivity(lifetime: Duration) -> Expiry {
    Expiry::OnInactivity(
        tower_sessions::cookie::time::Duration::try_from(lifetime)
            .unwrap_or(tower_sessions::cookie::time::Duration::MAX),
    )
}

/// The session store for `data`: tower-sessions records on the data
/// layer's session backend (memory, PostgreSQL or Cloudflare, as configured),
/// indexed by [`USER_FIELD`].
///
/// # Errors
/// [`StoreError::Unavailable`] only while the data layer is being dropped.
pub fn session_store(data: &AsyncDataLayer) -> Result<KvSessionStore, StoreError> {
    let backend = Arc::clone(data.blocking().kv().backend());
    Ok(KvSessionStore::new(backend).with_user_field(USER_FIELD))
}

/// The connections the session cookie is sent over: whether it carries
/// `Secure`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CookieTransport {
    /// Any connection (no `Secure`): plain HTTP on a local port, as `main`
    /// serves by default, where a `Secure` cookie would not be sent back by
    /// every client.
    AnyConnection,
    /// HTTPS only (`Secure`): a deployment behind TLS, where a cookie also
    /// sent over plain HTTP (a link to `http://` of the same host) would
    /// hand the session to whoever watches the network.
    HttpsOnly,
}

/// The variable `main` reads [`CookieTransport`] from (see
/// [`CookieTransport::from_secure_cookie_var`]).
pub const SECURE_COOKIE_VAR: &str = "DPLOYR_EXAMPLE_SECURE_COOKIE";

impl CookieTransport {
    /// From the value of [`SECURE_COOKIE_VAR`] (`None` when it is unset):
    /// `true` is [`HttpsOnly`](Self::HttpsOnly); `false` or unset is
    /// [`AnyConnection`](Self::AnyConnection), for the local example.
    ///
    /// # Errors
    /// [`StoreError::Configuration`] for any other value: a typo must not
    /// leave a deployment behind TLS with a cookie sent in clear.
    pub fn from_secure_cookie_var(value: Option<&str>) -> Result<Self, StoreError> {
        match value.map(str::trim) {
            None | Some("false") => Ok(Self::AnyConnection),
            Some("true") => Ok(Self::HttpsOnly),
            Some(other) => Err(StoreError::Configuration {
                setting: SECURE_COOKIE_VAR,
                reason: format!("is `{other}`, expected `true` or `false`").into(),
            }),
        }
    }
}

/// The control plane's routes, with their session layer; the session
/// cookie is sent over the connections `cookie` says, and a session lives
/// as long as `lifetimes` says after it was last written (tower-sessions'
/// own default, two weeks, would ignore the data layer's settings).
pub fn router(
    data: AsyncDataLayer,
    sessions: KvSessionStore,
    send_code: CodeSink,
    cookie: CookieTransport,
    lifetimes: SessionLifetimes,
) -> Router {
    let session_layer = SessionManagerLayer::new(sessions.clone())
        .with_expiry(on_inactivity(lifetimes.signed_in))
        // Lax, not tower-sessions' default Strict: the OAuth provider sends
        // the browser back to `GET /oauth/callback` from its own site, and a
        // Strict cookie is not sent on that cross-site navigation, so the
        // callback would never find the state this browser started. Lax is
        // still withheld from cross-site POSTs, and every route that changes
        // something, the callback aside, is a POST.
        .with_same_site(SameSite::Lax)
        .with_secure(cookie == CookieTransport::HttpsOnly);
    let app = App { data, sessions, send_code, lifetimes };
    let writers_only = middleware::from_fn_with_state(app.clone(), require_write);
    Router::new()
        .route("/sign-in/code", post(send_code_by_email))
        .route("/sign-in", post(sign_in))
        .route("/me", get(me))
        .route("/clusters", post(create_cluster))
        .route("/clusters/{cluster}/members", get(members))
        .route("/clusters/{cluster}/members", post(invite).route_layer(writers_only))
        .route("/invites", get(invites))
        .route("/invites/{cluster}/accept", post(accept_invite))
        .route("/oauth/start", post(oauth_start))
        .route("/oauth/callback", get(oauth_callback))
        .route("/sign-out", post(sign_out))
        .route("/sign-out/everywhere", post(sign_out_everywhere))
        .fallback(no_such_route)
        .layer(session_layer)
        // A request whose body trickles in, or never comes, holds its
        // connection and task no longer than this (answered 408, with the
        // error body below); a call already started goes on to its end (see
        // the async facade's cancellation).
        .layer(TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, REQUEST_TIMEOUT))
        .layer(middleware::map_response(with_an_error_body))
        .layer(middleware::from_fn(same_origin_writes_only))
        .with_state(app)
}

/// The longest a request may take, its body and the answer included, before
/// it is answered `408 Request Timeout`.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The longest a connection may take to send a request's headers, the
/// first request's or the next on a kept-alive connection, before it is
/// closed: a client that opens connections and never finishes a request
/// would otherwise hold each of them, and with enough of them, every
/// file descriptor the server has.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `app` on `listener` until `shutdown` completes, then waits for
/// the requests in progress: `axum::serve`, but with a header read timeout
/// (`header_read_timeout`; `axum::serve` sets none, so a connection that
/// never finishes its headers is held forever). HTTP/1.1 only, as the
/// example is. A failed `accept` (no descriptor left, say) is logged and
/// retried after a moment instead of stopping the server.
///
/// # Errors
/// None today; the `Result` keeps the signature of a server loop.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    header_read_timeout: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(header_read_timeout);
    let connections = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    tracing::warn!(%error, "could not accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let connection = http.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
        let connection = connections.watch(connection);
        tokio::spawn(async move {
            // A client that went away, or sent what is not HTTP: its own affair.
            if let Err(error) = connection.await {
                tracing::debug!(%error, "a connection ended with an error");
            }
        });
    }
    // Closed before the wait, so that a new client is refused at once
    // instead of waiting in the backlog for a server that stopped.
    drop(listener);
    connections.shutdown().await;
    Ok(())
}

/// The most characters of an error message answered: axum's rejections
/// quote the caller's input (a path segment, a query string) and are cut
/// here, so that a 5000-character value is not sent back whole.
pub const MAX_ERROR_MESSAGE_CHARS: usize = 200;

/// The most bytes of a plain-text error body read to quote it. Axum's
/// rejections are short strings already in memory; the bound only keeps a
/// streamed body from being read whole. A longer one is answered with the
/// status's reason instead.
const MAX_QUOTED_ERROR_BYTES: usize = 64 * 1024;

/// Gives every error answer the body every error has, `{"error": ...}`,
/// with its status and headers (`Allow` of a 405, `Set-Cookie`) kept.
/// Answers that are not JSON come from outside the handlers: axum's
/// rejections (415, 422, 400, 413 as plain text), its 405 (empty), and the
/// session layer, which saves a changed session after the handler answered
/// and, when the store fails, replaces the answer with a 500 without a body
/// (its error goes to the log); a handler cannot save first instead, as
/// tower-sessions' `Session::save` leaves the session marked changed and the
/// layer would write it a second time (on Cloudflare, a second write of the
/// key within the second: throttled). A 4xx's text is quoted, cut to
/// [`MAX_ERROR_MESSAGE_CHARS`]: it tells the client what to fix. A 5xx's
/// never is: it is not the client's to act on.
async fn with_an_error_body(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .map(|media| media.trim().to_ascii_lowercase())
        .is_some_and(|media| media == "application/json" || media.ends_with("+json"));
    if is_json || !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let quoted = if status.is_client_error() {
        axum::body::to_bytes(body, MAX_QUOTED_ERROR_BYTES)
            .await
            .ok()
            .and_then(|bytes| String::from_utf8(bytes.into()).ok())
    } else {
        None
    };
    let message = match quoted.as_deref().map(str::trim) {
        Some(text) if !text.is_empty() => at_most_chars(text, MAX_ERROR_MESSAGE_CHARS),
        _ if status == StatusCode::INTERNAL_SERVER_ERROR => "internal error".into(),
        _ => status.canonical_reason().unwrap_or("error").to_ascii_lowercase(),
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Response::from_parts(parts, Body::from(json!({ "error": message }).to_string()))
}

/// `text` cut to its first `max` characters, with an ellipsis when cut.
fn at_most_chars(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

/// A path no route has: 404 with the body every error has (axum's own
/// fallback answers an empty 404).
async fn no_such_route() -> ApiError {
    ApiError(StatusCode::NOT_FOUND, "no such route".into())
}

/// Refuses (403) a request that changes something when the browser says it
/// comes from another origin: `Sec-Fetch-Site` other than `same-origin` or
/// `none`, or, from a browser that does not send it, an `Origin` that does
/// not name this request's `Host` (see [`origin_names_host`]).
/// `SameSite=Lax` withholds the cookie from other *sites* only: a page on
/// another port of the same host, or on a sibling subdomain, is the same
/// site and could otherwise post a form that signs the user out
/// everywhere, accepts an invitation or makes a cluster (the routes that
/// take no JSON body, which a cross-origin page may send without asking).
/// Clients that are not browsers send neither header and pass.
async fn same_origin_writes_only(request: Request, next: Next) -> Response {
    if request.method() == axum::http::Method::GET || request.method() == axum::http::Method::HEAD {
        return next.run(request).await;
    }
    let headers = request.headers();
    let text = |name: &str| headers.get(name).and_then(|value| value.to_str().ok());
    // The browser's own word first: it knows both origins, where `Host`
    // may have been rewritten by a proxy in front of this server.
    let foreign = match text("sec-fetch-site") {
        Some(site) => site != "same-origin" && site != "none",
        // An older browser: its `Origin` against this request's `Host`.
        None => text("origin").is_some_and(|origin| !origin_names_host(origin, text("host"))),
    };
    if foreign {
        return ApiError(StatusCode::FORBIDDEN, "a change asked from another origin".into()).into_response();
    }
    next.run(request).await
}

/// Whether `origin`, an `Origin` header, is an `http` or `https` origin
/// whose host and port (the scheme's default when it has none) are those of
/// `host`, the request's `Host` (the same default when it has none).
/// Anything else is foreign: no `Host`, `Origin: null` (a sandboxed or
/// local page), an origin without a scheme (`127.0.0.1:3000`) or with
/// another one, or with a path or user name, which no browser sends.
///
/// The scheme is not compared with this server's own: behind a proxy that
/// terminates TLS the server is reached over `http` while the browser's
/// origin is `https`, and nothing in the request says which is true. What
/// that lets through is an origin on this host and port with the other
/// scheme, which no page can have: one port speaks one of the two.
fn origin_names_host(origin: &str, host: Option<&str>) -> bool {
    let Ok(origin) = origin.parse::<Uri>() else {
        return false;
    };
    let default_port = match origin.scheme_str() {
        Some(scheme) if scheme.eq_ignore_ascii_case("http") => 80,
        Some(scheme) if scheme.eq_ignore_ascii_case("https") => 443,
        _ => return false,
    };
    if origin.path_and_query().is_some_and(|path| path.as_str() != "/") {
        return false;
    }
    let (Some(theirs), Some(Ok(own))) = (origin.authority(), host.map(str::parse::<Authority>)) else {
        return false;
    };
    let port = |authority: &Authority| authority.port_u16().unwrap_or(default_port);
    !theirs.as_str().contains('@')
        && !own.as_str().contains('@')
        && theirs.host().eq_ignore_ascii_case(own.host())
        && port(theirs) == port(&own)
}

/// An error answer: a status and a message, as `{"error": ...}`.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<StoreError> for ApiError {
    /// What the caller can act on is said with its text (bad input, not
    /// found, conflict). "Try again" (503) is said without the text, as is
    /// a backend or configuration error (500): their text and sources name
    /// hosts, accounts, namespaces and keys (on Cloudflare, the request's
    /// URL), the server's business; they go to the log.
    fn from(error: StoreError) -> Self {
        // Recorded as an error, not as text: the log line has its sources too.
        let logged: &(dyn std::error::Error + 'static) = &error;
        let status = match &error {
            StoreError::NotFound { .. } => StatusCode::NOT_FOUND,
            StoreError::Conflict { .. } => StatusCode::CONFLICT,
            StoreError::Invalid { .. } => StatusCode::BAD_REQUEST,
            StoreError::Unavailable { .. } => {
                tracing::warn!(error = logged, "store unavailable, answered as 503");
                return Self(StatusCode::SERVICE_UNAVAILABLE, "the store is unavailable; try again later".into());
            }
            // Backend, Configuration, and any variant added later: the
            // enum is non-exhaustive, and a new kind is hidden until it is
            // known to be safe to show.
            _ => {
                tracing::error!(error = logged, "store error answered as 500");
                return Self(StatusCode::INTERNAL_SERVER_ERROR, "internal error".into());
            }
        };
        Self(status, error.to_string())
    }
}

impl From<session::Error> for ApiError {
    /// As a store error: a session store that cannot be reached is 503
    /// (retrying later may work), anything else 500. Neither says more: the
    /// text names backends, keys and records, the server's business; it
    /// goes to the log.
    fn from(error: session::Error) -> Self {
        if is_unavailable(&error) {
            tracing::warn!(%error, "session store unavailable, answered as 503");
            return Self(StatusCode::SERVICE_UNAVAILABLE, "sessions are unavailable; try again later".into());
        }
        tracing::error!(%error, "session error answered as 500");
        Self(StatusCode::INTERNAL_SERVER_ERROR, "internal error".into())
    }
}

/// Whether `error` is a [`StoreError::Unavailable`] of the session store.
/// [`KvSessionStore`] hands every backend error to tower-sessions as
/// `session_store::Error::Backend` holding the store error's text, so the
/// kind survives only as the start of that text, which is matched here
/// against what `StoreError` itself writes for the variant.
fn is_unavailable(error: &session::Error) -> bool {
    let session::Error::Store(session_store::Error::Backend(message)) = error else {
        return false;
    };
    let unavailable = StoreError::Unavailable { reason: Cow::Borrowed(""), source: None }.to_string();
    message.starts_with(&unavailable)
}

type Answer = Result<Json<Value>, ApiError>;

/// The signed-in user, as an extractor (handlers and middleware): 401
/// when the session names no user, or a user who no longer exists. That
/// session is then ended (deleted, its cookie cleared): an account deleted
/// by any means (`UserStore::delete`, an account an invitation made and
/// that never signed in, removed from its last cluster) leaves no session that half works, answered 401 by one route,
/// 404 by another and 200 by a third. The price is one read of the user per
/// request that needs one; a session that merely named the id would be
/// free, but would hold on to an account that is gone.
struct SignedIn(User);

impl FromRequestParts<App> for SignedIn {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &App) -> Result<Self, ApiError> {
        let session = Session::from_request_parts(parts, app).await.map_err(|(_, reason)| {
            tracing::error!(reason, "no session to read the user from");
            ApiError(StatusCode::INTERNAL_SERVER_ERROR, "internal error".into())
        })?;
        let unauthorized = || ApiError(StatusCode::UNAUTHORIZED, "sign in first".into());
        let id: String = session.get(USER_FIELD).await?.ok_or_else(unauthorized)?;
        let id = UserId::parse(&id).map_err(|_| unauthorized())?;
        // On the primary: `users.get` may go to a replica (a stale name
        // grants nothing), but here its answer decides whether the session
        // lives, and a replica behind a first sign-in would end it.
        let found = app
            .data
            .run(move |data| {
                let _primary = data.pool().reads_on_primary();
                dployr_data::UserStore::get(data.users(), &id)
            })
            .await?;
        match found {
            Some(user) => Ok(Self(user)),
            None => {
                session.flush().await?;
                Err(ApiError(StatusCode::UNAUTHORIZED, "this account no longer exists; sign in again".into()))
            }
        }
    }
}

#[derive(Deserialize)]
struct EmailBody {
    email: String,
}

/// How many one-time codes one address is sent per [`CODE_WINDOW`]. The
/// route needs no sign-in, and each code replaces the address's previous
/// one: without a bound anyone could flood an inbox, and keep its owner from
/// ever using a code. The bound is per address, so it cannot stop someone
/// from spending an address's codes for the window (a limit per client
/// address would, behind a proxy that says who the client is). Nor can
/// it stop anyone from spending the current code with wrong guesses (three
/// to an address, from any client, signed in or not): with the two, a
/// stranger can keep an address from signing in for as long as they go on.
pub const MAX_CODES_PER_WINDOW: i64 = 5;

/// The window of [`MAX_CODES_PER_WINDOW`]: it opens with the first code sent
/// to an address and closes this long after, whatever was sent meanwhile.
pub const CODE_WINDOW: Duration = Duration::from_secs(10 * 60);

/// Where the count of codes sent to an address lives, followed by the
/// SHA-256 of the address: like the data layer's own one-time-code keys, a
/// key shows no address.
const CODES_SENT_PREFIX: &str = "otp_sent:";

/// Counts a code about to be sent to `email` and says whether it is within
/// [`MAX_CODES_PER_WINDOW`]. The count is the data layer's key-value counter
/// on the backend of one-time codes, so it holds across restarts and across
/// servers sharing that backend (exactly where the backend increments
/// atomically, PostgreSQL and memory; about, on Cloudflare). The async
/// facade has no counter of its own: the backend's is called on tokio's
/// blocking pool, not through `run`, whose threads are the PostgreSQL
/// pool's: on Cloudflare the counter is HTTP (a read and a write, retried
/// up to 30 s when throttled), and anonymous requests for one address
/// could otherwise hold every one of those threads and stall every
/// PostgreSQL call of the server.
async fn within_code_limit(data: &AsyncDataLayer, email: &Email) -> Result<bool, StoreError> {
    let key = format!("{CODES_SENT_PREFIX}{:x}", Sha256::digest(email.as_str().as_bytes()));
    let backend = Arc::clone(data.blocking().kv().one_time_backend());
    let sent = tokio::task::spawn_blocking(move || backend.increment(&key, Some(CODE_WINDOW)))
        .await
        .map_err(|error| StoreError::backend("counting the codes sent", error))??;
    Ok(sent <= MAX_CODES_PER_WINDOW)
}

async fn send_code_by_email(State(app): State<App>, Json(body): Json<EmailBody>) -> Result<Response, ApiError> {
    let email = Email::parse(&body.email)?;
    if !within_code_limit(&app.data, &email).await? {
        // The count opened at most a window ago: by then it has closed.
        let retry_after = CODE_WINDOW.as_secs().to_string();
        let error = json!({ "error": "too many codes for this address; try again later" });
        return Ok((StatusCode::TOO_MANY_REQUESTS, [(header::RETRY_AFTER, retry_after)], Json(error)).into_response());
    }
    let code = app.data.kv().create_otp(&email).await?;
    (app.send_code)(&email, &code);
    Ok(StatusCode::ACCEPTED.into_response())
}

#[derive(Deserialize)]
struct SignInBody {
    email: String,
    code: String,
}

async fn sign_in(State(app): State<App>, session: Session, Json(body): Json<SignInBody>) -> Answer {
    let email = Email::parse(&body.email)?;
    if !app.data.kv().validate_otp(&email, &OtpCode::new(body.code)).await? {
        return Err(ApiError(StatusCode::UNAUTHORIZED, "wrong or expired code".into()));
    }
    let user = app.data.users().upsert(NewUser::new(email, Provider::Email)).await?;
    // A new id at sign-in: an id planted before it (session fixation) is worthless.
    session.cycle_id().await?;
    session.insert(USER_FIELD, user.id.to_string()).await?;
    Ok(Json(json!({ "id": user.id, "email": user.email })))
}

async fn me(SignedIn(user): SignedIn) -> Answer {
    Ok(Json(json!({ "id": user.id, "email": user.email })))
}

async fn create_cluster(State(app): State<App>, SignedIn(user): SignedIn) -> Answer {
    let cluster = app.data.clusters().create_for_owner(&user.id).await?;
    Ok(Json(json!({ "id": cluster.id, "name": cluster.name })))
}

/// Lets the request through only if the signed-in user may write to the
/// cluster of the path: 401 when signed out, 403 below developer.
async fn require_write(
    State(app): State<App>,
    Path(cluster): Path<ClusterId>,
    SignedIn(user): SignedIn,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if !app.data.clusters().can_write(&user.id, &cluster).await? {
        return Err(ApiError(StatusCode::FORBIDDEN, "only developers and above may change this cluster".into()));
    }
    Ok(next.run(request).await)
}

#[derive(Deserialize)]
struct InviteBody {
    emails: Vec<String>,
}

/// The most addresses one invitation names. Each unknown address becomes
/// a user and each is parsed on the runtime's thread: without a bound, a
/// body at the 2 MB limit (some 120 000 addresses) made as many users and
/// stalled other requests for seconds.
pub const MAX_INVITES_PER_REQUEST: usize = 100;

async fn invite(State(app): State<App>, Path(cluster): Path<ClusterId>, Json(body): Json<InviteBody>) -> Answer {
    // Counted before any address is parsed or stored.
    if body.emails.len() > MAX_INVITES_PER_REQUEST {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("{} addresses; at most {MAX_INVITES_PER_REQUEST} per invitation", body.emails.len()),
        ));
    }
    let emails = body.emails.iter().map(|e| Email::parse(e)).collect::<Result<Vec<_>, _>>()?;
    let members = app.data.clusters().add_users(&cluster, &emails).await?;
    // Each address with its role here, and nothing of the account behind
    // it: its id, name and picture would tell anyone who can make a cluster
    // (anyone signed in) whether an address has an account, and show its
    // profile before its owner accepted anything. The role is `invited`
    // whether or not the account existed; a member's own role, the inviter
    // (a developer or above) can read in the member list anyway.
    let invited: Vec<Value> =
        members.iter().map(|member| json!({ "email": member.email, "role": member.role })).collect();
    Ok(Json(json!({ "members": invited })))
}

#[derive(Deserialize)]
struct PageQuery {
    limit: Option<u32>,
    cursor: Option<String>,
}

async fn members(
    State(app): State<App>,
    Path(cluster): Path<ClusterId>,
    Query(query): Query<PageQuery>,
    SignedIn(user): SignedIn,
) -> Answer {
    if !app.data.clusters().can_read(&user.id, &cluster).await? {
        return Err(ApiError(StatusCode::FORBIDDEN, "not a member of this cluster".into()));
    }
    let limit = query.limit.unwrap_or(20);
    let page = match query.cursor {
        Some(cursor) => Page::after(Cursor::new(cursor), limit),
        None => Page::first(limit),
    };
    // `members` leaves invitations out: an invitee who has not accepted
    // shows nothing of their account (id, name, picture) to the cluster.
    Ok(Json(json!(app.data.clusters().members(&cluster, &page).await?)))
}

async fn invites(State(app): State<App>, SignedIn(user): SignedIn) -> Answer {
    Ok(Json(json!({ "invites": app.data.clusters().pending_invites(&user.id).await? })))
}

async fn accept_invite(
    State(app): State<App>,
    Path(cluster): Path<ClusterId>,
    SignedIn(user): SignedIn,
) -> Result<StatusCode, ApiError> {
    app.data.clusters().accept_invite(&user.id, &cluster).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
struct OAuthStart {
    redirect: String,
}

/// Where the browser's session keeps the OAuth state it started.
const OAUTH_STATE_FIELD: &str = "oauth_state";

/// The longest redirect `POST /oauth/start` keeps, in bytes: ample for a
/// path of this site and within what browsers and proxies take in a URL.
/// The route needs no sign-in; without a bound, anyone could have the store
/// keep up to the request body limit (2 MB) per call.
pub const MAX_REDIRECT_BYTES: usize = 2048;

/// Whether `redirect` is a path of this site (`/clusters`), never another
/// site (`https://evil.example`, `//evil.example`, `/\evil.example`): the
/// callback sends the browser there.
fn is_local_path(redirect: &str) -> bool {
    // Browsers drop tabs and line breaks from a URL (`/\t/evil.example` is
    // `//evil.example` to them) and read `\` as `/`.
    redirect.starts_with('/')
        && !redirect.starts_with("//")
        && !redirect.contains('\\')
        && !redirect.contains("://")
        && !redirect.chars().any(char::is_control)
}

async fn oauth_start(State(app): State<App>, session: Session, Json(body): Json<OAuthStart>) -> Answer {
    if body.redirect.len() > MAX_REDIRECT_BYTES {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("redirect is {} bytes long, at most {MAX_REDIRECT_BYTES} allowed", body.redirect.len()),
        ));
    }
    if !is_local_path(&body.redirect) {
        return Err(ApiError(StatusCode::BAD_REQUEST, "redirect must be a path of this site".into()));
    }
    let state = OAuthState::generate();
    app.data.kv().create_state(&state, &body.redirect).await?;
    // Bound to this browser: a callback from another one (a link an
    // attacker sends with a state they started) is refused. The session
    // keeps the state's hash, not the state: its record is stored, and the
    // key-value store keeps states only as hashes too.
    session.insert(OAUTH_STATE_FIELD, state_hash(state.expose())).await?;
    // A browser not signed in gets a session for the state alone: it lives
    // as long as the state, not for the days of a signed-in one.
    if session.get::<String>(USER_FIELD).await?.is_none() {
        session.set_expiry(Some(on_inactivity(app.lifetimes.anonymous)));
    }
    Ok(Json(json!({
        "state": state.expose(),
        "authorize_url": format!("https://github.com/login/oauth/authorize?client_id=example&state={}", state.expose()),
    })))
}

#[derive(Deserialize)]
struct OAuthCallback {
    state: String,
}

async fn oauth_callback(State(app): State<App>, session: Session, Query(query): Query<OAuthCallback>) -> Answer {
    // Read, not taken: a callback with another state (a cross-site link,
    // which carries the Lax cookie) must not spend the one this browser is
    // waiting for. The matching one is spent here, so a replay finds none.
    let started_here: Option<String> = session.get(OAUTH_STATE_FIELD).await?;
    if started_here != Some(state_hash(&query.state)) {
        return Err(ApiError(StatusCode::BAD_REQUEST, "this OAuth state was not started by this browser".into()));
    }
    // Taken from the session once the store has answered: a store that
    // failed (503) leaves the browser's pending state for its retry.
    let validated = app.data.kv().validate_state(&OAuthState::new(query.state)).await?;
    session.remove_value(OAUTH_STATE_FIELD).await?;
    match validated {
        Some(redirect) => Ok(Json(json!({ "redirect": redirect }))),
        None => Err(ApiError(StatusCode::BAD_REQUEST, "unknown, used or expired OAuth state".into())),
    }
}

/// The SHA-256 (hex) of an OAuth state, as the session keeps it.
fn state_hash(state: &str) -> String {
    format!("{:x}", Sha256::digest(state.as_bytes()))
}

async fn sign_out(session: Session) -> Result<StatusCode, ApiError> {
    session.flush().await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn sign_out_everywhere(State(app): State<App>, SignedIn(user): SignedIn, session: Session) -> Answer {
    let ended = app.sessions.delete_user_sessions(&user.id.to_string()).await?;
    // This device's session is among them; flushing also clears its cookie.
    session.flush().await?;
    Ok(Json(json!({ "ended": ended })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_secure_cookie_variable_takes_true_false_or_nothing_and_refuses_a_typo() {
        assert_eq!(CookieTransport::from_secure_cookie_var(None).unwrap(), CookieTransport::AnyConnection);
        assert_eq!(CookieTransport::from_secure_cookie_var(Some("false")).unwrap(), CookieTransport::AnyConnection);
        assert_eq!(CookieTransport::from_secure_cookie_var(Some("true")).unwrap(), CookieTransport::HttpsOnly);
        let typo = CookieTransport::from_secure_cookie_var(Some("yes")).unwrap_err();
        assert!(matches!(typo, StoreError::Configuration { setting: SECURE_COOKIE_VAR, .. }), "{typo}");
    }

    #[test]
    fn a_session_error_is_answered_without_its_text_and_unavailable_as_503() {
        let secret = "pg at db.internal:5432 refused key session:abc";
        let unavailable = StoreError::Unavailable { reason: secret.into(), source: None };
        let cases = [
            (session_store::Error::Backend(unavailable.to_string()), StatusCode::SERVICE_UNAVAILABLE),
            (session_store::Error::Backend(format!("backend error: {secret}")), StatusCode::INTERNAL_SERVER_ERROR),
            (session_store::Error::Decode(secret.into()), StatusCode::INTERNAL_SERVER_ERROR),
        ];
        for (error, status) in cases {
            let ApiError(answered, message) = ApiError::from(session::Error::Store(error));
            assert_eq!(answered, status, "{message}");
            assert!(!message.contains("db.internal"), "{message}");
        }
    }

    #[test]
    fn a_store_error_the_client_cannot_act_on_is_answered_without_its_text_or_its_sources() {
        // What reqwest's Display of a failed Cloudflare request carries.
        let secret = "for url (https://api.cloudflare.com/client/v4/accounts/acc-7f3e/storage/kv/namespaces/ns-91ab/values/session%3Aabc)";
        let cause = || -> dployr_data::domain::BoxError { secret.into() };
        let cases = [
            (StoreError::Unavailable { reason: secret.into(), source: Some(cause()) }, StatusCode::SERVICE_UNAVAILABLE),
            (StoreError::Backend { message: secret.into(), source: Some(cause()) }, StatusCode::INTERNAL_SERVER_ERROR),
            (
                StoreError::Configuration { setting: "CLOUDFLARE_KV_NAMESPACE_ID", reason: secret.into() },
                StatusCode::INTERNAL_SERVER_ERROR,
            ),
        ];
        for (error, status) in cases {
            let ApiError(answered, message) = ApiError::from(error);
            assert_eq!(answered, status, "{message}");
            for leaked in ["acc-7f3e", "ns-91ab", "session%3Aabc", "cloudflare.com", "CLOUDFLARE"] {
                assert!(!message.contains(leaked), "{leaked:?} in {message:?}");
            }
        }
    }

    #[test]
    fn a_store_error_the_client_can_act_on_is_answered_with_its_text() {
        let cases = [
            (StoreError::not_found("cluster", "c-1"), StatusCode::NOT_FOUND, "cluster c-1 not found"),
            (
                StoreError::conflict("membership", "owner", "the owner cannot leave"),
                StatusCode::CONFLICT,
                "membership conflict on owner: the owner cannot leave",
            ),
            (StoreError::invalid("email", "no @"), StatusCode::BAD_REQUEST, "invalid email: no @"),
        ];
        for (error, status, text) in cases {
            let ApiError(answered, message) = ApiError::from(error);
            assert_eq!((answered, message.as_str()), (status, text));
        }
    }
}
