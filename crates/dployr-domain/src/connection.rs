//! What a failed connection attempt means, told from libpq's message, with
//! every secret of the connection string taken out.
//!
//! It exists for two reasons. libpq echoes parts of a malformed connection
//! string in its messages (`missing "=" after "postgresql:/app:secret@host"
//! in connection info string`, `invalid percent-encoded token: "Pw%zz..."`),
//! so a message must never leave the data layer unredacted, neither in an
//! error's text nor in its `source()` chain. And an orchestrator acts on the
//! kind of error: a wrong password, a missing database or role and a
//! malformed URL never heal by retrying, so they are
//! [`StoreError::Configuration`] at once; only a refused, unreachable or
//! timed-out server is [`StoreError::Unavailable`].
//!
//! The PostgreSQL crates (`dployr-pg`, `dployr-migrate`) classify their
//! connection errors here; this module only reads strings and does no I/O.
//! Server-side reasons (authentication, missing database) arrive in the
//! server's `lc_messages` language: the classification below knows the
//! English texts, and an unknown text is `Unavailable` with the reason kept.

use std::borrow::Cow;
use std::fmt;

use aho_corasick::{AhoCorasick, AhoCorasickKind, MatchKind};

use crate::StoreError;
use crate::libpq::LibpqUrl;

/// What stands in for a secret in a message.
pub const REDACTED: &str = "<redacted>";

/// Why a connection could not be made, as a caller acts on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectFailureKind {
    /// The connection string is malformed, or names a host that does not
    /// exist: fix the setting.
    MalformedUrl,
    /// The server refused the credentials (wrong password, no `pg_hba.conf`
    /// entry, a role that may not log in).
    Authentication,
    /// The database or role named does not exist.
    Missing,
    /// The connection's security settings cannot be met: a certificate or
    /// key file is missing or unreadable, the server's certificate does not
    /// verify, or the server does not offer the TLS, GSSAPI encryption or
    /// channel binding the URL requires. Fix the setting (or the server's).
    Security,
    /// The server refused the TCP connection (nothing listens there).
    Refused,
    /// The host or network could not be reached (or a name could not be
    /// resolved for now).
    Unreachable,
    /// No answer within the time allowed.
    TimedOut,
    /// The server answered but does not take connections now (starting,
    /// shutting down, in recovery, too many clients, or too many connections
    /// for the role or the database).
    NotReady,
    /// Any other reason libpq gave.
    Other,
}

impl ConnectFailureKind {
    /// Whether retrying later may succeed: refused, unreachable, timed out,
    /// not ready, or an unknown reason. Never for a malformed URL, refused
    /// credentials, a missing database or security settings that cannot be
    /// met.
    pub fn is_transient(self) -> bool {
        !matches!(self, Self::MalformedUrl | Self::Authentication | Self::Missing | Self::Security)
    }

    fn describe(self) -> &'static str {
        match self {
            Self::MalformedUrl => "the connection string is malformed or names an unknown host",
            Self::Authentication => "the server refused the credentials",
            Self::Missing => "the database or role does not exist",
            Self::Security => "the connection's TLS, GSSAPI or channel binding settings cannot be met",
            Self::Refused => "the server refused the connection (is PostgreSQL running and listening there?)",
            Self::Unreachable => "the server could not be reached",
            Self::TimedOut => "the server did not answer in time",
            Self::NotReady => "the server does not accept connections now",
            Self::Other => "the connection failed",
        }
    }
}

/// A failed connection attempt: its kind and libpq's reason, redacted.
/// Holds no secret, so its `Display` and `Debug` may be logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectFailure {
    kind: ConnectFailureKind,
    reason: String,
}

impl ConnectFailure {
    /// Classifies libpq's `message` about a connection to `conninfo` (a URL
    /// or a `key=value` string), and keeps the message with every secret of
    /// `conninfo` replaced by [`REDACTED`].
    ///
    /// ```
    /// use dployr_domain::{ConnectFailure, ConnectFailureKind};
    ///
    /// let url = "postgresql:/app:AppPw-9x@host/app";
    /// let failure = ConnectFailure::classify(
    ///     r#"missing "=" after "postgresql:/app:AppPw-9x@host/app" in connection info string"#,
    ///     url,
    /// );
    /// assert_eq!(failure.kind(), ConnectFailureKind::MalformedUrl);
    /// assert!(!failure.to_string().contains("AppPw-9x"));
    /// ```
    pub fn classify(message: &str, conninfo: &str) -> Self {
        let kind = kind_of(message);
        Self { kind, reason: one_line(&redact(message, conninfo)) }
    }

    /// A failure of `kind` with a reason that holds no secret.
    pub fn new(kind: ConnectFailureKind, reason: impl Into<String>) -> Self {
        Self { kind, reason: reason.into() }
    }

    /// Why, as a caller acts on it.
    pub fn kind(&self) -> ConnectFailureKind {
        self.kind
    }

