//! The benchmark's data, loaded with a few set-based statements (server-side
//! `generate_series`, never one row per round trip): a cluster of 50
//! members with 50 instances, a cluster of 100 000 members, a cluster of
//! 100 000 instances, 100 000 sessions in the key-value table, users for
//! the write paths and a stock of unused bootstrap tokens.

use diesel::connection::SimpleConnection as _;
use diesel::prelude::*;
use dployr_data::{ClusterId, Email, UserId};

use crate::Failure;

/// Members of the "deep" cluster and instances of the "deep instances" cluster.
pub const DEEP_ROWS: i64 = 100_000;
/// Unused bootstrap tokens for `mark_used`.
pub const TOKENS: i64 = 200_000;
/// Users signing in again, round robin, for `users.upsert`.
pub const SIGN_IN_USERS: i64 = 1_000;
/// Small clusters besides the benchmark's own: an owner, two developers and
/// three instances each.
pub const SMALL_CLUSTERS: i64 = 10_000;

/// Ids the benchmark's operations use.
pub struct Fixture {
    /// Owner of `team`, member of the other clusters too.
    pub owner: UserId,
    pub owner_email: Email,
    /// 50 members, 50 instances.
    pub team: ClusterId,
    /// 100 000 members (viewers) besides its owner.
    pub deep_members: ClusterId,
    /// 100 000 instances.
    pub deep_instances: ClusterId,
}

/// A 26-character id that parses as a ULID: a family prefix, then digits.
/// A ULID's first character is at most `7` (the schema refuses larger), so
/// families past 7 take two characters, `0` and a letter of their own.
fn id_sql(prefix: &str, n: &str) -> String {
    format!("'{prefix}' || lpad(({n})::text, {}, '0')", 26 - prefix.len())
}

