//! [`EphemeralCluster`]: a throwaway cluster for the tests, in a temp dir
//! (`/dev/shm` when it has room), owned by this process and gone when it
//! ends, however it ends.

use std::fs::{self, File};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::{
    RunAs, check_reachable, command, free_port, initdb, process_alive, run, spawn_guardian, started_on, stop_child,
    wait_until_ready,
};
use crate::TestkitError;

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
    commits: Commits,
    server: Child,
    /// Held, never written: the guardian reads EOF when this process ends.
    _guardian_pipe: ChildStdin,
    guardian: Child,
}

/// What an acknowledged commit survives on a throwaway server (`fsync` is
/// off on every one: none survives the machine crashing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Commits {
    /// `synchronous_commit = off`: the server answers a commit before its
    /// WAL is written, so a crash of the server (an immediate shutdown)
    /// may lose the last few hundred milliseconds of acknowledged commits.
    /// The shared test server: nothing crashes it.
    Fast,
    /// `synchronous_commit = on`: the server answers a commit once its WAL
    /// is written (to the kernel; `fsync` stays off), so every acknowledged
    /// commit survives the server process crashing. Servers that tests
    /// crash or restart on purpose.
    SurviveServerCrash,
}

/// How [`EphemeralCluster::restart`] stops the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shutdown {
    /// `SIGINT`, PostgreSQL's fast shutdown (`pg_ctl stop -m fast`, what a
    /// service manager's stop sends): every session is ended with
    /// SQLSTATE 57P01, open transactions roll back, a checkpoint is written.
    Fast,
    /// `SIGQUIT`, the immediate shutdown: every process exits at once,
    /// sessions see their socket close mid-statement, and the next start
    /// runs crash recovery from the WAL, as after a crash of the server.
    Immediate,
}

impl Shutdown {
    fn signal(self) -> Signal {
        match self {
            Shutdown::Fast => Signal::SIGINT,
            Shutdown::Immediate => Signal::SIGQUIT,
        }
    }
}

impl EphemeralCluster {
    /// `initdb` and start a server tuned for tests (`fsync=off`,
    /// [`Commits::Fast`]).
    ///
    /// # Errors
    /// [`TestkitError::Setup`] with the server's log if it cannot start.
    pub fn start(bindir: &Path) -> Result<Self, TestkitError> {
        Self::start_with(bindir, Commits::Fast)
    }

    /// `initdb` and start a server tuned for tests (`fsync=off`) whose
    /// acknowledged commits survive what `commits` says.
    ///
    /// # Errors
    /// [`TestkitError::Setup`] with the server's log if it cannot start.
    pub fn start_with(bindir: &Path, commits: Commits) -> Result<Self, TestkitError> {
        sweep_crashed_runs();
        let run_as = RunAs::for_this_process()?;
        let root = new_root("the cluster")?;
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

        Self::start_on_a_free_port(bindir, &root, run_as, commits).map_err(cleanup_on_error)
    }

