//! The pool driven through the sequences the end-to-end tests cover, and more, by a model of the
//! master and its workers ([`World`]) that checks the pool's invariants after every action.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use proptest::prelude::*;

use super::*;

const GRACE: Duration = Duration::from_secs(30);
/// Unpaced recycling, unless a test says otherwise.
const TIMING: Timing = Timing {
    graceful_timeout: GRACE,
    recycle_interval: Duration::ZERO,
    deregistration_delay: Duration::ZERO,
};

/// A worker process as the model knows it.
#[derive(Debug)]
struct Proc {
    slot: usize,
    ready: bool,
    signals: Vec<Signal>,
}

/// The master and its workers, modelled: performs the pool's actions as the master does, answers
/// the ones that need an answer, and checks the invariants.
struct World {
    pool: Pool,
    now: Instant,
    next_pid: i32,
    live: BTreeMap<Pid, Proc>,
    /// Every action, in order.
    log: Vec<Action>,
    /// The next this many forks fail.
    failing_spawns: usize,
    /// The next this many new listeners fail.
    failing_slots: usize,
    exit: Option<i32>,
    /// The event under way, for the checks.
    event: Option<Event>,
}

impl World {
    fn new(workers: usize) -> Self {
        let now = Instant::now();
        let mut world = Self {
            pool: Pool::new(workers, TIMING, now),
            now,
            next_pid: 100,
            live: BTreeMap::new(),
            log: Vec::new(),
            failing_spawns: 0,
            failing_slots: 0,
            exit: None,
            event: None,
        };
        world.send(Event::Tick);
        world
    }

    /// A pool of `workers` slots, each with a ready worker.
    fn running(workers: usize) -> Self {
        let mut world = Self::new(workers);
        world.ready_all();
        assert_eq!(world.pool.phase(), Phase::Running);
        world
    }

    /// Hand `event` to the pool, then perform what it decides as the master would.
    fn send(&mut self, event: Event) {
        let serving_before = self.serving();
        self.event = Some(event.clone());
        let mut queue = VecDeque::from(self.pool.handle(event, self.now));
        while let Some(action) = queue.pop_front() {
            self.check_action(&action, &serving_before);
            self.log.push(action.clone());
            if let Some(answer) = self.perform(action) {
                queue.extend(self.pool.handle(answer, self.now));
            }
        }
        self.check_state();
    }

    fn perform(&mut self, action: Action) -> Option<Event> {
        match action {
            Action::Spawn { slot, .. } => {
                if self.failing_spawns > 0 {
                    self.failing_spawns -= 1;
                    return Some(Event::SpawnFailed { slot });
                }
                let pid = Pid::from_raw(self.next_pid);
                self.next_pid += 1;
                self.live.insert(
                    pid,
                    Proc {
                        slot,
                        ready: false,
                        signals: Vec::new(),
                    },
                );
                Some(Event::Spawned { slot, pid })
            }
            Action::Signal { pid, signal } => {
                self.proc(pid).signals.push(signal);
                None
            }
            Action::Abort { pid, .. } => {
                self.proc(pid).signals.push(Signal::SIGABRT);
                None
            }
            Action::AddSlot => {
                let ok = self.failing_slots == 0;
                self.failing_slots = self.failing_slots.saturating_sub(1);
                Some(Event::SlotAdded { ok })
            }
            Action::Exit { code } => {
                assert!(self.exit.is_none(), "Exit is returned once");
                assert!(self.live.is_empty(), "Exit with workers alive");
                self.exit = Some(code);
                None
            }
            Action::Steer { .. }
            | Action::CountExit(_)
            | Action::RemoveSlot { .. }
            | Action::CloseSlot { .. }
            | Action::CloseListeners
            | Action::Deregister
            | Action::Notify(_)
            | Action::Fatal { .. } => None,
        }
    }

    fn proc(&mut self, pid: Pid) -> &mut Proc {
        self.live
            .get_mut(&pid)
            .unwrap_or_else(|| panic!("signal to {pid}, which is not alive"))
    }

    fn serving(&self) -> Vec<Option<Pid>> {
        self.pool.slots.iter().map(|s| s.serving).collect()
    }

