//! A PostgreSQL cluster made from the local server binaries: `initdb` into a
//! directory, `postgres` on a free loopback port with a private socket
//! directory.
//!
//! Two lifetimes use it: [`EphemeralCluster`] (tests: a temp dir, `fsync=off`,
//! the server a child of this process, stopped and deleted when the process
//! ends, whatever way it ends) and [`DevCluster`] (`cargo xtask db up`: a
//! persistent cluster under `target/`, started with `pg_ctl` so it outlives
//! the command).
//!
//! `initdb` and `postgres` refuse to run as root; when this process is root
//! they run as the `postgres` system user (else `nobody`), with the uid and
//! gid switched by `std::process::Command` itself.

use std::fs::{self, File};
use std::io::Read as _;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use diesel::{Connection as _, PgConnection};
use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, User, geteuid};

use crate::TestkitError;

/// Where the server binaries are looked for, in order, for error messages.
pub const BINDIR_SEARCH: &str = "$DPLOYR_PG_BINDIR, `pg_config --bindir`, /usr/lib/postgresql/*/bin, $PATH";

/// Prefix of ephemeral cluster directories in the temp dir; the sweep of
/// crashed runs looks for it.
const EPHEMERAL_PREFIX: &str = "dployr-testpg-";

/// Free space `/dev/shm` must have for test clusters to go there.
const SHM_MIN_FREE: u64 = 1 << 30;

/// Where ephemeral clusters are created: `$DPLOYR_TEST_PG_DIR`, else
/// `/dev/shm` when it is a tmpfs with room (a throwaway cluster needs no disk,
/// and every per-test clone copies the template's files: on a disk that is
/// write-back traffic that slows later tests), else the temp dir.
pub fn ephemeral_parent_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("DPLOYR_TEST_PG_DIR") {
        return PathBuf::from(dir);
    }
    let shm = Path::new("/dev/shm");
    let roomy = nix::sys::statvfs::statvfs(shm)
        .is_ok_and(|st| st.blocks_available().saturating_mul(st.fragment_size()) >= SHM_MIN_FREE);
    if roomy && nix::unistd::access(shm, nix::unistd::AccessFlags::W_OK).is_ok() {
        return shm.to_owned();
    }
    std::env::temp_dir()
}

/// How long a server may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Finds the directory holding `initdb`, `postgres` and `pg_ctl`.
pub fn find_bindir() -> Option<PathBuf> {
    locate_bindir().ok()
}

/// [`find_bindir`], saying why not: a `DPLOYR_PG_BINDIR` that does not hold
/// the server binaries is named with its value (it stops the search, so
/// the other places were not looked at), and otherwise the places searched.
///
/// # Errors
/// [`TestkitError::Setup`] with that sentence.
pub fn locate_bindir() -> Result<PathBuf, TestkitError> {
    let has_server = |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();
    if let Some(dir) = std::env::var_os("DPLOYR_PG_BINDIR").map(PathBuf::from) {
        if has_server(&dir) {
            return Ok(dir);
        }
        return Err(TestkitError::Setup(format!(
            "DPLOYR_PG_BINDIR={} does not hold initdb and postgres (so nothing else was searched): \
             point it at the server binaries' directory (e.g. /usr/lib/postgresql/15/bin) or unset it",
            dir.display()
        )));
    }
    find_bindir_elsewhere().ok_or_else(|| {
        TestkitError::Setup(format!("no PostgreSQL server binaries (initdb, postgres) found; searched {BINDIR_SEARCH}"))
    })
}

fn find_bindir_elsewhere() -> Option<PathBuf> {
    let has_server = |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && has_server(&dir) {
            return Some(dir);
        }
    }
    // Debian and Ubuntu keep the server binaries off PATH; take the newest.
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .filter(|(_, dir)| has_server(dir))
        .collect();
    versions.sort();
    if let Some((_, dir)) = versions.pop() {
        return Some(dir);
    }
    std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .find(|dir| has_server(dir))
}

