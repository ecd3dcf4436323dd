//! Fault injection for the fault suite: `COSTWATCH_FAULTS=before_commit=3` aborts the process
//! at the third time the flush reaches that point. Unset (always, in production) it costs one
//! relaxed atomic load per flush and does nothing.
//!
//! Points: `before_commit` (abort inside the flush transaction, before COMMIT),
//! `after_commit` (abort after COMMIT, before the Kafka commit and metrics),
//! `ambiguous_commit` (every Nth COMMIT succeeds but is reported as a dropped connection).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// A place in the flush where `COSTWATCH_FAULTS` can inject a fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultPoint {
    /// Inside the flush transaction, before COMMIT: the process aborts and nothing of the flush is stored.
    BeforeCommit,
    /// After COMMIT, before the Kafka commit and the metrics: the process aborts with the flush stored.
    AfterCommit,
    /// Every Nth COMMIT succeeds but is reported as a dropped connection, so the batch's outcome looks unknown.
    AmbiguousCommit,
}

impl FaultPoint {
    const ALL: [FaultPoint; 3] = [Self::BeforeCommit, Self::AfterCommit, Self::AmbiguousCommit];

    fn name(self) -> &'static str {
        match self {
            Self::BeforeCommit => "before_commit",
            Self::AfterCommit => "after_commit",
            Self::AmbiguousCommit => "ambiguous_commit",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

struct Plan {
    /// Per point: trigger at this hit (0 = never).
    at: [u64; 3],
    hits: [AtomicU64; 3],
}

static PLAN: OnceLock<Option<Plan>> = OnceLock::new();

fn plan() -> &'static Option<Plan> {
    PLAN.get_or_init(|| {
        let spec = std::env::var("COSTWATCH_FAULTS").ok()?;
        let mut at = [0u64; 3];
        for item in spec.split(',').filter(|s| !s.is_empty()) {
            let (name, n) = item.split_once('=')?;
            let point = FaultPoint::ALL.into_iter().find(|p| p.name() == name.trim())?;
            at[point.index()] = n.trim().parse().ok()?;
        }
        tracing::warn!(%spec, "fault injection is ON (COSTWATCH_FAULTS); never use this in production");
        Some(Plan {
            at,
            hits: Default::default(),
        })
    })
}

/// Counts a pass through `point`. Aborts the process for the abort points when their turn
/// comes; for [`FaultPoint::AmbiguousCommit`] returns true every Nth time.
pub fn reached(point: FaultPoint) -> bool {
    let Some(plan) = plan() else { return false };
    let at = plan.at[point.index()];
    if at == 0 {
        return false;
    }
    let hit = plan.hits[point.index()].fetch_add(1, Ordering::Relaxed) + 1;
    match point {
        FaultPoint::AmbiguousCommit => hit % at == 0,
        _ if hit == at => {
            eprintln!("injected fault: aborting at {} (hit {hit})", point.name());
            std::process::abort();
        }
        _ => false,
    }
}