    /// Invariant 3: a serving worker is signalled only once its successor is ready, or when the
    /// pool stops, its slot is removed, or it missed its heartbeat.
    fn check_action(&self, action: &Action, serving_before: &[Option<Pid>]) {
        let (pid, signal) = match action {
            Action::Signal { pid, signal } => (*pid, *signal),
            Action::Abort { pid, .. } => (*pid, Signal::SIGABRT),
            Action::Spawn { .. } => {
                // De-registering, the pool still serves: a crashed worker is replaced.
                assert!(
                    matches!(
                        self.pool.phase(),
                        Phase::Starting | Phase::Running | Phase::Deregistering
                    ),
                    "a spawn while {:?}",
                    self.pool.phase()
                );
                return;
            }
            _ => return,
        };
        if signal == Signal::SIGUSR1 {
            assert_eq!(self.event, Some(Event::ReopenLogs), "USR1 only for USR1");
            return;
        }
        let Some(slot) = serving_before.iter().position(|s| *s == Some(pid)) else {
            return;
        };
        if matches!(self.pool.phase(), Phase::Stopping | Phase::Exited) {
            return;
        }
        if signal == Signal::SIGABRT {
            assert_eq!(
                self.event,
                Some(Event::Silent(pid)),
                "abort only when silent"
            );
            return;
        }
        if slot >= self.pool.slots.len() {
            return; // the slot was removed
        }
        let successor = self.pool.slots[slot].serving;
        assert!(
            successor.is_some_and(|q| q != pid && self.live.get(&q).is_some_and(|p| p.ready)),
            "{signal} to serving worker {pid} of slot {slot} before a ready successor \
             (after {:?}; the slot now serves {successor:?})",
            self.event
        );
    }

    /// What holds after every event.
    fn check_state(&self) {
        let pool = &self.pool;
        let tracked: BTreeSet<Pid> = pool.workers.keys().copied().collect();
        let live: BTreeSet<Pid> = self.live.keys().copied().collect();
        assert_eq!(tracked, live, "the pool tracks exactly the live workers");
        if !matches!(
            pool.phase(),
            Phase::Starting | Phase::Running | Phase::Deregistering
        ) {
            return; // stopping: every worker drains, whatever its slot
        }
        for (index, slot) in pool.slots.iter().enumerate() {
            if let Some(pid) = slot.serving {
                assert!(
                    self.live
                        .get(&pid)
                        .is_some_and(|p| p.ready && p.slot == index),
                    "slot {index} serves {pid}, which is not a ready worker of it"
                );
                assert_eq!(pool.workers[&pid].phase, WorkerPhase::Ready);
            }
            assert_ne!(
                slot.successor,
                Some(Successor::Forking),
                "every fork is answered"
            );
            if let Some(Successor::Booting(pid)) = slot.successor {
                assert_eq!(pool.workers[&pid].phase, WorkerPhase::Booting);
                assert_ne!(slot.serving, Some(pid));
            }
        }
        let planned = pool
            .slots
            .iter()
            .filter(|s| s.serving.is_some() && s.successor.is_some())
            .count();
        assert!(planned <= 1, "{planned} planned replacements at once");
        if pool.phase() == Phase::Running {
            for (index, slot) in pool.slots.iter().enumerate() {
                assert!(
                    slot.serving.is_some()
                        || slot.successor.is_some()
                        || slot.not_before.is_some_and(|t| t > self.now),
                    "slot {index} is empty with nothing on the way"
                );
            }
        }
    }

    fn advance(&mut self, by: Duration) {
        self.now += by;
        self.send(Event::Tick);
    }

    fn ready(&mut self, pid: Pid) {
        self.proc(pid).ready = true;
        self.send(Event::Ready(pid));
    }

    fn ready_all(&mut self) {
        let booting: Vec<Pid> = self
            .live
            .iter()
            .filter(|(_, p)| !p.ready)
            .map(|(pid, _)| *pid)
            .collect();
        for pid in booting {
            self.ready(pid);
        }
    }

    fn exit(&mut self, pid: Pid, boot_failure: Option<&str>) {
        assert!(self.live.remove(&pid).is_some(), "{pid} was alive");
        self.send(Event::Exited {
            pid,
            status: "exit code 0".to_owned(),
            boot_failure: boot_failure.map(str::to_owned),
        });
    }

