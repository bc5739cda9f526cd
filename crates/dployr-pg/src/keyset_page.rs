//! The one shape of every paged listing of the stores: a page of rows after
//! a keyset position (or at an offset) with the listing's total, in one
//! statement ([`KeysetPage`]):
//!
//! ```sql
//! WITH page AS (
//!     SELECT <columns> FROM <table> WHERE <the listing> AND <after the cursor's key>
//!     ORDER BY <key>
//!     LIMIT $m OFFSET $n)
//! SELECT coalesce((SELECT <total> FROM cluster_counts WHERE cluster_id = $c), 0) AS total, page.*
//! FROM (SELECT) AS one LEFT JOIN page ON true
//! ```
//!
//! The left join keeps the total when the page is empty, which diesel's
//! builder cannot express. The outer query has no `ORDER BY`: SQL does not
//! promise that a join keeps the page's order, so [`paged`] sorts the (at
//! most a page of) items by the key itself, one pass over items that arrive
//! sorted; a second sort in the server cost about 15 % of the statement
//! (pgbench, 51 instances). The store's order is the server's: instance
//! ids (`015_instance_ids_by_bytes`) and member e-mails
//! (`005_member_email_order`) are `COLLATE "C"`, so both compare as bytes
//! there too, whatever the database's locale. Each row decodes,
//! by position, as a [`Counted`] row (crates.io's `WithCount<T>` is the
//! model): the total beside an item, absent (its columns all NULL) in the
//! one row of an empty page. The total is one row of `cluster_counts`, kept by
//! triggers (`004_listing_counts`), so a page of a huge cluster costs what a
//! page of a small one does. A listing ([`Listing`]) supplies its rows, its
//! key and its total; the keyset, the limit, the offset and the decoding are
//! written here once.

use diesel::pg::Pg;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::sql_types::{BigInt, Nullable, SqlType};
use diesel::{PgConnection, QueryResult, RunQueryDsl};
use dployr_domain::{Cursor, Page, PageStart, Paged, StoreError, StoreResult};

use crate::cursor;

/// What differs between the paged listings: the rows, their key, the total.
pub(crate) trait Listing: Copy {
    /// The SQL types of the columns `walk_rows` selects, in their order
    /// (the rows decode by position).
    type Columns: SqlType;
    /// The key the page is sorted by (`created_at DESC, id DESC`).
    const ORDER: &'static str;
    /// `SELECT <columns> FROM <table> WHERE <the listing> AND <after the key>`.
    fn walk_rows<'b>(&'b self, out: AstPass<'_, 'b, Pg>) -> QueryResult<()>;
    /// `SELECT <total> FROM cluster_counts WHERE cluster_id = $c`.
    fn walk_total<'b>(&'b self, out: AstPass<'_, 'b, Pg>) -> QueryResult<()>;
}

/// One page of `listing`, `offset` rows in: up to `rows` rows, the page's
/// limit and one more, which tells whether another page follows.
#[derive(Clone, Copy)]
pub(crate) struct KeysetPage<L> {
    listing: L,
    rows: i64,
    offset: i64,
}

impl<L> KeysetPage<L> {
    /// The page of at most `limit` items of `listing`, `offset` rows in. It
    /// asks for one row more, so that [`paged`] gives a next cursor only
    /// when an item follows (a last page that is exactly full has none).
    pub(crate) fn new(listing: L, limit: i64, offset: i64) -> Self {
        Self { listing, rows: limit.saturating_add(1), offset }
    }
}

impl<L: Listing> QueryFragment<Pg> for KeysetPage<L> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        out.push_sql("WITH page AS (\n    ");
        self.listing.walk_rows(out.reborrow())?;
        out.push_sql("\n    ORDER BY ");
        out.push_sql(L::ORDER);
        out.push_sql("\n    LIMIT ");
        out.push_bind_param::<BigInt, _>(&self.rows)?;
        out.push_sql(" OFFSET ");
        out.push_bind_param::<BigInt, _>(&self.offset)?;
        out.push_sql(")\nSELECT coalesce((");
        self.listing.walk_total(out.reborrow())?;
        out.push_sql("), 0) AS total, page.*\nFROM (SELECT) AS one LEFT JOIN page ON true");
        Ok(())
    }
}

impl<L: Listing + QueryId> QueryId for KeysetPage<L> {
    type QueryId = KeysetPage<L::QueryId>;
    const HAS_STATIC_QUERY_ID: bool = L::HAS_STATIC_QUERY_ID;
}

impl<L: Listing> Query for KeysetPage<L> {
    type SqlType = (BigInt, Nullable<L::Columns>);
}

impl<L: Listing> RunQueryDsl<PgConnection> for KeysetPage<L> {}

/// A row of a [`KeysetPage`]: the listing's total, and an item unless the
/// page is empty (a NULL in a column the item cannot lack, as in the one
/// row of an empty page, reads as no item).
pub(crate) type Counted<R> = (i64, Option<R>);

/// Where `page` starts: after the `N` key parts of its cursor (of listing
/// `kind`), or `offset` rows in.
pub(crate) fn start<const N: usize>(kind: &str, page: &Page) -> StoreResult<(Option<[String; N]>, i64)> {
    Ok(match &page.start {
        PageStart::First => (None, 0),
        PageStart::After(after) => (Some(cursor::decode::<N>(kind, after)?), 0),
        PageStart::Offset(skip) => {
            (None, i64::try_from(*skip).map_err(|_| StoreError::invalid("offset", "is too large"))?)
        }
    })
}

/// The page of at most `limit` items that the rows of a
/// [`KeysetPage::new`] of that `limit` make: its items put in the listing's
/// `order` (the listing's key, as the server sorts it), the total, and the
/// cursor after the last item when the row after it came too.
pub(crate) fn paged<R: Into<I>, I>(
    rows: Vec<Counted<R>>,
    limit: i64,
    order: impl Fn(&I, &I) -> std::cmp::Ordering,
    cursor_after: impl Fn(&I) -> Cursor,
) -> Paged<I> {
    let total = rows.first().map_or(0, |row| row.0);
    let mut items: Vec<I> = rows.into_iter().filter_map(|row| row.1).map(Into::into).collect();
    items.sort_unstable_by(order);
    let limit = usize::try_from(limit).unwrap_or(0);
    let more = items.len() > limit;
    items.truncate(limit);
    let next = items.last().filter(|_| more).map(cursor_after);
    Paged { items, total: u64::try_from(total).unwrap_or(0), next }
}
