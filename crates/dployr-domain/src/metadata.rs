//! `Metadata`: the free-form JSON object on users, clusters and instances,
//! checked before it reaches the database so that whatever a store accepts
//! it can always read back, equal: an object (the schema refuses anything
//! else), bounded in size and in depth, free of NUL characters (which
//! PostgreSQL's `jsonb` cannot store), and holding only numbers that come
//! back from `jsonb` as the same `serde_json::Value`.
//!
//! Depth: at most [`MAX_METADATA_DEPTH`] (64) levels of arrays and objects.
//! serde_json, which diesel uses to read `jsonb`, stops at 128 levels; a
//! value written deeper than that would be committed and then fail every
//! read of its row (a user locked out of sign-in, a cluster whose instances
//! cannot be listed). 64 leaves room for what the stores and their callers
//! wrap around metadata (`{"gitHub": settings}`, a session, an API
//! response) and is far beyond any real settings object. The schema
//! refuses more than 100 levels from SQL written by hand
//! (`025_metadata_nesting_with_room`), so a record holding metadata, in a
//! page, still reads back.
//!
//! Numbers: `jsonb` keeps a number as PostgreSQL `numeric` and prints it back
//! in plain decimal notation with the scale it was written with (`1e16`
//! comes back as `10000000000000000`, `1.5e-7` as `0.00000015`). Integers
//! that fit `i64` or `u64` always come back equal. A float is accepted when
//! its plain decimal form, as PostgreSQL prints it, parses back to the same
//! `serde_json::Number`; with serde_json's `float_roundtrip` (on in this
//! workspace) that holds for every finite float except whole numbers that
//! serde_json writes with an exponent and that fit an integer (`1e16` ..
//! `1.8e19`): they come back as integers, a different `Value`, so they are
//! refused with a hint to send the integer. Refusing rather than silently
//! turning them into integers keeps "what is stored is what was sent".
//! One exception, by `serde_json::Number`'s own equality (`-0.0 == 0.0`):
//! negative zero comes back as `0.0` (PostgreSQL's `numeric` has no
//! negative zero), equal as a `Value` but not the same sign.
//! Non-finite numbers cannot be in a `serde_json::Value` at all.
//!
//! Before any of that, serde_json reads an integer past 64 bits, or a
//! decimal with more significant digits than a 64-bit float keeps, as the
//! nearest float, silently. Metadata parsed from JSON text (`str::parse`)
//! is checked against its text and such a number refused ("send it as a
//! string"); through `Deserialize` (a request body that serde reads) only
//! the rounded value reaches `Metadata`, so there it is stored rounded.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

use crate::StoreError;

/// The most bytes metadata may take as PostgreSQL stores and prints it
/// (`jsonb` as text: a space after each `:` and `,`, numbers in plain
/// decimal, so `1e300` takes 301 bytes), which is the size the schema
/// bounds: whatever metadata is accepted fits a new row. Stores that merge
/// metadata into what is stored refuse a merge whose result would pass 128 KiB
/// of that text (a schema rule), so repeated sign-ins cannot grow it forever.
pub const MAX_METADATA_BYTES: usize = 64 * 1024;

/// The most levels of nested arrays and objects metadata may have, the
/// top-level object counting as one (see the module documentation).
pub const MAX_METADATA_DEPTH: usize = 64;

/// A JSON object of at most [`MAX_METADATA_BYTES`] bytes and
/// [`MAX_METADATA_DEPTH`] levels, without NUL characters, whose numbers read
/// back from PostgreSQL unchanged (see the module documentation).
///
/// ```
/// use dployr_domain::Metadata;
/// use serde_json::json;
///
/// let metadata = Metadata::try_from(json!({"plan": "team", "max": 1.7976931348623157e308})).unwrap();
/// assert_eq!(metadata.get("plan"), Some(&json!("team")));
/// assert!(Metadata::try_from(json!([1, 2])).is_err());
/// assert!(Metadata::try_from(json!({"x": "a\u{0}b"})).is_err());
/// assert!(Metadata::try_from(json!({"big": 1e16})).is_err()); // send 10000000000000000
/// assert!("{\"a\": [[[1]]]}".parse::<Metadata>().is_ok());
/// ```
#[derive(Clone, PartialEq, Eq, Default, Serialize)]
#[serde(transparent)]
pub struct Metadata(Map<String, Value>);

