//! Reading libpq connection strings as libpq reads them: a `postgres://`
//! URL (its hosts' ports, where its parameters start) or a `key=value`
//! string (its pairs). Shared by the crates that add parameters to a
//! connection string (`dployr-pg`'s pool, `dployr-migrate`'s runner) or
//! read its ports, so that one reading of libpq's grammar serves them all.
//!
//! ```
//! use dployr_domain::libpq::{LibpqUrl, conninfo_pairs};
//!
//! // A `?` in the password does not start the parameters.
//! let url = LibpqUrl::parse("postgres://app:pa?ss@db:5433/app?sslmode=require").unwrap();
//! assert_eq!((url.hosts, url.host_ports, url.query), ("db:5433", vec!["5433"], Some("sslmode=require")));
//! assert_eq!(conninfo_pairs("host=db port = 5433"), [("host".into(), "db".into()), ("port".into(), "5433".into())]);
//! ```

/// Whether `conninfo` is a URL (`postgres://` or `postgresql://`), not a
/// `key=value` string.
pub fn has_url_scheme(conninfo: &str) -> bool {
    conninfo.starts_with("postgres://") || conninfo.starts_with("postgresql://")
}

/// The parts of a libpq URL this module reads, found where libpq's URI
/// parser (`conninfo_uri_parse_options` in fe-connect.c) finds them.
pub struct LibpqUrl<'a> {
    /// The hosts and their ports as written, between the user info and the
    /// path or parameters (still percent-encoded; empty for none).
    pub hosts: &'a str,
    /// The port written after each host, empty for a host without one.
    pub host_ports: Vec<&'a str>,
    /// What follows the `?` that starts the parameters, if one does.
    pub query: Option<&'a str>,
}

impl<'a> LibpqUrl<'a> {
    /// `None` if `url` has no `postgres://` or `postgresql://` scheme, or
    /// libpq would refuse its hosts (an unclosed `[`, or something other
    /// than `:`, `/`, `?` or `,` after a `]`).
    pub fn parse(url: &'a str) -> Option<Self> {
        let rest = url.strip_prefix("postgresql://").or_else(|| url.strip_prefix("postgres://"))?;
        // libpq looks for the `@` that ends the user info up to the first
        // `/` only, and takes the first one: a password may hold a raw `?`,
        // `:` or `,` (not a `/` or an `@`), so the hosts and the query are
        // looked for after it.
        let after_user_info = match rest.find(['@', '/']) {
            Some(at) if rest[at..].starts_with('@') => &rest[at + 1..],
            _ => rest,
        };
        let mut rest = after_user_info;
        let mut host_ports = Vec::new();
        loop {
            // `[IPv6]` (which holds `:`), or a name or address.
            let after_host = if let Some(bracketed) = rest.strip_prefix('[') {
                let after = &bracketed[bracketed.find(']')? + 1..];
                if !(after.is_empty() || after.starts_with([':', '/', '?', ','])) {
                    return None;
                }
                after
            } else {
                rest.find([':', '/', '?', ',']).map_or("", |end| &rest[end..])
            };
            let (port, after_port) = match after_host.strip_prefix(':') {
                Some(port) => port.split_at(port.find(['/', '?', ',']).unwrap_or(port.len())),
                None => ("", after_host),
            };
            host_ports.push(port);
            match after_port.strip_prefix(',') {
                Some(next_host) => rest = next_host,
                None => {
                    rest = after_port;
                    break;
                }
            }
        }
        // Then `/dbname`, which ends at the `?` of the parameters.
        let query = rest.split_once('?').map(|(_, query)| query);
        let hosts = &after_user_info[..after_user_info.len() - rest.len()];
        Some(Self { hosts, host_ports, query })
    }
}

/// The parameter names in the query of a libpq URL.
pub fn url_keys(query: &str) -> Vec<String> {
    query.split('&').filter_map(|pair| pair.split('=').next()).map(str::to_owned).collect()
}

/// Whether libpq's `conninfo_parse` takes `c` as whitespace (C `isspace`).
fn is_conninfo_space(c: char) -> bool {
    c.is_ascii_whitespace() || c == '\x0B'
}

/// The `(keyword, value)` pairs of a libpq `key=value` string, read as
/// libpq's `conninfo_parse` reads them: whitespace may surround `=`, a
/// value may be single-quoted, and `\` takes the next character as it is,
/// quoted or not (`password=a\ b` is one value). Stops at the first
/// malformed pair: libpq refuses the string when it connects.
pub fn conninfo_pairs(conninfo: &str) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    let mut chars = conninfo.chars().peekable();
    loop {
        while chars.next_if(|c| is_conninfo_space(*c)).is_some() {}
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !is_conninfo_space(*c)) {
            key.push(c);
        }
        if key.is_empty() {
            return pairs;
        }
        while chars.next_if(|c| is_conninfo_space(*c)).is_some() {}
        if chars.next() != Some('=') {
            return pairs;
        }
        while chars.next_if(|c| is_conninfo_space(*c)).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    // Unterminated: libpq refuses the whole string.
                    None => return pairs,
                    Some('\\') => value.extend(chars.next()),
                    Some('\'') => break,
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !is_conninfo_space(*c)) {
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
        }
        pairs.push((key, value));
    }
}

/// Whether libpq may connect `conninfo` to more than one server: a URL with
/// several hosts (`postgres://r1,r2/app`, or `r1%2Cr2`, which libpq
/// decodes before it splits), a `host` or `hostaddr` setting that lists
/// several (`host=r1,r2`, or `?host=r1%2Cr2` in a URL, whose values libpq
/// percent-decodes), or, when the string names no host, a `PGHOST` or
/// `PGHOSTADDR` that lists several. (A `service` entry is not read.)
///
/// ```
/// use dployr_domain::libpq::names_several_hosts;
///
/// assert!(names_several_hosts("postgres://app:p,w@r1:5432,r2:5432/app"));
/// assert!(names_several_hosts("postgres://app@r1%2Cr2/app"));
/// assert!(names_several_hosts("postgres:///app?host=r1%2cr2"));
/// assert!(names_several_hosts("host=r1,r2 dbname=app"));
/// assert!(!names_several_hosts("postgres://app:p,w@r1:5432/app?sslmode=require"));
/// assert!(!names_several_hosts("host=r1 dbname=app password='a,b'"));
/// ```
pub fn names_several_hosts(conninfo: &str) -> bool {
    let lists_several = |value: &str| value.contains(',') || value.to_ascii_lowercase().contains("%2c");
    let host_setting = |key: &str| key == "host" || key == "hostaddr";
    let (names_a_host, several) = if has_url_scheme(conninfo) {
        let Some(url) = LibpqUrl::parse(conninfo) else { return false };
        let settings: Vec<(&str, &str)> =
            url.query.map_or_else(Vec::new, |query| query.split('&').filter_map(|pair| pair.split_once('=')).collect());
        let several = url.host_ports.len() > 1
            || lists_several(url.hosts)
            || settings.iter().any(|(key, value)| host_setting(key) && lists_several(value));
        (!url.hosts.is_empty() || settings.iter().any(|(key, _)| host_setting(key)), several)
    } else {
        let pairs = conninfo_pairs(conninfo);
        let several = pairs.iter().any(|(key, value)| host_setting(key) && lists_several(value));
        (pairs.iter().any(|(key, _)| host_setting(key)), several)
    };
    several
        || (!names_a_host
            && ["PGHOST", "PGHOSTADDR"].iter().any(|var| std::env::var(var).is_ok_and(|value| lists_several(&value))))
}
