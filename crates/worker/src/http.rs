//! The worker's HTTP application: the router, the front-line middleware (request ids, request
//! line, header and body-size limits, the framing rules of RFC 9112 that hyper leaves to the
//! application, request counting, `Connection: close` while draining, the access log) and the
//! operations and catalogue endpoints.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::body::Bytes;
use axum::extract::Path;
use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use ferrocorn_query_core::error::chain as error_chain;
use ferrocorn_query_core::{DatasetInfo, Storage};
use ferrocorn_scoreboard::PoolCounters;
use http::{HeaderValue, header};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::api::{ColumnDoc, DatasetDoc, DatasetList, Health, Ready};
use crate::auth::Principal;
use crate::openapi::ApiDoc;
use crate::problem::{ApiError, Problem};
use crate::settings::WorkerSettings;
use crate::state::{AppState, counts_toward_budget, refresh_catalog};
use crate::tally::{Ending, InFlight};

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
        .routes(routes!(crate::status::server_status))
        .routes(routes!(crate::login::post_token))
        .split_for_parts()
}

/// The OpenAPI document, as `/openapi.json` serves it.
fn spec_json(api: &utoipa::openapi::OpenApi) -> Result<Bytes, serde_json::Error> {
    api.to_pretty_json().map(Bytes::from)
}

/// Build the router; fails if the API's contract cannot be serialised (a worker then does not
/// boot, rather than serve an empty `/openapi.json`).
pub fn router(state: Arc<AppState>) -> Result<Router, serde_json::Error> {
    let (routes, mut api) = documented_routes();
    crate::login::describe(&mut api, &state.settings.auth);
    let spec = spec_json(&api)?;
    let routes = routes
        .route(
            "/openapi.json",
            get(move || {
                let spec = spec.clone();
                async move { ([(header::CONTENT_TYPE, "application/json")], spec) }
            }),
        )
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(middleware::from_fn_with_state(state.clone(), front_line));
    #[cfg(feature = "test-hooks")]
    let routes = routes.route("/test-hooks/hog", axum::routing::post(hog));
    // Outside the front line: a preflight carries no credential and is answered here.
    let routes = match cors(&state.settings.cors_origins) {
        Some(layer) => routes.layer(layer),
        None => routes,
    };
    Ok(routes.with_state(state))
}

/// Test builds only: the worker takes `mib` MiB of memory for good (every page touched), as a
/// leaking worker would, for the memory guard's test.
#[cfg(feature = "test-hooks")]
async fn hog(body: Bytes) -> Response {
    let mib: usize = std::str::from_utf8(&body)
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0);
    let held = vec![0x5au8; mib << 20];
    std::mem::forget(held);
    (http::StatusCode::OK, format!("{mib}")).into_response()
}

/// The CORS policy of `cors_origins` (none when empty): exact origins (`Vary: Origin`), the
/// methods and request headers the API uses, and the response headers a client needs exposed.
/// Credentials (cookies) are never allowed: the API authenticates with bearer tokens.
fn cors(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(o).ok())
                .collect::<Vec<_>>(),
        )
    };
    let name = http::HeaderName::from_static;
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([http::Method::GET, http::Method::POST])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                header::ACCEPT,
                header::CACHE_CONTROL,
                header::IF_NONE_MATCH,
                name("x-request-id"),
                name("traceparent"),
            ])
            .expose_headers([
                name("x-request-id"),
                name("ratelimit"),
                name("ratelimit-policy"),
                header::RETRY_AFTER,
                name("server-timing"),
                name("x-result-rows"),
                name("x-result-truncated"),
                header::ETAG,
            ])
            .max_age(std::time::Duration::from_secs(600)),
    )
}

/// Runs around every request: limits, framing, request id, accounting, drain.
async fn front_line(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let mut ending = begin(&state, &request);
    let request_id = ending.request_id().to_owned();
    let response = crate::request_id::scope(request_id, async {
        match admit(&state.settings, &request) {
            Err(e) => {
                // The body is unread, and its framing may be what is wrong: nothing after it on
                // this connection can be trusted to be a request.
                let mut response = e.into_response();
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                response
            }
            Ok(()) => {
                let mut request = request;
                match crate::login::check(&state, &mut request) {
                    Err(e) => e.into_response(),
                    Ok(limits) => {
                        if let Some(principal) = request.extensions().get::<Principal>() {
                            ending.set_user(&principal.subject);
                        }
                        ending.hold(state.count(&request));
                        let mut response = next.run(request).await;
                        if let Some(limits) = limits {
                            crate::problem::insert_rate_limit(response.headers_mut(), limits);
                        }
                        response
                    }
                }
            }
        }
    })
    .await;
    finish(&state, ending, response)
}

