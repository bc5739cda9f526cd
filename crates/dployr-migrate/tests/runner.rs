//! The runner's guarantees, each proved against a real PostgreSQL (a fresh,
//! empty database per test from dployr-testkit).

#![cfg(test)]

use std::path::Path;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

use diesel::connection::SimpleConnection as _;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Bool, Text};
use dployr_migrate::{MigrateError, MigrationEvent, MigrationRunner, MigrationSet, MigrationState};
use dployr_testkit::{TestDatabase, empty_database};

/// One migration folder to write: name, up.sql, down.sql, metadata.toml.
#[derive(Clone, Copy)]
struct Folder<'a> {
    name: &'a str,
    up: &'a str,
    down: Option<&'a str>,
    metadata: Option<&'a str>,
}

fn folder<'a>(name: &'a str, up: &'a str) -> Folder<'a> {
    Folder { name, up, down: None, metadata: None }
}

fn write_folders(root: &Path, folders: &[Folder<'_>]) {
    for f in folders {
        let dir = root.join(f.name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("up.sql"), f.up).unwrap();
        if let Some(down) = f.down {
            std::fs::write(dir.join("down.sql"), down).unwrap();
        }
        if let Some(metadata) = f.metadata {
            std::fs::write(dir.join("metadata.toml"), metadata).unwrap();
        }
    }
}

fn set_of(folders: &[Folder<'_>]) -> (tempfile::TempDir, MigrationSet) {
    let dir = tempfile::tempdir().unwrap();
    write_folders(dir.path(), folders);
    let set = MigrationSet::from_dir(dir.path()).unwrap();
    (dir, set)
}

fn run(db: &TestDatabase, set: &MigrationSet) -> Result<Vec<String>, MigrateError> {
    MigrationRunner::new(db.url(), set.clone())
        .run_pending(&mut |_| {})
        .map(|applied| applied.into_iter().map(|m| m.name).collect())
}

fn count(conn: &mut PgConnection, sql: &str) -> i64 {
    diesel::select(diesel::dsl::sql::<BigInt>(&format!("({sql})"))).get_result(conn).unwrap()
}

fn table_exists(conn: &mut PgConnection, table: &str) -> bool {
    diesel::select(diesel::dsl::sql::<Bool>("to_regclass(").bind::<Text, _>(table).sql(") IS NOT NULL"))
        .get_result(conn)
        .unwrap()
}

fn recorded(conn: &mut PgConnection) -> Vec<String> {
    if !table_exists(conn, "_migrations") {
        return Vec::new();
    }
    diesel::dsl::sql::<Text>("SELECT name FROM _migrations ORDER BY version").load(conn).unwrap()
}

#[test]
fn workspace_migrations_apply_to_an_empty_database_and_record_checksums() {
    let db = empty_database();
    let set = MigrationSet::embedded().unwrap();
    let applied = run(&db, &set).unwrap();
    assert_eq!(applied.first().map(String::as_str), Some("000_init"));
    let mut conn = db.connect();
    assert_eq!(recorded(&mut conn), applied);
    let checksum: String = diesel::dsl::sql::<Text>("SELECT checksum FROM _migrations WHERE version = '000'")
        .get_result(&mut conn)
        .unwrap();
    assert_eq!(checksum, set.get("000").unwrap().checksum());
    // Running again finds nothing to do.
    assert_eq!(run(&db, &set).unwrap(), Vec::<String>::new());
}

#[test]
fn plpgsql_body_with_semicolons_inside_dollar_quotes_applies() {
    let db = empty_database();
    let (_dir, set) = set_of(&[folder(
        "001_plpgsql",
        "CREATE TABLE counters (n int NOT NULL);
         CREATE FUNCTION bump() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             NEW.n := NEW.n + 1;
             RETURN NEW;
         END;
         $$;
         CREATE TRIGGER counters_bump BEFORE INSERT ON counters FOR EACH ROW EXECUTE FUNCTION bump();
         DO $body$ BEGIN INSERT INTO counters VALUES (41); END; $body$;",
    )]);
    assert_eq!(run(&db, &set).unwrap(), ["001_plpgsql"]);
    let mut conn = db.connect();
    assert_eq!(count(&mut conn, "SELECT max(n)::bigint FROM counters"), 42);
}

#[test]
fn migration_failing_in_its_last_statement_leaves_no_table_no_row_and_names_the_file() {
    let db = empty_database();
    let (_dir, set) = set_of(&[
        folder("001_ok", "CREATE TABLE kept (id int);"),
        folder("002_broken", "CREATE TABLE half (id int);\nINSERT INTO half VALUES (1);\nSELECT 1 / 0;\n"),
    ]);
    let error = run(&db, &set).unwrap_err();
    match &error {
        MigrateError::MigrationFailed(failure) => {
            assert_eq!(failure.name, "002_broken");
            assert_eq!(failure.file, "up.sql");
            assert!(failure.message.contains("division by zero"), "{}", failure.message);
        }
        other => panic!("expected MigrationFailed, got {other:?}"),
    }
    assert!(error.to_string().contains("002_broken/up.sql"), "{error}");
    let mut conn = db.connect();
    assert!(!table_exists(&mut conn, "half"), "the failed migration's table must not exist");
    assert!(table_exists(&mut conn, "kept"), "the earlier migration stays applied");
    assert_eq!(recorded(&mut conn), ["001_ok"]);
}

/// A constraint checked at commit (`DEFERRABLE INITIALLY DEFERRED`, as the
/// schema's one-owner guard is) refuses the file's data when the file's
/// transaction commits, after its statements and its bookkeeping ran: the
/// error names the file, not the runner's bookkeeping, and nothing stays.
#[test]
fn a_deferred_constraint_that_refuses_the_files_data_names_the_file() {
    let db = empty_database();
    let (_dir, set) = set_of(&[
        folder(
            "001_parent_child",
            "CREATE TABLE parent (id int PRIMARY KEY);
             CREATE TABLE child (parent_id int REFERENCES parent DEFERRABLE INITIALLY DEFERRED);",
        ),
        folder(
            "002_orphan",
            "INSERT INTO child VALUES (7);
",
        ),
    ]);
    let error = run(&db, &set).unwrap_err();
    let MigrateError::MigrationFailed(failure) = &error else {
        panic!("expected MigrationFailed naming the file, got {error:?}: {error}");
    };
    assert_eq!((failure.name.as_str(), failure.file), ("002_orphan", "up.sql"), "{error}");
    assert!(failure.message.contains("foreign key"), "{}", failure.message);
    let mut conn = db.connect();
    assert_eq!(count(&mut conn, "SELECT count(*) FROM child"), 0);
    assert_eq!(recorded(&mut conn), ["001_parent_child"]);
}

#[test]
fn error_names_the_line_and_column_postgresql_points_at() {
    let db = empty_database();
    let (_dir, set) = set_of(&[folder("001_typo", "CREATE TABLE a (id int);\n\nCREAT TABLE b (id int);\n")]);
    let error = run(&db, &set).unwrap_err();
    let MigrateError::MigrationFailed(failure) = &error else {
        panic!("expected a failure, got {error:?}");
    };
    let position = failure.position.expect("PostgreSQL locates a syntax error");
    assert_eq!((position.line, position.column), (3, 1));
    assert!(error.to_string().contains("001_typo/up.sql failed at line 3, column 1"), "{error}");
}

#[test]
fn eight_concurrent_runners_all_succeed_and_apply_each_migration_once() {
    let db = empty_database();
    let (_dir, set) = set_of(&[
        folder("001_log", "CREATE TABLE applications (name text NOT NULL); INSERT INTO applications VALUES ('001');"),
        // A slow one widens the window in which the others must wait.
        folder("002_slow", "SELECT pg_sleep(0.3); INSERT INTO applications VALUES ('002');"),
        folder("003_more", "INSERT INTO applications VALUES ('003');"),
    ]);
    let start = Arc::new(Barrier::new(8));
    let runners: Vec<_> = (0..8)
        .map(|_| {
            let (url, set, start) = (db.url().to_owned(), set.clone(), Arc::clone(&start));
            thread::spawn(move || {
                start.wait();
                MigrationRunner::new(url, set).run_pending(&mut |_| {}).map(|applied| applied.len())
            })
        })
        .collect();
    let applied: Vec<usize> = runners.into_iter().map(|r| r.join().unwrap().unwrap()).collect();
    assert_eq!(applied.iter().sum::<usize>(), 3, "each migration applied by exactly one runner: {applied:?}");
    let mut conn = db.connect();
    assert_eq!(count(&mut conn, "SELECT count(*) FROM applications"), 3);
    assert_eq!(count(&mut conn, "SELECT count(DISTINCT name) FROM applications"), 3);
    assert_eq!(recorded(&mut conn), ["001_log", "002_slow", "003_more"]);
}

#[test]
fn editing_an_applied_migration_is_refused_before_anything_runs() {
    let db = empty_database();
    let (dir, set) = set_of(&[folder("001_users", "CREATE TABLE people (id int);")]);
    run(&db, &set).unwrap();

    write_folders(
        dir.path(),
        &[
            folder("001_users", "CREATE TABLE people (id bigint);"),
            folder("002_next", "CREATE TABLE next_one (id int);"),
        ],
    );
    let edited = MigrationSet::from_dir(dir.path()).unwrap();
    let error = run(&db, &edited).unwrap_err();
    assert!(matches!(&error, MigrateError::ChecksumMismatch { name, .. } if name == "001_users"), "{error:?}");
    assert!(error.to_string().contains("001_users"));
    let mut conn = db.connect();
    assert!(!table_exists(&mut conn, "next_one"), "nothing may run after a checksum mismatch");
    assert_eq!(recorded(&mut conn), ["001_users"]);
}

#[test]
fn crlf_checkout_of_an_applied_migration_is_not_an_edit() {
    let db = empty_database();
    let (_dir, set) = set_of(&[folder("001_lf", "CREATE TABLE lf (id int);\nCREATE TABLE lf2 (id int);\n")]);
    run(&db, &set).unwrap();
    let (_dir2, crlf) = set_of(&[folder("001_lf", "CREATE TABLE lf (id int);\r\nCREATE TABLE lf2 (id int);\r\n")]);
    assert_eq!(run(&db, &crlf).unwrap(), Vec::<String>::new());
}

#[test]
fn renaming_an_applied_migration_is_refused() {
    let db = empty_database();
    let (_dir, set) = set_of(&[folder("001_old_name", "CREATE TABLE a (id int);")]);
    run(&db, &set).unwrap();
    let (_dir2, renamed) = set_of(&[folder("001_new_name", "CREATE TABLE a (id int);")]);
    let error = run(&db, &renamed).unwrap_err();
    assert!(
        matches!(&error, MigrateError::Renamed { recorded, current, .. } if recorded == "001_old_name" && current == "001_new_name"),
        "{error:?}"
    );
}

#[test]
fn applied_migration_missing_from_the_binary_is_refused() {
    let db = empty_database();
    let (_dir, set) =
        set_of(&[folder("001_a", "CREATE TABLE a (id int);"), folder("002_b", "CREATE TABLE b (id int);")]);
    run(&db, &set).unwrap();
    let (_dir2, older) =
        set_of(&[folder("001_a", "CREATE TABLE a (id int);"), folder("003_c", "CREATE TABLE c (id int);")]);
    let error = run(&db, &older).unwrap_err();
    assert!(matches!(&error, MigrateError::MissingFromSource { name } if name == "002_b"), "{error:?}");
    let mut conn = db.connect();
    assert!(!table_exists(&mut conn, "c"));
    // status still reports it, so an operator can see what is wrong.
    let status = MigrationRunner::new(db.url(), older).status().unwrap();
    assert!(status.iter().any(|s| s.name == "002_b" && matches!(s.state, MigrationState::MissingFromSource { .. })));
}

/// A migration of the set missing between applied ones (a branch's,
/// numbered before one already applied, or one whose row was deleted from
/// `_migrations`) is refused by name before anything runs: applied on top
/// of the later ones, it would run on a schema it was not written for.
#[test]
fn a_pending_migration_older_than_an_applied_one_is_refused_before_anything_runs() {
    let a = folder("001_a", "CREATE TABLE a (id int);");
    let b = folder("002_b", "CREATE TABLE b (id int);");
    let c = folder("003_c", "CREATE TABLE c (id int);");
    let d = folder("004_d", "CREATE TABLE d (id int);");
    let db = empty_database();
    run(&db, &set_of(&[a, c]).1).unwrap();
    let error = run(&db, &set_of(&[a, b, c, d]).1).unwrap_err();
    assert!(
        matches!(&error, MigrateError::OutOfOrder { pending, applied } if pending == "002_b" && applied == "003_c"),
        "{error:?}"
    );
    assert!(error.to_string().contains("002_b") && error.to_string().contains("003_c"), "{error}");
    let mut conn = db.connect();
    assert!(!table_exists(&mut conn, "b") && !table_exists(&mut conn, "d"), "nothing ran, the later 004_d neither");
    assert_eq!(recorded(&mut conn), ["001_a", "003_c"]);

    // The workspace's own migrations, one row deleted from the middle of
    // the history: not applied again over the later ones.
    let db = empty_database();
    let runner = MigrationRunner::new(db.url(), MigrationSet::embedded().unwrap());
    runner.run_pending(&mut |_| {}).unwrap();
    let files: Vec<_> = runner.migrations().iter().map(|f| (f.version().to_owned(), f.name().to_owned())).collect();
    let (middle_version, middle_name) = files[files.len() / 2].clone();
    let mut conn = db.connect();
    conn.batch_execute(&format!("DELETE FROM _migrations WHERE version = '{middle_version}'")).unwrap();
    let before = db.schema_dump().unwrap();
    let error = runner.run_pending(&mut |_| {}).unwrap_err();
    let latest = &files.last().unwrap().1;
    assert!(
        matches!(&error, MigrateError::OutOfOrder { pending, applied } if *pending == middle_name && applied == latest),
        "{error:?}"
    );
    assert_eq!(db.schema_dump().unwrap(), before, "the schema is untouched");
    assert_eq!(recorded(&mut conn).len(), files.len() - 1);
}

/// A migrated database whose `_migrations` was dropped (or emptied) is
/// not migrated again over its own schema: the first migration's "already
/// exists" is told as a missing history, naming the file, with nothing
/// applied, not as a fault of the file.
#[test]
fn a_schema_whose_migration_history_was_dropped_or_emptied_is_told_as_such() {
    for lose_history in ["DROP TABLE _migrations", "DELETE FROM _migrations"] {
        let db = empty_database();
        let runner = MigrationRunner::new(db.url(), MigrationSet::embedded().unwrap());
        runner.run_pending(&mut |_| {}).unwrap();
        let first = runner.migrations().iter().next().unwrap().name().to_owned();
        db.connect().batch_execute(lose_history).unwrap();
        let before = db.schema_dump().unwrap();
        let error = runner.run_pending(&mut |_| {}).unwrap_err();
        assert!(
            matches!(&error, MigrateError::SchemaWithoutHistory(failure) if failure.name == first),
            "{lose_history}: {error:?}"
        );
        let told = error.to_string();
        assert!(told.contains(&first) && told.contains("_migrations records no migration"), "{told}");
        assert_eq!(recorded(&mut db.connect()), Vec::<String>::new(), "{lose_history}: nothing recorded");
        // Nothing applied: the schema is as it was, but for the empty
        // `_migrations` the run made where there was none.
        db.connect().batch_execute(lose_history).unwrap();
        assert_eq!(db.schema_dump().unwrap(), before, "{lose_history}: the schema changed");
    }
    // A failure of another kind on an empty history stays the file's own.
    let db = empty_database();
    let (_dir, set) = set_of(&[folder("001_a", "SELECT 1/0;")]);
    let error = run(&db, &set).unwrap_err();
    assert!(matches!(&error, MigrateError::MigrationFailed(failure) if failure.name == "001_a"), "{error:?}");
}

#[test]
fn revert_then_run_returns_to_the_same_schema() {
    let db = empty_database();
    let runner = MigrationRunner::new(db.url(), MigrationSet::embedded().unwrap());
    runner.run_pending(&mut |_| {}).unwrap();
    let migrated = db.schema_dump().unwrap();
    assert!(migrated.contains("CREATE TABLE public.users"), "dump looks wrong:\n{migrated}");

    let last = runner.migrations().iter().last().unwrap().name().to_owned();
    assert_eq!(runner.revert_last(&mut |_| {}).unwrap(), Some(last.clone()));
    assert_ne!(db.schema_dump().unwrap(), migrated, "revert must change the schema");
    runner.run_pending(&mut |_| {}).unwrap();
    assert_eq!(db.schema_dump().unwrap(), migrated);

    let mut events = Vec::new();
    assert_eq!(runner.redo(&mut |e| events.push(e.clone())).unwrap(), Some(last.clone()));
    assert!(
        matches!(&events[..], [MigrationEvent::Reverting { .. }, MigrationEvent::Reverted { .. }, MigrationEvent::Applying { .. }, MigrationEvent::Applied { name, .. }] if *name == last)
    );
    assert_eq!(db.schema_dump().unwrap(), migrated);
}

#[test]
fn every_workspace_migration_reverts_down_to_an_empty_schema_and_back() {
    let db = empty_database();
    let empty = db.schema_dump().unwrap();
    let runner = MigrationRunner::new(db.url(), MigrationSet::embedded().unwrap());
    runner.run_pending(&mut |_| {}).unwrap();
    let migrated = db.schema_dump().unwrap();
    while runner.revert_last(&mut |_| {}).unwrap().is_some() {}
    let mut conn = db.connect();
    conn.batch_execute("DROP TABLE _migrations").unwrap();
    assert_eq!(db.schema_dump().unwrap(), empty, "down.sql files must undo everything up.sql did");
    runner.run_pending(&mut |_| {}).unwrap();
    assert_eq!(db.schema_dump().unwrap(), migrated);
}

#[test]
fn revert_without_down_sql_is_refused_by_name() {
    let db = empty_database();
    let (_dir, set) = set_of(&[folder("001_one_way", "CREATE TABLE one_way (id int);")]);
    run(&db, &set).unwrap();
    let error = MigrationRunner::new(db.url(), set).revert_last(&mut |_| {}).unwrap_err();
    assert!(matches!(&error, MigrateError::NoDownFile { name } if name == "001_one_way"), "{error:?}");
    let mut conn = db.connect();
    assert!(table_exists(&mut conn, "one_way"));
}

#[test]
fn migration_outside_a_transaction_can_create_an_index_concurrently() {
    let db = empty_database();
    let (_dir, set) = set_of(&[
        folder("001_table", "CREATE TABLE things (x int); INSERT INTO things SELECT generate_series(1, 1000);"),
        Folder {
            name: "002_index",
            up: "CREATE INDEX CONCURRENTLY things_x_idx ON things (x);\n",
            down: Some("DROP INDEX CONCURRENTLY things_x_idx;"),
            metadata: Some("run_in_transaction = false\n"),
        },
    ]);
    assert!(!set.get("002").unwrap().run_in_transaction());
    assert_eq!(run(&db, &set).unwrap(), ["001_table", "002_index"]);
    let mut conn = db.connect();
    assert_eq!(
        count(&mut conn, "SELECT count(*) FROM pg_index WHERE indexrelid = 'things_x_idx'::regclass AND indisvalid"),
        1
    );
    // And it reverts outside a transaction too.
    MigrationRunner::new(db.url(), set).revert_last(&mut |_| {}).unwrap();
    assert!(!table_exists(&mut conn, "things_x_idx"));
}

/// A concurrent index build waits for the transactions writing its table,
/// however long they take, without queueing anyone behind it: the runner's
/// lock_timeout (there to bound how long a migration waiting for a lock
/// holds up the traffic queued behind it) does not cut it short. It did, leaving an invalid index that made every
/// later run fail with "already exists".
#[test]
fn an_index_built_concurrently_waits_for_a_writer_longer_than_the_lock_timeout() {
    let db = empty_database();
    let (_dir, set) = set_of(&[
        folder("001_table", "CREATE TABLE things (x int);"),
        Folder {
            name: "002_index",
            up: "-- built beside live writes\nCREATE INDEX CONCURRENTLY things_x_idx ON things (x);\n",
            down: Some("DROP INDEX CONCURRENTLY things_x_idx;"),
            metadata: Some("run_in_transaction = false\n"),
        },
    ]);
    let runner = MigrationRunner::new(db.url(), set.clone()).with_table_lock_timeout(Duration::from_millis(200));
    runner.run_pending(&mut |_| {}).unwrap();
    runner.revert_last(&mut |_| {}).unwrap();
    let mut writer = db.connect();
    writer.batch_execute("BEGIN; INSERT INTO things VALUES (1);").unwrap();
    let commit_later = thread::spawn(move || {
        thread::sleep(Duration::from_millis(800));
        writer.batch_execute("COMMIT").unwrap();
    });
    let applied = runner.run_pending(&mut |_| {});
    commit_later.join().unwrap();
    assert_eq!(applied.map(|a| a.into_iter().map(|m| m.name).collect::<Vec<_>>()).unwrap(), ["002_index"]);
    let mut conn = db.connect();
    assert_eq!(
        count(&mut conn, "SELECT count(*) FROM pg_index WHERE indexrelid = 'things_x_idx'::regclass AND indisvalid"),
        1
    );
}

#[test]
fn migration_outside_a_transaction_with_two_statements_is_refused_by_name() {
    let db = empty_database();
    let (_dir, set) = set_of(&[
        folder("001_table", "CREATE TABLE things (x int);"),
        Folder {
            name: "002_two",
            up: "CREATE INDEX CONCURRENTLY a_idx ON things (x);\nCREATE INDEX CONCURRENTLY b_idx ON things (x);\n",
            down: None,
            metadata: Some("run_in_transaction = false\n"),
        },
    ]);
    let error = run(&db, &set).unwrap_err();
    assert!(matches!(&error, MigrateError::MigrationFailed(f) if f.name == "002_two"), "{error:?}");
    let mut conn = db.connect();
    assert!(!table_exists(&mut conn, "a_idx"), "no part of the refused file may run");
    assert_eq!(recorded(&mut conn), ["001_table"]);
}

#[test]
fn a_runner_waits_for_the_lock_and_gives_up_after_its_timeout() {
    let db = empty_database();
    let mut holder = db.connect();
    holder.batch_execute(&format!("SELECT pg_advisory_lock({})", MigrationRunner::LOCK_KEY)).unwrap();
    let (_dir, set) = set_of(&[folder("001_a", "CREATE TABLE a (id int);")]);
    let mut events = Vec::new();
    let error = MigrationRunner::new(db.url(), set.clone())
        .with_lock_timeout(Duration::from_millis(300))
        .run_pending(&mut |e| events.push(e.clone()))
        .unwrap_err();
    assert!(matches!(error, MigrateError::LockTimeout { .. }), "{error:?}");
    assert_eq!(events, [MigrationEvent::WaitingForLock]);
    let mut conn = db.connect();
    assert!(!table_exists(&mut conn, "a"));

    holder.batch_execute(&format!("SELECT pg_advisory_unlock({})", MigrationRunner::LOCK_KEY)).unwrap();
    assert_eq!(run(&db, &set).unwrap(), ["001_a"]);
}

#[test]
fn the_lock_is_released_after_a_failed_run() {
    let db = empty_database();
    let (_dir, broken) = set_of(&[folder("001_a", "CREATE TABLE a (id int); SELECT 1/0;")]);
    run(&db, &broken).unwrap_err();
    let (_dir2, fixed) = set_of(&[folder("001_a", "CREATE TABLE a (id int);")]);
    let applied = MigrationRunner::new(db.url(), fixed)
        .with_lock_timeout(Duration::from_millis(200))
        .run_pending(&mut |_| {})
        .unwrap();
    assert_eq!(applied.len(), 1);
    let mut conn = db.connect();
    // pg_locks is cluster-wide; other tests migrate other databases meanwhile.
    let held_here = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'
                       AND database = (SELECT oid FROM pg_database WHERE datname = current_database())";
    assert_eq!(count(&mut conn, held_here), 0);
}

#[test]
fn status_lists_applied_and_pending_migrations_with_times() {
    let db = empty_database();
    let (dir, set) = set_of(&[folder("001_a", "CREATE TABLE a (id int);")]);
    let before = MigrationRunner::new(db.url(), set.clone()).status().unwrap();
    assert!(matches!(&before[..], [s] if s.name == "001_a" && s.state == MigrationState::Pending));
    let mut conn = db.connect();
    assert!(!table_exists(&mut conn, "_migrations"), "status must not create anything");

    run(&db, &set).unwrap();
    write_folders(dir.path(), &[folder("002_b", "CREATE TABLE b (id int);")]);
    let status = MigrationRunner::new(db.url(), MigrationSet::from_dir(dir.path()).unwrap()).status().unwrap();
    assert_eq!(status.len(), 2);
    assert!(matches!(status[0].state, MigrationState::Applied { checksum_matches: true, .. }));
    assert_eq!(status[1].state, MigrationState::Pending);
}

#[test]
fn debug_output_of_a_runner_hides_the_database_url() {
    let runner = MigrationRunner::new("postgres://app:s3cret@db.internal/prod", MigrationSet::embedded().unwrap());
    let debug = format!("{runner:?}");
    assert!(!debug.contains("s3cret") && !debug.contains("db.internal"), "{debug}");
}

/// A session holding `ACCESS SHARE` on `table` in an open transaction, as a
/// long read of live traffic does: an `ALTER TABLE` must wait for it.
fn hold_a_read_lock(db: &TestDatabase, table: &str) -> PgConnection {
    let mut holder = db.connect();
    holder
        .batch_execute(&format!(
            "SET application_name = 'live-traffic'; BEGIN; LOCK TABLE {table} IN ACCESS SHARE MODE"
        ))
        .unwrap();
    holder
}

/// [`hold_a_read_lock`], let go 1.5 s later (join the handle): a migration
/// with a lock timeout of 0.5 s runs into it at least once (its first
/// attempt starts within the first second, even on a busy machine), and
/// gets it on a later attempt, long before its 5 are spent.
fn hold_a_read_lock_for_a_while(db: &TestDatabase, table: &str) -> thread::JoinHandle<()> {
    let holder = hold_a_read_lock(db, table);
    thread::spawn(move || {
        thread::sleep(Duration::from_millis(1500));
        drop(holder);
    })
}

#[test]
fn a_migration_blocked_by_live_traffic_gives_up_after_lock_timeout_retries_and_names_the_lock() {
    let db = empty_database();
    let (dir, set) = set_of(&[folder("001_t", "CREATE TABLE t (id int);")]);
    run(&db, &set).unwrap();
    let _holder = hold_a_read_lock(&db, "t");
    write_folders(dir.path(), &[folder("002_alter", "ALTER TABLE t ADD COLUMN x int;")]);
    let set = MigrationSet::from_dir(dir.path()).unwrap();
    let mut events = Vec::new();
    let started = std::time::Instant::now();
    let error = MigrationRunner::new(db.url(), set)
        .with_table_lock_timeout(Duration::from_secs(1))
        .with_lock_attempts(2)
        .run_pending(&mut |e| events.push(e.clone()))
        .unwrap_err();
    // Two waits of 1 s and a pause of at most 312 ms between them.
    assert!(started.elapsed() < Duration::from_secs(20), "{:?}", started.elapsed());
    let MigrateError::LockNotAvailable { name, attempts, waited_for, .. } = &error else { panic!("{error:?}") };
    assert_eq!((name.as_str(), *attempts), ("002_alter", 2));
    assert!(waited_for.contains("AccessExclusiveLock on table t"), "{waited_for}");
    assert!(waited_for.contains("live-traffic"), "the holder is named: {waited_for}");
    let waits: Vec<_> = events.iter().filter(|e| matches!(e, MigrationEvent::LockWait { .. })).collect();
    assert_eq!(waits.len(), 1, "{events:?}");
    assert!(error.to_string().contains("AccessExclusiveLock on table t"), "{error}");
    let mut conn = db.connect();
    assert_eq!(recorded(&mut conn), ["001_t"], "the migration left nothing");
}

#[test]
fn a_migration_that_ran_into_lock_timeout_runs_again_once_the_traffic_lets_go() {
    let db = empty_database();
    let (dir, set) = set_of(&[folder("001_t", "CREATE TABLE t (id int);")]);
    run(&db, &set).unwrap();
    let release = hold_a_read_lock_for_a_while(&db, "t");
    write_folders(dir.path(), &[folder("002_alter", "ALTER TABLE t ADD COLUMN x int;")]);
    let mut events = Vec::new();
    let applied = MigrationRunner::new(db.url(), MigrationSet::from_dir(dir.path()).unwrap())
        .with_table_lock_timeout(Duration::from_millis(500))
        .run_pending(&mut |e| events.push(e.clone()))
        .unwrap();
    release.join().unwrap();
    assert_eq!(applied.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(), ["002_alter"]);
    assert!(events.iter().any(|e| matches!(e, MigrationEvent::LockWait { .. })), "{events:?}");
}

#[test]
fn while_a_migration_waits_for_its_lock_live_reads_wait_at_most_its_lock_timeout() {
    let db = empty_database();
    let (dir, set) = set_of(&[folder("001_t", "CREATE TABLE t (id int);")]);
    run(&db, &set).unwrap();
    let _holder = hold_a_read_lock(&db, "t");
    write_folders(dir.path(), &[folder("002_alter", "ALTER TABLE t ADD COLUMN x int;")]);
    let url = db.url().to_owned();
    let migration = thread::spawn(move || {
        MigrationRunner::new(url, MigrationSet::from_dir(dir.path()).unwrap())
            .with_table_lock_timeout(Duration::from_millis(300))
            .with_lock_attempts(3)
            .run_pending(&mut |_| {})
    });
    thread::sleep(Duration::from_millis(100));
    // A reader queues behind the waiting ALTER TABLE, for at most its lock_timeout.
    let mut reader = db.connect();
    for _ in 0..5 {
        let started = std::time::Instant::now();
        count(&mut reader, "SELECT count(*) FROM t");
        assert!(started.elapsed() < Duration::from_millis(1500), "a read waited {:?}", started.elapsed());
        thread::sleep(Duration::from_millis(100));
    }
    assert!(matches!(migration.join().unwrap(), Err(MigrateError::LockNotAvailable { .. })));
}

#[test]
fn a_fresh_migrate_new_template_is_refused_by_name_instead_of_an_empty_query() {
    let db = empty_database();
    let dir = tempfile::tempdir().unwrap();
    write_folders(dir.path(), &[folder("000_base", "CREATE TABLE base (id int);")]);
    let created = MigrationSet::create_migration(dir.path(), "add_x").unwrap();
    assert!(created.ends_with("001_add_x"), "{}", created.display());
    let error = run(&db, &MigrationSet::from_dir(dir.path()).unwrap()).unwrap_err();
    assert!(matches!(&error, MigrateError::EmptyFile { name, file: "up.sql" } if name == "001_add_x"), "{error:?}");
    assert!(error.to_string().contains("001_add_x/up.sql holds no SQL statement"), "{error}");
    let mut conn = db.connect();
    assert_eq!(recorded(&mut conn), ["000_base"], "the migrations before it applied");
}

/// Versions sort as text: a new migration is numbered as wide as the
/// widest version there is, and one that could only sort before the last
/// (after 999) is refused rather than run out of order.
#[test]
fn migrate_new_numbers_a_migration_that_sorts_after_every_other_or_refuses() {
    let numbered = |folders: &[&str]| {
        let dir = tempfile::tempdir().unwrap();
        let folders: Vec<Folder<'_>> = folders.iter().map(|name| folder(name, "SELECT 1;")).collect();
        write_folders(dir.path(), &folders);
        let created = MigrationSet::create_migration(dir.path(), "next");
        created.map(|path| path.file_name().unwrap().to_string_lossy().into_owned())
    };
    assert_eq!(numbered(&[]).unwrap(), "000_next");
    assert_eq!(numbered(&["000_a", "007_b"]).unwrap(), "008_next");
    assert_eq!(numbered(&["20240101120000_a"]).unwrap(), "20240101120001_next");
    assert_eq!(numbered(&["0001_a"]).unwrap(), "0002_next");
    match numbered(&["998_a", "999_b"]) {
        Err(MigrateError::Source(reason)) => assert!(reason.contains("1000") && reason.contains("999"), "{reason}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn revert_to_a_version_reverts_those_above_it_and_revert_all_reverts_everything() {
    let db = empty_database();
    let with_down = |name, up, down| Folder { name, up, down: Some(down), metadata: None };
    let (_dir, set) = set_of(&[
        with_down("001_a", "CREATE TABLE a (id int);", "DROP TABLE a;"),
        with_down("002_b", "CREATE TABLE b (id int);", "DROP TABLE b;"),
        with_down("003_c", "CREATE TABLE c (id int);", "DROP TABLE c;"),
    ]);
    run(&db, &set).unwrap();
    let runner = MigrationRunner::new(db.url(), set);
    assert_eq!(runner.revert_to(Some("001"), &mut |_| {}).unwrap(), ["003_c", "002_b"]);
    let mut conn = db.connect();
    assert_eq!(recorded(&mut conn), ["001_a"]);
    assert!(matches!(runner.revert_to(Some("007"), &mut |_| {}), Err(MigrateError::Source(_))));
    assert_eq!(runner.revert_to(None, &mut |_| {}).unwrap(), ["001_a"]);
    assert_eq!(recorded(&mut conn), Vec::<String>::new());
}

/// What `004_listing_counts` and `003_email_identity` could leave behind
/// when a write slipped in while they ran (see `009_stamps_counts_copies_mended`):
/// a cluster without totals, totals that miss rows, a membership whose copy
/// of its user's e-mail, name or picture is an old one. Applying 009 mends
/// each, and a database without any is left as it was.
#[test]
fn the_mending_migration_recounts_every_total_and_copies_every_profile_again() {
    let db = empty_database();
    let runner = MigrationRunner::new(db.url(), MigrationSet::embedded().unwrap());
    runner.run_pending(&mut |_| {}).unwrap();
    let mut conn = db.connect();
    conn.batch_execute(
        "INSERT INTO users (id, email, name, provider) VALUES
             ('00000000000000000000000001', 'owner@example.com', 'Owner', 'github'),
             ('00000000000000000000000002', 'guest@example.com', 'Guest', 'email');
         BEGIN;
         INSERT INTO clusters (id, name) VALUES ('0000000000000000000000000A', 'a'), ('0000000000000000000000000B', 'b');
         INSERT INTO user_clusters (user_id, cluster_id, role) VALUES
             ('00000000000000000000000001', '0000000000000000000000000A', 'owner'),
             ('00000000000000000000000001', '0000000000000000000000000B', 'owner'),
             ('00000000000000000000000002', '0000000000000000000000000A', 'invited');
         COMMIT;
         INSERT INTO instances (id, cluster_id, address, tag) VALUES ('0000000000000000000000000C', '0000000000000000000000000A', '10.0.0.1', 'one');",
    )
    .unwrap();
    let state = |conn: &mut PgConnection| {
        diesel::dsl::sql::<Text>(
            "SELECT string_agg(x, ' | ' ORDER BY x) FROM (
                 SELECT format('%s: %s %s %s', cluster_id, members, invites, instances) AS x FROM cluster_counts
                 UNION ALL
                 SELECT format('%s in %s: %s %s %s', user_id, cluster_id, email, name, picture) FROM user_clusters) AS rows",
        )
        .get_result::<String>(conn)
        .unwrap()
    };
    let right = state(&mut conn);
    // Untouched where nothing slipped through.
    let reverted = runner.revert_to(Some("008"), &mut |_| {}).unwrap();
    assert_eq!(reverted.last().map(String::as_str), Some("009_stamps_counts_copies_mended"));
    runner.run_pending(&mut |_| {}).unwrap();
    assert_eq!(state(&mut conn), right);
    // What a write beside 003 or 004 could leave (written before 009 and
    // 010, whose triggers would refuse or mend some of it at once).
    runner.revert_to(Some("008"), &mut |_| {}).unwrap();
    conn.batch_execute(
        "DELETE FROM cluster_counts WHERE cluster_id = '0000000000000000000000000B';
         UPDATE cluster_counts SET members = 0, invites = 5, instances = 0 WHERE cluster_id = '0000000000000000000000000A';
         UPDATE user_clusters SET email = 'Guest@Example.com', name = 'Old', picture = 'old.png'
          WHERE user_id = '00000000000000000000000002'",
    )
    .unwrap();
    assert_ne!(state(&mut conn), right);
    runner.run_pending(&mut |_| {}).unwrap();
    assert_eq!(state(&mut conn), right);
}

/// A `COMMIT` in a migration would end the transaction that also records
/// it: what came before would stay committed and unrecorded whatever failed
/// after. Such a file is refused by name before any of it runs.
#[test]
fn a_migration_that_would_end_its_own_transaction_is_refused_by_name_before_it_runs() {
    let db = empty_database();
    let (_dir, set) = set_of(&[
        folder("001_a", "CREATE TABLE a (id int);"),
        folder("002_b", "CREATE TABLE b (id int);\nCOMMIT;\nSELECT 1 / 0;"),
    ]);
    match run(&db, &set) {
        Err(error @ MigrateError::TransactionControl { .. }) => {
            let text = error.to_string();
            assert!(text.contains("002_b") && text.contains("COMMIT"), "{text}");
        }
        other => panic!("expected the migration to be refused, got {other:?}"),
    }
    let mut conn = db.connect();
    assert_eq!(recorded(&mut conn), ["001_a"]);
    assert!(!table_exists(&mut conn, "b"), "nothing of the refused file ran");
}

/// Ways a `COMMIT` slipped past the check of the text (an `E''` string
/// continued on the next line; `AS case` inside a SQL-standard function
/// body; a database with `standard_conforming_strings` off): each committed
/// the first half of its file unrecorded, and answered with diesel's failed
/// rollback ("migration bookkeeping"), naming no file. The first two are
/// refused by name now, before anything of them runs; the runner's session
/// reads strings as the check does, so in the third the `COMMIT` is inside
/// a string, for PostgreSQL too, and the file applies whole.
#[test]
fn a_commit_hidden_from_a_naive_reading_is_still_refused_by_name_before_anything_runs() {
    for (label, up, scs_off) in [
        (
            "an E'' string continued",
            "CREATE TABLE b (id int);\nSELECT E'x'\n'\\'; SELECT ';\nCOMMIT;\nSELECT 1/0;\n-- '\n",
            false,
        ),
        (
            "standard_conforming_strings off",
            "CREATE TABLE b (id int);\nSELECT 'x\\'; SELECT ';\nCOMMIT;\nSELECT 1/0;\n-- '\n",
            true,
        ),
        (
            "AS case in a body",
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1 AS case; END;\n\
             CREATE TABLE b (id int);\nCOMMIT;\nSELECT 1/0;\n",
            false,
        ),
    ] {
        let db = empty_database();
        if scs_off {
            db.set_for_new_sessions("standard_conforming_strings", "off");
        }
        let (_dir, set) = set_of(&[folder("001_b", up)]);
        match run(&db, &set) {
            Ok(applied) if scs_off => {
                assert_eq!(applied, ["001_b"]);
                let mut conn = db.connect();
                assert_eq!(recorded(&mut conn), ["001_b"], "{label}");
                assert!(table_exists(&mut conn, "b"), "{label}");
                continue;
            }
            Err(error @ MigrateError::TransactionControl { .. }) if !scs_off => {
                let text = error.to_string();
                assert!(text.contains("001_b/up.sql") && text.contains("COMMIT"), "{label}: {text}");
            }
            other => panic!("{label}: expected the file to be refused by name, got {other:?}"),
        }
        let mut conn = db.connect();
        assert!(recorded(&mut conn).is_empty(), "{label}");
        assert!(!table_exists(&mut conn, "b"), "{label}: nothing of the refused file ran");
    }
}

/// A file PostgreSQL takes whole, whose `AS end` inside a SQL-standard
/// function body was read as the body's end (and its real end as a
/// top-level `END`): it applies.
#[test]
fn labels_named_end_or_case_inside_a_function_body_are_not_transaction_control() {
    let db = empty_database();
    let up = "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1 AS end; SELECT 2 AS case; END;\n\
              CREATE TABLE b (id int);";
    let (_dir, set) = set_of(&[folder("001_b", up)]);
    assert_eq!(run(&db, &set).unwrap(), ["001_b"]);
    assert!(table_exists(&mut db.connect(), "b"));
}

/// A file outside a transaction is one statement; a lone `BEGIN` there left
/// a transaction open that its bookkeeping joined and nobody committed:
/// reported applied, never recorded. Refused by name, unrun.
#[test]
fn a_transaction_statement_outside_a_transaction_is_refused_by_name() {
    let db = empty_database();
    let outside = Some("run_in_transaction = false\n");
    for up in ["BEGIN", "start transaction isolation level serializable", "COMMIT"] {
        let (_dir, set) = set_of(&[
            folder("001_a", "CREATE TABLE a (id int);"),
            Folder { metadata: outside, ..folder("002_tx", up) },
        ]);
        match run(&db, &set) {
            Err(error @ MigrateError::TransactionControlOutside { .. }) => {
                assert!(error.to_string().contains("002_tx/up.sql"), "{error}");
            }
            other => panic!("{up}: expected the file to be refused by name, got {other:?}"),
        }
        assert_eq!(recorded(&mut db.connect()), ["001_a"], "{up}");
    }
}

/// One file's temporary table ends with the file, as its settings do: two
/// files that each run alone run one after the other.
#[test]
fn a_files_temporary_tables_end_with_it() {
    let db = empty_database();
    let (_dir, set) = set_of(&[
        folder("001_a", "CREATE TABLE a (id int); CREATE TEMP TABLE scratch AS SELECT 1 AS id;"),
        folder("002_b", "CREATE TEMP TABLE scratch AS SELECT 2 AS id; CREATE TABLE b (id int);"),
    ]);
    assert_eq!(run(&db, &set).unwrap(), ["001_a", "002_b"]);
}

/// diesel_migrations takes a `metadata.toml` it cannot read for none (the
/// file runs in a transaction), and one without the key for
/// `run_in_transaction = false` (it runs outside one): each is refused by
/// name instead.
#[test]
fn a_metadata_file_that_is_not_what_the_runner_reads_is_refused_by_name() {
    for metadata in [
        "run_in_transaction = False\n",
        "run_in_transactoin = false\n",
        "run_in_transaction = \"no\"\n",
        // Read by diesel as run_in_transaction = false: outside a transaction.
        "",
        "# run_in_transaction = true\n",
    ] {
        let dir = tempfile::tempdir().unwrap();
        write_folders(
            dir.path(),
            &[Folder { metadata: Some(metadata), ..folder("001_a", "CREATE INDEX CONCURRENTLY i ON t (x)") }],
        );
        match MigrationSet::from_dir(dir.path()) {
            Err(error @ MigrateError::Source(_)) => {
                assert!(error.to_string().contains("001_a/metadata.toml"), "{metadata}: {error}");
            }
            other => panic!("{metadata}: expected the folder to be refused, got {other:?}"),
        }
    }
    let dir = tempfile::tempdir().unwrap();
    write_folders(
        dir.path(),
        &[Folder { metadata: Some("run_in_transaction = false\n"), ..folder("001_a", "VACUUM") }],
    );
    assert!(!MigrationSet::from_dir(dir.path()).unwrap().get("001").unwrap().run_in_transaction());
}

/// A file saved with a UTF-8 byte-order mark applies, and its checksum is
/// the file's without it (adding or removing one is no edit).
#[test]
fn a_migration_saved_with_a_byte_order_mark_applies_and_keeps_its_checksum() {
    let db = empty_database();
    let (_dir, with_bom) = set_of(&[folder("001_a", "\u{feff}CREATE TABLE a (id int);")]);
    let (_other, without) = set_of(&[folder("001_a", "CREATE TABLE a (id int);")]);
    assert_eq!(with_bom.get("001").unwrap().checksum(), without.get("001").unwrap().checksum());
    assert_eq!(run(&db, &with_bom).unwrap(), ["001_a"]);
    assert_eq!(run(&db, &without).unwrap(), Vec::<String>::new(), "the same migration, already applied");
}

/// A migration that PostgreSQL aborts to break a deadlock with a write
/// beside it (here: the migration holds `a` and waits for `b`, the write
/// holds `b` and then asks for `a`) rolled back whole: the runner applies
/// it again once the write is done, as after a lock timeout.
#[test]
fn a_migration_aborted_to_break_a_deadlock_runs_again() {
    let db = empty_database();
    let tables = folder("001_tables", "CREATE TABLE a (id int); CREATE TABLE b (id int);");
    let (_first, first) = set_of(&[folder("001_tables", tables.up)]);
    run(&db, &first).unwrap();
    let (_dir, set) = set_of(&[
        tables,
        folder("002_both", "LOCK TABLE a IN SHARE ROW EXCLUSIVE MODE; LOCK TABLE b IN SHARE ROW EXCLUSIVE MODE;"),
    ]);
    let mut writer = db.connect();
    writer.batch_execute("BEGIN; INSERT INTO b VALUES (1);").unwrap();
    let migrating = thread::spawn({
        let url = db.url().to_owned();
        move || {
            let mut events = Vec::new();
            let applied = MigrationRunner::new(&url, set).run_pending(&mut |event| events.push(event.clone()));
            (applied.map(|applied| applied.into_iter().map(|m| m.name).collect::<Vec<_>>()), events)
        }
    });
    // The migration holds `a` and waits for `b`; the write now asks for `a`.
    thread::sleep(Duration::from_millis(400));
    writer.batch_execute("INSERT INTO a VALUES (1); COMMIT;").unwrap();
    let (applied, events) = migrating.join().unwrap();
    assert_eq!(applied.unwrap(), ["002_both"], "{events:?}");
    assert!(events.iter().any(|e| matches!(e, MigrationEvent::LockWait { .. })), "it ran twice: {events:?}");
}

/// A migration that changes its session's search path (as a pasted
/// `pg_dump` does: `set_config('search_path', '', false)`) or role is
/// recorded all the same, and the migrations after it run as the runner's
/// session does: what a file sets ends with it.
#[test]
fn settings_a_migration_makes_end_with_it() {
    let db = empty_database();
    let (_dir, set) = set_of(&[
        folder("001_dump", "SELECT pg_catalog.set_config('search_path', '', false);\nCREATE TABLE public.a (id int);"),
        folder("002_next", "CREATE TABLE b (id int);"),
    ]);
    assert_eq!(run(&db, &set).unwrap(), ["001_dump", "002_next"]);
    let mut conn = db.connect();
    assert!(table_exists(&mut conn, "public.b"), "the next migration ran with the usual search path");
    assert_eq!(recorded(&mut conn), ["001_dump", "002_next"]);
}

/// A DO block that fails unless the session is still the runner's: its
/// `lock_timeout` (1234 ms in these tests), triggers and foreign keys on
/// (`session_replication_role` origin), function bodies checked, row
/// security on, and no role switched to.
const STILL_THE_RUNNERS_SESSION: &str = "DO $$ BEGIN
    IF current_setting('lock_timeout') <> '1234ms'
       OR current_setting('session_replication_role') <> 'origin'
       OR current_setting('check_function_bodies') <> 'on'
       OR current_setting('row_security') <> 'on'
       OR current_user <> session_user THEN
        RAISE EXCEPTION 'a setting of the migration before leaked: lock_timeout %, session_replication_role %, check_function_bodies %, row_security %, current_user %',
            current_setting('lock_timeout'), current_setting('session_replication_role'),
            current_setting('check_function_bodies'), current_setting('row_security'), current_user;
    END IF;
END $$;";

/// Applies `setter` and then a migration that checks the session is still
/// the runner's, with the runner's `lock_timeout` at 1234 ms.
fn apply_then_check_the_session(setter: Folder<'_>) -> Result<Vec<String>, MigrateError> {
    let db = empty_database();
    let (_dir, set) = set_of(&[setter, folder("002_check", STILL_THE_RUNNERS_SESSION)]);
    MigrationRunner::new(db.url(), set)
        .with_table_lock_timeout(Duration::from_millis(1234))
        .run_pending(&mut |_| {})
        .map(|applied| applied.into_iter().map(|m| m.name).collect())
}

/// A database whose sessions run as a replica's (triggers and foreign-key
/// actions off) is refused before anything is applied: a migration's data
/// changes would skip them.
#[test]
fn a_database_whose_sessions_run_with_triggers_off_is_refused_before_anything_is_applied() {
    let db = empty_database();
    if !db.superuser() {
        eprintln!("skipped: setting session_replication_role needs a superuser");
        return;
    }
    db.set_for_new_sessions("session_replication_role", "replica");
    let error = MigrationRunner::new(db.url(), MigrationSet::embedded().unwrap()).run_pending(&mut |_| {}).unwrap_err();
    assert!(error.to_string().contains("session_replication_role = replica"), "{error}");
    let mut conn = db.connect();
    assert!(!table_exists(&mut conn, "users") && !table_exists(&mut conn, "_migrations"), "{error}");
}

/// A plain `SET` stays on the session after its transaction commits: a
/// pasted `pg_dump` header (`SET lock_timeout = 0`, `SET
/// session_replication_role = replica`, ...) would run every later
/// migration of the run with no lock timeout, or with triggers and foreign
/// keys off. Every setting a migration makes ends with it, in a
/// transaction or outside one.
#[test]
fn every_setting_a_migration_makes_ends_with_it_in_or_outside_a_transaction() {
    if !empty_database().superuser() {
        eprintln!("skipped: setting session_replication_role needs a superuser");
        return;
    }
    let pg_dump_header = folder(
        "001_dump_header",
        "SET lock_timeout = 0;\nSET statement_timeout = 0;\nSET check_function_bodies = false;\n\
         SET row_security = off;\nSET session_replication_role = replica;\nCREATE TABLE a (id int);\n\
         SET ROLE pg_read_all_settings;",
    );
    assert_eq!(apply_then_check_the_session(pg_dump_header).unwrap(), ["001_dump_header", "002_check"]);
    let outside = Folder {
        name: "001_outside",
        up: "SET session_replication_role = replica",
        down: None,
        metadata: Some("run_in_transaction = false\n"),
    };
    assert_eq!(apply_then_check_the_session(outside).unwrap(), ["001_outside", "002_check"]);
}

/// Ending a migration's settings keeps the ones diesel gives a connection
/// when it opens (`client_encoding` UTF8, time zone UTC), even where the
/// database's own differ: every migration of a run sees the same, and its
/// text reaches the server as the UTF-8 it is.
#[test]
fn later_migrations_keep_diesel_s_encoding_and_time_zone_whatever_the_database_sets() {
    let db = empty_database();
    db.connect()
        .batch_execute(&format!(
            "ALTER DATABASE \"{0}\" SET client_encoding = 'LATIN1'; ALTER DATABASE \"{0}\" SET timezone = 'America/New_York'",
            db.name()
        ))
        .unwrap();
    let (_dir, set) = set_of(&[
        folder("001_words", "CREATE TABLE words (word text NOT NULL);"),
        folder(
            "002_cafe",
            "INSERT INTO words VALUES ('café');
             DO $$ BEGIN
                 IF current_setting('TimeZone') <> 'UTC' THEN
                     RAISE EXCEPTION 'time zone %', current_setting('TimeZone');
                 END IF;
             END $$;",
        ),
    ]);
    assert_eq!(run(&db, &set).unwrap(), ["001_words", "002_cafe"]);
    let mut conn = db.connect();
    let word: String = diesel::dsl::sql::<Text>("SELECT word FROM words").get_result(&mut conn).unwrap();
    assert_eq!(word, "café");
}

/// A `statement_timeout` on the role or the database (operations.md advises
/// one behind a transaction pooler) does not cut a migration short: a
/// cancelled `CREATE INDEX CONCURRENTLY` leaves an invalid index behind.
/// The runner's session has none; `lock_timeout` bounds its waits for locks.
#[test]
fn a_statement_timeout_of_the_database_does_not_cut_a_migration_short() {
    let db = empty_database();
    db.connect().batch_execute(&format!("ALTER DATABASE \"{}\" SET statement_timeout = '50ms'", db.name())).unwrap();
    let (_dir, set) = set_of(&[
        folder("001_slow", "SELECT pg_sleep(0.2);"),
        Folder {
            name: "002_slow_outside",
            up: "SELECT pg_sleep(0.2)",
            down: None,
            metadata: Some("run_in_transaction = false\n"),
        },
    ]);
    assert_eq!(run(&db, &set).unwrap(), ["001_slow", "002_slow_outside"]);
}

/// A server that accepts connections and never answers (a black-holed
/// address) fails the runner's connection after its connect timeout,
/// instead of hanging `status()`, and the data layer's `health()` that
/// calls it, indefinitely.
#[test]
fn status_against_a_server_that_never_answers_fails_after_the_connect_timeout() {
    let db = empty_database();
    let (proxy, url) = dployr_testkit::BlackholeProxy::in_front_of(db.url()).unwrap();
    proxy.blackhole();
    let runner =
        MigrationRunner::new(url, MigrationSet::embedded().unwrap()).with_connect_timeout(Duration::from_secs(2));
    let (done, finished) = std::sync::mpsc::channel();
    let started = std::time::Instant::now();
    thread::spawn(move || done.send(runner.status().map(drop)));
    let status = finished.recv_timeout(Duration::from_secs(20)).expect("status() still waits after 20 s");
    assert!(matches!(status, Err(MigrateError::Connect(_))), "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
}

/// The runner's connect timeout is a default: a `connect_timeout` the
/// operator's URL sets wins over it.
#[test]
fn a_connect_timeout_in_the_database_url_wins_over_the_runner_s() {
    let db = empty_database();
    let (proxy, url) = dployr_testkit::BlackholeProxy::in_front_of(db.url()).unwrap();
    proxy.blackhole();
    let separator = if url.contains('?') { '&' } else { '?' };
    let runner = MigrationRunner::new(format!("{url}{separator}connect_timeout=2"), MigrationSet::embedded().unwrap())
        .with_connect_timeout(Duration::from_secs(600));
    let (done, finished) = std::sync::mpsc::channel();
    thread::spawn(move || done.send(runner.status().map(drop)));
    let status = finished.recv_timeout(Duration::from_secs(20)).expect("status() still waits after 20 s");
    assert!(matches!(status, Err(MigrateError::Connect(_))), "{status:?}");
}

/// An empty database with one applied migration that makes (and, reverted,
/// drops) table `t`, and its set.
fn one_table_applied() -> (TestDatabase, tempfile::TempDir, MigrationSet) {
    let db = empty_database();
    let (dir, set) = set_of(&[Folder {
        name: "001_t",
        up: "CREATE TABLE t (id int);",
        down: Some("DROP TABLE t;"),
        metadata: None,
    }]);
    run(&db, &set).unwrap();
    (db, dir, set)
}

/// A revert that runs into `lock_timeout` rolled back whole (its
/// `down.sql` and the removal of its row), so it is tried again as an
/// apply is.
#[test]
fn a_revert_that_ran_into_lock_timeout_runs_again_once_the_traffic_lets_go() {
    let (db, _dir, set) = one_table_applied();
    let release = hold_a_read_lock_for_a_while(&db, "t");
    let mut events = Vec::new();
    let reverted = MigrationRunner::new(db.url(), set)
        .with_table_lock_timeout(Duration::from_millis(500))
        .revert_last(&mut |e| events.push(e.clone()));
    release.join().unwrap();
    assert_eq!(reverted.unwrap().as_deref(), Some("001_t"), "{events:?}");
    assert!(events.iter().any(|e| matches!(e, MigrationEvent::LockWait { .. })), "{events:?}");
    let mut conn = db.connect();
    assert!(!table_exists(&mut conn, "t"));
    assert_eq!(recorded(&mut conn), Vec::<String>::new());
}

/// A revert that live traffic keeps waiting past every attempt gives up
/// naming the lock and its holder, and leaves the migration applied.
#[test]
fn a_revert_blocked_by_live_traffic_gives_up_after_its_attempts_and_names_the_lock() {
    let (db, _dir, set) = one_table_applied();
    let _holder = hold_a_read_lock(&db, "t");
    let error = MigrationRunner::new(db.url(), set)
        .with_table_lock_timeout(Duration::from_secs(1))
        .with_lock_attempts(2)
        .revert_last(&mut |_| {})
        .unwrap_err();
    let MigrateError::LockNotAvailable { name, attempts, waited_for, .. } = &error else { panic!("{error:?}") };
    assert_eq!((name.as_str(), *attempts), ("001_t", 2));
    assert!(
        waited_for.contains("AccessExclusiveLock on table t") && waited_for.contains("live-traffic"),
        "{waited_for}"
    );
    let mut conn = db.connect();
    assert_eq!(recorded(&mut conn), ["001_t"], "the revert left the migration applied");
}

/// Reverting 014 would forget the nonces of used tokens that were deleted,
/// and let them be issued and used again: refused while there are any,
/// naming the migration, with nothing reverted; once they are deleted on
/// purpose, it reverts.
#[test]
fn reverting_the_spent_nonces_migration_is_refused_while_it_remembers_any() {
    let db = empty_database();
    let runner = MigrationRunner::new(db.url(), MigrationSet::embedded().unwrap());
    runner.run_pending(&mut |_| {}).unwrap();
    let mut conn = db.connect();
    conn.batch_execute(
        "BEGIN;
         INSERT INTO users (id, email, name, provider) VALUES ('01J00000000000000000000A00', 'a@x.io', 'a', 'email');
         INSERT INTO clusters (id, name) VALUES ('01J00000000000000000000C00', 'c');
         INSERT INTO user_clusters (user_id, cluster_id, role)
              VALUES ('01J00000000000000000000A00', '01J00000000000000000000C00', 'owner');
         COMMIT;
         INSERT INTO instances (id, cluster_id, address, tag)
              VALUES ('01J00000000000000000000100', '01J00000000000000000000C00', '10.0.0.1', 'i');
         INSERT INTO bootstrap_tokens (instance_id, nonce, used_at)
              VALUES ('01J00000000000000000000100', 'nonce-1', now());
         DELETE FROM bootstrap_tokens;",
    )
    .unwrap();
    // Down to 014: every later migration reverts as usual.
    let last_applied = || {
        let status = runner.status().unwrap();
        status.into_iter().rfind(|s| matches!(s.state, MigrationState::Applied { .. })).unwrap().name
    };
    while last_applied() != "014_spent_nonces_remembered" {
        runner.revert_last(&mut |_| {}).unwrap();
    }
    let before = db.schema_dump().unwrap();
    let error = runner.revert_last(&mut |_| {}).unwrap_err().to_string();
    assert!(error.contains("014_spent_nonces_remembered") && error.contains("1 spent nonce"), "{error}");
    assert_eq!(db.schema_dump().unwrap(), before, "nothing reverted");
    conn.batch_execute("DELETE FROM spent_nonces").unwrap();
    assert_eq!(runner.revert_last(&mut |_| {}).unwrap().as_deref(), Some("014_spent_nonces_remembered"));
}

/// The role an application connects with is often not the schema's owner,
/// and on PostgreSQL 15 `public` no longer lets every role create in it: a
/// run on an up-to-date database needs no such right (it creates
/// `_migrations` only where it is missing).
#[test]
fn a_run_with_nothing_to_apply_needs_no_right_to_create_in_the_schema() {
    let db = empty_database();
    if !db.superuser() {
        eprintln!("skipped: making a role needs a superuser, and this server's role is not one");
        return;
    }
    let (_dir, set) = set_of(&[folder("001_table", "CREATE TABLE kept (id int);")]);
    run(&db, &set).unwrap();
    let role = format!("{}_app", db.name());
    db.connect()
        .batch_execute(&format!(
            "CREATE ROLE \"{role}\" LOGIN; GRANT CONNECT ON DATABASE \"{db}\" TO \"{role}\"; \
             REVOKE CREATE ON SCHEMA public FROM PUBLIC; GRANT USAGE ON SCHEMA public TO \"{role}\"; \
             GRANT SELECT ON _migrations TO \"{role}\";",
            db = db.name()
        ))
        .unwrap();
    let url = dployr_testkit::server().unwrap().url_with(db.name(), &[("user", role.as_str()), ("password", "")]);
    let ran = MigrationRunner::new(&url, set).run_pending(&mut |_| {}).map(|applied| applied.len());
    db.connect().batch_execute(&format!("DROP OWNED BY \"{role}\"; DROP ROLE \"{role}\";")).unwrap();
    assert_eq!(ran.unwrap(), 0);
}

/// A session that ends under a migration (a restart, a failover, a session
/// ended by an administrator; here the file ends its own) is said to be a
/// lost connection, which `DataLayer::open` reports as `Unavailable` (run it
/// again), not a fault of the file; a file that fails is not one.
#[test]
fn a_connection_lost_under_a_migration_is_told_apart_from_a_failing_file() {
    let db = empty_database();
    let (_dir, set) = set_of(&[folder("001_ends_its_session", "SELECT pg_terminate_backend(pg_backend_pid());")]);
    let lost = run(&db, &set).unwrap_err();
    assert!(lost.is_connection_lost(), "{lost:?}");
    assert_eq!(recorded(&mut db.connect()), Vec::<String>::new());
    let (_dir, set) = set_of(&[folder("001_divides_by_zero", "SELECT 1 / 0;")]);
    let failed = run(&db, &set).unwrap_err();
    assert!(!failed.is_connection_lost(), "{failed:?}");
}

/// A database the original TypeScript data layer touched has its own
/// `_migrations(filename, applied_at)`: run and status say so, naming its
/// columns and what to do, and change nothing (no row, no table).
#[test]
fn a_migrations_table_of_the_original_data_layer_is_named_as_such_and_left_unchanged() {
    let db = empty_database();
    db.connect()
        .batch_execute(
            "CREATE TABLE _migrations (id SERIAL PRIMARY KEY, filename TEXT NOT NULL UNIQUE, \
             applied_at TIMESTAMPTZ DEFAULT now()); INSERT INTO _migrations (filename) VALUES ('init');",
        )
        .unwrap();
    let (_dir, set) = set_of(&[folder("001_table", "CREATE TABLE kept (id int);")]);
    let refused = run(&db, &set).unwrap_err();
    assert!(
        matches!(&refused, MigrateError::ForeignMigrationsTable { columns } if columns == &["id", "filename", "applied_at"]),
        "{refused:?}"
    );
    let message = refused.to_string();
    assert!(message.contains("TypeScript") && message.contains("RENAME TO"), "{message}");
    let status = MigrationRunner::new(db.url(), set.clone()).status().unwrap_err();
    assert!(matches!(status, MigrateError::ForeignMigrationsTable { .. }), "{status:?}");
    let mut conn = db.connect();
    assert!(!table_exists(&mut conn, "kept"), "nothing of the set ran");
    assert_eq!(count(&mut conn, "SELECT count(*) FROM _migrations"), 1, "the original's row is left as it was");
    // Renamed out of the way, as the message says, the run goes on.
    conn.batch_execute("ALTER TABLE _migrations RENAME TO _migrations_before").unwrap();
    assert_eq!(run(&db, &set).unwrap(), ["001_table"]);
}

/// A migration runs only on a server connection that holds the migration
/// lock: through a transaction pooler that the probe missed, the lock is
/// on some other server connection, and migrations would run beside
/// another runner's. Here the first migration gives the lock up (as a
/// session the pooler hands the next transaction to would lack it): the
/// second is refused before it runs, and the first stays applied.
#[test]
fn a_migration_on_a_session_without_the_migration_lock_is_refused_before_it_runs() {
    let db = empty_database();
    let unlock = format!("SELECT pg_advisory_unlock({}); CREATE TABLE a (id int);", MigrationRunner::LOCK_KEY);
    let (_dir, set) = set_of(&[folder("001_a", &unlock), folder("002_b", "CREATE TABLE b (id int);")]);
    let error = run(&db, &set).unwrap_err();
    assert!(matches!(error, MigrateError::TransactionPooler), "{error:?}");
    let mut conn = db.connect();
    assert_eq!(recorded(&mut conn), ["001_a"], "the second migration did not run");
    assert!(table_exists(&mut conn, "a") && !table_exists(&mut conn, "b"));
}

/// An `idle_session_timeout` set on the database (or the role) does not end
/// the runner's session while it pauses between lock-timeout attempts,
/// which would release the migration lock mid-run and fail the start.
#[test]
fn an_idle_session_timeout_of_the_database_does_not_end_the_runner_between_attempts() {
    let db = empty_database();
    let (dir, set) = set_of(&[folder("001_t", "CREATE TABLE t (id int);")]);
    run(&db, &set).unwrap();
    db.set_for_new_sessions("idle_session_timeout", "400");
    // Waiting in a transaction is not idle: the holder keeps its lock.
    let release = hold_a_read_lock_for_a_while(&db, "t");
    write_folders(dir.path(), &[folder("002_alter", "ALTER TABLE t ADD COLUMN x int;")]);
    let mut events = Vec::new();
    // The second pause between attempts (500 to 625 ms) is longer than the
    // database's idle_session_timeout; connecting is far shorter.
    let applied = MigrationRunner::new(db.url(), MigrationSet::from_dir(dir.path()).unwrap())
        .with_table_lock_timeout(Duration::from_millis(500))
        .run_pending(&mut |e| events.push(e.clone()));
    release.join().unwrap();
    assert_eq!(applied.unwrap().iter().map(|m| m.name.as_str()).collect::<Vec<_>>(), ["002_alter"], "{events:?}");
    assert!(events.iter().any(|e| matches!(e, MigrationEvent::LockWait { .. })), "{events:?}");
}

/// In a rolling deploy the newer release migrates first; a process of the
/// older release starting after it (a restart, a rollback of the code) has
/// nothing to apply. Allowed, its run applies nothing and names the newer
/// migrations; by default, and for a revert, they are refused.
#[test]
fn a_run_allowing_a_newer_release_applies_nothing_and_names_its_migrations() {
    let db = empty_database();
    let (_newer_dir, newer) =
        set_of(&[folder("001_a", "CREATE TABLE a (id int);"), folder("002_b", "CREATE TABLE b (id int);")]);
    run(&db, &newer).unwrap();
    let (_older_dir, older) = set_of(&[folder("001_a", "CREATE TABLE a (id int);")]);

    let mut events = Vec::new();
    let applied = MigrationRunner::new(db.url(), older.clone())
        .allowing_a_newer_release()
        .run_pending(&mut |e| events.push(e.clone()))
        .unwrap();
    assert!(applied.is_empty());
    assert_eq!(events, [MigrationEvent::NewerReleaseApplied { names: vec!["002_b".into()] }]);
    assert!(events[0].to_string().contains("002_b"), "{}", events[0]);

    let strict = run(&db, &older).unwrap_err();
    assert!(matches!(&strict, MigrateError::MissingFromSource { name } if name == "002_b"), "{strict:?}");
    let revert = MigrationRunner::new(db.url(), older).allowing_a_newer_release().revert_last(&mut |_| {});
    assert!(matches!(&revert, Err(MigrateError::MissingFromSource { name }) if name == "002_b"), "{revert:?}");
    let mut conn = db.connect();
    assert_eq!(recorded(&mut conn), ["001_a", "002_b"]);
}

/// What a newer release cannot explain is refused even when one is
/// allowed: an unknown migration older than the set's latest (another
/// branch's, or one removed from the source), one of the set's pending
/// beside a newer one, or a changed one.
#[test]
fn a_run_allowing_a_newer_release_still_refuses_an_unknown_older_migration_a_gap_or_a_change() {
    let allowing = |db: &TestDatabase, set: &MigrationSet| {
        MigrationRunner::new(db.url(), set.clone()).allowing_a_newer_release().run_pending(&mut |_| {}).map(drop)
    };
    let a = folder("001_a", "CREATE TABLE a (id int);");
    let b = folder("002_b", "CREATE TABLE b (id int);");
    let c = folder("003_c", "CREATE TABLE c (id int);");

    let db = empty_database();
    run(&db, &set_of(&[a, b, c]).1).unwrap();
    let error = allowing(&db, &set_of(&[a, c]).1).unwrap_err();
    assert!(matches!(&error, MigrateError::MissingFromSource { name } if name == "002_b"), "{error:?}");

    let db = empty_database();
    run(&db, &set_of(&[a, c]).1).unwrap();
    let error = allowing(&db, &set_of(&[a, b]).1).unwrap_err();
    assert!(matches!(&error, MigrateError::MissingFromSource { name } if name == "003_c"), "{error:?}");
    let mut conn = db.connect();
    assert_eq!(recorded(&mut conn), ["001_a", "003_c"], "002_b was not applied beside the newer 003_c");

    // Of another width: newer as a number (2 > 1), older as text ("0002" <
    // "001", the order a set applies in): not a newer release's.
    let db = empty_database();
    run(&db, &set_of(&[a]).1).unwrap();
    db.connect()
        .batch_execute(
            "INSERT INTO _migrations (version, name, checksum, duration_ms) VALUES ('0002', '0002_x', 'c', 1)",
        )
        .unwrap();
    let error = allowing(&db, &set_of(&[a]).1).unwrap_err();
    assert!(matches!(&error, MigrateError::MissingFromSource { name } if name == "0002_x"), "{error:?}");

    let db = empty_database();
    run(&db, &set_of(&[a, b]).1).unwrap();
    let edited = folder("001_a", "CREATE TABLE a (id bigint);");
    let error = allowing(&db, &set_of(&[edited]).1).unwrap_err();
    assert!(matches!(&error, MigrateError::ChecksumMismatch { name, .. } if name == "001_a"), "{error:?}");
}

/// A database whose sessions only read (`default_transaction_read_only`,
/// as a standby's do) is refused by name before the lock is taken, not
/// blamed on the first migration's file; `status` still reads it.
#[test]
fn a_read_only_database_is_refused_before_anything_runs_and_status_still_reads_it() {
    let db = empty_database();
    let (_dir, set) = set_of(&[folder("001_a", "CREATE TABLE a (id int);")]);
    db.set_for_new_sessions("default_transaction_read_only", "on");
    let error = run(&db, &set).unwrap_err();
    assert!(
        matches!(&error, MigrateError::ReadOnlyServer { in_recovery: false, set_by: Some(source) } if source == "database"),
        "{error:?}"
    );
    assert!(error.to_string().contains("only reads") && error.to_string().contains("DPLOYR_MIGRATE_DATABASE_URL"));
    let status = MigrationRunner::new(db.url(), set).status().unwrap();
    assert_eq!(status.len(), 1);
    assert_eq!(status[0].state, MigrationState::Pending);
    let mut conn = db.connect();
    assert!(!table_exists(&mut conn, "_migrations") && !table_exists(&mut conn, "a"));
}
