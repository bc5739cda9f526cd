//! Reads a migration file's text as PostgreSQL's lexer does, as far as the
//! runner needs: the words outside comments, strings, quoted identifiers
//! and dollar-quoted bodies, and the `;` that end statements.
//!
//! What it skips: `--` comments to the end of a line, `/* */` comments
//! (they nest in PostgreSQL), `'...'` strings (`''` is a quote; in
//! `E'...'` so is `\'`, also in the parts of an `E'...'` string continued
//! on the next line, as PostgreSQL joins them), `"..."` identifiers (`""`
//! is a quote) and `$tag$ ... $tag$` bodies. Strings are read as
//! `standard_conforming_strings = on` has them, which the runner sets for
//! its session (with it off, `'\'` would not end where this lexer ends it).
//! A vertical tab is whitespace, as PostgreSQL 16 and later read it (15
//! refuses it). Everything the runner decides about a file's
//! text (does it hold a statement, does it build an index concurrently,
//! does it end its own transaction) is decided over these tokens, so a
//! keyword in a comment or a string never counts, and a `/*` in a string
//! never hides what follows it.

/// One piece of SQL text; comments and whitespace are left out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Token<'a> {
    /// A keyword or unquoted identifier, as written.
    Word(&'a str),
    /// A `;`, the end of a statement at the top level.
    Semicolon,
    /// A `(`.
    OpenParen,
    /// A `)`.
    CloseParen,
    /// Anything else: a string, a quoted identifier, a dollar-quoted body,
    /// a number, a parameter (`$1`), an operator or punctuation.
    Other,
}

/// The tokens of `sql`, in order.
pub(crate) fn tokens(sql: &str) -> Tokens<'_> {
    Tokens { sql, at: 0 }
}

/// The iterator [`tokens`] returns.
pub(crate) struct Tokens<'a> {
    sql: &'a str,
    at: usize,
}

impl<'a> Iterator for Tokens<'a> {
    type Item = Token<'a>;

    fn next(&mut self) -> Option<Token<'a>> {
        let sql = self.sql;
        let bytes = sql.as_bytes();
        loop {
            let start = self.at;
            let c = *bytes.get(start)?;
            let next = bytes.get(start + 1).copied();
            let (end, token) = match c {
                b'-' if next == Some(b'-') => {
                    self.at = sql[start..].find('\n').map_or(bytes.len(), |at| start + at + 1);
                    continue;
                }
                b'/' if next == Some(b'*') => {
                    self.at = skip_block_comment(bytes, start);
                    continue;
                }
                c if c.is_ascii_whitespace() || c == VERTICAL_TAB => {
                    self.at = start + 1;
                    continue;
                }
                b';' => (start + 1, Token::Semicolon),
                b'(' => (start + 1, Token::OpenParen),
                b')' => (start + 1, Token::CloseParen),
                b'\'' => (skip_string(bytes, start, false), Token::Other),
                b'"' => (skip_quoted_identifier(bytes, start), Token::Other),
                // `$1` (a parameter) when no dollar quote opens here.
                b'$' => (skip_dollar_quoted(sql, start).unwrap_or_else(|| word_end(bytes, start + 1)), Token::Other),
                c if c.is_ascii_digit() => (word_end(bytes, start), Token::Other),
                c if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 => {
                    let end = word_end(bytes, start);
                    // `E'...'` is one string with backslash escapes.
                    if end == start + 1 && matches!(c, b'E' | b'e') && bytes.get(end) == Some(&b'\'') {
                        (skip_string(bytes, end, true), Token::Other)
                    } else {
                        (end, Token::Word(&sql[start..end]))
                    }
                }
                // ASCII punctuation: one byte, so `end` is a char boundary.
                _ => (start + 1, Token::Other),
            };
            self.at = end;
            return Some(token);
        }
    }
}

/// Whitespace to PostgreSQL 16 and later, not to `is_ascii_whitespace`.
const VERTICAL_TAB: u8 = 0x0b;

/// Past the word (or number) whose first byte is at `at`: letters, digits,
/// `_`, `$` and every byte of a non-ASCII character.
fn word_end(bytes: &[u8], at: usize) -> usize {
    let mut i = at;
    while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || matches!(bytes[i], b'_' | b'$') || bytes[i] >= 0x80) {
        i += 1;
    }
    i
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
    i.min(bytes.len())
}

/// Past a `'...'` string starting at `at` (`''` is a quote; with
/// `escapes`, as in `E'...'`, so is `\'`), and past the parts it is
/// continued with: PostgreSQL joins `'a'` and a `'b'` that follows it after
/// whitespace holding a line break (and `--` comments) into one string,
/// read as the first part is (in `E'a'\n'\''` the second part's `\'` is
/// a quote, not its end).
fn skip_string(bytes: &[u8], at: usize, escapes: bool) -> usize {
    let mut i = at + 1;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if escapes => i += 2,
            b'\'' if bytes.get(i + 1) == Some(&b'\'') => i += 2,
            b'\'' => match continued_at(bytes, i + 1) {
                Some(quote) => i = quote + 1,
                None => return i + 1,
            },
            _ => i += 1,
        }
    }
    bytes.len()
}

