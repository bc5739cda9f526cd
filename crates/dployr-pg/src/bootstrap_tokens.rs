//! `PgBootstrapTokenStore`: single-use bootstrap tokens in PostgreSQL. Every
//! query behind `BootstrapTokenStore` is in this file.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use dployr_domain::{BootstrapToken, BootstrapTokenStore, InstanceId, Nonce, StoreResult};

use crate::PgPool;
use crate::errors::Failure;
use crate::routes::Read;
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

impl BootstrapTokenStore for PgBootstrapTokenStore {
    fn create(&self, instance: &InstanceId, nonce: &Nonce) -> StoreResult<BootstrapToken> {
        let op = self.pool.operation("bootstrap_tokens.create").referencing("instance", instance);
        let instance = instance.to_string();
        // One statement, in a transaction so that the returned row is decoded
        // before the commit: a row that cannot be read back is rolled back.
        op.transaction(|conn| {
            let row: TokenRow = diesel::insert_into(bootstrap_tokens::table)
                .values((bootstrap_tokens::instance_id.eq(&instance), bootstrap_tokens::nonce.eq(nonce.as_str())))
                .returning(TokenRow::as_returning())
                .get_result(conn)?;
            Ok::<_, Failure>(BootstrapToken {
                instance_id: InstanceId::parse(&row.instance_id)?,
                nonce: row.nonce,
                used_at: row.used_at,
                created_at: row.created_at,
            })
        })
    }

    fn mark_used(&self, nonce: &Nonce) -> StoreResult<bool> {
        let op = self.pool.operation("bootstrap_tokens.mark_used");
        let nonce = nonce.as_str();
        // One UPDATE that only matches an unused token: under concurrency the
        // row lock makes every other caller re-check `used_at` and match nothing.
        let updated = op.run(|conn| {
            diesel::update(bootstrap_tokens::table.find(nonce).filter(bootstrap_tokens::used_at.is_null()))
                .set(bootstrap_tokens::used_at.eq(diesel::dsl::now))
                .execute(conn)
        })?;
        Ok(updated == 1)
    }

    fn is_used(&self, nonce: &Nonce) -> StoreResult<bool> {
        let op = self.pool.read(Read::BootstrapTokensIsUsed);
        let nonce = nonce.as_str();
        let used = op.run(|conn| {
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
