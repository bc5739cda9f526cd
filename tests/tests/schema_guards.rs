//! The rules the schema enforces by itself, so no store can forget them and
//! no hand-written SQL can break them: exactly one owner per live cluster
//! (`000_init`'s unique index, `002_cluster_owner_guard`'s triggers, also
//! under concurrency), immutable e-mails, no return to `invited`, metadata
//! objects, cascades, and an index behind every foreign key.
//!
//! The SQL here goes through the simple query protocol (`batch_execute`),
//! as a psql session sends it.

#![cfg(test)]

use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use diesel::connection::SimpleConnection as _;
use diesel::prelude::*;
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel::sql_types::{BigInt, Bool, Text};

/// A valid ULID-shaped id (digits are Crockford base32).
fn id(n: u32) -> String {
    format!("{n:026}")
}

fn user(conn: &mut PgConnection, n: u32) -> String {
    diesel::sql_query("INSERT INTO users (id, email, name, provider) VALUES ($1, $2, $3, 'email')")
        .bind::<Text, _>(id(n))
        .bind::<Text, _>(format!("user{n}@example.com"))
        .bind::<Text, _>(format!("User {n}"))
        .execute(conn)
        .unwrap();
    id(n)
}

/// A cluster and its owner, created together as the schema requires.
fn cluster(conn: &mut PgConnection, n: u32, owner: &str) -> String {
    conn.transaction::<_, DieselError, _>(|conn| {
        diesel::sql_query("INSERT INTO clusters (id, name) VALUES ($1, $2)")
            .bind::<Text, _>(id(n))
            .bind::<Text, _>(format!("cluster {n}"))
            .execute(conn)?;
        member(conn, owner, &id(n), "owner")
    })
    .unwrap();
    id(n)
}

fn member(conn: &mut PgConnection, user_id: &str, cluster_id: &str, role: &str) -> QueryResult<usize> {
    diesel::sql_query("INSERT INTO user_clusters (user_id, cluster_id, role) VALUES ($1, $2, $3)")
        .bind::<Text, _>(user_id)
        .bind::<Text, _>(cluster_id)
        .bind::<Text, _>(role)
        .execute(conn)
}

fn count(conn: &mut PgConnection, sql: &str) -> i64 {
    diesel::select(diesel::dsl::sql::<BigInt>(&format!("({sql})"))).get_result(conn).unwrap()
}

/// The text the query `sql` answers.
fn text(conn: &mut PgConnection, sql: &str) -> String {
    diesel::select(diesel::dsl::sql::<Text>(&format!("({sql})"))).get_result(conn).unwrap()
}

/// The kind and constraint name of a refused statement.
fn refusal<T: std::fmt::Debug>(result: QueryResult<T>) -> (DatabaseErrorKind, String) {
    match result {
        Err(DieselError::DatabaseError(kind, info)) => (kind, info.constraint_name().unwrap_or_default().to_owned()),
        other => panic!("expected the database to refuse, got {other:?}"),
    }
}

#[test]
fn a_second_owner_of_a_cluster_is_refused_by_the_partial_unique_index() {
    let db = dployr_testkit::database();
    let mut conn = db.connect();
    let (a, b) = (user(&mut conn, 1), user(&mut conn, 2));
    let c = cluster(&mut conn, 10, &a);
    let (kind, constraint) = refusal(member(&mut conn, &b, &c, "owner"));
    assert_eq!(kind, DatabaseErrorKind::UniqueViolation);
    assert_eq!(constraint, "user_clusters_one_owner_per_cluster");
    // Other roles are not limited, and another cluster may have its own owner.
    member(&mut conn, &b, &c, "admin").unwrap();
    cluster(&mut conn, 11, &b);
}

#[test]
fn two_concurrent_transactions_cannot_both_make_an_owner() {
    let db = dployr_testkit::database();
    let mut setup = db.connect();
    let (o, a, b) = (user(&mut setup, 1), user(&mut setup, 2), user(&mut setup, 3));
    let c = cluster(&mut setup, 10, &o);

    let (inserted_tx, inserted_rx) = mpsc::channel();
    let first = {
        let (url, a, c) = (db.url().to_owned(), a.clone(), c.clone());
        thread::spawn(move || {
            let mut conn = PgConnection::establish(&url).unwrap();
            conn.transaction::<_, DieselError, _>(|conn| {
                // A transfer: demote the owner, then promote another.
                diesel::sql_query("UPDATE user_clusters SET role = 'admin' WHERE cluster_id = $1 AND role = 'owner'")
                    .bind::<Text, _>(&c)
                    .execute(conn)?;
                member(conn, &a, &c, "owner")?;
                inserted_tx.send(()).unwrap();
                // Hold the uncommitted owner while the other transaction tries.
                thread::sleep(Duration::from_millis(300));
                Ok(())
            })
        })
    };
    inserted_rx.recv().unwrap();
    let mut conn = db.connect();
    // This waits on the first transaction's uncommitted index entry, then fails.
    let second = conn.transaction::<_, DieselError, _>(|conn| member(conn, &b, &c, "owner"));
    first.join().unwrap().unwrap();
    let (kind, constraint) = refusal(second);
    assert_eq!(kind, DatabaseErrorKind::UniqueViolation);
    assert_eq!(constraint, "user_clusters_one_owner_per_cluster");
    assert_eq!(count(&mut conn, "SELECT count(*) FROM user_clusters WHERE role = 'owner'"), 1);
}

#[test]
fn an_email_cannot_change() {
    let db = dployr_testkit::database();
    let mut conn = db.connect();
    let a = user(&mut conn, 1);
    let result = diesel::sql_query("UPDATE users SET email = 'other@example.com' WHERE id = $1")
        .bind::<Text, _>(&a)
        .execute(&mut conn);
    let (kind, constraint) = refusal(result);
    assert_eq!(kind, DatabaseErrorKind::CheckViolation);
    assert_eq!(constraint, "users_email_immutable");
    // Other columns still change.
    diesel::sql_query("UPDATE users SET name = 'Renamed' WHERE id = $1")
        .bind::<Text, _>(&a)
        .execute(&mut conn)
        .unwrap();
}

#[test]
fn emails_are_stored_trimmed_and_lower_cased() {
    let db = dployr_testkit::database();
    let mut conn = db.connect();
    for email in ["A@example.com", " a@example.com", "no-at-sign", "@example.com"] {
        let result = diesel::sql_query("INSERT INTO users (id, email, name, provider) VALUES ($1, $2, 'x', 'email')")
            .bind::<Text, _>(id(1))
            .bind::<Text, _>(email)
            .execute(&mut conn);
        assert_eq!(refusal(result), (DatabaseErrorKind::CheckViolation, "users_email_check".to_owned()), "{email}");
    }
}

#[test]
fn a_role_never_goes_back_to_invited() {
    let db = dployr_testkit::database();
    let mut conn = db.connect();
    let (a, o) = (user(&mut conn, 1), user(&mut conn, 2));
    let c = cluster(&mut conn, 10, &o);
    member(&mut conn, &a, &c, "invited").unwrap();
    let set_role = |conn: &mut PgConnection, role: &str| {
        diesel::sql_query("UPDATE user_clusters SET role = $1 WHERE user_id = $2 AND cluster_id = $3")
            .bind::<Text, _>(role)
            .bind::<Text, _>(&a)
            .bind::<Text, _>(&c)
            .execute(conn)
    };
    set_role(&mut conn, "viewer").unwrap();
    let (kind, constraint) = refusal(set_role(&mut conn, "invited"));
    assert_eq!(kind, DatabaseErrorKind::CheckViolation);
    assert_eq!(constraint, "user_clusters_no_return_to_invited");
    set_role(&mut conn, "admin").unwrap();
}

