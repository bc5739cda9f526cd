//! `PgClusterStore`: clusters and memberships in PostgreSQL. Every query
//! behind `ClusterStore` is in this folder.
//!
//! Concurrency: every write that changes a cluster's memberships first
//! locks the cluster row (`FOR NO KEY UPDATE`, which does not block the
//! key-share locks of inserts that reference the cluster), so such writes to
//! one cluster run one after another and each sees the last one's result.
//! The partial unique index `user_clusters_one_owner_per_cluster` backs the
//! "at most one owner" rule whatever a query does; the transactions keep
//! "at least one".
//!
//! Layout: this file holds the store and its `ClusterStore` impl, with the
//! rows they share; [`member_page`] the paged listings of members and
//! invitations; [`with_members`] the one statement of `clusters.get`;
//! [`roles`] the cluster lock and the one-statement role writes.

mod invitees;
mod member_page;
mod roles;
mod with_members;

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Nullable, Text};
use dployr_domain::text::{self, Blank};
use dployr_domain::{
    Cluster, ClusterId, ClusterName, ClusterPatch, ClusterStore, ClusterSummary, Email, GitHubIntegration,
    Integrations, Member, Metadata, Page, Paged, PendingInvite, Provider, Role, StoreError, StoreResult, UserId,
};
use serde_json::{Value, json};

use crate::errors::Failure;
use crate::parsed::{Parsed, Timestamp};
use crate::routes::Read;
use crate::schema::{clusters, user_clusters, users};
use crate::sql::coalesce;
use crate::statement::PlannedEachRun;
use crate::{Operation, PgPool};
use diesel::result::DatabaseErrorKind;
use invitees::NewInvitees;
use member_page::role_order;
use roles::{desired_roles, lock_cluster, set_roles};
use with_members::load_cluster;

diesel::alias!(user_clusters as owner_memberships: OwnerMemberships);

/// The clusters `user` owns, oldest first (by creation, then id): the
/// first is "the cluster the user owns" for both `owned_cluster` and
/// `create_for_owner`. A user may own several (`transfer_ownership` can give
/// an owner a second cluster), and the two must name the same one.
#[diesel::dsl::auto_type]
fn owned_by<'a>(user: &'a str) -> _ {
    let owner: &'static str = Role::Owner.as_str();
    user_clusters::table
        .inner_join(clusters::table)
        .filter(user_clusters::user_id.eq(user))
        .filter(user_clusters::role.eq(owner))
        .order((clusters::created_at, clusters::id))
}

/// The longest GitHub login id `install_github_integration` takes, in bytes
/// (it is looked up through an index, and GitHub's own are far shorter).
const MAX_LOGIN_ID_BYTES: usize = 255;

#[derive(Queryable, Selectable)]
#[diesel(table_name = clusters, check_for_backend(diesel::pg::Pg))]
struct ClusterRow {
    id: Parsed<ClusterId>,
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
    user_id: Parsed<UserId>,
    email: String,
    name: String,
    picture: Option<String>,
    role: Parsed<Role>,
    created_at: Timestamp,
}

impl From<MemberRow> for Member {
    fn from(row: MemberRow) -> Member {
        Member {
            user_id: row.user_id.0,
            email: Email::from_stored(row.email),
            name: row.name,
            picture: row.picture,
            role: row.role.0,
            since: row.created_at.0,
        }
    }
}

/// The cluster of `row` with `members`, grouped by role in listing order.
fn cluster_from(row: ClusterRow, members: Vec<MemberRow>) -> Cluster {
    let mut by_role: BTreeMap<Role, Vec<Member>> = BTreeMap::new();
    for member in members {
        let member = Member::from(member);
        by_role.entry(member.role).or_default().push(member);
    }
    // Listing order within a role: by e-mail. (Already sorted when the rows
    // came sorted, and then this costs one pass.)
    for members in by_role.values_mut() {
        members.sort_unstable_by(|a, b| a.email.as_str().cmp(b.email.as_str()));
    }
    Cluster {
        id: row.id.0,
        name: row.name,
        metadata: Metadata::from_stored(row.metadata),
        members: by_role,
        created_at: row.created_at,
        updated_at: row.updated_at,
    }
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
}

fn summaries(rows: Vec<(String, String, Option<String>)>) -> StoreResult<Vec<ClusterSummary>> {
    rows.into_iter()
        .map(|(id, name, owner_name)| Ok(ClusterSummary { id: ClusterId::parse(&id)?, name, owner_name }))
        .collect()
}

