//! [`ClusterWithMembers`]: `clusters.get`'s one statement, also what the
//! writes that return a cluster read it back with.

use chrono::DateTime;
use diesel::pg::Pg;
use diesel::prelude::*;
use diesel::query_builder::{AstPass, QueryFragment};
use diesel::sql_types::{Nullable, Text, Timestamptz};
use dployr_domain::{Cluster, ClusterId, Role, StoreError, StoreResult, UserId};

use super::{ClusterRow, MemberRow, cluster_from};
use crate::errors::Failure;
use crate::parsed::{Parsed, Timestamp};
use crate::statement::{hand_written_statement, load_all};

/// The SQL types of [`ClusterWithMembers`]' columns, in their order.
type Columns = (Text, Text, Timestamptz, Nullable<Text>, Nullable<Text>, Nullable<Text>);

/// One row of [`ClusterWithMembers`]: one of the cluster's members, or the
/// cluster itself (`role` is NULL), whose metadata and last update travel
/// in the columns a member's e-mail and picture take.
/// Decoded by position: finding each column by name in each of 51 rows was
/// about 15 % of the client's instructions (callgrind).
#[derive(Queryable)]
pub(super) struct ClusterOrMember {
    /// The cluster's id or the member's, parsed as an id of either (both are
    /// ULIDs; `Ulid`'s own parser would read `8…` as `0…`).
    id: Parsed<UserId>,
    name: String,
    /// When the cluster was made, or when the member joined.
    created_at: Timestamp,
    /// A member's e-mail; the cluster's metadata, as JSON text.
    email_or_metadata: Option<String>,
    /// A member's picture; when the cluster was last updated, as the text of
    /// its microseconds since 1970.
    picture_or_updated_at: Option<String>,
    role: Option<Parsed<Role>>,
}

/// A cluster with its members, in one statement whose rows are the cluster
/// once and each member once, in no promised order:
///
/// ```sql
/// SELECT id, name, created_at, metadata::text AS email,
///        (extract(epoch FROM updated_at) * 1000000)::bigint::text AS picture,
///        NULL::text AS role
///   FROM clusters
///  WHERE id = $1
/// UNION ALL
/// SELECT user_id, name, created_at, email, picture, role
///   FROM user_clusters
///  WHERE cluster_id = $2      -- the same id
/// ```
///
/// Why this shape, measured with pgbench on a 50-member cluster beside a
/// 100 000-member one (PostgreSQL 15), and with callgrind in the client:
/// - A join would repeat the cluster row, metadata included, for every
///   member, and decode it as many times; here the cluster's columns come
///   once.
/// - Six columns, not eight: the cluster's metadata and last update ride in
///   the columns of a member's e-mail and picture, as text, instead of two
///   columns of their own that every member's row would carry as NULLs.
///   The client decodes every field of every row (three calls into libpq
///   and diesel's machinery each): the two columns were about 8 % of
///   `clusters.get`'s client instructions. `extract(epoch ...)` is exact
///   (a `numeric` since PostgreSQL 14), so the update time loses nothing.
/// - One row per member costs the server less than one row of arrays
///   (about 1.18× the throughput of `array_agg` per column, which in turn
///   was about twice an array of `ROW(...)` records, whose output looks up
///   each column's type for every record); `json_agg` of the members
///   halved the server's throughput.
/// - No `ORDER BY`: the store tells the cluster's row by its NULL role and
///   puts the members in listing order itself (role rank, then e-mail by
///   its bytes, which is the column's `COLLATE "C"` order,
///   `005_member_email_order`): a sort in the server costs more than one
///   pass over 50 rows in the store.
/// - Each branch names the id itself: each is one index range
///   (`clusters_pkey`, `user_clusters_cluster_id_order_idx`), whatever the
///   size of other clusters.
///
/// One statement, so one snapshot: the members are those of the cluster
/// row returned. The members' e-mail, name and picture are the copies the
/// membership keeps (no lookup into `users`).
struct ClusterWithMembers<'a> {
    cluster: &'a str,
}

impl QueryFragment<Pg> for ClusterWithMembers<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        out.push_sql(
            "SELECT id, name, created_at, metadata::text AS email,\n       \
             (extract(epoch FROM updated_at) * 1000000)::bigint::text AS picture,\n       \
             NULL::text AS role\n  \
             FROM clusters\n WHERE id = ",
        );
        out.push_bind_param::<Text, _>(&self.cluster)?;
        out.push_sql(
            "\nUNION ALL\nSELECT user_id, name, created_at, email, picture, role\n  \
             FROM user_clusters\n WHERE cluster_id = ",
        );
        out.push_bind_param::<Text, _>(&self.cluster)?;
        Ok(())
    }
}

hand_written_statement!(ClusterWithMembers, Columns);

/// The cluster with its members, in one statement ([`ClusterWithMembers`]).
pub(super) fn load_cluster(conn: &mut PgConnection, cluster: &str) -> Result<Option<Cluster>, Failure> {
    Ok(select(conn, cluster)?.map(Cluster::try_from).transpose()?)
}

/// The rows of the cluster with its members, undecoded (`None`: no such
/// cluster): `clusters.get` decodes them after the connection went back to
/// the pool.
pub(super) fn select(conn: &mut PgConnection, cluster: &str) -> QueryResult<Option<ClusterRows>> {
    let rows: Vec<ClusterOrMember> = load_all(ClusterWithMembers { cluster }, conn)?;
    Ok((!rows.is_empty()).then_some(ClusterRows(rows)))
}

/// The rows of [`ClusterWithMembers`] for a cluster that exists.
pub(super) struct ClusterRows(Vec<ClusterOrMember>);

impl TryFrom<ClusterRows> for Cluster {
    type Error = StoreError;

    fn try_from(ClusterRows(rows): ClusterRows) -> StoreResult<Cluster> {
        let mut cluster = None;
        let mut members = Vec::with_capacity(rows.len().saturating_sub(1));
        for row in rows {
            match (row.role, row.email_or_metadata) {
                (Some(role), Some(email)) => members.push(MemberRow {
                    user_id: row.id,
                    email,
                    name: row.name,
                    picture: row.picture_or_updated_at,
                    role,
                    created_at: row.created_at,
                }),
                (None, Some(metadata)) if cluster.is_none() => {
                    cluster = Some(ClusterRow {
                        id: Parsed(ClusterId::from(row.id.0.ulid())),
                        name: row.name,
                        metadata: serde_json::from_str(&metadata)
                            .map_err(|error| StoreError::backend("clusters.get: the cluster's metadata", error))?,
                        created_at: row.created_at.0,
                        updated_at: row
                            .picture_or_updated_at
                            .as_deref()
                            .and_then(|micros| micros.parse().ok())
                            .and_then(DateTime::from_timestamp_micros)
                            .ok_or_else(|| {
                                StoreError::backend(
                                    "clusters.get: the cluster's update time",
                                    format!("{:?} is not microseconds since 1970", row.picture_or_updated_at),
                                )
                            })?,
                    });
                }
                _ => {
                    return Err(StoreError::Backend {
                        message: "clusters.get: a row that is neither the cluster nor a member".into(),
                        source: None,
                    });
                }
            }
        }
        // Members without their cluster cannot come from one snapshot (the
        // foreign key); say so rather than invent a cluster.
        let cluster = cluster.ok_or(StoreError::Backend {
            message: "clusters.get: members without their cluster".into(),
            source: None,
        })?;
        Ok(cluster_from(cluster, members))
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
