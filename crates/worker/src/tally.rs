//! The end of a response: when its last byte is sent (or the client goes away), it is counted in
//! the pool's request table — by route, method and status, with its whole duration — and its
//! access line is written with the bytes actually sent.
//!
//! [`Ending::attach`] wraps the response's body; the wrapper passes frames through untouched and
//! does its work once, at the end of the body or when the body is dropped unfinished (a client
//! that disconnected, a stream that failed), so a streamed result is logged with its real size
//! and a failure mid-stream is logged at all.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use axum::body::{Body, Bytes};
use axum::response::Response;
use ferrocorn_scoreboard::WorkerRecord;
use http::header;
use hyper::body::{Frame, SizeHint};

use crate::access_log::{AccessEntry, AccessLog, header_values};
use crate::settings::ForwardedAllow;
use crate::state::AppState;

/// The routes `/metrics` distinguishes, by their `route` label; the last is everything else
/// (unknown paths are not labelled by their path, which a client chooses).
pub const ROUTE_LABELS: [&str; ferrocorn_scoreboard::ROUTES] = [
    "/healthz",
    "/readyz",
    "/v1/query",
    "/v1/datasets",
    "/v1/datasets/{name}",
    "/v1/auth/token",
    "/metrics",
    "/openapi.json",
    "/server-status",
    "other",
];

/// The `method` label's values; the last is every other method.
pub const METHOD_LABELS: [&str; ferrocorn_scoreboard::METHODS] =
    ["GET", "HEAD", "POST", "OPTIONS", "other"];

/// The statuses counted one by one; any other counts in its class (`2xx` …).
const STATUS_CODES: [u16; 27] = [
    200, 201, 204, 206, 301, 302, 304, 307, 400, 401, 403, 404, 405, 406, 408, 411, 413, 414, 415,
    416, 422, 429, 431, 500, 501, 503, 504,
];

const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

const _: () = assert!(STATUS_CODES.len() + STATUS_CLASSES.len() == ferrocorn_scoreboard::STATUSES);

/// The `status` label of index `index` of the request table.
pub fn status_label(index: usize) -> Option<String> {
    match STATUS_CODES.get(index) {
        Some(code) => Some(code.to_string()),
        None => STATUS_CLASSES
            .get(index - STATUS_CODES.len())
            .map(|c| (*c).to_owned()),
    }
}

fn status_index(status: u16) -> usize {
    STATUS_CODES
        .iter()
        .position(|&c| c == status)
        .unwrap_or_else(|| {
            let class = usize::from(status / 100).clamp(1, 5) - 1;
            STATUS_CODES.len() + class
        })
}

fn route_index(path: &str) -> usize {
    let exact = ROUTE_LABELS.iter().position(|&r| r == path);
    exact.unwrap_or_else(|| match path.strip_prefix("/v1/datasets/") {
        Some(name) if !name.is_empty() && !name.contains('/') => 4,
        _ => ROUTE_LABELS.len() - 1,
    })
}

fn method_index(method: &http::Method) -> usize {
    METHOD_LABELS
        .iter()
        .position(|&m| m == method.as_str())
        .unwrap_or(METHOD_LABELS.len() - 1)
}

/// The parts of a request its access line shows.
#[derive(Debug)]
pub struct RequestFacts {
    peer: Option<std::net::IpAddr>,
    method: String,
    target: String,
    version: &'static str,
    referer: Option<String>,
    user_agent: Option<String>,
    /// The request headers the access log's format names.
    headers: Vec<Option<String>>,
    /// Who sent it, once the front line knows.
    user: Option<String>,
}

impl RequestFacts {
    pub fn of<B>(request: &http::Request<B>, allow: &ForwardedAllow, log: &AccessLog) -> Self {
        let header_text = |name: header::HeaderName| {
            request
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        Self {
            // The client, as the rate limits see it: a trusted proxy may name it.
            peer: crate::login::client_of(
                request
                    .extensions()
                    .get::<crate::login::PeerAddr>()
                    .map(|p| p.0),
                allow,
                request.headers(),
            ),
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
            headers: header_values(request.headers(), log.headers_wanted().0),
            user: None,
        }
    }
}

/// Decrements the worker's in-flight count however the request ends, the body's last byte
/// included (or a dropped future).
#[derive(Debug)]
pub struct InFlight(pub &'static WorkerRecord);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.request_finished();
    }
}

