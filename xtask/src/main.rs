//! `cargo xtask`: the development chores of the dployr data layer.
//!
//! Subcommands are plain functions; argument parsing is a `match` on words.
//! Without `DATABASE_URL`, the database commands use a persistent local
//! development cluster under `target/dployr-dev` (the seed's
//! `createdb dployr-local`), which `cargo xtask db up` starts.

#![expect(clippy::print_stdout, reason = "a command-line tool: printing is its output")]

mod bench;
mod db;
mod demo;
mod erd;
mod migrate;
mod schema;
mod stress;

use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "\
usage: cargo xtask <command>

  demo [--kv memory|postgres|cloudflare-emulator]
                   the seed README's story end to end (sign-in, cluster, invites, instance,
                   session, OAuth state, one-time code), on a throwaway PostgreSQL it starts
                   and stops (DATABASE_URL: that database instead); key-value backend postgres by default

  bench [--threads 1,16] [--seconds 1] [--ops SUBSTRING,...] [--json FILE]
                   every operation under load, next to pgbench's limit for the same statement,
                   on a throwaway PostgreSQL (release build)

  stress [--seconds 60] [--threads 32] [--seed S] [--clusters 4]
                   a random mix of every write of the stores from many threads, with a checker
                   sampling the invariants (one owner per live cluster, no orphan membership,
                   tokens used once) every 10 ms; fails on any violation, Backend error or deadlock

  db up            start the local development PostgreSQL (target/dployr-dev) and create dployr-local
  db down          stop it (the data stays; `db down --purge` deletes it)
  db url           print the URL the other commands use
  db psql          open psql on it

  migrate status   list migrations: applied (when, how long) or pending
  migrate run      apply pending migrations
  migrate revert   revert the last applied migration
  migrate redo     revert the last applied migration and apply it again
  migrate new NAME create migrations/NNN_NAME/{up,down}.sql

  erd              regenerate docs/erd.md (Mermaid) from the catalog of a freshly migrated database
  erd --check      fail if docs/erd.md differs from what the migrations produce

  schema           regenerate crates/dployr-pg/src/schema.rs with `diesel print-schema`
  schema --check   fail if schema.rs differs from what the migrations produce

The database is $DATABASE_URL if set, else the local development cluster.";

/// What went wrong, for the user; printed as `error: ...`.
type Failure = Box<dyn std::error::Error>;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match words.as_slice() {
        ["bench", rest @ ..] => bench::run(rest),
        ["stress", rest @ ..] => stress::run(rest),
        ["demo"] => demo::run(demo::DemoKv::Postgres),
        ["demo", "--kv", kv] => demo::DemoKv::parse(kv).and_then(demo::run),
        ["db", "up"] => db::up(),
        ["db", "down"] => db::down(false),
        ["db", "down", "--purge"] => db::down(true),
        ["db", "url"] => db::url(),
        ["db", "psql", rest @ ..] => db::psql(rest),
        ["migrate", "status"] => migrate::status(),
        ["migrate", "run"] => migrate::run(),
        ["migrate", "revert"] => migrate::revert(),
        ["migrate", "redo"] => migrate::redo(),
        ["migrate", "new", name] => migrate::new(name),
        ["erd"] => erd::write(),
        ["erd", "--check"] => erd::check(),
        ["schema"] => schema::write(),
        ["schema", "--check"] => schema::check(),
        [] | ["help" | "--help" | "-h"] => {
            println!("{USAGE}");
            Ok(())
        }
        _ => Err(format!("unknown command `{}`\n\n{USAGE}", words.join(" ")).into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // The errors of dployr-migrate and dployr-testkit already say
            // their cause in their message; walking `source()` would repeat it.
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root (the parent of `xtask/`).
fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// The `migrations/` folder of the workspace.
fn migrations_dir() -> PathBuf {
    workspace_root().join("migrations")
}
