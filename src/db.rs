//! PostgreSQL for services: a deadpool pool over tokio-postgres, schema
//! migrations applied under an advisory lock, and the one function that
//! decides which gRPC status a database failure becomes.

use std::error::Error as _;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, PoolError, RecyclingMethod, Runtime};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Config, NoTls};
use tonic::Status;

/// A pool of connections to one database.
pub type Pool = deadpool_postgres::Pool;

/// How long a caller waits for a pooled connection, and a new connection
/// for its handshake, before the database counts as unavailable.
const WAIT: Duration = Duration::from_secs(3);

/// Any database failure.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// No connection could be had from the pool.
    #[error("database pool: {0}")]
    Pool(#[from] PoolError),
    /// A statement or the connection failed.
    #[error("database: {0}")]
    Pg(#[from] tokio_postgres::Error),
}

impl DbError {
    /// Whether the database could not be reached (as opposed to refusing a
    /// statement): the call may succeed later.
    pub fn is_unavailable(&self) -> bool {
        match self {
            DbError::Pool(PoolError::Backend(e)) => pg_unavailable(e),
            DbError::Pool(_) => true,
            DbError::Pg(e) => pg_unavailable(e),
        }
    }
}

fn pg_unavailable(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    if let Some(code) = e.code() {
        let class = &code.code()[..2];
        // 08: connection exception; 57P01-03: shutting down or starting
        // up; 53300: too many connections.
        return class == "08"
            || *code == SqlState::ADMIN_SHUTDOWN
            || *code == SqlState::CRASH_SHUTDOWN
            || *code == SqlState::CANNOT_CONNECT_NOW
            || *code == SqlState::TOO_MANY_CONNECTIONS;
    }
    // No server error code: a socket-level failure (io error, timeout).
    let mut source = e.source();
    while let Some(s) = source {
        if s.is::<std::io::Error>() {
            return true;
        }
        source = s.source();
    }
    e.to_string().contains("timed out") || e.to_string().contains("connection")
}

/// The status a caller sees for a database failure. Unreachable (pool
/// timeout, closed connection, server shutting down): UNAVAILABLE, safe to
/// retry. Serialization failure or deadlock: ABORTED. Anything else is a
/// defect: INTERNAL, with the detail only in the log; raw database text
/// never reaches a client.
pub fn status(error: impl Into<DbError>) -> Status {
    let error = error.into();
    if error.is_unavailable() {
        tracing::warn!(error = %error, "database unavailable");
        return Status::unavailable("the service's database is unavailable; try again shortly");
    }
    if let DbError::Pg(e) = &error
        && let Some(code) = e.code()
        && (*code == SqlState::T_R_SERIALIZATION_FAILURE
            || *code == SqlState::T_R_DEADLOCK_DETECTED)
    {
        return Status::aborted("a concurrent change conflicted with this one; try again");
    }
    tracing::error!(error = %error, detail = ?error.source(), "database error");
    Status::internal("internal error (logged by the service)")
}

/// The constraint's name when `e` is a unique violation (SQLSTATE 23505).
pub fn unique_violation(e: &tokio_postgres::Error) -> Option<&str> {
    let db = e.as_db_error()?;
    (*db.code() == SqlState::UNIQUE_VIOLATION).then(|| db.constraint().unwrap_or(""))
}

/// Parses a `postgres://` URL (or key=value string), with a connect
/// timeout unless it sets one.
pub fn parse_url(url: &str) -> anyhow::Result<Config> {
    let mut config: Config = url
        .parse()
        .map_err(|e| anyhow::anyhow!("database URL does not parse: {e}"))?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(WAIT);
    }
    if config.get_application_name().is_none() {
        config.application_name("trellis");
    }
    Ok(config)
}

/// A pool of at most `max_size` connections to `config`. Connections are
/// opened lazily: building the pool never waits for the database.
pub fn pool(config: Config, max_size: usize) -> anyhow::Result<Pool> {
    let manager = Manager::from_config(
        config,
        NoTls,
        ManagerConfig {
            // A closed connection (database restarted) is noticed and
            // replaced when it is next taken from the pool.
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(max_size)
        .wait_timeout(Some(WAIT))
        .create_timeout(Some(WAIT))
        .recycle_timeout(Some(WAIT))
        .runtime(Runtime::Tokio1)
        .build()
        .map_err(|e| anyhow::anyhow!("building the database pool: {e}"))
}

/// Opens one connection outside the pool (migrations, the dispatcher's
/// lock); the connection's task ends when the client is dropped.
pub async fn connect(config: &Config) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Applies `runners` in order on one connection, holding an advisory lock
/// named after `service` so that instances starting together migrate one
/// at a time (the others then find nothing to do).
pub async fn migrate(
    config: &Config,
    service: &str,
    runners: Vec<refinery::Runner>,
) -> anyhow::Result<usize> {
    let mut client = match connect(config).await {
        Ok(client) => client,
        Err(e) if e.code() == Some(&SqlState::INVALID_CATALOG_NAME) => {
            create_database(config).await?;
            connect(config)
                .await
                .map_err(|e| anyhow::anyhow!("connecting to migrate: {e}"))?
        }
        Err(e) => return Err(anyhow::anyhow!("connecting to migrate: {e}")),
    };
    client
        .execute(
            "SELECT pg_advisory_lock(hashtext($1))",
            &[&format!("trellis.migrate.{service}")],
        )
        .await
        .map_err(|e| anyhow::anyhow!("taking the migration lock: {e}"))?;
    let mut applied = 0;
    for runner in runners {
        let report = runner
            .set_abort_divergent(true)
            .run_async(&mut client)
            .await
            .map_err(|e| anyhow::anyhow!("migrating: {e}"))?;
        applied += report.applied_migrations().len();
    }
    // The lock goes with the session; unlock anyway so a pooled server
    // (pgbouncer) does not keep it.
    let _ = client
        .execute(
            "SELECT pg_advisory_unlock(hashtext($1))",
            &[&format!("trellis.migrate.{service}")],
        )
        .await;
    Ok(applied)
}

/// Creates the database `config` names, connecting to the server's
/// `postgres` database: a service's first start on a fresh server needs no
/// manual step. Another instance creating it at the same time is fine.
async fn create_database(config: &Config) -> anyhow::Result<()> {
    let name = config
        .get_dbname()
        .ok_or_else(|| anyhow::anyhow!("the database URL names no database"))?;
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        anyhow::bail!(
            "database {name:?} does not exist (and its name is not one to create automatically)"
        );
    }
    let mut admin = config.clone();
    admin.dbname("postgres");
    let client = connect(&admin).await.map_err(|e| {
        anyhow::anyhow!("database {name:?} does not exist, and creating it failed: {e}")
    })?;
    match client
        .batch_execute(&format!("CREATE DATABASE \"{name}\""))
        .await
    {
        Ok(()) => {
            tracing::info!(database = name, "created the database");
            Ok(())
        }
        Err(e) if e.code() == Some(&SqlState::DUPLICATE_DATABASE) => Ok(()),
        Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => Ok(()),
        Err(e) => Err(anyhow::anyhow!(
            "database {name:?} does not exist, and creating it failed: {e}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_get_a_connect_timeout() {
        let c = parse_url("postgres://root@127.0.0.1:5432/x").unwrap();
        assert_eq!(c.get_connect_timeout(), Some(&WAIT));
        let c = parse_url("postgres://root@127.0.0.1/x?connect_timeout=9").unwrap();
        assert_eq!(c.get_connect_timeout(), Some(&Duration::from_secs(9)));
        assert!(parse_url("postgres://root@127.0.0.1:notaport/x").is_err());
    }
}
