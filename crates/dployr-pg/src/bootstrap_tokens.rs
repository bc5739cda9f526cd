//! `PgBootstrapTokenStore`: single-use bootstrap tokens in PostgreSQL. Every
//! query behind `BootstrapTokenStore` is in this file.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use dployr_domain::text::{self, Blank};
use dployr_domain::{BootstrapToken, BootstrapTokenStore, InstanceId, MAX_TAG_BYTES, StoreResult};

use crate::PgPool;
use crate::schema::bootstrap_tokens;

#[derive(Queryable, Selectable)]
#[diesel(table_name = bootstrap_tokens, check_for_backend(diesel::pg::Pg))]
struct TokenRow {
    instance_id: String,
    nonce: String,
    used_at: Option<DateTime<Utc>>,
    created_at: DateTime<Utc>,
}

/// The bootstrap tokens of one PostgreSQL database.
#[derive(Debug, Clone)]
pub struct PgBootstrapTokenStore {
    pool: PgPool,
}

impl PgBootstrapTokenStore {
    /// A store over `pool`.
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }
}

/// The rule of a nonce: one that breaks it can never have been issued. The
/// lookups check it too, because their nonce comes from a machine on the
/// network, and one with a NUL (which PostgreSQL refuses in text) would
/// otherwise fail as a backend error instead of a bad request.
fn check_nonce(nonce: &str) -> StoreResult<()> {
    text::check("nonce", nonce, MAX_TAG_BYTES, Blank::Refused)
}

impl BootstrapTokenStore for PgBootstrapTokenStore {
    fn create(&self, instance: &InstanceId, nonce: &str) -> StoreResult<BootstrapToken> {
        let _span = crate::trace::operation("bootstrap_tokens.create");
        check_nonce(nonce)?;
        let instance = instance.to_string();
        let row = self.pool.run(&[("instance", &instance)], |conn| {
            diesel::insert_into(bootstrap_tokens::table)
                .values((bootstrap_tokens::instance_id.eq(&instance), bootstrap_tokens::nonce.eq(nonce)))
                .returning(TokenRow::as_returning())
                .get_result(conn)
        })?;
        Ok(BootstrapToken {
            instance_id: InstanceId::parse(&row.instance_id)?,
            nonce: row.nonce,
            used_at: row.used_at,
            created_at: row.created_at,
        })
    }

    fn mark_used(&self, nonce: &str) -> StoreResult<bool> {
        let _span = crate::trace::operation("bootstrap_tokens.mark_used");
        check_nonce(nonce)?;
        // One UPDATE that only matches an unused token: under concurrency the
        // row lock makes every other caller re-check `used_at` and match nothing.
        let updated = self.pool.run(&[], |conn| {
            diesel::update(bootstrap_tokens::table.find(nonce).filter(bootstrap_tokens::used_at.is_null()))
                .set(bootstrap_tokens::used_at.eq(diesel::dsl::now))
                .execute(conn)
        })?;
        Ok(updated == 1)
    }

    fn is_used(&self, nonce: &str) -> StoreResult<bool> {
        let _span = crate::trace::operation("bootstrap_tokens.is_used");
        check_nonce(nonce)?;
        let used = self.pool.run(&[], |conn| {
            bootstrap_tokens::table
                .find(nonce)
                .select(bootstrap_tokens::used_at.is_not_null())
                .first::<bool>(conn)
                .optional()
        })?;
        // An unknown nonce counts as used: it must never bootstrap anything.
        Ok(used.unwrap_or(true))
    }
}