impl Metadata {
    /// An empty object.
    pub fn new() -> Self {
        Self::default()
    }

    /// Checks an object.
    ///
    /// # Errors
    /// [`StoreError::Invalid`] (field `metadata`) when it is too deep, too
    /// large, holds a NUL character or a number that would not read back equal.
    pub fn from_map(map: Map<String, Value>) -> Result<Self, StoreError> {
        Self::check_map(&map)?;
        Ok(Self(map))
    }

    /// Checks again what [`from_map`](Self::from_map) checks: the stores
    /// call it before every write, because metadata made by
    /// [`from_stored`](Self::from_stored) or deserialized as a record
    /// ([`deserialize_stored`](Self::deserialize_stored)) skipped the checks,
    /// and PostgreSQL would refuse a NUL character with an error that
    /// names no field, or store a number that comes back changed. A write
    /// is held to a write's limits whatever made its metadata: what a store
    /// returned beyond them (a merge grown past 64 KiB, a GitHub
    /// integration's settings one level deeper than a write may nest) is
    /// refused if written back as it is.
    ///
    /// ```
    /// use dployr_domain::Metadata;
    /// use serde_json::json;
    ///
    /// assert!(Metadata::from_stored(json!({"plan": "team"})).check().is_ok());
    /// assert!(Metadata::from_stored(json!({"x": "a\u{0}b"})).check().is_err());
    /// ```
    ///
    /// # Errors
    /// As [`from_map`](Self::from_map).
    pub fn check(&self) -> Result<(), StoreError> {
        Self::check_map(&self.0)
    }

    /// The checks of a write, in their order.
    fn check_map(map: &Map<String, Value>) -> Result<(), StoreError> {
        // Depth first, by a walk that stops at the limit: everything after
        // (NUL search, serialization) recurses, and a value can be nested
        // deeper than a thread's stack allows.
        if depth_exceeds(map, MAX_METADATA_DEPTH) {
            return Err(StoreError::invalid(
                "metadata",
                format!("is nested more than {MAX_METADATA_DEPTH} levels deep"),
            ));
        }
        if let Some(number) = first_changing_number(map) {
            return Err(StoreError::invalid(
                "metadata",
                format!(
                    "holds the number {number}, which PostgreSQL would give back as {}; send it as an integer",
                    pg_numeric_text(&number.to_string()).unwrap_or_default()
                ),
            ));
        }
        if contains_nul(map) {
            return Err(StoreError::invalid("metadata", "contains a NUL character, which PostgreSQL cannot store"));
        }
        let size = stored_object_bytes(map);
        if size > MAX_METADATA_BYTES {
            return Err(StoreError::invalid(
                "metadata",
                format!(
                    "is {size} bytes as PostgreSQL stores it (a space after each `:` and `,`, numbers in plain \
                     decimal), more than the {MAX_METADATA_BYTES} allowed"
                ),
            ));
        }
        Ok(())
    }

    /// Metadata read back from the database, which only stores checked objects;
    /// unchecked ([`check`](Self::check) checks it before a write).
    /// Non-objects (impossible under the schema's CHECK) become empty.
    pub fn from_stored(value: Value) -> Self {
        match value {
            Value::Object(map) => Self(map),
            _ => Self::default(),
        }
    }

