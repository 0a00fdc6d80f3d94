//! The whole region and the one mapping that creates it.

use std::io;
use std::num::NonZeroUsize;

use nix::sys::mman::{MapFlags, ProtFlags, mmap_anonymous};

use std::sync::atomic::{AtomicU32, Ordering};

use crate::counters::PoolCounters;
use crate::histogram::{Histogram, RequestTable};
use crate::limits::LimitTable;
use crate::record::{RecordState, WorkerRecord};
use crate::shared::{Shared, shared_struct};

/// How many worker records the region holds: two per slot (a worker and its successor) for the
/// largest pool the configuration accepts.
pub const MAX_RECORDS: usize = 2 * MAX_WORKERS;

/// The largest pool size the configuration accepts.
pub const MAX_WORKERS: usize = 128;

shared_struct! {
    /// The whole shared region.
    #[derive(Debug)]
    pub struct Scoreboard {
        records: [WorkerRecord; MAX_RECORDS],
        pool: PoolCounters,
        /// Responses by route, method and status, with durations.
        requests: RequestTable,
        /// Query time waiting for a slot, in DuckDB, and encoding.
        query_queue: Histogram,
        query_execution: Histogram,
        query_encoding: Histogram,
        /// Connections waiting in each slot's accept queue, as the master last sampled them.
        accept_queue: [AtomicU32; MAX_WORKERS],
        /// Per user (or API key): `rate_limit_per_minute`.
        user_limits: LimitTable,
        /// Per client address: `rate_limit_auth_per_minute` on the login.
        address_limits: LimitTable,
    }
}

impl Scoreboard {
    /// Map the region: zeroed, shared with every process forked afterwards, never unmapped. The
    /// master calls it once, before its first fork.
    pub fn map() -> io::Result<&'static Self> {
        map_zeroed::<Self>()
    }

    pub fn pool(&self) -> &PoolCounters {
        &self.pool
    }

    pub fn requests(&self) -> &RequestTable {
        &self.requests
    }

    /// The query histograms: waiting for a slot, executing, encoding.
    pub fn query_histograms(&self) -> [&Histogram; 3] {
        [
            &self.query_queue,
            &self.query_execution,
            &self.query_encoding,
        ]
    }

    /// Record the accept-queue length of `slot` (master).
    pub fn set_accept_queue(&self, slot: usize, queued: u32) {
        if let Some(cell) = self.accept_queue.get(slot) {
            cell.store(queued, Ordering::Relaxed);
        }
    }

    pub fn accept_queue(&self, slot: usize) -> u32 {
        self.accept_queue
            .get(slot)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// The per-user rate limits of the whole pool.
    pub fn user_limits(&self) -> &LimitTable {
        &self.user_limits
    }

    /// The per-address rate limits of the whole pool.
    pub fn address_limits(&self) -> &LimitTable {
        &self.address_limits
    }

    pub fn record(&self, index: usize) -> Option<&WorkerRecord> {
        self.records.get(index)
    }

    pub fn records(&self) -> &[WorkerRecord] {
        &self.records
    }

    /// The records of live workers: booting, ready or draining.
    pub fn live_records(&self) -> impl Iterator<Item = &WorkerRecord> {
        self.records.iter().filter(|r| {
            matches!(
                r.state(),
                RecordState::Booting | RecordState::Ready | RecordState::Draining
            )
        })
    }

    /// Queries running in the whole pool: the sum of the workers' counts.
    pub fn running_queries(&self) -> u32 {
        self.records.iter().map(WorkerRecord::running).sum()
    }
}

/// An anonymous shared mapping of one zeroed `T`, never unmapped.
#[allow(unsafe_code)]
fn map_zeroed<T: Shared>() -> io::Result<&'static T> {
    let len = NonZeroUsize::new(std::mem::size_of::<T>())
        .ok_or_else(|| io::Error::other("empty shared region"))?;
    // SAFETY: an anonymous mapping at an address of the kernel's choosing cannot alias any
    // existing Rust object.
    let ptr = unsafe {
        mmap_anonymous(
            None,
            len,
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            MapFlags::MAP_SHARED,
        )
    }
    .map_err(io::Error::from)?;
    // SAFETY: the mapping is page-aligned (more than `T`'s alignment), `size_of::<T>()` bytes
    // long and zero-filled by the kernel, and `T: Shared` — `repr(C)` and made only of atomics,
    // checked by the compiler (see `crate::shared`) — so all-zero bytes are a valid `T` and
    // processes may access it concurrently. It is never unmapped, so `'static` holds.
    Ok(unsafe { &*ptr.as_ptr().cast::<T>() })
}
