//! Fixtures shared by the store tests: a fresh migrated database per test,
//! its pool and stores, and small builders for users and clusters.

use std::sync::Mutex;

use diesel::prelude::*;
use dployr_domain::{
    Cluster, ClusterId, ClusterStore, Email, Instance, InstanceStore, NewInstance, NewUser, Provider, User, UserStore,
};
use dployr_pg::{
    PgBootstrapTokenStore, PgClusterStore, PgInstanceStore, PgPool, PgUserStore, PoolConfig, RecordStatements,
    StatementStats,
};
use dployr_testkit::TestDatabase;

pub struct Fixture {
    pub db: TestDatabase,
    /// One connection outside the pool for the tests' own queries, so they
    /// neither open a connection per check nor count in the pool's stats.
    inspector: Mutex<PgConnection>,
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
            inspector: Mutex::new(db.connect()),
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

    /// An instance of `cluster` at `address`, tagged `tag`, without metadata.
    pub fn instance(&self, cluster: &ClusterId, address: &str, tag: &str) -> Instance {
        let new = NewInstance { address: address.try_into().unwrap(), tag: tag.try_into().unwrap(), metadata: None };
        self.instances.create(cluster, new).unwrap()
    }

    /// Runs `query` on the inspection connection.
    pub fn inspect<T>(&self, query: impl FnOnce(&mut PgConnection) -> T) -> T {
        query(&mut self.inspector.lock().unwrap())
    }

    /// The result of one SQL count.
    pub fn count(&self, sql: &str) -> i64 {
        #[derive(QueryableByName)]
        struct Count {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            count: i64,
        }
        self.inspect(|conn| diesel::sql_query(sql).get_result::<Count>(conn).unwrap().count)
    }

    /// What each table holds, cheaply, in one statement: its row count and
    /// its newest row version (`xmin`). Any insert, update or delete that
    /// commits changes it; a refused write leaves it as it was.
    pub fn fingerprint(&self) -> Vec<(i64, i64)> {
        #[derive(QueryableByName)]
        struct Table {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            rows: i64,
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            newest: i64,
        }
        let sql = ["users", "clusters", "user_clusters", "instances", "bootstrap_tokens"]
            .iter()
            .enumerate()
            .map(|(n, table)| {
                format!(
                    "SELECT {n} AS n, count(*) AS rows, coalesce(max(xmin::text::bigint), 0) AS newest FROM {table}"
                )
            })
            .collect::<Vec<_>>()
            .join(" UNION ALL ")
            + " ORDER BY n";
        let tables = self.inspect(|conn| diesel::sql_query(sql).load::<Table>(conn).unwrap());
        tables.into_iter().map(|table| (table.rows, table.newest)).collect()
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
    Fixture::with_pool(PoolConfig { max_size: 1, record_statements: RecordStatements::Sql, ..PoolConfig::default() })
}
