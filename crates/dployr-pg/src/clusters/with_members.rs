//! [`ClusterWithMembers`]: `clusters.get`'s one statement, also what the
//! writes that return a cluster read it back with.

use chrono::{DateTime, Utc};
use diesel::pg::Pg;
use diesel::prelude::*;
use diesel::query_builder::{AstPass, QueryFragment};
use diesel::sql_types::{Array, Nullable, Text, Timestamptz};
use dployr_domain::{Cluster, StoreError, StoreResult};
use serde_json::Value;

use super::{ClusterRow, MemberRow, cluster_from};
use crate::errors::Failure;
use crate::statement::hand_written_statement;

/// The result of [`ClusterWithMembers`]: the cluster once, its members as
/// one array per column (all of one length, in one unspecified order).
#[derive(QueryableByName)]
pub(super) struct ClusterWithMembersRow {
    #[diesel(sql_type = Text)]
    id: String,
    #[diesel(sql_type = Text)]
    name: String,
    #[diesel(sql_type = diesel::sql_types::Jsonb)]
    metadata: Value,
    #[diesel(sql_type = Timestamptz)]
    created_at: DateTime<Utc>,
    #[diesel(sql_type = Timestamptz)]
    updated_at: DateTime<Utc>,
    #[diesel(sql_type = Nullable<Array<Text>>)]
    member_ids: Option<Vec<String>>,
    #[diesel(sql_type = Nullable<Array<Text>>)]
    member_emails: Option<Vec<String>>,
    #[diesel(sql_type = Nullable<Array<Text>>)]
    member_names: Option<Vec<String>>,
    #[diesel(sql_type = Nullable<Array<Nullable<Text>>>)]
    member_pictures: Option<Vec<Option<String>>>,
    #[diesel(sql_type = Nullable<Array<Text>>)]
    member_roles: Option<Vec<String>>,
    #[diesel(sql_type = Nullable<Array<Timestamptz>>)]
    member_since: Option<Vec<DateTime<Utc>>>,
}

/// A cluster with its members, in one statement whose one row holds the
/// cluster once and each member once, as one array per column:
///
/// ```sql
/// SELECT c.id, c.name, c.metadata, c.created_at, c.updated_at, m.*
///   FROM clusters c,
///        (SELECT array_agg(user_id) AS member_ids, array_agg(email) AS member_emails,
///                array_agg(name) AS member_names, array_agg(picture) AS member_pictures,
///                array_agg(role) AS member_roles, array_agg(created_at) AS member_since
///           FROM user_clusters
///          WHERE cluster_id = $1) AS m
///  WHERE c.id = $2            -- the same id
/// ```
///
/// Why this shape, measured with pgbench on a 50-member cluster:
/// - Arrays of plain columns cost the server about half of an array of
///   records (`ROW(...)`, whose output function looks up each column's
///   type for every record), and a join would repeat the cluster row,
///   metadata included, for every member and decode it as many times.
/// - The aggregates have no `ORDER BY`: PostgreSQL 15 sorts the input of
///   each ordered aggregate separately (six sorts here). The store puts the
///   members in listing order itself (role rank, then e-mail by its bytes,
///   which is the column's `COLLATE "C"` order, `005_member_email_order`).
/// - The subquery names the id itself rather than `c.id`: planned against a
///   correlated `c.id`, PostgreSQL estimates the members of an average
///   cluster, and where one cluster is huge it hashes every membership
///   (34 ms instead of 0.2 ms for 50 members beside a 100 000-member
///   cluster).
///
/// The members come from one range of `user_clusters_cluster_id_order_idx`,
/// with the copies of each member's e-mail, name and picture that the
/// membership keeps (no lookup into `users`); arrays travel in PostgreSQL's
/// binary format: no JSON to parse.
struct ClusterWithMembers<'a> {
    cluster: &'a str,
}

impl QueryFragment<Pg> for ClusterWithMembers<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        out.push_sql(
            "SELECT c.id, c.name, c.metadata, c.created_at, c.updated_at, m.*\n  FROM clusters c,\n       \
             (SELECT array_agg(user_id) AS member_ids, array_agg(email) AS member_emails,\n               \
             array_agg(name) AS member_names, array_agg(picture) AS member_pictures,\n               \
             array_agg(role) AS member_roles, array_agg(created_at) AS member_since\n          \
             FROM user_clusters\n         WHERE cluster_id = ",
        );
        out.push_bind_param::<Text, _>(&self.cluster)?;
        out.push_sql(") AS m\n WHERE c.id = ");
        out.push_bind_param::<Text, _>(&self.cluster)?;
        Ok(())
    }
}

hand_written_statement!(ClusterWithMembers);

/// The cluster with its members, in one statement ([`ClusterWithMembers`]).
pub(super) fn load_cluster(conn: &mut PgConnection, cluster: &str) -> Result<Option<Cluster>, Failure> {
    Ok(select(conn, cluster)?.map(Cluster::try_from).transpose()?)
}

/// The row of the cluster with its members, undecoded: `clusters.get`
/// decodes it after the connection went back to the pool.
pub(super) fn select(conn: &mut PgConnection, cluster: &str) -> QueryResult<Option<ClusterWithMembersRow>> {
    ClusterWithMembers { cluster }.get_result(conn).optional()
}

impl TryFrom<ClusterWithMembersRow> for Cluster {
    type Error = StoreError;

    fn try_from(row: ClusterWithMembersRow) -> StoreResult<Cluster> {
        let ids = row.member_ids.unwrap_or_default();
        let count = ids.len();
        let emails = row.member_emails.unwrap_or_default();
        let names = row.member_names.unwrap_or_default();
        let pictures = row.member_pictures.unwrap_or_default();
        let roles = row.member_roles.unwrap_or_default();
        let since = row.member_since.unwrap_or_default();
        if [emails.len(), names.len(), pictures.len(), roles.len(), since.len()].iter().any(|len| *len != count) {
            return Err(StoreError::Backend {
                message: "clusters.get: the member arrays have different lengths".into(),
                source: None,
            });
        }
        let members = ids
            .into_iter()
            .zip(emails)
            .zip(names)
            .zip(pictures)
            .zip(roles)
            .zip(since)
            .map(|(((((user_id, email), name), picture), role), created_at)| MemberRow {
                user_id,
                email,
                name,
                picture,
                role,
                created_at,
            })
            .collect();
        let cluster = ClusterRow {
            id: row.id,
            name: row.name,
            metadata: row.metadata,
            created_at: row.created_at,
            updated_at: row.updated_at,
        };
        cluster_from(cluster, members)
    }
}

#[cfg(test)]
mod tests {
    use super::ClusterWithMembers;

    #[test]
    fn the_doc_comment_holds_the_statement_sent() {
        let statement = ClusterWithMembers { cluster: "01J0000000000000000000000" };
        crate::statement::assert_documented(include_str!("with_members.rs"), "ClusterWithMembers", &statement);
    }
}
