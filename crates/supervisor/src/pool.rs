//! The pool's bookkeeping as a state machine: events in, actions out.
//!
//! [`Pool`] knows the slots, the workers as the master sees them, and the master's phase. It does
//! no I/O and reads no clock: [`crate::master`] turns what happens (signals, exits, what the
//! scoreboard shows, the passing of time) into [`Event`]s, hands each to [`Pool::handle`] with
//! the current time, and performs the [`Action`]s it returns (fork, signal, steer, the
//! listeners, systemd). An action whose outcome matters (a fork, a new listener) is answered by
//! an event. So every decision the master makes can be driven, and checked, by a test.
//!
//! # Slots and replacement
//!
//! The pool is a list of slots. Each slot has at most one *serving* worker (always ready) and at
//! most one *successor* (booting). Every new worker starts as a successor and is promoted when it
//! reports ready; the worker it replaces is then told to drain (SIGTERM). So a slot is refilled,
//! recycled (request budget), rolled (HUP) or grown the same way, and nothing is ever replaced by
//! a worker that is not ready (invariant 3). Planned replacements run one at a time, and a
//! recycle (a worker that served its request budget) starts no sooner than
//! [`Timing::recycle_interval`] after the previous one, so the pool's recycling rate stays bounded
//! whatever its request rate (a reload roll is not paced: the operator asked for it). Refilling a
//! slot that lost its worker is immediate, with exponential backoff on repeated failures.
//!
//! Removing a slot (TTOU, a smaller pool after HUP) steers new connections away from it first,
//! then drains its workers; its listener closes once they have exited. The pool grows only when
//! no removed slot is left, so that slot `i` stays socket `i` of its `SO_REUSEPORT` group.
//!
//! # Lifecycle
//!
//! The master goes through [`Phase`]s: `Starting` until every slot has a ready worker,
//! `Running`, `Stopping` after TERM/INT/QUIT (or a fatal boot failure), `Exited` once the last
//! worker is gone. Each worker goes through [`WorkerPhase`]s as the master sees them.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ferrocorn_scoreboard::{ExitCause, MAX_WORKERS};
use ferrocorn_worker::EXIT_BOOT_FAILED;
use nix::sys::signal::Signal;
use nix::unistd::Pid;

/// Consecutive boot failures, with no worker ready in between, after which the master gives up.
const CRASH_LOOP_LIMIT: u32 = 10;
/// Time between SIGABRT and SIGKILL for a worker that missed its heartbeat.
const KILL_GRACE: Duration = Duration::from_millis(500);
/// Time a quick stop (INT/QUIT) gives workers before SIGKILL.
const QUICK_STOP_GRACE: Duration = Duration::from_secs(2);
/// A worker that served this long before it failed resets its slot's backoff.
const STABLE_AFTER: Duration = Duration::from_secs(10);

/// The master's phases, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Starting,
    Running,
    /// TERM with a `deregistration_delay`: `/readyz` answers 503 so that a load balancer stops
    /// sending, while the pool serves on; the stop begins when the delay is over.
    Deregistering,
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

/// What happened, as the master saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// TERM (drain within `graceful_timeout`), or INT/QUIT (`quick`: within two seconds).
    Stop { quick: bool },
    /// HUP with a configuration that validated: a new generation of `workers` slots.
    Reload { workers: usize, timing: Timing },
    /// TTIN: one worker more.
    Grow,
    /// TTOU: one worker fewer (never fewer than one).
    Shrink,
    /// USR1: the master reopened its logs; the workers are to reopen theirs.
    ReopenLogs,
    /// The fork of [`Action::Spawn`] succeeded.
    Spawned { slot: usize, pid: Pid },
    /// The fork of [`Action::Spawn`] failed.
    SpawnFailed { slot: usize },
    /// [`Action::AddSlot`] succeeded, or failed (the pool then stays at its current size).
    SlotAdded { ok: bool },
    /// A worker's record says it is ready.
    Ready(Pid),
    /// A worker's record asks for retirement (it served its request budget).
    RetirementRequested { pid: Pid, requests: u64 },
    /// A worker's heartbeat is older than `timeout`.
    Silent(Pid),
    /// A worker's resident memory stayed over `max_worker_memory` (`hard`: over the hard
    /// ceiling once): recycled gracefully, or killed if `hard`.
    OverMemory { pid: Pid, hard: bool },
    /// A child was reaped. `boot_failure` is its record's reason when the worker said it could
    /// not boot (its record, or its exit code).
    Exited {
        pid: Pid,
        status: String,
        boot_failure: Option<String>,
    },
    /// Time passed: deadlines and backoffs.
    Tick,
}

