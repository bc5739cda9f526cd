//! Migrations that change stored rows, run over rows of the schema before
//! them: `003_email_identity` (stored addresses brought to `Email`'s rule,
//! refused, naming the ids, when two rows would become one address or a
//! domain needs IDNA, and the SQL rule checked against the Rust one on a
//! corpus), `011_blank_pictures_and_spent_tokens` (blank pictures become
//! none, in the memberships' copies too, and a copy blanked by hand takes
//! its user's picture again) and `016_first_sign_in` (accounts that show
//! a sign-in are marked as signed in, invitees are not), and `018` (a row
//! written by hand that the stores cannot read stops it, named).

#![cfg(test)]

use std::path::Path;

use diesel::connection::SimpleConnection as _;
use diesel::prelude::*;
use diesel::sql_types::{Nullable, Text};
use dployr_domain::Email;
use dployr_migrate::{MigrationRunner, MigrationSet};
use dployr_testkit::{TestDatabase, empty_database};

/// The workspace's migrations before `first_left_out` (a version, `003`),
/// as a set of their own.
fn migrations_before(first_left_out: &str) -> (tempfile::TempDir, MigrationSet) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../migrations");
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&root).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.as_str() >= first_left_out {
            continue;
        }
        std::fs::create_dir_all(dir.path().join(&name)).unwrap();
        for file in std::fs::read_dir(entry.path()).unwrap() {
            let file = file.unwrap();
            std::fs::copy(file.path(), dir.path().join(&name).join(file.file_name())).unwrap();
        }
    }
    let set = MigrationSet::from_dir(dir.path()).unwrap();
    (dir, set)
}

fn run(db: &TestDatabase, set: MigrationSet) -> Result<Vec<String>, String> {
    MigrationRunner::new(db.url(), set)
        .run_pending(&mut |_| {})
        .map(|applied| applied.into_iter().map(|m| m.name).collect())
        .map_err(|error| format!("{error} {error:?}"))
}

/// Every migration of the workspace.
fn all_migrations() -> MigrationSet {
    MigrationSet::from_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("../migrations")).unwrap()
}

/// Runs `statements` in one transaction: a cluster must have its owner
/// when it commits (002).
fn in_one_transaction(conn: &mut PgConnection, statements: &[&str]) {
    conn.transaction::<_, diesel::result::Error, _>(|conn| {
        statements.iter().try_for_each(|sql| diesel::sql_query(*sql).execute(conn).map(drop))
    })
    .unwrap();
}

/// A database at the schema before `003`, holding users with these stored
/// addresses (old rule: trimmed, lower-cased), each a member of one cluster
/// that the first one owns.
fn database_with(emails: &[(&str, &str)]) -> TestDatabase {
    let db = empty_database();
    let (_dir, set) = migrations_before("003");
    run(&db, set).unwrap();
    if emails.is_empty() {
        return db;
    }
    let mut conn = db.connect();
    // One transaction: a cluster must have its owner when it commits (002).
    conn.transaction::<_, diesel::result::Error, _>(|conn| {
        diesel::sql_query("INSERT INTO clusters (id, name) VALUES ('01J00000000000000000000000', 'acme')")
            .execute(conn)?;
        for (n, (id, email)) in emails.iter().enumerate() {
            diesel::sql_query("INSERT INTO users (id, email, name, provider) VALUES ($1, $2, 'n', 'google')")
                .bind::<Text, _>(id)
                .bind::<Text, _>(email)
                .execute(conn)?;
            diesel::sql_query(
                "INSERT INTO user_clusters (user_id, cluster_id, role) VALUES ($1, '01J00000000000000000000000', $2)",
            )
            .bind::<Text, _>(id)
            .bind::<Text, _>(if n == 0 { "owner" } else { "viewer" })
            .execute(conn)?;
        }
        Ok(())
    })
    .unwrap();
    db
}

#[derive(QueryableByName)]
struct Row {
    #[diesel(sql_type = Text)]
    id: String,
    #[diesel(sql_type = Text)]
    email: String,
    #[diesel(sql_type = Text)]
    member_email: String,
}

