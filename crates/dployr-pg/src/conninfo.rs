//! The libpq connection parameters that let a client notice a dead peer,
//! added to the database URL before the pool connects.
//!
//! Without them a pooled connection over TCP has no keepalive and no
//! `tcp_user_timeout`: a connection whose peer vanished (a dropped link, a
//! failed-over virtual IP, a stuck proxy) is not noticed while idle, and a
//! call blocked on it waits for the kernel's retransmission limit (about 15
//! minutes on Linux). libpq reads these parameters from the URL or the
//! `key=value` string, so they are added there, each only when the URL does
//! not set it already: an operator's URL always wins. libpq ignores them on
//! Unix-domain sockets. `tcp_user_timeout` needs libpq 12 or later.

use std::fmt::Write as _;
use std::time::Duration;

use dployr_domain::StoreError;

use crate::pool::within_limit;

/// The longest keepalive idle time and probe interval Linux takes, in
/// seconds (`MAX_TCP_KEEPIDLE`, `MAX_TCP_KEEPINTVL`): libpq's `setsockopt`
/// fails past it, and with it every connection.
pub const MAX_KEEPALIVE_SECS: u64 = 32_767;

/// The most unanswered keepalive probes Linux takes (`MAX_TCP_KEEPCNT`).
pub const MAX_KEEPALIVES_COUNT: u32 = 127;

/// TCP settings of every pooled connection (libpq connection parameters).
/// A parameter the database URL sets itself is left as the URL has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetworkConfig {
    /// libpq `keepalives`: send TCP keepalive probes on idle connections.
    /// Default on.
    pub keepalives: bool,
    /// libpq `keepalives_idle`: idle time before the first probe (whole
    /// seconds, at least 1, at most [`MAX_KEEPALIVE_SECS`]). Default 10 s.
    pub keepalives_idle: Duration,
    /// libpq `keepalives_interval`: time between unanswered probes (whole
    /// seconds, at least 1, at most [`MAX_KEEPALIVE_SECS`]). Default 5 s.
    pub keepalives_interval: Duration,
    /// libpq `keepalives_count`: unanswered probes before the connection is
    /// declared dead (at least 1, at most [`MAX_KEEPALIVES_COUNT`]).
    /// Default 3.
    pub keepalives_count: u32,
    /// libpq `tcp_user_timeout`: how long sent data may stay unacknowledged
    /// before the kernel closes the connection (Linux; at least 1 ms, at
    /// most `INT_MAX` ms); `None` keeps the system's (about 15 minutes).
    /// Default 25 s: idle + interval x count, so both mechanisms give up at
    /// the same time.
    pub tcp_user_timeout: Option<Duration>,
    /// libpq `connect_timeout`: how long establishing one connection may
    /// take (whole seconds, at least 2); `None` derives it from the pool's
    /// `connection_timeout`. Default `None`.
    pub connect_timeout: Option<Duration>,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            keepalives: true,
            keepalives_idle: Duration::from_secs(10),
            keepalives_interval: Duration::from_secs(5),
            keepalives_count: 3,
            tcp_user_timeout: Some(Duration::from_secs(25)),
            connect_timeout: None,
        }
    }
}

/// Whole seconds, rounded up, at least `min`.
fn seconds(duration: Duration, min: u64) -> u64 {
    // Saturating: `Duration::MAX` rounded up would overflow.
    let secs = duration.as_secs().saturating_add(u64::from(duration.subsec_nanos() > 0));
    secs.max(min)
}

impl NetworkConfig {
    /// Refuses, by name, a setting libpq or the kernel would refuse at every
    /// connection (`setsockopt(TCP_KEEPIDLE) failed: Invalid argument`,
    /// `invalid integer value`): the pool would otherwise open, then fail
    /// each connect as if the server were down. Values this crate rounds
    /// up are taken (a keepalive idle time or count of zero is sent as one);
    /// a `tcp_user_timeout` under 1 ms is not, because it would be sent as
    /// 0, which libpq reads as "the system's default" (about 15 minutes):
    /// `None` says that.
    pub(crate) fn check(&self) -> Result<(), StoreError> {
        let max_keepalive = Duration::from_secs(MAX_KEEPALIVE_SECS);
        for (field, value) in [
            ("network keepalives_idle", self.keepalives_idle),
            ("network keepalives_interval", self.keepalives_interval),
        ] {
            if seconds(value, 1) > MAX_KEEPALIVE_SECS {
                return Err(StoreError::invalid(
                    field,
                    format!("{value:?} is longer than {max_keepalive:?}, the kernel's limit"),
                ));
            }
        }
        if self.keepalives_count > MAX_KEEPALIVES_COUNT {
            return Err(StoreError::invalid(
                "network keepalives_count",
                format!("{} is more than {MAX_KEEPALIVES_COUNT}, the kernel's limit", self.keepalives_count),
            ));
        }
        // libpq reads both as a C `int` (milliseconds and seconds): the
        // pool's own limit for every timeout keeps them within it.
        if let Some(timeout) = self.tcp_user_timeout {
            within_limit("network tcp_user_timeout", timeout, Duration::from_millis(1))?;
        }
        if let Some(timeout) = self.connect_timeout {
            within_limit("network connect_timeout", timeout, Duration::ZERO)?;
        }
        Ok(())
    }

