//! What the testkit leaves on a server of one's own (issue 12, defect 8):
//! its template database goes with a plain `DROP DATABASE`, and
//! `drop_leftover_databases` (`cargo xtask db clean`) drops templates and
//! the test databases of processes that are gone. One test in its own
//! binary: it drops the template the binary's other tests would clone.

#![cfg(test)]

use diesel::connection::SimpleConnection as _;
use diesel::prelude::*;
use diesel::sql_types::Text;

fn databases(admin: &mut PgConnection) -> Vec<String> {
    diesel::dsl::sql::<Text>("SELECT datname::text FROM pg_database WHERE datname LIKE 'dployr\\_%' ORDER BY 1")
        .load(admin)
        .unwrap()
}

#[test]
fn the_template_drops_with_a_plain_drop_database_and_db_clean_drops_leftovers() {
    let server = dployr_testkit::server().unwrap();
    let template = server.template().to_owned();
    let mut admin = PgConnection::establish(&server.url_for("postgres")).unwrap();
    admin.batch_execute(&format!("DROP DATABASE \"{template}\"")).unwrap();
    assert!(!databases(&mut admin).contains(&template));

    // Leftovers of other runs: an old-style template and a dead process's test databases (named
    // with and without the run, as this and earlier versions name them).
    admin.batch_execute("CREATE DATABASE dployr_tpl_00000000deadbeef").unwrap();
    admin
        .batch_execute("ALTER DATABASE dployr_tpl_00000000deadbeef WITH IS_TEMPLATE true ALLOW_CONNECTIONS false")
        .unwrap();
    admin.batch_execute("CREATE DATABASE dployr_t_2147483646_0").unwrap();
    admin.batch_execute("CREATE DATABASE dployr_e_2147483646_0badf00d_3").unwrap();
    let ours = dployr_testkit::empty_database();
    let dropped = dployr_testkit::drop_leftover_databases(&server.url_for("postgres")).unwrap();
    assert_eq!(dropped, ["dployr_e_2147483646_0badf00d_3", "dployr_t_2147483646_0", "dployr_tpl_00000000deadbeef"]);
    assert_eq!(databases(&mut admin), [ours.name().to_owned()], "a live process's database stays");
}
