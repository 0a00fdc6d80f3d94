//! The API's errors as `application/problem+json` (RFC 9457) with a stable machine-readable code.
//!
//! Every error a client can see is an [`ApiError`]; [`ApiError::status_and_code`] is the one place
//! that decides its HTTP status and `code`.

use axum::response::{IntoResponse, Response};
use ferrocorn_query_core::{QueryError, Refusal};

use crate::auth::AuthError;
use http::{HeaderValue, StatusCode, header};
use serde::Serialize;

/// An error answered to a client.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    #[error("no such endpoint")]
    NotFound,
    #[error("method not allowed on this endpoint")]
    MethodNotAllowed,
    #[error("request line longer than {limit} bytes")]
    RequestLineTooLong { limit: usize },
    #[error("header field {name} longer than {limit} bytes")]
    HeaderFieldTooLarge { name: String, limit: usize },
    /// The request's `Host` breaks RFC 9112 §3.2 (missing in HTTP/1.1, repeated, or invalid).
    #[error("{0}")]
    InvalidHost(String),
    /// The request target is not one this server accepts (RFC 9112 §3.2).
    #[error("{0}")]
    InvalidTarget(String),
    /// A transfer coding other than one `chunked` (RFC 9112 §6.1).
    #[error("transfer coding {0:?} is not implemented; only a single chunked is")]
    UnsupportedTransferCoding(String),
    #[error("DuckDB is not ready: {0}")]
    NotReady(String),
    /// The pool is leaving its load balancer's rotation (TERM with a de-registration delay):
    /// it still serves, but should be sent nothing new.
    #[error("the pool is stopping: it serves what it is sent until the workers drain")]
    Deregistering,
    /// The body is not a JSON object of the query's fields.
    #[error("{0}")]
    InvalidBody(String),
    /// The query string of `GET /v1/query` cannot be used.
    #[error("{0}")]
    InvalidQueryString(String),
    #[error("unknown format {0:?}; one of json, ndjson, csv, arrow, parquet")]
    UnsupportedFormat(String),
    #[error("the request body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("the request body must be application/json")]
    UnsupportedMediaType,
    #[error("none of the result formats (json, ndjson, csv, arrow, parquet) is acceptable")]
    NotAcceptable,
    #[error("the worker cannot run the query within its deadline; retry later")]
    Overloaded {
        /// When the queue ahead should have drained.
        retry_after: std::time::Duration,
    },
    #[error("the query ran past its deadline and was interrupted")]
    QueryTimeout,
    #[error("no dataset named {0:?}")]
    UnknownDataset(String),
    #[error(transparent)]
    Query(#[from] QueryError),
    /// No credential, a bad one, a refused login, or a credential without the scope.
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("the request body did not arrive within {} s", .0.as_secs_f64())]
    BodyTimeout(std::time::Duration),
    #[error("this credential may not read the dataset {0:?}")]
    DatasetForbidden(String),
    #[error("more than {limit} requests a minute{whose}; retry later")]
    RateLimited {
        limit: u32,
        /// " from this address" or "" (per user).
        whose: &'static str,
        /// When the next request would pass.
        retry_after: std::time::Duration,
        /// The `RateLimit` and `RateLimit-Policy` header values.
        headers: [HeaderValue; 2],
    },
    #[error("internal error")]
    Internal,
}

