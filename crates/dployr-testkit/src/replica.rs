//! A primary and a real PostgreSQL streaming replica of it, of one test's
//! own: the replica is made with `pg_basebackup -R` from the local server
//! binaries and streams the primary's WAL, so tests of read routing see
//! real replication (lag, paused replay, a stopped standby), not a mock.
//!
//! Both servers come from the local binaries only, as for
//! [`PrivateServer`](crate::PrivateServer): a server named by
//! `DPLOYR_TEST_DATABASE_URL` or a container cannot be given a replica from
//! here. [`ReplicatedServer::start`] returns `Ok(None)` without local
//! binaries, and the test prints [`SKIP`] and passes.

use std::time::{Duration, Instant};

use diesel::sql_types::BigInt;
use diesel::{Connection as _, PgConnection, QueryableByName, RunQueryDsl as _};

use crate::local::{self, EphemeralCluster, Shutdown};
use crate::{TestkitError, databases, workspace_migrations};

/// What a test without local server binaries prints before it returns.
pub const SKIP: &str = "skipped: no local PostgreSQL server binaries (initdb, postgres, pg_basebackup; searched \
                        $DPLOYR_PG_BINDIR, `pg_config --bindir`, /usr/lib/postgresql/*/bin, $PATH); replication \
                        tests start a primary and a streaming replica of their own and cannot use \
                        DPLOYR_TEST_DATABASE_URL's server or a container";

/// The migrated database on both servers.
const DATABASE: &str = "dployr";

/// A primary with one migrated database, and a streaming replica of it.
#[derive(Debug)]
pub struct ReplicatedServer {
    // The replica first: it is stopped before its primary.
    replica: Option<EphemeralCluster>,
    replica_url: String,
    primary: EphemeralCluster,
    primary_url: String,
}

#[derive(QueryableByName)]
struct Lsn {
    #[diesel(sql_type = BigInt)]
    lsn: i64,
}

impl ReplicatedServer {
    /// Starts a primary from the local binaries, migrates a database on it,
    /// then makes and starts a replica; `Ok(None)` when no local server
    /// binaries exist (print [`SKIP`]).
    ///
    /// # Errors
    /// [`TestkitError`] if a server does not start, the migrations fail or
    /// `pg_basebackup` fails.
    pub fn start() -> Result<Option<Self>, TestkitError> {
        let Some(bindir) = local::find_bindir() else { return Ok(None) };
        if !bindir.join("pg_basebackup").is_file() {
            return Ok(None);
        }
        let mut primary = EphemeralCluster::start(&bindir)?;
        let port = primary.port();
        let prepared = (|| {
            let admin_url = local::local_url(port, "postgres");
            let mut admin = PgConnection::establish(&admin_url)
                .map_err(|e| TestkitError::connect("the primary's admin database", &admin_url, &e))?;
            let template =
                databases::ensure_template(&mut admin, &|db| local::local_url(port, db), &workspace_migrations()?)?;
            let file_copy = databases::server_major(&mut admin)? >= 15;
            databases::clone_database(&mut admin, &template, DATABASE, file_copy)?;
            EphemeralCluster::start_replica_of(&primary)
        })();
        let replica = match prepared {
            Ok(replica) => replica,
            Err(error) => {
                primary.stop();
                return Err(error);
            }
        };
        let server = Self {
            replica_url: local::local_url(replica.port(), DATABASE),
            replica: Some(replica),
            primary_url: local::local_url(port, DATABASE),
            primary,
        };
        server.wait_for_replay(Duration::from_secs(30))?;
        Ok(Some(server))
    }

    /// The URL of the migrated database on the primary.
    pub fn primary_url(&self) -> &str {
        &self.primary_url
    }

    /// The URL of the same database on the replica (read only).
    pub fn replica_url(&self) -> &str {
        &self.replica_url
    }

    /// A new connection to the replica's database.
    ///
    /// # Errors
    /// [`TestkitError::Connect`] if it does not answer.
    pub fn connect_replica(&self) -> Result<PgConnection, TestkitError> {
        PgConnection::establish(&self.replica_url)
            .map_err(|e| TestkitError::connect("the replica", &self.replica_url, &e))
    }

