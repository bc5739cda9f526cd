//! A PostgreSQL for tests, started by the tests themselves.
//!
//! `cargo test --workspace` must pass on a machine that has the PostgreSQL
//! server binaries and nothing set up. The first test of a process that asks
//! for a database picks a server, in this order:
//!
//! 1. `DPLOYR_TEST_DATABASE_URL`, else `DATABASE_URL`: that server (the role
//!    needs `CREATEDB`);
//! 2. the local server binaries ([`local::find_bindir`]): a throwaway cluster
//!    in a temp dir on a free loopback port, `fsync=off`; as root, run as the
//!    `postgres` (else `nobody`) user;
//! 3. with the `docker` feature (default) and a Docker engine: a
//!    `postgres:15-alpine` container through testcontainers;
//! 4. otherwise a panic whose message says how to get any of the three.
//!
//! The server is shared by every test of the process and is stopped and
//! deleted when the process exits: an `atexit` hook does it when the test
//! harness exits (whether tests passed, failed or panicked), and a guardian
//! process does it if the process is killed. No server and no temp directory
//! outlive `cargo test`.
//!
//! Each test gets its own database cloned from a template that has every
//! migration applied:
//!
//! ```no_run
//! use diesel::prelude::*;
//!
//! let db = dployr_testkit::database();
//! let mut conn = db.connect();
//! let users: i64 = diesel::dsl::sql::<diesel::sql_types::BigInt>("SELECT count(*) FROM users")
//!     .get_result(&mut conn)
//!     .unwrap();
//! assert_eq!(users, 0);
//! ```

pub mod blackhole;
pub mod cloudflare_emulator;
pub mod local;
pub mod pgbouncer;
pub mod private;
pub mod replica;
pub mod silent_server;
pub mod spans;

mod databases;
#[cfg(feature = "docker")]
mod docker;
mod error;
mod server;

pub use blackhole::BlackholeProxy;
pub use cloudflare_emulator::{CloudflareEmulator, DateHeader};
pub use error::TestkitError;
pub use local::Shutdown;
pub use private::{Freeze, PrivateServer};
pub use replica::ReplicatedServer;
pub use server::{ServerKind, TestServer, server};
pub use silent_server::SilentServer;

use std::fmt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use diesel::{Connection as _, PgConnection};
use dployr_migrate::MigrationSet;

/// A database of its own for one test. Dropping it drops the database on a
/// server the testkit does not own (`DATABASE_URL`); throwaway servers are
/// deleted whole at exit instead, which is cheaper.
pub struct TestDatabase {
    name: String,
    url: String,
    server: &'static TestServer,
}

impl fmt::Debug for TestDatabase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestDatabase").field("name", &self.name).field("server", &self.server.kind()).finish()
    }
}

impl TestDatabase {
    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A URL for it (libpq syntax).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A new connection to it.
    ///
    /// # Panics
    /// If the server refuses the connection: a test cannot go on without it.
    pub fn connect(&self) -> PgConnection {
        match PgConnection::establish(&self.url) {
            Ok(conn) => conn,
            Err(error) => panic!("cannot connect to test database {}: {error}", self.name),
        }
    }

    /// Whether the role of its URL is a superuser: a few tests force states
    /// only a superuser may (triggers off, another `deadlock_timeout`), and
    /// skip, saying so, on an outside server whose role is not one (the
    /// suite asks only for `CREATEDB`).
    ///
    /// # Panics
    /// If the server refuses the connection or the query.
    pub fn superuser(&self) -> bool {
        use diesel::RunQueryDsl as _;
        diesel::select(diesel::dsl::sql::<diesel::sql_types::Bool>("current_setting('is_superuser') = 'on'"))
            .get_result(&mut self.connect())
            .unwrap_or_else(|error| panic!("cannot ask test database {} for its role: {error}", self.name))
    }

    /// `ALTER DATABASE ... SET setting = value` on this database: what every
    /// session opened on it later starts with, as a DBA's setting would.
    /// `value` is SQL (`'1ms'`, `replica`, `DEFAULT` to remove it).
    ///
    /// # Panics
    /// If the server refuses it.
    pub fn set_for_new_sessions(&self, setting: &str, value: &str) {
        use diesel::connection::SimpleConnection as _;
        let name = self.name.replace('"', "\"\"");
        self.connect()
            .batch_execute(&format!("ALTER DATABASE \"{name}\" SET {setting} = {value}"))
            .unwrap_or_else(|error| panic!("cannot set {setting} on test database {}: {error}", self.name));
    }