impl ApiError {
    /// The HTTP status and the stable `code` of each error.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Self::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            Self::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            Self::RequestLineTooLong { .. } => (StatusCode::URI_TOO_LONG, "request_line_too_long"),
            Self::HeaderFieldTooLarge { .. } => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "header_too_large",
            ),
            Self::InvalidHost(_) => (StatusCode::BAD_REQUEST, "invalid_host"),
            Self::InvalidTarget(_) => (StatusCode::BAD_REQUEST, "invalid_target"),
            Self::UnsupportedTransferCoding(_) => {
                (StatusCode::NOT_IMPLEMENTED, "unsupported_transfer_coding")
            }
            Self::NotReady(_) => (StatusCode::SERVICE_UNAVAILABLE, "not_ready"),
            Self::Deregistering => (StatusCode::SERVICE_UNAVAILABLE, "deregistering"),
            Self::InvalidBody(_) => (StatusCode::BAD_REQUEST, "invalid_body"),
            Self::InvalidQueryString(_) => (StatusCode::BAD_REQUEST, "invalid_query_string"),
            Self::UnsupportedFormat(_) => (StatusCode::BAD_REQUEST, "unsupported_format"),
            Self::PayloadTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            Self::UnsupportedMediaType => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
            }
            Self::NotAcceptable => (StatusCode::NOT_ACCEPTABLE, "not_acceptable"),
            Self::Overloaded { .. } => (StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
            Self::QueryTimeout => (StatusCode::GATEWAY_TIMEOUT, "query_timeout"),
            Self::UnknownDataset(_) => (StatusCode::NOT_FOUND, "unknown_dataset"),
            Self::Query(error) => match error {
                QueryError::Refused(refusal) => match refusal {
                    Refusal::FileAccess(_) => (StatusCode::FORBIDDEN, "access_denied"),
                    Refusal::MultipleStatements(_) => {
                        (StatusCode::BAD_REQUEST, "multiple_statements")
                    }
                    Refusal::UnknownDataset { .. } => (StatusCode::BAD_REQUEST, "sql_binder"),
                    Refusal::DatasetUnavailable { .. } => {
                        (StatusCode::SERVICE_UNAVAILABLE, "dataset_unavailable")
                    }
                    other if other.is_forbidden() => {
                        (StatusCode::FORBIDDEN, "statement_not_allowed")
                    }
                    _ => (StatusCode::BAD_REQUEST, "sql_syntax"),
                },
                QueryError::Syntax(_) => (StatusCode::BAD_REQUEST, "sql_syntax"),
                QueryError::Param(_) => (StatusCode::BAD_REQUEST, "invalid_parameter"),
                QueryError::Binder(_) => (StatusCode::BAD_REQUEST, "sql_binder"),
                QueryError::Permission(_) => (StatusCode::FORBIDDEN, "access_denied"),
                QueryError::OutOfMemory(_) => (StatusCode::SERVICE_UNAVAILABLE, "out_of_memory"),
                QueryError::Interrupted => (StatusCode::SERVICE_UNAVAILABLE, "query_cancelled"),
                QueryError::Execution(_) => (StatusCode::BAD_REQUEST, "sql_error"),
                _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            },
            Self::Auth(error) => match error {
                AuthError::Missing => (StatusCode::UNAUTHORIZED, "unauthorized"),
                AuthError::Malformed | AuthError::Invalid => {
                    (StatusCode::UNAUTHORIZED, "invalid_token")
                }
                AuthError::Expired => (StatusCode::UNAUTHORIZED, "token_expired"),
                AuthError::BadCredentials => (StatusCode::UNAUTHORIZED, "invalid_credentials"),
                // A pool without a secret_key has no token endpoint, for as long as it runs: not a
                // server error, and not one that a retry would get past.
                AuthError::NoSecret => (StatusCode::NOT_FOUND, "tokens_unavailable"),
                AuthError::MissingScope(_) => (StatusCode::FORBIDDEN, "insufficient_scope"),
            },
            Self::DatasetForbidden(_) => (StatusCode::FORBIDDEN, "dataset_forbidden"),
            Self::BodyTimeout(_) => (StatusCode::REQUEST_TIMEOUT, "body_timeout"),
            Self::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            Self::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }

    /// The `WWW-Authenticate` challenge of an authentication error (RFC 6750 §3).
    pub fn challenge(&self) -> Option<String> {
        let Self::Auth(error) = self else {
            return None;
        };
        Some(match error {
            AuthError::Missing | AuthError::BadCredentials => "Bearer realm=\"ferrocorn\"".into(),
            AuthError::Malformed | AuthError::Invalid | AuthError::Expired => {
                "Bearer realm=\"ferrocorn\", error=\"invalid_token\"".into()
            }
            AuthError::MissingScope(scope) => format!(
                "Bearer realm=\"ferrocorn\", error=\"insufficient_scope\", scope=\"{scope}\""
            ),
            AuthError::NoSecret => return None,
        })
    }

    /// Seconds a client should wait before retrying, for errors that are about load.
    pub fn retry_after(&self) -> Option<u32> {
        match self {
            Self::Overloaded { retry_after } => Some(whole_seconds(*retry_after)),
            Self::Query(QueryError::OutOfMemory(_)) => Some(1),
            Self::RateLimited { retry_after, .. } => Some(whole_seconds(*retry_after)),
            _ => None,
        }
    }
}