    /// libpq's reason, redacted, on one line.
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// The shared error: [`StoreError::Configuration`] naming `setting` for a
    /// malformed URL, refused credentials or a missing database or role;
    /// [`StoreError::Unavailable`] otherwise. Both carry the redacted reason.
    ///
    /// ```
    /// use dployr_domain::{ConnectFailure, StoreError};
    ///
    /// let failure = ConnectFailure::classify(
    ///     r#"connection to server at "10.0.0.1", port 5432 failed: FATAL:  database "app" does not exist"#,
    ///     "postgres://app:pw@10.0.0.1/app",
    /// );
    /// let error = failure.into_store_error("DATABASE_URL");
    /// assert!(matches!(error, StoreError::Configuration { setting: "DATABASE_URL", .. }));
    /// ```
    pub fn into_store_error(self, setting: &'static str) -> StoreError {
        let reason: Cow<'static, str> = format!("{}: {}", self.kind.describe(), self.reason).into();
        if self.kind.is_transient() {
            StoreError::Unavailable { reason: format!("{setting}: {reason}").into(), source: None }
        } else {
            StoreError::Configuration { setting, reason }
        }
    }
}

impl fmt::Display for ConnectFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind.describe(), self.reason)
    }
}

impl std::error::Error for ConnectFailure {}

/// libpq's messages span lines (`connection to server ... failed: ...\n\tIs
/// the server running ...?`); an error reason is one line.
fn one_line(message: &str) -> String {
    message.split('\n').map(str::trim).filter(|line| !line.is_empty()).collect::<Vec<_>>().join(" ")
}

/// The kind of a libpq (or server) connection message.
fn kind_of(message: &str) -> ConnectFailureKind {
    use ConnectFailureKind::{
        Authentication, MalformedUrl, Missing, NotReady, Other, Refused, Security, TimedOut, Unreachable,
    };
    let has = |needle: &str| message.contains(needle);
    // Server answers first: they quote parts of the message that could look
    // like the network texts below.
    if has("does not exist") && (has("database \"") || has("role \"")) {
        return Missing;
    }
    // libpq's refusal of an option's value (a port list's entry past the
    // first host's, say): it comes after the first host's own failure
    // ("Connection refused"), and never heals however long one waits.
    if has("for connection option") {
        return MalformedUrl;
    }
    // libpq's own refusals of the URL's security settings: the same at
    // every attempt, so not an outage to wait out. (A TLS handshake cut
    // off midway, "SSL SYSCALL error", stays transient.)
    if has("server does not support SSL")
        || has("root certificate file")
        || has("could not open certificate file")
        || has("could not read certificate file")
        || has("private key file")
        || has("certificate present, but not private key")
        || has("certificate verify failed")
        || has("does not match host name")
        || has("GSSAPI encryption required")
        || has("channel binding required")
        || has("channel binding is required")
    {
        return Security;
    }
    if has("authentication failed")
        || has("no password supplied")
        || has("no pg_hba.conf entry")
        || has("is not permitted to log in")
        || has("permission denied for database")
        || has("password is required")
    {
        return Authentication;
    }
    if has("the database system is")
        || has("too many clients")
        // A role's or a database's CONNECTION LIMIT; PgBouncer's max_client_conn.
        || has("too many connections for")
        || has("no more connections allowed")
        || has("remaining connection slots")
        || has("not yet accepting connections")
    {
        return NotReady;
    }
    if has("Temporary failure in name resolution") {
        return Unreachable;
    }
    if has("could not translate host name")
        || has("Name or service not known")
        || has("nodename nor servname")
        || has("No address associated with hostname")
    {
        return MalformedUrl;
    }
    if has("Connection refused") {
        return Refused;
    }
    if has("timeout expired") || has("timed out") {
        return TimedOut;
    }
    if has("No route to host") || has("Network is unreachable") || has("Host is unreachable") {
        return Unreachable;
    }
    if has("connection info string")
        || has("URI")
        || has("invalid ")
        || has("unterminated quoted string")
        || has("unexpected spaces")
        || has("end of string reached")
        || has("nul byte")
        || has("forbidden value")
        // A TCP setting of the URL the kernel refuses (`keepalives_idle`
        // past 32 767 s, say): every connection fails the same way.
        || has("setsockopt(")
    {
        return MalformedUrl;
    }
    Other
}

