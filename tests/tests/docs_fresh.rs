//! The documents a newcomer reads first stay true: every `cargo xtask`
//! subcommand (as `xtask/src/main.rs` dispatches them) is named in the
//! README's crate table and in the code map of `docs/ARCHITECTURE.md`, and
//! no README table cell breaks on a `|` inside backticks. (`docs/erd.md`
//! is kept fresh by the test of `cargo xtask erd`, in `xtask/src/erd.rs`.)

#![cfg(test)]

use std::path::Path;

fn read(relative: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|error| panic!("{}: {error}", path.display()))
}

/// The first word of every arm of the `match` in xtask's `main`, such as
/// `["db", "up"] => ...`: the subcommands, in order, without repeats.
fn xtask_subcommands() -> Vec<String> {
    let main = read("xtask/src/main.rs");
    let mut commands: Vec<String> = Vec::new();
    for line in main.lines() {
        let Some(arm) = line.trim_start().strip_prefix("[\"") else { continue };
        let Some((word, _)) = arm.split_once('"') else { continue };
        if line.contains("=>") && !commands.iter().any(|known| known == word) {
            commands.push(word.to_owned());
        }
    }
    commands
}

/// Whether `text` names `command` in backticks: `` `db `` in `` `db up|down` ``
/// counts, `` `demo `` in `` `demos` `` does not.
fn names(text: &str, command: &str) -> bool {
    text.match_indices(&format!("`{command}")).any(|(at, found)| {
        text[at + found.len()..].chars().next().is_some_and(|next| !next.is_alphanumeric() && next != '-')
    })
}

#[test]
fn xtask_dispatches_the_subcommands_this_test_expects_to_find() {
    let commands = xtask_subcommands();
    for expected in ["demo", "bench", "stress", "db", "migrate", "schema", "erd"] {
        assert!(commands.iter().any(|c| c == expected), "{expected} not parsed from main.rs: {commands:?}");
    }
}

#[test]
fn every_xtask_subcommand_is_in_the_readme_crate_table_and_the_architecture_code_map() {
    let readme = read("README.md");
    let row = readme.lines().find(|line| line.starts_with("| `xtask` |")).expect("README has an xtask row");
    let architecture = read("docs/ARCHITECTURE.md");
    let code_map = architecture
        .split("\n\n")
        .find(|paragraph| paragraph.starts_with("**`xtask`**"))
        .expect("ARCHITECTURE.md has an xtask paragraph");
    let mut missing = Vec::new();
    for command in xtask_subcommands() {
        if !names(row, &command) {
            missing.push(format!("README.md crate table: `{command}`"));
        }
        if !names(code_map, &command) {
            missing.push(format!("docs/ARCHITECTURE.md code map: `{command}`"));
        }
    }
    assert!(missing.is_empty(), "not named:\n{}", missing.join("\n"));
}

#[test]
fn no_readme_table_cell_holds_an_unescaped_pipe_in_backticks() {
    let readme = read("README.md");
    let mut broken = Vec::new();
    for line in readme.lines().filter(|line| line.starts_with('|')) {
        // The odd pieces between backticks are code spans.
        for code in line.split('`').skip(1).step_by(2) {
            if code.replace("\\|", "").contains('|') {
                broken.push(line);
            }
        }
    }
    assert!(broken.is_empty(), "write `\\|` in a table's code span:\n{}", broken.join("\n"));
}
