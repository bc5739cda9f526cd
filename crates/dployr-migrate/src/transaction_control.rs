//! Finds a transaction-control statement (`BEGIN`, `COMMIT`, `ROLLBACK`,
//! ...) among a migration file's statements, before the file runs.
//!
//! A migration runs whole, inside the transaction that also records it.
//! PostgreSQL takes a `COMMIT` in the middle of the text as the end of that
//! transaction: what came before it stays committed, unrecorded, whatever
//! fails after it, and the next run meets it half done ("already exists").
//! So a transactional file that holds one is refused by name, unrun.
//!
//! The file is read through [`crate::sql_lexer`], which skips comments,
//! strings, quoted identifiers and `$tag$...$tag$` bodies, so a PL/pgSQL
//! `BEGIN ... END` inside a function body is never taken for one. The body
//! of a SQL-standard function (`BEGIN ATOMIC ... END`), whose statements
//! end with `;` at the top level, is followed to its `END`, counting
//! `CASE ... END` inside it.

use crate::sql_lexer::{Token, tokens};

/// The first transaction-control statement of `sql`, by its keywords
/// (`"COMMIT"`, `"START TRANSACTION"`, ...), if it holds one.
pub(crate) fn first_transaction_control(sql: &str) -> Option<&'static str> {
    // The next word is a statement's first.
    let mut at_start = true;
    // A statement's first word that needs its second to tell (START, PREPARE).
    let mut pending: Option<&'static str> = None;
    let mut previous_word = String::new();
    let mut atomic_depth = 0_usize;
    let mut case_depth = 0_usize;
    for token in tokens(sql) {
        match token {
            Token::Semicolon => {
                if atomic_depth == 0 {
                    // A START or PREPARE that ended here was not one.
                    pending = None;
                    at_start = true;
                    previous_word.clear();
                }
            }
            Token::Other => {
                at_start = false;
                pending = None;
            }
            Token::Word(word) => {
                let word = word.to_ascii_uppercase();
                if let Some(first) = pending.take()
                    && (word == "TRANSACTION" || word == "WORK")
                {
                    return Some(first);
                }
                if at_start && atomic_depth == 0 {
                    match word.as_str() {
                        "BEGIN" => return Some("BEGIN"),
                        "COMMIT" => return Some("COMMIT"),
                        "END" => return Some("END"),
                        "ROLLBACK" => return Some("ROLLBACK"),
                        "ABORT" => return Some("ABORT"),
                        "SAVEPOINT" => return Some("SAVEPOINT"),
                        "RELEASE" => return Some("RELEASE"),
                        "START" => pending = Some("START TRANSACTION"),
                        "PREPARE" => pending = Some("PREPARE TRANSACTION"),
                        _ => {}
                    }
                } else {
                    match word.as_str() {
                        "ATOMIC" if previous_word == "BEGIN" => atomic_depth += 1,
                        "CASE" => case_depth += 1,
                        "END" if case_depth > 0 => case_depth -= 1,
                        "END" if atomic_depth > 0 => atomic_depth -= 1,
                        _ => {}
                    }
                }
                at_start = false;
                previous_word = word;
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::first_transaction_control;

    #[test]
    fn transaction_control_at_the_top_level_is_found() {
        for (sql, found) in [
            ("BEGIN; CREATE TABLE a (id int); COMMIT;", "BEGIN"),
            ("CREATE TABLE a (id int);\ncommit;", "COMMIT"),
            ("create table a (id int); End", "END"),
            ("CREATE TABLE a (id int); ROLLBACK", "ROLLBACK"),
            ("SELECT 1; start transaction; SELECT 2", "START TRANSACTION"),
            ("SELECT 1;\n  -- a comment\n  SAVEPOINT s", "SAVEPOINT"),
            ("/* lead */ abort;", "ABORT"),
            ("PREPARE TRANSACTION 'x'", "PREPARE TRANSACTION"),
        ] {
            assert_eq!(first_transaction_control(sql), Some(found), "{sql}");
        }
    }

    #[test]
    fn bodies_strings_comments_and_other_statements_are_not_taken_for_it() {
        for sql in [
            "CREATE FUNCTION f() RETURNS trigger LANGUAGE plpgsql AS $$\nBEGIN\n  RETURN NEW;\nEND;\n$$;",
            "DO $body$ BEGIN PERFORM 1; COMMIT; END $body$;",
            "CREATE TABLE a (note text DEFAULT 'x; COMMIT; y');",
            "CREATE TABLE a (note text DEFAULT E'it\\'s; COMMIT');",
            "CREATE TABLE \"begin\" (id int); -- COMMIT;\n/* ROLLBACK; /* nested */ END; */ SELECT 1;",
            "CREATE FUNCTION g(a int) RETURNS int LANGUAGE sql BEGIN ATOMIC\n  SELECT CASE WHEN a > 0 THEN 1 ELSE 0 END;\n  SELECT a;\nEND;\nSELECT 1;",
            "PREPARE q AS SELECT $1::int; EXECUTE q(1);",
            "SELECT 1 AS start; CREATE TABLE ends (id int);",
            "SELECT $1 + $2;",
        ] {
            assert_eq!(first_transaction_control(sql), None, "{sql}");
        }
    }
}
