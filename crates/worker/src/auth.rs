//! Accounts, API keys and bearer tokens: who a request comes from and what it may do.
//!
//! The users file (TOML, `users_file`) holds accounts with argon2id password hashes and static API
//! keys stored as SHA-256 digests, each with its scopes and, optionally, the datasets it may read:
//!
//! ```toml
//! [users.alice]
//! password_hash = "$argon2id$v=19$m=19456,t=2,p=1$…"
//! scopes = ["query", "datasets"]
//! datasets = ["orders", "customers"]   # optional: every dataset when absent
//!
//! [api_keys.dashboard]
//! key_hash = "sha256:…"                # of the key's text, in hex
//! scopes = ["query"]
//! ```
//!
//! An entry that cannot be used is logged with its name and left out; the others load.
//! `POST /v1/auth/token` exchanges a user's password for a token (a JWT signed with HS256 by
//! `secret_key`, with subject, scopes, issue and expiry times). A request then authenticates with
//! `Authorization: Bearer <token or API key>`. A token is checked against the current key, then
//! against `secret_key_previous` when set (a rotation's grace period), and its subject must still
//! be in the users file: its scopes are those the token names and the account still has, and its
//! datasets the account's current ones, so editing the file (and HUP) takes effect at once.
//!
//! Everything that compares a secret is constant-time: argon2's verification, the HMAC check
//! inside `jsonwebtoken`, and API key digests through `subtle`. An unknown user costs the same
//! argon2 verification as a wrong password, against a hash made at load time.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use argon2::Argon2;
use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::settings::AuthSettings;

/// Verified against for an unknown user, so that it costs what a wrong password costs: an
/// argon2id hash with the parameters [`hash_password`] uses (a test keeps them equal), of a
/// password nobody knows. A constant, so no worker spends a hash's work on it at boot.
const DECOY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$vKGjISbTjqJ40IV8PH5MNA$6b/5VNxp9RQb0GC4hqoNuIPuy1xKTRuIx+Se0duy9Ko";

/// Password checks (argon2, about 19 MiB and tens of milliseconds each) one worker runs at once.
const LOGINS_AT_ONCE: usize = 2;

/// Longest `Authorization` value looked at; a longer one is refused unread.
const MAX_CREDENTIAL_BYTES: usize = 8 << 10;

/// What a credential may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Run queries (`/v1/query`).
    Query,
    /// List and describe datasets (`/v1/datasets`).
    Datasets,
    /// Read the pool's metrics (`/metrics`).
    Metrics,
    /// Everything, including the operator's endpoints.
    Admin,
}

impl Scope {
    pub const ALL: [Scope; 4] = [Scope::Query, Scope::Datasets, Scope::Metrics, Scope::Admin];

    pub fn name(self) -> &'static str {
        match self {
            Self::Query => "query",
            Self::Datasets => "datasets",
            Self::Metrics => "metrics",
            Self::Admin => "admin",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.name() == text)
    }
}

/// Who a request comes from, once authenticated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// The user's name, or `key:NAME` for an API key.
    pub subject: String,
    pub scopes: Vec<Scope>,
    /// The datasets it may read; `None` for all.
    pub datasets: Option<Vec<String>>,
}

impl Principal {
    /// Whether it holds `scope` (`admin` holds every scope).
    pub fn may(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope) || self.scopes.contains(&Scope::Admin)
    }

    /// Whether it may read the dataset `name`.
    pub fn may_read(&self, name: &str) -> bool {
        self.datasets
            .as_ref()
            .is_none_or(|allowed| allowed.iter().any(|d| d.eq_ignore_ascii_case(name)))
    }
}

/// Why a request is not authenticated, or a login refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("authentication required: send Authorization: Bearer <token or API key>")]
    Missing,
    #[error("the Authorization header is not a bearer credential")]
    Malformed,
    #[error("the token has expired")]
    Expired,
    #[error("the token or API key is not valid")]
    Invalid,
    #[error("wrong username or password")]
    BadCredentials,
    #[error("this server issues no tokens: it has no secret_key")]
    NoSecret,
    #[error("this credential lacks the {0} scope")]
    MissingScope(&'static str),
}

