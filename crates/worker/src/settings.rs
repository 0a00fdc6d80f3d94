//! What the supervisor hands a worker at fork time: every setting the worker's modules read (a
//! leaf module: it imports none of them).

use std::fmt;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::time::Duration;

use ferrocorn_query_core::EngineSettings;
use ferrocorn_scoreboard::{Scoreboard, WorkerRecord};

/// The worker's HTTP settings, resolved by the supervisor from the configuration.
#[derive(Clone, Debug)]
pub struct WorkerSettings {
    /// Most concurrent connections this worker serves (`worker_connections`).
    pub worker_connections: usize,
    /// How long an idle keep-alive connection stays open, and how long a client has to send a
    /// request's headers (`keepalive`); zero turns keep-alive off.
    pub keepalive: Duration,
    /// How long a draining worker waits for its connections before it exits (`graceful_timeout`).
    pub graceful_timeout: Duration,
    /// How often the event loop writes its heartbeat.
    pub heartbeat_interval: Duration,
    /// Requests after which the worker asks to be replaced (`max_requests` + this worker's
    /// jitter); `None` for no budget.
    pub request_budget: Option<u64>,
    /// Longest request line, in bytes (`limit_request_line`); longer is 414.
    pub limit_request_line: usize,
    /// Most header fields (`limit_request_fields`); more is 431.
    pub limit_request_fields: usize,
    /// Longest header field, name and value, in bytes (`limit_request_field_size`); longer is 431.
    pub limit_request_field_size: usize,
    /// Query limits and admission control.
    pub query: QuerySettings,
    /// Where to write one line per request (`accesslog`); `None` for nowhere.
    pub accesslog: Option<AccessLogTarget>,
    pub log_format: LogFormat,
    /// Gunicorn's `access_log_format`, if set (validated by the supervisor; see
    /// `AccessFormat`).
    pub access_log_format: Option<String>,
    /// The pool's result cache (`result_cache`); `None` when it is off.
    pub result_cache: Option<ResultCacheSettings>,
    /// Whether the kernel's sandbox is required (`sandbox`).
    pub sandbox: SandboxMode,
    /// The log files this worker writes or reopens (the error log and the access log): their
    /// directories stay writable inside the sandbox.
    pub log_files: Vec<PathBuf>,
    /// Accounts, tokens and whether requests must carry one.
    pub auth: AuthSettings,
    /// Origins a browser may call the API from (`cors_origins`): exact origins, or `*`.
    pub cors_origins: Vec<String>,
    /// What `/metrics` reports the pool against: its memory budget and the CPUs it has.
    pub pool_memory_budget: u64,
    pub pool_cpus: u32,
}

/// Accounts and tokens (`environment`, `secret_key`, `users_file`, …), resolved by the supervisor.
#[derive(Clone, Default)]
pub struct AuthSettings {
    /// `ENVIRONMENT=production`: every endpoint but the probes needs a token or an API key.
    pub required: bool,
    /// The key tokens are signed with (`secret_key`); no tokens are issued without one.
    pub secret_key: Option<String>,
    /// The key before a rotation (`secret_key_previous`): its tokens are still accepted.
    pub previous_key: Option<String>,
    /// The users file (`users_file`): accounts with password hashes, API keys, scopes.
    pub users_file: Option<PathBuf>,
    /// How long an issued token is valid (`token_ttl`).
    pub token_ttl: Duration,
    /// Requests per minute of one user or API key on the API (`rate_limit_per_minute`; `None`:
    /// unlimited).
    pub per_user_per_minute: Option<u32>,
    /// Logins per minute from one client address (`rate_limit_auth_per_minute`).
    pub auth_per_address_per_minute: Option<u32>,
    /// Peers whose `X-Forwarded-For` names the client (`forwarded_allow_ips`).
    pub forwarded_allow: ForwardedAllow,
    /// `/metrics` needs no credential (`metrics_public`).
    pub metrics_public: bool,
}

/// The peers trusted to say who the client is (Gunicorn's `forwarded_allow_ips`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ForwardedAllow {
    /// No peer: the client is always the socket's peer.
    #[default]
    Nobody,
    /// These addresses.
    Addresses(Vec<std::net::IpAddr>),
    /// `*`: every peer (only behind a proxy that always sets the header).
    Everyone,
}

impl ForwardedAllow {
    pub fn trusts(&self, peer: std::net::IpAddr) -> bool {
        match self {
            Self::Nobody => false,
            Self::Everyone => true,
            Self::Addresses(list) => list.contains(&peer.to_canonical()),
        }
    }
}

