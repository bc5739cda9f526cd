//! `cargo xtask migrate ...`: status, run, revert, redo and new, over the
//! `migrations/` folder as it is on disk now. `--database-url URL` (anywhere
//! after `migrate`) wins over `DATABASE_URL` and the development cluster.

use dployr_migrate::{MigrationEvent, MigrationRunner, MigrationSet, MigrationState};

use crate::{Failure, db, migrations_dir};

/// `migrate` and its words, with `--database-url URL` taken out.
pub fn dispatch(words: &[&str]) -> Result<(), Failure> {
    let mut url = None;
    let mut rest = Vec::new();
    let mut words = words.iter();
    while let Some(word) = words.next() {
        match *word {
            "--database-url" => url = Some((*words.next().ok_or("--database-url needs a URL")?).to_owned()),
            other => rest.push(other),
        }
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
        _ => Err(format!("unknown command `migrate {}`; `cargo xtask help` lists them", rest.join(" ")).into()),
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

/// Prints every migration's state; fails (exit 1) when one is pending,
/// changed or missing, so a deploy script can stop on it.
pub fn status(url: Option<&str>) -> Result<(), Failure> {
    let lines = runner(url)?.status()?;
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
        return Err(format!(
            "the database is not up to date with migrations/: {pending} pending, {changed} changed, {missing} missing"
        )
        .into());
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
