//! The master's listening sockets.
//!
//! Every bind address is either **per slot** (TCP with `reuse_port`, the default): one
//! `SO_REUSEPORT` socket per worker slot, all on the same port, each inherited by the slot's
//! workers; or **shared** (unix sockets, or `reuse_port = false`): one socket every worker
//! accepts from. The master keeps them all open for as long as their slot lives (invariant 2),
//! so a worker exiting never resets a queued connection.
//!
//! For per-slot addresses the master steers new connections to the slots whose worker is ready,
//! with [`crate::sys::steer_reuseport`]: see `docs/design.md` ("Removing a slot").

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use ferrocorn_worker::Listener;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::config::{BindAddr, Config};
use crate::sys;

/// A bind that failed, with its address.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {error}")]
pub struct BindError {
    pub addr: BindAddr,
    pub error: io::Error,
}

#[derive(Debug)]
enum Bound {
    PerSlot {
        addr: SocketAddr,
        sockets: Vec<Socket>,
    },
    Shared {
        addr: BindAddr,
        socket: Socket,
    },
}

/// All listening sockets of the pool.
#[derive(Debug)]
pub struct Listeners {
    bound: Vec<Bound>,
    backlog: i32,
    /// The sockets came from systemd (socket activation): their files are not ours to remove.
    activated: bool,
}

impl Listeners {
    /// Bind every address of the configuration, with `slots` sockets for per-slot addresses.
    pub fn bind(config: &Config, slots: usize) -> Result<Self, BindError> {
        let mut bound = Vec::with_capacity(config.binds.len());
        for addr in &config.binds {
            let fail = |error| BindError {
                addr: addr.clone(),
                error,
            };
            match addr {
                BindAddr::Tcp(socket_addr) if config.reuse_port => {
                    if socket_addr.port() != 0 {
                        refuse_a_reuseport_group(*socket_addr).map_err(fail)?;
                    }
                    let first = tcp_socket(*socket_addr, true, config.backlog).map_err(fail)?;
                    // Port 0 picks a free port once; every other slot joins that port.
                    let actual = first
                        .local_addr()
                        .ok()
                        .and_then(|a| a.as_socket())
                        .ok_or_else(|| fail(io::Error::other("no local address")))?;
                    let mut sockets = vec![first];
                    for _ in 1..slots {
                        sockets.push(tcp_socket(actual, true, config.backlog).map_err(fail)?);
                    }
                    bound.push(Bound::PerSlot {
                        addr: actual,
                        sockets,
                    });
                }
                BindAddr::Tcp(socket_addr) => {
                    let socket = tcp_socket(*socket_addr, false, config.backlog).map_err(fail)?;
                    let actual = socket
                        .local_addr()
                        .ok()
                        .and_then(|a| a.as_socket())
                        .map_or(addr.clone(), BindAddr::Tcp);
                    bound.push(Bound::Shared {
                        addr: actual,
                        socket,
                    });
                }
                BindAddr::Unix(path) => {
                    let socket = unix_socket(path, config.backlog).map_err(fail)?;
                    bound.push(Bound::Shared {
                        addr: addr.clone(),
                        socket,
                    });
                }
            }
        }
        Ok(Self {
            bound,
            backlog: config.backlog,
            activated: false,
        })
    }

    /// The sockets systemd passed, if it socket-activated this process: they replace the
    /// configured binds, each shared by every worker (systemd passes one socket per address).
    pub fn activated(config: &Config) -> io::Result<Option<Self>> {
        let fds = sys::activated_listeners()?;
        if fds.is_empty() {
            return Ok(None);
        }
        let mut bound = Vec::with_capacity(fds.len());
        for fd in fds {
            let socket = Socket::from(fd);
            let local = socket.local_addr()?;
            let addr = match (local.as_socket(), local.as_pathname()) {
                (Some(addr), _) => BindAddr::Tcp(addr),
                (None, Some(path)) => BindAddr::Unix(path.to_owned()),
                (None, None) => {
                    return Err(io::Error::other(
                        "systemd passed a socket that is neither TCP nor a unix path",
                    ));
                }
            };
            bound.push(Bound::Shared { addr, socket });
        }
        Ok(Some(Self {
            bound,
            backlog: config.backlog,
            activated: true,
        }))
    }

    /// Whether the sockets came from systemd.
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// No sockets (what a forked worker keeps of the master's set: it has its own duplicates).
    pub fn empty() -> Self {
        Self {
            bound: Vec::new(),
            backlog: 0,
            activated: false,
        }
    }

    /// The addresses actually listened on (port 0 resolved).
    pub fn addresses(&self) -> Vec<BindAddr> {
        self.bound
            .iter()
            .map(|b| match b {
                Bound::PerSlot { addr, .. } => BindAddr::Tcp(*addr),
                Bound::Shared { addr, .. } => addr.clone(),
            })
            .collect()
    }

    /// How many slots have their own sockets (for per-slot addresses).
    fn slot_count(&self) -> Option<usize> {
        self.bound.iter().find_map(|b| match b {
            Bound::PerSlot { sockets, .. } => Some(sockets.len()),
            Bound::Shared { .. } => None,
        })
    }

