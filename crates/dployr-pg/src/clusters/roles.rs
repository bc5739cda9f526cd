//! The locking helpers of the membership writes: the cluster lock every
//! such write takes first, and `clusters.update`'s roles as one statement
//! ([`SetRoles`]) after the listed users are key-share locked, in the lock
//! order of ARCHITECTURE.md (clusters, users, memberships, totals).

use std::collections::{BTreeMap, HashSet};

use diesel::pg::Pg;
use diesel::prelude::*;
use diesel::query_builder::{AstPass, QueryFragment};
use diesel::sql_types::{Array, Text};
use dployr_domain::{Role, StoreError, StoreResult, UserId};

use crate::errors::Failure;
use crate::schema::{clusters, users};
use crate::statement::{PlannedEachRun, hand_written_statement};

/// Locks the cluster row for a membership change; `NotFound` if it is gone.
pub(super) fn lock_cluster(conn: &mut PgConnection, cluster: &str) -> Result<(), Failure> {
    let found =
        clusters::table.find(cluster).select(clusters::id).for_no_key_update().first::<String>(conn).optional()?;
    match found {
        Some(_) => Ok(()),
        None => Err(StoreError::not_found("cluster", cluster).into()),
    }
}

/// The desired non-owner role of each user: the highest they are listed under.
pub(super) fn desired_roles(roles: &BTreeMap<Role, Vec<UserId>>) -> StoreResult<BTreeMap<String, Role>> {
    let mut desired = BTreeMap::new();
    for (role, users) in roles {
        // An empty owner list asks for nothing (a client that sends every
        // role's list sends one): only naming an owner is refused.
        if *role == Role::Owner && !users.is_empty() {
            return Err(StoreError::invalid("roles", "cannot name an owner; use transfer_ownership"));
        }
        for user in users {
            let entry = desired.entry(user.to_string()).or_insert(*role);
            *entry = (*entry).max(*role);
        }
    }
    Ok(desired)
}

/// The membership writes of `clusters.update`'s roles as one statement: the
/// members not listed go, the listed ones are inserted or get their role
/// (the owner keeps ownership even when listed under another role):
///
/// ```sql
/// WITH removed AS (
///     DELETE FROM user_clusters
///      WHERE cluster_id = $1 AND role <> 'owner' AND user_id <> ALL($2))
/// INSERT INTO user_clusters (user_id, cluster_id, role)
/// SELECT listed.user_id, $3, listed.role FROM unnest($4, $5) AS listed (user_id, role)
///                                     -- $3 is the cluster again, $4 the users again
/// ON CONFLICT (user_id, cluster_id) DO UPDATE SET role = excluded.role
///  WHERE user_clusters.role <> 'owner'
/// ```
///
/// One statement, not two, so that the listing totals of `cluster_counts`
/// (updated by statement-level triggers) are locked once, after every
/// membership row this write locks: the lock order that keeps the stores
/// free of deadlocks (memberships, then totals; ARCHITECTURE.md). The two
/// parts touch different users, so neither sees the other's rows.
struct SetRoles<'a> {
    cluster: &'a str,
    users: &'a [&'a str],
    roles: &'a [&'a str],
}

impl QueryFragment<Pg> for SetRoles<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        out.push_sql("WITH removed AS (\n    DELETE FROM user_clusters\n     WHERE cluster_id = ");
        out.push_bind_param::<Text, _>(&self.cluster)?;
        out.push_sql(" AND role <> 'owner' AND user_id <> ALL(");
        out.push_bind_param::<Array<Text>, _>(&self.users)?;
        out.push_sql("))\nINSERT INTO user_clusters (user_id, cluster_id, role)\nSELECT listed.user_id, ");
        out.push_bind_param::<Text, _>(&self.cluster)?;
        out.push_sql(", listed.role FROM unnest(");
        out.push_bind_param::<Array<Text>, _>(&self.users)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Text>, _>(&self.roles)?;
        out.push_sql(
            ") AS listed (user_id, role)\nON CONFLICT (user_id, cluster_id) DO UPDATE SET role = excluded.role\n \
             WHERE user_clusters.role <> 'owner'",
        );
        Ok(())
    }
}

hand_written_statement!(SetRoles);

/// The most missing users a `NotFound` names: a list of thousands of
/// unknown ids would make an error message of hundreds of kilobytes.
const MISSING_NAMED: usize = 10;

/// `items` joined by commas, the first `most` of them, then how many more.
fn named_up_to(items: &[&str], most: usize) -> String {
    let named = items[..items.len().min(most)].join(", ");
    match items.len().saturating_sub(most) {
        0 => named,
        more => format!("{named} and {more} more"),
    }
}

/// Makes the cluster's non-owner memberships exactly `desired` (the owner,
/// if listed, keeps ownership). Runs under the cluster lock.
pub(super) fn set_roles(
    conn: &mut PgConnection,
    cluster: &str,
    desired: &BTreeMap<String, Role>,
) -> Result<(), Failure> {
    let listed: Vec<&str> = desired.keys().map(String::as_str).collect();
    // The listed users, share-locked in id order before any membership (the
    // lock order of ARCHITECTURE.md), as inserting a membership locks its
    // user (007_profile_copy_lock): a concurrent users.delete of one of them
    // either finished (and they are reported missing here) or waits.
    let found: Vec<String> = if listed.is_empty() {
        Vec::new()
    } else {
        users::table.filter(users::id.eq_any(&listed)).order(users::id).select(users::id).for_share().load(conn)?
    };
    if found.len() < listed.len() {
        let found: HashSet<&str> = found.iter().map(String::as_str).collect();
        let missing: Vec<&str> = listed.iter().copied().filter(|user| !found.contains(user)).collect();
        return Err(StoreError::not_found("user", named_up_to(&missing, MISSING_NAMED)).into());
    }
    let roles: Vec<&str> = desired.values().map(|role| role.as_str()).collect();
    // Planned for these values (`PlannedEachRun`): PostgreSQL hashes the
    // list of `<> ALL` only when it is a constant, as a custom plan makes
    // it; under the generic plan a prepared statement falls back to, each
    // member was compared with the listed users one by one: 5.9 s for a
    // cluster of 20 000 listed in full, against 31 ms (psql, PostgreSQL 15).
    PlannedEachRun(SetRoles { cluster, users: &listed, roles: &roles }).execute(conn)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::SetRoles;

    #[test]
    fn a_long_list_of_missing_users_is_named_up_to_its_first_ten() {
        let ids: Vec<String> = (0..25).map(|i| format!("u{i}")).collect();
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        assert_eq!(super::named_up_to(&ids[..2], 10), "u0, u1");
        assert_eq!(super::named_up_to(&ids[..10], 10), ids[..10].join(", "));
        assert_eq!(super::named_up_to(&ids, 10), format!("{} and 15 more", ids[..10].join(", ")));
    }

    #[test]
    fn the_doc_comment_holds_the_statement_sent() {
        let statement = SetRoles { cluster: "c", users: &["u1", "u2"], roles: &["admin", "viewer"] };
        crate::statement::assert_documented(include_str!("roles.rs"), "SetRoles", &statement);
    }
}
