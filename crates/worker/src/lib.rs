//! ferrocorn's worker process: the HTTP server that runs in each forked child.
//!
//! The master forks a worker per slot and calls [`run`] in the child. Everything that is not
//! fork-safe (the tokio runtime, DuckDB, thread pools) is created here, after the fork.
//!
//! # Layout
//!
//! The modules form a tree: each imports only modules above it in this list.
//!
//! - `settings`: what the supervisor passes down ([`WorkerSettings`], [`WorkerArgs`]) and every
//!   setting the other modules read.
//! - `auth`: the users file, API keys and signed bearer tokens: who a request comes from and
//!   what it may do.
//! - `logfile`: append-only log files reopened on SIGUSR1 (error and access logs).
//! - `access_log`: one combined-format line per request.
//! - `sandbox`: the worker's Landlock rules, applied right after the fork, and their proof.
//! - `result_cache`: encoded results on disk, shared by the pool, and each worker's hot entries.
//! - `admission`: how many queries run and wait at once.
//! - `request_id`: the id of the request being handled, and new ones.
//! - `problem`: the API's error type and its one mapping to status and `application/problem+json`.
//! - `api`: the API's request and response bodies, with their OpenAPI schemas.
//! - `openapi`: the contract's fixed parts (`/openapi.json` adds the routes).
//! - `negotiate`: which result format a request gets.
//! - `caching`: result keys, `ETag`s and the result cache's headers.
//! - `stream`: a query on the blocking pool, its bytes moved to the response.
//! - `state`: what every request of one worker shares, and the catalogue refresh.
//! - `login`: `POST /v1/auth/token`, and the front line's check of every other request's
//!   credential, also written into the contract (who needs one, what the check answers).
//! - `query`: `/v1/query`, from the request to the answer.
//! - `tally`: the end of a response: the pool's request table and the access line, written
//!   when its last byte is sent.
//! - `metrics`: `/metrics` for the whole pool.
//! - `status`: `/server-status`, the workers as the scoreboard shows them.
//! - `http`: the router, the front-line middleware and the other endpoints.
//! - `server`: the lifecycle (booting → ready → draining → exited), the accept loop with its
//!   connection cap, per-connection hyper settings (keep-alive, header timeout, limits), drain.
//!
//! # Signals (inside a worker)
//!
//! | signal | meaning |
//! | --- | --- |
//! | TERM | drain: stop accepting, answer what is in flight with `Connection: close`, exit 0 |
//! | INT, QUIT | exit at once |
//! | USR1 | reopen the error and access logs |

mod access_log;
mod admission;
mod api;
mod auth;
mod caching;
mod compress;
mod http;
mod logfile;
mod login;
mod metrics;
mod negotiate;
mod openapi;
mod problem;
mod query;
mod request_id;
mod result_cache;
mod sandbox;
mod server;
mod settings;
mod state;
pub mod status;
mod stream;
mod tally;

pub use access_log::AccessFormat;
pub use auth::{Scope, check_users_file, hash_password, key_digest};
pub use logfile::LogFile;
pub use server::{EXIT_BOOT_FAILED, run, sandbox_probe};
pub use settings::{
    AccessLogTarget, AuthSettings, ForwardedAllow, Listener, LogFormat, QuerySettings,
    ResultCacheSettings, SandboxMode, WorkerArgs, WorkerSettings,
};
