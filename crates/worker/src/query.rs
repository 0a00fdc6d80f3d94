//! `POST /v1/query` and `GET /v1/query`: one read-only statement, streamed in the chosen format.
//!
//! The request is parsed and the format negotiated on the event loop; the query then waits for a
//! slot of the worker's admission control (at most `max_concurrent_queries` at once, a short
//! bounded queue, then 503 `overloaded`), runs on the blocking pool, and hands encoded chunks
//! back through a small channel: a slow client slows the query down instead of growing memory.
//!
//! A query ends early when its deadline passes (DuckDB is interrupted: 504 `query_timeout`) or
//! when the client goes away (the response future or body is dropped: DuckDB is interrupted).
//! Errors before the first byte are problem documents; an error after it can never pass for a
//! complete result: NDJSON ends with an `{"error": …}` line, other formats abort the body.
//!
//! Before anything else the statement passes the query core's gate ([`ferrocorn_query_core::gate`]),
//! which also says which datasets it reads and whether its result is determined by its inputs.
//! Such a statement gets an `ETag` made of its exact text, its parameters and the versions of the
//! datasets it reads: `If-None-Match` with it is answered 304 without running
//! anything, and a result that fits the first buffer is kept in the pool's result cache
//! ([`crate::result_cache`]). The request's `Cache-Control: no-cache` skips the cache lookup
//! (the fresh result is still stored); `no-store` skips both.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use ferrocorn_query_core::arrow::datatypes::SchemaRef;
use ferrocorn_query_core::arrow::record_batch::RecordBatch;
use ferrocorn_query_core::{
    Analysis, Encoder, Explain, Flow, Format, InterruptHandle, Outcome, Params, QueryError,
    QuerySpec, ResultSink, Summary,
};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use http_body_util::StreamBody;
use hyper::body::Frame;
use serde::Deserialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use crate::http::AppState;
use crate::openapi::{QueryErrors, QueryResult};
use crate::problem::{ApiError, Problem};
use crate::result_cache::{CacheKey, Entry};
use ferrocorn_scoreboard::PoolCounters;

/// The worker's query limits, resolved by the supervisor.
#[derive(Clone, Debug)]
pub struct QuerySettings {
    /// Rows a result may have; more is cut and flagged `truncated`.
    pub max_result_rows: u64,
    /// Largest request body in bytes; larger is 413.
    pub max_body_bytes: usize,
    /// Longest a query may run; `timeout_ms` can only ask for less. Also the default.
    pub max_query_time: Duration,
    /// Queries run at once by one worker.
    pub max_concurrent_queries: usize,
    /// Queries that may wait for a slot; more are answered 503 at once.
    pub queue_depth: usize,
    /// Longest wait for a slot before 503.
    pub queue_timeout: Duration,
}

/// Admission control: a semaphore for running queries and a bound on the waiters.
#[derive(Debug)]
pub struct Admission {
    running: Arc<Semaphore>,
    waiting: AtomicUsize,
    depth: usize,
    timeout: Duration,
}

impl Admission {
    pub fn new(settings: &QuerySettings) -> Self {
        Self {
            running: Arc::new(Semaphore::new(settings.max_concurrent_queries.max(1))),
            waiting: AtomicUsize::new(0),
            depth: settings.queue_depth,
            timeout: settings.queue_timeout,
        }
    }

    async fn admit(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        if let Ok(permit) = self.running.clone().try_acquire_owned() {
            return Ok(permit);
        }
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.depth {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(ApiError::Overloaded);
        }
        let result = tokio::time::timeout(self.timeout, self.running.clone().acquire_owned()).await;
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        match result {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(ApiError::Overloaded),
        }
    }
}

