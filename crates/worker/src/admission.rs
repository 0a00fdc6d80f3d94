//! Admission control: at most `max_concurrent_queries` queries run at once in a worker; the
//! others wait for a slot as long as they can still finish within their own deadline.
//!
//! The policy (documented for operators in `config/ferrocorn.toml`):
//!
//! - A query that finds a free slot runs at once.
//! - Otherwise it joins the queue if the queue is shorter than its bound (`query_queue_depth`;
//!   by default as many waiters as the worker has connections, and no more request bodies than
//!   its memory share holds) and if the wait the queue predicts, plus the query's own expected
//!   run, fits in its deadline (`timeout_ms`, capped by `query_timeout_ms`). The prediction comes
//!   from the queue: the waiters ahead, the slots, and the recent time a query holds a slot.
//! - It waits at most its deadline less its expected run (or `query_queue_timeout_ms`, when an
//!   operator set one for fast shedding), then is refused.
//! - A refusal is 503 `overloaded` with `Retry-After`: when the queue ahead should have drained.
//! - A query that waited gets its whole deadline to run: the wait is not taken from it.
//!
//! Work goes where there is room: with `share_query_slots` (the default) the pool's slots
//! (`workers × max_concurrent_queries`) are one table in the shared region. A worker always has
//! its own share; when that is taken and its queue is not empty, it borrows a slot other workers
//! leave idle, so a query that reached a busy worker does not wait while another worker's slot is
//! free. A borrowed slot is taken only while the pool runs fewer queries than its total, and a
//! worker's own share is never refused, so the pool runs at most twice its total at a moment.
//! The queue's head watches the table (every [`POLL`]) as well as its own worker's slots.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ferrocorn_scoreboard::{Scoreboard, WorkerRecord};
use tokio::sync::{Mutex, Notify, OwnedSemaphorePermit, Semaphore};

use crate::settings::QuerySettings;

/// How often the head of a worker's queue looks for a slot another worker freed.
pub const POLL: Duration = Duration::from_millis(2);

/// The pool's slot table: this worker's record and the shared region.
#[derive(Clone, Copy, Debug)]
pub struct SlotTable {
    pub record: &'static WorkerRecord,
    pub scoreboard: &'static Scoreboard,
}

/// A query was refused a slot: answering it would take longer than its deadline allows, or the
/// queue is at its bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Full {
    /// When a retry should find room: the queue's predicted drain time.
    pub retry_after: Duration,
}

/// Slots for running queries, the queue in front of them and its service-time estimate.
#[derive(Debug)]
pub struct Admission {
    /// This worker's own share of the slots.
    own: Arc<Semaphore>,
    slots: usize,
    waiting: AtomicUsize,
    /// Held by the waiter at the head of the queue (tokio's mutex is fair: waiters in order).
    head: Mutex<()>,
    /// A slot of this worker was freed.
    freed: Arc<Notify>,
    depth: usize,
    max_wait: Option<Duration>,
    service: Arc<ServiceTime>,
    /// Where running queries are counted, if anywhere.
    table: Option<SlotTable>,
    /// The pool's total, when idle slots may be borrowed.
    pool_slots: Option<u32>,
}

impl Admission {
    pub fn new(settings: &QuerySettings, table: Option<SlotTable>) -> Self {
        let slots = settings.max_concurrent_queries.max(1);
        Self {
            own: Arc::new(Semaphore::new(slots)),
            slots,
            waiting: AtomicUsize::new(0),
            head: Mutex::new(()),
            freed: Arc::new(Notify::new()),
            depth: settings.queue_depth,
            max_wait: settings.queue_timeout,
            service: Arc::new(ServiceTime::default()),
            table,
            pool_slots: settings
                .pool_slots
                .filter(|_| table.is_some())
                .map(|n| u32::try_from(n).unwrap_or(u32::MAX)),
        }
    }

