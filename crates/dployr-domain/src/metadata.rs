//! `Metadata`: the free-form JSON object on users, clusters and instances,
//! checked before it reaches the database: an object (the schema refuses
//! anything else), bounded in size, and free of NUL characters, which
//! PostgreSQL's `jsonb` cannot store.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

use crate::StoreError;

/// The most bytes metadata may take, serialized as JSON. Stores that merge
/// metadata into what is stored refuse a merge whose result would pass 128 KiB
/// of JSON text (a schema rule), so repeated sign-ins cannot grow it forever.
pub const MAX_METADATA_BYTES: usize = 64 * 1024;

/// A JSON object of at most [`MAX_METADATA_BYTES`] bytes without NUL characters.
///
/// ```
/// use dployr_domain::Metadata;
/// use serde_json::json;
///
/// let metadata = Metadata::try_from(json!({"plan": "team"})).unwrap();
/// assert_eq!(metadata.get("plan"), Some(&json!("team")));
/// assert!(Metadata::try_from(json!([1, 2])).is_err());
/// assert!(Metadata::try_from(json!({"x": "a\u{0}b"})).is_err());
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
    /// [`StoreError::Invalid`] (field `metadata`) when it is too large or holds a NUL character.
    pub fn from_map(map: Map<String, Value>) -> Result<Self, StoreError> {
        if contains_nul(&map) {
            return Err(StoreError::invalid("metadata", "contains a NUL character, which PostgreSQL cannot store"));
        }
        let size = serde_json::to_vec(&map).map_err(|e| StoreError::invalid("metadata", e.to_string()))?.len();
        if size > MAX_METADATA_BYTES {
            return Err(StoreError::invalid(
                "metadata",
                format!("is {size} bytes as JSON, more than the {MAX_METADATA_BYTES} allowed"),
            ));
        }
        Ok(Self(map))
    }

    /// Metadata read back from the database, which only stores checked objects.
    /// Non-objects (impossible under the schema's CHECK) become empty.
    pub fn from_stored(value: Value) -> Self {
        match value {
            Value::Object(map) => Self(map),
            _ => Self::default(),
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