/// The JSON body of `POST /v1/query`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QueryBody {
    /// One read-only SQL statement.
    pub sql: String,
    /// Positional (array, for `$1` or `?`) or named (object, for `$name`) parameters: JSON
    /// scalars, or `{"type": "date", "value": "2024-01-31"}` for typed values.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub params: Option<serde_json::Value>,
    /// json, ndjson, csv, arrow or parquet; overrides `Accept`.
    #[serde(default)]
    pub format: Option<String>,
    /// Rows at most (below the server's maximum).
    #[serde(default)]
    pub limit: Option<u64>,
    /// Deadline in milliseconds (below the server's maximum).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// `plan` answers the query's plan instead of its result (nothing runs); `analyze` runs it
    /// and answers the plan with each operator's time and rows.
    #[serde(default)]
    pub explain: Option<String>,
}

/// Run one read-only statement (JSON body).
#[utoipa::path(
    post,
    path = "/v1/query",
    tag = "query",
    request_body(content = QueryBody, content_type = "application/json"),
    responses(
        (status = 200, response = inline(QueryResult)),
        QueryErrors,
        (status = 413, description = "Body too large (`payload_too_large`)", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Body is not JSON (`unsupported_media_type`)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn post_query(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    if let Some(content_type) = headers.get(header::CONTENT_TYPE) {
        let json = content_type
            .to_str()
            .ok()
            .and_then(|v| v.split(';').next())
            .is_some_and(|m| {
                let m = m.trim().to_ascii_lowercase();
                m == "application/json" || m.ends_with("+json")
            });
        if !json {
            return Err(ApiError::UnsupportedMediaType);
        }
    }
    let limit = state.query.max_body_bytes;
    let bytes = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| ApiError::PayloadTooLarge { limit })?;
    let text = std::str::from_utf8(&bytes).map_err(|_| ApiError::BadRequest {
        code: "invalid_body",
        detail: "the body is not UTF-8".into(),
    })?;
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| ApiError::BadRequest {
            code: "invalid_body",
            detail: format!("the body is not JSON: {e}"),
        })?;
    if !value.is_object() {
        return Err(ApiError::BadRequest {
            code: "invalid_body",
            detail: "the body must be a JSON object".into(),
        });
    }
    let body: QueryBody = serde_json::from_value(value).map_err(|e| ApiError::BadRequest {
        code: "invalid_body",
        detail: e.to_string(),
    })?;
    run_query(state, &headers, body).await
}

/// Run one read-only statement (query string).
#[utoipa::path(
    get,
    path = "/v1/query",
    tag = "query",
    params(
        ("sql" = String, Query, description = "One read-only statement"),
        ("params" = Option<String>, Query, description = "Parameters as JSON (array or object)"),
        ("format" = Option<String>, Query, description = "json, ndjson, csv, arrow or parquet"),
        ("limit" = Option<u64>, Query, description = "Rows at most"),
        ("timeout_ms" = Option<u64>, Query, description = "Deadline in milliseconds"),
        ("explain" = Option<String>, Query, description = "plan or analyze: the query's plan instead of its result"),
    ),
    responses((status = 200, response = inline(QueryResult)), QueryErrors)
)]
pub async fn get_query(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let bad = |detail: String| ApiError::BadRequest {
        code: "invalid_query_string",
        detail,
    };
    let Query(mut query) = query.map_err(|e| bad(e.body_text()))?;
    let sql = query
        .remove("sql")
        .ok_or_else(|| bad("the sql parameter is required".into()))?;
    let params = match query.remove("params") {
        Some(text) => {
            Some(serde_json::from_str(&text).map_err(|e| bad(format!("params is not JSON: {e}")))?)
        }
        None => None,
    };
    let number =
        |query: &mut HashMap<String, String>, key: &str| -> Result<Option<u64>, ApiError> {
            query
                .remove(key)
                .map(|v| {
                    v.parse::<u64>()
                        .map_err(|_| bad(format!("{key} must be a non-negative integer")))
                })
                .transpose()
        };
    let limit = number(&mut query, "limit")?;
    let timeout_ms = number(&mut query, "timeout_ms")?;
    let format = query.remove("format");
    let explain = query.remove("explain");
    if let Some(unknown) = query.keys().next() {
        return Err(bad(format!(
            "unknown parameter {unknown:?}; expected sql, params, format, limit, timeout_ms, explain"
        )));
    }
    run_query(
        state,
        &headers,
        QueryBody {
            sql,
            params,
            format,
            limit,
            timeout_ms,
            explain,
        },
    )
    .await
}

