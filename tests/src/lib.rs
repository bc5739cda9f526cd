//! End-to-end tests of the dployr data layer against a real PostgreSQL, and
//! the key-value conformance suite.
//!
//! The tests live in `tests/tests/`. This library holds what several of
//! them share: [`kv_contract`], the functions every key-value backend must
//! pass (run by `kv_memory`, `kv_postgres` and `kv_cloudflare`). Today the
//! other tests prove the rules of the schema itself (`schema_guards`); the
//! facade's end-to-end story joins them as that issue lands.

pub mod kv_contract;
