//! Command-line flags (Gunicorn's names where the concept is the same) and how they become the
//! top configuration layer.

use std::path::PathBuf;

use clap::Parser;
use ferrocorn_query_core::StorageMode;
use ferrocorn_worker::SandboxMode;

use crate::config::{ConfigError, Env, Origin, Origins, RawConfig};

/// ferrocorn: a pre-fork HTTP server for analytics over Parquet with DuckDB.
#[derive(Clone, Debug, Parser)]
#[command(name = "ferrocorn", version, about)]
pub struct Cli {
    /// Configuration file (TOML). Without the flag, config/ferrocorn.toml is read if it exists.
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Validate the configuration and exit: 0 when valid, 64 when not.
    #[arg(long)]
    pub check_config: bool,
    /// Print the effective configuration, with each value's origin, and exit.
    #[arg(long)]
    pub print_config: bool,

    /// Address to listen on (HOST:PORT, [IPV6]:PORT, unix:PATH); repeat for several.
    #[arg(short = 'b', long = "bind", value_name = "ADDRESS")]
    pub bind: Vec<String>,
    /// Number of worker processes.
    #[arg(short = 'w', long)]
    pub workers: Option<u64>,
    /// Most concurrent connections per worker.
    #[arg(long)]
    pub worker_connections: Option<u64>,
    /// Requests after which a worker is replaced (0 disables).
    #[arg(long)]
    pub max_requests: Option<u64>,
    /// Random extra requests (0..=N) added to max-requests per worker.
    #[arg(long)]
    pub max_requests_jitter: Option<u64>,
    /// Seconds without a heartbeat after which a worker is killed.
    #[arg(short = 't', long, value_name = "SECONDS")]
    pub timeout: Option<u64>,
    /// Seconds a stopping worker gets to finish its requests.
    #[arg(long, value_name = "SECONDS")]
    pub graceful_timeout: Option<u64>,
    /// Seconds an idle keep-alive connection is kept open (0 disables keep-alive).
    #[arg(long = "keep-alive", value_name = "SECONDS")]
    pub keepalive: Option<u64>,
    /// Listen backlog.
    #[arg(long)]
    pub backlog: Option<u64>,
    /// PID file.
    #[arg(short = 'p', long = "pid", value_name = "FILE")]
    pub pidfile: Option<PathBuf>,
    /// One SO_REUSEPORT listener per worker slot (true) or one shared listener (false).
    #[arg(long, value_name = "BOOL")]
    pub reuse_port: Option<bool>,
    /// Longest request line in bytes.
    #[arg(long)]
    pub limit_request_line: Option<u64>,
    /// Most header fields per request.
    #[arg(long)]
    pub limit_request_fields: Option<u64>,
    /// Longest header field in bytes.
    #[arg(long)]
    pub limit_request_field_size: Option<u64>,
    /// Directory of Parquet datasets.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Directory for the workers' DuckDB spill directories.
    #[arg(long, value_name = "DIR")]
    pub temp_dir: Option<PathBuf>,
    /// DuckDB memory for the whole pool, e.g. 2GB.
    #[arg(long, value_name = "SIZE")]
    pub duckdb_memory_limit: Option<String>,
    /// DuckDB threads per worker (0: cores / workers).
    #[arg(long)]
    pub duckdb_threads: Option<u64>,
    /// Rows a query result may have (more is cut and flagged truncated).
    #[arg(long)]
    pub max_result_rows: Option<u64>,
    /// Largest request body, e.g. 1MiB.
    #[arg(long, value_name = "SIZE")]
    pub max_body_size: Option<String>,
    /// Longest a query may run, in milliseconds.
    #[arg(long, value_name = "MS")]
    pub query_timeout_ms: Option<u64>,
    /// Queries one worker runs at once (0: its DuckDB threads).
    #[arg(long)]
    pub max_concurrent_queries: Option<u64>,
    /// Queries that may wait for a slot in one worker.
    #[arg(long)]
    pub query_queue_depth: Option<u64>,
    /// Longest wait for a query slot, in milliseconds.
    #[arg(long, value_name = "MS")]
    pub query_queue_timeout_ms: Option<u64>,
    /// Disk DuckDB may spill to for the whole pool, e.g. 20GB.
    #[arg(long, value_name = "SIZE")]
    pub duckdb_max_temp_size: Option<String>,
    /// Directory for snapshots and the result cache (kept across restarts).
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// How datasets are served: auto, snapshot or parquet.
    #[arg(long, value_name = "MODE")]
    pub storage: Option<StorageMode>,
    /// The kernel's sandbox for workers: auto or required.
    #[arg(long, value_name = "MODE")]
    pub sandbox: Option<SandboxMode>,
    /// Keep query results in cache_dir, shared by all workers.
    #[arg(long, value_name = "BOOL")]
    pub result_cache: Option<bool>,
    /// Most bytes the result cache keeps, e.g. 256MiB.
    #[arg(long, value_name = "SIZE")]
    pub result_cache_size: Option<String>,
    /// Log level: debug, info, warning, error.
    #[arg(long = "log-level", value_name = "LEVEL")]
    pub loglevel: Option<String>,
    /// Error log file ("-" for standard error).
    #[arg(long = "error-logfile", value_name = "FILE")]
    pub errorlog: Option<String>,
    /// Access log file ("-" for standard output); off unless given.
    #[arg(long = "access-logfile", value_name = "FILE")]
    pub accesslog: Option<String>,
}

