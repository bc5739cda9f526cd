//! A role that lacks a grant the stores need (a service role set up by
//! hand, a grant forgotten after a migration added a table): PostgreSQL's
//! refusal is a setting to fix, `Configuration` naming the setting the
//! pool's URL came from, not "report it" (`Backend`), as the migration
//! runner already says for the role it migrates with; nothing is written,
//! and what the role may do still works.

use diesel::connection::SimpleConnection as _;
use dployr_domain::{ClusterStore as _, NewUser, Provider, StoreError, UserStore as _};
use dployr_pg::{DATABASE_URL_SETTING, PgClusterStore, PgPool, PgUserStore, PoolConfig};

use crate::fixture::{Fixture, email};

fn configuration_saying<'e>(error: &'e StoreError, words: &str) -> Option<&'e str> {
    match error {
        StoreError::Configuration { setting, reason } if reason.contains(words) => Some(setting),
        _ => None,
    }
}

#[test]
fn a_statement_refused_for_a_missing_grant_is_a_configuration_error_naming_the_urls_setting() {
    let f = Fixture::new();
    if !f.db.superuser() {
        eprintln!("skipped: making a role needs a superuser");
        return;
    }
    let (ada, cluster) = f.owner("ada@example.io");
    // A role that may read every table and write none.
    let role = format!("dployr_reader_{}", f.db.name().replace(|c: char| !c.is_ascii_alphanumeric(), "_"));
    f.inspect(|conn| {
        conn.batch_execute(&format!(
            "CREATE ROLE \"{role}\" LOGIN; GRANT USAGE ON SCHEMA public TO \"{role}\"; \
             GRANT SELECT ON ALL TABLES IN SCHEMA public TO \"{role}\";"
        ))
        .unwrap();
    });
    let url = dployr_testkit::server().unwrap().url_with(f.db.name(), &[("user", role.as_str())]);
    let before = f.fingerprint();
    {
        let pool = PgPool::connect_as(&url, "DATABASE_URL", PoolConfig::default()).unwrap();
        let (users, clusters) = (PgUserStore::new(pool.clone()), PgClusterStore::new(pool.clone()));
        // What the role may do still works.
        assert_eq!(users.get_by_email(&ada.email).unwrap().map(|user| user.id), Some(ada.id));
        assert!(clusters.can_write(&ada.id, &cluster.id).unwrap());

        // One statement, outside a transaction.
        let error = users.upsert(NewUser::new(email("grace@example.io"), Provider::Github)).unwrap_err();
        assert_eq!(
            configuration_saying(&error, "permission denied for table users"),
            Some("DATABASE_URL"),
            "{error:?}"
        );
        assert!(!error.is_retryable());
        // A transaction of several statements.
        let error = clusters.add_users(&cluster.id, &[email("invitee@example.io")]).unwrap_err();
        assert_eq!(configuration_saying(&error, "permission denied for table"), Some("DATABASE_URL"), "{error:?}");
        assert!(error.to_string().contains("lacks a privilege"), "{error}");
    }
    // A pool opened without a setting's name names its URL's field.
    {
        let pool = PgPool::connect(&url, PoolConfig::default()).unwrap();
        let error = PgUserStore::new(pool).upsert(NewUser::new(email("lin@example.io"), Provider::Github)).unwrap_err();
        assert_eq!(configuration_saying(&error, "permission denied"), Some(DATABASE_URL_SETTING), "{error:?}");
    }
    assert_eq!(f.fingerprint(), before, "nothing was written");
    f.inspect(|conn| conn.batch_execute(&format!("DROP OWNED BY \"{role}\"; DROP ROLE \"{role}\"")).unwrap());
}
