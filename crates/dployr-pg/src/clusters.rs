//! `PgClusterStore`: clusters and memberships in PostgreSQL. Every query
//! behind `ClusterStore` is in this file.
//!
//! Concurrency: every write that changes a cluster's memberships first
//! locks the cluster row (`FOR NO KEY UPDATE`, which does not block the
//! key-share locks of inserts that reference the cluster), so such writes to
//! one cluster run one after another and each sees the last one's result.
//! The partial unique index `user_clusters_one_owner_per_cluster` backs the
//! "at most one owner" rule whatever a query does; the transactions keep
//! "at least one".

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use diesel::pg::Pg;
use diesel::prelude::*;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::sql_types::{Array, BigInt, Nullable, SmallInt, Text, Timestamptz};
use dployr_domain::text::{self, Blank};
use dployr_domain::{
    Cluster, ClusterId, ClusterName, ClusterPatch, ClusterStore, ClusterSummary, Email, GitHubIntegration,
    Integrations, Member, Metadata, Page, PageStart, Paged, PendingInvite, Provider, Role, StoreError, StoreResult,
    UserId,
};
use serde_json::{Value, json};

use crate::errors::Failure;
use crate::routes::Read;
use crate::schema::{clusters, user_clusters, users};
use crate::sql::coalesce;
use crate::{PgPool, cursor};
use diesel::result::DatabaseErrorKind;

diesel::alias!(user_clusters as owner_memberships: OwnerMemberships);

#[derive(Queryable, Selectable)]
#[diesel(table_name = clusters, check_for_backend(diesel::pg::Pg))]
struct ClusterRow {
    id: String,
    name: String,
    metadata: Value,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

/// A membership with what a listing shows of the user (e-mail, name and
/// picture are copies kept in the membership by triggers: no join).
#[derive(Queryable, Selectable)]
#[diesel(table_name = user_clusters, check_for_backend(diesel::pg::Pg))]
struct MemberRow {
    user_id: String,
    email: String,
    name: String,
    picture: Option<String>,
    role: String,
    created_at: DateTime<Utc>,
}

impl TryFrom<MemberRow> for Member {
    type Error = StoreError;

