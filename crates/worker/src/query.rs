//! `POST /v1/query` and `GET /v1/query`: one read-only statement, answered in the chosen format.
//!
//! The request is parsed and its format negotiated ([`crate::negotiate`]) on the event loop.
//! Its statement then passes the query core's gate ([`ferrocorn_query_core::gate`]) — unless this
//! worker remembers its result key for the current catalogue, which it computed after the gate
//! accepted it — and the result cache is asked ([`crate::caching`]). A query that must run waits
//! for a slot of the worker's admission control ([`crate::admission`]) and runs on the blocking
//! pool, its bytes moved to the response by [`crate::stream`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Extension;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use ferrocorn_query_core::{Analysis, Explain, Params, QueryError, Refusal, Summary};
use ferrocorn_scoreboard::PoolCounters;
use http::{HeaderMap, StatusCode, header};

use crate::api::{ExplainName, FormatName, QueryBody, QueryErrors, QueryResult, UInt64};
use crate::auth::Principal;
use crate::caching::{Caching, RequestShape, answer_headers, insert_vary};
use crate::compress::Coding;
use crate::negotiate::negotiate;
use crate::problem::{ApiError, Problem};
use crate::result_cache::Entry;
use crate::state::{AppState, refresh_catalog};
use crate::stream::{Job, insert_result_headers, respond};

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
    principal: Option<Extension<Principal>>,
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
    let deadline = state.settings.body_deadline();
    let bytes = tokio::time::timeout(deadline, axum::body::to_bytes(body, limit))
        .await
        .map_err(|_| ApiError::BodyTimeout(deadline))?
        .map_err(|e| {
            // Past the limit, or a body that cannot be read (bad chunked framing, cut short).
            if std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
            {
                ApiError::PayloadTooLarge { limit }
            } else {
                ApiError::InvalidBody(format!("the body cannot be read: {e}"))
            }
        })?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| ApiError::InvalidBody("the body is not UTF-8".into()))?;
    let value: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| ApiError::InvalidBody(format!("the body is not JSON: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::InvalidBody(
            "the body must be a JSON object".into(),
        ));
    }
    let body: QueryBody =
        serde_json::from_value(value).map_err(|e| ApiError::InvalidBody(e.to_string()))?;
    run_query(state, principal.as_ref().map(|p| &p.0), &headers, body).await
}