    /// Starts the server of the cluster in `root` on a free port. A free
    /// port can be taken between our check and the server's bind: it tries
    /// a few.
    fn start_on_a_free_port(
        bindir: &Path,
        root: &Path,
        run_as: Option<RunAs>,
        commits: Commits,
    ) -> Result<Self, TestkitError> {
        let mut last_error = None;
        for _attempt in 0..PORT_ATTEMPTS {
            match Self::start_server(bindir, root, free_port()?, run_as, commits) {
                Ok(cluster) => return Ok(cluster),
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.unwrap_or_else(|| TestkitError::Setup("postgres did not start".into())))
    }

    fn start_server(
        bindir: &Path,
        root: &Path,
        port: u16,
        run_as: Option<RunAs>,
        commits: Commits,
    ) -> Result<Self, TestkitError> {
        let synchronous_commit = match commits {
            Commits::Fast => "synchronous_commit=off",
            Commits::SurviveServerCrash => "synchronous_commit=on",
        };
        let log_path = root.join("postgres.log");
        let log = File::create(&log_path).map_err(|e| TestkitError::io("creating postgres.log".into(), e))?;
        let log_err = log.try_clone().map_err(|e| TestkitError::io("opening postgres.log".into(), e))?;
        let mut server = command(bindir, "postgres", run_as)
            .arg("-D")
            .arg(root.join("data"))
            .arg("-p")
            .arg(port.to_string())
            .arg("-k")
            .arg(socket_directory(&root.join("sockets")))
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                synchronous_commit,
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

        let guardian = spawn_guardian("dployr-testpg-guardian", GUARDIAN_SCRIPT, root, server.id());
        let (guardian, guardian_pipe) = match guardian {
            Ok(pair) => pair,
            Err(error) => {
                stop_child(&mut server, Signal::SIGQUIT);
                return Err(error);
            }
        };
        let mut cluster = Self {
            root: root.to_owned(),
            port,
            bindir: bindir.to_owned(),
            commits,
            server,
            _guardian_pipe: guardian_pipe,
            guardian,
        };
        let ready =
            wait_until_ready(port, &root.join("data"), &log_path, || matches!(cluster.server.try_wait(), Ok(Some(_))));
        if let Err(error) = ready {
            stop_child(&mut cluster.server, Signal::SIGQUIT);
            // The next attempt (another port) reuses this directory. Dropping
            // the pipe would let the guardian delete it, data and all: the
            // guardian goes first.
            let _ignored = cluster.guardian.kill();
            let _ignored = cluster.guardian.wait();
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
        let root = new_root("the replica")?;
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
        Self::start_on_a_free_port(&primary.bindir, &root, run_as, primary.commits).map_err(cleanup_on_error)
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

    /// Stops the server as `shutdown` says, keeps it down for `down_for`
    /// (connections are refused meanwhile), then starts it again on the
    /// same port and data directory and waits until it accepts
    /// connections: what a restart of the database service does to its
    /// clients. The data survives as [`Commits`] says.
    ///
    /// # Errors
    /// [`TestkitError::Setup`] with the server's log if it does not start
    /// again (the port was taken meanwhile, say); the cluster then has no
    /// server, and [`EphemeralCluster::stop`] still deletes its directory.
    pub fn restart(&mut self, shutdown: Shutdown, down_for: Duration) -> Result<(), TestkitError> {
        stop_child(&mut self.server, shutdown.signal());
        // The guardian knows the old process id only: it goes before a new
        // one is started with the new id. Killed, it deletes nothing.
        let _ignored = self.guardian.kill();
        let _ignored = self.guardian.wait();
        thread::sleep(down_for);
        let run_as = RunAs::for_this_process()?;
        let restarted = Self::start_server(&self.bindir, &self.root, self.port, run_as, self.commits)?;
        // The old pipe closes here, its guardian already gone.
        *self = restarted;
        Ok(())
    }

    /// Stops the server at once (an immediate shutdown: the data is thrown
    /// away) and deletes the directory. Safe to call twice.
    pub fn stop(&mut self) {
        stop_child(&mut self.server, Signal::SIGQUIT);
        let _ignored = fs::remove_dir_all(&self.root);
        // The guardian finds nothing left to do once our pipe closes; it is
        // reaped here so it does not linger as a zombie of this process.
        let _ignored = self.guardian.kill();
        let _ignored = self.guardian.wait();
    }
}

/// How many free ports a start tries.
const PORT_ATTEMPTS: usize = 4;

/// A new cluster directory (for `what`) in [`ephemeral_parent_dir`], named
/// so that the sweep of crashed runs finds it.
fn new_root(what: &str) -> Result<PathBuf, TestkitError> {
    Ok(tempfile::Builder::new()
        .prefix(EPHEMERAL_PREFIX)
        .tempdir_in(ephemeral_parent_dir())
        .map_err(|e| TestkitError::io(format!("creating {what}'s temp dir"), e))?
        .keep())
}

/// How old a cluster directory without `owner.pid` must be before the sweep
/// takes it for a crashed run's (younger, it may be one being created).
const UNOWNED_GRACE: Duration = Duration::from_secs(60);

/// How long the sweep waits for a crashed run's server to stop.
const SWEEP_STOP_WAIT: Duration = Duration::from_secs(10);

/// What the guardian of an ephemeral cluster does once this process is gone:
/// stop the server (SIGQUIT, waiting up to 10 s) if it still runs, then
/// delete the cluster directory. (A server this process held frozen is
/// continued by the kernel when this process ends: the server's process
/// group is then orphaned, and the kernel sends an orphaned group with
/// stopped members SIGHUP and SIGCONT.)
const GUARDIAN_SCRIPT: &str = r#"
if kill -0 "$2" 2>/dev/null && [ -f "$1/data/postmaster.pid" ]; then
    kill -QUIT "$2" 2>/dev/null
    i=0
    while kill -0 "$2" 2>/dev/null && [ "$i" -lt 200 ]; do sleep 0.05; i=$((i + 1)); done
fi
rm -rf "$1"
"#;

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
                .is_ok_and(|t| t.elapsed().unwrap_or_default() < UNOWNED_GRACE) =>
            {
                continue;
            }
            _ => {}
        }
        let postmaster = fs::read_to_string(path.join("data/postmaster.pid"))
            .ok()
            .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<i32>().ok()));
        // The id is the one the server had: after a reboot (or a container
        // restart) another process may have it now, so only a postgres
        // started on this very directory is signalled.
        if let Some(pid) = postmaster.filter(|&pid| started_on(pid, &path.join("data"))) {
            let _ignored = kill(Pid::from_raw(pid), Signal::SIGQUIT);
            let deadline = Instant::now() + SWEEP_STOP_WAIT;
            while process_alive(pid) && Instant::now() < deadline {
                thread::sleep(super::POLL);
            }
        }
        let _ignored = fs::remove_dir_all(&path);
    }
}

/// The socket directory the server is given: `sockets`, or none (`-k ''`:
/// no Unix socket) where the socket's path would be longer than the 107
/// bytes a Unix socket's path may hold (a long `TMPDIR`, a checkout deep in
/// a CI workspace), which stopped the server. Our connections all go over
/// TCP to 127.0.0.1.
pub(super) fn socket_directory(sockets: &Path) -> &std::ffi::OsStr {
    const SOCKET_PATH_MAX: usize = 107;
    if sockets.as_os_str().len() + "/.s.PGSQL.65535".len() <= SOCKET_PATH_MAX {
        sockets.as_os_str()
    } else {
        std::ffi::OsStr::new("")
    }
}