/// What the master is to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Fork a worker of `generation` for `slot`; answer with [`Event::Spawned`] or
    /// [`Event::SpawnFailed`].
    Spawn { slot: usize, generation: u64 },
    /// Send `signal` to a worker: SIGTERM drains it, SIGQUIT stops it quickly, SIGKILL ends it,
    /// SIGUSR1 reopens its logs.
    Signal { pid: Pid, signal: Signal },
    /// The worker missed its heartbeat: say what it was doing and send it SIGABRT.
    Abort { pid: Pid, slot: usize },
    /// Steer new connections to the first `active` slots.
    Steer { active: usize },
    /// Open the listener of a new last slot; answer with [`Event::SlotAdded`].
    AddSlot,
    /// Take the last slot's listener out of the pool; keep it open until [`Action::CloseSlot`].
    RemoveSlot { slot: usize },
    /// The removed slot's workers are gone: close its listener.
    CloseSlot { slot: usize },
    /// TERM with a de-registration delay: turn every worker's `/readyz` to 503 (the pool
    /// serves on until the delay is over).
    Deregister,
    /// The pool stops: close the master's copies of every listener at once, so that a client
    /// arriving during the drain is refused (nothing delivered, safe to retry elsewhere)
    /// instead of being queued by the kernel and reset when the last copy closes. Each worker
    /// takes what is already queued for it before it closes its own copy; a socket that
    /// systemd's store or a new master of a binary upgrade also holds stays open for them.
    CloseListeners,
    /// Tell systemd.
    Notify(Notice),
    /// The pool cannot serve: report `reason` where the operator sees it. A stop follows.
    Fatal { reason: String },
    /// A worker ended, for `cause` (the master counts it for `/metrics`).
    CountExit(ExitCause),
    /// Every worker is gone: exit with `code`.
    Exit { code: i32 },
}

/// What systemd is told (`sd_notify`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Notice {
    Ready,
    Reloading,
    Stopping,
}

/// The pool's clock settings (from the configuration; a reload may change them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// How long a draining worker has before it is killed (`graceful_timeout`).
    pub graceful_timeout: Duration,
    /// Least time between the starts of two recycles (`recycle_interval`).
    pub recycle_interval: Duration,
    /// How long a TERM keeps the pool serving with `/readyz` at 503 before the drain starts
    /// (`deregistration_delay`; zero: the drain starts at once).
    pub deregistration_delay: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Successor {
    /// [`Action::Spawn`] was returned; the master has not answered yet.
    Forking,
    Booting(Pid),
}

#[derive(Debug)]
struct Slot {
    serving: Option<Pid>,
    successor: Option<Successor>,
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

    /// Forget `pid` if it is this slot's serving worker or successor.
    fn forget(&mut self, pid: Pid) {
        if self.serving == Some(pid) {
            self.serving = None;
        }
        if self.successor == Some(Successor::Booting(pid)) {
            self.successor = None;
        }
    }

    /// Count a failure of `worker`: the slot is refilled after the backoff.
    fn note_failure(&mut self, worker: &Worker, now: Instant) {
        if worker
            .ready_at
            .is_some_and(|t| now.saturating_duration_since(t) >= STABLE_AFTER)
        {
            self.failures = 0;
        }
        self.failures += 1;
        self.not_before = Some(now + backoff(self.failures));
    }
}

#[derive(Debug)]
struct Worker {
    slot: usize,
    generation: u64,
    phase: WorkerPhase,
    spawned: Instant,
    ready_at: Option<Instant>,
    /// When it entered its phase.
    since: Instant,
    kill_sent: bool,
    /// Why it is to be replaced (its budget spent, or the memory guard), if it is.
    retire: Option<ExitCause>,
    /// Why it is ending, once it is told to.
    cause: Option<ExitCause>,
}