/// Where the string that ended just before `at` goes on: the opening quote
/// of a next part, if only whitespace and `--` comments holding at least one
/// line break come before it (PostgreSQL's `quotecontinue`).
fn continued_at(bytes: &[u8], mut at: usize) -> Option<usize> {
    let mut line_break = false;
    loop {
        match *bytes.get(at)? {
            b' ' | b'\t' | 0x0c | VERTICAL_TAB => at += 1,
            b'\n' | b'\r' => {
                line_break = true;
                at += 1;
            }
            b'-' if bytes.get(at + 1) == Some(&b'-') => {
                while at < bytes.len() && !matches!(bytes[at], b'\n' | b'\r') {
                    at += 1;
                }
            }
            b'\'' if line_break => return Some(at),
            _ => return None,
        }
    }
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
    bytes.len()
}

/// Past a `$tag$ ... $tag$` body starting at `at`, if a dollar quote opens
/// there (`$$` or `$name$`; `$1` is a parameter, not a quote).
fn skip_dollar_quoted(sql: &str, at: usize) -> Option<usize> {
    let rest = &sql[at + 1..];
    let tag_len = rest.find('$')?;
    let tag = &rest[..tag_len];
    // PostgreSQL's lexer: a letter, `_` or any non-ASCII character first,
    // then digits too (`$€$` is a tag; `$1` is not).
    let valid = tag.chars().next().is_none_or(|first| first.is_ascii_alphabetic() || first == '_' || !first.is_ascii())
        && tag.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || !c.is_ascii());
    if !valid {
        return None;
    }
    let delimiter = &sql[at..at + tag_len + 2];
    let body = at + delimiter.len();
    Some(sql[body..].find(delimiter).map_or(sql.len(), |end| body + end + delimiter.len()))
}

#[cfg(test)]
mod tests {
    use super::{Token, tokens};

    fn words(sql: &str) -> Vec<&str> {
        tokens(sql)
            .filter_map(|token| match token {
                Token::Word(word) => Some(word),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn comments_strings_identifiers_and_bodies_hold_no_words() {
        assert_eq!(words("SELECT 1 -- BEGIN\n/* a /* nested */ COMMIT */ FROM t"), ["SELECT", "FROM", "t"]);
        assert_eq!(words("SELECT 'it''s /* not', E'a\\' -- b', \"x\"\"y\" , $f$ END $f$, $$ $$ x"), ["SELECT", "x"]);
        assert_eq!(words("SELECT a$b, é1, $1, 2e5 ;"), ["SELECT", "a$b", "é1"]);
        assert_eq!(words("DO $€$ BEGIN COMMIT; END $€$; SELECT"), ["DO", "SELECT"]);
    }

    #[test]
    fn semicolons_end_statements_and_the_rest_is_other() {
        assert_eq!(
            tokens("a; 'x';$1 /* ; */").collect::<Vec<_>>(),
            [Token::Word("a"), Token::Semicolon, Token::Other, Token::Semicolon, Token::Other]
        );
        assert_eq!(
            tokens("f(x)").collect::<Vec<_>>(),
            [Token::Word("f"), Token::OpenParen, Token::Word("x"), Token::CloseParen]
        );
    }

    #[test]
    fn an_escape_string_continued_on_the_next_line_keeps_its_escapes() {
        // PostgreSQL reads `E'x'` + line break + `'\'; SELECT '` as one
        // string: the `\'` of the second part is a quote.
        assert_eq!(words("SELECT E'x'\n'\\'; COMMIT; '\n;"), ["SELECT"]);
        assert_eq!(words("SELECT E'x' -- note\n  -- more\n\t'\\'; COMMIT; ' AS y"), ["SELECT", "AS", "y"]);
        // No line break between them: two strings, the second a standard
        // one (PostgreSQL refuses the text).
        assert_eq!(words("SELECT E'x' '\\'; COMMIT; '"), ["SELECT", "COMMIT"]);
        // A standard string continued is still a standard one.
        assert_eq!(words("SELECT 'x'\n'\\'; COMMIT; --'"), ["SELECT", "COMMIT"]);
    }

    #[test]
    fn a_vertical_tab_is_whitespace() {
        assert_eq!(words(";\x0bCOMMIT;"), ["COMMIT"]);
    }

    #[test]
    fn text_cut_short_ends_the_tokens_without_a_panic() {
        for sql in ["'open", "\"open", "$tag$ open", "/* open /* ", "E'\\", "-- open", "é", "$", "$é$"] {
            let _ = tokens(sql).count();
        }
    }
}
