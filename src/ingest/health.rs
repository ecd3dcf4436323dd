//! What the consumer reports about itself for `/readyz`: that it polls, whether a broker is
//! reachable, how many partitions it owns, and which of them are stalled (their stored offset has not moved for
//! `ingest.stall_after` although the broker holds messages past it). Kept apart from the HTTP
//! layer, which only reads it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;

use crate::telemetry;

/// The consumer counts as alive while it polled within this long.
const POLL_STALE: Duration = Duration::from_secs(15);

/// The consumer's liveness as `/readyz` reads it: written by the consumer thread and its callbacks, read by HTTP handlers; lock-free but for the per-partition watch.
#[derive(Debug)]
pub struct Health {
    last_poll_ms: AtomicI64,
    assigned: AtomicUsize,
    /// Set at the first assignment the group hands this member (an empty one included).
    joined: AtomicBool,
    /// Set when librdkafka reports every broker down; cleared when its statistics show a
    /// broker connection up again (every 5 s). Not known down until librdkafka says so.
    broker_down: AtomicBool,
    stall_after: Duration,
    /// The topic whose partitions this consumer watches (the `topic` label of its gauges).
    topic: String,
    partitions: Mutex<BTreeMap<i32, Watch>>,
    /// One per consumer when there are several sources ([`Health::member`]); what `/readyz`
    /// reads is then all of them together.
    members: Mutex<Vec<Arc<Health>>>,
}

/// One owned partition's stored offset, and since when it has had messages past it.
#[derive(Debug, Clone, Copy)]
struct Watch {
    stored: Option<i64>,
    behind_since: Option<Instant>,
    stalled: bool,
}

impl Health {
    /// A consumer that has not polled, joined or been assigned anything yet; a partition counts as stalled after `stall_after` (`ingest.stall_after`).
    pub fn new(stall_after: Duration) -> Self {
        Self {
            last_poll_ms: AtomicI64::new(0),
            assigned: AtomicUsize::new(0),
            joined: AtomicBool::new(false),
            broker_down: AtomicBool::new(false),
            stall_after,
            topic: String::new(),
            partitions: Mutex::new(BTreeMap::new()),
            members: Mutex::new(Vec::new()),
        }
    }

    /// The health of one more consumer (one per source topic), reported as part of this one:
    /// ready only while every member is, with their partitions together.
    pub fn member(&self, topic: &str) -> Arc<Health> {
        let member = Arc::new(Health {
            topic: topic.to_owned(),
            ..Health::new(self.stall_after)
        });
        lock(&self.members).push(member.clone());
        member
    }

    /// The members, or `None` when this health is a consumer's own.
    fn each(&self) -> Option<Vec<Arc<Health>>> {
        let members = lock(&self.members);
        (!members.is_empty()).then(|| members.clone())
    }

    /// Called by the consumer loop on every poll round.
    pub fn polled(&self) {
        self.last_poll_ms
            .store(Utc::now().timestamp_millis(), Ordering::Relaxed);
    }

    /// Records how many partitions this member owns after a rebalance.
    pub fn set_assigned(&self, n: usize) {
        self.assigned.store(n, Ordering::Relaxed);
    }

    /// The group handed this member an assignment (possibly empty): it is a member.
    pub fn joined(&self) {
        self.joined.store(true, Ordering::Relaxed);
    }

    /// Whether the group has handed this member an assignment yet.
    pub fn has_joined(&self) -> bool {
        if let Some(members) = self.each() {
            return members.iter().all(|m| m.has_joined());
        }
        self.joined.load(Ordering::Relaxed)
    }

    /// Records what librdkafka says about the brokers: `false` on "all brokers down", `true` once its statistics show a connection up.
    pub fn set_broker_reachable(&self, reachable: bool) {
        self.broker_down.store(!reachable, Ordering::Relaxed);
    }

    /// False once librdkafka reported every broker down, until a connection is up again.
    pub fn broker_reachable(&self) -> bool {
        if let Some(members) = self.each() {
            return members.iter().all(|m| m.broker_reachable());
        }
        !self.broker_down.load(Ordering::Relaxed)
    }

    /// How many partitions this member owns.
    pub fn assigned(&self) -> usize {
        if let Some(members) = self.each() {
            return members.iter().map(|m| m.assigned()).sum();
        }
        self.assigned.load(Ordering::Relaxed)
    }

