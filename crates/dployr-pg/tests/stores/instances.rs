use dployr_domain::{Address, ClusterId, InstanceId, InstanceStore, Metadata, NewInstance, Page, StoreError, Tag};
use serde_json::json;

use crate::fixture::Fixture;

fn new(address: &str, tag: &str) -> NewInstance {
    NewInstance { address: address.try_into().unwrap(), tag: tag.try_into().unwrap(), metadata: None }
}

#[test]
fn create_then_get_and_get_by_tag_return_the_instance() {
    let f = Fixture::new();
    let (_, cluster) = f.owner("ada@example.io");
    let metadata = Metadata::try_from(json!({"region": "eu"})).unwrap();
    let instance = f
        .instances
        .create(&cluster.id, NewInstance { metadata: Some(metadata.clone()), ..new("10.0.0.1", "web-1") })
        .unwrap();
    assert_eq!((instance.cluster_id, instance.metadata.clone()), (cluster.id, metadata));
    assert_eq!(f.instances.get(&instance.id).unwrap(), Some(instance.clone()));
    assert_eq!(f.instances.get_by_tag(&"web-1".try_into().unwrap()).unwrap(), Some(instance));
    assert_eq!(f.instances.get(&InstanceId::generate()).unwrap(), None);
    assert_eq!(f.instances.get_by_tag(&"nope".try_into().unwrap()).unwrap(), None);
}

#[test]
fn an_instance_of_a_cluster_without_members_is_still_found() {
    use diesel::RunQueryDsl;
    let f = Fixture::new();
    if !f.db.superuser() {
        eprintln!("skipped: turning triggers off needs a superuser");
        return;
    }
    let (_, cluster) = f.owner("ada@example.io");
    let instance = f.instances.create(&cluster.id, new("10.0.0.1", "web-1")).unwrap();
    // The seed joined instances through memberships and lost these. The
    // schema now refuses a cluster without its owner (002), so the state is
    // forced here with triggers off, as data from before that rule could be.
    let mut conn = f.db.connect();
    diesel::sql_query("SET session_replication_role = replica").execute(&mut conn).unwrap();
    diesel::sql_query("DELETE FROM user_clusters").execute(&mut conn).unwrap();
    assert_eq!(f.instances.get(&instance.id).unwrap().map(|i| i.id), Some(instance.id));
    assert_eq!(f.instances.get_by_tag(&"web-1".try_into().unwrap()).unwrap().map(|i| i.id), Some(instance.id));
}

#[test]
fn a_duplicate_tag_or_address_is_a_conflict_naming_the_field() {
    let f = Fixture::new();
    let (_, cluster) = f.owner("ada@example.io");
    f.instances.create(&cluster.id, new("10.0.0.1", "web-1")).unwrap();
    let error = f.instances.create(&cluster.id, new("10.0.0.2", "web-1")).unwrap_err();
    assert!(matches!(error, StoreError::Conflict { entity: "instance", field: "tag", .. }), "{error}");
    let error = f.instances.create(&cluster.id, new("10.0.0.1", "web-2")).unwrap_err();
    assert!(matches!(error, StoreError::Conflict { entity: "instance", field: "address", .. }), "{error}");
    assert_eq!(f.count("SELECT count(*) FROM instances"), 1);
}

#[test]
fn create_in_an_unknown_cluster_is_not_found() {
    let f = Fixture::new();
    let cluster = ClusterId::generate();
    let error = f.instances.create(&cluster, new("10.0.0.1", "web-1")).unwrap_err();
    match error {
        StoreError::NotFound { entity: "cluster", key } => assert_eq!(key, cluster.to_string()),
        other => panic!("{other}"),
    }
}

#[test]
fn empty_oversized_or_control_character_fields_are_invalid() {
    // The types refuse them, so no store can be handed one.
    for (raw, max) in [("", 255), ("   ", 255), (&"t".repeat(256) as &str, 255), ("we\u{0}b", 255)] {
        assert!(max == 255 && matches!(Tag::parse(raw), Err(StoreError::Invalid { field: "tag", .. })), "{raw:?}");
    }
    for raw in ["", "\u{200b}", &"a".repeat(1025)] {
        assert!(matches!(Address::parse(raw), Err(StoreError::Invalid { field: "address", .. })), "{raw:?}");
    }
}

#[test]
fn tags_are_trimmed_so_spellings_with_spaces_find_the_instance() {
    let f = Fixture::new();
    let (_, cluster) = f.owner("ada@example.io");
    let instance = f.instances.create(&cluster.id, new("10.0.0.1", " web-1 ")).unwrap();
    assert_eq!(instance.tag, "web-1");
    for spelling in ["web-1", "web-1 ", "\tweb-1"] {
        let found = f.instances.get_by_tag(&Tag::parse(spelling).unwrap()).unwrap().map(|i| i.id);
        assert_eq!(found, Some(instance.id), "{spelling:?}");
    }
    let error = f.instances.create(&cluster.id, new("10.0.0.2", "web-1 ")).unwrap_err();
    assert!(matches!(error, StoreError::Conflict { field: "tag", .. }), "{error}");
}

#[test]
fn update_metadata_replaces_it_and_unknown_is_none() {
    let f = Fixture::new();
    let (_, cluster) = f.owner("ada@example.io");
    let instance = f
        .instances
        .create(
            &cluster.id,
            NewInstance { metadata: Some(Metadata::try_from(json!({"a": 1})).unwrap()), ..new("h", "t") },
        )
        .unwrap();
    let replaced = Metadata::try_from(json!({"b": 2})).unwrap();
    let updated = f.instances.update_metadata(&instance.id, replaced.clone()).unwrap().unwrap();
    assert_eq!(updated.metadata, replaced);
    assert_eq!(f.instances.update_metadata(&InstanceId::generate(), replaced).unwrap(), None);
}