    /// The parameters to add, as (key, value) pairs, with `connection_timeout`
    /// as the fallback of `connect_timeout`.
    fn parameters(&self, connection_timeout: Duration) -> Vec<(&'static str, String)> {
        let connect_timeout = self.connect_timeout.unwrap_or(connection_timeout);
        // libpq treats 1 as 2 (a value of 1 would time out at once).
        let mut parameters = vec![("connect_timeout", seconds(connect_timeout, 2).to_string())];
        if !self.keepalives {
            parameters.push(("keepalives", "0".to_owned()));
            return parameters;
        }
        parameters.extend([
            ("keepalives", "1".to_owned()),
            ("keepalives_idle", seconds(self.keepalives_idle, 1).to_string()),
            ("keepalives_interval", seconds(self.keepalives_interval, 1).to_string()),
            ("keepalives_count", self.keepalives_count.max(1).to_string()),
        ]);
        if let Some(timeout) = self.tcp_user_timeout {
            parameters.push(("tcp_user_timeout", timeout.as_millis().to_string()));
        }
        parameters
    }
}

/// `database_url` with every parameter of `network` it does not set itself
/// added: to the query of a `postgres://` or `postgresql://` URL, or to
/// the end of a `key=value` string.
pub(crate) fn with_network_parameters(
    database_url: &str,
    network: &NetworkConfig,
    connection_timeout: Duration,
) -> String {
    let is_url = database_url.starts_with("postgres://") || database_url.starts_with("postgresql://");
    let present = if is_url { url_keys(database_url) } else { conninfo_keys(database_url) };
    let mut out = database_url.trim_end().to_owned();
    let mut first = is_url && !database_url.contains('?');
    // A query that ends in `?` or `&` (which libpq takes) needs no
    // separator before the first parameter: `?&` or `&&` it refuses
    // ("missing key/value separator").
    let mut open_query = is_url && (out.ends_with('?') || out.ends_with('&'));
    for (key, value) in network.parameters(connection_timeout) {
        if present.iter().any(|set| set == key) {
            continue;
        }
        // Values here are digits: no quoting or percent-encoding needed.
        let separator = match (is_url, first) {
            (true, _) if open_query => "",
            (true, true) => "?",
            (true, false) => "&",
            (false, _) if out.is_empty() => "",
            (false, _) => " ",
        };
        first = false;
        open_query = false;
        let _infallible = write!(out, "{separator}{key}={value}");
    }
    out
}

/// The server ports `database_url` names (libpq's default 5432, or
/// `PGPORT`, when it names none): a connection's socket is the new one
/// whose peer has one of them (see `deadline`). Empty if they cannot be read.
pub(crate) fn server_ports(database_url: &str) -> Vec<u16> {
    let mut ports: Vec<String> = Vec::new();
    if let Some(rest) = database_url.strip_prefix("postgresql://").or_else(|| database_url.strip_prefix("postgres://"))
    {
        let (before_query, query) = rest.split_once('?').unwrap_or((rest, ""));
        let authority = before_query.split('/').next().unwrap_or_default();
        let hosts = authority.rsplit_once('@').map_or(authority, |(_, hosts)| hosts);
        for host in hosts.split(',') {
            // `[::1]:5433`, `db:5433` or `db`.
            let port = host.rsplit_once(']').map_or(host, |(_, after)| after);
            if let Some((_, port)) = port.rsplit_once(':') {
                ports.push(port.to_owned());
            }
        }
        for pair in query.split('&') {
            if let Some(value) = pair.strip_prefix("port=") {
                ports.extend(value.split(',').map(str::to_owned));
            }
        }
    } else {
        for word in database_url.split_whitespace() {
            if let Some(value) = word.strip_prefix("port=") {
                ports.extend(value.trim_matches('\'').split(',').map(str::to_owned));
            }
        }
    }
    if ports.iter().all(String::is_empty) {
        ports = vec![std::env::var("PGPORT").unwrap_or_else(|_| "5432".to_owned())];
    }
    ports.iter().filter_map(|port| port.trim().parse().ok()).collect()
}

