//! No `postgres` process and no temp directory outlive a test process that
//! is killed (SIGKILL: no exit hook runs): the guardian process that the
//! testkit starts beside the server must clean up.
//!
//! This is a test binary of its own so that no other test of the same run
//! starts a cluster meanwhile: a starting cluster also sweeps directories of
//! dead owners, which would hide a guardian that does nothing.

#![cfg(test)]

mod support;

use std::thread;
use std::time::{Duration, Instant};

use std::path::Path;

use support::{local_binaries_present, read_report, running, spawn_child};

#[test]
#[ignore = "a child process of the test below"]
fn child_starts_a_server_then_ends_as_told() {
    support::child_body();
}

#[test]
fn nothing_outlives_a_test_process_that_is_killed() {
    if !local_binaries_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mut child, report) = spawn_child("hang", dir.path());
    let started = Instant::now();
    let (pid, root) = loop {
        if let Some(found) = read_report(&report) {
            break found;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "the child never reported its server");
        thread::sleep(Duration::from_millis(20));
    };
    assert!(running(pid) && root.exists(), "the server should run while its owner lives");
    child.kill().unwrap(); // SIGKILL: no atexit hook runs; the guardian must act
    child.wait().unwrap();
    assert!(
        wait_until_gone(pid, &root, Duration::from_secs(20)),
        "postgres (pid {pid}) or {} outlived a killed test process",
        root.display()
    );
}

fn wait_until_gone(pid: i32, root: &Path, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if !running(pid) && !root.exists() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}
