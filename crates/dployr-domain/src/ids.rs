//! ULID identifiers, one newtype per entity, so a `UserId` can never be passed
//! where a `ClusterId` is expected. In the database they are 26-character
//! text (Crockford base32, upper case), which sorts by creation time.

use std::fmt;
use std::marker::PhantomData;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use ulid::Ulid;

use crate::StoreError;

/// Reads an id from the text it is stored as, borrowed where the format
/// allows (serde_json's from a slice): going through an owned `String`
/// cost an allocation per id, four per session read.
struct IdVisitor<T>(PhantomData<T>);

impl<T: FromStr<Err = StoreError>> serde::de::Visitor<'_> for IdVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a ULID in its 26-character text form")
    }

    fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<T, E> {
        text.parse().map_err(E::custom)
    }
}

macro_rules! ulid_id {
    ($(#[$doc:meta])* $name:ident, $entity:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(Ulid);

        impl $name {
            /// A new id from the current time and the operating system's random generator.
            pub fn generate() -> Self {
                Self(Ulid::new())
            }

            /// Parses the 26-character text form.
            ///
            /// # Errors
            /// [`StoreError::Invalid`] when `text` is not a ULID.
            pub fn parse(text: &str) -> Result<Self, StoreError> {
                let ulid = Ulid::from_string(text)
                    .map_err(|e| StoreError::invalid(concat!($entity, " id"), format!("not a ULID: {e}")))?;
                // 26 characters hold 130 bits; a ULID has 128, so the first
                // is at most `7` (the ULID spec: larger values are refused).
                // The `ulid` crate drops the two extra bits instead, which
                // would give every id four spellings.
                if text.as_bytes().first().is_some_and(|first| !(b'0'..=b'7').contains(first)) {
                    return Err(StoreError::invalid(
                        concat!($entity, " id"),
                        "not a ULID: larger than the largest, 7ZZZZZZZZZZZZZZZZZZZZZZZZZ",
                    ));
                }
                Ok(Self(ulid))
            }

            /// The underlying ULID.
            pub fn ulid(self) -> Ulid {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), self.0)
            }
        }

        impl FromStr for $name {
            type Err = StoreError;

            fn from_str(text: &str) -> Result<Self, StoreError> {
                Self::parse(text)
            }
        }

        impl From<Ulid> for $name {
            fn from(ulid: Ulid) -> Self {
                Self(ulid)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                deserializer.deserialize_str(IdVisitor(PhantomData::<$name>))
            }
        }
    };
}

ulid_id!(
    /// The id of a [`User`](crate::User).
    ///
    /// ```
    /// use dployr_domain::UserId;
    /// let id = UserId::generate();
    /// assert_eq!(id.to_string().len(), 26);
    /// assert_eq!(UserId::parse(&id.to_string()).unwrap(), id);
    /// assert!(UserId::parse("not-an-id").is_err());
    /// ```
    UserId,
    "user"
);
ulid_id!(
    /// The id of a [`Cluster`](crate::Cluster).
    ClusterId,
    "cluster"
);
ulid_id!(
    /// The id of an [`Instance`](crate::Instance).
    InstanceId,
    "instance"
);

#[cfg(test)]
mod tests {
    use super::{ClusterId, UserId};

    #[test]
    fn an_id_larger_than_the_largest_ulid_is_invalid_not_another_spelling_of_a_smaller_one() {
        assert!(UserId::parse("7ZZZZZZZZZZZZZZZZZZZZZZZZZ").is_ok(), "the largest ULID");
        for larger in ["80000000000000000000000000", "ZZZZZZZZZZZZZZZZZZZZZZZZZZ", "8ZZZZZZZZZZZZZZZZZZZZZZZZZ"] {
            assert!(UserId::parse(larger).is_err(), "{larger}");
            assert!(serde_json::from_str::<ClusterId>(&format!("\"{larger}\"")).is_err(), "{larger}");
        }
        assert_eq!(UserId::parse("00000000000000000000000000").unwrap().to_string(), "00000000000000000000000000");
    }
}
