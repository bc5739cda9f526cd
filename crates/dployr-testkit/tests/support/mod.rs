//! Shared by the clean-up test binaries: a child test process that starts
//! the throwaway server and ends as told, and checks on what it left.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::Duration;

pub const REPORT: &str = "DPLOYR_TESTKIT_CHILD_REPORT";
pub const ENDING: &str = "DPLOYR_TESTKIT_CHILD_ENDING";

/// The body of the child test: starts the server, reports its pid and
/// directory, then passes, panics or hangs. Does nothing unless run as a child.
pub fn child_body() {
    let Some(report) = std::env::var_os(REPORT) else {
        return;
    };
    let db = dployr_testkit::database();
    drop(db.connect());
    let server = dployr_testkit::server().unwrap();
    let (pid, root) = (server.local_pid().unwrap(), server.local_root().unwrap());
    std::fs::write(report, format!("{pid}\n{}", root.display())).unwrap();
    match std::env::var(ENDING).as_deref() {
        Ok("panic") => panic!("this test panics on purpose"),
        Ok("hang") => thread::sleep(Duration::from_secs(120)),
        _ => {}
    }
}

/// Runs the child test with the given ending; returns it and its report path.
pub fn spawn_child(ending: &str, report_dir: &Path) -> (Child, PathBuf) {
    let report = report_dir.join(format!("{ending}.report"));
    let child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_starts_a_server_then_ends_as_told", "--ignored", "--test-threads=1"])
        .env(REPORT, &report)
        .env(ENDING, ending)
        // The clean-up under test is that of a server the testkit starts.
        .env_remove("DATABASE_URL")
        .env_remove("DPLOYR_TEST_DATABASE_URL")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    (child, report)
}

pub fn read_report(report: &Path) -> Option<(i32, PathBuf)> {
    let text = std::fs::read_to_string(report).ok()?;
    let (pid, root) = text.split_once('\n')?;
    Some((pid.parse().ok()?, PathBuf::from(root)))
}

/// True if `pid` runs and is not a zombie waiting to be reaped.
pub fn running(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

pub fn local_binaries_present() -> bool {
    let present = dployr_testkit::local::find_bindir().is_some();
    if !present {
        eprintln!("no local PostgreSQL server binaries: the throwaway-cluster clean-up cannot be exercised here");
    }
    present
}
