//! `PgUserStore`: users in PostgreSQL. Every query behind `UserStore` is in
//! this file.

use std::time::Duration;

use diesel::prelude::*;
use diesel::sql_types::Double;
use diesel::upsert::excluded;
use dployr_domain::text::{self, Blank};
use dployr_domain::{
    DisplayName, Email, MAX_USER_TEXT_BYTES, Metadata, NewUser, Provider, StoreError, StoreResult, User, UserId,
    UserPatch, UserStore,
};
use serde_json::Value;

use crate::PgPool;
use crate::errors::Failure;
use crate::parsed::{Parsed, Timestamp};
use crate::routes::Read;
use crate::schema::{clusters, sessions_to_end, user_clusters, users};
use crate::sql::{coalesce, coalesce_nullable, coalesce_time, greatest, nullif};

/// The server's `now()` less `age` (in the server's clock, as the rows'
/// `deleted_at`); an age past [`LONGEST_SESSION_TTL`] counts as that.
macro_rules! deleted_before {
    ($age:expr) => {
        diesel::dsl::sql::<diesel::sql_types::Timestamptz>("now() - make_interval(secs => ")
            .bind::<Double, _>($age.min(LONGEST_SESSION_TTL).as_secs_f64())
            .sql(")")
    };
}

/// The longest age `deleted_before!` takes: the longest TTL a key-value
/// backend takes (`dployr_domain::MAX_TTL`, 100 years).
const LONGEST_SESSION_TTL: Duration = dployr_domain::MAX_TTL;

/// A `users` row as selected.
#[derive(Queryable, Selectable)]
#[diesel(table_name = users, check_for_backend(diesel::pg::Pg))]
pub(crate) struct UserRow {
    id: Parsed<UserId>,
    email: String,
    name: String,
    picture: Option<String>,
    provider: Parsed<Provider>,
    metadata: Value,
    created_at: Timestamp,
    updated_at: Timestamp,
}

impl From<UserRow> for User {
    fn from(row: UserRow) -> User {
        User {
            id: row.id.0,
            email: Email::from_stored(row.email),
            name: row.name,
            picture: row.picture,
            provider: row.provider.0,
            metadata: Metadata::from_stored(row.metadata),
            created_at: row.created_at.0,
            updated_at: row.updated_at.0,
        }
    }
}

/// The roles whose sign-in metadata is merged into the cluster's.
const RUNS_A_CLUSTER: [&str; 2] = ["owner", "admin"];

/// The users of one PostgreSQL database.
#[derive(Debug, Clone)]
pub struct PgUserStore {
    pool: PgPool,
}

impl PgUserStore {
    /// A store over `pool`.
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// Of `ids`, those no user has, in one statement on the primary (so a
    /// delete this thread just made is seen). Whose sessions
    /// `DataLayer::remove_users` ends is
    /// [`sessions_to_end`](Self::sessions_to_end)'s answer instead: an id
    /// that never was an account costs nothing there.
    ///
    /// # Errors
    /// Backend errors.
    pub fn missing(&self, ids: &[UserId]) -> StoreResult<Vec<UserId>> {
        let op = self.pool.read(Read::UsersMissing);
        let wanted: Vec<String> = ids.iter().map(UserId::to_string).collect();
        let found: Vec<String> =
            op.run(|conn| users::table.filter(users::id.eq_any(&wanted)).select(users::id).load(conn))?;
        let found: std::collections::HashSet<String> = found.into_iter().collect();
        let mut missing: Vec<UserId> = ids.iter().filter(|id| !found.contains(&id.to_string())).copied().collect();
        missing.sort_unstable();
        missing.dedup();
        Ok(missing)
    }

    /// Of `ids`, the deleted accounts whose sessions are not yet known to be
    /// ended, in id order, in one statement on the primary: every statement
    /// that deletes accounts remembers them (`024_sessions_to_end`), and
    /// [`sessions_ended`](Self::sessions_ended) forgets them. How
    /// `DataLayer::remove_users` and `DataLayer::delete_user` find whose
    /// sessions to end, so that a retry after a sign-out that failed
    /// half-way ends only the rest. An id of an account that exists again
    /// (restored by hand) is not listed.
    ///
    /// # Errors
    /// Backend errors.
    pub fn sessions_to_end(&self, ids: &[UserId]) -> StoreResult<Vec<UserId>> {
        let op = self.pool.read(Read::UsersSessionsToEnd);
        let wanted: Vec<String> = ids.iter().map(UserId::to_string).collect();
        let pending: Vec<Parsed<UserId>> = op.run(|conn| {
            sessions_to_end::table
                .filter(sessions_to_end::user_id.eq_any(&wanted))
                .filter(diesel::dsl::not(diesel::dsl::exists(
                    users::table.filter(users::id.eq(sessions_to_end::user_id)),
                )))
                .select(sessions_to_end::user_id)
                .order(sessions_to_end::user_id)
                .load(conn)
        })?;
        Ok(pending.into_iter().map(|id| id.0).collect())
    }

