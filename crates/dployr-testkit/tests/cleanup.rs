//! No `postgres` process and no temp directory outlive a test process
//! whose tests pass or panic: the atexit hook stops the server and deletes
//! its directory before the process is gone.
//!
//! Each test runs this same test binary again as a child, filtered to the
//! ignored `child_*` test, which starts the throwaway server, reports its pid
//! and directory in a file, and then ends the way the parent asked.

#![cfg(test)]

mod support;

use support::{local_binaries_present, read_report, running, spawn_child};

#[test]
#[ignore = "a child process of the clean-up tests below"]
fn child_starts_a_server_then_ends_as_told() {
    support::child_body();
}

/// The child exits on its own: the atexit hook must have stopped the server
/// and deleted the directory by the time the process is gone.
fn assert_clean_after_exit(ending: &str, expect_success: bool) {
    if !local_binaries_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mut child, report) = spawn_child(ending, dir.path());
    let status = child.wait().unwrap();
    assert_eq!(status.success(), expect_success, "child ended with {status}");
    let (pid, root) = read_report(&report).expect("the child reported its server");
    assert!(!running(pid), "postgres (pid {pid}) outlived the test process");
    assert!(!root.exists(), "{} outlived the test process", root.display());
}

#[test]
fn nothing_outlives_a_test_process_whose_tests_pass() {
    assert_clean_after_exit("pass", true);
}

#[test]
fn nothing_outlives_a_test_process_with_a_panicking_test() {
    assert_clean_after_exit("panic", false);
}