#[test]
fn roles_and_providers_are_limited_to_known_values() {
    let db = dployr_testkit::database();
    let mut conn = db.connect();
    let (a, o) = (user(&mut conn, 1), user(&mut conn, 3));
    let c = cluster(&mut conn, 10, &o);
    assert_eq!(refusal(member(&mut conn, &a, &c, "superuser")).1, "user_clusters_role_check");
    let result =
        diesel::sql_query("INSERT INTO users (id, email, name, provider) VALUES ($1, 'b@example.com', 'b', 'gitlab')")
            .bind::<Text, _>(id(2))
            .execute(&mut conn);
    assert_eq!(refusal(result).1, "users_provider_check");
}

#[test]
fn metadata_that_is_not_a_json_object_is_refused_in_every_table() {
    let db = dployr_testkit::database();
    let mut conn = db.connect();
    let o = user(&mut conn, 1);
    let c = cluster(&mut conn, 10, &o);
    for value in ["[]", "\"text\"", "1", "null", "true"] {
        for (table, sql) in [
            (
                "users",
                "INSERT INTO users (id, email, name, provider, metadata) VALUES ($1, 'm@example.com', 'm', 'email', $2::jsonb)",
            ),
            ("clusters", "INSERT INTO clusters (id, name, metadata) VALUES ($1, 'm', $2::jsonb)"),
        ] {
            let result = diesel::sql_query(sql).bind::<Text, _>(id(99)).bind::<Text, _>(value).execute(&mut conn);
            assert_eq!(
                refusal(result),
                (DatabaseErrorKind::CheckViolation, format!("{table}_metadata_check")),
                "{table} {value}"
            );
        }
        let result = diesel::sql_query(
            "INSERT INTO instances (id, cluster_id, address, tag, metadata) VALUES ($1, $2, '10.0.0.1', 't', $3::jsonb)",
        )
        .bind::<Text, _>(id(98))
        .bind::<Text, _>(&c)
        .bind::<Text, _>(value)
        .execute(&mut conn);
        assert_eq!(refusal(result).1, "instances_metadata_check", "instances {value}");
    }
}

/// What the stores could not read back is refused when written by hand
/// (`017_rows_the_stores_can_read`): times outside years 1 to 9999
/// ('infinity' failed every read of its row; an instance created past 9999
/// was counted and never listed, one before year 1 gave a cursor its own
/// listing refused), and metadata nested more than 100 levels (017 refused
/// 128, which serde_json does not read; 025 leaves room for the levels of
/// the records that hold metadata). 100 levels are still taken.
#[test]
fn rows_the_stores_could_not_read_back_are_refused_in_every_table() {
    let db = dployr_testkit::database();
    let mut conn = db.connect();
    let o = user(&mut conn, 1);
    let c = cluster(&mut conn, 10, &o);
    diesel::sql_query("INSERT INTO instances (id, cluster_id, address, tag) VALUES ($1, $2, '10.0.0.1', 't')")
        .bind::<Text, _>(id(20))
        .bind::<Text, _>(&c)
        .execute(&mut conn)
        .unwrap();
    diesel::sql_query("INSERT INTO bootstrap_tokens (instance_id, nonce) VALUES ($1, 'n')")
        .bind::<Text, _>(id(20))
        .execute(&mut conn)
        .unwrap();
    for time in ["infinity", "-infinity", "10000-06-01 00:00:00+00", "0001-06-01 00:00:00+00 BC"] {
        for (table, sql) in [
            ("clusters", format!("UPDATE clusters SET created_at = '{time}', updated_at = '{time}'")),
            ("users", format!("UPDATE users SET created_at = '{time}', updated_at = '{time}'")),
            ("user_clusters", format!("UPDATE user_clusters SET created_at = '{time}', updated_at = '{time}'")),
            ("instances", format!("UPDATE instances SET created_at = '{time}', updated_at = '{time}'")),
            ("bootstrap_tokens", format!("UPDATE bootstrap_tokens SET used_at = '{time}'")),
        ] {
            let (kind, constraint) = refusal(diesel::sql_query(&sql).execute(&mut conn));
            assert_eq!(
                (kind, constraint.as_str()),
                (DatabaseErrorKind::CheckViolation, &*format!("{table}_times_readable")),
                "{sql}"
            );
        }
    }
    let nested = |depth: usize| format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
    for table in ["users", "clusters", "instances"] {
        let deep = format!("UPDATE {table} SET metadata = jsonb_build_object('a', '{}'::jsonb)", nested(100));
        let (kind, constraint) = refusal(diesel::sql_query(&deep).execute(&mut conn));
        assert_eq!((kind, constraint), (DatabaseErrorKind::CheckViolation, format!("{table}_metadata_readable")));
        let readable = format!("UPDATE {table} SET metadata = jsonb_build_object('a', '{}'::jsonb)", nested(99));
        diesel::sql_query(&readable).execute(&mut conn).unwrap();
        // 2^1024 - 2^970 is the least number serde_json rounds to infinity.
        let least_past_a_float = "179769313486231580793728971405303415079934132710037826936173778980444968292764750946\
             649017977587207096330286416692887910946555547851940402630657488671505820681908902000708383676273854845\
             817711531764475730270069855571366959622842914819860834936475292719074168444365510704342711559699508093\
             042880177904174497792";
        for number in ["1e400", "-1e400", least_past_a_float, &format!("-{least_past_a_float}")] {
            let huge = format!("UPDATE {table} SET metadata = '{{\"a\": [{{\"b\": {number}}}]}}'");
            let (kind, constraint) = refusal(diesel::sql_query(&huge).execute(&mut conn));
            assert_eq!(
                (kind, constraint),
                (DatabaseErrorKind::CheckViolation, format!("{table}_metadata_numbers_readable")),
                "{number}"
            );
        }
        let largest_float = format!("{}", f64::MAX);
        let one_below = format!("{}1", &least_past_a_float[..least_past_a_float.len() - 1]);
        for number in ["1.7976931348623157e308", "-1.7976931348623157e308", "1e-400", &largest_float, &one_below] {
            let sql = format!("UPDATE {table} SET metadata = '{{\"a\": {number}}}'");
            diesel::sql_query(&sql).execute(&mut conn).unwrap();
            let stored = text(&mut conn, &format!("SELECT metadata::text FROM {table} LIMIT 1"));
            let read: serde_json::Value = serde_json::from_str(&stored).unwrap();
            assert!(read["a"].is_f64(), "{number}: {read}");
        }
    }
    let times = "SELECT count(*) FROM instances WHERE created_at BETWEEN '0001-01-01' AND '9999-12-31'";
    assert_eq!(count(&mut conn, times), 1, "the instance keeps its time");
}

#[test]
fn deleting_a_cluster_removes_its_memberships_instances_and_their_tokens() {
    let db = dployr_testkit::database();
    let mut conn = db.connect();
    let a = user(&mut conn, 1);
    let (c, kept) = (cluster(&mut conn, 10, &a), cluster(&mut conn, 11, &a));
    for (instance, cluster_id) in [(id(20), &c), (id(21), &kept)] {
        diesel::sql_query("INSERT INTO instances (id, cluster_id, address, tag) VALUES ($1, $2, $1, $1)")
            .bind::<Text, _>(&instance)
            .bind::<Text, _>(cluster_id)
            .execute(&mut conn)
            .unwrap();
        diesel::sql_query("INSERT INTO bootstrap_tokens (nonce, instance_id) VALUES ($1, $2)")
            .bind::<Text, _>(format!("nonce-{instance}"))
            .bind::<Text, _>(&instance)
            .execute(&mut conn)
            .unwrap();
    }
    diesel::sql_query("DELETE FROM clusters WHERE id = $1").bind::<Text, _>(&c).execute(&mut conn).unwrap();
    assert_eq!(count(&mut conn, "SELECT count(*) FROM user_clusters"), 1);
    assert_eq!(count(&mut conn, "SELECT count(*) FROM instances"), 1);
    assert_eq!(count(&mut conn, "SELECT count(*) FROM bootstrap_tokens"), 1);
    assert_eq!(count(&mut conn, "SELECT count(*) FROM users"), 1, "users outlive their clusters");
}

