//! A PostgreSQL cluster made from the local server binaries: `initdb` into a
//! directory, `postgres` on a free loopback port with a private socket
//! directory (none, TCP only, where the temp dir's path is too long for a
//! Unix socket). This module finds the binaries and holds what both lifetimes
//! of a cluster share; the lifetimes are its two submodules.
//!
//! [`EphemeralCluster`] (tests: a temp dir, `fsync=off`, the server a child
//! of this process, stopped and deleted when the process ends, whatever way
//! it ends) and [`DevCluster`] (`cargo xtask db up`: a persistent cluster
//! under `.dployr/dev`, started with `pg_ctl` so it outlives the command).
//!
//! `initdb` and `postgres` refuse to run as root; when this process is root
//! they run as the `postgres` system user (else `nobody`), with the uid and
//! gid switched by `std::process::Command` itself.

mod dev;
mod ephemeral;

use std::fs::{self, File};
use std::io::Read as _;
use std::net::TcpListener;
use std::os::unix::ffi::OsStrExt as _;
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

pub use dev::DevCluster;
pub use ephemeral::{Commits, EphemeralCluster, Shutdown, ephemeral_parent_dir};

/// Where the server binaries are looked for, in order, for error messages.
pub const BINDIR_SEARCH: &str = "$DPLOYR_PG_BINDIR, `pg_config --bindir`, /usr/lib/postgresql/*/bin, $PATH";

/// How long a server may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// How long one connection error that is not a server still starting may
/// last before starting the server is given up.
const REFUSED_FOR: Duration = Duration::from_secs(2);

/// How often a starting or stopping server is looked at.
const POLL: Duration = Duration::from_millis(20);

/// How many last lines of the server's log an error quotes.
const LOG_TAIL_LINES: usize = 15;

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
    // The user's libpq settings are for their own servers (a
    // `PGSSLMODE=require` would refuse `pg_basebackup` ours, which has no
    // TLS): the cluster's own programs run without them.
    for (name, _) in std::env::vars_os() {
        if name.as_encoded_bytes().starts_with(b"PG") {
            command.env_remove(name);
        }
    }
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
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
}

/// What a connection to a cluster of ours sets whatever the environment
/// says: libpq reads `PGSSLMODE`, `PGHOSTADDR`, `PGOPTIONS` (and
/// `PGGSSENCMODE`, `PGCHANNELBINDING`, `PGTARGETSESSIONATTRS`) for every
/// setting a URL leaves out, and a value exported for the user's own
/// servers (a managed PostgreSQL's `PGSSLMODE=require`) refused our server,
/// which has no TLS, or changed its sessions (`-c statement_timeout=1`).
/// Ours is a plain local server that wants none of them. `hostaddr` is set
/// empty (none), so that a `host` given later still decides where to go.
/// The last three are set only where the environment sets them: a libpq
/// older than the parameter (12 for `gssencmode`, 13 for
/// `channel_binding`) refuses the whole URL, and one that reads such a
/// variable knows its parameter.
const LOCAL_SETTINGS: [(&str, &str, &str); 6] = [
    ("sslmode", "disable", ""),
    ("hostaddr", "", ""),
    ("options", "", ""),
    ("gssencmode", "disable", "PGGSSENCMODE"),
    ("channel_binding", "disable", "PGCHANNELBINDING"),
    ("target_session_attrs", "any", "PGTARGETSESSIONATTRS"),
];

/// The variables [`LOCAL_SETTINGS`] overrides.
const PINNED: [&str; 6] =
    ["PGSSLMODE", "PGHOSTADDR", "PGOPTIONS", "PGGSSENCMODE", "PGCHANNELBINDING", "PGTARGETSESSIONATTRS"];

/// The URL of database `dbname` on a local cluster listening on `port`.
pub fn local_url(port: u16, dbname: &str) -> String {
    let settings: Vec<String> = LOCAL_SETTINGS
        .iter()
        .filter(|(_, _, only_if)| only_if.is_empty() || std::env::var_os(only_if).is_some())
        .map(|(key, value, _)| format!("{key}={value}"))
        .collect();
    format!("postgres://postgres@127.0.0.1:{port}/{dbname}?{}", settings.join("&"))
}

