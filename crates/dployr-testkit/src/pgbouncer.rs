//! A PgBouncer in front of the test server, for the tests and the CI check
//! of a deployment behind a pooler in transaction mode (where prepared
//! statements and session settings do not stay with a client).
//!
//! PgBouncer is a separate package (`apt-get install pgbouncer`); [`find`]
//! says whether it is installed. It runs on a free loopback port, as the
//! server's unprivileged user when this process is root (it refuses root),
//! from a temp dir holding its configuration and log. It is stopped when
//! the [`PgBouncer`] drops, and by a guardian process if this process dies
//! first, so it never outlives its user.

use std::fs;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use diesel::{Connection as _, PgConnection};
use nix::sys::signal::Signal;

use crate::TestkitError;
use crate::local::{RunAs, check_reachable, free_port, spawn_guardian, stop_child};

/// PgBouncer's pooling mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolMode {
    /// A server connection per client for the client's whole session.
    Session,
    /// A server connection per transaction: session state does not stay.
    Transaction,
}

impl PoolMode {
    fn as_str(self) -> &'static str {
        match self {
            Self::Session => "session",
            Self::Transaction => "transaction",
        }
    }
}

/// The `pgbouncer` binary, if installed (`$PATH`, then `/usr/sbin`, where
/// Debian puts it).
pub fn find() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> =
        std::env::var_os("PATH").map(|path| std::env::split_paths(&path).collect()).unwrap_or_default();
    dirs.extend(["/usr/sbin", "/usr/local/sbin", "/usr/local/bin"].map(PathBuf::from));
    dirs.into_iter().map(|dir| dir.join("pgbouncer")).find(|path| path.is_file())
}

/// A running PgBouncer, stopped when dropped.
#[derive(Debug)]
pub struct PgBouncer {
    child: Child,
    port: u16,
    user: String,
    dir: PathBuf,
    /// Held, never written: the guardian reads EOF when this process ends.
    _guardian_pipe: ChildStdin,
    guardian: Child,
}

impl PgBouncer {
    /// Starts PgBouncer in `mode` in front of the PostgreSQL listening on
    /// `127.0.0.1:server_port`, letting in `user` without a password (the
    /// throwaway servers trust local connections). Every database of the
    /// server is reachable under its own name.
    ///
    /// # Errors
    /// [`TestkitError::Setup`] when PgBouncer is not installed or does not
    /// start (with its log).
    pub fn start(server_port: u16, user: &str, mode: PoolMode) -> Result<Self, TestkitError> {
        let binary = find()
            .ok_or_else(|| TestkitError::Setup("pgbouncer is not installed (apt-get install pgbouncer)".into()))?;
        let run_as = RunAs::for_this_process()?;
        let dir = tempfile::Builder::new()
            .prefix("dployr-pgbouncer-")
            .tempdir()
            .map_err(|e| TestkitError::io("creating PgBouncer's temp dir".into(), e))?
            .keep();
        let started = Self::start_in(&binary, &dir, server_port, user, mode, run_as);
        if started.is_err() {
            let _ignored = fs::remove_dir_all(&dir);
        }
        started
    }

    fn start_in(
        binary: &Path,
        dir: &Path,
        server_port: u16,
        user: &str,
        mode: PoolMode,
        run_as: Option<RunAs>,
    ) -> Result<Self, TestkitError> {
        let port = free_port()?;
        let write = |name: &str, text: String| {
            fs::write(dir.join(name), text).map_err(|e| TestkitError::io(format!("writing {name}"), e))
        };
        write("userlist.txt", format!("\"{user}\" \"\"\n"))?;
        write(
            "pgbouncer.ini",
            format!(
                "[databases]\n* = host=127.0.0.1 port={server_port}\n\n[pgbouncer]\n\
                 listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
                 auth_type = trust\nauth_file = {dir}/userlist.txt\n\
                 pool_mode = {mode}\nmax_client_conn = 1000\ndefault_pool_size = 20\n\
                 ignore_startup_parameters = extra_float_digits,options\n\
                 logfile = {dir}/pgbouncer.log\npidfile = {dir}/pgbouncer.pid\n",
                dir = dir.display(),
                mode = mode.as_str(),
            ),
        )?;
        if let Some(run_as) = run_as {
            check_reachable(dir)?;
            run_as.own(dir)?;
            for name in ["userlist.txt", "pgbouncer.ini"] {
                run_as.own(&dir.join(name))?;
            }
        }
        let mut command = Command::new(binary);
        if let Some(run_as) = run_as {
            run_as.apply(&mut command);
        }
        let mut child = command
            .arg(dir.join("pgbouncer.ini"))
            .current_dir("/")
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| TestkitError::io(format!("starting {}", binary.display()), e))?;
        let (guardian, guardian_pipe) =
            match spawn_guardian("dployr-pgbouncer-guardian", GUARDIAN_SCRIPT, dir, child.id()) {
                Ok(pair) => pair,
                Err(error) => {
                    stop_child(&mut child, Signal::SIGINT);
                    return Err(error);
                }
            };
        let mut bouncer =
            Self { child, port, user: user.to_owned(), dir: dir.to_owned(), _guardian_pipe: guardian_pipe, guardian };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if PgConnection::establish(&bouncer.url_for("postgres")).is_ok() {
                return Ok(bouncer);
            }
            if matches!(bouncer.child.try_wait(), Ok(Some(_))) || Instant::now() > deadline {
                let log = fs::read_to_string(dir.join("pgbouncer.log")).unwrap_or_default();
                bouncer.stop();
                return Err(TestkitError::Setup(format!("pgbouncer did not start; its log:\n{log}")));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The URL of database `dbname` through PgBouncer.
    pub fn url_for(&self, dbname: &str) -> String {
        format!("postgres://{}@127.0.0.1:{}/{dbname}", self.user, self.port)
    }

    /// The loopback port PgBouncer listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The process id of PgBouncer.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops PgBouncer and deletes its directory. Safe to call twice.
    pub fn stop(&mut self) {
        stop_child(&mut self.child, Signal::SIGINT);
        let _ignored = fs::remove_dir_all(&self.dir);
        let _ignored = self.guardian.kill();
        let _ignored = self.guardian.wait();
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What PgBouncer's guardian does once this process is gone: stop it
/// (SIGINT, its safe shutdown: with this process gone, no client of it is
/// left to wait for) and delete its directory.
const GUARDIAN_SCRIPT: &str = r#"
kill -INT "$2" 2>/dev/null
rm -rf "$1"
"#;
