//! Configuration: built-in defaults < TOML file < environment < command-line flags.
//!
//! Two phases, as everywhere in ferrocorn:
//!
//! 1. **Raw**: each layer is read into a [`RawConfig`] — every key optional, unknown keys
//!    rejected (`deny_unknown_fields`), values only type-checked. Layers are overlaid in
//!    precedence order and each key remembers the layer it came from ([`Origin`]), which
//!    `--print-config` shows.
//! 2. **Resolved**: [`Config::resolve`] turns the merged raw values into the [`Config`] the
//!    program runs on: addresses parsed, sizes and durations converted, ranges checked, the data
//!    directory made absolute and checked. Every error names the key.
//!
//! Key names follow Gunicorn's settings where the concept is the same. Environment variables
//! are `FERROCORN_<KEY>` for every key, plus the names of the Python stack ferrocorn replaces
//! (`WORKERS`, `DUCKDB_MEMORY_LIMIT`, `DEBUG`), so an existing `.env` keeps working. The
//! environment is read through the [`Env`] trait, so tests never touch the process environment.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferrocorn_query_core::{DatasetOptions, StorageMode};
use ferrocorn_scoreboard::MAX_WORKERS;
use ferrocorn_worker::ForwardedAllow;
use ferrocorn_worker::SandboxMode;
use ferrocorn_worker::{AccessFormat, AccessLogTarget, LogFormat};

pub use crate::keys::{Origin, Origins, RawConfig};

/// A configuration error; the message always names the key or the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("cannot read config file {path}: {error}")]
    ReadFile {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    ParseFile { path: PathBuf, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    #[error("invalid value for `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

/// The process environment, behind a trait so tests can supply their own.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

/// The real process environment.
#[derive(Debug, Clone, Copy)]
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl Env for BTreeMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

impl RawConfig {
    /// Read a TOML file (syntax and types only).
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::ReadFile {
            path: path.to_owned(),
            error,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::ParseFile {
            path: path.to_owned(),
            message: e.message().to_owned()
                + &e.span().map(|s| locate(&text, s.start)).unwrap_or_default(),
        })
    }

    /// Read the environment: `FERROCORN_<KEY>` and the old stack's names.
    pub fn from_env(env: &dyn Env) -> Result<Vec<(Self, Origin)>, ConfigError> {
        let mut layers = Vec::new();
        // The old stack's names first, so FERROCORN_* wins when both are set.
        for key in Self::KEYS {
            if let Some(var) = key.legacy_env
                && let Some(value) = env.var(var)
            {
                layers.push(env_layer(var, key.name, &value)?);
            }
        }
        if let Some(value) = env.var("DEBUG") {
            let debug = parse_bool(&value).ok_or_else(|| ConfigError::Env {
                var: "DEBUG".into(),
                message: format!("expected true or false, got {value:?}"),
            })?;
            layers.push(env_layer(
                "DEBUG",
                "debug",
                if debug { "true" } else { "false" },
            )?);
        }
        for key in Self::KEYS {
            let var = format!("FERROCORN_{}", key.name.to_ascii_uppercase());
            if let Some(value) = env.var(&var) {
                layers.push(env_layer(&var, key.name, &value)?);
            }
        }
        Ok(layers)
    }
}

/// " (key `K`, line N)" for a byte offset of a TOML text: errors about a value name its key.
fn locate(text: &str, offset: usize) -> String {
    let offset = offset.min(text.len());
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line_number = text[..offset].matches('\n').count() + 1;
    let line = text[line_start..].lines().next().unwrap_or("");
    match line.split_once('=') {
        Some((key, _)) if !key.trim().is_empty() && !key.trim().starts_with('[') => {
            format!(" (key `{}`, line {line_number})", key.trim())
        }
        _ => format!(" (line {line_number})"),
    }
}

/// `forwarded_allow_ips`: comma-separated addresses, `*`, or nothing.
fn parse_forwarded_allow(text: &str) -> Result<ForwardedAllow, String> {
    let items: Vec<&str> = text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if items == ["*"] {
        return Ok(ForwardedAllow::Everyone);
    }
    if items.is_empty() {
        return Ok(ForwardedAllow::Nobody);
    }
    items
        .iter()
        .map(|item| {
            item.parse::<std::net::IpAddr>()
                .map(|a| a.to_canonical())
                .map_err(|_| format!("{item:?} is not an IP address (or \"*\" alone)"))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(ForwardedAllow::Addresses)
}

fn parse_bool(value: &str) -> Option<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" | "" => Some(false),
        _ => None,
    }
}

/// One environment variable as a one-key layer. The value is taken as a TOML value when it is
/// one of the key's type, else as a string; `bind` takes a comma-separated list.
fn env_layer(var: &str, key: &str, value: &str) -> Result<(RawConfig, Origin), ConfigError> {
    let mut candidates = Vec::new();
    if key == "cors_origins" && value.trim_start().starts_with('[') {
        // The old stack's BACKEND_CORS_ORIGINS is a JSON list.
        let list: Vec<String> = serde_json::from_str(value).map_err(|e| ConfigError::Env {
            var: var.to_owned(),
            message: format!("not a JSON list of origins: {e}"),
        })?;
        candidates.push(toml::Value::Array(
            list.into_iter().map(toml::Value::String).collect(),
        ));
    } else if key == "bind" || key == "cors_origins" {
        let list: Vec<toml::Value> = value
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| toml::Value::String(s.to_owned()))
            .collect();
        candidates.push(toml::Value::Array(list));
    } else {
        if let Some(b) = parse_bool(value).filter(|_| !value.trim().is_empty()) {
            candidates.push(toml::Value::Boolean(b));
        }
        if let Ok(n) = value.trim().parse::<i64>() {
            candidates.push(toml::Value::Integer(n));
        }
        candidates.push(toml::Value::String(value.to_owned()));
    }
    let mut last_error = String::new();
    for candidate in candidates {
        let mut table = toml::Table::new();
        table.insert(key.to_owned(), candidate);
        match table.try_into::<RawConfig>() {
            Ok(raw) => return Ok((raw, Origin::Env(var.to_owned()))),
            Err(e) => last_error = e.message().to_owned(),
        }
    }
    Err(ConfigError::Env {
        var: var.to_owned(),
        message: format!("invalid value {value:?} for `{key}`: {last_error}"),
    })
}