/// The pool's state; see the module documentation.
#[derive(Debug)]
pub struct Pool {
    phase: Phase,
    generation: u64,
    desired: usize,
    timing: Timing,
    started: Instant,
    /// When the last recycle's successor was spawned.
    last_recycle: Option<Instant>,
    stop_deadline: Option<Instant>,
    /// When a de-registration ends and the stop begins.
    deregistered_at: Option<Instant>,
    exit_code: i32,
    slots: Vec<Slot>,
    /// Removed slots whose workers have not all exited yet.
    retiring: Vec<usize>,
    /// An [`Action::AddSlot`] awaits its answer.
    adding_slot: bool,
    workers: BTreeMap<Pid, Worker>,
    steered: usize,
    ever_ready: bool,
    boot_failures_in_a_row: u32,
    reload_pending: bool,
    actions: Vec<Action>,
}

impl Pool {
    /// A pool of `workers` empty slots; the first event fills them.
    pub fn new(workers: usize, timing: Timing, now: Instant) -> Self {
        tracing::info!(pid = std::process::id(), phase = ?Phase::Starting, "master phase");
        tracing::info!(pid = std::process::id(), workers, "master starting");
        Self {
            phase: Phase::Starting,
            generation: 1,
            desired: workers,
            timing,
            started: now,
            last_recycle: None,
            stop_deadline: None,
            deregistered_at: None,
            exit_code: 0,
            slots: (0..workers).map(|_| Slot::new()).collect(),
            retiring: Vec::new(),
            adding_slot: false,
            workers: BTreeMap::new(),
            steered: 0,
            ever_ready: false,
            boot_failures_in_a_row: 0,
            reload_pending: false,
            actions: Vec::new(),
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The configuration generation the pool serves (1 at start, one more per accepted HUP).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Slots with a ready worker serving them.
    pub fn serving(&self) -> usize {
        self.slots.iter().filter(|s| s.serving.is_some()).count()
    }

    /// Whether a reload's roll is under way.
    pub fn reloading(&self) -> bool {
        self.reload_pending
    }

    /// The pool's size as it should be (workers split the memory budget by it).
    pub fn desired(&self) -> usize {
        self.desired
    }

    /// The slots new connections are steered to (the last [`Action::Steer`]'s; 0 before any).
    pub fn steered(&self) -> usize {
        self.steered
    }

    /// Apply `event`, seen at `now`; returns what the master is to do, in order.
    pub fn handle(&mut self, event: Event, now: Instant) -> Vec<Action> {
        if self.phase != Phase::Exited {
            self.apply(event, now);
            self.settle(now);
        }
        std::mem::take(&mut self.actions)
    }

    fn apply(&mut self, event: Event, now: Instant) {
        match event {
            Event::Stop { quick } => self.begin_stop(quick, now),
            Event::Reload { workers, timing } => self.reload(workers, timing),
            Event::Grow => {
                if !self.leaving() && self.desired < MAX_WORKERS {
                    self.desired += 1;
                }
                tracing::info!(workers = self.desired, "pool size");
            }
            Event::Shrink => {
                if !self.leaving() {
                    self.desired = self.desired.saturating_sub(1).max(1);
                }
                tracing::info!(workers = self.desired, "pool size");
            }
            Event::ReopenLogs => {
                for pid in self.workers.keys() {
                    self.actions.push(Action::Signal {
                        pid: *pid,
                        signal: Signal::SIGUSR1,
                    });
                }
            }
            Event::Spawned { slot, pid } => self.spawned(slot, pid, now),
            Event::SpawnFailed { slot } => {
                if let Some(slot) = self.slots.get_mut(slot)
                    && slot.successor == Some(Successor::Forking)
                {
                    slot.successor = None;
                    slot.failures += 1;
                    slot.not_before = Some(now + backoff(slot.failures));
                }
            }
            Event::SlotAdded { ok } => {
                if std::mem::take(&mut self.adding_slot) {
                    if ok {
                        tracing::info!(slot = self.slots.len(), "adding slot");
                        self.slots.push(Slot::new());
                    } else {
                        self.desired = self.slots.len();
                    }
                }
            }
            Event::Ready(pid) => self.ready(pid, now),
            Event::RetirementRequested { pid, requests } => {
                if let Some(worker) = self.workers.get_mut(&pid)
                    && worker.phase == WorkerPhase::Ready
                    && worker.retire.is_none()
                {
                    worker.retire = Some(ExitCause::MaxRequests);
                    tracing::info!(
                        slot = worker.slot,
                        pid = pid.as_raw(),
                        requests,
                        "worker reached its request budget; recycling"
                    );
                }
            }
            Event::Silent(pid) => self.silent(pid, now),
            Event::OverMemory { pid, hard } => self.over_memory(pid, hard, now),
            Event::Exited {
                pid,
                status,
                boot_failure,
            } => self.exited(pid, &status, boot_failure, now),
            Event::Tick => {}
        }
    }

    /// What follows any event: deadlines, progress, and the pool brought to what it should be.
    fn settle(&mut self, now: Instant) {
        self.check_deadlines(now);
        self.note_progress(now);
        self.reconcile(now);
        if self.phase == Phase::Stopping
            && self.workers.is_empty()
            && !self.slots.iter().any(|s| s.successor.is_some())
        {
            self.enter(Phase::Exited);
            self.actions.push(Action::Exit {
                code: self.exit_code,
            });
        }
    }

    fn enter(&mut self, phase: Phase) {
        if self.phase != phase {
            tracing::info!(pid = std::process::id(), phase = ?phase, "master phase");
        }
        self.phase = phase;
    }

    /// Whether the pool is on its way out (de-registering or stopping): it changes its size and
    /// configuration no more.
    fn leaving(&self) -> bool {
        matches!(
            self.phase,
            Phase::Deregistering | Phase::Stopping | Phase::Exited
        )
    }

    /// TERM (`quick`: INT, QUIT). With a de-registration delay, TERM first takes the pool out of
    /// its load balancer's rotation (`/readyz` 503) and serves on; the stop begins when the delay
    /// is over ([`Self::check_deadlines`]), or at once on a quick stop.
    fn begin_stop(&mut self, quick: bool, now: Instant) {
        if quick || self.timing.deregistration_delay.is_zero() {
            return self.stop(quick, now);
        }
        if self.leaving() {
            return;
        }
        self.deregistered_at = Some(now + self.timing.deregistration_delay);
        self.enter(Phase::Deregistering);
        tracing::info!(
            delay_ms = self.timing.deregistration_delay.as_millis() as u64,
            "de-registering: /readyz answers 503 while the pool serves on, then the workers drain"
        );
        self.actions.push(Action::Deregister);
        self.actions.push(Action::Notify(Notice::Stopping));
    }

    fn stop(&mut self, quick: bool, now: Instant) {
        if self.phase == Phase::Stopping && !quick {
            return;
        }
        if self.phase != Phase::Stopping {
            self.actions.push(Action::CloseListeners);
        }
        if self.phase != Phase::Deregistering {
            self.actions.push(Action::Notify(Notice::Stopping));
        }
        let grace = if quick {
            QUICK_STOP_GRACE
        } else {
            self.timing.graceful_timeout
        };
        let deadline = now + grace;
        self.stop_deadline = Some(
            self.stop_deadline
                .map_or(deadline, |existing| existing.min(deadline)),
        );
        self.enter(Phase::Stopping);
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
            self.actions.push(Action::Signal { pid: *pid, signal });
            worker.cause.get_or_insert(ExitCause::Stop);
            if worker.phase != WorkerPhase::Killed {
                worker.phase = WorkerPhase::Draining;
                worker.since = now;
            }
        }
    }

    fn reload(&mut self, workers: usize, timing: Timing) {
        if self.leaving() {
            return;
        }
        self.generation += 1;
        self.desired = workers.clamp(1, MAX_WORKERS);
        self.timing = timing;
        self.reload_pending = true;
        self.actions.push(Action::Notify(Notice::Reloading));
        tracing::info!(
            generation = self.generation,
            workers = self.desired,
            "reloading: rolling every worker"
        );
    }

    fn spawned(&mut self, slot_index: usize, pid: Pid, now: Instant) {
        let expected = self.phase != Phase::Stopping
            && self
                .slots
                .get(slot_index)
                .is_some_and(|s| s.successor == Some(Successor::Forking));
        let phase = if expected {
            self.slots[slot_index].successor = Some(Successor::Booting(pid));
            WorkerPhase::Booting
        } else {
            // Nobody wants it any more: it drains at once.
            self.actions.push(Action::Signal {
                pid,
                signal: Signal::SIGTERM,
            });
            WorkerPhase::Draining
        };
        self.workers.insert(
            pid,
            Worker {
                slot: slot_index,
                generation: self.generation,
                phase,
                spawned: now,
                ready_at: None,
                since: now,
                kill_sent: false,
                retire: None,
                cause: None,
            },
        );
    }

    /// A worker is ready: it becomes its slot's serving worker, and the one it replaces drains.
    fn ready(&mut self, pid: Pid, now: Instant) {
        let Some(worker) = self.workers.get_mut(&pid) else {
            return;
        };
        if worker.phase != WorkerPhase::Booting {
            return;
        }
        worker.phase = WorkerPhase::Ready;
        worker.ready_at = Some(now);
        worker.since = now;
        let slot_index = worker.slot;
        tracing::info!(
            slot = slot_index,
            pid = pid.as_raw(),
            boot_ms = now.saturating_duration_since(worker.spawned).as_millis() as u64,
            "worker ready"
        );
        self.ever_ready = true;
        self.boot_failures_in_a_row = 0;
        let Some(slot) = self.slots.get_mut(slot_index) else {
            return;
        };
        if slot.successor != Some(Successor::Booting(pid)) {
            return;
        }
        slot.successor = None;
        slot.ever_ready = true;
        if let Some(old) = slot.serving.replace(pid) {
            self.drain(old, "replaced by a ready successor", now);
        }
        self.update_steering();
    }

    fn drain(&mut self, pid: Pid, why: &str, now: Instant) {
        let Some(worker) = self.workers.get_mut(&pid) else {
            return;
        };
        if matches!(worker.phase, WorkerPhase::Draining | WorkerPhase::Killed) {
            return;
        }
        tracing::info!(
            slot = worker.slot,
            pid = pid.as_raw(),
            generation = worker.generation,
            why,
            cause = worker.cause.map_or("", ExitCause::label),
            "worker draining"
        );
        worker.phase = WorkerPhase::Draining;
        worker.since = now;
        self.actions.push(Action::Signal {
            pid,
            signal: Signal::SIGTERM,
        });
    }

    fn silent(&mut self, pid: Pid, now: Instant) {
        let Some(worker) = self.workers.get_mut(&pid) else {
            return;
        };
        if !matches!(worker.phase, WorkerPhase::Booting | WorkerPhase::Ready) {
            return;
        }
        self.actions.push(Action::Abort {
            pid,
            slot: worker.slot,
        });
        worker.cause = Some(ExitCause::Timeout);
        worker.phase = WorkerPhase::Killed;
        worker.since = now;
        if let Some(slot) = self.slots.get_mut(worker.slot) {
            slot.forget(pid);
            slot.note_failure(worker, now);
        }
    }

    /// The memory guard's verdict on `pid`: a successor first, or (`hard`) a kill at once.
    fn over_memory(&mut self, pid: Pid, hard: bool, now: Instant) {
        let Some(worker) = self.workers.get_mut(&pid) else {
            return;
        };
        if hard {
            if matches!(worker.phase, WorkerPhase::Killed) {
                return;
            }
            tracing::error!(
                slot = worker.slot,
                pid = pid.as_raw(),
                generation = worker.generation,
                cause = "memory",
                "worker over the hard memory ceiling; killing it"
            );
            worker.cause = Some(ExitCause::Memory);
            worker.phase = WorkerPhase::Killed;
            worker.since = now;
            worker.kill_sent = true;
            self.actions.push(Action::Signal {
                pid,
                signal: Signal::SIGKILL,
            });
            if let Some(slot) = self.slots.get_mut(worker.slot) {
                slot.forget(pid);
            }
        } else if worker.phase == WorkerPhase::Ready && worker.retire.is_none() {
            tracing::warn!(
                slot = worker.slot,
                pid = pid.as_raw(),
                generation = worker.generation,
                cause = "memory",
                "worker over max_worker_memory; recycling it once its successor is ready"
            );
            worker.retire = Some(ExitCause::Memory);
        }
    }

    fn exited(&mut self, pid: Pid, status: &str, boot_failure: Option<String>, now: Instant) {
        let Some(worker) = self.workers.remove(&pid) else {
            tracing::debug!(%pid, status, "reaped a process that was not a worker");
            return;
        };
        let boot_failed = worker.ready_at.is_none() && boot_failure.is_some();
        let reason = boot_failure.unwrap_or_default();
        let expected = matches!(worker.phase, WorkerPhase::Draining | WorkerPhase::Killed);
        let cause = match worker.cause {
            Some(cause) if expected => cause,
            _ => ExitCause::Crash,
        };
        self.actions.push(Action::CountExit(cause));
        if expected {
            tracing::info!(
                slot = worker.slot,
                pid = pid.as_raw(),
                generation = worker.generation,
                cause = cause.label(),
                status,
                "worker exited"
            );
        } else if boot_failed {
            tracing::error!(slot = worker.slot, pid = pid.as_raw(), generation = worker.generation, cause = "crash", status, reason = %reason, "worker failed to boot");
        } else {
            tracing::warn!(
                slot = worker.slot,
                pid = pid.as_raw(),
                generation = worker.generation,
                cause = "crash",
                status,
                "worker died unexpectedly"
            );
        }
        if let Some(slot) = self.slots.get_mut(worker.slot) {
            slot.forget(pid);
            if !expected {
                slot.note_failure(&worker, now);
            }
        }
        if boot_failed && self.phase != Phase::Stopping {
            self.boot_failures_in_a_row += 1;
            let serving = self.slots.iter().any(|s| s.serving.is_some());
            if !self.ever_ready {
                self.fail(format!("worker failed to boot: {reason}"), now);
            } else if !serving && self.boot_failures_in_a_row >= CRASH_LOOP_LIMIT {
                self.fail(
                    format!(
                        "no worker serving and {} boots failed in a row; last: {reason}",
                        self.boot_failures_in_a_row
                    ),
                    now,
                );
            }
        }
    }

    fn fail(&mut self, reason: String, now: Instant) {
        tracing::error!(reason = %reason, "stopping the pool");
        self.actions.push(Action::Fatal { reason });
        self.exit_code = EXIT_BOOT_FAILED;
        self.begin_stop(true, now);
    }

    /// Kill escalation, drain deadlines, the stop deadline.
    fn check_deadlines(&mut self, now: Instant) {
        if self.phase == Phase::Deregistering && self.deregistered_at.is_some_and(|t| now >= t) {
            tracing::info!("de-registration delay over: the workers drain");
            self.stop(false, now);
        }
        let drain_limit = self.timing.graceful_timeout + KILL_GRACE;
        let stop_passed = self.stop_deadline.is_some_and(|deadline| now >= deadline);
        for (pid, worker) in &mut self.workers {
            if worker.kill_sent {
                continue;
            }
            let in_phase = now.saturating_duration_since(worker.since);
            let overdue = match worker.phase {
                WorkerPhase::Killed => in_phase >= KILL_GRACE,
                WorkerPhase::Draining if in_phase > drain_limit => {
                    tracing::warn!(
                        slot = worker.slot,
                        pid = pid.as_raw(),
                        "worker did not finish draining in time; killing"
                    );
                    true
                }
                _ => false,
            };
            if !overdue && stop_passed {
                tracing::warn!(
                    slot = worker.slot,
                    pid = pid.as_raw(),
                    "stop deadline passed; killing worker"
                );
            }
            if overdue || stop_passed {
                worker.kill_sent = true;
                self.actions.push(Action::Signal {
                    pid: *pid,
                    signal: Signal::SIGKILL,
                });
            }
        }
    }

    /// Starting → Running once every slot serves; the end of a reload roll.
    fn note_progress(&mut self, now: Instant) {
        if self.phase == Phase::Starting && self.slots.iter().all(|s| s.serving.is_some()) {
            tracing::info!(
                workers = self.slots.len(),
                elapsed_ms = now.saturating_duration_since(self.started).as_millis() as u64,
                "all workers ready"
            );
            self.enter(Phase::Running);
            self.actions.push(Action::Notify(Notice::Ready));
        }
        if self.reload_pending
            && self.phase == Phase::Running
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
            self.actions.push(Action::Notify(Notice::Ready));
        }
    }