    fn try_from(row: MemberRow) -> StoreResult<Member> {
        Ok(Member {
            user_id: UserId::parse(&row.user_id)?,
            email: Email::from_stored(row.email),
            name: row.name,
            picture: row.picture,
            role: row.role.parse()?,
            since: row.created_at,
        })
    }
}

fn cluster_from(row: ClusterRow, members: Vec<MemberRow>) -> StoreResult<Cluster> {
    let mut by_role: BTreeMap<Role, Vec<Member>> = BTreeMap::new();
    for member in members {
        let member = Member::try_from(member)?;
        by_role.entry(member.role).or_default().push(member);
    }
    // Listing order within a role: by e-mail. (Already sorted when the rows
    // came sorted, and then this costs one pass.)
    for members in by_role.values_mut() {
        members.sort_unstable_by(|a, b| a.email.as_str().cmp(b.email.as_str()));
    }
    Ok(Cluster {
        id: ClusterId::parse(&row.id)?,
        name: row.name,
        metadata: Metadata::from_stored(row.metadata),
        members: by_role,
        created_at: row.created_at,
        updated_at: row.updated_at,
    })
}

/// One row of the page query: the total, and a member unless the page is empty.
#[derive(QueryableByName)]
struct MemberPageRow {
    #[diesel(sql_type = BigInt)]
    total: i64,
    #[diesel(sql_type = Nullable<Text>)]
    user_id: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    email: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    name: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    picture: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    role: Option<String>,
    #[diesel(sql_type = Nullable<SmallInt>)]
    role_order: Option<i16>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    created_at: Option<DateTime<Utc>>,
}

/// A page of a cluster's memberships whose `role_order` is in a range,
/// ordered by role rank then e-mail, after a keyset position, with their
/// total, in one statement: the left join keeps the total when the page is
/// empty, which diesel's builder cannot express. The page runs on
/// `user_clusters_cluster_id_order_idx`; the total is one row of
/// `cluster_counts` (kept by triggers, `004_listing_counts`), so a page of a
/// huge cluster costs what a page of a small one does. A type of its own
/// (rather than `sql_query`) so diesel prepares it once per connection.
struct MemberPage<'a> {
    cluster: &'a str,
    orders: (i16, i16),
    /// Which total: invitations, or members (every other role).
    invites: bool,
    after: (i16, &'a str),
    limit: i64,
    offset: i64,
}

impl QueryFragment<Pg> for MemberPage<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        out.push_sql(
            "WITH page AS (\n    SELECT m.user_id, m.email, m.name, m.picture, m.role, m.role_order, m.created_at\n    \
             FROM user_clusters m\n    WHERE m.cluster_id = ",
        );
        out.push_bind_param::<Text, _>(&self.cluster)?;
        out.push_sql(" AND m.role_order BETWEEN ");
        out.push_bind_param::<SmallInt, _>(&self.orders.0)?;
        out.push_sql(" AND ");
        out.push_bind_param::<SmallInt, _>(&self.orders.1)?;
        out.push_sql(" AND (m.role_order, m.email) > (");
        out.push_bind_param::<SmallInt, _>(&self.after.0)?;
        out.push_sql(", ");
        out.push_bind_param::<Text, _>(&self.after.1)?;
        out.push_sql(")\n    ORDER BY m.role_order, m.email\n    LIMIT ");
        out.push_bind_param::<BigInt, _>(&self.limit)?;
        out.push_sql(" OFFSET ");
        out.push_bind_param::<BigInt, _>(&self.offset)?;
        out.push_sql(")\nSELECT coalesce((SELECT CASE WHEN ");
        out.push_bind_param::<diesel::sql_types::Bool, _>(&self.invites)?;
        out.push_sql(" THEN invites ELSE members END FROM cluster_counts WHERE cluster_id = ");
        out.push_bind_param::<Text, _>(&self.cluster)?;
        out.push_sql(
            "), 0) AS total, page.*\nFROM (SELECT) AS one LEFT JOIN page ON true\nORDER BY page.role_order, page.email",
        );
        Ok(())
    }
}

impl QueryId for MemberPage<'_> {
    type QueryId = MemberPage<'static>;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl Query for MemberPage<'_> {
    type SqlType = diesel::sql_types::Untyped;
}

impl RunQueryDsl<PgConnection> for MemberPage<'_> {}

const MEMBERS_CURSOR: &str = "members";
const INVITES_CURSOR: &str = "invites";

/// `role_order` of each role, as the schema's generated column computes it.
fn role_order(role: Role) -> i16 {
    4 - role.rank()
}

/// The clusters and memberships of one PostgreSQL database.
#[derive(Debug, Clone)]
pub struct PgClusterStore {
    pool: PgPool,
}

impl PgClusterStore {
    /// A store over `pool`.
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    fn page(
        &self,
        read: Read,
        cluster: &ClusterId,
        orders: (i16, i16),
        kind: &str,
        page: &Page,
    ) -> StoreResult<Paged<Member>> {
        let (mut after_order, mut after_email, mut offset) = (-1_i16, String::new(), 0_i64);
        match &page.start {
            PageStart::First => {}
            PageStart::After(after) => {
                let [order, email] = cursor::decode::<2>(kind, after)?;
                after_order =
                    order.parse().map_err(|_| StoreError::invalid("cursor", "is not a cursor of this listing"))?;
                after_email = email;
            }
            PageStart::Offset(skip) => {
                offset = i64::try_from(*skip).map_err(|_| StoreError::invalid("offset", "is too large"))?;
            }
        }
        let limit = i64::from(page.limit());
        let rows: Vec<MemberPageRow> = self.pool.route(read).run(&[], |conn| {
            MemberPage {
                cluster: &cluster.to_string(),
                orders,
                invites: orders.0 == role_order(Role::Invited),
                after: (after_order, &after_email),
                limit,
                offset,
            }
            .load(conn)
        })?;
        let total = rows.first().map_or(0, |row| row.total);
        let mut last_key = None;
        let mut items = Vec::with_capacity(rows.len());
        for row in rows {
            let (Some(user_id), Some(email), Some(name), Some(role), Some(order), Some(created_at)) =
                (row.user_id, row.email, row.name, row.role, row.role_order, row.created_at)
            else {
                continue;
            };
            last_key = Some((order, email.clone()));
            items.push(Member::try_from(MemberRow { user_id, email, name, picture: row.picture, role, created_at })?);
        }
        let next = match last_key {
            Some((order, email)) if items.len() as i64 == limit => {
                Some(cursor::encode(kind, &[&order.to_string(), &email]))
            }
            _ => None,
        };
        Ok(Paged { items, total: u64::try_from(total).unwrap_or(0), next })
    }