/// Pick the format: `format` if given, else the best match of `Accept` (q-values honoured).
pub fn negotiate(format: Option<&str>, accept: Option<&str>) -> Result<Format, ApiError> {
    if let Some(name) = format {
        return Format::from_name(name).ok_or_else(|| ApiError::BadRequest {
            code: "unsupported_format",
            detail: format!("unknown format {name:?}; one of json, ndjson, csv, arrow, parquet"),
        });
    }
    let Some(accept) = accept.filter(|a| !a.trim().is_empty()) else {
        return Ok(Format::Json);
    };
    let mut best: Option<(Format, f32, usize)> = None;
    for (rank, format) in Format::ALL.into_iter().enumerate() {
        let mut q_for_format: Option<(f32, u8)> = None;
        for range in accept.split(',') {
            let mut parts = range.split(';');
            let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            let q = parts
                .filter_map(|p| p.trim().strip_prefix("q="))
                .find_map(|q| q.trim().parse::<f32>().ok())
                .unwrap_or(1.0)
                .clamp(0.0, 1.0);
            // Specificity: an exact type beats type/*, which beats */*.
            let specificity = if format.accepted_media_types().contains(&media.as_str()) {
                3
            } else if media.ends_with("/*")
                && format
                    .accepted_media_types()
                    .iter()
                    .any(|t| t.starts_with(&media[..media.len() - 1]))
            {
                2
            } else if media == "*/*" {
                1
            } else {
                continue;
            };
            if q_for_format.is_none_or(|(_, s)| specificity > s) {
                q_for_format = Some((q, specificity));
            }
        }
        if let Some((q, _)) = q_for_format
            && q > 0.0
            && best.is_none_or(|(_, bq, brank)| q > bq || (q == bq && rank < brank))
        {
            best = Some((format, q, rank));
        }
    }
    best.map(|(f, _, _)| f).ok_or(ApiError::NotAcceptable)
}

/// Chunks from the query thread to the response.
enum Chunk {
    Data(Vec<u8>),
    End { summary: Summary, encode: Duration },
    Failed(QueryError),
}

/// Cancels the query when dropped before it finished (client gone) and on deadline.
#[derive(Default)]
struct Cancel {
    handle: Mutex<Option<InterruptHandle>>,
    fired: AtomicBool,
    timed_out: AtomicBool,
    done: AtomicBool,
}

impl std::fmt::Debug for Cancel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cancel")
            .field("fired", &self.fired)
            .field("timed_out", &self.timed_out)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl Cancel {
    fn fire(&self) {
        self.fired.store(true, Ordering::Release);
        if let Some(handle) = self
            .handle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            handle.interrupt();
        }
    }
}

/// What a query holds while it runs: its admission slot, its deadline timer and its
/// cancellation. Finishing it disarms the timer; dropping it unfinished (the response future or
/// body was dropped: the client went away) interrupts the query.
struct Running {
    cancel: Arc<Cancel>,
    timer: tokio::task::JoinHandle<()>,
    _permit: OwnedSemaphorePermit,
}

impl Running {
    fn start(permit: OwnedSemaphorePermit, deadline: Duration) -> Self {
        let cancel = Arc::new(Cancel::default());
        let timer = {
            let cancel = cancel.clone();
            tokio::spawn(async move {
                tokio::time::sleep(deadline).await;
                cancel.timed_out.store(true, Ordering::Release);
                cancel.fire();
            })
        };
        Self {
            cancel,
            timer,
            _permit: permit,
        }
    }

    /// The query is over: nothing is left to cancel.
    fn finish(self) {
        self.cancel.done.store(true, Ordering::Release);
    }

