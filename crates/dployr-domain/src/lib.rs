//! The vocabulary of the dployr data layer: types, ids, the shared error and
//! the store traits. Nothing in this crate does I/O or knows diesel.

mod error;
mod kv;

pub use error::{BoxError, StoreError, StoreResult};
#[cfg(feature = "mock")]
pub use kv::MockKvBackend;
pub use kv::{KvBackend, KvLimits, KvPage, MAX_KEY_BYTES, MAX_TTL, MAX_VALUE_BYTES, not_a_counter, parse_counter};
