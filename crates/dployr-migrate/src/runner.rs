//! The entry point: lock, verify, then apply or revert.

use std::fmt;
use std::thread;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Bool};

use crate::harness::{AppliedRow, DployrHarness, read_applied_rows};
use crate::{MigrateError, MigrationFile, MigrationSet};

diesel::define_sql_function! {
    /// Takes the session-level advisory lock if it is free; never blocks.
    fn pg_try_advisory_lock(key: BigInt) -> Bool;
}
diesel::define_sql_function! {
    /// Releases a session-level advisory lock.
    fn pg_advisory_unlock(key: BigInt) -> Bool;
}

/// Applies the migrations of a [`MigrationSet`] to one database, safely
/// under concurrency.
///
/// Every operation opens its own dedicated connection (never a pooled one,
/// so a lock cannot outlive a failure on a connection that goes back to a
/// pool), waits for the advisory lock by polling `pg_try_advisory_lock` (a
/// session blocked in `pg_advisory_lock` holds a snapshot that `CREATE INDEX
/// CONCURRENTLY` would wait for), and releases it on every path.
pub struct MigrationRunner {
    database_url: String,
    set: MigrationSet,
    lock_timeout: Duration,
}

impl fmt::Debug for MigrationRunner {
    // The URL may hold a password: never print it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MigrationRunner")
            .field("database_url", &"<redacted>")
            .field("migrations", &self.set.len())
            .field("lock_timeout", &self.lock_timeout)
            .finish()
    }
}

/// Something the runner did, for progress output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationEvent {
    /// Another runner holds the lock; this one waits.
    WaitingForLock,
    /// A migration starts to apply.
    Applying {
        /// Folder name.
        name: String,
    },
    /// A migration applied and was recorded.
    Applied {
        /// Folder name.
        name: String,
        /// Time its `up.sql` took.
        duration: Duration,
    },
    /// A migration starts to revert.
    Reverting {
        /// Folder name.
        name: String,
    },
    /// A migration reverted and its record was removed.
    Reverted {
        /// Folder name.
        name: String,
        /// Time its `down.sql` took.
        duration: Duration,
    },
}

impl fmt::Display for MigrationEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::WaitingForLock => f.write_str("waiting for another migration runner to finish"),
            Self::Applying { name } => write!(f, "applying {name}"),
            Self::Applied { name, duration } => write!(f, "applied  {name} ({duration:.1?})"),
            Self::Reverting { name } => write!(f, "reverting {name}"),
            Self::Reverted { name, duration } => write!(f, "reverted {name} ({duration:.1?})"),
        }
    }
}

/// A migration that a run applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedMigration {
    /// Folder name.
    pub name: String,
    /// Version (folder name up to the first `_`).
    pub version: String,
    /// Time its `up.sql` took.
    pub duration: Duration,
}

/// Where one migration stands in a database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationState {
    /// In the binary, not applied yet.
    Pending,
    /// Applied; `checksum_matches` is false if the file changed since.
    Applied {
        /// When it was applied.
        applied_at: DateTime<Utc>,
        /// How long it took.
        duration: Duration,
        /// False if `up.sql` differs from the text that was applied.
        checksum_matches: bool,
    },
    /// Applied to the database but not in this binary.
    MissingFromSource {
        /// When it was applied.
        applied_at: DateTime<Utc>,
    },
}

/// One line of [`MigrationRunner::status`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationStatus {
    /// Folder name.
    pub name: String,
    /// Version.
    pub version: String,
    /// Applied, pending, or applied but missing from the binary.
    pub state: MigrationState,
}

impl MigrationRunner {
    /// The advisory lock key every dployr runner takes ("dployr" in ASCII,
    /// then 1). Advisory locks are per database, so runners on other
    /// databases never wait for each other.
    pub const LOCK_KEY: i64 = 0x6470_6c6f_7972_0001;

    /// Default time to wait for another runner's lock.
    pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(300);

    /// A runner for `set` on the database at `database_url`.
    pub fn new(database_url: impl Into<String>, set: MigrationSet) -> Self {
        Self { database_url: database_url.into(), set, lock_timeout: Self::DEFAULT_LOCK_TIMEOUT }
    }

    /// How long to wait for another runner's lock before giving up.
    #[must_use]
    pub fn with_lock_timeout(mut self, lock_timeout: Duration) -> Self {
        self.lock_timeout = lock_timeout;
        self
    }

