//! The physical limit of a read: the very statement the store sent (SQL and
//! bound values, recorded by the pool), replayed by `pgbench -M prepared`
//! with as many clients as the store had threads, in the same run, so the
//! ratio between the two holds on a busy or slow machine.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::Failure;

/// A recorded statement: diesel's text, `SQL -- binds: [v1, v2, ...]`.
pub struct Recorded {
    pub sql: String,
    pub binds: Vec<String>,
}

impl Recorded {
    /// Splits diesel's debug text into the SQL and its bound values.
    pub fn parse(text: &str) -> Result<Self, Failure> {
        let (sql, binds) = text.rsplit_once(" -- binds: ").ok_or("a recorded statement without its binds")?;
        let binds = binds.trim().strip_prefix('[').and_then(|b| b.strip_suffix(']')).ok_or("unexpected binds")?;
        Ok(Self { sql: sql.to_owned(), binds: split_debug_list(binds)? })
    }
}

/// The items of a Rust `Debug` list of strings and numbers, as plain text.
fn split_debug_list(list: &str) -> Result<Vec<String>, Failure> {
    let mut items = Vec::new();
    let mut chars = list.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ' ' || *c == ',') {
            chars.next();
        }
        let Some(first) = chars.peek().copied() else { return Ok(items) };
        let mut item = String::new();
        if first == '"' {
            chars.next();
            loop {
                match chars.next().ok_or("an unterminated string bind")? {
                    '\\' => item.push(chars.next().ok_or("a dangling escape")?),
                    '"' => break,
                    c => item.push(c),
                }
            }
        } else {
            while let Some(c) = chars.peek().copied().filter(|c| *c != ',') {
                item.push(c);
                chars.next();
            }
            let item_trimmed = item.trim().to_owned();
            if item_trimmed.starts_with("Some(") || item_trimmed == "None" || item_trimmed.starts_with('[') {
                return Err(format!("bind {item_trimmed} is not a plain value").into());
            }
            item = item_trimmed;
        }
        items.push(item);
    }
}

/// pgbench's throughput for `statement` with `clients` clients for `seconds`.
pub fn pgbench(
    bindir: &Path,
    database_url: &str,
    statement: &Recorded,
    clients: usize,
    seconds: Duration,
) -> Result<f64, Failure> {
    // pgbench variables: $1 -> :p1. Highest first, so $12 is not read as $1.
    // pgbench cannot define an empty variable: an empty text bind becomes ''.
    let mut sql = statement.sql.clone();
    for (n, value) in statement.binds.iter().enumerate().rev() {
        let with = if value.is_empty() { "''".to_owned() } else { format!(":p{}", n + 1) };
        sql = sql.replace(&format!("${}", n + 1), &with);
    }
    let dir = tempfile::tempdir()?;
    let script = dir.path().join("statement.sql");
    std::fs::write(&script, format!("{sql};\n"))?;
    let mut command = Command::new(bindir.join("pgbench"));
    command
        .args(["-n", "-M", "prepared", "-c", &clients.to_string(), "-j", &clients.to_string()])
        .args(["-T", &seconds.as_secs().max(1).to_string()])
        .arg("-f")
        .arg(&script);
    for (n, value) in statement.binds.iter().enumerate().filter(|(_, value)| !value.is_empty()) {
        command.arg("-D").arg(format!("p{}={value}", n + 1));
    }
    let output = command.arg(database_url).output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(format!("pgbench failed: {}{}", stdout, String::from_utf8_lossy(&output.stderr)).into());
    }
    stdout
        .lines()
        .find_map(|line| line.strip_prefix("tps = ")?.split_whitespace().next()?.parse::<f64>().ok())
        .ok_or_else(|| format!("no tps in pgbench's output: {stdout}").into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diesel_debug_text_splits_into_sql_and_plain_binds() {
        let recorded =
            Recorded::parse(r#"SELECT 1 FROM t WHERE a = $1 AND b = $2 LIMIT $3 -- binds: ["x, \"y\"", 2, -1]"#)
                .unwrap();
        assert_eq!(recorded.sql, "SELECT 1 FROM t WHERE a = $1 AND b = $2 LIMIT $3");
        assert_eq!(recorded.binds, [r#"x, "y""#, "2", "-1"]);
        assert!(Recorded::parse("SELECT 1 -- binds: [Some(1)]").is_err());
    }
}
