//! The master process: the loop that supervises the worker pool.
//!
//! After start-up the master only watches. Its loop waits (with `poll`) on a `signalfd` and on a
//! wake-up pipe the workers write to, then turns what it finds into [`Event`]s for the
//! [`Pool`]: signals, reaped children (`waitpid(-1)`), and what the scoreboard shows (a worker
//! ready, asking for retirement, or silent past `timeout`), then a tick for the clock. What to do
//! is the pool's decision ([`crate::pool`]); this module performs its [`Action`]s: forking a
//! worker, signalling one, steering and opening or closing listeners, telling systemd.

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use ferrocorn_query_core::{EngineSettings, StorageSettings};
use ferrocorn_scoreboard::{MAX_RECORDS, PoolCounters, RecordState, Scoreboard, monotonic_ms};
use ferrocorn_worker::AuthSettings;
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
use crate::config::{Config, ProcessEnv, RawConfig, RunAs};
use crate::control::{self, ControlSocket, Request};
use crate::listeners::Listeners;
use crate::pidfile::PidFile;
use crate::pool::{Action, Event, Notice, Phase, Pool, Timing};
use crate::pool_lock::PoolLock;
use crate::upgrade::{self, Handover, Successor, Upgrade};
use crate::{StartError, logging, sys};

/// How long the master sleeps at most between two looks at the pool.
const TICK: Duration = Duration::from_millis(100);

/// How often the master samples the workers' memory and CPU and the accept queues.
const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

/// Samples in a row over `max_worker_memory` before the guard recycles a worker.
const OVER_MEMORY_SAMPLES: u32 = 3;

/// A forked worker, as far as the master's own bookkeeping goes (the pool has the rest).
#[derive(Debug)]
struct Child {
    /// Its scoreboard record.
    record: usize,
    /// Already reported to the pool: ready, asking for retirement, silent.
    ready_seen: bool,
    retire_seen: bool,
    silent_seen: bool,
    /// Consecutive samples over the memory ceiling, and whether the guard has acted.
    over_memory: u32,
    memory_reported: bool,
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
    pool: Pool,
    scoreboard: &'static Scoreboard,
    listeners: Listeners,
    /// Removed slots' listeners, open until their workers have drained them.
    retiring: BTreeMap<usize, Vec<OwnedFd>>,
    children: BTreeMap<Pid, Child>,
    fds: Option<MasterFds>,
    pidfile: Option<PidFile>,
    /// Held for the master's lifetime: one pool per cache directory.
    lock: PoolLock,
    /// `ferrocorn status | reload | scale`, and the clients waiting for a reload to complete.
    control: Option<ControlSocket>,
    reload_waiters: Vec<std::os::unix::net::UnixStream>,
    exit_code: Option<i32>,
    /// When `/proc` was last sampled; whether the pool is over 90 % of its memory budget.
    last_sample: Option<Instant>,
    over_budget: bool,
    /// systemd's watchdog interval, if it asked for one, and when it was last fed.
    watchdog: Option<Duration>,
    last_watchdog: Option<Instant>,
    /// Whether systemd keeps the listeners across restarts (`FDSTORE=1`), and the names of
    /// what it passed from its store at start, dropped from the store once this master has
    /// stored its own set.
    fd_store: bool,
    passed_store_names: Vec<String>,
    /// The binary and arguments this master was started with: what USR2 starts again.
    exe: Option<std::path::PathBuf>,
    args: Vec<std::ffi::OsString>,
    /// Where this master stands in a binary upgrade.
    succession: Succession,
}

/// Where a master stands in a binary upgrade ([`crate::upgrade`]).
#[derive(Debug)]
enum Succession {
    /// The pool is this master's alone.
    Alone,
    /// It started a new master, and serves until that one is ready.
    Upgrading(Upgrade),
    /// It is the new master, serving beside the old one until every worker is ready.
    Successor(Successor),
    /// It is the new master, has told the old one, and waits until systemd knows its pid.
    HandingOver(Handover),
    /// It handed the pool to a new master, and only drains.
    HandedOver,
}

impl Succession {
    /// Whether systemd takes this master for the service's main process: only then does it
    /// notify, feed the watchdog and keep the file-descriptor store.
    fn is_main(&self) -> bool {
        matches!(self, Self::Alone | Self::Upgrading(_))
    }

