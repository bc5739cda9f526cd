//! `cargo xtask test`: the README's test command, `cargo test --workspace`,
//! from the workspace root, with any further arguments passed on. It picks
//! its PostgreSQL as the tests do (`DPLOYR_TEST_DATABASE_URL`, else
//! `DATABASE_URL`, else a throwaway one); this command sets nothing.

use std::process::Command;

use crate::Failure;

/// Runs `cargo test --workspace ARGS...`; fails with cargo's exit status
/// when the suite does.
pub fn run(args: &[&str]) -> Result<(), Failure> {
    // The cargo that runs this xtask (set by cargo for its children), so a
    // toolchain chosen by `cargo +stable xtask test` tests with itself.
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(crate::workspace_root())
        .args(["test", "--workspace"])
        .args(args)
        .status()
        .map_err(|error| format!("running `cargo test --workspace`: {error}"))?;
    if status.success() { Ok(()) } else { Err(format!("`cargo test --workspace` failed ({status})").into()) }
}
