//! `cargo xtask migrate ...`: status, run, revert, redo and new, over the
//! `migrations/` folder as it is on disk now.

use std::fs;

use dployr_migrate::{MigrationEvent, MigrationRunner, MigrationSet, MigrationState};

use crate::{Failure, db, migrations_dir};

fn runner() -> Result<MigrationRunner, Failure> {
    let set = MigrationSet::from_dir(migrations_dir())?;
    Ok(MigrationRunner::new(db::database_url()?, set))
}

fn print_event(event: &MigrationEvent) {
    println!("{event}");
}

pub fn status() -> Result<(), Failure> {
    let lines = runner()?.status()?;
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
    if lines.iter().any(|l| matches!(l.state, MigrationState::MissingFromSource { .. })) {
        println!("MISSING: applied to the database but not in migrations/; `migrate run` will refuse to run.");
    }
    Ok(())
}

pub fn run() -> Result<(), Failure> {
    let applied = runner()?.run_pending(&mut print_event)?;
    if applied.is_empty() {
        println!("nothing to apply: the database is up to date");
    } else {
        let total: std::time::Duration = applied.iter().map(|m| m.duration).sum();
        println!("{} migration(s) applied in {total:.1?}", applied.len());
    }
    Ok(())
}

pub fn revert() -> Result<(), Failure> {
    if runner()?.revert_last(&mut print_event)?.is_none() {
        println!("nothing to revert: no migration is applied");
    }
    Ok(())
}

pub fn redo() -> Result<(), Failure> {
    if runner()?.redo(&mut print_event)?.is_none() {
        println!("nothing to redo: no migration is applied");
    }
    Ok(())
}

pub fn new(name: &str) -> Result<(), Failure> {
    let valid = !name.is_empty() && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if !valid {
        return Err(
            format!("migration name `{name}`: use lower-case letters, digits and `_` (e.g. add_avatar_url)").into()
        );
    }
    let dir = migrations_dir();
    let set = MigrationSet::from_dir(&dir)?;
    let next = set.iter().filter_map(|m| m.version().parse::<u32>().ok()).max().map_or(0, |n| n + 1);
    let folder = dir.join(format!("{next:03}_{name}"));
    fs::create_dir(&folder).map_err(|e| format!("creating {}: {e}", folder.display()))?;
    let up = format!(
        "-- {next:03}_{name}: describe the change here.\n\
         -- The file runs whole, in one transaction with its record in _migrations.\n\
         -- For CREATE INDEX CONCURRENTLY, add metadata.toml with `run_in_transaction = false`\n\
         -- and keep this file to that one statement.\n"
    );
    let down = format!("-- Reverts {next:03}_{name}: undo everything up.sql does.\n");
    fs::write(folder.join("up.sql"), up)?;
    fs::write(folder.join("down.sql"), down)?;
    println!("created {}/up.sql and down.sql", folder.display());
    Ok(())
}