/// Directories whose paths a problem document must not show, each with what it shows instead
/// (set once at a production worker's boot: error bodies there carry no internals).
static REDACTED: std::sync::OnceLock<Vec<(String, &'static str)>> = std::sync::OnceLock::new();

/// From now on, problem documents show `placeholder` where a path starts with its directory.
pub fn redact_paths(directories: Vec<(String, &'static str)>) {
    let mut directories: Vec<_> = directories
        .into_iter()
        .filter(|(d, _)| !d.is_empty() && d != "/")
        .collect();
    // The longest first, so a directory inside another is replaced as itself.
    directories.sort_by_key(|(d, _)| std::cmp::Reverse(d.len()));
    let _ = REDACTED.set(directories);
}

fn redacted(detail: String) -> String {
    match REDACTED.get() {
        None => detail,
        Some(directories) => directories.iter().fold(detail, |text, (dir, placeholder)| {
            text.replace(dir.as_str(), placeholder)
        }),
    }
}

/// Whole seconds, rounded up, at least one (`Retry-After`).
fn whole_seconds(wait: std::time::Duration) -> u32 {
    u32::try_from(wait.as_millis().div_ceil(1000))
        .unwrap_or(u32::MAX)
        .max(1)
}

/// Put a rate limit's `RateLimit` and `RateLimit-Policy` values on a response.
pub fn insert_rate_limit(headers: &mut http::HeaderMap, [limit, policy]: [HeaderValue; 2]) {
    headers.insert("ratelimit", limit);
    headers.insert("ratelimit-policy", policy);
}

/// An error (RFC 9457 problem document).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Problem {
    /// Always `about:blank`: `code` identifies the problem.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The HTTP status text.
    pub title: &'static str,
    pub status: u16,
    /// Stable, machine-readable: `sql_syntax`, `sql_binder`, `statement_not_allowed`,
    /// `multiple_statements`, `invalid_parameter`, `query_timeout`, `overloaded`, …
    pub code: &'static str,
    /// What went wrong, for people (DuckDB's own message for SQL errors).
    pub detail: String,
    /// The request's `X-Request-Id`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

impl ApiError {
    /// The problem document of this error, for the request being handled.
    pub fn problem(&self) -> Problem {
        let (status, code) = self.status_and_code();
        Problem {
            kind: "about:blank",
            title: status.canonical_reason().unwrap_or("Error"),
            status: status.as_u16(),
            code,
            detail: redacted(self.to_string()),
            request_id: crate::request_id::current(),
        }
    }

    /// The last line of an NDJSON result that failed after its first bytes were sent:
    /// `{"error": <problem>}`.
    pub fn ndjson_line(&self) -> Vec<u8> {
        let mut line =
            serde_json::to_vec(&serde_json::json!({ "error": self.problem() })).unwrap_or_default();
        line.push(b'\n');
        line
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let problem = self.problem();
        let status = self.status_and_code().0;
        let body = serde_json::to_vec(&problem).unwrap_or_default();
        let mut response = (status, body).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(seconds) = self.retry_after() {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if let Self::RateLimited { headers, .. } = &self {
            insert_rate_limit(response.headers_mut(), headers.clone());
        }
        if let Some(challenge) = self.challenge().and_then(|c| HeaderValue::try_from(c).ok()) {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, challenge);
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pool_without_a_secret_key_has_no_token_endpoint_rather_than_a_server_error() {
        // It was 503: proxies retry it, alerts count it, and no retry can get past it.
        let error = ApiError::Auth(AuthError::NoSecret);
        assert_eq!(
            error.status_and_code(),
            (StatusCode::NOT_FOUND, "tokens_unavailable")
        );
        assert_eq!(error.retry_after(), None);
    }

    #[test]
    fn request_errors_have_their_codes_here() {
        for (error, code) in [
            (ApiError::InvalidBody("x".into()), "invalid_body"),
            (
                ApiError::InvalidQueryString("x".into()),
                "invalid_query_string",
            ),
            (
                ApiError::UnsupportedFormat("xml".into()),
                "unsupported_format",
            ),
        ] {
            assert_eq!(error.status_and_code(), (StatusCode::BAD_REQUEST, code));
            let problem = error.problem();
            assert_eq!((problem.status, problem.code), (400, code));
        }
        let overloaded = ApiError::Overloaded {
            retry_after: std::time::Duration::from_millis(2500),
        };
        assert_eq!(
            overloaded.retry_after(),
            Some(3),
            "rounded up to whole seconds"
        );
        let soon = ApiError::Overloaded {
            retry_after: std::time::Duration::ZERO,
        };
        assert_eq!(soon.retry_after(), Some(1), "at least one second");
        let line = overloaded.ndjson_line();
        let value: serde_json::Value = serde_json::from_slice(&line).expect("one JSON line");
        assert_eq!(value["error"]["code"], "overloaded");
        assert_eq!(line.last(), Some(&b'\n'));
    }
}