    /// Every worker that was told to stop exits.
    fn exit_signalled(&mut self) {
        let told: Vec<Pid> = self
            .live
            .iter()
            .filter(|(_, p)| !p.signals.iter().all(|s| *s == Signal::SIGUSR1))
            .map(|(pid, _)| *pid)
            .collect();
        for pid in told {
            self.exit(pid, None);
        }
    }

    fn serving_of(&self, slot: usize) -> Pid {
        self.pool.slots[slot].serving.expect("a serving worker")
    }

    fn successor_of(&self, slot: usize) -> Option<Pid> {
        match self.pool.slots[slot].successor {
            Some(Successor::Booting(pid)) => Some(pid),
            _ => None,
        }
    }

    fn signals(&self, pid: Pid) -> &[Signal] {
        self.live.get(&pid).map_or(&[], |p| &p.signals)
    }

    fn spawns(&self) -> usize {
        self.log
            .iter()
            .filter(|a| matches!(a, Action::Spawn { .. }))
            .count()
    }

    fn count(&self, action: &Action) -> usize {
        self.log.iter().filter(|a| *a == action).count()
    }

    fn generation_of(&self, pid: Pid) -> u64 {
        self.pool.workers[&pid].generation
    }

    fn hup(&mut self, workers: usize) {
        let timing = self.pool.timing;
        self.send(Event::Reload { workers, timing });
    }
}

#[test]
fn start_fills_every_slot_and_runs_once_all_are_ready() {
    let mut world = World::new(3);
    assert_eq!(world.spawns(), 3);
    assert_eq!(world.pool.phase(), Phase::Starting);
    let pids: Vec<Pid> = world.live.keys().copied().collect();
    world.ready(pids[1]);
    assert_eq!(
        world.count(&Action::Steer { active: 1 }),
        0,
        "slot 0 is not ready: nothing is steered to slot 1 alone"
    );
    world.ready(pids[0]);
    assert_eq!(world.count(&Action::Steer { active: 2 }), 1);
    assert_eq!(world.count(&Action::Notify(Notice::Ready)), 0);
    world.ready(pids[2]);
    assert_eq!(world.count(&Action::Steer { active: 3 }), 1);
    assert_eq!(world.count(&Action::Notify(Notice::Ready)), 1);
    assert_eq!(world.pool.phase(), Phase::Running);
}

#[test]
fn a_recycle_starts_the_successor_first_and_drains_the_old_worker_once_it_is_ready() {
    let mut world = World::running(2);
    let old = world.serving_of(1);
    world.send(Event::RetirementRequested {
        pid: old,
        requests: 1000,
    });
    let successor = world.successor_of(1).expect("a successor");
    assert!(world.signals(old).is_empty(), "the old worker serves on");
    world.advance(Duration::from_secs(5));
    assert!(world.signals(old).is_empty());
    world.ready(successor);
    assert_eq!(world.serving_of(1), successor);
    assert_eq!(world.signals(old), [Signal::SIGTERM]);
    world.exit(old, None);
    assert_eq!(world.spawns(), 3, "nothing else is replaced");
}

#[test]
fn recycles_are_paced_pool_wide_but_a_reload_roll_is_not() {
    let mut world = World::running(3);
    world.pool.timing.recycle_interval = Duration::from_secs(10);
    let first = world.serving_of(0);
    world.send(Event::RetirementRequested {
        pid: first,
        requests: 1000,
    });
    let successor = world
        .successor_of(0)
        .expect("the first recycle starts at once");
    world.ready(successor);
    world.exit(first, None);
    // Two more workers spent their budgets at once: the next recycle waits for the interval, and
    // only one starts when it has passed.
    let (second, third) = (world.serving_of(1), world.serving_of(2));
    for pid in [second, third] {
        world.send(Event::RetirementRequested {
            pid,
            requests: 1000,
        });
    }
    world.advance(Duration::from_secs(9));
    assert_eq!(
        world.successor_of(1),
        None,
        "paced: too soon after the last"
    );
    assert_eq!(world.successor_of(2), None);
    assert!(world.signals(second).is_empty(), "it serves on meanwhile");
    world.advance(Duration::from_secs(1));
    let next = world.successor_of(1).expect("the interval has passed");
    assert_eq!(world.successor_of(2), None, "one at a time");
    world.ready(next);
    world.exit(second, None);
    world.advance(Duration::from_secs(5));
    assert_eq!(
        world.successor_of(2),
        None,
        "the interval counts from the last start"
    );
    // A reload is the operator's: it rolls at once, one slot after another, unpaced.
    world.hup(3);
    for slot in 0..3 {
        let old = world.serving_of(slot);
        let successor = world.successor_of(slot).expect("the roll is not paced");
        world.ready(successor);
        world.exit(old, None);
    }
    assert_eq!(world.count(&Action::Notify(Notice::Ready)), 2);
}

