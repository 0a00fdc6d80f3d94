//! The master process: supervision of the worker pool.
//!
//! After start-up the master only watches. Its loop waits (with `poll`) on a `signalfd` and on a
//! wake-up pipe the workers write to, then: handles signals, reaps exited children
//! (`waitpid(-1)`), reads the scoreboard (workers becoming ready, asking for retirement), checks
//! heartbeats, and reconciles the pool with what it should be ([`Master::reconcile`]).
//!
//! # Slots and replacement
//!
//! The pool is a list of slots. Each slot has at most one *serving* worker (always ready) and at
//! most one *successor* (booting). Every new worker starts as a successor and is promoted when it
//! reports ready; the worker it replaces is then told to drain (SIGTERM). So a slot is refilled,
//! recycled (request budget), rolled (HUP) or grown the same way, and nothing is ever replaced by
//! a worker that is not ready (invariant 3). Planned replacements run one at a time; refilling a
//! slot that lost its worker is immediate (with exponential backoff on repeated crashes).
//!
//! # Lifecycle
//!
//! The master goes through [`MasterPhase`]s: `Starting` until every slot has a ready worker,
//! `Running`, `Stopping` after TERM/INT/QUIT (or a fatal boot failure), `Exited`. Workers go
//! through [`WorkerPhase`]s as the master sees them.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use ferrocorn_query_core::{EngineSettings, StorageSettings};
use ferrocorn_scoreboard::{MAX_RECORDS, MAX_WORKERS, RecordState, Scoreboard, monotonic_ms};
use ferrocorn_worker::AccessLogTarget;
use ferrocorn_worker::QuerySettings;
use ferrocorn_worker::ResultCacheSettings;
use ferrocorn_worker::{EXIT_BOOT_FAILED, WorkerArgs, WorkerSettings};
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid};
use rand::Rng;

use crate::cli::Cli;
use crate::config::{Config, ProcessEnv, RawConfig};
use crate::listeners::Listeners;
use crate::pidfile::PidFile;
use crate::{StartError, logging, sys};

/// The master's phases, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MasterPhase {
    Starting,
    Running,
    Stopping,
    Exited,
}

/// A worker's phase as the master tracks it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkerPhase {
    Booting,
    Ready,
    Draining,
    /// Missed its heartbeat; sent SIGABRT (then SIGKILL).
    Killed,
}

/// Consecutive boot failures, with no worker ready in between, after which the master gives up.
const CRASH_LOOP_LIMIT: u32 = 10;
/// Time between SIGABRT and SIGKILL for a worker that missed its heartbeat.
const KILL_GRACE: Duration = Duration::from_millis(500);
/// Time a quick stop (INT/QUIT) gives workers before SIGKILL.
const QUICK_STOP_GRACE: Duration = Duration::from_secs(2);
/// How long the master sleeps at most between two looks at the pool.
const TICK: Duration = Duration::from_millis(100);
/// A worker that served this long before it crashed resets its slot's backoff.
const STABLE_AFTER: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct WorkerProc {
    slot: usize,
    record: usize,
    generation: u64,
    phase: WorkerPhase,
    spawned: Instant,
    ready_at: Option<Instant>,
    since: Instant,
    kill_sent: bool,
    retire_noted: bool,
}

#[derive(Debug)]
struct Slot {
    serving: Option<Pid>,
    successor: Option<Pid>,
    failures: u32,
    not_before: Option<Instant>,
    ever_ready: bool,
}

impl Slot {
    fn new() -> Self {
        Self {
            serving: None,
            successor: None,
            failures: 0,
            not_before: None,
            ever_ready: false,
        }
    }
}

/// A removed slot whose sockets stay open until its workers have drained them.
#[derive(Debug)]
struct RetiringSlot {
    index: usize,
    _sockets: Vec<OwnedFd>,
}

/// The file descriptors only the master uses (closed in every child).
#[derive(Debug)]
struct MasterFds {
    signals: SignalFd,
    wake_read: OwnedFd,
    wake_write: OwnedFd,
}