    fn members_where(&self, read: Read, cluster: &ClusterId, role: Role) -> StoreResult<Vec<Member>> {
        let rows: Vec<MemberRow> = self.pool.route(read).run(&[], |conn| {
            user_clusters::table
                .filter(user_clusters::cluster_id.eq(cluster.to_string()))
                .filter(user_clusters::role.eq(role.as_str()))
                .order(user_clusters::email)
                .select(MemberRow::as_select())
                .load(conn)
        })?;
        rows.into_iter().map(Member::try_from).collect()
    }

    fn has_rank(&self, read: Read, user: &UserId, cluster: &ClusterId, at_least: Role) -> StoreResult<bool> {
        self.pool.route(read).run(&[], |conn| {
            diesel::select(diesel::dsl::exists(
                user_clusters::table
                    .find((user.to_string(), cluster.to_string()))
                    .filter(user_clusters::role_order.le(role_order(at_least))),
            ))
            .get_result(conn)
        })
    }
}

/// Locks the cluster row for a membership change; `NotFound` if it is gone.
fn lock_cluster(conn: &mut PgConnection, cluster: &str) -> Result<(), Failure> {
    let found =
        clusters::table.find(cluster).select(clusters::id).for_no_key_update().first::<String>(conn).optional()?;
    match found {
        Some(_) => Ok(()),
        None => Err(StoreError::not_found("cluster", cluster).into()),
    }
}

/// The result of [`ClusterWithMembers`]: the cluster once, its members as
/// one array per column (all of one length, in one unspecified order).
#[derive(QueryableByName)]
struct ClusterWithMembersRow {
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

impl QueryId for ClusterWithMembers<'_> {
    type QueryId = ClusterWithMembers<'static>;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl Query for ClusterWithMembers<'_> {
    type SqlType = diesel::sql_types::Untyped;
}

impl RunQueryDsl<PgConnection> for ClusterWithMembers<'_> {}

/// The cluster with its members, in one statement ([`ClusterWithMembers`]).
fn load_cluster(conn: &mut PgConnection, cluster: &str) -> Result<Option<Cluster>, Failure> {
    let row: Option<ClusterWithMembersRow> = ClusterWithMembers { cluster }.get_result(conn).optional()?;
    let Some(row) = row else {
        return Ok(None);
    };
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
        }
        .into());
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
    Ok(Some(cluster_from(cluster, members)?))
}

fn summaries(rows: Vec<(String, String, Option<String>)>) -> StoreResult<Vec<ClusterSummary>> {
    rows.into_iter()
        .map(|(id, name, owner_name)| Ok(ClusterSummary { id: ClusterId::parse(&id)?, name, owner_name }))
        .collect()
}

