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
use dployr_domain::libpq::{LibpqUrl, conninfo_pairs, has_url_scheme, url_keys};

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
    let is_url = has_url_scheme(database_url);
    // Only what libpq reads as the query counts: a `?` in the password
    // (which libpq takes raw) does not start it.
    let query = if is_url { LibpqUrl::parse(database_url).and_then(|url| url.query) } else { None };
    let present: Vec<String> = if is_url {
        query.map(url_keys).unwrap_or_default()
    } else {
        conninfo_pairs(database_url).into_iter().map(|(key, _)| key).collect()
    };
    let mut out = database_url.trim_end().to_owned();
    let mut first = is_url && query.is_none();
    // A query that ends in `?` or `&` (which libpq takes) needs no
    // separator before the first parameter: `?&` or `&&` it refuses
    // ("missing key/value separator").
    let mut open_query = query.is_some() && (out.ends_with('?') || out.ends_with('&'));
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

/// libpq's compiled-in port (`DEF_PGPORT`): the port of a host whose entry
/// in a port list is empty, and of every host when neither the connection
/// string nor `PGPORT` sets `port`.
const LIBPQ_DEFAULT_PORT: u16 = 5432;

/// The server ports libpq connects to for `database_url`: a connection's
/// socket is the new one whose peer has one of them (see `deadline`). Empty
/// if they cannot be read.
pub(crate) fn server_ports(database_url: &str) -> Vec<u16> {
    // libpq's `port` setting, a comma-separated list with an entry per host
    // (or one for all): the last `port` the string sets, else `PGPORT`.
    let port_setting = if has_url_scheme(database_url) {
        let Some(url) = LibpqUrl::parse(database_url) else { return Vec::new() };
        let query_port = url.query.and_then(|query| query.split('&').rev().find_map(|pair| pair.strip_prefix("port=")));
        // The hosts' ports go in joined with commas, and only if that is not
        // empty: `h1,h2:5433` sets ",5433", `h1,h2` sets ",", `h1` nothing.
        // A `port` parameter replaces them.
        query_port.map(str::to_owned).or_else(|| Some(url.host_ports.join(",")).filter(|ports| !ports.is_empty()))
    } else {
        conninfo_pairs(database_url).into_iter().rev().find(|(key, _)| key == "port").map(|(_, value)| value)
    };
    let port_setting = port_setting.or_else(|| std::env::var("PGPORT").ok()).unwrap_or_default();
    let mut ports = Vec::new();
    // Each port once, in the order given, in linear time (a list of all
    // 65 535 ports is a string libpq takes).
    let mut seen = std::collections::HashSet::new();
    for entry in port_setting.split(',').map(str::trim) {
        // An empty entry is the compiled-in port, not `PGPORT`: libpq reads
        // the environment only when nothing sets `port` at all.
        let port = if entry.is_empty() { Some(LIBPQ_DEFAULT_PORT) } else { entry.parse().ok() };
        if let Some(port) = port.filter(|&port| seen.insert(port)) {
            ports.push(port);
        }
    }
    ports
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
        assert_eq!(server_ports("host=a,b,c,d port=7001,7000,7001,7002"), vec![7001, 7000, 7002]);
        let default = std::env::var("PGPORT").ok().and_then(|p| p.parse().ok()).unwrap_or(5432);
        assert_eq!(server_ports("postgres://db/x"), vec![default]);
    }

    /// Keepalives off and no `tcp_user_timeout`: two parameters to add.
    fn two_parameters() -> NetworkConfig {
        NetworkConfig { keepalives: false, tcp_user_timeout: None, ..NetworkConfig::default() }
    }

    #[test]
    fn a_question_mark_in_the_password_does_not_start_the_query() {
        let url = with_network_parameters("postgres://app:pa?ss@db/app", &two_parameters(), FIVE);
        assert_eq!(url, "postgres://app:pa?ss@db/app?connect_timeout=5&keepalives=0");
        let url = with_network_parameters("postgres://app:pa?ss&x=1@db:6000", &two_parameters(), FIVE);
        assert_eq!(url, "postgres://app:pa?ss&x=1@db:6000?connect_timeout=5&keepalives=0");
        assert_eq!(server_ports("postgres://u:p?x@db:6000/x"), vec![6000]);
        assert_eq!(server_ports("postgresql://u:p?port=7000@db:6000/x"), vec![6000]);
    }

    #[test]
    fn the_url_s_own_parameters_win_when_the_password_holds_a_question_mark() {
        let url = with_network_parameters(
            "postgres://app:pa?connect_timeout=9@db/app?keepalives_idle=60&keepalives=1",
            &NetworkConfig::default(),
            FIVE,
        );
        assert_eq!(
            url,
            "postgres://app:pa?connect_timeout=9@db/app?keepalives_idle=60&keepalives=1\
             &connect_timeout=5&keepalives_interval=5&keepalives_count=3&tcp_user_timeout=25000"
        );
    }

    #[test]
    fn a_host_without_a_port_in_a_list_of_hosts_is_on_libpq_s_compiled_in_port() {
        // libpq reads `h1,h2:5433` as port ",5433": an empty entry is its
        // compiled-in 5432, whatever PGPORT says (checked with psql).
        assert_eq!(server_ports("postgres://h1,h2:5433/db"), vec![5432, 5433]);
        assert_eq!(server_ports("postgres://h1:5433,h2/db"), vec![5433, 5432]);
        assert_eq!(server_ports("postgres://h1,h2/db"), vec![5432]);
        assert_eq!(server_ports("host=h1,h2 port=,5433"), vec![5432, 5433]);
        assert_eq!(server_ports("host=h1 port=''"), vec![5432]);
        assert_eq!(server_ports("postgres://h1/db?port="), vec![5432]);
    }

    #[test]
    fn the_port_parameter_replaces_the_ports_of_the_hosts() {
        assert_eq!(server_ports("postgres://h1:5433,h2:5434/db?port=6000"), vec![6000]);
        assert_eq!(server_ports("postgres://h1/db?port=5433&port=6000"), vec![6000]);
        assert_eq!(server_ports("host=h1 port=5433 port=6000"), vec![6000]);
    }

    #[test]
    fn a_key_value_port_is_read_with_spaces_around_the_equals_sign_and_quotes() {
        assert_eq!(server_ports("host=db port = 5433 dbname=x"), vec![5433]);
        assert_eq!(server_ports("host=db port= 5433"), vec![5433]);
        assert_eq!(server_ports("host=db port ='5433'"), vec![5433]);
        assert_eq!(server_ports("host=db password='port=1' port=5433"), vec![5433]);
    }

    #[test]
    fn an_escaped_space_in_an_unquoted_key_value_keeps_the_next_word_in_the_value() {
        // libpq reads `password=a\ connect_timeout=9` as the password
        // "a connect_timeout=9" (checked with psql): no connect_timeout set.
        let conninfo = with_network_parameters("password=a\\ connect_timeout=9", &two_parameters(), FIVE);
        assert_eq!(conninfo, "password=a\\ connect_timeout=9 connect_timeout=5 keepalives=0");
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
