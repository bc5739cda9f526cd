//! Hostile strings against every public operation of the data layer that
//! takes text: a corpus of several hundred (empty, blank, at and around each
//! byte limit, every control character, invisible and bidi characters,
//! non-characters, lone combining marks, case and normalisation traps, SQL,
//! JSON, percent-encoding, paths, URLs, format strings, a megabyte) fed to
//! e-mails, display and cluster names, pictures, tags, addresses, nonces,
//! ids, cursors, metadata, GitHub login ids, sessions, OAuth states,
//! one-time codes, raw key-value keys, values, prefixes and cursors, and the
//! configuration.
//!
//! The rule each call is held to, the project's: bad input is refused with
//! a typed error (`Invalid`, or `NotFound` for a lookup of something that
//! does not exist) and leaves every table as it was; accepted input reads
//! back as what the parse function returned (its documented normalisation);
//! never a panic, a `Backend`, `Unavailable` or `Configuration` error (the
//! database is up), nor a `Conflict` the test did not make.
//!
//! Each test collects every broken rule and reports them together (the
//! first 50), so one run shows the whole picture rather than the first crack.

#![cfg(test)]

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt::Debug;
use std::hint::black_box;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel::sql_types::BigInt;
use dployr_data::{
    Address, BootstrapTokenStore as _, ClusterId, ClusterName, ClusterPatch, ClusterStore as _, ClusterSummary, Config,
    Cursor, DataLayer, DisplayName, Email, GitHubIntegration, InstanceId, InstanceStore as _, MAX_ADDRESS_BYTES,
    MAX_CLUSTER_NAME_BYTES, MAX_EMAIL_BYTES, MAX_METADATA_BYTES, MAX_TAG_BYTES, MAX_USER_TEXT_BYTES, Metadata,
    NewInstance, NewUser, Nonce, Page, Provider, StoreError, StoreResult, Tag, UserId, UserPatch, UserStore as _,
};
use dployr_domain::libpq::{LibpqUrl, conninfo_pairs, has_url_scheme, names_several_hosts, url_keys};
use dployr_domain::{
    ConnectFailure, KvBackend, MAX_CURSOR_BYTES, MAX_KEY_BYTES, MAX_LOCAL_PART_BYTES, MAX_VALUE_BYTES,
};
use dployr_kv::{CloudflareConfig, CloudflareKv, KvStore, MemoryKv, OAuthState, OtpCode, PgKv, RetryPolicy, SessionId};
use dployr_pg::{PgPool, PoolConfig};
use dployr_testkit::{CloudflareEmulator, TestDatabase};
use dployr_tests::data_layer_kv::{Kv, config};
use dployr_tests::kv_contract::sample_user;
use serde_json::json;

// ---------------------------------------------------------------------------
// The corpus
// ---------------------------------------------------------------------------

/// Single characters and short sequences that break naive code, each tried
/// alone, between two letters and leading a value (where trimming, "starts
/// with a mark" and "nothing visible" rules live).
const CHARACTERS: &[&str] = &[
    // White space beyond ASCII: trimmed by Rust, not by PostgreSQL's btrim.
    "\u{a0}",
    "\u{1680}",
    "\u{2000}",
    "\u{2007}",
    "\u{200a}",
    "\u{2028}",
    "\u{2029}",
    "\u{202f}",
    "\u{205f}",
    "\u{3000}",
    // Invisible: zero-width, joiners, bidi controls and isolates, BOM,
    // soft hyphen, fillers, variation selectors, tags.
    "\u{200b}",
    "\u{200c}",
    "\u{200d}",
    "\u{200e}",
    "\u{200f}",
    "\u{202a}",
    "\u{202b}",
    "\u{202c}",
    "\u{202d}",
    "\u{202e}",
    "\u{2060}",
    "\u{2062}",
    "\u{2066}",
    "\u{2067}",
    "\u{2068}",
    "\u{2069}",
    "\u{feff}",
    "\u{ad}",
    "\u{34f}",
    "\u{61c}",
    "\u{180e}",
    "\u{180b}",
    "\u{fe00}",
    "\u{fe0f}",
    "\u{115f}",
    "\u{1160}",
    "\u{3164}",
    "\u{ffa0}",
    "\u{e0001}",
    "\u{e0041}",
    "\u{e007f}",
    "\u{1d173}",
    "\u{fff9}",
    "\u{fffc}",
    "\u{fffd}",
    // Non-characters and unassigned code points.
    "\u{fdd0}",
    "\u{fffe}",
    "\u{ffff}",
    "\u{1fffe}",
    "\u{10fffe}",
    "\u{10ffff}",
    "\u{378}",
    "\u{50000}",
    "\u{e0080}",
    // Private use.
    "\u{e000}",
    "\u{f8ff}",
    "\u{f0000}",
    "\u{10fffd}",
    // Combining marks (non-spacing, spacing, enclosing) and a skin-tone modifier.
    "\u{300}",
    "\u{301}",
    "\u{308}",
    "\u{323}",
    "\u{20dd}",
    "\u{20e3}",
    "\u{903}",
    "\u{94d}",
    "\u{1f3fd}",
    // Case and compatibility traps.
    "İ",
    "ı",
    "ß",
    "\u{1e9e}",
    "Σ",
    "ς",
    "σ",
    "\u{212a}",
    "\u{212b}",
    "\u{2126}",
    "ǅ",
    "ﬁ",
    "Ⅸ",
    "²",
    "Ａ",
    "ｈ",
    "ŉ",
    "ΐ",
    "\u{13a0}",
    "\u{ab70}",
    "\u{1c90}",
    "\u{10d0}",
    // Scripts: CJK, Hangul (precomposed and as jamo), RTL, a composition exclusion.
    "日本",
    "𠜎",
    "한",
    "\u{1100}\u{1161}",
    "ש",
    "م",
    "\u{958}",
    "ค",
    // Emoji, alone and as ZWJ, flag and keycap sequences.
    "🦀",
    "😀",
    "👨\u{200d}👩\u{200d}👧",
    "🏳\u{fe0f}\u{200d}🌈",
    "👩🏽\u{200d}💻",
    "🇫🇷",
    "1\u{fe0f}\u{20e3}",
    // ASCII punctuation that means something somewhere.
    "@",
    ".",
    "/",
    "\\",
    "'",
    "\"",
    "`",
    "%",
    "_",
    "*",
    "?",
    "#",
    "&",
    "=",
    "+",
    ";",
    ":",
    ",",
    "<",
    ">",
    "|",
    "~",
    "$",
    "!",
    "^",
    "(",
    ")",
    "[",
    "]",
    "{",
    "}",
    "-",
    " ",
];

/// Whole values: SQL, JSON, percent-encoding, paths, URLs, format strings,
/// case and normalisation pairs, ULID look-alikes, e-mail look-alikes.
const WHOLE: &[&str] = &[
    "",
    " ",
    "  \t  ",
    "\r\n",
    "\n\n",
    "a",
    "A",
    "0",
    "web-1",
    "10.0.0.7:22",
    "Ada Lovelace",
    // SQL.
    "'; DROP TABLE users; --",
    "\\' OR 1=1",
    "' OR '1'='1",
    "\" OR \"\"=\"",
    "1; SELECT pg_sleep(10)",
    "$1",
    "$$",
    "$tag$x$tag$",
    "E'\\\\x00'",
    "E'\\u0000'",
    "U&'\\0000'",
    "%",
    "_",
    "%%",
    "%_",
    "\\\\",
    "\\%",
    "\\_",
    "a%",
    "_a",
    "%a%",
    "[a-z]",
    "NULL",
    "null",
    "DEFAULT",
    "\\N",
    "\\x00",
    "\\0",
    "--",
    "/*",
    "*/",
    "''",
    // JSON.
    "{}",
    "[]",
    "true",
    "1",
    "-0",
    "1e400",
    "\"\"",
    "\"\\u0000\"",
    "\"\\ud800\"",
    "{\"a\":1}",
    "{\"a\":1,\"a\":2}",
    "{\"__proto__\":{\"x\":1}}",
    "{\"\":\"\"}",
    "{\"a\":\"\\u0000\"}",
    "{\"a\\u0000\":1}",
    "{\"a\":18446744073709551616}",
    "{\"a\":1e16}",
    "{\"a\":1e400}",
    "{\"a\":0.1}",
    "{\"a\":1.00000000000000000001}",
    "{\"a\":\"\\ud83d\\ude00\"}",
    "{\"a\":\"\\udc00\"}",
    "{\"a\":\"\\u001f\\u007f\\u0085\"}",
    "{\"a\":-0.0}",
    "{\"a\":5e-324}",
    "{\"a\":1.7976931348623157e308}",
    "{\"a\":-9223372036854775808}",
    "{\"a\":18446744073709551615}",
    "{\"a\":1E2}",
    "{\"a\":1e-7}",
    "{\"a\":0.30000000000000004}",
    "{\"a\":100000000000000000000.0}",
    "{\"a\":[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}",
    // Percent-encoding.
    "%00",
    "%2F",
    "..%2F",
    "%2e%2e%2f",
    "%2e%2e",
    "%ZZ",
    "%C0%AE",
    "%E2%80%AE",
    "%20",
    "a%00b",
    // Paths.
    "..",
    "...",
    "//",
    "a/b",
    "/a",
    "a/",
    "a\\b",
    "../../etc/passwd",
    "..\\..\\windows",
    "./a",
    "a/../b",
    "~/x",
    "C:\\Windows",
    "\\\\server\\share",
    "/dev/null",
    "CON",
    // URLs.
    "http://example.com",
    "https://app.example/clusters?next=%2F#top",
    "javascript:alert(1)",
    "JaVaScRiPt:alert(1)",
    "java\nscript:alert(1)",
    "data:text/html,<script>alert(1)</script>",
    "data:image/png;base64,AAAA",
    "//evil.example",
    "http://user:pass@evil.example/",
    "http://[::1]:80/",
    "file:///etc/passwd",
    "https://x.io/\u{202e}gpj.exe",
    "https://аррӏе.com",
    "mailto:a@b.io",
    "http://x.io/a b",
    // Format strings and templates.
    "{0}",
    "{:?}",
    "{{",
    "}}",
    "%s%n",
    "%x%x%x%x",
    "%99999999s",
    "${jndi:ldap://x/a}",
    "#{7*7}",
    "{{7*7}}",
    "<script>alert(1)</script>",
    "&#0;",
    "]]>",
    // Case and normalisation.
    "STRASSE",
    "straße",
    "DİYARBAKIR",
    "diyarbakır",
    "ΑΣ",
    "ΑΣΑ",
    "ας",
    "ασ",
    "Åström",
    "A\u{30a}ström",
    "\u{212b}ström",
    "e\u{323}\u{302}",
    "e\u{302}\u{323}",
    "ệ",
    "\u{1100}\u{1161}\u{11a8}",
    "각",
    "ＡＢＣ",
    "ａｄｍｉｎ",
    "𝐚𝐝𝐦𝐢𝐧",
    "ℌ",
    // Right to left, CJK.
    "مرحبا",
    "שלום",
    "abc\u{202e}cba",
    "\u{5d0}a\u{5d1}",
    "\u{645}\u{6cc}\u{200c}\u{62e}\u{648}\u{627}\u{647}\u{645}",
    "\u{202e}\u{2066}a\u{2069}\u{202c}",
    "日本語",
    "中文",
    "한국어",
    // NUL alone and at the edges.
    "\u{0}\u{0}",
    "a\u{0}",
    "\u{0}a",
    // ULID look-alikes.
    "00000000000000000000000000",
    "7ZZZZZZZZZZZZZZZZZZZZZZZZZ",
    "80000000000000000000000000",
    "ZZZZZZZZZZZZZZZZZZZZZZZZZZ",
    "0000000000000000000000000",
    "000000000000000000000000000",
    "01ARZ3NDEKTSV4RRFFQ69G5FAV",
    "01arz3ndektsv4rrffq69g5fav",
    "01ARZ3NDEKTSV4RRFFQ69G5FA\u{0}",
    "0IL0O0000000000000000000U0",
    "01ARZ3NDEKTSV4RRFFQ69G5FAＶ",
    " 01ARZ3NDEKTSV4RRFFQ69G5FAV",
    "-1ARZ3NDEKTSV4RRFFQ69G5FAV",
    // E-mail look-alikes.
    "ada@example.io",
    "Ada@Example.IO",
    " ada@example.io\t",
    "a@b",
    "@",
    "a@",
    "@b.io",
    "a@@b.io",
    "a@b@c.io",
    "\"a b\"@x.io",
    "a+tag@x.io",
    "a@xn--bcher-kva.de",
    "user@bücher.de.",
    "user@BÜCHER.DE",
    "a@xn--.io",
    "a@xn--zz.io",
    "a@xn--a.io",
    "a@-x.io",
    "a@x-.io",
    "a@x_y.io",
    "a@127.0.0.1",
    "a@[::1]",
    "a@localhost",
    "a@x.io..",
    "a@.x.io",
    ".a@x.io",
    "a..b@x.io",
    "a.@x.io",
    "ǅ@x.io",
    "ΑΣ@x.gr",
    "ΑΣΑ@x.gr",
    "İ@x.io",
    "ı@x.io",
    "STRASSE@x.io",
    "straße@x.io",
    "ẞ@x.io",
    "\u{212a}im@x.io",
    "ＡＢＣ@x.io",
    "a@ＥＸＡＭＰＬＥ.io",
    "a@x\u{3002}io",
    "a@x\u{ff0e}io",
    "ﬁx@x.io",
    "a@ﬁx.io",
    "😀@x.io",
    "a@😀.io",
    "a@xn--i-7iq.ws",
    "日本@例え.jp",
    "مرحبا@x.io",
    "a@\u{5d0}.io",
    "admin\u{200b}@x.io",
    "admin@x\u{200d}.io",
    "\u{202e}nimda@x.io",
    "a\u{0}@x.io",
    "a@x.io\u{0}",
    "a@x.io\n",
    "a\n@x.io",
    "cafe\u{301}@x.io",
    "café@x.io",
    "\u{301}@x.io",
    "a@\u{301}x.io",
    "a@x.\u{1f600}",
    "a@x.123",
    "a@x.io%00",
    "a%40b@x.io",
    "'OR'1'='1@x.io",
    "a';--@x.io",
    "$$@x.io",
    "%@x.io",
    "_@x.io",
    "\\@x.io",
    "a@x.io/",
    "a@x.io:25",
];