/// `text` with every secret of `conninfo` replaced by [`REDACTED`]: the
/// password of a URL (the text between the user's `:` and the `@`, read the
/// way a malformed URL may be read too), the value of every option whose
/// name holds `password` (`password`, `sslpassword`, in any case, and
/// percent-encoded in a URL's query, as libpq decodes it) in a URL's query
/// or a `key=value` string, in raw and percent-decoded form; every quoted
/// fragment libpq echoed that overlaps a secret or holds an `@` (libpq
/// echoes a malformed string whole or cut at a place of its choosing, and
/// a secret may itself hold a `"`); and, in a message (or a line of one:
/// libpq writes a line per host it tried) saying libpq could not parse the
/// string, every fragment of it that it quotes but an option's name (a
/// password written without its quotes, `password=two words`, is read as
/// an option named `words`). A fragment whose parts between `,` one is a
/// secret's goes too (libpq joins a URL's hosts before it decodes them),
/// and so does, in a URL whose password holds a raw `/`, the port libpq
/// reads from the password's head where it prints it (`port 12`,
/// `.s.PGSQL.12`). A secret shorter than 4 bytes is replaced only as a word
/// of its own, not inside a host name or another word.
///
/// ```
/// use dployr_domain::connection::redact;
///
/// let url = "postgres://app:Pw%zzSecret@db/app";
/// let message = r#"invalid percent-encoded token: "Pw%zzSecret""#;
/// assert_eq!(redact(message, url), r#"invalid percent-encoded token: "<redacted>""#);
/// ```
pub fn redact(text: &str, conninfo: &str) -> String {
    let ranges = secret_ranges(conninfo);
    let mut secrets: Vec<String> = Vec::new();
    for range in &ranges {
        let raw = &conninfo[range.clone()];
        if !raw.is_empty() {
            secrets.push(raw.to_owned());
            // As libpq reads it: percent-decoded in a URL, with each `\`
            // taking the next character in a key=value string.
            for read in [percent_decoded(raw), unescaped(raw)] {
                if read != raw && !read.is_empty() {
                    secrets.push(read);
                }
            }
        }
    }
    // A string libpq could not parse: what it quotes of it is garbage
    // that may be anything, a pasted password included. (Its other
    // messages quote a host, a port, a file or a server's answer.) Told
    // line by line too: with several hosts libpq writes one line per host
    // it tried, and a port list's bad entry (the tail of a password written
    // without its quotes, `password=Head port=1,Tail`) comes on a line of
    // its own after a host's "connection to server" line.
    let unparsed_message = unparsed(text);
    let unparsed_lines: Vec<(usize, bool)> = text
        .split_inclusive('\n')
        .scan(0, |start, line| {
            let line_start = *start;
            *start += line.len();
            Some((line_start, unparsed_message || unparsed(line)))
        })
        .collect();
    let unparsed_at = |offset: usize| {
        unparsed_lines.iter().rev().find(|(start, _)| *start <= offset).is_some_and(|&(_, unparsed)| unparsed)
    };
    // Each once (the replacement takes the longest at each place itself).
    secrets.sort_unstable();
    secrets.dedup();
    // Quoted fragments first, on libpq's own text: a short secret (the
    // `p` of `app:p@ss...` read up to the first `@`) replaced first would
    // change a fragment into one no longer found in the string. A secret
    // with a `"` in it is taken whole by the fragments' own rule.
    let quotes = text.matches('"').count();
    let quoted = if text.len() > MAX_SEARCHED_MESSAGE_BYTES
        || quotes > MAX_SEARCHED_QUOTES
        || conninfo.len() > MAX_SEARCHED_CONNINFO_BYTES
    {
        redact_all_quoted(text)
    } else {
        redact_quoted(text, conninfo, &ranges, &secrets, unparsed_at)
    };
    // A raw `/` in a URL's password: libpq reads no user info then, and the
    // password's head as a port, which it prints without quotes ("port
    // 1234", ".s.PGSQL.1234"), where no quoted fragment's rule reaches.
    // Replaced in those two spellings only (a short number alone is in
    // every message), and kept out of the fragments' rules, where "port"
    // would become a piece of a secret.
    for port in ports_read_from_user_info(conninfo) {
        secrets.push(format!("port {port}"));
        secrets.push(format!(".s.PGSQL.{port}"));
    }
    replace_secrets(&quoted, &secrets)
}

/// Past any of these bounds, a message's quoted fragments are not told
/// apart one by one (that search grows with the cube of its quotes, and
/// with their product with the connection string's length: a host name of
/// 1 600 `"a` took 3.5 s, 32 fragments of a 256 KiB string 5.8 s):
/// everything from its first `"` to its last is redacted at once. libpq's
/// messages stay far below the first two (a line of up to four quotes per
/// host tried, and a malformed string echoed once), and connection strings
/// below the third.
const MAX_SEARCHED_MESSAGE_BYTES: usize = 4096;
const MAX_SEARCHED_QUOTES: usize = 64;
const MAX_SEARCHED_CONNINFO_BYTES: usize = 8192;
/// The most `,`-separated parts of a quoted fragment told apart one by one
/// (libpq quotes a URL's hosts joined with `,`); a fragment of more is
/// redacted whole.
const MAX_SEARCHED_PARTS: usize = 64;

/// `text` with everything from its first `"` to its last replaced by
/// [`REDACTED`].
fn redact_all_quoted(text: &str) -> String {
    match (text.find('"'), text.rfind('"')) {
        (Some(first), Some(last)) if first < last => format!("{}{REDACTED}{}", &text[..=first], &text[last..]),
        _ => text.to_owned(),
    }
}

/// Whether `message` (or a line of it) is libpq's refusal of a string it
/// could not parse, rather than of a host, a port, a file or a server's
/// answer.
fn unparsed(message: &str) -> bool {
    message.contains("connection info string")
        || message.contains("URI")
        || (kind_of(message) == ConnectFailureKind::MalformedUrl
            && !message.contains("connection to server")
            && !message.contains("could not translate host name"))
}

/// Secrets shorter than this are replaced only where they stand as a word
/// of their own, between spaces, quotes or commas: replaced inside other
/// words, a password `1` turned `"127.0.0.1"` into
/// `"<redacted>27.0.0.<redacted>"`, which hid the host and showed the
/// password by where it was cut.
const MIN_SECRET_REPLACED_INSIDE_WORDS: usize = 4;

