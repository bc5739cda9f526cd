//! The control plane as a program: serves on `127.0.0.1:3000` (or
//! `DPLOYR_EXAMPLE_ADDR`), on the database of `DATABASE_URL` (read with the
//! rest of the data layer's variables) or, when it is unset, on a throwaway
//! PostgreSQL it starts and deletes on exit. One-time codes are printed here
//! instead of being e-mailed. Warnings and errors (the text of an error a
//! client is answered without) go to standard error. Ctrl-C stops it.
//!
//! The session cookie is sent over plain HTTP too, for the local port;
//! behind TLS, set `DPLOYR_EXAMPLE_SECURE_COOKIE=true` to mark it `Secure`
//! (HTTPS only).
//!
//! ```sh
//! cargo run -p axum-control-plane
//! ```

use std::sync::Arc;

use axum_control_plane::{
    CodeSink, CookieTransport, HEADER_READ_TIMEOUT, SECURE_COOKIE_VAR, SessionLifetimes, router, serve, session_store,
};
use dployr_data::{AsyncDataLayer, Config};

type Failure = Box<dyn std::error::Error + Send + Sync>;

#[expect(clippy::print_stdout, reason = "an example prints where it listens and the codes it would e-mail")]
#[tokio::main]
async fn main() -> Result<(), Failure> {
    tracing_subscriber::fmt().with_writer(std::io::stderr).with_max_level(tracing::Level::WARN).try_init()?;
    // Read first: a bad value stops the program before it starts a database.
    let secure_cookie = match std::env::var(SECURE_COOKIE_VAR) {
        Ok(value) => Some(value),
        Err(std::env::VarError::NotPresent) => None,
        Err(not_unicode) => return Err(format!("{SECURE_COOKIE_VAR}: {not_unicode}").into()),
    };
    let cookie = CookieTransport::from_secure_cookie_var(secure_cookie.as_deref())?;
    // Blocking work (starting a PostgreSQL, connecting, migrating) runs on
    // the blocking pool, never on the runtime's threads.
    let (config, throwaway) = match std::env::var("DATABASE_URL") {
        Ok(_) => (Config::from_env()?, None),
        Err(_) => {
            let db = tokio::task::spawn_blocking(dployr_testkit::try_empty_database).await??;
            (Config::new(db.url()), Some(db))
        }
    };
    let lifetimes = SessionLifetimes::of(&config.kv_store);
    let data = AsyncDataLayer::open(config).await?;
    let sessions = session_store(&data)?;
    let send_code: CodeSink = Arc::new(|email, code| println!("one-time code for {email}: {}", code.expose()));

    let addr = std::env::var("DPLOYR_EXAMPLE_ADDR").unwrap_or_else(|_| "127.0.0.1:3000".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    let base = format!("http://{}", listener.local_addr()?);
    println!("dployr control plane on {base} (key-value backend: {})", data.blocking().kv_backend());
    println!("try:");
    println!(
        "  curl -i -X POST {base}/sign-in/code -H 'content-type: application/json' -d '{{\"email\":\"ada@example.io\"}}'"
    );
    println!(
        "  curl -i -c jar -X POST {base}/sign-in -H 'content-type: application/json' -d '{{\"email\":\"ada@example.io\",\"code\":\"<the code>\"}}'"
    );
    println!("  curl -b jar -X POST {base}/clusters");
    let app = router(data, sessions, send_code, cookie, lifetimes);
    serve(listener, app, HEADER_READ_TIMEOUT, async {
        // Without a signal handler the server runs until killed; either way it stops.
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    println!("stopped");
    if let Some(db) = throwaway {
        tokio::task::spawn_blocking(move || drop(db)).await?;
    }
    Ok(())
}