/// The byte limits the data layer documents, each probed at, just under and
/// just over (and with a four-byte character straddling it).
const LIMITS: &[usize] = &[
    MAX_LOCAL_PART_BYTES,
    MAX_EMAIL_BYTES,
    MAX_TAG_BYTES,
    MAX_KEY_BYTES,
    MAX_USER_TEXT_BYTES,
    MAX_ADDRESS_BYTES,
    MAX_CLUSTER_NAME_BYTES,
    MAX_CURSOR_BYTES,
    MAX_METADATA_BYTES,
];

/// Strings around one byte limit: at, below and above it in ASCII; a
/// four-byte character ending exactly at it and one straddling it;
/// padded with blanks that trimming removes; decomposed text whose NFC is
/// shorter (the limit applies after normalisation) and a composition
/// exclusion whose NFC is twice as long.
fn around_limit(limit: usize) -> Vec<String> {
    let a = |n: usize| "a".repeat(n);
    vec![
        a(limit - 1),
        a(limit),
        a(limit + 1),
        format!("{}😀", a(limit - 4)),
        format!("{}😀", a(limit - 3)),
        format!("{}😀", a(limit - 1)),
        "😀".repeat(limit / 4),
        "😀".repeat(limit / 4 + 1),
        format!("  {}\t", a(limit)),
        format!("{}\u{301}", a(limit - 1)),
        "e\u{301}".repeat(limit / 3 + 1),
        "\u{958}".repeat(limit / 3),
        format!("{}ß", a(limit - 2)),
        format!("{}ß", a(limit - 1)),
    ]
}

/// The whole corpus, each string once, in a fixed order.
fn corpus() -> Vec<String> {
    let mut texts = Vec::new();
    texts.extend(WHOLE.iter().map(|s| (*s).to_owned()));
    // Every ASCII control character, DEL and every C1 control, alone and
    // between letters.
    let controls = (0_u32..0x20).chain([0x7f]).chain(0x80..0xa0).filter_map(char::from_u32);
    for c in controls {
        texts.push(c.to_string());
        texts.push(format!("a{c}b"));
    }
    for c in CHARACTERS {
        texts.push((*c).to_owned());
        texts.push(format!("a{c}b"));
        texts.push(format!("{c}a"));
    }
    for limit in LIMITS {
        texts.extend(around_limit(*limit));
    }
    // One grapheme of 10 000 combining marks, with and without marks that
    // NFC must reorder; a megabyte of ASCII, of emoji and of NUL.
    texts.push(format!("a{}", "\u{301}".repeat(10_000)));
    texts.push(format!("a{}", "\u{301}\u{323}".repeat(5_000)));
    texts.push("\u{301}".repeat(10_000));
    texts.push("a".repeat(1 << 20));
    texts.push("😀".repeat(1 << 18));
    texts.push("\u{0}".repeat(1 << 20));
    texts.push(format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)));
    let mut seen = HashSet::new();
    texts.retain(|text| seen.insert(text.clone()));
    texts
}

/// E-mail candidates: each corpus string as given, as a local part, inside
/// one and inside a domain label; plus addresses at the length limits.
fn email_candidates(corpus: &[String]) -> Vec<String> {
    let label = "l".repeat(63);
    let domain = format!("{label}.{label}.{label}.{}", "m".repeat(MAX_EMAIL_BYTES - 2 - 3 * 64));
    let mut candidates = vec![
        format!("{}@x.io", "a".repeat(MAX_LOCAL_PART_BYTES)),
        format!("{}@x.io", "a".repeat(MAX_LOCAL_PART_BYTES + 1)),
        format!("{}😀@x.io", "a".repeat(MAX_LOCAL_PART_BYTES - 4)),
        format!("{}😀@x.io", "a".repeat(MAX_LOCAL_PART_BYTES - 3)),
        format!("{}é@x.io", "a".repeat(MAX_LOCAL_PART_BYTES - 2)),
        format!("{}e\u{301}@x.io", "a".repeat(MAX_LOCAL_PART_BYTES - 2)),
        format!("a@{}.io", "l".repeat(63)),
        format!("a@{}.io", "l".repeat(64)),
        format!("a@{domain}"),
        format!("ab@{domain}"),
        format!("A@{}", domain.to_uppercase()),
        format!("a@{domain}."),
        // Short in UTF-8, long once IDNA spells it in ASCII.
        format!("a@{}.{}.io", "ü".repeat(30), "ü".repeat(30)),
        format!("a@{}.io", "ü".repeat(60)),
    ];
    for text in corpus {
        candidates.push(text.clone());
        if text.len() <= 300 {
            candidates.push(format!("{text}@example.io"));
            candidates.push(format!("a{text}b@example.io"));
            candidates.push(format!("user@a{text}b.example"));
        }
    }
    let mut seen = HashSet::new();
    candidates.retain(|text| seen.insert(text.clone()));
    candidates
}

/// Unpadded base64url, the encoding of the stores' cursors (this crate has
/// no base64 dependency), to forge cursors whose content is hostile.
fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len() * 4 / 3 + 4);
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0_u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Classifying calls and collecting what broke
// ---------------------------------------------------------------------------

/// What one call gave back, sorted by the rule.
enum Outcome<T> {
    Accepted(T),
    /// `Invalid`, naming this field.
    Refused(&'static str),
    /// `NotFound`.
    Missing,
    /// `Conflict` on this field.
    Conflict(&'static str),
    /// A panic or an error the rule forbids, already recorded.
    Broken,
}

impl<T> Outcome<T> {
    fn accepted(self) -> Option<T> {
        match self {
            Self::Accepted(value) => Some(value),
            _ => None,
        }
    }

    fn is_accepted(&self) -> bool {
        matches!(self, Self::Accepted(_))
    }

    fn kind(&self) -> String {
        match self {
            Self::Accepted(_) => "accepted".to_owned(),
            Self::Refused(field) => format!("Invalid({field})"),
            Self::Missing => "NotFound".to_owned(),
            Self::Conflict(field) => format!("Conflict({field})"),
            Self::Broken => "broken".to_owned(),
        }
    }
}

/// A string short enough to print: its escaped `Debug` form, cut after 40
/// characters when long, with its size.
fn shown(input: &str) -> String {
    if input.len() <= 120 {
        return format!("{input:?}");
    }
    let head: String = input.chars().take(40).collect();
    format!("{head:?}… ({} bytes, {} chars)", input.len(), input.chars().count())
}

fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-string payload".to_owned())
}

/// Runs calls, classifies them, and collects every broken rule. `snapshot`
/// states what a refused write must leave unchanged (the tables' counts and
/// newest row versions, or a key-value backend's entries).
struct Checker {
    test: &'static str,
    failures: Vec<String>,
    calls: usize,
    snapshot: Box<dyn FnMut() -> String>,
}

impl Checker {
    fn new(test: &'static str, snapshot: Box<dyn FnMut() -> String>) -> Self {
        Self { test, failures: Vec::new(), calls: 0, snapshot }
    }