    /// Forgets `ids` among the accounts whose sessions are to be ended (see
    /// [`sessions_to_end`](Self::sessions_to_end)): their sessions are
    /// ended. Forgets too every account deleted longer than `sessions_ttl`
    /// ago (see [`forget_sessions_to_end_older_than`](Self::forget_sessions_to_end_older_than)).
    /// One statement, none for no ids; ids not remembered are ignored.
    ///
    /// # Errors
    /// Backend errors.
    pub fn sessions_ended(&self, ids: &[UserId], sessions_ttl: Duration) -> StoreResult<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let op = self.pool.operation("users.sessions_ended");
        let ended: Vec<String> = ids.iter().map(UserId::to_string).collect();
        // One scan of the table's rows (a bitmap of both indexes, or the
        // table), in the rows' order whatever the ids' order, the same for
        // every such statement: two never wait for each other crosswise.
        op.run(|conn| {
            diesel::delete(
                sessions_to_end::table.filter(
                    sessions_to_end::user_id
                        .eq_any(&ended)
                        .or(sessions_to_end::deleted_at.lt(deleted_before!(sessions_ttl))),
                ),
            )
            .execute(conn)
        })?;
        Ok(())
    }

    /// Forgets every account deleted longer than `sessions_ttl` ago among
    /// those whose sessions are to be ended, and returns how many: any
    /// session made before such an account was deleted has expired, so a
    /// sign-out would find none of them. Accounts deleted through the
    /// stores directly (`users.delete`, `clusters.remove_users`) or by hand
    /// are remembered as those of `DataLayer`'s calls are, and no sign-out
    /// forgets them by name: this bounds them to one session TTL's worth.
    /// One statement (index `sessions_to_end_deleted_at_idx`).
    ///
    /// # Errors
    /// Backend errors.
    pub fn forget_sessions_to_end_older_than(&self, sessions_ttl: Duration) -> StoreResult<usize> {
        let op = self.pool.operation("users.forget_sessions_to_end");
        op.run(|conn| {
            diesel::delete(sessions_to_end::table.filter(sessions_to_end::deleted_at.lt(deleted_before!(sessions_ttl))))
                .execute(conn)
        })
    }
}

/// An e-mail that looks a user up, made by `Email::from_stored` (a record
/// deserialized from a cache, another service's answer) and so never
/// checked: one with a NUL is refused by name here, where PostgreSQL would
/// refuse the text as input of no field.
fn refuse_nul(field: &'static str, text: &str) -> StoreResult<()> {
    if text.contains('\0') {
        return Err(StoreError::invalid(field, "holds a NUL character, which PostgreSQL text cannot store"));
    }
    Ok(())
}

/// The picture URL's rule (the name's is [`DisplayName`]'s).
fn check_picture(picture: Option<&str>) -> StoreResult<()> {
    if let Some(picture) = picture {
        text::check("picture", picture, MAX_USER_TEXT_BYTES, Blank::Allowed)?;
    }
    Ok(())
}

impl UserStore for PgUserStore {
    fn upsert(&self, user: NewUser) -> StoreResult<User> {
        let op = self.pool.operation("users.upsert");
        check_picture(user.picture.as_deref())?;
        // An address made by `Email::from_stored` skipped the checks of a write.
        user.email.check()?;
        // A provider that sends an empty picture gives none: the stored one
        // stays (the original's `picture || null`).
        let picture = user.picture.as_deref().filter(|picture| !text::is_blank(picture));
        let id = UserId::generate().to_string();
        let given_name = user.name.as_ref().map(DisplayName::as_str);
        let name = given_name.unwrap_or_else(|| user.email.local_part());
        // Metadata made by `Metadata::from_stored` skipped the checks of a write.
        user.metadata.as_ref().map(Metadata::check).transpose()?;
        let merge = user.metadata.as_ref().map_or_else(|| Value::Object(Default::default()), Metadata::to_value);
        op.transaction(|conn| {
            // The sign-in's metadata also reaches the clusters the user runs.
            // Those rows are locked before the user's row, in id order: every
            // multi-row write takes clusters, then users, then memberships
            // (ARCHITECTURE.md), so this cannot deadlock with, say, the
            // removal of this user from one of those clusters.
            let runs: Vec<String> = if user.metadata.is_some() {
                clusters::table
                    .filter(
                        clusters::id.eq_any(
                            user_clusters::table
                                .inner_join(users::table)
                                .filter(users::email.eq(user.email.as_str()))
                                .filter(user_clusters::role.eq_any(RUNS_A_CLUSTER))
                                .select(user_clusters::cluster_id),
                        ),
                    )
                    .order(clusters::id)
                    .select(clusters::id)
                    .for_no_key_update()
                    .load(conn)?
            } else {
                Vec::new()
            };
            let row: UserRow = diesel::insert_into(users::table)
                .values((
                    users::id.eq(&id),
                    users::email.eq(user.email.as_str()),
                    users::name.eq(name),
                    users::picture.eq(picture),
                    users::provider.eq(user.provider.as_str()),
                    users::metadata.eq(&merge),
                    users::first_signed_in_at.eq(diesel::dsl::now),
                ))
                .on_conflict(users::email)
                .do_update()
                .set((
                    // Keep the stored name and picture unless this sign-in brings new ones.
                    users::name.eq(coalesce(given_name, users::name)),
                    users::picture.eq(coalesce_nullable(picture, users::picture)),
                    users::provider.eq(excluded(users::provider)),
                    users::metadata.eq(users::metadata.concat(&merge)),
                    // The first sign-in of an account an invitation made: it
                    // is no longer one `clusters.remove_users` may delete
                    // (`016_first_sign_in`). Never before its creation,
                    // whatever this transaction's start time was.
                    users::first_signed_in_at
                        .eq(coalesce_time(users::first_signed_in_at, greatest(diesel::dsl::now, users::created_at))),
                ))
                .returning(UserRow::as_returning())
                .get_result(conn)?;
            if !runs.is_empty() {
                // Among the locked clusters, those the user still runs: a
                // demotion that committed while this waited for the locks
                // counts (and no role can change now that they are held).
                let still_runs = user_clusters::table
                    .filter(user_clusters::user_id.eq(row.id.0.to_string()))
                    .filter(user_clusters::role.eq_any(RUNS_A_CLUSTER))
                    .select(user_clusters::cluster_id);
                diesel::update(
                    clusters::table.filter(clusters::id.eq_any(&runs)).filter(clusters::id.eq_any(still_runs)),
                )
                .set(clusters::metadata.eq(clusters::metadata.concat(&merge)))
                .execute(conn)?;
            }
            Ok::<_, Failure>(User::from(row))
        })
    }

