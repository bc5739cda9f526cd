//! Keyset cursors: the sort key of the last item of a page, as opaque text
//! (base64url), so deep pages start at an index position instead of
//! skipping rows. A cursor that does not decode is `Invalid`, not a panic.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use dployr_domain::{Cursor, StoreError, StoreResult};

/// The longest cursor text [`decode`] accepts, in bytes. The longest this
/// crate hands out is a member listing's: `members ` or `invites ` and the
/// cluster's 26-character id with `\n` (35 bytes), a one-digit role order,
/// `\n` and an e-mail of at most 254 bytes (the column's check), 291 bytes
/// that encode to 388; an instance listing's is at most 84 bytes (112
/// encoded). The cap is generous above
/// that, and far below PostgreSQL's 1 GB message limit: a longer cursor
/// would otherwise be decoded and sent as a bind parameter, and fail in the
/// database (or drop the connection) instead of being `Invalid`.
const MAX_ENCODED_BYTES: usize = 4096;

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
    // Before decoding: no cursor we hand out is this long.
    if cursor.as_str().len() > MAX_ENCODED_BYTES {
        return Err(invalid());
    }
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

    /// A well-formed cursor of `len` encoded bytes (any length but one more
    /// than a multiple of 4, which unpadded base64 never has).
    fn members_cursor_of_encoded_len(len: usize) -> Cursor {
        let text_bytes = len / 4 * 3 + (len % 4).saturating_sub(1);
        let email = "a".repeat(text_bytes - "members\n2\n".len());
        let cursor = encode("members", &["2", &email]);
        assert_eq!(cursor.as_str().len(), len);
        cursor
    }

    #[test]
    fn a_cursor_at_the_length_cap_decodes_and_a_longer_one_is_invalid() {
        let at_cap = members_cursor_of_encoded_len(MAX_ENCODED_BYTES);
        assert!(decode::<2>("members", &at_cap).is_ok());
        // The next length a real cursor can have: it would decode.
        let past_cap = members_cursor_of_encoded_len(MAX_ENCODED_BYTES + 2);
        let refused = decode::<2>("members", &past_cap);
        assert!(matches!(refused, Err(StoreError::Invalid { field: "cursor", .. })), "a longer cursor was not Invalid");
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