    /// The migrations this runner applies.
    pub fn migrations(&self) -> &MigrationSet {
        &self.set
    }

    /// Every migration of the set and every applied one, with its state.
    /// Reads only; takes no lock and creates nothing.
    ///
    /// # Errors
    /// [`MigrateError::Connect`] or [`MigrateError::Database`].
    pub fn status(&self) -> Result<Vec<MigrationStatus>, MigrateError> {
        let mut conn = self.connect()?;
        let exists = diesel::select(diesel::dsl::sql::<Bool>("to_regclass('_migrations') IS NOT NULL"))
            .get_result::<bool>(&mut conn)
            .map_err(|source| MigrateError::Database { context: "looking for _migrations", source })?;
        let applied = if exists { read_applied_rows(&mut conn)? } else { Vec::new() };

        let mut lines: Vec<MigrationStatus> = self
            .set
            .iter()
            .map(|file| {
                let state = match applied.iter().find(|row| row.version == file.version()) {
                    Some(row) => MigrationState::Applied {
                        applied_at: row.applied_at,
                        duration: duration_of(row),
                        checksum_matches: check(file, row).is_ok(),
                    },
                    None => MigrationState::Pending,
                };
                MigrationStatus { name: file.name().to_owned(), version: file.version().to_owned(), state }
            })
            .collect();
        lines.extend(applied.iter().filter(|row| self.set.get(&row.version).is_none()).map(|row| MigrationStatus {
            name: row.name.clone(),
            version: row.version.clone(),
            state: MigrationState::MissingFromSource { applied_at: row.applied_at },
        }));
        lines.sort_by(|a, b| a.version.cmp(&b.version));
        Ok(lines)
    }

    /// Applies every pending migration in version order, under the lock,
    /// after verifying the applied ones. Returns what it applied (nothing if
    /// another runner got there first).
    ///
    /// # Errors
    /// Verification errors ([`MigrateError::ChecksumMismatch`],
    /// [`MigrateError::MissingFromSource`]) before anything runs; then
    /// [`MigrateError::MigrationFailed`] for the first migration that fails
    /// (earlier ones stay applied, the failing one leaves nothing).
    pub fn run_pending(
        &self,
        progress: &mut dyn FnMut(&MigrationEvent),
    ) -> Result<Vec<AppliedMigration>, MigrateError> {
        self.locked(progress, |harness, applied, progress| {
            let pending: Vec<&MigrationFile> =
                self.set.iter().filter(|file| !applied.iter().any(|row| row.version == file.version())).collect();
            let mut done = Vec::with_capacity(pending.len());
            for file in pending {
                let duration = apply_one(harness, file, progress)?;
                done.push(AppliedMigration {
                    name: file.name().to_owned(),
                    version: file.version().to_owned(),
                    duration,
                });
            }
            Ok(done)
        })
    }

    /// Reverts the applied migration with the highest version (its
    /// `down.sql`). Returns its name, or `None` if nothing is applied.
    ///
    /// # Errors
    /// As [`MigrationRunner::run_pending`], and [`MigrateError::NoDownFile`].
    pub fn revert_last(&self, progress: &mut dyn FnMut(&MigrationEvent)) -> Result<Option<String>, MigrateError> {
        self.locked(progress, |harness, applied, progress| {
            Ok(self.revert_last_locked(harness, applied, progress)?.map(|file| file.name().to_owned()))
        })
    }

    /// Reverts the last applied migration and applies it again, under one
    /// lock. Returns its name, or `None` if nothing is applied.
    ///
    /// # Errors
    /// As [`MigrationRunner::revert_last`].
    pub fn redo(&self, progress: &mut dyn FnMut(&MigrationEvent)) -> Result<Option<String>, MigrateError> {
        self.locked(progress, |harness, applied, progress| {
            let Some(file) = self.revert_last_locked(harness, applied, progress)? else {
                return Ok(None);
            };
            apply_one(harness, file, progress)?;
            Ok(Some(file.name().to_owned()))
        })
    }

    /// Returns the migration it reverted.
    fn revert_last_locked(
        &self,
        harness: &mut DployrHarness<'_>,
        applied: &[AppliedRow],
        progress: &mut dyn FnMut(&MigrationEvent),
    ) -> Result<Option<&MigrationFile>, MigrateError> {
        let Some(last) = applied.last() else {
            return Ok(None);
        };
        // verify() already proved every applied row is in the set.
        let file =
            self.set.get(&last.version).ok_or_else(|| MigrateError::MissingFromSource { name: last.name.clone() })?;
        progress(&MigrationEvent::Reverting { name: file.name().to_owned() });
        let duration = harness.revert(file)?;
        progress(&MigrationEvent::Reverted { name: file.name().to_owned(), duration });
        Ok(Some(file))
    }