    /// The query failed: the error to answer (a timeout if the deadline interrupted it).
    fn fail(self, error: QueryError) -> ApiError {
        let answer = if matches!(error, QueryError::Interrupted)
            && self.cancel.timed_out.load(Ordering::Acquire)
        {
            ApiError::QueryTimeout
        } else {
            ApiError::Query(error)
        };
        self.finish();
        answer
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.timer.abort();
        if !self.cancel.done.load(Ordering::Acquire) {
            self.cancel.fire();
        }
    }
}

struct ChannelSink {
    format: Format,
    encoder: Option<Encoder>,
    tx: mpsc::Sender<Chunk>,
    cancel: Arc<Cancel>,
    encode: Duration,
}

impl ChannelSink {
    fn send(&self, chunk: Chunk) -> Flow {
        match self.tx.blocking_send(chunk) {
            Ok(()) => Flow::Continue,
            Err(_) => Flow::Stop,
        }
    }
}

impl ResultSink for ChannelSink {
    fn started(&mut self, interrupt: InterruptHandle) {
        let mut slot = self.cancel.handle.lock().unwrap_or_else(|e| e.into_inner());
        if self.cancel.fired.load(Ordering::Acquire) {
            interrupt.interrupt();
        }
        *slot = Some(interrupt);
    }

    fn schema(&mut self, schema: SchemaRef) -> Flow {
        let started = Instant::now();
        match Encoder::new(self.format, schema) {
            Ok((encoder, head)) => {
                self.encoder = Some(encoder);
                self.encode += started.elapsed();
                self.send(Chunk::Data(head))
            }
            Err(e) => {
                let _ = self.send(Chunk::Failed(QueryError::Internal(e.to_string())));
                Flow::Stop
            }
        }
    }

    fn batch(&mut self, batch: RecordBatch) -> Flow {
        let Some(encoder) = self.encoder.as_mut() else {
            return Flow::Stop;
        };
        let started = Instant::now();
        match encoder.batch(&batch) {
            Ok(bytes) => {
                self.encode += started.elapsed();
                if bytes.is_empty() {
                    Flow::Continue
                } else {
                    self.send(Chunk::Data(bytes))
                }
            }
            Err(e) => {
                let _ = self.send(Chunk::Failed(QueryError::Internal(e.to_string())));
                Flow::Stop
            }
        }
    }
}

/// Bytes buffered before the response headers go out: a result that fits is sent with its
/// length and an exact `X-Result-Truncated` header.
const BUFFER_BEFORE_HEADERS: usize = 1 << 20;