#[test]
fn a_hup_rolls_the_slots_one_at_a_time_then_says_ready() {
    let mut world = World::running(3);
    let old: Vec<Pid> = (0..3).map(|s| world.serving_of(s)).collect();
    world.hup(3);
    assert_eq!(world.count(&Action::Notify(Notice::Reloading)), 1);
    for (slot, old) in old.into_iter().enumerate() {
        let booting: Vec<usize> = (0..3)
            .filter(|&s| world.successor_of(s).is_some())
            .collect();
        assert_eq!(booting, [slot], "one replacement at a time, in slot order");
        let successor = world.successor_of(slot).expect("a successor");
        assert_eq!(world.generation_of(successor), 2);
        world.ready(successor);
        assert_eq!(world.signals(old), [Signal::SIGTERM]);
        world.exit(old, None);
    }
    assert!((0..3).all(|s| world.generation_of(world.serving_of(s)) == 2));
    assert_eq!(
        world.count(&Action::Notify(Notice::Ready)),
        2,
        "start, reload"
    );
    assert_eq!(world.spawns(), 6);
}

#[test]
fn a_successor_that_dies_before_ready_during_a_roll_leaves_the_old_worker_serving() {
    let mut world = World::running(2);
    let (old0, old1) = (world.serving_of(0), world.serving_of(1));
    world.hup(2);
    let first = world.successor_of(0).expect("a successor");
    world.exit(first, Some("cannot open the data directory"));
    assert!(world.signals(old0).is_empty(), "the old worker serves on");
    assert_eq!(world.serving_of(0), old0);
    // The first failure is retried at once; after the second the slot backs off and the roll
    // goes on with the next slot.
    let second = world.successor_of(0).expect("retried at once");
    world.exit(second, Some("cannot open the data directory"));
    assert_eq!(world.successor_of(0), None, "backing off");
    assert_eq!(
        world.exit, None,
        "failed boots with workers serving do not stop the pool"
    );
    let next = world.successor_of(1).expect("the roll goes on");
    world.ready(next);
    assert_eq!(world.signals(old1), [Signal::SIGTERM]);
    world.exit(old1, None);
    world.advance(Duration::from_millis(50));
    assert_eq!(world.successor_of(0), None, "still backing off");
    world.advance(Duration::from_millis(60));
    let third = world.successor_of(0).expect("retried after 100 ms");
    assert!(world.signals(old0).is_empty(), "still serving");
    world.ready(third);
    assert_eq!(world.signals(old0), [Signal::SIGTERM]);
    world.exit(old0, None);
    assert_eq!(
        world.count(&Action::Notify(Notice::Ready)),
        2,
        "start, reload"
    );
}

#[test]
fn ttou_while_a_recycle_is_in_flight_finishes_the_recycle_and_removes_the_last_slot() {
    let mut world = World::running(2);
    let (w0, w1) = (world.serving_of(0), world.serving_of(1));
    world.send(Event::RetirementRequested {
        pid: w0,
        requests: 1000,
    });
    let s0 = world.successor_of(0).expect("a successor");
    let before = world.log.len();
    world.send(Event::Shrink);
    assert_eq!(world.pool.slots.len(), 1);
    assert_eq!(
        world.log[before..],
        [
            Action::RemoveSlot { slot: 1 },
            Action::Steer { active: 1 },
            Action::Signal {
                pid: w1,
                signal: Signal::SIGTERM
            }
        ],
        "steered away, then drained"
    );
    assert_eq!(world.signals(w1), [Signal::SIGTERM]);
    assert!(
        world.signals(w0).is_empty(),
        "slot 0 waits for its successor"
    );
    assert_eq!(world.count(&Action::CloseSlot { slot: 1 }), 0);
    world.exit(w1, None);
    assert_eq!(world.count(&Action::CloseSlot { slot: 1 }), 1);
    world.ready(s0);
    assert_eq!(world.signals(w0), [Signal::SIGTERM]);
    world.exit(w0, None);
    assert_eq!(world.spawns(), 3);
}

