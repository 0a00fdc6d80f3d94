//! Every configuration key, declared once.
//!
//! One table (`keys!` below) gives each key its name, type, built-in default, flag, the old
//! stack's environment name if it had one, whether it needs a restart, and its documentation.
//! From it come: [`RawConfig`] (a layer, every key optional, as the TOML file, the environment
//! and the flags are read), its [`RawConfig::defaults`], [`KeyFlags`] (the command-line flags,
//! whose `--help` is the same documentation), the layers' overlay with the origin of each key,
//! and the restart-only keys a reload keeps. `config/ferrocorn.toml` documents each key starting
//! with the same text; a test checks it documents every key and nothing else. What a key's value
//! means is decided where it is resolved ([`crate::config::Config::resolve`]).

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use ferrocorn_query_core::{DatasetOptions, StorageMode};
use ferrocorn_worker::SandboxMode;
use serde::{Deserialize, Serialize};

/// Where a key's effective value came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    Default,
    File(PathBuf),
    Env(String),
    Flag(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Default => f.write_str("default"),
            Self::File(path) => write!(f, "file {}", path.display()),
            Self::Env(var) => write!(f, "env {var}"),
            Self::Flag(flag) => write!(f, "flag {flag}"),
        }
    }
}

/// The origin of each key that a layer set.
#[derive(Clone, Debug, Default)]
pub struct Origins(BTreeMap<&'static str, Origin>);

impl Origins {
    pub fn get(&self, key: &str) -> Option<&Origin> {
        self.0.get(key)
    }
}

/// A key of the table.
#[derive(Clone, Copy, Debug)]
pub struct Key {
    pub name: &'static str,
    /// Its documentation: `--help`'s text, and the start of its entry in `config/ferrocorn.toml`.
    pub doc: &'static str,
    /// The name the stack ferrocorn replaces read it from, if any.
    pub legacy_env: Option<&'static str>,
    /// A reload keeps the running value (the sockets or the logger would have to be re-created).
    pub restart_only: bool,
}

macro_rules! keys {
    ($(
        $(#[doc = $doc:literal])+
        $key:ident : $ty:ty = $default:expr,
        arg($($arg:tt)*)
        $(, env $env:literal)?
        , restart = $restart:literal;
    )*) => {
        /// Configuration as written: every key optional. See `config/ferrocorn.toml` for the
        /// documentation of each key with its default.
        #[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
        #[serde(deny_unknown_fields)]
        pub struct RawConfig {
            $( $(#[doc = $doc])+ #[serde(default, skip_serializing_if = "Option::is_none")] pub $key: Option<$ty>, )*
        }

        /// The command-line flag of every key (Gunicorn's names where the concept is the same).
        #[derive(Clone, Debug, Default, clap::Args)]
        pub struct KeyFlags {
            $( $(#[doc = $doc])+ #[arg($($arg)*)] pub $key: Option<$ty>, )*
        }

        impl RawConfig {
            /// Every key, in documentation order.
            pub const KEYS: &'static [Key] = &[$(Key {
                name: stringify!($key),
                doc: concat!($($doc, "\n"),+),
                legacy_env: keys!(@env $($env)?),
                restart_only: $restart,
            }),*];

            /// The built-in defaults: the production numbers of the stack ferrocorn replaces.
            pub fn defaults() -> Self {
                Self { $( $key: $default, )* }
            }

            /// Take every key `other` sets, recording `origin` for it.
            pub fn overlay(&mut self, other: RawConfig, origin: &Origin, origins: &mut Origins) {
                $(
                    if other.$key.is_some() {
                        self.$key = other.$key;
                        origins.0.insert(stringify!($key), origin.clone());
                    }
                )*
            }

            /// Keep `running`'s value of every restart-only key that this layer changes; returns
            /// the keys kept.
            pub fn keep_restart_only(&mut self, running: &RawConfig) -> Vec<&'static str> {
                let mut kept = Vec::new();
                $(
                    if $restart && self.$key != running.$key {
                        self.$key = running.$key.clone();
                        kept.push(stringify!($key));
                    }
                )*
                kept
            }
        }

        impl KeyFlags {
            /// The flags given, one layer each, as `(layer, key)`.
            pub fn layers(&self) -> Vec<(RawConfig, &'static str)> {
                let mut layers = Vec::new();
                $(
                    if let Some(value) = self.$key.clone() {
                        layers.push((
                            RawConfig { $key: Some(value), ..RawConfig::default() },
                            stringify!($key),
                        ));
                    }
                )*
                layers
            }
        }
    };
    (@env $env:literal) => { Some($env) };
    (@env) => { None };
}

keys! {
    /// Addresses to listen on: HOST:PORT, [IPV6]:PORT, localhost:PORT or unix:PATH.
    bind: Vec<String> = Some(vec!["127.0.0.1:8000".to_owned()]),
    arg(short = 'b', long = "bind", value_name = "ADDRESS", num_args = 1, action = clap::ArgAction::Append),
    restart = true;
    /// Worker processes, each with its own DuckDB instance. Default: 4, or a worker per CPU of
    /// the control group's CPU quota (a container's --cpus).
    workers: u64 = Some(crate::cgroup::Limits::detect().default_workers()),
    arg(short = 'w', long),
    env "WORKERS",
    restart = false;
    /// Most concurrent connections one worker serves; more wait in the kernel's queue.
    worker_connections: u64 = Some(1000),
    arg(long),
    restart = false;
    /// API requests after which a worker is replaced by a fresh one (0 disables).
    max_requests: u64 = Some(1000),
    arg(long),
    restart = false;
    /// Random extra requests (0..=N) added to max_requests for each worker.
    max_requests_jitter: u64 = Some(50),
    arg(long),
    restart = false;
    /// Least seconds between the starts of two recycles in the pool (0: one at a time only).
    recycle_interval: u64 = Some(10),
    arg(long, value_name = "SECONDS"),
    restart = false;
    /// Seconds a worker may go without a heartbeat before it is killed and replaced.
    timeout: u64 = Some(120),
    arg(short = 't', long, value_name = "SECONDS"),
    restart = false;
    /// Seconds a stopping or replaced worker gets to finish its requests before it is killed.
    graceful_timeout: u64 = Some(30),
    arg(long, value_name = "SECONDS"),
    restart = false;
    /// Seconds a TERM keeps the pool serving, with /readyz answering 503, before the workers
    /// drain (0: they drain at once).
    deregistration_delay: u64 = Some(0),
    arg(long, value_name = "SECONDS"),
    restart = false;
    /// Seconds an idle keep-alive connection stays open, and a client has to send a request's
    /// headers (0 disables keep-alive).
    keepalive: u64 = Some(5),
    arg(long = "keep-alive", value_name = "SECONDS"),
    restart = false;
    /// Listen backlog.
    backlog: u64 = Some(2048),
    arg(long),
    restart = true;
    /// PID file, written atomically at start and removed at exit.
    pidfile: PathBuf = None,
    arg(short = 'p', long = "pid", value_name = "FILE"),
    restart = true;
    /// One SO_REUSEPORT listener per worker slot (true) or one shared listener (false).
    reuse_port: bool = Some(true),
    arg(long, value_name = "BOOL"),
    restart = true;
    /// Longest request line in bytes; longer is answered 414.
    limit_request_line: u64 = Some(4094),
    arg(long),
    restart = false;
    /// Most header fields in a request; more is answered 431.
    limit_request_fields: u64 = Some(100),
    arg(long),
    restart = false;
    /// Longest header field (name and value) in bytes; longer is answered 431.
    limit_request_field_size: u64 = Some(8190),
    arg(long),
    restart = false;
    /// Directory of Parquet datasets: NAME.parquet files and NAME/ folders of Parquet files.
    data_dir: PathBuf = Some(PathBuf::from("data")),
    arg(long, value_name = "DIR"),
    restart = false;
    /// Directory under which each worker gets its own DuckDB spill directory.
    temp_dir: PathBuf = Some(std::env::temp_dir()),
    arg(long, value_name = "DIR"),
    restart = false;
    /// DuckDB memory for the whole pool, divided among the workers, e.g. "2GB". Default: 2GB, or
    /// three quarters of the control group's memory limit (a container's --memory).
    duckdb_memory_limit: String = Some(crate::cgroup::Limits::detect().default_memory_limit()),
    arg(long, value_name = "SIZE"),
    env "DUCKDB_MEMORY_LIMIT",
    restart = false;
    /// DuckDB threads per worker; 0 means CPU cores (the control group's quota, if it has one) /
    /// workers, at least 1.
    duckdb_threads: u64 = Some(0),
    arg(long),
    restart = false;
    /// Rows a query result may have; a longer result is cut and flagged truncated.
    max_result_rows: u64 = Some(1_000_000),
    arg(long),
    restart = false;
    /// Largest request body, e.g. "1MiB"; larger is answered 413.
    max_body_size: String = Some("1MiB".to_owned()),
    arg(long, value_name = "SIZE"),
    restart = false;
    /// Longest a query may run, in milliseconds; requests may ask for less.
    query_timeout_ms: u64 = Some(30_000),
    arg(long, value_name = "MS"),
    restart = false;
    /// Queries one worker runs at once; 0 means as many as its DuckDB threads.
    max_concurrent_queries: u64 = Some(0),
    arg(long),
    restart = false;
    /// Queries that may wait for a slot in one worker; more are answered 503 at once. Unset: as
    /// many as the worker's connections and its memory share allow.
    query_queue_depth: u64 = None,
    arg(long),
    restart = false;
    /// Longest wait for a query slot, in milliseconds, before 503. Unset: as long as the query
    /// can still finish within its deadline.
    query_queue_timeout_ms: u64 = None,
    arg(long, value_name = "MS"),
    restart = false;
    /// Whether a worker whose queries queue may borrow the query slots other workers leave idle.
    share_query_slots: bool = Some(true),
    arg(long, value_name = "BOOL"),
    restart = false;
    /// Resident memory one worker may hold before the master recycles it, e.g. "1GB"; "auto"
    /// is twice its share of duckdb_memory_limit (at least 256 MiB), "0" turns the guard off.
    max_worker_memory: String = Some("auto".to_owned()),
    arg(long, value_name = "SIZE"),
    restart = false;
    /// Disk DuckDB may spill to, for the whole pool, divided among the workers, e.g. "20GB".
    duckdb_max_temp_size: String = None,
    arg(long, value_name = "SIZE"),
    restart = false;
    /// Directory of what survives restarts: dataset snapshots and the result cache.
    cache_dir: PathBuf = Some(PathBuf::from("cache")),
    arg(long, value_name = "DIR"),
    restart = false;
    /// How datasets are served: "auto", "snapshot" or "parquet".
    storage: StorageMode = Some(StorageMode::Auto),
    arg(long, value_name = "MODE"),
    restart = false;
    /// The kernel's sandbox for workers: "auto" or "required".
    sandbox: SandboxMode = Some(SandboxMode::Auto),
    arg(long, value_name = "MODE"),
    restart = false;
    /// Keep query results in cache_dir, shared by all workers.
    result_cache: bool = Some(true),
    arg(long, value_name = "BOOL"),
    restart = false;
    /// Most bytes the result cache keeps on disk; the least recently used entries go first.
    result_cache_size: String = Some("256MiB".to_owned()),
    arg(long, value_name = "SIZE"),
    restart = false;
    /// Milliseconds of computing below which a result is kept in its worker's memory, not on disk.
    result_cache_min_ms: u64 = Some(5),
    arg(long, value_name = "MS"),
    restart = false;
    /// Log level: debug, info, warning, error.
    loglevel: String = Some("info".to_owned()),
    arg(long = "log-level", value_name = "LEVEL"),
    restart = true;
    /// Error log: "-" is standard error, or a file reopened on SIGUSR1.
    errorlog: String = Some("-".to_owned()),
    arg(long = "error-logfile", value_name = "FILE"),
    restart = true;
    /// Log records' format, for both logs: "text" (the combined log format for access lines) or
    /// "json" (one object per line).
    log_format: String = Some("text".to_owned()),
    arg(long = "log-format", value_name = "FORMAT"),
    restart = true;
    /// Access lines in Gunicorn's access_log_format atoms, e.g. '%(h)s "%(r)s" %(s)s %(M)sms'.
    /// Unset: the combined log format, the duration and the request id.
    access_log_format: String = None,
    arg(long = "access-logformat", value_name = "FORMAT"),
    restart = false;
    /// Access log: one line per request; "-" is standard output. Off when unset.
    accesslog: String = None,
    arg(long = "access-logfile", value_name = "FILE"),
    restart = false;
    /// "development" or "production". Production refuses to start without a secret_key of 64
    /// characters or more, or with debug on, and requires a credential on every endpoint but
    /// /healthz, /readyz and /v1/auth/token.
    environment: String = Some("development".to_owned()),
    arg(long, value_name = "NAME"),
    env "ENVIRONMENT",
    restart = false;
    /// Debug logging (loglevel "debug"); refused in production.
    debug: bool = Some(false),
    arg(long, value_name = "BOOL"),
    restart = false;
    /// The key bearer tokens are signed with (HS256). Set it in the environment or the file,
    /// never as a flag; changing it (and HUP) invalidates every token it signed.
    secret_key: String = None,
    arg(skip),
    env "SECRET_KEY",
    restart = false;
    /// The key before a rotation: tokens it signed are still accepted until they expire.
    secret_key_previous: String = None,
    arg(skip),
    env "SECRET_KEY_PREVIOUS",
    restart = false;
    /// The users file (TOML): accounts with argon2id password hashes, API keys, scopes and
    /// datasets. Written by `ferrocorn user add`; re-read by each worker at start (HUP).
    users_file: PathBuf = None,
    arg(long, value_name = "FILE"),
    restart = false;
    /// Seconds a token from POST /v1/auth/token is valid.
    token_ttl: u64 = Some(3600),
    arg(long, value_name = "SECONDS"),
    restart = false;
    /// API requests a minute of one user or API key, for the whole pool (0: unlimited).
    rate_limit_per_minute: u64 = Some(60),
    arg(long, value_name = "N"),
    env "RATE_LIMIT_PER_MINUTE",
    restart = false;
    /// Logins (POST /v1/auth/token) a minute from one client address, for the whole pool (0:
    /// unlimited).
    rate_limit_auth_per_minute: u64 = Some(5),
    arg(long, value_name = "N"),
    env "RATE_LIMIT_AUTH_PER_MINUTE",
    restart = false;
    /// Proxies trusted to name the client in X-Forwarded-For: comma-separated addresses, or "*".
    forwarded_allow_ips: String = Some("127.0.0.1,::1".to_owned()),
    arg(long, value_name = "ADDRESSES"),
    env "FORWARDED_ALLOW_IPS",
    restart = false;
    /// Origins a browser may call the API from: a list of exact origins such as
    /// "https://bi.example.com", or "*" (refused in production).
    cors_origins: Vec<String> = Some(Vec::new()),
    arg(long = "cors-origin", value_name = "ORIGIN", num_args = 1, action = clap::ArgAction::Append),
    env "BACKEND_CORS_ORIGINS",
    restart = false;
    /// Whether /metrics answers without a credential in production (for a scraper on a trusted
    /// network); otherwise it needs the metrics scope.
    metrics_public: bool = Some(false),
    arg(long, value_name = "BOOL"),
    restart = false;
    /// The user workers run as (a name or a uid): the master binds, as root if it must, then
    /// each worker drops to this user before it opens DuckDB. Unset: the master's user.
    user: String = None,
    arg(short = 'u', long, value_name = "USER"),
    restart = true;
    /// The group workers run as (a name or a gid). Unset: the user's primary group.
    group: String = None,
    arg(short = 'g', long, value_name = "GROUP"),
    restart = true;
    /// Per-dataset options, as tables [datasets.NAME] with storage, sort_key and warmup.
    datasets: BTreeMap<String, DatasetOptions> = None,
    arg(skip),
    restart = false;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The documented keys of a config file (set, or shown commented out as `# key = …`), each
    /// with the comment block above it, in order. The tables at the end are one key each.
    fn documented(text: &str) -> Vec<(String, String)> {
        let assignment = |line: &str| {
            let line = line.trim_start_matches('#').trim();
            let (key, value) = line.split_once('=')?;
            let key = key.trim();
            (!value.trim().is_empty()
                && !key.is_empty()
                && key.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
            .then(|| key.to_owned())
        };
        let mut entries: Vec<(String, String)> = Vec::new();
        let mut block: Vec<&str> = Vec::new();
        for line in text.lines() {
            // A table, or an example of one left commented out, ends the keys.
            if let Some(table) = line.trim_start_matches('#').trim().strip_prefix('[') {
                let key = table.split(['.', ']']).next().unwrap_or_default();
                if !entries.iter().any(|(k, _)| k == key) {
                    entries.push((key.to_owned(), block.join(" ")));
                }
                break;
            }
            match assignment(line) {
                Some(key) => {
                    entries.push((key, block.join(" ")));
                    block.clear();
                }
                None if line.starts_with("# ---") || line.trim().is_empty() => block.clear(),
                None => block.push(line.trim_start_matches('#').trim()),
            }
        }
        entries
    }

    fn words(text: &str) -> String {
        text.split_whitespace().collect::<Vec<_>>().join(" ")
    }

    #[test]
    fn the_documented_config_file_documents_every_key_and_nothing_else() {
        let text = include_str!("../../../config/ferrocorn.toml");
        let entries = documented(text);
        let file: Vec<&str> = entries.iter().map(|(k, _)| k.as_str()).collect();
        let table: Vec<&str> = RawConfig::KEYS.iter().map(|k| k.name).collect();
        let mut sorted_file = file.clone();
        sorted_file.sort_unstable();
        let mut sorted_table = table.clone();
        sorted_table.sort_unstable();
        assert_eq!(
            sorted_file, sorted_table,
            "config/ferrocorn.toml documents {file:?}"
        );
        let differing: Vec<String> = entries
            .iter()
            .filter_map(|(key, block)| {
                let doc = RawConfig::KEYS
                    .iter()
                    .find(|k| k.name == key)
                    .map(|k| words(k.doc))
                    .unwrap_or_default();
                (!words(block).starts_with(&doc)).then(|| format!("{key}: {doc:?} vs {block:?}"))
            })
            .collect();
        assert!(
            differing.is_empty(),
            "each entry starts with its key's --help text:\n{}",
            differing.join("\n")
        );
        // And the file is a valid layer.
        toml::from_str::<RawConfig>(text).expect("config/ferrocorn.toml parses");
    }

    #[test]
    fn a_reload_keeps_the_running_restart_only_keys() {
        let running = RawConfig::defaults();
        let mut new = RawConfig {
            workers: Some(9),
            backlog: Some(10),
            bind: Some(vec!["127.0.0.1:1".into()]),
            ..RawConfig::defaults()
        };
        let kept = new.keep_restart_only(&running);
        assert_eq!(kept, ["bind", "backlog"]);
        assert_eq!(new.bind, running.bind);
        assert_eq!(new.backlog, running.backlog);
        assert_eq!(new.workers, Some(9), "other keys take their new value");
    }
}