/// A listen address.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum BindAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl fmt::Display for BindAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(addr) => write!(f, "{addr}"),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl BindAddr {
    /// Parse `HOST:PORT`, `[IPV6]:PORT`, `localhost:PORT` or `unix:PATH`.
    pub fn parse(text: &str) -> Result<Self, String> {
        if let Some(path) = text.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a path".into());
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        if let Ok(addr) = text.parse::<SocketAddr>() {
            return Ok(Self::Tcp(addr));
        }
        if let Some(port) = text.strip_prefix("localhost:") {
            let port = port
                .parse::<u16>()
                .map_err(|_| format!("bad port in {text:?}"))?;
            return Ok(Self::Tcp(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                port,
            )));
        }
        Err(format!(
            "{text:?} is not HOST:PORT, [IPV6]:PORT or unix:PATH (HOST must be an IP address or localhost)"
        ))
    }
}

/// The resolved configuration the master runs on.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub binds: Vec<BindAddr>,
    pub workers: usize,
    pub worker_connections: usize,
    pub max_requests: u64,
    pub max_requests_jitter: u64,
    pub recycle_interval: Duration,
    pub timeout: Duration,
    pub graceful_timeout: Duration,
    pub deregistration_delay: Duration,
    pub keepalive: Duration,
    pub backlog: i32,
    pub pidfile: Option<PathBuf>,
    pub reuse_port: bool,
    pub limit_request_line: usize,
    pub limit_request_fields: usize,
    pub limit_request_field_size: usize,
    pub data_dir: PathBuf,
    pub temp_dir: PathBuf,
    pub duckdb_memory_limit_bytes: u64,
    /// CPUs the pool has: the control group's quota rounded up, else the machine's cores.
    pub cpus: u32,
    pub duckdb_threads: Option<u32>,
    pub max_result_rows: u64,
    pub max_body_bytes: usize,
    pub query_timeout: Duration,
    pub max_concurrent_queries: Option<usize>,
    /// `None`: derived per worker ([`Config::queue_depth`]).
    pub query_queue_depth: Option<usize>,
    /// `None`: by each query's deadline.
    pub query_queue_timeout: Option<Duration>,
    pub share_query_slots: bool,
    pub duckdb_max_temp_bytes: Option<u64>,
    /// The memory guard's ceiling for one worker's RSS, given the pool's size (`None`: off).
    pub max_worker_memory: WorkerMemory,
    pub cache_dir: PathBuf,
    pub storage: StorageMode,
    pub datasets: BTreeMap<String, DatasetOptions>,
    pub sandbox: SandboxMode,
    /// The result cache's byte bound; `None` when it is off.
    pub result_cache_bytes: Option<u64>,
    pub result_cache_min: Duration,
    pub loglevel: String,
    pub errorlog: Option<PathBuf>,
    pub accesslog: Option<AccessLogTarget>,
    pub log_format: LogFormat,
    /// Gunicorn's `access_log_format`, checked by [`AccessFormat::parse`].
    pub access_log_format: Option<String>,
    /// `environment = "production"`.
    pub production: bool,
    pub secret_key: Option<String>,
    pub secret_key_previous: Option<String>,
    pub users_file: Option<PathBuf>,
    pub token_ttl: Duration,
    pub rate_limit_per_minute: Option<u32>,
    pub rate_limit_auth_per_minute: Option<u32>,
    pub forwarded_allow: ForwardedAllow,
    pub cors_origins: Vec<String>,
    /// Who the workers become after the fork (`user`, `group`); `None`: the master's user.
    pub run_as: Option<RunAs>,
    pub metrics_public: bool,
}

