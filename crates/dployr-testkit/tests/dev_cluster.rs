//! The development cluster (`cargo xtask db up|down`) in a checkout whose
//! path holds a space, and stopped after its server crashed.

#![cfg(test)]

use std::os::unix::fs::PermissionsExt as _;
use std::thread;
use std::time::{Duration, Instant};

use diesel::{Connection as _, PgConnection};
use dployr_testkit::local::{DevCluster, find_bindir};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

#[test]
fn a_dev_cluster_under_a_path_with_a_space_starts_and_stops_even_after_a_crash() {
    let Some(bindir) = find_bindir() else {
        eprintln!("no local PostgreSQL server binaries: no development cluster to start here");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // The server's user (as root: `postgres`) must reach the directory.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let root = dir.path().join("my checkout").join(".dployr dev");
    std::fs::create_dir_all(root.parent().unwrap()).unwrap();
    std::fs::set_permissions(root.parent().unwrap(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let cluster = DevCluster::new(&root, bindir);

    let url = cluster.up().expect("the cluster starts under a path with a space");
    PgConnection::establish(&url).unwrap();
    assert!(cluster.down().unwrap(), "it was running");

    // A crash: the postmaster killed, its postmaster.pid left behind.
    cluster.up().unwrap();
    let pid_file = std::fs::read_to_string(root.join("data/postmaster.pid")).unwrap();
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
