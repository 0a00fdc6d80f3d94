//! `POST /v1/auth/token`, and the front line's check of every other request's credential.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequest, Request, State};
use axum::response::{IntoResponse, Response};
use axum::{Form, Json};
use ferrocorn_scoreboard::{LimitTable, Rate, monotonic_ms};
use http::{HeaderMap, HeaderValue, header};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use utoipa::IntoResponses;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{OpenApi, RefOr};

use crate::api::{CredentialErrors, TokenErrors};
use crate::auth::{IssuedToken, Principal, Scope};
use crate::problem::ApiError;
use crate::settings::{AuthSettings, ForwardedAllow};
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
    /// The OAuth 2.0 form's field: `password`, or left out.
    // Never read: parsing it is the check (any other grant is refused as `invalid_body`). Not
    // nullable in the contract, which JSON and the form share: a form has no null, and its
    // `grant_type=null` is not the password grant.
    #[allow(dead_code)]
    #[serde(default)]
    #[schema(nullable = false)]
    pub grant_type: Option<GrantType>,
}

/// The one OAuth 2.0 grant the token endpoint serves: the resource owner's password
/// (RFC 6749 §4.3).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum GrantType {
    Password,
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
    // The password hash's work is tens of milliseconds of CPU: not on the event loop, and
    // only a few at once.
    let turn = state.auth.login_turn().await;
    let outcome = tokio::task::spawn_blocking(move || {
        let _turn = turn;
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
        "/server-status" => Some(&[Scope::Admin]),
        p if p == "/v1/datasets" || p.starts_with("/v1/datasets/") => {
            Some(&[Scope::Datasets, Scope::Query])
        }
        _ => Some(&[]),
    }
}

/// The name of the contract's security scheme: `Authorization: Bearer`, with a token or a key.
const SCHEME: &str = "bearer";

/// Write [`check`]'s rules into the contract: the bearer scheme, and on every operation that
/// takes a credential its security requirement (required in production, optional in
/// development, where a request without one is served) and what the check can answer (401 and
/// 403; 429 on the API when the pool limits each user).
pub fn describe(api: &mut OpenApi, settings: &AuthSettings) {
    api.components
        .get_or_insert_with(Default::default)
        .add_security_scheme(
            SCHEME,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "A token from POST /v1/auth/token, or an API key (`ferrocorn key add`)",
                    ))
                    .build(),
            ),
        );
    let bearer = SecurityRequirement::new(SCHEME, Vec::<String>::new());
    let security = if settings.required {
        vec![bearer]
    } else {
        vec![bearer, SecurityRequirement::default()]
    };
    let answers = CredentialErrors::responses();
    for (path, item) in api.paths.paths.iter_mut() {
        if needed(path).is_none() || (path == "/metrics" && settings.metrics_public) {
            continue;
        }
        let limited = path.starts_with("/v1/") && settings.per_user_per_minute.is_some();
        let operations = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.options,
            &mut item.head,
            &mut item.patch,
            &mut item.trace,
        ];
        for operation in operations.into_iter().flatten() {
            operation.security = Some(security.clone());
            for (status, answer) in &answers {
                if status == "429" && !limited {
                    continue;
                }
                let responses = &mut operation.responses.responses;
                match (responses.get_mut(status), answer) {
                    // The operation's own answer with this status: the check's is one more case.
                    (Some(RefOr::T(own)), RefOr::T(check)) => {
                        own.description = format!("{}\n\n{}", own.description, check.description);
                    }
                    (Some(_), _) => {}
                    (None, _) => {
                        responses.insert(status.clone(), answer.clone());
                    }
                }
            }
        }
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
    if path == "/metrics" && state.settings.auth.metrics_public {
        return Ok(None);
    }
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
/// (`forwarded_allow_ips`) — the last hop that is not itself a trusted proxy (the one the nearest
/// untrusted hop connected from), from `X-Forwarded-For`, or from `Forwarded` (RFC 7239) when
/// there is no `X-Forwarded-For`. A unix socket's peer is a local process, a proxy: its header
/// is taken unless no proxy is trusted at all. `None` when nothing names an address.
pub fn client_address(state: &AppState, request: &Request) -> Option<IpAddr> {
    client_of(
        request.extensions().get::<PeerAddr>().map(|p| p.0),
        &state.settings.auth.forwarded_allow,
        request.headers(),
    )
}