/// A worker's user and group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunAs {
    pub user: String,
    pub uid: nix::unistd::Uid,
    pub gid: nix::unistd::Gid,
}

/// `user` and `group` resolved: by name or number, the group defaulting to the user's primary.
fn run_as(user: Option<&str>, group: Option<&str>) -> Result<Option<RunAs>, ConfigError> {
    use nix::unistd::{Gid, Group, Uid, User};
    let Some(user_text) = user.filter(|u| !u.is_empty()) else {
        if group.is_some_and(|g| !g.is_empty()) {
            return Err(invalid("group", "needs user as well"));
        }
        return Ok(None);
    };
    let found = match user_text.parse::<u32>() {
        Ok(uid) => User::from_uid(Uid::from_raw(uid)),
        Err(_) => User::from_name(user_text),
    }
    .map_err(|e| invalid("user", format!("cannot look {user_text:?} up: {e}")))?
    .ok_or_else(|| invalid("user", format!("no user {user_text:?}")))?;
    let gid = match group.filter(|g| !g.is_empty()) {
        None => found.gid,
        Some(text) => match text.parse::<u32>() {
            Ok(gid) => Gid::from_raw(gid),
            Err(_) => {
                Group::from_name(text)
                    .map_err(|e| invalid("group", format!("cannot look {text:?} up: {e}")))?
                    .ok_or_else(|| invalid("group", format!("no group {text:?}")))?
                    .gid
            }
        },
    };
    let me = nix::unistd::geteuid();
    if !me.is_root() && (found.uid != me || gid != nix::unistd::getegid()) {
        return Err(invalid(
            "user",
            format!("running workers as {user_text:?} needs the master to start as root"),
        ));
    }
    Ok(Some(RunAs {
        user: found.name,
        uid: found.uid,
        gid,
    }))
}

/// The shortest `secret_key` production accepts.
pub const MIN_SECRET_KEY_CHARS: usize = 64;

fn require<T: Clone>(value: &Option<T>, key: &'static str) -> Result<T, ConfigError> {
    value.clone().ok_or_else(|| invalid(key, "missing"))
}

fn in_range(
    key: &'static str,
    value: u64,
    range: std::ops::RangeInclusive<u64>,
) -> Result<u64, ConfigError> {
    if !range.contains(&value) {
        let (min, max) = range.into_inner();
        return Err(invalid(key, format!("{value} is outside {min}..={max}")));
    }
    Ok(value)
}

/// A required integer key within a range; errors name the key (its field name).
macro_rules! ranged {
    ($raw:ident . $key:ident, $range:expr) => {
        in_range(
            stringify!($key),
            require(&$raw.$key, stringify!($key))?,
            $range,
        )
    };
}

