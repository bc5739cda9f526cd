//! The third choice: a PostgreSQL container through testcontainers, when no
//! local server binaries are found and a Docker engine answers.
//!
//! testcontainers' `SyncRunner` owns a tokio runtime: it must not be called
//! from inside an async runtime, which the synchronous tests here never are.

use std::path::Path;

use testcontainers_modules::postgres::Postgres;
use testcontainers_modules::testcontainers::runners::SyncRunner as _;
use testcontainers_modules::testcontainers::{Container, ImageExt as _};

use crate::TestkitError;

/// The image tag; the module's default (11-alpine) is long out of support.
const TAG: &str = "15-alpine";

/// A running container; dropping it removes the container.
pub(crate) struct DockerPostgres {
    container: Container<Postgres>,
    /// Where the engine publishes the container's ports: loopback for a
    /// local engine, the engine's host for a remote one
    /// (`DOCKER_HOST=tcp://docker:2375`, Docker in Docker on CI).
    host: String,
    port: u16,
}

impl std::fmt::Debug for DockerPostgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DockerPostgres")
            .field("id", &self.container.id())
            .field("host", &self.host)
            .field("port", &self.port)
            .finish()
    }
}

impl DockerPostgres {
    pub(crate) fn start() -> Result<Self, TestkitError> {
        if std::env::var_os("DOCKER_HOST").is_none() && !Path::new("/var/run/docker.sock").exists() {
            return Err(TestkitError::Setup(
                "no Docker engine (DOCKER_HOST is unset and /var/run/docker.sock is missing)".into(),
            ));
        }
        let container = Postgres::default()
            .with_tag(TAG)
            .start()
            .map_err(|e| TestkitError::Setup(format!("testcontainers could not start postgres:{TAG}: {e}")))?;
        let port = container
            .get_host_port_ipv4(5432)
            .map_err(|e| TestkitError::Setup(format!("testcontainers gave no port for postgres:{TAG}: {e}")))?;
        let host = container
            .get_host()
            .map_err(|e| TestkitError::Setup(format!("testcontainers gave no host for postgres:{TAG}: {e}")))?;
        // An IPv6 address goes in brackets in a URL; `Host` prints it bare.
        let host = match host {
            url::Host::Ipv6(address) => format!("[{address}]"),
            other => other.to_string(),
        };
        Ok(Self { container, host, port })
    }

    /// The URL of `dbname` in the container (the module's default
    /// credentials, postgres/postgres).
    pub(crate) fn url_for(&self, dbname: &str) -> String {
        format!("postgres://postgres:postgres@{}:{}/{dbname}", self.host, self.port)
    }
}