impl ClusterStore for PgClusterStore {
    fn create_for_owner(&self, owner: &UserId) -> StoreResult<Cluster> {
        let _span = crate::trace::operation("clusters.create_for_owner");
        let owner = owner.to_string();
        self.pool.transaction(&[("user", &owner)], |conn| {
            // Two calls for one user queue on this lock; the second finds the
            // first one's cluster below.
            let user = users::table
                .find(&owner)
                .select(crate::users::UserRow::as_select())
                .for_no_key_update()
                .first(conn)
                .optional()?
                .ok_or_else(|| StoreError::not_found("user", &owner))?;
            let owned: Option<String> = user_clusters::table
                .filter(user_clusters::user_id.eq(&owner))
                .filter(user_clusters::role.eq(Role::Owner.as_str()))
                .select(user_clusters::cluster_id)
                .order(user_clusters::created_at)
                .first(conn)
                .optional()?;
            if let Some(owned) = owned {
                return load_cluster(conn, &owned)?.ok_or_else(|| StoreError::not_found("cluster", &owned).into());
            }
            let user = dployr_domain::User::try_from(user)?;
            let cluster: ClusterRow = diesel::insert_into(clusters::table)
                .values((
                    clusters::id.eq(ClusterId::generate().to_string()),
                    clusters::name.eq(user.email.local_part()),
                ))
                .returning(ClusterRow::as_returning())
                .get_result(conn)?;
            let since: DateTime<Utc> = diesel::insert_into(user_clusters::table)
                .values((
                    user_clusters::user_id.eq(&owner),
                    user_clusters::cluster_id.eq(&cluster.id),
                    user_clusters::role.eq(Role::Owner.as_str()),
                ))
                .returning(user_clusters::created_at)
                .get_result(conn)?;
            let member = MemberRow {
                user_id: owner.clone(),
                email: user.email.to_string(),
                name: user.name,
                picture: user.picture,
                role: Role::Owner.as_str().to_owned(),
                created_at: since,
            };
            Ok(cluster_from(cluster, vec![member])?)
        })
    }

    fn get(&self, id: &ClusterId) -> StoreResult<Option<Cluster>> {
        let _span = crate::trace::operation("clusters.get");
        let id = id.to_string();
        self.pool.route(Read::ClustersGet).run(&[], |conn| load_cluster(conn, &id))
    }

    fn update(&self, id: &ClusterId, patch: ClusterPatch) -> StoreResult<Option<Cluster>> {
        let _span = crate::trace::operation("clusters.update");
        let desired = patch.roles.as_ref().map(desired_roles).transpose()?;
        let id = id.to_string();
        self.pool.transaction(&[], |conn| {
            match lock_cluster(conn, &id) {
                Ok(()) => {}
                Err(Failure::Store(StoreError::NotFound { .. })) => return Ok(None),
                Err(other) => return Err(other),
            }
            if patch.name.is_some() || patch.metadata.is_some() {
                let merge = patch.metadata.as_ref().map_or_else(|| json!({}), Metadata::to_value);
                diesel::update(clusters::table.find(&id))
                    .set((
                        clusters::name.eq(coalesce(patch.name.as_ref().map(ClusterName::as_str), clusters::name)),
                        clusters::metadata.eq(clusters::metadata.concat(merge)),
                    ))
                    .execute(conn)?;
            }
            if let Some(desired) = &desired {
                set_roles(conn, &id, desired)?;
            }
            load_cluster(conn, &id)
        })
    }

    fn delete(&self, id: &ClusterId) -> StoreResult<()> {
        let _span = crate::trace::operation("clusters.delete");
        let deleted = self.pool.run(&[], |conn| diesel::delete(clusters::table.find(id.to_string())).execute(conn))?;
        if deleted == 0 {
            return Err(StoreError::not_found("cluster", id.to_string()));
        }
        Ok(())
    }