/// The parameter names in the query of a libpq URL.
fn url_keys(url: &str) -> Vec<String> {
    let Some((_, query)) = url.split_once('?') else { return Vec::new() };
    query.split('&').filter_map(|pair| pair.split('=').next()).map(str::to_owned).collect()
}

/// The keywords of a libpq `key=value` string (values may be single-quoted,
/// with `\` escaping a quote or a backslash).
fn conninfo_keys(conninfo: &str) -> Vec<String> {
    let mut keys = Vec::new();
    let mut chars = conninfo.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        if key.is_empty() {
            return keys;
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            // Malformed: libpq will say so when it connects.
            return keys;
        }
        keys.push(key);
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next_if_eq(&'\'').is_some() {
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        chars.next();
                    }
                    '\'' => break,
                    _ => {}
                }
            }
        } else {
            while chars.next_if(|c| !c.is_whitespace()).is_some() {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIVE: Duration = Duration::from_secs(5);

    #[test]
    fn a_url_whose_query_ends_open_gets_its_parameters_without_an_empty_one() {
        let network = NetworkConfig { keepalives: false, tcp_user_timeout: None, ..NetworkConfig::default() };
        for (url, expected) in [
            ("postgres://app@db/dployr?", "postgres://app@db/dployr?connect_timeout=5&keepalives=0"),
            (
                "postgres://app@db/dployr?sslmode=disable&",
                "postgres://app@db/dployr?sslmode=disable&connect_timeout=5&keepalives=0",
            ),
        ] {
            assert_eq!(with_network_parameters(url, &network, FIVE), expected);
        }
    }

    #[test]
    fn a_url_without_parameters_gets_all_of_them() {
        let url = with_network_parameters("postgres://app@db:5432/dployr", &NetworkConfig::default(), FIVE);
        assert_eq!(
            url,
            "postgres://app@db:5432/dployr?connect_timeout=5&keepalives=1&keepalives_idle=10\
             &keepalives_interval=5&keepalives_count=3&tcp_user_timeout=25000"
        );
    }

    #[test]
    fn parameters_the_url_sets_are_kept_as_they_are() {
        let url = with_network_parameters(
            "postgresql://app@db/dployr?sslmode=require&keepalives_idle=60&tcp_user_timeout=0",
            &NetworkConfig::default(),
            FIVE,
        );
        assert_eq!(
            url,
            "postgresql://app@db/dployr?sslmode=require&keepalives_idle=60&tcp_user_timeout=0\
             &connect_timeout=5&keepalives=1&keepalives_interval=5&keepalives_count=3"
        );
    }

    #[test]
    fn a_key_value_string_gets_them_appended_unless_set() {
        let conninfo = with_network_parameters(
            "host=db dbname='my db' password='it\\'s keepalives_idle=3' keepalives_count = 7",
            &NetworkConfig::default(),
            FIVE,
        );
        assert_eq!(
            conninfo,
            "host=db dbname='my db' password='it\\'s keepalives_idle=3' keepalives_count = 7 \
             connect_timeout=5 keepalives=1 keepalives_idle=10 keepalives_interval=5 tcp_user_timeout=25000"
        );
    }

    #[test]
    fn keepalives_off_adds_only_the_switch_and_the_connect_timeout() {
        let network = NetworkConfig { keepalives: false, ..NetworkConfig::default() };
        let url = with_network_parameters("postgres://db/x", &network, Duration::from_millis(300));
        assert_eq!(url, "postgres://db/x?connect_timeout=2&keepalives=0");
    }

    #[test]
    fn the_server_ports_of_a_url_or_a_conninfo_are_read() {
        assert_eq!(server_ports("postgres://app:pw@db:6432/x?sslmode=require"), vec![6432]);
        assert_eq!(server_ports("postgresql://h1:5433,[::1]:5434/x"), vec![5433, 5434]);
        assert_eq!(server_ports("postgres:///x?host=/run/postgresql&port=5439"), vec![5439]);
        assert_eq!(server_ports("host=db port=7000 dbname=x"), vec![7000]);
        let default = std::env::var("PGPORT").ok().and_then(|p| p.parse().ok()).unwrap_or(5432);
        assert_eq!(server_ports("postgres://db/x"), vec![default]);
    }

    #[test]
    fn an_empty_conninfo_gets_the_parameters_alone() {
        let network = NetworkConfig { tcp_user_timeout: None, ..NetworkConfig::default() };
        let conninfo = with_network_parameters("", &network, Duration::from_millis(2500));
        assert_eq!(
            conninfo,
            "connect_timeout=3 keepalives=1 keepalives_idle=10 keepalives_interval=5 keepalives_count=3"
        );
    }
}
