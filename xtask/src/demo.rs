//! `cargo xtask demo`: what the data layer can do today, end to end, on a
//! throwaway PostgreSQL that the command starts and stops itself (or, with
//! `DATABASE_URL` set, in a temporary database on that server, dropped after).
//!
//! Today that is the foundation: migrations applied by the runner, then the
//! schema's own guards refusing bad writes. The seed README's usage story
//! (users, clusters, sessions, OAuth state, one-time codes) joins it when the
//! stores and the key-value store land.

use diesel::connection::SimpleConnection as _;
use diesel::result::Error as DieselError;
use diesel::{Connection as _, PgConnection};
use dployr_migrate::{MigrationRunner, MigrationSet, MigrationState};

use crate::Failure;

fn step(title: &str) {
    println!("\n== {title}");
}

/// Runs `sql` in a transaction that is rolled back, expecting PostgreSQL to
/// refuse it; prints the constraint that refused.
fn expect_refusal(conn: &mut PgConnection, what: &str, sql: &str) -> Result<(), Failure> {
    let outcome = conn.transaction::<(), DieselError, _>(|conn| conn.batch_execute(sql));
    match outcome {
        Err(DieselError::DatabaseError(kind, info)) => {
            println!("   {what}: refused ({kind:?}, constraint {})", info.constraint_name().unwrap_or("-"));
            Ok(())
        }
        Err(other) => Err(format!("{what}: failed unexpectedly: {other}").into()),
        Ok(()) => Err(format!("{what}: the database accepted it").into()),
    }
}

pub fn run() -> Result<(), Failure> {
    step("a throwaway PostgreSQL");
    let server = dployr_testkit::server()?;
    println!("   {:?} server ready in {} ms", server.kind(), server.startup_time().as_millis());
    let db = dployr_testkit::try_empty_database()?;
    println!("   empty database {}", db.name());

    step("migrations (each file whole, in one transaction with its record, under an advisory lock)");
    let runner = MigrationRunner::new(db.url(), MigrationSet::embedded()?);
    let applied = runner.run_pending(&mut |event| println!("   {event}"))?;
    println!("   {} applied; running again applies {}", applied.len(), runner.run_pending(&mut |_| {})?.len());
    for line in runner.status()? {
        if let MigrationState::Applied { applied_at, duration, checksum_matches } = line.state {
            let checksum = if checksum_matches { "checksum ok" } else { "CHANGED" };
            println!("   {} applied at {applied_at} in {} ms, {checksum}", line.name, duration.as_millis());
        }
    }

    step("the schema guards itself");
    let mut conn = PgConnection::establish(db.url())?;
    conn.batch_execute(
        "INSERT INTO users (id, email, name, provider) VALUES
             ('01JD0000000000000000000001', 'ada@example.com', 'Ada', 'google'),
             ('01JD0000000000000000000002', 'bob@example.com', 'Bob', 'email');
         INSERT INTO clusters (id, name) VALUES ('01JD0000000000000000000010', 'ada');
         INSERT INTO user_clusters (user_id, cluster_id, role)
             VALUES ('01JD0000000000000000000001', '01JD0000000000000000000010', 'owner');",
    )?;
    println!("   created users ada and bob, and cluster ada owned by ada");
    expect_refusal(
        &mut conn,
        "bob as a second owner of cluster ada",
        "INSERT INTO user_clusters (user_id, cluster_id, role)
             VALUES ('01JD0000000000000000000002', '01JD0000000000000000000010', 'owner')",
    )?;
    expect_refusal(
        &mut conn,
        "changing ada's e-mail",
        "UPDATE users SET email = 'ada@elsewhere.io' WHERE id = '01JD0000000000000000000001'",
    )?;
    expect_refusal(
        &mut conn,
        "an upper-case e-mail",
        "INSERT INTO users (id, email, name, provider) VALUES ('01JD0000000000000000000003', 'Eve@Example.com', 'Eve', 'email')",
    )?;
    expect_refusal(&mut conn, "metadata that is a JSON array", "UPDATE clusters SET metadata = '[1, 2]'")?;

    step("clean-up");
    drop(conn);
    drop(db);
    println!("   the throwaway server stops and its directory is deleted as this command exits");
    Ok(())
}