/// Waits until the server whose data directory is `data` accepts
/// connections on `port`.
fn wait_until_ready(port: u16, data: &Path, log: &Path, mut exited: impl FnMut() -> bool) -> Result<(), TestkitError> {
    let url = local_url(port, "postgres");
    let started = Instant::now();
    // An error that is not a server still starting, seen since then: past
    // `REFUSED_FOR`, libpq refuses the connection itself (a `PGSERVICE`
    // with no such service), and waiting `START_TIMEOUT` on every port
    // only hides why.
    let mut refused: Option<(String, Instant)> = None;
    loop {
        match check(&url, data) {
            Ok(true) => return Ok(()),
            Ok(false) => refused = None,
            Err(error) => match &refused {
                Some((seen, since)) if *seen == error && since.elapsed() > REFUSED_FOR => {
                    return Err(TestkitError::Setup(format!(
                        "connecting to the throwaway server: {error}{}",
                        libpq_variables_hint()
                    )));
                }
                Some((seen, _)) if *seen == error => {}
                _ => refused = Some((error, Instant::now())),
            },
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
        thread::sleep(POLL);
    }
}

/// Whether the server at `url` answers and is the one whose data directory
/// is `data`. Another process's server may hold the port: two processes
/// given one free port at once (ours then fails to bind, but answers
/// nothing yet), or a port taken over while ours restarts; answering is
/// not enough to be ours.
pub(crate) fn serves(url: &str, data: &Path) -> bool {
    check(url, data).unwrap_or(false)
}

/// [`serves`], with the error of a connection that failed otherwise than
/// as one to a server still starting (or stopping, or not listening yet)
/// does: libpq's own message.
fn check(url: &str, data: &Path) -> Result<bool, String> {
    use diesel::RunQueryDsl as _;
    // libpq's connect_timeout: a listener that accepts and never answers
    // holds no check for longer.
    let mut conn = match PgConnection::establish(&format!("{url}&connect_timeout=5")) {
        Ok(conn) => conn,
        Err(error) => {
            let error = error.to_string();
            const NOT_YET: [&str; 10] = [
                "Connection refused",
                "starting up",
                "not yet accepting connections",
                "recovery",
                "too many clients",
                "shutting down",
                "timeout expired",
                "closed the connection unexpectedly",
                "Connection reset",
                "could not receive data",
            ];
            return if NOT_YET.iter().any(|not_yet| error.contains(not_yet)) { Ok(false) } else { Err(error) };
        }
    };
    let served = diesel::select(diesel::dsl::sql::<diesel::sql_types::Text>("current_setting('data_directory')"))
        .get_result::<String>(&mut conn);
    Ok(served.is_ok_and(|served| same_directory(Path::new(&served), data)))
}

/// The libpq variables this process has that a connection to our server
/// may still read (those it pins are not named), for an error to name.
fn libpq_variables_hint() -> String {
    let set: Vec<String> = std::env::vars_os()
        .filter_map(|(name, _)| name.into_string().ok())
        .filter(|name| name.starts_with("PG") && !PINNED.contains(&name.as_str()))
        .collect();
    if set.is_empty() {
        String::new()
    } else {
        format!(" (libpq reads the environment: {} set here; unset them for the tests)", set.join(", "))
    }
}

/// Whether `a` and `b` name one directory once resolved (a relative or
/// symlinked spelling of it is the same directory); compared as written
/// where one cannot be resolved.
pub(crate) fn same_directory(a: &Path, b: &Path) -> bool {
    let resolved = |path: &Path| fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    resolved(a) == resolved(b)
}

/// Sends `signal` to `child` if it still runs (the server's or PgBouncer's
/// shutdown), and waits for it: at most [`STOP_TIMEOUT`], then kills it and
/// its process group.
pub(crate) fn stop_child(child: &mut Child, signal: Signal) {
    if let Ok(None) = child.try_wait()
        && let Ok(pid) = i32::try_from(child.id())
    {
        // A server a test still holds frozen (`SIGSTOP`, see `Freeze`)
        // acts on no signal until continued, nor do its backends on the
        // postmaster's (each leads a session of its own, so the
        // postmaster's process group holds none of them): every process it
        // started first, then itself.
        for started in children_of(Pid::from_raw(pid)) {
            let _ignored = kill(started, Signal::SIGCONT);
        }
        let _ignored = kill(Pid::from_raw(pid), Signal::SIGCONT);
        let _ignored = kill(Pid::from_raw(pid), signal);
        // A shutdown that waits for something that never comes (PgBouncer's
        // SIGINT waits for clients still in a transaction) is cut short.
        let deadline = Instant::now() + STOP_TIMEOUT;
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            thread::sleep(POLL);
        }
        if matches!(child.try_wait(), Ok(None)) {
            let _ignored = nix::sys::signal::killpg(Pid::from_raw(pid), Signal::SIGKILL);
            let _ignored = child.kill();
        }
    }
    let _ignored = child.wait();
}