/// A user's entry in the users file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UserEntry {
    password_hash: String,
    #[serde(default)]
    scopes: Vec<Scope>,
    #[serde(default)]
    datasets: Option<Vec<String>>,
}

/// An API key's entry in the users file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    key_hash: String,
    #[serde(default)]
    scopes: Vec<Scope>,
    #[serde(default)]
    datasets: Option<Vec<String>>,
}

#[derive(Debug)]
struct User {
    password_hash: String,
    scopes: Vec<Scope>,
    datasets: Option<Vec<String>>,
}

#[derive(Debug)]
struct ApiKey {
    name: String,
    digest: [u8; 32],
    scopes: Vec<Scope>,
    datasets: Option<Vec<String>>,
}

/// The accounts and keys of a users file.
#[derive(Debug, Default)]
pub struct Accounts {
    users: BTreeMap<String, User>,
    keys: Vec<ApiKey>,
}

impl Accounts {
    /// Read `path`. Entries that cannot be used are reported (one message each, naming the
    /// entry) and left out; a file that cannot be read or parsed at all is an error.
    pub fn load(path: &Path) -> Result<(Self, Vec<String>), String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the users file {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("users file {}: {e}", path.display()))
    }

    fn parse(text: &str) -> Result<(Self, Vec<String>), String> {
        let mut table: toml::Table = toml::from_str(text).map_err(|e| e.message().to_owned())?;
        let mut problems = Vec::new();
        let mut accounts = Self::default();
        for (section, _) in table
            .iter()
            .filter(|(k, _)| *k != "users" && *k != "api_keys")
        {
            problems.push(format!(
                "unknown section {section:?} (expected users and api_keys)"
            ));
        }
        for (name, value) in section(&mut table, "users", &mut problems) {
            let entry = value.try_into::<UserEntry>().map_err(|e| one_line(&e));
            match entry.and_then(|entry| {
                valid_name(&name)?;
                PasswordHash::new(&entry.password_hash)
                    .map_err(|e| format!("password_hash is not a PHC string: {e}"))?;
                Ok(entry)
            }) {
                Ok(entry) => {
                    accounts.users.insert(
                        name,
                        User {
                            password_hash: entry.password_hash,
                            scopes: entry.scopes,
                            datasets: entry.datasets,
                        },
                    );
                }
                Err(e) => problems.push(format!("users.{name:?}: {e}")),
            }
        }
        for (name, value) in section(&mut table, "api_keys", &mut problems) {
            let entry = value.try_into::<KeyEntry>().map_err(|e| one_line(&e));
            match entry.and_then(|entry| Ok((valid_name(&name)?, entry))) {
                Ok(((), entry)) => match parse_digest(&entry.key_hash) {
                    Some(digest) => accounts.keys.push(ApiKey {
                        name,
                        digest,
                        scopes: entry.scopes,
                        datasets: entry.datasets,
                    }),
                    None => problems.push(format!(
                        "api_keys.{name:?}: key_hash must be \"sha256:\" and 64 hex digits"
                    )),
                },
                Err(e) => problems.push(format!("api_keys.{name:?}: {e}")),
            }
        }
        Ok((accounts, problems))
    }

    #[cfg(test)]
    pub fn user_count(&self) -> usize {
        self.users.len()
    }
}

/// An error's text on one line (TOML's messages span several).
fn one_line(error: &impl std::fmt::Display) -> String {
    error
        .to_string()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// The entries of `[name]`, each with its key; a `name` that is not a table is reported.
fn section(
    table: &mut toml::Table,
    name: &str,
    problems: &mut Vec<String>,
) -> Vec<(String, toml::Value)> {
    match table.remove(name) {
        None => Vec::new(),
        Some(toml::Value::Table(entries)) => entries.into_iter().collect(),
        Some(_) => {
            problems.push(format!("{name} must be a table of entries"));
            Vec::new()
        }
    }
}

/// A user or key name: printable, no spaces or control characters, at most 64 bytes.
fn valid_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-@".contains(c));
    if ok {
        Ok(())
    } else {
        Err("names are 1 to 64 of A-Z a-z 0-9 . _ - @".to_owned())
    }
}

