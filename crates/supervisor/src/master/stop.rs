//! How the master stops: a stop signal becomes the pool's `Stop` event (TERM drains within
//! `graceful_timeout`, INT and QUIT quickly), and the drain starts by closing the master's
//! copies of the listeners ([`Action::CloseListeners`](crate::pool::Action::CloseListeners)).
//! Which worker gets which signal, and when the master exits, is the pool's decision.
//!
//! With `deregistration_delay`, TERM first turns `/readyz` to 503 in every worker (a flag in
//! the scoreboard) and the pool serves on for the delay, so that a load balancer stops sending
//! before the listeners close; the pool decides when the delay is over.
//!
//! A stop in the middle of a binary upgrade is the operator stopping the service: the new
//! master is stopped with the same signal, and this one exits only after it.

use std::time::Instant;

use nix::sys::signal::{Signal, kill};

use super::{Master, Succession};
use crate::pool::Event;

impl Master {
    /// TERM, INT or QUIT: stop the pool (and a new master this one started).
    pub(super) fn stop(&mut self, signal: Signal) {
        // A stop during an upgrade stops the new master too (the operator stops the
        // service), and this master exits only after it (its workers may serve already).
        if let Succession::Upgrading(upgrade) = &mut self.succession {
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
            _ => {}
        }
    }

    /// TERM with a de-registration delay: every worker's `/readyz` answers 503 from now on,
    /// while the pool serves on until the delay is over.
    pub(super) fn deregister(&mut self) {
        self.scoreboard
            .pool()
            .deregistering
            .store(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// The drain starts: close this master's copies of every listener, the retiring slots'
    /// too, so that each socket closes once its workers have taken what is queued and let go
    /// of theirs (see [`Action::CloseListeners`](crate::pool::Action::CloseListeners)).
    pub(super) fn close_listeners(&mut self) {
        // Whether the sockets live on: kept by systemd (a store, or a socket unit) for the next
        // master, or served by another master of a binary upgrade (the new one this master
        // handed over to, or the old one whose upgrade to this master is abandoned).
        let live_on = self.fd_store || self.listeners.is_activated() || !self.succession.is_main();
        self.listeners.close(!live_on);
        self.retiring.clear();
        tracing::info!("listeners closed: new connections are refused while the workers drain");
    }
}
