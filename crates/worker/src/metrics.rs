//! `GET /metrics`: Prometheus text for the whole pool.
//!
//! Counters live in the scoreboard's [`PoolCounters`], which every worker adds to and the master
//! keeps across worker restarts, so whichever worker answers reports the same pool-wide numbers.
//! Worker states come from the scoreboard's records; dataset storage from the answering worker's
//! catalogue.

use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use axum::extract::State;
use axum::response::IntoResponse;
use ferrocorn_query_core::Storage;
use http::header;

use ferrocorn_scoreboard::{PoolCounters, RecordState};

use crate::state::AppState;

/// Prometheus text exposition format.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Pool-wide counters in Prometheus text format.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain")))]
pub async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], render(&state))
}

/// The pool's counters and gauges kept in the scoreboard: name, type, help, field.
type PoolMetric = (
    &'static str,
    &'static str,
    &'static str,
    fn(&PoolCounters) -> &AtomicU64,
);

const POOL_METRICS: &[PoolMetric] = &[
    (
        "ferrocorn_requests_total",
        "counter",
        "HTTP requests received by the pool.",
        |p| &p.requests,
    ),
    (
        "ferrocorn_queries_total",
        "counter",
        "Query requests.",
        |p| &p.queries,
    ),
    (
        "ferrocorn_queries_overloaded_total",
        "counter",
        "Queries refused with 503 because every slot and the queue were full.",
        |p| &p.overloaded,
    ),
    (
        "ferrocorn_queries_not_modified_total",
        "counter",
        "Queries answered 304 Not Modified from If-None-Match.",
        |p| &p.not_modified,
    ),
    (
        "ferrocorn_result_cache_hits_total",
        "counter",
        "Queries answered from the result cache.",
        |p| &p.cache_hits,
    ),
    (
        "ferrocorn_result_cache_misses_total",
        "counter",
        "Cacheable queries not found in the result cache.",
        |p| &p.cache_misses,
    ),
    (
        "ferrocorn_result_cache_stores_total",
        "counter",
        "Results written to the result cache.",
        |p| &p.cache_stores,
    ),
    (
        "ferrocorn_result_cache_evictions_total",
        "counter",
        "Result cache entries evicted to stay within the byte bound.",
        |p| &p.cache_evictions,
    ),
    (
        "ferrocorn_result_cache_bytes",
        "gauge",
        "Bytes the result cache holds on disk (an upper bound between recounts).",
        |p| &p.cache_bytes,
    ),
];

/// One metric: its help and type lines, then one sample per label set.
fn write_metric(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(&str, u64)]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (labels, value) in samples {
        let _ = writeln!(out, "{name}{labels} {value}");
    }
}

fn render(state: &AppState) -> String {
    let mut out = String::with_capacity(2048);
    let workers = |wanted: RecordState| {
        state
            .scoreboard
            .records()
            .iter()
            .filter(|r| r.state() == wanted)
            .count() as u64
    };
    write_metric(
        &mut out,
        "ferrocorn_workers",
        "gauge",
        "Worker processes by state.",
        &[
            ("{state=\"booting\"}", workers(RecordState::Booting)),
            ("{state=\"ready\"}", workers(RecordState::Ready)),
            ("{state=\"draining\"}", workers(RecordState::Draining)),
        ],
    );
    for (name, kind, help, field) in POOL_METRICS {
        let value = PoolCounters::get(field(state.pool()));
        write_metric(&mut out, name, kind, help, &[("", value)]);
    }
    let catalog = state.engine.catalog();
    let snapshots = catalog
        .iter()
        .filter(|d| matches!(d.storage, Storage::Snapshot { .. }))
        .count() as u64;
    let pending = catalog.iter().filter(|d| d.pending.is_some()).count() as u64;
    write_metric(
        &mut out,
        "ferrocorn_datasets",
        "gauge",
        "Datasets by storage, as the answering worker serves them.",
        &[
            ("{storage=\"snapshot\"}", snapshots),
            ("{storage=\"parquet\"}", catalog.len() as u64 - snapshots),
        ],
    );
    write_metric(
        &mut out,
        "ferrocorn_snapshots_pending",
        "gauge",
        "Datasets whose new snapshot is being built.",
        &[("", pending)],
    );
    out
}
