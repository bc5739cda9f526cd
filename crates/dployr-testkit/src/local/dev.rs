//! [`DevCluster`]: the persistent development cluster of `cargo xtask db`
//! (the seed's `createdb dployr-local`), in `.dployr/dev`.

use std::fs::{self, File};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use diesel::{Connection as _, PgConnection};

use super::{RunAs, check_reachable, command, free_port, initdb, local_url, run, tail_of, wait_until_ready};
use crate::TestkitError;

/// A persistent development cluster (the seed's `createdb dployr-local`),
/// started with `pg_ctl` so it keeps running after the command that started it.
#[derive(Debug, Clone)]
pub struct DevCluster {
    root: PathBuf,
    bindir: PathBuf,
}

impl DevCluster {
    /// The name of the development database.
    pub const DATABASE: &'static str = "dployr-local";

    /// A handle on the cluster kept in `root` (it may not exist yet).
    pub fn new(root: impl Into<PathBuf>, bindir: impl Into<PathBuf>) -> Self {
        Self { root: root.into(), bindir: bindir.into() }
    }

    /// The directory holding the cluster (data, sockets, log, port).
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn data(&self) -> PathBuf {
        self.root.join("data")
    }

    /// The port the cluster was given when it was created.
    pub fn port(&self) -> Option<u16> {
        fs::read_to_string(self.root.join("port")).ok()?.trim().parse().ok()
    }

    /// The URL of `dployr-local`, if the cluster was created.
    pub fn url(&self) -> Option<String> {
        self.port().map(|port| local_url(port, Self::DATABASE))
    }

    /// True if the server answers.
    pub fn is_running(&self) -> bool {
        self.port().is_some_and(|port| super::serves(&local_url(port, "postgres"), &self.data()))
    }

    /// Creates the cluster if needed, starts it if stopped, and creates the
    /// database `dployr-local` if missing. Returns its URL.
    ///
    /// # Errors
    /// [`TestkitError::Setup`] with the server's log if it cannot start.
    pub fn up(&self) -> Result<String, TestkitError> {
        let run_as = RunAs::for_this_process()?;
        if !self.data().join("PG_VERSION").is_file() {
            fs::create_dir_all(&self.root)
                .map_err(|e| TestkitError::io(format!("creating {}", self.root.display()), e))?;
            fs::set_permissions(&self.root, fs::Permissions::from_mode(0o755))
                .map_err(|e| TestkitError::io(format!("opening {} to the server's user", self.root.display()), e))?;
            let sockets = self.root.join("sockets");
            fs::create_dir_all(&sockets).map_err(|e| TestkitError::io("creating the socket dir".into(), e))?;
            if let Some(run_as) = run_as {
                run_as.own(&sockets)?;
                // The server's user must be able to walk down to data/.
                check_reachable(&self.root)?;
                fs::create_dir_all(self.data()).map_err(|e| TestkitError::io("creating data/".into(), e))?;
                run_as.own(&self.data())?;
            }
            initdb(&self.bindir, &self.data(), run_as)?;
            fs::write(self.root.join("port"), free_port()?.to_string())
                .map_err(|e| TestkitError::io("writing the port file".into(), e))?;
        }
        let port =
            self.port().ok_or_else(|| TestkitError::Setup(format!("{} has no port file", self.root.display())))?;
        if !self.is_running() {
            let log = self.root.join("postgres.log");
            if let Some(run_as) = run_as {
                if !log.exists() {
                    File::create(&log).map_err(|e| TestkitError::io("creating postgres.log".into(), e))?;
                }
                run_as.own(&log)?;
            }
            // pg_ctl hands `--options` to a shell: the socket directory is
            // quoted, so a checkout under a path with spaces starts too.
            let sockets = self.root.join("sockets").display().to_string().replace('\'', "'\\''");
            let options = format!("-p {port} -k '{sockets}' -c listen_addresses=127.0.0.1");
            run(
                command(&self.bindir, "pg_ctl", run_as)
                    .arg("start")
                    .arg("--pgdata")
                    .arg(self.data())
                    .arg("--log")
                    .arg(&log)
                    .arg("--options")
                    .arg(options)
                    .arg("--wait")
                    .stdout(Stdio::null()),
                "pg_ctl start",
            )
            .map_err(|e| TestkitError::Setup(format!("{e}\npostgres.log ends:\n{}", tail_of(&log))))?;
            wait_until_ready(port, &self.data(), &log, || false)?;
        }
        let admin_url = local_url(port, "postgres");
        let mut admin = PgConnection::establish(&admin_url)
            .map_err(|e| TestkitError::connect(format!("database postgres on port {port}"), &admin_url, &e))?;
        crate::databases::create_database_if_missing(&mut admin, Self::DATABASE)?;
        Ok(local_url(port, Self::DATABASE))
    }

    /// Stops the server (a fast shutdown); keeps the data. Stopping a
    /// cluster that is not running is not an error.
    ///
    /// # Errors
    /// [`TestkitError::Setup`] if `pg_ctl stop` fails.
    pub fn down(&self) -> Result<bool, TestkitError> {
        if !self.data().join("postmaster.pid").is_file() {
            return Ok(false);
        }
        let run_as = RunAs::for_this_process()?;
        let stopped = run(
            command(&self.bindir, "pg_ctl", run_as)
                .arg("stop")
                .arg("--pgdata")
                .arg(self.data())
                .args(["--mode=fast", "--wait"])
                .stdout(Stdio::null()),
            "pg_ctl stop",
        );
        match stopped {
            Ok(()) => Ok(true),
            // A `postmaster.pid` left by a crash or a reboot names no
            // server (the next start clears it): nothing was running.
            Err(_) if !self.is_running() => Ok(false),
            Err(error) => Err(error),
        }
    }
}