    /// A slot for a query that must finish within `deadline`, held until the [`Permit`] drops:
    /// at once, after a wait in the queue, or [`Full`].
    pub async fn admit(&self, deadline: Duration) -> Result<Permit, Full> {
        if self.waiting.load(Ordering::Acquire) == 0
            && let Some(permit) = self.try_take()
        {
            return Ok(permit);
        }
        let ahead = self.waiting.fetch_add(1, Ordering::AcqRel);
        let _leave = Leave(&self.waiting);
        let expected_run = self.service.estimate();
        let predicted_wait = self.predicted_wait(ahead);
        let mut patience = deadline.saturating_sub(expected_run);
        if let Some(max_wait) = self.max_wait {
            patience = patience.min(max_wait);
        }
        if ahead >= self.depth || predicted_wait > patience {
            return Err(self.full(ahead));
        }
        match tokio::time::timeout(patience, self.wait_turn()).await {
            Ok(permit) => Ok(permit),
            Err(_) => Err(self.full(self.waiting.load(Ordering::Acquire).saturating_sub(1))),
        }
    }

    /// Wait to be the head of the queue, then for a slot: one of this worker's own, or (when
    /// slots are shared) one the pool has idle.
    async fn wait_turn(&self) -> Permit {
        let _head = self.head.lock().await;
        loop {
            if let Some(permit) = self.try_take() {
                return permit;
            }
            if self.pool_slots.is_some() {
                tokio::select! {
                    _ = self.freed.notified() => {}
                    _ = tokio::time::sleep(POLL) => {}
                }
            } else if let Ok(slot) = self.own.clone().acquire_owned().await {
                return self.permit(Some(slot));
            }
        }
    }

    /// A slot now, if there is one: this worker's own, or a borrowed one.
    fn try_take(&self) -> Option<Permit> {
        if let Ok(slot) = self.own.clone().try_acquire_owned() {
            return Some(self.permit(Some(slot)));
        }
        let (table, total) = self.table.zip(self.pool_slots)?;
        // Count it first, then look: two workers borrowing at once both see both, so the pool
        // never runs more borrowed queries than its total has idle.
        table.record.query_started();
        if table.scoreboard.running_queries() <= total {
            Some(self.counted(None, Some(table)))
        } else {
            table.record.query_finished();
            None
        }
    }

    /// Queries waiting for a slot now.
    #[cfg(test)]
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    /// How long a query with `ahead` waiters before it should wait: the slots serve the queue
    /// in rounds of one service time each.
    fn predicted_wait(&self, ahead: usize) -> Duration {
        let rounds = (ahead / self.slots + 1) as u32;
        self.service.estimate() * rounds
    }

    fn full(&self, ahead: usize) -> Full {
        Full {
            retry_after: self.predicted_wait(ahead),
        }
    }

    /// A permit for one of this worker's own slots, counted in the table.
    fn permit(&self, own: Option<OwnedSemaphorePermit>) -> Permit {
        if let Some(table) = self.table {
            table.record.query_started();
        }
        self.counted(own, self.table)
    }

    /// A permit for a slot already counted in `table` (if any).
    fn counted(&self, own: Option<OwnedSemaphorePermit>, table: Option<SlotTable>) -> Permit {
        Permit {
            own,
            since: Instant::now(),
            service: self.service.clone(),
            table,
            freed: self.freed.clone(),
        }
    }
}

/// A query's slot. Dropping it frees the slot, tells the queue, and feeds the time it was held
/// into the queue's estimate.
#[derive(Debug)]
pub struct Permit {
    /// `None` for a slot borrowed from the pool.
    own: Option<OwnedSemaphorePermit>,
    since: Instant,
    service: Arc<ServiceTime>,
    /// Where the query was counted (it is uncounted on drop).
    table: Option<SlotTable>,
    freed: Arc<Notify>,
}

impl Permit {
    /// Whether the slot was borrowed from the pool.
    #[cfg(test)]
    fn borrowed(&self) -> bool {
        self.own.is_none()
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.service.record(self.since.elapsed());
        if let Some(table) = self.table {
            table.record.query_finished();
        }
        drop(self.own.take());
        self.freed.notify_one();
    }
}

