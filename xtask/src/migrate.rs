//! `cargo xtask migrate ...`: status, run, revert, redo and new, over the
//! `migrations/` folder as it is on disk now. `--database-url URL` or
//! `--database-url=URL` (anywhere after `migrate`) wins over `DATABASE_URL`
//! and the development cluster.

use dployr_migrate::{MigrationEvent, MigrationRunner, MigrationSet, MigrationState};

use crate::{Failure, db, migrations_dir};

/// `migrate` and its words, with `--database-url URL` (or `=URL`) taken out.
pub fn dispatch(words: &[&str]) -> Result<(), Failure> {
    let mut url = None;
    let mut url_missing = false;
    let mut rest = Vec::new();
    let mut words = words.iter();
    while let Some(word) = words.next() {
        if let Some(value) = word.strip_prefix("--database-url=") {
            if value.trim().is_empty() {
                url_missing = true;
            } else {
                url = Some(value.to_owned());
            }
            continue;
        }
        match *word {
            // A blank value (`--database-url "$UNSET_VARIABLE"`) is none:
            // libpq would read it as "the defaults", and migrate whatever
            // PGHOST and the local socket reach.
            "--database-url" => match words.next() {
                Some(next) if !next.trim().is_empty() => url = Some((*next).to_owned()),
                _ => url_missing = true,
            },
            other => rest.push(other),
        }
    }
    // A deploy script that migrates on exit code 1 ("out of date") must not
    // migrate because `status` was called wrongly: for `status`, a usage
    // error is "could not tell" (2).
    let is_status = rest.iter().find(|word| !word.starts_with('-')) == Some(&"status");
    let usage_error = |message: String| -> Failure {
        if is_status { StatusFailure::Unknown(message.into()).into() } else { message.into() }
    };
    if url_missing {
        return Err(usage_error("--database-url needs a URL".to_owned()));
    }
    let url = url.as_deref();
    match rest.as_slice() {
        ["status"] => status(url),
        ["run"] => run(url),
        ["revert"] => revert(url),
        ["revert", "--to", version] => revert_to(url, Some(version)),
        ["revert", "--all"] => revert_to(url, None),
        ["redo"] => redo(url),
        ["new", name] => new(name),
        _ => Err(usage_error(format!(
            "unknown command `migrate {}`; `cargo xtask help` lists them",
            crate::shown(&rest)
        ))),
    }
}

fn runner(url: Option<&str>) -> Result<MigrationRunner, Failure> {
    let set = MigrationSet::from_dir(migrations_dir())?;
    let url = match url {
        Some(url) => url.to_owned(),
        None => db::database_url()?,
    };
    Ok(MigrationRunner::new(url, set))
}

fn print_event(event: &MigrationEvent) {
    println!("{event}");
}

/// Why `migrate status` failed, told apart by its exit code: a deploy
/// script that migrates when the database is out of date must not take
/// "could not connect" for "out of date".
#[derive(Debug)]
pub enum StatusFailure {
    /// A migration is pending, changed or missing: exit code 1.
    OutOfDate {
        /// Not applied yet.
        pending: usize,
        /// Applied, but `up.sql` changed since.
        changed: usize,
        /// Applied, but not in `migrations/`.
        missing: usize,
    },
    /// The state could not be read (no connection, unreadable
    /// `migrations/`, a malformed URL, ...): exit code 2.
    Unknown(Failure),
}

impl StatusFailure {
    /// The process's exit code for it.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::OutOfDate { .. } => 1,
            Self::Unknown(_) => 2,
        }
    }
}

impl std::fmt::Display for StatusFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::OutOfDate { pending, changed, missing } => write!(
                f,
                "the database is not up to date with migrations/: {pending} pending, {changed} changed, {missing} missing"
            ),
            // The cause's own message: it says what went wrong.
            Self::Unknown(cause) => write!(f, "{cause}"),
        }
    }
}