async fn run_query(
    state: Arc<AppState>,
    headers: &HeaderMap,
    body: QueryBody,
) -> Result<Response, ApiError> {
    let received = Instant::now();
    let format = negotiate(
        body.format.as_deref(),
        headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()),
    )?;
    let params = Params::from_json(body.params.as_ref()).map_err(|e| ApiError::Query(e.into()))?;
    let explain = body
        .explain
        .as_deref()
        .map(|name| {
            Explain::from_name(name).ok_or_else(|| ApiError::BadRequest {
                code: "invalid_body",
                detail: format!("unknown explain {name:?}; one of plan, analyze"),
            })
        })
        .transpose()?;
    let settings = &state.query;
    let max_rows = body.limit.map_or(settings.max_result_rows, |l| {
        l.min(settings.max_result_rows)
    });
    let deadline = body.timeout_ms.map_or(settings.max_query_time, |ms| {
        Duration::from_millis(ms).min(settings.max_query_time)
    });
    PoolCounters::add(&state.pool().queries, 1);

    // The dataset versions in the cache key (and the views the query reads) must be current.
    crate::http::refresh_catalog(&state.engine).await;
    // A request shape whose result key this worker remembers for the current catalogue passed
    // the gate with it; any other statement passes the gate first, so that a refused one takes
    // no query slot and costs DuckDB one parse.
    let shape = explain
        .is_none()
        .then(|| RequestShape::of(&state, &body, format, max_rows));
    let key = match shape.as_ref().and_then(|s| s.remembered(&state)) {
        Some(known) => Some(known),
        None => {
            let analysis = gate(&state, &body.sql).await?;
            shape.and_then(|s| s.key(&state, &analysis))
        }
    };
    let cache = key.map(|(key, etag)| Caching::new(&state, headers, key, etag));
    if let Some(cache) = &cache {
        if cache.matches(headers.get(header::IF_NONE_MATCH)) {
            PoolCounters::add(&state.pool().not_modified, 1);
            let mut response_headers = HeaderMap::new();
            cache.insert_headers(&mut response_headers);
            return Ok((StatusCode::NOT_MODIFIED, response_headers).into_response());
        }
        if cache.read
            && let Some(store) = state.result_cache.clone()
        {
            let hit = match store.get_hot(&cache.key) {
                Some(entry) => Some(entry),
                None => {
                    let key = cache.key.clone();
                    tokio::task::spawn_blocking(move || store.load(&key))
                        .await
                        .map_err(|_| ApiError::Internal)?
                }
            };
            if let Some(entry) = hit {
                let mut response_headers = answer_headers(format, Some(cache), true);
                let summary = Summary {
                    rows: entry.rows,
                    truncated: entry.truncated,
                };
                insert_result_headers(
                    &mut response_headers,
                    summary,
                    Duration::ZERO,
                    received.elapsed(),
                    Duration::ZERO,
                );
                return Ok((StatusCode::OK, response_headers, entry.body).into_response());
            }
        }
    }

    // Held until the last byte is sent (it moves into the streamed body).
    let permit = state
        .admission
        .admit()
        .await
        .inspect_err(|_| PoolCounters::add(&state.pool().overloaded, 1))?;
    let running = Running::start(permit, deadline);
    let queued = received.elapsed();
    let (tx, mut rx) = mpsc::channel::<Chunk>(4);
    let engine = state.engine.clone();
    let sql = body.sql;
    let exec_started = Instant::now();
    {
        let cancel = running.cancel.clone();
        tokio::task::spawn_blocking(move || {
            let mut sink = ChannelSink {
                format,
                encoder: None,
                tx,
                cancel,
                encode: Duration::ZERO,
            };
            let spec = QuerySpec {
                sql: &sql,
                params: &params,
                max_rows,
                explain,
            };
            let result = engine.run(&spec, &mut sink);
            let chunk = match result {
                Ok(Outcome { stopped: true, .. }) => return,
                Ok(outcome) => match sink.encoder.take() {
                    Some(encoder) => {
                        let started = Instant::now();
                        let summary = Summary {
                            rows: outcome.rows,
                            truncated: outcome.truncated,
                        };
                        match encoder.finish(summary) {
                            Ok(tail) => {
                                sink.encode += started.elapsed();
                                if !tail.is_empty() && sink.send(Chunk::Data(tail)) == Flow::Stop {
                                    return;
                                }
                                Chunk::End {
                                    summary,
                                    encode: sink.encode,
                                }
                            }
                            Err(e) => Chunk::Failed(QueryError::Internal(e.to_string())),
                        }
                    }
                    None => Chunk::Failed(QueryError::Internal("no result schema".into())),
                },
                Err(e) => Chunk::Failed(e),
            };
            let _ = sink.send(chunk);
        });
    }

    // Buffer the start of the result: errors before the first byte become problem documents,
    // and a small result goes out whole, with its length and truncation flag in the headers.
    let mut buffered: Vec<u8> = Vec::new();
    let mut end = None;
    while buffered.len() < BUFFER_BEFORE_HEADERS {
        match rx.recv().await {
            Some(Chunk::Data(bytes)) => buffered.extend_from_slice(&bytes),
            Some(Chunk::End { summary, encode }) => {
                end = Some((summary, encode));
                break;
            }
            Some(Chunk::Failed(e)) => return Err(running.fail(e)),
            None => return Err(running.fail(QueryError::Interrupted)),
        }
    }

    let mut response_headers = answer_headers(format, cache.as_ref(), false);
    if let Some((summary, encode)) = end {
        running.finish();
        let exec = exec_started.elapsed().saturating_sub(encode);
        insert_result_headers(&mut response_headers, summary, queued, exec, encode);
        let buffered = Bytes::from(buffered);
        if let Some(cache) = cache.filter(|c| c.write)
            && let Some(store) = state.result_cache.clone()
        {
            let entry = Entry {
                rows: summary.rows,
                truncated: summary.truncated,
                body: buffered.clone(),
            };
            tokio::task::spawn_blocking(move || store.put(&cache.key, &entry));
        }
        return Ok((StatusCode::OK, response_headers, buffered).into_response());
    }

    // Stream the rest: the running query (its slot, deadline and cancellation) travels with the
    // body and ends with its last item.
    let timing = format!("queue;dur={:.1}", queued.as_secs_f64() * 1000.0);
    if let Ok(value) = HeaderValue::from_str(&timing) {
        response_headers.insert("server-timing", value);
    }
    // Clients that send `TE: trailers` get the row count, the truncation flag and the full
    // timing at the end.
    response_headers.insert(
        header::TRAILER,
        HeaderValue::from_static("x-result-truncated, x-result-rows, server-timing"),
    );
    let first = Some(Bytes::from(buffered));
    let stream = futures_util::stream::unfold(
        (rx, first, Some(running)),
        move |(mut rx, mut first, running)| async move {
            type Item = Result<Frame<Bytes>, std::io::Error>;
            if let Some(bytes) = first.take() {
                return Some((
                    Ok::<_, std::io::Error>(Frame::data(bytes)),
                    (rx, None, running),
                ));
            }
            let running = running?;
            let item: Item = match rx.recv().await {
                Some(Chunk::Data(bytes)) => {
                    let frame = Frame::data(Bytes::from(bytes));
                    return Some((Ok(frame), (rx, None, Some(running))));
                }
                Some(Chunk::End { summary, encode }) => {
                    running.finish();
                    let mut trailers = HeaderMap::new();
                    let exec = exec_started.elapsed().saturating_sub(encode);
                    insert_result_headers(&mut trailers, summary, queued, exec, encode);
                    Ok(Frame::trailers(trailers))
                }
                Some(Chunk::Failed(e)) => {
                    let problem = running.fail(e);
                    tracing::warn!(error = %problem, "query failed after the response started");
                    if format == Format::Ndjson {
                        Ok(Frame::data(Bytes::from(ndjson_error_line(&problem))))
                    } else {
                        Err(std::io::Error::other(problem.to_string()))
                    }
                }
                None => {
                    running.finish();
                    Err(std::io::Error::other("query ended early"))
                }
            };
            Some((item, (rx, None, None)))
        },
    );
    let body = Body::new(StreamBody::new(stream));
    Ok((StatusCode::OK, response_headers, body).into_response())
}