    /// Deserializes metadata as a store returned it (the `metadata` of a
    /// [`User`](crate::User), [`Cluster`](crate::Cluster) or
    /// [`Instance`](crate::Instance)): any JSON object, without the limits
    /// of a write, which the schema's may exceed (merges grow an object to
    /// 128 KiB; a GitHub integration's settings are one level deeper than a
    /// write may nest). What a store returned so deserializes back equal.
    /// [`Metadata`]'s own `Deserialize`, for what comes in, keeps the limits.
    ///
    /// # Errors
    /// The deserializer's, or a custom one when the value is not an object.
    pub fn deserialize_stored<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match Value::deserialize(deserializer)? {
            Value::Object(map) => Ok(Self(map)),
            other => Err(serde::de::Error::custom(format!("metadata is a JSON object, not {other}"))),
        }
    }

    /// The value under `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key)
    }

    /// The object.
    pub fn as_map(&self) -> &Map<String, Value> {
        &self.0
    }

    /// Whether it has no keys.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The object as a JSON value.
    pub fn to_value(&self) -> Value {
        Value::Object(self.0.clone())
    }

    /// The object as a JSON value, consuming it.
    pub fn into_value(self) -> Value {
        Value::Object(self.0)
    }
}

/// Whether `map` (one level) holds arrays or objects nested more than
/// `levels` levels deep in all. Recursion is at most `levels` deep.
fn depth_exceeds(map: &Map<String, Value>, levels: usize) -> bool {
    fn value_exceeds(value: &Value, levels: usize) -> bool {
        match value {
            Value::Array(items) => levels == 0 || items.iter().any(|item| value_exceeds(item, levels - 1)),
            Value::Object(map) => depth_exceeds(map, levels),
            Value::Null | Value::Bool(_) | Value::Number(_) | Value::String(_) => false,
        }
    }
    levels == 0 || map.values().any(|value| value_exceeds(value, levels - 1))
}

/// The first number that would not read back from `jsonb` as an equal
/// `Number`. Call after the depth check.
fn first_changing_number(map: &Map<String, Value>) -> Option<&serde_json::Number> {
    fn in_value(value: &Value) -> Option<&serde_json::Number> {
        match value {
            Value::Number(number) => (!reads_back_equal(number)).then_some(number),
            Value::Array(items) => items.iter().find_map(in_value),
            Value::Object(map) => first_changing_number(map),
            Value::Null | Value::Bool(_) | Value::String(_) => None,
        }
    }
    map.values().find_map(in_value)
}

/// Whether `number`, written as serde_json writes it, stored in `jsonb` and
/// read back with serde_json, is an equal `Number`.
fn reads_back_equal(number: &serde_json::Number) -> bool {
    if number.is_i64() || number.is_u64() {
        return true;
    }
    pg_numeric_text(&number.to_string())
        .and_then(|text| serde_json::from_str::<serde_json::Number>(&text).ok())
        .is_some_and(|back| back == *number)
}

