//! `Email`: an e-mail address as the data layer stores it, trimmed and
//! lower-cased, so `A@x.io` and `a@x.io` are one user, and checked once at
//! the edge instead of in every store.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize};

use crate::StoreError;

/// The most bytes an address may have (RFC 5321's path limit).
pub const MAX_EMAIL_BYTES: usize = 254;

/// A normalised e-mail address: trimmed, lower-cased, at most 254 bytes,
/// exactly one `@` with text on both sides, no whitespace or control
/// characters.
///
/// ```
/// use dployr_domain::Email;
/// let email = Email::parse("  Ada@Example.IO ").unwrap();
/// assert_eq!(email.as_str(), "ada@example.io");
/// assert_eq!(email.local_part(), "ada");
/// assert!(Email::parse("no-at-sign").is_err());
/// assert!(Email::parse("a@b@c").is_err());
/// ```
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Email(String);

impl Email {
    /// Normalises and checks `text`.
    ///
    /// # Errors
    /// [`StoreError::Invalid`] (field `email`) saying what is wrong.
    pub fn parse(text: &str) -> Result<Self, StoreError> {
        let email = text.trim().to_lowercase();
        let invalid = |reason: &'static str| StoreError::invalid("email", reason);
        if email.is_empty() {
            return Err(invalid("is empty"));
        }
        if email.len() > MAX_EMAIL_BYTES {
            return Err(invalid("is longer than 254 bytes"));
        }
        if email.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(invalid("contains whitespace or a control character"));
        }
        let Some((local, domain)) = email.split_once('@') else {
            return Err(invalid("has no @"));
        };
        if domain.contains('@') {
            return Err(invalid("has more than one @"));
        }
        if local.is_empty() || domain.is_empty() {
            return Err(invalid("needs text before and after the @"));
        }
        Ok(Self(email))
    }

    /// The address.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The part before the `@`: the default name of a user and of their cluster.
    pub fn local_part(&self) -> &str {
        self.0.split_once('@').map_or(self.0.as_str(), |(local, _)| local)
    }
}

impl fmt::Display for Email {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Email {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Email({})", self.0)
    }
}

impl FromStr for Email {
    type Err = StoreError;

    fn from_str(text: &str) -> Result<Self, StoreError> {
        Self::parse(text)
    }
}

impl AsRef<str> for Email {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for Email {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}
