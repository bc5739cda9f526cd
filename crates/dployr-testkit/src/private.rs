//! A throwaway server of one test's own, for faults that would disturb
//! every other test on the shared server: freezing it with `SIGSTOP` (the
//! postmaster and its backends), as a hung host or a stopped VM does, and
//! restarting it (a fast shutdown, or an immediate one, as a crash of the
//! server does) while clients use it. Its acknowledged commits survive a
//! crash of the server ([`Commits::SurviveServerCrash`]).
//!
//! It is made from the local server binaries only (a container or a
//! server of the user's cannot be frozen from here); [`PrivateServer::start`]
//! returns `Ok(None)` when there are none, and the test says it skipped.
//! The server is stopped and deleted when dropped, thawed first if frozen;
//! a [`Freeze`] thaws it when dropped, so a failing test never leaves it
//! stopped.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use diesel::{Connection as _, PgConnection};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::local::{self, Commits, EphemeralCluster, Shutdown};
use crate::{TestkitError, databases, workspace_migrations};

/// A local server of one test's own, with one migrated database.
#[derive(Debug)]
pub struct PrivateServer {
    /// Locked by a restart, which replaces the server process.
    cluster: Mutex<EphemeralCluster>,
    url: String,
}

/// The name of the migrated database of a private server.
const DATABASE: &str = "dployr";

impl PrivateServer {
    /// Starts a server from the local binaries and migrates a database on
    /// it; `Ok(None)` when no local server binaries exist.
    ///
    /// # Errors
    /// [`TestkitError`] if the server does not start or the migrations fail.
    pub fn start() -> Result<Option<Self>, TestkitError> {
        let Some(bindir) = local::find_bindir() else { return Ok(None) };
        let mut cluster = EphemeralCluster::start_with(&bindir, Commits::SurviveServerCrash)?;
        let port = cluster.port();
        let prepared = (|| {
            let admin_url = local::local_url(port, "postgres");
            let mut admin = PgConnection::establish(&admin_url)
                .map_err(|e| TestkitError::connect("the private server's admin database", &admin_url, &e))?;
            let template =
                databases::ensure_template(&mut admin, &|db| local::local_url(port, db), &workspace_migrations()?)?;
            let file_copy = databases::server_major(&mut admin)? >= 15;
            databases::clone_database(&mut admin, &template, DATABASE, file_copy)
        })();
        if let Err(error) = prepared {
            cluster.stop();
            return Err(error);
        }
        Ok(Some(Self { url: local::local_url(port, DATABASE), cluster: Mutex::new(cluster) }))
    }

    fn cluster(&self) -> MutexGuard<'_, EphemeralCluster> {
        self.cluster.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Restarts the server ([`EphemeralCluster::restart`]): stops it as
    /// `shutdown` says, refuses connections for `down_for`, then serves
    /// again on the same port with the same data. Callable from another
    /// thread while clients use the server.
    ///
    /// # Errors
    /// [`TestkitError::Setup`] if the server does not start again.
    pub fn restart(&self, shutdown: Shutdown, down_for: Duration) -> Result<(), TestkitError> {
        self.cluster().restart(shutdown, down_for)
    }

    /// The URL of the migrated database (TCP on loopback).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Stops the postmaster, then every process it started (backends,
    /// background workers), with `SIGSTOP`: the server keeps its sockets
    /// (the kernel still accepts and acknowledges) and answers nothing,
    /// until the returned guard is dropped or [`Freeze::thaw`] is called.
    ///
    /// # Errors
    /// [`TestkitError::Setup`] if a signal cannot be sent (the server is
    /// thawed again first).
    pub fn freeze(&self) -> Result<Freeze, TestkitError> {
        freeze(self.cluster().pid())
    }
}

/// Stops the postmaster `postmaster_pid`, then every process it started,
/// with `SIGSTOP` (see [`PrivateServer::freeze`]).
pub(crate) fn freeze(postmaster_pid: u32) -> Result<Freeze, TestkitError> {
    let postmaster = pid(postmaster_pid)?;
    // The postmaster first, so it starts no new process meanwhile.
    let mut stopped = Vec::new();
    let mut stop = |pid: Pid| {
        kill(pid, Signal::SIGSTOP).map_err(|e| TestkitError::Setup(format!("SIGSTOP of {pid}: {e}")))?;
        stopped.push(pid);
        Ok::<_, TestkitError>(())
    };
    let result = stop(postmaster).and_then(|()| local::children_of(postmaster).into_iter().try_for_each(&mut stop));
    let guard = Freeze { stopped };
    result.map(|()| guard)
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        // A frozen server is continued by the stop before it is signalled.
        self.cluster.get_mut().unwrap_or_else(PoisonError::into_inner).stop();
    }
}

/// A frozen server; thawed (`SIGCONT`, backends first) when dropped.
#[derive(Debug)]
#[must_use = "the server is thawed when this is dropped"]
pub struct Freeze {
    stopped: Vec<Pid>,
}

impl Freeze {
    /// How many processes were stopped (the postmaster and its children).
    pub fn processes(&self) -> usize {
        self.stopped.len()
    }

    /// Thaws the server now.
    pub fn thaw(self) {
        drop(self);
    }
}

impl Drop for Freeze {
    fn drop(&mut self) {
        for pid in self.stopped.drain(..).rev() {
            let _ignored = kill(pid, Signal::SIGCONT);
        }
    }
}

fn pid(raw: u32) -> Result<Pid, TestkitError> {
    i32::try_from(raw).map(Pid::from_raw).map_err(|_| TestkitError::Setup(format!("process id {raw} out of range")))
}