impl Config {
    /// Validate the merged raw configuration. Nothing is bound or forked before this succeeds.
    pub fn resolve(raw: &RawConfig) -> Result<Self, ConfigError> {
        let bind_texts = require(&raw.bind, "bind")?;
        if bind_texts.is_empty() {
            return Err(invalid("bind", "at least one address is needed"));
        }
        let mut binds = Vec::with_capacity(bind_texts.len());
        for text in &bind_texts {
            let addr = BindAddr::parse(text).map_err(|m| invalid("bind", m))?;
            if binds.contains(&addr) {
                return Err(invalid("bind", format!("{text:?} is listed twice")));
            }
            binds.push(addr);
        }
        let workers = ranged!(raw.workers, 1..=MAX_WORKERS as u64)?;
        crate::cgroup::Limits::detect()
            .check_workers(workers)
            .map_err(|m| invalid("workers", m))?;
        let worker_connections = ranged!(raw.worker_connections, 1..=1_000_000)?;
        let timeout = ranged!(raw.timeout, 1..=86_400)?;
        let graceful_timeout = ranged!(raw.graceful_timeout, 0..=86_400)?;
        let deregistration_delay = ranged!(raw.deregistration_delay, 0..=3600)?;
        let recycle_interval = ranged!(raw.recycle_interval, 0..=86_400)?;
        let keepalive = ranged!(raw.keepalive, 0..=3600)?;
        let backlog = ranged!(raw.backlog, 1..=65_535)?;
        let limit_request_line = ranged!(raw.limit_request_line, 64..=65_536)?;
        let limit_request_fields = ranged!(raw.limit_request_fields, 1..=32_768)?;
        let limit_request_field_size = ranged!(raw.limit_request_field_size, 64..=65_536)?;

        let data_dir = require(&raw.data_dir, "data_dir")?;
        let data_dir = absolute(&data_dir);
        if !data_dir.is_dir() {
            return Err(invalid(
                "data_dir",
                format!(
                    "{} does not exist or is not a directory",
                    data_dir.display()
                ),
            ));
        }
        if data_dir == Path::new("/") {
            return Err(invalid(
                "data_dir",
                "the root directory cannot be the data directory",
            ));
        }
        let temp_dir = absolute(&require(&raw.temp_dir, "temp_dir")?);
        if !temp_dir.is_dir() {
            return Err(invalid(
                "temp_dir",
                format!(
                    "{} does not exist or is not a directory",
                    temp_dir.display()
                ),
            ));
        }
        // The data directory is read-only to the workers (the kernel enforces it); their spill
        // directories must lie outside it.
        let canonical = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_owned());
        if canonical(&temp_dir).starts_with(canonical(&data_dir)) {
            return Err(invalid(
                "temp_dir",
                "must not be inside data_dir, which workers can only read",
            ));
        }
        let memory_text = require(&raw.duckdb_memory_limit, "duckdb_memory_limit")?;
        let duckdb_memory_limit_bytes =
            parse_size(&memory_text).map_err(|m| invalid("duckdb_memory_limit", m))?;
        if duckdb_memory_limit_bytes < (16 << 20) * workers {
            return Err(invalid(
                "duckdb_memory_limit",
                format!("{memory_text} leaves less than 16 MiB per worker"),
            ));
        }
        let duckdb_threads = match ranged!(raw.duckdb_threads, 0..=1024)? {
            0 => None,
            n => Some(n as u32),
        };
        let max_result_rows = ranged!(raw.max_result_rows, 1..=u64::MAX)?;
        let body_text = require(&raw.max_body_size, "max_body_size")?;
        let max_body_bytes = parse_size(&body_text).map_err(|m| invalid("max_body_size", m))?;
        let max_body_bytes = in_range("max_body_size", max_body_bytes, 1024..=1 << 30)? as usize;
        let query_timeout_ms = ranged!(raw.query_timeout_ms, 1..=86_400_000)?;
        let max_concurrent_queries = match ranged!(raw.max_concurrent_queries, 0..=1024)? {
            0 => None,
            n => Some(n as usize),
        };
        let query_queue_depth = raw
            .query_queue_depth
            .map(|n| in_range("query_queue_depth", n, 0..=100_000).map(|n| n as usize))
            .transpose()?;
        let query_queue_timeout = raw
            .query_queue_timeout_ms
            .map(|ms| {
                in_range("query_queue_timeout_ms", ms, 0..=600_000).map(Duration::from_millis)
            })
            .transpose()?;
        let max_worker_memory = match require(&raw.max_worker_memory, "max_worker_memory")?.trim() {
            "auto" => WorkerMemory::Auto,
            text => match parse_size(text).map_err(|m| invalid("max_worker_memory", m))? {
                0 => WorkerMemory::Off,
                bytes if bytes < 64 << 20 => {
                    return Err(invalid(
                        "max_worker_memory",
                        "below 64 MiB no worker can boot",
                    ));
                }
                bytes => WorkerMemory::Bytes(bytes),
            },
        };
        let duckdb_max_temp_bytes = match raw.duckdb_max_temp_size.as_deref() {
            None | Some("") => None,
            Some(text) => Some(parse_size(text).map_err(|m| invalid("duckdb_max_temp_size", m))?),
        };
        let cache_dir = absolute(&require(&raw.cache_dir, "cache_dir")?);
        if cache_dir.exists() && !cache_dir.is_dir() {
            return Err(invalid(
                "cache_dir",
                format!("{} is not a directory", cache_dir.display()),
            ));
        }
        if !cache_dir.exists() && !cache_dir.parent().is_some_and(Path::is_dir) {
            return Err(invalid(
                "cache_dir",
                format!("the directory of {} does not exist", cache_dir.display()),
            ));
        }
        let datasets = raw.datasets.clone().unwrap_or_default();
        for (name, options) in &datasets {
            if !ferrocorn_query_core::catalog::is_valid_name(name) {
                return Err(invalid(
                    "datasets",
                    format!("{name:?} is not a dataset name (letters, digits and _)"),
                ));
            }
            if let Some(key) = &options.sort_key
                && (key.is_empty() || key.len() > 255)
            {
                return Err(invalid(
                    "datasets",
                    format!("the sort_key of {name} must be a column name"),
                ));
            }
        }
        let result_cache_bytes = if require(&raw.result_cache, "result_cache")? {
            let text = require(&raw.result_cache_size, "result_cache_size")?;
            let bytes = parse_size(&text).map_err(|m| invalid("result_cache_size", m))?;
            Some(in_range("result_cache_size", bytes, (1 << 20)..=u64::MAX)?)
        } else {
            None
        };
        let production = match require(&raw.environment, "environment")?
            .to_ascii_lowercase()
            .as_str()
        {
            "production" | "prod" => true,
            "development" | "dev" | "" => false,
            other => {
                return Err(invalid(
                    "environment",
                    format!("{other:?} is not one of development, production"),
                ));
            }
        };
        let debug = require(&raw.debug, "debug")?;
        let secret_key = raw.secret_key.clone().filter(|k| !k.is_empty());
        let secret_key_previous = raw.secret_key_previous.clone().filter(|k| !k.is_empty());
        if production {
            if debug {
                return Err(invalid(
                    "debug",
                    "debug (DEBUG=true) is not allowed with ENVIRONMENT=production",
                ));
            }
            match &secret_key {
                None => {
                    return Err(invalid(
                        "secret_key",
                        "ENVIRONMENT=production needs SECRET_KEY (secret_key) to sign tokens",
                    ));
                }
                Some(key) if key.chars().count() < MIN_SECRET_KEY_CHARS => {
                    return Err(invalid(
                        "secret_key",
                        format!(
                            "{} characters; ENVIRONMENT=production needs at least {MIN_SECRET_KEY_CHARS}",
                            key.chars().count()
                        ),
                    ));
                }
                Some(_) => {}
            }
            if secret_key_previous
                .as_ref()
                .is_some_and(|k| k.chars().count() < MIN_SECRET_KEY_CHARS)
            {
                return Err(invalid(
                    "secret_key_previous",
                    format!(
                        "ENVIRONMENT=production needs at least {MIN_SECRET_KEY_CHARS} characters"
                    ),
                ));
            }
        }
        let users_file = raw.users_file.as_deref().map(absolute);
        if let Some(path) = &users_file
            && !path.is_file()
        {
            return Err(invalid(
                "users_file",
                format!("{} does not exist or is not a file", path.display()),
            ));
        }
        let cors_origins = require(&raw.cors_origins, "cors_origins")?;
        for origin in &cors_origins {
            if origin == "*" {
                if production {
                    return Err(invalid(
                        "cors_origins",
                        "\"*\" is not allowed with ENVIRONMENT=production: list the origins",
                    ));
                }
                continue;
            }
            let exact = http::Uri::try_from(origin.as_str()).is_ok_and(|uri| {
                matches!(uri.scheme_str(), Some("http" | "https"))
                    && uri.authority().is_some()
                    && uri
                        .path_and_query()
                        .is_none_or(|p| p.as_str() == "/" || p.as_str().is_empty())
                    && !origin.ends_with('/')
            });
            if !exact {
                return Err(invalid(
                    "cors_origins",
                    format!("{origin:?} is not an origin (scheme://host[:port], no path)"),
                ));
            }
        }
        let run_as = run_as(raw.user.as_deref(), raw.group.as_deref())?;
        let token_ttl = Duration::from_secs(ranged!(raw.token_ttl, 1..=31_536_000)?);
        let per_minute = |n: u64| (n > 0).then_some(n as u32);
        let rate_limit_per_minute = per_minute(ranged!(raw.rate_limit_per_minute, 0..=60_000)?);
        let rate_limit_auth_per_minute =
            per_minute(ranged!(raw.rate_limit_auth_per_minute, 0..=60_000)?);
        let forwarded_allow =
            parse_forwarded_allow(&require(&raw.forwarded_allow_ips, "forwarded_allow_ips")?)
                .map_err(|m| invalid("forwarded_allow_ips", m))?;
        let loglevel = require(&raw.loglevel, "loglevel")?.to_ascii_lowercase();
        let loglevel = if debug { "debug".to_owned() } else { loglevel };
        let loglevel = match loglevel.as_str() {
            "debug" | "info" | "error" | "trace" => loglevel,
            "warning" | "warn" => "warn".to_owned(),
            "critical" => "error".to_owned(),
            other => {
                return Err(invalid(
                    "loglevel",
                    format!("{other:?} is not one of debug, info, warning, error"),
                ));
            }
        };
        let errorlog = match require(&raw.errorlog, "errorlog")?.as_str() {
            "-" | "" => None,
            path => Some(absolute(Path::new(path))),
        };

