//! Keyset cursors: the sort key of the last item of a page, as opaque text
//! (base64url), so deep pages start at an index position instead of
//! skipping rows. A cursor that does not decode is `Invalid`, not a panic.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use dployr_domain::{Cursor, StoreError, StoreResult};

/// Encodes `kind` (which listing) and the parts of a sort key.
pub(crate) fn encode(kind: &str, parts: &[&str]) -> Cursor {
    let mut text = String::from(kind);
    for part in parts {
        text.push('\n');
        text.push_str(part);
    }
    Cursor::new(URL_SAFE_NO_PAD.encode(text))
}

/// Decodes a cursor of `kind` into its `N` parts.
pub(crate) fn decode<const N: usize>(kind: &str, cursor: &Cursor) -> StoreResult<[String; N]> {
    let invalid = || StoreError::invalid("cursor", "is not a cursor of this listing");
    let bytes = URL_SAFE_NO_PAD.decode(cursor.as_str()).map_err(|_| invalid())?;
    let text = String::from_utf8(bytes).map_err(|_| invalid())?;
    // No sort key we encode holds a control character; refusing them here
    // keeps a forged cursor's NUL from reaching PostgreSQL, which cannot
    // take one in text and would answer with an error instead of a page.
    if text.chars().any(|c| c.is_control() && c != '\n') {
        return Err(invalid());
    }
    let mut parts = text.split('\n');
    if parts.next() != Some(kind) {
        return Err(invalid());
    }
    let parts: Vec<String> = parts.map(str::to_owned).collect();
    parts.try_into().map_err(|_| invalid())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_round_trips() {
        let cursor = encode("members", &["2", "ada@example.io"]);
        let [order, email] = decode::<2>("members", &cursor).unwrap();
        assert_eq!((order.as_str(), email.as_str()), ("2", "ada@example.io"));
    }

    #[test]
    fn garbage_and_other_listings_cursors_are_invalid() {
        let with_nul = encode("members", &["2", "a\u{0}@x.io"]).to_string();
        for text in ["", "!!!", "bm9wZQ", &encode("instances", &["1", "x"]).to_string(), &with_nul] {
            let error = decode::<2>("members", &Cursor::new(text)).unwrap_err();
            assert!(matches!(error, StoreError::Invalid { field: "cursor", .. }), "{text}: {error}");
        }
    }
}
