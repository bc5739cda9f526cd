//! The paged listings of a cluster's members and of its invitations: one
//! [`KeysetPage`] each, by role rank then e-mail.

use diesel::QueryResult;
use diesel::pg::Pg;
use diesel::query_builder::AstPass;
use diesel::sql_types::{Bool, Nullable, SmallInt, Text, Timestamptz};
use dployr_domain::{ClusterId, Member, Page, Paged, Role, StoreError, StoreResult};

use super::MemberRow;
use crate::keyset_page::{self, Counted, KeysetPage, Listing};
use crate::statement::load_all;
use crate::{Operation, cursor};

/// The cursor kinds of the two listings: a cursor of one is refused by the other.
const MEMBERS_CURSOR: &str = "members";
const INVITES_CURSOR: &str = "invites";

/// `role_order` of each role, as the schema's generated column computes it
/// (0 for the owner, 4 for an invitation).
pub(super) fn role_order(role: Role) -> i16 {
    4 - role.rank()
}

/// A page of a cluster's members (owner to viewer), by role rank then
/// e-mail, with their total.
pub(super) fn members(op: &Operation<'_>, cluster: &ClusterId, page: &Page) -> StoreResult<Paged<Member>> {
    load(op, cluster, (role_order(Role::Owner), role_order(Role::Viewer)), MEMBERS_CURSOR, page)
}

/// A page of a cluster's invitations, by e-mail, with their total.
pub(super) fn invites(op: &Operation<'_>, cluster: &ClusterId, page: &Page) -> StoreResult<Paged<Member>> {
    let invited = role_order(Role::Invited);
    load(op, cluster, (invited, invited), INVITES_CURSOR, page)
}

/// The rows of a cluster's memberships whose `role_order` is in a range,
/// after a keyset position `(role_order, email)`, on
/// `user_clusters_cluster_id_order_idx`; the total is the members' or the
/// invitations' count of `cluster_counts`. The whole statement, as a
/// [`KeysetPage`]:
///
/// ```sql
/// WITH page AS (
///     SELECT user_id, email, name, picture, role, created_at
///     FROM user_clusters
///     WHERE cluster_id = $1 AND role_order BETWEEN $2 AND $3 AND (role_order, email) > ($4, $5)
///     ORDER BY role_order, email
///     LIMIT $6 OFFSET $7)
/// SELECT coalesce((SELECT CASE WHEN $8 THEN invites ELSE members END
///                  FROM cluster_counts WHERE cluster_id = $9), 0) AS total, page.*
/// FROM (SELECT) AS one LEFT JOIN page ON true
/// ```
///
/// The store sorts the page by rank, then e-mail bytes, itself (see
/// [`keyset_page`]).
///
/// `$8` picks the total (invitations or members) as a bound value, not as
/// SQL text, so that both listings are one prepared statement.
#[derive(Clone, Copy)]
struct MemberRows<'a> {
    cluster: &'a str,
    orders: (i16, i16),
    /// Which total: invitations, or members (every other role).
    invites: bool,
    after: (i16, &'a str),
}

impl Listing for MemberRows<'_> {
    type Columns = (Text, Text, Text, Nullable<Text>, Text, Timestamptz);
    const ORDER: &'static str = "role_order, email";

    fn walk_rows<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        out.push_sql(
            "SELECT user_id, email, name, picture, role, created_at\n    \
             FROM user_clusters\n    WHERE cluster_id = ",
        );
        out.push_bind_param::<Text, _>(&self.cluster)?;
        out.push_sql(" AND role_order BETWEEN ");
        out.push_bind_param::<SmallInt, _>(&self.orders.0)?;
        out.push_sql(" AND ");
        out.push_bind_param::<SmallInt, _>(&self.orders.1)?;
        out.push_sql(" AND (role_order, email) > (");
        out.push_bind_param::<SmallInt, _>(&self.after.0)?;
        out.push_sql(", ");
        out.push_bind_param::<Text, _>(&self.after.1)?;
        out.push_sql(")");
        Ok(())
    }

    fn walk_total<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        out.push_sql("SELECT CASE WHEN ");
        out.push_bind_param::<Bool, _>(&self.invites)?;
        out.push_sql(" THEN invites ELSE members END\n                 FROM cluster_counts WHERE cluster_id = ");
        out.push_bind_param::<Text, _>(&self.cluster)?;
        Ok(())
    }
}

crate::statement::static_query_id!(MemberRows);

fn load(
    op: &Operation<'_>,
    cluster: &ClusterId,
    orders: (i16, i16),
    kind: &str,
    page: &Page,
) -> StoreResult<Paged<Member>> {
    // A cursor names its cluster: one of another cluster's listing would
    // otherwise be taken for a position in this one, and skip its rows.
    let kind = format!("{kind} {cluster}");
    let (after, offset) = keyset_page::start::<2>(&kind, page)?;
    // Before the first row: below every rank, and below every e-mail.
    let (after_order, after_email) = match after {
        None => (-1, String::new()),
        Some([order, email]) => {
            (order.parse().map_err(|_| StoreError::invalid("cursor", "is not a cursor of this listing"))?, email)
        }
    };
    let limit = i64::from(page.limit());
    let cluster = cluster.to_string();
    let listing = MemberRows {
        cluster: &cluster,
        orders,
        invites: orders.0 == role_order(Role::Invited),
        after: (after_order, &after_email),
    };
    let statement = KeysetPage::new(listing, limit, offset);
    let rows: Vec<Counted<MemberRow>> = op.run(|conn| load_all(statement, conn))?;
    let by_rank_then_email =
        |a: &Member, b: &Member| (role_order(a.role), a.email.as_str()).cmp(&(role_order(b.role), b.email.as_str()));
    Ok(keyset_page::paged(rows, limit, by_rank_then_email, |member| {
        cursor::encode(&kind, &[&role_order(member.role).to_string(), member.email.as_str()])
    }))
}

#[cfg(test)]
mod tests {
    use super::{KeysetPage, MemberRows};

    #[test]
    fn the_doc_comment_holds_the_statement_sent() {
        let statement =
            KeysetPage::new(MemberRows { cluster: "c", orders: (0, 3), invites: false, after: (-1, "") }, 20, 0);
        crate::statement::assert_documented(include_str!("member_page.rs"), "MemberRows", &statement);
    }
}
