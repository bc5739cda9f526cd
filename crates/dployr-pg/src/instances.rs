//! `PgInstanceStore`: instances in PostgreSQL. Every query behind
//! `InstanceStore` is in this file.

use chrono::{DateTime, Datelike as _, Utc};
use diesel::pg::Pg;
use diesel::prelude::*;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::sql_types::{BigInt, Nullable, Text, Timestamptz};
use dployr_domain::{
    ClusterId, Instance, InstanceId, InstanceStore, Metadata, NewInstance, Page, PageStart, Paged, StoreError,
    StoreResult, Tag,
};
use serde_json::Value;

use crate::errors::Failure;
use crate::routes::Read;
use crate::schema::instances;
use crate::{PgPool, cursor};

#[derive(Queryable, Selectable)]
#[diesel(table_name = instances, check_for_backend(diesel::pg::Pg))]
struct InstanceRow {
    id: String,
    cluster_id: String,
    address: String,
    tag: String,
    metadata: Value,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl TryFrom<InstanceRow> for Instance {
    type Error = StoreError;

    fn try_from(row: InstanceRow) -> StoreResult<Instance> {
        Ok(Instance {
            id: InstanceId::parse(&row.id)?,
            cluster_id: ClusterId::parse(&row.cluster_id)?,
            address: row.address,
            tag: row.tag,
            metadata: Metadata::from_stored(row.metadata),
            created_at: row.created_at,
            updated_at: row.updated_at,
        })
    }
}

/// One row of the page query: the total, and an instance unless the page is empty.
#[derive(QueryableByName)]
struct PageRow {
    #[diesel(sql_type = BigInt)]
    total: i64,
    #[diesel(sql_type = Nullable<Text>)]
    id: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    cluster_id: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    address: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    tag: Option<String>,
    #[diesel(sql_type = Nullable<diesel::sql_types::Jsonb>)]
    metadata: Option<Value>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    created_at: Option<DateTime<Utc>>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    updated_at: Option<DateTime<Utc>>,
}

/// A page of a cluster's instances, newest first, after a keyset position
/// `(created_at, id)`, with their total, in one statement: the left join
/// keeps the total when the page is empty, which diesel's builder cannot
/// express. The page runs on `instances_cluster_id_created_at_idx`; the
/// total is one row of `cluster_counts` (kept by triggers), not a count. A
/// type of its own (rather than `sql_query`) so diesel prepares it once per
/// connection.
///
/// The outer query has no `ORDER BY`: SQL does not promise that a join
/// keeps the page's order, so the store sorts the (at most a page of) rows
/// itself, which costs one pass over rows that arrive sorted; a second sort
/// in the server cost about 15 % of the statement (pgbench, 51 instances).
/// Ids are ULIDs (`[0-9A-Z]`, one length), which order the same as numbers,
/// as bytes and under any collation.
struct InstancePage<'a> {
    cluster: &'a str,
    before: (DateTime<Utc>, &'a str),
    limit: i64,
    offset: i64,
}

impl QueryFragment<Pg> for InstancePage<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        out.push_sql(
            "WITH page AS (\n    SELECT id, cluster_id, address, tag, metadata, created_at, updated_at\n    \
             FROM instances\n    WHERE cluster_id = ",
        );
        out.push_bind_param::<Text, _>(&self.cluster)?;
        out.push_sql(" AND (created_at, id) < (");
        out.push_bind_param::<Timestamptz, _>(&self.before.0)?;
        out.push_sql(", ");
        out.push_bind_param::<Text, _>(&self.before.1)?;
        out.push_sql(")\n    ORDER BY created_at DESC, id DESC\n    LIMIT ");
        out.push_bind_param::<BigInt, _>(&self.limit)?;
        out.push_sql(" OFFSET ");
        out.push_bind_param::<BigInt, _>(&self.offset)?;
        out.push_sql(")\nSELECT coalesce((SELECT instances FROM cluster_counts WHERE cluster_id = ");
        out.push_bind_param::<Text, _>(&self.cluster)?;
        out.push_sql("), 0) AS total, page.*\nFROM (SELECT) AS one LEFT JOIN page ON true");
        Ok(())
    }
}

impl QueryId for InstancePage<'_> {
    type QueryId = InstancePage<'static>;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl Query for InstancePage<'_> {
    type SqlType = diesel::sql_types::Untyped;
}

impl RunQueryDsl<PgConnection> for InstancePage<'_> {}

const CURSOR_KIND: &str = "instances";

/// The instances of one PostgreSQL database.
#[derive(Debug, Clone)]
pub struct PgInstanceStore {
    pool: PgPool,
}

impl PgInstanceStore {
    /// A store over `pool`.
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }
}

