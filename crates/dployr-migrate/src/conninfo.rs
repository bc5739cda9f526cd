//! The libpq parameters every connection of the runner gets unless its
//! database URL sets them itself.
//!
//! Without `connect_timeout`, libpq waits for a server that accepts the
//! connection and never answers (a black-holed address, a stuck proxy)
//! for as long as the kernel keeps the socket: `MigrationRunner::status`,
//! and the data layer's health check that calls it, would hang with it.
//! The keepalives let a connection notice a server gone silent while a
//! long migration runs, in about 25 s instead of the system's two hours.
//!
//! libpq takes the last value of a parameter a connection string sets
//! twice, in the query of a `postgres://` URL as in a `key=value` string.
//! The defaults therefore go first and whatever the operator's URL sets
//! wins. The string is read with `dployr_domain::libpq`, as dployr-pg
//! reads its pool's URL.

use std::time::Duration;

use dployr_domain::libpq::{LibpqUrl, conninfo_pairs, has_url_scheme, url_keys};

/// libpq's `connect_timeout` is whole seconds, and it takes 1 as 2.
const MIN_CONNECT_TIMEOUT_SECS: u64 = 2;

/// TCP keepalives: the first probe after 10 s of silence, then one every
/// 5 s, the connection dead after 3 unanswered (as dployr-pg's pool).
/// libpq ignores them on Unix-domain sockets.
const KEEPALIVES: [(&str, &str); 4] =
    [("keepalives", "1"), ("keepalives_idle", "10"), ("keepalives_interval", "5"), ("keepalives_count", "3")];

