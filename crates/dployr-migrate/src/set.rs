//! The migrations a runner knows: their names, texts, checksums and whether
//! they run in a transaction.
//!
//! Discovery, naming and `metadata.toml` come from `diesel_migrations`
//! (`embed_migrations!` for the binary, `FileBasedMigrations` for a folder on
//! disk); the text comes from the same files, because diesel's `Migration`
//! trait does not hand it out and the runner must checksum exactly what it runs.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use diesel::migration::MigrationSource;
use diesel::pg::Pg;
use diesel_migrations::{EmbeddedMigrations, FileBasedMigrations, embed_migrations};
use sha2::{Digest, Sha256};

use crate::MigrateError;

/// The workspace's `migrations/` folder, embedded at compile time.
const EMBEDDED: EmbeddedMigrations = embed_migrations!("../../migrations");

mod embedded_texts {
    include!(concat!(env!("OUT_DIR"), "/migration_texts.rs"));
}

/// One migration: a folder with `up.sql`, usually `down.sql`, and optionally
/// `metadata.toml`.
#[derive(Debug, Clone)]
pub struct MigrationFile {
    name: Arc<str>,
    version: Arc<str>,
    up: Arc<str>,
    down: Option<Arc<str>>,
    run_in_transaction: bool,
    checksum: Arc<str>,
}

impl MigrationFile {
    /// The folder name, e.g. `000_init`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// diesel's version: the folder name up to the first `_`, e.g. `000`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The text of `up.sql`, exactly as it is sent to the server.
    pub fn up_sql(&self) -> &str {
        &self.up
    }

    /// The text of `down.sql`, if the folder has one.
    pub fn down_sql(&self) -> Option<&str> {
        self.down.as_deref()
    }

    /// False when `metadata.toml` opts out of the transaction (for
    /// statements such as `CREATE INDEX CONCURRENTLY`).
    pub fn run_in_transaction(&self) -> bool {
        self.run_in_transaction
    }

    /// Hex SHA-256 of `up.sql` with CRLF line endings read as LF, so a
    /// Windows checkout does not look like an edit.
    pub fn checksum(&self) -> &str {
        &self.checksum
    }
}

