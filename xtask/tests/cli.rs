//! The `cargo xtask` binary as a shell user meets it (issue 12, defect 5).

#![cfg(test)]

use std::process::{Command, Stdio};

#[test]
fn help_into_a_pipe_closed_early_ends_quietly_without_a_panic() {
    // `cargo xtask --help | head -0`: the reader is gone before the first write.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let output = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .arg("--help")
        .stdout(Stdio::from(writer))
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(output.status.success(), "{:?}: {stderr}", output.status);
}
