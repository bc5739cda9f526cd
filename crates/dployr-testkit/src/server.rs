//! The one server of a test process: chosen once, shared by every test,
//! stopped and deleted when the process exits.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use diesel::{Connection as _, PgConnection};

use crate::databases;
use crate::local::{self, EphemeralCluster};
use crate::{TestkitError, workspace_migrations};

/// Where the test server came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerKind {
    /// `DPLOYR_TEST_DATABASE_URL` or `DATABASE_URL`.
    External,
    /// A throwaway cluster from the local server binaries.
    Local,
    /// A testcontainers container.
    Docker,
}

/// What the testkit started and must stop.
#[derive(Debug)]
enum Owned {
    Local(EphemeralCluster),
    #[cfg(feature = "docker")]
    Docker(Box<crate::docker::DockerPostgres>),
}

/// How to name a database on the server.
#[derive(Clone)]
enum Address {
    /// A URL (`postgres://...`) whose path is the database.
    Url(url::Url),
    /// A libpq key=value string; a later `dbname=` wins.
    Conninfo(String),
}

impl Address {
    fn parse(text: &str) -> Result<Self, TestkitError> {
        if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            let url = url::Url::parse(text).map_err(|e| {
                TestkitError::Setup(format!("DPLOYR_TEST_DATABASE_URL / DATABASE_URL is not a valid URL: {e}"))
            })?;
            return Ok(Self::Url(url));
        }
        Ok(Self::Conninfo(text.to_owned()))
    }

    fn for_database(&self, dbname: &str) -> String {
        self.with_settings(dbname, &[])
    }

    /// Database `dbname` with libpq `settings` (`user`, `sslmode`, ...)
    /// set, each replacing what the address says. A URL gets them as
    /// parameters, which libpq reads after its user info and hosts, with
    /// its own `dbname` and those settings' parameters removed; a key=value
    /// string gets them appended, where the later wins.
    fn with_settings(&self, dbname: &str, settings: &[(&str, &str)]) -> String {
        match self {
            Self::Url(url) => {
                let mut url = url.clone();
                url.set_path(&format!("/{dbname}"));
                let encode = |value: &str| {
                    percent_encoding::utf8_percent_encode(value, percent_encoding::NON_ALPHANUMERIC).to_string()
                };
                // Raw, not through `query_pairs`: form decoding reads `+` as a
                // space, which libpq does not.
                let replaced = |pair: &&str| {
                    let key = pair.split('=').next().unwrap_or_default();
                    key == "dbname" || settings.iter().any(|(setting, _)| *setting == key)
                };
                let pairs: Vec<String> = url
                    .query()
                    .unwrap_or_default()
                    .split('&')
                    .filter(|pair| !pair.is_empty() && !replaced(pair))
                    .map(str::to_owned)
                    .chain(settings.iter().map(|(key, value)| format!("{key}={}", encode(value))))
                    .collect();
                url.set_query((!pairs.is_empty()).then(|| pairs.join("&")).as_deref());
                url.to_string()
            }
            Self::Conninfo(conninfo) => {
                let quote = |value: &str| format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"));
                std::iter::once(("dbname", dbname))
                    .chain(settings.iter().copied())
                    .fold(conninfo.clone(), |text, (key, value)| format!("{text} {key}={}", quote(value)))
            }
        }
    }
}

/// The PostgreSQL server of this test process.
pub struct TestServer {
    kind: ServerKind,
    address: Address,
    /// Where the admin connection is (re)opened; may hold a password.
    admin_url: String,
    /// Reopened when found lost ([`TestServer::with_admin`]).
    admin: Mutex<PgConnection>,
    template: String,
    file_copy: bool,
    bindir: Option<PathBuf>,
    startup: Duration,
    owned: Mutex<Option<Owned>>,
}