/// Takes a waiter off the count however its wait ends (including a dropped future).
struct Leave<'a>(&'a AtomicUsize);

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How long a query holds a slot, recently: an exponentially weighted moving average (weight
/// 1/8 for each new query) in microseconds. Concurrent updates may lose one sample; an estimate
/// needs no more.
#[derive(Debug, Default)]
struct ServiceTime {
    micros: AtomicU64,
}

impl ServiceTime {
    fn estimate(&self) -> Duration {
        Duration::from_micros(self.micros.load(Ordering::Relaxed))
    }

    fn record(&self, held: Duration) {
        let sample = u64::try_from(held.as_micros()).unwrap_or(u64::MAX);
        let old = self.micros.load(Ordering::Relaxed);
        let new = if old == 0 {
            sample
        } else {
            old - old / 8 + sample / 8
        };
        self.micros.store(new.max(1), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(slots: usize, depth: usize, max_wait: Option<Duration>) -> QuerySettings {
        QuerySettings {
            max_result_rows: 10,
            max_body_bytes: 1024,
            max_query_time: Duration::from_secs(30),
            max_concurrent_queries: slots,
            queue_depth: depth,
            queue_timeout: max_wait,
            pool_slots: None,
        }
    }

    fn admission(slots: usize, depth: usize, max_wait: Option<Duration>) -> Admission {
        Admission::new(&settings(slots, depth, max_wait), None)
    }

    /// Two workers of one slot each, sharing a table of two (or not).
    fn two_workers(share: bool) -> (Admission, Admission, &'static Scoreboard) {
        let scoreboard = Scoreboard::map().expect("shared region");
        let worker = |index| {
            let mut settings = settings(1, 100, None);
            settings.pool_slots = share.then_some(2);
            let record = scoreboard.record(index).expect("record");
            Admission::new(&settings, Some(SlotTable { record, scoreboard }))
        };
        (worker(0), worker(1), scoreboard)
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_worker_borrows_the_slot_another_leaves_idle() {
        let (a, b, scoreboard) = two_workers(true);
        let first = a
            .admit(Duration::from_secs(30))
            .await
            .expect("its own slot");
        assert!(!first.borrowed());
        let second = a
            .admit(Duration::from_secs(30))
            .await
            .expect("b's idle slot");
        assert!(
            second.borrowed(),
            "the second query runs at once on the idle slot"
        );
        assert_eq!(scoreboard.running_queries(), 2);
        // The pool is full: a third waits…
        let started = tokio::time::Instant::now();
        let third = a.admit(Duration::from_secs(30));
        tokio::pin!(third);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), &mut third)
                .await
                .is_err(),
            "the pool's total is taken"
        );
        // …but b's own share is never refused.
        let own = b
            .admit(Duration::from_secs(30))
            .await
            .expect("b's own slot");
        assert!(!own.borrowed());
        assert_eq!(scoreboard.running_queries(), 3, "at most twice the total");
        // Any slot freed anywhere in the pool serves a's queue.
        drop(own);
        drop(first);
        let third = third.await.expect("a freed slot");
        assert!(started.elapsed() < Duration::from_millis(60));
        drop((second, third));
        assert_eq!(scoreboard.running_queries(), 0, "every slot given back");
    }

    #[tokio::test(start_paused = true)]
    async fn without_sharing_a_worker_keeps_to_its_own_slots() {
        let (a, _b, scoreboard) = two_workers(false);
        let _first = a
            .admit(Duration::from_secs(30))
            .await
            .expect("its own slot");
        let second = a.admit(Duration::from_secs(30));
        assert!(
            tokio::time::timeout(Duration::from_millis(50), second)
                .await
                .is_err(),
            "waits although b is idle"
        );
        assert_eq!(scoreboard.running_queries(), 1);
    }

    /// Teach the estimate that a query holds a slot for `held`.
    fn learn(admission: &Admission, held: Duration) {
        for _ in 0..50 {
            admission.service.record(held);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_query_waits_while_its_deadline_allows_and_then_runs() {
        let admission = Arc::new(admission(1, 100, None));
        learn(&admission, Duration::from_millis(100));
        let first = admission.admit(Duration::from_secs(5)).await.expect("free");
        let waiter = {
            let admission = admission.clone();
            tokio::spawn(async move { admission.admit(Duration::from_secs(5)).await })
        };
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(
            admission.waiting(),
            1,
            "still waiting after 3 s: its deadline allows it"
        );
        drop(first);
        assert!(waiter.await.expect("task").is_ok());
        assert_eq!(admission.waiting(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_query_the_queue_cannot_serve_in_time_is_refused_at_once_with_an_estimate() {
        let admission = Arc::new(admission(2, 100, None));
        learn(&admission, Duration::from_secs(1));
        let _running: Vec<Permit> = vec![
            admission
                .admit(Duration::from_secs(30))
                .await
                .expect("free"),
            admission
                .admit(Duration::from_secs(30))
                .await
                .expect("free"),
        ];
        // Four waiters on two slots of about a second each.
        let mut waiters = Vec::new();
        for _ in 0..4 {
            let admission = admission.clone();
            waiters.push(tokio::spawn(async move {
                admission.admit(Duration::from_secs(30)).await
            }));
        }
        tokio::task::yield_now().await;
        assert_eq!(admission.waiting(), 4);
        let started = tokio::time::Instant::now();
        let refused = admission
            .admit(Duration::from_millis(2500))
            .await
            .expect_err("three rounds of a second do not fit in 2.5 s");
        assert_eq!(started.elapsed(), Duration::ZERO, "refused without waiting");
        assert_eq!(refused.retry_after, Duration::from_secs(3));
        // A longer deadline is queued instead.
        let patient = {
            let admission = admission.clone();
            tokio::spawn(async move { admission.admit(Duration::from_secs(10)).await })
        };
        tokio::task::yield_now().await;
        assert_eq!(admission.waiting(), 5);
        drop(waiters);
        drop(patient);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_gives_up_when_its_deadline_less_its_run_has_passed() {
        let admission = admission(1, 100, None);
        learn(&admission, Duration::from_millis(500));
        let _running = admission
            .admit(Duration::from_secs(30))
            .await
            .expect("free");
        let started = tokio::time::Instant::now();
        let refused = admission
            .admit(Duration::from_secs(2))
            .await
            .expect_err("the slot never frees");
        assert_eq!(started.elapsed(), Duration::from_millis(1500));
        assert_eq!(refused.retry_after, Duration::from_millis(500));
    }

    #[tokio::test(start_paused = true)]
    async fn the_operators_bounds_shed_load_fast() {
        let no_queue = admission(1, 0, None);
        let _running = no_queue.admit(Duration::from_secs(30)).await.expect("free");
        assert!(no_queue.admit(Duration::from_secs(30)).await.is_err());

        let short_wait = admission(1, 100, Some(Duration::from_millis(200)));
        let _running = short_wait
            .admit(Duration::from_secs(30))
            .await
            .expect("free");
        let started = tokio::time::Instant::now();
        assert!(short_wait.admit(Duration::from_secs(30)).await.is_err());
        assert_eq!(started.elapsed(), Duration::from_millis(200));
    }

    #[test]
    fn the_estimate_follows_the_recent_service_time() {
        let service = ServiceTime::default();
        assert_eq!(
            service.estimate(),
            Duration::ZERO,
            "nothing known: no prediction"
        );
        service.record(Duration::from_millis(80));
        assert_eq!(service.estimate(), Duration::from_millis(80));
        for _ in 0..100 {
            service.record(Duration::from_millis(8));
        }
        let estimate = service.estimate();
        assert!(
            estimate >= Duration::from_millis(8) && estimate < Duration::from_millis(9),
            "{estimate:?}"
        );
    }
}