    /// A checker with nothing to snapshot (pure functions).
    fn pure(test: &'static str) -> Self {
        Self::new(test, Box::new(String::new))
    }

    fn fail(&mut self, op: &str, input: &str, what: impl AsRef<str>) {
        self.failures.push(format!("{op}({}): {}", shown(input), what.as_ref()));
    }

    fn expect(&mut self, holds: bool, op: &str, input: &str, what: impl FnOnce() -> String) {
        if !holds {
            let what = what();
            self.fail(op, input, what);
        }
    }

    #[expect(
        clippy::needless_pass_by_value,
        reason = "callers hand over what a store returned and literals alike; a `&` at each of them adds only noise"
    )]
    fn expect_eq<A: PartialEq<B> + Debug, B: Debug>(&mut self, got: A, want: B, op: &str, input: &str) {
        if got != want {
            let (got, want) = (format!("{got:?}"), format!("{want:?}"));
            self.fail(op, input, format!("read back {}, expected {}", cut(&got), cut(&want)));
        }
    }

    /// Runs `f`; a `Conflict` is a failure unless `conflict_expected`, and
    /// then anything else is.
    fn run<T>(
        &mut self,
        op: &str,
        input: &str,
        conflict_expected: bool,
        f: impl FnOnce() -> StoreResult<T>,
    ) -> Outcome<T> {
        self.calls += 1;
        let outcome = match catch_unwind(AssertUnwindSafe(f)) {
            Err(payload) => {
                self.fail(op, input, format!("panicked: {}", panic_text(payload.as_ref())));
                return Outcome::Broken;
            }
            Ok(Ok(value)) => Outcome::Accepted(value),
            Ok(Err(StoreError::Invalid { field, .. })) => Outcome::Refused(field),
            Ok(Err(StoreError::NotFound { .. })) => Outcome::Missing,
            Ok(Err(StoreError::Conflict { field, .. })) => Outcome::Conflict(field),
            Ok(Err(other)) => {
                self.fail(op, input, format!("{other:?}"));
                return Outcome::Broken;
            }
        };
        match (&outcome, conflict_expected) {
            (Outcome::Conflict(field), false) => {
                self.fail(op, input, format!("Conflict on {field} the test did not make"));
            }
            (Outcome::Conflict(_), true) => {}
            (other, true) => self.fail(op, input, format!("{} where a duplicate should conflict", other.kind())),
            _ => {}
        }
        outcome
    }

    /// A read or a parse.
    fn call<T>(&mut self, op: &str, input: &str, f: impl FnOnce() -> StoreResult<T>) -> Outcome<T> {
        self.run(op, input, false, f)
    }

    /// A write: when it is not accepted, the snapshot must not change.
    fn write<T>(&mut self, op: &str, input: &str, f: impl FnOnce() -> StoreResult<T>) -> Outcome<T> {
        self.write_expecting(op, input, false, f)
    }

    fn write_expecting<T>(
        &mut self,
        op: &str,
        input: &str,
        conflict_expected: bool,
        f: impl FnOnce() -> StoreResult<T>,
    ) -> Outcome<T> {
        let before = (self.snapshot)();
        let outcome = self.run(op, input, conflict_expected, f);
        if !outcome.is_accepted() {
            let after = (self.snapshot)();
            if after != before {
                self.fail(
                    op,
                    input,
                    format!("{} but wrote something: {} became {}", outcome.kind(), cut(&before), cut(&after)),
                );
            }
        }
        outcome
    }

    /// A call that must write nothing whatever it answers.
    fn unchanged<T>(&mut self, op: &str, input: &str, f: impl FnOnce() -> StoreResult<T>) -> Outcome<T> {
        let before = (self.snapshot)();
        let outcome = self.call(op, input, f);
        let after = (self.snapshot)();
        if after != before {
            self.fail(
                op,
                input,
                format!("{} and wrote something: {} became {}", outcome.kind(), cut(&before), cut(&after)),
            );
        }
        outcome
    }

    /// The outcome must be accepted exactly when `accepted` says.
    fn expect_accepted_iff<T>(&mut self, outcome: &Outcome<T>, accepted: bool, op: &str, input: &str) {
        if matches!(outcome, Outcome::Broken) {
            return;
        }
        let want = if accepted { "accepted" } else { "Invalid" };
        let matches = if accepted { outcome.is_accepted() } else { matches!(outcome, Outcome::Refused(_)) };
        self.expect(matches, op, input, || format!("{}, expected {want} by its documented rule", outcome.kind()));
    }

    /// Fails the test with every broken rule, the first 50 in full.
    fn finish(self, started: Instant) {
        eprintln!(
            "{}: {} calls, {} failures, {:.1} s",
            self.test,
            self.calls,
            self.failures.len(),
            started.elapsed().as_secs_f64()
        );
        if self.failures.is_empty() {
            return;
        }
        let shown: Vec<&str> = self.failures.iter().take(50).map(String::as_str).collect();
        panic!(
            "{}: {} of {} calls broke the rule; the first {}:\n  {}",
            self.test,
            self.failures.len(),
            self.calls,
            shown.len(),
            shown.join("\n  ")
        );
    }
}

fn cut(text: &str) -> String {
    if text.len() <= 300 {
        return text.to_owned();
    }
    let head: String = text.chars().take(120).collect();
    format!("{head}… ({} bytes)", text.len())
}

// ---------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------

/// What each table holds, cheaply: its row count and newest row version
/// (`xmin`). Any committed insert, update or delete changes it; a refused
/// write leaves it as it was (the idea of dployr-pg's store fixture).
fn fingerprint(conn: &mut PgConnection) -> String {
    #[derive(QueryableByName, Debug)]
    struct Table {
        #[diesel(sql_type = BigInt)]
        rows: i64,
        #[diesel(sql_type = BigInt)]
        newest: i64,
    }
    let sql = ["users", "clusters", "user_clusters", "instances", "bootstrap_tokens", "cluster_counts", "kv_entries"]
        .iter()
        .enumerate()
        .map(|(n, table)| {
            format!("SELECT {n} AS n, count(*) AS rows, coalesce(max(xmin::text::bigint), 0) AS newest FROM {table}")
        })
        .collect::<Vec<_>>()
        .join(" UNION ALL ")
        + " ORDER BY n";
    let tables = diesel::sql_query(sql).load::<Table>(conn).unwrap();
    format!("{:?}", tables.iter().map(|t| (t.rows, t.newest)).collect::<Vec<_>>())
}

/// A data layer on a fresh database (key-value store in its `kv_entries`),
/// and a checker whose snapshot is that database's fingerprint.
fn data_layer(test: &'static str) -> (TestDatabase, DataLayer, Checker) {
    let db = dployr_testkit::database();
    let (config, _) = config(&db, Kv::Postgres);
    let data = DataLayer::open(config).unwrap();
    let mut inspector = db.connect();
    let checker = Checker::new(test, Box::new(move || fingerprint(&mut inspector)));
    (db, data, checker)
}

fn email(address: &str) -> Email {
    Email::parse(address).unwrap()
}

// ---------------------------------------------------------------------------
// Users and invitations, by e-mail
// ---------------------------------------------------------------------------

/// Every e-mail candidate is refused by `Email::parse` or becomes one user
/// found under its normalised address, whose default name and cluster name
/// (the local part) obey the name rules, and who can be invited; the invites
/// listing, paged through cursors that carry those addresses, holds each
/// invitee once, in byte order.
#[test]
fn hostile_emails_are_refused_or_become_one_user_found_and_invited_as_parsed() {
    let started = Instant::now();
    let (_db, data, mut check) = data_layer("emails");
    let owner = data.users().upsert(NewUser::new(email("owner@example.io"), Provider::Github)).unwrap();
    let cluster = data.clusters().create_for_owner(&owner.id).unwrap();
    let corpus = corpus();
    let candidates = email_candidates(&corpus);
    let mut users: HashMap<String, UserId> = HashMap::from([(owner.email.to_string(), owner.id)]);
    let mut invited = BTreeSet::new();
    for text in &candidates {
        let Some(parsed) = check.call("Email::parse", text, || Email::parse(text)).accepted() else { continue };
        let stored = parsed.as_str().to_owned();
        // The stored form is a fixed point, within the limits.
        check.expect_eq(Email::parse(&stored).ok(), Some(parsed.clone()), "Email::parse(stored form)", text);
        check.expect(stored.len() <= MAX_EMAIL_BYTES, "Email::parse", text, || format!("{stored:?} too long"));
        check.expect(parsed.local_part().len() <= MAX_LOCAL_PART_BYTES, "Email::parse", text, || {
            format!("{stored:?} has a local part over the limit")
        });
        let known = users.get(&stored).copied();
        if known.is_none() {
            if let Some(found) =
                check.call("users.get_by_email", text, || data.users().get_by_email(&parsed)).accepted()
            {
                check.expect(found.is_none(), "users.get_by_email(before upsert)", text, || format!("found {found:?}"));
            }
            // An update of nobody finds nobody and writes nothing.
            let patch = UserPatch { name: Some("x".try_into().unwrap()), ..UserPatch::default() };
            let updated = check.unchanged("users.update(nobody)", text, || data.users().update(&parsed, patch));
            if let Some(got) = updated.accepted() {
                check.expect(got.is_none(), "users.update(nobody)", text, || format!("updated {got:?}"));
            }
        }
        let Some(user) = check
            .write("users.upsert", text, || data.users().upsert(NewUser::new(parsed.clone(), Provider::Github)))
            .accepted()
        else {
            continue;
        };
        check.expect_eq(&user.email, &parsed, "users.upsert", text);
        if let Some(id) = known {
            check.expect_eq(user.id, id, "users.upsert(same address again)", text);
            continue;
        }
        users.insert(stored.clone(), user.id);
        // A new user is named after the local part: a name the name rule keeps as it is.
        check.expect_eq(user.name.as_str(), parsed.local_part(), "users.upsert(default name)", text);
        check.expect_eq(
            DisplayName::parse(parsed.local_part()).ok().map(DisplayName::into_string),
            Some(parsed.local_part().to_owned()),
            "DisplayName::parse(local part)",
            text,
        );
        if let Some(found) = check.call("users.get_by_email", text, || data.users().get_by_email(&parsed)).accepted() {
            check.expect_eq(found.map(|u| u.id), Some(user.id), "users.get_by_email", text);
        }
        if let Some(found) = check.call("users.get", text, || data.users().get(&user.id)).accepted() {
            check.expect_eq(found.map(|u| u.email), Some(parsed.clone()), "users.get", text);
        }
        // Their own cluster, named after the local part too.
        if let Some(own) =
            check.write("clusters.create_for_owner", text, || data.clusters().create_for_owner(&user.id)).accepted()
        {
            check.expect_eq(own.name.as_str(), parsed.local_part(), "clusters.create_for_owner(name)", text);
            check.expect_eq(
                ClusterName::parse(&own.name).ok().map(ClusterName::into_string),
                Some(own.name.clone()),
                "ClusterName::parse(cluster named after the local part)",
                text,
            );
        }
        // Invited to the owner's cluster by address.
        if let Some(members) = check
            .write("clusters.add_users", text, || data.clusters().add_users(&cluster.id, std::slice::from_ref(&parsed)))
            .accepted()
        {
            check.expect_eq(
                members.iter().map(|m| (m.user_id, m.email.clone())).collect::<Vec<_>>(),
                vec![(user.id, parsed.clone())],
                "clusters.add_users",
                text,
            );
            invited.insert(stored.clone());
        }
        if let Some(pending) =
            check.call("clusters.pending_invites", text, || data.clusters().pending_invites(&user.id)).accepted()
        {
            check.expect_eq(
                pending.iter().map(|p| p.cluster_id).collect::<Vec<_>>(),
                vec![cluster.id],
                "clusters.pending_invites",
                text,
            );
        }
    }
    // Every invitee once, in byte order, through cursors that carry their addresses.
    let mut listed = Vec::new();
    let mut next_page = Some(Page::first(7));
    while let Some(page) = next_page.take() {
        let Some(paged) =
            check.call("clusters.invites", "<paging>", || data.clusters().invites(&cluster.id, &page)).accepted()
        else {
            break;
        };
        check.expect_eq(paged.total, invited.len() as u64, "clusters.invites(total)", "<paging>");
        listed.extend(paged.items.iter().map(|m| m.email.to_string()));
        // The cursor is its listing and cluster, then the last invitee's
        // rank and address, as this test forges them.
        if let (Some(next), Some(last)) = (&paged.next, paged.items.last()) {
            let forged = base64url(format!("invites {}\n4\n{}", cluster.id, last.email).as_bytes());
            check.expect_eq(next.as_str(), forged.as_str(), "clusters.invites(cursor)", last.email.as_str());
        }
        // A listing that never ends would page forever: stop once past the total.
        next_page = paged.next.filter(|_| listed.len() <= invited.len()).map(|next| Page::after(next, 7));
    }
    check.expect_eq(&listed, &invited.iter().cloned().collect::<Vec<_>>(), "clusters.invites(all pages)", "<paging>");
    eprintln!(
        "emails: a corpus of {} strings, {} e-mail candidates, {} users",
        corpus.len(),
        candidates.len(),
        users.len()
    );
    check.finish(started);
}