#[test]
fn ttou_of_the_slot_being_recycled_drains_both_and_closes_it_when_both_are_gone() {
    let mut world = World::running(2);
    let w1 = world.serving_of(1);
    world.send(Event::RetirementRequested {
        pid: w1,
        requests: 1000,
    });
    let s1 = world.successor_of(1).expect("a successor");
    world.send(Event::Shrink);
    assert_eq!(world.signals(w1), [Signal::SIGTERM]);
    assert_eq!(world.signals(s1), [Signal::SIGTERM]);
    world.exit(w1, None);
    assert_eq!(world.count(&Action::CloseSlot { slot: 1 }), 0);
    world.exit(s1, None);
    assert_eq!(world.count(&Action::CloseSlot { slot: 1 }), 1);
    world.advance(Duration::from_secs(1));
    assert_eq!(world.spawns(), 3);
}

#[test]
fn ten_hups_in_one_second_end_with_every_worker_on_the_last_generation() {
    let mut world = World::running(2);
    let boot = Duration::from_millis(250);
    let mut spawned_at: BTreeMap<Pid, Instant> = BTreeMap::new();
    for step in 0..40 {
        if step < 10 {
            world.hup(2);
        }
        world.advance(Duration::from_millis(100));
        for pid in world.live.keys() {
            spawned_at.entry(*pid).or_insert(world.now);
        }
        let booted: Vec<Pid> = world
            .live
            .iter()
            .filter(|(pid, p)| !p.ready && world.now - spawned_at[pid] >= boot)
            .map(|(pid, _)| *pid)
            .collect();
        for pid in booted {
            world.ready(pid);
        }
        world.exit_signalled();
    }
    assert_eq!(world.pool.generation, 11);
    for slot in 0..2 {
        assert_eq!(world.generation_of(world.serving_of(slot)), 11);
    }
    assert_eq!(world.live.len(), 2, "every old worker has gone");
    assert_eq!(world.count(&Action::Notify(Notice::Reloading)), 10);
    assert_eq!(
        world.count(&Action::Notify(Notice::Ready)),
        2,
        "start, and once at the end of the roll"
    );
    // A successor booting for an older generation is promoted, then rolled again: at most one
    // extra boot per slot per HUP, never a pile of them.
    assert!(world.spawns() <= 2 + 10 + 2, "{} spawns", world.spawns());
}

#[test]
fn a_worker_that_cannot_boot_at_start_stops_the_master_with_code_3() {
    let mut world = World::new(2);
    let pids: Vec<Pid> = world.live.keys().copied().collect();
    world.exit(pids[0], Some("the disk is on fire"));
    assert_eq!(
        world.count(&Action::Fatal {
            reason: "worker failed to boot: the disk is on fire".to_owned()
        }),
        1
    );
    assert_eq!(world.pool.phase(), Phase::Stopping);
    assert_eq!(world.signals(pids[1]), [Signal::SIGQUIT]);
    assert_eq!(world.exit, None, "not before the last worker is gone");
    world.exit(pids[1], None);
    assert_eq!(world.exit, Some(EXIT_BOOT_FAILED));
    assert_eq!(world.spawns(), 2, "nothing respawned while stopping");
}

#[test]
fn boots_failing_with_nothing_serving_give_up_after_the_crash_loop_limit() {
    let mut world = World::running(1);
    let w = world.serving_of(0);
    world.exit(w, None);
    for failure in 1..=CRASH_LOOP_LIMIT {
        assert_eq!(world.exit, None);
        let pid = world.successor_of(0).unwrap_or_else(|| {
            world.advance(Duration::from_secs(11));
            world.successor_of(0).expect("refilled after the backoff")
        });
        world.exit(pid, Some("no memory"));
        if failure < CRASH_LOOP_LIMIT {
            assert_eq!(world.pool.phase(), Phase::Running);
        }
    }
    assert_eq!(world.exit, Some(EXIT_BOOT_FAILED));
}