    fn connect(&self) -> Result<PgConnection, MigrateError> {
        PgConnection::establish(&self.database_url).map_err(MigrateError::Connect)
    }

    /// Runs `work` on a dedicated connection holding the migration lock,
    /// after verifying the applied migrations (read once, under the lock, and
    /// handed to `work`) against the set.
    fn locked<T>(
        &self,
        progress: &mut dyn FnMut(&MigrationEvent),
        work: impl FnOnce(&mut DployrHarness<'_>, &[AppliedRow], &mut dyn FnMut(&MigrationEvent)) -> Result<T, MigrateError>,
    ) -> Result<T, MigrateError> {
        let mut conn = self.connect()?;
        self.acquire_lock(&mut conn, progress)?;
        let result = DployrHarness::new(&mut conn, &self.set).and_then(|mut harness| {
            let applied = harness.applied_rows()?;
            verify(&self.set, &applied)?;
            work(&mut harness, &applied, progress)
        });
        // The lock is session-level: it would also go when `conn` drops at
        // the end of this function, even if the unlock below cannot run
        // (a broken connection). Unlocking explicitly just makes it prompt.
        if let Err(unlock_error) = diesel::select(pg_advisory_unlock(Self::LOCK_KEY)).get_result::<bool>(&mut conn) {
            return result
                .and(Err(MigrateError::Database { context: "releasing the migration lock", source: unlock_error }));
        }
        result
    }

    fn acquire_lock(
        &self,
        conn: &mut PgConnection,
        progress: &mut dyn FnMut(&MigrationEvent),
    ) -> Result<(), MigrateError> {
        let started = Instant::now();
        let mut pause = Duration::from_millis(20);
        let mut told = false;
        loop {
            let locked = diesel::select(pg_try_advisory_lock(Self::LOCK_KEY))
                .get_result::<bool>(conn)
                .map_err(|source| MigrateError::Database { context: "taking the migration lock", source })?;
            if locked {
                return Ok(());
            }
            let waited = started.elapsed();
            if waited >= self.lock_timeout {
                return Err(MigrateError::LockTimeout { waited });
            }
            if !told {
                progress(&MigrationEvent::WaitingForLock);
                told = true;
            }
            thread::sleep(pause.min(self.lock_timeout - waited));
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }
}

/// Refuses, by name, an applied migration whose text changed or that the set
/// does not have. Runs before anything is applied or reverted.
fn verify(set: &MigrationSet, applied: &[AppliedRow]) -> Result<(), MigrateError> {
    for row in applied {
        let file = set.get(&row.version).ok_or_else(|| MigrateError::MissingFromSource { name: row.name.clone() })?;
        check(file, row)?;
    }
    Ok(())
}

/// The rule for one applied migration: same folder name, same `up.sql`.
/// [`MigrationRunner::status`] shows it, [`verify`] enforces it.
fn check(file: &MigrationFile, row: &AppliedRow) -> Result<(), MigrateError> {
    if file.name() != row.name {
        return Err(MigrateError::Renamed {
            version: row.version.clone(),
            recorded: row.name.clone(),
            current: file.name().to_owned(),
        });
    }
    if file.checksum() != row.checksum {
        return Err(MigrateError::ChecksumMismatch {
            name: file.name().to_owned(),
            recorded: row.checksum.clone(),
            current: file.checksum().to_owned(),
        });
    }
    Ok(())
}

/// Applies one migration, reporting before and after.
fn apply_one(
    harness: &mut DployrHarness<'_>,
    file: &MigrationFile,
    progress: &mut dyn FnMut(&MigrationEvent),
) -> Result<Duration, MigrateError> {
    progress(&MigrationEvent::Applying { name: file.name().to_owned() });
    let duration = harness.apply(file)?;
    progress(&MigrationEvent::Applied { name: file.name().to_owned(), duration });
    Ok(duration)
}

fn duration_of(row: &AppliedRow) -> Duration {
    Duration::from_millis(u64::try_from(row.duration_ms).unwrap_or(0))
}
