//! Says, in one sentence and before the linker does in a page, that libpq
//! (PostgreSQL's client library, which diesel links through `pq-sys`) is
//! missing, and what to do: install the package, or build it from source
//! with this crate's `bundled` feature.
//!
//! libpq is looked for where `pq-sys` and the linker look: `PQ_LIB_DIR`,
//! `pkg-config`, `pg_config --libdir`, `LIBRARY_PATH` and the usual library
//! directories. `DPLOYR_SKIP_LIBPQ_CHECK=1` skips the check (a toolchain
//! that finds it some other way).

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=PQ_LIB_DIR");
    println!("cargo:rerun-if-env-changed=LIBRARY_PATH");
    println!("cargo:rerun-if-env-changed=DPLOYR_SKIP_LIBPQ_CHECK");
    if std::env::var_os("CARGO_FEATURE_BUNDLED").is_some() || std::env::var_os("DPLOYR_SKIP_LIBPQ_CHECK").is_some() {
        return;
    }
    if std::env::var("CARGO_CFG_TARGET_OS").is_ok_and(|os| os != "linux") {
        return; // the search below knows Linux's layout only
    }
    if !libpq_found() {
        eprintln!(
            "error: libpq, PostgreSQL's client library, was not found: install it (Debian/Ubuntu: \
             `apt-get install libpq-dev`; Fedora: `dnf install libpq-devel`; Alpine: `apk add libpq-dev`) \
             or build it from source with `--features dployr-pg/bundled`"
        );
        std::process::exit(1);
    }
}

fn has_libpq(dir: &Path) -> bool {
    ["libpq.so", "libpq.a"].iter().any(|name| dir.join(name).is_file())
}

fn libpq_found() -> bool {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(dir) = std::env::var_os("PQ_LIB_DIR") {
        dirs.push(dir.into());
    }
    if let Ok(out) = Command::new("pkg-config").args(["--variable=libdir", "libpq"]).output()
        && out.status.success()
    {
        dirs.push(String::from_utf8_lossy(&out.stdout).trim().into());
    }
    if let Ok(out) = Command::new("pg_config").arg("--libdir").output()
        && out.status.success()
    {
        dirs.push(String::from_utf8_lossy(&out.stdout).trim().into());
    }
    if let Some(paths) = std::env::var_os("LIBRARY_PATH") {
        dirs.extend(std::env::split_paths(&paths));
    }
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    for dir in ["/usr/lib", "/usr/lib64", "/usr/local/lib", "/usr/local/lib64", "/usr/local/pgsql/lib"] {
        dirs.push(dir.into());
        dirs.push(Path::new(dir).join(format!("{arch}-linux-gnu")));
    }
    dirs.iter().any(|dir| has_libpq(dir))
}
