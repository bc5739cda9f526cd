//! The toolchain promise is true (issue 12, defect 7): the workspace's
//! `rust-version` is exactly what the locked dependencies need, the highest
//! `rust-version` any locked package declares. Lower, and a user of that
//! compiler meets a dependency that refuses it; higher, and users are
//! turned away for nothing. `.ci/run` runs this test too.

#![cfg(test)]

use std::process::Command;

fn version(text: &str) -> Vec<u64> {
    let mut parts: Vec<u64> = text.split('.').map(|part| part.parse().unwrap()).collect();
    parts.resize(3, 0);
    parts
}

#[test]
fn the_declared_rust_version_is_the_highest_any_locked_package_needs() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--locked"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let members: Vec<&str> =
        metadata["workspace_members"].as_array().unwrap().iter().map(|id| id.as_str().unwrap()).collect();
    let packages = metadata["packages"].as_array().unwrap();
    let mut needed = (vec![0, 0, 0], String::from("(none)"));
    let mut declared = Vec::new();
    for package in packages {
        let Some(rust_version) = package["rust_version"].as_str() else { continue };
        let name = format!("{} {}", package["name"].as_str().unwrap(), package["version"].as_str().unwrap());
        if members.contains(&package["id"].as_str().unwrap()) {
            declared.push((name, rust_version.to_owned()));
        } else if version(rust_version) > needed.0 {
            needed = (version(rust_version), format!("{name} (rust-version {rust_version})"));
        }
    }
    assert!(!declared.is_empty());
    for (member, rust_version) in declared {
        assert_eq!(
            version(&rust_version),
            needed.0,
            "{member} declares rust-version {rust_version}; the lock needs {}",
            needed.1
        );
    }
}