/// The headers of a 200 answer before its result's own: media type, download name, and what
/// caches may do with it (`hit`: it comes from the result cache).
fn answer_headers(format: Format, cache: Option<&Caching>, hit: bool) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(format.media_type()),
    );
    if format == Format::Parquet {
        headers.insert(
            header::CONTENT_DISPOSITION,
            HeaderValue::from_static("attachment; filename=\"result.parquet\""),
        );
    }
    match cache {
        Some(cache) => {
            cache.insert_headers(&mut headers);
            let status = match (hit, cache.read) {
                (true, _) => "hit",
                (false, true) => "miss",
                (false, false) => "bypass",
            };
            headers.insert("x-cache", HeaderValue::from_static(status));
        }
        None => {
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        }
    }
    headers
}

/// How one request may use the result cache and conditional requests.
#[derive(Debug)]
struct Caching {
    key: CacheKey,
    etag: HeaderValue,
    /// Look the result up (the request did not say `no-cache` or `no-store`).
    read: bool,
    /// Store a fresh result (the request did not say `no-store`).
    write: bool,
}

/// The gate's verdict on `sql` ([`ferrocorn_query_core::gate`]) against the current catalogue:
/// remembered by the engine, or DuckDB parses it on the blocking pool.
async fn gate(state: &AppState, sql: &str) -> Result<Arc<Analysis>, ApiError> {
    let analysis = match state.engine.cached_analysis(sql) {
        Some(known) => known,
        None => {
            let engine = state.engine.clone();
            let sql = sql.to_owned();
            tokio::task::spawn_blocking(move || engine.analyze(&sql))
                .await
                .map_err(|_| ApiError::Internal)??
        }
    };
    analysis
        .check(&state.engine.catalog())
        .map_err(|e| ApiError::Query(e.into()))?;
    Ok(analysis)
}