    /// Whether the consumer loop polled recently.
    pub fn consuming(&self) -> bool {
        if let Some(members) = self.each() {
            return members.iter().all(|m| m.consuming());
        }
        let last = self.last_poll_ms.load(Ordering::Relaxed);
        last > 0 && Utc::now().timestamp_millis() - last < POLL_STALE.as_millis() as i64
    }

    /// Records where the owned partitions stand: each one's offset stored in PostgreSQL and the
    /// broker's log end (`None` while unknown). A partition is stalled once its stored offset
    /// has stayed put for `stall_after` while the log end is past it; partitions not listed are
    /// no longer owned and forgotten.
    pub fn observe(&self, positions: &[(i32, Option<i64>, Option<i64>)]) {
        self.observe_at(positions, Instant::now());
    }

    fn observe_at(&self, positions: &[(i32, Option<i64>, Option<i64>)], now: Instant) {
        let mut watched = self.partitions.lock().unwrap_or_else(|p| p.into_inner());
        watched.retain(|p, w| {
            let owned = positions.iter().any(|(q, ..)| q == p);
            if !owned && w.stalled {
                telemetry::partition_stalled(&self.topic, *p, false);
            }
            owned
        });
        for &(partition, stored, log_end) in positions {
            let watch = watched.entry(partition).or_insert(Watch {
                stored,
                behind_since: None,
                stalled: false,
            });
            let behind = log_end.is_some_and(|end| end > stored.unwrap_or(0));
            if watch.stored != stored || !behind {
                // Moved, or caught up: the clock for the next stall starts afresh.
                watch.stored = stored;
                watch.behind_since = None;
            }
            if behind {
                watch.behind_since.get_or_insert(now);
            }
            let stalled = watch
                .behind_since
                .is_some_and(|since| now.duration_since(since) >= self.stall_after);
            if stalled != watch.stalled {
                telemetry::partition_stalled(&self.topic, partition, stalled);
                watch.stalled = stalled;
            }
        }
    }

    /// Partitions that are stalled now.
    pub fn stalled(&self) -> Vec<i32> {
        if let Some(members) = self.each() {
            return members.iter().flat_map(|m| m.stalled()).collect();
        }
        let watched = self.partitions.lock().unwrap_or_else(|p| p.into_inner());
        watched.iter().filter(|(_, w)| w.stalled).map(|(p, _)| *p).collect()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_consumers_are_ready_only_together() {
        let health = Health::new(Duration::from_secs(120));
        let (a, b) = (health.member("a"), health.member("b"));
        a.joined();
        a.polled();
        a.set_assigned(2);
        assert!(!health.has_joined() && !health.consuming());
        b.joined();
        b.polled();
        b.set_assigned(1);
        assert!(health.has_joined() && health.consuming());
        assert_eq!(health.assigned(), 3);
        b.set_broker_reachable(false);
        assert!(!health.broker_reachable());
    }

    #[test]
    fn a_partition_is_stalled_when_its_stored_offset_stays_put_while_it_has_lag() {
        let health = Health::new(Duration::from_secs(120));
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        health.observe_at(&[(0, Some(10), Some(50)), (1, Some(7), Some(7))], at(0));
        health.observe_at(&[(0, Some(10), Some(60)), (1, Some(7), Some(7))], at(119));
        assert!(health.stalled().is_empty());
        health.observe_at(&[(0, Some(10), Some(60)), (1, Some(7), Some(7))], at(120));
        // Partition 1 has not moved either, but it has nothing to read: idle, not stalled.
        assert_eq!(health.stalled(), vec![0]);
        // Moving again clears it at once.
        health.observe_at(&[(0, Some(11), Some(60)), (1, Some(7), Some(7))], at(121));
        assert!(health.stalled().is_empty());
    }

    #[test]
    fn an_idle_partition_that_gets_messages_has_the_whole_interval_before_it_counts_as_stalled() {
        let health = Health::new(Duration::from_secs(120));
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        health.observe_at(&[(0, Some(10), Some(10))], at(0));
        health.observe_at(&[(0, Some(10), Some(20))], at(500));
        assert!(health.stalled().is_empty());
        health.observe_at(&[(0, Some(10), Some(20))], at(619));
        assert!(health.stalled().is_empty());
        health.observe_at(&[(0, Some(10), Some(20))], at(620));
        assert_eq!(health.stalled(), vec![0]);
        // Revoked: forgotten.
        health.observe_at(&[], at(621));
        assert!(health.stalled().is_empty());
    }
}