// ---------------------------------------------------------------------------
// Names and pictures
// ---------------------------------------------------------------------------

/// Display and cluster names are refused or stored as parsed, and the copies
/// a member listing shows agree; a picture is refused exactly when its rule
/// says (too long, a control character) and otherwise stored as given, a
/// blank one giving none.
#[test]
fn hostile_names_and_pictures_are_refused_or_read_back_as_parsed() {
    let started = Instant::now();
    let (_db, data, mut check) = data_layer("names and pictures");
    let ada = email("ada@example.io");
    let user = data.users().upsert(NewUser::new(ada.clone(), Provider::Github)).unwrap();
    let cluster = data.clusters().create_for_owner(&user.id).unwrap();
    let mut picture: Option<String> = None;
    for text in &corpus() {
        if let Some(name) = check.call("DisplayName::parse", text, || DisplayName::parse(text)).accepted() {
            check.expect_eq(
                DisplayName::parse(name.as_str()).ok(),
                Some(name.clone()),
                "DisplayName::parse(parsed)",
                text,
            );
            check.expect(name.as_str().len() <= MAX_USER_TEXT_BYTES, "DisplayName::parse", text, || "too long".into());
            let sign_in = NewUser { name: Some(name.clone()), ..NewUser::new(ada.clone(), Provider::Github) };
            if let Some(got) = check.write("users.upsert(name)", text, || data.users().upsert(sign_in)).accepted() {
                check.expect_eq(got.name.as_str(), name.as_str(), "users.upsert(name)", text);
            }
            let patch = UserPatch { name: Some(name.clone()), ..UserPatch::default() };
            if let Some(got) = check.write("users.update(name)", text, || data.users().update(&ada, patch)).accepted() {
                check.expect_eq(got.map(|u| u.name), Some(name.as_str().to_owned()), "users.update(name)", text);
            }
            if let Some(got) = check
                .call("clusters.members", text, || data.clusters().members(&cluster.id, &Page::first(1)))
                .accepted()
            {
                check.expect_eq(
                    got.items.first().map(|m| m.name.as_str()),
                    Some(name.as_str()),
                    "clusters.members(name copy)",
                    text,
                );
            }
        }
        if let Some(name) = check.call("ClusterName::parse", text, || ClusterName::parse(text)).accepted() {
            check.expect_eq(
                ClusterName::parse(name.as_str()).ok(),
                Some(name.clone()),
                "ClusterName::parse(parsed)",
                text,
            );
            let patch = ClusterPatch { name: Some(name.clone()), ..ClusterPatch::default() };
            if let Some(got) =
                check.write("clusters.update(name)", text, || data.clusters().update(&cluster.id, patch)).accepted()
            {
                check.expect_eq(got.map(|c| c.name), Some(name.as_str().to_owned()), "clusters.update(name)", text);
            }
            if let Some(got) =
                check.call("clusters.user_clusters", text, || data.clusters().user_clusters(&user.id)).accepted()
            {
                check.expect_eq(
                    got.first().map(|c| c.name.as_str()),
                    Some(name.as_str()),
                    "clusters.user_clusters(name)",
                    text,
                );
            }
        }
        // A picture is stored as given: refused only when too long or with a control character.
        let allowed = text.len() <= MAX_USER_TEXT_BYTES && !text.chars().any(char::is_control);
        // Blank: showing nothing (`text::is_blank`, whose own oracle is in
        // the bad-input property of `dployr-pg`).
        let blank = dployr_domain::text::is_blank(text);
        let sign_in = NewUser { picture: Some(text.clone()), ..NewUser::new(ada.clone(), Provider::Github) };
        let upserted = check.write("users.upsert(picture)", text, || data.users().upsert(sign_in));
        check.expect_accepted_iff(&upserted, allowed, "users.upsert(picture)", text);
        if let Some(got) = upserted.accepted() {
            // A blank picture at sign-in keeps the stored one.
            if !blank {
                picture = Some(text.clone());
            }
            check.expect_eq(&got.picture, &picture, "users.upsert(picture)", text);
        }
        let patch = UserPatch { picture: Some(text.clone()), ..UserPatch::default() };
        let updated = check.write("users.update(picture)", text, || data.users().update(&ada, patch));
        check.expect_accepted_iff(&updated, allowed, "users.update(picture)", text);
        if let Some(got) = updated.accepted() {
            // A blank picture in an update removes it.
            picture = (!blank).then(|| text.clone());
            check.expect_eq(got.and_then(|u| u.picture), picture.clone(), "users.update(picture)", text);
        }
        if allowed && let Some(got) = check.call("users.get", text, || data.users().get(&user.id)).accepted() {
            check.expect_eq(got.and_then(|u| u.picture), picture.clone(), "users.get(picture)", text);
        }
        if allowed
            && let Some(got) = check
                .call("clusters.members", text, || data.clusters().members(&cluster.id, &Page::first(1)))
                .accepted()
        {
            check.expect_eq(
                got.items.first().and_then(|m| m.picture.clone()),
                picture.clone(),
                "clusters.members(picture copy)",
                text,
            );
        }
    }
    check.finish(started);
}

// ---------------------------------------------------------------------------
// Tags, addresses and bootstrap nonces
// ---------------------------------------------------------------------------