impl Caching {
    fn new(state: &AppState, headers: &HeaderMap, key: CacheKey, etag: HeaderValue) -> Self {
        let (mut no_store, mut no_cache) = (false, false);
        for directive in headers
            .get_all(header::CACHE_CONTROL)
            .iter()
            .chain(headers.get_all(header::PRAGMA).iter())
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
        {
            no_store |= directive.eq_ignore_ascii_case("no-store");
            no_cache |= directive.eq_ignore_ascii_case("no-cache")
                || directive.eq_ignore_ascii_case("max-age=0");
        }
        let enabled = state.result_cache.is_some();
        Self {
            key,
            etag,
            read: enabled && !no_store && !no_cache,
            write: enabled && !no_store,
        }
    }

    /// Whether `If-None-Match` names this result.
    fn matches(&self, if_none_match: Option<&HeaderValue>) -> bool {
        let Some(value) = if_none_match.and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let ours = self.etag.to_str().unwrap_or_default();
        value
            .split(',')
            .map(str::trim)
            .any(|tag| tag == "*" || tag == ours || tag.strip_prefix("W/") == Some(ours))
    }

    /// `ETag`, and `Cache-Control` telling clients to revalidate before reuse (the data may
    /// change at any time; revalidation costs them a 304).
    fn insert_headers(&self, headers: &mut HeaderMap) {
        headers.insert(header::ETAG, self.etag.clone());
        headers.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("private, no-cache"),
        );
    }
}

/// A result's key and `ETag`, remembered by each worker for each request shape and catalogue.
#[derive(Debug)]
pub struct KeyMemo {
    sql: String,
    params: Vec<u8>,
    format: Format,
    max_rows: u64,
    /// The catalogue the key was computed from; held, so that no later catalogue can have its
    /// address.
    catalog: Arc<Vec<ferrocorn_query_core::DatasetInfo>>,
    key: CacheKey,
    etag: HeaderValue,
}

/// What a request's result depends on besides its datasets: statement, parameters, format, row
/// limit, and the catalogue it is answered against.
struct RequestShape<'b> {
    body: &'b QueryBody,
    params: Vec<u8>,
    format: Format,
    max_rows: u64,
    catalog: Arc<Vec<ferrocorn_query_core::DatasetInfo>>,
    fingerprint: u64,
}

impl<'b> RequestShape<'b> {
    fn of(state: &AppState, body: &'b QueryBody, format: Format, max_rows: u64) -> Self {
        use std::hash::{Hash, Hasher};
        let params = body
            .params
            .as_ref()
            .map(|p| serde_json::to_vec(p).unwrap_or_default())
            .unwrap_or_default();
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        (&body.sql, &params, format.name(), max_rows).hash(&mut hasher);
        Self {
            body,
            params,
            format,
            max_rows,
            catalog: state.engine.catalog(),
            fingerprint: hasher.finish(),
        }
    }

    /// The key and `ETag` this worker computed for the same shape and catalogue.
    fn remembered(&self, state: &AppState) -> Option<(CacheKey, HeaderValue)> {
        let mut memo = state.key_memo();
        let memo = memo.get(&self.fingerprint)?;
        (Arc::ptr_eq(&memo.catalog, &self.catalog)
            && memo.sql == self.body.sql
            && memo.params == self.params
            && memo.format == self.format
            && memo.max_rows == self.max_rows)
            .then(|| (memo.key.clone(), memo.etag.clone()))
    }

