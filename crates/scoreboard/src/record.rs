//! A worker's record: its lifecycle state, heartbeat, counts, the request it serves, its boot
//! error.

use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering};

use crate::shared::shared_struct;

/// The lifecycle state a worker publishes in its record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum RecordState {
    /// Unused record.
    Free = 0,
    /// Forked; building its runtime, opening DuckDB, registering datasets.
    Booting = 1,
    /// DuckDB answers, the sandbox is locked and the listeners accept.
    Ready = 2,
    /// Told to stop: no longer accepting, finishing what it has.
    Draining = 3,
    /// Boot failed; the reason is in the record's message.
    BootFailed = 4,
}

impl RecordState {
    /// Its name, as `/server-status`, `ferrocorn status` and `/metrics` show it.
    pub fn label(self) -> &'static str {
        match self {
            Self::Free => "free",
            Self::Booting => "booting",
            Self::Ready => "ready",
            Self::Draining => "draining",
            Self::BootFailed => "boot_failed",
        }
    }

    fn from_u32(value: u32) -> Self {
        match value {
            1 => Self::Booting,
            2 => Self::Ready,
            3 => Self::Draining,
            4 => Self::BootFailed,
            _ => Self::Free,
        }
    }
}

shared_struct! {
    /// Fixed-size text written and read through atomics; a torn read is possible and harmless
    /// because the text is only diagnostic (the request a hung worker was serving, a boot error).
    #[derive(Debug)]
    pub struct AtomicText<const WORDS: usize> {
        len: AtomicU32,
        words: [AtomicU64; WORDS],
    }
}

impl<const WORDS: usize> AtomicText<WORDS> {
    /// Store `text`, cut to the capacity on a character boundary.
    pub fn store(&self, text: &str) {
        self.store_parts(&[text]);
    }

    /// Store the concatenation of `parts` (without building it), cut to the capacity on a
    /// character boundary.
    pub fn store_parts(&self, parts: &[&str]) {
        let capacity = WORDS * 8;
        let mut buf = [0u8; 8];
        let (mut len, mut word) = (0usize, 0usize);
        'parts: for part in parts {
            for (i, c) in part.char_indices() {
                let size = c.len_utf8();
                if len + size > capacity {
                    break 'parts;
                }
                for &b in &part.as_bytes()[i..i + size] {
                    buf[len % 8] = b;
                    len += 1;
                    if len % 8 == 0 {
                        self.words[word].store(u64::from_le_bytes(buf), Ordering::Relaxed);
                        word += 1;
                        buf = [0u8; 8];
                    }
                }
            }
        }
        if len % 8 != 0 {
            self.words[word].store(u64::from_le_bytes(buf), Ordering::Relaxed);
        }
        // `len` is at most WORDS * 8, far below u32::MAX.
        self.len.store(len as u32, Ordering::Release);
    }

    /// Read the text back (lossy if a concurrent store tore it).
    pub fn load(&self) -> String {
        let len = (self.len.load(Ordering::Acquire) as usize).min(WORDS * 8);
        let mut bytes = Vec::with_capacity(len);
        for word in &self.words {
            bytes.extend_from_slice(&word.load(Ordering::Relaxed).to_le_bytes());
            if bytes.len() >= len {
                break;
            }
        }
        bytes.truncate(len);
        String::from_utf8_lossy(&bytes).into_owned()
    }

    fn clear(&self) {
        self.len.store(0, Ordering::Release);
    }
}

shared_struct! {
    /// One worker's shared record.
    #[derive(Debug)]
    pub struct WorkerRecord {
        pid: AtomicI32,
        state: AtomicU32,
        retire_requested: AtomicU32,
        in_flight: AtomicU32,
        /// Queries holding a slot (see [`crate::Scoreboard::running_queries`]).
        running: AtomicU32,
        heartbeat_ms: AtomicU64,
        requests: AtomicU64,
        current_request: AtomicText<16>,
        /// When the request in `current_request` started (monotonic milliseconds).
        current_since_ms: AtomicU64,
        message: AtomicText<32>,
        /// Set by the master at the fork: the slot, the configuration generation, the moment.
        slot: AtomicU32,
        generation: AtomicU64,
        started_ms: AtomicU64,
        /// Sampled by the master from `/proc`: resident memory and CPU time.
        rss_bytes: AtomicU64,
        cpu_ms: AtomicU64,
        /// Published by the worker: open connections, DuckDB's memory in use.
        connections: AtomicU32,
        duckdb_bytes: AtomicU64,
    }
}

