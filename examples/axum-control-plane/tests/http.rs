//! The control plane's whole story over HTTP, with a real client against a
//! server on a free port and a throwaway PostgreSQL: sign-in by one-time
//! code (a wrong one first), a cluster, an invitation accepted, members read
//! page by page, a viewer refused a write by the middleware, an OAuth state
//! that works once, sign-out, and sign-out of every device. Then what guards
//! the edges: the session cookie's attributes, a failing session store
//! answered without its text, an over-long redirect, the limit of codes
//! per address and of addresses per invitation, what an invitation answers,
//! every error as JSON, an OAuth callback with a wrong state, `Origin`
//! checked by scheme, host and port, and the session of a deleted account.

#![cfg(test)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum_control_plane::{
    CODE_WINDOW, CodeSink, CookieTransport, HEADER_READ_TIMEOUT, MAX_CODES_PER_WINDOW, MAX_ERROR_MESSAGE_CHARS,
    MAX_INVITES_PER_REQUEST, MAX_REDIRECT_BYTES, REQUEST_TIMEOUT, SessionLifetimes, router, serve, session_store,
};
use dployr_data::{
    AsyncDataLayer, Config, KvBackend, KvLimits, KvPage, KvStoreConfig, StoreError, StoreResult, UserId,
};
use dployr_tower_sessions::KvSessionStore;
use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// One browser: its own cookie.
struct Device {
    client: reqwest::Client,
    base: String,
    cookie: Option<String>,
}

impl Device {
    fn new(base: &str) -> Self {
        Self { client: reqwest::Client::new(), base: base.to_owned(), cookie: None }
    }

    /// Sends a request with this device's cookie, keeps the cookie the
    /// server sets (or drops the one it removes), and returns the status and
    /// the JSON body (`null` when empty).
    async fn call(&mut self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let (status, _, json) = self.call_with_headers(method, path, body).await;
        (status, json)
    }

    /// As [`call`](Self::call), with the response's headers.
    async fn call_with_headers(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, HeaderMap, Value) {
        let mut request = self.client.request(method, format!("{}{path}", self.base));
        if let Some(cookie) = &self.cookie {
            request = request.header("cookie", cookie);
        }
        if let Some(body) = body {
            request = request.header("content-type", "application/json").body(body.to_string());
        }
        let response = request.send().await.unwrap();
        let (status, headers) = (response.status(), response.headers().clone());
        if let Some(set) = headers.get("set-cookie") {
            let set = set.to_str().unwrap();
            let pair = set.split(';').next().unwrap().trim().to_owned();
            self.cookie = if set.contains("Max-Age=0") || pair.ends_with('=') { None } else { Some(pair) };
        }
        let bytes = response.bytes().await.unwrap();
        let json = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap() };
        (status, headers, json)
    }
}

/// The server and the codes it "e-mailed".
struct Server {
    base: String,
    codes: Arc<Mutex<HashMap<String, String>>>,
    /// The server's data layer, to change what it stores behind its back.
    data: AsyncDataLayer,
    db: dployr_testkit::TestDatabase,
}

impl Server {
    /// The server as `main` runs it locally: cookies over any connection,
    /// sessions on the data layer.
    async fn start() -> Self {
        Self::start_with(CookieTransport::AnyConnection, |data| session_store(data).unwrap()).await
    }

    /// A server whose session cookie goes over `cookie` and whose sessions
    /// are kept by the store `sessions` makes for the data layer.
    async fn start_with(cookie: CookieTransport, sessions: impl FnOnce(&AsyncDataLayer) -> KvSessionStore) -> Self {
        let db = tokio::task::spawn_blocking(dployr_testkit::database).await.unwrap();
        let data = AsyncDataLayer::open(Config::new(db.url())).await.unwrap();
        let codes: Arc<Mutex<HashMap<String, String>>> = Arc::default();
        let sink = Arc::clone(&codes);
        let send_code: CodeSink = Arc::new(move |email, code| {
            sink.lock().unwrap().insert(email.as_str().to_owned(), code.expose().to_owned());
        });
        let sessions = sessions(&data);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let app = router(data.clone(), sessions, send_code, cookie, SessionLifetimes::of(&KvStoreConfig::default()));
        // The server loop `main` runs, with its header read timeout.
        tokio::spawn(async move { serve(listener, app, HEADER_READ_TIMEOUT, std::future::pending()).await.unwrap() });
        Self { base, codes, data, db }
    }