pub fn load(conn: &mut PgConnection) -> Result<Fixture, Failure> {
    let owner = UserId::parse("10000000000000000000000001")?;
    let team = ClusterId::parse("20000000000000000000000001")?;
    let deep_members = ClusterId::parse("20000000000000000000000002")?;
    let deep_instances = ClusterId::parse("20000000000000000000000003")?;
    let token_instance = "30000000000000000000000001".to_owned();
    let member = id_sql("4", "n");
    let deep_member = id_sql("5", "n");
    let team_instance = id_sql("3", "n + 100");
    let deep_instance = id_sql("6", "n");
    let sign_in = id_sql("7", "n");
    let small_cluster = id_sql("0C", "n");
    let small_user = id_sql("0S", "n");
    let small_instance = id_sql("0E", "n * 3 + i");
    let small_member = id_sql("0S", &format!("(n + i) % {SMALL_CLUSTERS} + 1"));
    conn.batch_execute(&format!(
        "
        INSERT INTO users (id, email, name, provider) VALUES
            ('{owner}', 'owner@bench.io', 'Owner', 'github');
        INSERT INTO clusters (id, name) VALUES
            ('{team}', 'team'), ('{deep_members}', 'deep members'), ('{deep_instances}', 'deep instances');
        INSERT INTO user_clusters (user_id, cluster_id, role) VALUES
            ('{owner}', '{team}', 'owner'), ('{owner}', '{deep_members}', 'owner'), ('{owner}', '{deep_instances}', 'owner');

        -- team: 49 more members of mixed roles, and 50 instances.
        INSERT INTO users (id, email, name, provider)
            SELECT {member}, 'member' || n || '@bench.io', 'Member ' || n, 'google' FROM generate_series(1, 49) n;
        INSERT INTO user_clusters (user_id, cluster_id, role)
            SELECT {member}, '{team}', (ARRAY['admin', 'developer', 'viewer'])[1 + n % 3] FROM generate_series(1, 49) n;
        INSERT INTO instances (id, cluster_id, address, tag, created_at)
            SELECT {team_instance}, '{team}', '10.0.' || n || '.1', 'team-' || n, now() - n * interval '1 second'
            FROM generate_series(1, 50) n;

        -- deep members: 100 000 viewers.
        INSERT INTO users (id, email, name, provider)
            SELECT {deep_member}, 'deep' || lpad(n::text, 6, '0') || '@bench.io', 'Deep ' || n, 'email'
            FROM generate_series(1, {DEEP_ROWS}) n;
        INSERT INTO user_clusters (user_id, cluster_id, role)
            SELECT {deep_member}, '{deep_members}', 'viewer' FROM generate_series(1, {DEEP_ROWS}) n;

        -- deep instances: 100 000 instances, one millisecond apart.
        INSERT INTO instances (id, cluster_id, address, tag, created_at)
            SELECT {deep_instance}, '{deep_instances}', '10.1.' || n || '.1', 'deep-' || n, now() - n * interval '1 millisecond'
            FROM generate_series(1, {DEEP_ROWS}) n;

        -- tokens for mark_used, on one instance of team.
        INSERT INTO instances (id, cluster_id, address, tag) VALUES ('{token_instance}', '{team}', 'tokens', 'tokens');
        INSERT INTO bootstrap_tokens (nonce, instance_id)
            SELECT 'nonce-' || n, '{token_instance}' FROM generate_series(1, {TOKENS}) n;

        -- 100 000 live sessions in the PostgreSQL key-value table, as in
        -- production: lookups among many rows, and statistics that say so
        -- (a plan made for an empty table would seq-scan a grown one).
        INSERT INTO kv_entries (key, value, expires_at)
            SELECT 'session:' || md5(n::text) || md5((-n)::text), convert_to('{{}}', 'UTF8'), now() + interval '7 days'
            FROM generate_series(1, {DEEP_ROWS}) n;

        -- users who sign in again (users.upsert of an existing user).
        INSERT INTO users (id, email, name, provider)
            SELECT {sign_in}, 'signin' || n || '@bench.io', 'Sign-in ' || n, 'google' FROM generate_series(1, {SIGN_IN_USERS}) n;

        -- small clusters: an owner each, two developers who own clusters of
        -- their own, three instances.
        INSERT INTO users (id, email, name, provider)
            SELECT {small_user}, 'small' || n || '@bench.io', 'Small ' || n, 'github' FROM generate_series(1, {SMALL_CLUSTERS}) n;
        INSERT INTO clusters (id, name)
            SELECT {small_cluster}, 'small ' || n FROM generate_series(1, {SMALL_CLUSTERS}) n;
        INSERT INTO user_clusters (user_id, cluster_id, role)
            SELECT {small_user}, {small_cluster}, 'owner' FROM generate_series(1, {SMALL_CLUSTERS}) n;
        INSERT INTO user_clusters (user_id, cluster_id, role)
            SELECT {small_member}, {small_cluster}, 'developer'
            FROM generate_series(1, {SMALL_CLUSTERS}) n, generate_series(1, 2) i;
        INSERT INTO instances (id, cluster_id, address, tag)
            SELECT {small_instance}, {small_cluster}, '10.2.' || n || '.' || i, 'small-' || n || '-' || i
            FROM generate_series(1, {SMALL_CLUSTERS}) n, generate_series(0, 2) i;
        "
    ))?;
    // Its own statement: VACUUM cannot run in the implicit transaction of a
    // multi-statement string. Fresh statistics and visibility maps, so the
    // runs do not race autovacuum over the fixture.
    conn.batch_execute("VACUUM ANALYZE")?;
    // Write the load's dirty pages now rather than during the first runs.
    // Needs a superuser (or pg_checkpoint); on a server of one's own without
    // either, the first runs just share the machine with the checkpointer.
    let _ = conn.batch_execute("CHECKPOINT");
    Ok(Fixture { owner, owner_email: Email::parse("owner@bench.io")?, team, deep_members, deep_instances })
}

#[cfg(test)]
mod tests {
    /// The benchmark's fixture loads into a database at the migrations'
    /// head: a schema rule its generated rows break would otherwise show
    /// only when someone runs the benchmark.
    #[test]
    fn the_fixture_loads_into_a_database_at_the_migrations_head() {
        let db = dployr_testkit::database();
        let fixture = super::load(&mut db.connect());
        assert!(fixture.is_ok(), "{:?}", fixture.err());
    }
}
