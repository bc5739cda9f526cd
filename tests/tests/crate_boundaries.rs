//! Tidy checks of the workspace's shape: the domain crate stays free of
//! diesel and of anything that does I/O, so every consumer can depend on it
//! alone (rust-analyzer guards its crate boundaries the same way); the web
//! side (axum, tower-sessions' middleware) stays in the example, out of the
//! product crates.

#![cfg(test)]

use std::process::Command;

/// The packages `cargo tree` lists for `package`'s normal dependencies.
fn dependencies_of(package: &str) -> Vec<String> {
    dependencies_with(package, &[])
}

/// [`dependencies_of`], with more `cargo tree` arguments (features).
fn dependencies_with(package: &str, extra: &[&str]) -> Vec<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .args(["tree", "--offline", "-p", package, "-e", "normal", "--prefix", "none", "--format", "{p}"])
        .args(extra)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .filter_map(|line| line.split_whitespace().next().map(str::to_owned))
        .collect()
}

#[test]
fn the_domain_crate_depends_on_no_database_network_or_async_crate() {
    let dependencies = dependencies_of("dployr-domain");
    assert!(dependencies.iter().any(|d| d == "dployr-domain"), "{dependencies:?}");
    for forbidden in ["diesel", "pq-sys", "r2d2", "reqwest", "hyper", "tokio", "tiny_http", "dployr-pg", "dployr-kv"] {
        assert!(!dependencies.iter().any(|d| d == forbidden), "dployr-domain pulls in {forbidden}: {dependencies:?}");
    }
}

#[test]
fn the_pg_crate_does_not_depend_on_the_kv_crate() {
    let dependencies = dependencies_of("dployr-pg");
    assert!(dependencies.iter().any(|d| d == "diesel"), "{dependencies:?}");
    assert!(!dependencies.iter().any(|d| d == "dployr-kv" || d == "dployr-data"), "{dependencies:?}");
}

#[test]
fn a_postgres_only_user_of_the_kv_or_data_crate_builds_no_http_client() {
    for package in ["dployr-kv", "dployr-data"] {
        let dependencies = dependencies_with(package, &["--no-default-features"]);
        assert!(dependencies.iter().any(|d| d == "diesel"), "{dependencies:?}");
        for forbidden in ["reqwest", "hyper", "rustls", "tokio"] {
            assert!(
                !dependencies.iter().any(|d| d == forbidden),
                "{package} without `cloudflare` pulls in {forbidden}"
            );
        }
    }
    // On by default in the facade.
    assert!(dependencies_of("dployr-data").iter().any(|d| d == "reqwest"));
}

#[test]
fn the_tower_sessions_store_builds_no_web_framework_or_http_client() {
    let dependencies = dependencies_of("dployr-tower-sessions");
    assert!(dependencies.iter().any(|d| d == "tower-sessions-core"), "{dependencies:?}");
    for forbidden in ["axum", "axum-core", "tower-cookies", "hyper", "reqwest", "dployr-data"] {
        assert!(
            !dependencies.iter().any(|d| d == forbidden),
            "dployr-tower-sessions pulls in {forbidden}: {dependencies:?}"
        );
    }
}

#[test]
fn the_async_facade_adds_tokio_to_the_data_crate_and_no_web_framework() {
    let dependencies = dependencies_with("dployr-data", &["--no-default-features", "--features", "tokio"]);
    assert!(dependencies.iter().any(|d| d == "tokio"), "{dependencies:?}");
    for forbidden in ["axum", "tower-sessions", "tower-sessions-core", "hyper", "reqwest"] {
        assert!(!dependencies.iter().any(|d| d == forbidden), "dployr-data with `tokio` pulls in {forbidden}");
    }
}

/// design.md: "`dployr-kv` may use `dployr-pg`'s pool type for its
/// PostgreSQL backend and nothing else of it". Every `dployr_pg::` path in
/// its sources (code, doc comments and their examples alike) names the pool
/// or the pool's configuration; its table is its own `schema.rs`.
#[test]
fn the_kv_crate_uses_nothing_of_the_pg_crate_but_its_pool() {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates/dployr-kv/src");
    let mut named = Vec::new();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        for (at, _) in text.match_indices("dployr_pg::") {
            let rest = &text[at + "dployr_pg::".len()..];
            let items = match rest.strip_prefix('{') {
                Some(list) => &list[..list.find('}').unwrap()],
                None => &rest[..rest.find(|c: char| !(c.is_alphanumeric() || c == '_')).unwrap_or(rest.len())],
            };
            for item in items.split(',').map(str::trim).filter(|item| !item.is_empty()) {
                named.push((path.file_name().unwrap().to_string_lossy().into_owned(), item.to_owned()));
            }
        }
    }
    assert!(named.iter().any(|(_, item)| item == "PgPool"), "the scan found no use of the pool: {named:?}");
    let others: Vec<_> = named.iter().filter(|(_, item)| !["PgPool", "PoolConfig"].contains(&item.as_str())).collect();
    assert!(others.is_empty(), "dployr-kv names more of dployr-pg than its pool: {others:?}");
}