fn stored(db: &TestDatabase) -> Vec<(String, String)> {
    let rows: Vec<Row> = diesel::sql_query(
        "SELECT u.id, u.email, m.email AS member_email FROM users u JOIN user_clusters m ON m.user_id = u.id ORDER BY u.id",
    )
    .load(&mut db.connect())
    .unwrap();
    for row in &rows {
        assert_eq!(row.email, row.member_email, "the membership's copy follows");
    }
    rows.into_iter().map(|row| (row.id, row.email)).collect()
}

const A: &str = "01J0000000000000000000000A";
const B: &str = "01J0000000000000000000000B";
const C: &str = "01J0000000000000000000000C";

#[test]
fn stored_addresses_are_brought_to_the_new_form() {
    let db = database_with(&[(A, "cafe\u{301}@x.io"), (B, "dot@x.io."), (C, "plain+tag@x.io")]);
    let applied = run(&db, MigrationSet::embedded().unwrap()).unwrap();
    assert!(applied.contains(&"003_email_identity".to_owned()), "{applied:?}");
    let expected = [(A, "caf\u{e9}@x.io"), (B, "dot@x.io"), (C, "plain+tag@x.io")];
    assert_eq!(stored(&db), expected.map(|(id, email)| (id.to_owned(), email.to_owned())));
    // Each is now found by any spelling of its address.
    for (spelling, stored) in [("CAFE\u{301}@X.IO", "caf\u{e9}@x.io"), ("dot@x.io.", "dot@x.io")] {
        assert_eq!(Email::parse(spelling).unwrap().as_str(), stored);
    }
}

#[test]
fn two_rows_that_would_become_one_address_stop_the_migration_naming_both() {
    let db = database_with(&[(A, "caf\u{e9}@x.io"), (B, "cafe\u{301}@x.io"), (C, "dot@x.io.")]);
    let error = run(&db, MigrationSet::embedded().unwrap()).unwrap_err();
    assert!(error.contains(&format!("{A} and {B} become caf\u{e9}@x.io")), "{error}");
    // Nothing changed, 003 is not recorded, and a retry refuses again.
    let untouched = [(A, "caf\u{e9}@x.io"), (B, "cafe\u{301}@x.io"), (C, "dot@x.io.")];
    assert_eq!(stored(&db), untouched.map(|(id, email)| (id.to_owned(), email.to_owned())));
    assert!(run(&db, MigrationSet::embedded().unwrap()).is_err());
}

#[test]
fn a_domain_that_needs_idna_stops_the_migration_naming_the_row() {
    let db = database_with(&[(A, "user@b\u{fc}cher.de"), (B, "plain@x.io")]);
    let error = run(&db, MigrationSet::embedded().unwrap()).unwrap_err();
    assert!(error.contains(A) && error.contains("IDNA"), "{error}");
    assert!(!error.contains(B), "{error}");
}

/// On a corpus, for every address the Rust rule accepts: the SQL function
/// gives the same stored form from the old stored form (trimmed and
/// lower-cased), or NULL exactly when the domain is not ASCII.
#[test]
fn the_sql_rule_agrees_with_email_parse_on_a_corpus() {
    let db = database_with(&[]);
    run(&db, MigrationSet::embedded().unwrap()).unwrap();
    let mut conn = db.connect();
    let corpus = [
        "ada@example.io",
        "Ada@Example.IO",
        "  ada@example.io. ",
        "caf\u{e9}@x.io",
        "cafe\u{301}@x.io",
        "CAFE\u{301}@X.IO",
        "\u{212a}im@x.io",
        "\u{212b}ngstr\u{f6}m@x.io",
        "o\u{308}@x.io",
        "\u{3b1}\u{3c3}@x.gr",
        "\u{39f}\u{394}\u{3a5}\u{3a3}\u{3a3}\u{395}\u{3a5}\u{3a3}@x.gr",
        "user@b\u{fc}cher.de",
        "user@xn--bcher-kva.de",
        "user+tag@sub.example.co.uk",
        "a.b.c@x-y.io",
        "\u{65e5}\u{672c}@x.jp",
        "\u{1f980}@x.io",
        "user@\u{ff58}.io",
        "n\u{303}@x.es",
        "\u{f1}@x.es",
    ];
    let mut compared = 0;
    for raw in corpus {
        let Ok(email) = Email::parse(raw) else { continue };
        let old_form = raw.trim().to_lowercase();
        let sql: Option<String> = diesel::select(
            diesel::dsl::sql::<Nullable<Text>>("dployr_email_identity(").bind::<Text, _>(&old_form).sql(")"),
        )
        .get_result(&mut conn)
        .unwrap();
        let domain_is_ascii = old_form.rsplit_once('@').is_some_and(|(_, domain)| domain.is_ascii());
        if domain_is_ascii {
            assert_eq!(sql.as_deref(), Some(email.as_str()), "{raw:?}");
            compared += 1;
        } else {
            assert_eq!(sql, None, "{raw:?}: SQL cannot do IDNA and must say so");
        }
    }
    assert!(compared >= 15, "only {compared} addresses compared");
}