fn parse_digest(text: &str) -> Option<[u8; 32]> {
    let hex = text.strip_prefix("sha256:")?;
    if hex.len() != 64 {
        return None;
    }
    let mut digest = [0u8; 32];
    for (i, byte) in digest.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(digest)
}

/// The problems of a users file's text (an error when it is not TOML at all): what
/// `ferrocorn user add` checks before it writes.
pub fn check_users_file(text: &str) -> Result<Vec<String>, String> {
    Accounts::parse(text).map(|(_, problems)| problems)
}

/// The users file's `key_hash` of an API key.
pub fn key_digest(key: &str) -> String {
    let digest = Sha256::digest(key.as_bytes());
    let mut text = String::with_capacity(7 + 64);
    text.push_str("sha256:");
    for byte in digest {
        text.push_str(&format!("{byte:02x}"));
    }
    text
}

/// An argon2id hash of `password` (the algorithm's recommended parameters, a random salt), as
/// the users file stores it.
pub fn hash_password(password: &str) -> Result<String, String> {
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|hash| hash.to_string())
        .map_err(|e| format!("cannot hash the password: {e}"))
}

/// A token's claims.
#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    /// Space-separated, as OAuth 2.0 writes scopes.
    scope: String,
    iat: u64,
    exp: u64,
}

/// What `POST /v1/auth/token` answers.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct IssuedToken {
    pub access_token: String,
    /// Always `bearer`.
    pub token_type: &'static str,
    /// Seconds until the token expires.
    pub expires_in: u64,
    /// The token's scopes, space-separated.
    pub scope: String,
}

/// A worker's view of accounts and keys.
pub struct Auth {
    required: bool,
    accounts: Accounts,
    signing: Option<EncodingKey>,
    verifying: Vec<DecodingKey>,
    token_ttl: Duration,
    /// Password checks one worker runs at once: a flood of logins waits here instead of taking
    /// every thread of the blocking pool, which the queries share.
    logins: std::sync::Arc<tokio::sync::Semaphore>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("required", &self.required)
            .field("users", &self.accounts.users.len())
            .field("keys", &self.accounts.keys.len())
            .finish_non_exhaustive()
    }
}

impl Auth {
    /// Load the users file (its unusable entries logged) and the keys.
    pub fn new(settings: &AuthSettings) -> Self {
        let accounts = match &settings.users_file {
            None => Accounts::default(),
            Some(path) => match Accounts::load(path) {
                Ok((accounts, problems)) => {
                    for problem in problems {
                        tracing::error!(file = %path.display(), "users file entry left out: {problem}");
                    }
                    accounts
                }
                Err(e) => {
                    tracing::error!("{e}; no account can log in");
                    Accounts::default()
                }
            },
        };
        let key = |secret: &String| {
            (
                EncodingKey::from_secret(secret.as_bytes()).ok(),
                DecodingKey::from_secret(secret.as_bytes()).ok(),
            )
        };
        let (signing, current) = settings.secret_key.as_ref().map(key).unzip();
        let previous = settings.previous_key.as_ref().map(key).and_then(|k| k.1);
        Self {
            required: settings.required,
            accounts,
            signing: signing.flatten(),
            verifying: current.flatten().into_iter().chain(previous).collect(),
            token_ttl: settings.token_ttl,

            logins: std::sync::Arc::new(tokio::sync::Semaphore::new(LOGINS_AT_ONCE)),
        }
    }

    /// A turn to check a password (see [`LOGINS_AT_ONCE`]).
    pub async fn login_turn(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.logins.clone().acquire_owned().await.ok()
    }