    /// Bring the pool to what it should be: size, refills, planned replacements.
    fn reconcile(&mut self, now: Instant) {
        if matches!(self.phase, Phase::Stopping | Phase::Exited) {
            return;
        }
        // A removed slot's listener closes once none of its workers is left.
        let workers = &self.workers;
        let actions = &mut self.actions;
        self.retiring.retain(|&index| {
            let left = workers.values().any(|w| w.slot == index);
            if !left {
                actions.push(Action::CloseSlot { slot: index });
            }
            left
        });
        self.resize(now);
        let mut planned_in_progress = self
            .slots
            .iter()
            .any(|s| s.successor.is_some() && s.serving.is_some());
        let recycle_due = self
            .last_recycle
            .is_none_or(|t| now.saturating_duration_since(t) >= self.timing.recycle_interval);
        for (index, slot) in self.slots.iter_mut().enumerate() {
            if slot.successor.is_some() || slot.not_before.is_some_and(|t| now < t) {
                continue;
            }
            let spawn = match slot.serving {
                // A refill is never held back by another slot's replacement.
                None => true,
                Some(pid) => {
                    let Some(worker) = self.workers.get_mut(&pid) else {
                        continue;
                    };
                    let rolled = worker.generation < self.generation;
                    // The memory guard's recycle is not paced by `recycle_interval`.
                    let due = match worker.retire {
                        Some(ExitCause::Memory) => true,
                        Some(_) => recycle_due,
                        None => false,
                    };
                    let start = !planned_in_progress && (rolled || due);
                    if start {
                        planned_in_progress = true;
                        worker.cause = Some(if rolled {
                            ExitCause::Reload
                        } else {
                            worker.retire.unwrap_or(ExitCause::MaxRequests)
                        });
                        if !rolled {
                            self.last_recycle = Some(now);
                        }
                    }
                    start
                }
            };
            if spawn {
                slot.successor = Some(Successor::Forking);
                self.actions.push(Action::Spawn {
                    slot: index,
                    generation: self.generation,
                });
            }
        }
    }

