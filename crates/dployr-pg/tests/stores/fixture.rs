//! Fixtures shared by the store tests: a fresh migrated database per test,
//! its pool and stores, and small builders for users and clusters.

use diesel::prelude::*;
use dployr_domain::{Cluster, ClusterStore, Email, NewUser, Provider, User, UserStore};
use dployr_pg::{
    PgBootstrapTokenStore, PgClusterStore, PgInstanceStore, PgPool, PgUserStore, PoolConfig, StatementStats,
};
use dployr_testkit::TestDatabase;

pub struct Fixture {
    pub db: TestDatabase,
    pub pool: PgPool,
    pub users: PgUserStore,
    pub clusters: PgClusterStore,
    pub instances: PgInstanceStore,
    pub tokens: PgBootstrapTokenStore,
}

impl Fixture {
    pub fn new() -> Self {
        Self::with_pool_size(4)
    }

    pub fn with_pool_size(max_size: u32) -> Self {
        Self::with_pool(PoolConfig { max_size, ..PoolConfig::default() })
    }

    /// A fresh database and stores on a pool configured so.
    pub fn with_pool(config: PoolConfig) -> Self {
        let db = dployr_testkit::database();
        let pool = PgPool::connect(db.url(), config).unwrap();
        Self {
            users: PgUserStore::new(pool.clone()),
            clusters: PgClusterStore::new(pool.clone()),
            instances: PgInstanceStore::new(pool.clone()),
            tokens: PgBootstrapTokenStore::new(pool.clone()),
            pool,
            db,
        }
    }

    /// A user signed in with Google.
    pub fn user(&self, address: &str) -> User {
        self.users.upsert(NewUser::new(email(address), Provider::Google)).unwrap()
    }

    /// A user and the cluster they own.
    pub fn owner(&self, address: &str) -> (User, Cluster) {
        let user = self.user(address);
        let cluster = self.clusters.create_for_owner(&user.id).unwrap();
        (user, cluster)
    }

    /// The result of one SQL count.
    pub fn count(&self, sql: &str) -> i64 {
        #[derive(QueryableByName)]
        struct Count {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            count: i64,
        }
        let mut conn = self.db.connect();
        diesel::sql_query(sql).get_result::<Count>(&mut conn).unwrap().count
    }

    /// Statements and transactions `operation` sent.
    pub fn measure<T>(&self, operation: impl FnOnce() -> T) -> (T, StatementStats) {
        let before = self.pool.stats();
        let result = operation();
        (result, self.pool.stats() - before)
    }
}

pub fn email(address: &str) -> Email {
    Email::parse(address).unwrap()
}

/// A fixture whose pool records the SQL text of its statements.
pub fn recording() -> Fixture {
    Fixture::with_pool(PoolConfig { max_size: 1, record_statements: true, ..PoolConfig::default() })
}
