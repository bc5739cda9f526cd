//! `PgInstanceStore`: instances in PostgreSQL. Every query behind
//! `InstanceStore` is in this file.

use chrono::{DateTime, Datelike as _, Utc};
use diesel::pg::Pg;
use diesel::prelude::*;
use diesel::query_builder::AstPass;
use diesel::sql_types::{Jsonb, Text, Timestamptz};
use dployr_domain::{
    ClusterId, Instance, InstanceId, InstanceStore, Metadata, NewInstance, Page, Paged, StoreError, StoreResult, Tag,
};
use serde_json::Value;

use crate::errors::Failure;
use crate::keyset_page::{self, Counted, KeysetPage, Listing};
use crate::parsed::{Parsed, Timestamp};
use crate::routes::Read;
use crate::schema::instances;
use crate::statement::load_all;
use crate::{PgPool, cursor};

#[derive(Queryable, Selectable)]
#[diesel(table_name = instances, check_for_backend(diesel::pg::Pg))]
struct InstanceRow {
    id: Parsed<InstanceId>,
    cluster_id: Parsed<ClusterId>,
    address: String,
    tag: String,
    metadata: Value,
    created_at: Timestamp,
    updated_at: Timestamp,
}

impl From<InstanceRow> for Instance {
    fn from(row: InstanceRow) -> Instance {
        Instance {
            id: row.id.0,
            cluster_id: row.cluster_id.0,
            address: row.address,
            tag: row.tag,
            metadata: Metadata::from_stored(row.metadata),
            created_at: row.created_at.0,
            updated_at: row.updated_at.0,
        }
    }
}

/// The rows of a cluster's instances, newest first, before a keyset
/// position `(created_at, id)`, on `instances_cluster_id_created_at_idx`;
/// the total is the instances' count of `cluster_counts`. The whole
/// statement, as a [`KeysetPage`]:
///
/// ```sql
/// WITH page AS (
///     SELECT id, cluster_id, address, tag, metadata, created_at, updated_at
///     FROM instances
///     WHERE cluster_id = $1 AND (created_at, id) < ($2, $3)
///     ORDER BY created_at DESC, id DESC
///     LIMIT $4 OFFSET $5)
/// SELECT coalesce((SELECT instances FROM cluster_counts WHERE cluster_id = $6), 0) AS total, page.*
/// FROM (SELECT) AS one LEFT JOIN page ON true
/// ```
///
/// The store sorts the page newest first itself (see [`keyset_page`]).
#[derive(Clone, Copy)]
struct InstanceRows<'a> {
    cluster: &'a str,
    before: (DateTime<Utc>, &'a str),
}

impl Listing for InstanceRows<'_> {
    type Columns = (Text, Text, Text, Text, Jsonb, Timestamptz, Timestamptz);
    const ORDER: &'static str = "created_at DESC, id DESC";

    fn walk_rows<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        out.push_sql(
            "SELECT id, cluster_id, address, tag, metadata, created_at, updated_at\n    \
             FROM instances\n    WHERE cluster_id = ",
        );
        out.push_bind_param::<Text, _>(&self.cluster)?;
        out.push_sql(" AND (created_at, id) < (");
        out.push_bind_param::<Timestamptz, _>(&self.before.0)?;
        out.push_sql(", ");
        out.push_bind_param::<Text, _>(&self.before.1)?;
        out.push_sql(")");
        Ok(())
    }

    fn walk_total<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        out.push_sql("SELECT instances FROM cluster_counts WHERE cluster_id = ");
        out.push_bind_param::<Text, _>(&self.cluster)?;
        Ok(())
    }
}

crate::statement::static_query_id!(InstanceRows);

const CURSOR_KIND: &str = "instances";

/// The years a cursor's timestamp may fall in: those PostgreSQL and every
/// client can spell.
const YEARS: std::ops::RangeInclusive<i32> = 1..=9999;