    fn install_github_integration(&self, integration: GitHubIntegration) -> StoreResult<Option<Cluster>> {
        let _span = crate::trace::operation("clusters.install_github_integration");
        text::check("loginId", &integration.login_id, 255, Blank::Refused)?;
        let mut settings = integration.settings.as_map().clone();
        settings.insert("loginId".into(), Value::String(integration.login_id.clone()));
        let settings = Metadata::from_map(settings)?;
        let merge = json!({ "gitHub": settings.into_value() });
        self.pool.transaction(&[], |conn| {
            // The expression is spelled as in clusters_github_login_id_idx, keys
            // as literals, so the planner matches the index.
            let login_id = diesel::dsl::sql::<Nullable<Text>>("metadata -> 'gitHub' ->> 'loginId'");
            let linked: Option<String> = clusters::table
                .filter(login_id.eq(&integration.login_id))
                .order(clusters::created_at)
                .select(clusters::id)
                .for_no_key_update()
                .first(conn)
                .optional()?;
            let Some(id) = linked else {
                return Ok(None);
            };
            diesel::update(clusters::table.find(&id))
                .set(clusters::metadata.eq(clusters::metadata.concat(&merge)))
                .execute(conn)?;
            load_cluster(conn, &id)
        })
    }
    fn add_users(&self, cluster: &ClusterId, emails: &[Email]) -> StoreResult<Vec<Member>> {
        let _span = crate::trace::operation("clusters.add_users");
        let emails: Vec<&str> = emails.iter().map(Email::as_str).collect::<BTreeSet<_>>().into_iter().collect();
        let cluster = cluster.to_string();
        self.pool.transaction(&[("cluster", &cluster)], |conn| {
            lock_cluster(conn, &cluster)?;
            if emails.is_empty() {
                return Ok(Vec::new());
            }
            // Invitees who have never signed in become users of provider `email`.
            let new_users: Vec<_> = emails
                .iter()
                .map(|email| {
                    let local = email.split_once('@').map_or(*email, |(local, _)| local);
                    (
                        users::id.eq(UserId::generate().to_string()),
                        users::email.eq(*email),
                        users::name.eq(local),
                        users::provider.eq(Provider::Email.as_str()),
                    )
                })
                .collect();
            diesel::insert_into(users::table)
                .values(&new_users)
                .on_conflict(users::email)
                .do_nothing()
                .execute(conn)?;
            // In user id order: the foreign-key checks take the users'
            // key-share locks in that order, as every multi-row write does.
            let invited = diesel::insert_into(user_clusters::table)
                .values(users::table.filter(users::email.eq_any(&emails)).order(users::id).select((
                    users::id,
                    cluster.as_str().into_sql::<Text>(),
                    Role::Invited.as_str().into_sql::<Text>(),
                )))
                .into_columns((user_clusters::user_id, user_clusters::cluster_id, user_clusters::role))
                .on_conflict_do_nothing()
                .execute(conn);
            match invited {
                Ok(_) => {}
                // A user deleted (by users.delete or another cluster's
                // clean-up) between the two inserts: an invitation is for an
                // e-mail, so the next attempt creates the invitee afresh.
                Err(diesel::result::Error::DatabaseError(DatabaseErrorKind::ForeignKeyViolation, _)) => {
                    return Err(Failure::Retry("an invited user was deleted meanwhile"));
                }
                Err(other) => return Err(other.into()),
            }
            let rows: Vec<MemberRow> = user_clusters::table
                .filter(user_clusters::cluster_id.eq(&cluster))
                .filter(user_clusters::email.eq_any(&emails))
                .order(user_clusters::email)
                .select(MemberRow::as_select())
                .load(conn)?;
            Ok(rows.into_iter().map(Member::try_from).collect::<StoreResult<Vec<_>>>()?)
        })
    }

    fn remove_users(&self, cluster: &ClusterId, users_to_remove: &[UserId]) -> StoreResult<()> {
        let _span = crate::trace::operation("clusters.remove_users");
        let ids: Vec<String> = users_to_remove.iter().map(UserId::to_string).collect();
        let cluster = cluster.to_string();
        self.pool.transaction(&[("cluster", &cluster)], |conn| {
            lock_cluster(conn, &cluster)?;
            let removes_owner: bool = diesel::select(diesel::dsl::exists(
                user_clusters::table
                    .filter(user_clusters::cluster_id.eq(&cluster))
                    .filter(user_clusters::user_id.eq_any(&ids))
                    .filter(user_clusters::role.eq(Role::Owner.as_str())),
            ))
            .get_result(conn)?;
            if removes_owner {
                return Err(StoreError::conflict(
                    "membership",
                    "owner",
                    "the owner cannot be removed; transfer ownership first",
                )
                .into());
            }
            // The invitees the clean-up below may delete, locked in id order
            // (after the cluster, before memberships) FOR UPDATE: that
            // conflicts with the key-share lock of a foreign-key check, so
            // no membership can be inserted for them elsewhere (a transfer
            // of ownership, an invitation) between the check of the clean-up
            // and their deletion, which would cascade it away.
            let invitees: Vec<String> = users::table
                .filter(users::id.eq_any(&ids))
                .filter(users::provider.eq(Provider::Email.as_str()))
                .order(users::id)
                .select(users::id)
                .for_update()
                .load(conn)?;
            diesel::delete(
                user_clusters::table
                    .filter(user_clusters::cluster_id.eq(&cluster))
                    .filter(user_clusters::user_id.eq_any(&ids)),
            )
            .execute(conn)?;
            if !invitees.is_empty() {
                // Invitees who never signed in and now belong nowhere are forgotten.
                diesel::delete(users::table.filter(users::id.eq_any(&invitees)).filter(diesel::dsl::not(
                    diesel::dsl::exists(
                        owner_memberships.filter(owner_memberships.field(user_clusters::user_id).eq(users::id)),
                    ),
                )))
                .execute(conn)?;
            }
            Ok(())
        })
    }