#[test]
fn delete_removes_the_instance_and_its_tokens_and_unknown_is_not_found() {
    let f = Fixture::new();
    let (_, cluster) = f.owner("ada@example.io");
    let instance = f.instances.create(&cluster.id, new("h", "t")).unwrap();
    dployr_domain::BootstrapTokenStore::create(&f.tokens, &instance.id, &"n1".try_into().unwrap()).unwrap();
    f.instances.delete(&instance.id).unwrap();
    assert_eq!(f.count("SELECT count(*) FROM bootstrap_tokens"), 0);
    let error = f.instances.delete(&instance.id).unwrap_err();
    assert!(matches!(error, StoreError::NotFound { entity: "instance", .. }), "{error}");
}

#[test]
fn list_by_cluster_pages_newest_first_by_cursor_and_offset_with_the_total() {
    let f = Fixture::new();
    let (_, cluster) = f.owner("ada@example.io");
    let (_, other) = f.owner("bob@example.io");
    let created: Vec<_> = (0..12)
        .map(|i| f.instances.create(&cluster.id, new(&format!("10.0.0.{i}"), &format!("web-{i}"))).unwrap())
        .collect();
    f.instances.create(&other.id, new("10.1.0.1", "other")).unwrap();
    let all = f.instances.list_by_cluster(&cluster.id, &Page::first(100)).unwrap();
    assert_eq!(all.total, 12);
    let mut expected = created.clone();
    expected.sort_by_key(|i| std::cmp::Reverse((i.created_at, i.id)));
    assert_eq!(all.items, expected);

    let mut by_cursor = Vec::new();
    let mut page = Page::first(5);
    loop {
        let paged = f.instances.list_by_cluster(&cluster.id, &page).unwrap();
        by_cursor.extend(paged.items);
        match paged.next {
            Some(next) => page = Page::after(next, 5),
            None => break,
        }
    }
    assert_eq!(by_cursor, expected);
    let third = f.instances.list_by_cluster(&cluster.id, &Page::offset(10, 5)).unwrap();
    assert_eq!(third.items, expected[10..]);
    let unknown = f.instances.list_by_cluster(&ClusterId::generate(), &Page::first(5)).unwrap();
    assert_eq!((unknown.items.len(), unknown.total), (0, 0));
    let error =
        f.instances.list_by_cluster(&cluster.id, &Page::after(dployr_domain::Cursor::new("xyz"), 5)).unwrap_err();
    assert!(matches!(error, StoreError::Invalid { field: "cursor", .. }), "{error}");
    // A position in this cluster's listing is none in another's (whose
    // newer instances it would skip).
    let first_page_next = f.instances.list_by_cluster(&cluster.id, &Page::first(5)).unwrap().next.unwrap();
    let error = f.instances.list_by_cluster(&other.id, &Page::after(first_page_next, 5)).unwrap_err();
    assert!(matches!(error, StoreError::Invalid { field: "cursor", .. }), "{error}");
}

/// Instances made in one microsecond (bulk inserts, restored dumps) are
/// ordered by id, and a page may end between two of them: the server's
/// order, the keyset and the store's own sort must all compare ids alike.
/// The store compares bytes; so must the server, whatever the database's
/// locale (under `cs`, `…CH…` sorts after `…CZ…`, and a page ending
/// between two such instances skipped one for good): the column is
/// `COLLATE "C"` (`015_instance_ids_by_bytes`). The test server's locale
/// is C, where the order was already right, so the collation is checked
/// directly too.
#[test]
fn instances_made_in_one_microsecond_are_each_listed_once_in_the_bytes_order_of_their_ids() {
    let f = Fixture::new();
    let (_, cluster) = f.owner("ada@example.io");
    let ids = [
        "01J00000000000000000000CH0",
        "01J00000000000000000000CZ0",
        "01J00000000000000000000H00",
        "01J0000000000000000000AA00",
    ];
    for (i, id) in ids.iter().enumerate() {
        f.count(&format!(
            "WITH made AS (INSERT INTO instances (id, cluster_id, address, tag, created_at) \
             VALUES ('{id}', '{}', '10.9.0.{i}', 'tie-{i}', '2026-01-01T00:00:00Z') RETURNING 1) \
             SELECT count(*) FROM made",
            cluster.id
        ));
    }
    let mut newest_first: Vec<&str> = ids.to_vec();
    newest_first.sort_unstable_by(|a, b| b.as_bytes().cmp(a.as_bytes()));
    let mut listed = Vec::new();
    let mut page = Page::first(1);
    loop {
        let paged = f.instances.list_by_cluster(&cluster.id, &page).unwrap();
        assert_eq!(paged.total, 4);
        listed.extend(paged.items.iter().map(|instance| instance.id.to_string()));
        match paged.next {
            Some(next) => page = Page::after(next, 1),
            None => break,
        }
    }
    assert_eq!(listed, newest_first);
    let collation = f.inspect(|conn| {
        use diesel::prelude::*;
        diesel::dsl::sql::<diesel::sql_types::Text>(
            "SELECT collation_name::text FROM information_schema.columns \
             WHERE table_name = 'instances' AND column_name = 'id'",
        )
        .get_result::<String>(conn)
        .unwrap()
    });
    assert_eq!(collation, "C", "instance ids compare by their bytes on every server");
}