    fn sql(url: &str, sql: &'static str) -> Result<(), TestkitError> {
        let mut conn = PgConnection::establish(url).map_err(|e| TestkitError::connect("a test server", url, &e))?;
        diesel::sql_query(sql).execute(&mut conn).map(drop).map_err(|e| TestkitError::sql(sql, e))
    }

    /// Pauses WAL replay on the replica (`pg_wal_replay_pause()`): it keeps
    /// receiving WAL and answering reads, and falls behind every write.
    ///
    /// # Errors
    /// [`TestkitError`] if the replica does not answer.
    pub fn pause_replay(&self) -> Result<(), TestkitError> {
        Self::sql(&self.replica_url, "SELECT pg_wal_replay_pause()")
    }

    /// Resumes WAL replay on the replica.
    ///
    /// # Errors
    /// [`TestkitError`] if the replica does not answer.
    pub fn resume_replay(&self) -> Result<(), TestkitError> {
        Self::sql(&self.replica_url, "SELECT pg_wal_replay_resume()")
    }

    /// Waits until the replica has replayed everything the primary had
    /// written when this was called.
    ///
    /// # Errors
    /// [`TestkitError::Setup`] if it has not within `timeout`.
    pub fn wait_for_replay(&self, timeout: Duration) -> Result<(), TestkitError> {
        let position = |url: &str, sql: &'static str| -> Result<i64, TestkitError> {
            let mut conn = PgConnection::establish(url).map_err(|e| TestkitError::connect("a test server", url, &e))?;
            diesel::sql_query(sql)
                .get_result::<Lsn>(&mut conn)
                .map(|row| row.lsn)
                .map_err(|e| TestkitError::sql(sql, e))
        };
        let target =
            position(&self.primary_url, "SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint AS lsn")?;
        let started = Instant::now();
        loop {
            let replayed = position(
                &self.replica_url,
                "SELECT coalesce((pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::bigint, 0) AS lsn",
            )?;
            if replayed >= target {
                return Ok(());
            }
            if started.elapsed() > timeout {
                return Err(TestkitError::Setup(format!(
                    "the replica replayed {replayed} of {target} bytes of WAL in {timeout:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Restarts the replica ([`EphemeralCluster::restart`]): stopped as
    /// `shutdown` says, refusing connections for `down_for`, then started
    /// again on the same port; it resumes streaming from where it stopped.
    ///
    /// # Errors
    /// [`TestkitError::Setup`] if it does not start again, or was stopped
    /// for good ([`ReplicatedServer::stop_replica`]).
    pub fn restart_replica(&mut self, shutdown: Shutdown, down_for: Duration) -> Result<(), TestkitError> {
        let replica = self.replica.as_mut().ok_or_else(|| TestkitError::Setup("the replica was stopped".into()))?;
        replica.restart(shutdown, down_for)
    }

    /// Freezes the replica (`SIGSTOP` of its postmaster and every process
    /// it started), as a standby host that hangs or is partitioned away:
    /// connections stay open and nothing answers, until the guard is
    /// dropped.
    ///
    /// # Errors
    /// [`TestkitError::Setup`] if the replica was stopped or a signal cannot
    /// be sent.
    pub fn freeze_replica(&self) -> Result<crate::private::Freeze, TestkitError> {
        let replica = self.replica.as_ref().ok_or_else(|| TestkitError::Setup("the replica was stopped".into()))?;
        crate::private::freeze(replica.pid())
    }

    /// Stops the replica at once (an immediate shutdown), as a crashed
    /// standby host would; its URL then refuses connections.
    pub fn stop_replica(&mut self) {
        if let Some(mut replica) = self.replica.take() {
            replica.stop();
        }
    }
}

impl Drop for ReplicatedServer {
    fn drop(&mut self) {
        self.stop_replica();
        self.primary.stop();
    }
}
