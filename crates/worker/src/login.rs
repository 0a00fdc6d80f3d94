//! `POST /v1/auth/token`, and the front line's check of every other request's credential.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequest, Request, State};
use axum::response::{IntoResponse, Response};
use axum::{Form, Json};
use ferrocorn_scoreboard::{LimitTable, Rate, monotonic_ms};
use http::{HeaderValue, header};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::api::TokenErrors;
use crate::auth::{IssuedToken, Principal, Scope};
use crate::problem::ApiError;
use crate::state::AppState;

/// The peer's address, inserted into each request by the connection that carries it.
#[derive(Clone, Copy, Debug)]
pub struct PeerAddr(pub IpAddr);

/// Largest login body read.
const MAX_LOGIN_BODY: usize = 8 << 10;

/// The body of `POST /v1/auth/token`: JSON, or an OAuth 2.0 password grant form.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct Credentials {
    pub username: String,
    pub password: String,
    /// `password` when given (the OAuth 2.0 form's field); ignored otherwise.
    #[serde(default)]
    pub grant_type: Option<String>,
}

/// Exchange a user's name and password for a signed, expiring bearer token.
#[utoipa::path(
    post,
    path = "/v1/auth/token",
    tag = "auth",
    request_body(content(
        (Credentials = "application/json"),
        (Credentials = "application/x-www-form-urlencoded"),
    )),
    responses(
        (status = 200, description = "A token", body = IssuedToken),
        TokenErrors,
    )
)]
pub async fn post_token(State(state): State<Arc<AppState>>, request: Request) -> Response {
    match token(state, request).await {
        Ok(issued) => {
            let mut response = Json(issued).into_response();
            // RFC 6749 §5.1: a token response is never cached.
            response.headers_mut().insert(
                header::CACHE_CONTROL,
                http::HeaderValue::from_static("no-store"),
            );
            response
        }
        Err(e) => e.into_response(),
    }
}

async fn token(state: Arc<AppState>, request: Request) -> Result<IssuedToken, ApiError> {
    let form = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    let request = request
        .map(|body| axum::body::Body::new(http_body_util::Limited::new(body, MAX_LOGIN_BODY)));
    let deadline = state.settings.body_deadline();
    let read = async {
        if form {
            Form::<Credentials>::from_request(request, &())
                .await
                .map(|Form(c)| c)
                .map_err(|e| ApiError::InvalidBody(e.body_text()))
        } else {
            Json::<Credentials>::from_request(request, &())
                .await
                .map(|Json(c)| c)
                .map_err(|e| ApiError::InvalidBody(e.body_text()))
        }
    };
    let credentials = tokio::time::timeout(deadline, read)
        .await
        .map_err(|_| ApiError::BodyTimeout(deadline))??;
    if credentials
        .grant_type
        .as_deref()
        .is_some_and(|g| g != "password")
    {
        return Err(ApiError::InvalidBody(
            "grant_type must be \"password\"".into(),
        ));
    }
    // The password hash's work is tens of milliseconds of CPU: not on the event loop.
    let outcome = tokio::task::spawn_blocking(move || {
        state
            .auth
            .login(&credentials.username, &credentials.password)
            .inspect_err(|e| {
                tracing::warn!(user = ?credentials.username, error = %e, "login refused");
            })
    })
    .await
    .map_err(|_| ApiError::Internal)?;
    Ok(outcome?)
}

/// The scopes of which a request to `path` needs one; `Some(&[])` for any authenticated caller,
/// `None` for the endpoints anyone may call.
fn needed(path: &str) -> Option<&'static [Scope]> {
    match path {
        "/healthz" | "/readyz" | "/v1/auth/token" => None,
        "/v1/query" => Some(&[Scope::Query]),
        "/metrics" => Some(&[Scope::Metrics]),
        p if p == "/v1/datasets" || p.starts_with("/v1/datasets/") => {
            Some(&[Scope::Datasets, Scope::Query])
        }
        _ => Some(&[]),
    }
}