/// `text` with each occurrence of a secret (the longest first, where two
/// start at one place) replaced by [`REDACTED`]; one shorter than
/// [`MIN_SECRET_REPLACED_INSIDE_WORDS`] only as a word of its own, in a
/// second pass. A short secret (`a`) is never looked for inside a
/// [`REDACTED`], whether put in here or by the quoted fragments before. Linear in the text and the secrets (Aho-Corasick), however long
/// or many they are.
fn replace_secrets(text: &str, secrets: &[String]) -> String {
    let (long, short): (Vec<&String>, Vec<&String>) =
        secrets.iter().partition(|secret| secret.len() >= MIN_SECRET_REPLACED_INSIDE_WORDS);
    let Some(text) = replace_each(text, &long, |_, _| true) else { return REDACTED.to_owned() };
    let part_of_a_word = |c: char| !c.is_whitespace() && !matches!(c, '"' | '\'' | ',' | ';');
    let alone = |before: Option<char>, after: Option<char>| {
        !before.is_some_and(part_of_a_word) && !after.is_some_and(part_of_a_word)
    };
    replace_each(&text, &short, alone).unwrap_or_else(|| REDACTED.to_owned())
}

/// `text` with each occurrence of one of `secrets` for which `replace`
/// (given the characters just before and after it) says so replaced by
/// [`REDACTED`], leftmost-longest, [`REDACTED`] itself never searched
/// inside; `None` past the automaton's own size limit (secrets of hundreds
/// of megabytes), where the caller shows nothing rather than a secret.
fn replace_each(
    text: &str,
    secrets: &[&String],
    replace: impl Fn(Option<char>, Option<char>) -> bool,
) -> Option<String> {
    if secrets.is_empty() {
        return Some(text.to_owned());
    }
    let patterns = std::iter::once(REDACTED).chain(secrets.iter().map(|secret| secret.as_str()));
    // A contiguous NFA, not the DFA the builder picks for a few patterns:
    // building that took 1.4 s for one 10 000-byte password of one letter
    // (5.6 s for 20 000); the NFA builds and searches in linear time.
    let automaton = AhoCorasick::builder()
        .match_kind(MatchKind::LeftmostLongest)
        .kind(Some(AhoCorasickKind::ContiguousNFA))
        .build(patterns)
        .ok()?;
    let mut out = String::with_capacity(text.len());
    automaton.replace_all_with(text, &mut out, |found, matched, out| {
        let (before, after) = (text[..found.start()].chars().next_back(), text[found.end()..].chars().next());
        if found.pattern().as_usize() == 0 || replace(before, after) {
            out.push_str(REDACTED);
        } else {
            out.push_str(matched);
        }
        true
    });
    Some(out)
}

