//! PostgreSQL: the schema, partition claims (fencing), and the one-transaction flush that writes
//! window sums, rejections, dedup ids and offsets together.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
use sqlx::{ConnectOptions, PgPool, Row};

use crate::aggregate::{Claim, FlushBatch, IngestRules, SeenIds};
use crate::faults::{self, FaultPoint};
use crate::pricing::PriceBook;
use crate::secret::Secret;
use crate::window::{from_millis, WindowKey, WindowSize, WindowSums};

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
    #[error("PostgreSQL error: {0}")]
    Database(#[from] sqlx::Error),
}

impl StoreError {
    /// True for errors that may go away by themselves (server down, connection dropped). A
    /// [`ConnectFailure`] never does.
    pub fn is_transient(&self) -> bool {
        if self.connect_failure().is_some() {
            return false;
        }
        match self {
            StoreError::Database(e) | StoreError::Migrate(sqlx::migrate::MigrateError::Execute(e)) => {
                matches!(
                    e,
                    sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed
                ) || matches!(e, sqlx::Error::Database(db) if db.code().is_some_and(|c| {
                    // 08: connection exception, 57P: operator intervention (shutdown), 40: rollback
                    // (serialization failure, deadlock), 53: insufficient resources.
                    c.starts_with("08") || c.starts_with("57P") || c.starts_with("40") || c.starts_with("53")
                }))
            }
            _ => false,
        }
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

/// The `application_name` of every costwatch connection.
pub const APPLICATION_NAME: &str = "costwatch";

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// How the window rows are stamped when written.
#[derive(Debug, Clone, Copy)]
pub struct WindowLayout {
    pub size: WindowSize,
    pub allowed_lateness_ms: i64,
}

impl WindowLayout {
    pub fn from_rules(rules: &IngestRules) -> Self {
        Self {
            size: rules.window,
            allowed_lateness_ms: rules.allowed_lateness_ms,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Store {
    pool: PgPool,
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
            .connect_lazy_with(options);
        Self { pool }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
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

    pub async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Takes over `partitions` for `owner`: bumps each one's epoch (fencing out the previous
    /// owner) and returns where it stands, with the dedup ids inside the horizon.
    pub async fn claim(
        &self,
        topic: &str,
        owner: &str,
        partitions: &[i32],
        dedup_horizon_ms: i64,
    ) -> Result<Vec<Claim>, StoreError> {
        self.claim_continuing(topic, owner, partitions, dedup_horizon_ms, &[])
            .await
    }

    /// [`Store::claim`], told which partitions this instance parked and at which (epoch, next
    /// offset). A partition that comes back at exactly the next epoch and the same offset was
    /// claimed by nobody in between (every claim bumps the epoch by one), so PostgreSQL holds
    /// what the parked state says: its claim is marked `continued` and its dedup ids are not
    /// read again.
    pub async fn claim_continuing(
        &self,
        topic: &str,
        owner: &str,
        partitions: &[i32],
        dedup_horizon_ms: i64,
        parked: &[(i32, i64, i64)],
    ) -> Result<Vec<Claim>, StoreError> {
        let mut sorted = partitions.to_vec();
        sorted.sort_unstable();
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(
            "INSERT INTO partition_progress (topic, partition, epoch, owner)
             SELECT $1, p, 1, $3 FROM UNNEST($2::int4[]) AS p
             ON CONFLICT (topic, partition) DO UPDATE
               SET epoch = partition_progress.epoch + 1, owner = excluded.owner, claimed_at = now()
             RETURNING partition, epoch, next_offset, watermark",
        )
        .bind(topic)
        .bind(&sorted)
        .bind(owner)
        .fetch_all(&mut *tx)
        .await?;
        let mut claims: Vec<Claim> = rows
            .iter()
            .map(|r| {
                let (partition, epoch, next_offset) = (r.get("partition"), r.get("epoch"), r.get("next_offset"));
                let continued = parked
                    .iter()
                    .any(|&(p, e, next)| p == partition && e + 1 == epoch && next_offset == Some(next));
                Claim {
                    partition,
                    epoch,
                    next_offset,
                    watermark: r.get("watermark"),
                    seen: SeenIds::default(),
                    continued,
                }
            })
            .collect();
        let load: Vec<i32> = claims.iter().filter(|c| !c.continued).map(|c| c.partition).collect();
        let seen_rows = sqlx::query(
            "SELECT s.partition, s.ids
             FROM seen_event_batch s JOIN partition_progress p USING (topic, partition)
             WHERE s.topic = $1 AND s.partition = ANY($2)
               AND s.max_event_time >= p.watermark - ($3::bigint * interval '1 millisecond')",
        )
        .bind(topic)
        .bind(&load)
        .bind(dedup_horizon_ms)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;

        for r in seen_rows {
            let partition: i32 = r.get("partition");
            if let Some(c) = claims.iter_mut().find(|c| c.partition == partition) {
                let ids: &[u8] = r.get("ids");
                c.seen.extend_packed(ids);
            }
        }
        Ok(claims)
    }

    /// Writes a batch in one transaction. Offsets move only if this instance still holds each
    /// partition's epoch; otherwise nothing is written and [`StoreError::Fenced`] names them.
    pub async fn flush(
        &self,
        topic: &str,
        batch: &FlushBatch,
        prices: &PriceBook,
        layout: WindowLayout,
    ) -> Result<(), StoreError> {
        self.write(topic, batch, &batch.windows(), prices, layout).await
    }

    /// [`Store::flush`] with the batch's windows already merged ([`FlushBatch::windows`]), for a
    /// caller that uses them again afterwards.
    pub async fn write(
        &self,
        topic: &str,
        batch: &FlushBatch,
        windows: &[(&WindowKey, WindowSums)],
        prices: &PriceBook,
        layout: WindowLayout,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;

        // A stalled flush (a lock, a slow disk) must fail and be retried rather than block the
        // consumer thread so long that the group evicts it.
        sqlx::query("SET LOCAL statement_timeout = '10s'")
            .execute(&mut *tx)
            .await?;

        // Progress first: it takes the partition rows' locks, so a concurrent claim either waits
        // for this commit (and then reads its offsets) or has already fenced us out. The
        // `prev_offset` condition makes the batch apply only once, even when retried after a
        // COMMIT whose outcome we never heard.
        let progress: Vec<_> = batch.progress().collect();
        let partitions: Vec<i32> = progress.iter().map(|p| p.partition).collect();
        let epochs: Vec<i64> = progress.iter().map(|p| p.epoch).collect();
        let prev: Vec<Option<i64>> = progress.iter().map(|p| p.prev_offset).collect();
        let offsets: Vec<i64> = progress.iter().map(|p| p.next_offset).collect();
        let watermarks: Vec<Option<DateTime<Utc>>> = progress.iter().map(|p| p.watermark).collect();
        let updated: Vec<i32> = sqlx::query_scalar(
            "UPDATE partition_progress AS p
               SET next_offset = u.next_offset, watermark = COALESCE(u.watermark, p.watermark), updated_at = now()
             FROM UNNEST($2::int4[], $3::int8[], $4::int8[], $5::int8[], $6::timestamptz[])
                  AS u(partition, epoch, prev_offset, next_offset, watermark)
             WHERE p.topic = $1 AND p.partition = u.partition AND p.epoch = u.epoch
               AND p.next_offset IS NOT DISTINCT FROM u.prev_offset
             RETURNING p.partition",
        )
        .bind(topic)
        .bind(&partitions)
        .bind(&epochs)
        .bind(&prev)
        .bind(&offsets)
        .bind(&watermarks)
        .fetch_all(&mut *tx)
        .await?;
        if updated.len() != partitions.len() {
            let missing: Vec<i32> = partitions.iter().copied().filter(|p| !updated.contains(p)).collect();
            let rows = sqlx::query(
                "SELECT partition, epoch, next_offset FROM partition_progress WHERE topic = $1 AND partition = ANY($2)",
            )
            .bind(topic)
            .bind(&missing)
            .fetch_all(&mut *tx)
            .await?;
            tx.rollback().await?;
            let (mut fenced, mut applied) = (Vec::new(), Vec::new());
            for p in progress.iter().filter(|p| missing.contains(&p.partition)) {
                let row = rows.iter().find(|r| r.get::<i32, _>("partition") == p.partition);
                let already = row.is_some_and(|r| {
                    r.get::<i64, _>("epoch") == p.epoch && r.get::<Option<i64>, _>("next_offset") == Some(p.next_offset)
                });
                if already {
                    applied.push(p.partition);
                } else {
                    fenced.push(p.partition);
                }
            }
            return Err(StoreError::Stale { fenced, applied });
        }

        // In statements of bounded size: one statement for a 30,000-row flush held about 35 MB
        // of encoded arguments at once (the argument buffer and sqlx's copy of it in the Bind
        // message), the largest single allocation of a busy instance. The rows stay sorted
        // across statements, so concurrent writers still lock them in the same order.
        for chunk in windows.chunks(WINDOW_ROWS_PER_STATEMENT) {
            write_windows(&mut tx, chunk, prices, layout).await?;
        }

        let r: Vec<_> = batch.rejected().collect();
        if !r.is_empty() {
            sqlx::query(
                "INSERT INTO rejected_event (topic, partition, kafka_offset, reason_code, reason_message, payload, payload_text)
                 SELECT $1, * FROM UNNEST($2::int4[], $3::int8[], $4::text[], $5::text[], $6::bytea[], $7::text[])
                 ON CONFLICT (topic, partition, kafka_offset) DO NOTHING",
            )
            .bind(topic)
            .bind(r.iter().map(|m| m.partition).collect::<Vec<_>>())
            .bind(r.iter().map(|m| m.offset).collect::<Vec<_>>())
            .bind(r.iter().map(|m| m.rejection.code.as_str()).collect::<Vec<_>>())
            .bind(r.iter().map(|m| m.rejection.message.as_str()).collect::<Vec<_>>())
            .bind(r.iter().map(|m| m.payload.as_slice()).collect::<Vec<_>>())
            .bind(r.iter().map(|m| payload_text(&m.payload)).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await?;
        }

        // One row per partition with all of this flush's new ids: a per-event row costs more
        // than everything else in the flush together.
        let packed: Vec<(i32, DateTime<Utc>, &[u8])> = batch
            .parts
            .iter()
            .filter_map(|part| Some((part.progress.partition, part.seen.newest()?, part.seen.as_bytes())))
            .collect();
        if !packed.is_empty() {
            sqlx::query(
                "INSERT INTO seen_event_batch (topic, partition, max_event_time, ids)
                 SELECT $1, * FROM UNNEST($2::int4[], $3::timestamptz[], $4::bytea[])",
            )
            .bind(topic)
            .bind(packed.iter().map(|p| p.0).collect::<Vec<_>>())
            .bind(packed.iter().map(|p| p.1).collect::<Vec<_>>())
            .bind(packed.iter().map(|p| p.2).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await?;
        }

        let forget: Vec<(i32, DateTime<Utc>)> = progress
            .iter()
            .filter_map(|p| Some((p.partition, p.forget_before?)))
            .collect();
        if !forget.is_empty() {
            sqlx::query(
                "DELETE FROM seen_event_batch s USING UNNEST($2::int4[], $3::timestamptz[]) AS u(partition, before)
                 WHERE s.topic = $1 AND s.partition = u.partition AND s.max_event_time < u.before",
            )
            .bind(topic)
            .bind(forget.iter().map(|f| f.0).collect::<Vec<_>>())
            .bind(forget.iter().map(|f| f.1).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await?;
        }

        faults::reached(FaultPoint::BeforeCommit);
        tx.commit().await?;
        if faults::reached(FaultPoint::AmbiguousCommit) {
            return Err(StoreError::Database(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "injected fault: connection dropped after COMMIT",
            ))));
        }
        Ok(())
    }
}

/// Window rows per INSERT statement of a flush (see [`Store::write`]).
const WINDOW_ROWS_PER_STATEMENT: usize = 4096;

async fn write_windows(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    windows: &[(&WindowKey, WindowSums)],
    prices: &PriceBook,
    layout: WindowLayout,
) -> Result<(), StoreError> {
    let n = windows.len();
    let mut starts = Vec::with_capacity(n);
    let mut ends = Vec::with_capacity(n);
    let mut finals = Vec::with_capacity(n);
    let mut models = Vec::with_capacity(n);
    let mut hardware = Vec::with_capacity(n);
    let mut labels = Vec::with_capacity(n);
    let mut events = Vec::with_capacity(n);
    let mut late = Vec::with_capacity(n);
    let mut compute = Vec::with_capacity(n);
    let mut storage = Vec::with_capacity(n);
    let mut compute_price: Vec<Option<Decimal>> = Vec::with_capacity(n);
    let mut storage_price: Vec<Option<Decimal>> = Vec::with_capacity(n);
    let mut k1: Vec<Option<Decimal>> = Vec::with_capacity(n);
    let mut k2: Vec<Option<Decimal>> = Vec::with_capacity(n);
    let mut versions: Vec<Option<i64>> = Vec::with_capacity(n);
    let mut price_ids: Vec<Option<String>> = Vec::with_capacity(n);
    for (key, sums) in windows {
        let end_ms = key.start_ms + layout.size.millis();
        starts.push(from_millis(key.start_ms));
        ends.push(from_millis(end_ms));
        finals.push(from_millis(end_ms + layout.allowed_lateness_ms));
        models.push(key.model.as_str());
        hardware.push(key.hardware.as_str());
        // BTreeMap serializes with sorted keys, so one label set always has one text form.
        labels.push(serde_json::to_string(&key.labels).unwrap_or_else(|_| "{}".into()));
        events.push(sums.events);
        late.push(sums.late_events);
        compute.push(sums.compute.value());
        storage.push(sums.storage.value());
        // Coefficients in force at the window's start, as `rerate` would choose them, so that
        // a live-priced row and a re-rated one agree.
        let priced = prices.priced(&key.model, &key.hardware, from_millis(key.start_ms));
        let rates = priced.map(|p| p.rates);
        compute_price.push(rates.map(|r| r.compute_price.value()));
        storage_price.push(rates.map(|r| r.storage_price.value()));
        k1.push(rates.map(|r| r.k1.value()));
        k2.push(rates.map(|r| r.k2.value()));
        versions.push(priced.and_then(|p| p.source.version()));
        price_ids.push(priced.map(|p| p.price_id.to_string()));
    }
    sqlx::query(
        "INSERT INTO window_usage AS w (window_start, window_end, finalizes_at, model, hardware, labels,
                events, late_events, compute, storage, compute_price, storage_price, k1, k2, currency,
                coefficient_version, price_id)
         SELECT s, e, f, m, h, l::jsonb, ev, le, c, st, cp, sp, a, b, $15, cv, pi
         FROM UNNEST($1::timestamptz[], $2::timestamptz[], $3::timestamptz[], $4::text[], $5::text[], $6::text[],
                     $7::int8[], $8::int8[], $9::numeric[], $10::numeric[], $11::numeric[], $12::numeric[],
                     $13::numeric[], $14::numeric[], $16::int8[], $17::text[])
              AS t(s, e, f, m, h, l, ev, le, c, st, cp, sp, a, b, cv, pi)
         ON CONFLICT (window_start, model, hardware, labels) DO UPDATE SET
             events = w.events + excluded.events,
             late_events = w.late_events + excluded.late_events,
             compute = w.compute + excluded.compute,
             storage = w.storage + excluded.storage,
             compute_price = excluded.compute_price,
             storage_price = excluded.storage_price,
             k1 = excluded.k1,
             k2 = excluded.k2,
             currency = excluded.currency,
             coefficient_version = excluded.coefficient_version,
             price_id = excluded.price_id,
             updated_at = now()",
    )
    .bind(&starts)
    .bind(&ends)
    .bind(&finals)
    .bind(&models)
    .bind(&hardware)
    .bind(&labels)
    .bind(&events)
    .bind(&late)
    .bind(&compute)
    .bind(&storage)
    .bind(&compute_price)
    .bind(&storage_price)
    .bind(&k1)
    .bind(&k2)
    .bind(prices.currency())
    .bind(&versions)
    .bind(&price_ids)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The payload as text when PostgreSQL can hold it as text (valid UTF-8, no NUL byte).
fn payload_text(payload: &[u8]) -> Option<&str> {
    std::str::from_utf8(payload).ok().filter(|s| !s.contains('\0'))
}