/// `GET /healthz` answered straight from the connection, before the router: the same answer,
/// headers, accounting and access line as through it, without the routing and middleware
/// machinery that would otherwise cost a tenth of a health probe's time (see `docs/design.md`,
/// "The health path"). `None` for any other request, or one the front line refuses (the router
/// answers those, with the same problem documents as ever).
pub fn fast_health<B>(state: &Arc<AppState>, request: &http::Request<B>) -> Option<Response> {
    if request.method() != http::Method::GET
        || request.uri().path() != "/healthz"
        || admit(&state.settings, request).is_err()
    {
        return None;
    }
    let mut ending = begin(state, request);
    ending.hold(state.count(request));
    Some(finish(state, ending, health(state)))
}

/// The front line's record of a request, taken before its handler consumes it.
fn begin<B>(state: &Arc<AppState>, request: &http::Request<B>) -> Ending {
    let received = std::time::Instant::now();
    Ending::of(
        state,
        request,
        crate::request_id::assign(request.headers()),
        received,
    )
}

/// The response as it goes out: its request id, the security headers, `Connection: close`
/// while draining; counted and logged when its body ends.
fn finish(state: &AppState, ending: Ending, mut response: Response) -> Response {
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(ending.request_id()) {
        headers.insert("x-request-id", value);
    }
    // No response is a document a browser should sniff, run scripts in or frame (the API
    // serves no HTML; a data response is downloaded, never rendered).
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; frame-ancestors 'none'"),
    );
    if state.draining.load(Ordering::Relaxed) {
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    ending.attach(response)
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

pub use crate::login::PeerAddr;

/// What the front line refuses before any handler runs: the limits, then what RFC 9112 asks of
/// a request that hyper's parser lets through.
fn admit<B>(settings: &WorkerSettings, request: &http::Request<B>) -> Result<(), ApiError> {
    check_limits(settings, request)?;
    check_target(request)?;
    check_host(request)?;
    check_transfer_coding(request)
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
    // A body announced past the limit is refused at once rather than awaited.
    let limit = settings.query.max_body_bytes;
    let announced = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|len| usize::try_from(len).map_or(true, |len| len > limit)) {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    Ok(())
}

/// RFC 9112 §3.2: a target is ASCII (hyper passes raw UTF-8 through), asterisk-form is for
/// OPTIONS and authority-form for CONNECT; and an absolute-form target names no user (RFC 9110
/// §4.2.4).
fn check_target<B>(request: &http::Request<B>) -> Result<(), ApiError> {
    let uri = request.uri();
    let refuse = |why: &str| Err(ApiError::InvalidTarget(format!("the request target {why}")));
    if uri.path_and_query().is_some_and(|p| !p.as_str().is_ascii()) {
        return refuse("is not ASCII");
    }
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return refuse("names a user");
    }
    if uri.path() == "*" && request.method() != http::Method::OPTIONS {
        return refuse("* is for OPTIONS only");
    }
    if uri.scheme().is_none()
        && uri.authority().is_some()
        && request.method() != http::Method::CONNECT
    {
        return refuse("in authority-form is for CONNECT only");
    }
    Ok(())
}

/// RFC 9112 §3.2: an HTTP/1.1 request has exactly one `Host`, a request of any version at most
/// one, and it is `uri-host [":" port]`.
fn check_host<B>(request: &http::Request<B>) -> Result<(), ApiError> {
    let mut hosts = request.headers().get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (None, _) if request.version() == http::Version::HTTP_10 => Ok(()),
        (None, _) => Err(ApiError::InvalidHost(
            "an HTTP/1.1 request needs a Host field".into(),
        )),
        (Some(_), Some(_)) => Err(ApiError::InvalidHost(
            "a request has one Host field at most".into(),
        )),
        (Some(host), None) if is_host(host.as_bytes()) => Ok(()),
        (Some(host), None) => Err(ApiError::InvalidHost(format!(
            "Host {:?} is not host[:port]",
            String::from_utf8_lossy(host.as_bytes())
        ))),
    }
}

/// `uri-host [":" port]` (RFC 3986 §3.2.2, §3.2.3): `http`'s authority parser, without the
/// userinfo it allows, with the port's digits and an IPv6 literal's address checked. Empty is
/// not a host: an `http` URI with an empty host is invalid (RFC 9110 §4.2.1).
fn is_host(value: &[u8]) -> bool {
    let Ok(authority) = http::uri::Authority::try_from(value) else {
        return false;
    };
    let text = authority.as_str();
    if text.contains('@') {
        return false;
    }
    let host = authority.host();
    let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(literal) => literal.parse::<std::net::Ipv6Addr>().is_ok(),
        None => !host.is_empty(),
    };
    let port = &text[host.len()..];
    host_ok
        && (port.is_empty()
            || port
                .strip_prefix(':')
                .is_some_and(|digits| digits.bytes().all(|b| b.is_ascii_digit())))
}