    /// Add the sockets of one more slot (the new highest).
    pub fn add_slot(&mut self) -> io::Result<()> {
        for bound in &mut self.bound {
            if let Bound::PerSlot { addr, sockets } = bound {
                sockets.push(tcp_socket(*addr, true, self.backlog)?);
            }
        }
        Ok(())
    }

    /// Detach the sockets of the highest slot; the caller keeps them open until that slot's
    /// workers have drained them, then drops them.
    pub fn remove_last_slot(&mut self) -> Vec<OwnedFd> {
        let mut detached = Vec::new();
        for bound in &mut self.bound {
            if let Bound::PerSlot { sockets, .. } = bound
                && sockets.len() > 1
                && let Some(socket) = sockets.pop()
            {
                detached.push(OwnedFd::from(socket));
            }
        }
        detached
    }

    /// Duplicates of the sockets slot `slot`'s worker accepts from.
    pub fn for_slot(&self, slot: usize) -> io::Result<Vec<Listener>> {
        let mut listeners = Vec::with_capacity(self.bound.len());
        for bound in &self.bound {
            let listener = match bound {
                Bound::PerSlot { sockets, .. } => {
                    let socket = sockets.get(slot).ok_or_else(|| {
                        io::Error::new(
                            io::ErrorKind::NotFound,
                            format!("no socket for slot {slot}"),
                        )
                    })?;
                    Listener::Tcp(std::net::TcpListener::from(
                        socket.as_fd().try_clone_to_owned()?,
                    ))
                }
                Bound::Shared { addr, socket } => {
                    let fd = socket.as_fd().try_clone_to_owned()?;
                    match addr {
                        BindAddr::Tcp(_) => Listener::Tcp(std::net::TcpListener::from(fd)),
                        BindAddr::Unix(_) => Listener::Unix(UnixListener::from(fd)),
                    }
                }
            };
            listeners.push(listener);
        }
        Ok(listeners)
    }

    /// Connections waiting in each slot's accept queues (a shared listener counts as slot 0's;
    /// unix sockets are not counted).
    pub fn accept_queues(&self) -> Vec<u32> {
        let queued = |socket: &Socket| sys::accept_queue(socket.as_fd()).unwrap_or(0);
        let mut slots = vec![0u32; self.slot_count().unwrap_or(1).max(1)];
        for bound in &self.bound {
            match bound {
                Bound::PerSlot { sockets, .. } => {
                    for (total, socket) in slots.iter_mut().zip(sockets) {
                        *total += queued(socket);
                    }
                }
                Bound::Shared {
                    addr: BindAddr::Tcp(_),
                    socket,
                } => slots[0] += queued(socket),
                Bound::Shared { .. } => {}
            }
        }
        slots
    }

    /// Send new connections of every per-slot address only to slots `0..active`.
    pub fn steer(&self, active: usize) -> io::Result<()> {
        if self.slot_count().is_none() || active == 0 {
            return Ok(());
        }
        for bound in &self.bound {
            if let Bound::PerSlot { sockets, .. } = bound
                && let Some(first) = sockets.first()
            {
                sys::steer_reuseport(first.as_fd(), active as u32)?;
            }
        }
        Ok(())
    }

    /// Remove the unix socket files (at exit).
    pub fn remove_socket_files(&self) {
        if self.activated {
            return;
        }
        for bound in &self.bound {
            if let Bound::Shared {
                addr: BindAddr::Unix(path),
                ..
            } = bound
            {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// Fail if another process's `SO_REUSEPORT` sockets are on `addr`. Binding ours would succeed and
/// join their group, so a second pool started on the first one's port would log that it listens
/// and receive almost nothing (the kernel spreads connections over every socket of the group).
/// A socket without `SO_REUSEPORT` cannot be bound beside a listening group: bind one, then let
/// it go. (`SO_REUSEADDR` keeps connections in TIME_WAIT from counting.)
fn refuse_a_reuseport_group(addr: SocketAddr) -> io::Result<()> {
    let probe = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    probe.set_cloexec(true)?;
    probe.set_reuse_address(true)?;
    if addr.is_ipv6() {
        probe.set_only_v6(true)?;
    }
    match probe.bind(&addr.into()) {
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "another process listens on it (another ferrocorn pool?): \
             joining its SO_REUSEPORT group would leave this pool almost no traffic",
        )),
        other => other,
    }
}

fn tcp_socket(addr: SocketAddr, reuse_port: bool, backlog: i32) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_cloexec(true)?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    if addr.is_ipv6() {
        // So [::]:P and 0.0.0.0:P can both be bound.
        socket.set_only_v6(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    Ok(socket)
}

fn unix_socket(path: &PathBuf, backlog: i32) -> io::Result<Socket> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket",
            ));
        }
        // A socket file nobody answers on is left over from a crash: replace it. A live one is
        // another server's, and binding over it would steal its address.
        if UnixStream::connect(path).is_ok() {
            return Err(io::Error::from(io::ErrorKind::AddrInUse));
        }
        std::fs::remove_file(path)?;
    }
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    socket.set_cloexec(true)?;
    socket.bind(&SockAddr::unix(path)?)?;
    socket.listen(backlog)?;
    Ok(socket)
}
