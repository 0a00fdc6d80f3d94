//! The master process: the loop that supervises the worker pool.
//!
//! After start-up the master only watches. Its loop waits (with `poll`) on a `signalfd` and on a
//! wake-up pipe the workers write to, then turns what it finds into [`Event`]s for the
//! [`Pool`]: signals, reaped children (`waitpid(-1)`), and what the scoreboard shows (a worker
//! ready, asking for retirement, or silent past `timeout`), then a tick for the clock. What to do
//! is the pool's decision ([`crate::pool`]); this module performs its [`Action`]s: forking a
//! worker, signalling one, steering and opening or closing listeners, telling systemd.
//!
//! # Layout
//!
//! This file is the loop and what each turn of it does: wait, read the signals, reap, observe
//! the scoreboard, dispatch to the pool and perform its actions. Each other concern is a child
//! module, an `impl Master` block of its own:
//!
//! - `start`: what a master starts with (lock, control socket, listeners: fresh, from systemd
//!   or from a predecessor), the signals it blocks, the files handed to the workers' user.
//! - `spawn`: forking a worker, everything the child sheds before it runs the worker, its
//!   settings, and its spill directory.
//! - `stop`: a stop signal becomes the pool's stop, and the drain starts by closing the
//!   listeners.
//! - `commands`: the operator's commands (`status`, `reload`, `scale`) on the control socket,
//!   and the reload HUP also uses.
//! - `sampling`: memory, CPU and accept queues each second, the memory guard, systemd's
//!   watchdog.
//! - `succession`: where this master stands in a binary upgrade, and each step of the hand-off.
//! - `fd_store`: keeping the listeners in systemd's file-descriptor store.

mod commands;
mod fd_store;
mod sampling;
mod spawn;
mod start;
mod stop;
mod succession;

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use ferrocorn_scoreboard::{RecordState, Scoreboard, monotonic_ms};
use ferrocorn_worker::EXIT_BOOT_FAILED;
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{Signal, kill};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use crate::cli::Cli;
use crate::config::{Config, RawConfig};
use crate::control::ControlSocket;
use crate::listeners::Listeners;
use crate::pidfile::PidFile;
use crate::pool::{Action, Event, Notice, Pool, Timing};
use crate::pool_lock::PoolLock;
use crate::upgrade;
use crate::{StartError, logging};

use self::start::{Start, hand_over, handled_signals};
use self::succession::Succession;

/// How long the master sleeps at most between two looks at the pool.
const TICK: Duration = Duration::from_millis(100);

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
            Action::CloseListeners => {
                self.close_listeners();
                None
            }
            Action::Deregister => {
                self.deregister();
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
            match signal {
                Signal::SIGTERM | Signal::SIGINT | Signal::SIGQUIT => self.stop(signal),
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

    /// Steer new connections to the first `active` slots (none before a slot is ready).
    fn steer(&self, active: usize) {
        if active > 0
            && let Err(e) = self.listeners.steer(active)
        {
            tracing::warn!(error = %e, "cannot steer SO_REUSEPORT listeners");
        }
    }
}

/// The pool's clock settings from `config`.
fn timing(config: &Config) -> Timing {
    Timing {
        graceful_timeout: config.graceful_timeout,
        recycle_interval: config.recycle_interval,
        deregistration_delay: config.deregistration_delay,
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
