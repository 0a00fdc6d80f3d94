//! `GET /server-status`: the pool's workers as the scoreboard shows them — pid, state, age,
//! requests, in flight, the request being served and for how long, heartbeat age, RSS — as JSON
//! for a script, or as an HTML table for a person (`Accept: text/html`). Production needs the
//! `admin` scope.

use std::fmt::Write;
use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use ferrocorn_scoreboard::{Scoreboard, WorkerRecord, monotonic_ms};
use http::{HeaderMap, HeaderValue, header};
use serde::Serialize;

use crate::state::AppState;

/// One worker, as `/server-status` shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct WorkerStatus {
    pub slot: usize,
    pub pid: i32,
    /// booting, ready or draining.
    pub state: &'static str,
    pub generation: u64,
    pub age_seconds: f64,
    /// Requests this worker process has started.
    pub requests: u64,
    pub in_flight: u32,
    pub connections: u32,
    /// The request line it started last, and for how long it has run, while one is in flight.
    pub serving: Option<String>,
    pub serving_seconds: Option<f64>,
    pub heartbeat_age_seconds: f64,
    pub rss_bytes: u64,
    pub duckdb_bytes: u64,
}

/// `GET /server-status`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ServerStatus {
    pub workers: Vec<WorkerStatus>,
}

fn describe(record: &WorkerRecord, now_ms: u64) -> WorkerStatus {
    let seconds = |since: u64| now_ms.saturating_sub(since) as f64 / 1000.0;
    let busy = record.in_flight() > 0;
    WorkerStatus {
        slot: record.slot(),
        pid: record.pid(),
        state: record.state().label(),
        generation: record.generation(),
        age_seconds: seconds(record.started_ms()),
        requests: record.requests(),
        in_flight: record.in_flight(),
        connections: record.connections(),
        serving: busy.then(|| record.current_request()),
        serving_seconds: busy.then(|| seconds(record.current_since_ms())),
        heartbeat_age_seconds: seconds(record.last_heartbeat_ms()),
        rss_bytes: record.rss_bytes(),
        duckdb_bytes: record.duckdb_bytes(),
    }
}

/// The pool's live workers, by slot: what `/server-status` and `ferrocorn status` show.
pub fn workers(scoreboard: &Scoreboard) -> Vec<WorkerStatus> {
    let now_ms = monotonic_ms();
    let mut workers: Vec<WorkerStatus> = scoreboard
        .live_records()
        .map(|r| describe(r, now_ms))
        .collect();
    workers.sort_by_key(|w| (w.slot, w.pid));
    workers
}

fn snapshot(state: &AppState) -> ServerStatus {
    ServerStatus {
        workers: workers(state.scoreboard),
    }
}

/// The workers of the whole pool.
#[utoipa::path(get, path = "/server-status", tag = "operations",
    responses((status = 200, description = "Every worker of the pool (HTML with Accept: text/html)", content(
        (ServerStatus = "application/json"),
        (String = "text/html"),
    ))))]
pub async fn server_status(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let status = snapshot(&state);
    let wants_html = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("text/html"));
    if !wants_html {
        return axum::Json(status).into_response();
    }
    let mut page = String::from(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>ferrocorn server status</title></head><body>\n<h1>ferrocorn server status</h1>\n<table border=\"1\">\n<tr><th>slot</th><th>pid</th><th>state</th><th>generation</th><th>age s</th><th>requests</th><th>in flight</th><th>connections</th><th>serving</th><th>for s</th><th>heartbeat s</th><th>RSS MiB</th><th>DuckDB MiB</th></tr>\n",
    );
    for w in &status.workers {
        let _ = writeln!(
            page,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.0}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.1}</td><td>{}</td><td>{}</td></tr>",
            w.slot,
            w.pid,
            w.state,
            w.generation,
            w.age_seconds,
            w.requests,
            w.in_flight,
            w.connections,
            html_escape(w.serving.as_deref().unwrap_or("")),
            w.serving_seconds
                .map_or_else(String::new, |s| format!("{s:.1}")),
            w.heartbeat_age_seconds,
            w.rss_bytes >> 20,
            w.duckdb_bytes >> 20,
        );
    }
    page.push_str("</table>\n</body></html>\n");
    let mut response = page.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    response
}

/// The request line is the client's text: escaped before it goes into the page.
fn html_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_request_line_cannot_inject_markup() {
        assert_eq!(
            super::html_escape("GET /<script>alert('x')</script>&"),
            "GET /&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;"
        );
    }
}
