//! The budget evaluator: every `alerting.evaluation_interval` it reads each budget's spend from
//! PostgreSQL and publishes the result (API, gauges) on every instance. One instance at a time —
//! the holder of a PostgreSQL advisory lock — also records alert transitions and delivers them,
//! so two instances never both page. If the leader dies its session ends, the lock is freed, and
//! another instance takes over at its next evaluation.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{Connection, PgConnection};
use tokio::sync::watch;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::alerting::budget::{self, AlertSpec, BudgetStatus, ForecastWindows, Ranges};
use crate::alerting::notify::{self, Notifier};
use crate::alerting::store::{self, Delivery};
use crate::config::{BudgetSettings, Settings};
use crate::store::{Store, StoreError};
use crate::telemetry;

/// The latest evaluation, shared with the HTTP API.
#[derive(Debug, Default, Clone, Serialize)]
pub struct BudgetBoard {
    /// When the statuses below were computed; `None` before the first evaluation.
    pub evaluated_at: Option<DateTime<Utc>>,
    /// Whether this instance is the one that sends alerts.
    pub leader: bool,
    /// Each configured budget's status, in configuration order; a budget with `split_by` has
    /// one per split seen this period (`split` says which).
    pub budgets: Vec<BudgetStatus>,
    /// Why the last evaluation failed, if it did (the statuses are then from the one before).
    pub error: Option<String>,
}

/// The board as the evaluator writes it and `/api/v1/budgets` reads it.
pub type SharedBoard = Arc<RwLock<BudgetBoard>>;

/// Outbox entries handled per evaluation.
const DELIVERY_BATCH: i64 = 500;

struct Evaluator {
    settings: Arc<Settings>,
    /// The configuration as reloads change it; taken at the start of each evaluation.
    live: watch::Receiver<Arc<Settings>>,
    store: Store,
    notifier: Notifier,
    receivers: Vec<String>,
    board: SharedBoard,
    lock: Lock,
}

/// Where this instance stands with the alerting lock, on its dedicated session.
enum Lock {
    /// No session is open (none yet, or it failed).
    Closed,
    /// A session that does not hold the lock, kept open between attempts.
    Waiting(PgConnection),
    /// The lock is held: every write of alert state goes through the leader's session.
    Leading(Leader),
}

/// The instance that holds the alerting lock, with the session that holds it. Its methods are
/// the only writers of transitions and deliveries: a leader whose session died cannot write,
/// so it cannot act on a transition (see `docs/architecture.md`).
struct Leader {
    session: PgConnection,
}

/// Each configured budget with its status at `now`, read from PostgreSQL: one status per
/// split seen this period for a budget with `split_by`, one otherwise. Shared by the evaluator
/// and `costwatch budgets`.
pub async fn evaluate_all<'s>(
    settings: &'s Settings,
    store: &Store,
    now: DateTime<Utc>,
) -> Result<Vec<(&'s BudgetSettings, BudgetStatus)>, StoreError> {
    let windows = ForecastWindows {
        short: settings.alerting.forecast_short_window,
        long: settings.alerting.forecast_long_window,
    };
    let currency = &settings.pricing.currency;
    let mut out = Vec::with_capacity(settings.budgets.len());
    for b in &settings.budgets {
        let ranges = Ranges::new(b, windows, now);
        for seen in store.observe_budget(b, currency, &ranges).await? {
            out.push((b, budget::evaluate(b, currency, &ranges, &seen, now)));
        }
    }
    Ok(out)
}

