//! The worker's HTTP application: router, front-line middleware and endpoints.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::Path;
use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use ferrocorn_query_core::error::chain as error_chain;
use ferrocorn_query_core::{DatasetInfo, Engine, Storage};
use hashlink::LruCache;
use http::{HeaderValue, header};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::access_log::{AccessEntry, AccessLog};
use crate::openapi::{ApiDoc, ColumnDoc, DatasetDoc, DatasetList, Health, Ready};
use crate::problem::{ApiError, Problem};
use crate::query::{Admission, QuerySettings};
use crate::result_cache::ResultCache;
use crate::settings::WorkerSettings;
use ferrocorn_scoreboard::{PoolCounters, Scoreboard, WorkerRecord};

tokio::task_local! {
    static REQUEST_ID: String;
}

/// The id of the request being handled, for error documents.
pub fn current_request_id() -> Option<String> {
    REQUEST_ID.try_with(Clone::clone).ok()
}

/// State shared by every request of one worker.
pub struct AppState {
    pub slot: usize,
    pub pid: u32,
    pub engine: Arc<Engine>,
    pub record: &'static WorkerRecord,
    pub scoreboard: &'static Scoreboard,
    /// The pool's result cache, if it is on (and its directory usable).
    pub result_cache: Option<Arc<ResultCache>>,
    /// Result keys of recent requests (see [`crate::query::KeyMemo`]).
    keys: Mutex<LruCache<u64, crate::query::KeyMemo>>,
    pub settings: WorkerSettings,
    pub query: QuerySettings,
    pub admission: Admission,
    /// Set when the worker drains: every response then carries `Connection: close`.
    pub draining: AtomicBool,
    /// Called once when the request budget is spent.
    pub on_budget_spent: Box<dyn Fn() + Send + Sync>,
    /// Where request lines go, if anywhere.
    pub access_log: Option<AccessLog>,
    /// What enforces the worker's file-system boundary.
    pub sandbox: crate::sandbox::SandboxStatus,
    next_request: AtomicU64,
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
    pub sandbox: crate::sandbox::SandboxStatus,
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
            keys: Mutex::new(LruCache::new(REMEMBERED_STATEMENTS)),
            query: settings.query.clone(),
            admission: Admission::new(&settings.query),
            settings,
            draining: AtomicBool::new(false),
            on_budget_spent,
            access_log,
            sandbox,
            next_request: AtomicU64::new(1),
        }
    }

    /// The pool's counters.
    pub fn pool(&self) -> &'static PoolCounters {
        self.scoreboard.pool()
    }

    /// The result keys this worker remembers.
    pub fn key_memo(&self) -> std::sync::MutexGuard<'_, LruCache<u64, crate::query::KeyMemo>> {
        self.keys.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn request_id(&self, incoming: Option<&HeaderValue>) -> String {
        // A caller's id is kept when it is short and printable, so a proxy's id flows through.
        if let Some(id) = incoming.and_then(|v| v.to_str().ok())
            && !id.is_empty()
            && id.len() <= 128
            && id.bytes().all(|b| b.is_ascii_graphic())
        {
            return id.to_owned();
        }
        let n = self.next_request.fetch_add(1, Ordering::Relaxed);
        format!("{:x}-{:x}", self.pid, n)
    }
}

/// The routes with their OpenAPI descriptions.
fn documented_routes() -> (Router<Arc<AppState>>, utoipa::openapi::OpenApi) {
    use utoipa::OpenApi;
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(crate::query::get_query, crate::query::post_query))
        .routes(routes!(list_datasets))
        .routes(routes!(get_dataset))
        .routes(routes!(crate::metrics::metrics))
        .split_for_parts()
}

/// The OpenAPI document as served at `/openapi.json`.
pub fn openapi_json() -> String {
    documented_routes().1.to_pretty_json().unwrap_or_default()
}

/// Build the router.
pub fn router(state: Arc<AppState>) -> Router {
    let (routes, api) = documented_routes();
    let spec = Bytes::from(api.to_pretty_json().unwrap_or_default());
    routes
        .route(
            "/openapi.json",
            get(move || {
                let spec = spec.clone();
                async move { ([(header::CONTENT_TYPE, "application/json")], spec) }
            }),
        )
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(middleware::from_fn_with_state(state.clone(), front_line))
        .with_state(state)
}

