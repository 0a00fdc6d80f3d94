//! ferrocorn's worker process: the HTTP server that runs in each forked child.
//!
//! The master forks a worker per slot and calls [`run`] in the child. Everything that is not
//! fork-safe (the tokio runtime, DuckDB, thread pools) is created here, after the fork.
//!
//! # Layout
//!
//! - [`settings`]: what the supervisor passes down ([`WorkerSettings`], [`WorkerArgs`]).
//! - [`sandbox`]: the worker's Landlock rules, applied right after the fork, and their proof.
//! - [`server`]: the lifecycle (booting → ready → draining → exited), the accept loop with its
//!   connection cap, per-connection hyper settings (keep-alive, header timeout, limits), drain.
//! - [`access_log`]: one combined-format line per request, reopened on SIGUSR1.
//! - [`logfile`]: append-only log files reopened on SIGUSR1 (error and access logs).
//! - [`http`]: the router, the front-line middleware (request ids, request line and header
//!   limits, request counting, `Connection: close` while draining) and the endpoints.
//! - [`query`]: `/v1/query`: parsing, format negotiation, admission control, deadlines,
//!   cancellation and streaming.
//! - [`openapi`]: the API contract (`/openapi.json`), generated from the routes and types.
//! - [`problem`]: the API's error type and its mapping to `application/problem+json`.
//!
//! # Signals (inside a worker)
//!
//! | signal | meaning |
//! | --- | --- |
//! | TERM | drain: stop accepting, answer what is in flight with `Connection: close`, exit 0 |
//! | INT, QUIT | exit at once |
//! | USR1 | reopen the error and access logs |

pub mod access_log;
pub mod http;
pub mod logfile;
pub mod metrics;
pub mod openapi;
pub mod problem;
pub mod query;
pub mod result_cache;
pub mod sandbox;
pub mod server;
pub mod settings;

pub use server::{EXIT_BOOT_FAILED, WorkerPhase, run, sandbox_probe};
pub use settings::{Listener, WorkerArgs, WorkerSettings};
