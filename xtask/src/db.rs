//! `cargo xtask db ...`: the local development PostgreSQL.

use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::Command;

use diesel::{Connection as _, PgConnection};
use dployr_testkit::local::{self, DevCluster};

use crate::{Failure, workspace_root};

/// `DATABASE_URL`, if the user set one.
pub fn external_url() -> Option<String> {
    std::env::var("DATABASE_URL").ok().filter(|url| !url.trim().is_empty())
}

/// Where the development cluster lives: `.dployr/dev` in the checkout
/// (ignored by git), not under the target directory, so `cargo clean` does
/// not delete it and a shared `CARGO_TARGET_DIR` does not share it between
/// checkouts.
pub fn dev_root() -> PathBuf {
    workspace_root().join(".dployr").join("dev")
}

fn dev_cluster() -> Result<DevCluster, Failure> {
    let bindir = local::locate_bindir().map_err(|error| {
        format!("{error}; install them (apt-get install postgresql) or set DATABASE_URL to a server of your own")
    })?;
    Ok(DevCluster::new(dev_root(), bindir))
}

/// The database the other commands use: `DATABASE_URL`, else the running
/// development cluster.
pub fn database_url() -> Result<String, Failure> {
    if let Some(url) = external_url() {
        return Ok(url);
    }
    let cluster = dev_cluster()?;
    match cluster.url() {
        Some(url) if cluster.is_running() => Ok(url),
        _ => Err("the local development database is not running: start it with `cargo xtask db up` \
                  (or set DATABASE_URL to a server of your own)"
            .into()),
    }
}

pub fn up() -> Result<(), Failure> {
    if let Some(url) = external_url() {
        PgConnection::establish(&url).map_err(|e| {
            // libpq's text may echo the URL, password included.
            format!("DATABASE_URL is set, but: {}", dployr_domain::ConnectFailure::classify(&e.to_string(), &url))
        })?;
        println!("DATABASE_URL is set and answers; nothing to start.");
        return Ok(());
    }
    let cluster = dev_cluster()?;
    let was_running = cluster.is_running();
    let url = cluster.up()?;
    if was_running {
        println!("already running: {url}");
    } else {
        println!("started the development database: {url}");
    }
    println!("next: cargo xtask migrate run");
    Ok(())
}

/// What `db down` does with the cluster's files once it has stopped.
#[derive(Clone, Copy)]
pub enum AfterStop {
    /// Keep them: `db up` starts the same data again.
    Keep,
    /// Delete them (`--purge`).
    Purge,
}

pub fn down(after: AfterStop) -> Result<(), Failure> {
    if external_url().is_some() {
        return Err("DATABASE_URL is set: `db down` only stops the local development cluster; unset it first".into());
    }
    let cluster = dev_cluster()?;
    if cluster.down()? {
        println!("stopped the development database");
    } else {
        println!("the development database was not running");
    }
    if let AfterStop::Purge = after {
        let root = cluster.root().to_owned();
        if root.exists() {
            std::fs::remove_dir_all(&root).map_err(|e| format!("deleting {}: {e}", root.display()))?;
            println!("deleted {}", root.display());
        }
    }
    Ok(())
}

pub fn url() -> Result<(), Failure> {
    println!("{}", database_url()?);
    Ok(())
}

pub fn psql(extra: &[&str]) -> Result<(), Failure> {
    let url = database_url()?;
    let psql =
        local::find_bindir().map(|dir| dir.join("psql")).filter(|p| p.is_file()).unwrap_or_else(|| "psql".into());
    // Replace this process: psql owns the terminal from here.
    let error = Command::new(&psql).arg(&url).args(extra).exec();
    Err(format!("running {}: {error}", psql.display()).into())
}

/// Drops the template and per-test databases the tests, `erd` and `schema`
/// left on the server (`DATABASE_URL`, else the development cluster).
pub fn clean() -> Result<(), Failure> {
    let url = database_url()?;
    let dropped = dployr_testkit::drop_leftover_databases(&url)?;
    if dropped.is_empty() {
        println!("nothing to drop: no template or leftover test database on the server");
    }
    for name in &dropped {
        println!("dropped {name}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_development_cluster_lives_in_the_checkout_outside_the_target_directory() {
        let root = super::dev_root();
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map_or_else(|| crate::workspace_root().join("target"), std::path::PathBuf::from);
        assert!(!root.starts_with(&target), "{} is under {}", root.display(), target.display());
        assert!(root.starts_with(crate::workspace_root()), "{}", root.display());
    }
}