    /// Whether every endpoint but the probes needs a credential.
    pub fn required(&self) -> bool {
        self.required
    }

    /// Check a user's password and issue a token. Blocks for the password hash's work (tens of
    /// milliseconds): call it from a thread that may block.
    pub fn login(&self, username: &str, password: &str) -> Result<IssuedToken, AuthError> {
        let signing = self.signing.as_ref().ok_or(AuthError::NoSecret)?;
        let user = self.accounts.users.get(username);
        let hash = user.map_or(DECOY_HASH, |u| u.password_hash.as_str());
        let verified = PasswordHash::new(hash).is_ok_and(|parsed| {
            Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()
        });
        let user = user.filter(|_| verified).ok_or(AuthError::BadCredentials)?;
        let now = unix_now();
        let scope = scope_text(&user.scopes);
        let claims = Claims {
            sub: username.to_owned(),
            scope: scope.clone(),
            iat: now,
            exp: now + self.token_ttl.as_secs(),
        };
        let access_token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, signing)
            .map_err(|_| AuthError::NoSecret)?;
        Ok(IssuedToken {
            access_token,
            token_type: "bearer",
            expires_in: self.token_ttl.as_secs(),
            scope,
        })
    }

    /// Who the `Authorization` header's credential belongs to.
    pub fn authenticate(&self, authorization: Option<&[u8]>) -> Result<Principal, AuthError> {
        let value = authorization.ok_or(AuthError::Missing)?;
        if value.len() > MAX_CREDENTIAL_BYTES {
            return Err(AuthError::Invalid);
        }
        let value = std::str::from_utf8(value).map_err(|_| AuthError::Malformed)?;
        let (scheme, credential) = value.trim().split_once(' ').ok_or(AuthError::Malformed)?;
        let credential = credential.trim();
        if !scheme.eq_ignore_ascii_case("bearer") || credential.is_empty() {
            return Err(AuthError::Malformed);
        }
        if credential.matches('.').count() == 2 {
            self.token(credential)
        } else {
            self.api_key(credential)
        }
    }

    fn token(&self, token: &str) -> Result<Principal, AuthError> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "sub"]);
        let mut outcome = Err(AuthError::Invalid);
        for key in &self.verifying {
            match jsonwebtoken::decode::<Claims>(token, key, &validation) {
                Ok(data) => {
                    outcome = Ok(data.claims);
                    break;
                }
                Err(e) if matches!(e.kind(), jsonwebtoken::errors::ErrorKind::ExpiredSignature) => {
                    outcome = Err(AuthError::Expired);
                    break;
                }
                Err(_) => {}
            }
        }
        let claims = outcome?;
        let user = self
            .accounts
            .users
            .get(&claims.sub)
            .ok_or(AuthError::Invalid)?;
        let scopes = claims
            .scope
            .split(' ')
            .filter_map(Scope::parse)
            .filter(|s| user.scopes.contains(s))
            .collect();
        Ok(Principal {
            subject: claims.sub,
            scopes,
            datasets: user.datasets.clone(),
        })
    }

    fn api_key(&self, key: &str) -> Result<Principal, AuthError> {
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        // Every entry is compared, so the time does not say which one matched.
        let mut found = None;
        for entry in &self.accounts.keys {
            if bool::from(entry.digest.ct_eq(&digest)) {
                found = Some(entry);
            }
        }
        let entry = found.ok_or(AuthError::Invalid)?;
        Ok(Principal {
            subject: format!("key:{}", entry.name),
            scopes: entry.scopes.clone(),
            datasets: entry.datasets.clone(),
        })
    }
}