    fn resize(&mut self, now: Instant) {
        let mut to_drain = Vec::new();
        while self.slots.len() > self.desired {
            let index = self.slots.len() - 1;
            let Some(slot) = self.slots.pop() else { break };
            to_drain.extend(slot.serving);
            if let Some(Successor::Booting(pid)) = slot.successor {
                to_drain.push(pid);
            }
            self.retiring.push(index);
            self.actions.push(Action::RemoveSlot { slot: index });
            tracing::info!(slot = index, "removing slot");
        }
        if !to_drain.is_empty() {
            // Steer away first, then drain: the draining worker empties the slot's queue.
            self.steered = 0;
            self.update_steering();
            for pid in to_drain {
                if let Some(worker) = self.workers.get_mut(&pid) {
                    worker.cause = Some(ExitCause::Scale);
                }
                self.drain(pid, "slot removed", now);
            }
        }
        if self.slots.len() < self.desired && self.retiring.is_empty() && !self.adding_slot {
            self.adding_slot = true;
            self.actions.push(Action::AddSlot);
        }
    }

    /// Steer new connections to the leading slots whose first worker is ready.
    fn update_steering(&mut self) {
        let active = self.slots.iter().take_while(|s| s.ever_ready).count();
        if active != self.steered && active > 0 {
            self.steered = active;
            self.actions.push(Action::Steer { active });
        }
    }
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

#[cfg(test)]
mod tests;