/// RFC 9112 §6.1: hyper frames a body by `Transfer-Encoding` when its last coding is `chunked`
/// (refusing it otherwise) and decodes that one coding only. Any other coding, or chunked twice,
/// is not implemented here (501), rather than a body read as if it were plain.
fn check_transfer_coding<B>(request: &http::Request<B>) -> Result<(), ApiError> {
    let fields = request.headers().get_all(header::TRANSFER_ENCODING);
    let mut codings = fields
        .iter()
        .flat_map(|v| v.to_str().unwrap_or_default().split(','))
        .map(str::trim)
        .filter(|c| !c.is_empty());
    match (codings.next(), codings.next()) {
        (None, _) => Ok(()),
        (Some(only), None) if only.eq_ignore_ascii_case("chunked") => Ok(()),
        _ => Err(ApiError::UnsupportedTransferCoding(
            fields
                .iter()
                .map(|v| String::from_utf8_lossy(v.as_bytes()))
                .collect::<Vec<_>>()
                .join(", "),
        )),
    }
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
        (status = 503, description = "`not_ready`, or `deregistering` once a TERM takes the pool out of rotation", body = Problem, content_type = "application/problem+json"),
    ))]
async fn readyz(State(state): State<Arc<AppState>>) -> Result<Json<Ready>, ApiError> {
    if state
        .scoreboard
        .pool()
        .deregistering
        .load(Ordering::Relaxed)
        != 0
    {
        return Err(ApiError::Deregistering);
    }
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

async fn fresh_catalog(state: &Arc<AppState>) -> Arc<Vec<DatasetInfo>> {
    refresh_catalog(state).await;
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
        snapshot_error: info.snapshot_error.clone(),
    }
}

/// The catalogue: every dataset of the data directory.
#[utoipa::path(get, path = "/v1/datasets", tag = "datasets",
    responses((status = 200, description = "The datasets, by name", body = DatasetList)))]