fn scope_text(scopes: &[Scope]) -> String {
    scopes
        .iter()
        .map(|s| s.name())
        .collect::<Vec<_>>()
        .join(" ")
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn users_file(dir: &Path, extra: &str) -> std::path::PathBuf {
        let hash = hash_password("correct horse").expect("hash");
        let path = dir.join("users.toml");
        let text = format!(
            "[users.alice]\npassword_hash = \"{hash}\"\nscopes = [\"query\"]\ndatasets = [\"orders\"]\n\n\
             [users.root]\npassword_hash = \"{hash}\"\nscopes = [\"admin\"]\n\n\
             [api_keys.board]\nkey_hash = \"{}\"\nscopes = [\"datasets\"]\n{extra}",
            key_digest("fc_board_key")
        );
        std::fs::write(&path, text).expect("write");
        path
    }

    fn auth(dir: &Path, secret: &str, previous: Option<&str>, ttl: Duration) -> Auth {
        Auth::new(&AuthSettings {
            required: true,
            secret_key: Some(secret.to_owned()),
            previous_key: previous.map(str::to_owned),
            users_file: Some(users_file(dir, "")),
            token_ttl: ttl,
            ..AuthSettings::default()
        })
    }

    fn bearer(token: &str) -> Vec<u8> {
        format!("Bearer {token}").into_bytes()
    }

    #[test]
    fn a_token_names_its_subject_scopes_and_the_accounts_datasets() {
        let dir = tempfile::tempdir().expect("tempdir");
        let auth = auth(dir.path(), SECRET, None, Duration::from_secs(60));
        let issued = auth.login("alice", "correct horse").expect("login");
        assert_eq!(issued.scope, "query");
        let who = auth
            .authenticate(Some(&bearer(&issued.access_token)))
            .expect("valid");
        assert_eq!(who.subject, "alice");
        assert!(who.may(Scope::Query) && !who.may(Scope::Datasets));
        assert!(who.may_read("ORDERS") && !who.may_read("customers"));
        let root = auth.login("root", "correct horse").expect("login");
        let root = auth
            .authenticate(Some(&bearer(&root.access_token)))
            .expect("valid");
        assert!(root.may(Scope::Metrics) && root.may_read("anything"));
    }

    #[test]
    fn wrong_passwords_and_unknown_users_get_the_same_answer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let auth = auth(dir.path(), SECRET, None, Duration::from_secs(60));
        assert_eq!(
            auth.login("alice", "wrong").err(),
            Some(AuthError::BadCredentials)
        );
        assert_eq!(
            auth.login("mallory", "correct horse").err(),
            Some(AuthError::BadCredentials)
        );
    }

    #[test]
    fn expired_tampered_and_foreign_tokens_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let auth = auth(dir.path(), SECRET, None, Duration::from_secs(60));
        let sign = |claims: &Claims, key: &[u8]| {
            jsonwebtoken::encode(
                &Header::new(Algorithm::HS256),
                claims,
                &EncodingKey::from_secret(key).expect("key"),
            )
            .expect("encode")
        };
        let expired = sign(
            &Claims {
                sub: "alice".into(),
                scope: "query".into(),
                iat: unix_now() - 120,
                exp: unix_now() - 60,
            },
            SECRET.as_bytes(),
        );
        assert_eq!(
            auth.authenticate(Some(&bearer(&expired))),
            Err(AuthError::Expired)
        );

        let token = auth
            .login("alice", "correct horse")
            .expect("login")
            .access_token;
        // The payload rewritten to claim admin, the signature kept.
        let mut parts: Vec<&str> = token.split('.').collect();
        let forged = sign(
            &Claims {
                sub: "alice".into(),
                scope: "admin".into(),
                iat: unix_now(),
                exp: unix_now() + 60,
            },
            b"another key",
        );
        let forged_payload = forged.split('.').nth(1).expect("payload").to_owned();
        parts[1] = &forged_payload;
        assert_eq!(
            auth.authenticate(Some(&bearer(&parts.join(".")))),
            Err(AuthError::Invalid)
        );
        // Signed with another key altogether.
        assert_eq!(
            auth.authenticate(Some(&bearer(&forged))),
            Err(AuthError::Invalid)
        );
        // alg: none.
        let none = format!(
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{}.",
            token.split('.').nth(1).expect("payload")
        );
        assert_eq!(
            auth.authenticate(Some(&bearer(&none))),
            Err(AuthError::Invalid)
        );
        for malformed in [
            &b"Basic abc"[..],
            b"Bearer",
            b"Bearer  ",
            b"\xff\xfe",
            b"token",
        ] {
            assert_eq!(
                auth.authenticate(Some(malformed)),
                Err(AuthError::Malformed),
                "{malformed:?}"
            );
        }
        let huge = bearer(&"a".repeat(1 << 20));
        assert_eq!(auth.authenticate(Some(&huge)), Err(AuthError::Invalid));
        assert_eq!(auth.authenticate(None), Err(AuthError::Missing));
    }

    #[test]
    fn a_rotated_key_keeps_old_tokens_only_with_the_previous_key_set() {
        let dir = tempfile::tempdir().expect("tempdir");
        let before = auth(dir.path(), SECRET, None, Duration::from_secs(60));
        let token = before
            .login("alice", "correct horse")
            .expect("login")
            .access_token;
        let new_secret = SECRET.replace('0', "z");
        let rotated = auth(dir.path(), &new_secret, None, Duration::from_secs(60));
        assert_eq!(
            rotated.authenticate(Some(&bearer(&token))),
            Err(AuthError::Invalid)
        );
        let grace = auth(
            dir.path(),
            &new_secret,
            Some(SECRET),
            Duration::from_secs(60),
        );
        assert_eq!(
            grace.authenticate(Some(&bearer(&token))).map(|p| p.subject),
            Ok("alice".to_owned())
        );
    }

    #[test]
    fn the_decoy_costs_what_a_real_hash_costs() {
        let real = hash_password("anything").expect("hash");
        let params = |phc: &str| phc.split('$').nth(3).map(str::to_owned);
        assert_eq!(params(DECOY_HASH), params(&real));
        assert!(PasswordHash::new(DECOY_HASH).is_ok());
    }

    #[test]
    fn password_checks_take_turns() {
        let dir = tempfile::tempdir().expect("tempdir");
        let auth = auth(dir.path(), SECRET, None, Duration::from_secs(60));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let turns: Vec<_> = (0..LOGINS_AT_ONCE)
            .map(|_| runtime.block_on(auth.login_turn()).expect("a turn"))
            .collect();
        assert!(
            auth.logins.clone().try_acquire_owned().is_err(),
            "all turns taken"
        );
        drop(turns);
        assert!(auth.logins.clone().try_acquire_owned().is_ok());
    }

    #[test]
    fn api_keys_are_found_by_digest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let auth = auth(dir.path(), SECRET, None, Duration::from_secs(60));
        let who = auth
            .authenticate(Some(b"Bearer fc_board_key"))
            .expect("key");
        assert_eq!(who.subject, "key:board");
        assert!(who.may(Scope::Datasets) && !who.may(Scope::Query));
        assert_eq!(
            auth.authenticate(Some(b"Bearer fc_board_kex")),
            Err(AuthError::Invalid)
        );
    }

    #[test]
    fn a_bad_entry_is_named_and_the_others_load() {
        let text = format!(
            "[users.good]\npassword_hash = \"{}\"\nscopes = [\"query\"]\n\
             [users.\"bad\\u0007name\"]\npassword_hash = \"x\"\n\
             [users.nohash]\nscopes = [\"query\"]\n\
             [users.badscope]\npassword_hash = \"{0}\"\nscopes = [\"root\"]\n\
             [api_keys.short]\nkey_hash = \"sha256:abc\"\n",
            hash_password("pw").expect("hash")
        );
        let (accounts, problems) = Accounts::parse(&text).expect("parses");
        assert_eq!(accounts.user_count(), 1);
        assert!(accounts.users.contains_key("good"));
        for name in ["bad", "nohash", "badscope", "short"] {
            assert!(
                problems.iter().any(|p| p.contains(name)),
                "{name} in {problems:?}"
            );
        }
        assert_eq!(problems.len(), 4, "{problems:?}");
    }
}
