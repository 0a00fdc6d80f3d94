//! Binary upgrade (USR2): a new master from the binary on disk takes over the pool's sockets
//! without a refused connection.
//!
//! The old master starts the binary again, by the path and with the arguments it was started
//! with, as its own child, and passes it what makes a pool: the listening sockets (each with the
//! slot it serves), the cache directory's lock and the control socket. They are duplicates the
//! child inherits across `exec`; [`ENV`] names their numbers in a JSON hand-off, with the old
//! master's pid, so that a stray copy of the variable in another process's environment is
//! ignored. Both pools then accept from the same sockets: the kernel queues every new connection
//! on a socket that stays open throughout, whichever pool takes it.
//!
//! The new master starts its workers as at any start. Once all of them are ready it writes its
//! pid file and says so on a socket pair the old master watches ([`Successor::take_over`]);
//! from then on it is the pool. The old master tells systemd the main process changed
//! (`MAINPID=`) and acknowledges; only then does the new master speak to systemd (which accepts
//! messages from the main process alone). The old master stops its workers gracefully (they
//! finish what they serve; the sockets stay open in the new pool) and exits 0 without touching
//! the pid file, the socket files or the control socket, which are the new master's now.
//!
//! If the new binary fails before that — it does not start, its configuration is invalid, no
//! worker boots, it is not ready within `timeout` — it exits (or is stopped), the old master
//! reaps it, logs why, and goes on serving as if nothing happened: its pid file, lock and
//! control socket never changed hands.

use std::ffi::OsString;
use std::io;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::sys;

/// The environment variable that carries the hand-off to the new master.
pub const ENV: &str = "FERROCORN_UPGRADE";

/// The byte the new master sends once it serves.
const READY: u8 = b'R';

/// The byte the old master answers with once systemd knows the new main process.
const ACKNOWLEDGED: u8 = b'A';

/// How long the new master waits for that answer before it speaks to systemd anyway.
const ACKNOWLEDGE_WAIT: Duration = Duration::from_secs(5);

/// What the old master passes, by descriptor number.
#[derive(Debug, Serialize, Deserialize)]
struct Handoff {
    /// The old master: only its own child may take the descriptors.
    parent: i32,
    /// The cache directory the lock and the control socket belong to.
    cache_dir: PathBuf,
    lock: RawFd,
    control: RawFd,
    /// The new master's end of the socket pair it says it serves on.
    channel: RawFd,
    listeners: Vec<HandoffListener>,
    /// The listeners came from a systemd `.socket` unit (they replace the configured binds).
    activated: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct HandoffListener {
    fd: RawFd,
    /// The slot a per-slot socket serves; `None` for a shared one.
    slot: Option<usize>,
}

/// What the old master hands over.
#[derive(Debug)]
pub struct Pass<'a> {
    pub exe: &'a Path,
    pub args: &'a [OsString],
    pub cache_dir: &'a Path,
    pub lock: BorrowedFd<'a>,
    pub control: BorrowedFd<'a>,
    pub listeners: Vec<(BorrowedFd<'a>, Option<usize>)>,
    pub activated: bool,
}

/// An upgrade in progress, as the old master sees it.
#[derive(Debug)]
pub struct Upgrade {
    /// The new master (the old master's child).
    pub pid: Pid,
    /// When it must be ready by (and, once stopped for being late, when it is killed).
    pub deadline: Instant,
    /// It was late and has been told to stop.
    pub stopped: bool,
    /// The old master's end of the socket pair: [`READY`] comes on it once the new master
    /// serves.
    channel: UnixStream,
}

impl Upgrade {
    /// Start the new master from `pass.exe`.
    pub fn start(pass: Pass<'_>, deadline: Instant) -> io::Result<Self> {
        let (channel, child_end) = UnixStream::pair()?;
        channel.set_nonblocking(true)?;
        // `dup` leaves out close-on-exec: these copies, and only they, cross the exec. They are
        // closed here once the child runs (no worker is forked in between).
        let inheritable = |fd: BorrowedFd<'_>| nix::unistd::dup(fd).map_err(io::Error::from);
        let lock = inheritable(pass.lock)?;
        let control = inheritable(pass.control)?;
        let channel_child = inheritable(child_end.as_fd())?;
        let listeners = pass
            .listeners
            .iter()
            .map(|(fd, slot)| Ok((inheritable(*fd)?, *slot)))
            .collect::<io::Result<Vec<_>>>()?;
        let handoff = Handoff {
            parent: std::process::id() as i32,
            cache_dir: pass.cache_dir.to_owned(),
            lock: lock.as_raw_fd(),
            control: control.as_raw_fd(),
            channel: channel_child.as_raw_fd(),
            listeners: listeners
                .iter()
                .map(|(fd, slot)| HandoffListener {
                    fd: fd.as_raw_fd(),
                    slot: *slot,
                })
                .collect(),
            activated: pass.activated,
        };
        let json = serde_json::to_string(&handoff).map_err(io::Error::other)?;
        let mut command = std::process::Command::new(pass.exe);
        sys::default_signals_on_exec(&mut command);
        let child = command
            .args(pass.args)
            .env(ENV, json)
            // The watchdog's interval stays; its pid would not match the new master's.
            .env_remove("WATCHDOG_PID")
            // systemd's sockets reach the new master through the hand-off, not again as
            // activation (whose LISTEN_PID is not its pid anyway).
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_FDNAMES")
            .spawn()?;
        Ok(Self {
            pid: Pid::from_raw(child.id() as i32),
            deadline,
            stopped: false,
            channel,
        })
    }