#[test]
fn blank_pictures_stored_before_011_become_none_and_blank_copies_take_the_users_picture() {
    let db = empty_database();
    let (_dir, set) = migrations_before("011");
    run(&db, set).unwrap();
    let mut conn = db.connect();
    in_one_transaction(
        &mut conn,
        &[
            "INSERT INTO users (id, email, name, provider, picture) VALUES
                 ('01J00000000000000000000001', 'a@example.io', 'A', 'google', ''),
                 ('01J00000000000000000000002', 'b@example.io', 'B', 'google', '   '),
                 ('01J00000000000000000000003', 'c@example.io', 'C', 'google', 'https://img.example/c.png')",
            "INSERT INTO clusters (id, name) VALUES ('01J00000000000000000000009', 'acme')",
            "INSERT INTO user_clusters (user_id, cluster_id, role) VALUES
                 ('01J00000000000000000000001', '01J00000000000000000000009', 'owner'),
                 ('01J00000000000000000000002', '01J00000000000000000000009', 'viewer'),
                 ('01J00000000000000000000003', '01J00000000000000000000009', 'viewer')",
        ],
    );
    // A copy blanked by hand beside the user's real picture.
    diesel::sql_query("UPDATE user_clusters SET picture = '' WHERE user_id = '01J00000000000000000000003'")
        .execute(&mut conn)
        .unwrap();
    let applied = run(&db, all_migrations()).unwrap();
    assert!(applied.iter().any(|name| name.starts_with("011")), "{applied:?}");
    let mut pictures =
        |sql: &str| -> Vec<Option<String>> { diesel::dsl::sql::<Nullable<Text>>(sql).load(&mut conn).unwrap() };
    let expected = vec![None, None, Some("https://img.example/c.png".to_owned())];
    assert_eq!(pictures("SELECT picture FROM users ORDER BY id"), expected);
    assert_eq!(pictures("SELECT picture FROM user_clusters ORDER BY user_id"), expected);
}