/// The account the server runs as: none (this process's own) unless root.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RunAs {
    uid: nix::unistd::Uid,
    gid: nix::unistd::Gid,
}

impl RunAs {
    pub(crate) fn for_this_process() -> Result<Option<Self>, TestkitError> {
        if !geteuid().is_root() {
            return Ok(None);
        }
        for name in ["postgres", "nobody"] {
            if let Ok(Some(user)) = User::from_name(name) {
                return Ok(Some(Self { uid: user.uid, gid: user.gid }));
            }
        }
        Err(TestkitError::Setup(
            "running as root, and neither a `postgres` nor a `nobody` user exists to run the server as \
             (initdb refuses root); create one, or run the tests as an ordinary user"
                .into(),
        ))
    }

    pub(crate) fn apply(self, command: &mut Command) -> &mut Command {
        // std calls setgroups(0) before setuid when it runs as root, so the
        // child keeps none of root's supplementary groups.
        command.uid(self.uid.as_raw()).gid(self.gid.as_raw())
    }

    pub(crate) fn own(self, path: &Path) -> Result<(), TestkitError> {
        std::os::unix::fs::chown(path, Some(self.uid.as_raw()), Some(self.gid.as_raw()))
            .map_err(|e| TestkitError::io(format!("giving {} to the server's user", path.display()), e))
    }
}

fn command(bindir: &Path, program: &str, run_as: Option<RunAs>) -> Command {
    let mut command = Command::new(bindir.join(program));
    if let Some(run_as) = run_as {
        run_as.apply(&mut command);
    }
    // The server's user may not be allowed into the caller's working directory.
    command.current_dir("/");
    command
}

fn run(command: &mut Command, what: &str) -> Result<(), TestkitError> {
    let out = command.stdin(Stdio::null()).output().map_err(|e| TestkitError::io(what.to_owned(), e))?;
    if out.status.success() {
        return Ok(());
    }
    Err(TestkitError::Setup(format!(
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    )))
}

pub(crate) fn free_port() -> Result<u16, TestkitError> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| TestkitError::io("finding a free port".into(), e))?;
    let port = listener.local_addr().map_err(|e| TestkitError::io("finding a free port".into(), e))?.port();
    Ok(port)
}

fn initdb(bindir: &Path, data: &Path, run_as: Option<RunAs>) -> Result<(), TestkitError> {
    run(
        command(bindir, "initdb", run_as)
            .arg("--pgdata")
            .arg(data)
            .args(["--username=postgres", "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync"])
            .arg("--no-instructions"),
        "initdb",
    )
}

fn tail_of(path: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut file) = File::open(path) {
        let _ignored = file.read_to_string(&mut text);
    }
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// The URL of database `dbname` on a local cluster listening on `port`.
pub fn local_url(port: u16, dbname: &str) -> String {
    format!("postgres://postgres@127.0.0.1:{port}/{dbname}")
}

