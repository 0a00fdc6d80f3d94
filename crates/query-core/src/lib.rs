//! ferrocorn's query core: everything that touches DuckDB.
//!
//! It knows nothing of HTTP or processes, so it can be tested and benchmarked alone. Each worker
//! process opens exactly one [`Engine`] after it has been forked.
//!
//! # Layout
//!
//! - [`engine`]: opening a sandboxed in-memory DuckDB instance ([`Engine::open`]) with the
//!   worker's share of memory and threads, and proving the sandbox holds before it is used.
//! - [`gate`]: which statements a request may run, decided from DuckDB's own parse (one
//!   statement, a query, reading only datasets, calling no function with side effects).
//! - `capi`: DuckDB's C API where duckdb-rs has no safe equivalent (statement extraction,
//!   prepared statements, Arrow results): the crate's only `unsafe`.
//! - `pool`: the query connections and their prepared statements.
//! - [`query`]: parameters, running a query into a [`ResultSink`], classifying DuckDB's errors.
//! - [`encode`]: the result formats (JSON, NDJSON, CSV, Arrow IPC stream, Parquet).
//! - [`snapshot`]: datasets loaded once into DuckDB files that every worker attaches read-only.
//! - [`catalog`]: the datasets of the data directory (`NAME.parquet` files and `NAME/` folders of
//!   Parquet files) registered as views.
//! - [`warm`]: what a worker loads before it serves (sort-key indexes, first blocks, configured
//!   warm-up queries).
//! - [`error`]: the crate's [`Error`] type, with the path or dataset it concerns.
//!
//! # Example
//!
//! ```no_run
//! use ferrocorn_query_core::{Engine, EngineSettings};
//!
//! let settings = EngineSettings {
//!     data_dir: "data".into(),
//!     temp_dir: "/tmp/ferrocorn-worker-0".into(),
//!     memory_limit_bytes: 512 << 20,
//!     threads: 1,
//!     ..EngineSettings::default()
//! };
//! let engine = Engine::open(&settings)?;
//! engine.ping()?;
//! # Ok::<(), ferrocorn_query_core::Error>(())
//! ```

mod builder;
mod capi;
pub mod catalog;
pub mod encode;
pub mod engine;
pub mod error;
pub mod gate;
mod pool;
pub mod query;
mod run;
mod serving;
pub mod snapshot;
mod sync;
#[cfg(test)]
mod testing;
pub mod warm;

pub use arrow;
pub use catalog::Dataset;
pub use catalog::{Column, DatasetInfo, Storage};
pub use encode::{EncodeError, Encoder, Format, Summary};
pub use engine::{Engine, EngineSettings, Instance};
pub use error::Error;
pub use gate::{Analysis, Refusal};
pub use query::{
    Explain, Flow, InterruptHandle, Outcome, ParamError, ParamValue, Params, QueryError, QuerySpec,
    ResultSink,
};
pub use run::{ChunkSink, Encoded};
pub use snapshot::{DatasetOptions, StorageMode, StorageSettings};
pub use warm::Warmed;