/// Runs until `cancel` fires; then lets go of the lock so another instance takes over at once.
/// Each evaluation uses the configuration `live` holds then: a reload changes budgets, receivers
/// and the evaluation interval from the next one on.
pub async fn run(
    mut live: watch::Receiver<Arc<Settings>>,
    store: Store,
    board: SharedBoard,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let settings = live.borrow_and_update().clone();
    let notifier = Notifier::new(&settings.alerting)?;
    let receivers = notifier.webhook_names();
    let mut evaluator = Evaluator {
        settings: settings.clone(),
        live,
        store,
        notifier,
        receivers,
        board,
        lock: Lock::Closed,
    };
    let mut ticks = tokio::time::interval(settings.alerting.evaluation_interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = ticks.tick() => {}
        }
        let interval = evaluator.settings.alerting.evaluation_interval;
        evaluator.take_reload().await;
        if evaluator.settings.alerting.evaluation_interval != interval {
            ticks = tokio::time::interval(evaluator.settings.alerting.evaluation_interval);
            ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
            ticks.tick().await;
        }
        // A tick must not outlive shutdown by long: deliveries can wait on slow receivers.
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = evaluator.tick() => {}
        }
    }
    match std::mem::replace(&mut evaluator.lock, Lock::Closed) {
        Lock::Closed => {}
        Lock::Waiting(session) => {
            let _ = session.close().await;
        }
        Lock::Leading(leader) => {
            let _ = leader.session.close().await;
            info!("released the alerting lock");
        }
    }
    telemetry::alerting_leader(false);
    Ok(())
}

impl Evaluator {
    /// Takes a reloaded configuration, if there is one: new receivers, and a leader records
    /// the new budgets at once (the alerts of a removed budget resolve at this evaluation).
    async fn take_reload(&mut self) {
        if !self.live.has_changed().unwrap_or(false) {
            return;
        }
        let settings = self.live.borrow_and_update().clone();
        match Notifier::new(&settings.alerting) {
            Ok(notifier) => {
                self.receivers = notifier.webhook_names();
                self.notifier = notifier;
            }
            // The reload checked this already; keep sending where we did rather than nowhere.
            Err(error) => warn!(%error, "cannot use the reloaded alerting receivers; keeping the previous ones"),
        }
        self.settings = settings;
        if let Lock::Leading(leader) = &mut self.lock {
            let (budgets, currency) = (&self.settings.budgets, &self.settings.pricing.currency);
            if let Err(error) = store::sync_budgets(&mut leader.session, budgets, currency).await {
                warn!(%error, "cannot record the reloaded budgets; they are recorded when this instance next leads");
            }
        }
        info!(
            budgets = self.settings.budgets.len(),
            "budget evaluation uses the reloaded configuration"
        );
    }

    async fn tick(&mut self) {
        let now = Utc::now();
        let evaluated = match evaluate_all(&self.settings, &self.store, now).await {
            Ok(evaluated) => evaluated,
            Err(error) => {
                warn!(%error, "cannot evaluate budgets; keeping the previous state");
                self.publish_error(error.to_string());
                return;
            }
        };
        let desired: Vec<AlertSpec> = evaluated
            .iter()
            .flat_map(|(b, s)| budget::desired_alerts(b, s))
            .collect();
        let statuses: Vec<BudgetStatus> = evaluated.into_iter().map(|(_, s)| s).collect();
        telemetry::budget_statuses(statuses.iter().map(|s| telemetry::BudgetGauges {
            name: &s.name,
            split: &s.split,
            amount: s.amount,
            spend: s.spend,
            forecast: s.forecast,
        }));

        self.ensure_leadership().await;
        let leader = matches!(self.lock, Lock::Leading(_));
        {
            let mut board = self.board.write().unwrap_or_else(|p| p.into_inner());
            *board = BudgetBoard {
                evaluated_at: Some(now),
                leader,
                budgets: statuses,
                error: None,
            };
        }
        if let Ok(counts) = self.store.firing_counts().await {
            for kind in budget::AlertKind::ALL {
                telemetry::alerts_firing(kind.as_str(), counts.get(kind.as_str()).copied().unwrap_or(0));
            }
        }
        let Lock::Leading(leading) = &mut self.lock else {
            return;
        };
        if let Err(error) = leading.tick(&self.notifier, &self.receivers, &desired, now).await {
            // The session (and with it the lock) may be gone; another instance may lead now.
            warn!(%error, "lost the alerting lock's session; another instance may take over");
            self.lock = Lock::Closed;
            telemetry::alerting_leader(false);
        }
    }

    fn publish_error(&self, error: String) {
        let mut board = self.board.write().unwrap_or_else(|p| p.into_inner());
        board.error = Some(error);
    }

