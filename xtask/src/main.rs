//! `cargo xtask`: the development chores of the dployr data layer.
//!
//! Subcommands are plain functions; argument parsing is a `match` on words.
//! Without `DATABASE_URL`, `migrate` and `db` use a persistent local
//! development cluster under `.dployr/dev` (the seed's
//! `createdb dployr-local`), which `cargo xtask db up` starts. `erd`,
//! `schema`, `stress`, `bench` and `demo` pick their server as the tests do
//! (`DPLOYR_TEST_DATABASE_URL`, else `DATABASE_URL`, else a throwaway one)
//! and never use the development cluster; `pgbouncer` always starts its own.

/// `println!` for a command-line tool whose output may go to a pipe that
/// closes early (`cargo xtask --help | head`): std's `println!` panics on
/// the closed pipe; this one drops the lines nobody reads and lets the
/// command finish ([`write_line`]). It shadows std's macro in every module
/// below.
macro_rules! println {
    () => {
        $crate::write_line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::write_line(format_args!($($arg)*))
    };
}

/// `eprintln!` that never panics: std's panics when standard error is
/// closed or full (`2>/dev/full`, a reader gone), which turned any
/// command's failure into a panic and exit code 101, and `migrate status`'s
/// 1 or 2 with it. What cannot be written to standard error is dropped; the
/// exit code still tells.
macro_rules! eprintln {
    ($($arg:tt)*) => {
        $crate::write_error_line(format_args!($($arg)*))
    };
}

mod bench;
mod db;
mod demo;
mod erd;
mod migrate;
mod pgbouncer;
mod schema;
mod stress;
mod suite;

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

/// Set when a write to stdout found its reader gone; later lines are dropped.
static STDOUT_READER_GONE: AtomicBool = AtomicBool::new(false);

/// Writes one line to stdout. Once the reader of a pipe has gone
/// (`cargo xtask migrate redo | head -n2`), this and every later line are
/// dropped and the command runs on: ending the process here would stop a
/// `redo` between its committed revert and its re-apply, and turn the exit
/// code of `migrate status` (1: out of date) into 0. Any other write error
/// ends the process with exit code 2: a failure for every command, and for
/// `migrate status` "cannot tell", never 1 ("out of date"), which a deploy
/// script may answer by migrating.
fn write_line(args: std::fmt::Arguments<'_>) {
    if STDOUT_READER_GONE.load(Ordering::Relaxed) {
        return;
    }
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{args}") {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => {
            STDOUT_READER_GONE.store(true, Ordering::Relaxed);
        }
        Err(error) => {
            eprintln!("error: writing to stdout: {error}");
            std::process::exit(2);
        }
    }
}

/// Writes one line to standard error, dropping it if that fails (see the
/// `eprintln!` above).
fn write_error_line(args: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stderr().lock(), "{args}");
}

const USAGE: &str = "\
usage: cargo xtask <command>

  test [ARGS...]   the whole suite: `cargo test --workspace ARGS...` (the README's test command),
                   with its own throwaway PostgreSQL unless DPLOYR_TEST_DATABASE_URL or DATABASE_URL
                   names a server

  demo [--kv memory|postgres|cloudflare-emulator]
                   the seed README's story end to end (sign-in, cluster, invites, instance,
                   session, OAuth state, one-time code), on a throwaway PostgreSQL it starts
                   and stops (DATABASE_URL: that database instead; DPLOYR_TEST_DATABASE_URL: an empty
                   database on that server); key-value backend postgres by default

  bench [--threads 1,16] [--seconds 1] [--rounds 2] [--ops SUBSTRING,...] [--json FILE]
                   every operation under load, next to pgbench's limit for the same statement
                   (release build), on databases cloned on the test server (see below); then the
                   replica-safe reads with a primary and one streaming replica it starts from the
                   local server binaries: on the primary, routed, and straight on the replica (what
                   the routing and lag checks cost per read); `--ops replica` for that run alone;
                   --json FILE is relative to the current directory

  stress [--seconds 60] [--threads 32] [--seed S] [--clusters 4]
                   a random mix of every operation of the stores from many threads, with a checker
                   sampling the invariants (one owner per live cluster, no orphan membership,
                   exact totals, tokens used once) every 10 ms and checking every read's answer;
                   fails on any violation, Backend error or deadlock; on a database cloned on the
                   test server (see below). `cargo test` runs it with --threads 16 --seconds 10
                   --clusters 4: replay its seed with those, or DPLOYR_STRESS_SEED=S with the test

  pgbouncer [--threads 16] [--runs 5]
                   the deployment behind PgBouncer in transaction mode (pgbouncer must be installed):
                   a start with an unsafe setting is refused, three restarts with migrations on start,
                   then 3 processes x N threads of the seed story; fails on any error or rule violation.
                   Always on a throwaway PostgreSQL of its own (local server binaries): refuses to run
                   with DATABASE_URL or DPLOYR_TEST_DATABASE_URL set
  seed-load [--threads 16] [--runs 5] [--label L]
                   the seed story from N threads on the data layer of the environment (DATABASE_URL, ...);
                   exits non-zero when a story fails or a worker thread panics

  db up            start the local development PostgreSQL (.dployr/dev) and create dployr-local
  db down          stop it (the data stays; `db down --purge` deletes it)
  db url           print the URL the other commands use
  db psql          open psql on it
  db clean         drop the template and test databases the tests, `erd` and `schema` left on the
                   server (DPLOYR_TEST_DATABASE_URL, else DATABASE_URL, as the tests choose it,
                   else the development cluster); run it when no test uses it

  migrate status   list migrations: applied (when, how long) or pending; exits 1 when a migration
                   is pending, changed or missing, 2 when it cannot tell (no connection, a malformed
                   URL, an unreadable migrations/, wrong arguments), 0 when up to date (for deploy scripts)
  migrate run      apply pending migrations
  migrate revert   revert the last applied migration
  migrate revert --to VERSION   revert every migration above VERSION
  migrate revert --all          revert every applied migration
  migrate redo     revert the last applied migration and apply it again
  migrate new NAME create migrations/NNN_NAME/{up,down}.sql
                   (every migrate command takes --database-url URL or --database-url=URL, over
                   DATABASE_URL, which keeps a password out of the process list)

  erd              regenerate docs/erd.md (Mermaid) from the catalog of a freshly migrated database
  erd --check      fail if docs/erd.md differs from what the migrations produce

  schema           regenerate crates/dployr-pg/src/schema.rs and crates/dployr-kv/src/schema.rs
                   with `diesel print-schema` (diesel.toml, crates/dployr-kv/diesel.toml)
  schema --check   fail if either differs from what the migrations produce

