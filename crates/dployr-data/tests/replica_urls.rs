//! `DPLOYR_DB_REPLICA_URLS` as the data layer opens it: a password with a
//! raw `,` reaches libpq in one piece, and no error or health report shows
//! any part of it, whatever the value's malformation.

#![cfg(test)]

use dployr_data::{Config, DataLayer};

/// A free loopback port with nothing listening on it.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

#[test]
fn no_part_of_a_replica_password_with_a_comma_shows_in_an_error_or_the_health() {
    let db = dployr_testkit::database();
    let port = closed_port();
    for replicas in [
        format!("postgres://app:s3cr3t-a,s3cr3t-b@127.0.0.1:{port}/app"),
        format!("postgres://app:s3cr3t-a,s3cr3t-b@127.0.0.1:{port}/app,postgres://app:s3cr3t-c@127.0.0.1:{port}/x"),
        "postgres://app:s3cr3t-a,s3cr3t-b@[::1/app".to_owned(),
        "postgres://app:s3cr3t-a,s3cr3t-b@127.0.0.1:x/app".to_owned(),
        format!("postgres://app:s3cr3t-a, postgres://s3cr3t-b@127.0.0.1:{port}/app"),
        format!("host=127.0.0.1 port={port} password=s3cr3t-a,s3cr3t-b dbname=app"),
    ] {
        let vars = |name: &str| match name {
            "DATABASE_URL" => Some(db.url().to_owned()),
            "DPLOYR_KV" => Some("memory".to_owned()),
            "DPLOYR_DB_REPLICA_URLS" => Some(replicas.clone()),
            _ => None,
        };
        let config = Config::from_vars(vars).unwrap();
        let shown = match DataLayer::open(config) {
            Ok(data) => format!("{:?}", data.health()),
            Err(error) => format!("{error} {error:?}"),
        };
        assert!(!shown.contains("s3cr3t"), "{replicas:?}: {shown}");
    }
}