    /// The socket to poll.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.channel.as_fd()
    }

    /// Whether the new master has said it serves.
    pub fn is_ready(&self) -> bool {
        let mut byte = [0u8; 1];
        matches!((&self.channel).read(&mut byte), Ok(1) if byte[0] == READY)
    }

    /// Tell the new master systemd has been told (it may speak to systemd from now on).
    pub fn acknowledge(self) {
        let _ = (&self.channel).write_all(&[ACKNOWLEDGED]);
    }
}

/// What a new master was handed, before it takes over.
#[derive(Debug)]
pub struct Inherited {
    pub cache_dir: PathBuf,
    pub lock: OwnedFd,
    pub control: OwnedFd,
    /// Each listening socket with the slot it serves (`None`: shared).
    pub listeners: Vec<(OwnedFd, Option<usize>)>,
    pub activated: bool,
    pub successor: Successor,
}

/// The new master's end of the socket pair: how it tells the old master to retire.
#[derive(Debug)]
pub struct Successor {
    channel: UnixStream,
    pub parent: Pid,
}

impl Successor {
    /// Tell the old master this one serves (it then retires); the answer is awaited through
    /// the returned [`Handover`].
    pub fn take_over(self) -> io::Result<Handover> {
        (&self.channel).write_all(&[READY])?;
        Ok(Handover {
            channel: self.channel,
            deadline: Instant::now() + ACKNOWLEDGE_WAIT,
        })
    }
}

/// The new master, told the old one it serves, awaiting its acknowledgement.
#[derive(Debug)]
pub struct Handover {
    channel: UnixStream,
    deadline: Instant,
}

impl Handover {
    /// The socket to poll.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.channel.as_fd()
    }

    /// Whether the old master has answered, is gone, or has taken too long.
    pub fn is_settled(&self) -> bool {
        let mut byte = [0u8; 1];
        match (&self.channel).read(&mut byte) {
            Ok(_) => true,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Instant::now() >= self.deadline,
            Err(_) => true,
        }
    }
}

/// The hand-off of the master this process replaces, if it is one's child and was handed one.
///
/// `Ok(None)` when [`ENV`] is absent, or names another parent (a copy of the variable this
/// process inherited from elsewhere; nothing is claimed then). An `Err` is a hand-off that
/// cannot be honoured (malformed, or a descriptor that is not open): the new master exits with
/// it, and the old one keeps serving.
pub fn inherited() -> Result<Option<Inherited>, String> {
    let Ok(json) = std::env::var(ENV) else {
        return Ok(None);
    };
    let handoff: Handoff =
        serde_json::from_str(&json).map_err(|e| format!("{ENV} is malformed: {e}"))?;
    let parent = nix::unistd::getppid();
    if handoff.parent != parent.as_raw() {
        tracing::warn!(
            "{ENV} names pid {} as the master to replace, not this process's parent; ignored",
            handoff.parent
        );
        return Ok(None);
    }
    let mut numbers: Vec<RawFd> = [handoff.lock, handoff.control, handoff.channel]
        .into_iter()
        .chain(handoff.listeners.iter().map(|l| l.fd))
        .collect();
    numbers.sort_unstable();
    if numbers.windows(2).any(|w| w[0] == w[1]) {
        return Err(format!("{ENV} names a descriptor twice"));
    }
    let claim = |raw: RawFd, what: &str| {
        sys::claim_inherited(raw).map_err(|e| format!("{ENV}: the {what} (descriptor {raw}): {e}"))
    };
    let lock = claim(handoff.lock, "cache directory's lock")?;
    let control = claim(handoff.control, "control socket")?;
    let channel = UnixStream::from(claim(handoff.channel, "hand-over socket")?);
    channel
        .set_nonblocking(true)
        .map_err(|e| format!("{ENV}: the hand-over socket: {e}"))?;
    let listeners = handoff
        .listeners
        .iter()
        .map(|l| Ok((claim(l.fd, "listening socket")?, l.slot)))
        .collect::<Result<Vec<_>, String>>()?;
    Ok(Some(Inherited {
        cache_dir: handoff.cache_dir,
        lock,
        control,
        listeners,
        activated: handoff.activated,
        successor: Successor { channel, parent },
    }))
}

/// The path to exec for an upgrade: the one this process was started by (so that replacing the
/// file there, or a symlink, upgrades), made absolute against the starting directory; the
/// running binary's own path when it was found through `PATH`.
pub fn executable() -> io::Result<PathBuf> {
    match std::env::args_os().next().map(PathBuf::from) {
        Some(argv0) if argv0.components().count() > 1 => std::path::absolute(argv0),
        _ => std::env::current_exe(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_handoff_round_trips_through_json() {
        let handoff = Handoff {
            parent: 42,
            cache_dir: PathBuf::from("/var/cache/ferrocorn"),
            lock: 5,
            control: 6,
            channel: 7,
            listeners: vec![
                HandoffListener {
                    fd: 8,
                    slot: Some(0),
                },
                HandoffListener { fd: 9, slot: None },
            ],
            activated: false,
        };
        let back: Handoff =
            serde_json::from_str(&serde_json::to_string(&handoff).expect("json")).expect("parse");
        assert_eq!(back.parent, 42);
        assert_eq!(back.listeners[0].slot, Some(0));
        assert_eq!(back.listeners[1].slot, None);
    }

    #[test]
    fn a_descriptor_that_is_not_open_or_a_standard_stream_is_not_claimed() {
        assert!(sys::claim_inherited(1).is_err());
        assert!(sys::claim_inherited(1_000_000).is_err());
    }
}