    fn get(&self, id: &UserId) -> StoreResult<Option<User>> {
        let op = self.pool.read(Read::UsersGet);
        let row =
            op.run(|conn| users::table.find(id.to_string()).select(UserRow::as_select()).first(conn).optional())?;
        Ok(row.map(User::from))
    }

    fn get_by_email(&self, email: &Email) -> StoreResult<Option<User>> {
        refuse_nul("email", email.as_str())?;
        let op = self.pool.read(Read::UsersGetByEmail);
        let row = op.run(|conn| {
            users::table.filter(users::email.eq(email.as_str())).select(UserRow::as_select()).first(conn).optional()
        })?;
        Ok(row.map(User::from))
    }

    fn update(&self, email: &Email, patch: UserPatch) -> StoreResult<Option<User>> {
        refuse_nul("email", email.as_str())?;
        let op = self.pool.operation("users.update");
        check_picture(patch.picture.as_deref())?;
        let picture = patch.picture.as_deref().map(|picture| if text::is_blank(picture) { "" } else { picture });
        patch.metadata.as_ref().map(Metadata::check).transpose()?;
        let merge = patch.metadata.as_ref().map_or_else(|| Value::Object(Default::default()), Metadata::to_value);
        // One statement, in a transaction all the same: the returned row is
        // decoded inside it, so a row that cannot be read back is rolled
        // back instead of committed behind an error.
        op.transaction(|conn| {
            let row = diesel::update(users::table.filter(users::email.eq(email.as_str())))
                .set((
                    users::name.eq(coalesce(patch.name.as_ref().map(DisplayName::as_str), users::name)),
                    // A blank picture removes it: sent as '', which nullif
                    // stores as none (never a blank URL, which the
                    // memberships' copies would show as a broken image).
                    users::picture.eq(nullif(coalesce_nullable(picture, users::picture), "")),
                    users::provider.eq(coalesce(patch.provider.map(Provider::as_str), users::provider)),
                    users::metadata.eq(users::metadata.concat(&merge)),
                ))
                .returning(UserRow::as_returning())
                .get_result(conn)
                .optional()?;
            Ok::<_, Failure>(row.map(User::from))
        })
    }

    fn delete(&self, id: &UserId) -> StoreResult<()> {
        let op = self.pool.operation("users.delete").referencing("user", id);
        let id = id.to_string();
        op.transaction(|conn| {
            // FOR UPDATE, not FOR NO KEY UPDATE: it conflicts with the
            // key-share lock that a foreign-key check takes, so a membership
            // being inserted for this user elsewhere (a transfer of
            // ownership, an invitation) either commits before the check
            // below sees it, or waits for this delete and then finds the
            // user gone (its own NotFound, nothing written).
            let found = users::table.find(&id).select(users::id).for_update().first::<String>(conn).optional()?;
            if found.is_none() {
                return Err(StoreError::not_found("user", &id).into());
            }
            // Then their memberships, in cluster order (users before
            // memberships, as every multi-row write), so a role being
            // changed now is seen here rather than cascaded away afterwards.
            let roles: Vec<String> = user_clusters::table
                .filter(user_clusters::user_id.eq(&id))
                .order(user_clusters::cluster_id)
                .select(user_clusters::role)
                .for_update()
                .load(conn)?;
            if roles.iter().any(|role| role == "owner") {
                return Err(StoreError::conflict(
                    "user",
                    "owner",
                    "the user owns a cluster; transfer or delete it first",
                )
                .into());
            }
            diesel::delete(users::table.find(&id)).execute(conn)?;
            Ok(())
        })
    }
}