/// How PostgreSQL prints the JSON number `text` after storing it as
/// `numeric`: plain decimal notation, no exponent, as many digits after the
/// point as the text had minus its exponent (at least none), no negative
/// zero. `None` if `text` is not a JSON number.
fn pg_numeric_text(text: &str) -> Option<String> {
    let (negative, unsigned) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (mantissa, exponent) = match unsigned.split_once(['e', 'E']) {
        Some((mantissa, exponent)) => (mantissa, exponent.parse::<i64>().ok()?),
        None => (unsigned, 0),
    };
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if whole.is_empty() || !whole.bytes().chain(fraction.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    // Bound the work: f64 exponents stay within a few hundred.
    if exponent.unsigned_abs() > 10_000 {
        return None;
    }
    let digits = format!("{whole}{fraction}");
    let fraction_len = i64::try_from(fraction.len()).ok()?;
    let scale = usize::try_from((fraction_len - exponent).max(0)).ok()?;
    // The value is digits × 10^(exponent - fraction_len); print it with `scale` decimals.
    let shift = exponent - fraction_len + i64::try_from(scale).ok()?;
    let mut scaled = digits;
    scaled.push_str(&"0".repeat(usize::try_from(shift.max(0)).ok()?));
    if shift < 0 {
        scaled.truncate(scaled.len().saturating_sub(usize::try_from(-shift).ok()?));
    }
    if scaled.len() <= scale {
        scaled = format!("{}{scaled}", "0".repeat(scale + 1 - scaled.len()));
    }
    let (int_part, dec_part) = scaled.split_at(scaled.len() - scale);
    let int_part = int_part.trim_start_matches('0');
    let int_part = if int_part.is_empty() { "0" } else { int_part };
    let is_zero = int_part == "0" && dec_part.bytes().all(|b| b == b'0');
    let sign = if negative && !is_zero { "-" } else { "" };
    Some(if scale == 0 { format!("{sign}{int_part}") } else { format!("{sign}{int_part}.{dec_part}") })
}

/// The first number literal of the JSON `text` (which serde_json has
/// parsed, so it is valid JSON) whose value serde_json rounds: an integer
/// beyond `i64`/`u64`, or a decimal that the nearest 64-bit float does not
/// equal.
fn first_rounded_number_literal(text: &str) -> Option<&str> {
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                i += 1;
                while i < bytes.len() {
                    match bytes[i] {
                        b'\\' => i += 2,
                        b'"' => {
                            i += 1;
                            break;
                        }
                        _ => i += 1,
                    }
                }
            }
            b'-' | b'0'..=b'9' => {
                let start = i;
                while i < bytes.len() && matches!(bytes[i], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9') {
                    i += 1;
                }
                let literal = &text[start..i];
                if !kept_exactly(literal) {
                    return Some(literal);
                }
            }
            _ => i += 1,
        }
    }
    None
}

/// Whether serde_json reads the number `literal` as exactly its value.
fn kept_exactly(literal: &str) -> bool {
    if !literal.contains(['.', 'e', 'E']) {
        return literal.parse::<i64>().is_ok() || literal.parse::<u64>().is_ok();
    }
    let Some(read) = literal.parse::<f64>().ok().and_then(serde_json::Number::from_f64) else { return false };
    // Zero, whatever its exponent, is read as zero; a nonzero value read as
    // zero underflowed. Both answered here, before the comparison below
    // spells the literal out in plain decimal: that costs its exponent in
    // digits, and a body of `0e-9999` literals, each of them kept, cost
    // seconds of CPU for kilobytes of text. What remains to compare has an
    // exponent within a 64-bit float's range plus its own digits.
    let mantissa = literal.split(['e', 'E']).next().unwrap_or(literal);
    if mantissa.bytes().all(|b| matches!(b, b'-' | b'.' | b'0')) {
        return true;
    }
    if read.as_f64() == Some(0.0) {
        return false;
    }
    // Both in plain decimal, as PostgreSQL prints them, without the zeros
    // a scale adds: `1.50` is `1.5`, `1E2` is `100.0`.
    let plain = |text: &str| {
        pg_numeric_text(text).map(|decimal| {
            if decimal.contains('.') { decimal.trim_end_matches('0').trim_end_matches('.').to_owned() } else { decimal }
        })
    };
    matches!((plain(literal), plain(&read.to_string())), (Some(sent), Some(kept)) if sent == kept)
}

/// Bytes of `map` as PostgreSQL prints it back from `jsonb`, what the
/// schema's `octet_length(metadata::text)` bound measures: compact JSON but
/// for a space after each `:` and `,`, and numbers as [`pg_numeric_text`]
/// prints them (a float written with an exponent can grow a hundredfold).
/// Strings are escaped as by both PostgreSQL and serde_json: `\"`, `\\`,
/// the five short control escapes, `\u00XX` for the other control
/// characters, everything else as its UTF-8. Call after the depth check.
fn stored_object_bytes(map: &Map<String, Value>) -> usize {
    fn string_bytes(text: &str) -> usize {
        let escaped: usize = text
            .chars()
            .map(|c| match c {
                '"' | '\\' | '\u{8}' | '\u{c}' | '\n' | '\r' | '\t' => 2,
                c if u32::from(c) < 0x20 => 6,
                c => c.len_utf8(),
            })
            .sum();
        escaped + 2
    }
    fn value_bytes(value: &Value) -> usize {
        match value {
            Value::Null | Value::Bool(true) => 4,
            Value::Bool(false) => 5,
            Value::Number(number) => {
                let text = number.to_string();
                if number.is_f64() {
                    pg_numeric_text(&text).map_or(text.len(), |printed| printed.len())
                } else {
                    text.len()
                }
            }
            Value::String(text) => string_bytes(text),
            Value::Array(items) => 2 + items.iter().map(value_bytes).sum::<usize>() + 2 * items.len().saturating_sub(1),
            Value::Object(map) => stored_object_bytes(map),
        }
    }
    let entries: usize = map.iter().map(|(key, value)| string_bytes(key) + 2 + value_bytes(value)).sum();
    2 + entries + 2 * map.len().saturating_sub(1)
}

