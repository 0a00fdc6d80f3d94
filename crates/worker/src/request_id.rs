//! Request ids: the one of the request being handled (a task-local, so that error documents can
//! name it wherever they are built) and how a worker makes new ones.

use std::sync::atomic::{AtomicU64, Ordering};

use http::HeaderValue;

tokio::task_local! {
    static REQUEST_ID: String;
}

/// The id of the request being handled, if any.
pub fn current() -> Option<String> {
    REQUEST_ID.try_with(Clone::clone).ok()
}

/// Run `work` as the handling of request `id`.
pub async fn scope<F: std::future::Future>(id: String, work: F) -> F::Output {
    REQUEST_ID.scope(id, work).await
}

/// Makes the ids of one worker's requests.
#[derive(Debug)]
pub struct RequestIds {
    pid: u32,
    next: AtomicU64,
}

impl RequestIds {
    pub fn new(pid: u32) -> Self {
        Self {
            pid,
            next: AtomicU64::new(1),
        }
    }

    /// The id of a new request: the caller's (`X-Request-Id`) when it is short and printable, so
    /// that a proxy's id flows through; else one of this worker's.
    pub fn assign(&self, incoming: Option<&HeaderValue>) -> String {
        if let Some(id) = incoming.and_then(|v| v.to_str().ok())
            && !id.is_empty()
            && id.len() <= 128
            && id.bytes().all(|b| b.is_ascii_graphic())
        {
            return id.to_owned();
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        format!("{:x}-{:x}", self.pid, n)
    }
}