/// The last microsecond of year 9999, after which no row can be created:
/// the position before the first page.
const LAST_SECOND: DateTime<Utc> = match DateTime::from_timestamp(253_402_300_799, 999_999_000) {
    Some(at) => at,
    None => DateTime::<Utc>::MAX_UTC,
};

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
        let op = self.pool.operation("instances.create").referencing("cluster", cluster);
        // Metadata made by `Metadata::from_stored` skipped the checks of a write.
        instance.metadata.as_ref().map(Metadata::check).transpose()?;
        let metadata = instance.metadata.unwrap_or_default().into_value();
        let cluster = cluster.to_string();
        // One statement, in a transaction so that the returned row is decoded
        // before the commit: a row that cannot be read back is rolled back.
        op.transaction(|conn| {
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
            Ok::<_, Failure>(Instance::from(row))
        })
    }

    fn get(&self, id: &InstanceId) -> StoreResult<Option<Instance>> {
        let op = self.pool.read(Read::InstancesGet);
        let row = op.run(|conn| {
            instances::table.find(id.to_string()).select(InstanceRow::as_select()).first(conn).optional()
        })?;
        Ok(row.map(Instance::from))
    }

    fn get_by_tag(&self, tag: &Tag) -> StoreResult<Option<Instance>> {
        let op = self.pool.read(Read::InstancesGetByTag);
        let row = op.run(|conn| {
            instances::table
                .filter(instances::tag.eq(tag.as_str()))
                .select(InstanceRow::as_select())
                .first(conn)
                .optional()
        })?;
        Ok(row.map(Instance::from))
    }

    fn update_metadata(&self, id: &InstanceId, metadata: Metadata) -> StoreResult<Option<Instance>> {
        let op = self.pool.operation("instances.update_metadata");
        metadata.check()?;
        let metadata = metadata.into_value();
        // In a transaction for the same reason as `create`.
        op.transaction(|conn| {
            let row = diesel::update(instances::table.find(id.to_string()))
                .set(instances::metadata.eq(&metadata))
                .returning(InstanceRow::as_returning())
                .get_result(conn)
                .optional()?;
            Ok::<_, Failure>(row.map(Instance::from))
        })
    }

    fn delete(&self, id: &InstanceId) -> StoreResult<()> {
        let op = self.pool.operation("instances.delete");
        let deleted = op.run(|conn| diesel::delete(instances::table.find(id.to_string())).execute(conn))?;
        if deleted == 0 {
            return Err(StoreError::not_found("instance", id.to_string()));
        }
        Ok(())
    }

    fn list_by_cluster(&self, cluster: &ClusterId, page: &Page) -> StoreResult<Paged<Instance>> {
        let op = self.pool.read(Read::InstancesListByCluster);
        // A cursor names its cluster: one of another cluster's listing would
        // otherwise be taken for a position in this one, and skip its rows.
        let kind = format!("{CURSOR_KIND} {cluster}");
        let (before, offset) = keyset_page::start::<2>(&kind, page)?;
        let (before_at, before_id) = match before {
            // Before the first item: later than any timestamp a row can have, above any id.
            None => (LAST_SECOND, "~".to_owned()),
            Some([micros, id]) => {
                let at = micros
                    .parse::<i64>()
                    .ok()
                    .and_then(DateTime::from_timestamp_micros)
                    // Years PostgreSQL and chrono both hold; a forged cursor
                    // outside them would fail in the database, not as Invalid.
                    .filter(|at| YEARS.contains(&at.year()))
                    .ok_or_else(|| StoreError::invalid("cursor", "is not a cursor of this listing"))?;
                (at, id)
            }
        };
        let limit = i64::from(page.limit());
        let cluster = cluster.to_string();
        let statement =
            KeysetPage::new(InstanceRows { cluster: &cluster, before: (before_at, &before_id) }, limit, offset);
        let rows: Vec<Counted<InstanceRow>> = op.run(|conn| load_all(statement, conn))?;
        let newest_first = |a: &Instance, b: &Instance| (b.created_at, b.id).cmp(&(a.created_at, a.id));
        Ok(keyset_page::paged(rows, limit, newest_first, |last| {
            cursor::encode(&kind, &[&last.created_at.timestamp_micros().to_string(), &last.id.to_string()])
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::{InstanceRows, KeysetPage, LAST_SECOND};

    #[test]
    fn the_doc_comment_holds_the_statement_sent() {
        let statement = KeysetPage::new(InstanceRows { cluster: "c", before: (LAST_SECOND, "~") }, 20, 0);
        crate::statement::assert_documented(include_str!("instances.rs"), "InstanceRows", &statement);
    }
}