Which database:
  db, migrate      $DATABASE_URL if set (migrate: --database-url first), else the local development
                   cluster (`db clean`: $DPLOYR_TEST_DATABASE_URL before those)
  erd, schema, stress, bench
                   the test server, chosen as the tests choose it: $DPLOYR_TEST_DATABASE_URL's server,
                   else $DATABASE_URL's (a migrated template database is left there: `db clean`), else
                   a throwaway PostgreSQL started from the local server binaries and stopped; never
                   the development cluster
  demo             $DATABASE_URL's database itself if set, else as erd (an empty database, dropped)
  pgbouncer        a throwaway PostgreSQL only";

/// What went wrong, for the user; printed as `error: ...`.
type Failure = Box<dyn std::error::Error>;

/// Command-line words as an error may echo them, with what may be a secret
/// redacted: a word holding a URL (`postgres://user:password@…`, also as
/// `--database-url=…`), and everything from a `password` or `sslpassword`
/// key of a `key=value` connection string on, which the shell split into
/// words from `--database-url $URL` unquoted: libpq takes spaces around
/// the `=` and a quoted value with spaces, so its value may be any of the
/// words after it.
pub(crate) fn shown(words: &[&str]) -> String {
    use dployr_domain::connection::REDACTED;
    let mut shown = Vec::with_capacity(words.len());
    let mut secret_from_here = false;
    for word in words {
        let lower = word.to_ascii_lowercase();
        if secret_from_here || word.contains("://") {
            shown.push(REDACTED.to_owned());
        } else if let Some(at) = lower.find("password") {
            secret_from_here = true;
            let key_end = at + "password".len();
            let shown_end = if word[key_end..].starts_with('=') { key_end + 1 } else { key_end };
            shown.push(format!("{}{REDACTED}", &word[..shown_end]));
        } else {
            shown.push((*word).to_owned());
        }
    }
    shown.join(" ")
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    // `--help` after any command prints the usage, except where the words
    // after it go to another program (cargo test, psql).
    let passes_words_on = matches!(words.as_slice(), ["test", ..] | ["db", "psql", ..] | ["seed-load", ..]);
    let asks_for_help = !passes_words_on && words.iter().any(|word| matches!(*word, "--help" | "-h"));
    let result = match words.as_slice() {
        _ if asks_for_help => {
            println!("{USAGE}");
            Ok(())
        }
        ["bench", rest @ ..] => bench::run(rest),
        ["stress", rest @ ..] => stress::run(rest),
        ["test", rest @ ..] => suite::run(rest),
        ["demo"] => demo::run(demo::DemoKv::Postgres),
        ["demo", "--kv", kv] => demo::DemoKv::parse(kv).and_then(demo::run),
        ["db", "up"] => db::up(),
        ["db", "down"] => db::down(db::AfterStop::Keep),
        ["db", "down", "--purge"] => db::down(db::AfterStop::Purge),
        ["db", "url"] => db::url(),
        ["db", "psql", rest @ ..] => db::psql(rest),
        ["db", "clean"] => db::clean(),
        ["pgbouncer", rest @ ..] => pgbouncer::run(rest),
        ["seed-load", rest @ ..] => pgbouncer::seed_load(rest),
        ["migrate", rest @ ..] => migrate::dispatch(rest),
        ["erd"] => erd::write(),
        ["erd", "--check"] => erd::check(),
        ["schema"] => schema::write(),
        ["schema", "--check"] => schema::check(),
        [] | ["help" | "--help" | "-h"] => {
            println!("{USAGE}");
            Ok(())
        }
        _ => Err(format!("unknown command `{}`\n\n{USAGE}", shown(&words)).into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // The errors of dployr-migrate and dployr-testkit already say
            // their cause in their message; walking `source()` would repeat it.
            eprintln!("error: {error}");
            // `migrate status` tells "out of date" (1) from "cannot tell" (2).
            match error.downcast_ref::<migrate::StatusFailure>() {
                Some(status) => ExitCode::from(status.exit_code()),
                None => ExitCode::FAILURE,
            }
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
