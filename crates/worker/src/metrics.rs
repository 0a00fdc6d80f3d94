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

use ferrocorn_scoreboard::{
    BUCKETS_SECONDS, ExitCause, Histogram, PoolCounters, RecordState, STATUSES, Scoreboard,
    WorkerRecord, monotonic_ms,
};

use crate::state::AppState;
use crate::tally::{METHOD_LABELS, ROUTE_LABELS, status_label};

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
        "HTTP requests admitted by the pool (counted when they start).",
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

/// A histogram's samples: cumulative buckets, sum and count, each with `labels` (`a="b",` form,
/// possibly empty) before `le`.
fn write_histogram(out: &mut String, name: &str, labels: &str, histogram: &Histogram) {
    let (buckets, sum) = histogram.snapshot();
    for (count, bound) in buckets.iter().zip(
        BUCKETS_SECONDS
            .iter()
            .map(|b| b.to_string())
            .chain(std::iter::once("+Inf".to_owned())),
    ) {
        let _ = writeln!(out, "{name}_bucket{{{labels}le=\"{bound}\"}} {count}");
    }
    let plain = labels.trim_end_matches(',');
    let braces = if plain.is_empty() {
        String::new()
    } else {
        format!("{{{plain}}}")
    };
    let _ = writeln!(out, "{name}_sum{braces} {sum}");
    let _ = writeln!(out, "{name}_count{braces} {}", buckets[buckets.len() - 1]);
}

fn help(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn render(state: &AppState) -> String {
    let mut out = String::with_capacity(16 * 1024);
    let scoreboard = state.scoreboard;
    let live: Vec<&WorkerRecord> = scoreboard.live_records().collect();
    let workers = |wanted: RecordState| live.iter().filter(|r| r.state() == wanted).count() as u64;
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
    render_requests(&mut out, scoreboard);
    render_workers(&mut out, state, &live);
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
    help(
        &mut out,
        "ferrocorn_build_info",
        "gauge",
        "The server's version and DuckDB's.",
    );
    let _ = writeln!(
        out,
        "ferrocorn_build_info{{version=\"{}\",duckdb=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION"),
        state.engine.duckdb_version()
    );
    out
}

/// The request table and the query histograms.
fn render_requests(out: &mut String, scoreboard: &Scoreboard) {
    let table = scoreboard.requests();
    help(
        out,
        "ferrocorn_http_requests_total",
        "counter",
        "HTTP responses of the pool, by route, method and status, counted when their last byte is sent.",
    );
    for (route, route_label) in ROUTE_LABELS.iter().enumerate() {
        for (method, method_label) in METHOD_LABELS.iter().enumerate() {
            for status in 0..STATUSES {
                let count = table.count(route, method, status);
                if count == 0 {
                    continue;
                }
                let status = status_label(status).unwrap_or_default();
                let _ = writeln!(
                    out,
                    "ferrocorn_http_requests_total{{route=\"{route_label}\",method=\"{method_label}\",status=\"{status}\"}} {count}"
                );
            }
        }
    }
    help(
        out,
        "ferrocorn_http_request_duration_seconds",
        "histogram",
        "From the request head to the response's last byte, by route.",
    );
    for (route, label) in ROUTE_LABELS.iter().enumerate() {
        if let Some(histogram) = table.durations(route) {
            let labels = format!("route=\"{label}\",");
            write_histogram(
                out,
                "ferrocorn_http_request_duration_seconds",
                &labels,
                histogram,
            );
        }
    }
    let names = [
        (
            "ferrocorn_query_queue_seconds",
            "Time queries waited for a slot.",
        ),
        (
            "ferrocorn_query_execution_seconds",
            "Time queries spent in DuckDB (encoding excluded).",
        ),
        (
            "ferrocorn_query_encoding_seconds",
            "Time spent encoding query results.",
        ),
    ];
    for ((name, text), histogram) in names.iter().zip(scoreboard.query_histograms()) {
        help(out, name, "histogram", text);
        write_histogram(out, name, "", histogram);
    }
}

/// A per-worker metric: name, type, help, and its value from a record at a moment (ms).
type WorkerMetric = (
    &'static str,
    &'static str,
    &'static str,
    fn(&WorkerRecord, u64) -> String,
);

