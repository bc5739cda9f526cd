//! Per-test databases: one template per migration set, then a cheap clone
//! (`CREATE DATABASE ... TEMPLATE`) for every test, so tests run in parallel
//! and never see each other's rows.

use diesel::connection::SimpleConnection as _;
use diesel::prelude::*;
use diesel::sql_types::{Bool, Integer, Nullable, Text};
use dployr_migrate::{MigrationRunner, MigrationSet};

use crate::TestkitError;

/// `"name"` with embedded quotes doubled: database names cannot be bound
/// parameters in `CREATE DATABASE`. Names here are made by the testkit.
pub(crate) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

pub(crate) fn database_exists(admin: &mut PgConnection, name: &str) -> Result<bool, TestkitError> {
    diesel::select(
        diesel::dsl::sql::<Bool>("EXISTS (SELECT 1 FROM pg_database WHERE datname = ").bind::<Text, _>(name).sql(")"),
    )
    .get_result(admin)
    .map_err(|e| TestkitError::sql("looking up a database", e))
}

/// Creates `name` unless it exists.
pub(crate) fn create_database_if_missing(admin: &mut PgConnection, name: &str) -> Result<(), TestkitError> {
    if database_exists(admin, name)? {
        return Ok(());
    }
    match admin.batch_execute(&format!("CREATE DATABASE {}", quote_ident(name))) {
        Ok(()) => Ok(()),
        // Another process made it between the look and the creation (two
        // `cargo xtask db up` at once): it exists, which is all asked for.
        // (CREATE DATABASE meets the other's row in pg_database's unique
        // index, not its own duplicate_database check.)
        Err(_) if database_exists(admin, name)? => Ok(()),
        Err(e) => Err(TestkitError::sql("creating a database", e)),
    }
}

/// The server's major version, e.g. 15.
pub(crate) fn server_major(admin: &mut PgConnection) -> Result<i32, TestkitError> {
    diesel::select(diesel::dsl::sql::<Integer>("current_setting('server_version_num')::int / 10000"))
        .get_result(admin)
        .map_err(|e| TestkitError::sql("reading the server version", e))
}

/// The name of the template of `set`: `dployr_tpl_<16 hex digits of its fingerprint>`.
pub(crate) fn template_name(set: &MigrationSet) -> String {
    format!("dployr_tpl_{}", &set.fingerprint()[..16])
}

/// What the `application_name` of a test process's admin session starts
/// with: `dployr-testkit <run> <template>`, where the run is the
/// `<pid>_<random>` of the process's database names. Every session may read
/// every other's `application_name` in `pg_stat_activity`, so
/// [`leftovers`] sees, from any machine, which runs are alive and which
/// templates they clone (at most 62 bytes: it fits NAMEDATALEN).
const SESSION_TAG: &str = "dployr-testkit ";

/// Names the run of this process and its `template` in `admin`'s
/// `application_name` (see [`SESSION_TAG`]).
pub(crate) fn tag_admin_session(admin: &mut PgConnection, template: &str) -> Result<(), TestkitError> {
    let tag = format!("{SESSION_TAG}{} {template}", crate::run_id());
    diesel::select(diesel::dsl::sql::<Text>("set_config('application_name', ").bind::<Text, _>(tag).sql(", false)"))
        .get_result::<String>(admin)
        .map(drop)
        .map_err(|e| TestkitError::sql("naming the admin session", e))
}

/// Makes sure the template for `set` exists, and returns its name.
///
/// The name carries the set's fingerprint, so a changed migration gets a
/// new template rather than a stale one. The template is built under
/// another name and renamed when complete, under an advisory lock, so test
/// processes sharing one server neither race nor see a half-migrated
/// template after a crash.
pub(crate) fn ensure_template(
    admin: &mut PgConnection,
    admin_url_for: &dyn Fn(&str) -> String,
    set: &MigrationSet,
) -> Result<String, TestkitError> {
    let name = template_name(set);
    if database_exists(admin, &name)? {
        return Ok(name);
    }
    // PostgreSQL scopes an advisory lock to the database its session is
    // connected to: the lock is taken in `postgres`, whatever database the
    // admin URL names, so that runs whose admin URLs name different
    // databases of one server build a template one at a time too (the
    // admin's own database if the server has no `postgres`).
    let mut in_postgres = PgConnection::establish(&admin_url_for(LOCK_DATABASE)).ok();
    let on_lock_session =
        |in_postgres: Option<&mut PgConnection>, admin: &mut PgConnection, sql: &str| match in_postgres {
            Some(conn) => conn.batch_execute(sql),
            None => admin.batch_execute(sql),
        };
    on_lock_session(in_postgres.as_mut(), admin, &format!("SELECT pg_advisory_lock({TEMPLATE_LOCK})"))
        .map_err(|e| TestkitError::sql("locking template creation", e))?;
    let built = build_template(admin, admin_url_for, set, &name);
    let unlocked = on_lock_session(in_postgres.as_mut(), admin, &format!("SELECT pg_advisory_unlock({TEMPLATE_LOCK})"));
    built?;
    unlocked.map_err(|e| TestkitError::sql("unlocking template creation", e))?;
    Ok(name)
}

