//! Rate limits for the whole pool: one table of keys and their budgets in the shared region, so
//! a limit holds exactly whichever workers serve the requests, and survives their recycling.
//!
//! Each limit is a generic cell rate algorithm (GCRA): a key's one number is its *theoretical
//! arrival time* (TAT), the moment its budget is whole again. A request at `now` is allowed when
//! `max(TAT, now) - now` is at most the burst tolerance, `(limit - 1)` emission intervals, and
//! then moves the TAT one interval (`window / limit`) on. So `limit` requests pass in a burst,
//! the next waits an interval, and the answer is exact: the `limit + 1`-th request within the
//! window is refused, and `Retry-After` is when the next one would pass.
//!
//! The table is fixed (no allocation, bounded memory: [`LIMIT_SLOTS`] slots of 16 bytes per
//! table). A key is hashed by the caller to a non-zero `u64`; it lives in the first free or
//! reusable slot of a short probe from its hash. A slot whose TAT has passed holds a whole budget,
//! the same as no slot, so it can be reused for another key without loss; only when every slot of
//! a probe holds a budget still in use is the one nearest to whole taken over (that key's budget
//! then starts whole again — with thousands of distinct active clients in one window, the
//! limiter forgets the least indebted first).

use std::sync::atomic::{AtomicU64, Ordering};

use crate::shared::shared_struct;

/// Slots of one limit table.
pub const LIMIT_SLOTS: usize = 8192;
/// Slots looked at from a key's hash.
const PROBE: usize = 16;

shared_struct! {
    /// One key's slot: its hash (0 when free) and its theoretical arrival time (ms of
    /// [`crate::monotonic_ms`]).
    #[derive(Debug, Default)]
    pub struct LimitSlot {
        key: AtomicU64,
        tat: AtomicU64,
    }
}

shared_struct! {
    /// A table of keys for one kind of limit (per user, per client address).
    #[derive(Debug)]
    pub struct LimitTable {
        slots: [LimitSlot; LIMIT_SLOTS],
    }
}

/// A limit: `limit` requests per `window_ms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    pub limit: u32,
    pub window_ms: u64,
}

/// What a request was told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    /// Requests the key may still send at once.
    pub remaining: u32,
    /// Milliseconds until the next request would pass (0 when one would pass now).
    pub retry_after_ms: u64,
    /// Milliseconds until the budget is whole again.
    pub reset_ms: u64,
}

impl LimitTable {
    /// Count a request of `key` (non-zero) at `now_ms` against `rate`.
    pub fn check(&self, key: u64, rate: Rate, now_ms: u64) -> Verdict {
        let key = key.max(1);
        let interval = (rate.window_ms / u64::from(rate.limit.max(1))).max(1);
        let tolerance = interval * u64::from(rate.limit.max(1) - 1);
        let slot = self.slot(key, now_ms);
        let mut tat = slot.tat.load(Ordering::Acquire);
        loop {
            let base = tat.max(now_ms);
            let debt = base - now_ms;
            if debt > tolerance {
                return Verdict {
                    allowed: false,
                    remaining: 0,
                    retry_after_ms: debt - tolerance,
                    reset_ms: debt,
                };
            }
            let next = base + interval;
            match slot
                .tat
                .compare_exchange_weak(tat, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    let debt = next - now_ms;
                    let left = (tolerance + interval).saturating_sub(debt) / interval;
                    return Verdict {
                        allowed: true,
                        remaining: u32::try_from(left).unwrap_or(u32::MAX),
                        retry_after_ms: 0,
                        reset_ms: debt,
                    };
                }
                Err(current) => tat = current,
            }
        }
    }

    /// The slot of `key`: its own, else a free or whole one claimed for it, else the one of its
    /// probe nearest to whole, taken over.
    fn slot(&self, key: u64, now_ms: u64) -> &LimitSlot {
        let start = (key as usize) % LIMIT_SLOTS;
        let probe = (0..PROBE).map(|i| &self.slots[(start + i) % LIMIT_SLOTS]);
        if let Some(own) = probe.clone().find(|s| s.key.load(Ordering::Acquire) == key) {
            return own;
        }
        for slot in probe.clone() {
            let current = slot.key.load(Ordering::Acquire);
            let reusable = current == 0 || slot.tat.load(Ordering::Acquire) <= now_ms;
            if reusable
                && slot
                    .key
                    .compare_exchange(current, key, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                // A whole budget, whatever the last key left in it.
                slot.tat.store(0, Ordering::Release);
                return slot;
            }
        }
        let victim = probe
            .min_by_key(|s| s.tat.load(Ordering::Acquire))
            .unwrap_or(&self.slots[start]);
        victim.key.store(key, Ordering::Release);
        victim.tat.store(0, Ordering::Release);
        victim
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Box<LimitTable> {
        Box::new(LimitTable {
            slots: std::array::from_fn(|_| LimitSlot::default()),
        })
    }

    const PER_MINUTE: Rate = Rate {
        limit: 60,
        window_ms: 60_000,
    };

    #[test]
    fn the_limit_plus_first_request_in_a_window_is_refused_with_when_to_retry() {
        let t = table();
        let now = 1_000_000;
        for i in 0..60 {
            let v = t.check(42, PER_MINUTE, now);
            assert!(v.allowed, "request {}", i + 1);
            assert_eq!(v.remaining, 59 - i);
        }
        let refused = t.check(42, PER_MINUTE, now + 10);
        assert!(!refused.allowed);
        assert_eq!(refused.retry_after_ms, 990);
        // Another key has its own budget.
        assert!(t.check(43, PER_MINUTE, now).allowed);
        // One interval later one more passes, and only one.
        assert!(t.check(42, PER_MINUTE, now + 1000).allowed);
        assert!(!t.check(42, PER_MINUTE, now + 1000).allowed);
        // A full window later the budget is whole.
        let whole = now + 61_000;
        for _ in 0..60 {
            assert!(t.check(42, PER_MINUTE, whole).allowed);
        }
        assert!(!t.check(42, PER_MINUTE, whole).allowed);
    }

    #[test]
    fn thousands_of_keys_stay_in_the_fixed_table_and_reuse_whole_slots() {
        let t = table();
        let rate = Rate {
            limit: 5,
            window_ms: 60_000,
        };
        // Far more keys than slots, each spending its budget: the table never grows, and a key
        // pushed out starts whole again.
        for key in 1..=50_000u64 {
            assert!(
                t.check(key.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1, rate, 0)
                    .allowed
            );
        }
        let used = t
            .slots
            .iter()
            .filter(|s| s.key.load(Ordering::Relaxed) != 0)
            .count();
        assert!(used <= LIMIT_SLOTS);
        // After the window every slot is whole and reusable by new keys.
        for key in 1..=5u64 {
            assert!(t.check(key << 40, rate, 120_000).allowed);
        }
    }
}