/// The master process.
#[derive(Debug)]
pub struct Master {
    cli: Cli,
    /// The configuration as loaded (its restart-only keys are kept across reloads).
    raw: RawConfig,
    config: Config,
    generation: u64,
    desired: usize,
    phase: MasterPhase,
    started: Instant,
    stop_deadline: Option<Instant>,
    exit_code: i32,
    scoreboard: &'static Scoreboard,
    listeners: Listeners,
    slots: Vec<Slot>,
    retiring: Vec<RetiringSlot>,
    workers: BTreeMap<Pid, WorkerProc>,
    fds: Option<MasterFds>,
    steered: usize,
    ever_ready: bool,
    boot_failures_in_a_row: u32,
    reload_pending: bool,
    pidfile: Option<PidFile>,
}

/// The signals the master handles; blocked and read through a signalfd.
fn handled_signals() -> SigSet {
    let mut set = SigSet::empty();
    for signal in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGQUIT,
        Signal::SIGHUP,
        Signal::SIGTTIN,
        Signal::SIGTTOU,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGCHLD,
    ] {
        set.add(signal);
    }
    set
}

impl Master {
    /// Bind, map the scoreboard, block signals and write the pid file. Forks nothing yet.
    pub fn start(cli: Cli, raw: RawConfig, config: Config) -> Result<Self, StartError> {
        let signals = handled_signals();
        signals
            .thread_block()
            .map_err(|e| StartError::Os("blocking signals", e.into()))?;
        let signal_fd =
            SignalFd::with_flags(&signals, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
                .map_err(|e| StartError::Os("creating the signalfd", e.into()))?;
        let (wake_read, wake_write) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_CLOEXEC)
                .map_err(|e| StartError::Os("creating the wake-up pipe", e.into()))?;
        let scoreboard =
            Scoreboard::map().map_err(|e| StartError::Os("mapping the scoreboard", e))?;
        let listeners = Listeners::bind(&config, config.workers).map_err(StartError::Bind)?;
        for address in listeners.addresses() {
            tracing::info!(%address, "listening");
        }
        let pidfile = match &config.pidfile {
            Some(path) => {
                Some(PidFile::create(path).map_err(|e| StartError::PidFile(path.clone(), e))?)
            }
            None => None,
        };
        Ok(Self {
            cli,
            raw,
            desired: config.workers,
            config,
            generation: 1,
            phase: MasterPhase::Starting,
            started: Instant::now(),
            stop_deadline: None,
            exit_code: 0,
            scoreboard,
            listeners,
            slots: Vec::new(),
            retiring: Vec::new(),
            workers: BTreeMap::new(),
            fds: Some(MasterFds {
                signals: signal_fd,
                wake_read,
                wake_write,
            }),
            steered: 0,
            ever_ready: false,
            boot_failures_in_a_row: 0,
            reload_pending: false,
            pidfile,
        })
    }

    fn enter(&mut self, phase: MasterPhase) {
        if self.phase != phase || phase == MasterPhase::Starting {
            tracing::info!(pid = std::process::id(), phase = ?phase, "master phase");
        }
        self.phase = phase;
    }

    /// Supervise until stopped; returns the process exit code.
    pub fn run(mut self) -> i32 {
        self.enter(MasterPhase::Starting);
        tracing::info!(
            pid = std::process::id(),
            workers = self.desired,
            "master starting"
        );
        for _ in 0..self.desired {
            self.slots.push(Slot::new());
        }
        loop {
            self.reconcile();
            if self.phase == MasterPhase::Stopping && self.workers.is_empty() {
                break;
            }
            self.wait();
            self.handle_signals();
            self.reap();
            self.observe();
            self.check_deadlines();
        }
        self.listeners.remove_socket_files();
        self.enter(MasterPhase::Exited);
        self.exit_code
    }