    fn accept_invite(&self, user: &UserId, cluster: &ClusterId) -> StoreResult<()> {
        let _span = crate::trace::operation("clusters.accept_invite");
        let updated = self.pool.run(&[], |conn| {
            diesel::update(
                user_clusters::table
                    .find((user.to_string(), cluster.to_string()))
                    .filter(user_clusters::role.eq(Role::Invited.as_str())),
            )
            .set(user_clusters::role.eq(Role::Viewer.as_str()))
            .execute(conn)
        })?;
        if updated == 0 {
            return Err(StoreError::not_found("invite", format!("{user} to {cluster}")));
        }
        Ok(())
    }

    fn decline_invite(&self, user: &UserId, cluster: &ClusterId) -> StoreResult<()> {
        let _span = crate::trace::operation("clusters.decline_invite");
        let deleted = self.pool.run(&[], |conn| {
            diesel::delete(
                user_clusters::table
                    .find((user.to_string(), cluster.to_string()))
                    .filter(user_clusters::role.eq(Role::Invited.as_str())),
            )
            .execute(conn)
        })?;
        if deleted == 0 {
            return Err(StoreError::not_found("invite", format!("{user} to {cluster}")));
        }
        Ok(())
    }

    fn pending_invites(&self, user: &UserId) -> StoreResult<Vec<PendingInvite>> {
        let _span = crate::trace::operation("clusters.pending_invites");
        let rows = self.memberships_of(Read::ClustersPendingInvites, user, MembershipKind::Invitations)?;
        Ok(rows
            .into_iter()
            .map(|summary| PendingInvite {
                cluster_id: summary.id,
                cluster_name: summary.name,
                owner_name: summary.owner_name,
            })
            .collect())
    }

    fn transfer_ownership(
        &self,
        cluster: &ClusterId,
        new_owner: &UserId,
        previous_owner_becomes: Option<Role>,
    ) -> StoreResult<()> {
        let _span = crate::trace::operation("clusters.transfer_ownership");
        if let Some(role @ (Role::Owner | Role::Invited)) = previous_owner_becomes {
            return Err(StoreError::invalid(
                "previous_owner_becomes",
                format!("the previous owner cannot become {role}"),
            ));
        }
        let cluster = cluster.to_string();
        let new_owner = new_owner.to_string();
        let demoted_to = previous_owner_becomes.unwrap_or(Role::Admin);
        self.pool.transaction(&[("cluster", &cluster), ("user", &new_owner)], |conn| {
            lock_cluster(conn, &cluster)?;
            // The new owner next (clusters, then users, then memberships):
            // key-share, as the foreign-key check of their membership would
            // take it, but before any membership is locked.
            users::table
                .find(&new_owner)
                .select(users::id)
                .for_key_share()
                .first::<String>(conn)
                .optional()?
                .ok_or_else(|| StoreError::not_found("user", &new_owner))?;
            // Demote first: the one-owner index is checked at once and must
            // never see two owners. A live cluster always has an owner (the
            // database refuses to commit one without), so demoting nobody
            // means the new owner already is the owner.
            let previous: Option<String> = diesel::update(
                user_clusters::table
                    .filter(user_clusters::cluster_id.eq(&cluster))
                    .filter(user_clusters::role.eq(Role::Owner.as_str()))
                    .filter(user_clusters::user_id.ne(&new_owner)),
            )
            .set(user_clusters::role.eq(demoted_to.as_str()))
            .returning(user_clusters::user_id)
            .get_result(conn)
            .optional()?;
            let Some(previous) = previous else {
                return Ok(());
            };
            diesel::insert_into(user_clusters::table)
                .values((
                    user_clusters::user_id.eq(&new_owner),
                    user_clusters::cluster_id.eq(&cluster),
                    user_clusters::role.eq(Role::Owner.as_str()),
                ))
                .on_conflict((user_clusters::user_id, user_clusters::cluster_id))
                .do_update()
                .set(user_clusters::role.eq(Role::Owner.as_str()))
                .execute(conn)?;
            if previous_owner_becomes.is_none() {
                // Only now: an owner's membership is never deleted while its
                // cluster lives (user_clusters_owner_kept).
                diesel::delete(user_clusters::table.find((previous.as_str(), cluster.as_str()))).execute(conn)?;
            }
            Ok(())
        })
    }