impl fmt::Debug for AuthSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The keys are secrets: never in a log line or a panic message.
        f.debug_struct("AuthSettings")
            .field("required", &self.required)
            .field("secret_key", &self.secret_key.as_ref().map(|_| "<set>"))
            .field("previous_key", &self.previous_key.as_ref().map(|_| "<set>"))
            .field("users_file", &self.users_file)
            .field("token_ttl", &self.token_ttl)
            .field("per_user_per_minute", &self.per_user_per_minute)
            .field(
                "auth_per_address_per_minute",
                &self.auth_per_address_per_minute,
            )
            .field("forwarded_allow", &self.forwarded_allow)
            .field("metrics_public", &self.metrics_public)
            .finish()
    }
}

impl WorkerSettings {
    /// How long a client has to send a request's body once its headers are in: the header
    /// deadline (`keepalive`, or 5 s when keep-alive is off), so a slow body cannot hold a
    /// handler (and a query slot) longer than slow headers could hold the connection.
    pub fn body_deadline(&self) -> Duration {
        if self.keepalive.is_zero() {
            Duration::from_secs(5)
        } else {
            self.keepalive
        }
    }
}

/// A listening socket inherited from the master.
pub enum Listener {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
}

impl fmt::Debug for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(l) => write!(f, "Tcp({:?})", l.local_addr().ok()),
            Self::Unix(l) => write!(f, "Unix({:?})", l.local_addr().ok()),
        }
    }
}

/// Everything a freshly forked worker needs.
pub struct WorkerArgs {
    /// The slot this worker serves.
    pub slot: usize,
    /// The slot's listeners (one per bind address).
    pub listeners: Vec<Listener>,
    /// This worker's record in the shared scoreboard.
    pub record: &'static WorkerRecord,
    /// The whole shared region: the pool's counters, every worker's record (for `/metrics`).
    pub scoreboard: &'static Scoreboard,
    /// Write end of the master's wake-up pipe: one byte after each state change the master must
    /// act on (ready, retirement request).
    pub notify: OwnedFd,
    pub settings: WorkerSettings,
    pub engine: EngineSettings,
    /// Called on SIGUSR1 to reopen the log files.
    pub reopen_logs: fn(),
}

impl fmt::Debug for WorkerArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerArgs")
            .field("slot", &self.slot)
            .field("listeners", &self.listeners)
            .field("settings", &self.settings)
            .field("engine", &self.engine)
            .finish_non_exhaustive()
    }
}

/// The worker's query limits, resolved by the supervisor.
#[derive(Clone, Debug)]
pub struct QuerySettings {
    /// Rows a result may have; more is cut and flagged `truncated`.
    pub max_result_rows: u64,
    /// Largest request body in bytes; larger is 413.
    pub max_body_bytes: usize,
    /// Longest a query may run; `timeout_ms` can only ask for less. Also the default.
    pub max_query_time: Duration,
    /// Queries run at once by one worker.
    pub max_concurrent_queries: usize,
    /// Queries that may wait for a slot; more are answered 503 at once.
    pub queue_depth: usize,
    /// Longest wait for a slot before 503, when the operator bounds it; `None` waits as long as
    /// the query's deadline allows (the admission policy).
    pub queue_timeout: Option<Duration>,
    /// The pool's slots (`workers × max_concurrent_queries`) when a worker may borrow the ones
    /// other workers leave idle (`share_query_slots`); `None` when each keeps to its own.
    pub pool_slots: Option<usize>,
}

/// Where access lines go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AccessLogTarget {
    Stdout,
    File(PathBuf),
}

/// How log records are written (`log_format`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Lines for people: the combined log format for access lines, `key=value` fields for the
    /// error log.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// What the cache is given.
#[derive(Clone, Debug)]
pub struct ResultCacheSettings {
    /// The directory (created if missing).
    pub dir: PathBuf,
    /// Most bytes all entries together may take.
    pub max_bytes: u64,
    /// Results computed faster than this stay in the worker's memory, not on disk
    /// (`result_cache_min_ms`).
    pub disk_worthy: Duration,
}

/// Whether a worker may serve without the kernel's wall.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxMode {
    /// Landlock where the kernel has it; DuckDB's own sandbox alone (with a warning) elsewhere.
    #[default]
    Auto,
    /// A worker whose kernel cannot enforce Landlock fails to boot.
    Required,
}

impl std::str::FromStr for SandboxMode {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "required" => Ok(Self::Required),
            _ => Err(format!("{text:?} is not one of auto, required")),
        }
    }
}
