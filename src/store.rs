//! PostgreSQL: the connection pool, schema migrations and the errors every feature's SQL returns.
//! Each feature keeps its own SQL beside it (`ingest::store`, `alerting::store`,
//! `calibration::store`); whether an error is worth retrying is `crate::error_class`'s call.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
use sqlx::{ConnectOptions, PgPool};

use crate::error_class::{self, ErrorClass};
use crate::secret::Secret;

/// What went wrong talking to PostgreSQL; [`StoreError::class`] says whether waiting can help.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// `database.url` does not parse; fix the configuration.
    #[error("database.url is not a valid PostgreSQL URL: {0}")]
    BadUrl(#[source] sqlx::Error),
    /// Nothing was written; `fenced` partitions belong to another instance now, and `applied`
    /// ones already hold this batch (an earlier COMMIT went through although it reported an
    /// error). Write the rest again without them.
    #[error("stale flush: partitions {fenced:?} were claimed by another instance, {applied:?} were already written")]
    Stale {
        /// Partitions another instance has claimed since this one did.
        fenced: Vec<i32>,
        /// Partitions whose progress already stands at this batch's end.
        applied: Vec<i32>,
    },
    /// Running the schema migrations failed; the message names the migration.
    #[error("schema migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// Text PostgreSQL cannot hold in another encoding would fail flushes for good (one emoji
    /// model name in a LATIN1 database stalled its partition).
    #[error(
        "the database's encoding is {0}, costwatch needs UTF8: create the database with \
         CREATE DATABASE <name> ENCODING 'UTF8' TEMPLATE template0"
    )]
    Encoding(String),
    /// The roll-ups' unique keys need `NULLS NOT DISTINCT` (PostgreSQL 15).
    #[error("PostgreSQL {} is too old: costwatch needs PostgreSQL 15 or newer", server_version(*.0))]
    ServerVersion(i32),
    /// Any other error from PostgreSQL or the connection to it.
    #[error("PostgreSQL error: {0}")]
    Database(#[from] sqlx::Error),
}

impl StoreError {
    /// Whether the error may go away by itself: a [`ConnectFailure`] never does, and
    /// [`crate::error_class`] decides for every other database error.
    pub fn class(&self) -> ErrorClass {
        if self.connect_failure().is_some() {
            return ErrorClass::Permanent;
        }
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

    /// Why connecting cannot work as configured, if that is what this error says: TLS that
    /// does not verify or cannot be set up, or a login PostgreSQL refuses.
    pub fn connect_failure(&self) -> Option<ConnectFailure> {
        let e = match self {
            StoreError::Database(e) | StoreError::Migrate(sqlx::migrate::MigrateError::Execute(e)) => e,
            _ => return None,
        };
        match e {
            // sqlx's own TLS errors: the server has no TLS (sslmode=require and up), an
            // unreadable sslrootcert, a client key that does not load.
            sqlx::Error::Tls(_) => Some(ConnectFailure::Tls),
            // rustls fails the handshake inside the socket's I/O, so its error arrives as one.
            sqlx::Error::Io(io) => {
                let tls = io.get_ref()?.downcast_ref::<rustls::Error>()?;
                Some(match tls {
                    rustls::Error::InvalidCertificate(
                        rustls::CertificateError::NotValidForName
                        | rustls::CertificateError::NotValidForNameContext { .. },
                    ) => ConnectFailure::Hostname,
                    rustls::Error::InvalidCertificate(_) => ConnectFailure::Certificate,
                    _ => ConnectFailure::Tls,
                })
            }
            // 28: invalid authorization (wrong password, no pg_hba.conf entry, e.g. for a
            // connection without TLS to a hostssl-only server).
            sqlx::Error::Database(db) if db.code().is_some_and(|c| c.starts_with("28")) => {
                Some(ConnectFailure::Authentication)
            }
            _ => None,
        }
    }
}

/// A connection to PostgreSQL that cannot work as configured; retrying would only hide it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectFailure {
    /// The server's certificate does not chain to `sslrootcert` or the system's roots.
    Certificate,
    /// The certificate does not name the host in `database.url` (`sslmode=verify-full`).
    Hostname,
    /// TLS cannot be set up: the server has none, or a certificate or key file does not load.
    Tls,
    /// PostgreSQL refused the login (password, role, or no `pg_hba.conf` entry).
    Authentication,
}

