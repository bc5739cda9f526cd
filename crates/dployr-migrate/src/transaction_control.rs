//! Finds a transaction-control statement (`BEGIN`, `COMMIT`, `ROLLBACK`,
//! ...) among a migration file's statements, before the file runs.
//!
//! A migration runs whole, inside the transaction that also records it.
//! PostgreSQL takes a `COMMIT` in the middle of the text as the end of that
//! transaction: what came before it stays committed, unrecorded, whatever
//! fails after it, and the next run meets it half done ("already exists").
//! So a transactional file that holds one is refused by name, unrun.
//!
//! The file is read as PostgreSQL's lexer reads it, as far as statement
//! boundaries go: `--` and nested `/* */` comments, `'...'` strings (with
//! `''`, and backslash escapes in `E'...'`), `"..."` identifiers and
//! `$tag$...$tag$` bodies are skipped, so a PL/pgSQL `BEGIN ... END` inside
//! a function body is never taken for one. The body of a SQL-standard
//! function (`BEGIN ATOMIC ... END`), whose statements end with `;` at the
//! top level, is followed to its `END`, counting `CASE ... END` inside it.

/// The first transaction-control statement of `sql`, by its keywords
/// (`"COMMIT"`, `"START TRANSACTION"`, ...), if it holds one.
pub(crate) fn first_transaction_control(sql: &str) -> Option<&'static str> {
    let bytes = sql.as_bytes();
    let mut i = 0;
    // The next word is a statement's first.
    let mut at_start = true;
    // A statement's first word that needs its second to tell (START, PREPARE).
    let mut pending: Option<&'static str> = None;
    let mut previous_word = String::new();
    let mut atomic_depth = 0_usize;
    let mut case_depth = 0_usize;
    while i < bytes.len() {
        let c = bytes[i];
        let next = bytes.get(i + 1).copied();
        match c {
            b'-' if next == Some(b'-') => {
                i = sql[i..].find('\n').map_or(bytes.len(), |at| i + at + 1);
                continue;
            }
            b'/' if next == Some(b'*') => {
                i = skip_block_comment(bytes, i);
                continue;
            }
            b'\'' => {
                let escapes = i > 0 && matches!(bytes[i - 1], b'E' | b'e') && !is_word_byte(byte_before(bytes, i - 1));
                i = skip_string(bytes, i, escapes);
                at_start = false;
                continue;
            }
            b'"' => {
                i = skip_quoted_identifier(bytes, i);
                at_start = false;
                continue;
            }
            b'$' if !is_word_byte(byte_before(bytes, i)) => {
                if let Some(end) = skip_dollar_quoted(sql, i) {
                    i = end;
                    at_start = false;
                    continue;
                }
                i += 1;
                continue;
            }
            b';' => {
                if atomic_depth == 0 {
                    // A START or PREPARE that ended here was not one.
                    pending = None;
                    at_start = true;
                    previous_word.clear();
                }
                i += 1;
                continue;
            }
            c if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 => {
                let start = i;
                while i < bytes.len() && (is_word_byte(bytes[i]) || bytes[i] >= 0x80) {
                    i += 1;
                }
                let word = sql[start..i].to_ascii_uppercase();
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
                continue;
            }
            c if c.is_ascii_whitespace() => {}
            _ => {
                at_start = false;
                pending = None;
            }
        }
        i += 1;
    }
    None
}

fn is_word_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'$'
}

/// The byte before `at`, or a space at the start.
fn byte_before(bytes: &[u8], at: usize) -> u8 {
    at.checked_sub(1).map_or(b' ', |before| bytes[before])
}

/// Past a `/* ... */` comment starting at `at` (they nest in PostgreSQL).
fn skip_block_comment(bytes: &[u8], at: usize) -> usize {
    let (mut i, mut depth) = (at + 2, 1_usize);
    while i < bytes.len() && depth > 0 {
        match (bytes[i], bytes.get(i + 1).copied()) {
            (b'/', Some(b'*')) => {
                depth += 1;
                i += 2;
            }
            (b'*', Some(b'/')) => {
                depth -= 1;
                i += 2;
            }
            _ => i += 1,
        }
    }
    i
}

/// Past a `'...'` string starting at `at` (`''` is a quote; with
/// `escapes`, as in `E'...'`, so is `\'`).
fn skip_string(bytes: &[u8], at: usize, escapes: bool) -> usize {
    let mut i = at + 1;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if escapes => i += 2,
            b'\'' if bytes.get(i + 1) == Some(&b'\'') => i += 2,
            b'\'' => return i + 1,
            _ => i += 1,
        }
    }
    i
}

/// Past a `"..."` identifier starting at `at` (`""` is a quote).
fn skip_quoted_identifier(bytes: &[u8], at: usize) -> usize {
    let mut i = at + 1;
    while i < bytes.len() {
        match bytes[i] {
            b'"' if bytes.get(i + 1) == Some(&b'"') => i += 2,
            b'"' => return i + 1,
            _ => i += 1,
        }
    }
    i
}

/// Past a `$tag$ ... $tag$` body starting at `at`, if a dollar quote opens
/// there (`$$` or `$name$`; `$1` is a parameter, not a quote).
fn skip_dollar_quoted(sql: &str, at: usize) -> Option<usize> {
    let rest = &sql[at + 1..];
    let tag_len = rest.find('$')?;
    let tag = &rest[..tag_len];
    let valid = tag.chars().next().is_none_or(|first| first.is_alphabetic() || first == '_')
        && tag.chars().all(|c| c.is_alphanumeric() || c == '_');
    if !valid {
        return None;
    }
    let delimiter = &sql[at..at + tag_len + 2];
    let body = at + delimiter.len();
    Some(sql[body..].find(delimiter).map_or(sql.len(), |end| body + end + delimiter.len()))
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