impl std::fmt::Debug for TestServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestServer")
            .field("kind", &self.kind)
            .field("template", &self.template)
            .field("startup", &self.startup)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Address {
    // The URL may hold a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

static SERVER: OnceLock<Result<TestServer, String>> = OnceLock::new();

/// The server of this process, started on first use.
///
/// # Errors
/// [`TestkitError::NoServer`] (as text) if none could be had; every later
/// call returns the same error without trying again.
pub fn server() -> Result<&'static TestServer, TestkitError> {
    SERVER
        .get_or_init(|| TestServer::start().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|message| TestkitError::Setup(message.clone()))
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking test cannot leave these half-updated: the guarded values
    // are a connection and an Option, both valid at every step.
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl TestServer {
    fn start() -> Result<Self, TestkitError> {
        let started = Instant::now();
        let (kind, address, owned, bindir) = Self::choose()?;
        // On a server of the user's, administer through the database they
        // named; on ours, through `postgres`.
        let admin_url = match external_url() {
            Some((_, url)) if kind == ServerKind::External => url,
            _ => address.for_database("postgres"),
        };
        let server = (|| {
            let migrations = workspace_migrations()?;
            let mut admin = connect_admin(&admin_url, &databases::template_name(&migrations))?;
            let file_copy = databases::server_major(&mut admin)? >= 15;
            let template = databases::ensure_template(&mut admin, &|db| address.for_database(db), &migrations)?;
            Ok::<_, TestkitError>((admin, file_copy, template))
        })();
        let owned = Mutex::new(owned);
        let (admin, file_copy, template) = match server {
            Ok(parts) => parts,
            Err(error) => {
                if let Some(owned) = lock(&owned).take() {
                    owned.stop();
                }
                return Err(error);
            }
        };
        Ok(Self {
            kind,
            address,
            admin_url,
            admin: Mutex::new(admin),
            template,
            file_copy,
            bindir,
            startup: started.elapsed(),
            owned,
        })
    }

    fn choose() -> Result<(ServerKind, Address, Option<Owned>, Option<PathBuf>), TestkitError> {
        if let Some((_, url)) = external_url() {
            return Ok((ServerKind::External, Address::parse(&url)?, None, local::find_bindir()));
        }
        let mut tried = Vec::new();
        match local::locate_bindir() {
            Ok(bindir) => match EphemeralCluster::start(&bindir) {
                Ok(cluster) => {
                    register_exit_hook();
                    let address = Address::parse(&local::local_url(cluster.port(), "postgres"))?;
                    return Ok((ServerKind::Local, address, Some(Owned::Local(cluster)), Some(bindir)));
                }
                Err(error) => tried.push(format!("local binaries in {}: {error}", bindir.display())),
            },
            Err(error) => tried.push(error.to_string()),
        }
        #[cfg(feature = "docker")]
        match crate::docker::DockerPostgres::start() {
            Ok(container) => {
                register_exit_hook();
                let address = Address::parse(&container.url_for("postgres"))?;
                return Ok((ServerKind::Docker, address, Some(Owned::Docker(Box::new(container))), None));
            }
            Err(error) => tried.push(format!("Docker: {error}")),
        }
        #[cfg(not(feature = "docker"))]
        tried.push("Docker: dployr-testkit was built without its `docker` feature".to_owned());
        let searched = if std::env::var_os("DPLOYR_PG_BINDIR").is_some() {
            "DPLOYR_PG_BINDIR only (it is set: see below)"
        } else {
            local::BINDIR_SEARCH
        };
        Err(TestkitError::NoServer { searched, tried: tried.join("; ") })
    }

    /// Where the server came from.
    pub fn kind(&self) -> ServerKind {
        self.kind
    }

    /// The directory of the client binaries matching a local server, if any.
    pub fn bindir(&self) -> Option<&Path> {
        self.bindir.as_deref()
    }

    /// The name of the migrated template database.
    pub fn template(&self) -> &str {
        &self.template
    }

    /// The process id of the server, if this process started it locally.
    pub fn local_pid(&self) -> Option<u32> {
        match lock(&self.owned).as_ref() {
            Some(Owned::Local(cluster)) => Some(cluster.pid()),
            _ => None,
        }
    }

    /// The loopback port of the throwaway cluster, if this process started one.
    pub fn local_port(&self) -> Option<u16> {
        match lock(&self.owned).as_ref() {
            Some(Owned::Local(cluster)) => Some(cluster.port()),
            _ => None,
        }
    }

    /// The directory of the throwaway cluster, if this process started one.
    pub fn local_root(&self) -> Option<PathBuf> {
        match lock(&self.owned).as_ref() {
            Some(Owned::Local(cluster)) => Some(cluster.root().to_owned()),
            _ => None,
        }
    }

    /// A URL for database `dbname` on this server.
    pub fn url_for(&self, dbname: &str) -> String {
        self.address.for_database(dbname)
    }

    /// A URL for database `dbname` on this server with libpq `settings`
    /// set, each replacing what the server's URL says: another `user` and
    /// `password`, an `sslmode`, a `host` and `port` to reach it through,
    /// and so on. The same form as the server's URL: a `postgres://` URL
    /// gets them as parameters, a key=value string appended.
    pub fn url_with(&self, dbname: &str, settings: &[(&str, &str)]) -> String {
        self.address.with_settings(dbname, settings)
    }

    /// Runs `op` on the admin connection; when that finds the connection
    /// lost (the server restarted, or ended the session), reconnects and
    /// runs it once more. An error of the statement itself (the database
    /// exists, a missing privilege) is returned as it is.
    fn with_admin<T>(&self, op: impl Fn(&mut PgConnection) -> Result<T, TestkitError>) -> Result<T, TestkitError> {
        let mut admin = lock(&self.admin);
        match op(&mut admin) {
            Err(error) if connection_lost(&error) => {
                *admin = connect_admin(&self.admin_url, &self.template)?;
                op(&mut admin)
            }
            done => done,
        }
    }

    /// Clones the template into `name` (what [`crate::database`] does). A
    /// template dropped meanwhile (`cargo xtask db clean` on a shared
    /// server) is built again first.
    ///
    /// # Errors
    /// [`TestkitError::Sql`] if the clone fails.
    pub fn clone_template(&self, name: &str) -> Result<(), TestkitError> {
        self.with_admin(|admin| {
            let cloned = databases::clone_database(admin, &self.template, name, self.file_copy);
            if cloned.is_err() && !databases::database_exists(admin, &self.template)? {
                databases::ensure_template(admin, &|db| self.address.for_database(db), &workspace_migrations()?)?;
                return databases::clone_database(admin, &self.template, name, self.file_copy);
            }
            cloned
        })
    }

    pub(crate) fn create_empty(&self, name: &str) -> Result<(), TestkitError> {
        self.with_admin(|admin| databases::create_database_if_missing(admin, name))
    }

    /// Drops a test database on servers the testkit does not own; throwaway
    /// servers are deleted whole at exit. One that cannot be dropped is
    /// named on stderr: `cargo xtask db clean` drops it once this process
    /// has ended.
    pub(crate) fn release(&self, name: &str) {
        if self.kind != ServerKind::External {
            return;
        }
        if let Err(error) = self.with_admin(|admin| databases::drop_database(admin, name)) {
            eprintln!(
                "warning: test database {name} was left on the server ({error}); `cargo xtask db clean` drops it"
            );
        }
    }

    /// Drops a database now, on any server.
    ///
    /// # Errors
    /// [`TestkitError::Sql`] if the drop fails.
    pub fn drop_database(&self, name: &str) -> Result<(), TestkitError> {
        self.with_admin(|admin| databases::drop_database(admin, name))
    }

    fn shutdown(&self) {
        if let Some(owned) = lock(&self.owned).take() {
            owned.stop();
        }
    }
}

impl Owned {
    fn stop(self) {
        match self {
            Self::Local(mut cluster) => cluster.stop(),
            #[cfg(feature = "docker")]
            Self::Docker(container) => drop(container),
        }
    }
}

/// Opens the admin connection, its session named for this run and its
/// `template` (what `cargo xtask db clean` keeps while it is open).
fn connect_admin(admin_url: &str, template: &str) -> Result<PgConnection, TestkitError> {
    let mut admin = PgConnection::establish(admin_url)
        .map_err(|e| TestkitError::connect("the test server's admin database", admin_url, &e))?;
    databases::tag_admin_session(&mut admin, template)?;
    Ok(admin)
}

/// Whether a statement failed because its connection is lost (the server
/// restarted or ended the session), not because of what it asked: a new
/// connection may succeed.
fn connection_lost(error: &TestkitError) -> bool {
    use diesel::result::{DatabaseErrorKind, Error};
    matches!(
        error,
        TestkitError::Sql {
            source: Error::DatabaseError(
                DatabaseErrorKind::ClosedConnection | DatabaseErrorKind::UnableToSendCommand,
                _
            ),
            ..
        }
    )
}

/// The variable and value of a server the user chose, if any.
fn external_url() -> Option<(&'static str, String)> {
    ["DPLOYR_TEST_DATABASE_URL", "DATABASE_URL"]
        .into_iter()
        .find_map(|var| std::env::var(var).ok().filter(|v| !v.trim().is_empty()).map(|v| (var, v)))
}

/// Stops what the testkit started when the process exits. libtest ends with
/// `std::process::exit` (or a return from `main`), and both run C `atexit`
/// handlers, whether tests passed, failed or panicked. Statics are never
/// dropped in Rust, so this is the hook that can run.
fn register_exit_hook() {
    extern "C" fn stop_at_exit() {
        // Unwinding out of an extern "C" fn aborts; swallow any panic.
        let _ignored = std::panic::catch_unwind(|| {
            if let Some(Ok(server)) = SERVER.get() {
                server.shutdown();
            }
        });
    }
    static REGISTERED: OnceLock<()> = OnceLock::new();
    REGISTERED.get_or_init(|| {
        #[expect(
            unsafe_code,
            reason = "libc::atexit has no safe wrapper; the handler is a plain extern \"C\" fn that catches panics"
        )]
        // SAFETY: `stop_at_exit` is a valid `extern "C" fn()` for the life of
        // the process and does not unwind.
        let status = unsafe { libc::atexit(stop_at_exit) };
        // A failed registration leaves the guardian process to clean up.
        let _ignored = status;
    });
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use diesel::prelude::*;
    use diesel::sql_types::{BigInt, Bool, Text};

    use super::*;

    /// Ends the admin session of this process, found by its name, as a
    /// restart of the server does, and waits until that session is gone
    /// (by its process id: another test of this process may reopen the
    /// admin connection meanwhile, under the same name).
    fn end_admin_session(conn: &mut PgConnection) {
        let tag = format!("dployr-testkit {} %", crate::run_id());
        let pids: Vec<i32> = diesel::dsl::sql::<diesel::sql_types::Integer>(
            "SELECT pid FROM pg_stat_activity WHERE application_name LIKE ",
        )
        .bind::<Text, _>(tag.clone())
        .load(conn)
        .unwrap();
        assert_eq!(pids.len(), 1, "one admin session, named for the run");
        let ended: bool = diesel::select(
            diesel::dsl::sql::<Bool>("pg_terminate_backend(").bind::<diesel::sql_types::Integer, _>(pids[0]).sql(")"),
        )
        .get_result(conn)
        .unwrap();
        assert!(ended);
        let deadline = Instant::now() + Duration::from_secs(5);
        let alive = || {
            diesel::dsl::sql::<BigInt>("SELECT count(*) FROM pg_stat_activity WHERE pid = ")
                .bind::<diesel::sql_types::Integer, _>(pids[0])
        };
        while alive().get_result::<i64>(conn).unwrap() > 0 {
            assert!(Instant::now() < deadline, "the admin session did not end");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn a_lost_admin_connection_is_reopened_for_the_next_clone_and_drop() {
        let server = server().unwrap();
        let first = crate::try_database().unwrap();
        let mut conn = first.connect();
        end_admin_session(&mut conn);
        let second = crate::try_database().unwrap();
        end_admin_session(&mut conn);
        server.drop_database(second.name()).unwrap();
        assert!(!databases::database_exists(&mut conn, second.name()).unwrap());
        if server.kind() != ServerKind::External {
            return; // the release of a test database drops nothing here
        }
        let third = crate::try_database().unwrap();
        let name = third.name().to_owned();
        end_admin_session(&mut conn);
        drop(third);
        assert!(!databases::database_exists(&mut conn, &name).unwrap(), "released on a reopened connection");
    }

    #[test]
    fn a_template_dropped_under_a_run_is_built_again_for_its_next_clone() {
        let server = server().unwrap();
        if server.kind() == ServerKind::External {
            eprintln!("skipped: on a shared server, dropping the template would make other runs build it again");
            return;
        }
        server.drop_database(server.template()).unwrap();
        let db = crate::try_database().unwrap();
        let users: i64 =
            diesel::dsl::sql::<BigInt>("SELECT count(*) FROM users").get_result(&mut db.connect()).unwrap();
        assert_eq!(users, 0, "cloned from a migrated template");
    }
}