impl std::fmt::Display for ConnectFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ConnectFailure::Certificate => "TLS certificate verification failed (check sslrootcert in database.url)",
            ConnectFailure::Hostname => {
                "TLS hostname verification failed (the server certificate does not name the host in database.url)"
            }
            ConnectFailure::Tls => "TLS could not be set up (check sslmode, sslrootcert, sslcert and sslkey)",
            ConnectFailure::Authentication => {
                "authentication failed (check the user, database.password or database.password_file, and pg_hba.conf)"
            }
        })
    }
}

/// How costwatch connects: the URL (TLS through its `sslmode`, `sslrootcert`, `sslcert` and
/// `sslkey`), `password` over the URL's, and `application_name=costwatch` unless the URL (or
/// `PGAPPNAME`) names another, so that `pg_stat_activity` and `pg_stat_ssl` show who is who.
pub fn connect_options(url: &str, password: Option<&Secret>) -> Result<PgConnectOptions, StoreError> {
    let mut options = PgConnectOptions::from_str(url)
        .map_err(StoreError::BadUrl)?
        .disable_statement_logging();
    if let Some(password) = password {
        options = options.password(password.expose());
    }
    if options.get_application_name().is_none() {
        options = options.application_name(APPLICATION_NAME);
    }
    Ok(options)
}

/// What can be told about `database.url` without connecting: problems (a URL sqlx refuses, TLS
/// files that cannot be read, a client certificate without its key) and warnings (an `sslmode`
/// that does not verify the server, for a server across a network).
pub fn check_url(url: &str) -> (Vec<String>, Vec<String>) {
    let (mut problems, mut warnings) = (Vec::new(), Vec::new());
    let options = match connect_options(url, None) {
        Ok(options) => options,
        Err(e) => {
            problems.push(crate::secret::scrub(&e.to_string()).into_owned());
            return (problems, warnings);
        }
    };
    let files: Vec<(String, String)> = reqwest::Url::parse(url)
        .map(|u| {
            u.query_pairs()
                .filter(|(k, _)| {
                    matches!(
                        k.as_ref(),
                        "sslrootcert" | "ssl-root-cert" | "ssl-ca" | "sslcert" | "ssl-cert" | "sslkey" | "ssl-key"
                    )
                })
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect()
        })
        .unwrap_or_default();
    for (key, path) in &files {
        if let Err(e) = std::fs::File::open(path) {
            problems.push(format!("database.url: {key}={path} cannot be read: {e}"));
        }
    }
    let has = |names: &[&str]| files.iter().any(|(k, _)| names.contains(&k.as_str()));
    if has(&["sslcert", "ssl-cert"]) != has(&["sslkey", "ssl-key"]) {
        problems.push("database.url: sslcert and sslkey go together (a client certificate and its key)".into());
    }
    let host = options.get_host();
    let local = options.get_socket().is_some()
        || host == "localhost"
        || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    let mode = match options.get_ssl_mode() {
        PgSslMode::Disable => Some("disable"),
        PgSslMode::Allow => Some("allow"),
        PgSslMode::Prefer => Some("prefer"),
        PgSslMode::Require => Some("require"),
        PgSslMode::VerifyCa | PgSslMode::VerifyFull => None,
    };
    if let (Some(mode), false) = (mode, local) {
        warnings.push(format!(
            "database.url: sslmode={mode} (prefer is the default) does not verify the server{}; use sslmode=verify-full with sslrootcert for a database across a network",
            if mode == "require" { "" } else { " and may connect without TLS" }
        ));
    }
    (problems, warnings)
}

/// `server_version_num` of PostgreSQL 15.0, the oldest that costwatch's schema runs on.
pub const MIN_SERVER_VERSION: i32 = 150_000;

/// `150004` as `15.4`.
fn server_version(num: i32) -> String {
    format!("{}.{}", num / 10_000, num % 10_000)
}

