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
        /// Queries that failed because DuckDB ran out of memory.
        pub memory_errors: AtomicU64,
        /// Workers forked.
        pub worker_starts: AtomicU64,
        /// The pool's size as it should be (the master sets it).
        pub workers_desired: AtomicU64,
        /// Workers reaped, by [`ExitCause`].
        pub worker_exits: [AtomicU64; ExitCause::ALL.len()],
        /// Catalogue changes the workers have applied (a dataset added, changed or removed),
        /// counted by whichever worker applied each one first. A worker that has seen fewer
        /// rescans before it answers, so that none answers from an older dataset version than
        /// another one already has.
        pub catalog_changes: AtomicU64,
        /// 1 once the master de-registers the pool (TERM with a `deregistration_delay`):
        /// every worker's `/readyz` answers 503 while the pool serves on.
        pub deregistering: AtomicU32,
    }
}

/// Why a worker ended, as `/metrics` counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitCause {
    /// Its request budget (`max_requests`) was spent and a successor replaced it.
    MaxRequests,
    /// The memory guard recycled or killed it.
    Memory,
    /// Its heartbeat stopped for `timeout`.
    Timeout,
    /// It died without being told to (or failed to boot).
    Crash,
    /// A reload (HUP) replaced it.
    Reload,
    /// Its slot was removed (TTOU, or a smaller pool after a reload).
    Scale,
    /// The pool stopped.
    Stop,
}

impl ExitCause {
    pub const ALL: [Self; 7] = [
        Self::MaxRequests,
        Self::Memory,
        Self::Timeout,
        Self::Crash,
        Self::Reload,
        Self::Scale,
        Self::Stop,
    ];

    /// The `cause` label.
    pub fn label(self) -> &'static str {
        match self {
            Self::MaxRequests => "max_requests",
            Self::Memory => "memory",
            Self::Timeout => "timeout",
            Self::Crash => "crash",
            Self::Reload => "reload",
            Self::Scale => "scale",
            Self::Stop => "stop",
        }
    }
}

impl PoolCounters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn set(gauge: &AtomicU64, n: u64) {
        gauge.store(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Count a worker that ended.
    pub fn worker_exited(&self, cause: ExitCause) {
        Self::add(&self.worker_exits[cause as usize], 1);
    }

    pub fn worker_exits(&self, cause: ExitCause) -> u64 {
        Self::get(&self.worker_exits[cause as usize])
    }
}