impl std::error::Error for StatusFailure {}

/// Prints every migration's state; fails with exit code 1 when one is
/// pending, changed or missing, so a deploy script can stop on it, and with
/// 2 when it cannot tell ([`StatusFailure`]).
pub fn status(url: Option<&str>) -> Result<(), Failure> {
    let lines =
        runner(url).and_then(|runner| runner.status().map_err(Failure::from)).map_err(StatusFailure::Unknown)?;
    let width = lines.iter().map(|l| l.name.len()).max().unwrap_or(4).max(4);
    println!("{:<width$}  {:<8}  {:<19}  {:>8}", "NAME", "STATE", "APPLIED AT (UTC)", "TIME");
    let mut pending = 0;
    for line in &lines {
        let (state, applied_at, took) = match &line.state {
            MigrationState::Pending => {
                pending += 1;
                ("pending", String::new(), String::new())
            }
            MigrationState::Applied { applied_at, duration, checksum_matches } => (
                if *checksum_matches { "applied" } else { "CHANGED" },
                applied_at.format("%Y-%m-%d %H:%M:%S").to_string(),
                match duration.as_millis() {
                    0 => "<1 ms".to_owned(),
                    ms => format!("{ms} ms"),
                },
            ),
            MigrationState::MissingFromSource { applied_at } => {
                ("MISSING", applied_at.format("%Y-%m-%d %H:%M:%S").to_string(), String::new())
            }
        };
        println!("{:<width$}  {state:<8}  {applied_at:<19}  {took:>8}", line.name);
    }
    println!("\n{} migrations, {pending} pending", lines.len());
    if lines.iter().any(|l| matches!(l.state, MigrationState::Applied { checksum_matches: false, .. })) {
        println!("CHANGED: up.sql differs from the text that was applied; `migrate run` will refuse to run.");
    }
    let changed =
        lines.iter().filter(|l| matches!(l.state, MigrationState::Applied { checksum_matches: false, .. })).count();
    let missing = lines.iter().filter(|l| matches!(l.state, MigrationState::MissingFromSource { .. })).count();
    if missing > 0 {
        println!("MISSING: applied to the database but not in migrations/; `migrate run` will refuse to run.");
    }
    if pending + changed + missing > 0 {
        return Err(StatusFailure::OutOfDate { pending, changed, missing }.into());
    }
    Ok(())
}

pub fn run(url: Option<&str>) -> Result<(), Failure> {
    let applied = runner(url)?.run_pending(&mut print_event)?;
    if applied.is_empty() {
        println!("nothing to apply: the database is up to date");
    } else {
        let total: std::time::Duration = applied.iter().map(|m| m.duration).sum();
        println!("{} migration(s) applied in {total:.1?}", applied.len());
    }
    Ok(())
}

pub fn revert(url: Option<&str>) -> Result<(), Failure> {
    if runner(url)?.revert_last(&mut print_event)?.is_none() {
        println!("nothing to revert: no migration is applied");
    }
    Ok(())
}

pub fn revert_to(url: Option<&str>, version: Option<&str>) -> Result<(), Failure> {
    let reverted = runner(url)?.revert_to(version, &mut print_event)?;
    println!("{} migration(s) reverted", reverted.len());
    Ok(())
}

pub fn redo(url: Option<&str>) -> Result<(), Failure> {
    if runner(url)?.redo(&mut print_event)?.is_none() {
        println!("nothing to redo: no migration is applied");
    }
    Ok(())
}