/// How long [`stop_child`] waits for a process to stop before it kills it.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Starts a guardian: a `sh` running `script` with `$1` = `dir` and `$2` =
/// `pid`, once EOF arrives on its stdin. This process holds the other end of
/// that pipe, which closes when this process ends, however it ends; the
/// script then stops the process and deletes its directory. The guardian's
/// own process group keeps the terminal's Ctrl-C away from it, so it cleans
/// up after `cargo test` is interrupted too.
pub(crate) fn spawn_guardian(
    name: &str,
    script: &str,
    dir: &Path,
    pid: u32,
) -> Result<(Child, ChildStdin), TestkitError> {
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg(format!("trap '' INT TERM HUP\nread -r _ignored\n{script}"))
        .arg(name)
        .arg(dir)
        .arg(pid.to_string())
        .process_group(0)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| TestkitError::io(format!("starting the clean-up guardian {name} (/bin/sh)"), e))?;
    let pipe = child.stdin.take().ok_or_else(|| TestkitError::Setup("the guardian has no stdin pipe".into()))?;
    Ok((child, pipe))
}

pub(crate) fn process_alive(pid: i32) -> bool {
    // Signal 0 checks existence; EPERM means it exists under another user.
    !matches!(kill(Pid::from_raw(pid), None), Err(nix::errno::Errno::ESRCH))
}

/// The server's user must be able to walk down to the cluster directory
/// (an ephemeral cluster's: in the temp dir).
pub(crate) fn check_reachable(dir: &Path) -> Result<(), TestkitError> {
    let Some((path, mode)) = closed_ancestor(dir) else { return Ok(()) };
    Err(TestkitError::Setup(format!(
        "the server runs as the `postgres` user (this process is root), which cannot enter {} \
             (mode {mode:o}); chmod o+x it, point TMPDIR elsewhere, or set DATABASE_URL to a server of your own",
        path.display(),
    )))
}

/// The first of `dir` and its ancestors that others may not enter, with its
/// mode: the server's user (not root, not the owner) stops there on the
/// way down to `dir`. Each lifetime of a cluster says its own remedy.
pub(crate) fn closed_ancestor(dir: &Path) -> Option<(&Path, u32)> {
    dir.ancestors().find_map(|path| {
        let mode = fs::metadata(path).ok()?.permissions().mode();
        (mode & 0o001 == 0).then_some((path, mode & 0o777))
    })
}

/// Whether process `pid` was started with `data` as one of its arguments
/// (the `-D` of a postmaster this testkit started), from `/proc`. Paths
/// are compared once resolved (a relative or symlinked spelling of one
/// directory is the same directory).
pub(crate) fn started_on(pid: i32, data: &Path) -> bool {
    let Ok(command_line) = fs::read(format!("/proc/{pid}/cmdline")) else { return false };
    command_line
        .split(|&byte| byte == 0)
        .filter(|argument| !argument.is_empty())
        .any(|argument| same_directory(Path::new(std::ffi::OsStr::from_bytes(argument)), data))
}

/// The processes whose parent is `parent`, from `/proc`.
pub(crate) fn children_of(parent: Pid) -> Vec<Pid> {
    let Ok(entries) = fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            // /proc/<pid>/stat: "pid (comm) state ppid ..."; comm may hold spaces.
            fs::read_to_string(format!("/proc/{pid}/stat")).ok().is_some_and(|stat| {
                stat.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<i32>().ok())
                    .is_some_and(|ppid| ppid == parent.as_raw())
            })
        })
        .map(Pid::from_raw)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_process_started_on_the_directory_counts_as_its_server() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        // `sh -c '...' <name>`: the directory is one of the arguments, as
        // a postmaster's `-D` is (`; :` keeps sh from exec-ing the sleep).
        let mut process =
            std::process::Command::new("/bin/sh").arg("-c").arg("sleep 30; :").arg(&data).spawn().unwrap();
        let pid = i32::try_from(process.id()).unwrap();
        // `spawn` returns once the exec is under way, and the kernel sets
        // the new command line a moment later: wait until it shows.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|line| line.starts_with(b"/bin/sh\0-c"))
            && Instant::now() < deadline
        {
            thread::sleep(Duration::from_millis(5));
        }
        std::fs::create_dir(&data).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(dir.path(), &link).unwrap();
        let started = started_on(pid, &data);
        let through_a_link = started_on(pid, &link.join("data"));
        let other = started_on(pid, &dir.path().join("other"));
        let this_process = started_on(i32::try_from(std::process::id()).unwrap(), &data);
        process.kill().unwrap();
        process.wait().unwrap();
        assert!(started, "the process started on the directory");
        assert!(through_a_link, "the same directory, spelled through a symlink");
        assert!(!other, "a process started on another directory");
        assert!(!this_process, "a process with no such argument (a reused id)");
        assert!(!started_on(pid, &data), "a process that ended");
    }
}