/// Each live worker's gauges, the listeners' queues, the lifecycle counts and the pool's memory.
fn render_workers(out: &mut String, state: &AppState, live: &[&WorkerRecord]) {
    let now = monotonic_ms();
    let per_worker: [WorkerMetric; 7] = [
        (
            "ferrocorn_worker_in_flight_requests",
            "gauge",
            "Requests the worker is serving.",
            |r, _| r.in_flight().to_string(),
        ),
        (
            "ferrocorn_worker_open_connections",
            "gauge",
            "Connections the worker holds open.",
            |r, _| r.connections().to_string(),
        ),
        (
            "ferrocorn_worker_heartbeat_age_seconds",
            "gauge",
            "Seconds since the worker's last heartbeat.",
            |r, now| {
                format!(
                    "{:.3}",
                    now.saturating_sub(r.last_heartbeat_ms()) as f64 / 1000.0
                )
            },
        ),
        (
            "ferrocorn_worker_resident_memory_bytes",
            "gauge",
            "The worker's resident memory, as the master last sampled it.",
            |r, _| r.rss_bytes().to_string(),
        ),
        (
            "ferrocorn_worker_duckdb_memory_bytes",
            "gauge",
            "Memory DuckDB's buffer manager holds in the worker.",
            |r, _| r.duckdb_bytes().to_string(),
        ),
        (
            "ferrocorn_worker_cpu_seconds_total",
            "counter",
            "CPU time the worker has used.",
            |r, _| format!("{:.3}", r.cpu_ms() as f64 / 1000.0),
        ),
        (
            "ferrocorn_worker_requests",
            "gauge",
            "Requests the worker process has started.",
            |r, _| r.requests().to_string(),
        ),
    ];
    for (name, kind, text, value) in per_worker {
        help(out, name, kind, text);
        for record in live {
            let _ = writeln!(
                out,
                "{name}{{slot=\"{}\",pid=\"{}\"}} {}",
                record.slot(),
                record.pid(),
                value(record, now)
            );
        }
    }
    let scoreboard = state.scoreboard;
    let slots: std::collections::BTreeSet<usize> = live.iter().map(|r| r.slot()).collect();
    help(
        out,
        "ferrocorn_listener_accept_queue",
        "gauge",
        "Connections waiting in a slot's accept queue, as the master last sampled it.",
    );
    for slot in slots {
        let _ = writeln!(
            out,
            "ferrocorn_listener_accept_queue{{slot=\"{slot}\"}} {}",
            scoreboard.accept_queue(slot)
        );
    }
    let pool = scoreboard.pool();
    write_metric(
        out,
        "ferrocorn_workers_desired",
        "gauge",
        "The pool's size as it should be.",
        &[("", PoolCounters::get(&pool.workers_desired))],
    );
    write_metric(
        out,
        "ferrocorn_worker_starts_total",
        "counter",
        "Workers forked.",
        &[("", PoolCounters::get(&pool.worker_starts))],
    );
    help(
        out,
        "ferrocorn_worker_exits_total",
        "counter",
        "Workers that ended, by cause.",
    );
    for cause in ExitCause::ALL {
        let _ = writeln!(
            out,
            "ferrocorn_worker_exits_total{{cause=\"{}\"}} {}",
            cause.label(),
            pool.worker_exits(cause)
        );
    }
    let rss: u64 = live.iter().map(|r| r.rss_bytes()).sum();
    let settings = &state.settings;
    write_metric(
        out,
        "ferrocorn_pool_resident_memory_bytes",
        "gauge",
        "The workers' resident memory, summed.",
        &[("", rss)],
    );
    write_metric(
        out,
        "ferrocorn_pool_memory_budget_bytes",
        "gauge",
        "The pool's memory budget (duckdb_memory_limit).",
        &[("", settings.pool_memory_budget)],
    );
    write_metric(
        out,
        "ferrocorn_pool_cpus",
        "gauge",
        "CPUs available to the pool (the cgroup's quota, or the machine's).",
        &[("", u64::from(settings.pool_cpus))],
    );
    write_metric(
        out,
        "ferrocorn_memory_errors_total",
        "counter",
        "Queries that failed because DuckDB ran out of memory.",
        &[("", PoolCounters::get(&pool.memory_errors))],
    );
}