    /// Every key and value the key-value store holds, as text (values as
    /// UTF-8 where they are, escaped bytes elsewhere).
    async fn stored_text(&self) -> String {
        let url = self.db.url().to_owned();
        tokio::task::spawn_blocking(move || {
            use diesel::prelude::*;
            let mut conn = PgConnection::establish(&url).unwrap();
            diesel::dsl::sql::<diesel::sql_types::Text>(
                "SELECT coalesce(string_agg(key || ' ' || encode(value, 'escape'), E'\\n'), '') FROM kv_entries",
            )
            .get_result::<String>(&mut conn)
            .unwrap()
        })
        .await
        .unwrap()
    }

    /// Seconds until each tower-sessions record expires, in key order.
    async fn session_records_expire_in(&self) -> Vec<i64> {
        let url = self.db.url().to_owned();
        tokio::task::spawn_blocking(move || {
            use diesel::prelude::*;
            let mut conn = PgConnection::establish(&url).unwrap();
            diesel::dsl::sql::<diesel::sql_types::BigInt>(
                "SELECT extract(epoch FROM expires_at - now())::bigint FROM kv_entries \
                 WHERE key LIKE 'tower\\_session:%' ORDER BY key",
            )
            .load::<i64>(&mut conn)
            .unwrap()
        })
        .await
        .unwrap()
    }

    fn code_of(&self, email: &str) -> String {
        self.codes.lock().unwrap().get(email).cloned().unwrap()
    }

