//! A variable whose value is not UTF-8 is malformed, not unset. The
//! environment is set for a child process (this test binary again, running
//! only `in_the_child`), so no test of the parent sees it change.

#![cfg(test)]

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt as _;
use std::process::Command;

use dployr_data::{Config, StoreError};

/// Set for the child only: `in_the_child` does nothing without it.
const CHILD_MARK: &str = "DPLOYR_TEST_ENV_NOT_UNICODE_CHILD";

fn child(pool_size: &OsStr) -> std::process::Output {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "in_the_child", "--ignored", "--nocapture"])
        .env(CHILD_MARK, "1")
        .env("DATABASE_URL", "postgres://db/app")
        .env("DPLOYR_DB_POOL_SIZE", pool_size)
        .output()
        .unwrap()
}

#[test]
fn a_variable_that_is_not_utf8_is_a_configuration_error_naming_it_not_the_default() {
    let refused = child(OsStr::from_bytes(b"1\xff"));
    let said = String::from_utf8_lossy(&refused.stdout);
    assert!(refused.status.success(), "{said}{}", String::from_utf8_lossy(&refused.stderr));
    assert!(said.contains("from_env: Err(DPLOYR_DB_POOL_SIZE: is not valid UTF-8)"), "{said}");
    let taken = child(OsStr::new("3"));
    let said = String::from_utf8_lossy(&taken.stdout);
    assert!(said.contains("from_env: Ok(pool max_size 3)"), "{said}");
}

#[test]
#[ignore = "run by the test above, in a child process with its environment"]
fn in_the_child() {
    if std::env::var_os(CHILD_MARK).is_none() {
        return;
    }
    match Config::from_env() {
        Ok(config) => println!("from_env: Ok(pool max_size {})", config.pool.max_size),
        Err(StoreError::Configuration { setting, reason }) => println!("from_env: Err({setting}: {reason})"),
        Err(other) => println!("from_env: Err(other: {other})"),
    }
}