/// `016_first_sign_in` marks as signed in the accounts that show they did
/// (another provider; an e-mail account owning a cluster or holding a role
/// other than invited), keeps their `updated_at`, and leaves the e-mail
/// accounts that only hold invitations as invitees, which a removal from
/// their last cluster forgets as before.
#[test]
fn accounts_from_before_016_that_show_a_sign_in_are_marked_and_invitees_are_not() {
    let db = empty_database();
    let (_dir, set) = migrations_before("016");
    run(&db, set).unwrap();
    let mut conn = db.connect();
    in_one_transaction(
        &mut conn,
        &[
            "INSERT INTO users (id, email, name, provider, created_at, updated_at) VALUES
                 ('01J00000000000000000000001', 'owner@example.io', 'O', 'email', '2024-01-01Z', '2024-02-01Z'),
                 ('01J00000000000000000000002', 'viewer@example.io', 'V', 'email', '2024-01-02Z', '2024-02-02Z'),
                 ('01J00000000000000000000003', 'guest@example.io', 'G', 'email', '2024-01-03Z', '2024-02-03Z'),
                 ('01J00000000000000000000004', 'oauth@example.io', 'A', 'github', '2024-01-04Z', '2024-02-04Z'),
                 ('01J00000000000000000000005', 'alone@example.io', 'L', 'email', '2024-01-05Z', '2024-02-05Z')",
            "INSERT INTO clusters (id, name) VALUES ('01J00000000000000000000009', 'acme')",
            "INSERT INTO user_clusters (user_id, cluster_id, role) VALUES
                 ('01J00000000000000000000001', '01J00000000000000000000009', 'owner'),
                 ('01J00000000000000000000002', '01J00000000000000000000009', 'viewer'),
                 ('01J00000000000000000000003', '01J00000000000000000000009', 'invited')",
        ],
    );
    let applied = run(&db, all_migrations()).unwrap();
    assert!(applied.iter().any(|name| name.starts_with("016")), "{applied:?}");
    let rows: Vec<(String, Option<String>, String)> = diesel::dsl::sql::<(Text, Nullable<Text>, Text)>(
        "SELECT email, to_char(first_signed_in_at AT TIME ZONE 'UTC', 'YYYY-MM-DD'), \
         to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD') FROM users ORDER BY id",
    )
    .load(&mut conn)
    .unwrap();
    let day = |d: &str| Some(d.to_owned());
    assert_eq!(
        rows,
        [
            ("owner@example.io".to_owned(), day("2024-01-01"), "2024-02-01".to_owned()),
            ("viewer@example.io".to_owned(), day("2024-01-02"), "2024-02-02".to_owned()),
            ("guest@example.io".to_owned(), None, "2024-02-03".to_owned()),
            ("oauth@example.io".to_owned(), day("2024-01-04"), "2024-02-04".to_owned()),
            ("alone@example.io".to_owned(), None, "2024-02-05".to_owned()),
        ]
    );
    // Set once: not back to NULL, nor to another time, by hand.
    for sql in [
        "UPDATE users SET first_signed_in_at = NULL WHERE email = 'viewer@example.io'",
        "UPDATE users SET first_signed_in_at = now() WHERE email = 'viewer@example.io'",
    ] {
        let error = diesel::sql_query(sql).execute(&mut conn).unwrap_err().to_string();
        assert!(error.contains("is set once"), "{sql}: {error}");
    }
    diesel::sql_query("UPDATE users SET first_signed_in_at = now() WHERE email = 'guest@example.io'")
        .execute(&mut conn)
        .unwrap();
}

/// A row written by hand before `017_rows_the_stores_can_read` that the
/// stores cannot read (an instance created at 'infinity') stops `018`,
/// naming the check, the table and the query that finds it, with nothing of
/// 018 applied; once the row is changed, the migration goes through.
#[test]
fn a_row_the_stores_cannot_read_stops_018_naming_the_check_until_it_is_changed() {
    let db = empty_database();
    let (_dir, set) = migrations_before("017");
    run(&db, set).unwrap();
    let mut conn = db.connect();
    in_one_transaction(
        &mut conn,
        &[
            "INSERT INTO users (id, email, name, provider) VALUES ('01J00000000000000000000001', 'o@example.io', 'O', 'github')",
            "INSERT INTO clusters (id, name) VALUES ('01J00000000000000000000009', 'acme')",
            "INSERT INTO user_clusters (user_id, cluster_id, role) \
             VALUES ('01J00000000000000000000001', '01J00000000000000000000009', 'owner')",
            "INSERT INTO instances (id, cluster_id, address, tag, created_at, updated_at) \
             VALUES ('01J00000000000000000000020', '01J00000000000000000000009', '10.0.0.1', 'web', 'infinity', 'infinity')",
        ],
    );
    let error = run(&db, all_migrations()).unwrap_err();
    assert!(
        error.contains("018_rows_the_stores_can_read_validated")
            && error.contains("1 row(s) of instances fail the check instances_times_readable")
            && error.contains("SELECT * FROM instances WHERE NOT")
            && error.contains("instances_set_updated_at disabled"),
        "{error}"
    );
    let validated = "SELECT count(*) FROM pg_constraint WHERE conname = 'instances_times_readable' AND convalidated";
    let count = |conn: &mut PgConnection| -> i64 {
        diesel::select(diesel::dsl::sql::<diesel::sql_types::BigInt>(&format!("({validated})")))
            .get_result(conn)
            .unwrap()
    };
    assert_eq!(count(&mut conn), 0, "nothing of 018 applied");
    // As the hint says: the trigger would keep updated_at at 'infinity'.
    conn.batch_execute(
        "ALTER TABLE instances DISABLE TRIGGER instances_set_updated_at; \
         UPDATE instances SET created_at = '2024-01-01Z', updated_at = '2024-01-01Z'; \
         ALTER TABLE instances ENABLE TRIGGER instances_set_updated_at",
    )
    .unwrap();
    let applied = run(&db, all_migrations()).unwrap();
    assert!(applied.iter().any(|name| name.starts_with("018")), "{applied:?}");
    assert_eq!(count(&mut conn), 1);
}