/// The advisory lock under which a template is built.
const TEMPLATE_LOCK: i64 = 0x6470_6c6f_7972_0002;

/// The database the template lock is taken in.
const LOCK_DATABASE: &str = "postgres";

fn build_template(
    admin: &mut PgConnection,
    admin_url_for: &dyn Fn(&str) -> String,
    set: &MigrationSet,
    name: &str,
) -> Result<(), TestkitError> {
    if database_exists(admin, name)? {
        return Ok(()); // another process finished it while we waited
    }
    let building = format!("{name}_building");
    // A leftover of a process that crashed while building: start over.
    // (Two statements: CREATE DATABASE refuses to run in the implicit
    // transaction of a multi-statement query.)
    drop_database(admin, &building)?;
    admin
        .batch_execute(&format!("CREATE DATABASE {}", quote_ident(&building)))
        .map_err(|e| TestkitError::sql("creating the template database", e))?;
    MigrationRunner::new(admin_url_for(&building), set.clone()).run_pending(&mut |_| {})?;
    // No one may connect to the template: a clone fails while the source
    // has sessions. Not IS_TEMPLATE: the role that built it owns it, which
    // is enough to clone it, and a template database refuses a plain DROP
    // DATABASE (`cargo xtask db clean` drops leftovers of other runs).
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {b} RENAME TO {n}; ALTER DATABASE {n} WITH ALLOW_CONNECTIONS false",
            b = quote_ident(&building),
            n = quote_ident(name)
        ))
        .map_err(|e| TestkitError::sql("publishing the template database", e))
}

/// Clones `template` into a new database `name`.
pub(crate) fn clone_database(
    admin: &mut PgConnection,
    template: &str,
    name: &str,
    file_copy: bool,
) -> Result<(), TestkitError> {
    // FILE_COPY (PostgreSQL 15+) copies the template's files instead of
    // WAL-logging every block: far cheaper for a small template.
    let strategy = if file_copy { " STRATEGY FILE_COPY" } else { "" };
    admin
        .batch_execute(&format!("CREATE DATABASE {} TEMPLATE {}{strategy}", quote_ident(name), quote_ident(template)))
        .map_err(|e| TestkitError::sql("cloning the template database", e))
}

/// Drops `name`, disconnecting whoever is still connected.
pub(crate) fn drop_database(admin: &mut PgConnection, name: &str) -> Result<(), TestkitError> {
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", quote_ident(name)))
        .map_err(|e| TestkitError::sql("dropping a test database", e))
}

/// The databases the testkit leaves on a server of one's own: templates
/// (`dployr_tpl_*`, one per migration set ever tested) and per-test
/// databases of processes that died before they could drop them
/// (`dployr_t_<pid>_<run>_<n>`, `dployr_e_<pid>_<run>_<n>`, or without the
/// run, as earlier versions named them).
///
/// A server may be shared by test processes of several machines or
/// containers, so what a process still running may use is kept:
/// - a template, or a per-test database, of a run whose admin session is
///   connected ([`SESSION_TAG`]), on whatever machine it runs;
/// - a `_building` template while the template lock is held: its builder
///   is alive (it may be a version that does not name its session);
/// - a database someone is connected to (the drop would cut them off);
/// - a per-test database whose process id is alive on this machine (an
///   admin session lost to a restart of the server and not yet reopened,
///   or a version that does not name its session).
///
/// The names are listed before the sessions: a run creates its databases
/// after it names its session, so none is taken for a leftover in between.
/// A run that starts after the listing and finds its template dropped
/// builds it again.
pub(crate) fn leftovers(admin: &mut PgConnection) -> Result<Vec<String>, TestkitError> {
    let names: Vec<String> = diesel::dsl::sql::<Text>(
        "SELECT datname::text FROM pg_database WHERE datname ~ '^dployr_(tpl_[0-9a-f]+(_building)?|[te]_[0-9]+(_[0-9a-f]{8})?_[0-9]+)$' \
         ORDER BY 1",
    )
    .load(admin)
    .map_err(|e| TestkitError::sql("listing leftover databases", e))?;
    let sessions: Vec<(Option<String>, Option<String>)> = diesel::dsl::sql::<(Nullable<Text>, Nullable<Text>)>(
        "SELECT datname::text, application_name FROM pg_stat_activity WHERE pid <> pg_backend_pid()",
    )
    .load(admin)
    .map_err(|e| TestkitError::sql("listing the sessions of the server", e))?;
    let building: bool = diesel::select(diesel::dsl::sql::<Bool>(&format!(
        "EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND classid = {} AND objid = {} AND objsubid = 1)",
        TEMPLATE_LOCK >> 32,
        TEMPLATE_LOCK & 0xffff_ffff
    )))
    .get_result(admin)
    .map_err(|e| TestkitError::sql("looking for a template being built", e))?;
    let connected: Vec<&str> = sessions.iter().filter_map(|(datname, _)| datname.as_deref()).collect();
    // (run, template) of every test process's admin session.
    let runs: Vec<(&str, &str)> = sessions
        .iter()
        .filter_map(|(_, application)| application.as_deref()?.strip_prefix(SESSION_TAG)?.split_once(' '))
        .collect();
    let in_use = |name: &str| {
        if connected.contains(&name) {
            return true;
        }
        if name.starts_with("dployr_tpl_") {
            let (template, being_built) = name.strip_suffix("_building").map_or((name, false), |base| (base, true));
            return runs.iter().any(|(_, used)| *used == template) || (building && being_built);
        }
        // dployr_<t|e>_<pid>_<run>_<n>, or dployr_<t|e>_<pid>_<n>.
        let Some((run, _n)) = name.get("dployr_t_".len()..).and_then(|rest| rest.rsplit_once('_')) else {
            return false;
        };
        let pid = run.split('_').next().and_then(|pid| pid.parse::<i32>().ok());
        runs.iter().any(|(live, _)| *live == run) || pid.is_some_and(crate::local::process_alive)
    };
    Ok(names.iter().filter(|name| !in_use(name)).cloned().collect())
}

