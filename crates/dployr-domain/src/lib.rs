//! The vocabulary of the dployr data layer: types, ids, the shared error and
//! the store traits. Nothing in this crate does I/O or knows diesel.
//!
//! **Status: empty on purpose.** The domain types (`User`, `Cluster`,
//! `Role`, ...), the ULID id newtypes, `StoreError` and the store traits with
//! their mockall mocks arrive with the stores issue; the `KvBackend` trait
//! with the key-value issue. The workspace layout and the migrations that
//! they build on are in place (see `docs/ARCHITECTURE.md`).