async fn list_datasets(
    State(state): State<Arc<AppState>>,
    principal: Option<Extension<Principal>>,
) -> Json<DatasetList> {
    let catalog = fresh_catalog(&state).await;
    // A credential limited to some datasets sees only those.
    let readable = |name: &str| principal.as_ref().is_none_or(|p| p.may_read(name));
    Json(DatasetList {
        datasets: catalog
            .iter()
            .filter(|d| readable(&d.dataset.name))
            .map(describe)
            .collect(),
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
    principal: Option<Extension<Principal>>,
    Path(name): Path<String>,
) -> Result<Json<DatasetDoc>, ApiError> {
    if principal.as_ref().is_some_and(|p| !p.may_read(&name)) {
        return Err(ApiError::DatasetForbidden(name));
    }
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
    fn a_host_is_a_uri_host_and_an_optional_port() {
        for host in [
            "x",
            "example.com:8080",
            "127.0.0.1",
            "[::1]:80",
            "my_host.",
            "x:",
        ] {
            assert!(is_host(host.as_bytes()), "{host:?} is a host");
        }
        for not_host in [
            "", "a b", "x/y", "x?y", "x#y", "u@x", "u:p@x", "x:http", "x:1:2", "[::1", "[nope]",
        ] {
            assert!(!is_host(not_host.as_bytes()), "{not_host:?} is not a host");
        }
    }

    #[test]
    fn only_a_single_chunked_coding_is_implemented() {
        let coded = |fields: &[&str]| {
            let mut request = http::Request::new(());
            for field in fields {
                request.headers_mut().append(
                    header::TRANSFER_ENCODING,
                    HeaderValue::from_str(field).expect("field"),
                );
            }
            check_transfer_coding(&request).is_ok()
        };
        assert!(coded(&[]));
        assert!(coded(&["chunked"]));
        assert!(coded(&[" Chunked ", ""]));
        assert!(!coded(&["gzip, chunked"]));
        assert!(!coded(&["chunked, chunked"]));
        assert!(!coded(&["chunked", "chunked"]));
    }

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

    /// The contract a pool serves: production (`required`) or development, each user limited.
    fn contract(required: bool) -> serde_json::Value {
        let (_, mut api) = documented_routes();
        let auth = crate::settings::AuthSettings {
            required,
            per_user_per_minute: Some(60),
            ..Default::default()
        };
        crate::login::describe(&mut api, &auth);
        serde_json::from_slice(&spec_json(&api).expect("the contract serialises")).expect("JSON")
    }

    /// Every `$ref` under `value`.
    fn references<'a>(value: &'a serde_json::Value, found: &mut Vec<&'a str>) {
        match value {
            serde_json::Value::Object(map) => {
                if let Some(target) = map.get("$ref").and_then(|r| r.as_str()) {
                    found.push(target);
                }
                map.values().for_each(|v| references(v, found));
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| references(v, found)),
            _ => {}
        }
    }

    #[test]
    fn every_reference_in_the_contract_resolves() {
        for required in [false, true] {
            let spec = contract(required);
            let mut found = Vec::new();
            references(&spec, &mut found);
            assert!(!found.is_empty());
            for target in found {
                let pointer = target.strip_prefix('#').expect("a local reference");
                assert!(spec.pointer(pointer).is_some(), "{target} resolves");
            }
        }
    }

    #[test]
    fn the_contract_requires_a_credential_where_the_front_line_does() {
        let open = ["/healthz", "/readyz", "/v1/auth/token"];
        for (required, security) in [
            (true, serde_json::json!([{"bearer": []}])),
            (false, serde_json::json!([{"bearer": []}, {}])),
        ] {
            let spec = contract(required);
            assert_eq!(
                spec["components"]["securitySchemes"]["bearer"]["scheme"],
                "bearer"
            );
            let paths = spec["paths"].as_object().expect("paths");
            for (path, item) in paths {
                for (method, operation) in item.as_object().expect("operations") {
                    let answers = &operation["responses"];
                    if open.contains(&path.as_str()) {
                        assert!(operation.get("security").is_none(), "{method} {path}");
                        continue;
                    }
                    assert_eq!(operation["security"], security, "{method} {path}");
                    for status in ["401", "403"] {
                        assert!(answers[status].is_object(), "{method} {path} {status}");
                    }
                    // The per-user limit counts the API only.
                    let limited = path.starts_with("/v1/");
                    assert_eq!(answers["429"].is_object(), limited, "{method} {path} 429");
                }
            }
        }
    }

    #[test]
    fn every_answer_of_the_login_is_in_the_contract() {
        let spec = contract(false);
        let answers = &spec["paths"]["/v1/auth/token"]["post"]["responses"];
        // 429 from the per-address limit was answered and not documented; a pool without a
        // secret_key answered 503, a server error for a request that can never succeed there.
        for status in ["200", "400", "401", "404", "429"] {
            assert!(answers[status].is_object(), "{status} is documented");
        }
        assert!(answers["503"].is_null());
    }

    #[test]
    fn the_contract_is_as_strict_as_the_server_and_no_stricter() {
        use ferrocorn_query_core::{Explain, Format};
        let spec = contract(true);
        let schema = |name: &str| spec["components"]["schemas"][name].clone();
        let names = |name: &str| schema(name)["enum"].clone();
        // `format` and `explain` were any string; the server takes these names only.
        assert_eq!(
            names("FormatName"),
            serde_json::json!(Format::ALL.map(Format::name))
        );
        assert_eq!(
            names("ExplainName"),
            serde_json::json!(Explain::ALL.map(Explain::name))
        );
        let body = schema("QueryBody");
        assert_eq!(body["properties"]["sql"]["minLength"], 1);
        // `params` was an object only; positional parameters are an array.
        assert_eq!(
            body["properties"]["params"]["type"],
            serde_json::json!(["array", "object", "null"])
        );
        // `limit` and `timeout_ms` were int64, and the server takes any u64.
        let count = schema("UInt64");
        assert_eq!(count["maximum"], serde_json::json!(u64::MAX));
        assert!(count.get("format").is_none());
        // A form has no null: `grant_type=null` was documented and refused.
        let credentials = schema("Credentials");
        assert_eq!(
            credentials["properties"]["grant_type"]["$ref"],
            "#/components/schemas/GrantType"
        );
        assert_eq!(names("GrantType"), serde_json::json!(["password"]));
        // Arrow and Parquet results were arrays of integers; they are bytes.
        let ok = &spec["paths"]["/v1/query"]["post"]["responses"]["200"]["content"];
        for media in [
            "application/vnd.apache.arrow.stream",
            "application/vnd.apache.parquet",
        ] {
            assert_eq!(ok[media]["schema"]["$ref"], "#/components/schemas/Binary");
        }
        assert_eq!(schema("Binary")["format"], "binary");
        // A long statement in a query string meets the request-line limit.
        assert!(spec["paths"]["/v1/query"]["get"]["responses"]["414"].is_object());
        // `/server-status` answers HTML to a browser.
        let status = &spec["paths"]["/server-status"]["get"]["responses"]["200"]["content"];
        assert!(status["text/html"].is_object());
    }
}