fn contains_nul(map: &Map<String, Value>) -> bool {
    fn value_has_nul(value: &Value) -> bool {
        match value {
            Value::String(s) => s.contains('\0'),
            Value::Array(items) => items.iter().any(value_has_nul),
            Value::Object(map) => contains_nul(map),
            Value::Null | Value::Bool(_) | Value::Number(_) => false,
        }
    }
    map.iter().any(|(key, value)| key.contains('\0') || value_has_nul(value))
}

impl TryFrom<Value> for Metadata {
    type Error = StoreError;

    fn try_from(value: Value) -> Result<Self, StoreError> {
        match value {
            Value::Object(map) => Self::from_map(map),
            other => Err(StoreError::invalid("metadata", format!("must be a JSON object, not {}", kind_of(&other)))),
        }
    }
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Metadata from JSON text, such as a request body.
///
/// A key the text names twice keeps its last value, as serde_json and
/// PostgreSQL do. A number that 64-bit integers and floats cannot keep
/// exactly is refused wherever the text holds it, under a key named again
/// later too (the check reads the text as sent).
///
/// ```
/// use dployr_domain::{Metadata, StoreError};
/// let metadata: Metadata = r#"{"replicas": 3}"#.parse()?;
/// assert_eq!(metadata.get("replicas"), Some(&serde_json::json!(3)));
/// let twice: Metadata = r#"{"replicas": 3, "replicas": 5}"#.parse()?;
/// assert_eq!(twice.get("replicas"), Some(&serde_json::json!(5)));
/// let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
/// assert!(matches!(format!("{{\"a\": {deep}}}").parse::<Metadata>(), Err(StoreError::Invalid { field: "metadata", .. })));
/// # Ok::<(), StoreError>(())
/// ```
impl std::str::FromStr for Metadata {
    type Err = StoreError;

    fn from_str(text: &str) -> Result<Self, StoreError> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| StoreError::invalid("metadata", format!("is not JSON this layer can store: {e}")))?;
        // serde_json reads an integer past 64 bits, or a decimal with more
        // digits than a 64-bit float keeps, as the nearest float, silently:
        // the Value is already not what was sent. Only the text tells.
        if let Some(literal) = first_rounded_number_literal(text) {
            let rounded = literal.parse::<f64>().ok().and_then(serde_json::Number::from_f64);
            return Err(StoreError::invalid(
                "metadata",
                format!(
                    "holds the number {literal}, which JSON numbers here (64-bit integers and floats) cannot keep \
                     exactly (it would be stored as {}); send it as a string",
                    rounded.map_or_else(|| "something else".to_owned(), |number| number.to_string())
                ),
            ));
        }
        Self::try_from(value)
    }
}

