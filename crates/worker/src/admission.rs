//! Admission control: at most `max_concurrent_queries` queries run at once in a worker; up to
//! `query_queue_depth` more wait for a slot, for at most `query_queue_timeout_ms`; anything
//! beyond is refused at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::settings::QuerySettings;

/// A query was refused a slot: the worker is at its capacity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Full;

/// A semaphore for running queries and a bound on the waiters.
#[derive(Debug)]
pub struct Admission {
    running: Arc<Semaphore>,
    waiting: AtomicUsize,
    depth: usize,
    timeout: Duration,
}

impl Admission {
    pub fn new(settings: &QuerySettings) -> Self {
        Self {
            running: Arc::new(Semaphore::new(settings.max_concurrent_queries.max(1))),
            waiting: AtomicUsize::new(0),
            depth: settings.queue_depth,
            timeout: settings.queue_timeout,
        }
    }

    /// A slot, held until the permit drops: at once, after a wait in the queue, or [`Full`].
    pub async fn admit(&self) -> Result<OwnedSemaphorePermit, Full> {
        if let Ok(permit) = self.running.clone().try_acquire_owned() {
            return Ok(permit);
        }
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.depth {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(Full);
        }
        let result = tokio::time::timeout(self.timeout, self.running.clone().acquire_owned()).await;
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        match result {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(Full),
        }
    }
}
