//! Latency histograms and the pool's request table, in shared memory.
//!
//! A [`Histogram`] counts observations into fixed buckets ([`BUCKETS_SECONDS`], Prometheus's
//! `le` bounds) and keeps their sum in microseconds; `/metrics` renders the buckets
//! cumulatively. The [`RequestTable`] counts responses by route, method and status: the labels'
//! names belong to the worker, which maps a request to the indices.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::shared::shared_struct;

/// The buckets' upper bounds in seconds (an implicit `+Inf` bucket follows).
pub const BUCKETS_SECONDS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// Buckets with `+Inf`.
const SLOTS: usize = BUCKETS_SECONDS.len() + 1;

shared_struct! {
    /// One histogram of durations.
    #[derive(Debug)]
    pub struct Histogram {
        /// Observations per bucket, not cumulative; the last is `+Inf`.
        buckets: [AtomicU64; SLOTS],
        sum_micros: AtomicU64,
    }
}

impl Histogram {
    pub fn observe(&self, duration: Duration) {
        let seconds = duration.as_secs_f64();
        let index = BUCKETS_SECONDS
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(SLOTS - 1);
        self.buckets[index].fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(duration.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// Cumulative counts per bucket (the last is the `+Inf` bucket, the total count) and the
    /// sum in seconds.
    pub fn snapshot(&self) -> ([u64; SLOTS], f64) {
        let mut cumulative = [0u64; SLOTS];
        let mut total = 0u64;
        for (out, bucket) in cumulative.iter_mut().zip(&self.buckets) {
            total += bucket.load(Ordering::Relaxed);
            *out = total;
        }
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        (cumulative, sum)
    }
}

/// Routes the request table distinguishes (the worker names them; the last is "other").
pub const ROUTES: usize = 10;
/// Methods: GET, HEAD, POST, OPTIONS, other.
pub const METHODS: usize = 5;
/// Statuses: the worker's list of codes, then one per class (1xx to 5xx) for the rest.
pub const STATUSES: usize = 32;

shared_struct! {
    /// Responses by route, method and status, and each route's duration histogram.
    #[derive(Debug)]
    pub struct RequestTable {
        counts: [[[AtomicU64; STATUSES]; METHODS]; ROUTES],
        durations: [Histogram; ROUTES],
    }
}

impl RequestTable {
    /// Count one response; indices out of range count as the last of their kind.
    pub fn record(&self, route: usize, method: usize, status: usize, took: Duration) {
        let route = route.min(ROUTES - 1);
        self.counts[route][method.min(METHODS - 1)][status.min(STATUSES - 1)]
            .fetch_add(1, Ordering::Relaxed);
        self.durations[route].observe(took);
    }

    pub fn count(&self, route: usize, method: usize, status: usize) -> u64 {
        self.counts
            .get(route)
            .and_then(|m| m.get(method))
            .and_then(|s| s.get(status))
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    pub fn durations(&self, route: usize) -> Option<&Histogram> {
        self.durations.get(route)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn histogram() -> Histogram {
        Histogram {
            buckets: Default::default(),
            sum_micros: AtomicU64::new(0),
        }
    }

    #[test]
    fn buckets_are_cumulative_and_bounds_inclusive() {
        let h = histogram();
        h.observe(Duration::from_micros(500)); // exactly the first bound
        h.observe(Duration::from_millis(7));
        h.observe(Duration::from_secs(120)); // past the last bound
        let (buckets, sum) = h.snapshot();
        assert_eq!(buckets[0], 1);
        assert_eq!(buckets[2], 1, "1 ms and 2.5 ms hold only the first");
        assert_eq!(buckets[4], 2, "le=0.01 holds 7 ms");
        assert_eq!(buckets[SLOTS - 2], 2, "le=60 does not hold 120 s");
        assert_eq!(buckets[SLOTS - 1], 3, "+Inf is the count");
        assert!((sum - 120.0075).abs() < 1e-9, "{sum}");
    }
}