/// Which of a user's memberships a listing wants.
#[derive(Clone, Copy)]
enum MembershipKind {
    Memberships,
    Invitations,
}

/// The clusters where `user` is a member (or invited), with each owner's
/// name, in one statement.
///
/// Statements on one cluster's memberships pick them by `role_order`, never
/// by `role`: a prepared statement's generic plan (what PostgreSQL runs once
/// a database has many clusters) cannot use the partial index
/// `user_clusters_one_owner_per_cluster` for a bound `role = $n`, and scanned
/// all 100 000 memberships of a big cluster to find its owner (20 ms a
/// `user_clusters` for a member of it, `cargo xtask bench`), while
/// `role_order` is a key column of `user_clusters_cluster_id_order_idx`.
fn memberships_of(op: &Operation<'_>, user: &UserId, kind: MembershipKind) -> StoreResult<Vec<ClusterSummary>> {
    let rows: Vec<(String, String, Option<String>)> = op.run(|conn| {
        let query = user_clusters::table
            .inner_join(clusters::table)
            .left_join(
                owner_memberships.on(owner_memberships
                    .field(user_clusters::cluster_id)
                    .eq(clusters::id)
                    .and(owner_memberships.field(user_clusters::role_order).eq(role_order(Role::Owner)))),
            )
            .left_join(
                users::table.on(users::id.nullable().eq(owner_memberships.field(user_clusters::user_id).nullable())),
            )
            .filter(user_clusters::user_id.eq(user.to_string()))
            .order((clusters::created_at, clusters::id))
            .select((clusters::id, clusters::name, users::name.nullable()));
        match kind {
            MembershipKind::Memberships => query.filter(user_clusters::role.ne(Role::Invited.as_str())).load(conn),
            MembershipKind::Invitations => query.filter(user_clusters::role.eq(Role::Invited.as_str())).load(conn),
        }
    })?;
    summaries(rows)
}

/// The membership row of an invitation: found by (user, cluster), only while `invited`.
type Invitation = diesel::dsl::Filter<
    diesel::dsl::Find<user_clusters::table, (String, String)>,
    diesel::dsl::Eq<user_clusters::role, &'static str>,
>;

/// The membership row of `user`'s invitation to `cluster`, if they are invited.
fn invitation(user: &UserId, cluster: &ClusterId) -> Invitation {
    user_clusters::table
        .find((user.to_string(), cluster.to_string()))
        .filter(user_clusters::role.eq(Role::Invited.as_str()))
}

/// `NotFound` naming the invitation unless the statement on it touched a row.
fn invitation_found(touched: usize, user: &UserId, cluster: &ClusterId) -> StoreResult<()> {
    if touched == 0 {
        return Err(StoreError::not_found("invite", format!("{user} to {cluster}")));
    }
    Ok(())
}

/// The members of `cluster` with `role`, by e-mail, in one statement.
fn members_where(op: &Operation<'_>, cluster: &ClusterId, role: Role) -> StoreResult<Vec<Member>> {
    let rows: Vec<MemberRow> = op.run(|conn| {
        user_clusters::table
            .filter(user_clusters::cluster_id.eq(cluster.to_string()))
            .filter(user_clusters::role_order.eq(role_order(role)))
            .order(user_clusters::email)
            .select(MemberRow::as_select())
            .load(conn)
    })?;
    Ok(rows.into_iter().map(Member::from).collect())
}

/// Whether `user` holds at least the rank of `at_least` in `cluster`, in one statement.
fn has_rank(op: &Operation<'_>, user: &UserId, cluster: &ClusterId, at_least: Role) -> StoreResult<bool> {
    op.run(|conn| {
        diesel::select(diesel::dsl::exists(
            user_clusters::table
                .find((user.to_string(), cluster.to_string()))
                .filter(user_clusters::role_order.le(role_order(at_least))),
        ))
        .get_result(conn)
    })
}

