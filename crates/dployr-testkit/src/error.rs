//! The testkit's error: each says what it was doing and, for the "no server"
//! case, what went wrong first (binaries found but a server that would not
//! start is not a missing install), then how to get one.

/// Why the testkit could not provide a database.
#[derive(Debug, thiserror::Error)]
pub enum TestkitError {
    /// None of the three ways to get a PostgreSQL worked.
    #[error(
        "no PostgreSQL for the tests. What was tried: {tried}\n\
         Provide one of:\n\
         1. a server of your own: export DPLOYR_TEST_DATABASE_URL (or DATABASE_URL)=postgres://user@host/db, \
            with a role that may CREATE DATABASE;\n\
         2. the PostgreSQL server binaries (initdb, postgres), e.g. `apt-get install postgresql`; searched: {searched};\n\
         3. a running Docker engine (testcontainers starts postgres:15-alpine)."
    )]
    NoServer {
        /// Where the binaries were looked for.
        searched: &'static str,
        /// What each attempt said.
        tried: String,
    },

    /// Starting or preparing a server failed.
    #[error("{0}")]
    Setup(String),

    /// A file or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What the testkit was doing.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },

    /// The server refused a connection (the string names the database, never
    /// a URL, which may hold a password; libpq's reason is redacted).
    #[error("cannot connect to {0}: {1}")]
    Connect(String, dployr_domain::ConnectFailure),

    /// A statement failed.
    #[error("{what}: {source}")]
    Sql {
        /// What the testkit was doing.
        what: &'static str,
        /// The cause.
        #[source]
        source: diesel::result::Error,
    },

    /// Migrating the template failed.
    #[error("migrating the template database: {0}")]
    Migrate(#[from] dployr_migrate::MigrateError),
}

impl TestkitError {
    /// [`TestkitError::Connect`] for `what` at `url`, libpq's reason
    /// classified and redacted.
    pub(crate) fn connect(what: impl Into<String>, url: &str, error: &diesel::ConnectionError) -> Self {
        Self::Connect(what.into(), dployr_domain::ConnectFailure::classify(&error.to_string(), url))
    }

    pub(crate) fn io(what: String, source: std::io::Error) -> Self {
        Self::Io { what, source }
    }

    pub(crate) fn sql(what: &'static str, source: diesel::result::Error) -> Self {
        Self::Sql { what, source }
    }
}