    /// Takes the lock if nobody holds it, on a session kept open between attempts. A new
    /// leader first mirrors its budgets into PostgreSQL.
    async fn ensure_leadership(&mut self) {
        let mut session = match std::mem::replace(&mut self.lock, Lock::Closed) {
            Lock::Leading(leader) => {
                self.lock = Lock::Leading(leader);
                return;
            }
            Lock::Waiting(session) => session,
            Lock::Closed => match self.store.lock_session().await {
                Ok(session) => session,
                Err(error) => {
                    debug!(%error, "cannot open the alerting lock's session");
                    return;
                }
            },
        };
        match store::try_lock(&mut session).await {
            Ok(true) => {}
            Ok(false) => {
                self.lock = Lock::Waiting(session);
                telemetry::alerting_leader(false);
                return;
            }
            Err(error) => {
                debug!(%error, "cannot try the alerting lock");
                return;
            }
        }
        if let Err(error) =
            store::sync_budgets(&mut session, &self.settings.budgets, &self.settings.pricing.currency).await
        {
            // Dropping the session releases the lock for another try.
            warn!(%error, "cannot record the configured budgets; will try to lead again");
            return;
        }
        info!(
            budgets = self.settings.budgets.len(),
            "this instance now evaluates budget alerts (holds the alerting lock)"
        );
        self.lock = Lock::Leading(Leader { session });
        telemetry::alerting_leader(true);
    }
}

impl Leader {
    /// Records transitions, then delivers. Errors here are the lock session's.
    async fn tick(
        &mut self,
        notifier: &Notifier,
        receivers: &[String],
        desired: &[AlertSpec],
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let conn = &mut self.session;
        let transitions = store::apply_transitions(conn, desired, receivers, now).await?;
        for t in &transitions {
            info!(alert = %t.key, status = t.status, generation = t.generation, "budget alert changed state");
        }
        if notifier.has_alertmanager() {
            let batch = store::alertmanager_batch(conn).await?;
            if !batch.is_empty() {
                match notifier.post_alertmanager(&batch, now).await {
                    Ok(()) => {
                        telemetry::notification("alertmanager", true);
                        store::alertmanager_acknowledged(conn, &batch).await?;
                    }
                    Err(error) => {
                        telemetry::notification("alertmanager", false);
                        warn!(%error, alerts = batch.len(), "cannot post alerts to Alertmanager; retrying next evaluation");
                    }
                }
            }
        }
        let pending = store::pending_deliveries(conn, DELIVERY_BATCH).await?;
        self.deliver(notifier, pending).await?;
        let backlog = store::pending_count(&mut self.session, notifier.has_alertmanager()).await?;
        telemetry::deliveries_pending(backlog);
        Ok(())
    }

    /// Sends due webhook notifications in order. A receiver that fails holds back its later
    /// notifications too, so a resolution never overtakes its firing.
    async fn deliver(&mut self, notifier: &Notifier, pending: Vec<Delivery>) -> Result<(), StoreError> {
        let mut blocked: HashSet<String> = HashSet::new();
        for d in pending {
            if blocked.contains(&d.receiver) {
                continue;
            }
            if d.next_attempt_at > Utc::now() {
                blocked.insert(d.receiver.clone());
                continue;
            }
            let result = notifier.post_webhook(&d.receiver, d.id, &d.payload).await;
            let conn = &mut self.session;
            match result {
                Ok(()) => {
                    telemetry::notification(&d.receiver, true);
                    store::delivered(conn, d.id).await?;
                    debug!(delivery = d.id, receiver = %d.receiver, "webhook notification delivered");
                }
                Err(error) => {
                    telemetry::notification(&d.receiver, false);
                    let wait = notify::retry_delay(d.attempts);
                    warn!(%error, delivery = d.id, attempts = d.attempts + 1, retry_in = ?wait, "webhook notification failed");
                    let retry_at =
                        Utc::now() + chrono::Duration::from_std(wait).unwrap_or(chrono::Duration::seconds(1));
                    store::delivery_failed(conn, d.id, &error.to_string(), retry_at).await?;
                    blocked.insert(d.receiver.clone());
                }
            }
        }
        Ok(())
    }
}