#[test]
fn updated_at_is_kept_by_the_database() {
    let db = dployr_testkit::database();
    let mut conn = db.connect();
    // Rows written an hour ago (an INSERT may set both timestamps).
    conn.batch_execute(
        "INSERT INTO users (id, email, name, provider, created_at, updated_at)
         VALUES ('00000000000000000000000001', 'a@example.com', 'A', 'email', now() - interval '1 hour', now() - interval '1 hour')",
    )
    .unwrap();
    let stale = "SELECT count(*) FROM users WHERE updated_at < now() - interval '59 minutes'";
    // A no-op update keeps the timestamp: nothing changed.
    conn.batch_execute("UPDATE users SET name = name").unwrap();
    assert_eq!(count(&mut conn, stale), 1);
    // A real change moves it, even when the statement tries to set it itself.
    conn.batch_execute("UPDATE users SET name = 'New', updated_at = '2000-01-01'").unwrap();
    assert_eq!(count(&mut conn, stale), 0);
    let moved: bool = diesel::select(diesel::dsl::sql::<Bool>("(SELECT updated_at > created_at FROM users)"))
        .get_result(&mut conn)
        .unwrap();
    assert!(moved);
}

/// A no-op update keeps the timestamp on every table, `user_clusters` too,
/// whose stored generated column (`role_order`) a BEFORE trigger sees as
/// NULL in the new row: compared whole, every update of a membership looked
/// like a change (`clusters.update` re-stamped every member it listed).
#[test]
fn a_no_op_update_keeps_the_timestamp_in_every_table_with_one() {
    let db = dployr_testkit::database();
    let mut conn = db.connect();
    let owner = user(&mut conn, 1);
    let viewer = user(&mut conn, 2);
    let cluster = cluster(&mut conn, 3, &owner);
    member(&mut conn, &viewer, &cluster, "viewer").unwrap();
    conn.batch_execute(
        "INSERT INTO instances (id, cluster_id, address, tag) VALUES ('00000000000000000000000004', '00000000000000000000000003', '10.0.0.4', 'four');
         INSERT INTO bootstrap_tokens (instance_id, nonce) VALUES ('00000000000000000000000004', 'nonce-5');
         INSERT INTO kv_entries (key, value) VALUES ('k', 'v')",
    )
    .unwrap();
    for (table, no_op) in [
        ("users", "UPDATE users SET name = name"),
        ("clusters", "UPDATE clusters SET name = name"),
        ("user_clusters", "UPDATE user_clusters SET role = role"),
        ("instances", "UPDATE instances SET tag = tag"),
        ("bootstrap_tokens", "UPDATE bootstrap_tokens SET nonce = nonce"),
        ("kv_entries", "UPDATE kv_entries SET value = value"),
    ] {
        let stamps = format!("SELECT string_agg(updated_at::text, ',' ORDER BY updated_at) FROM {table}");
        let before: String =
            diesel::select(diesel::dsl::sql::<Text>(&format!("({stamps})"))).get_result(&mut conn).unwrap();
        conn.batch_execute(no_op).unwrap();
        let after: String =
            diesel::select(diesel::dsl::sql::<Text>(&format!("({stamps})"))).get_result(&mut conn).unwrap();
        assert_eq!(after, before, "{no_op} moved updated_at");
    }
    // A real change of a membership still moves it.
    let stale = format!("SELECT updated_at FROM user_clusters WHERE user_id = '{viewer}'");
    let before: String =
        diesel::select(diesel::dsl::sql::<Text>(&format!("({stale})::text"))).get_result(&mut conn).unwrap();
    conn.batch_execute(&format!("UPDATE user_clusters SET role = 'developer' WHERE user_id = '{viewer}'")).unwrap();
    let after: String =
        diesel::select(diesel::dsl::sql::<Text>(&format!("({stale})::text"))).get_result(&mut conn).unwrap();
    assert_ne!(after, before, "a change of role kept the old stamp");
}

/// Every table whose `updated_at` the trigger keeps names its stored
/// generated columns to it, which it leaves out of the comparison: a table
/// given one later without it would stamp every no-op update again.
#[test]
fn every_stamped_table_names_its_generated_columns_to_its_trigger() {
    let db = dployr_testkit::database();
    let mut conn = db.connect();
    let mismatched: Vec<String> = diesel::sql_query(
        "SELECT c.relname AS name
           FROM pg_trigger t
           JOIN pg_class c ON c.oid = t.tgrelid
           JOIN pg_proc p ON p.oid = t.tgfoid
          WHERE p.proname = 'dployr_set_updated_at'
            AND coalesce((SELECT array_agg(a.attname::text ORDER BY a.attname)
                            FROM pg_attribute a
                           WHERE a.attrelid = c.oid AND a.attgenerated = 's' AND NOT a.attisdropped), '{}')
                IS DISTINCT FROM
                coalesce((SELECT array_agg(arg ORDER BY arg)
                            FROM unnest(string_to_array(encode(t.tgargs, 'escape'), '\\000')) AS arg
                           WHERE arg <> ''), '{}')",
    )
    .load::<Name>(&mut conn)
    .unwrap()
    .into_iter()
    .map(|row| row.name)
    .collect();
    assert!(
        mismatched.is_empty(),
        "tables whose trigger does not name exactly their generated columns: {mismatched:?}"
    );
    let stamped = count(
        &mut conn,
        "SELECT count(*) FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid WHERE p.proname = 'dployr_set_updated_at'",
    );
    assert_eq!(stamped, 6, "users, clusters, user_clusters, instances, bootstrap_tokens, kv_entries");
}

#[derive(QueryableByName)]
struct Name {
    #[diesel(sql_type = Text)]
    name: String,
}

/// A change that waited (here: a transaction that began before the row
/// existed) is stamped with the time of the change, not of its
/// transaction's start: before `008_update_times` the row read "updated"
/// before it was created, and a later change could move `updated_at` back.
#[test]
fn updated_at_is_never_before_created_at_nor_moved_back_by_a_transaction_that_began_earlier() {
    let db = dployr_testkit::database();
    let mut early = db.connect();
    let mut other = db.connect();
    early.batch_execute("BEGIN; SELECT 1").unwrap();
    thread::sleep(Duration::from_millis(20));
    let created = user(&mut other, 1);
    early.batch_execute(&format!("UPDATE users SET name = 'Early' WHERE id = '{created}'; COMMIT")).unwrap();
    let order = |conn: &mut PgConnection| -> bool {
        diesel::select(diesel::dsl::sql::<Bool>("(SELECT updated_at >= created_at FROM users)"))
            .get_result(conn)
            .unwrap()
    };
    assert!(order(&mut other), "updated before it was created");

    // Two changes: the one whose transaction began first commits last.
    early.batch_execute("BEGIN; SELECT 1").unwrap();
    thread::sleep(Duration::from_millis(20));
    other.batch_execute(&format!("UPDATE users SET name = 'Later' WHERE id = '{created}'")).unwrap();
    let after_later: String = diesel::select(diesel::dsl::sql::<Text>("(SELECT updated_at::text FROM users)"))
        .get_result(&mut other)
        .unwrap();
    early.batch_execute(&format!("UPDATE users SET name = 'Last' WHERE id = '{created}'; COMMIT")).unwrap();
    let moved_on: bool = diesel::select(diesel::dsl::sql::<Bool>(&format!(
        "(SELECT updated_at > '{after_later}'::timestamptz FROM users)"
    )))
    .get_result(&mut other)
    .unwrap();
    assert!(moved_on, "the last change moved updated_at back from {after_later}");
    assert!(order(&mut other));
}

