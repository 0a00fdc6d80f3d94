//! ferrocorn's scoreboard: the memory the master and its workers share.
//!
//! The master maps one anonymous shared region ([`Scoreboard::map`]) before it forks anything;
//! every worker inherits it. The region is made only of atomics — a fixed array of
//! [`WorkerRecord`]s and the pool's [`PoolCounters`] — so both sides read and write it without
//! locks, and the one `unsafe` operation, the mapping, relies on a property the compiler checks
//! ([`Shared`]). A record belongs to one worker process from its fork to its reaping; the master
//! hands out free records and clears them.
//!
//! What flows through it:
//! - worker → master: lifecycle state ([`RecordState`]), heartbeat, request count, the request
//!   being served, a retirement request when the request budget is spent, a boot error message;
//! - master → worker: nothing but the record's reset at fork time (commands travel as signals);
//! - worker → every worker: the pool's counters behind `/metrics`, and the rate limits' tables.
//!
//! # Layout
//!
//! - `shared`: the [`Shared`] property and the macro that declares shared structs.
//! - `record`: [`WorkerRecord`] and the monotonic clock its heartbeats use.
//! - `counters`: [`PoolCounters`] and the [`ExitCause`]s they count.
//! - `histogram`: latency [`Histogram`]s and the [`RequestTable`] by route, method and status.
//! - `limits`: the pool's rate-limit tables ([`LimitTable`], a GCRA per key).
//! - `region`: [`Scoreboard`], the whole region, and its mapping.

mod counters;
mod histogram;
mod limits;
mod record;
mod region;
mod shared;

pub use counters::{ExitCause, PoolCounters};
pub use histogram::{BUCKETS_SECONDS, Histogram, METHODS, ROUTES, RequestTable, STATUSES};
pub use limits::{LIMIT_SLOTS, LimitTable, Rate, Verdict};
pub use record::{AtomicText, RecordState, WorkerRecord, monotonic_ms};
pub use region::{MAX_RECORDS, MAX_WORKERS, Scoreboard};
pub use shared::Shared;
