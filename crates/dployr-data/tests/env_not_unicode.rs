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
    child_with(&[("DPLOYR_DB_POOL_SIZE", pool_size)])
}

/// This binary's `in_the_child` with a database URL and `vars`.
fn child_with(vars: &[(&str, &OsStr)]) -> std::process::Output {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command.args(["--exact", "in_the_child", "--ignored", "--nocapture"]).env(CHILD_MARK, "1");
    command.env("DATABASE_URL", "postgres://db/app");
    for (name, value) in vars {
        command.env(name, value);
    }
    command.output().unwrap()
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

/// With sessions on Cloudflare, a base URL that is not UTF-8 was taken
/// as unset, and Cloudflare's public API used instead (the API token sent
/// past the proxy or endpoint the operator meant).
#[cfg(feature = "cloudflare")]
#[test]
fn a_cloudflare_base_url_that_is_not_utf8_is_refused_not_replaced_by_cloudflares_own() {
    let cloudflare = |account: &OsStr, base_url: &OsStr| {
        child_with(&[
            ("DPLOYR_KV", OsStr::new("cloudflare")),
            ("CLOUDFLARE_ACCOUNT_ID", account),
            ("CLOUDFLARE_KV_NAMESPACE_ID", OsStr::new("ns")),
            ("CLOUDFLARE_API_TOKEN", OsStr::new("token")),
            ("CLOUDFLARE_API_BASE_URL", base_url),
        ])
    };
    let local = OsStr::new("http://127.0.0.1:8787/client/v4");
    let refused = cloudflare(OsStr::new("acc"), OsStr::from_bytes(b"http://127.0.0.1:8787/client/v4\xff"));
    let said = String::from_utf8_lossy(&refused.stdout);
    assert!(said.contains("from_env: Err(CLOUDFLARE_API_BASE_URL: is not valid UTF-8)"), "{said}");
    // A required one said "is not set, and DPLOYR_KV=cloudflare needs it".
    let refused = cloudflare(OsStr::from_bytes(b"acc\xff"), local);
    let said = String::from_utf8_lossy(&refused.stdout);
    assert!(said.contains("from_env: Err(CLOUDFLARE_ACCOUNT_ID: is not valid UTF-8)"), "{said}");
    let taken = cloudflare(OsStr::new("acc"), local);
    let said = String::from_utf8_lossy(&taken.stdout);
    assert!(said.contains("from_env: Ok("), "{said}");
}

#[test]
#[ignore = "run by the tests above, in a child process with its environment"]
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