/// What the trigger cannot stop, an INSERT that sets both times the wrong
/// way round, the checks refuse, on every table that has the two columns.
/// (An UPDATE cannot: the trigger stamps a change at or after the row's
/// creation, even one that moves `created_at`.)
#[test]
fn a_row_updated_before_it_was_created_is_refused_in_every_table() {
    let db = dployr_testkit::database();
    let mut conn = db.connect();
    let owner = user(&mut conn, 1);
    let cluster = cluster(&mut conn, 2, &owner);
    let member = user(&mut conn, 3);
    let instance = id(4);
    conn.batch_execute(&format!(
        "INSERT INTO instances (id, cluster_id, address, tag) VALUES ('{instance}', '{cluster}', '10.0.0.1', 'a')"
    ))
    .unwrap();
    let backwards = "now(), now() - interval '1 second'";
    let cases = [
        (
            "users_updated_at_check",
            format!(
                "INSERT INTO users (id, email, name, provider, created_at, updated_at) \
                 VALUES ('{}', 'b@example.com', 'B', 'email', {backwards})",
                id(5)
            ),
        ),
        (
            "clusters_updated_at_check",
            format!("INSERT INTO clusters (id, name, created_at, updated_at) VALUES ('{}', 'c', {backwards})", id(6)),
        ),
        (
            "user_clusters_updated_at_check",
            format!(
                "INSERT INTO user_clusters (user_id, cluster_id, role, created_at, updated_at) \
                 VALUES ('{member}', '{cluster}', 'viewer', {backwards})"
            ),
        ),
        (
            "instances_updated_at_check",
            format!(
                "INSERT INTO instances (id, cluster_id, address, tag, created_at, updated_at) \
                 VALUES ('{}', '{cluster}', '10.0.0.2', 'b', {backwards})",
                id(7)
            ),
        ),
        (
            "bootstrap_tokens_updated_at_check",
            format!(
                "INSERT INTO bootstrap_tokens (nonce, instance_id, created_at, updated_at) \
                 VALUES ('n', '{instance}', {backwards})"
            ),
        ),
        (
            "kv_entries_updated_at_check",
            format!("INSERT INTO kv_entries (key, value, created_at, updated_at) VALUES ('k', '', {backwards})"),
        ),
    ];
    for (constraint, sql) in cases {
        let (kind, name) = refusal(diesel::sql_query(&sql).execute(&mut conn));
        assert_eq!((kind, name.as_str()), (DatabaseErrorKind::CheckViolation, constraint), "{sql}");
    }
    // Moving the creation after the last change lifts the change with it.
    conn.batch_execute("UPDATE users SET created_at = now() + interval '1 hour'").unwrap();
    assert_eq!(count(&mut conn, "SELECT count(*) FROM users WHERE updated_at < created_at"), 0);
}

#[test]
fn every_foreign_key_is_backed_by_an_index() {
    let db = dployr_testkit::database();
    let mut conn = db.connect();
    // A foreign key whose columns are not the leading columns of some index
    // makes every cascade and every join from the parent a sequential scan.
    let unindexed: Vec<String> = diesel::dsl::sql::<Text>(
        "SELECT c.conrelid::regclass || '.' || c.conname
           FROM pg_constraint c
          WHERE c.contype = 'f'
            AND c.connamespace = 'public'::regnamespace
            AND NOT EXISTS (
                SELECT 1 FROM pg_index i
                 WHERE i.indrelid = c.conrelid
                   AND (i.indkey::int2[])[0:cardinality(c.conkey) - 1] @> c.conkey
                   AND (i.indkey::int2[])[0:cardinality(c.conkey) - 1] <@ c.conkey)
          ORDER BY 1",
    )
    .load(&mut conn)
    .unwrap();
    assert_eq!(unindexed, Vec::<String>::new());
}

/// Runs `sql` as one simple query (several statements, as psql sends a line).
fn session(conn: &mut PgConnection, sql: &str) -> QueryResult<()> {
    conn.batch_execute(sql)
}

fn owners_of(conn: &mut PgConnection, cluster: &str) -> Vec<String> {
    diesel::dsl::sql::<Text>(&format!(
        "SELECT user_id FROM user_clusters WHERE cluster_id = '{cluster}' AND role = 'owner' ORDER BY user_id"
    ))
    .load(conn)
    .unwrap()
}

#[test]
fn a_sql_session_cannot_delete_or_demote_the_only_owner_of_a_live_cluster() {
    let db = dployr_testkit::database();
    let mut conn = db.connect();
    let (o, x) = (user(&mut conn, 1), user(&mut conn, 2));
    let c = cluster(&mut conn, 10, &o);
    member(&mut conn, &x, &c, "admin").unwrap();
    let refused = |conn: &mut PgConnection, sql: &str, expected: &str| {
        let (_, constraint) = refusal(session(conn, sql));
        assert_eq!(constraint, expected, "{sql}");
        // A refused transaction block stays aborted until rolled back, as in psql.
        session(conn, "ROLLBACK").unwrap();
        // Whatever was refused, the owner is still there.
        assert_eq!(owners_of(conn, &c), [o.as_str()], "{sql}");
    };
    // Deleting the owner's membership, directly or through the user: at once.
    refused(
        &mut conn,
        &format!("DELETE FROM user_clusters WHERE cluster_id = '{c}' AND role = 'owner'"),
        "user_clusters_owner_kept",
    );
    refused(&mut conn, &format!("DELETE FROM user_clusters WHERE cluster_id = '{c}'"), "user_clusters_owner_kept");
    refused(&mut conn, &format!("DELETE FROM users WHERE id = '{o}'"), "user_clusters_owner_kept");
    refused(&mut conn, "BEGIN; DELETE FROM users; COMMIT;", "user_clusters_owner_kept");
    // Demoting or moving the owner without a promotion: at commit.
    refused(
        &mut conn,
        &format!("UPDATE user_clusters SET role = 'admin' WHERE cluster_id = '{c}' AND role = 'owner'"),
        "clusters_have_an_owner",
    );
    refused(
        &mut conn,
        &format!(
            "BEGIN; UPDATE user_clusters SET role = 'viewer' WHERE user_id = '{o}'; UPDATE user_clusters SET role = 'developer' WHERE user_id = '{x}'; COMMIT;"
        ),
        "clusters_have_an_owner",
    );
    refused(
        &mut conn,
        &format!("UPDATE user_clusters SET user_id = '{x}' WHERE user_id = '{o}'"),
        "user_clusters_pkey",
    );
    let other_owner = user(&mut conn, 3);
    let other = cluster(&mut conn, 11, &other_owner);
    refused(
        &mut conn,
        &format!(
            "UPDATE user_clusters SET cluster_id = '{other}', role = 'admin' WHERE user_id = '{o}' AND cluster_id = '{c}'"
        ),
        "clusters_have_an_owner",
    );
    // Deferring the check to the end of the transaction does not skip it.
    refused(
        &mut conn,
        &format!(
            "BEGIN; SET CONSTRAINTS ALL IMMEDIATE; UPDATE user_clusters SET role = 'admin' WHERE user_id = '{o}' AND cluster_id = '{c}'; COMMIT;"
        ),
        "clusters_have_an_owner",
    );
    // A cluster created without its owner: at commit.
    let (_, constraint) =
        refusal(session(&mut conn, &format!("INSERT INTO clusters (id, name) VALUES ('{}', 'orphan')", id(12))));
    assert_eq!(constraint, "clusters_created_with_an_owner");
    assert_eq!(count(&mut conn, "SELECT count(*) FROM clusters"), 2);

    // A demotion paired with a promotion in one transaction is a transfer: accepted.
    session(
        &mut conn,
        &format!("BEGIN; UPDATE user_clusters SET role = 'admin' WHERE user_id = '{o}' AND cluster_id = '{c}'; UPDATE user_clusters SET role = 'owner' WHERE user_id = '{x}' AND cluster_id = '{c}'; COMMIT;"),
    )
    .unwrap();
    assert_eq!(owners_of(&mut conn, &c), [x.as_str()]);
    // The former owner may now go; and deleting the cluster takes its owner with it.
    session(&mut conn, &format!("DELETE FROM users WHERE id = '{o}'")).unwrap();
    session(&mut conn, &format!("DELETE FROM clusters WHERE id = '{c}'")).unwrap();
    assert_eq!(count(&mut conn, &format!("SELECT count(*) FROM user_clusters WHERE cluster_id = '{c}'")), 0);
    session(&mut conn, &format!("DELETE FROM users WHERE id = '{x}'")).unwrap();
}