/// What is done when a response ends.
#[derive(Debug)]
pub struct Ending {
    state: Arc<AppState>,
    route: usize,
    method: usize,
    received: Instant,
    request_id: String,
    /// What the access line needs, when there is an access log.
    access: Option<RequestFacts>,
    /// The response headers the access log's format names.
    response_headers: Vec<Option<String>>,
    in_flight: Option<InFlight>,
}

impl Ending {
    /// A request received at `received`, as it was when it arrived.
    pub fn of<B>(
        state: &Arc<AppState>,
        request: &http::Request<B>,
        request_id: String,
        received: Instant,
    ) -> Self {
        Self {
            state: state.clone(),
            route: route_index(request.uri().path()),
            method: method_index(request.method()),
            received,
            request_id,
            access: state
                .access_log
                .as_ref()
                .map(|log| RequestFacts::of(request, &state.settings.auth.forwarded_allow, log)),
            response_headers: Vec::new(),
            in_flight: None,
        }
    }

    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    /// The request's credential names `user` (for the access log).
    pub fn set_user(&mut self, user: &str) {
        if let Some(facts) = &mut self.access {
            facts.user = Some(user.to_owned());
        }
    }

    /// The request was admitted and counts as in flight until its body ends.
    pub fn hold(&mut self, in_flight: InFlight) {
        self.in_flight = Some(in_flight);
    }

    /// Wrap `response`'s body so that the response is counted and logged when it ends.
    pub fn attach(mut self, response: Response) -> Response {
        let status = response.status().as_u16();
        if let Some(log) = &self.state.access_log {
            self.response_headers = header_values(response.headers(), log.headers_wanted().1);
        }
        response.map(|inner| {
            Body::new(Tallied {
                inner,
                sent: 0,
                status,
                ending: Some(self),
            })
        })
    }

    fn finish(self, status: u16, sent: u64) {
        let took = self.received.elapsed();
        self.state.scoreboard.requests().record(
            self.route,
            self.method,
            status_index(status),
            took,
        );
        if let (Some(log), Some(facts)) = (&self.state.access_log, &self.access) {
            log.write_entry(&self.entry(facts, status, sent, took), SystemTime::now());
        }
    }

    fn entry<'a>(
        &'a self,
        facts: &'a RequestFacts,
        status: u16,
        sent: u64,
        took: Duration,
    ) -> AccessEntry<'a> {
        AccessEntry {
            peer: facts.peer,
            method: &facts.method,
            target: &facts.target,
            version: facts.version,
            status,
            bytes: Some(sent),
            referer: facts.referer.as_deref(),
            user_agent: facts.user_agent.as_deref(),
            duration: took,
            request_id: &self.request_id,
            user: facts.user.as_deref(),
            pid: self.state.pid,
            request_headers: &facts.headers,
            response_headers: &self.response_headers,
        }
    }
}

/// A response body that reports its end to its [`Ending`].
struct Tallied {
    inner: Body,
    sent: u64,
    status: u16,
    ending: Option<Ending>,
}

impl Tallied {
    fn end(&mut self) {
        if let Some(ending) = self.ending.take() {
            ending.finish(self.status, self.sent);
        }
    }
}

impl hyper::body::Body for Tallied {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.sent += data.len() as u64;
                }
                if self.inner.is_end_stream() {
                    self.end();
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => self.end(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Tallied {
    fn drop(&mut self) {
        self.end();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_labelled_by_pattern_never_by_a_clients_path() {
        assert_eq!(ROUTE_LABELS[route_index("/v1/query")], "/v1/query");
        assert_eq!(
            ROUTE_LABELS[route_index("/v1/datasets/orders")],
            "/v1/datasets/{name}"
        );
        for other in [
            "/",
            "/v1/datasets/a/b",
            "/v1/datasets/",
            "/x?y",
            "/healthz/",
        ] {
            assert_eq!(ROUTE_LABELS[route_index(other)], "other", "{other}");
        }
    }

    #[test]
    fn statuses_count_by_code_or_by_class() {
        for code in [200u16, 429, 503, 504] {
            assert_eq!(status_label(status_index(code)), Some(code.to_string()));
        }
        assert_eq!(status_label(status_index(418)).as_deref(), Some("4xx"));
        assert_eq!(status_label(status_index(599)).as_deref(), Some("5xx"));
        assert_eq!(status_label(status_index(101)).as_deref(), Some("1xx"));
        assert_eq!(status_label(ferrocorn_scoreboard::STATUSES), None);
        assert_eq!(METHOD_LABELS[method_index(&http::Method::PUT)], "other");
    }
}