#[test]
fn a_silent_worker_is_aborted_then_killed_and_its_slot_refilled_at_once() {
    let mut world = World::running(2);
    let w = world.serving_of(0);
    world.send(Event::Silent(w));
    assert_eq!(world.signals(w), [Signal::SIGABRT]);
    let successor = world.successor_of(0).expect("refilled at once");
    world.advance(KILL_GRACE);
    assert_eq!(world.signals(w), [Signal::SIGABRT, Signal::SIGKILL]);
    world.advance(Duration::from_secs(1));
    assert_eq!(world.signals(w).len(), 2, "killed once");
    world.exit(w, None);
    world.ready(successor);
    assert_eq!(world.serving_of(0), successor);
    world.send(Event::Silent(successor));
    let draining = world.serving_of(1);
    world.send(Event::Stop { quick: false });
    world.send(Event::Silent(draining));
    assert_eq!(
        world.signals(draining),
        [Signal::SIGTERM],
        "a draining worker is not aborted"
    );
}

#[test]
fn term_drains_every_worker_kills_the_late_and_exits_zero() {
    let mut world = World::running(2);
    let (w0, w1) = (world.serving_of(0), world.serving_of(1));
    world.send(Event::Stop { quick: false });
    assert_eq!(world.count(&Action::Notify(Notice::Stopping)), 1);
    assert_eq!(world.count(&Action::CloseListeners), 1);
    let close = world.log.iter().position(|a| *a == Action::CloseListeners);
    let first_term = world.log.iter().position(|a| {
        matches!(
            a,
            Action::Signal {
                signal: Signal::SIGTERM,
                ..
            }
        )
    });
    assert!(
        close < first_term,
        "the listeners close before the workers are told to drain: {:?}",
        world.log
    );
    assert_eq!(world.signals(w0), [Signal::SIGTERM]);
    assert_eq!(world.signals(w1), [Signal::SIGTERM]);
    world.exit(w0, None);
    world.send(Event::Grow);
    world.hup(4);
    world.advance(GRACE - Duration::from_millis(1));
    assert_eq!(world.signals(w1), [Signal::SIGTERM]);
    world.advance(Duration::from_millis(1));
    assert_eq!(world.signals(w1), [Signal::SIGTERM, Signal::SIGKILL]);
    world.exit(w1, None);
    assert_eq!(world.exit, Some(0));
    assert_eq!(world.spawns(), 2, "nothing is spawned while stopping");
    world.send(Event::Stop { quick: true });
    assert_eq!(world.count(&Action::CloseListeners), 1, "closed once");
}

#[test]
fn a_quick_stop_shortens_a_graceful_one() {
    let mut world = World::running(1);
    let w = world.serving_of(0);
    world.send(Event::Stop { quick: false });
    world.send(Event::Stop { quick: true });
    assert_eq!(world.signals(w), [Signal::SIGTERM, Signal::SIGQUIT]);
    world.advance(QUICK_STOP_GRACE);
    assert_eq!(world.signals(w).last(), Some(&Signal::SIGKILL));
}

#[test]
fn a_draining_worker_is_killed_after_the_graceful_timeout() {
    let mut world = World::running(1);
    let old = world.serving_of(0);
    world.send(Event::RetirementRequested {
        pid: old,
        requests: 1000,
    });
    let successor = world.successor_of(0).expect("a successor");
    world.ready(successor);
    world.advance(GRACE + KILL_GRACE);
    assert_eq!(world.signals(old), [Signal::SIGTERM]);
    world.advance(Duration::from_millis(1));
    assert_eq!(world.signals(old), [Signal::SIGTERM, Signal::SIGKILL]);
}

#[test]
fn growing_waits_until_a_removed_slot_has_closed() {
    let mut world = World::running(2);
    let w1 = world.serving_of(1);
    world.send(Event::Shrink);
    world.send(Event::Grow);
    assert_eq!(world.count(&Action::AddSlot), 0, "slot 1 is still draining");
    world.exit(w1, None);
    assert_eq!(world.count(&Action::CloseSlot { slot: 1 }), 1);
    assert_eq!(world.count(&Action::AddSlot), 1);
    let added = world.successor_of(1).expect("the new slot is filled");
    world.ready(added);
    assert_eq!(world.count(&Action::Steer { active: 2 }), 2);
}

