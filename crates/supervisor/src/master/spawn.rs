//! Forking a worker. The parent records the child (its scoreboard record, and a [`Child`] entry
//! for the master's bookkeeping); the child sheds everything that is the master's — descriptors,
//! pid file, control socket, other slots' listeners, the signal mask — drops privileges and
//! runs [`ferrocorn_worker::run`] with the settings resolved here from the master's
//! configuration, then exits with its code. The fork rules of the crate's docs apply: nothing
//! here may start a thread before the fork.
//!
//! Each worker spills to a directory of its own under `temp_dir`, which the master removes when
//! it reaps the worker (the worker's sandbox does not let it, and a killed worker cannot).

use std::time::Duration;

use ferrocorn_query_core::{EngineSettings, StorageSettings};
use ferrocorn_scoreboard::{MAX_RECORDS, PoolCounters, RecordState, monotonic_ms};
use ferrocorn_worker::AuthSettings;
use ferrocorn_worker::QuerySettings;
use ferrocorn_worker::ResultCacheSettings;
use ferrocorn_worker::{EXIT_BOOT_FAILED, WorkerArgs, WorkerSettings};
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::unistd::{ForkResult, Pid};
use rand::Rng;

use super::{Child, Master, Succession};
use crate::config::RunAs;
use crate::listeners::Listeners;
use crate::{logging, sys};

impl Master {
    pub(super) fn spawn(&mut self, slot: usize, generation: u64) -> std::io::Result<Pid> {
        let record_index = self
            .free_record()
            .ok_or_else(|| std::io::Error::other("no free scoreboard record"))?;
        let record = self.record(record_index);
        let listeners = self.listeners.for_slot(slot)?;
        let wake = match &self.fds {
            Some(fds) => fds.wake_write.try_clone()?,
            None => return Err(std::io::Error::other("master descriptors are closed")),
        };
        let budget = (self.config.max_requests > 0).then(|| {
            self.config.max_requests + rand::rng().random_range(0..=self.config.max_requests_jitter)
        });
        let workers = self.pool.desired().max(1);
        let memory_limit_bytes = self.config.worker_memory_limit_bytes(workers);
        let threads = self.config.worker_threads(workers);
        let settings = self.worker_settings(budget, workers, threads);
        record.reset(monotonic_ms(), slot, generation);
        PoolCounters::add(&self.scoreboard.pool().worker_starts, 1);
        let master_pid = nix::unistd::getpid();

        match sys::fork()? {
            ForkResult::Parent { child } => {
                record.set_pid(child.as_raw());
                tracing::info!(
                    slot,
                    pid = child.as_raw(),
                    generation,
                    budget,
                    "worker spawned"
                );
                self.children.insert(
                    child,
                    Child {
                        record: record_index,
                        ready_seen: false,
                        retire_seen: false,
                        silent_seen: false,
                        over_memory: 0,
                        memory_reported: false,
                    },
                );
                Ok(child)
            }
            ForkResult::Child => {
                self.become_worker(master_pid);
                let engine = EngineSettings {
                    data_dir: self.config.data_dir.clone(),
                    temp_dir: self.spill_dir(master_pid, nix::unistd::getpid()),
                    memory_limit_bytes,
                    threads,
                    max_temp_bytes: self
                        .config
                        .duckdb_max_temp_bytes
                        .map(|bytes| bytes / workers as u64),
                    storage: StorageSettings {
                        snapshot_dir: Some(self.config.cache_dir.join("snapshots")),
                        default_mode: self.config.storage,
                        datasets: self.config.datasets.clone(),
                        // A snapshot is the default for datasets whose files fit the memory
                        // budget: the pool's page cache can then hold the one shared copy.
                        auto_max_bytes: self.config.duckdb_memory_limit_bytes,
                    },
                    ..EngineSettings::default()
                };
                let code = ferrocorn_worker::run(WorkerArgs {
                    slot,
                    listeners,
                    record,
                    scoreboard: self.scoreboard,
                    notify: wake,
                    settings,
                    engine,
                    reopen_logs: logging::reopen,
                });
                std::process::exit(code)
            }
        }
    }

