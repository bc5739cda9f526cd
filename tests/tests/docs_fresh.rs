//! Generated documentation stays true: `docs/erd.md` is what the catalog of
//! a database migrated to head says.

#![cfg(test)]

use std::path::Path;

#[test]
fn erd_md_matches_the_schema_the_migrations_produce() {
    let db = dployr_testkit::database();
    let generated = dployr_testkit::erd::markdown(&mut db.connect()).unwrap();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/erd.md");
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        generated == checked_in,
        "docs/erd.md is stale: run `cargo xtask erd` and commit it.\n--- generated ---\n{generated}"
    );
}
