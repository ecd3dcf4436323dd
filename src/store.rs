//! PostgreSQL: the connection pool, schema migrations and the errors every feature's SQL returns.
//! Each feature keeps its own SQL beside it (`ingest::store`, `alerting::store`,
//! `calibration::store`); whether an error is worth retrying is `crate::error_class`'s call.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};

use crate::error_class::{self, ErrorClass};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database.url is not a valid PostgreSQL URL: {0}")]
    BadUrl(#[source] sqlx::Error),
    /// Nothing was written; `fenced` partitions belong to another instance now, and `applied`
    /// ones already hold this batch (an earlier COMMIT went through although it reported an
    /// error). Write the rest again without them.
    #[error("stale flush: partitions {fenced:?} were claimed by another instance, {applied:?} were already written")]
    Stale { fenced: Vec<i32>, applied: Vec<i32> },
    #[error("schema migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// Text PostgreSQL cannot hold in another encoding would fail flushes for good (one emoji
    /// model name in a LATIN1 database stalled its partition).
    #[error(
        "the database's encoding is {0}, costwatch needs UTF8: create the database with \
         CREATE DATABASE <name> ENCODING 'UTF8' TEMPLATE template0"
    )]
    Encoding(String),
    #[error("PostgreSQL error: {0}")]
    Database(#[from] sqlx::Error),
}

impl StoreError {
    /// Whether the error may go away by itself ([`crate::error_class`] decides for every
    /// database error).
    pub fn class(&self) -> ErrorClass {
        match self {
            StoreError::Database(e) | StoreError::Migrate(sqlx::migrate::MigrateError::Execute(e)) => {
                error_class::of_sqlx(e)
            }
            // Someone else's claim; the caller handles it, retrying never repeats it.
            StoreError::Stale { .. } => ErrorClass::Transient,
            _ => ErrorClass::Permanent,
        }
    }

    /// True for errors that may go away by themselves (server down, connection dropped).
    pub fn is_transient(&self) -> bool {
        self.class().is_transient()
    }
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Clone, Debug)]
pub struct Store {
    pool: PgPool,
}

impl Store {
    /// Connects (lazily: the first query opens the first connection).
    pub fn connect_lazy(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        let options = PgConnectOptions::from_str(url)
            .map_err(StoreError::BadUrl)?
            .disable_statement_logging();
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy_with(options);
        Ok(Self { pool })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Creates the database named in `url` when it does not exist yet (needs CREATEDB; a failure
    /// here is reported by the caller and the real connection error follows if it matters).
    pub async fn create_database_if_missing(url: &str) -> Result<bool, StoreError> {
        let options = PgConnectOptions::from_str(url).map_err(StoreError::BadUrl)?;
        let Some(name) = options.get_database().map(str::to_owned) else {
            return Ok(false);
        };
        let mut admin = options
            .database("postgres")
            .disable_statement_logging()
            .connect()
            .await?;
        let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&name)
            .fetch_one(&mut admin)
            .await?;
        if exists {
            return Ok(false);
        }
        let quoted = format!("\"{}\"", name.replace('"', "\"\""));
        match sqlx::query(&format!("CREATE DATABASE {quoted}"))
            .execute(&mut admin)
            .await
        {
            Ok(_) => Ok(true),
            // 42P04: created concurrently by another instance; that is what we wanted.
            Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("42P04") => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn migrate(&self) -> Result<(), StoreError> {
        let encoding: String = sqlx::query_scalar(
            "SELECT pg_encoding_to_char(encoding)::text FROM pg_database WHERE datname = current_database()",
        )
        .fetch_one(&self.pool)
        .await?;
        if encoding != "UTF8" {
            return Err(StoreError::Encoding(encoding));
        }
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}

/// What PostgreSQL said, with its SQLSTATE, for a human reading `rejected_events`.
pub fn database_message(error: &StoreError) -> String {
    match error {
        StoreError::Database(sqlx::Error::Database(db)) => match db.code() {
            Some(code) => format!("{} (SQLSTATE {code})", db.message()),
            None => db.message().to_owned(),
        },
        other => other.to_string(),
    }
}
