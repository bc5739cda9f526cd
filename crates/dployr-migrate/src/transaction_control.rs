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
//! of a SQL-standard function (`CREATE [OR REPLACE] FUNCTION|PROCEDURE ...
//! BEGIN ATOMIC ... END`), whose statements end with `;` at the top level,
//! is checked too: PostgreSQL refuses transaction control in such a body,
//! so every statement of it is read as a top-level one is, except `END`,
//! which there can only be the body's end (PostgreSQL's grammar takes
//! `BEGIN` and `END` as transaction statements only at the top level).
//! That reads `CASE ... END`, `AS end` or `AS case` inside a body right
//! without counting them, and a `BEGIN ATOMIC` that is not a body (outside
//! such a `CREATE`, inside parentheses) hides nothing.

use crate::sql_lexer::{Token, tokens};

/// The first transaction-control statement of `sql`, by its keywords
/// (`"COMMIT"`, `"START TRANSACTION"`, ...), if it holds one.
pub(crate) fn first_transaction_control(sql: &str) -> Option<&'static str> {
    // The next word is a statement's first (at the top level, or in a body).
    let mut at_start = true;
    // Inside the body of a SQL-standard function.
    let mut in_body = false;
    // A statement's first word that needs its second to tell (START, PREPARE).
    let mut pending: Option<&'static str> = None;
    // The first words of the top-level statement, for `CREATE [OR REPLACE]
    // FUNCTION|PROCEDURE`.
    let mut leading: Vec<String> = Vec::new();
    let mut previous_was_begin = false;
    let mut parens = 0_usize;
    for token in tokens(sql) {
        match token {
            Token::Semicolon => {
                // A START or PREPARE that ended here was not one.
                pending = None;
                at_start = true;
                previous_was_begin = false;
                if !in_body {
                    leading.clear();
                    parens = 0;
                }
            }
            Token::Other | Token::OpenParen | Token::CloseParen => {
                match token {
                    Token::OpenParen => parens += 1,
                    Token::CloseParen => parens = parens.saturating_sub(1),
                    _ => {}
                }
                at_start = false;
                pending = None;
                previous_was_begin = false;
            }
            Token::Word(word) => {
                let word = word.to_ascii_uppercase();
                if let Some(first) = pending.take()
                    && (word == "TRANSACTION" || word == "WORK")
                {
                    return Some(first);
                }
                let mut opens_body = false;
                if at_start {
                    match word.as_str() {
                        // In a body, only its own end.
                        "END" if in_body => in_body = false,
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
                } else if word == "ATOMIC"
                    && previous_was_begin
                    && !in_body
                    && parens == 0
                    && creates_a_routine(&leading)
                {
                    in_body = true;
                    opens_body = true;
                }
                if !in_body && leading.len() < 4 {
                    leading.push(word.clone());
                }
                at_start = opens_body;
                previous_was_begin = word == "BEGIN";
            }
        }
    }
    None
}

/// Whether a statement beginning with `leading` (upper case) is `CREATE
/// [OR REPLACE] FUNCTION` or `PROCEDURE`, the statements with a body.
fn creates_a_routine(leading: &[String]) -> bool {
    let routine = |word: Option<&String>| word.is_some_and(|w| w == "FUNCTION" || w == "PROCEDURE");
    leading.first().is_some_and(|w| w == "CREATE")
        && (routine(leading.get(1))
            || (leading.get(1).is_some_and(|w| w == "OR")
                && leading.get(2).is_some_and(|w| w == "REPLACE")
                && routine(leading.get(3))))
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
            // `AS end` and `AS case` inside a body are labels, not its end.
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1 AS end; SELECT 2 AS case; END; SELECT 1;",
            "CREATE OR REPLACE PROCEDURE p() LANGUAGE sql BEGIN ATOMIC INSERT INTO t VALUES (1); END",
        ] {
            assert_eq!(first_transaction_control(sql), None, "{sql}");
        }
    }

    #[test]
    fn what_follows_a_body_or_a_begin_atomic_that_is_none_is_still_checked() {
        for (sql, found) in [
            // `AS case` inside the body, which counting CASE ... END took for
            // a CASE that the body's END closed, hiding all that follows.
            (
                "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1 AS case; END;\nCREATE TABLE b (id int);\nCOMMIT;",
                "COMMIT",
            ),
            (
                "SELECT 1 AS case;\nCREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; END;\nCOMMIT;",
                "COMMIT",
            ),
            // Transaction control inside a body (PostgreSQL refuses it there).
            ("CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC COMMIT; SELECT 1; END;", "COMMIT"),
            ("CREATE PROCEDURE p() LANGUAGE sql BEGIN ATOMIC START TRANSACTION; END;", "START TRANSACTION"),
            // Not bodies: a column and a label named begin and atomic.
            ("CREATE TABLE begin (atomic int); CREATE TABLE x (); END;", "END"),
            ("SELECT begin atomic FROM t; END;", "END"),
            ("CREATE FUNCTION f(begin atomic) RETURNS int LANGUAGE sql AS 'SELECT 1'; END;", "END"),
            // An E'' string continued on the next line, and a vertical tab.
            ("CREATE TABLE b (id int);\nSELECT E'x'\n'\\'; SELECT ';\nCOMMIT;\nSELECT 1/0;\n-- '\n", "COMMIT"),
            ("SELECT 1;\x0bCOMMIT;", "COMMIT"),
        ] {
            assert_eq!(first_transaction_control(sql), Some(found), "{sql}");
        }
    }
}