/// The error a refused statement of a SQL session gives.
fn refused_with(conn: &mut PgConnection, sql: &str) -> String {
    match session(conn, sql) {
        Err(error) => error.to_string(),
        Ok(()) => panic!("{sql} was not refused"),
    }
}

#[test]
fn truncating_memberships_or_totals_while_a_cluster_remains_is_refused() {
    let db = dployr_testkit::database();
    let mut conn = db.connect();
    let (o, x) = (user(&mut conn, 1), user(&mut conn, 2));
    let c = cluster(&mut conn, 10, &o);
    member(&mut conn, &x, &c, "invited").unwrap();
    for sql in ["TRUNCATE user_clusters", "TRUNCATE cluster_counts", "TRUNCATE users CASCADE"] {
        let error = refused_with(&mut conn, sql);
        assert!(error.contains("would leave clusters without their"), "{sql}: {error}");
    }
    assert_eq!(owners_of(&mut conn, &c), [o]);
    assert_eq!(count(&mut conn, "SELECT members + invites FROM cluster_counts"), 2);
    // Everything at once is an empty schema, not a broken one.
    session(&mut conn, "TRUNCATE clusters, users CASCADE").unwrap();
    assert_eq!(count(&mut conn, "SELECT count(*) FROM user_clusters"), 0);
    assert_eq!(count(&mut conn, "SELECT count(*) FROM cluster_counts"), 0);
}

#[test]
fn truncating_instances_leaves_every_instance_total_at_zero() {
    let db = dployr_testkit::database();
    let mut conn = db.connect();
    let o = user(&mut conn, 1);
    let c = cluster(&mut conn, 10, &o);
    session(
        &mut conn,
        &format!(
            "INSERT INTO instances (id, cluster_id, address, tag) VALUES ('{}', '{c}', 'h1', 't1'), ('{}', '{c}', 'h2', 't2')",
            id(20),
            id(21)
        ),
    )
    .unwrap();
    assert_eq!(count(&mut conn, "SELECT instances FROM cluster_counts"), 2);
    session(&mut conn, "TRUNCATE instances CASCADE").unwrap();
    assert_eq!(count(&mut conn, "SELECT instances FROM cluster_counts"), 0);
}

#[test]
fn a_membership_given_to_another_user_takes_that_users_profile() {
    let db = dployr_testkit::database();
    let mut conn = db.connect();
    let (o, x, y) = (user(&mut conn, 1), user(&mut conn, 2), user(&mut conn, 3));
    let c = cluster(&mut conn, 10, &o);
    member(&mut conn, &x, &c, "viewer").unwrap();
    session(&mut conn, &format!("UPDATE user_clusters SET user_id = '{y}' WHERE user_id = '{x}'")).unwrap();
    let copy: (String, String) = diesel::dsl::sql::<(Text, Text)>(&format!(
        "SELECT email, name FROM user_clusters WHERE user_id = '{y}' AND cluster_id = '{c}'"
    ))
    .get_result(&mut conn)
    .unwrap();
    assert_eq!(copy, ("user3@example.com".to_owned(), "User 3".to_owned()));
    // A copy changed by hand is taken again from the user.
    session(&mut conn, &format!("UPDATE user_clusters SET email = 'zzz@example.com' WHERE user_id = '{y}'")).unwrap();
    let email: String = diesel::dsl::sql::<Text>(&format!(
        "SELECT email FROM user_clusters WHERE user_id = '{y}' AND cluster_id = '{c}'"
    ))
    .get_result(&mut conn)
    .unwrap();
    assert_eq!(email, "user3@example.com");
}

#[test]
fn migrating_a_database_with_an_id_past_the_largest_ulid_names_it() {
    let db = dployr_testkit::empty_database();
    let runner = dployr_migrate::MigrationRunner::new(db.url(), dployr_migrate::MigrationSet::embedded().unwrap());
    runner.run_pending(&mut |_| {}).unwrap();
    runner.revert_to(Some("009"), &mut |_| {}).unwrap();
    let mut conn = db.connect();
    session(&mut conn, "INSERT INTO users (id, email, name, provider) VALUES ('8ZZZZZZZZZZZZZZZZZZZZZZZZZ', 'p@example.com', 'P', 'email')")
        .unwrap();
    let error = runner.run_pending(&mut |_| {}).unwrap_err().to_string();
    assert!(error.contains("user 8ZZZZZZZZZZZZZZZZZZZZZZZZZ"), "{error}");
}

#[test]
fn an_id_past_the_largest_ulid_is_refused_in_every_table_with_one() {
    let db = dployr_testkit::database();
    let mut conn = db.connect();
    let o = user(&mut conn, 1);
    let c = cluster(&mut conn, 10, &o);
    let past = "80000000000000000000000000";
    for (sql, constraint) in [
        (
            format!("INSERT INTO users (id, email, name, provider) VALUES ('{past}', 'p@example.com', 'P', 'email')"),
            "users_id_check",
        ),
        (format!("INSERT INTO clusters (id, name) VALUES ('{past}', 'p')"), "clusters_id_check"),
        (
            format!("INSERT INTO instances (id, cluster_id, address, tag) VALUES ('{past}', '{c}', 'h', 't')"),
            "instances_id_check",
        ),
    ] {
        let (kind, name) = refusal(session(&mut conn, &sql));
        assert_eq!((kind, name.as_str()), (DatabaseErrorKind::CheckViolation, constraint), "{sql}");
    }
    // The largest ULID is an id.
    session(&mut conn, "INSERT INTO users (id, email, name, provider) VALUES ('7ZZZZZZZZZZZZZZZZZZZZZZZZZ', 'z@example.com', 'Z', 'email')")
        .unwrap();
}

