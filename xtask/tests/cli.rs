//! The `cargo xtask` binary as a shell user meets it (issue 12, defect 5).

#![cfg(test)]

use std::io::BufRead as _;
use std::process::{Command, Stdio};

/// The `xtask` binary, with stderr captured.
fn xtask(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_xtask"));
    command.args(args).stderr(Stdio::piped());
    command
}

/// A URL on a loopback port nothing listens on.
fn closed_port_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    format!("postgres://nobody@127.0.0.1:{port}/nothing")
}

#[test]
fn help_into_a_pipe_closed_early_ends_quietly_without_a_panic() {
    // `cargo xtask --help | head -0`: the reader is gone before the first write.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let output = xtask(&["--help"]).stdout(Stdio::from(writer)).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(output.status.success(), "{:?}: {stderr}", output.status);
}

#[test]
fn status_into_a_closed_pipe_still_exits_1_when_a_migration_is_pending() {
    // `migrate status | head -0` in a deploy script: the exit code is the
    // answer, whoever reads the listing.
    let db = dployr_testkit::empty_database();
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let output =
        xtask(&["migrate", "status", "--database-url", db.url()]).stdout(Stdio::from(writer)).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("not up to date"), "{stderr}");
}

#[test]
fn redo_into_a_pipe_closed_after_its_first_line_still_applies_the_migration_again() {
    // `migrate redo | head -n1`: the reader leaves after "reverting ...",
    // before the revert commits; the redo must still end with the migration
    // applied, not half done.
    let db = dployr_testkit::database();
    let (reader, writer) = std::io::pipe().unwrap();
    let redo = xtask(&["migrate", "redo", "--database-url", db.url()]).stdout(Stdio::from(writer)).spawn().unwrap();
    let mut first_line = String::new();
    std::io::BufReader::new(reader).read_line(&mut first_line).unwrap();
    // The reader was moved into the BufReader, dropped here: the pipe is closed.
    assert!(first_line.contains("revert"), "{first_line}");
    let redone = redo.wait_with_output().unwrap();
    assert!(redone.status.success(), "{:?}: {}", redone.status, String::from_utf8_lossy(&redone.stderr));

    let status = xtask(&["migrate", "status", "--database-url", db.url()]).output().unwrap();
    assert_eq!(
        status.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&status.stdout),
        String::from_utf8_lossy(&status.stderr)
    );
}

#[test]
fn db_clean_cleans_the_server_of_dployr_test_database_url_before_database_url() {
    // The server the tests used, as the test kit chooses it; DATABASE_URL
    // names one that does not answer, so cleaning there would fail.
    let Some(server) = dployr_testkit::PrivateServer::start().unwrap() else {
        eprintln!("skipped: no local PostgreSQL server binaries for a private server");
        return;
    };
    let output = xtask(&["db", "clean"])
        .env("DPLOYR_TEST_DATABASE_URL", server.url())
        .env("DATABASE_URL", closed_port_url())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{:?}: {}", output.status, String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("dropped dployr_tpl_"), "{stdout}");
}

#[test]
fn demo_on_the_server_of_dployr_test_database_url_does_not_say_it_deletes_a_throwaway_server() {
    let Some(server) = dployr_testkit::PrivateServer::start().unwrap() else {
        eprintln!("skipped: no local PostgreSQL server binaries for a private server");
        return;
    };
    let output = xtask(&["demo", "--kv", "memory"])
        .env("DPLOYR_TEST_DATABASE_URL", server.url())
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{:?}: {}", output.status, String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("DPLOYR_TEST_DATABASE_URL is set: empty database dployr_e_"), "{stdout}");
    assert!(!stdout.contains("throwaway"), "{stdout}");
}
