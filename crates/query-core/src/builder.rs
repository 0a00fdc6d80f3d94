//! The worker's snapshot builder: one thread that builds the snapshots the engine asks for, one
//! at a time (and one at a time in the whole pool, under the snapshot directory's build lock),
//! on a connection to the worker's own DuckDB instance, and removes snapshot files that lost
//! their last holder.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use duckdb::Connection;

use crate::catalog::{self, Dataset};
use crate::snapshot::{BuildError, SnapshotPolicy, Target};
use crate::sync::lock;

/// How often the builder thread looks for snapshot files no worker holds any more, besides after
/// each build and each detach: this catches files released by workers that exited.
const GC_INTERVAL: Duration = Duration::from_secs(60);

/// A snapshot to build.
#[derive(Debug)]
pub(crate) struct BuildJob {
    pub dataset: Dataset,
    pub target: Target,
}

/// What the builder thread is asked to do.
#[derive(Debug)]
enum Work {
    Build(BuildJob),
    /// A snapshot was detached: its file may have no holder left.
    Collect,
}

/// What the builder thread needs besides its connection.
#[derive(Debug)]
pub(crate) struct BuilderContext {
    pub policy: Arc<SnapshotPolicy>,
    pub data_dir: PathBuf,
    pub failed: Arc<Mutex<HashMap<PathBuf, String>>>,
}

impl BuilderContext {
    /// Remove the snapshot files no current target needs and no process holds.
    fn collect_garbage(&self) {
        let targets = || Some(self.policy.targets(&catalog::scan(&self.data_dir).ok()?));
        for path in self.policy.dir.collect_garbage(targets) {
            tracing::info!(path = %path.display(), "snapshot file removed");
        }
    }

    fn build(&self, conn: &Connection, job: &BuildJob) {
        let started = Instant::now();
        let name = &job.dataset.name;
        let target = &job.target;
        match self.policy.dir.build(
            conn,
            &self.data_dir,
            &job.dataset,
            target.sort_key.as_deref(),
            &target.path,
        ) {
            Ok(true) => tracing::info!(
                dataset = %name,
                version = %job.dataset.version,
                seconds = started.elapsed().as_secs_f64(),
                bytes = std::fs::metadata(&target.path).map_or(0, |m| m.len()),
                "snapshot built"
            ),
            Ok(false) | Err(BuildError::Busy | BuildError::Changed) => {}
            Err(e) => {
                let reason = crate::error::chain(&e);
                // A failure that would repeat is recorded for the whole pool and the next start;
                // one of the moment (a full disk, say) only for this worker, whose successor
                // tries again.
                if e.is_permanent() {
                    tracing::warn!(dataset = %name, error = %reason, "snapshot build failed; serving Parquet, and not building it again until its files or options change");
                    if let Err(e) = self.policy.dir.record_failure(&target.path, &reason) {
                        tracing::warn!(dataset = %name, error = %e, "cannot record the failed build for the rest of the pool");
                    }
                } else {
                    tracing::warn!(dataset = %name, error = %reason, "snapshot build failed; serving Parquet until this worker's successor tries again");
                }
                lock(&self.failed).insert(target.path.clone(), reason);
            }
        }
    }
}

/// The worker's snapshot builder: a thread that builds requested snapshots one at a time and
/// collects unused ones.
pub(crate) struct Builder {
    work: Mutex<Option<mpsc::Sender<Work>>>,
    /// Targets requested and not yet attempted, so a job is queued once.
    queued: Arc<Mutex<HashSet<PathBuf>>>,
    interrupt: Arc<duckdb::InterruptHandle>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Builder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builder")
            .field("queued", &self.queued)
            .finish_non_exhaustive()
    }
}

impl Builder {
    pub fn start(conn: Connection, context: BuilderContext) -> Self {
        let (tx, rx) = mpsc::channel::<Work>();
        let queued = Arc::new(Mutex::new(HashSet::new()));
        let interrupt = conn.interrupt_handle();
        let thread = {
            let queued = queued.clone();
            std::thread::Builder::new()
                .name("snapshot-builder".into())
                .spawn(move || {
                    loop {
                        match rx.recv_timeout(GC_INTERVAL) {
                            Ok(Work::Build(job)) => {
                                context.build(&conn, &job);
                                lock(&queued).remove(&job.target.path);
                            }
                            Ok(Work::Collect) | Err(mpsc::RecvTimeoutError::Timeout) => {}
                            Err(mpsc::RecvTimeoutError::Disconnected) => return,
                        }
                        context.collect_garbage();
                    }
                })
                .ok()
        };
        Self {
            work: Mutex::new(Some(tx)),
            queued,
            interrupt,
            thread,
        }
    }

    pub fn request(&self, job: BuildJob) {
        if lock(&self.queued).insert(job.target.path.clone()) {
            self.send(Work::Build(job));
        }
    }

    /// Look for snapshot files that have lost their last holder.
    pub fn collect(&self) {
        self.send(Work::Collect);
    }

    fn send(&self, work: Work) {
        if let Some(tx) = lock(&self.work).as_ref() {
            let _ = tx.send(work);
        }
    }

    /// Interrupt a build in progress and wait for the thread to end.
    pub fn stop(mut self) {
        lock(&self.work).take();
        self.interrupt.interrupt();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