    /// A device signed in as `email` through the one-time code.
    async fn signed_in(&self, email: &str) -> Device {
        let mut device = Device::new(&self.base);
        let (status, _) = device.call(Method::POST, "/sign-in/code", Some(json!({ "email": email }))).await;
        assert_eq!(status, StatusCode::ACCEPTED);
        let code = self.code_of(email);
        let (status, me) = device.call(Method::POST, "/sign-in", Some(json!({ "email": email, "code": code }))).await;
        assert_eq!(status, StatusCode::OK, "{me}");
        assert_eq!(me["email"], email);
        device
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_story_runs_over_http() {
    let server = Server::start().await;

    // Sign-in: a wrong code is refused and signs nobody in; the right one works.
    let mut ada = Device::new(&server.base);
    let (status, _) = ada.call(Method::POST, "/sign-in/code", Some(json!({ "email": "ada@example.io" }))).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let code = server.code_of("ada@example.io");
    let wrong = if code == "AAAAAA" { "BBBBBB" } else { "AAAAAA" };
    let (status, body) =
        ada.call(Method::POST, "/sign-in", Some(json!({ "email": "ada@example.io", "code": wrong }))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(ada.call(Method::GET, "/me", None).await.0, StatusCode::UNAUTHORIZED);
    let (status, _) =
        ada.call(Method::POST, "/sign-in", Some(json!({ "email": "ada@example.io", "code": code }))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(ada.call(Method::GET, "/me", None).await.1["email"], "ada@example.io");
    // The code is spent.
    let mut replay = Device::new(&server.base);
    let (status, _) =
        replay.call(Method::POST, "/sign-in", Some(json!({ "email": "ada@example.io", "code": code }))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // A cluster, two invitations, one accepted.
    let (status, cluster) = ada.call(Method::POST, "/clusters", None).await;
    assert_eq!(status, StatusCode::OK, "{cluster}");
    let members = format!("/clusters/{}/members", cluster["id"].as_str().unwrap());
    let (status, invited) =
        ada.call(Method::POST, &members, Some(json!({ "emails": ["bob@example.io", "cyd@example.io"] }))).await;
    assert_eq!(status, StatusCode::OK, "{invited}");
    assert_eq!(invited["members"].as_array().unwrap().len(), 2);

    let mut bob = server.signed_in("bob@example.io").await;
    let (_, invites) = bob.call(Method::GET, "/invites", None).await;
    assert_eq!(invites["invites"][0]["cluster_id"], cluster["id"]);
    let accept = format!("/invites/{}/accept", cluster["id"].as_str().unwrap());
    assert_eq!(bob.call(Method::POST, &accept, None).await.0, StatusCode::NO_CONTENT);

    // Members page by page (the invitee who did not accept is not a member).
    let (status, first) = bob.call(Method::GET, &format!("{members}?limit=1"), None).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    assert_eq!((first["items"][0]["email"].as_str(), first["total"].as_u64()), (Some("ada@example.io"), Some(2)));
    let cursor = first["next"].as_str().unwrap();
    let (_, second) = bob.call(Method::GET, &format!("{members}?limit=1&cursor={cursor}"), None).await;
    assert_eq!(second["items"][0]["email"], "bob@example.io");
    assert_eq!(second["items"][0]["role"], "viewer");
    // The last page hands out no cursor, even when it is full.
    assert!(second["next"].is_null(), "{second}");

    // A viewer may read but not write; a stranger may do neither.
    let (status, body) = bob.call(Method::POST, &members, Some(json!({ "emails": ["eve@example.io"] }))).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let mut stranger = Device::new(&server.base);
    assert_eq!(stranger.call(Method::GET, &members, None).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(
        stranger.call(Method::POST, &members, Some(json!({ "emails": ["eve@example.io"] }))).await.0,
        StatusCode::UNAUTHORIZED
    );

    // An OAuth state is good once.
    let (status, started) = stranger.call(Method::POST, "/oauth/start", Some(json!({ "redirect": "/after" }))).await;
    assert_eq!(status, StatusCode::OK);
    let callback = format!("/oauth/callback?state={}", started["state"].as_str().unwrap());
    let (status, body) = stranger.call(Method::GET, &callback, None).await;
    assert_eq!((status, body["redirect"].as_str()), (StatusCode::OK, Some("/after")));
    assert_eq!(stranger.call(Method::GET, &callback, None).await.0, StatusCode::BAD_REQUEST, "a replayed state");
    // A state is good only in the browser that started it, and leads only
    // to a path of this site.
    let mut attacker = Device::new(&server.base);
    let (_, planted) = attacker.call(Method::POST, "/oauth/start", Some(json!({ "redirect": "/welcome" }))).await;
    // Neither the state nor the session id is kept as it is: not by the
    // key-value store, not in the session's record.
    let stored = server.stored_text().await;
    assert!(stored.contains("tower_session:"), "sessions are not where this test looks: {stored}");
    assert!(!stored.contains(planted["state"].as_str().unwrap()), "a state is stored as it is: {stored}");
    let link = format!("/oauth/callback?state={}", planted["state"].as_str().unwrap());
    assert_eq!(stranger.call(Method::GET, &link, None).await.0, StatusCode::BAD_REQUEST, "another browser's state");
    for away in ["https://evil.example/", "//evil.example", "/\\evil.example", "/\t/evil.example", "/\n/evil.example"] {
        let (status, _) = attacker.call(Method::POST, "/oauth/start", Some(json!({ "redirect": away }))).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "redirect to {away}");
    }

    // Sign-out ends this session only.
    let mut ada_phone = server.signed_in("ada@example.io").await;
    assert_eq!(bob.call(Method::POST, "/sign-out", None).await.0, StatusCode::NO_CONTENT);
    assert_eq!(bob.call(Method::GET, "/me", None).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(ada.call(Method::GET, "/me", None).await.0, StatusCode::OK);

    // Sign-out everywhere ends both of ada's sessions, and nobody else's.
    let mut bob_again = server.signed_in("bob@example.io").await;
    let (status, ended) = ada_phone.call(Method::POST, "/sign-out/everywhere", None).await;
    assert_eq!((status, ended["ended"].as_u64()), (StatusCode::OK, Some(2)));
    assert_eq!(ada.call(Method::GET, "/me", None).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(ada_phone.call(Method::GET, "/me", None).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(bob_again.call(Method::GET, "/me", None).await.0, StatusCode::OK);
}

/// The `Set-Cookie` header of a request that puts something in a new
/// session (starting an OAuth sign-in), on a server whose cookie goes over
/// `cookie`.
async fn session_cookie_set_over(cookie: CookieTransport) -> String {
    let server = Server::start_with(cookie, |data| session_store(data).unwrap()).await;
    let mut device = Device::new(&server.base);
    let (status, headers, body) =
        device.call_with_headers(Method::POST, "/oauth/start", Some(json!({ "redirect": "/after" }))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    headers.get("set-cookie").unwrap().to_str().unwrap().to_owned()
}

/// Whether a `Set-Cookie` header carries the attribute `name` (`Secure`,
/// `SameSite=Lax`), whatever its case and spacing.
fn has_attribute(set_cookie: &str, name: &str) -> bool {
    set_cookie.split(';').skip(1).any(|attribute| attribute.trim().eq_ignore_ascii_case(name))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_cookie_is_same_site_lax_and_secure_only_when_asked() {
    let local = session_cookie_set_over(CookieTransport::AnyConnection).await;
    // Lax: the OAuth provider's cross-site redirect to the callback carries it.
    assert!(has_attribute(&local, "SameSite=Lax"), "{local}");
    assert!(!has_attribute(&local, "Secure"), "{local}");

    let behind_tls = session_cookie_set_over(CookieTransport::HttpsOnly).await;
    assert!(has_attribute(&behind_tls, "SameSite=Lax"), "{behind_tls}");
    assert!(has_attribute(&behind_tls, "Secure"), "{behind_tls}");
}

/// What a session backend that fails says about itself: a host and a key,
/// which no client should read.
const BACKEND_SECRET: &str = "sessions.internal:5432 refused key session:7f3a";

/// A key-value backend on which every call fails with the error `fail` makes
/// (with `deletes_work`, every call but a delete, which finds nothing).
struct FailingKv {
    fail: fn() -> StoreError,
    deletes_work: bool,
}

impl KvBackend for FailingKv {
    fn limits(&self) -> KvLimits {
        KvLimits::default()
    }

    fn get(&self, _key: &str) -> StoreResult<Option<Vec<u8>>> {
        Err((self.fail)())
    }

    fn put(&self, _key: &str, _value: &[u8], _ttl: Option<Duration>) -> StoreResult<()> {
        Err((self.fail)())
    }

    fn delete(&self, _key: &str) -> StoreResult<()> {
        if self.deletes_work { Ok(()) } else { Err((self.fail)()) }
    }

    fn list(&self, _prefix: &str, _limit: usize, _cursor: Option<&str>) -> StoreResult<KvPage> {
        Err((self.fail)())
    }

    fn take(&self, _key: &str) -> StoreResult<Option<Vec<u8>>> {
        Err((self.fail)())
    }

    fn increment(&self, _key: &str, _ttl: Option<Duration>) -> StoreResult<i64> {
        Err((self.fail)())
    }
}

/// The answer to `GET /me` from a browser with a session cookie, on a
/// server whose session store fails with the error `fail` makes.
async fn me_with_failing_sessions(fail: fn() -> StoreError) -> (StatusCode, Value) {
    let server = Server::start_with(CookieTransport::AnyConnection, |_| {
        KvSessionStore::new(Arc::new(FailingKv { fail, deletes_work: false }))
            .with_user_field(axum_control_plane::USER_FIELD)
    })
    .await;
    let mut device = Device::new(&server.base);
    // A well-formed session id, so that the session is loaded from the store.
    device.cookie = Some(format!("id={}", tower_sessions::session::Id::default()));
    device.call(Method::GET, "/me", None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_session_store_is_answered_without_its_text_and_unavailable_as_503() {
    let (status, body) =
        me_with_failing_sessions(|| StoreError::Unavailable { reason: BACKEND_SECRET.into(), source: None }).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body["error"].is_string(), "{body}");
    assert!(!body.to_string().contains("sessions.internal"), "{body}");

    let (status, body) =
        me_with_failing_sessions(|| StoreError::Backend { message: BACKEND_SECRET.into(), source: None }).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert!(!body.to_string().contains("sessions.internal"), "{body}");
}

/// A session store that fails when the session layer writes the sign-in's
/// session, after the handler answered (the delete of the id it replaces
/// works): the layer answers 500, and the answer has the JSON body of every
/// error, not none; nothing of the store's text is in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sign_in_whose_session_cannot_be_written_is_answered_500_with_an_error_body() {
    let server = Server::start_with(CookieTransport::AnyConnection, |_| {
        KvSessionStore::new(Arc::new(FailingKv {
            fail: || StoreError::Unavailable { reason: BACKEND_SECRET.into(), source: None },
            deletes_work: true,
        }))
        .with_user_field(axum_control_plane::USER_FIELD)
    })
    .await;
    let mut device = Device::new(&server.base);
    let (status, _) = device.call(Method::POST, "/sign-in/code", Some(json!({ "email": "fay@example.io" }))).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let code = server.code_of("fay@example.io");
    let (status, body) =
        device.call(Method::POST, "/sign-in", Some(json!({ "email": "fay@example.io", "code": code }))).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert!(body["error"].is_string(), "{body}");
    assert!(!body.to_string().contains("sessions.internal"), "{body}");
    assert!(device.cookie.is_none(), "a cookie for a session that was not stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oauth_redirect_longer_than_the_bound_is_refused() {
    let server = Server::start().await;
    let mut device = Device::new(&server.base);
    let longest = format!("/{}", "a".repeat(MAX_REDIRECT_BYTES - 1));
    let (status, body) = device.call(Method::POST, "/oauth/start", Some(json!({ "redirect": longest }))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let too_long = format!("/{}", "a".repeat(MAX_REDIRECT_BYTES));
    let (status, body) = device.call(Method::POST, "/oauth/start", Some(json!({ "redirect": too_long }))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codes_past_the_limit_for_one_address_are_refused_while_another_address_gets_its_code() {
    let server = Server::start().await;
    let mut device = Device::new(&server.base);
    let ask = json!({ "email": "dee@example.io" });
    for sent in 1..=MAX_CODES_PER_WINDOW {
        let (status, body) = device.call(Method::POST, "/sign-in/code", Some(ask.clone())).await;
        assert_eq!(status, StatusCode::ACCEPTED, "code {sent}: {body}");
    }
    let last_code = server.code_of("dee@example.io");

    let (status, headers, body) = device.call_with_headers(Method::POST, "/sign-in/code", Some(ask)).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    let retry_after: u64 = headers.get("retry-after").unwrap().to_str().unwrap().parse().unwrap();
    assert!((1..=CODE_WINDOW.as_secs()).contains(&retry_after), "Retry-After: {retry_after}");
    // The refused request replaced nothing: the last code sent still signs in.
    assert_eq!(server.code_of("dee@example.io"), last_code);
    let (status, body) =
        device.call(Method::POST, "/sign-in", Some(json!({ "email": "dee@example.io", "code": last_code }))).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let (status, body) = device.call(Method::POST, "/sign-in/code", Some(json!({ "email": "eli@example.io" }))).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
}

/// A page of another origin on the same site (another port of this host, a
/// sibling subdomain), to which `SameSite=Lax` still sends the cookie, posts
/// a form: the change is refused and the session lives on. The same
/// request from this origin, or from a client that is not a browser, passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_posted_from_another_origin_is_refused() {
    let server = Server::start().await;
    let client = reqwest::Client::new();
    let post = |cookie: &str, headers: &[(&str, &str)]| {
        let mut request = client.post(format!("{}/sign-out/everywhere", server.base)).header("cookie", cookie);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send()
    };
    let mut device = server.signed_in("gus@example.io").await;
    let cookie = device.cookie.clone().unwrap();
    for foreign in [
        vec![("origin", "http://127.0.0.1:1")],
        vec![("origin", "http://evil.example")],
        vec![("origin", "null")],
        vec![("sec-fetch-site", "same-site")],
        vec![("sec-fetch-site", "cross-site"), ("origin", server.base.as_str())],
    ] {
        let answer = post(&cookie, &foreign).await.unwrap();
        assert_eq!(answer.status(), StatusCode::FORBIDDEN, "{foreign:?}");
    }
    let (status, me) = device.call(Method::GET, "/me", None).await;
    assert_eq!(status, StatusCode::OK, "the session was ended by a refused request: {me}");
    // Behind a proxy that rewrites `Host` (nginx's default), a browser's
    // same-origin request is told by `Sec-Fetch-Site`; an older browser's
    // `Origin` matches `Host` with the default port written or not.
    let proxied = [("origin", "https://app.example"), ("sec-fetch-site", "same-origin")];
    assert_eq!(post(&cookie, &proxied).await.unwrap().status(), StatusCode::OK);
    let (status, _) = device.call(Method::GET, "/me", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "signed out everywhere from its own origin");
    let mut device = server.signed_in("gus@example.io").await;
    let cookie = device.cookie.clone().unwrap();
    let default_port = [("origin", "http://127.0.0.1"), ("host", "127.0.0.1:80")];
    assert_eq!(post(&cookie, &default_port).await.unwrap().status(), StatusCode::OK);
    let (status, _) = device.call(Method::GET, "/me", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "signed out everywhere from its own origin");
}

/// A request without the JSON helpers of [`Device`]: `headers` as given,
/// `body` as it is. Returns the status, the headers and the body as text.
async fn raw(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<reqwest::Body>,
) -> (StatusCode, HeaderMap, String) {
    let mut request = reqwest::Client::new().request(method, url).body(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    let (status, headers) = (response.status(), response.headers().clone());
    (status, headers, response.text().await.unwrap())
}

/// Axum's own rejections (a missing content type, a missing field, bad
/// JSON, an oversize body, a path segment or a query that does not parse),
/// an unknown route and a wrong method are answered with their status and
/// `{"error": ...}`, whose message never quotes more than
/// `MAX_ERROR_MESSAGE_CHARS` of what the caller sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_is_answered_as_json_with_its_status_and_a_bounded_message() {
    let server = Server::start().await;
    let mut ada = server.signed_in("ada@example.io").await;
    let (_, cluster) = ada.call(Method::POST, "/clusters", None).await;
    let cookie = ada.cookie.clone().unwrap();
    let url = |path: &str| format!("{}{path}", server.base);
    let json_type = ("content-type", "application/json");
    let long_id = "x".repeat(5000);
    let oversize = json!({ "email": "a".repeat(2 * 1024 * 1024) }).to_string();
    let members = format!("/clusters/{}/members", cluster["id"].as_str().unwrap());
    let sign_in_code = url("/sign-in/code");
    let with_cookie = [("cookie", cookie.as_str())];
    let email = r#"{"email":"a@example.io"}"#;
    let answer = raw(Method::POST, &sign_in_code, &[], email).await;
    assert_json_error("no content type", StatusCode::UNSUPPORTED_MEDIA_TYPE, answer);
    let answer = raw(Method::POST, &sign_in_code, &[json_type], "{}").await;
    assert_json_error("a missing field", StatusCode::UNPROCESSABLE_ENTITY, answer);
    let answer = raw(Method::POST, &sign_in_code, &[json_type], "{").await;
    assert_json_error("malformed JSON", StatusCode::BAD_REQUEST, answer);
    let answer = raw(Method::POST, &sign_in_code, &[json_type], oversize).await;
    assert_json_error("a body over 2 MB", StatusCode::PAYLOAD_TOO_LARGE, answer);
    let answer = raw(Method::POST, &url(&format!("/invites/{long_id}/accept")), &with_cookie, "").await;
    assert_json_error("a path id that is not one", StatusCode::BAD_REQUEST, answer);
    let answer = raw(Method::GET, &url(&format!("{members}?limit={long_id}")), &with_cookie, "").await;
    assert_json_error("a bad query", StatusCode::BAD_REQUEST, answer);
    let answer = raw(Method::GET, &url("/nowhere"), &[], "").await;
    assert_json_error("an unknown route", StatusCode::NOT_FOUND, answer);
    let answer = raw(Method::GET, &url("/sign-out"), &[], "").await;
    assert!(answer.1.contains_key("allow"), "a wrong method: the Allow header is kept");
    assert_json_error("a wrong method", StatusCode::METHOD_NOT_ALLOWED, answer);
}

/// That `answer` (from [`raw`]) has the status `expected` and a JSON body
/// `{"error": ...}` whose message is not empty and at most
/// `MAX_ERROR_MESSAGE_CHARS` long (and the ellipsis of a cut one).
fn assert_json_error(case: &str, expected: StatusCode, (status, headers, text): (StatusCode, HeaderMap, String)) {
    assert_eq!(status, expected, "{case}: {text}");
    let content_type = headers.get("content-type").map(|value| value.to_str().unwrap());
    assert_eq!(content_type, Some("application/json"), "{case}: {text}");
    let body: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{case}: not JSON: {text}"));
    let message = body["error"].as_str().unwrap_or_else(|| panic!("{case}: no error: {body}"));
    assert!(!message.is_empty(), "{case}");
    assert!(message.chars().count() <= MAX_ERROR_MESSAGE_CHARS + 1, "{case}: {} chars", message.chars().count());
}

/// An invitation naming more than `MAX_INVITES_PER_REQUEST` addresses is
/// refused with 400 naming the limit, and makes no user; one at the limit
/// passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invitation_of_more_addresses_than_the_limit_is_refused_and_stores_none() {
    let server = Server::start().await;
    let mut ada = server.signed_in("ada@example.io").await;
    let (_, cluster) = ada.call(Method::POST, "/clusters", None).await;
    let members = format!("/clusters/{}/members", cluster["id"].as_str().unwrap());
    let addresses = |count: usize| (0..count).map(|n| format!("guest{n}@example.io")).collect::<Vec<_>>();

    let (status, body) =
        ada.call(Method::POST, &members, Some(json!({ "emails": addresses(MAX_INVITES_PER_REQUEST + 1) }))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body["error"].as_str().unwrap().contains(&MAX_INVITES_PER_REQUEST.to_string()), "{body}");
    let guest = server.data.users().get_by_email(&dployr_data::Email::parse("guest0@example.io").unwrap()).await;
    assert!(guest.unwrap().is_none(), "a refused invitation made a user");

    let (status, body) =
        ada.call(Method::POST, &members, Some(json!({ "emails": addresses(MAX_INVITES_PER_REQUEST) }))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["members"].as_array().unwrap().len(), MAX_INVITES_PER_REQUEST);
}

/// Inviting an address that has an account answers exactly as inviting one
/// that has none: the address and its role, nothing of the account (id,
/// name, picture), which would tell any signed-in user (anyone can make a
/// cluster) who has an account and show their profile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invitation_answers_the_addresses_and_roles_and_nothing_of_their_accounts() {
    let server = Server::start().await;
    server.signed_in("bob@example.io").await;
    let mut eve = server.signed_in("eve@example.io").await;
    let (_, cluster) = eve.call(Method::POST, "/clusters", None).await;
    let members = format!("/clusters/{}/members", cluster["id"].as_str().unwrap());
    let (status, invited) =
        eve.call(Method::POST, &members, Some(json!({ "emails": ["nobody@example.io", "bob@example.io"] }))).await;
    assert_eq!(status, StatusCode::OK, "{invited}");
    let expected = json!({ "members": [
        { "email": "bob@example.io", "role": "invited" },
        { "email": "nobody@example.io", "role": "invited" },
    ] });
    assert_eq!(invited, expected);
    // Nor does the member list show an invitee who has not accepted.
    let (_, listed) = eve.call(Method::GET, &members, None).await;
    assert_eq!(listed["total"], 1, "{listed}");
    assert!(!listed.to_string().contains("bob@example.io"), "{listed}");
}

/// A callback with a state this browser did not start (a cross-site link,
/// which carries the Lax cookie) is refused without spending the browser's
/// own pending state: its real callback then works, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_with_another_state_leaves_the_pending_one_usable_once() {
    let server = Server::start().await;
    let mut browser = Device::new(&server.base);
    let (status, started) = browser.call(Method::POST, "/oauth/start", Some(json!({ "redirect": "/after" }))).await;
    assert_eq!(status, StatusCode::OK, "{started}");
    let (status, body) = browser.call(Method::GET, "/oauth/callback?state=x", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let callback = format!("/oauth/callback?state={}", started["state"].as_str().unwrap());
    let (status, body) = browser.call(Method::GET, &callback, None).await;
    assert_eq!((status, body["redirect"].as_str()), (StatusCode::OK, Some("/after")), "{body}");
    assert_eq!(browser.call(Method::GET, &callback, None).await.0, StatusCode::BAD_REQUEST, "a replayed state");
}

/// From a browser without `Sec-Fetch-Site`, an `Origin` passes only as an
/// `http` or `https` origin naming this host and port: one without a
/// scheme, with another scheme, or with a user name is foreign.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_that_is_not_an_http_origin_of_this_host_and_port_is_foreign() {
    let server = Server::start().await;
    let device = server.signed_in("hal@example.io").await;
    let cookie = device.cookie.clone().unwrap();
    let own = server.base.strip_prefix("http://").unwrap();
    let post = |origin: String| {
        let url = format!("{}/clusters", server.base);
        let cookie = cookie.clone();
        async move { raw(Method::POST, &url, &[("cookie", &cookie), ("origin", &origin)], "").await.0 }
    };
    for foreign in [own.to_owned(), format!("ftp://{own}"), format!("http://user@{own}"), format!("http://{own}/path")]
    {
        assert_eq!(post(foreign.clone()).await, StatusCode::FORBIDDEN, "Origin: {foreign}");
    }
    assert_eq!(post(server.base.clone()).await, StatusCode::OK, "its own origin");
}

/// A session whose user was deleted behind its back is answered 401 by
/// every route that needs a signed-in user, not 404 by one and 200 by
/// another, and is ended: its cookie is cleared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_whose_user_was_deleted_is_ended_and_answered_401_by_every_route() {
    let server = Server::start().await;
    let mut ada = server.signed_in("ada@example.io").await;
    let (_, cluster) = ada.call(Method::POST, "/clusters", None).await;
    let cluster = cluster["id"].as_str().unwrap().to_owned();
    let members = format!("/clusters/{cluster}/members");
    let accept = format!("/invites/{cluster}/accept");
    let routes = [
        (Method::GET, "/me", None),
        (Method::POST, "/clusters", None),
        (Method::GET, "/invites", None),
        (Method::POST, accept.as_str(), None),
        (Method::GET, members.as_str(), None),
        (Method::POST, members.as_str(), Some(json!({ "emails": ["ivy@example.io"] }))),
        (Method::POST, "/sign-out/everywhere", None),
    ];
    for (n, (method, path, body)) in routes.into_iter().enumerate() {
        // A user for each route: the first 401 ends the session, and a
        // second route would then only prove that an unknown session is 401.
        let email = format!("gone{n}@example.io");
        let mut device = server.signed_in(&email).await;
        ada.call(Method::POST, &members, Some(json!({ "emails": [email] }))).await;
        let (_, me) = device.call(Method::GET, "/me", None).await;
        let id = UserId::parse(me["id"].as_str().unwrap()).unwrap();
        // Behind the session's back: no session of theirs is ended.
        server.data.users().delete(&id).await.unwrap();
        let (status, answer) = device.call(method.clone(), path, body).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path}: {answer}");
        assert!(device.cookie.is_none(), "{method} {path}: the session was not ended");
    }
}

/// A session lives as long as the data layer's settings say (tower-sessions'
/// own default is two weeks), and one that an anonymous `POST /oauth/start`
/// made only as long as its OAuth state.
#[tokio::test(flavor = "multi_thread")]
async fn sessions_live_as_the_data_layer_says_and_an_anonymous_oauth_start_as_its_state() {
    let server = Server::start().await;
    let defaults = SessionLifetimes::of(&KvStoreConfig::default());
    let secs = |d: std::time::Duration| i64::try_from(d.as_secs()).unwrap();
    let mut browser = Device::new(&server.base);
    let (status, _) = browser.call(Method::POST, "/oauth/start", Some(json!({ "redirect": "/home" }))).await;
    assert_eq!(status, StatusCode::OK);
    let anonymous = server.session_records_expire_in().await;
    assert_eq!(anonymous.len(), 1, "{anonymous:?}");
    assert!((secs(defaults.anonymous) - 60..=secs(defaults.anonymous)).contains(&anonymous[0]), "{anonymous:?}");
    let _ada = server.signed_in("ada@example.io").await;
    let mut all = server.session_records_expire_in().await;
    all.sort_unstable();
    assert_eq!(all.len(), 2, "{all:?}");
    assert!((secs(defaults.signed_in) - 60..=secs(defaults.signed_in)).contains(&all[1]), "{all:?}");
}

/// Writes `request` on a new connection to `base`'s port and reads until the
/// server closes it or `patience` passes: what came back, and how long it took.
fn raw_exchange(base: &str, request: &[u8], patience: Duration) -> (String, Duration) {
    use std::io::{Read as _, Write as _};
    let address = base.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream.write_all(request).unwrap();
    stream.set_read_timeout(Some(patience)).unwrap();
    let started = std::time::Instant::now();
    let mut answer = Vec::new();
    let mut buffer = [0_u8; 4096];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(read) => answer.extend_from_slice(&buffer[..read]),
        }
    }
    (String::from_utf8_lossy(&answer).into_owned(), started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_finishes_its_headers_is_closed_after_the_header_read_timeout() {
    // Found by an HTTP probe: under `axum::serve` such a connection was held
    // forever, and one client holding 20 000 of them locked every other out.
    let db = tokio::task::spawn_blocking(dployr_testkit::database).await.unwrap();
    let data = AsyncDataLayer::open(Config::new(db.url())).await.unwrap();
    let sessions = session_store(&data).unwrap();
    let send_code: CodeSink = Arc::new(|_, _| {});
    let app = router(
        data,
        sessions,
        send_code,
        CookieTransport::AnyConnection,
        SessionLifetimes::of(&KvStoreConfig::default()),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let timeout = Duration::from_secs(1);
    tokio::spawn(async move { serve(listener, app, timeout, std::future::pending()).await.unwrap() });
    let probe = base.clone();
    let (answer, waited) = tokio::task::spawn_blocking(move || {
        raw_exchange(&probe, b"GET /me HTTP/1.1\r\nHost: x\r\n", Duration::from_secs(20))
    })
    .await
    .unwrap();
    assert!(waited < Duration::from_secs(10), "still open after {waited:?}: {answer:?}");
    // The server serves others meanwhile, and after.
    let me = reqwest::get(format!("{base}/me")).await.unwrap();
    assert_eq!(me.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_body_never_comes_is_answered_408_with_an_error_body_after_the_request_timeout() {
    let server = Server::start().await;
    let base = server.base.clone();
    let (answer, waited) = tokio::task::spawn_blocking(move || {
        let request = b"POST /sign-in/code HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n\
                        content-length: 100\r\n\r\n{\"email\":";
        raw_exchange(&base, request, REQUEST_TIMEOUT + Duration::from_secs(30))
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "after {waited:?}: {answer:?}");
    assert!(answer.contains("application/json") && answer.contains("\"error\""), "{answer:?}");
    assert!(waited < REQUEST_TIMEOUT + Duration::from_secs(20), "{waited:?}");
}
