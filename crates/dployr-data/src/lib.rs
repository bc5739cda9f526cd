//! The facade of the dployr data layer: configuration in, a connection pool,
//! migrations on start, the stores and the key-value store out.
//!
//! **Status: empty on purpose.** It composes the stores and the key-value
//! store once those land. Today the pieces that exist are
//! [`dployr_migrate`] (the migration runner) and `dployr-pg`'s schema.
