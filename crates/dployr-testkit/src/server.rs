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
        match self {
            Self::Url(url) => {
                let mut url = url.clone();
                url.set_path(&format!("/{dbname}"));
                url.to_string()
            }
            Self::Conninfo(conninfo) => format!("{conninfo} dbname='{dbname}'"),
        }
    }
}

/// The PostgreSQL server of this test process.
pub struct TestServer {
    kind: ServerKind,
    address: Address,
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
            let mut admin = PgConnection::establish(&admin_url)
                .map_err(|e| TestkitError::connect("the test server's admin database", &admin_url, &e))?;
            let file_copy = databases::server_major(&mut admin)? >= 15;
            let template =
                databases::ensure_template(&mut admin, &|db| address.for_database(db), &workspace_migrations()?)?;
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

    /// Clones the template into `name` (what [`crate::database`] does).
    ///
    /// # Errors
    /// [`TestkitError::Sql`] if the clone fails.
    pub fn clone_template(&self, name: &str) -> Result<(), TestkitError> {
        databases::clone_database(&mut lock(&self.admin), &self.template, name, self.file_copy)
    }

    pub(crate) fn create_empty(&self, name: &str) -> Result<(), TestkitError> {
        databases::create_database_if_missing(&mut lock(&self.admin), name)
    }

    /// Drops a test database on servers the testkit does not own; throwaway
    /// servers are deleted whole at exit.
    pub(crate) fn release(&self, name: &str) {
        if self.kind == ServerKind::External {
            let _ignored = databases::drop_database(&mut lock(&self.admin), name);
        }
    }

    /// Drops a database now, on any server.
    ///
    /// # Errors
    /// [`TestkitError::Sql`] if the drop fails.
    pub fn drop_database(&self, name: &str) -> Result<(), TestkitError> {
        databases::drop_database(&mut lock(&self.admin), name)
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