fn wait_until_ready(port: u16, log: &Path, mut exited: impl FnMut() -> bool) -> Result<(), TestkitError> {
    let url = local_url(port, "postgres");
    let started = Instant::now();
    loop {
        if PgConnection::establish(&url).is_ok() {
            return Ok(());
        }
        if exited() {
            return Err(TestkitError::Setup(format!(
                "postgres exited while starting; its log ends:\n{}",
                tail_of(log)
            )));
        }
        if started.elapsed() > START_TIMEOUT {
            return Err(TestkitError::Setup(format!(
                "postgres did not accept connections within {START_TIMEOUT:?}; its log ends:\n{}",
                tail_of(log)
            )));
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// A throwaway cluster in a temp dir, owned by this process.
///
/// Call [`EphemeralCluster::stop`] to stop the server and delete its
/// directory. If this process dies first (a panic that aborts, SIGKILL), a
/// guardian process started beside the server notices that this process's
/// end of a pipe closed, and does the same.
#[derive(Debug)]
pub struct EphemeralCluster {
    root: PathBuf,
    port: u16,
    bindir: PathBuf,
    server: Child,
    /// Held, never written: the guardian reads EOF when this process ends.
    _guardian_pipe: ChildStdin,
    guardian: Child,
}

impl EphemeralCluster {
    /// `initdb` and start a server tuned for tests (`fsync=off`).
    ///
    /// # Errors
    /// [`TestkitError::Setup`] with the server's log if it cannot start.
    pub fn start(bindir: &Path) -> Result<Self, TestkitError> {
        sweep_crashed_runs();
        let run_as = RunAs::for_this_process()?;
        let root = tempfile::Builder::new()
            .prefix(EPHEMERAL_PREFIX)
            .tempdir_in(ephemeral_parent_dir())
            .map_err(|e| TestkitError::io("creating the cluster's temp dir".into(), e))?
            .keep();
        let cleanup_on_error = |error: TestkitError| {
            let _ignored = fs::remove_dir_all(&root);
            error
        };
        fs::write(root.join("owner.pid"), std::process::id().to_string())
            .map_err(|e| cleanup_on_error(TestkitError::io("writing owner.pid".into(), e)))?;
        let data = root.join("data");
        let sockets = root.join("sockets");
        fs::create_dir(&sockets)
            .map_err(|e| cleanup_on_error(TestkitError::io("creating the socket dir".into(), e)))?;
        if let Some(run_as) = run_as {
            check_reachable(root.parent().unwrap_or(&root)).map_err(cleanup_on_error)?;
            run_as.own(&root).and_then(|()| run_as.own(&sockets)).map_err(cleanup_on_error)?;
        }
        initdb(bindir, &data, run_as).map_err(cleanup_on_error)?;

        // A free port can be taken between our check and the server's bind:
        // try a few.
        let mut last_error = None;
        for _attempt in 0..4 {
            let port = free_port().map_err(cleanup_on_error)?;
            match Self::start_server(bindir, &root, port, run_as) {
                Ok(cluster) => return Ok(cluster),
                Err(error) => last_error = Some(error),
            }
        }
        Err(cleanup_on_error(last_error.unwrap_or_else(|| TestkitError::Setup("postgres did not start".into()))))
    }

    fn start_server(bindir: &Path, root: &Path, port: u16, run_as: Option<RunAs>) -> Result<Self, TestkitError> {
        let log_path = root.join("postgres.log");
        let log = File::create(&log_path).map_err(|e| TestkitError::io("creating postgres.log".into(), e))?;
        let log_err = log.try_clone().map_err(|e| TestkitError::io("opening postgres.log".into(), e))?;
        let mut server = command(bindir, "postgres", run_as)
            .arg("-D")
            .arg(root.join("data"))
            .arg("-p")
            .arg(port.to_string())
            .arg("-k")
            .arg(root.join("sockets"))
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=300",
                "-c",
                "shared_buffers=128MB",
                "-c",
                "log_min_messages=warning",
                "-c",
                "log_min_error_statement=panic",
            ])
            // Ctrl-C in the terminal goes to cargo and the tests; the server
            // is stopped by us (or the guardian), not by the terminal.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|e| TestkitError::io(format!("starting {}", bindir.join("postgres").display()), e))?;

        let guardian = spawn_guardian(root, server.id());
        let (guardian, guardian_pipe) = match guardian {
            Ok(pair) => pair,
            Err(error) => {
                stop_child(&mut server);
                return Err(error);
            }
        };
        let mut cluster = Self {
            root: root.to_owned(),
            port,
            bindir: bindir.to_owned(),
            server,
            _guardian_pipe: guardian_pipe,
            guardian,
        };
        let ready = wait_until_ready(port, &log_path, || matches!(cluster.server.try_wait(), Ok(Some(_))));
        if let Err(error) = ready {
            stop_child(&mut cluster.server);
            return Err(error);
        }
        Ok(cluster)
    }

    /// A streaming replica of `primary`: `pg_basebackup -R` (which writes
    /// `standby.signal` and the `primary_conninfo` to stream from) into a
    /// temp dir of its own, started like the primary on another free port
    /// (`hot_standby` is on by default, so it answers reads). The primary
    /// needs nothing set up: `initdb` allows replication connections from
    /// loopback, and `wal_level = replica` and `max_wal_senders = 10` are
    /// PostgreSQL's defaults. Stopped and deleted like any ephemeral
    /// cluster.
    ///
    /// # Errors
    /// [`TestkitError::Setup`] with `pg_basebackup`'s or the server's output.
    pub fn start_replica_of(primary: &EphemeralCluster) -> Result<Self, TestkitError> {
        let run_as = RunAs::for_this_process()?;
        let root = tempfile::Builder::new()
            .prefix(EPHEMERAL_PREFIX)
            .tempdir_in(ephemeral_parent_dir())
            .map_err(|e| TestkitError::io("creating the replica's temp dir".into(), e))?
            .keep();
        let cleanup_on_error = |error: TestkitError| {
            let _ignored = fs::remove_dir_all(&root);
            error
        };
        let prepared = (|| {
            fs::write(root.join("owner.pid"), std::process::id().to_string())
                .map_err(|e| TestkitError::io("writing owner.pid".into(), e))?;
            let sockets = root.join("sockets");
            fs::create_dir(&sockets).map_err(|e| TestkitError::io("creating the socket dir".into(), e))?;
            if let Some(run_as) = run_as {
                run_as.own(&root)?;
                run_as.own(&sockets)?;
            }
            run(
                command(&primary.bindir, "pg_basebackup", run_as)
                    .arg("--pgdata")
                    .arg(root.join("data"))
                    .args(["--host=127.0.0.1", "--username=postgres", "--wal-method=stream"])
                    .arg(format!("--port={}", primary.port))
                    .args(["--write-recovery-conf", "--checkpoint=fast", "--no-sync"]),
                "pg_basebackup",
            )
        })();
        prepared.map_err(cleanup_on_error)?;
        let mut last_error = None;
        for _attempt in 0..4 {
            let port = free_port().map_err(cleanup_on_error)?;
            match Self::start_server(&primary.bindir, &root, port, run_as) {
                Ok(cluster) => return Ok(cluster),
                Err(error) => last_error = Some(error),
            }
        }
        Err(cleanup_on_error(last_error.unwrap_or_else(|| TestkitError::Setup("the replica did not start".into()))))
    }

    /// The loopback port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory of the server binaries (for `pg_dump` and `psql`).
    pub fn bindir(&self) -> &Path {
        &self.bindir
    }

    /// The cluster's directory (data, sockets, log).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.server.id()
    }

    /// Stops the server at once (an immediate shutdown: the data is thrown
    /// away) and deletes the directory. Safe to call twice.
    pub fn stop(&mut self) {
        stop_child(&mut self.server);
        let _ignored = fs::remove_dir_all(&self.root);
        // The guardian finds nothing left to do once our pipe closes; it is
        // reaped here so it does not linger as a zombie of this process.
        let _ignored = self.guardian.kill();
        let _ignored = self.guardian.wait();
    }
}

