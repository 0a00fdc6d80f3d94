//! What every request of one worker shares ([`AppState`]), and keeping the engine's catalogue
//! current.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use ferrocorn_query_core::Engine;
use ferrocorn_scoreboard::{PoolCounters, Scoreboard, WorkerRecord};

use crate::access_log::AccessLog;
use crate::admission::{Admission, SlotTable};
use crate::api::Health;
use crate::auth::Auth;
use crate::caching::{CheapStatements, KeyMemos};
use crate::result_cache::ResultCache;
use crate::sandbox::SandboxStatus;
use crate::settings::{QuerySettings, WorkerSettings};

/// State shared by every request of one worker.
pub struct AppState {
    pub slot: usize,
    pub pid: u32,
    pub engine: Arc<Engine>,
    pub record: &'static WorkerRecord,
    pub scoreboard: &'static Scoreboard,
    /// The pool's result cache, if it is on (and its directory usable).
    pub result_cache: Option<Arc<ResultCache>>,
    /// Result keys of recent request shapes.
    pub keys: KeyMemos,
    /// Statements whose results are cheaper to compute than to keep on disk.
    pub cheap: CheapStatements,
    pub settings: WorkerSettings,
    pub query: QuerySettings,
    pub admission: Admission,
    /// Set when the worker drains: every response then carries `Connection: close`.
    pub draining: AtomicBool,
    /// Called once when the request budget is spent.
    pub on_budget_spent: Box<dyn Fn() + Send + Sync>,
    /// API requests received, the ones the request budget counts ([`counts_toward_budget`]).
    pub budget_used: AtomicU64,
    /// Where request lines go, if anywhere.
    pub access_log: Option<AccessLog>,
    /// What enforces the worker's file-system boundary.
    pub sandbox: SandboxStatus,
    /// `/healthz`'s body, serialised once.
    pub health_body: bytes::Bytes,
    /// Accounts, keys and tokens.
    pub auth: Auth,
    /// How far this worker's catalogue has followed the pool's.
    pub catalog: CatalogSync,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("slot", &self.slot)
            .field("pid", &self.pid)
            .field("draining", &self.draining)
            .finish_non_exhaustive()
    }
}

/// What a worker's shared state is made of.
pub struct StateParts {
    pub slot: usize,
    pub engine: Arc<Engine>,
    pub record: &'static WorkerRecord,
    pub scoreboard: &'static Scoreboard,
    pub settings: WorkerSettings,
    /// Called once when the request budget is spent.
    pub on_budget_spent: Box<dyn Fn() + Send + Sync>,
    pub access_log: Option<AccessLog>,
    pub sandbox: SandboxStatus,
    pub auth: Auth,
}

impl std::fmt::Debug for StateParts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateParts")
            .field("slot", &self.slot)
            .field("sandbox", &self.sandbox)
            .finish_non_exhaustive()
    }
}

impl AppState {
    pub fn new(parts: StateParts) -> Self {
        let StateParts {
            slot,
            engine,
            record,
            scoreboard,
            settings,
            on_budget_spent,
            access_log,
            sandbox,
            auth,
        } = parts;
        let result_cache = settings.result_cache.as_ref().and_then(|cache| {
            ResultCache::open(cache, scoreboard.pool())
                .inspect_err(|e| {
                    tracing::warn!(dir = %cache.dir.display(), error = %e, "result cache off: cannot use its directory");
                })
                .ok()
                .map(Arc::new)
        });
        Self {
            slot,
            pid: std::process::id(),
            engine,
            record,
            scoreboard,
            result_cache,
            keys: KeyMemos::default(),
            cheap: CheapStatements::new(
                settings
                    .result_cache
                    .as_ref()
                    .map_or(std::time::Duration::ZERO, |c| c.disk_worthy),
            ),
            query: settings.query.clone(),
            admission: Admission::new(&settings.query, Some(SlotTable { record, scoreboard })),
            settings,
            draining: AtomicBool::new(false),
            on_budget_spent,
            budget_used: AtomicU64::new(0),
            access_log,
            sandbox,
            health_body: serde_json::to_vec(&Health {
                status: "ok",
                slot,
                pid: std::process::id(),
            })
            .unwrap_or_default()
            .into(),
            auth,
            catalog: CatalogSync::join(&scoreboard.pool().catalog_changes),
        }
    }

    /// The pool's counters.
    pub fn pool(&self) -> &'static PoolCounters {
        self.scoreboard.pool()
    }
}

/// Whether a request to `path` counts toward the worker's request budget (`max_requests`): the
/// API's requests do, whatever their answer; probes, scrapes, the contract and unknown paths do
/// no work that could leak, and counting them would tie recycling to the monitoring rate.
pub fn counts_toward_budget(path: &str) -> bool {
    path.starts_with("/v1/")
}

/// How often a worker may rescan the data directory for new or changed datasets.
pub const RESCAN_INTERVAL: Duration = Duration::from_secs(1);

/// One worker's place in the pool's count of catalogue changes
/// ([`PoolCounters::catalog_changes`]).
///
/// Each worker rescans the data directory on its own clock, so without this, two workers could
/// answer from two versions of a replaced file for up to [`RESCAN_INTERVAL`]: a client whose
/// requests land on both would see the new answer, then the old one again. A worker that
/// applies a change counts it in the pool's count at once (before its next answer can leave);
/// a worker whose count is behind the pool's rescans before it answers.
#[derive(Debug)]
pub struct CatalogSync {
    pool: &'static AtomicU64,
    seen: AtomicU64,
}

impl CatalogSync {
    /// A new worker's place. Its catalogue was scanned at boot, maybe after a change the others
    /// have not seen yet: it counts itself as a change (so they rescan once), and has seen
    /// nothing (so its first request rescans too, for a change counted while it booted).
    fn join(pool: &'static AtomicU64) -> Self {
        pool.fetch_add(1, Ordering::AcqRel);
        Self {
            pool,
            seen: AtomicU64::new(0),
        }
    }

    /// The pool's count when this worker is behind it.
    fn behind(&self) -> Option<u64> {
        let pool = self.pool.load(Ordering::Acquire);
        (pool > self.seen.load(Ordering::Acquire)).then_some(pool)
    }

    /// Count one change this worker applied.
    fn applied(&self) {
        let count = self.pool.fetch_add(1, Ordering::AcqRel) + 1;
        self.seen.fetch_max(count, Ordering::AcqRel);
    }

    /// This worker's catalogue reflects the pool's count `count`.
    fn caught_up(&self, count: u64) {
        self.seen.fetch_max(count, Ordering::AcqRel);
    }
}

/// Rescan the data directory if the last scan is older than [`RESCAN_INTERVAL`], or at once if
/// another worker has applied a change this one has not seen; off the event loop. Nothing to do
/// (two atomic loads, no trip to the blocking pool) otherwise.
pub async fn refresh_catalog(state: &Arc<AppState>) {
    let behind = state.catalog.behind();
    let interval = if behind.is_some() {
        Duration::ZERO
    } else {
        RESCAN_INTERVAL
    };
    if !state.engine.refresh_due(interval) {
        return;
    }
    // The count before the scan: a change another worker applies meanwhile is not assumed seen.
    let before = state.catalog.pool.load(Ordering::Acquire);
    let scanning = state.clone();
    let _ = tokio::task::spawn_blocking(move || {
        if scanning.engine.refresh_if_due(interval) {
            scanning.catalog.applied();
        } else {
            scanning.catalog.caught_up(before);
        }
    })
    .await;
}
