//! `cargo xtask erd [--check]`: `docs/erd.md`, the Mermaid diagram of the
//! schema, generated from the catalog of a throwaway database migrated to
//! head (see `dployr_testkit::erd`).

use crate::{Failure, workspace_root};

const ERD_MD: &str = "docs/erd.md";

fn generate() -> Result<String, Failure> {
    let db = dployr_testkit::try_database()?;
    Ok(dployr_testkit::erd::markdown(&mut db.connect())?)
}

pub fn write() -> Result<(), Failure> {
    let erd = generate()?;
    std::fs::write(workspace_root().join(ERD_MD), erd)?;
    println!("wrote {ERD_MD}");
    Ok(())
}

pub fn check() -> Result<(), Failure> {
    let checked_in = std::fs::read_to_string(workspace_root().join(ERD_MD)).unwrap_or_default();
    if generate()? != checked_in {
        return Err(
            format!("{ERD_MD} differs from what the migrations produce; run `cargo xtask erd` and commit it").into()
        );
    }
    println!("{ERD_MD} matches the migrations");
    Ok(())
}
