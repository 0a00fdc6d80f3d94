//! The binary upgrade (USR2) as the masters live it: where each one stands, and each step of the
//! hand-off. [`crate::upgrade`] is the mechanism (descriptors passed across `exec`, the socket
//! pair the two masters talk over); this module is the policy: when the old master starts a
//! new one, gives up on it or retires for it, and when the new one claims the pool's files, the
//! steering and systemd's attention.
//!
//! The old master goes `Alone` → `Upgrading` → `HandedOver` (or back to `Alone` when the new
//! master dies first: [`Master::on_exit`]); the new one `Successor` → `HandingOver` → `Alone`.
//! While two masters share the sockets the [`Succession`] also says which of them notifies
//! systemd, steers the sockets and answers the control socket.

use std::os::fd::AsFd;
use std::time::Instant;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::Master;
use crate::pidfile::PidFile;
use crate::pool::{Action, Event, Notice, Phase};
use crate::upgrade::{self, Handover, Successor, Upgrade};

/// Where a master stands in a binary upgrade ([`crate::upgrade`]).
#[derive(Debug)]
pub(super) enum Succession {
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
    pub(super) fn is_main(&self) -> bool {
        matches!(self, Self::Alone | Self::Upgrading(_))
    }

    /// Whether this master steers the sockets. While two masters share them, neither does:
    /// the old one's workers serve every slot, and the new one steers once it takes over.
    pub(super) fn steers(&self) -> bool {
        matches!(self, Self::Alone | Self::HandingOver(_))
    }
}

impl Master {
    /// USR2: start the binary again as a new master that takes the pool over once it serves
    /// (see [`crate::upgrade`]).
    pub(super) fn begin_upgrade(&mut self) {
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
    pub(super) fn watch_upgrade(&mut self) {
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
    pub(super) fn take_over(&mut self) {
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
    pub(super) fn watch_handover(&mut self) {
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
}