/// Authenticate `request` where the endpoint needs it, record who sent it (a [`Principal`] in
/// its extensions) and count it against the pool's rate limits. In production every endpoint
/// but the probes and the login needs a credential with one of its scopes; in development a
/// request without a credential passes, and one with a credential has it checked like in
/// production. Returns the `RateLimit` headers of a limited request.
pub fn check(
    state: &AppState,
    request: &mut Request,
) -> Result<Option<[HeaderValue; 2]>, ApiError> {
    let path = request.uri().path();
    if path == "/v1/auth/token" {
        let Some(limit) = state.settings.auth.auth_per_address_per_minute else {
            return Ok(None);
        };
        let client = client_address(state, request);
        let key = format!(
            "addr:{}",
            client.map_or_else(String::new, |a| a.to_string())
        );
        return limited(
            state.scoreboard.address_limits(),
            &key,
            limit,
            " from this address",
        )
        .map(Some);
    }
    let Some(scopes) = needed(path) else {
        return Ok(None);
    };
    let api = path.starts_with("/v1/");
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    if authorization.is_none() && !state.auth.required() {
        return Ok(None);
    }
    let principal: Principal = state.auth.authenticate(authorization)?;
    if !scopes.is_empty() && !scopes.iter().any(|s| principal.may(*s)) {
        return Err(crate::auth::AuthError::MissingScope(scopes[0].name()).into());
    }
    let headers = match state.settings.auth.per_user_per_minute {
        Some(limit) if api => Some(limited(
            state.scoreboard.user_limits(),
            &format!("user:{}", principal.subject),
            limit,
            "",
        )?),
        _ => None,
    };
    request.extensions_mut().insert(principal);
    Ok(headers)
}

/// Count a request of `key` against `limit` a minute in `table`: its `RateLimit` and
/// `RateLimit-Policy` headers (draft-ietf-httpapi-ratelimit-headers), or 429.
fn limited(
    table: &LimitTable,
    key: &str,
    limit: u32,
    whose: &'static str,
) -> Result<[HeaderValue; 2], ApiError> {
    let rate = Rate {
        limit,
        window_ms: 60_000,
    };
    let verdict = table.check(key_hash(key), rate, monotonic_ms());
    let headers = [
        HeaderValue::try_from(format!(
            "\"minute\";r={};t={}",
            verdict.remaining,
            verdict.reset_ms.div_ceil(1000)
        ))
        .map_err(|_| ApiError::Internal)?,
        HeaderValue::try_from(format!("\"minute\";q={limit};w=60"))
            .map_err(|_| ApiError::Internal)?,
    ];
    if verdict.allowed {
        Ok(headers)
    } else {
        Err(ApiError::RateLimited {
            limit,
            whose,
            retry_after: Duration::from_millis(verdict.retry_after_ms),
            headers,
        })
    }
}

/// A key's place in a limit table: the first 8 bytes of its SHA-256 (no client can aim at
/// another's slot, or collide with it, by choosing its name).
fn key_hash(key: &str) -> u64 {
    let digest = Sha256::digest(key.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(first)
}

/// The client's address: the socket's peer, or — when the peer is a trusted proxy
/// (`forwarded_allow_ips`) — the last address of `X-Forwarded-For` that is not itself a trusted
/// proxy (the one the nearest untrusted hop connected from). A unix socket's peer is a local
/// process, a proxy: its header is taken unless no proxy is trusted at all. `None` when nothing
/// names an address (a unix socket without the header).
pub fn client_address(state: &AppState, request: &Request) -> Option<IpAddr> {
    let peer = request.extensions().get::<PeerAddr>().map(|p| p.0);
    let allow = &state.settings.auth.forwarded_allow;
    let trusted = match peer {
        Some(peer) => allow.trusts(peer),
        None => *allow != crate::settings::ForwardedAllow::Nobody,
    };
    if !trusted {
        return peer;
    }
    let mut client = peer?;
    for value in request.headers().get_all("x-forwarded-for").iter().rev() {
        let Ok(text) = value.to_str() else {
            return Some(client);
        };
        for hop in text.rsplit(',') {
            match hop.trim().parse::<IpAddr>() {
                Ok(addr) => {
                    client = addr;
                    if !allow.trusts(addr) {
                        return Some(client);
                    }
                }
                Err(_) => return Some(client),
            }
        }
    }
    Some(client)
}