/// Tags, addresses and nonces are refused or stored as parsed and found by
/// what was parsed; two spellings that parse alike conflict as the same
/// value; an unknown nonce counts as used and cannot be marked; the
/// instance listing pages through every instance once.
#[test]
fn hostile_tags_addresses_and_nonces_are_refused_or_found_as_parsed() {
    let started = Instant::now();
    let (_db, data, mut check) = data_layer("tags, addresses and nonces");
    let owner = data.users().upsert(NewUser::new(email("owner@example.io"), Provider::Github)).unwrap();
    let cluster = data.clusters().create_for_owner(&owner.id).unwrap();
    let host = data
        .instances()
        .create(
            &cluster.id,
            NewInstance {
                address: "host.example".try_into().unwrap(),
                tag: "host".try_into().unwrap(),
                metadata: None,
            },
        )
        .unwrap();
    let mut tags: HashMap<String, InstanceId> = HashMap::from([("host".to_owned(), host.id)]);
    let mut addresses: HashSet<String> = HashSet::from(["host.example".to_owned()]);
    let mut nonces: HashSet<String> = HashSet::new();
    let mut created = BTreeSet::from([host.id]);
    for (n, text) in corpus().iter().enumerate() {
        if let Some(tag) = check.call("Tag::parse", text, || Tag::parse(text)).accepted() {
            identifier_is_clean(
                &mut check,
                "Tag::parse",
                text,
                tag.as_str(),
                MAX_TAG_BYTES,
                Tag::parse(tag.as_str()).ok().as_ref() == Some(&tag),
            );
            let taken = tags.get(tag.as_str()).copied();
            let address = Address::parse(&format!("tag-{n}.example")).unwrap();
            let new = NewInstance { address: address.clone(), tag: tag.clone(), metadata: None };
            if let Some(got) = check
                .write_expecting("instances.create(tag)", text, taken.is_some(), || {
                    data.instances().create(&cluster.id, new)
                })
                .accepted()
            {
                check.expect_eq(
                    (got.tag.as_str(), got.address.as_str()),
                    (tag.as_str(), address.as_str()),
                    "instances.create(tag)",
                    text,
                );
                tags.insert(tag.as_str().to_owned(), got.id);
                addresses.insert(address.as_str().to_owned());
                created.insert(got.id);
            }
            if let Some(found) =
                check.call("instances.get_by_tag", text, || data.instances().get_by_tag(&tag)).accepted()
            {
                check.expect_eq(found.map(|i| i.id), tags.get(tag.as_str()).copied(), "instances.get_by_tag", text);
            }
        }
        if let Some(address) = check.call("Address::parse", text, || Address::parse(text)).accepted() {
            identifier_is_clean(
                &mut check,
                "Address::parse",
                text,
                address.as_str(),
                MAX_ADDRESS_BYTES,
                Address::parse(address.as_str()).ok().as_ref() == Some(&address),
            );
            let taken = addresses.contains(address.as_str());
            let tag = Tag::parse(&format!("address-{n}")).unwrap();
            let new = NewInstance { address: address.clone(), tag: tag.clone(), metadata: None };
            if let Some(got) = check
                .write_expecting("instances.create(address)", text, taken, || data.instances().create(&cluster.id, new))
                .accepted()
            {
                check.expect_eq(got.address.as_str(), address.as_str(), "instances.create(address)", text);
                addresses.insert(address.as_str().to_owned());
                tags.insert(tag.as_str().to_owned(), got.id);
                created.insert(got.id);
                if let Some(found) = check.call("instances.get", text, || data.instances().get(&got.id)).accepted() {
                    check.expect_eq(
                        found.map(|i| i.address),
                        Some(address.as_str().to_owned()),
                        "instances.get(address)",
                        text,
                    );
                }
            }
        }
        if let Some(nonce) = check.call("Nonce::parse", text, || Nonce::parse(text)).accepted() {
            identifier_is_clean(
                &mut check,
                "Nonce::parse",
                text,
                nonce.as_str(),
                MAX_TAG_BYTES,
                Nonce::parse(nonce.as_str()).ok().as_ref() == Some(&nonce),
            );
            let issued = nonces.contains(nonce.as_str());
            // Unknown, or issued and used below: used either way, and not markable.
            if let Some(used) =
                check.call("bootstrap_tokens.is_used", text, || data.bootstrap_tokens().is_used(&nonce)).accepted()
            {
                check.expect(used, "bootstrap_tokens.is_used(before)", text, || {
                    "an unknown or used nonce reads as unused".into()
                });
            }
            let marked = check.write("bootstrap_tokens.mark_used", text, || data.bootstrap_tokens().mark_used(&nonce));
            check.expect(
                !matches!(marked, Outcome::Accepted(true)),
                "bootstrap_tokens.mark_used(before)",
                text,
                || "marked a token never issued or already used".into(),
            );
            let token = check.write_expecting("bootstrap_tokens.create", text, issued, || {
                data.bootstrap_tokens().create(&host.id, &nonce)
            });
            if let Some(token) = token.accepted() {
                nonces.insert(nonce.as_str().to_owned());
                check.expect_eq(
                    (token.nonce.as_str(), token.instance_id, token.used_at),
                    (nonce.as_str(), host.id, None),
                    "bootstrap_tokens.create",
                    text,
                );
                let steps = [
                    ("bootstrap_tokens.is_used(issued)", false),
                    ("bootstrap_tokens.mark_used(first)", true),
                    ("bootstrap_tokens.mark_used(second)", false),
                    ("bootstrap_tokens.is_used(after)", true),
                ];
                for (op, want) in steps {
                    let got = if op.contains("mark_used") {
                        check.call(op, text, || data.bootstrap_tokens().mark_used(&nonce))
                    } else {
                        check.call(op, text, || data.bootstrap_tokens().is_used(&nonce))
                    };
                    if let Some(got) = got.accepted() {
                        check.expect_eq(got, want, op, text);
                    }
                }
            }
        }
    }
    // Every instance once, newest first, through the listing's cursors.
    let mut listed = Vec::new();
    let mut next_page = Some(Page::first(13));
    while let Some(page) = next_page.take() {
        let Some(paged) = check
            .call("instances.list_by_cluster", "<paging>", || data.instances().list_by_cluster(&cluster.id, &page))
            .accepted()
        else {
            break;
        };
        check.expect_eq(paged.total, created.len() as u64, "instances.list_by_cluster(total)", "<paging>");
        listed.extend(paged.items.iter().map(|i| i.id));
        next_page = paged.next.filter(|_| listed.len() <= created.len()).map(|next| Page::after(next, 13));
    }
    check.expect_eq(
        listed.iter().copied().collect::<BTreeSet<_>>(),
        created.clone(),
        "instances.list_by_cluster(all pages)",
        "<paging>",
    );
    check.expect_eq(listed.len(), created.len(), "instances.list_by_cluster(no repeats)", "<paging>");
    check.finish(started);
}

/// What every accepted identifier must be: a fixed point of its parse,
/// within its limit, with no white space or control character.
fn identifier_is_clean(check: &mut Checker, op: &str, text: &str, value: &str, max: usize, fixed_point: bool) {
    check.expect(fixed_point, op, text, || format!("{value:?} does not parse to itself"));
    check.expect(value.len() <= max, op, text, || format!("{} bytes, over {max}", value.len()));
    check.expect(!value.chars().any(|c| c.is_whitespace() || c.is_control()), op, text, || {
        format!("{value:?} holds white space or a control character")
    });
}

// ---------------------------------------------------------------------------
// Ids and cursors
// ---------------------------------------------------------------------------

/// Ids parsed from hostile text are refused or look up exactly the entity
/// they name (a lower-case spelling included); writes on an id of nothing
/// are `NotFound` and write nothing (an invitation to a cluster that does
/// not exist creates no user); hostile and forged cursors are refused or
/// give a page, never an error of the database.
#[test]
fn hostile_ids_and_cursors_are_refused_or_look_up_what_they_name() {
    let started = Instant::now();
    let (_db, data, mut check) = data_layer("ids and cursors");
    let owner = data.users().upsert(NewUser::new(email("owner@example.io"), Provider::Github)).unwrap();
    let cluster = data.clusters().create_for_owner(&owner.id).unwrap();
    let guest = data.clusters().add_users(&cluster.id, &[email("guest@example.io")]).unwrap()[0].user_id;
    let instance = data
        .instances()
        .create(
            &cluster.id,
            NewInstance {
                address: "host.example".try_into().unwrap(),
                tag: "host".try_into().unwrap(),
                metadata: None,
            },
        )
        .unwrap();
    let users = [owner.id, guest];
    let mut texts = corpus();
    for real in [owner.id.to_string(), guest.to_string(), cluster.id.to_string(), instance.id.to_string()] {
        texts.extend([
            real.to_lowercase(),
            format!(" {real} "),
            format!("{real}\u{0}"),
            format!("{real}0"),
            real[1..].to_owned(),
            format!("8{}", &real[1..]),
            real.replace('0', "O"),
            real.replace('1', "I"),
            real.clone(),
        ]);
    }
    let unknown_email = email("nobody-yet@example.io");
    for text in &texts {
        if let Some(id) = check.call("UserId::parse", text, || UserId::parse(text)).accepted() {
            check.expect_eq(UserId::parse(&id.to_string()).ok(), Some(id), "UserId::parse(its text)", text);
            let real = users.contains(&id);
            if let Some(found) = check.call("users.get", text, || data.users().get(&id)).accepted() {
                check.expect_eq(found.map(|u| u.id), real.then_some(id), "users.get", text);
            }
            check.call("clusters.pending_invites", text, || data.clusters().pending_invites(&id));
            check.call("clusters.owned_cluster", text, || data.clusters().owned_cluster(&id));
            if let Some(role) =
                check.call("clusters.role_of", text, || data.clusters().role_of(&id, &cluster.id)).accepted()
            {
                check.expect_eq(role.is_some(), real, "clusters.role_of", text);
            }
            if !real {
                let deleted = check.write("users.delete(unknown)", text, || data.users().delete(&id));
                check.expect(
                    matches!(deleted, Outcome::Missing | Outcome::Broken),
                    "users.delete(unknown)",
                    text,
                    || deleted.kind(),
                );
                let made =
                    check.write("clusters.create_for_owner(unknown)", text, || data.clusters().create_for_owner(&id));
                check.expect(
                    matches!(made, Outcome::Missing | Outcome::Broken),
                    "clusters.create_for_owner(unknown)",
                    text,
                    || made.kind(),
                );
                let accepted = check
                    .write("clusters.accept_invite(unknown)", text, || data.clusters().accept_invite(&id, &cluster.id));
                check.expect(!accepted.is_accepted(), "clusters.accept_invite(unknown)", text, || {
                    "accepted an invitation of nobody".into()
                });
            }
        }
        if let Some(id) = check.call("ClusterId::parse", text, || ClusterId::parse(text)).accepted() {
            check.expect_eq(ClusterId::parse(&id.to_string()).ok(), Some(id), "ClusterId::parse(its text)", text);
            let real = id == cluster.id;
            if let Some(found) = check.call("clusters.get", text, || data.clusters().get(&id)).accepted() {
                check.expect_eq(found.map(|c| c.id), real.then_some(id), "clusters.get", text);
            }
            check.call("clusters.members", text, || data.clusters().members(&id, &Page::first(5)));
            check.call("instances.list_by_cluster", text, || data.instances().list_by_cluster(&id, &Page::first(5)));
            if !real {
                let invited = check.write("clusters.add_users(unknown cluster)", text, || {
                    data.clusters().add_users(&id, std::slice::from_ref(&unknown_email))
                });
                check.expect(
                    matches!(invited, Outcome::Missing | Outcome::Broken),
                    "clusters.add_users(unknown cluster)",
                    text,
                    || invited.kind(),
                );
                let deleted = check.write("clusters.delete(unknown)", text, || data.clusters().delete(&id));
                check.expect(
                    matches!(deleted, Outcome::Missing | Outcome::Broken),
                    "clusters.delete(unknown)",
                    text,
                    || deleted.kind(),
                );
                let patch = ClusterPatch { name: Some("x".try_into().unwrap()), ..ClusterPatch::default() };
                if let Some(updated) =
                    check.write("clusters.update(unknown)", text, || data.clusters().update(&id, patch)).accepted()
                {
                    check.expect(updated.is_none(), "clusters.update(unknown)", text, || {
                        "updated a cluster that does not exist".into()
                    });
                }
                let made = check.write("instances.create(unknown cluster)", text, || {
                    data.instances().create(
                        &id,
                        NewInstance { address: "x.example".try_into()?, tag: "x".try_into()?, metadata: None },
                    )
                });
                check.expect(
                    matches!(made, Outcome::Missing | Outcome::Broken),
                    "instances.create(unknown cluster)",
                    text,
                    || made.kind(),
                );
                check.call("clusters.integrations(unknown)", text, || data.clusters().integrations(&id));
            }
        }
        if let Some(id) = check.call("InstanceId::parse", text, || InstanceId::parse(text)).accepted() {
            let real = id == instance.id;
            if let Some(found) = check.call("instances.get", text, || data.instances().get(&id)).accepted() {
                check.expect_eq(found.map(|i| i.id), real.then_some(id), "instances.get", text);
            }
            if !real {
                let deleted = check.write("instances.delete(unknown)", text, || data.instances().delete(&id));
                check.expect(
                    matches!(deleted, Outcome::Missing | Outcome::Broken),
                    "instances.delete(unknown)",
                    text,
                    || deleted.kind(),
                );
                let nonce = Nonce::parse("never-issued").unwrap();
                let made = check.write("bootstrap_tokens.create(unknown instance)", text, || {
                    data.bootstrap_tokens().create(&id, &nonce)
                });
                check.expect(
                    matches!(made, Outcome::Missing | Outcome::Broken),
                    "bootstrap_tokens.create(unknown instance)",
                    text,
                    || made.kind(),
                );
                if let Some(updated) = check
                    .write("instances.update_metadata(unknown)", text, || {
                        data.instances().update_metadata(&id, Metadata::new())
                    })
                    .accepted()
                {
                    check.expect(updated.is_none(), "instances.update_metadata(unknown)", text, || {
                        "updated an instance that does not exist".into()
                    });
                }
            }
        }
        // Cursors: the text itself, and forged ones that decode to a cursor
        // of each listing (of this cluster, and in the form without one)
        // with the text where its sort key goes.
        if text.len() <= 2 * MAX_CURSOR_BYTES {
            let id = &cluster.id;
            let forged = [
                text.clone(),
                base64url(text.as_bytes()),
                base64url(format!("members {id}\n{text}\n{text}").as_bytes()),
                base64url(format!("members {id}\n0\n{text}").as_bytes()),
                base64url(format!("invites {id}\n4\n{text}").as_bytes()),
                base64url(format!("invites\n4\n{text}").as_bytes()),
                base64url(format!("instances {id}\n{text}\n{text}").as_bytes()),
                base64url(format!("instances {id}\n0\n{text}").as_bytes()),
                base64url(format!("instances {id}\n1700000000000000\n{text}").as_bytes()),
            ];
            for cursor in forged {
                let page = Page::after(Cursor::new(cursor), 5);
                check.call("clusters.members(cursor)", text, || data.clusters().members(&cluster.id, &page));
                check.call("clusters.invites(cursor)", text, || data.clusters().invites(&cluster.id, &page));
                check.call("instances.list_by_cluster(cursor)", text, || {
                    data.instances().list_by_cluster(&cluster.id, &page)
                });
            }
        }
    }
    // Offsets past what PostgreSQL's bigint holds are refused, not sent.
    for offset in [i64::MAX as u64, i64::MAX as u64 + 1, u64::MAX] {
        let page = Page::offset(offset, 5);
        let input = offset.to_string();
        let listed = check.call("clusters.members(offset)", &input, || data.clusters().members(&cluster.id, &page));
        check.expect_accepted_iff(&listed, offset <= i64::MAX as u64, "clusters.members(offset)", &input);
        let listed = check
            .call("instances.list_by_cluster(offset)", &input, || data.instances().list_by_cluster(&cluster.id, &page));
        check.expect_accepted_iff(&listed, offset <= i64::MAX as u64, "instances.list_by_cluster(offset)", &input);
    }
    check.expect_eq(
        data.users().get_by_email(&unknown_email).unwrap(),
        None,
        "users.get_by_email(never invited)",
        unknown_email.as_str(),
    );
    check.finish(started);
}