/// Replaces each `"..."` of `text` that overlaps a secret of `conninfo` (as
/// one of its occurrences there), is a piece of one of `secrets`, or holds
/// an `@`, or, on a line of libpq's refusal of a string it could not parse
/// (`unparsed_at` the fragment's offset in `text`), that occurs in
/// `conninfo` at all and is not an option's name. A fragment may hold `"`
/// itself (a password with one): from each opening quote, the farthest
/// closing quote that makes such a fragment is taken, else the nearest.
fn redact_quoted(
    text: &str,
    conninfo: &str,
    ranges: &[std::ops::Range<usize>],
    secrets: &[String],
    unparsed_at: impl Fn(usize) -> bool,
) -> String {
    // How many bytes of conninfo before each place are secret: whether an
    // occurrence overlaps a secret is then one subtraction, whatever the
    // number of secrets.
    let mut covered = vec![false; conninfo.len()];
    for range in ranges {
        covered[range.clone()].fill(true);
    }
    let secret_before: Vec<usize> = std::iter::once(0)
        .chain(covered.iter().scan(0, |sum, &secret| {
            *sum += usize::from(secret);
            Some(*sum)
        }))
        .collect();
    let overlaps_a_secret = |at: usize, len: usize| secret_before[at + len] > secret_before[at];
    let secret_piece = |fragment: &str, unparsed: bool| {
        fragment.contains('@')
            // A piece of a secret, raw or as libpq decodes it
            // (`postgres://app:Sec%21ret/x@...` echoes the port "Sec!ret").
            || (!fragment.is_empty() && secrets.iter().any(|secret| secret.contains(fragment)))
            || (unparsed && fragment.len() > 1 && conninfo.contains(fragment) && !is_option_name(fragment))
            || (!fragment.is_empty()
                && conninfo.match_indices(fragment).any(|(at, found)| overlaps_a_secret(at, found.len())))
    };
    // libpq joins a URL's hosts with `,` (their ports dropped) before it
    // decodes them, and echoes that: `u:1,Secret%zz/@` gives the token
    // "u,Secret%zz". A fragment is secret if one of its parts is.
    // Only a fragment without `"` (the nearest close), and one of more
    // parts than a message of libpq joins goes whole: the search stays
    // within its bounds.
    let secret_fragment = |fragment: &str, unparsed: bool| {
        secret_piece(fragment, unparsed)
            || (!fragment.contains('"')
                && fragment.contains(',')
                && (fragment.split(',').nth(MAX_SEARCHED_PARTS).is_some()
                    || fragment.split(',').any(|part| secret_piece(part, unparsed))))
    };
    // A fragment that spans a `"` is one only if it is the connection
    // string's own text (a password with a quote), raw or as libpq decodes
    // it (`u:%22Secret/@` echoes the port ""Secret"), not two of libpq's
    // quotes and the words between them.
    let decoded_conninfo = percent_decoded(conninfo);
    let secret = |fragment: &str, unparsed: bool| {
        (!fragment.contains('"') || conninfo.contains(fragment) || decoded_conninfo.contains(fragment))
            && secret_fragment(fragment, unparsed)
    };
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(open) = rest.find('"') {
        let unparsed = unparsed_at(text.len() - rest.len() + open);
        let after = &rest[open + 1..];
        let closes: Vec<usize> = after.match_indices('"').map(|(at, _)| at).collect();
        let Some(&nearest) = closes.first() else { break };
        out.push_str(&rest[..=open]);
        let close = match closes.iter().rev().find(|&&close| secret(&after[..close], unparsed)) {
            Some(&farthest) => {
                out.push_str(REDACTED);
                farthest
            }
            None => {
                out.push_str(&after[..nearest]);
                nearest
            }
        };
        out.push('"');
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    out
}

/// Whether `word` is the name of one of libpq's connection options (as of
/// libpq 17), which its messages quote ("for connection option "port"")
/// and which holds no secret.
fn is_option_name(word: &str) -> bool {
    const OPTIONS: &[&str] = &[
        "host",
        "hostaddr",
        "port",
        "dbname",
        "user",
        "passfile",
        "channel_binding",
        "connect_timeout",
        "client_encoding",
        "options",
        "application_name",
        "fallback_application_name",
        "keepalives",
        "keepalives_idle",
        "keepalives_interval",
        "keepalives_count",
        "tcp_user_timeout",
        "replication",
        "gssencmode",
        "sslmode",
        "sslnegotiation",
        "requiressl",
        "sslcompression",
        "sslcert",
        "sslkey",
        "sslcertmode",
        "sslrootcert",
        "sslcrl",
        "sslcrldir",
        "sslsni",
        "requirepeer",
        "require_auth",
        "ssl_min_protocol_version",
        "ssl_max_protocol_version",
        "krbsrvname",
        "gsslib",
        "gssdelegation",
        "service",
        "target_session_attrs",
        "load_balance_hosts",
    ];
    OPTIONS.contains(&word)
}

/// The ports libpq reads from a URL whose user info it cannot see: when a
/// `/` comes before the first `@` (`postgres://app:12/34@db/app`), libpq
/// takes `app:12` for a host and its port, so a password's head up to its
/// `/` is printed as a port. The ports of the hosts as libpq reads them
/// ([`LibpqUrl`]), raw and percent-decoded (libpq prints them decoded),
/// when an `@` follows: a URL whose path or query holds an `@` has its
/// ports hidden too, which costs only the port in its messages.
fn ports_read_from_user_info(conninfo: &str) -> Vec<String> {
    let conninfo = conninfo.trim_start();
    let Some(rest) = conninfo.strip_prefix("postgresql://").or_else(|| conninfo.strip_prefix("postgres://")) else {
        return Vec::new();
    };
    // As libpq looks for the user info: an `@` before the first `/`.
    let user_info_unseen = rest.find(['@', '/']).is_some_and(|at| rest[at..].starts_with('/')) && rest.contains('@');
    let Some(url) = LibpqUrl::parse(conninfo).filter(|_| user_info_unseen) else { return Vec::new() };
    let mut ports = Vec::new();
    for port in url.host_ports.into_iter().filter(|port| !port.is_empty()) {
        let decoded = percent_decoded(port);
        if decoded != port {
            ports.push(decoded);
        }
        ports.push(port.to_owned());
    }
    ports
}

/// The byte ranges of `conninfo` that may hold a password.
fn secret_ranges(conninfo: &str) -> Vec<std::ops::Range<usize>> {
    let mut ranges = Vec::new();
    let lower = conninfo.to_ascii_lowercase();
    let scheme = ["postgresql:", "postgres:"].into_iter().find(|scheme| lower.trim_start().starts_with(scheme));
    if let Some(scheme) = scheme {
        let start = conninfo.len() - conninfo.trim_start().len() + scheme.len();
        let body_start = start + conninfo[start..].len() - conninfo[start..].trim_start_matches('/').len();
        let body = &conninfo[body_start..];
        // The user info ends at an `@`: libpq takes the first, a reader the
        // last; the password starts after the first `:` of the user info.
        if let (Some(first_at), Some(last_at)) = (body.find('@'), body.rfind('@')) {
            for at in [first_at, last_at] {
                if let Some(colon) = body[..at].find(':') {
                    ranges.push(body_start + colon + 1..body_start + at);
                }
            }
        }
        // `?password=...&...` (or `sslpassword`, `PASSWORD`, `pass%77ord`:
        // libpq decodes a key before it reads it, and echoes the value of
        // one it refuses), after any `?` or `&`: the user info may hold a
        // raw `?` (libpq's query starts after the hosts), so every one that
        // could start the query is taken for its start.
        ranges.extend(query_password_ranges(conninfo));
        return ranges;
    }
    // key=value: `password = value` or `password='quoted value'`, to the
    // end of the value (or of the string, if a quote is not closed), read
    // as libpq reads it: a `\` takes the next character into the value,
    // quoted or not. The search goes on after the value (libpq reads no
    // key inside one): from just after the word, a string of
    // `password=password=...` made a range per word to the string's end,
    // gigabytes for a quarter of a megabyte.
    let mut search = 0;
    while let Some(found) = lower[search..].find("password") {
        let at = search + found;
        search = at + "password".len();
        let rest = &conninfo[search..];
        let Some(after_eq) = rest.trim_start().strip_prefix('=') else { continue };
        let value = after_eq.trim_start();
        let value_start = conninfo.len() - value.len();
        let (value_start, value_end, after_value) = match value.strip_prefix('\'') {
            Some(quoted) => {
                let end = value_start + 1 + escaped_value_end(quoted, |c| c == '\'');
                (value_start + 1, end, (end + 1).min(conninfo.len()))
            }
            None => {
                let end = value_start + escaped_value_end(value, char::is_whitespace);
                (value_start, end, end)
            }
        };
        ranges.push(value_start..value_end);
        search = search.max(after_value);
    }
    ranges
}

/// The length of the value at the start of `value`, as libpq reads a
/// key=value string: up to the first character that `ends` it and no `\`
/// escapes, or the whole of it.
fn escaped_value_end(value: &str, ends: impl Fn(char) -> bool) -> usize {
    let mut chars = value.char_indices();
    while let Some((at, c)) = chars.next() {
        if c == '\\' {
            chars.next();
        } else if ends(c) {
            return at;
        }
    }
    value.len()
}

/// The values of a URL's query parameters whose key, percent-decoded, holds
/// `password`, each parameter taken to start after any `?` or `&` and to end
/// at the next `&`. In one pass: the parameters that start after the `?`s
/// before one `=` share that `=` and its value, and their keys are the
/// ends of the first one's, so only the first is read (every `?` scanned to
/// the next `&` took 3.4 s for 256 KiB of `?`).
fn query_password_ranges(conninfo: &str) -> Vec<std::ops::Range<usize>> {
    let mut ranges = Vec::new();
    let mut segment_start = 0;
    for segment in conninfo.split('&') {
        let segment_end = segment_start + segment.len();
        // Where a parameter may start in this segment: after its `&`, or
        // after its first `?`.
        let mut start = if segment_start > 0 { Some(segment_start) } else { segment.find('?').map(|q| q + 1) };
        while let Some(key_start) = start {
            let Some(eq) = conninfo[key_start..segment_end].find('=').map(|eq| key_start + eq) else { break };
            let key = percent_decoded(&conninfo[key_start..eq]).to_ascii_lowercase();
            if key.contains("password") {
                // Every later start in the segment has a value inside this one.
                ranges.push(eq + 1..segment_end);
                break;
            }
            // The starts after a `?` before `eq` have keys that are ends of
            // this one: none holds `password`. The next is after `eq`.
            start = conninfo[eq..segment_end].find('?').map(|q| eq + q + 1);
        }
        segment_start = segment_end + 1;
    }
    ranges
}

/// `text` with each `\` dropped and the character after it kept.
fn unescaped(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.extend(chars.next()),
            c => out.push(c),
        }
    }
    out
}

