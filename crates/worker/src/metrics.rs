//! `GET /metrics`: Prometheus text for the whole pool.
//!
//! Counters live in the scoreboard's [`PoolCounters`], which every worker adds to and the master
//! keeps across worker restarts, so whichever worker answers reports the same pool-wide numbers.
//! Worker states come from the scoreboard's records; dataset storage from the answering worker's
//! catalogue.

use std::fmt::Write;
use std::sync::Arc;

use axum::extract::State;
use axum::response::IntoResponse;
use ferrocorn_query_core::Storage;
use http::header;

use crate::http::AppState;
use crate::scoreboard::{PoolCounters, RecordState};

/// Prometheus text exposition format.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Pool-wide counters in Prometheus text format.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain")))]
pub async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], render(&state))
}

fn render(state: &AppState) -> String {
    let pool = state.pool();
    let mut out = String::with_capacity(2048);
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let count = |state_wanted: RecordState| {
        state
            .scoreboard
            .records()
            .iter()
            .filter(|r| r.state() == state_wanted)
            .count() as u64
    };
    metric(
        "ferrocorn_workers",
        "gauge",
        "Worker processes by state.",
        &[
            ("{state=\"booting\"}", count(RecordState::Booting)),
            ("{state=\"ready\"}", count(RecordState::Ready)),
            ("{state=\"draining\"}", count(RecordState::Draining)),
        ],
    );
    let counter = |c: &std::sync::atomic::AtomicU64| PoolCounters::get(c);
    metric(
        "ferrocorn_requests_total",
        "counter",
        "HTTP requests received by the pool.",
        &[("", counter(&pool.requests))],
    );
    metric(
        "ferrocorn_queries_total",
        "counter",
        "Query requests.",
        &[("", counter(&pool.queries))],
    );
    metric(
        "ferrocorn_queries_overloaded_total",
        "counter",
        "Queries refused with 503 because every slot and the queue were full.",
        &[("", counter(&pool.overloaded))],
    );
    metric(
        "ferrocorn_queries_not_modified_total",
        "counter",
        "Queries answered 304 Not Modified from If-None-Match.",
        &[("", counter(&pool.not_modified))],
    );
    metric(
        "ferrocorn_result_cache_hits_total",
        "counter",
        "Queries answered from the result cache.",
        &[("", counter(&pool.cache_hits))],
    );
    metric(
        "ferrocorn_result_cache_misses_total",
        "counter",
        "Cacheable queries not found in the result cache.",
        &[("", counter(&pool.cache_misses))],
    );
    metric(
        "ferrocorn_result_cache_stores_total",
        "counter",
        "Results written to the result cache.",
        &[("", counter(&pool.cache_stores))],
    );
    metric(
        "ferrocorn_result_cache_evictions_total",
        "counter",
        "Result cache entries evicted to stay within the byte bound.",
        &[("", counter(&pool.cache_evictions))],
    );
    metric(
        "ferrocorn_result_cache_bytes",
        "gauge",
        "Bytes the result cache holds on disk (an upper bound between recounts).",
        &[("", counter(&pool.cache_bytes))],
    );
    let catalog = state.engine.catalog();
    let snapshots = catalog
        .iter()
        .filter(|d| matches!(d.storage, Storage::Snapshot { .. }))
        .count() as u64;
    let pending = catalog.iter().filter(|d| d.pending.is_some()).count() as u64;
    metric(
        "ferrocorn_datasets",
        "gauge",
        "Datasets by storage, as the answering worker serves them.",
        &[
            ("{storage=\"snapshot\"}", snapshots),
            ("{storage=\"parquet\"}", catalog.len() as u64 - snapshots),
        ],
    );
    metric(
        "ferrocorn_snapshots_pending",
        "gauge",
        "Datasets whose new snapshot is being built.",
        &[("", pending)],
    );
    out
}