    fn owned_cluster(&self, user: &UserId) -> StoreResult<Option<ClusterSummary>> {
        let _span = crate::trace::operation("clusters.owned_cluster");
        let row: Option<(String, String, String)> = self.pool.route(Read::ClustersOwnedCluster).run(&[], |conn| {
            user_clusters::table
                .inner_join(clusters::table)
                .inner_join(users::table)
                .filter(user_clusters::user_id.eq(user.to_string()))
                .filter(user_clusters::role.eq(Role::Owner.as_str()))
                .order(clusters::created_at)
                .select((clusters::id, clusters::name, users::name))
                .first(conn)
                .optional()
        })?;
        row.map(|(id, name, owner)| Ok(ClusterSummary { id: ClusterId::parse(&id)?, name, owner_name: Some(owner) }))
            .transpose()
    }

    fn user_clusters(&self, user: &UserId) -> StoreResult<Vec<ClusterSummary>> {
        let _span = crate::trace::operation("clusters.user_clusters");
        self.memberships_of(Read::ClustersUserClusters, user, MembershipKind::Memberships)
    }

    fn members(&self, cluster: &ClusterId, page: &Page) -> StoreResult<Paged<Member>> {
        let _span = crate::trace::operation("clusters.members");
        self.page(
            Read::ClustersMembers,
            cluster,
            (role_order(Role::Owner), role_order(Role::Viewer)),
            MEMBERS_CURSOR,
            page,
        )
    }

    fn invites(&self, cluster: &ClusterId, page: &Page) -> StoreResult<Paged<Member>> {
        let _span = crate::trace::operation("clusters.invites");
        let invited = role_order(Role::Invited);
        self.page(Read::ClustersInvites, cluster, (invited, invited), INVITES_CURSOR, page)
    }

    fn role_of(&self, user: &UserId, cluster: &ClusterId) -> StoreResult<Option<Role>> {
        let _span = crate::trace::operation("clusters.role_of");
        let role: Option<String> = self.pool.route(Read::ClustersRoleOf).run(&[], |conn| {
            user_clusters::table
                .find((user.to_string(), cluster.to_string()))
                .select(user_clusters::role)
                .first(conn)
                .optional()
        })?;
        role.map(|role| role.parse()).transpose()
    }

    fn owner(&self, cluster: &ClusterId) -> StoreResult<Option<Member>> {
        let _span = crate::trace::operation("clusters.owner");
        Ok(self.members_where(Read::ClustersOwner, cluster, Role::Owner)?.into_iter().next())
    }

    fn users_with_role(&self, cluster: &ClusterId, role: Role) -> StoreResult<Vec<Member>> {
        let _span = crate::trace::operation("clusters.users_with_role");
        self.members_where(Read::ClustersUsersWithRole, cluster, role)
    }

    fn can_read(&self, user: &UserId, cluster: &ClusterId) -> StoreResult<bool> {
        let _span = crate::trace::operation("clusters.can_read");
        self.has_rank(Read::ClustersCanRead, user, cluster, Role::Viewer)
    }

    fn can_write(&self, user: &UserId, cluster: &ClusterId) -> StoreResult<bool> {
        let _span = crate::trace::operation("clusters.can_write");
        self.has_rank(Read::ClustersCanWrite, user, cluster, Role::Developer)
    }

    fn is_admin(&self, user: &UserId, cluster: &ClusterId) -> StoreResult<bool> {
        let _span = crate::trace::operation("clusters.is_admin");
        self.has_rank(Read::ClustersIsAdmin, user, cluster, Role::Admin)
    }