/// Drops [`leftovers`]; returns the names dropped. A template of the old
/// kind (`IS_TEMPLATE true`) is made an ordinary database first.
pub(crate) fn drop_leftovers(admin: &mut PgConnection) -> Result<Vec<String>, TestkitError> {
    let names = leftovers(admin)?;
    for name in &names {
        admin
            .batch_execute(&format!("ALTER DATABASE {} WITH IS_TEMPLATE false", quote_ident(name)))
            .map_err(|e| TestkitError::sql("unmarking a template database", e))?;
        drop_database(admin, name)?;
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::thread;
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_template_waits_for_the_lock_of_a_run_whose_admin_database_is_another() {
        let server = crate::server().unwrap();
        // This run's admin connection names a database other than `postgres`.
        let other = crate::next_name("e");
        let mut postgres = PgConnection::establish(&server.url_for("postgres")).unwrap();
        create_database_if_missing(&mut postgres, &other).unwrap();
        let mut admin = PgConnection::establish(&server.url_for(&other)).unwrap();
        // A migration set no template exists for yet.
        let dir = tempfile::tempdir().unwrap();
        let table = format!("probe_{:08x}", rand::random::<u32>());
        std::fs::create_dir(dir.path().join("000_probe")).unwrap();
        std::fs::write(dir.path().join("000_probe/up.sql"), format!("CREATE TABLE {table} (id int);")).unwrap();
        let set = MigrationSet::from_dir(dir.path()).unwrap();
        // Another run builds a template, its admin connection on `postgres`.
        let mut other_run = PgConnection::establish(&server.url_for("postgres")).unwrap();
        other_run.batch_execute(&format!("SELECT pg_advisory_lock({TEMPLATE_LOCK})")).unwrap();
        let released = Arc::new(AtomicBool::new(false));
        let building = thread::spawn({
            let released = Arc::clone(&released);
            move || {
                let name = ensure_template(&mut admin, &|db| server.url_for(db), &set).unwrap();
                (name, released.load(Ordering::SeqCst))
            }
        });
        thread::sleep(Duration::from_millis(300));
        released.store(true, Ordering::SeqCst);
        other_run.batch_execute(&format!("SELECT pg_advisory_unlock({TEMPLATE_LOCK})")).unwrap();
        let (template, built_after_the_release) = building.join().unwrap();
        drop_database(&mut postgres, &template).unwrap();
        drop_database(&mut postgres, &other).unwrap();
        assert!(built_after_the_release, "built while another run held the template lock");
    }

    /// Two processes asking for the same database at once (two `cargo xtask
    /// db up`): the second's creation met the first's row, and failed with
    /// "duplicate key value violates unique constraint".
    #[test]
    fn two_creations_of_one_missing_database_at_once_both_succeed() {
        let server = crate::server().unwrap();
        for _ in 0..8 {
            let name = crate::next_name("c");
            let start = Arc::new(std::sync::Barrier::new(2));
            let creations: Vec<_> = (0..2)
                .map(|_| {
                    let (start, name, url) = (Arc::clone(&start), name.clone(), server.url_for("postgres"));
                    thread::spawn(move || {
                        let mut admin = PgConnection::establish(&url).unwrap();
                        start.wait();
                        create_database_if_missing(&mut admin, &name).map_err(|e| e.to_string())
                    })
                })
                .collect();
            let answers: Vec<_> = creations.into_iter().map(|creation| creation.join().unwrap()).collect();
            drop_database(&mut PgConnection::establish(&server.url_for("postgres")).unwrap(), &name).unwrap();
            assert!(answers.iter().all(Result::is_ok), "{answers:?}");
        }
    }
}
