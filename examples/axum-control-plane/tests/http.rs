//! The control plane's whole story over HTTP, with a real client against a
//! server on a free port and a throwaway PostgreSQL: sign-in by one-time
//! code (a wrong one first), a cluster, an invitation accepted, members read
//! page by page, a viewer refused a write by the middleware, an OAuth state
//! that works once, sign-out, and sign-out of every device.

#![cfg(test)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum_control_plane::{CodeSink, router, session_store};
use dployr_data::{AsyncDataLayer, Config};
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
        let mut request = self.client.request(method, format!("{}{path}", self.base));
        if let Some(cookie) = &self.cookie {
            request = request.header("cookie", cookie);
        }
        if let Some(body) = body {
            request = request.header("content-type", "application/json").body(body.to_string());
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        if let Some(set) = response.headers().get("set-cookie") {
            let set = set.to_str().unwrap();
            let pair = set.split(';').next().unwrap().trim().to_owned();
            self.cookie = if set.contains("Max-Age=0") || pair.ends_with('=') { None } else { Some(pair) };
        }
        let bytes = response.bytes().await.unwrap();
        let json = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap() };
        (status, json)
    }
}

/// The server and the codes it "e-mailed".
struct Server {
    base: String,
    codes: Arc<Mutex<HashMap<String, String>>>,
    _db: dployr_testkit::TestDatabase,
}

impl Server {
    async fn start() -> Self {
        let db = tokio::task::spawn_blocking(dployr_testkit::database).await.unwrap();
        let data = AsyncDataLayer::open(Config::new(db.url())).await.unwrap();
        let codes: Arc<Mutex<HashMap<String, String>>> = Arc::default();
        let sink = Arc::clone(&codes);
        let send_code: CodeSink = Arc::new(move |email, code| {
            sink.lock().unwrap().insert(email.as_str().to_owned(), code.expose().to_owned());
        });
        let sessions = session_store(&data).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, router(data, sessions, send_code)).await.unwrap() });
        Self { base, codes, _db: db }
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