impl InstanceStore for PgInstanceStore {
    fn create(&self, cluster: &ClusterId, instance: NewInstance) -> StoreResult<Instance> {
        let _span = crate::trace::operation("instances.create");
        let metadata = instance.metadata.unwrap_or_default().into_value();
        let cluster = cluster.to_string();
        // One statement, in a transaction so that the returned row is decoded
        // before the commit: a row that cannot be read back is rolled back.
        self.pool.transaction(&[("cluster", &cluster)], |conn| {
            let row = diesel::insert_into(instances::table)
                .values((
                    instances::id.eq(InstanceId::generate().to_string()),
                    instances::cluster_id.eq(&cluster),
                    instances::address.eq(instance.address.as_str()),
                    instances::tag.eq(instance.tag.as_str()),
                    instances::metadata.eq(&metadata),
                ))
                .returning(InstanceRow::as_returning())
                .get_result(conn)?;
            Ok::<_, Failure>(Instance::try_from(row)?)
        })
    }

    fn get(&self, id: &InstanceId) -> StoreResult<Option<Instance>> {
        let _span = crate::trace::operation("instances.get");
        let row = self.pool.route(Read::InstancesGet).run(&[], |conn| {
            instances::table.find(id.to_string()).select(InstanceRow::as_select()).first(conn).optional()
        })?;
        row.map(Instance::try_from).transpose()
    }

    fn get_by_tag(&self, tag: &Tag) -> StoreResult<Option<Instance>> {
        let _span = crate::trace::operation("instances.get_by_tag");
        let row = self.pool.route(Read::InstancesGetByTag).run(&[], |conn| {
            instances::table
                .filter(instances::tag.eq(tag.as_str()))
                .select(InstanceRow::as_select())
                .first(conn)
                .optional()
        })?;
        row.map(Instance::try_from).transpose()
    }

    fn update_metadata(&self, id: &InstanceId, metadata: Metadata) -> StoreResult<Option<Instance>> {
        let _span = crate::trace::operation("instances.update_metadata");
        let metadata = metadata.into_value();
        // In a transaction for the same reason as `create`.
        self.pool.transaction(&[], |conn| {
            let row = diesel::update(instances::table.find(id.to_string()))
                .set(instances::metadata.eq(&metadata))
                .returning(InstanceRow::as_returning())
                .get_result(conn)
                .optional()?;
            Ok::<_, Failure>(row.map(Instance::try_from).transpose()?)
        })
    }

    fn delete(&self, id: &InstanceId) -> StoreResult<()> {
        let _span = crate::trace::operation("instances.delete");
        let deleted = self.pool.run(&[], |conn| diesel::delete(instances::table.find(id.to_string())).execute(conn))?;
        if deleted == 0 {
            return Err(StoreError::not_found("instance", id.to_string()));
        }
        Ok(())
    }

    fn list_by_cluster(&self, cluster: &ClusterId, page: &Page) -> StoreResult<Paged<Instance>> {
        let _span = crate::trace::operation("instances.list_by_cluster");
        // Before the first item: later than any timestamp a row can have,
        // above any id (a year PostgreSQL and every client can spell).
        let far_future = DateTime::from_timestamp(253_402_300_799, 999_999_000).unwrap_or(DateTime::<Utc>::MAX_UTC);
        let (mut before_at, mut before_id, mut offset) = (far_future, "~".to_owned(), 0_i64);
        match &page.start {
            PageStart::First => {}
            PageStart::After(after) => {
                let [micros, id] = cursor::decode::<2>(CURSOR_KIND, after)?;
                before_at = micros
                    .parse::<i64>()
                    .ok()
                    .and_then(DateTime::from_timestamp_micros)
                    // Years PostgreSQL and chrono both hold; a forged cursor
                    // outside them would fail in the database, not as Invalid.
                    .filter(|at| (1..=9999).contains(&at.year()))
                    .ok_or_else(|| StoreError::invalid("cursor", "is not a cursor of this listing"))?;
                before_id = id;
            }
            PageStart::Offset(skip) => {
                offset = i64::try_from(*skip).map_err(|_| StoreError::invalid("offset", "is too large"))?;
            }
        }
        let limit = i64::from(page.limit());
        let rows: Vec<PageRow> = self.pool.route(Read::InstancesListByCluster).run(&[], |conn| {
            InstancePage { cluster: &cluster.to_string(), before: (before_at, &before_id), limit, offset }.load(conn)
        })?;
        let total = rows.first().map_or(0, |row| row.total);
        let mut items = rows
            .into_iter()
            .filter_map(|row| {
                Some(InstanceRow {
                    id: row.id?,
                    cluster_id: row.cluster_id?,
                    address: row.address?,
                    tag: row.tag?,
                    metadata: row.metadata?,
                    created_at: row.created_at?,
                    updated_at: row.updated_at?,
                })
            })
            .map(Instance::try_from)
            .collect::<StoreResult<Vec<_>>>()?;
        // Newest first, as `InstancePage` says; see there why here.
        items.sort_unstable_by_key(|item| std::cmp::Reverse((item.created_at, item.id)));
        let next = match items.last() {
            Some(last) if items.len() as i64 == limit => Some(cursor::encode(
                CURSOR_KIND,
                &[&last.created_at.timestamp_micros().to_string(), &last.id.to_string()],
            )),
            _ => None,
        };
        Ok(Paged { items, total: u64::try_from(total).unwrap_or(0), next })
    }
}