// ---------------------------------------------------------------------------
// Metadata and GitHub login ids
// ---------------------------------------------------------------------------

/// Metadata whose keys and values are hostile strings is refused exactly
/// when it holds a NUL (or is too large) and otherwise reads back equal
/// from instances, users and clusters; hostile JSON text is refused or
/// stored as parsed; a GitHub login id is refused exactly when its rule
/// says, and otherwise finds the cluster linked to it.
#[test]
fn hostile_metadata_and_login_ids_are_refused_or_read_back_equal() {
    let started = Instant::now();
    let (_db, data, mut check) = data_layer("metadata and login ids");
    let ada = email("ada@example.io");
    let user = data.users().upsert(NewUser::new(ada.clone(), Provider::Github)).unwrap();
    let cluster = data.clusters().create_for_owner(&user.id).unwrap();
    let instance = data
        .instances()
        .create(
            &cluster.id,
            NewInstance {
                address: "host.example".try_into().unwrap(),
                tag: "host".try_into().unwrap(),
                metadata: None,
            },
        )
        .unwrap();
    // A second user whose sign-ins merge every hostile key into their
    // metadata and into the cluster they own, until the merged object
    // passes 128 KiB and merges are refused.
    let hoarder = email("hoarder@example.io");
    let hoarder_id = data.users().upsert(NewUser::new(hoarder.clone(), Provider::Github)).unwrap().id;
    let hoard = data.clusters().create_for_owner(&hoarder_id).unwrap().id;
    for text in &corpus() {
        let has_nul = text.contains('\0');
        // Small and NUL-free: nothing in the rule refuses it.
        let must_accept = !has_nul && text.len() < 8 * 1024;
        let keyed =
            check.call("Metadata::try_from({s: s})", text, || Metadata::try_from(json!({ text.as_str(): text })));
        if has_nul || must_accept {
            check.expect_accepted_iff(&keyed, must_accept, "Metadata::try_from({s: s})", text);
        }
        let json_text = serde_json::to_string(&json!({ text.as_str(): [text, { text.as_str(): text }] })).unwrap();
        let parsed =
            check.call("str::parse::<Metadata>(JSON of {s: [s, {s: s}]})", text, || json_text.parse::<Metadata>());
        if has_nul || must_accept {
            check.expect_accepted_iff(&parsed, must_accept, "str::parse::<Metadata>(JSON of {s: [s, {s: s}]})", text);
        }
        let raw = check.call("str::parse::<Metadata>(s)", text, || text.parse::<Metadata>());
        if let Outcome::Accepted(metadata) = &keyed {
            let sign_in =
                NewUser { metadata: Some(metadata.clone()), ..NewUser::new(hoarder.clone(), Provider::Github) };
            let merged = check.write("users.upsert(merging {s: s})", text, || data.users().upsert(sign_in));
            check.expect(
                matches!(merged, Outcome::Accepted(_) | Outcome::Refused("metadata") | Outcome::Broken),
                "users.upsert(merging {s: s})",
                text,
                || merged.kind(),
            );
            if let Some(got) = merged.accepted() {
                check.expect_eq(
                    got.metadata.get(text.as_str()),
                    Some(&json!(text)),
                    "users.upsert(merging {s: s})",
                    text,
                );
                if let Some(got) =
                    check.call("clusters.get(merged from sign-in)", text, || data.clusters().get(&hoard)).accepted()
                {
                    check.expect_eq(
                        got.and_then(|c| c.metadata.get(text.as_str()).cloned()),
                        Some(json!(text)),
                        "clusters.get(merged from sign-in)",
                        text,
                    );
                }
            }
        }
        for (op, metadata) in [
            ("instances.update_metadata({s: s})", keyed.accepted()),
            ("instances.update_metadata(parsed s)", raw.accepted()),
            ("instances.update_metadata(parsed JSON)", parsed.accepted()),
        ] {
            let Some(metadata) = metadata else { continue };
            let updated = check.write(op, text, || data.instances().update_metadata(&instance.id, metadata.clone()));
            if let Some(got) = updated.accepted() {
                check.expect_eq(got.map(|i| i.metadata), Some(metadata.clone()), op, text);
            }
            if let Some(got) =
                check.call("instances.get(metadata)", text, || data.instances().get(&instance.id)).accepted()
            {
                check.expect_eq(got.map(|i| i.metadata), Some(metadata), "instances.get(metadata)", text);
            }
        }
        // Under one key, so merges replace it and the object stays small.
        if let Some(metadata) =
            check.call("Metadata::try_from({k: s})", text, || Metadata::try_from(json!({ "k": text }))).accepted()
        {
            let patch = UserPatch { metadata: Some(metadata.clone()), ..UserPatch::default() };
            if let Some(got) =
                check.write("users.update(metadata)", text, || data.users().update(&ada, patch)).accepted()
            {
                check.expect_eq(
                    got.and_then(|u| u.metadata.get("k").cloned()),
                    Some(json!(text)),
                    "users.update(metadata)",
                    text,
                );
            }
            let patch = ClusterPatch { metadata: Some(metadata), ..ClusterPatch::default() };
            if let Some(got) =
                check.write("clusters.update(metadata)", text, || data.clusters().update(&cluster.id, patch)).accepted()
            {
                check.expect_eq(
                    got.and_then(|c| c.metadata.get("k").cloned()),
                    Some(json!(text)),
                    "clusters.update(metadata)",
                    text,
                );
            }
        }
        // A login id: refused when blank (showing nothing), over 255 bytes or with a control
        // character; otherwise it finds the cluster linked to it.
        let link = Metadata::try_from(json!({ "gitHub": { "loginId": text } }));
        let linked = match link {
            Ok(link) => {
                let patch = ClusterPatch { metadata: Some(link), ..ClusterPatch::default() };
                check
                    .write("clusters.update(gitHub.loginId)", text, || data.clusters().update(&cluster.id, patch))
                    .is_accepted()
            }
            Err(_) => false,
        };
        let allowed = !dployr_domain::text::is_blank(text) && text.len() <= 255 && !text.chars().any(char::is_control);
        let settings = Metadata::try_from(json!({ "note": text })).unwrap_or_default();
        let integration = GitHubIntegration { login_id: text.clone(), settings };
        let installed = check.write("clusters.install_github_integration", text, || {
            data.clusters().install_github_integration(integration)
        });
        check.expect_accepted_iff(&installed, allowed, "clusters.install_github_integration", text);
        if let Some(got) = installed.accepted()
            && linked
        {
            check.expect_eq(
                got.as_ref().map(|c| c.id),
                Some(cluster.id),
                "clusters.install_github_integration(finds the link)",
                text,
            );
            check.expect_eq(
                got.and_then(|c| c.metadata.get("gitHub").and_then(|g| g.get("loginId")).cloned()),
                Some(json!(text)),
                "clusters.install_github_integration(loginId)",
                text,
            );
        }
    }
    check.finish(started);
}

// ---------------------------------------------------------------------------
// Sessions, OAuth states and one-time codes
// ---------------------------------------------------------------------------

