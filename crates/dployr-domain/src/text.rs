//! The rules for free-text fields (names, tags, addresses, nonces), in one
//! place so every store refuses the same bad input the same way, before it
//! writes anything.

use crate::StoreError;

/// Whether an empty (or all-whitespace) value is acceptable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blank {
    /// Refuse it.
    Refused,
    /// Accept it.
    Allowed,
}

/// Checks a free-text value: at most `max_bytes` bytes, no NUL or other
/// control character, and not blank unless allowed.
///
/// ```
/// use dployr_domain::text::{check, Blank};
/// assert!(check("tag", "web-1", 255, Blank::Refused).is_ok());
/// assert!(check("tag", "  ", 255, Blank::Refused).is_err());
/// assert!(check("tag", "a\u{0}b", 255, Blank::Refused).is_err());
/// ```
///
/// # Errors
/// [`StoreError::Invalid`] naming `field`.
pub fn check(field: &'static str, value: &str, max_bytes: usize, blank: Blank) -> Result<(), StoreError> {
    if blank == Blank::Refused && value.trim().is_empty() {
        return Err(StoreError::invalid(field, "is empty"));
    }
    if value.len() > max_bytes {
        return Err(StoreError::invalid(field, format!("is longer than {max_bytes} bytes")));
    }
    if value.chars().any(char::is_control) {
        return Err(StoreError::invalid(field, "contains a control character"));
    }
    Ok(())
}