        let log_format = match require(&raw.log_format, "log_format")?.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(invalid(
                    "log_format",
                    format!("{other:?} is not \"text\" or \"json\""),
                ));
            }
        };
        let access_log_format = raw.access_log_format.clone();
        if let Some(format) = &access_log_format {
            AccessFormat::parse(format).map_err(|m| invalid("access_log_format", m))?;
        }
        let accesslog = match raw.accesslog.as_deref() {
            None | Some("") => None,
            Some("-") => Some(AccessLogTarget::Stdout),
            Some(path) => {
                let path = absolute(Path::new(path));
                if !path.parent().is_some_and(Path::is_dir) {
                    return Err(invalid(
                        "accesslog",
                        format!("the directory of {} does not exist", path.display()),
                    ));
                }
                Some(AccessLogTarget::File(path))
            }
        };
        Ok(Self {
            binds,
            workers: workers as usize,
            worker_connections: worker_connections as usize,
            max_requests: require(&raw.max_requests, "max_requests")?,
            max_requests_jitter: require(&raw.max_requests_jitter, "max_requests_jitter")?,
            recycle_interval: Duration::from_secs(recycle_interval),
            timeout: Duration::from_secs(timeout),
            graceful_timeout: Duration::from_secs(graceful_timeout),
            deregistration_delay: Duration::from_secs(deregistration_delay),
            keepalive: Duration::from_secs(keepalive),
            backlog: backlog as i32,
            pidfile: raw.pidfile.as_deref().map(absolute),
            reuse_port: require(&raw.reuse_port, "reuse_port")?,
            limit_request_line: limit_request_line as usize,
            limit_request_fields: limit_request_fields as usize,
            limit_request_field_size: limit_request_field_size as usize,
            data_dir,
            temp_dir,
            duckdb_memory_limit_bytes,
            cpus: crate::cgroup::Limits::detect().whole_cpus(),
            duckdb_threads,
            max_result_rows,
            max_body_bytes,
            query_timeout: Duration::from_millis(query_timeout_ms),
            max_concurrent_queries,
            query_queue_depth,
            query_queue_timeout,
            share_query_slots: require(&raw.share_query_slots, "share_query_slots")?,
            duckdb_max_temp_bytes,
            max_worker_memory,
            cache_dir,
            storage: require(&raw.storage, "storage")?,
            datasets,
            sandbox: require(&raw.sandbox, "sandbox")?,
            result_cache_bytes,
            result_cache_min: Duration::from_millis(ranged!(
                raw.result_cache_min_ms,
                0..=3_600_000
            )?),
            loglevel,
            errorlog,
            accesslog,
            log_format,
            access_log_format,
            production,
            secret_key,
            secret_key_previous,
            users_file,
            token_ttl,
            rate_limit_per_minute,
            rate_limit_auth_per_minute,
            forwarded_allow,
            cors_origins,
            run_as,
            metrics_public: require(&raw.metrics_public, "metrics_public")?,
        })
    }

    /// The log files the pool writes (error log, access log), when they are files.
    pub fn log_files(&self) -> Vec<PathBuf> {
        self.errorlog
            .iter()
            .cloned()
            .chain(self.accesslog.iter().filter_map(|target| match target {
                AccessLogTarget::File(path) => Some(path.clone()),
                AccessLogTarget::Stdout => None,
            }))
            .collect()
    }

    /// DuckDB's memory limit for one worker: the pool's budget divided among the workers.
    /// Queries one worker may queue: `query_queue_depth`, or by default one per connection the
    /// worker serves, and no more request bodies than its share of the memory budget holds.
    pub fn queue_depth(&self, workers: usize) -> usize {
        self.query_queue_depth.unwrap_or_else(|| {
            let bodies =
                self.worker_memory_limit_bytes(workers) / self.max_body_bytes.max(1) as u64;
            self.worker_connections.min(bodies as usize).max(1)
        })
    }

    /// The memory guard's soft ceiling for one worker of a pool of `workers`, if it is on.
    pub fn worker_memory_ceiling(&self, workers: usize) -> Option<u64> {
        match self.max_worker_memory {
            WorkerMemory::Off => None,
            WorkerMemory::Bytes(bytes) => Some(bytes),
            WorkerMemory::Auto => {
                Some((2 * self.worker_memory_limit_bytes(workers)).max(256 << 20))
            }
        }
    }

    pub fn worker_memory_limit_bytes(&self, workers: usize) -> u64 {
        self.duckdb_memory_limit_bytes / workers.max(1) as u64
    }

    /// DuckDB's threads for one worker: the configured number, or cores / workers (at least 1).
    pub fn worker_threads(&self, workers: usize) -> u32 {
        self.duckdb_threads
            .unwrap_or_else(|| (self.cpus / workers.max(1) as u32).max(1))
    }
}