/// Immediate shutdown (SIGQUIT) and wait.
fn stop_child(server: &mut Child) {
    if let Ok(None) = server.try_wait()
        && let Ok(pid) = i32::try_from(server.id())
    {
        let _ignored = kill(Pid::from_raw(pid), Signal::SIGQUIT);
    }
    let _ignored = server.wait();
}

/// A `sh` that waits for EOF on its stdin (this process's end closes when
/// this process ends, however it ends), then stops the server and deletes
/// the cluster directory. It ignores the terminal's signals so Ctrl-C on
/// `cargo test` cannot stop it before it cleans up.
fn spawn_guardian(root: &Path, server_pid: u32) -> Result<(Child, ChildStdin), TestkitError> {
    const SCRIPT: &str = r#"
trap '' INT TERM HUP
read -r _ignored
if kill -0 "$2" 2>/dev/null && [ -f "$1/data/postmaster.pid" ]; then
    kill -QUIT "$2" 2>/dev/null
    i=0
    while kill -0 "$2" 2>/dev/null && [ "$i" -lt 200 ]; do sleep 0.05; i=$((i + 1)); done
fi
rm -rf "$1"
"#;
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg(SCRIPT)
        .arg("dployr-testpg-guardian")
        .arg(root)
        .arg(server_pid.to_string())
        .process_group(0)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| TestkitError::io("starting the clean-up guardian (/bin/sh)".into(), e))?;
    let pipe = child.stdin.take().ok_or_else(|| TestkitError::Setup("the guardian has no stdin pipe".into()))?;
    Ok((child, pipe))
}