/// `%XX` sequences decoded; malformed ones kept as they are.
fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok());
            if let Some(byte) = hex {
                out.push(byte);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpq_echoes_of_a_malformed_url_lose_the_password() {
        let url = "postgresql:/app:AppPw-9x@host/app";
        let message = r#"missing "=" after "postgresql:/app:AppPw-9x@host/app" in connection info string"#;
        assert_eq!(redact(message, url), r#"missing "=" after "<redacted>" in connection info string"#);
        let failure = ConnectFailure::classify(message, url);
        assert_eq!(failure.kind(), ConnectFailureKind::MalformedUrl);
    }

    #[test]
    fn percent_decoded_passwords_and_key_value_passwords_are_redacted() {
        let url = "postgres://app:S%40cret@db/app";
        assert_eq!(redact("user S@cret and S%40cret", url), "user <redacted> and <redacted>");
        let conninfo = "host=db password='two words' user=app";
        assert_eq!(redact("got two words", conninfo), "got <redacted>");
        let conninfo = "host=db password = plain user=app";
        assert_eq!(redact("\"plain\"", conninfo), "\"<redacted>\"");
        let url = "postgres://app@db/app?sslmode=require&password=QueryPw";
        assert_eq!(redact("QueryPw", url), REDACTED);
    }

    #[test]
    fn a_query_password_is_redacted_when_the_user_info_holds_a_question_mark() {
        // libpq takes a raw `?` in the user info; the query starts after the hosts.
        let url = "postgres://app:pa?ss@db/app?password=QueryPw&sslmode=require";
        assert_eq!(redact("QueryPw and pa?ss", url), "<redacted> and <redacted>");
    }

    #[test]
    fn a_password_holding_a_quote_or_written_without_quotes_is_redacted_whole() {
        // libpq's echo of a password with a `"` is not one pair of quotes.
        let url = r#"postgres://app:a"Secret-1/x@db:1/app"#;
        let message = r#"invalid integer value "a"Secret-1" for connection option "port""#;
        assert_eq!(redact(message, url), r#"invalid integer value "<redacted>" for connection option "port""#);
        // `password=Head Tail=1`: libpq reads `Tail` as an option's name.
        let conninfo = "host=db password=Head Secret-2=1";
        let message = r#"invalid connection option "Secret-2""#;
        assert_eq!(redact(message, conninfo), r#"invalid connection option "<redacted>""#);
        // Any option whose name holds `password`, in any spelling libpq decodes.
        for url in ["postgres://db/app?sslpassword=Secret-3%ZZ", "postgres://db/app?pass%77ord=Secret-3%ZZ"] {
            let message = r#"invalid percent-encoded token: "Secret-3%ZZ""#;
            assert_eq!(redact(message, url), r#"invalid percent-encoded token: "<redacted>""#, "{url}");
        }
    }

    #[test]
    fn the_tail_of_an_unquoted_password_read_as_a_second_port_is_redacted_on_its_own_line() {
        // `password=Head port=1,Tail` meant as one password: libpq reads a
        // port list, tries the first host, and refuses the second port on
        // a line after that host's, which alone would keep the message's
        // quotes.
        let conninfo = "host=db1,db2 password=Head port=1,Secret-4";
        let message = "could not translate host name \"db1\" to address: Name or service not known\n\
                       invalid integer value \"Secret-4\" for connection option \"port\"\n";
        assert_eq!(
            redact(message, conninfo),
            "could not translate host name \"db1\" to address: Name or service not known\n\
             invalid integer value \"<redacted>\" for connection option \"port\"\n"
        );
        let message = "connection to server at \"127.0.0.1\", port 1 failed: Connection refused\n\
                       \tIs the server running on that host and accepting TCP/IP connections?\n\
                       invalid integer value \"Secret-4\" for connection option \"port\"\n";
        let redacted = redact(message, conninfo);
        assert!(!redacted.contains("Secret-4"), "{redacted}");
        assert!(redacted.contains("\"127.0.0.1\", port 1 failed"), "{redacted}");
    }

    #[test]
    fn a_message_past_the_search_bounds_loses_everything_between_its_first_and_last_quote() {
        // A host of 20 000 `"a`: told apart fragment by fragment, its
        // redaction grew with the cube of the quotes (3.5 s for 1 600).
        let host = "\"a".repeat(20_000);
        let conninfo = format!("host={host} password=Secret-5");
        let message = format!("could not translate host name \"{host}\" to address: Name or service not known");
        assert_eq!(
            redact(&message, &conninfo),
            "could not translate host name \"<redacted>\" to address: Name or service not known"
        );
        // Short of the bounds, the same host keeps its name.
        let host = "\"a".repeat(20);
        let conninfo = format!("host={host} password=Secret-5");
        let message = format!("could not translate host name \"{host}\" to address");
        assert_eq!(redact(&message, &conninfo), message);
    }

    #[test]
    fn a_password_of_hundreds_of_kilobytes_is_redacted_wherever_it_stands() {
        // One letter repeated: the automaton the builder picks by itself
        // took seconds to build for 10 000 bytes, and trying the password
        // at every place of runs one letter short of it costs the square of
        // its length (21 ms for 40 000 bytes, so about 0.5 s for these).
        let password = "a".repeat(200_000);
        let conninfo = format!("host=db password={password}");
        let near_misses = format!("{}b", &password[1..]).repeat(3);
        let message = format!("before {password}b after {near_misses}");
        assert_eq!(redact(&message, &conninfo), format!("before {REDACTED}b after {near_misses}"));
    }

    #[test]
    fn a_key_value_password_is_read_with_its_backslash_escapes_as_libpq_reads_it() {
        let conninfo = r"host=db password=a\ Secret-7 port=1";
        assert_eq!(redact(r"a Secret-7 and a\ Secret-7", conninfo), "<redacted> and <redacted>");
        let conninfo = r"host=db password='a\'Secret-8' user=app";
        assert_eq!(redact(r"a'Secret-8 and a\'Secret-8 for app", conninfo), "<redacted> and <redacted> for app");
    }

    #[test]
    fn connection_strings_of_hundreds_of_kilobytes_are_redacted_in_one_pass() {
        // Each `password` word made a range to the string's end, searched
        // again from just after the word: 3.6 GB of ranges for 256 KiB.
        let conninfo = "password=".repeat(30_000);
        assert_eq!(redact(&format!("got {conninfo} here"), &conninfo), format!("got {REDACTED}password= here"));
        // Each `?` was read to the next `&`, here the string's end.
        let url = format!("postgres://h/db{}password=Secret-6", "?".repeat(100_000));
        assert_eq!(redact("x Secret-6 y", &url), format!("x {REDACTED} y"));
        assert_eq!(secret_ranges(&url).len(), 1);
        // Past 8 KiB of connection string, quoted fragments go whole.
        let conninfo = "x=x password=y ".repeat(1_000);
        assert_eq!(
            redact("invalid connection option \"x\" near \"z\"", &conninfo),
            format!("invalid connection option \"{REDACTED}\"")
        );
    }

    #[test]
    fn a_password_holding_a_raw_slash_is_redacted_where_libpq_prints_its_head_as_a_port() {
        // Found by a fuzzer of real libpq 15 messages; each message is libpq's own.
        for (conninfo, message, piece) in [
            // A decoded `"` in the part read as the port.
            ("postgres://u:%22Secret/@", r#"invalid integer value ""Secret" for connection option "port""#, "Secret"),
            ("postgres://u:Se%22cret/x@h", r#"invalid integer value "Se"cret" for connection option "port""#, "cret"),
            (
                "postgres://u:p@a%22Secret/x@h/db",
                r#"could not translate host name "a"Secret" to address: Name or service not known"#,
                "Secret",
            ),
            // The head printed as a port, without quotes.
            (
                "postgres://127.0.0.1:1234/x@h",
                r#"connection to server at "127.0.0.1", port 1234 failed: Connection refused"#,
                "1234",
            ),
            (
                "postgres://:+9876/x@h",
                r#"connection to server on socket "/var/run/postgresql/.s.PGSQL.+9876" failed: No such file"#,
                "9876",
            ),
            // The hosts joined with `,`, their ports dropped, before decoding.
            ("postgres://u:1,Secret%zz/@", r#"invalid percent-encoded token: "u,Secret%zz""#, "Secret"),
            ("postgres://u:p@Sec%zz:1,ret/@", r#"invalid percent-encoded token: "Sec%zz,ret""#, "Sec%zz"),
        ] {
            let redacted = redact(message, conninfo);
            assert!(!redacted.contains(piece), "{conninfo}: {redacted}");
            let failure = ConnectFailure::classify(message, conninfo).to_string();
            assert!(!failure.contains(piece), "{conninfo}: {failure}");
        }
        // A URL whose user info libpq reads keeps its port in messages.
        let message = r#"connection to server at "127.0.0.1", port 1234 failed: Connection refused"#;
        assert_eq!(redact(message, "postgres://app:pw@127.0.0.1:1234/app"), message);
    }

    #[test]
    fn a_password_of_a_few_characters_is_redacted_as_a_word_of_its_own_not_inside_others() {
        let url = "postgres://app:1@127.0.0.1:1/app";
        let message = r#"connection to server at "127.0.0.1", port 1 failed: Connection refused"#;
        assert_eq!(
            redact(message, url),
            r#"connection to server at "127.0.0.1", port <redacted> failed: Connection refused"#
        );
        assert_eq!(redact("invalid percent-encoded token", "postgres://app:p@db/app"), "invalid percent-encoded token");
        // From four bytes on, inside words too.
        assert_eq!(redact("xxSec1yy", "postgres://app:Sec1@db/app"), "xx<redacted>yy");
    }

    #[test]
    fn a_piece_of_a_password_libpq_decoded_is_redacted_and_a_short_one_leaves_the_message_whole() {
        // libpq ends the user info at the raw `/`, and reads and decodes the
        // rest of the password as the port.
        let url = "postgres://app:Sec%21ret/x@127.0.0.1:1/app";
        let message = r#"invalid integer value "Sec!ret" for connection option "port""#;
        assert_eq!(redact(message, url), r#"invalid integer value "<redacted>" for connection option "port""#);
        // A one-letter password is replaced where it stands, never inside
        // a `<redacted>` already put in.
        let url = "postgres://app:a@127.0.0.1:notaport/app";
        let message = r#"invalid integer value "notaport" for connection option "port""#;
        let redacted = redact(message, url);
        assert!(!redacted.contains("<red<"), "{redacted}");
        assert!(redacted.contains("connection option"), "{redacted}");
    }

    #[test]
    fn quoted_fragments_outside_the_password_stay() {
        let url = "postgres://app:pw@db.example/app";
        let message = r#"could not translate host name "db.example" to address: Name or service not known"#;
        assert_eq!(redact(message, url), message);
        assert_eq!(kind_of(message), ConnectFailureKind::MalformedUrl);
    }

    #[test]
    fn kinds_follow_what_an_operator_does_about_them() {
        use ConnectFailureKind::*;
        for (message, kind) in [
            (
                r#"connection to server at "127.0.0.1", port 5432 failed: FATAL:  password authentication failed for user "app""#,
                Authentication,
            ),
            (r#"FATAL:  database "nope" does not exist"#, Missing),
            (r#"FATAL:  role "nope" does not exist"#, Missing),
            (
                "connection to server at \"127.0.0.1\", port 1 failed: Connection refused\n\tIs the server running on that host and accepting TCP/IP connections?",
                Refused,
            ),
            ("timeout expired", TimedOut),
            ("connection to server at \"10.1.1.1\", port 5432 failed: No route to host", Unreachable),
            ("FATAL:  the database system is starting up", NotReady),
            ("FATAL:  sorry, too many clients already", NotReady),
            ("FATAL:  too many connections for role \"app\"", NotReady),
            ("FATAL:  too many connections for database \"dployr\"", NotReady),
            ("ERROR:  no more connections allowed (max_client_conn)", NotReady),
            (r#"invalid port number: "abc""#, MalformedUrl),
            (
                r#"connection to server at "127.0.0.1", port 5432 failed: setsockopt(TCP_KEEPIDLE) failed: Invalid argument"#,
                MalformedUrl,
            ),
            // libpq 15's words, from a server with TLS and one without.
            (
                "connection to server at \"127.0.0.1\", port 5432 failed: root certificate file \"/root/.postgresql/root.crt\" does not exist\nEither provide the file or change sslmode to disable server certificate verification.",
                Security,
            ),
            (
                "connection to server at \"db\", port 5432 failed: server does not support SSL, but SSL was required",
                Security,
            ),
            ("connection to server at \"db\", port 5432 failed: SSL error: certificate verify failed", Security),
            (
                "connection to server at \"db\", port 5432 failed: GSSAPI encryption required but was impossible (possibly no credential cache, no server support, or using a local socket)",
                Security,
            ),
            (
                "connection to server at \"db\", port 5432 failed: channel binding required, but server authenticated client without channel binding",
                Security,
            ),
            ("connection to server at \"db\", port 5432 failed: SSL SYSCALL error: EOF detected", Other),
        ] {
            assert_eq!(kind_of(message), kind, "{message}");
        }
        assert!(Refused.is_transient() && !Authentication.is_transient() && !Missing.is_transient());
        assert!(!Security.is_transient() && Other.is_transient());
    }
}