impl WorkerRecord {
    /// Prepare the record for a freshly forked worker of `slot` and `generation` (called by the
    /// master before the fork).
    pub fn reset(&self, now_ms: u64, slot: usize, generation: u64) {
        self.slot.store(slot as u32, Ordering::Relaxed);
        self.generation.store(generation, Ordering::Relaxed);
        self.started_ms.store(now_ms, Ordering::Relaxed);
        self.rss_bytes.store(0, Ordering::Relaxed);
        self.cpu_ms.store(0, Ordering::Relaxed);
        self.connections.store(0, Ordering::Relaxed);
        self.duckdb_bytes.store(0, Ordering::Relaxed);
        self.current_since_ms.store(0, Ordering::Relaxed);
        self.pid.store(0, Ordering::Relaxed);
        self.retire_requested.store(0, Ordering::Relaxed);
        self.in_flight.store(0, Ordering::Relaxed);
        self.running.store(0, Ordering::Relaxed);
        self.requests.store(0, Ordering::Relaxed);
        self.current_request.clear();
        self.message.clear();
        self.heartbeat_ms.store(now_ms, Ordering::Relaxed);
        self.state
            .store(RecordState::Booting as u32, Ordering::Release);
    }

    /// Mark the record unused (master, after reaping its worker): the slots a dead worker held
    /// are no longer counted.
    pub fn free(&self) {
        self.running.store(0, Ordering::Release);
        self.state
            .store(RecordState::Free as u32, Ordering::Release);
    }

    pub fn state(&self) -> RecordState {
        RecordState::from_u32(self.state.load(Ordering::Acquire))
    }

    pub fn set_state(&self, state: RecordState) {
        self.state.store(state as u32, Ordering::Release);
    }

    pub fn set_pid(&self, pid: i32) {
        self.pid.store(pid, Ordering::Relaxed);
    }

    pub fn pid(&self) -> i32 {
        self.pid.load(Ordering::Relaxed)
    }

    /// Record that the worker's event loop is alive at `now_ms` (monotonic milliseconds).
    pub fn beat(&self, now_ms: u64) {
        self.heartbeat_ms.store(now_ms, Ordering::Relaxed);
    }

    pub fn last_heartbeat_ms(&self) -> u64 {
        self.heartbeat_ms.load(Ordering::Relaxed)
    }

