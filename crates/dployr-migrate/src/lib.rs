//! The migration runner of the dployr data layer.
//!
//! It exists because the TypeScript original's runner could not apply its own
//! first migration (it split files on `;`), ran without a transaction or a
//! lock, and ignored edits to applied files. This crate applies the folders of
//! the workspace's `migrations/` (diesel's format, embedded in the binary by
//! `diesel_migrations`) with these guarantees:
//!
//! - each `up.sql` is sent whole, so PL/pgSQL bodies with `;` inside `$$` work;
//! - each migration and its bookkeeping row commit in one transaction, unless
//!   its `metadata.toml` says `run_in_transaction = false` (then the file must
//!   hold exactly one statement, which PostgreSQL itself checks, and a
//!   concurrent index build there waits without `lock_timeout`, since it
//!   queues no traffic behind it); a file
//!   that would end that transaction itself (`COMMIT`, `BEGIN`, ... outside
//!   function bodies) is refused by name before it runs, and every setting
//!   a file makes for its session (search path, role, a pasted `pg_dump`
//!   header's `SET lock_timeout = 0`, ...) ends with it;
//! - migrations run without `statement_timeout`, whatever the role or the
//!   database sets, and each wait for a table lock under `lock_timeout`;
//!   the runner's connections give up after a connect timeout;
//! - a PostgreSQL advisory lock, polled with a timeout, serializes concurrent
//!   runners on one database; later runners find nothing to do;
//! - before anything runs, every applied migration is checked against the
//!   binary: an edited file (checksum) or a missing one is refused by name
//!   (a runner may allow those of a newer release, all above its latest:
//!   `MigrationRunner::allowing_a_newer_release`, for migrations on start);
//! - each migration in a transaction checks first that its server
//!   connection holds the lock (a transaction pooler the start's probe
//!   missed), and a database that only reads is refused before the lock.
//!
//! Bookkeeping lives in the table `_migrations` (the original's name) with a
//! checksum and the execution time of each applied migration.
//!
//! ```no_run
//! use dployr_migrate::{MigrationRunner, MigrationSet};
//!
//! # fn main() -> Result<(), dployr_migrate::MigrateError> {
//! let runner = MigrationRunner::new("postgres://localhost/dployr-local", MigrationSet::embedded()?);
//! for applied in runner.run_pending(&mut |event| eprintln!("{event}"))? {
//!     println!("applied {} in {:?}", applied.name, applied.duration);
//! }
//! # Ok(())
//! # }
//! ```

mod conninfo;
mod error;
mod harness;
mod runner;
mod set;
mod sql_lexer;
mod transaction_control;

pub use error::{MigrateError, MigrationFailure, SqlPosition};
pub use runner::{
    AppliedMigration, MigrationEvent, MigrationRunner, MigrationState, MigrationStatus, is_newer_version,
};
pub use set::{MigrationFile, MigrationSet};