    /// `pg_dump --schema-only` of this database, for comparing schemas.
    ///
    /// The `\restrict` / `\unrestrict` lines that pg_dump 15.14+ writes
    /// carry a random key per dump; they are left out so equal schemas give
    /// equal text.
    ///
    /// # Errors
    /// [`TestkitError::Setup`] if `pg_dump` is missing or fails.
    pub fn schema_dump(&self) -> Result<String, TestkitError> {
        let pg_dump = self.server.bindir().map_or_else(|| PathBuf::from("pg_dump"), |dir| dir.join("pg_dump"));
        let out = Command::new(&pg_dump)
            .args(["--schema-only", "--no-owner", "--no-privileges", "--dbname"])
            .arg(&self.url)
            .output()
            .map_err(|e| TestkitError::io(format!("running {}", pg_dump.display()), e))?;
        if !out.status.success() {
            return Err(TestkitError::Setup(format!("pg_dump failed: {}", String::from_utf8_lossy(&out.stderr))));
        }
        let dump = String::from_utf8_lossy(&out.stdout);
        Ok(dump
            .lines()
            .filter(|line| !line.starts_with("\\restrict ") && !line.starts_with("\\unrestrict "))
            .map(|line| format!("{line}\n"))
            .collect())
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        self.server.release(&self.name);
    }
}

static NEXT_DATABASE: AtomicU32 = AtomicU32::new(0);

/// This process's run: `<pid>_<random>`. The process id lets `db clean`
/// keep the databases of processes still running here; the random part
/// keeps apart processes with one id on one server (containers sharing a
/// CI server, an id reused after a killed run left its databases). The
/// admin session names it too, so `db clean` on any machine sees the run
/// is alive.
pub(crate) fn run_id() -> String {
    static RUN: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    format!("{}_{:08x}", std::process::id(), RUN.get_or_init(rand::random::<u32>))
}

/// The name of this process's next database of `kind`:
/// `dployr_<kind>_<run>_<n>` ([`run_id`]).
fn next_name(kind: &str) -> String {
    format!("dployr_{kind}_{}_{}", run_id(), NEXT_DATABASE.fetch_add(1, Ordering::Relaxed))
}

/// A fresh database with every migration of the workspace applied.
///
/// # Errors
/// [`TestkitError`] if no server can be had or the clone fails.
pub fn try_database() -> Result<TestDatabase, TestkitError> {
    let server = server()?;
    let name = next_name("t");
    server.clone_template(&name)?;
    Ok(TestDatabase { url: server.url_for(&name), name, server })
}

/// A fresh, empty database (no migration applied), for migration tests.
///
/// # Errors
/// [`TestkitError`] if no server can be had or the database cannot be created.
pub fn try_empty_database() -> Result<TestDatabase, TestkitError> {
    let server = server()?;
    let name = next_name("e");
    server.create_empty(&name)?;
    Ok(TestDatabase { url: server.url_for(&name), name, server })
}

/// [`try_database`]; without a server, the process prints how to get one, once, and ends.
///
/// # Panics
/// If the clone fails on a server that started.
pub fn database() -> TestDatabase {
    if let Err(error) = server() {
        no_server(&error);
    }
    try_database().unwrap_or_else(|error| panic!("{error}"))
}

/// Ends a test process that has no PostgreSQL: the message, which says how
/// to provide one, is printed once, then the process exits with libtest's
/// failure code. Panicking instead would print it again in every test that
/// asks for a database (77 times in `dployr-pg`'s tests, with backtraces).
fn no_server(error: &TestkitError) -> ! {
    static ONCE: std::sync::Once = std::sync::Once::new();
    // The first caller prints and exits; any other waits in `call_once`
    // until the process is gone.
    ONCE.call_once(|| {
        // Straight to the stream: libtest captures `eprintln!` of a test
        // and would drop it with the process.
        use std::io::Write as _;
        let _ignored = writeln!(std::io::stderr(), "\nerror: {error}\n");
        std::process::exit(101);
    });
    unreachable!("the first caller of no_server exits the process")
}

/// [`try_empty_database`]; without a server, the process prints how to get one, once, and ends.
///
/// # Panics
/// If the database cannot be created on a server that started.
pub fn empty_database() -> TestDatabase {
    if let Err(error) = server() {
        no_server(&error);
    }
    try_empty_database().unwrap_or_else(|error| panic!("{error}"))
}

/// Drops, on the server at `admin_url`, the template databases the testkit
/// built there and the per-test databases of test processes that are gone
/// (`cargo xtask db clean`). Returns their names. What a test process still
/// running may use is kept, whatever machine it runs on: a template or a
/// per-test database of a run whose admin session is connected to the
/// server, a template being built (its lock is held), a database someone is
/// connected to, and the per-test databases of a process alive on this
/// machine (see `databases::leftovers`).
///
/// # Errors
/// [`TestkitError::Connect`] or [`TestkitError::Sql`].
pub fn drop_leftover_databases(admin_url: &str) -> Result<Vec<String>, TestkitError> {
    let mut admin =
        PgConnection::establish(admin_url).map_err(|e| TestkitError::connect("the server to clean", admin_url, &e))?;
    databases::drop_leftovers(&mut admin)
}

/// The embedded migrations, the set every template is built from.
fn workspace_migrations() -> Result<MigrationSet, TestkitError> {
    Ok(MigrationSet::embedded()?)
}
