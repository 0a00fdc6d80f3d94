//! What a master needs before its loop: the pool's lock, the control socket and the listeners,
//! either its own (bound, or adopted from systemd: a `.socket` unit's sockets or the listeners
//! an earlier master kept in its store) or its predecessor's in a binary upgrade; the signals it
//! blocks; and, when the workers run as another user, the files that user must be able to
//! write. [`Master::start`](super::Master::start) puts these together.

use nix::sys::signal::{SigSet, Signal};

use crate::StartError;
use crate::config::{Config, RunAs};
use crate::control::ControlSocket;
use crate::listeners::Listeners;
use crate::pool_lock::PoolLock;
use crate::sys;
use crate::upgrade::{self, Successor};

/// The signals the master handles; blocked and read through a signalfd.
pub(super) fn handled_signals() -> SigSet {
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

/// What a master starts with besides its configuration: the pool's lock, control socket and
/// listeners, fresh or from a predecessor.
pub(super) struct Start {
    pub(super) lock: PoolLock,
    pub(super) control: ControlSocket,
    pub(super) listeners: Listeners,
    pub(super) successor: Option<Successor>,
    pub(super) passed_store_names: Vec<String>,
}

impl Start {
    /// A master started by the operator or systemd: lock and bind, adopting what systemd passed
    /// (a `.socket` unit's sockets, or the listeners an earlier master kept in its
    /// file-descriptor store).
    pub(super) fn fresh(config: &Config) -> Result<Self, StartError> {
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
    pub(super) fn from_predecessor(
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

/// Give the workers' user what it must write: the cache directory (recursively: snapshots and
/// results from earlier runs) and the log files (created if missing), which workers reopen on
/// SIGUSR1. The lock file and the control socket stay the master's (a worker must not be able
/// to reload or resize its own pool).
pub(super) fn hand_over(config: &Config, run_as: &RunAs) -> std::io::Result<()> {
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