/// Runs around every request: limits, request id, accounting, drain.
async fn front_line(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let request_id = state.request_id(request.headers().get("x-request-id"));
    let received = std::time::Instant::now();
    // What the access line needs from the request, taken before the handler consumes it.
    let access = state
        .access_log
        .as_ref()
        .map(|_| RequestFacts::of(&request));
    REQUEST_ID
        .scope(request_id.clone(), async move {
            let mut response = match check_limits(&state.settings, &request) {
                Err(e) => e.into_response(),
                Ok(()) => {
                    PoolCounters::add(&state.pool().requests, 1);
                    let line = format!("{} {}", request.method(), request.uri());
                    let started = state.record.request_started(&line);
                    let _in_flight = InFlight(state.record);
                    if state
                        .settings
                        .request_budget
                        .is_some_and(|budget| started >= budget)
                        && state.record.request_retirement()
                    {
                        tracing::info!(
                            slot = state.slot,
                            pid = state.pid,
                            requests = started,
                            "worker request budget spent; asking for a successor"
                        );
                        (state.on_budget_spent)();
                    }
                    tracing::debug!(request_id = %request_id, %line, "request");
                    next.run(request).await
                }
            };
            let headers = response.headers_mut();
            if let Ok(value) = HeaderValue::from_str(&request_id) {
                headers.insert("x-request-id", value);
            }
            if state.draining.load(Ordering::Relaxed) {
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            if let (Some(log), Some(facts)) = (&state.access_log, &access) {
                let entry = AccessEntry {
                    peer: facts.peer,
                    method: &facts.method,
                    target: &facts.target,
                    version: facts.version,
                    status: response.status().as_u16(),
                    bytes: response
                        .headers()
                        .get(header::CONTENT_LENGTH)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse().ok()),
                    referer: facts.referer.as_deref(),
                    user_agent: facts.user_agent.as_deref(),
                    duration: received.elapsed(),
                    request_id: &request_id,
                };
                log.write(&entry.format(std::time::SystemTime::now()));
            }
            response
        })
        .await
}

/// The peer's address, inserted into each request by the connection that carries it.
#[derive(Clone, Copy, Debug)]
pub struct PeerAddr(pub std::net::IpAddr);

/// The parts of a request its access line shows.
struct RequestFacts {
    peer: Option<std::net::IpAddr>,
    method: String,
    target: String,
    version: &'static str,
    referer: Option<String>,
    user_agent: Option<String>,
}

impl RequestFacts {
    fn of(request: &Request) -> Self {
        let header_text = |name: header::HeaderName| {
            request
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        Self {
            peer: request.extensions().get::<PeerAddr>().map(|p| p.0),
            method: request.method().to_string(),
            target: request
                .uri()
                .path_and_query()
                .map_or_else(|| request.uri().to_string(), ToString::to_string),
            version: match request.version() {
                http::Version::HTTP_10 => "HTTP/1.0",
                _ => "HTTP/1.1",
            },
            referer: header_text(header::REFERER),
            user_agent: header_text(header::USER_AGENT),
        }
    }
}

/// Decrements the in-flight count however the request ends (including a dropped future).
struct InFlight(&'static WorkerRecord);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.request_finished();
    }
}

fn check_limits(settings: &WorkerSettings, request: &Request) -> Result<(), ApiError> {
    // The request line is "METHOD SP target SP HTTP/1.1"; hyper has parsed it already.
    let uri = request.uri();
    // The target as sent: origin form (path and query), or absolute form with scheme and host.
    let target_len = uri.scheme_str().map_or(0, |s| s.len() + "://".len())
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path_and_query().map_or(0, |pq| pq.as_str().len());
    let line_len = request.method().as_str().len() + target_len + " HTTP/1.1".len() + 1;
    if line_len > settings.limit_request_line {
        return Err(ApiError::RequestLineTooLong {
            limit: settings.limit_request_line,
        });
    }
    for (name, value) in request.headers() {
        if name.as_str().len() + value.len() + 2 > settings.limit_request_field_size {
            return Err(ApiError::HeaderFieldTooLarge {
                name: name.as_str().to_owned(),
                limit: settings.limit_request_field_size,
            });
        }
    }
    Ok(())
}