#[test]
fn a_listener_that_cannot_be_added_keeps_the_pool_size() {
    let mut world = World::running(1);
    world.failing_slots = 1;
    world.send(Event::Grow);
    assert_eq!(world.pool.desired(), 1);
    assert_eq!(world.pool.slots.len(), 1);
    assert_eq!(world.spawns(), 1);
    world.send(Event::Grow);
    assert_eq!(world.pool.slots.len(), 2);
}

#[test]
fn a_failed_fork_is_retried_with_backoff() {
    let mut world = World::running(1);
    let old = world.serving_of(0);
    world.failing_spawns = 2;
    world.send(Event::RetirementRequested {
        pid: old,
        requests: 1000,
    });
    assert_eq!(world.spawns(), 3, "the first failure is retried at once");
    assert_eq!(world.successor_of(0), None);
    world.advance(Duration::from_millis(100));
    let successor = world.successor_of(0).expect("retried after the backoff");
    world.ready(successor);
    assert_eq!(world.signals(old), [Signal::SIGTERM]);
}

#[test]
fn usr1_reaches_every_worker() {
    let mut world = World::running(2);
    world.send(Event::ReopenLogs);
    for slot in 0..2 {
        assert_eq!(world.signals(world.serving_of(slot)), [Signal::SIGUSR1]);
    }
}

#[test]
fn backoff_is_immediate_then_exponential_and_capped() {
    assert_eq!(backoff(1), Duration::ZERO);
    assert_eq!(backoff(2), Duration::from_millis(100));
    assert_eq!(backoff(3), Duration::from_millis(200));
    assert_eq!(backoff(9), Duration::from_millis(10_000));
    assert_eq!(backoff(50), Duration::from_secs(10));
}

/// One step of a random history.
#[derive(Clone, Debug)]
enum Step {
    Ready(usize),
    Exit(usize, bool),
    Silent(usize),
    Retire(usize),
    Advance(u64),
    Stop(bool),
    Hup(usize),
    Grow,
    Shrink,
    Usr1,
    FailNextSpawn,
    FailNextSlot,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => any::<usize>().prop_map(Step::Ready),
        4 => (any::<usize>(), any::<bool>()).prop_map(|(i, b)| Step::Exit(i, b)),
        1 => any::<usize>().prop_map(Step::Silent),
        2 => any::<usize>().prop_map(Step::Retire),
        4 => (1u64..12_000).prop_map(Step::Advance),
        1 => any::<bool>().prop_map(Step::Stop),
        2 => (1usize..5).prop_map(Step::Hup),
        2 => Just(Step::Grow),
        2 => Just(Step::Shrink),
        1 => Just(Step::Usr1),
        1 => Just(Step::FailNextSpawn),
        1 => Just(Step::FailNextSlot),
    ]
}

impl World {
    fn pick(&self, index: usize, filter: impl Fn(&Proc) -> bool) -> Option<Pid> {
        let pids: Vec<Pid> = self
            .live
            .iter()
            .filter(|(_, p)| filter(p))
            .map(|(pid, _)| *pid)
            .collect();
        (!pids.is_empty()).then(|| pids[index % pids.len()])
    }

