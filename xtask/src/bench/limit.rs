//! The physical limit of a read: the very statement the store sent (SQL and
//! bound values, recorded by the pool), replayed by `pgbench -M prepared`
//! with as many clients as the store had threads, in the same run, so the
//! ratio between the two holds on a busy or slow machine.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use super::usage::Usage;
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

/// What pgbench reached with a statement: its throughput, and the CPU its
/// own process spent per transaction (its client side).
#[derive(Debug, Clone, Copy)]
pub struct Limit {
    pub per_sec: f64,
    pub cpu_per_op: Duration,
}

/// pgbench's throughput for `statement` with `clients` clients for `seconds`.
pub fn pgbench(
    bindir: &Path,
    database_url: &str,
    statement: &Recorded,
    clients: usize,
    seconds: Duration,
) -> Result<Limit, Failure> {
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
    let before = Usage::of_children()?;
    // The password through the environment, not the arguments, which every
    // user of the machine can read (as `cargo xtask db psql` does).
    match crate::db::split_password(database_url) {
        Some((without_password, password)) => command.arg(without_password).env("PGPASSWORD", password),
        None => command.arg(database_url),
    };
    let output = command.output()?;
    let spent = Usage::of_children()? - before;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(format!("pgbench failed: {}{}", stdout, String::from_utf8_lossy(&output.stderr)).into());
    }
    let (per_sec, transactions) = throughput(&stdout)?;
    Ok(Limit { per_sec, cpu_per_op: spent.cpu_per(transactions) })
}

/// The transactions per second and the transactions pgbench reports.
fn throughput(stdout: &str) -> Result<(f64, u64), Failure> {
    let per_sec = stdout
        .lines()
        .find_map(|line| line.strip_prefix("tps = ")?.split_whitespace().next()?.parse::<f64>().ok())
        .ok_or_else(|| format!("no tps in pgbench's output: {stdout}"))?;
    let transactions = stdout
        .lines()
        .find_map(|line| {
            line.strip_prefix("number of transactions actually processed: ")?.split('/').next()?.trim().parse().ok()
        })
        .ok_or_else(|| format!("no transaction count in pgbench's output: {stdout}"))?;
    Ok((per_sec, transactions))
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

    #[test]
    fn pgbench_output_gives_its_throughput_and_transaction_count() {
        // pgbench 15's report of a timed run (-T), as it prints it.
        let timed = "transaction type: /tmp/statement.sql\nscaling factor: 1\nquery mode: prepared\n\
                     number of clients: 16\nnumber of threads: 16\nmaximum number of tries: 1\n\
                     duration: 5 s\nnumber of transactions actually processed: 105797\n\
                     number of failed transactions: 0 (0.000%)\nlatency average = 0.754 ms\n\
                     initial connection time = 23.517 ms\ntps = 21222.047484 (without initial connection time)\n";
        assert_eq!(throughput(timed).unwrap(), (21222.047484, 105797));
        // A run with a transaction count (-t) prints "done/asked".
        let counted =
            "number of transactions actually processed: 1600/1600\ntps = 812.5 (without initial connection time)\n";
        assert_eq!(throughput(counted).unwrap(), (812.5, 1600));
        assert!(throughput("tps = 1.0 (without initial connection time)\n").is_err());
        assert!(throughput("number of transactions actually processed: 3\n").is_err());
    }
}