/// Run one read-only statement (query string).
#[utoipa::path(
    get,
    path = "/v1/query",
    tag = "query",
    params(
        ("sql" = String, Query, description = "One read-only statement", min_length = 1, example = "SELECT 42 AS answer"),
        ("params" = Option<String>, Query, description = "Parameters as JSON (array or object)"),
        ("format" = Option<FormatName>, Query, description = "json, ndjson, csv, arrow or parquet"),
        ("limit" = Option<UInt64>, Query, description = "Rows at most"),
        ("timeout_ms" = Option<UInt64>, Query, description = "Deadline in milliseconds"),
        ("explain" = Option<ExplainName>, Query, description = "plan or analyze: the query's plan instead of its result"),
    ),
    responses(
        (status = 200, response = inline(QueryResult)),
        QueryErrors,
        (status = 414, description = "The request line is longer than the server's `limit_request_line` (`request_line_too_long`): send a long statement with POST", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get_query(
    State(state): State<Arc<AppState>>,
    principal: Option<Extension<Principal>>,
    headers: HeaderMap,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let bad = ApiError::InvalidQueryString;
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
        principal.as_ref().map(|p| &p.0),
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

async fn run_query(
    state: Arc<AppState>,
    principal: Option<&Principal>,
    headers: &HeaderMap,
    body: QueryBody,
) -> Result<Response, ApiError> {
    let received = Instant::now();
    let format = negotiate(
        body.format.as_deref(),
        headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()),
    )?;
    let coding = Coding::negotiate(
        format,
        headers
            .get(header::ACCEPT_ENCODING)
            .and_then(|v| v.to_str().ok()),
    );
    let params = Params::from_json(body.params.as_ref()).map_err(|e| ApiError::Query(e.into()))?;
    let explain = body
        .explain
        .as_deref()
        .map(|name| {
            Explain::from_name(name).ok_or_else(|| {
                ApiError::InvalidBody(format!("unknown explain {name:?}; one of plan, analyze"))
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
    refresh_catalog(&state).await;
    // A credential limited to some datasets: every dataset the statement reads, by DuckDB's
    // parse of it (through CTEs, subqueries, joins, any spelling), must be one of them. Before
    // the result cache, so that a cached answer is not a way around it.
    let checked = match principal.filter(|p| p.datasets.is_some()) {
        Some(principal) => Some(readable_only(&state, principal, &body.sql).await?),
        None => None,
    };
    // A request shape whose result key this worker remembers for the current catalogue passed
    // the gate with it; any other statement passes the gate first, so that a refused one takes
    // no query slot and costs DuckDB one parse.
    let shape = explain
        .is_none()
        .then(|| RequestShape::of(state.engine.catalog(), &body, format, coding, max_rows));
    let key = match shape.as_ref().and_then(|s| s.remembered(&state.keys)) {
        Some(known) => Some(known),
        None => {
            let analysis = match checked {
                Some(analysis) => analysis,
                None => gate(&state, &body.sql).await?,
            };
            shape.and_then(|s| s.key(&state.keys, state.engine.duckdb_version(), &analysis))
        }
    };
    let cache =
        key.map(|(key, etag)| Caching::new(state.result_cache.is_some(), headers, key, etag));
    if let Some(cache) = &cache {
        if cache.matches(headers.get(header::IF_NONE_MATCH)) {
            PoolCounters::add(&state.pool().not_modified, 1);
            let mut response_headers = HeaderMap::new();
            cache.insert_headers(&mut response_headers);
            insert_vary(&mut response_headers);
            return Ok((StatusCode::NOT_MODIFIED, response_headers).into_response());
        }
        if cache.read
            && let Some(store) = state.result_cache.clone()
        {
            let hit = match store.get_hot(&cache.key) {
                Some(entry) => Some(entry),
                // A cheap statement's results are only ever kept in memory.
                None if state.cheap.is_cheap(&body.sql) => {
                    store.note_miss();
                    None
                }
                None => {
                    let key = cache.key.clone();
                    tokio::task::spawn_blocking(move || store.load(&key))
                        .await
                        .map_err(|_| ApiError::Internal)?
                }
            };
            if let Some(entry) = hit {
                let mut response_headers = answer_headers(format, coding, Some(cache), true);
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
    let permit = state.admission.admit(deadline).await.map_err(|full| {
        PoolCounters::add(&state.pool().overloaded, 1);
        ApiError::Overloaded {
            retry_after: full.retry_after,
        }
    })?;
    let queued = received.elapsed();
    let response_headers = answer_headers(format, coding, cache.as_ref(), false);
    let store = cache.filter(|c| c.write).zip(state.result_cache.clone());
    // Where the result goes depends on what it cost (`result_cache_min_ms`).
    let sql = store.is_some().then(|| body.sql.clone());
    let worker = state.clone();
    let job = Job {
        sql: body.sql,
        params,
        max_rows,
        explain,
        format,
        coding,
    };
    let (response_headers, body) = respond(
        state.engine.clone(),
        state.scoreboard,
        job,
        permit,
        deadline,
        queued,
        response_headers,
        move |whole| {
            if let Some(((cache, store), sql)) = store.zip(sql) {
                let entry = Entry {
                    rows: whole.summary.rows,
                    truncated: whole.summary.truncated,
                    body: whole.body.clone(),
                };
                if worker.cheap.record(&sql, whole.took) {
                    store.put_hot(&cache.key, &entry);
                } else {
                    tokio::task::spawn_blocking(move || store.put(&cache.key, &entry));
                }
            }
        },
    )
    .await?;
    Ok((StatusCode::OK, response_headers, body).into_response())
}

/// The gate's verdict on `sql` for a credential limited to some datasets: every dataset the
/// statement reads, by DuckDB's parse of it (through CTEs, subqueries, joins, any spelling),
/// must be one of them. Checked before the result cache, so that a cached answer is not a way
/// around it; a typo's "did you mean" names only a dataset the caller may read.
async fn readable_only(
    state: &AppState,
    principal: &Principal,
    sql: &str,
) -> Result<Arc<Analysis>, ApiError> {
    let analysis = gate(state, sql).await.map_err(|e| match e {
        ApiError::Query(QueryError::Refused(Refusal::UnknownDataset { name, suggestion })) => {
            ApiError::Query(QueryError::Refused(Refusal::UnknownDataset {
                name,
                suggestion: suggestion.filter(|s| principal.may_read(s)),
            }))
        }
        other => other,
    })?;
    let catalog = state.engine.catalog();
    if let Some(forbidden) = analysis
        .datasets(&catalog)
        .into_iter()
        .find(|d| !principal.may_read(&d.dataset.name))
    {
        return Err(ApiError::DatasetForbidden(forbidden.dataset.name.clone()));
    }
    Ok(analysis)
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