    fn take(&mut self, step: Step) {
        match step {
            Step::Ready(i) => {
                if let Some(pid) = self.pick(i, |p| !p.ready) {
                    self.ready(pid);
                }
            }
            Step::Exit(i, failed) => {
                if let Some(pid) = self.pick(i, |_| true) {
                    self.exit(pid, failed.then_some("cannot boot"));
                }
            }
            Step::Silent(i) => {
                if let Some(pid) = self.pick(i, |_| true) {
                    self.send(Event::Silent(pid));
                }
            }
            Step::Retire(i) => {
                if let Some(pid) = self.pick(i, |p| p.ready) {
                    self.send(Event::RetirementRequested { pid, requests: 1 });
                }
            }
            Step::Advance(ms) => self.advance(Duration::from_millis(ms)),
            Step::Stop(quick) => self.send(Event::Stop { quick }),
            Step::Hup(workers) => self.hup(workers),
            Step::Grow => self.send(Event::Grow),
            Step::Shrink => self.send(Event::Shrink),
            Step::Usr1 => self.send(Event::ReopenLogs),
            Step::FailNextSpawn => self.failing_spawns += 1,
            Step::FailNextSlot => self.failing_slots += 1,
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// Over random histories the checks of [`World`] hold after every action (invariant 3
    /// among them), and when the workers then behave, the pool settles: every slot served by a
    /// worker of the newest generation, or, after a stop, the master exits once all are gone.
    #[test]
    fn the_pool_keeps_its_invariants_over_random_histories(
        workers in 1usize..4,
        steps in proptest::collection::vec(step(), 1..150),
    ) {
        let mut world = World::new(workers);
        for step in steps {
            if world.exit.is_some() {
                break;
            }
            world.take(step);
        }
        world.failing_spawns = 0;
        world.failing_slots = 0;
        for _ in 0..60 {
            if world.exit.is_some() {
                break;
            }
            world.ready_all();
            world.exit_signalled();
            world.advance(Duration::from_secs(11));
        }
        match world.pool.phase() {
            Phase::Running => {
                prop_assert_eq!(world.pool.slots.len(), world.pool.desired());
                for slot in 0..world.pool.slots.len() {
                    let pid = world.pool.slots[slot].serving;
                    prop_assert!(pid.is_some(), "slot {} serves", slot);
                    let generation = pid.map(|p| world.generation_of(p));
                    prop_assert_eq!(generation, Some(world.pool.generation));
                }
                prop_assert_eq!(world.live.len(), world.pool.desired());
            }
            Phase::Exited => prop_assert!(world.live.is_empty()),
            phase => prop_assert!(false, "the pool did not settle: {:?}", phase),
        }
    }
}

#[test]
fn term_with_a_deregistration_delay_serves_on_then_drains_and_a_quick_stop_cuts_it_short() {
    let delay = Duration::from_secs(5);
    let mut world = World::running(2);
    let timing = Timing {
        deregistration_delay: delay,
        ..TIMING
    };
    world.send(Event::Reload { workers: 2, timing });
    // Finish the roll to the new timing.
    while world.pool.reloading() {
        let booting: Vec<Pid> = (0..2).filter_map(|slot| world.successor_of(slot)).collect();
        for pid in booting {
            world.ready(pid);
        }
        let draining: Vec<Pid> = world
            .live
            .iter()
            .filter(|(_, p)| p.signals.contains(&Signal::SIGTERM))
            .map(|(pid, _)| *pid)
            .collect();
        for pid in draining {
            world.exit(pid, None);
        }
    }
    let (w0, w1) = (world.serving_of(0), world.serving_of(1));
    world.send(Event::Stop { quick: false });
    assert_eq!(world.pool.phase(), Phase::Deregistering);
    assert_eq!(world.count(&Action::Deregister), 1);
    assert_eq!(
        world.count(&Action::CloseListeners),
        0,
        "the pool serves on"
    );
    assert!(world.signals(w0).is_empty() && world.signals(w1).is_empty());
    // Nothing changes the pool while it leaves; a second TERM waits for the same delay.
    world.send(Event::Grow);
    world.hup(4);
    world.send(Event::Stop { quick: false });
    assert_eq!(world.pool.desired(), 2);
    // A worker that crashes meanwhile is still replaced: the pool serves until the drain.
    world.exit(w1, None);
    let refill = world
        .successor_of(1)
        .expect("refilled while de-registering");
    world.ready(refill);
    world.advance(delay - Duration::from_millis(1));
    assert_eq!(world.count(&Action::CloseListeners), 0);
    world.advance(Duration::from_millis(1));
    assert_eq!(world.pool.phase(), Phase::Stopping);
    assert_eq!(world.count(&Action::CloseListeners), 1);
    assert_eq!(
        world.count(&Action::Notify(Notice::Stopping)),
        1,
        "told once"
    );
    assert_eq!(world.signals(w0), [Signal::SIGTERM]);
    assert_eq!(world.signals(refill), [Signal::SIGTERM]);

    // A quick stop during a de-registration does not wait for it.
    let mut world = World::running(1);
    world.send(Event::Reload { workers: 1, timing });
    while let Some(pid) = world.successor_of(0) {
        let old = world.serving_of(0);
        world.ready(pid);
        world.exit(old, None);
    }
    world.send(Event::Stop { quick: false });
    assert_eq!(world.pool.phase(), Phase::Deregistering);
    world.send(Event::Stop { quick: true });
    assert_eq!(world.pool.phase(), Phase::Stopping);
    assert_eq!(world.signals(world.serving_of(0)), [Signal::SIGQUIT]);
}