/// A user whose metadata holds a number past a 64-bit float's range,
/// written by hand before 019: 020 stops naming the check, the table and
/// the query that finds it; once the number is changed, it goes through.
#[test]
fn a_number_the_stores_cannot_read_stops_020_naming_the_check_until_it_is_changed() {
    let db = empty_database();
    let (_dir, set) = migrations_before("019");
    run(&db, set).unwrap();
    let mut conn = db.connect();
    in_one_transaction(
        &mut conn,
        &["INSERT INTO users (id, email, name, provider, metadata) \
           VALUES ('01J00000000000000000000001', 'o@example.io', 'O', 'github', '{\"a\": {\"b\": [1e400]}}')"],
    );
    let error = run(&db, all_migrations()).unwrap_err();
    assert!(
        error.contains("020_metadata_numbers_readable_validated")
            && error.contains("1 row(s) of users fail the check users_metadata_numbers_readable")
            && error.contains("SELECT * FROM users WHERE NOT"),
        "{error}"
    );
    conn.batch_execute("UPDATE users SET metadata = '{\"a\": {\"b\": [\"1e400\"]}}'").unwrap();
    let applied = run(&db, all_migrations()).unwrap();
    assert!(applied.iter().any(|name| name.starts_with("020")), "{applied:?}");
    let validated =
        "SELECT count(*) FROM pg_constraint WHERE conname LIKE '%_metadata_numbers_readable' AND convalidated";
    let count: i64 = diesel::select(diesel::dsl::sql::<diesel::sql_types::BigInt>(&format!("({validated})")))
        .get_result(&mut conn)
        .unwrap();
    assert_eq!(count, 3);
}

/// A user whose metadata nests 110 levels, written by hand before 025
/// (017 took up to 127): 026 stops naming the check, the table and the
/// query that finds it; once the metadata nests less, it goes through and
/// the three checks are validated.
#[test]
fn metadata_nested_past_100_levels_stops_026_naming_the_check_until_it_is_changed() {
    let db = empty_database();
    let (_dir, set) = migrations_before("025");
    run(&db, set).unwrap();
    let mut conn = db.connect();
    let nested = |depth: usize| format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
    in_one_transaction(
        &mut conn,
        &[&format!(
            "INSERT INTO users (id, email, name, provider, metadata) VALUES ('01J00000000000000000000001', 'o@example.io', 'O', 'github', '{{\"a\": {}}}')",
            nested(109)
        )],
    );
    let error = run(&db, all_migrations()).unwrap_err();
    assert!(
        error.contains("026_metadata_nesting_with_room_validated")
            && error.contains(
                "1 row(s) of users hold metadata nested more than 100 levels (check users_metadata_readable)"
            )
            && error.contains("SELECT * FROM users WHERE NOT"),
        "{error}"
    );
    conn.batch_execute(&format!("UPDATE users SET metadata = '{{\"a\": {}}}'", nested(99))).unwrap();
    let applied = run(&db, all_migrations()).unwrap();
    assert!(applied.iter().any(|name| name.starts_with("026")), "{applied:?}");
    let validated = "SELECT count(*) FROM pg_constraint WHERE conname LIKE '%_metadata_readable' AND convalidated";
    let count: i64 = diesel::select(diesel::dsl::sql::<diesel::sql_types::BigInt>(&format!("({validated})")))
        .get_result(&mut conn)
        .unwrap();
    assert_eq!(count, 3);
}

