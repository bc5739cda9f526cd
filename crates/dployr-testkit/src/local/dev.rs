//! [`DevCluster`]: the persistent development cluster of `cargo xtask db`
//! (the seed's `createdb dployr-local`), in `.dployr/dev`.

use std::fs::{self, File};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use diesel::{Connection as _, PgConnection};

use super::{
    RunAs, closed_ancestor, command, free_port, initdb, local_url, run, started_on, tail_of, wait_until_ready,
};
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
        self.port().is_some_and(|port| self.serves_on(port))
    }

    /// True if this cluster's server answers on `port`.
    fn serves_on(&self, port: u16) -> bool {
        super::serves(&local_url(port, "postgres"), &self.data())
    }

    fn pid_file(&self) -> PathBuf {
        self.data().join("postmaster.pid")
    }

    /// The process id `postmaster.pid` records, if it holds one.
    fn recorded_pid(&self) -> Option<i32> {
        let text = fs::read_to_string(self.pid_file()).ok()?;
        text.lines().next()?.trim().parse().ok().filter(|&pid| pid > 0)
    }

    /// The recorded process id, if that process is a postmaster of this
    /// data directory. After a reboot the id may belong to any process
    /// now, the distribution's own postmaster included, and `pg_ctl`
    /// signals whatever has it: the id alone proves nothing.
    fn own_postmaster(&self) -> Option<i32> {
        self.recorded_pid().filter(|&pid| started_on(pid, &self.data()))
    }

    /// Creates the cluster if needed, starts it if stopped, and creates the
    /// database `dployr-local` if missing. Returns its URL.
    ///
    /// A cluster whose creation stopped after `initdb` (no `port` file) is
    /// finished: it gets its port now.
    ///
    /// # Errors
    /// [`TestkitError::Setup`] with the server's log if it cannot start.
    pub fn up(&self) -> Result<String, TestkitError> {
        let run_as = RunAs::for_this_process()?;
        if !self.data().join("PG_VERSION").is_file() {
            self.create(run_as)?;
        }
        let Some(port) = self.port() else {
            // An `up` stopped between `initdb` and writing the port file
            // (Ctrl-C, say): the server never ran, nothing depends on the
            // port it was to get. If `initdb` itself was cut short, the
            // start fails; the port file is written only once the server
            // answers, so every `up` until then says the way out.
            let port = free_port()?;
            let url = self.start_and_open(port, run_as).map_err(|error| {
                TestkitError::Setup(format!(
                    "{error}\n{} was left half-created (it has no port file): an earlier \
                     `cargo xtask db up` stopped while creating it. `cargo xtask db down --purge` \
                     deletes it, then `cargo xtask db up` creates it anew",
                    self.root.display()
                ))
            })?;
            self.keep_port(port)?;
            return Ok(url);
        };
        self.start_and_open(port, run_as)
    }

    /// The cluster directory, the data directory `initdb` fills and the
    /// port file, in that order: a port file means `initdb` finished.
    fn create(&self, run_as: Option<RunAs>) -> Result<(), TestkitError> {
        fs::create_dir_all(&self.root).map_err(|e| TestkitError::io(format!("creating {}", self.root.display()), e))?;
        fs::set_permissions(&self.root, fs::Permissions::from_mode(0o755))
            .map_err(|e| TestkitError::io(format!("opening {} to the server's user", self.root.display()), e))?;
        let sockets = self.root.join("sockets");
        fs::create_dir_all(&sockets).map_err(|e| TestkitError::io("creating the socket dir".into(), e))?;
        if let Some(run_as) = run_as {
            run_as.own(&sockets)?;
            self.check_reachable()?;
            fs::create_dir_all(self.data()).map_err(|e| TestkitError::io("creating data/".into(), e))?;
            run_as.own(&self.data())?;
        }
        initdb(&self.bindir, &self.data(), run_as)?;
        self.keep_port(free_port()?)
    }

    /// The server's user must be able to walk down to data/. The checkout
    /// holds the cluster, so (unlike an ephemeral cluster's) no `TMPDIR`
    /// moves it: the way is opened, or another server used.
    fn check_reachable(&self) -> Result<(), TestkitError> {
        let Some((closed, mode)) = closed_ancestor(&self.root) else { return Ok(()) };
        Err(TestkitError::Setup(format!(
            "the server runs as the `postgres` user (this process is root), which cannot enter {closed} \
             (mode {mode:o}) on the way to the development cluster in {root}: let it through with \
             `chmod o+x {closed}` (or keep the checkout where that user can reach it), \
             or set DATABASE_URL to a server of your own",
            closed = closed.display(),
            root = self.root.display(),
        )))
    }

    /// Records the cluster's port in the `port` file.
    fn keep_port(&self, port: u16) -> Result<(), TestkitError> {
        fs::write(self.root.join("port"), port.to_string())
            .map_err(|e| TestkitError::io("writing the port file".into(), e))
    }

    /// Starts the server on `port` unless it runs, then creates
    /// `dployr-local` if missing; returns its URL.
    fn start_and_open(&self, port: u16, run_as: Option<RunAs>) -> Result<String, TestkitError> {
        if !self.serves_on(port) {
            self.start(port, run_as)?;
        }
        let admin_url = local_url(port, "postgres");
        let mut admin = PgConnection::establish(&admin_url)
            .map_err(|e| TestkitError::connect(format!("database postgres on port {port}"), &admin_url, &e))?;
        crate::databases::create_database_if_missing(&mut admin, Self::DATABASE)?;
        Ok(local_url(port, Self::DATABASE))
    }

    fn start(&self, port: u16, run_as: Option<RunAs>) -> Result<(), TestkitError> {
        // postgres refuses to start while `postmaster.pid` names a live
        // process of its user; after a reboot that may be any process.
        if self.recorded_pid().is_some() && self.own_postmaster().is_none() {
            fs::remove_file(self.pid_file())
                .map_err(|e| TestkitError::io("removing the stale postmaster.pid".into(), e))?;
        }
        let log = self.root.join("postgres.log");
        if let Some(run_as) = run_as {
            if !log.exists() {
                File::create(&log).map_err(|e| TestkitError::io("creating postgres.log".into(), e))?;
            }
            run_as.own(&log)?;
        }
        // pg_ctl hands `--options` to a shell: the socket directory is
        // quoted, so a checkout under a path with spaces starts too.
        let sockets =
            super::ephemeral::socket_directory(&self.root.join("sockets")).to_string_lossy().replace('\'', "'\\''");
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
        wait_until_ready(port, &self.data(), &log, || false)
    }

    /// Stops the server (a fast shutdown); keeps the data. Stopping a
    /// cluster that is not running is not an error, nor is a
    /// `postmaster.pid` a crash or a reboot left behind: its process is
    /// never signalled unless it is this cluster's postmaster.
    ///
    /// # Errors
    /// [`TestkitError::Setup`] if `pg_ctl stop` fails.
    pub fn down(&self) -> Result<bool, TestkitError> {
        // `pg_ctl stop` sends its fast shutdown to whatever process has the
        // recorded id, as the server's user: only to ours.
        if self.own_postmaster().is_none() {
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
            // The server ended by itself meanwhile (a crash): nothing was
            // left running.
            Err(_) if !self.is_running() => Ok(false),
            Err(error) => Err(error),
        }
    }
}