impl fmt::Debug for Metadata {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl<'de> Deserialize<'de> for Metadata {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Self::try_from(Value::deserialize(deserializer)?).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_text_with_a_number_serde_json_would_round_is_refused_not_stored_rounded() {
        for text in [
            r#"{"id": 123456789012345678901234567890}"#,
            r#"{"n": 18446744073709551616}"#,
            r#"{"n": -9223372036854775809}"#,
            r#"{"deep": [{"x": 0.12345678901234567890123}]}"#,
            r#"{"tiny": 1e-400}"#,
        ] {
            let error = text.parse::<Metadata>().unwrap_err();
            assert!(
                matches!(&error, StoreError::Invalid { field: "metadata", reason } if reason.contains("send it as a string")),
                "{text}: {error}"
            );
        }
        for text in [
            r#"{"n": 18446744073709551615, "m": -9223372036854775808, "z": -0}"#,
            r#"{"f": 0.1, "g": 1.50, "h": 0.30000000000000004, "k": 2.5e-3, "s": "123456789012345678901234567890"}"#,
            r#"{"max": 1.7976931348623157e308, "e": 1E2}"#,
            r#"{"s": "a\"1e-400 123456789012345678901234567890", "t": "\\"}"#,
        ] {
            assert!(text.parse::<Metadata>().is_ok(), "{text}");
        }
    }