pub(crate) fn process_alive(pid: i32) -> bool {
    // Signal 0 checks existence; EPERM means it exists under another user.
    !matches!(kill(Pid::from_raw(pid), None), Err(nix::errno::Errno::ESRCH))
}

/// Removes clusters left by test processes that died without cleaning up
/// (and whose guardian could not run either, e.g. the machine rebooted).
fn sweep_crashed_runs() {
    let mut parents = vec![ephemeral_parent_dir(), std::env::temp_dir()];
    parents.dedup();
    for entry in parents.iter().filter_map(|dir| fs::read_dir(dir).ok()).flatten().flatten() {
        let path = entry.path();
        if !entry.file_name().to_string_lossy().starts_with(EPHEMERAL_PREFIX) {
            continue;
        }
        let owner = fs::read_to_string(path.join("owner.pid")).ok().and_then(|s| s.trim().parse::<i32>().ok());
        match owner {
            Some(pid) if process_alive(pid) => continue,
            // A directory without owner.pid may be one being created right now.
            None if entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().unwrap_or_default() < Duration::from_secs(60)) =>
            {
                continue;
            }
            _ => {}
        }
        let postmaster = fs::read_to_string(path.join("data/postmaster.pid"))
            .ok()
            .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<i32>().ok()));
        if let Some(pid) = postmaster {
            let _ignored = kill(Pid::from_raw(pid), Signal::SIGQUIT);
            let deadline = Instant::now() + Duration::from_secs(10);
            while process_alive(pid) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
        }
        let _ignored = fs::remove_dir_all(&path);
    }
}

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
        self.port().is_some_and(|port| PgConnection::establish(&local_url(port, "postgres")).is_ok())
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
            let options = format!("-p {port} -k {} -c listen_addresses=127.0.0.1", self.root.join("sockets").display());
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
            wait_until_ready(port, &log, || false)?;
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
        run(
            command(&self.bindir, "pg_ctl", run_as)
                .arg("stop")
                .arg("--pgdata")
                .arg(self.data())
                .args(["--mode=fast", "--wait"])
                .stdout(Stdio::null()),
            "pg_ctl stop",
        )?;
        Ok(true)
    }
}

/// The server's user must be able to walk down to the cluster directory.
pub(crate) fn check_reachable(dir: &Path) -> Result<(), TestkitError> {
    let mut current = Some(dir);
    while let Some(path) = current {
        if let Ok(meta) = fs::metadata(path)
            && meta.permissions().mode() & 0o001 == 0
        {
            return Err(TestkitError::Setup(format!(
                "the server runs as the `postgres` user (this process is root), which cannot enter {} \
                     (mode {:o}); chmod o+x it, point TMPDIR elsewhere, or set DATABASE_URL to a server of your own",
                path.display(),
                meta.permissions().mode() & 0o777
            )));
        }
        current = path.parent();
    }
    Ok(())
}