    fn is_owner(&self, user: &UserId, cluster: &ClusterId) -> StoreResult<bool> {
        let _span = crate::trace::operation("clusters.is_owner");
        self.has_rank(Read::ClustersIsOwner, user, cluster, Role::Owner)
    }

    fn integrations(&self, cluster: &ClusterId) -> StoreResult<Integrations> {
        let _span = crate::trace::operation("clusters.integrations");
        let metadata: Option<Value> = self.pool.route(Read::ClustersIntegrations).run(&[], |conn| {
            clusters::table.find(cluster.to_string()).select(clusters::metadata).first(conn).optional()
        })?;
        let metadata = metadata.ok_or_else(|| StoreError::not_found("cluster", cluster.to_string()))?;
        Ok(Integrations::from_metadata(&Metadata::from_stored(metadata)))
    }
}

/// Which of a user's memberships a listing wants.
#[derive(Clone, Copy)]
enum MembershipKind {
    Memberships,
    Invitations,
}

impl PgClusterStore {
    /// The clusters where `user` is a member (or invited), with each owner's
    /// name, in one statement.
    fn memberships_of(&self, read: Read, user: &UserId, kind: MembershipKind) -> StoreResult<Vec<ClusterSummary>> {
        let rows: Vec<(String, String, Option<String>)> = self.pool.route(read).run(&[], |conn| {
            let query = user_clusters::table
                .inner_join(clusters::table)
                .left_join(
                    owner_memberships.on(owner_memberships
                        .field(user_clusters::cluster_id)
                        .eq(clusters::id)
                        .and(owner_memberships.field(user_clusters::role).eq(Role::Owner.as_str()))),
                )
                .left_join(
                    users::table
                        .on(users::id.nullable().eq(owner_memberships.field(user_clusters::user_id).nullable())),
                )
                .filter(user_clusters::user_id.eq(user.to_string()))
                .order(clusters::created_at)
                .select((clusters::id, clusters::name, users::name.nullable()));
            match kind {
                MembershipKind::Memberships => query.filter(user_clusters::role.ne(Role::Invited.as_str())).load(conn),
                MembershipKind::Invitations => query.filter(user_clusters::role.eq(Role::Invited.as_str())).load(conn),
            }
        })?;
        summaries(rows)
    }
}

/// The desired non-owner role of each user: the highest they are listed under.
fn desired_roles(roles: &BTreeMap<Role, Vec<UserId>>) -> StoreResult<BTreeMap<String, Role>> {
    let mut desired = BTreeMap::new();
    for (role, users) in roles {
        if *role == Role::Owner {
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
/// SELECT listed.user_id, $1, listed.role FROM unnest($2, $3) AS listed (user_id, role)
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

impl QueryId for SetRoles<'_> {
    type QueryId = SetRoles<'static>;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl RunQueryDsl<PgConnection> for SetRoles<'_> {}

/// Makes the cluster's non-owner memberships exactly `desired` (the owner,
/// if listed, keeps ownership). Runs under the cluster lock.
fn set_roles(conn: &mut PgConnection, cluster: &str, desired: &BTreeMap<String, Role>) -> Result<(), Failure> {
    let listed: Vec<&str> = desired.keys().map(String::as_str).collect();
    // The listed users, key-share locked in id order before any membership
    // (the lock order of ARCHITECTURE.md): a concurrent users.delete of one
    // of them either finished (and they are reported missing here) or waits.
    let found: Vec<String> = if listed.is_empty() {
        Vec::new()
    } else {
        users::table.filter(users::id.eq_any(&listed)).order(users::id).select(users::id).for_key_share().load(conn)?
    };
    if found.len() < listed.len() {
        let missing: Vec<&str> = listed.iter().copied().filter(|user| !found.iter().any(|f| f == user)).collect();
        return Err(StoreError::not_found("user", missing.join(", ")).into());
    }
    let roles: Vec<&str> = desired.values().map(|role| role.as_str()).collect();
    SetRoles { cluster, users: &listed, roles: &roles }.execute(conn)?;
    Ok(())
}
