//! The master's periodic looks at the workers' health beyond their heartbeats: every
//! [`SAMPLE_INTERVAL`] each worker's memory and CPU and each slot's accept queue, read from
//! `/proc` and the sockets into the scoreboard (where `/metrics` and `ferrocorn status` find
//! them), and the memory guard that asks the pool to recycle a worker over `max_worker_memory`.
//!
//! systemd's watchdog is fed from here too: like the sampling it is a rate-limited verdict on
//! whether the pool is healthy, read off the scoreboard each turn of the loop.

use std::time::{Duration, Instant};

use ferrocorn_scoreboard::{PoolCounters, RecordState, monotonic_ms};

use super::Master;
use crate::pool::Event;

/// How often the master samples the workers' memory and CPU and the accept queues.
const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

/// Samples in a row over `max_worker_memory` before the guard recycles a worker.
const OVER_MEMORY_SAMPLES: u32 = 3;

impl Master {
    /// Every [`SAMPLE_INTERVAL`]: each worker's RSS and CPU time and each slot's accept queue
    /// into the scoreboard, and the memory guard's verdicts.
    pub(super) fn sample(&mut self) {
        let now = Instant::now();
        if self
            .last_sample
            .is_some_and(|t| now.saturating_duration_since(t) < SAMPLE_INTERVAL)
        {
            return;
        }
        self.last_sample = Some(now);
        let pool = self.scoreboard.pool();
        PoolCounters::set(&pool.workers_desired, self.pool.desired() as u64);
        for (slot, queued) in self.listeners.accept_queues().into_iter().enumerate() {
            self.scoreboard.set_accept_queue(slot, queued);
        }
        let ceiling = self.config.worker_memory_ceiling(self.pool.desired());
        let mut events = Vec::new();
        let mut pool_rss = 0u64;
        for (pid, child) in &mut self.children {
            let record = &self.scoreboard.records()[child.record];
            let Some((rss, cpu_ms)) = crate::usage::process(pid.as_raw()) else {
                continue;
            };
            record.set_usage(rss, cpu_ms);
            pool_rss += rss;
            let Some(ceiling) = ceiling else { continue };
            if rss > ceiling + ceiling / 2 {
                events.push(Event::OverMemory {
                    pid: *pid,
                    hard: true,
                });
                continue;
            }
            child.over_memory = if rss > ceiling {
                child.over_memory + 1
            } else {
                0
            };
            if child.over_memory >= OVER_MEMORY_SAMPLES && !child.memory_reported {
                child.memory_reported = true;
                tracing::warn!(
                    slot = record.slot(),
                    pid = pid.as_raw(),
                    generation = record.generation(),
                    rss_bytes = rss,
                    ceiling_bytes = ceiling,
                    "worker over max_worker_memory"
                );
                events.push(Event::OverMemory {
                    pid: *pid,
                    hard: false,
                });
            }
        }
        let budget = self.config.duckdb_memory_limit_bytes;
        let over = pool_rss > budget / 10 * 9;
        if over && !self.over_budget {
            tracing::warn!(
                rss_bytes = pool_rss,
                budget_bytes = budget,
                "the pool's resident memory is over 90 % of duckdb_memory_limit"
            );
        }
        self.over_budget = over;
        for event in events {
            self.dispatch(event);
        }
    }

    /// Tell systemd's watchdog the master is alive — only while a quorum of the pool (half its
    /// slots, at least one) has a ready worker with a fresh heartbeat, so that a pool that
    /// cannot serve is restarted.
    pub(super) fn feed_watchdog(&mut self) {
        let Some(interval) = self.watchdog else {
            return;
        };
        if !self.succession.is_main() {
            return;
        }
        let now = Instant::now();
        if self
            .last_watchdog
            .is_some_and(|t| now.saturating_duration_since(t) < interval / 3)
        {
            return;
        }
        let fresh_ms = (interval.as_millis() as u64).min(self.config.timeout.as_millis() as u64);
        let now_ms = monotonic_ms();
        let alive = self
            .children
            .values()
            .map(|c| self.record(c.record))
            .filter(|r| {
                r.state() == RecordState::Ready
                    && now_ms.saturating_sub(r.last_heartbeat_ms()) <= fresh_ms
            })
            .count();
        let quorum = self.pool.desired().div_ceil(2).max(1);
        if alive >= quorum {
            self.last_watchdog = Some(now);
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
        }
    }
}