/// On `store`: a hostile session id, OAuth state or redirect URL is stored
/// and read back exactly once as given (an id or state that is empty or
/// longer than `MAX_SECRET_BYTES` is refused, and found nowhere); a hostile guess of a one-time code
/// is wrong (unless it is the code) and leaves the code usable; every
/// accepted hostile e-mail gets a code that works once.
fn sessions_states_and_codes(store: &KvStore, check: &mut Checker) {
    let user = sample_user(1);
    let holder = email("holder@example.io");
    let corpus = corpus();
    for text in &corpus {
        // What a server can hand out: not empty, and no longer than a cookie.
        let a_secret = !text.is_empty() && text.len() <= dployr_kv::MAX_SECRET_BYTES;
        let state = OAuthState::new(text.clone());
        let created = check.write("kv.create_state", text, || store.create_state(&state, text));
        check.expect_accepted_iff(&created, a_secret, "kv.create_state", text);
        if let Some(got) = check.call("kv.validate_state", text, || store.validate_state(&state)).accepted() {
            check.expect_eq(got.as_deref(), created.is_accepted().then_some(text.as_str()), "kv.validate_state", text);
        }
        if let Some(got) = check.call("kv.validate_state(again)", text, || store.validate_state(&state)).accepted() {
            check.expect_eq(got, None, "kv.validate_state(again)", text);
        }

        let id = SessionId::new(text.clone());
        if let Some(got) = check.call("kv.get_session(before)", text, || store.get_session(&id)).accepted() {
            check.expect_eq(got, None, "kv.get_session(before)", text);
        }
        let clusters =
            vec![ClusterSummary { id: ClusterId::generate(), name: text.clone(), owner_name: Some(text.clone()) }];
        let created = check.write("kv.create_session", text, || store.create_session(&id, &user, clusters));
        check.expect_accepted_iff(&created, a_secret, "kv.create_session", text);
        if let Some(session) = created.accepted()
            && let Some(got) = check.call("kv.get_session", text, || store.get_session(&id)).accepted()
        {
            check.expect_eq(got, Some(session), "kv.get_session", text);
        }
        check.write("kv.delete_session", text, || store.delete_session(&id));
        if let Some(got) = check.call("kv.get_session(after)", text, || store.get_session(&id)).accepted() {
            check.expect_eq(got, None, "kv.get_session(after)", text);
        }

        if text.len() <= 4096 {
            let Some(code) = check.write("kv.create_otp", holder.as_str(), || store.create_otp(&holder)).accepted()
            else {
                continue;
            };
            let right = text.trim().to_ascii_uppercase() == code.expose();
            if let Some(got) = check
                .call("kv.validate_otp(guess)", text, || store.validate_otp(&holder, &OtpCode::new(text.clone())))
                .accepted()
            {
                check.expect_eq(got, right, "kv.validate_otp(guess)", text);
            }
            if !right
                && let Some(got) = check
                    .call("kv.validate_otp(code after a guess)", text, || store.validate_otp(&holder, &code))
                    .accepted()
            {
                check.expect_eq(got, true, "kv.validate_otp(code after a guess)", text);
            }
        }
    }
    // Every accepted hostile e-mail: a code that works once, in lower case too.
    let emails: Vec<Email> =
        email_candidates(&corpus).iter().filter_map(|text| Email::parse(text).ok()).take(200).collect();
    for address in &emails {
        let text = address.as_str();
        // A session of a user with this address reads back with it.
        let id = SessionId::generate();
        let owner = dployr_data::User { email: address.clone(), ..sample_user(2) };
        if let Some(session) = check
            .write("kv.create_session(user's e-mail)", text, || store.create_session(&id, &owner, Vec::new()))
            .accepted()
            && let Some(got) = check.call("kv.get_session(user's e-mail)", text, || store.get_session(&id)).accepted()
        {
            check.expect_eq(got, Some(session), "kv.get_session(user's e-mail)", text);
        }
        let Some(code) = check.write("kv.create_otp", text, || store.create_otp(address)).accepted() else { continue };
        let lower = OtpCode::new(code.expose().to_lowercase());
        if let Some(got) = check.call("kv.validate_otp", text, || store.validate_otp(address, &lower)).accepted() {
            check.expect_eq(got, true, "kv.validate_otp", text);
        }
        if let Some(got) = check.call("kv.validate_otp(again)", text, || store.validate_otp(address, &code)).accepted()
        {
            check.expect_eq(got, false, "kv.validate_otp(again)", text);
        }
    }
    // Every session was deleted one by one: none is left to end.
    if let Some(ended) =
        check.write("kv.delete_user_sessions", "<user>", || store.delete_user_sessions(&user.id)).accepted()
    {
        check.expect_eq(ended, 0, "kv.delete_user_sessions", "<user>");
    }
    // A redirect URL larger than a value may be is refused naming it.
    let huge = "h".repeat(MAX_VALUE_BYTES + 1);
    let state = OAuthState::generate();
    let created = check.write("kv.create_state(huge redirect)", &huge, || store.create_state(&state, &huge));
    check.expect(matches!(created, Outcome::Refused("redirect_url")), "kv.create_state(huge redirect)", &huge, || {
        created.kind()
    });
}

#[test]
fn hostile_session_ids_states_and_codes_round_trip_on_memory() {
    let started = Instant::now();
    let memory = Arc::new(MemoryKv::new());
    let listed = Arc::clone(&memory);
    let mut check = Checker::new("kv store on memory", Box::new(move || entries(listed.as_ref())));
    sessions_states_and_codes(&KvStore::new(memory), &mut check);
    check.finish(started);
}

#[test]
fn hostile_session_ids_states_and_codes_round_trip_on_postgres() {
    let started = Instant::now();
    let db = dployr_testkit::database();
    let pool = PgPool::connect(db.url(), PoolConfig { max_size: 2, ..PoolConfig::default() }).unwrap();
    let mut inspector = db.connect();
    let mut check = Checker::new("kv store on postgres", Box::new(move || fingerprint(&mut inspector)));
    sessions_states_and_codes(&KvStore::new(Arc::new(PgKv::new(pool))), &mut check);
    check.finish(started);
}

/// Every live key of `kv` and the size and first bytes of its value.
fn entries(kv: &dyn KvBackend) -> String {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let page = kv.list("", 1000, cursor.as_deref()).unwrap();
        for key in page.keys {
            let value = kv.get(&key).unwrap().unwrap_or_default();
            out.push(format!("{key:?}={}:{:?}", value.len(), &value[..value.len().min(16)]));
        }
        match page.cursor {
            Some(next) => cursor = Some(next),
            None => return out.join(","),
        }
    }
}

// ---------------------------------------------------------------------------
// Raw key-value backends
// ---------------------------------------------------------------------------

/// On `kv`: a key is refused exactly when `KvLimits::check_key` documents
/// (empty, `.`, `..`, too long, NUL) and otherwise takes its value and
/// gives it back through get, list, replace, take, increment, the counter
/// pair and delete; a prefix and a cursor are refused exactly when their
/// rules say; every hostile value reads back byte for byte; the value
/// limit holds to the byte.
fn raw_backend(kv: &dyn KvBackend, check: &mut Checker, opaque_cursors: bool) {
    let limits = kv.limits();
    let list_limit = limits.min_list_limit.max(10);
    let key_ok = |key: &str| {
        !key.is_empty() && key != "." && key != ".." && key.len() <= limits.max_key_bytes && !key.contains('\0')
    };
    // Keys that a prefix written with LIKE wildcards, escapes or case
    // folding would wrongly match; "value" holds each hostile value in turn.
    let decoys = ["value", "a", "ab", "a_b", "a%b", "A", "\\", "%", "_", "é"];
    for decoy in decoys {
        kv.put(decoy, b"decoy", None).unwrap();
    }
    for text in &corpus() {
        let valid = key_ok(text);
        let put = check.write("kv.put", text, || kv.put(text, text.as_bytes(), None));
        check.expect_accepted_iff(&put, valid, "kv.put", text);
        if put.is_accepted() {
            raw_key_round_trip(kv, check, text, list_limit, key_ok);
            // The round trip deleted it: a decoy goes back.
            if decoys.contains(&text.as_str()) {
                kv.put(text, b"decoy", None).unwrap();
            }
        } else {
            for (op, outcome) in [
                ("kv.get(refused key)", check.call("kv.get", text, || kv.get(text)).kind()),
                ("kv.delete(refused key)", check.write("kv.delete", text, || kv.delete(text)).kind()),
                ("kv.take(refused key)", check.write("kv.take", text, || kv.take(text)).kind()),
                ("kv.increment(refused key)", check.write("kv.increment", text, || kv.increment(text, None)).kind()),
                ("kv.replace(refused key)", check.write("kv.replace", text, || kv.replace(text, b"r", None)).kind()),
            ] {
                check.expect(valid || outcome.starts_with("Invalid") || outcome == "broken", op, text, || {
                    outcome.clone()
                });
            }
        }
        let prefix_ok = text.len() <= limits.max_key_bytes && !text.contains('\0');
        let listed = check.call("kv.list(prefix)", text, || kv.list(text, list_limit, None));
        check.expect_accepted_iff(&listed, prefix_ok, "kv.list(prefix)", text);
        if let Some(page) = listed.accepted() {
            // Exactly the decoys with this prefix, in byte order.
            let mut want: Vec<&str> = decoys.iter().copied().filter(|d| d.starts_with(text.as_str())).collect();
            want.sort_unstable();
            check.expect_eq(&page.keys, &want, "kv.list(prefix, keys)", text);
        }
        let cursor_ok = text.len() <= MAX_CURSOR_BYTES && !text.contains('\0');
        let listed = check.call("kv.list(cursor)", text, || kv.list("", list_limit, Some(text)));
        // A cursor the backend never handed out may be refused by the
        // backend itself where cursors are opaque (Cloudflare's).
        if !(opaque_cursors && cursor_ok) {
            check.expect_accepted_iff(&listed, cursor_ok, "kv.list(cursor)", text);
        }
        // The text as a value under a plain key.
        if check.write("kv.put(value)", text, || kv.put("value", text.as_bytes(), None)).is_accepted()
            && let Some(got) = check.call("kv.get(value)", text, || kv.get("value")).accepted()
        {
            check.expect(got.as_deref() == Some(text.as_bytes()), "kv.get(value)", text, || {
                format!("{} bytes back", got.map_or(0, |v| v.len()))
            });
        }
    }
    for (size, ok) in [(MAX_VALUE_BYTES, true), (MAX_VALUE_BYTES + 1, false)] {
        let value = vec![b'v'; size];
        let input = format!("<{size} bytes>");
        let put = check.write("kv.put(value at the limit)", &input, || kv.put("big", &value, None));
        check.expect_accepted_iff(&put, ok, "kv.put(value at the limit)", &input);
        if ok && let Some(got) = check.call("kv.get(value at the limit)", &input, || kv.get("big")).accepted() {
            check.expect(got.as_deref() == Some(&value[..]), "kv.get(value at the limit)", &input, || {
                "a different value".into()
            });
        }
    }
    check.write("kv.delete", "big", || kv.delete("big"));
    for decoy in decoys {
        check.write("kv.delete", decoy, || kv.delete(decoy));
    }
}

