//! End-to-end tests of the dployr data layer against a real PostgreSQL.
//!
//! The tests live in `tests/tests/`; this library only gives the crate a
//! root. Today they prove the rules of the schema itself (`schema_guards`);
//! the facade's end-to-end story and the key-value conformance suite join
//! them as those issues land.
