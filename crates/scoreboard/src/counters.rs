//! Counters of the whole pool.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::shared::shared_struct;

shared_struct! {
    /// Counters for the whole pool, behind `/metrics`: every worker adds to them, any worker reports
    /// them, and they outlive the workers that counted (a recycled worker's counts stay).
    #[derive(Debug, Default)]
    pub struct PoolCounters {
        pub requests: AtomicU64,
        pub queries: AtomicU64,
        pub overloaded: AtomicU64,
        pub not_modified: AtomicU64,
        pub cache_hits: AtomicU64,
        pub cache_misses: AtomicU64,
        pub cache_stores: AtomicU64,
        pub cache_evictions: AtomicU64,
        /// Bytes the result cache holds on disk, as last counted (never below the truth: a store
        /// adds its size before its file appears).
        pub cache_bytes: AtomicU64,
        /// Whether `cache_bytes` has been counted from the directory since the master started.
        pub cache_bytes_known: AtomicU32,
    }
}

impl PoolCounters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
