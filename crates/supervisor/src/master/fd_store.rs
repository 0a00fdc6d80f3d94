//! systemd's file-descriptor store (`FDSTORE=1`): the master keeps its listening sockets there,
//! so that systemd passes them to the next master after a restart and no connection is refused
//! in between. `Start::fresh` adopts what the store passed at start-up; this module stores the
//! master's own set (dropping what it was passed first), and drops a slot's sockets once the
//! slot is closed.
//!
//! Only the service's main process keeps the store, and not for a `.socket` unit's sockets,
//! which systemd holds anyway.

use super::Master;

impl Master {
    /// Keep the listening sockets in systemd's file-descriptor store, so that a restart
    /// passes them to the next master and no connection is refused meanwhile; first drop what
    /// the store passed at start (sockets no longer used, or stored under other names).
    pub(super) fn store_listeners(&mut self) {
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
    pub(super) fn unstore_slot(&self, slot: usize) {
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
}
