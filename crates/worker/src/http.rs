//! The worker's HTTP application: the router, the front-line middleware (request ids, request
//! line and header limits, request counting, `Connection: close` while draining, the access log)
//! and the operations and catalogue endpoints.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::body::Bytes;
use axum::extract::Path;
use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use ferrocorn_query_core::error::chain as error_chain;
use ferrocorn_query_core::{DatasetInfo, Storage};
use ferrocorn_scoreboard::{PoolCounters, WorkerRecord};
use http::{HeaderValue, header};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::access_log::AccessEntry;
use crate::api::{ColumnDoc, DatasetDoc, DatasetList, Health, Ready};
use crate::openapi::ApiDoc;
use crate::problem::{ApiError, Problem};
use crate::settings::WorkerSettings;
use crate::state::{AppState, counts_toward_budget, refresh_catalog};

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

/// The OpenAPI document, as `/openapi.json` serves it.
fn spec_json(api: &utoipa::openapi::OpenApi) -> Result<Bytes, serde_json::Error> {
    api.to_pretty_json().map(Bytes::from)
}

/// Build the router; fails if the API's contract cannot be serialised (a worker then does not
/// boot, rather than serve an empty `/openapi.json`).
pub fn router(state: Arc<AppState>) -> Result<Router, serde_json::Error> {
    let (routes, api) = documented_routes();
    let spec = spec_json(&api)?;
    Ok(routes
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
        .with_state(state))
}

/// Runs around every request: limits, request id, accounting, drain.
async fn front_line(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let begun = Begun::of(&state, &request);
    let request_id = begun.request_id.clone();
    let response = crate::request_id::scope(request_id, async move {
        match check_limits(&state.settings, &request) {
            Err(e) => e.into_response(),
            Ok(()) => {
                let _in_flight = state.count(&request);
                next.run(request).await
            }
        }
    })
    .await;
    begun.finish(response)
}

/// `GET /healthz` answered straight from the connection, before the router: the same answer,
/// headers, accounting and access line as through it, without the routing and middleware
/// machinery that would otherwise cost a tenth of a health probe's time (see `docs/design.md`,
/// "The health path"). `None` for any other request, or one the limits refuse (the router
/// answers those, with the same problem documents as ever).
pub fn fast_health<B>(state: &Arc<AppState>, request: &http::Request<B>) -> Option<Response> {
    if request.method() != http::Method::GET
        || request.uri().path() != "/healthz"
        || check_limits(&state.settings, request).is_err()
    {
        return None;
    }
    let begun = Begun::of(state, request);
    let _in_flight = state.count(request);
    Some(begun.finish(health(state)))
}

/// The front line's record of a request, taken before its handler consumes it.
struct Begun {
    state: Arc<AppState>,
    request_id: String,
    received: std::time::Instant,
    /// What the access line needs, when there is an access log.
    access: Option<RequestFacts>,
}

impl Begun {
    fn of<B>(state: &Arc<AppState>, request: &http::Request<B>) -> Self {
        Self {
            state: state.clone(),
            request_id: state
                .request_ids
                .assign(request.headers().get("x-request-id")),
            received: std::time::Instant::now(),
            access: state.access_log.as_ref().map(|_| RequestFacts::of(request)),
        }
    }

    /// The response as it goes out: its request id, `Connection: close` while draining, and
    /// its access line.
    fn finish(self, mut response: Response) -> Response {
        let state = &self.state;
        let headers = response.headers_mut();
        if let Ok(value) = HeaderValue::from_str(&self.request_id) {
            headers.insert("x-request-id", value);
        }
        if state.draining.load(Ordering::Relaxed) {
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if let (Some(log), Some(facts)) = (&state.access_log, &self.access) {
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
                duration: self.received.elapsed(),
                request_id: &self.request_id,
            };
            log.write(&entry.format(std::time::SystemTime::now()));
        }
        response
    }
}

impl AppState {
    /// Count a request that passed the limits: the pool's counter, this worker's record (its
    /// in-flight count until the guard drops) and its request budget.
    fn count<B>(&self, request: &http::Request<B>) -> InFlight {
        PoolCounters::add(&self.pool().requests, 1);
        self.record.request_started(
            request.method().as_str(),
            request.uri().path_and_query().map_or("", |p| p.as_str()),
        );
        if let Some(budget) = self.settings.request_budget
            && counts_toward_budget(request.uri().path())
            && self.budget_used.fetch_add(1, Ordering::Relaxed) + 1 >= budget
            && self.record.request_retirement()
        {
            tracing::info!(
                slot = self.slot,
                pid = self.pid,
                requests = budget,
                "worker request budget spent; asking for a successor"
            );
            (self.on_budget_spent)();
        }
        InFlight(self.record)
    }
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
    fn of<B>(request: &http::Request<B>) -> Self {
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

fn check_limits<B>(settings: &WorkerSettings, request: &http::Request<B>) -> Result<(), ApiError> {
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
async fn healthz(State(state): State<Arc<AppState>>) -> Response {
    health(&state)
}

/// The health answer: the worker's [`Health`], serialised once when the worker starts.
fn health(state: &AppState) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        state.health_body.clone(),
    )
        .into_response()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_contract_serialises_with_every_route() {
        let (_, api) = documented_routes();
        let spec: serde_json::Value =
            serde_json::from_slice(&spec_json(&api).expect("the contract serialises"))
                .expect("JSON");
        for path in [
            "/healthz",
            "/readyz",
            "/v1/query",
            "/v1/datasets",
            "/v1/datasets/{name}",
            "/metrics",
        ] {
            assert!(spec["paths"][path].is_object(), "{path} is documented");
        }
    }
}