impl ClusterStore for PgClusterStore {
    fn create_for_owner(&self, owner_id: &UserId) -> StoreResult<Cluster> {
        let op = self.pool.operation("clusters.create_for_owner").referencing("user", owner_id);
        let owner = owner_id.to_string();
        op.transaction(|conn| {
            // Two calls for one user queue on this lock; the second finds the
            // first one's cluster below.
            let user = users::table
                .find(&owner)
                .select(crate::users::UserRow::as_select())
                .for_no_key_update()
                .first(conn)
                .optional()?
                .ok_or_else(|| StoreError::not_found("user", &owner))?;
            // The cluster found is read again by a later statement, which
            // under READ COMMITTED sees what committed in between: a
            // transfer of its ownership or its deletion (neither waits for
            // the user's row). Return it only if that read still shows the
            // user as its owner, as of that read's snapshot; otherwise look
            // again. The clusters the user owns can only lose members while
            // the user's row is locked (a transfer to the user share-locks
            // it), so each turn of this loop finds one fewer and it ends.
            let mut passed: Option<String> = None;
            while let Some(owned) = owned_by(&owner).select(clusters::id).first::<String>(conn).optional()? {
                if passed.as_deref() == Some(owned.as_str()) {
                    return Err(StoreError::backend(
                        "clusters.create_for_owner",
                        format!("cluster {owned} is listed as owned by the user, yet read with another owner"),
                    )
                    .into());
                }
                match load_cluster(conn, &owned)? {
                    Some(cluster) if cluster.owner().is_some_and(|member| member.user_id == *owner_id) => {
                        return Ok(cluster);
                    }
                    _ => passed = Some(owned),
                }
            }
            let user = dployr_domain::User::from(user);
            let cluster_id = ClusterId::generate().to_string();
            let cluster: ClusterRow = diesel::insert_into(clusters::table)
                .values((clusters::id.eq(&cluster_id), clusters::name.eq(user.email.local_part())))
                .returning(ClusterRow::as_returning())
                .get_result(conn)?;
            let since: Timestamp = diesel::insert_into(user_clusters::table)
                .values((
                    user_clusters::user_id.eq(&owner),
                    user_clusters::cluster_id.eq(&cluster_id),
                    user_clusters::role.eq(Role::Owner.as_str()),
                ))
                .returning(user_clusters::created_at)
                .get_result(conn)?;
            let member = MemberRow {
                user_id: Parsed(*owner_id),
                email: user.email.to_string(),
                name: user.name,
                picture: user.picture,
                role: Parsed(Role::Owner),
                created_at: since,
            };
            Ok(cluster_from(cluster, vec![member]))
        })
    }

    fn get(&self, id: &ClusterId) -> StoreResult<Option<Cluster>> {
        let op = self.pool.read(Read::ClustersGet);
        let id = id.to_string();
        let row = op.run(|conn| with_members::select(conn, &id))?;
        row.map(Cluster::try_from).transpose()
    }