pub fn new(name: &str) -> Result<(), Failure> {
    let folder = MigrationSet::create_migration(migrations_dir(), name)?;
    println!(
        "created {}/up.sql and down.sql (write the change in them; until then `migrate run` refuses them)",
        folder.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The exit code `main` gives `result` of `migrate status`.
    fn exit_code_of(result: &Result<(), Failure>) -> u8 {
        match result {
            Ok(()) => 0,
            Err(error) => error.downcast_ref::<StatusFailure>().map_or(1, StatusFailure::exit_code),
        }
    }

    /// A URL on a loopback port nothing listens on.
    fn closed_port_url() -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        format!("postgres://nobody@127.0.0.1:{port}/nothing")
    }

    #[test]
    fn status_exits_2_when_it_cannot_tell_and_1_only_when_the_database_is_out_of_date() {
        assert_eq!(exit_code_of(&status(Some(&closed_port_url()))), 2);
        assert_eq!(exit_code_of(&dispatch(&["status", "--database-url"])), 2, "a URL left out is no answer either");
        assert_eq!(exit_code_of(&dispatch(&["new", "--database-url"])), 1, "other commands keep exit code 1");

        let db = dployr_testkit::empty_database();
        let out_of_date = status(Some(db.url()));
        assert_eq!(exit_code_of(&out_of_date), 1);
        let pending = out_of_date.as_ref().err().and_then(|error| error.downcast_ref::<StatusFailure>());
        assert!(
            matches!(pending, Some(StatusFailure::OutOfDate { pending: 1.., changed: 0, missing: 0 })),
            "{pending:?}"
        );
        run(Some(db.url())).unwrap();
        assert_eq!(exit_code_of(&status(Some(db.url()))), 0);
    }

    /// `--database-url $URL` unquoted splits a `key=value` connection
    /// string into words: the leftover ones are echoed, the password not.
    #[test]
    fn an_unknown_command_never_echoes_a_password() {
        let words = ["status", "port=1", "password=Pr0beS3cret", "postgres://u:UrlS3cret@h/db"];
        let error = dispatch(&["--database-url", "host=127.0.0.1"].into_iter().chain(words).collect::<Vec<_>>())
            .unwrap_err()
            .to_string();
        assert!(error.contains("unknown command `migrate status port=1 password=<redacted>"), "{error}");
        assert!(!error.contains("S3cret"), "{error}");
        // libpq takes `password = value` and a quoted value with spaces.
        for words in [
            &["status", "password", "=", "S3cret"][..],
            &["status", "password='two", "S3cret'"],
            &["status", "--url=postgres://app:S3cret@db/app"],
            &["status", "postgres://app:S3cret@db/password_store?sslmode=require&sslpassword=k"],
        ] {
            let error = dispatch(words).unwrap_err().to_string();
            assert!(!error.contains("S3cret"), "{error}");
        }
    }

    #[test]
    fn status_called_wrongly_exits_2_not_the_1_of_out_of_date() {
        for words in [
            &["status", "--verbose"][..],
            &["--verbose", "status"],
            &["status", "extra"],
            &["status", "--database-url="],
            &["--database-url=", "status"],
            // A blank value (an unset variable in a deploy script) is none:
            // libpq took it for its defaults and reached another database.
            &["status", "--database-url", ""],
            &["status", "--database-url", "   "],
            &["status", "--database-url=  "],
        ] {
            assert_eq!(exit_code_of(&dispatch(words)), 2, "migrate {}", words.join(" "));
        }
        assert_eq!(exit_code_of(&dispatch(&["revert", "--verbose"])), 1, "other commands keep exit code 1");
    }

    #[test]
    fn database_url_with_an_equals_sign_names_the_database_like_the_spaced_form() {
        let db = dployr_testkit::empty_database();
        let with_equals = format!("--database-url={}", db.url());
        let out_of_date = dispatch(&["status", &with_equals]);
        let failure = out_of_date.as_ref().err().and_then(|error| error.downcast_ref::<StatusFailure>());
        assert!(matches!(failure, Some(StatusFailure::OutOfDate { pending: 1.., .. })), "{out_of_date:?}");
        dispatch(&[&with_equals, "run"]).unwrap();
        assert_eq!(exit_code_of(&dispatch(&["status", "--database-url", db.url()])), 0);
    }
}