/// The default configuration file, read when it exists and `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "config/ferrocorn.toml";

impl Cli {
    /// The flags as configuration layers, one per flag given, each with its flag as origin.
    fn layers(&self) -> Vec<(RawConfig, Origin)> {
        let mut layers = Vec::new();
        macro_rules! flag {
            ($field:ident, $flag:literal) => {
                if let Some(value) = self.$field.clone() {
                    layers.push((
                        RawConfig {
                            $field: Some(value),
                            ..RawConfig::default()
                        },
                        Origin::Flag($flag),
                    ));
                }
            };
        }
        if !self.bind.is_empty() {
            layers.push((
                RawConfig {
                    bind: Some(self.bind.clone()),
                    ..RawConfig::default()
                },
                Origin::Flag("--bind"),
            ));
        }
        flag!(workers, "--workers");
        flag!(worker_connections, "--worker-connections");
        flag!(max_requests, "--max-requests");
        flag!(max_requests_jitter, "--max-requests-jitter");
        flag!(timeout, "--timeout");
        flag!(graceful_timeout, "--graceful-timeout");
        flag!(keepalive, "--keep-alive");
        flag!(backlog, "--backlog");
        flag!(pidfile, "--pid");
        flag!(reuse_port, "--reuse-port");
        flag!(limit_request_line, "--limit-request-line");
        flag!(limit_request_fields, "--limit-request-fields");
        flag!(limit_request_field_size, "--limit-request-field-size");
        flag!(data_dir, "--data-dir");
        flag!(temp_dir, "--temp-dir");
        flag!(duckdb_memory_limit, "--duckdb-memory-limit");
        flag!(duckdb_threads, "--duckdb-threads");
        flag!(max_result_rows, "--max-result-rows");
        flag!(max_body_size, "--max-body-size");
        flag!(query_timeout_ms, "--query-timeout-ms");
        flag!(max_concurrent_queries, "--max-concurrent-queries");
        flag!(query_queue_depth, "--query-queue-depth");
        flag!(query_queue_timeout_ms, "--query-queue-timeout-ms");
        flag!(duckdb_max_temp_size, "--duckdb-max-temp-size");
        flag!(cache_dir, "--cache-dir");
        flag!(storage, "--storage");
        flag!(sandbox, "--sandbox");
        flag!(result_cache, "--result-cache");
        flag!(result_cache_size, "--result-cache-size");
        flag!(loglevel, "--log-level");
        flag!(errorlog, "--error-logfile");
        flag!(accesslog, "--access-logfile");
        layers
    }

    /// Assemble every layer: defaults < file < environment < flags. Called at start and on HUP.
    pub fn load(&self, env: &dyn Env) -> Result<(RawConfig, Origins), ConfigError> {
        let mut raw = RawConfig::defaults();
        let mut origins = Origins::default();
        let file = match &self.config {
            Some(path) => Some(path.clone()),
            None => Some(PathBuf::from(DEFAULT_CONFIG_PATH)).filter(|p| p.exists()),
        };
        if let Some(path) = file {
            let layer = RawConfig::from_file(&path)?;
            raw.overlay(layer, &Origin::File(path), &mut origins);
        }
        for (layer, origin) in RawConfig::from_env(env)? {
            raw.overlay(layer, &origin, &mut origins);
        }
        for (layer, origin) in self.layers() {
            raw.overlay(layer, &origin, &mut origins);
        }
        Ok((raw, origins))
    }
}