/// `conninfo` (a `postgres://` or `postgresql://` URL, or a libpq
/// `key=value` string) with `connect_timeout` (rounded up to whole
/// seconds, at least 2) and [`KEEPALIVES`] put before its own parameters,
/// so that the ones it sets itself win. What libpq would take from
/// elsewhere is left to it: nothing is added to a connection that names a
/// service (`service=`, or `PGSERVICE` in the environment, whose file may
/// set any of them), nor `connect_timeout` when `PGCONNECT_TIMEOUT` is set
/// (a parameter in the string would hide either). `env` reads the
/// environment.
pub(crate) fn with_connection_defaults(
    conninfo: &str,
    connect_timeout: Duration,
    env: impl Fn(&str) -> Option<String>,
) -> String {
    let url = has_url_scheme(conninfo).then(|| LibpqUrl::parse(conninfo));
    let names_service = match &url {
        None => conninfo_pairs(conninfo).iter().any(|(key, _)| key == "service"),
        Some(Some(url)) => url.query.is_some_and(|query| url_keys(query).iter().any(|key| key == "service")),
        // A URL libpq refuses: it says why when the runner connects.
        Some(None) => return conninfo.to_owned(),
    };
    if names_service || env("PGSERVICE").is_some() {
        return conninfo.to_owned();
    }
    let secs = connect_timeout
        .as_secs()
        .saturating_add(u64::from(connect_timeout.subsec_nanos() > 0))
        .clamp(MIN_CONNECT_TIMEOUT_SECS, i32::MAX as u64)
        .to_string();
    let timeout = env("PGCONNECT_TIMEOUT").is_none().then_some(("connect_timeout", secs.as_str()));
    let pairs: Vec<String> =
        timeout.into_iter().chain(KEEPALIVES).map(|(key, value)| format!("{key}={value}")).collect();
    // Values here are digits and keys plain words: nothing to quote or encode.
    match url.flatten().map(|url| url.query) {
        None => format!("{} {conninfo}", pairs.join(" ")),
        Some(None) => format!("{conninfo}?{}", pairs.join("&")),
        Some(Some(own)) => {
            // The query runs to the end of the URL.
            let before = &conninfo[..conninfo.len() - own.len()];
            let separator = if own.is_empty() { "" } else { "&" };
            format!("{before}{}{separator}{own}", pairs.join("&"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEN: Duration = Duration::from_secs(10);

    /// With no libpq variable in the environment.
    fn with_connection_defaults_here(conninfo: &str, timeout: Duration) -> String {
        with_connection_defaults(conninfo, timeout, |_| None)
    }

    #[test]
    fn what_libpq_takes_from_a_service_or_the_environment_is_left_to_it() {
        for named in ["service=app", "host=db service = app", "postgres://db/app?sslmode=require&service=app"] {
            assert_eq!(with_connection_defaults(named, TEN, |_| None), named, "a service's file may set them");
        }
        let pgservice = |name: &str| (name == "PGSERVICE").then(|| "app".to_owned());
        assert_eq!(with_connection_defaults("postgres://db", TEN, pgservice), "postgres://db");
        let pgconnect_timeout = |name: &str| (name == "PGCONNECT_TIMEOUT").then(|| "60".to_owned());
        assert_eq!(
            with_connection_defaults("postgres://db", TEN, pgconnect_timeout),
            "postgres://db?keepalives=1&keepalives_idle=10&keepalives_interval=5&keepalives_count=3",
            "PGCONNECT_TIMEOUT stays in force"
        );
        // `service` as part of another word, or a value, is no service.
        assert!(
            with_connection_defaults("host=db application_name=myservice", TEN, |_| None).contains("connect_timeout")
        );
    }
    const DEFAULTS: &str =
        "connect_timeout=10&keepalives=1&keepalives_idle=10&keepalives_interval=5&keepalives_count=3";

    #[test]
    fn a_url_without_parameters_gets_the_defaults_as_its_query() {
        assert_eq!(
            with_connection_defaults_here("postgres://app@db:5432/app", TEN),
            format!("postgres://app@db:5432/app?{DEFAULTS}")
        );
        assert_eq!(with_connection_defaults_here("postgresql://db", TEN), format!("postgresql://db?{DEFAULTS}"));
    }

    #[test]
    fn a_url_s_own_parameters_come_after_the_defaults_so_they_win() {
        assert_eq!(
            with_connection_defaults_here("postgres://app@db/app?connect_timeout=3&sslmode=require", TEN),
            format!("postgres://app@db/app?{DEFAULTS}&connect_timeout=3&sslmode=require")
        );
        assert_eq!(
            with_connection_defaults_here("postgres://app@db/app?", TEN),
            format!("postgres://app@db/app?{DEFAULTS}")
        );
    }

    #[test]
    fn a_question_mark_in_the_password_does_not_start_the_query() {
        assert_eq!(
            with_connection_defaults_here("postgres://app:pa?ss@db/app", TEN),
            format!("postgres://app:pa?ss@db/app?{DEFAULTS}")
        );
        assert_eq!(
            with_connection_defaults_here("postgres://app:pa?ss@db/app?sslmode=disable", TEN),
            format!("postgres://app:pa?ss@db/app?{DEFAULTS}&sslmode=disable")
        );
    }

    #[test]
    fn a_key_value_string_gets_the_defaults_before_its_own() {
        assert_eq!(
            with_connection_defaults_here("host=db password='a ?b' connect_timeout=3", TEN),
            "connect_timeout=10 keepalives=1 keepalives_idle=10 keepalives_interval=5 keepalives_count=3 \
             host=db password='a ?b' connect_timeout=3"
        );
    }

    #[test]
    fn the_connect_timeout_is_whole_seconds_rounded_up_and_at_least_two() {
        let timeout_of = |timeout| {
            let url = with_connection_defaults_here("postgres://db", timeout);
            url.split(['?', '&']).find_map(|pair| pair.strip_prefix("connect_timeout=")).map(str::to_owned)
        };
        assert_eq!(timeout_of(Duration::from_millis(2500)).as_deref(), Some("3"));
        assert_eq!(timeout_of(Duration::ZERO).as_deref(), Some("2"));
        assert_eq!(timeout_of(Duration::MAX).as_deref(), Some("2147483647"));
    }
}