    /// In a freshly forked child: shed everything that belongs to the master.
    fn become_worker(&mut self, master_pid: Pid) {
        // The pid file is the master's: forget it without the Drop that would remove it.
        std::mem::forget(self.pidfile.take());
        self.fds = None;
        // The socket file is the master's: close the descriptor without removing the file.
        if let Some(control) = self.control.take() {
            control.close_keeping_file();
        }
        self.reload_waiters.clear();
        self.succession = Succession::Alone;
        self.retiring.clear();
        self.children.clear();
        self.listeners = Listeners::empty();
        let _ =
            nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
        if let Some(run_as) = &self.config.run_as
            && let Err(e) = drop_privileges(run_as)
        {
            eprintln!("ferrocorn: a worker cannot become {}: {e}", run_as.user);
            std::process::exit(EXIT_BOOT_FAILED);
        }
        // If the master dies without telling us, drain and exit rather than serve unsupervised.
        // (After the change of user, which clears the setting.)
        let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGTERM);
        if nix::unistd::getppid() != master_pid {
            std::process::exit(0);
        }
    }

    fn worker_settings(&self, budget: Option<u64>, workers: usize, threads: u32) -> WorkerSettings {
        let c = &self.config;
        WorkerSettings {
            query: QuerySettings {
                max_result_rows: c.max_result_rows,
                max_body_bytes: c.max_body_bytes,
                max_query_time: c.query_timeout,
                max_concurrent_queries: c.max_concurrent_queries.unwrap_or(threads as usize),
                queue_depth: c.queue_depth(workers),
                queue_timeout: c.query_queue_timeout,
                pool_slots: c
                    .share_query_slots
                    .then(|| workers * c.max_concurrent_queries.unwrap_or(threads as usize)),
            },
            worker_connections: c.worker_connections,
            keepalive: c.keepalive,
            graceful_timeout: c.graceful_timeout,
            heartbeat_interval: (c.timeout / 4).min(Duration::from_secs(1)),
            request_budget: budget,
            accesslog: c.accesslog.clone(),
            log_format: c.log_format,
            access_log_format: c.access_log_format.clone(),
            limit_request_line: c.limit_request_line,
            limit_request_fields: c.limit_request_fields,
            limit_request_field_size: c.limit_request_field_size,
            result_cache: c.result_cache_bytes.map(|max_bytes| ResultCacheSettings {
                dir: c.cache_dir.join("results"),
                max_bytes,
                disk_worthy: c.result_cache_min,
            }),
            sandbox: c.sandbox,
            auth: AuthSettings {
                required: c.production,
                secret_key: c.secret_key.clone(),
                previous_key: c.secret_key_previous.clone(),
                users_file: c.users_file.clone(),
                token_ttl: c.token_ttl,
                per_user_per_minute: c.rate_limit_per_minute,
                auth_per_address_per_minute: c.rate_limit_auth_per_minute,
                forwarded_allow: c.forwarded_allow.clone(),
                metrics_public: c.metrics_public,
            },
            cors_origins: c.cors_origins.clone(),
            log_files: c.log_files(),
            pool_memory_budget: c.duckdb_memory_limit_bytes,
            pool_cpus: c.cpus,
        }
    }

    fn free_record(&self) -> Option<usize> {
        (0..MAX_RECORDS).find(|&i| {
            self.scoreboard.records()[i].state() == RecordState::Free
                && !self.children.values().any(|c| c.record == i)
        })
    }

    /// The spill directory of a worker: its own, under `temp_dir`.
    fn spill_dir(&self, master: Pid, worker: Pid) -> std::path::PathBuf {
        self.config
            .temp_dir
            .join(format!("ferrocorn-{}-{}", master.as_raw(), worker.as_raw()))
    }

    /// Remove what an exited worker leaves in `temp_dir`: its sandbox probe, and its spill
    /// directory, which its sandbox does not let it remove itself (and a killed worker cannot).
    pub(super) fn remove_spill_dir(&self, worker: Pid) {
        let spill = self.spill_dir(nix::unistd::getpid(), worker);
        let probe = ferrocorn_worker::sandbox_probe(&spill);
        for result in [
            std::fs::remove_file(&probe),
            std::fs::remove_dir_all(&spill),
        ] {
            if let Err(e) = result
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(pid = worker.as_raw(), error = %e, "cannot remove a worker's spill directory");
            }
        }
    }
}

/// Become `run_as` for good: its group alone, then the group id, then the user id (the order in
/// which each step is still permitted), and check that root cannot be regained.
fn drop_privileges(run_as: &RunAs) -> nix::Result<()> {
    use nix::unistd::{getuid, setgid, setgroups, setuid};
    if getuid() == run_as.uid && nix::unistd::getgid() == run_as.gid {
        return Ok(());
    }
    setgroups(&[run_as.gid])?;
    setgid(run_as.gid)?;
    setuid(run_as.uid)?;
    if !run_as.uid.is_root() && setuid(nix::unistd::Uid::from_raw(0)).is_ok() {
        return Err(nix::errno::Errno::EPERM);
    }
    Ok(())
}
