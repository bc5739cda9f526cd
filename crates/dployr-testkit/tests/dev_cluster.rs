//! The development cluster (`cargo xtask db up|down`): in a checkout whose
//! path holds a space, stopped after its server crashed, after a reboot
//! whose `postmaster.pid` names another process, half-created, and out of
//! the server's user's reach.

#![cfg(test)]

use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::thread;
use std::time::{Duration, Instant};

use diesel::{Connection as _, PgConnection};
use dployr_testkit::local::{DevCluster, find_bindir};
use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, User, geteuid};

/// A development cluster (not created yet) at `relative` in a temp dir the
/// server's user (as root: `postgres`) can reach; stopped when dropped.
struct DevFixture {
    cluster: DevCluster,
    _dir: tempfile::TempDir,
}

impl DevFixture {
    fn at(relative: &str) -> Option<Self> {
        let Some(bindir) = find_bindir() else {
            eprintln!("no local PostgreSQL server binaries: no development cluster to start here");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join(relative);
        let mut reachable = Some(root.parent().unwrap());
        while let Some(path) = reachable.filter(|path| path.starts_with(dir.path())) {
            std::fs::create_dir_all(path).unwrap();
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
            reachable = path.parent();
        }
        Some(Self { cluster: DevCluster::new(root, bindir), _dir: dir })
    }

    fn root(&self) -> &Path {
        self.cluster.root()
    }

    fn pid_file(&self) -> PathBuf {
        self.root().join("data/postmaster.pid")
    }

    /// Creates the cluster, stops it cleanly, and leaves the
    /// `postmaster.pid` a reboot leaves: the server's own, naming `pid`.
    fn stopped_with_pid_file_naming(&self, pid: u32) {
        self.cluster.up().unwrap();
        let recorded = std::fs::read_to_string(self.pid_file()).unwrap();
        assert!(self.cluster.down().unwrap(), "it was running");
        let (_server_pid, rest) = recorded.split_once('\n').unwrap();
        std::fs::write(self.pid_file(), format!("{pid}\n{rest}")).unwrap();
    }
}

impl Drop for DevFixture {
    fn drop(&mut self) {
        let _ignored = self.cluster.down();
    }
}

/// A process that has nothing to do with the cluster, run by the server's
/// user (as root: `postgres`, else `nobody`, as the kit picks), so that
/// `pg_ctl` could signal it; killed when dropped.
struct Bystander(Child);

impl Bystander {
    fn start() -> Self {
        let mut command = Command::new("sleep");
        command.arg("600").current_dir("/");
        if geteuid().is_root() {
            let user =
                ["postgres", "nobody"].into_iter().find_map(|name| User::from_name(name).ok().flatten()).unwrap();
            command.uid(user.uid.as_raw()).gid(user.gid.as_raw());
        }
        Self(command.spawn().unwrap())
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }

    fn is_untouched(&mut self) -> bool {
        matches!(self.0.try_wait(), Ok(None))
    }
}

impl Drop for Bystander {
    fn drop(&mut self) {
        let _ignored = self.0.kill();
        let _ignored = self.0.wait();
    }
}

#[test]
fn a_dev_cluster_under_a_path_with_a_space_starts_and_stops_even_after_a_crash() {
    let Some(dev) = DevFixture::at("my checkout/.dployr dev") else { return };
    let cluster = &dev.cluster;

    let url = cluster.up().expect("the cluster starts under a path with a space");
    PgConnection::establish(&url).unwrap();
    assert!(cluster.down().unwrap(), "it was running");

    // A crash: the postmaster killed, its postmaster.pid left behind.
    cluster.up().unwrap();
    let pid_file = std::fs::read_to_string(dev.pid_file()).unwrap();
    let pid = Pid::from_raw(pid_file.lines().next().unwrap().trim().parse().unwrap());
    kill(pid, Signal::SIGKILL).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while kill(pid, None).is_ok() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    let stopped = cluster.down();
    assert!(matches!(stopped, Ok(false)), "nothing to stop after a crash: {stopped:?}");
    // And it starts again on the same data.
    let url = cluster.up().unwrap();
    PgConnection::establish(&url).unwrap();
    assert!(cluster.down().unwrap());
}

#[test]
fn down_never_signals_a_process_that_took_over_the_recorded_pid() {
    let Some(dev) = DevFixture::at("checkout/.dployr/dev") else { return };
    let mut bystander = Bystander::start();
    dev.stopped_with_pid_file_naming(bystander.pid());

    let stopped = dev.cluster.down();

    assert!(matches!(stopped, Ok(false)), "nothing of this cluster was running: {stopped:?}");
    assert!(bystander.is_untouched(), "the process that holds the recorded pid was signalled");
}

#[test]
fn up_starts_over_a_pid_file_naming_a_live_unrelated_process() {
    let Some(dev) = DevFixture::at("checkout/.dployr/dev") else { return };
    let mut bystander = Bystander::start();
    dev.stopped_with_pid_file_naming(bystander.pid());

    let url = dev.cluster.up().expect("the stale postmaster.pid does not keep the server from starting");

    PgConnection::establish(&url).unwrap();
    assert!(bystander.is_untouched(), "the process that holds the recorded pid was signalled");
    assert!(dev.cluster.down().unwrap(), "the server up started is the one down stops");
    assert!(bystander.is_untouched(), "the process that holds the recorded pid was signalled");
}

#[test]
fn up_finishes_a_cluster_whose_port_file_was_never_written() {
    let Some(dev) = DevFixture::at("checkout/.dployr/dev") else { return };
    dev.cluster.up().unwrap();
    assert!(dev.cluster.down().unwrap(), "it was running");
    // What an `up` interrupted between initdb and writing the port leaves.
    std::fs::remove_file(dev.root().join("port")).unwrap();

    let url = dev.cluster.up().expect("up finishes the half-created cluster");

    PgConnection::establish(&url).unwrap();
    assert_eq!(dev.cluster.url(), Some(url), "the port it chose is the one kept");
}

#[test]
fn up_on_a_half_created_cluster_that_cannot_start_says_to_purge_it_every_time() {
    let Some(dev) = DevFixture::at("checkout/.dployr/dev") else { return };
    dev.cluster.up().unwrap();
    assert!(dev.cluster.down().unwrap(), "it was running");
    // An `initdb` cut short as well: no control file, no port file.
    std::fs::remove_file(dev.root().join("data/global/pg_control")).unwrap();
    std::fs::remove_file(dev.root().join("port")).unwrap();

    for attempt in ["first", "second"] {
        let error = dev.cluster.up().unwrap_err().to_string();
        assert!(error.contains("cargo xtask db down --purge"), "the {attempt} up says the way out: {error}");
    }
}

#[test]
fn up_as_root_under_a_directory_the_servers_user_cannot_enter_says_to_open_it() {
    if !geteuid().is_root() {
        eprintln!("not root: the server runs as this user, who can reach the checkout");
        return;
    }
    let Some(dev) = DevFixture::at("home/checkout/.dployr/dev") else { return };
    let home = dev.root().ancestors().nth(3).unwrap().to_owned();
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700)).unwrap();

    let error = dev.cluster.up().unwrap_err().to_string();

    assert!(error.contains(&format!("chmod o+x {}", home.display())), "names the directory to open: {error}");
    assert!(error.contains("DATABASE_URL"), "offers a server of one's own: {error}");
    assert!(!error.contains("TMPDIR"), "TMPDIR does not move the development cluster: {error}");
}