/// Computes the checksum the runner stores for a migration's `up.sql`.
fn checksum(text: &str) -> String {
    let normalised = text.replace("\r\n", "\n");
    let digest = Sha256::digest(normalised.as_bytes());
    digest.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// An ordered set of migrations, unique by version. Only a
/// [`MigrationRunner`](crate::MigrationRunner) applies it: the set is not a
/// diesel `MigrationSource`, so diesel's own harness, which would apply it
/// with no lock, no checksum and into diesel's table, cannot take it:
///
/// ```compile_fail,E0277
/// use diesel_migrations::MigrationHarness as _;
///
/// fn bypass(conn: &mut diesel::PgConnection, set: dployr_migrate::MigrationSet) {
///     let _ = conn.run_pending_migrations(set);
/// }
/// ```
#[derive(Debug, Clone)]
pub struct MigrationSet {
    by_version: BTreeMap<String, MigrationFile>,
}

impl MigrationSet {
    /// The migrations of the workspace's `migrations/` folder, embedded in
    /// this binary at compile time.
    ///
    /// # Errors
    /// [`MigrateError::Source`] if two folders share a version, or if the
    /// embedded texts and diesel's list disagree (a build problem).
    pub fn embedded() -> Result<Self, MigrateError> {
        let texts: BTreeMap<&str, (&str, Option<&str>)> =
            embedded_texts::MIGRATION_TEXTS.iter().map(|(name, up, down)| (*name, (*up, *down))).collect();
        Self::from_source(&EMBEDDED, |name| {
            texts.get(name).map(|(up, down)| ((*up).to_owned(), down.map(str::to_owned))).ok_or_else(|| {
                MigrateError::Source(format!("embedded migration {name} has no embedded text; rebuild dployr-migrate"))
            })
        })
    }

    /// The migrations in a folder on disk (diesel's layout), read now.
    ///
    /// # Errors
    /// [`MigrateError::Source`] if the folder or a file cannot be read, or two
    /// folders share a version.
    pub fn from_dir(path: impl AsRef<Path>) -> Result<Self, MigrateError> {
        Self::read_dir(path.as_ref())
    }

    /// Creates the folder of a new migration `NNN_name` in `dir` (NNN one
    /// above the highest version there) with template `up.sql` and
    /// `down.sql`, and returns its path. The templates hold only comments:
    /// run before they are edited, the runner refuses them by name
    /// ([`MigrateError::EmptyFile`]) rather than recording an empty change.
    ///
    /// # Errors
    /// [`MigrateError::Source`] for a name that is not lower-case letters,
    /// digits and `_`, or when the folder cannot be written.
    pub fn create_migration(dir: impl AsRef<Path>, name: &str) -> Result<std::path::PathBuf, MigrateError> {
        let dir = dir.as_ref();
        let valid = !name.is_empty() && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !valid {
            return Err(MigrateError::Source(format!(
                "migration name `{name}`: use lower-case letters, digits and `_` (e.g. add_avatar_url)"
            )));
        }
        let set = Self::read_dir(dir)?;
        // The next number, as wide as the widest version (three digits at
        // least; diesel's timestamps are fourteen): versions sort as text,
        // so a new one must sort after every version there is.
        let numeric = || set.iter().map(MigrationFile::version).filter(|v| v.bytes().all(|b| b.is_ascii_digit()));
        let width = numeric().map(str::len).max().unwrap_or(0).max(3);
        let next = numeric().filter_map(|v| v.parse::<u128>().ok()).max().map_or(0, |n| n + 1);
        let version = format!("{next:0width$}");
        if let Some(last) = set.iter().map(MigrationFile::version).filter(|v| *v >= version.as_str()).max() {
            return Err(MigrateError::Source(format!(
                "a new migration numbered {version} would sort before {last}, which runs first: \
                 versions are compared as text; renumber with more digits before the next one"
            )));
        }
        let next = version;
        let folder = dir.join(format!("{next}_{name}"));
        let io = |what: &str, e: std::io::Error| MigrateError::Source(format!("{what} {}: {e}", folder.display()));
        std::fs::create_dir(&folder).map_err(|e| io("creating", e))?;
        let up = format!(
            "-- {next}_{name}: describe the change here, then write it below.\n\
             -- The file runs whole, in one transaction with its record in _migrations.\n\
             -- For CREATE INDEX CONCURRENTLY, add metadata.toml with `run_in_transaction = false`\n\
             -- and keep this file to that one statement.\n\
             -- Until it holds a statement, `migrate run` refuses it by name.\n"
        );
        let down = format!("-- Reverts {next}_{name}: undo everything up.sql does.\n");
        std::fs::write(folder.join("up.sql"), up).map_err(|e| io("writing up.sql in", e))?;
        std::fs::write(folder.join("down.sql"), down).map_err(|e| io("writing down.sql in", e))?;
        Ok(folder)
    }

    fn read_dir(path: &Path) -> Result<Self, MigrateError> {
        let source = FileBasedMigrations::from_path(path)
            .map_err(|e| MigrateError::Source(format!("{}: {e}", path.display())))?;
        Self::from_source(&source, |name| {
            let folder = path.join(name);
            let read = |file: &str| std::fs::read_to_string(folder.join(file));
            let up = read("up.sql").map_err(|e| MigrateError::Source(format!("{name}/up.sql: {e}")))?;
            match read("metadata.toml") {
                Ok(text) => {
                    check_metadata(&text).map_err(|e| MigrateError::Source(format!("{name}/metadata.toml: {e}")))?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(MigrateError::Source(format!("{name}/metadata.toml: {e}"))),
            }
            let down = match read("down.sql") {
                Ok(text) => Some(text),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(MigrateError::Source(format!("{name}/down.sql: {e}"))),
            };
            Ok((up, down))
        })
    }

    fn from_source(
        source: &dyn MigrationSource<Pg>,
        text_of: impl Fn(&str) -> Result<(String, Option<String>), MigrateError>,
    ) -> Result<Self, MigrateError> {
        let migrations = source.migrations().map_err(|e| MigrateError::Source(e.to_string()))?;
        let mut by_version = BTreeMap::new();
        for migration in migrations {
            let name = migration.name().to_string();
            let version = migration.name().version().to_string();
            let (up, down) = text_of(&name)?;
            // An editor's byte-order mark is not SQL: PostgreSQL would refuse
            // it as a syntax error at line 1, and adding one is no edit.
            let without_bom = |text: String| match text.strip_prefix('\u{feff}') {
                Some(rest) => rest.to_owned(),
                None => text,
            };
            let (up, down) = (without_bom(up), down.map(without_bom));
            if up.trim().is_empty() {
                return Err(MigrateError::Source(format!("{name}/up.sql is empty")));
            }
            let file = MigrationFile {
                checksum: checksum(&up).into(),
                name: name.clone().into(),
                version: version.clone().into(),
                up: up.into(),
                down: down.map(Into::into),
                run_in_transaction: migration.metadata().run_in_transaction(),
            };
            if let Some(other) = by_version.insert(version.clone(), file) {
                return Err(MigrateError::Source(format!(
                    "migrations {} and {name} share the version {version}",
                    other.name
                )));
            }
        }
        Ok(Self { by_version })
    }

    /// The migrations in the order they apply (by version).
    pub fn iter(&self) -> impl Iterator<Item = &MigrationFile> {
        self.by_version.values()
    }

    /// The migration with this version, if the set has one.
    pub fn get(&self, version: &str) -> Option<&MigrationFile> {
        self.by_version.get(version)
    }

    /// How many migrations the set holds.
    pub fn len(&self) -> usize {
        self.by_version.len()
    }

    /// True when the set holds no migration.
    pub fn is_empty(&self) -> bool {
        self.by_version.is_empty()
    }

    /// One hex SHA-256 over every migration's name and checksum: equal sets
    /// give equal fingerprints. Test kits name template databases with it.
    pub fn fingerprint(&self) -> String {
        let joined: String = self.iter().map(|m| format!("{}:{}\n", m.name, m.checksum)).collect();
        checksum(&joined)
    }
}

impl std::fmt::Display for MigrationFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

/// What a migration's `metadata.toml` may say. diesel_migrations reads it
/// leniently: a file it cannot parse (`run_in_transaction = False`) is taken
/// as no metadata, and the migration runs in a transaction; a file it can,
/// without the key (empty, only comments, a misspelt key), as
/// `run_in_transaction = false`, and the migration runs outside one. The
/// runner reads it again and refuses all of these: a `metadata.toml` says
/// `run_in_transaction`, as a boolean, and nothing else.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Metadata {
    run_in_transaction: Option<bool>,
}

/// The `run_in_transaction` of a `metadata.toml` (diesel_migrations gives
/// the runner the same); refuses one that is not TOML, holds anything but
/// that boolean, or does not hold it.
fn check_metadata(text: &str) -> Result<bool, String> {
    let metadata = toml::from_str::<Metadata>(text).map_err(|error| error.to_string())?;
    metadata.run_in_transaction.ok_or_else(|| {
        "says nothing (diesel_migrations would take that for run_in_transaction = false): set \
         run_in_transaction = false, or remove the file"
            .to_owned()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_ignores_crlf_line_endings() {
        assert_eq!(checksum("SELECT 1;\r\nSELECT 2;\r\n"), checksum("SELECT 1;\nSELECT 2;\n"));
        assert_ne!(checksum("SELECT 1;"), checksum("SELECT 2;"));
    }

    #[test]
    fn every_workspace_migration_can_be_reverted() {
        let set = MigrationSet::embedded().expect("embedded migrations load");
        let one_way: Vec<&str> =
            set.iter().filter(|m| m.down_sql().is_none_or(|d| d.trim().is_empty())).map(MigrationFile::name).collect();
        assert!(one_way.is_empty(), "migrations without a down.sql: {one_way:?}");
    }

    #[test]
    fn two_folders_with_one_version_are_refused_by_name() {
        let dir = tempfile::tempdir().expect("temp dir");
        for name in ["001_first", "001_second"] {
            std::fs::create_dir(dir.path().join(name)).expect("folder");
            std::fs::write(dir.path().join(name).join("up.sql"), "SELECT 1;").expect("up.sql");
        }
        let error = MigrationSet::from_dir(dir.path()).expect_err("duplicate versions");
        let message = error.to_string();
        assert!(message.contains("001_first") && message.contains("001_second"), "{message}");
    }

    #[test]
    fn an_empty_up_sql_is_refused_by_name() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir(dir.path().join("001_blank")).expect("folder");
        std::fs::write(dir.path().join("001_blank").join("up.sql"), "  \n\t\n").expect("up.sql");
        let error = MigrationSet::from_dir(dir.path()).expect_err("an empty migration");
        assert!(error.to_string().contains("001_blank/up.sql is empty"), "{error}");
    }

    #[test]
    fn embedded_set_matches_the_migrations_folder() {
        let set = MigrationSet::embedded().expect("embedded migrations load");
        let folder = MigrationSet::from_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../../migrations"))
            .expect("migrations folder loads");
        let embedded: Vec<_> = set.iter().map(|m| (m.name().to_owned(), m.checksum().to_owned())).collect();
        let on_disk: Vec<_> = folder.iter().map(|m| (m.name().to_owned(), m.checksum().to_owned())).collect();
        assert_eq!(embedded, on_disk);
        assert_eq!(set.iter().next().map(MigrationFile::name), Some("000_init"));
    }
}
