//! `cargo xtask db ...`: the local development PostgreSQL.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use diesel::{Connection as _, PgConnection};
use dployr_testkit::local::{self, DevCluster};

use crate::{Failure, workspace_root};

/// `DATABASE_URL`, if the user set one.
pub fn external_url() -> Option<String> {
    non_empty_var("DATABASE_URL")
}

/// The environment variable `name`, unless unset or blank.
fn non_empty_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|url| !url.trim().is_empty())
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
    let error = psql_command(&psql, &url, extra).exec();
    Err(format!("running {}: {error}", psql.display()).into())
}

/// `psql URL EXTRA...`, with the password of a `postgres://` URL moved into
/// the child's `PGPASSWORD`: every user of the machine can read a process's
/// arguments (`ps`, `/proc/<pid>/cmdline`), only its own user its
/// environment. A URL's password wins over `PGPASSWORD` in libpq, so setting
/// it to that password changes nothing else. A `key=value` string is passed
/// as it is: taking its `password` out means quoting every other value
/// again, and a malformed one would then connect somewhere else instead of
/// being refused.
fn psql_command(psql: &Path, url: &str, extra: &[&str]) -> Command {
    let mut command = Command::new(psql);
    match split_password(url) {
        Some((without_password, password)) => command.arg(without_password).env("PGPASSWORD", password),
        None => command.arg(url),
    };
    command.args(extra);
    command
}

/// A `postgres://` URL without its password (in the user info or a
/// `password` parameter), and that password percent-decoded; `None` when
/// the URL holds none, is not a URL, or has a malformed `%` escape (psql
/// then refuses it as it is). The user info ends at the first `@` before
/// any `/`, and the parameters start at the first `?` after it, as
/// libpq reads them ([`dployr_domain::libpq::LibpqUrl`]).
pub(crate) fn split_password(url: &str) -> Option<(String, OsString)> {
    let scheme = ["postgresql://", "postgres://"].into_iter().find(|scheme| url.starts_with(scheme))?;
    let rest = &url[scheme.len()..];
    let (user_info, after_user_info) = match rest.find(['@', '/']) {
        Some(at) if rest[at..].starts_with('@') => (Some(&rest[..at]), &rest[at + 1..]),
        _ => (None, rest),
    };
    let mut password = None;
    let user = match user_info.map(|info| info.split_once(':').unwrap_or((info, ""))) {
        Some((user, in_user_info)) => {
            if !in_user_info.is_empty() {
                password = Some(percent_decode(in_user_info)?);
            }
            Some(user)
        }
        None => None,
    };
    let (location, query) = after_user_info.split_once('?').map_or((after_user_info, None), |(l, q)| (l, Some(q)));
    let mut kept = Vec::new();
    for pair in query.into_iter().flat_map(|query| query.split('&')) {
        // libpq refuses a parameter without its `=` or with a second one:
        // such a URL is left whole, for psql to refuse as libpq does.
        let (key, value) = pair.split_once('=')?;
        if value.contains('=') {
            return None;
        }
        // libpq reads the parameters after the user info: the last word wins.
        if percent_decode(key)? == *"password" {
            password = Some(percent_decode(value)?);
        } else {
            kept.push(pair);
        }
    }
    let password = password?;
    let mut without = String::from(scheme);
    if let Some(user) = user {
        without.push_str(user);
        without.push('@');
    }
    without.push_str(location);
    if !kept.is_empty() {
        without.push('?');
        without.push_str(&kept.join("&"));
    }
    Some((without, password))
}

/// `text` with its `%XX` escapes decoded, as bytes (a password need not be
/// UTF-8); `None` for a `%` not followed by two hex digits (the crate's
/// decoder would keep it as it is) or for `%00`, both of which libpq refuses.
fn percent_decode(text: &str) -> Option<OsString> {
    let well_formed = text
        .match_indices('%')
        .all(|(at, _)| text.as_bytes().get(at + 1..at + 3).is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit)));
    let decoded: Vec<u8> = percent_encoding::percent_decode_str(text).collect();
    // libpq refuses `%00` too ("forbidden value").
    (well_formed && !decoded.contains(&0)).then(|| OsString::from_vec(decoded))
}

/// The server whose leftovers `db clean` drops: the one the tests, `erd` and
/// `schema` used, in the test kit's order (`dployr_testkit::server`):
/// `DPLOYR_TEST_DATABASE_URL`, else `DATABASE_URL`, else the development
/// cluster.
fn test_server_url() -> Result<String, Failure> {
    match non_empty_var("DPLOYR_TEST_DATABASE_URL") {
        Some(url) => Ok(url),
        None => database_url(),
    }
}

/// Drops the template and per-test databases the tests, `erd` and `schema`
/// left on their server ([`test_server_url`]).
pub fn clean() -> Result<(), Failure> {
    let url = test_server_url()?;
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
    use std::ffi::OsStr;
    use std::path::Path;

    /// The arguments and environment `db psql` would start psql with for `url`.
    fn psql_sees(url: &str) -> (Vec<String>, Vec<(String, Option<String>)>) {
        let command = super::psql_command(Path::new("psql"), url, &["-c", "SELECT 1"]);
        let text = |s: &OsStr| s.to_string_lossy().into_owned();
        (command.get_args().map(text).collect(), command.get_envs().map(|(k, v)| (text(k), v.map(text))).collect())
    }

    #[test]
    fn psql_gets_the_password_of_a_url_through_its_environment_not_its_arguments() {
        let (args, envs) = psql_sees("postgres://app:s%40cr:et@db:5433,db2/app?sslmode=require");
        assert_eq!(args, ["postgres://app@db:5433,db2/app?sslmode=require", "-c", "SELECT 1"]);
        assert_eq!(envs, [("PGPASSWORD".to_owned(), Some("s@cr:et".to_owned()))]);

        let (args, envs) = psql_sees("postgresql://app@db/app?password=x%26y&sslmode=require");
        assert_eq!(args, ["postgresql://app@db/app?sslmode=require", "-c", "SELECT 1"]);
        assert_eq!(envs, [("PGPASSWORD".to_owned(), Some("x&y".to_owned()))]);

        let (args, _) = psql_sees("postgres://:only?secret@db/app?password=wins");
        assert_eq!(args, ["postgres://@db/app", "-c", "SELECT 1"], "a `?` in the user info starts no parameters");
    }

    #[test]
    fn psql_gets_a_url_without_password_or_a_key_value_string_as_it_is() {
        for url in [
            "postgres://app@db/app",
            "postgres://db/app?sslmode=require",
            "host=db password=secret",
            "postgres://app:bad%zz@db/app",
            "postgres://app:secret@db/app?password",
            "postgres://app@db/app?password=a=b",
            "postgres://app:nul%00@db/app",
        ] {
            let (args, envs) = psql_sees(url);
            assert_eq!(args, [url, "-c", "SELECT 1"]);
            assert!(envs.is_empty(), "{url}: {envs:?}");
        }
    }

    #[test]
    fn the_development_cluster_lives_in_the_checkout_outside_the_target_directory() {
        let root = super::dev_root();
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map_or_else(|| crate::workspace_root().join("target"), std::path::PathBuf::from);
        assert!(!root.starts_with(&target), "{} is under {}", root.display(), target.display());
        assert!(root.starts_with(crate::workspace_root()), "{}", root.display());
    }
}