/// The `application_name` of every costwatch connection.
pub const APPLICATION_NAME: &str = "costwatch";

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// costwatch's PostgreSQL: a connection pool shared by every feature (cheap to clone).
#[derive(Clone, Debug)]
pub struct Store {
    pool: PgPool,
    /// UTC days (days since the Unix epoch) whose history partitions this process knows to
    /// exist (see `crate::history::partitions`); shared by the clones.
    known_days: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<i64>>>,
}

impl Store {
    /// Connects (lazily: the first query opens the first connection).
    pub fn connect_lazy(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        Ok(Self::connect_lazy_with(connect_options(url, None)?, max_connections))
    }

    /// [`Store::connect_lazy`] with options from [`connect_options`].
    pub fn connect_lazy_with(options: PgConnectOptions, max_connections: u32) -> Self {
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(5))
            // JIT compiles a long-range cost query for 250 ms of its 300 (measured on 30 days
            // of hourly roll-ups); costwatch's statements are all short. Custom plans: the
            // tier bounds of `usage_between` and an empty label filter fold into constants at
            // planning (a generic plan evaluates them on every row). Session settings, not
            // startup options, because PgBouncer refuses unknown startup parameters. An instance
            // that stops mid-transaction (SIGSTOP, a frozen VM) would hold its day locks and rows
            // until its connection dies: PostgreSQL ends such a transaction after 30 s, so the
            // others flush and claim its partitions (its own late COMMIT then fails, and the
            // fencing refuses the retry).
            .after_connect(|conn, _| {
                Box::pin(async move {
                    sqlx::Executor::execute(
                        conn,
                        "SET jit = off; SET plan_cache_mode = force_custom_plan; \
                         SET idle_in_transaction_session_timeout = '30s'",
                    )
                    .await?;
                    Ok(())
                })
            })
            .connect_lazy_with(options);
        Self {
            pool,
            known_days: Default::default(),
        }
    }

    /// The pool, for the features' own SQL.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The days whose history partitions are known to exist, for `crate::history::partitions`.
    pub fn known_days(&self) -> &std::sync::Mutex<std::collections::HashSet<i64>> {
        &self.known_days
    }

    /// Creates the database named in `url` when it does not exist yet (needs CREATEDB; a failure
    /// here is reported by the caller and the real connection error follows if it matters).
    pub async fn create_database_if_missing(url: &str) -> Result<bool, StoreError> {
        Self::create_database_if_missing_with(&connect_options(url, None)?).await
    }

    /// [`Store::create_database_if_missing`] with options from [`connect_options`].
    pub async fn create_database_if_missing_with(options: &PgConnectOptions) -> Result<bool, StoreError> {
        let Some(name) = options.get_database().map(str::to_owned) else {
            return Ok(false);
        };
        let mut admin = options.clone().database("postgres").connect().await?;
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

    /// Checks that the database is UTF8, then applies the migrations it lacks; safe to run from several instances at once.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let encoding: String = sqlx::query_scalar(
            "SELECT pg_encoding_to_char(encoding)::text FROM pg_database WHERE datname = current_database()",
        )
        .fetch_one(&self.pool)
        .await?;
        if encoding != "UTF8" {
            return Err(StoreError::Encoding(encoding));
        }
        let version: i32 = sqlx::query_scalar("SELECT current_setting('server_version_num')::int4")
            .fetch_one(&self.pool)
            .await?;
        if version < MIN_SERVER_VERSION {
            return Err(StoreError::ServerVersion(version));
        }
        MIGRATOR.run(&self.pool).await?;
        // Partitions for yesterday to a week ahead, so that a fresh schema takes today's
        // windows at once (the flush creates any other day's on demand).
        sqlx::query(
            "SELECT costwatch_ensure_partition(t, d)
             FROM unnest(ARRAY['window_usage', 'usage_hourly', 'usage_daily']) t,
                  generate_series(now() - interval '24 hours', now() + interval '168 hours', interval '24 hours') d",
        )
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// One trivial query: whether PostgreSQL answers (used by `/readyz`).
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