#[test]
fn a_blank_picture_is_refused_for_users_and_their_membership_copies() {
    let db = dployr_testkit::database();
    let mut conn = db.connect();
    let o = user(&mut conn, 1);
    let c = cluster(&mut conn, 10, &o);
    for picture in ["", "   "] {
        let error = refused_with(&mut conn, &format!("UPDATE users SET picture = '{picture}' WHERE id = '{o}'"));
        assert!(error.contains("users_picture_check"), "{picture:?}: {error}");
        // A copy differing from its user is refused first (013); the check
        // stays for what bypasses triggers.
        let (_, name) = refusal(session(
            &mut conn,
            &format!("UPDATE user_clusters SET picture = '{picture}' WHERE user_id = '{o}' AND cluster_id = '{c}'"),
        ));
        assert!(
            name == "user_clusters_picture_check" || name == "user_clusters_profile_is_a_copy",
            "{picture:?}: {name}"
        );
    }
    session(&mut conn, &format!("UPDATE users SET picture = 'https://img.example/1.png' WHERE id = '{o}'")).unwrap();
    session(&mut conn, &format!("UPDATE users SET picture = NULL WHERE id = '{o}'")).unwrap();
}

#[test]
fn a_used_bootstrap_token_stays_used_and_can_still_be_deleted() {
    let db = dployr_testkit::database();
    let mut conn = db.connect();
    let o = user(&mut conn, 1);
    let c = cluster(&mut conn, 10, &o);
    let instance = id(20);
    session(
        &mut conn,
        &format!(
            "INSERT INTO instances (id, cluster_id, address, tag) VALUES ('{instance}', '{c}', 'h1', 't1');
             INSERT INTO bootstrap_tokens (nonce, instance_id) VALUES ('n1', '{instance}');"
        ),
    )
    .unwrap();
    // Unused: it may be used (set once), and a no-op update passes.
    session(&mut conn, "UPDATE bootstrap_tokens SET used_at = now() WHERE nonce = 'n1'").unwrap();
    session(&mut conn, "UPDATE bootstrap_tokens SET used_at = used_at WHERE nonce = 'n1'").unwrap();
    for sql in [
        "UPDATE bootstrap_tokens SET used_at = NULL WHERE nonce = 'n1'",
        "UPDATE bootstrap_tokens SET used_at = used_at + interval '1 second' WHERE nonce = 'n1'",
    ] {
        let error = refused_with(&mut conn, sql);
        assert!(error.contains("stays used"), "{sql}: {error}");
    }
    session(&mut conn, "DELETE FROM bootstrap_tokens WHERE nonce = 'n1'").unwrap();
}

/// The listing totals are the database's to keep: a hand-written write to
/// `cluster_counts` is refused (a total set wrong drove a later removal
/// below zero, after which nothing in the cluster could be removed), while
/// the counting triggers and the cascade of a cluster's deletion go on.
#[test]
fn listing_totals_cannot_be_written_by_hand_and_stay_counted_by_the_triggers() {
    let db = dployr_testkit::database();
    let mut conn = db.connect();
    let o = user(&mut conn, 1);
    let c = cluster(&mut conn, 10, &o);
    for sql in [
        format!("UPDATE cluster_counts SET members = 0 WHERE cluster_id = '{c}'"),
        format!("DELETE FROM cluster_counts WHERE cluster_id = '{c}'"),
        format!(
            "INSERT INTO cluster_counts (cluster_id) VALUES ('{c}') ON CONFLICT (cluster_id) DO UPDATE SET invites = 9"
        ),
    ] {
        let (_, name) = refusal(session(&mut conn, &sql));
        assert_eq!(name, "cluster_counts_kept_by_triggers", "{sql}");
    }
    let x = user(&mut conn, 2);
    member(&mut conn, &x, &c, "viewer").unwrap();
    assert_eq!(count(&mut conn, &format!("SELECT members FROM cluster_counts WHERE cluster_id = '{c}'")), 2);
    session(&mut conn, &format!("DELETE FROM clusters WHERE id = '{c}'")).unwrap();
    assert_eq!(count(&mut conn, &format!("SELECT count(*) FROM cluster_counts WHERE cluster_id = '{c}'")), 0);
}

/// A membership's name and picture are copies of its user's: a hand-written
/// change of the copy is refused, one equal to the user's passes, and a
/// change of the user still reaches every copy.
#[test]
fn a_membership_copy_of_the_profile_cannot_differ_from_its_user() {
    let db = dployr_testkit::database();
    let mut conn = db.connect();
    let o = user(&mut conn, 1);
    let c = cluster(&mut conn, 10, &o);
    for sql in [
        format!("UPDATE user_clusters SET name = 'Mallory' WHERE user_id = '{o}'"),
        format!("UPDATE user_clusters SET picture = 'https://evil.example/x.png' WHERE user_id = '{o}'"),
    ] {
        let (_, name) = refusal(session(&mut conn, &sql));
        assert_eq!(name, "user_clusters_profile_is_a_copy", "{sql}");
    }
    session(
        &mut conn,
        &format!("UPDATE user_clusters SET name = (SELECT name FROM users WHERE id = '{o}') WHERE user_id = '{o}'"),
    )
    .unwrap();
    session(
        &mut conn,
        &format!("UPDATE users SET name = 'Renamed', picture = 'https://img.example/2.png' WHERE id = '{o}'"),
    )
    .unwrap();
    assert_eq!(
        count(
            &mut conn,
            &format!(
                "SELECT count(*) FROM user_clusters WHERE cluster_id = '{c}' AND name = 'Renamed' \
                 AND picture = 'https://img.example/2.png'"
            )
        ),
        1
    );
}

/// Two instances of one cluster (and its owner), for the tokens' tests.
fn two_instances(conn: &mut PgConnection) -> (String, String) {
    let o = user(conn, 1);
    let c = cluster(conn, 10, &o);
    let (i1, i2) = (id(20), id(21));
    session(
        conn,
        &format!(
            "INSERT INTO instances (id, cluster_id, address, tag) VALUES ('{i1}', '{c}', 'h1', 't1'), ('{i2}', '{c}', 'h2', 't2')"
        ),
    )
    .unwrap();
    (i1, i2)
}

/// A used token's nonce is spent for good: it stays remembered when the
/// token goes (a delete, its instance's cascade, a TRUNCATE), no token is
/// made or renamed with it again, and a used token keeps its nonce.
#[test]
fn a_spent_nonce_is_never_given_to_another_token_whatever_removed_the_first() {
    let db = dployr_testkit::database();
    let mut conn = db.connect();
    let (i1, i2) = two_instances(&mut conn);
    session(
        &mut conn,
        &format!(
            "INSERT INTO bootstrap_tokens (nonce, instance_id, used_at) VALUES
                 ('deleted', '{i1}', now()), ('cascaded', '{i1}', now()), ('truncated', '{i2}', now()), ('renamed', '{i2}', now());
             INSERT INTO bootstrap_tokens (nonce, instance_id) VALUES ('free', '{i2}');"
        ),
    )
    .unwrap();
    let (_, name) =
        refusal(session(&mut conn, "UPDATE bootstrap_tokens SET nonce = 'renamed-2' WHERE nonce = 'renamed'"));
    assert_eq!(name, "bootstrap_tokens_used_keep_nonce");
    session(&mut conn, "DELETE FROM bootstrap_tokens WHERE nonce = 'deleted'").unwrap();
    session(&mut conn, &format!("DELETE FROM instances WHERE id = '{i1}'")).unwrap();
    session(&mut conn, "TRUNCATE bootstrap_tokens").unwrap();
    for nonce in ["deleted", "cascaded", "truncated", "renamed"] {
        let sql = format!("INSERT INTO bootstrap_tokens (nonce, instance_id) VALUES ('{nonce}', '{i2}')");
        let (kind, name) = refusal(session(&mut conn, &sql));
        assert_eq!((kind, name.as_str()), (DatabaseErrorKind::UniqueViolation, "bootstrap_tokens_nonce_not_spent"));
    }
    session(&mut conn, &format!("INSERT INTO bootstrap_tokens (nonce, instance_id) VALUES ('free', '{i2}')")).unwrap();
    let (_, name) = refusal(session(&mut conn, "UPDATE bootstrap_tokens SET nonce = 'deleted' WHERE nonce = 'free'"));
    assert_eq!(name, "bootstrap_tokens_nonce_not_spent");
}