/// Liveness: answers from the worker's event loop, never touches DuckDB.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "The worker is alive", body = Health)))]
async fn healthz(State(state): State<Arc<AppState>>) -> Json<Health> {
    Json(Health {
        status: "ok",
        slot: state.slot,
        pid: state.pid,
    })
}

/// Readiness: the worker's DuckDB answers `SELECT 1`.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "DuckDB open, datasets registered", body = Ready),
        (status = 503, description = "`not_ready`", body = Problem, content_type = "application/problem+json"),
    ))]
async fn readyz(State(state): State<Arc<AppState>>) -> Result<Json<Ready>, ApiError> {
    let engine = state.engine.clone();
    tokio::task::spawn_blocking(move || engine.ping())
        .await
        .map_err(|_| ApiError::Internal)?
        .map_err(|e| ApiError::NotReady(error_chain(&e)))?;
    Ok(Json(Ready {
        status: "ready",
        slot: state.slot,
        pid: state.pid,
        duckdb: state.engine.duckdb_version().to_owned(),
        datasets: state.engine.dataset_count(),
        sandbox: state.sandbox.describe(),
    }))
}

/// Request shapes whose result key a worker remembers, and the longest statement remembered.
const REMEMBERED_STATEMENTS: usize = 1024;
pub const MAX_REMEMBERED_STATEMENT: usize = 16 << 10;

/// How often a worker may rescan the data directory for new or changed datasets.
pub const RESCAN_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Rescan the data directory if the last scan is older than [`RESCAN_INTERVAL`], off the event
/// loop; nothing to do (and no trip to the blocking pool) otherwise.
pub async fn refresh_catalog(engine: &Arc<Engine>) {
    if engine.refresh_due(RESCAN_INTERVAL) {
        let engine = engine.clone();
        let _ = tokio::task::spawn_blocking(move || engine.refresh_if_due(RESCAN_INTERVAL)).await;
    }
}

async fn fresh_catalog(state: &AppState) -> Arc<Vec<DatasetInfo>> {
    refresh_catalog(&state.engine).await;
    state.engine.catalog()
}

fn describe(info: &DatasetInfo) -> DatasetDoc {
    DatasetDoc {
        name: info.dataset.name.clone(),
        columns: info
            .columns
            .iter()
            .map(|c| ColumnDoc {
                name: c.name.clone(),
                sql_type: c.sql_type.clone(),
            })
            .collect(),
        files: info.dataset.files.clone(),
        bytes: info.dataset.bytes,
        row_estimate: info.row_estimate,
        dataset_version: info.dataset.version.clone(),
        storage: match info.storage {
            Storage::Parquet => "parquet",
            Storage::Snapshot { .. } => "snapshot",
        },
        snapshot_bytes: match info.storage {
            Storage::Snapshot { bytes, .. } => Some(bytes),
            Storage::Parquet => None,
        },
        pending_version: info.pending.clone(),
        available: info.error.is_none(),
        error: info.error.clone(),
    }
}

/// The catalogue: every dataset of the data directory.
#[utoipa::path(get, path = "/v1/datasets", tag = "datasets",
    responses((status = 200, description = "The datasets, by name", body = DatasetList)))]
async fn list_datasets(State(state): State<Arc<AppState>>) -> Json<DatasetList> {
    let catalog = fresh_catalog(&state).await;
    Json(DatasetList {
        datasets: catalog.iter().map(describe).collect(),
    })
}

/// One dataset.
#[utoipa::path(get, path = "/v1/datasets/{name}", tag = "datasets",
    params(("name" = String, Path, description = "The dataset's name")),
    responses(
        (status = 200, description = "The dataset", body = DatasetDoc),
        (status = 404, description = "`unknown_dataset`", body = Problem, content_type = "application/problem+json"),
    ))]
async fn get_dataset(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Json<DatasetDoc>, ApiError> {
    let catalog = fresh_catalog(&state).await;
    catalog
        .iter()
        .find(|d| d.dataset.name == name)
        .map(|d| Json(describe(d)))
        .ok_or(ApiError::UnknownDataset(name))
}
