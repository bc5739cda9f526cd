//! No write commits and then reports an error: the single-statement writes
//! that return a row decode it inside their transaction. A test trigger
//! makes the stored row undecodable (metadata 200 levels deep, past
//! serde_json's 128, as `Metadata` itself never allows), and each write
//! must then fail with everything rolled back. The schema's own check
//! against such metadata (`*_metadata_readable`, 017) is dropped first in
//! the test's database: the rollback is what holds wherever a row the
//! stores cannot read does get in.

use diesel::connection::SimpleConnection as _;
use dployr_domain::{InstanceStore, Metadata, NewInstance, StoreError, UserPatch, UserStore};
use serde_json::json;

use crate::fixture::Fixture;

/// Makes every row `event` (`INSERT` or `UPDATE`) writes to `table` carry
/// metadata that serde_json cannot read back.
fn poison(f: &Fixture, table: &str, event: &str) {
    let sql = format!(
        "ALTER TABLE {table} DROP CONSTRAINT {table}_metadata_readable; \
         CREATE OR REPLACE FUNCTION test_poison_metadata() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
           NEW.metadata := jsonb_build_object('deep', (repeat('[', 200) || '1' || repeat(']', 200))::jsonb); \
           RETURN NEW; END $$; \
         CREATE TRIGGER test_poison_{table} BEFORE {event} ON {table} FOR EACH ROW EXECUTE FUNCTION test_poison_metadata();"
    );
    f.inspect(|conn| conn.batch_execute(&sql).unwrap());
}

fn is_backend(error: &StoreError) -> bool {
    matches!(error, StoreError::Backend { .. })
}

#[test]
fn a_row_that_cannot_be_decoded_is_rolled_back() {
    let f = Fixture::new();
    let (ada, cluster) = f.owner("ada@example.io");
    let instance = f.instance(&cluster.id, "10.0.0.1", "web-1");
    poison(&f, "users", "UPDATE");
    poison(&f, "instances", "INSERT OR UPDATE");
    let before = f.fingerprint();

    let patch = UserPatch { name: Some("Countess".try_into().unwrap()), ..UserPatch::default() };
    let error = f.users.update(&ada.email, patch).unwrap_err();
    assert!(is_backend(&error), "users.update: {error}");

    let new = NewInstance { address: "10.0.0.2".try_into().unwrap(), tag: "web-2".try_into().unwrap(), metadata: None };
    let error = f.instances.create(&cluster.id, new).unwrap_err();
    assert!(is_backend(&error), "instances.create: {error}");

    let metadata = Metadata::try_from(json!({"region": "eu"})).unwrap();
    let error = f.instances.update_metadata(&instance.id, metadata).unwrap_err();
    assert!(is_backend(&error), "instances.update_metadata: {error}");

    assert_eq!(f.fingerprint(), before, "every write was rolled back");
    // And every row still reads: nobody is locked out.
    assert_eq!(f.users.get_by_email(&ada.email).unwrap().map(|user| user.name), Some("ada".to_owned()));
    assert_eq!(f.instances.get(&instance.id).unwrap().map(|i| i.metadata), Some(Metadata::new()));
    assert_eq!(f.instances.list_by_cluster(&cluster.id, &dployr_domain::Page::first(10)).unwrap().total, 1);
}