/// `max_worker_memory`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkerMemory {
    Off,
    /// Twice a worker's share of `duckdb_memory_limit`, at least 256 MiB.
    Auto,
    Bytes(u64),
}

/// An absolute path without touching the file system beyond the current directory.
fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
}

/// Parse a size such as `2GB`, `512MiB`, `1.5GB` or `1073741824` into bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size like 2GB or 512MiB"))?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" | "k" => 1_000,
        "mb" | "m" => 1_000_000,
        "gb" | "g" => 1_000_000_000,
        "tb" | "t" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        other => return Err(format!("unknown size unit {other:?} in {text:?}")),
    };
    let bytes = number * multiplier as f64;
    if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 {
        return Err(format!("{text:?} is out of range"));
    }
    Ok(bytes as u64)
}

/// Render the effective configuration with each key's origin, as TOML.
pub fn render(raw: &RawConfig, origins: &Origins) -> String {
    let table = toml::Table::try_from(raw).unwrap_or_default();
    let mut out = String::new();
    let limits = crate::cgroup::Limits::detect();
    for key in RawConfig::KEYS.iter().map(|k| k.name) {
        let origin = match (origins.get(key), limits.default_reason(key)) {
            (None | Some(Origin::Default), Some(reason)) => format!("default: {reason}"),
            (Some(origin), _) => origin.to_string(),
            (None, None) => "default".to_owned(),
        };
        match table.get(key) {
            // Secrets are never printed, only whether and where they are set.
            Some(value) if key.starts_with("secret_key") => out.push_str(&format!(
                "{key} = \"<redacted: {} characters>\"  # {origin}\n",
                value.as_str().map_or(0, |v| v.chars().count())
            )),
            Some(value) => out.push_str(&format!("{key} = {value}  # {origin}\n")),
            None => out.push_str(&format!("# {key} = (unset)  # {origin}\n")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("2GB"), Ok(2_000_000_000));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("1.5 GiB"), Ok(3 << 29));
        assert_eq!(parse_size("1024"), Ok(1024));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("2XB").is_err());
        assert!(parse_size("0").is_err());
    }

    #[test]
    fn bind_addresses() {
        assert_eq!(
            BindAddr::parse("127.0.0.1:8000"),
            Ok(BindAddr::Tcp("127.0.0.1:8000".parse().expect("addr")))
        );
        assert_eq!(
            BindAddr::parse("[::1]:0"),
            Ok(BindAddr::Tcp("[::1]:0".parse().expect("addr")))
        );
        assert_eq!(
            BindAddr::parse("unix:/run/f.sock"),
            Ok(BindAddr::Unix("/run/f.sock".into()))
        );
        assert!(BindAddr::parse("example.com:80").is_err());
        assert!(BindAddr::parse("127.0.0.1").is_err());
    }

    #[test]
    fn bad_file_value_names_the_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f.toml");
        std::fs::write(&path, "workers = 2\ntimeout = -1\n").expect("write");
        let err = RawConfig::from_file(&path).expect_err("negative");
        assert!(err.to_string().contains("key `timeout`, line 2"), "{err}");
    }

    #[test]
    fn unknown_file_key_is_named() {
        let err = toml::from_str::<RawConfig>("wrokers = 3").expect_err("unknown key");
        assert!(err.message().contains("wrokers"), "{}", err.message());
    }

    #[test]
    fn env_layers_understand_old_names_and_ferrocorn_wins() {
        let layers = RawConfig::from_env(&env(&[
            ("WORKERS", "2"),
            ("FERROCORN_WORKERS", "3"),
            ("DUCKDB_MEMORY_LIMIT", "1GB"),
            ("DEBUG", "true"),
            ("FERROCORN_BIND", "127.0.0.1:1, [::1]:2"),
            ("FERROCORN_DATA_DIR", "123"),
        ]))
        .expect("env");
        let mut raw = RawConfig::default();
        let mut origins = Origins::default();
        for (layer, origin) in layers {
            raw.overlay(layer, &origin, &mut origins);
        }
        assert_eq!(raw.workers, Some(3));
        assert_eq!(
            origins.get("workers"),
            Some(&Origin::Env("FERROCORN_WORKERS".into()))
        );
        assert_eq!(raw.duckdb_memory_limit.as_deref(), Some("1GB"));
        assert_eq!(raw.debug, Some(true));
        assert_eq!(raw.bind, Some(vec!["127.0.0.1:1".into(), "[::1]:2".into()]));
        assert_eq!(raw.data_dir, Some(PathBuf::from("123")));
    }

    #[test]
    fn bad_env_value_names_the_variable_and_key() {
        let err = RawConfig::from_env(&env(&[("WORKERS", "many")])).expect_err("bad");
        let text = err.to_string();
        assert!(
            text.contains("WORKERS") && text.contains("`workers`"),
            "{text}"
        );
    }

    #[test]
    fn resolve_checks_ranges_and_names_the_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut raw = RawConfig::defaults();
        raw.data_dir = Some(dir.path().to_owned());
        assert!(Config::resolve(&raw).is_ok());

        let mut bad = raw.clone();
        bad.workers = Some(0);
        assert!(
            Config::resolve(&bad)
                .expect_err("0 workers")
                .to_string()
                .contains("`workers`")
        );

        let mut bad = raw.clone();
        bad.data_dir = Some(dir.path().join("missing"));
        assert!(
            Config::resolve(&bad)
                .expect_err("missing")
                .to_string()
                .contains("`data_dir`")
        );

        let mut bad = raw.clone();
        bad.bind = Some(vec!["nowhere".into()]);
        assert!(
            Config::resolve(&bad)
                .expect_err("bind")
                .to_string()
                .contains("`bind`")
        );

        let mut bad = raw;
        bad.duckdb_memory_limit = Some("10MB".into());
        assert!(
            Config::resolve(&bad)
                .expect_err("too small")
                .to_string()
                .contains("`duckdb_memory_limit`")
        );
    }

    #[test]
    fn storage_and_cache_keys_are_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f.toml");
        std::fs::write(
            &path,
            "storage = \"snapshot\"\nresult_cache_size = \"64MiB\"\n\n[datasets.orders]\nsort_key = \"id\"\nstorage = \"parquet\"\n",
        )
        .expect("write");
        let mut raw = RawConfig::defaults();
        raw.overlay(
            RawConfig::from_file(&path).expect("file"),
            &Origin::File(path.clone()),
            &mut Origins::default(),
        );
        raw.data_dir = Some(dir.path().to_owned());
        raw.cache_dir = Some(dir.path().join("cache"));
        let config = Config::resolve(&raw).expect("valid");
        assert_eq!(config.storage, StorageMode::Snapshot);
        assert_eq!(config.result_cache_bytes, Some(64 << 20));
        assert_eq!(
            config.datasets["orders"].storage,
            Some(StorageMode::Parquet)
        );
        assert_eq!(config.datasets["orders"].sort_key.as_deref(), Some("id"));

        let err = |raw: &RawConfig| Config::resolve(raw).expect_err("invalid").to_string();
        let mut bad = raw.clone();
        bad.result_cache = Some(false);
        assert_eq!(Config::resolve(&bad).expect("off").result_cache_bytes, None);
        bad.result_cache = Some(true);
        bad.result_cache_size = Some("1KB".into());
        assert!(err(&bad).contains("`result_cache_size`"));
        let mut bad = raw.clone();
        bad.cache_dir = Some(dir.path().join("missing/cache"));
        assert!(err(&bad).contains("`cache_dir`"));
        let mut bad = raw.clone();
        bad.datasets = Some(BTreeMap::from([(
            "bad-name".to_owned(),
            DatasetOptions::default(),
        )]));
        assert!(err(&bad).contains("`datasets`"));
        let mut bad = raw.clone();
        bad.duckdb_max_temp_size = Some("lots".into());
        assert!(err(&bad).contains("`duckdb_max_temp_size`"));
        let unknown = "[datasets.orders]\nsort = \"id\"\n";
        assert!(toml::from_str::<RawConfig>(unknown).is_err());
        assert!(toml::from_str::<RawConfig>("storage = \"fast\"").is_err());
    }

    #[test]
    fn pool_budget_is_divided() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut raw = RawConfig::defaults();
        raw.data_dir = Some(dir.path().to_owned());
        raw.duckdb_threads = Some(3);
        let config = Config::resolve(&raw).expect("valid");
        assert_eq!(config.worker_memory_limit_bytes(4), 500_000_000);
        assert_eq!(config.worker_threads(4), 3);
    }

    #[test]
    fn render_shows_origins() {
        let mut raw = RawConfig::defaults();
        let mut origins = Origins::default();
        raw.overlay(
            RawConfig {
                workers: Some(7),
                ..RawConfig::default()
            },
            &Origin::Flag("--workers".into()),
            &mut origins,
        );
        let text = render(&raw, &origins);
        assert!(text.contains("workers = 7  # flag --workers"), "{text}");
        assert!(text.contains("keepalive = 5  # default"), "{text}");
    }
}