/// A token made with a nonce while the used token holding it is being
/// deleted waits for that delete (on the token's primary key) and is
/// refused when it commits: the remembered nonces are looked at after the
/// new rows are in (a check before the insert ran before the wait, saw
/// nothing yet, and the nonce was taken).
#[test]
fn a_token_made_while_the_used_one_with_its_nonce_is_deleted_is_refused() {
    let db = dployr_testkit::database();
    let mut conn = db.connect();
    let (i1, i2) = two_instances(&mut conn);
    session(
        &mut conn,
        &format!("INSERT INTO bootstrap_tokens (nonce, instance_id, used_at) VALUES ('raced', '{i1}', now())"),
    )
    .unwrap();
    session(&mut conn, &format!("BEGIN; DELETE FROM instances WHERE id = '{i1}'")).unwrap();
    let (sent, made) = mpsc::channel();
    let url = db.url().to_owned();
    let maker = thread::spawn(move || {
        let mut other = PgConnection::establish(&url).unwrap();
        sent.send(()).unwrap();
        session(&mut other, &format!("INSERT INTO bootstrap_tokens (nonce, instance_id) VALUES ('raced', '{i2}')"))
    });
    made.recv().unwrap();
    thread::sleep(Duration::from_millis(300));
    assert!(!maker.is_finished(), "the creation did not wait for the delete");
    session(&mut conn, "COMMIT").unwrap();
    let (_, name) = refusal(maker.join().unwrap());
    assert_eq!(name, "bootstrap_tokens_nonce_not_spent");
}

/// Waits until the session with backend process id `pid` waits for a lock
/// (the transaction another session holds open), so that a race is run in
/// one order every time, without a guessed sleep.
fn wait_until_blocked(conn: &mut PgConnection, pid: i32) {
    let waiting = format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {pid} AND wait_event_type = 'Lock'");
    for _ in 0..3000 {
        if count(conn, &waiting) == 1 {
            return;
        }
        thread::sleep(Duration::from_millis(10));
    }
    panic!("session {pid} never waited for the lock");
}

/// The backend process id of a session.
fn backend_pid(conn: &mut PgConnection) -> i32 {
    diesel::select(diesel::dsl::sql::<diesel::sql_types::Integer>("pg_backend_pid()")).get_result(conn).unwrap()
}

/// Commits the transaction open on `holder` once the session `pid` (the
/// racer's) waits for its lock, and checks that the racer was refused the
/// spent nonce and that no token holds one.
fn commit_once_blocked_and_see_the_nonce_refused(
    db: &dployr_testkit::TestDatabase,
    holder: &mut PgConnection,
    pid: i32,
    racer: thread::JoinHandle<QueryResult<()>>,
) {
    let mut watcher = db.connect();
    wait_until_blocked(&mut watcher, pid);
    session(holder, "COMMIT").unwrap();
    let (kind, name) = refusal(racer.join().unwrap());
    assert_eq!((kind, name.as_str()), (DatabaseErrorKind::UniqueViolation, "bootstrap_tokens_nonce_not_spent"));
    assert_eq!(tokens_holding_spent_nonces(holder), 0);
}

/// Whether a token holds a spent nonce (`mark_used` would be true for it a
/// second time), and which.
fn tokens_holding_spent_nonces(conn: &mut PgConnection) -> i64 {
    count(conn, "SELECT count(*) FROM bootstrap_tokens JOIN spent_nonces USING (nonce)")
}

/// One statement that deletes a used token and gives its nonce to another
/// token (renamed, or made) is refused: before `021_spent_nonces_guarded`
/// the rename's check ran before the delete's statement trigger remembered
/// the nonce, and the nonce was both spent and held by an unused token.
#[test]
fn a_nonce_spent_and_given_to_another_token_in_one_statement_is_refused() {
    let db = dployr_testkit::database();
    let mut conn = db.connect();
    let (i1, i2) = two_instances(&mut conn);
    session(
        &mut conn,
        &format!(
            "INSERT INTO bootstrap_tokens (nonce, instance_id) VALUES ('boot-once', '{i1}'), ('boot-free', '{i2}');
             UPDATE bootstrap_tokens SET used_at = now() WHERE nonce = 'boot-once';"
        ),
    )
    .unwrap();
    for sql in [
        "WITH spent AS (DELETE FROM bootstrap_tokens WHERE nonce = 'boot-once' RETURNING nonce)
         UPDATE bootstrap_tokens AS t SET nonce = spent.nonce FROM spent WHERE t.nonce = 'boot-free'"
            .to_owned(),
        format!(
            "WITH spent AS (DELETE FROM bootstrap_tokens WHERE nonce = 'boot-once' RETURNING nonce)
             INSERT INTO bootstrap_tokens (nonce, instance_id) SELECT nonce, '{i2}' FROM spent"
        ),
    ] {
        let (kind, name) = refusal(session(&mut conn, &sql));
        assert_eq!((kind, name.as_str()), (DatabaseErrorKind::UniqueViolation, "bootstrap_tokens_nonce_not_spent"));
    }
    assert_eq!(tokens_holding_spent_nonces(&mut conn), 0);
    assert_eq!(count(&mut conn, "SELECT count(*) FROM bootstrap_tokens WHERE used_at IS NOT NULL"), 1);
    // Deleting the used token alone still remembers its nonce.
    session(&mut conn, "DELETE FROM bootstrap_tokens WHERE nonce = 'boot-once'").unwrap();
    assert_eq!(text(&mut conn, "SELECT string_agg(nonce, ',') FROM spent_nonces"), "boot-once");
}

/// A rename racing (READ COMMITTED) the delete of the used token holding
/// the new nonce waits for that delete on the primary key, and is refused
/// when it commits: the remembered nonces are looked for after the wait, by
/// the unique index of `spent_nonces` (before `021_spent_nonces_guarded` the
/// check ran before the wait, saw nothing yet, and the rename committed).
#[test]
fn a_token_renamed_while_the_used_one_with_that_nonce_is_deleted_is_refused() {
    let db = dployr_testkit::database();
    let mut conn = db.connect();
    let (i1, i2) = two_instances(&mut conn);
    session(
        &mut conn,
        &format!(
            "INSERT INTO bootstrap_tokens (nonce, instance_id, used_at) VALUES ('raced', '{i1}', now());
             INSERT INTO bootstrap_tokens (nonce, instance_id) VALUES ('unused', '{i2}');"
        ),
    )
    .unwrap();
    session(&mut conn, "BEGIN; DELETE FROM bootstrap_tokens WHERE nonce = 'raced'").unwrap();
    let (sent, started) = mpsc::channel();
    let url = db.url().to_owned();
    let renamer = thread::spawn(move || {
        let mut other = PgConnection::establish(&url).unwrap();
        sent.send(backend_pid(&mut other)).unwrap();
        session(&mut other, "UPDATE bootstrap_tokens SET nonce = 'raced' WHERE nonce = 'unused'")
    });
    commit_once_blocked_and_see_the_nonce_refused(&db, &mut conn, started.recv().unwrap(), renamer);
    assert_eq!(count(&mut conn, "SELECT count(*) FROM bootstrap_tokens WHERE nonce = 'unused'"), 1);
}

