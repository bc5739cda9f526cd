//! A private server that a test still holds frozen (its `Freeze` guard not
//! yet dropped) restarts and stops instead of hanging: the stop continues
//! the server's processes before it signals them (a stopped process acts
//! on no signal but `SIGKILL`), and a stop that takes too long is cut short.

#![cfg(test)]

use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use diesel::{Connection as _, PgConnection, RunQueryDsl as _};
use dployr_testkit::local::Shutdown;
use dployr_testkit::private::PrivateServer;

#[test]
fn a_server_held_frozen_restarts_and_answers_again() {
    let Some(server) = PrivateServer::start().unwrap() else {
        eprintln!("no local PostgreSQL server binaries: nothing to freeze here");
        return;
    };
    let freeze = server.freeze().unwrap();
    let (done, restarted) = mpsc::channel();
    let url = server.url().to_owned();
    let restarting = thread::spawn(move || {
        let result = server.restart(Shutdown::Fast, Duration::ZERO);
        let _ = done.send(result.is_ok());
        server
    });
    // Before the fix the restart waited forever for a stopped postmaster.
    let answer = restarted.recv_timeout(Duration::from_secs(90));
    drop(freeze); // thaws nothing of the new server (its pids are new)
    assert_eq!(answer, Ok(true), "the restart of a frozen server did not end in 90 s");
    let server = restarting.join().unwrap();
    let mut conn = PgConnection::establish(&url).unwrap();
    diesel::sql_query("SELECT 1").execute(&mut conn).unwrap();
    drop(server);
}
