//! The vocabulary of the dployr data layer: types, ids, the shared error and
//! the store traits. Nothing in this crate does I/O or knows diesel.

mod error;

pub use error::{BoxError, StoreError, StoreResult};
