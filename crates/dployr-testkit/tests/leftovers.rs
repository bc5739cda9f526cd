//! What the testkit leaves on a server of one's own (issue 12, defect 8):
//! its template database goes with a plain `DROP DATABASE`, and
//! `drop_leftover_databases` (`cargo xtask db clean`) drops templates and
//! the test databases of processes that are gone, and nothing a test
//! process still running may use, on this machine or another.
//!
//! It runs on a throwaway server of its own ([`PrivateServer`]), never on
//! the shared one (`DATABASE_URL` or this binary's): it drops a template,
//! which other test processes on that server clone, and it asserts on every
//! `dployr_` database of the server, which on a shared one includes those
//! of other runs.

#![cfg(test)]

use diesel::connection::SimpleConnection as _;
use diesel::prelude::*;
use std::time::{Duration, Instant};

use diesel::sql_types::{BigInt, Text};
use dployr_testkit::PrivateServer;

fn databases(admin: &mut PgConnection) -> Vec<String> {
    diesel::dsl::sql::<Text>("SELECT datname::text FROM pg_database WHERE datname LIKE 'dployr\\_%' ORDER BY 1")
        .load(admin)
        .unwrap()
}

fn create(admin: &mut PgConnection, names: &[&str]) {
    for name in names {
        admin.batch_execute(&format!("CREATE DATABASE \"{name}\"")).unwrap();
    }
}

/// The advisory lock the testkit builds a template under (`TEMPLATE_LOCK`
/// in src/databases.rs).
const TEMPLATE_LOCK: i64 = 0x6470_6c6f_7972_0002;

#[test]
fn the_template_drops_with_a_plain_drop_database_and_db_clean_drops_only_what_no_live_run_uses() {
    let Some(server) = PrivateServer::start().unwrap() else {
        eprintln!(
            "skipped: needs the local PostgreSQL server binaries for a server of its own \
             (on a shared server it would drop a template other runs clone)"
        );
        return;
    };
    // The private server's migrated database serves as the admin database.
    let url = server.url();
    let mut admin = PgConnection::establish(url).unwrap();
    let template = databases(&mut admin).into_iter().find(|name| name.starts_with("dployr_tpl_")).unwrap();
    admin.batch_execute(&format!("DROP DATABASE \"{template}\"")).unwrap();
    assert_eq!(databases(&mut admin), Vec::<String>::new());

    // Leftovers of other runs: an old-style template and a dead process's
    // test databases (named with and without the run, as this and earlier
    // versions name them).
    create(&mut admin, &["dployr_tpl_00000000deadbeef", "dployr_t_2147483646_0", "dployr_e_2147483646_0badf00d_3"]);
    admin
        .batch_execute("ALTER DATABASE dployr_tpl_00000000deadbeef WITH IS_TEMPLATE true ALLOW_CONNECTIONS false")
        .unwrap();
    // In use: a run on another machine (its process id is not alive here),
    // seen by its admin session, with its template and a test database;
    // templates being built (while the lock is held, every `_building` is
    // kept: the lock does not say which template it builds, so a build that
    // crashed waits for the next clean); a database someone is connected
    // to; and a test database of a process alive on this machine.
    let elsewhere = "dployr_t_2147483645_0badf00d_0";
    let connected = "dployr_e_2147483644_0badf00d_1";
    let this_machine = format!("dployr_t_{}_0badf00d_2", std::process::id());
    create(
        &mut admin,
        &[
            "dployr_tpl_00000000cafef00d",
            elsewhere,
            "dployr_tpl_00000000feedface_building",
            "dployr_tpl_00000000badc0ffe_building",
            connected,
            &this_machine,
        ],
    );
    let mut other_run = PgConnection::establish(url).unwrap();
    other_run
        .batch_execute("SET application_name = 'dployr-testkit 2147483645_0badf00d dployr_tpl_00000000cafef00d'")
        .unwrap();
    let mut builder = PgConnection::establish(url).unwrap();
    builder.batch_execute(&format!("SELECT pg_advisory_lock({TEMPLATE_LOCK})")).unwrap();
    let (server_part, _) = url.rsplit_once('/').unwrap();
    let session = PgConnection::establish(&format!("{server_part}/{connected}")).unwrap();

    let dropped = dployr_testkit::drop_leftover_databases(url).unwrap();
    assert_eq!(dropped, ["dployr_e_2147483646_0badf00d_3", "dployr_t_2147483646_0", "dployr_tpl_00000000deadbeef"]);
    let mut in_use = vec![
        connected.to_owned(),
        elsewhere.to_owned(),
        this_machine.clone(),
        "dployr_tpl_00000000badc0ffe_building".to_owned(),
        "dployr_tpl_00000000cafef00d".to_owned(),
        "dployr_tpl_00000000feedface_building".to_owned(),
    ];
    in_use.sort();
    assert_eq!(databases(&mut admin), in_use, "what a live run uses stays");

    // Once those runs are gone, so are their databases; the process alive
    // here keeps its own.
    drop((other_run, builder, session));
    let gone = Instant::now() + Duration::from_secs(5);
    while client_sessions(&mut admin) > 1 && Instant::now() < gone {
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut dropped = dployr_testkit::drop_leftover_databases(url).unwrap();
    dropped.sort();
    in_use.retain(|name| *name != this_machine);
    assert_eq!(dropped, in_use);
    assert_eq!(databases(&mut admin), [this_machine]);
}

/// The client sessions of the server (the backend of a closed connection
/// may linger a moment after the client is gone).
fn client_sessions(admin: &mut PgConnection) -> i64 {
    diesel::dsl::sql::<BigInt>("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'")
        .get_result(admin)
        .unwrap()
}
