//! The PostgreSQL stores against a real PostgreSQL (the testkit's), one
//! fresh migrated database per test: every operation's normal, not-found
//! and conflict or invalid paths, the seed's flaws, concurrency, and the
//! number of statements each operation sends.

#![cfg(test)]

mod fixture;

mod bad_input;
mod bootstrap_tokens;
mod budget;
mod clusters;
mod concurrency;
mod deadlines;
mod generic_plans;
mod instances;
mod pool;
mod privileges;
mod races;
mod replicas;
mod schema_changes;
mod server_resources;
mod spans;
mod totals;
mod users;
mod writes;