/// A key that `put` took: read, listed, replaced, taken, counted, deleted.
fn raw_key_round_trip(
    kv: &dyn KvBackend,
    check: &mut Checker,
    key: &str,
    list_limit: usize,
    key_ok: impl Fn(&str) -> bool,
) {
    if let Some(got) = check.call("kv.get", key, || kv.get(key)).accepted() {
        check.expect(got.as_deref() == Some(key.as_bytes()), "kv.get", key, || {
            format!("{} bytes back", got.map_or(0, |v| v.len()))
        });
    }
    if let Some(page) = check.call("kv.list(own prefix)", key, || kv.list(key, list_limit, None)).accepted() {
        check.expect(page.keys.iter().any(|k| k == key), "kv.list(own prefix)", key, || {
            format!("keys {:?}", page.keys.iter().map(|k| shown(k)).collect::<Vec<_>>())
        });
        check.expect(page.keys.iter().all(|k| k.starts_with(key)), "kv.list(own prefix)", key, || {
            "a key without the prefix".into()
        });
    }
    if let Some(replaced) = check.call("kv.replace", key, || kv.replace(key, b"replaced", None)).accepted() {
        check.expect_eq(replaced, true, "kv.replace", key);
    }
    if let Some(got) = check.call("kv.take", key, || kv.take(key)).accepted() {
        check.expect_eq(got.as_deref(), Some(&b"replaced"[..]), "kv.take", key);
    }
    if let Some(got) = check.call("kv.get(after take)", key, || kv.get(key)).accepted() {
        check.expect_eq(got, None, "kv.get(after take)", key);
    }
    for want in [1, 2] {
        if let Some(got) = check.call("kv.increment", key, || kv.increment(key, None)).accepted() {
            check.expect_eq(got, want, "kv.increment", key);
        }
    }
    check.write("kv.delete", key, || kv.delete(key));
    // The counter pair of a one-time code, with a counter key derived from it.
    let counter = format!("n:{key}");
    let paired =
        check.write("kv.put_and_reset_counter", key, || kv.put_and_reset_counter(key, b"code", None, &counter));
    check.expect_accepted_iff(&paired, key_ok(&counter), "kv.put_and_reset_counter", key);
    if paired.is_accepted()
        && let Some(got) = check
            .call("kv.count_attempt_and_take_if", key, || kv.count_attempt_and_take_if(&counter, None, 3, key, b"code"))
            .accepted()
    {
        check.expect_eq(got, (1, true), "kv.count_attempt_and_take_if", key);
    }
    check.write("kv.delete", key, || kv.delete(key));
    if key_ok(&counter) {
        check.write("kv.delete(counter)", key, || kv.delete(&counter));
    }
    if let Some(got) = check.call("kv.get(after delete)", key, || kv.get(key)).accepted() {
        check.expect_eq(got, None, "kv.get(after delete)", key);
    }
}

#[test]
fn hostile_keys_values_prefixes_and_cursors_on_the_memory_backend() {
    let started = Instant::now();
    let memory = Arc::new(MemoryKv::new());
    let listed = Arc::clone(&memory);
    let mut check = Checker::new("raw memory kv", Box::new(move || entries(listed.as_ref())));
    raw_backend(memory.as_ref(), &mut check, false);
    check.finish(started);
}

#[test]
fn hostile_keys_values_prefixes_and_cursors_on_the_postgres_backend() {
    let started = Instant::now();
    let db = dployr_testkit::database();
    let pool = PgPool::connect(db.url(), PoolConfig { max_size: 2, ..PoolConfig::default() }).unwrap();
    let mut inspector = db.connect();
    let mut check = Checker::new("raw postgres kv", Box::new(move || fingerprint(&mut inspector)));
    raw_backend(&PgKv::new(pool), &mut check, false);
    check.finish(started);
}

fn cloudflare_config(emulator: &CloudflareEmulator) -> CloudflareConfig {
    CloudflareConfig {
        base_url: emulator.base_url().to_owned(),
        retry: RetryPolicy {
            max_attempts: 2,
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(5),
            max_elapsed: Duration::from_secs(5),
        },
        ..CloudflareConfig::new(emulator.account_id(), emulator.namespace_id(), emulator.api_token())
    }
}

#[test]
fn hostile_keys_values_prefixes_and_cursors_on_the_emulated_cloudflare_backend() {
    let started = Instant::now();
    let emulator = Arc::new(CloudflareEmulator::start());
    let kv = CloudflareKv::new(cloudflare_config(&emulator)).unwrap();
    let listed = Arc::clone(&emulator);
    let mut check = Checker::new(
        "raw cloudflare kv",
        Box::new(move || {
            format!("{:?}", listed.entries().iter().map(|(k, v)| (k.clone(), v.len())).collect::<Vec<_>>())
        }),
    );
    raw_backend(&kv, &mut check, true);
    check.finish(started);
}

// ---------------------------------------------------------------------------
// Configuration and connection strings
// ---------------------------------------------------------------------------

/// Hostile values of every configuration variable are read or refused
/// with a `Configuration` error naming a variable, never a panic; the
/// connection-string readers never panic; a Cloudflare client with hostile
/// credentials answers `Configuration` (fix the deployment), not "try
/// again later".
#[test]
fn hostile_configuration_values_are_refused_naming_their_variable() {
    let started = Instant::now();
    let mut check = Checker::pure("configuration");
    let vars = [
        dployr_data::DATABASE_URL_VAR,
        dployr_data::KV_VAR,
        dployr_data::KV_ONE_TIME_VAR,
        dployr_data::MIGRATE_ON_START_VAR,
        dployr_data::MIGRATE_DATABASE_URL_VAR,
        dployr_data::MIGRATE_LOCK_TIMEOUT_VAR,
        dployr_data::POOL_SIZE_VAR,
        dployr_data::CONNECT_TIMEOUT_VAR,
        dployr_data::STATEMENT_TIMEOUT_VAR,
        dployr_data::STATEMENT_CACHE_VAR,
        dployr_data::CALL_TIMEOUT_VAR,
        dployr_data::DEADLINE_MARGIN_VAR,
        dployr_data::CANCEL_GRACE_VAR,
        dployr_data::CANCEL_ON_DEADLINE_VAR,
        dployr_data::KEEPALIVES_VAR,
        dployr_data::KEEPALIVES_IDLE_VAR,
        dployr_data::KEEPALIVES_INTERVAL_VAR,
        dployr_data::KEEPALIVES_COUNT_VAR,
        dployr_data::TCP_USER_TIMEOUT_VAR,
        dployr_data::REPLICA_URLS_VAR,
        dployr_data::REPLICA_MAX_LAG_VAR,
        dployr_data::KV_PURGE_EVERY_VAR,
        dployr_data::SESSION_TTL_VAR,
        dployr_data::STATE_TTL_VAR,
        dployr_data::OTP_TTL_VAR,
        dployr_kv::ACCOUNT_ID_VAR,
        dployr_kv::NAMESPACE_ID_VAR,
        dployr_kv::API_TOKEN_VAR,
        dployr_kv::API_BASE_URL_VAR,
    ];
    let corpus = corpus();
    for text in &corpus {
        for var in vars {
            let op = format!("Config::from_vars({var})");
            let read = catch_unwind(AssertUnwindSafe(|| {
                Config::from_vars(|name| {
                    if name == var {
                        Some(text.clone())
                    } else if name == dployr_data::DATABASE_URL_VAR {
                        Some("postgres://db/app".to_owned())
                    } else if name == dployr_data::KV_VAR {
                        Some("cloudflare".to_owned())
                    } else if name.starts_with("CLOUDFLARE_") && name != dployr_kv::API_BASE_URL_VAR {
                        Some("id".to_owned())
                    } else {
                        None
                    }
                })
            }));
            check.calls += 1;
            match read {
                Err(payload) => check.fail(&op, text, format!("panicked: {}", panic_text(payload.as_ref()))),
                Ok(Ok(_) | Err(StoreError::Configuration { .. })) => {}
                Ok(Err(other)) => check.fail(&op, text, format!("{other:?}")),
            }
        }
        for (op, run) in [
            ("has_url_scheme", &(|t: &str| _ = black_box(has_url_scheme(t))) as &dyn Fn(&str)),
            ("LibpqUrl::parse", &|t: &str| _ = black_box(LibpqUrl::parse(t).map(|u| u.host_ports.len()))),
            ("conninfo_pairs", &|t: &str| _ = black_box(conninfo_pairs(t))),
            ("url_keys", &|t: &str| _ = black_box(url_keys(t))),
            ("names_several_hosts", &|t: &str| _ = black_box(names_several_hosts(t))),
            ("ConnectFailure::classify", &|t: &str| _ = black_box(ConnectFailure::classify(t, t))),
        ] {
            check.call(op, text, || {
                run(text);
                Ok(())
            });
        }
    }
    // Hostile credentials against the emulator: each must be refused as
    // configuration, never retried as if the service were down. Tokens
    // outside ASCII are left out: HTTP lets them through as opaque bytes,
    // and the emulator's server drops such a request where Cloudflare
    // would answer, so what comes back says nothing of the client.
    let emulator = CloudflareEmulator::start();
    let short: Vec<&String> = corpus.iter().filter(|t| t.len() <= 64 && !t.trim().is_empty()).collect();
    for text in short.iter().step_by(3) {
        for which in [dployr_kv::API_TOKEN_VAR, dployr_kv::ACCOUNT_ID_VAR, dployr_kv::NAMESPACE_ID_VAR] {
            if which == dployr_kv::API_TOKEN_VAR && !text.is_ascii() {
                continue;
            }
            let mut config = cloudflare_config(&emulator);
            match which {
                dployr_kv::API_TOKEN_VAR => config.api_token = (*text).clone(),
                dployr_kv::ACCOUNT_ID_VAR => config.account_id = (*text).clone(),
                _ => config.namespace_id = (*text).clone(),
            }
            let op = format!("CloudflareKv::get with a hostile {which}");
            check.calls += 1;
            let answer = catch_unwind(AssertUnwindSafe(|| CloudflareKv::new(config).and_then(|kv| kv.get("k"))));
            match answer {
                Err(payload) => check.fail(&op, text, format!("panicked: {}", panic_text(payload.as_ref()))),
                Ok(Err(StoreError::Configuration { .. })) => {}
                Ok(other) => check.fail(&op, text, format!("{other:?}, expected a Configuration error")),
            }
        }
    }
    check.finish(started);
}
