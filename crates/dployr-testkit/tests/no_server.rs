//! Without a PostgreSQL (issue 12, defect 6): one clear message per test
//! binary, not one per test, and a wrong `DPLOYR_PG_BINDIR` named with its
//! value. The test runs this same binary again as a child, filtered to the
//! ignored `child_*` tests (several, as a real test binary has), with a
//! `DPLOYR_PG_BINDIR` that holds nothing and no server URL.

#![cfg(test)]

use std::process::Command;

const BAD_BINDIR: &str = "/nonexistent/dployr-bindir";

fn child_asks_for_a_database() {
    // Only in the child run: the parent's own environment has a server.
    if std::env::var_os("DPLOYR_NO_SERVER_CHILD").is_some() {
        let _db = dployr_testkit::database();
    }
}

#[test]
#[ignore = "a child process of the test below"]
fn child_one() {
    child_asks_for_a_database();
}

#[test]
#[ignore = "a child process of the test below"]
fn child_two() {
    child_asks_for_a_database();
}

#[test]
#[ignore = "a child process of the test below"]
fn child_three() {
    child_asks_for_a_database();
}

#[test]
#[ignore = "a child process of the test below"]
fn child_four() {
    child_asks_for_a_database();
}

#[test]
fn without_a_server_the_message_comes_once_per_binary_and_names_the_wrong_bindir() {
    let output = Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--test-threads", "4", "child_"])
        .env("DPLOYR_NO_SERVER_CHILD", "1")
        .env("DPLOYR_PG_BINDIR", BAD_BINDIR)
        .env("RUST_BACKTRACE", "1")
        .env_remove("DATABASE_URL")
        .env_remove("DPLOYR_TEST_DATABASE_URL")
        .env("DOCKER_HOST", "unix:///nonexistent/docker.sock")
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(!output.status.success(), "{text}");
    assert_eq!(text.matches("no PostgreSQL for the tests").count(), 1, "{text}");
    assert!(text.contains(&format!("DPLOYR_PG_BINDIR={BAD_BINDIR} does not hold initdb and postgres")), "{text}");
    assert!(!text.contains("stack backtrace"), "{text}");
    assert!(text.lines().count() < 40, "{} lines:\n{text}", text.lines().count());
}