/// Rows from before `021_spent_nonces_guarded` that break what it refuses:
/// `022` mends a token used before it was made (as the stores could stamp
/// one after a clock step: its use moved to its creation) and marks used a
/// token holding a spent nonce (it answered `mark_used` true a second
/// time); `023` stops on an account signed in to before it was made (only
/// hand-written SQL makes one), naming the check, the table and the query
/// that finds it, with nothing of it applied; mended as its hint says, it
/// goes through and both checks are validated.
#[test]
fn a_use_before_creation_is_mended_by_022_or_stops_023_naming_the_check() {
    let db = empty_database();
    let (_dir, set) = migrations_before("021");
    run(&db, set).unwrap();
    let mut conn = db.connect();
    in_one_transaction(
        &mut conn,
        &[
            "INSERT INTO users (id, email, name, provider, first_signed_in_at) \
             VALUES ('01J00000000000000000000001', 'o@example.io', 'O', 'github', '2000-01-01Z')",
            "INSERT INTO clusters (id, name) VALUES ('01J00000000000000000000009', 'acme')",
            "INSERT INTO user_clusters (user_id, cluster_id, role) \
             VALUES ('01J00000000000000000000001', '01J00000000000000000000009', 'owner')",
            "INSERT INTO instances (id, cluster_id, address, tag) \
             VALUES ('01J00000000000000000000020', '01J00000000000000000000009', '10.0.0.1', 'web')",
            "INSERT INTO bootstrap_tokens (nonce, instance_id, used_at) \
             VALUES ('boot-early', '01J00000000000000000000020', '2000-01-01Z')",
            // The statement 014 let through: the used token deleted and
            // its nonce given to an unused one, in one statement.
            "INSERT INTO bootstrap_tokens (nonce, instance_id, used_at) \
             VALUES ('boot-spent', '01J00000000000000000000020', now())",
            "INSERT INTO bootstrap_tokens (nonce, instance_id) VALUES ('boot-free', '01J00000000000000000000020')",
            "WITH spent AS (DELETE FROM bootstrap_tokens WHERE nonce = 'boot-spent' RETURNING nonce) \
             UPDATE bootstrap_tokens AS t SET nonce = spent.nonce FROM spent WHERE t.nonce = 'boot-free'",
        ],
    );
    let number = |conn: &mut PgConnection, query: &str| -> i64 {
        diesel::select(diesel::dsl::sql::<diesel::sql_types::BigInt>(&format!("({query})"))).get_result(conn).unwrap()
    };
    let validated = "SELECT count(*) FROM pg_constraint WHERE conname IN \
                     ('bootstrap_tokens_used_at_check', 'users_first_signed_in_at_check') AND convalidated";
    let error = run(&db, all_migrations()).unwrap_err();
    assert!(
        error.contains("023_times_of_use_validated")
            && error.contains("1 row(s) of users fail the check users_first_signed_in_at_check")
            && error.contains("SELECT * FROM users WHERE NOT")
            && error.contains("DISABLE TRIGGER users_first_signed_in_at_set_once"),
        "{error}"
    );
    assert_eq!(number(&mut conn, validated), 0, "nothing of 023 applied");
    conn.batch_execute(
        "ALTER TABLE users DISABLE TRIGGER users_first_signed_in_at_set_once; \
         UPDATE users SET first_signed_in_at = created_at WHERE NOT (first_signed_in_at >= created_at); \
         ALTER TABLE users ENABLE TRIGGER users_first_signed_in_at_set_once",
    )
    .unwrap();
    let applied = run(&db, all_migrations()).unwrap();
    assert!(applied.iter().any(|name| name.starts_with("023")), "{applied:?}");
    assert_eq!(number(&mut conn, validated), 2);
    let mended = "SELECT count(*) FROM bootstrap_tokens WHERE nonce = 'boot-early' AND used_at = created_at";
    assert_eq!(number(&mut conn, mended), 1, "the early use moved to the token's creation");
    let marked = "SELECT count(*) FROM bootstrap_tokens WHERE nonce = 'boot-spent' AND used_at IS NOT NULL";
    assert_eq!(number(&mut conn, marked), 1, "the token holding a spent nonce is marked used");
}