    #[test]
    fn zero_with_any_exponent_is_kept_and_a_value_that_underflows_is_refused() {
        let zeros = vec!["0e-9999"; 10_000].join(", ");
        let text = format!(r#"{{"z": [{zeros}], "big": 0e99999, "neg": -0.000E+400}}"#);
        let metadata: Metadata = text.parse().unwrap();
        let Some(Value::Array(read)) = metadata.get("z") else { panic!("{metadata:?}") };
        assert!(read.len() == 10_000 && read.iter().all(|zero| zero.as_f64() == Some(0.0)));
        assert_eq!(metadata.get("big").and_then(Value::as_f64), Some(0.0));
        for text in [r#"{"tiny": 1e-9999}"#, r#"{"tiny": 0.001e-400}"#, r#"{"huge": 1e99999}"#] {
            let error = text.parse::<Metadata>().unwrap_err();
            assert!(matches!(&error, StoreError::Invalid { field: "metadata", .. }), "{text}: {error}");
        }
    }

    #[test]
    fn postgres_prints_numbers_in_plain_notation_with_their_scale() {
        for (sent, printed) in [
            ("1e16", "10000000000000000"),
            ("1.5e-7", "0.00000015"),
            ("1.25e1", "12.5"),
            ("1.0e2", "100"),
            ("-0.0", "0.0"),
            ("0.1", "0.1"),
            ("-2.5", "-2.5"),
            ("123", "123"),
            ("5e-324", &format!("0.{}5", "0".repeat(323))),
        ] {
            assert_eq!(pg_numeric_text(sent).as_deref(), Some(printed), "{sent}");
        }
    }

    #[test]
    fn size_is_that_of_the_text_postgresql_prints() {
        // PostgreSQL 15 printed this object (as serde_json writes it) back
        // from jsonb in 404 bytes: spaces after `:` and `,`, `-0.0` as
        // `0.0`, 1e300 as 301 digits, the escapes kept, `é` as two bytes.
        let value = serde_json::json!({
            "a": [1, 2.5, true, false, null, [], {}],
            "b": {"c": "q\"\\\n\u{1}\u{e9}"},
            "m": -0.0,
            "n": 1000.0,
            "t": 1e300,
        });
        let Value::Object(map) = value else { unreachable!() };
        assert_eq!(stored_object_bytes(&map), 404);
        assert_eq!(stored_object_bytes(&Map::new()), 2);
    }

    /// A space is printed as itself (one byte), not escaped like the
    /// control characters below it; an object that PostgreSQL prints in
    /// exactly 64 KiB is accepted, one byte more is refused.
    #[test]
    fn metadata_printed_in_exactly_the_limit_is_accepted_and_one_byte_more_refused() {
        // `{"a": "..."}`: 2 braces, the key and its quotes (3), `: ` (2), the string's quotes (2).
        let at_limit = " ".repeat(MAX_METADATA_BYTES - 9);
        let Value::Object(map) = serde_json::json!({ "a": at_limit }) else { unreachable!() };
        assert_eq!(stored_object_bytes(&map), MAX_METADATA_BYTES);
        assert!(Metadata::from_map(map).is_ok());
        let Value::Object(map) = serde_json::json!({ "a": format!("{at_limit} ") }) else { unreachable!() };
        let error = Metadata::from_map(map).unwrap_err();
        assert!(
            matches!(&error, StoreError::Invalid { field: "metadata", reason } if reason.contains("65537 bytes")),
            "{error}"
        );
    }

    /// PostgreSQL keeps the sign of a negative number whose whole part is
    /// zero, or whose fraction is: only zero itself loses it.
    #[test]
    fn negative_numbers_with_a_zero_part_keep_their_sign() {
        for (sent, printed) in [("-0.5", "-0.5"), ("-2.0", "-2.0"), ("-0.0", "0.0")] {
            assert_eq!(pg_numeric_text(sent).as_deref(), Some(printed), "{sent}");
        }
        assert!(Metadata::try_from(serde_json::json!({"a": -0.5, "b": -2.0, "c": [-0.25]})).is_ok());
    }

    /// The text is scanned for numbers outside strings only: an escaped
    /// quote inside a string neither ends it nor hides what follows it.
    #[test]
    fn a_rounded_number_after_a_string_with_escaped_quotes_is_still_found() {
        for text in [
            r#"{"said": "she wrote \"42\" and \\ then left", "id": 123456789012345678901234567890}"#,
            r#"{"s": "\"abcd", "id": 123456789012345678901234567890}"#,
        ] {
            let error = text.parse::<Metadata>().unwrap_err();
            assert!(
                matches!(&error, StoreError::Invalid { field: "metadata", reason } if reason.contains("123456789012345678901234567890")),
                "{text}: {error}"
            );
        }
        let inside = r#"{"said": "she wrote \"123456789012345678901234567890\" then left"}"#;
        assert!(inside.parse::<Metadata>().is_ok());
    }

    /// JSON text that is not an object, a number ending the text included,
    /// is refused as `Invalid`, not a panic of the number scan.
    #[test]
    fn json_text_that_is_a_bare_value_is_refused_as_not_an_object() {
        for (text, kind) in
            [("5", "a number"), ("-1.5", "a number"), ("[1, 2]", "an array"), ("\"x\"", "a string"), ("null", "null")]
        {
            let error = text.parse::<Metadata>().unwrap_err();
            assert!(
                matches!(&error, StoreError::Invalid { field: "metadata", reason } if *reason == format!("must be a JSON object, not {kind}")),
                "{text}: {error}"
            );
        }
    }

    #[test]
    fn metadata_gives_back_the_object_it_holds() {
        let object = serde_json::json!({"plan": "team", "replicas": 3});
        let metadata = Metadata::try_from(object.clone()).unwrap();
        assert!(!metadata.is_empty() && Metadata::new().is_empty());
        assert_eq!(metadata.as_map().len(), 2);
        assert_eq!(metadata.to_value(), object);
        assert_eq!(metadata.into_value(), object);
    }

    #[test]
    fn whole_floats_that_come_back_as_integers_are_refused() {
        assert!(Metadata::try_from(serde_json::json!({"n": 1e16})).is_err());
        assert!(Metadata::try_from(serde_json::json!({"n": 1e15})).is_ok());
        assert!(Metadata::try_from(serde_json::json!({"n": 1e20})).is_ok());
        assert!(Metadata::try_from(serde_json::json!({"n": f64::MAX, "m": f64::MIN_POSITIVE, "s": 5e-324})).is_ok());
    }

    #[test]
    fn depth_is_counted_from_the_top_level_object() {
        let mut value = serde_json::json!(1);
        for _ in 0..MAX_METADATA_DEPTH - 1 {
            value = serde_json::json!([value]);
        }
        assert!(Metadata::try_from(serde_json::json!({ "a": value.clone() })).is_ok());
        assert!(Metadata::try_from(serde_json::json!({ "a": [value] })).is_err());
    }
}