    fn update(&self, id: &ClusterId, patch: ClusterPatch) -> StoreResult<Option<Cluster>> {
        let op = self.pool.operation("clusters.update");
        let desired = patch.roles.as_ref().map(desired_roles).transpose()?;
        // Metadata made by `Metadata::from_stored` skipped the checks of a write.
        patch.metadata.as_ref().map(Metadata::check).transpose()?;
        let id = id.to_string();
        op.transaction(|conn| {
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
        let op = self.pool.operation("clusters.delete");
        let deleted = op.run(|conn| diesel::delete(clusters::table.find(id.to_string())).execute(conn))?;
        if deleted == 0 {
            return Err(StoreError::not_found("cluster", id.to_string()));
        }
        Ok(())
    }

    fn install_github_integration(&self, integration: GitHubIntegration) -> StoreResult<Option<Cluster>> {
        let op = self.pool.operation("clusters.install_github_integration");
        text::check("loginId", &integration.login_id, MAX_LOGIN_ID_BYTES, Blank::Refused)?;
        let mut settings = integration.settings.as_map().clone();
        settings.insert("loginId".into(), Value::String(integration.login_id.clone()));
        // Checked with the entry it adds, which the caller never sent: the
        // error says so, or its size would be one the caller cannot find.
        let settings = Metadata::from_map(settings).map_err(|error| match error {
            StoreError::Invalid { field, reason } => StoreError::Invalid {
                field,
                reason: format!("{reason} (with the `loginId` entry the store adds)").into(),
            },
            other => other,
        })?;
        let merge = json!({ "gitHub": settings.into_value() });
        op.transaction(|conn| {
            // The expression is spelled as in clusters_github_login_id_idx, keys
            // as literals, so the planner matches the index.
            let login_id = diesel::dsl::sql::<Nullable<Text>>("metadata -> 'gitHub' ->> 'loginId'");
            let linked: Option<String> = clusters::table
                .filter(login_id.eq(&integration.login_id))
                .order((clusters::created_at, clusters::id))
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
        let op = self.pool.operation("clusters.add_users").referencing("cluster", cluster);
        // Addresses made by `Email::from_stored` skipped the checks of a write.
        emails.iter().try_for_each(Email::check)?;
        let emails: Vec<&str> = emails.iter().map(Email::as_str).collect::<BTreeSet<_>>().into_iter().collect();
        let cluster = cluster.to_string();
        op.transaction(|conn| {
            lock_cluster(conn, &cluster)?;
            if emails.is_empty() {
                return Ok(Vec::new());
            }
            // Invitees who have never signed in become users of provider `email`.
            NewInvitees::new(&emails).execute(conn)?;
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
            // By user, planned for these values (`PlannedEachRun`): one
            // primary-key probe per invitee, whatever the cluster's size.
            let invitees = users::table.filter(users::email.eq_any(&emails)).select(users::id);
            let rows: Vec<MemberRow> = PlannedEachRun(
                user_clusters::table
                    .filter(user_clusters::user_id.eq_any(invitees))
                    .filter(user_clusters::cluster_id.eq(&cluster))
                    .order(user_clusters::email)
                    .select(MemberRow::as_select()),
            )
            .load(conn)?;
            // One membership per e-mail, unless an invitee the first insert
            // met (it locks nothing) was deleted before the second: its
            // e-mail found no user, so nothing failed and nothing was
            // written. The next attempt creates the invitee afresh.
            if rows.len() < emails.len() {
                return Err(Failure::Retry("an invited user was deleted meanwhile"));
            }
            Ok(rows.into_iter().map(Member::from).collect())
        })
    }

    fn remove_users(&self, cluster: &ClusterId, users_to_remove: &[UserId]) -> StoreResult<()> {
        let op = self.pool.operation("clusters.remove_users").referencing("cluster", cluster);
        let ids: Vec<String> = users_to_remove.iter().map(UserId::to_string).collect();
        let cluster = cluster.to_string();
        op.transaction(|conn| {
            lock_cluster(conn, &cluster)?;
            let removes_owner: bool = diesel::select(diesel::dsl::exists(
                user_clusters::table
                    .filter(user_clusters::cluster_id.eq(&cluster))
                    .filter(user_clusters::role_order.eq(role_order(Role::Owner)))
                    .filter(user_clusters::user_id.eq_any(&ids)),
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
            // The invitees the clean-up below may delete: e-mail accounts
            // listed *and members of this cluster* (whose membership this
            // call removes; the cluster's lock keeps that set still), never
            // an account that only has its id named here. Locked in id order
            // (after the cluster, before memberships) FOR UPDATE: that
            // conflicts with the key-share lock of a foreign-key check, so
            // no membership can be inserted for them elsewhere (a transfer
            // of ownership, an invitation) between the check of the clean-up
            // and their deletion, which would cascade it away.
            let invitees: Vec<String> = users::table
                .filter(users::id.eq_any(&ids))
                .filter(users::provider.eq(Provider::Email.as_str()))
                // Made by an invitation and never signed in: an account
                // signed in by one-time code has provider `email` too
                // (`016_first_sign_in`). Read again on the row's latest
                // version after a wait for its lock, so a sign-in that
                // committed meanwhile keeps its account.
                .filter(users::first_signed_in_at.is_null())
                .filter(diesel::dsl::exists(
                    user_clusters::table
                        .filter(user_clusters::cluster_id.eq(&cluster))
                        .filter(user_clusters::user_id.eq(users::id)),
                ))
                .order(users::id)
                .select(users::id)
                .for_update()
                .load(conn)?;
            // Planned for these values (`PlannedEachRun`): one primary-key
            // probe per user, whatever the cluster's size.
            PlannedEachRun(diesel::delete(
                user_clusters::table
                    .filter(user_clusters::user_id.eq_any(&ids))
                    .filter(user_clusters::cluster_id.eq(&cluster)),
            ))
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
        let op = self.pool.operation("clusters.accept_invite");
        let updated = op.run(|conn| {
            diesel::update(invitation(user, cluster)).set(user_clusters::role.eq(Role::Viewer.as_str())).execute(conn)
        })?;
        invitation_found(updated, user, cluster)
    }

    fn decline_invite(&self, user: &UserId, cluster: &ClusterId) -> StoreResult<()> {
        let op = self.pool.operation("clusters.decline_invite");
        let deleted = op.run(|conn| diesel::delete(invitation(user, cluster)).execute(conn))?;
        invitation_found(deleted, user, cluster)
    }

    fn pending_invites(&self, user: &UserId) -> StoreResult<Vec<PendingInvite>> {
        let op = self.pool.read(Read::ClustersPendingInvites);
        let rows = memberships_of(&op, user, MembershipKind::Invitations)?;
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
        let op = self
            .pool
            .operation("clusters.transfer_ownership")
            .referencing("cluster", cluster)
            .referencing("user", new_owner);
        if let Some(role @ (Role::Owner | Role::Invited)) = previous_owner_becomes {
            return Err(StoreError::invalid(
                "previous_owner_becomes",
                format!("the previous owner cannot become {role}"),
            ));
        }
        let cluster = cluster.to_string();
        let new_owner = new_owner.to_string();
        let demoted_to = previous_owner_becomes.unwrap_or(Role::Admin);
        op.transaction(|conn| {
            lock_cluster(conn, &cluster)?;
            // The new owner next (clusters, then users, then memberships):
            // share-locked, as inserting their membership would lock them
            // (the copy of their profile, 007_profile_copy_lock), but before
            // any membership is locked.
            users::table
                .find(&new_owner)
                .select(users::id)
                .for_share()
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
                    .filter(user_clusters::role_order.eq(role_order(Role::Owner)))
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
        let op = self.pool.read(Read::ClustersOwnedCluster);
        let row: Option<(String, String, String)> = op.run(|conn| {
            owned_by(&user.to_string())
                .inner_join(users::table)
                .select((clusters::id, clusters::name, users::name))
                .first(conn)
                .optional()
        })?;
        row.map(|(id, name, owner)| Ok(ClusterSummary { id: ClusterId::parse(&id)?, name, owner_name: Some(owner) }))
            .transpose()
    }

    fn user_clusters(&self, user: &UserId) -> StoreResult<Vec<ClusterSummary>> {
        let op = self.pool.read(Read::ClustersUserClusters);
        memberships_of(&op, user, MembershipKind::Memberships)
    }

    fn members(&self, cluster: &ClusterId, page: &Page) -> StoreResult<Paged<Member>> {
        let op = self.pool.read(Read::ClustersMembers);
        member_page::members(&op, cluster, page)
    }

    fn invites(&self, cluster: &ClusterId, page: &Page) -> StoreResult<Paged<Member>> {
        let op = self.pool.read(Read::ClustersInvites);
        member_page::invites(&op, cluster, page)
    }

    fn role_of(&self, user: &UserId, cluster: &ClusterId) -> StoreResult<Option<Role>> {
        let op = self.pool.read(Read::ClustersRoleOf);
        let role: Option<String> = op.run(|conn| {
            user_clusters::table
                .find((user.to_string(), cluster.to_string()))
                .select(user_clusters::role)
                .first(conn)
                .optional()
        })?;
        role.map(|role| role.parse()).transpose()
    }

    fn owner(&self, cluster: &ClusterId) -> StoreResult<Option<Member>> {
        let op = self.pool.read(Read::ClustersOwner);
        Ok(members_where(&op, cluster, Role::Owner)?.into_iter().next())
    }

    fn users_with_role(&self, cluster: &ClusterId, role: Role) -> StoreResult<Vec<Member>> {
        let op = self.pool.read(Read::ClustersUsersWithRole);
        members_where(&op, cluster, role)
    }

    fn can_read(&self, user: &UserId, cluster: &ClusterId) -> StoreResult<bool> {
        let op = self.pool.read(Read::ClustersCanRead);
        has_rank(&op, user, cluster, Role::Viewer)
    }

    fn can_write(&self, user: &UserId, cluster: &ClusterId) -> StoreResult<bool> {
        let op = self.pool.read(Read::ClustersCanWrite);
        has_rank(&op, user, cluster, Role::Developer)
    }

    fn is_admin(&self, user: &UserId, cluster: &ClusterId) -> StoreResult<bool> {
        let op = self.pool.read(Read::ClustersIsAdmin);
        has_rank(&op, user, cluster, Role::Admin)
    }

    fn is_owner(&self, user: &UserId, cluster: &ClusterId) -> StoreResult<bool> {
        let op = self.pool.read(Read::ClustersIsOwner);
        has_rank(&op, user, cluster, Role::Owner)
    }

    fn integrations(&self, cluster: &ClusterId) -> StoreResult<Integrations> {
        let op = self.pool.read(Read::ClustersIntegrations);
        let metadata: Option<Value> =
            op.run(|conn| clusters::table.find(cluster.to_string()).select(clusters::metadata).first(conn).optional())?;
        let metadata = metadata.ok_or_else(|| StoreError::not_found("cluster", cluster.to_string()))?;
        Ok(Integrations::from_metadata(&Metadata::from_stored(metadata)))
    }
}