    fn wait(&mut self) {
        let Some(fds) = &self.fds else { return };
        let mut poll_fds = [
            PollFd::new(fds.signals.as_fd(), PollFlags::POLLIN),
            PollFd::new(fds.wake_read.as_fd(), PollFlags::POLLIN),
        ];
        let timeout = PollTimeout::try_from(TICK).unwrap_or(PollTimeout::NONE);
        match poll(&mut poll_fds, timeout) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => tracing::warn!(error = %e, "poll failed"),
        }
        let mut buf = [0u8; 256];
        while matches!(nix::unistd::read(&fds.wake_read, &mut buf), Ok(n) if n > 0) {}
    }

    fn handle_signals(&mut self) {
        let mut received = Vec::new();
        if let Some(fds) = &mut self.fds {
            while let Ok(Some(info)) = fds.signals.read_signal() {
                if let Ok(signal) = Signal::try_from(info.ssi_signo as i32) {
                    received.push(signal);
                }
            }
        }
        for signal in received {
            if signal != Signal::SIGCHLD {
                tracing::info!(signal = %signal, "master received signal");
            }
            match signal {
                Signal::SIGTERM => self.begin_stop(false),
                Signal::SIGINT | Signal::SIGQUIT => self.begin_stop(true),
                Signal::SIGHUP => self.reload(),
                Signal::SIGTTIN => {
                    if self.desired < MAX_WORKERS {
                        self.desired += 1;
                    }
                    tracing::info!(workers = self.desired, "pool size");
                }
                Signal::SIGTTOU => {
                    self.desired = self.desired.saturating_sub(1).max(1);
                    tracing::info!(workers = self.desired, "pool size");
                }
                Signal::SIGUSR1 => {
                    logging::reopen();
                    tracing::info!("master reopened log files");
                    self.signal_all(Signal::SIGUSR1);
                }
                Signal::SIGUSR2 => {
                    tracing::warn!(
                        "binary upgrade (USR2) is not supported by this version; ignored"
                    );
                }
                _ => {}
            }
        }
    }

    fn signal_all(&self, signal: Signal) {
        for pid in self.workers.keys() {
            let _ = kill(*pid, signal);
        }
    }

    fn begin_stop(&mut self, quick: bool) {
        if self.phase == MasterPhase::Stopping && !quick {
            return;
        }
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        let grace = if quick {
            QUICK_STOP_GRACE
        } else {
            self.config.graceful_timeout
        };
        let deadline = Instant::now() + grace;
        self.stop_deadline = Some(
            self.stop_deadline
                .map_or(deadline, |existing| existing.min(deadline)),
        );
        self.enter(MasterPhase::Stopping);
        tracing::info!(
            quick,
            grace_ms = grace.as_millis() as u64,
            "stopping workers"
        );
        let signal = if quick {
            Signal::SIGQUIT
        } else {
            Signal::SIGTERM
        };
        for (pid, worker) in &mut self.workers {
            let _ = kill(*pid, signal);
            if worker.phase != WorkerPhase::Killed {
                worker.phase = WorkerPhase::Draining;
                worker.since = Instant::now();
            }
        }
    }

    fn reload(&mut self) {
        if self.phase == MasterPhase::Stopping {
            return;
        }
        // A key that needs the sockets or the logger re-created keeps its running value.
        let loaded = self.cli.load(&ProcessEnv).map_err(|e| e.to_string());
        let (mut raw, kept) = match loaded {
            Ok((mut raw, _)) => {
                let kept = raw.keep_restart_only(&self.raw);
                (raw, kept)
            }
            Err(e) => {
                tracing::error!(error = %e, "reload: invalid configuration; the running pool is unchanged");
                return;
            }
        };
        let new = match Config::resolve(&raw) {
            Ok(config) => config,
            Err(e) => {
                tracing::error!(error = %e, "reload: invalid configuration; the running pool is unchanged");
                return;
            }
        };
        if !kept.is_empty() {
            tracing::warn!(keys = ?kept, "reload: these keys take effect only after a restart; keeping their running values");
        }
        std::mem::swap(&mut self.raw, &mut raw);
        self.config = new;
        self.generation += 1;
        self.desired = self.config.workers;
        self.reload_pending = true;
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Reloading]);
        tracing::info!(
            generation = self.generation,
            workers = self.desired,
            "reloading: rolling every worker"
        );
    }

    /// Reap every exited child (any child: as PID 1 the master also reaps orphans).
    fn reap(&mut self) {
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                Ok(status) => {
                    if let Some(pid) = status.pid() {
                        self.on_exit(pid, status);
                    }
                }
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "waitpid failed");
                    break;
                }
            }
        }
    }

    /// The spill directory of a worker: its own, under `temp_dir`.
    fn spill_dir(&self, master: Pid, worker: Pid) -> std::path::PathBuf {
        self.config
            .temp_dir
            .join(format!("ferrocorn-{}-{}", master.as_raw(), worker.as_raw()))
    }

    /// Remove what an exited worker leaves in `temp_dir`: its sandbox probe, and its spill
    /// directory, which its sandbox does not let it remove itself (and a killed worker cannot).
    fn remove_spill_dir(&self, worker: Pid) {
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

    fn on_exit(&mut self, pid: Pid, status: WaitStatus) {
        let Some(worker) = self.workers.remove(&pid) else {
            tracing::debug!(%pid, ?status, "reaped a process that was not a worker");
            return;
        };
        self.remove_spill_dir(pid);
        let record = self.record(worker.record);
        let boot_failed = worker.ready_at.is_none()
            && (record.state() == RecordState::BootFailed
                || matches!(status, WaitStatus::Exited(_, EXIT_BOOT_FAILED)));
        let reason = record.message();
        record.free();
        let description = describe(status);
        let expected = matches!(worker.phase, WorkerPhase::Draining | WorkerPhase::Killed);
        if expected {
            tracing::info!(slot = worker.slot, pid = pid.as_raw(), status = %description, "worker exited");
        } else if boot_failed {
            tracing::error!(slot = worker.slot, pid = pid.as_raw(), status = %description, reason = %reason, "worker failed to boot");
        } else {
            tracing::warn!(slot = worker.slot, pid = pid.as_raw(), status = %description, "worker died unexpectedly");
        }
        if let Some(slot) = self.slots.get_mut(worker.slot) {
            if slot.serving == Some(pid) {
                slot.serving = None;
            }
            if slot.successor == Some(pid) {
                slot.successor = None;
            }
            if !expected {
                note_failure(slot, &worker);
            }
        }
        if boot_failed && self.phase != MasterPhase::Stopping {
            self.boot_failures_in_a_row += 1;
            let serving = self.slots.iter().any(|s| s.serving.is_some());
            if !self.ever_ready {
                self.fail(format!("worker failed to boot: {reason}"));
            } else if !serving && self.boot_failures_in_a_row >= CRASH_LOOP_LIMIT {
                self.fail(format!(
                    "no worker serving and {} boots failed in a row; last: {reason}",
                    self.boot_failures_in_a_row
                ));
            }
        }
    }

    fn fail(&mut self, reason: String) {
        tracing::error!(reason = %reason, "stopping the pool");
        if self.config.errorlog.is_some() {
            // The log goes to a file: the operator's terminal gets the reason too.
            eprintln!("ferrocorn: {reason}");
        }
        self.exit_code = EXIT_BOOT_FAILED;
        self.begin_stop(true);
    }

    fn record(&self, index: usize) -> &'static ferrocorn_scoreboard::WorkerRecord {
        let scoreboard = self.scoreboard;
        // Indices come from `free_record`, which only hands out valid ones.
        &scoreboard.records()[index]
    }

    /// Read what the workers published: readiness and retirement requests.
    fn observe(&mut self) {
        let mut became_ready = Vec::new();
        for (pid, worker) in &mut self.workers {
            let record = &self.scoreboard.records()[worker.record];
            if worker.phase == WorkerPhase::Booting && record.state() == RecordState::Ready {
                worker.phase = WorkerPhase::Ready;
                worker.ready_at = Some(Instant::now());
                worker.since = Instant::now();
                tracing::info!(
                    slot = worker.slot,
                    pid = pid.as_raw(),
                    boot_ms = worker.spawned.elapsed().as_millis() as u64,
                    "worker ready"
                );
                became_ready.push(*pid);
            }
            if worker.phase == WorkerPhase::Ready
                && !worker.retire_noted
                && record.retirement_requested()
            {
                worker.retire_noted = true;
                tracing::info!(
                    slot = worker.slot,
                    pid = pid.as_raw(),
                    requests = record.requests(),
                    "worker reached its request budget; recycling"
                );
            }
        }
        for pid in became_ready {
            self.promote(pid);
        }
        if self.phase == MasterPhase::Starting && self.slots.iter().all(|s| s.serving.is_some()) {
            tracing::info!(
                workers = self.slots.len(),
                elapsed_ms = self.started.elapsed().as_millis() as u64,
                "all workers ready"
            );
            self.enter(MasterPhase::Running);
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        }
        if self.reload_pending
            && self.phase == MasterPhase::Running
            && self.slots.len() == self.desired
            && self.slots.iter().all(|s| {
                s.successor.is_none()
                    && s.serving
                        .and_then(|pid| self.workers.get(&pid))
                        .is_some_and(|w| w.generation == self.generation)
            })
        {
            self.reload_pending = false;
            tracing::info!(generation = self.generation, "reload complete");
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        }
    }

    /// A worker is ready: it becomes its slot's serving worker, and the one it replaces drains.
    fn promote(&mut self, pid: Pid) {
        self.ever_ready = true;
        self.boot_failures_in_a_row = 0;
        let Some(slot_index) = self.workers.get(&pid).map(|w| w.slot) else {
            return;
        };
        let Some(slot) = self.slots.get_mut(slot_index) else {
            return;
        };
        if slot.successor != Some(pid) {
            return;
        }
        slot.successor = None;
        slot.ever_ready = true;
        let replaced = slot.serving.replace(pid);
        if let Some(old) = replaced {
            self.drain(old, "replaced by a ready successor");
        }
        self.update_steering();
    }

    fn drain(&mut self, pid: Pid, why: &str) {
        if let Some(worker) = self.workers.get_mut(&pid) {
            if matches!(worker.phase, WorkerPhase::Draining | WorkerPhase::Killed) {
                return;
            }
            tracing::info!(
                slot = worker.slot,
                pid = pid.as_raw(),
                why,
                "worker draining"
            );
            worker.phase = WorkerPhase::Draining;
            worker.since = Instant::now();
            let _ = kill(pid, Signal::SIGTERM);
        }
    }

    /// Steer new connections to the leading slots whose first worker is ready.
    fn update_steering(&mut self) {
        let active = self.slots.iter().take_while(|s| s.ever_ready).count();
        if active != self.steered && active > 0 {
            match self.listeners.steer(active) {
                Ok(()) => self.steered = active,
                Err(e) => tracing::warn!(error = %e, "cannot steer SO_REUSEPORT listeners"),
            }
        }
    }

    /// Heartbeats, drain deadlines, kill escalation, stop deadline.
    fn check_deadlines(&mut self) {
        let now_ms = monotonic_ms();
        let timeout_ms = self.config.timeout.as_millis() as u64;
        let mut timed_out = Vec::new();
        for (pid, worker) in &mut self.workers {
            let record = &self.scoreboard.records()[worker.record];
            match worker.phase {
                WorkerPhase::Killed => {
                    if !worker.kill_sent && worker.since.elapsed() >= KILL_GRACE {
                        worker.kill_sent = true;
                        let _ = kill(*pid, Signal::SIGKILL);
                    }
                }
                WorkerPhase::Draining
                    if worker.since.elapsed() > self.config.graceful_timeout + KILL_GRACE =>
                {
                    if !worker.kill_sent {
                        tracing::warn!(
                            slot = worker.slot,
                            pid = pid.as_raw(),
                            "worker did not finish draining in time; killing"
                        );
                        worker.kill_sent = true;
                        let _ = kill(*pid, Signal::SIGKILL);
                    }
                }
                _ => {
                    let silent_ms = now_ms.saturating_sub(record.last_heartbeat_ms());
                    if silent_ms > timeout_ms {
                        tracing::error!(
                            slot = worker.slot,
                            pid = pid.as_raw(),
                            silent_ms,
                            serving = %record.current_request(),
                            in_flight = record.in_flight(),
                            "WORKER TIMEOUT"
                        );
                        let _ = kill(*pid, Signal::SIGABRT);
                        worker.phase = WorkerPhase::Killed;
                        worker.since = Instant::now();
                        timed_out.push(*pid);
                    }
                }
            }
        }
        for pid in timed_out {
            let Some(worker) = self.workers.get(&pid) else {
                continue;
            };
            if let Some(slot) = self.slots.get_mut(worker.slot) {
                if slot.serving == Some(pid) {
                    slot.serving = None;
                }
                if slot.successor == Some(pid) {
                    slot.successor = None;
                }
                note_failure(slot, worker);
            }
        }
        if let Some(deadline) = self.stop_deadline
            && Instant::now() >= deadline
        {
            for (pid, worker) in &mut self.workers {
                if !worker.kill_sent {
                    tracing::warn!(
                        slot = worker.slot,
                        pid = pid.as_raw(),
                        "stop deadline passed; killing worker"
                    );
                    worker.kill_sent = true;
                    let _ = kill(*pid, Signal::SIGKILL);
                }
            }
        }
    }

    /// Bring the pool to what it should be: size, refills, planned replacements.
    fn reconcile(&mut self) {
        if self.phase == MasterPhase::Stopping {
            return;
        }
        self.resize();
        let now = Instant::now();
        let mut planned_in_progress = self
            .slots
            .iter()
            .any(|s| s.successor.is_some() && s.serving.is_some());
        for index in 0..self.slots.len() {
            let slot = &self.slots[index];
            if slot.successor.is_some() {
                continue;
            }
            let spawn = match slot.serving {
                None => slot.not_before.is_none_or(|t| now >= t),
                Some(pid) => {
                    let stale = self
                        .workers
                        .get(&pid)
                        .is_some_and(|w| w.retire_noted || w.generation < self.generation);
                    if stale && !planned_in_progress {
                        planned_in_progress = true;
                        true
                    } else {
                        false
                    }
                }
            };
            if spawn {
                match self.spawn(index) {
                    Ok(pid) => self.slots[index].successor = Some(pid),
                    Err(e) => {
                        tracing::error!(slot = index, error = %e, "cannot fork a worker");
                        let slot = &mut self.slots[index];
                        slot.failures += 1;
                        slot.not_before = Some(now + backoff(slot.failures));
                    }
                }
            }
        }
        // A removed slot's sockets close once none of its workers is left.
        let workers = &self.workers;
        self.retiring
            .retain(|r| workers.values().any(|w| w.slot == r.index));
    }

    fn resize(&mut self) {
        let mut to_drain = Vec::new();
        while self.slots.len() > self.desired {
            let index = self.slots.len() - 1;
            let Some(slot) = self.slots.pop() else { break };
            to_drain.extend(slot.serving);
            to_drain.extend(slot.successor);
            self.retiring.push(RetiringSlot {
                index,
                _sockets: self.listeners.remove_last_slot(),
            });
            tracing::info!(slot = index, "removing slot");
        }
        if !to_drain.is_empty() {
            // Steer away first, then drain: the draining worker empties the slot's queue.
            self.steered = 0;
            self.update_steering();
            for pid in to_drain {
                self.drain(pid, "slot removed");
            }
        }
        // Growing waits until removed slots are gone, so that slot i stays socket i of its
        // SO_REUSEPORT group.
        while self.slots.len() < self.desired && self.retiring.is_empty() {
            if let Err(e) = self.listeners.add_slot() {
                tracing::error!(error = %e, "cannot add a listener for a new slot");
                self.desired = self.slots.len();
                break;
            }
            tracing::info!(slot = self.slots.len(), "adding slot");
            self.slots.push(Slot::new());
        }
    }

    fn free_record(&self) -> Option<usize> {
        (0..MAX_RECORDS).find(|&i| {
            self.scoreboard.records()[i].state() == RecordState::Free
                && !self.workers.values().any(|w| w.record == i)
        })
    }

    fn worker_settings(&self, budget: Option<u64>, threads: u32) -> WorkerSettings {
        let c = &self.config;
        WorkerSettings {
            query: QuerySettings {
                max_result_rows: c.max_result_rows,
                max_body_bytes: c.max_body_bytes,
                max_query_time: c.query_timeout,
                max_concurrent_queries: c.max_concurrent_queries.unwrap_or(threads as usize),
                queue_depth: c.query_queue_depth,
                queue_timeout: c.query_queue_timeout,
            },
            worker_connections: c.worker_connections,
            keepalive: c.keepalive,
            graceful_timeout: c.graceful_timeout,
            heartbeat_interval: (c.timeout / 4).min(Duration::from_secs(1)),
            request_budget: budget,
            accesslog: c.accesslog.clone(),
            limit_request_line: c.limit_request_line,
            limit_request_fields: c.limit_request_fields,
            limit_request_field_size: c.limit_request_field_size,
            result_cache: c.result_cache_bytes.map(|max_bytes| ResultCacheSettings {
                dir: c.cache_dir.join("results"),
                max_bytes,
            }),
            sandbox: c.sandbox,
            log_files: c
                .errorlog
                .iter()
                .cloned()
                .chain(c.accesslog.iter().filter_map(|target| match target {
                    AccessLogTarget::File(path) => Some(path.clone()),
                    AccessLogTarget::Stdout => None,
                }))
                .collect(),
        }
    }

    fn spawn(&mut self, slot: usize) -> std::io::Result<Pid> {
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
        let workers = self.desired.max(1);
        let memory_limit_bytes = self.config.worker_memory_limit_bytes(workers);
        let threads = self.config.worker_threads(workers);
        let settings = self.worker_settings(budget, threads);
        record.reset(monotonic_ms());
        let master_pid = nix::unistd::getpid();

        match sys::fork()? {
            ForkResult::Parent { child } => {
                record.set_pid(child.as_raw());
                tracing::info!(
                    slot,
                    pid = child.as_raw(),
                    generation = self.generation,
                    budget,
                    "worker spawned"
                );
                let now = Instant::now();
                self.workers.insert(
                    child,
                    WorkerProc {
                        slot,
                        record: record_index,
                        generation: self.generation,
                        phase: WorkerPhase::Booting,
                        spawned: now,
                        ready_at: None,
                        since: now,
                        kill_sent: false,
                        retire_noted: false,
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
        self.retiring.clear();
        self.listeners = Listeners::empty();
        let _ =
            nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
        // If the master dies without telling us, drain and exit rather than serve unsupervised.
        let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGTERM);
        if nix::unistd::getppid() != master_pid {
            std::process::exit(0);
        }
    }
}

fn note_failure(slot: &mut Slot, worker: &WorkerProc) {
    if worker.ready_at.is_some_and(|t| t.elapsed() >= STABLE_AFTER) {
        slot.failures = 0;
    }
    slot.failures += 1;
    slot.not_before = Some(Instant::now() + backoff(slot.failures));
}

/// Delay before refilling a slot after its `failures`-th consecutive failure: none for the first,
/// then 100 ms doubling up to 10 s.
fn backoff(failures: u32) -> Duration {
    if failures <= 1 {
        return Duration::ZERO;
    }
    let exp = (failures - 2).min(7);
    (Duration::from_millis(100) * 2u32.pow(exp)).min(Duration::from_secs(10))
}

fn describe(status: WaitStatus) -> String {
    match status {
        WaitStatus::Exited(_, code) => format!("exit code {code}"),
        WaitStatus::Signaled(_, signal, core) => {
            format!(
                "killed by {signal}{}",
                if core { " (core dumped)" } else { "" }
            )
        }
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_immediate_then_exponential_and_capped() {
        assert_eq!(backoff(1), Duration::ZERO);
        assert_eq!(backoff(2), Duration::from_millis(100));
        assert_eq!(backoff(3), Duration::from_millis(200));
        assert_eq!(backoff(9), Duration::from_millis(10_000));
        assert_eq!(backoff(50), Duration::from_secs(10));
    }
}
