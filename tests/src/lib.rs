//! End-to-end tests of the dployr data layer against a real PostgreSQL, the
//! key-value conformance suite, and the randomized concurrent workload.
//!
//! The tests live in `tests/tests/`. This library holds what several of
//! them, and `cargo xtask`, share: [`kv_contract`], the functions every
//! key-value backend must pass (run by `kv_memory`, `kv_postgres` and
//! `kv_cloudflare`) with [`session_store_contract`], the tower-sessions
//! store's cases on the same fixtures, and [`stress`], the workload with an invariant checker
//! (run briefly by `tests/tests/stress.rs`, at length by `cargo xtask stress`),
//! [`data_layer_kv`], a data layer's configuration on each key-value
//! backend, and [`seed_story`], the seed README's story as a load that tells errors
//! from rule violations (`tests/tests/pgbouncer.rs`, `cargo xtask pgbouncer`).

pub mod data_layer_kv;
pub mod kv_contract;
pub mod observed_kv;
pub mod seed_story;
pub mod session_store_contract;
pub mod stress;