    /// Whether this master steers the sockets. While two masters share them, neither does:
    /// the old one's workers serve every slot, and the new one steers once it takes over.
    fn steers(&self) -> bool {
        matches!(self, Self::Alone | Self::HandingOver(_))
    }
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
        let Start {
            lock,
            control,
            listeners,
            successor,
            passed_store_names,
        } = match upgrade::inherited().map_err(StartError::Handoff)? {
            Some(inherited) => Start::from_predecessor(&config, inherited)?,
            None => Start::fresh(&config)?,
        };
        if listeners.is_activated() {
            tracing::info!(
                "socket activation: listening on the sockets systemd passed, not on bind"
            );
        }
        if let Some(successor) = &successor {
            tracing::info!(
                old_master = successor.parent.as_raw(),
                "binary upgrade: serving beside the old master until every worker is ready"
            );
        }
        if let Some(run_as) = &config.run_as {
            hand_over(&config, run_as)
                .map_err(|e| StartError::Os("giving the workers' user its files", e))?;
        }
        for address in listeners.addresses() {
            tracing::info!(%address, "listening");
        }
        if !config.production {
            tracing::warn!(
                "DEVELOPMENT MODE: requests without a credential are served, debug may be on and errors may say more than a client should see; set ENVIRONMENT=production (and SECRET_KEY) for a server others can reach"
            );
        }
        // A new master of an upgrade writes the pid file when it takes over.
        let pidfile = match &config.pidfile {
            Some(path) if successor.is_none() => {
                Some(PidFile::create(path).map_err(|e| StartError::PidFile(path.clone(), e))?)
            }
            _ => None,
        };
        Ok(Self {
            cli,
            raw,
            pool: Pool::new(config.workers, timing(&config), Instant::now()),
            config,
            scoreboard,
            listeners,
            retiring: BTreeMap::new(),
            children: BTreeMap::new(),
            fds: Some(MasterFds {
                signals: signal_fd,
                wake_read,
                wake_write,
            }),
            pidfile,
            lock,
            control: Some(control),
            reload_waiters: Vec::new(),
            exit_code: None,
            last_sample: None,
            over_budget: false,
            watchdog: sd_notify::watchdog_enabled(),
            last_watchdog: None,
            fd_store: std::env::var("FDSTORE")
                .ok()
                .and_then(|n| n.parse::<u32>().ok())
                .is_some_and(|n| n > 0),
            passed_store_names,
            exe: upgrade::executable()
                .inspect_err(
                    |e| tracing::warn!(error = %e, "no path to this binary: USR2 cannot upgrade"),
                )
                .ok(),
            args: std::env::args_os().skip(1).collect(),
            succession: successor.map_or(Succession::Alone, Succession::Successor),
        })
    }

    /// Supervise until stopped; returns the process exit code.
    pub fn run(mut self) -> i32 {
        self.store_listeners();
        self.dispatch(Event::Tick);
        loop {
            // A master that started an upgrade exits after the new master it stopped.
            if let Some(code) = self.exit_code
                && !matches!(self.succession, Succession::Upgrading(_))
            {
                self.listeners.remove_socket_files();
                return code;
            }
            self.wait();
            self.handle_signals();
            self.handle_control();
            self.reap();
            self.watch_upgrade();
            self.watch_handover();
            self.observe();
            self.sample();
            self.dispatch(Event::Tick);
            self.feed_watchdog();
            self.answer_reload_waiters();
        }
    }

    /// Hand `event` to the pool and perform what it decides, and what follows from that.
    fn dispatch(&mut self, event: Event) {
        let mut queue = VecDeque::from(self.pool.handle(event, Instant::now()));
        while let Some(action) = queue.pop_front() {
            if let Some(answer) = self.perform(action) {
                queue.extend(self.pool.handle(answer, Instant::now()));
            }
        }
    }

    /// Perform one action; returns the event that answers it, if it has one.
    fn perform(&mut self, action: Action) -> Option<Event> {
        match action {
            Action::Spawn { slot, generation } => Some(match self.spawn(slot, generation) {
                Ok(pid) => Event::Spawned { slot, pid },
                Err(e) => {
                    tracing::error!(slot, error = %e, "cannot fork a worker");
                    Event::SpawnFailed { slot }
                }
            }),
            Action::Signal { pid, signal } => {
                let _ = kill(pid, signal);
                None
            }
            Action::Abort { pid, slot } => {
                if let Some(child) = self.children.get(&pid) {
                    let record = self.record(child.record);
                    tracing::error!(
                        slot,
                        pid = pid.as_raw(),
                        silent_ms = monotonic_ms().saturating_sub(record.last_heartbeat_ms()),
                        serving = %record.current_request(),
                        in_flight = record.in_flight(),
                        "WORKER TIMEOUT"
                    );
                }
                let _ = kill(pid, Signal::SIGABRT);
                None
            }
            Action::Steer { active } => {
                if self.succession.steers() {
                    self.steer(active);
                }
                None
            }
            Action::AddSlot => Some(Event::SlotAdded {
                ok: match self.listeners.add_slot() {
                    Ok(()) => {
                        self.store_listeners();
                        true
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot add a listener for a new slot");
                        false
                    }
                },
            }),
            Action::RemoveSlot { slot } => {
                self.retiring
                    .insert(slot, self.listeners.remove_last_slot());
                None
            }
            Action::CloseSlot { slot } => {
                self.retiring.remove(&slot);
                self.unstore_slot(slot);
                None
            }
            Action::Notify(Notice::Ready)
                if matches!(self.succession, Succession::Successor(_)) =>
            {
                // Every worker of the new pool serves: take over (systemd hears of it once the
                // old master has told it who the main process is).
                self.take_over();
                None
            }
            Action::Notify(_) if !self.succession.is_main() => None,
            Action::Notify(notice) => {
                use sd_notify::NotifyState;
                let status = match notice {
                    Notice::Ready => format!(
                        "{}/{} workers ready, generation {}",
                        self.pool.serving(),
                        self.pool.desired(),
                        self.pool.generation()
                    ),
                    Notice::Reloading => {
                        format!("reloading: generation {}", self.pool.generation())
                    }
                    Notice::Stopping => "stopping: draining the workers".to_owned(),
                };
                let mut states = vec![match notice {
                    Notice::Ready => NotifyState::Ready,
                    Notice::Reloading => NotifyState::Reloading,
                    Notice::Stopping => NotifyState::Stopping,
                }];
                // systemd's notify-reload protocol takes RELOADING=1 only with the moment the
                // reload began (Type=notify-reload); READY=1 after it ends the reload.
                if notice == Notice::Reloading
                    && let Ok(now) = NotifyState::monotonic_usec_now()
                {
                    states.push(now);
                }
                states.push(NotifyState::Status(&status));
                let _ = sd_notify::notify(&states);
                None
            }
            Action::Fatal { reason } => {
                if self.config.errorlog.is_some() {
                    // The log goes to a file: the operator's terminal gets the reason too.
                    eprintln!("ferrocorn: {reason}");
                }
                None
            }
            Action::CountExit(cause) => {
                self.scoreboard.pool().worker_exited(cause);
                None
            }
            Action::Exit { code } => {
                self.exit_code = Some(code);
                None
            }
        }
    }

    fn wait(&mut self) {
        let Some(fds) = &self.fds else { return };
        let mut poll_fds = vec![
            PollFd::new(fds.signals.as_fd(), PollFlags::POLLIN),
            PollFd::new(fds.wake_read.as_fd(), PollFlags::POLLIN),
        ];
        match &self.succession {
            Succession::Upgrading(upgrade) => {
                poll_fds.push(PollFd::new(upgrade.fd(), PollFlags::POLLIN));
            }
            Succession::HandingOver(handover) => {
                poll_fds.push(PollFd::new(handover.fd(), PollFlags::POLLIN));
            }
            _ => {}
        }
        if let Some(control) = &self.control
            && self.answers_control()
        {
            poll_fds.push(PollFd::new(control.listener().as_fd(), PollFlags::POLLIN));
        }
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
            // A stop during an upgrade stops the new master too (the operator stops the
            // service), and this master exits only after it (its workers may serve already).
            if matches!(signal, Signal::SIGTERM | Signal::SIGINT | Signal::SIGQUIT)
                && let Succession::Upgrading(upgrade) = &mut self.succession
            {
                tracing::warn!(
                    new_master = upgrade.pid.as_raw(),
                    "binary upgrade abandoned: stopping the new master too"
                );
                let _ = kill(upgrade.pid, signal);
                upgrade.stopped = true;
                upgrade.deadline = Instant::now() + self.config.graceful_timeout;
            }
            match signal {
                Signal::SIGTERM => self.dispatch(Event::Stop { quick: false }),
                Signal::SIGINT | Signal::SIGQUIT => self.dispatch(Event::Stop { quick: true }),
                Signal::SIGHUP => {
                    let _ = self.reload();
                }
                Signal::SIGTTIN => self.dispatch(Event::Grow),
                Signal::SIGTTOU => self.dispatch(Event::Shrink),
                Signal::SIGUSR1 => {
                    logging::reopen();
                    tracing::info!("master reopened log files");
                    self.dispatch(Event::ReopenLogs);
                }
                Signal::SIGUSR2 => self.begin_upgrade(),
                _ => {}
            }
        }
    }

    /// Serve the control socket's waiting commands.
    fn handle_control(&mut self) {
        if !self.answers_control() {
            return;
        }
        let Some(control) = &self.control else { return };
        for (stream, request) in control.accept_all() {
            match request {
                Err(e) => control::finish(&stream, &format!("error: {e}")),
                Ok(Request::Status) => control::finish(&stream, &self.status_text()),
                Ok(Request::Reload) => match self.reload() {
                    Ok(()) => {
                        control::answer(
                            &stream,
                            &format!(
                                "reload accepted: rolling to generation {}",
                                self.pool.generation()
                            ),
                        );
                        self.reload_waiters.push(stream);
                    }
                    Err(e) => control::finish(&stream, &format!("error: {e}")),
                },
                Ok(Request::Scale(n)) => {
                    let from = self.pool.desired();
                    control::finish(&stream, &format!("scaling from {from} to {n} workers"));
                    let event = if n > from { Event::Grow } else { Event::Shrink };
                    for _ in 0..n.abs_diff(from) {
                        self.dispatch(event.clone());
                    }
                }
            }
        }
    }

    /// Whether this master answers the control socket: not while a new master it started
    /// shares it (that one answers).
    fn answers_control(&self) -> bool {
        !matches!(self.succession, Succession::Upgrading(_))
    }

    /// Tell the clients of a reload that it is complete, once it is.
    fn answer_reload_waiters(&mut self) {
        if self.reload_waiters.is_empty() || self.pool.reloading() {
            return;
        }
        let text = format!(
            "reload complete: {}/{} workers ready, generation {}",
            self.pool.serving(),
            self.pool.desired(),
            self.pool.generation()
        );
        for stream in self.reload_waiters.drain(..) {
            control::finish(&stream, &text);
        }
    }

    /// The workers, a line each, for `ferrocorn status`.
    fn status_text(&self) -> String {
        let rows: Vec<String> = ferrocorn_worker::status::workers(self.scoreboard)
            .iter()
            .map(|w| {
                format!(
                    "{:>4} {:>8} {:<9} {:>7.0} {:>8} {:>9} {:>7} {:>10}",
                    w.slot,
                    w.pid,
                    w.state,
                    w.age_seconds,
                    w.requests,
                    w.in_flight,
                    w.rss_bytes >> 20,
                    w.generation
                )
            })
            .collect();
        let mut text = format!(
            "{}/{} workers ready, generation {}{}\n{:>4} {:>8} {:<9} {:>7} {:>8} {:>9} {:>7} {:>10}\n",
            self.pool.serving(),
            self.pool.desired(),
            self.pool.generation(),
            if self.pool.reloading() {
                ", reloading"
            } else {
                ""
            },
            "slot",
            "pid",
            "state",
            "age_s",
            "requests",
            "in_flight",
            "rss_mib",
            "generation"
        );
        for line in rows {
            text.push_str(&line);
            text.push('\n');
        }
        text
    }

    /// Re-read the configuration and roll the pool to it; `Err` says why it is refused (the
    /// running pool then is unchanged).
    fn reload(&mut self) -> Result<(), String> {
        if matches!(self.pool.phase(), Phase::Stopping | Phase::Exited) {
            return Err("the pool is stopping".to_owned());
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
                return Err(format!(
                    "reload refused: {e}; the running pool is unchanged"
                ));
            }
        };
        let new = match Config::resolve(&raw) {
            Ok(config) => config,
            Err(e) => {
                tracing::error!(error = %e, "reload: invalid configuration; the running pool is unchanged");
                return Err(format!(
                    "reload refused: {e}; the running pool is unchanged"
                ));
            }
        };
        if !kept.is_empty() {
            tracing::warn!(keys = ?kept, "reload: these keys take effect only after a restart; keeping their running values");
        }
        std::mem::swap(&mut self.raw, &mut raw);
        self.config = new;
        self.dispatch(Event::Reload {
            workers: self.config.workers,
            timing: timing(&self.config),
        });
        Ok(())
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

    fn on_exit(&mut self, pid: Pid, status: WaitStatus) {
        if let Succession::Upgrading(upgrade) = &self.succession
            && upgrade.pid == pid
        {
            self.succession = Succession::Alone;
            tracing::error!(
                new_master = pid.as_raw(),
                status = %describe(status),
                "binary upgrade failed: the new master exited before it served; this master keeps serving"
            );
            // The lock file still names this master (a new one records itself only when it
            // takes over); the steering the upgrade held back applies again.
            self.steer(self.pool.steered());
            return;
        }
        let Some(child) = self.children.remove(&pid) else {
            tracing::debug!(%pid, ?status, "reaped a process that was not a worker");
            return;
        };
        self.remove_spill_dir(pid);
        let record = self.record(child.record);
        let boot_failure = (record.state() == RecordState::BootFailed
            || matches!(status, WaitStatus::Exited(_, EXIT_BOOT_FAILED)))
        .then(|| record.message());
        record.free();
        self.dispatch(Event::Exited {
            pid,
            status: describe(status),
            boot_failure,
        });
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

    fn record(&self, index: usize) -> &'static ferrocorn_scoreboard::WorkerRecord {
        let scoreboard = self.scoreboard;
        // Indices come from `free_record`, which only hands out valid ones.
        &scoreboard.records()[index]
    }

    /// Report what the workers published since the last look: readiness, retirement requests,
    /// and heartbeats older than `timeout`.
    fn observe(&mut self) {
        let now_ms = monotonic_ms();
        let timeout_ms = self.config.timeout.as_millis() as u64;
        let mut events = Vec::new();
        for (pid, child) in &mut self.children {
            let record = &self.scoreboard.records()[child.record];
            if !child.ready_seen && record.state() == RecordState::Ready {
                child.ready_seen = true;
                events.push(Event::Ready(*pid));
            }
            if child.ready_seen && !child.retire_seen && record.retirement_requested() {
                child.retire_seen = true;
                events.push(Event::RetirementRequested {
                    pid: *pid,
                    requests: record.requests(),
                });
            }
            if !child.silent_seen && now_ms.saturating_sub(record.last_heartbeat_ms()) > timeout_ms
            {
                child.silent_seen = true;
                events.push(Event::Silent(*pid));
            }
        }
        for event in events {
            self.dispatch(event);
        }
    }

    /// Every [`SAMPLE_INTERVAL`]: each worker's RSS and CPU time and each slot's accept queue
    /// into the scoreboard, and the memory guard's verdicts.
    fn sample(&mut self) {
        let now = Instant::now();
        if self
            .last_sample
            .is_some_and(|t| now.saturating_duration_since(t) < SAMPLE_INTERVAL)
        {
            return;
        }
        self.last_sample = Some(now);
        let pool = self.scoreboard.pool();
        PoolCounters::set(&pool.workers_desired, self.pool.desired() as u64);
        for (slot, queued) in self.listeners.accept_queues().into_iter().enumerate() {
            self.scoreboard.set_accept_queue(slot, queued);
        }
        let ceiling = self.config.worker_memory_ceiling(self.pool.desired());
        let mut events = Vec::new();
        let mut pool_rss = 0u64;
        for (pid, child) in &mut self.children {
            let record = &self.scoreboard.records()[child.record];
            let Some((rss, cpu_ms)) = crate::usage::process(pid.as_raw()) else {
                continue;
            };
            record.set_usage(rss, cpu_ms);
            pool_rss += rss;
            let Some(ceiling) = ceiling else { continue };
            if rss > ceiling + ceiling / 2 {
                events.push(Event::OverMemory {
                    pid: *pid,
                    hard: true,
                });
                continue;
            }
            child.over_memory = if rss > ceiling {
                child.over_memory + 1
            } else {
                0
            };
            if child.over_memory >= OVER_MEMORY_SAMPLES && !child.memory_reported {
                child.memory_reported = true;
                tracing::warn!(
                    slot = record.slot(),
                    pid = pid.as_raw(),
                    generation = record.generation(),
                    rss_bytes = rss,
                    ceiling_bytes = ceiling,
                    "worker over max_worker_memory"
                );
                events.push(Event::OverMemory {
                    pid: *pid,
                    hard: false,
                });
            }
        }
        let budget = self.config.duckdb_memory_limit_bytes;
        let over = pool_rss > budget / 10 * 9;
        if over && !self.over_budget {
            tracing::warn!(
                rss_bytes = pool_rss,
                budget_bytes = budget,
                "the pool's resident memory is over 90 % of duckdb_memory_limit"
            );
        }
        self.over_budget = over;
        for event in events {
            self.dispatch(event);
        }
    }

    /// Tell systemd's watchdog the master is alive — only while a quorum of the pool (half its
    /// slots, at least one) has a ready worker with a fresh heartbeat, so that a pool that
    /// cannot serve is restarted.
    fn feed_watchdog(&mut self) {
        let Some(interval) = self.watchdog else {
            return;
        };
        if !self.succession.is_main() {
            return;
        }
        let now = Instant::now();
        if self
            .last_watchdog
            .is_some_and(|t| now.saturating_duration_since(t) < interval / 3)
        {
            return;
        }
        let fresh_ms = (interval.as_millis() as u64).min(self.config.timeout.as_millis() as u64);
        let now_ms = monotonic_ms();
        let alive = self
            .children
            .values()
            .map(|c| self.record(c.record))
            .filter(|r| {
                r.state() == RecordState::Ready
                    && now_ms.saturating_sub(r.last_heartbeat_ms()) <= fresh_ms
            })
            .count();
        let quorum = self.pool.desired().div_ceil(2).max(1);
        if alive >= quorum {
            self.last_watchdog = Some(now);
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
        }
    }

    /// USR2: start the binary again as a new master that takes the pool over once it serves
    /// (see [`crate::upgrade`]).
    fn begin_upgrade(&mut self) {
        let refused = |why: &str| {
            tracing::error!("binary upgrade refused: {why}; this master keeps serving");
        };
        match &self.succession {
            Succession::Upgrading(upgrade) => {
                return refused(&format!(
                    "the new master {} is still starting",
                    upgrade.pid.as_raw()
                ));
            }
            Succession::Alone if self.pool.phase() == Phase::Running => {}
            _ => return refused("the pool is starting, stopping or being taken over"),
        }
        if nix::unistd::getpid().as_raw() == 1 {
            return refused(
                "the master is PID 1 (a container's first process), and the container ends \
                 when it exits: replace the container instead",
            );
        }
        let (Some(exe), Some(control)) = (&self.exe, &self.control) else {
            return refused("the binary's path or the control socket is unknown");
        };
        let pass = upgrade::Pass {
            exe,
            args: &self.args,
            cache_dir: &self.config.cache_dir,
            lock: self.lock.fd(),
            control: control.listener().as_fd(),
            listeners: self
                .listeners
                .passable()
                .into_iter()
                .map(|(fd, slot, _)| (fd, slot))
                .collect(),
            activated: self.listeners.is_activated(),
        };
        match Upgrade::start(pass, Instant::now() + self.config.timeout) {
            Ok(upgrade) => {
                tracing::info!(
                    new_master = upgrade.pid.as_raw(),
                    exe = %exe.display(),
                    "binary upgrade: started a new master; this one serves until it is ready"
                );
                self.succession = Succession::Upgrading(upgrade);
            }
            Err(e) => refused(&format!("cannot start {}: {e}", exe.display())),
        }
    }

    /// The old master's side of an upgrade: retire once the new master serves; stop it if it
    /// is not ready within `timeout` (its exit is then reaped as a failed upgrade).
    fn watch_upgrade(&mut self) {
        let Succession::Upgrading(upgrade) = &mut self.succession else {
            return;
        };
        let pid = upgrade.pid;
        if upgrade.is_ready() {
            if let Succession::Upgrading(upgrade) =
                std::mem::replace(&mut self.succession, Succession::HandedOver)
            {
                self.retire_for(pid);
                upgrade.acknowledge();
            }
        } else if Instant::now() >= upgrade.deadline && !upgrade.stopped {
            tracing::error!(
                new_master = pid.as_raw(),
                timeout_s = self.config.timeout.as_secs(),
                "binary upgrade: the new master is not ready within timeout; stopping it"
            );
            let _ = kill(pid, Signal::SIGQUIT);
            upgrade.stopped = true;
            upgrade.deadline = Instant::now() + self.config.graceful_timeout;
        } else if Instant::now() >= upgrade.deadline {
            tracing::error!(
                new_master = pid.as_raw(),
                "binary upgrade: the new master did not stop; killing it"
            );
            let _ = kill(pid, Signal::SIGKILL);
            upgrade.deadline = Instant::now() + self.config.graceful_timeout;
        }
    }

    /// The new master `successor` serves: hand it the pool and drain this one's workers.
    fn retire_for(&mut self, successor: Pid) {
        tracing::info!(
            new_master = successor.as_raw(),
            "binary upgrade: the new master serves; this master drains its workers and exits"
        );
        let status = format!("upgraded: master pid {}", successor.as_raw());
        let _ = sd_notify::notify(&[
            sd_notify::NotifyState::MainPid(successor.as_raw() as u32),
            sd_notify::NotifyState::Status(&status),
        ]);
        // The socket files, the control socket and the pid file are the new master's now.
        if let Some(control) = self.control.take() {
            control.close_keeping_file();
        }
        self.listeners.disown_files();
        self.dispatch(Event::Stop { quick: false });
    }

    /// The new master's side: every worker serves, so this master becomes the pool's.
    fn take_over(&mut self) {
        let Succession::Successor(successor) =
            std::mem::replace(&mut self.succession, Succession::Alone)
        else {
            return;
        };
        if let Some(path) = &self.config.pidfile {
            match PidFile::create(path) {
                Ok(pidfile) => self.pidfile = Some(pidfile),
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "cannot write the pid file")
                }
            }
        }
        if let Err(e) = self.lock.record_holder() {
            tracing::warn!(error = %e, "cannot record this master in the lock file");
        }
        if let Some(control) = &mut self.control {
            control.claim_file(&self.config.cache_dir);
        }
        self.listeners.claim_files();
        self.listeners.release_surplus();
        self.steer(self.pool.steered());
        let old = successor.parent.as_raw();
        match successor.take_over() {
            Ok(handover) => {
                tracing::info!(
                    old_master = old,
                    "binary upgrade complete: this master serves; the old one retires"
                );
                self.succession = Succession::HandingOver(handover);
            }
            Err(e) => {
                tracing::warn!(old_master = old, error = %e, "cannot tell the old master to retire");
                self.settle_handover();
            }
        }
    }

    /// Once the old master has told systemd this one is the main process: say what the pool
    /// is, and keep its listeners in systemd's store.
    fn watch_handover(&mut self) {
        if let Succession::HandingOver(handover) = &self.succession
            && handover.is_settled()
        {
            self.succession = Succession::Alone;
            self.settle_handover();
        }
    }

    fn settle_handover(&mut self) {
        self.perform(Action::Notify(Notice::Ready));
        self.store_listeners();
    }

    /// Keep the listening sockets in systemd's file-descriptor store, so that a restart
    /// passes them to the next master and no connection is refused meanwhile; first drop what
    /// the store passed at start (sockets no longer used, or stored under other names).
    fn store_listeners(&mut self) {
        if !self.keeps_fd_store() {
            return;
        }
        use sd_notify::NotifyState;
        for name in self.passed_store_names.drain(..) {
            let _ = sd_notify::notify(&[NotifyState::FdStoreRemove, NotifyState::FdName(&name)]);
        }
        for (fd, _, name) in self.listeners.passable() {
            if let Err(e) = sd_notify::notify_with_fds(
                &[NotifyState::FdStore, NotifyState::FdName(&name)],
                &[fd],
            ) {
                tracing::warn!(error = %e, name, "cannot store a listener with systemd");
            }
        }
    }

    /// Drop slot `slot`'s sockets from systemd's store (the slot is closed).
    fn unstore_slot(&self, slot: usize) {
        if !self.keeps_fd_store() {
            return;
        }
        for name in self.listeners.slot_store_names(slot) {
            let _ = sd_notify::notify(&[
                sd_notify::NotifyState::FdStoreRemove,
                sd_notify::NotifyState::FdName(&name),
            ]);
        }
    }

    /// Whether this master keeps its listeners in systemd's store: systemd has one, the
    /// sockets are not a `.socket` unit's (systemd holds those anyway), and this master is the
    /// service's main process.
    fn keeps_fd_store(&self) -> bool {
        self.fd_store && !self.listeners.is_activated() && self.succession.is_main()
    }

    /// Steer new connections to the first `active` slots (none before a slot is ready).
    fn steer(&self, active: usize) {
        if active > 0
            && let Err(e) = self.listeners.steer(active)
        {
            tracing::warn!(error = %e, "cannot steer SO_REUSEPORT listeners");
        }
    }

    fn free_record(&self) -> Option<usize> {
        (0..MAX_RECORDS).find(|&i| {
            self.scoreboard.records()[i].state() == RecordState::Free
                && !self.children.values().any(|c| c.record == i)
        })
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

    fn spawn(&mut self, slot: usize, generation: u64) -> std::io::Result<Pid> {
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
}

/// What a master starts with besides its configuration: the pool's lock, control socket and
/// listeners, fresh or from a predecessor.
struct Start {
    lock: PoolLock,
    control: ControlSocket,
    listeners: Listeners,
    successor: Option<Successor>,
    passed_store_names: Vec<String>,
}

impl Start {
    /// A master started by the operator or systemd: lock and bind, adopting what systemd passed
    /// (a `.socket` unit's sockets, or the listeners an earlier master kept in its
    /// file-descriptor store).
    fn fresh(config: &Config) -> Result<Self, StartError> {
        let lock = PoolLock::acquire(&config.cache_dir).map_err(StartError::Locked)?;
        let control = ControlSocket::bind(&config.cache_dir)
            .map_err(|e| StartError::Os("binding the control socket", e))?;
        let mut units = Vec::new();
        let mut stored = Vec::new();
        let mut passed_store_names = Vec::new();
        for (fd, name) in sys::passed_descriptors()
            .map_err(|e| StartError::Os("adopting systemd's sockets", e))?
        {
            match crate::listeners::stored_role(&name) {
                Some(slot) => {
                    stored.push((fd, slot));
                    passed_store_names.push(name);
                }
                None => units.push(fd),
            }
        }
        let listeners = if units.is_empty() {
            if !stored.is_empty() {
                tracing::info!(
                    sockets = stored.len(),
                    "adopting the listeners systemd kept in its file-descriptor store"
                );
            }
            let listeners =
                Listeners::adopt(config, config.workers, stored).map_err(StartError::Bind)?;
            // Passed sockets of slots this pool no longer has must not receive anything more.
            if listeners.has_surplus()
                && let Err(e) = listeners.steer(config.workers)
            {
                tracing::warn!(error = %e, "cannot steer SO_REUSEPORT listeners");
            }
            listeners
        } else {
            Listeners::activated(config, units)
                .map_err(|e| StartError::Os("adopting systemd's sockets", e))?
        };
        Ok(Self {
            lock,
            control,
            listeners,
            successor: None,
            passed_store_names,
        })
    }

    /// The new master of a binary upgrade: the old master's lock, control socket and listeners
    /// (a lock and control socket of another cache directory are not taken: the configuration
    /// moved it).
    fn from_predecessor(
        config: &Config,
        inherited: upgrade::Inherited,
    ) -> Result<Self, StartError> {
        let same_dir = inherited.cache_dir == config.cache_dir;
        let lock = if same_dir {
            PoolLock::adopt(inherited.lock)
        } else {
            PoolLock::acquire(&config.cache_dir).map_err(StartError::Locked)?
        };
        let control = if same_dir {
            ControlSocket::adopt(inherited.control)
        } else {
            ControlSocket::bind(&config.cache_dir)
        }
        .map_err(|e| StartError::Os("taking the control socket", e))?;
        let mut listeners = if inherited.activated {
            let fds = inherited.listeners.into_iter().map(|(fd, _)| fd).collect();
            Listeners::activated(config, fds)
                .map_err(|e| StartError::Os("adopting the old master's sockets", e))?
        } else {
            Listeners::adopt(config, config.workers, inherited.listeners)
                .map_err(StartError::Bind)?
        };
        listeners.disown_files();
        Ok(Self {
            lock,
            control,
            listeners,
            successor: Some(inherited.successor),
            passed_store_names: Vec::new(),
        })
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

/// Give the workers' user what it must write: the cache directory (recursively: snapshots and
/// results from earlier runs) and the log files (created if missing), which workers reopen on
/// SIGUSR1. The lock file and the control socket stay the master's (a worker must not be able
/// to reload or resize its own pool).
fn hand_over(config: &Config, run_as: &RunAs) -> std::io::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    let owner = |path: &std::path::Path| {
        std::os::unix::fs::chown(path, Some(run_as.uid.as_raw()), Some(run_as.gid.as_raw()))
    };
    fn walk(
        dir: &std::path::Path,
        owner: &dyn Fn(&std::path::Path) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        owner(dir)?;
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                walk(&entry.path(), owner)?;
            } else if !kind.is_symlink()
                && entry.file_name() != crate::pool_lock::LOCK_FILE
                && entry.file_name() != crate::control::SOCKET_NAME
            {
                owner(&entry.path())?;
            }
        }
        Ok(())
    }
    walk(&config.cache_dir, &owner)?;
    for log in config.log_files() {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        owner(&log)?;
    }
    Ok(())
}

/// The pool's clock settings from `config`.
fn timing(config: &Config) -> Timing {
    Timing {
        graceful_timeout: config.graceful_timeout,
        recycle_interval: config.recycle_interval,
    }
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