/// A token made by a REPEATABLE READ transaction whose snapshot predates
/// the delete of the used token holding its nonce is refused once that
/// delete commits: the snapshot cannot show the nonce remembered, the
/// unique index of `spent_nonces` does (before `021_spent_nonces_guarded`
/// the check read `spent_nonces` with the old snapshot and let it through).
#[test]
fn a_token_made_under_repeatable_read_while_the_used_one_with_its_nonce_is_deleted_is_refused() {
    let db = dployr_testkit::database();
    let mut conn = db.connect();
    let (i1, i2) = two_instances(&mut conn);
    session(
        &mut conn,
        &format!("INSERT INTO bootstrap_tokens (nonce, instance_id, used_at) VALUES ('rr-raced', '{i1}', now())"),
    )
    .unwrap();
    let mut maker = db.connect();
    let pid = backend_pid(&mut maker);
    // The snapshot is taken before the delete commits (here: before it starts).
    session(&mut maker, "BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM spent_nonces").unwrap();
    session(&mut conn, "BEGIN; DELETE FROM bootstrap_tokens WHERE nonce = 'rr-raced'").unwrap();
    let making = thread::spawn(move || {
        let made = session(
            &mut maker,
            &format!("INSERT INTO bootstrap_tokens (nonce, instance_id) VALUES ('rr-raced', '{i2}')"),
        );
        let ended = session(&mut maker, if made.is_ok() { "COMMIT" } else { "ROLLBACK" });
        made.and(ended)
    });
    commit_once_blocked_and_see_the_nonce_refused(&db, &mut conn, pid, making);
    assert_eq!(count(&mut conn, "SELECT count(*) FROM bootstrap_tokens"), 0);
}

/// The spent nonces are the database's to keep: a hand-written DELETE,
/// UPDATE or TRUNCATE of `spent_nonces` is refused (each let a nonce be
/// issued and used again), while the tokens' own triggers still remember
/// what a delete, an instance's cascade or a TRUNCATE (cascading from
/// instances too) removes, and an INSERT by hand still adds one.
#[test]
fn spent_nonces_cannot_be_forgotten_by_hand_and_stay_remembered_by_the_triggers() {
    let db = dployr_testkit::database();
    let mut conn = db.connect();
    let (i1, i2) = two_instances(&mut conn);
    session(
        &mut conn,
        &format!(
            "INSERT INTO bootstrap_tokens (nonce, instance_id, used_at) VALUES
                 ('deleted', '{i1}', now()), ('cascaded', '{i1}', now()), ('truncated', '{i2}', now());
             DELETE FROM bootstrap_tokens WHERE nonce = 'deleted';
             DELETE FROM instances WHERE id = '{i1}';
             TRUNCATE bootstrap_tokens;
             INSERT INTO spent_nonces (nonce, used_at) VALUES ('by-hand', now());"
        ),
    )
    .unwrap();
    let remembered = "SELECT string_agg(nonce, ',' ORDER BY nonce) FROM spent_nonces";
    assert_eq!(text(&mut conn, remembered), "by-hand,cascaded,deleted,truncated");
    for sql in [
        "DELETE FROM spent_nonces WHERE nonce = 'deleted'",
        "UPDATE spent_nonces SET nonce = 'something-else' WHERE nonce = 'cascaded'",
        "TRUNCATE spent_nonces",
    ] {
        let (_, name) = refusal(session(&mut conn, sql));
        assert_eq!(name, "spent_nonces_kept_by_triggers", "{sql}");
    }
    assert_eq!(text(&mut conn, remembered), "by-hand,cascaded,deleted,truncated");
    session(
        &mut conn,
        &format!(
            "INSERT INTO bootstrap_tokens (nonce, instance_id, used_at) VALUES ('with-instances', '{i2}', now());
             TRUNCATE instances CASCADE;"
        ),
    )
    .unwrap();
    assert_eq!(count(&mut conn, "SELECT count(*) FROM spent_nonces WHERE nonce = 'with-instances'"), 1);
}

/// A token is not used before it was made, nor an account signed in to
/// before it was made: times set so by hand are refused
/// (`021_spent_nonces_guarded`). The stores' writes never are, also when
/// the clock stood behind the creation (stepped back, as NTP may):
/// `mark_used` is stamped with the creation then, as `users.upsert`
/// already stamps a first sign-in.
#[test]
fn a_use_or_first_sign_in_before_creation_is_refused_but_never_a_stores_write() {
    use dployr_data::{BootstrapTokenStore as _, Config, DataLayer, Email, NewUser, Nonce, Provider, UserStore as _};

    let db = dployr_testkit::database();
    let mut conn = db.connect();
    let (i1, _) = two_instances(&mut conn);
    session(
        &mut conn,
        &format!(
            "INSERT INTO bootstrap_tokens (nonce, instance_id) VALUES ('early', '{i1}');
             INSERT INTO users (id, email, name, provider) VALUES ('{}', 'guest@example.io', 'Guest', 'email');",
            id(30)
        ),
    )
    .unwrap();
    for (sql, constraint) in [
        (
            "UPDATE bootstrap_tokens SET used_at = created_at - interval '1 year' WHERE nonce = 'early'".to_owned(),
            "bootstrap_tokens_used_at_check",
        ),
        (
            format!(
                "INSERT INTO bootstrap_tokens (nonce, instance_id, used_at) VALUES ('late', '{i1}', now() - interval '1 second')"
            ),
            "bootstrap_tokens_used_at_check",
        ),
        (
            "UPDATE users SET first_signed_in_at = created_at - interval '1 year' WHERE email = 'guest@example.io'"
                .to_owned(),
            "users_first_signed_in_at_check",
        ),
        (
            format!(
                "INSERT INTO users (id, email, name, provider, first_signed_in_at) \
                 VALUES ('{}', 'early@example.io', 'E', 'github', now() - interval '1 second')",
                id(31)
            ),
            "users_first_signed_in_at_check",
        ),
    ] {
        let (kind, name) = refusal(session(&mut conn, &sql));
        assert_eq!((kind, name.as_str()), (DatabaseErrorKind::CheckViolation, constraint), "{sql}");
    }
    assert_eq!(count(&mut conn, "SELECT count(*) FROM bootstrap_tokens WHERE used_at IS NOT NULL"), 0);
    assert_eq!(count(&mut conn, "SELECT count(*) FROM users WHERE first_signed_in_at < created_at"), 0);

    // A token and an invitee made a minute "later" than the clock now reads.
    session(
        &mut conn,
        "UPDATE bootstrap_tokens SET created_at = now() + interval '1 minute' WHERE nonce = 'early';
         UPDATE users SET created_at = now() + interval '1 minute' WHERE email = 'guest@example.io';",
    )
    .unwrap();
    let data = DataLayer::open(Config::new(db.url())).unwrap();
    assert!(data.bootstrap_tokens().mark_used(&Nonce::parse("early").unwrap()).unwrap());
    data.users().upsert(NewUser::new(Email::parse("guest@example.io").unwrap(), Provider::Email)).unwrap();
    assert_eq!(count(&mut conn, "SELECT count(*) FROM bootstrap_tokens WHERE used_at = created_at"), 1);
    let guest = "SELECT count(*) FROM users WHERE email = 'guest@example.io' AND first_signed_in_at = created_at";
    assert_eq!(count(&mut conn, guest), 1);
}