    /// The result key and its `ETag`, or `None` when the result may not be reused: the gate
    /// found the statement not deterministic, or it reads no dataset (only datasets have
    /// versions to key a result by). The key is the statement's exact text (two texts share an
    /// entry only if they are the same text, whatever DuckDB would make of their differences),
    /// the parameters, the format, the row limit, DuckDB's version and the served version of every
    /// dataset the statement reads.
    fn key(self, state: &AppState, analysis: &Analysis) -> Option<(CacheKey, HeaderValue)> {
        let datasets = analysis.datasets(&self.catalog);
        if !analysis.is_deterministic() || datasets.is_empty() {
            return None;
        }
        let max_rows_bytes = self.max_rows.to_le_bytes();
        let mut parts: Vec<&[u8]> = vec![
            state.engine.duckdb_version().as_bytes(),
            self.body.sql.as_bytes(),
            &self.params,
            self.format.name().as_bytes(),
            &max_rows_bytes,
        ];
        for info in &datasets {
            parts.push(info.dataset.name.as_bytes());
            parts.push(info.dataset.version.as_bytes());
        }
        let key = CacheKey::new(parts);
        let etag = HeaderValue::from_str(&format!("\"{}\"", key.as_str())).ok()?;
        if self.body.sql.len() <= crate::http::MAX_REMEMBERED_STATEMENT {
            state.key_memo().insert(
                self.fingerprint,
                KeyMemo {
                    sql: self.body.sql.clone(),
                    params: self.params,
                    format: self.format,
                    max_rows: self.max_rows,
                    catalog: self.catalog.clone(),
                    key: key.clone(),
                    etag: etag.clone(),
                },
            );
        }
        Some((key, etag))
    }
}

fn insert_result_headers(
    headers: &mut HeaderMap,
    summary: Summary,
    queued: Duration,
    exec: Duration,
    encode: Duration,
) {
    headers.insert(
        "x-result-truncated",
        HeaderValue::from_static(if summary.truncated { "true" } else { "false" }),
    );
    headers.insert("x-result-rows", HeaderValue::from(summary.rows));
    let timing = format!(
        "queue;dur={:.1}, exec;dur={:.1}, encode;dur={:.1}",
        queued.as_secs_f64() * 1000.0,
        exec.as_secs_f64() * 1000.0,
        encode.as_secs_f64() * 1000.0
    );
    if let Ok(value) = HeaderValue::from_str(&timing) {
        headers.insert("server-timing", value);
    }
}

fn ndjson_error_line(error: &ApiError) -> Vec<u8> {
    let (status, code) = error.status_and_code();
    let mut line = serde_json::to_vec(&serde_json::json!({
        "error": {
            "status": status.as_u16(),
            "code": code,
            "detail": error.to_string(),
            "request_id": crate::http::current_request_id(),
        }
    }))
    .unwrap_or_default();
    line.push(b'\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_honours_format_then_accept_with_q_values() {
        assert_eq!(negotiate(None, None).ok(), Some(Format::Json));
        assert_eq!(
            negotiate(Some("csv"), Some("application/json")).ok(),
            Some(Format::Csv)
        );
        assert!(negotiate(Some("xml"), None).is_err());
        assert_eq!(negotiate(None, Some("text/csv")).ok(), Some(Format::Csv));
        assert_eq!(
            negotiate(
                None,
                Some("application/json;q=0.5, application/vnd.apache.arrow.stream")
            )
            .ok(),
            Some(Format::Arrow)
        );
        assert_eq!(negotiate(None, Some("*/*")).ok(), Some(Format::Json));
        assert_eq!(
            negotiate(None, Some("text/*;q=0.9, application/json;q=0.1")).ok(),
            Some(Format::Csv)
        );
        assert!(matches!(
            negotiate(None, Some("image/png")),
            Err(ApiError::NotAcceptable)
        ));
        assert!(matches!(
            negotiate(None, Some("application/json;q=0")),
            Err(ApiError::NotAcceptable)
        ));
    }
}