    /// Count a request that starts (its method and target); returns how many this worker has
    /// now started.
    pub fn request_started(&self, method: &str, target: &str) -> u64 {
        self.current_request.store_parts(&[method, " ", target]);
        self.current_since_ms
            .store(monotonic_ms(), Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub fn request_finished(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// A query takes a slot; returns how many this worker runs now.
    pub fn query_started(&self) -> u32 {
        self.running.fetch_add(1, Ordering::AcqRel) + 1
    }

    pub fn query_finished(&self) {
        self.running.fetch_sub(1, Ordering::AcqRel);
    }

    /// Queries this worker runs now.
    pub fn running(&self) -> u32 {
        self.running.load(Ordering::Acquire)
    }

    /// The request line the worker started last.
    pub fn current_request(&self) -> String {
        self.current_request.load()
    }

    /// When the request [`Self::current_request`] names started (monotonic milliseconds).
    pub fn current_since_ms(&self) -> u64 {
        self.current_since_ms.load(Ordering::Relaxed)
    }

    pub fn slot(&self) -> usize {
        self.slot.load(Ordering::Relaxed) as usize
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// When the master forked the worker (monotonic milliseconds).
    pub fn started_ms(&self) -> u64 {
        self.started_ms.load(Ordering::Relaxed)
    }

    /// The master's last sample of the worker's resident memory and CPU time.
    pub fn set_usage(&self, rss_bytes: u64, cpu_ms: u64) {
        self.rss_bytes.store(rss_bytes, Ordering::Relaxed);
        self.cpu_ms.store(cpu_ms, Ordering::Relaxed);
    }

    pub fn rss_bytes(&self) -> u64 {
        self.rss_bytes.load(Ordering::Relaxed)
    }

    pub fn cpu_ms(&self) -> u64 {
        self.cpu_ms.load(Ordering::Relaxed)
    }

    pub fn connection_opened(&self) {
        self.connections.fetch_add(1, Ordering::AcqRel);
    }

    /// One connection fewer; returns how many are left (the worker's drain waits for none).
    pub fn connection_closed(&self) -> u32 {
        self.connections
            .fetch_sub(1, Ordering::AcqRel)
            .saturating_sub(1)
    }

    pub fn connections(&self) -> u32 {
        self.connections.load(Ordering::Acquire)
    }

    /// The worker's DuckDB memory in use, as it last measured it.
    pub fn set_duckdb_bytes(&self, bytes: u64) {
        self.duckdb_bytes.store(bytes, Ordering::Relaxed);
    }

    pub fn duckdb_bytes(&self) -> u64 {
        self.duckdb_bytes.load(Ordering::Relaxed)
    }

    /// Ask the master for a successor (the request budget is spent). Returns true the first time.
    pub fn request_retirement(&self) -> bool {
        self.retire_requested.swap(1, Ordering::AcqRel) == 0
    }

    pub fn retirement_requested(&self) -> bool {
        self.retire_requested.load(Ordering::Acquire) != 0
    }

    pub fn set_message(&self, message: &str) {
        self.message.store(message);
    }

    pub fn message(&self) -> String {
        self.message.load()
    }
}

/// Milliseconds on the system-wide monotonic clock, comparable between processes.
pub fn monotonic_ms() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(ts) => (ts.tv_sec() as u64) * 1000 + (ts.tv_nsec() as u64) / 1_000_000,
        // CLOCK_MONOTONIC cannot fail on Linux; a zero would only make heartbeats look stale.
        Err(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trips_and_truncates_on_char_boundary() {
        let text: AtomicText<2> = AtomicText {
            len: AtomicU32::new(0),
            words: Default::default(),
        };
        text.store("GET /x");
        assert_eq!(text.load(), "GET /x");
        text.store("ééééééééé"); // 18 bytes, capacity 16
        assert_eq!(text.load(), "éééééééé");
        text.store_parts(&["GET", " ", "/0123456789abcdefgh"]);
        assert_eq!(
            text.load(),
            "GET /0123456789a",
            "parts, cut at the capacity"
        );
        text.store_parts(&["a", "é", "bcdefghijklmné"]); // the last é would end at byte 18
        assert_eq!(text.load(), "aébcdefghijklmn");
    }

    #[test]
    fn retirement_is_requested_once() {
        let record: WorkerRecord = WorkerRecord {
            pid: AtomicI32::new(0),
            state: AtomicU32::new(0),
            retire_requested: AtomicU32::new(0),
            in_flight: AtomicU32::new(0),
            running: AtomicU32::new(0),
            heartbeat_ms: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            current_request: AtomicText {
                len: AtomicU32::new(0),
                words: Default::default(),
            },
            current_since_ms: AtomicU64::new(0),
            message: AtomicText {
                len: AtomicU32::new(0),
                words: Default::default(),
            },
            slot: AtomicU32::new(0),
            generation: AtomicU64::new(0),
            started_ms: AtomicU64::new(0),
            rss_bytes: AtomicU64::new(0),
            cpu_ms: AtomicU64::new(0),
            connections: AtomicU32::new(0),
            duckdb_bytes: AtomicU64::new(0),
        };
        record.reset(5, 3, 2);
        assert_eq!((record.slot(), record.generation()), (3, 2));
        assert_eq!(record.state(), RecordState::Booting);
        assert!(record.request_retirement());
        assert!(!record.request_retirement());
        assert_eq!(record.request_started("GET", "/a?b=c"), 1);
        assert_eq!(record.in_flight(), 1);
        record.request_finished();
        assert_eq!(record.in_flight(), 0);
        assert_eq!(record.current_request(), "GET /a?b=c");
    }
}
