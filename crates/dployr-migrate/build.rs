//! Embeds the text of every migration next to diesel's `embed_migrations!`.
//!
//! diesel's `Migration` trait does not hand out the SQL it runs, yet the
//! runner needs that text to checksum it (and runs exactly the text it
//! checksummed). This script writes `$OUT_DIR/migration_texts.rs`: one entry
//! per migration folder with `include_str!` of its `up.sql` and `down.sql`.

use std::error::Error;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::{env, fs};

/// A build script reports failure by returning an error: cargo prints it.
fn main() -> Result<(), Box<dyn Error>> {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").ok_or("cargo sets CARGO_MANIFEST_DIR")?);
    let migrations = manifest_dir.join("../../migrations");
    // A directory here makes cargo rescan every file below it, so an edited
    // up.sql rebuilds the crate (and embed_migrations! with it).
    println!("cargo:rerun-if-changed={}", migrations.display());

    let mut folders = Vec::new();
    for entry in fs::read_dir(&migrations).map_err(|e| format!("reading {}: {e}", migrations.display()))? {
        let path = entry?.path();
        if path.is_dir() && path.join("up.sql").is_file() {
            folders.push(path);
        }
    }
    folders.sort();

    let mut out = String::from("/// (folder name, up.sql, down.sql) of every embedded migration, sorted by name.\n");
    out.push_str("pub(crate) static MIGRATION_TEXTS: &[(&str, &str, Option<&str>)] = &[\n");
    for folder in &folders {
        let name = folder.file_name().ok_or("a migration folder has a name")?.to_string_lossy();
        let up = canonical(&folder.join("up.sql"))?;
        let down_path = folder.join("down.sql");
        let down = if down_path.is_file() {
            format!("Some(include_str!({:?}))", canonical(&down_path)?)
        } else {
            "None".to_owned()
        };
        writeln!(out, "    ({name:?}, include_str!({up:?}), {down}),")?;
    }
    out.push_str("];\n");

    let out_path = PathBuf::from(env::var_os("OUT_DIR").ok_or("cargo sets OUT_DIR")?).join("migration_texts.rs");
    fs::write(out_path, out)?;
    Ok(())
}

fn canonical(path: &Path) -> Result<String, Box<dyn Error>> {
    Ok(path.canonicalize().map_err(|e| format!("{}: {e}", path.display()))?.display().to_string())
}