/// [`client_address`] from its parts: the socket's peer, the trusted proxies, the headers.
pub fn client_of(
    peer: Option<IpAddr>,
    allow: &ForwardedAllow,
    headers: &HeaderMap,
) -> Option<IpAddr> {
    let trusted = match peer {
        Some(peer) => allow.trusts(peer),
        None => *allow != ForwardedAllow::Nobody,
    };
    if !trusted {
        return peer;
    }
    // Every hop, nearest first; `None` for one that does not parse (it ends the walk).
    let hops: Vec<Option<IpAddr>> = if headers.contains_key("x-forwarded-for") {
        headers
            .get_all("x-forwarded-for")
            .iter()
            .flat_map(|v| v.to_str().unwrap_or("?").split(','))
            .map(|hop| hop.trim().parse::<IpAddr>().ok())
            .collect()
    } else {
        headers
            .get_all(header::FORWARDED)
            .iter()
            .flat_map(|v| v.to_str().unwrap_or("?").split(','))
            .map(forwarded_for)
            .collect()
    };
    let mut client = peer;
    for hop in hops.into_iter().rev() {
        let Some(addr) = hop else {
            return client;
        };
        client = Some(addr);
        if !allow.trusts(addr) {
            return client;
        }
    }
    client
}

/// The address of one `Forwarded` element's `for=` (`for=192.0.2.60`,
/// `for="[2001:db8::17]:4711"`); `None` for an obfuscated or missing one.
fn forwarded_for(element: &str) -> Option<IpAddr> {
    let value = element.split(';').find_map(|pair| {
        let (name, value) = pair.trim().split_once('=')?;
        name.trim()
            .eq_ignore_ascii_case("for")
            .then_some(value.trim())
    })?;
    let value = value.trim_matches('"');
    if let Some(v6) = value.strip_prefix('[') {
        return v6.split(']').next()?.parse().ok();
    }
    let host = match value.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => value,
    };
    host.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_static(value));
        }
        map
    }

    fn ip(text: &str) -> Option<IpAddr> {
        text.parse().ok()
    }

    #[test]
    fn the_client_is_the_last_untrusted_hop_and_only_trusted_peers_are_believed() {
        let allow = ForwardedAllow::Addresses(vec!["127.0.0.1".parse().expect("ip")]);
        let local = ip("127.0.0.1");
        let far = ip("198.51.100.9");
        // A forged first hop changes nothing: the proxy appended the real one.
        let xff = headers(&[("x-forwarded-for", "6.6.6.6, 203.0.113.7")]);
        assert_eq!(client_of(local, &allow, &xff), ip("203.0.113.7"));
        // From an untrusted peer the header is ignored.
        assert_eq!(client_of(far, &allow, &xff), far);
        assert_eq!(client_of(far, &ForwardedAllow::Nobody, &xff), far);
        // Trusted hops are walked past; a hop that does not parse ends the walk.
        let chain = headers(&[("x-forwarded-for", "203.0.113.7, 127.0.0.1")]);
        assert_eq!(client_of(local, &allow, &chain), ip("203.0.113.7"));
        let junk = headers(&[("x-forwarded-for", "203.0.113.7, nonsense")]);
        assert_eq!(client_of(local, &allow, &junk), local);
        // RFC 7239, when there is no X-Forwarded-For.
        let forwarded = headers(&[(
            "forwarded",
            "for=6.6.6.6, for=\"[2001:db8:cafe::17]:4711\";proto=https",
        )]);
        assert_eq!(
            client_of(local, &allow, &forwarded),
            ip("2001:db8:cafe::17")
        );
        let v4 = headers(&[("forwarded", "for=192.0.2.60:8080;by=203.0.113.43")]);
        assert_eq!(client_of(local, &allow, &v4), ip("192.0.2.60"));
        let hidden = headers(&[("forwarded", "for=_hidden")]);
        assert_eq!(client_of(local, &allow, &hidden), local);
        // A unix socket's peer is a proxy unless none is trusted.
        assert_eq!(client_of(None, &allow, &xff), ip("203.0.113.7"));
        assert_eq!(client_of(None, &ForwardedAllow::Nobody, &xff), None);
    }
}
