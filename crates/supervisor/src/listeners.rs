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

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
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
    /// The sockets came from a systemd `.socket` unit: they replace the configured binds.
    activated: bool,
    /// Whether the unix socket files are this master's to remove at exit (not systemd's, nor,
    /// until it takes over, a binary upgrade's predecessor's).
    owns_files: bool,
    /// Passed per-slot sockets beyond the pool's slot count: steered away from, and open until
    /// [`Self::release_surplus`] (a predecessor's workers may still be draining them).
    surplus: Vec<Socket>,
    /// The unix socket files of sockets already closed ([`Self::close`]), removed at exit.
    closed_files: Vec<PathBuf>,
}

/// The prefix of the names under which the master keeps its sockets in systemd's
/// file-descriptor store.
const STORE_PREFIX: &str = "ferrocorn-";

/// The name a socket is stored under in systemd's file-descriptor store: bind index and slot.
fn store_name(bind: usize, slot: Option<usize>) -> String {
    match slot {
        Some(slot) => format!("{STORE_PREFIX}slot-{slot}-bind-{bind}"),
        None => format!("{STORE_PREFIX}shared-bind-{bind}"),
    }
}

/// What a stored name says of its socket: `Some(slot)` (`None` inside for a shared socket); the
/// outer `None` for a name that is not ferrocorn's (a `.socket` unit's socket).
pub fn stored_role(name: &str) -> Option<Option<usize>> {
    let rest = name.strip_prefix(STORE_PREFIX)?;
    if rest.starts_with("shared-bind-") {
        return Some(None);
    }
    let slot = rest
        .strip_prefix("slot-")?
        .split('-')
        .next()?
        .parse()
        .ok()?;
    Some(Some(slot))
}

/// Passed sockets by what they serve, taken one address at a time by [`Listeners::adopt`].
struct Passed {
    /// Per-slot sockets, by address, then by slot.
    per_slot: BTreeMap<SocketAddr, BTreeMap<usize, Socket>>,
    shared: Vec<(BindAddr, Socket)>,
}

impl Passed {
    fn sort(passed: Vec<(OwnedFd, Option<usize>)>) -> Self {
        let mut sorted = Self {
            per_slot: BTreeMap::new(),
            shared: Vec::new(),
        };
        for (fd, slot) in passed {
            let socket = Socket::from(fd);
            match (local_address(&socket), slot) {
                (Ok(BindAddr::Tcp(addr)), Some(slot)) => {
                    sorted
                        .per_slot
                        .entry(addr)
                        .or_default()
                        .insert(slot, socket);
                }
                (Ok(addr), _) => sorted.shared.push((addr, socket)),
                (Err(e), _) => tracing::warn!(error = %e, "a passed socket is unusable; closed"),
            }
        }
        sorted
    }

    /// The per-slot sockets that serve `want`, in slot order, with their address.
    fn take_group(&mut self, want: SocketAddr) -> Option<(SocketAddr, Vec<Socket>)> {
        let have = self
            .per_slot
            .keys()
            .copied()
            .find(|have| serves(want, *have))?;
        let group = self.per_slot.remove(&have)?;
        Some((have, group.into_values().collect()))
    }

    /// The first shared socket whose address `matches`.
    fn take_shared(&mut self, matches: impl Fn(&BindAddr) -> bool) -> Option<(BindAddr, Socket)> {
        let found = self.shared.iter().position(|(have, _)| matches(have))?;
        Some(self.shared.swap_remove(found))
    }

    /// Close what no configured address took.
    fn close_unused(self) {
        let unused = (self.per_slot.keys().map(|a| BindAddr::Tcp(*a)))
            .chain(self.shared.iter().map(|(a, _)| a.clone()));
        for address in unused {
            tracing::info!(%address, "a passed socket's address is no longer configured; closed");
        }
    }
}

/// A TCP socket's own address.
fn tcp_address(socket: &Socket) -> Option<SocketAddr> {
    socket.local_addr().ok()?.as_socket()
}

/// Whether a passed socket on `have` serves the configured address `want` (port 0: any port).
fn serves(want: SocketAddr, have: SocketAddr) -> bool {
    want.ip() == have.ip() && (want.port() == 0 || want.port() == have.port())
}

/// A socket's own address.
fn local_address(socket: &Socket) -> io::Result<BindAddr> {
    let local = socket.local_addr()?;
    match (local.as_socket(), local.as_pathname()) {
        (Some(addr), _) => Ok(BindAddr::Tcp(addr)),
        (None, Some(path)) => Ok(BindAddr::Unix(path.to_owned())),
        (None, None) => Err(io::Error::other(
            "a passed socket is neither TCP nor a unix path",
        )),
    }
}

impl Listeners {
    /// Bind every address of the configuration, with `slots` sockets for per-slot addresses.
    pub fn bind(config: &Config, slots: usize) -> Result<Self, BindError> {
        Self::adopt(config, slots, Vec::new())
    }

    /// Every address of the configuration, from the sockets a predecessor passed where one
    /// listens on it (`passed`: each with the slot it served, `None` for a shared socket), bound
    /// anew where none does. A per-slot address gets `slots` sockets: passed ones first, in slot
    /// order, so each keeps its place in the kernel's `SO_REUSEPORT` group (and the steering
    /// program's numbering); passed sockets of higher slots are kept as surplus. Passed sockets
    /// on addresses no longer configured are closed.
    pub fn adopt(
        config: &Config,
        slots: usize,
        passed: Vec<(OwnedFd, Option<usize>)>,
    ) -> Result<Self, BindError> {
        let mut passed = Passed::sort(passed);
        let mut bound = Vec::with_capacity(config.binds.len());
        let mut surplus = Vec::new();
        for addr in &config.binds {
            let fail = |error| BindError {
                addr: addr.clone(),
                error,
            };
            match addr {
                BindAddr::Tcp(want) if config.reuse_port => {
                    let (actual, mut sockets) = match passed.take_group(*want) {
                        Some((actual, mut sockets)) => {
                            surplus.extend(sockets.split_off(slots.max(1).min(sockets.len())));
                            (actual, sockets)
                        }
                        None => {
                            if want.port() != 0 {
                                refuse_a_reuseport_group(*want).map_err(fail)?;
                            }
                            let first = tcp_socket(*want, true, config.backlog).map_err(fail)?;
                            // Port 0 picks a free port once; every other slot joins that port.
                            let actual = tcp_address(&first)
                                .ok_or_else(|| fail(io::Error::other("no local address")))?;
                            (actual, vec![first])
                        }
                    };
                    while sockets.len() < slots {
                        sockets.push(tcp_socket(actual, true, config.backlog).map_err(fail)?);
                    }
                    bound.push(Bound::PerSlot {
                        addr: actual,
                        sockets,
                    });
                }
                BindAddr::Tcp(want) => {
                    let found = passed.take_shared(
                        |have| matches!(have, BindAddr::Tcp(have) if serves(*want, *have)),
                    );
                    let (addr, socket) = match found {
                        Some(found) => found,
                        None => {
                            let socket = tcp_socket(*want, false, config.backlog).map_err(fail)?;
                            let actual = tcp_address(&socket).map_or(addr.clone(), BindAddr::Tcp);
                            (actual, socket)
                        }
                    };
                    bound.push(Bound::Shared { addr, socket });
                }
                BindAddr::Unix(path) => {
                    let socket = match passed.take_shared(|have| have == addr) {
                        Some((_, socket)) => socket,
                        None => unix_socket(path, config.backlog).map_err(fail)?,
                    };
                    bound.push(Bound::Shared {
                        addr: addr.clone(),
                        socket,
                    });
                }
            }
        }
        passed.close_unused();
        Ok(Self {
            bound,
            backlog: config.backlog,
            activated: false,
            owns_files: true,
            surplus,
            closed_files: Vec::new(),
        })
    }

    /// The sockets of a systemd `.socket` unit (socket activation): they replace the configured
    /// binds, each shared by every worker (systemd passes one socket per address).
    pub fn activated(config: &Config, fds: Vec<OwnedFd>) -> io::Result<Self> {
        let mut bound = Vec::with_capacity(fds.len());
        for fd in fds {
            let socket = Socket::from(fd);
            let addr = local_address(&socket)?;
            bound.push(Bound::Shared { addr, socket });
        }
        Ok(Self {
            bound,
            backlog: config.backlog,
            activated: true,
            owns_files: false,
            surplus: Vec::new(),
            closed_files: Vec::new(),
        })
    }

    /// Leave the unix socket files to whoever else has them (until [`Self::claim_files`]).
    pub fn disown_files(&mut self) {
        self.owns_files = false;
    }

    /// Remove the unix socket files at exit (unless they are systemd's).
    pub fn claim_files(&mut self) {
        self.owns_files = !self.activated;
    }

    /// Whether passed per-slot sockets beyond the pool's slots are held.
    pub fn has_surplus(&self) -> bool {
        !self.surplus.is_empty()
    }

    /// The store names of slot `slot`'s sockets.
    pub fn slot_store_names(&self, slot: usize) -> Vec<String> {
        (self.bound.iter().enumerate())
            .filter(|(_, b)| matches!(b, Bound::PerSlot { .. }))
            .map(|(index, _)| store_name(index, Some(slot)))
            .collect()
    }

    /// Close the surplus of passed per-slot sockets (once the predecessor's workers are done
    /// with them).
    pub fn release_surplus(&mut self) {
        self.surplus.clear();
    }

    /// Every socket, with the slot it serves (`None`: shared by all) and the name it is stored
    /// under in systemd's file-descriptor store: what a successor or systemd is passed.
    pub fn passable(&self) -> Vec<(BorrowedFd<'_>, Option<usize>, String)> {
        let mut all = Vec::new();
        for (index, bound) in self.bound.iter().enumerate() {
            match bound {
                Bound::PerSlot { sockets, .. } => {
                    for (slot, socket) in sockets.iter().enumerate() {
                        all.push((socket.as_fd(), Some(slot), store_name(index, Some(slot))));
                    }
                }
                Bound::Shared { socket, .. } => {
                    all.push((socket.as_fd(), None, store_name(index, None)));
                }
            }
        }
        all
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
            owns_files: false,
            surplus: Vec::new(),
            closed_files: Vec::new(),
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

    /// Close this master's copy of every socket (the pool stops). A socket stays open while
    /// a worker still holds its copy (it takes what is queued first), or systemd or a new
    /// master holds one. The unix socket files are still removed at exit.
    ///
    /// With `refuse_new` (nobody will take the sockets over: no systemd store or socket unit,
    /// no new master), the TCP sockets first drop new connection attempts
    /// ([`sys::refuse_new_connections`]): the handshakes under way complete into the queue the
    /// workers empty before they close their copies, so closing resets nothing. A socket that
    /// lives on for another owner must not be touched: the filter stays with the socket.
    pub fn close(&mut self, refuse_new: bool) {
        if refuse_new {
            for bound in &self.bound {
                let sockets: Vec<&Socket> = match bound {
                    Bound::PerSlot { sockets, .. } => sockets.iter().collect(),
                    Bound::Shared {
                        addr: BindAddr::Tcp(_),
                        socket,
                    } => vec![socket],
                    Bound::Shared { .. } => Vec::new(),
                };
                for socket in sockets {
                    if let Err(e) = sys::refuse_new_connections(socket.as_fd()) {
                        tracing::warn!(error = %e, "cannot make a listener refuse new connections");
                    }
                }
            }
        }
        for bound in std::mem::take(&mut self.bound) {
            if let Bound::Shared {
                addr: BindAddr::Unix(path),
                ..
            } = bound
            {
                self.closed_files.push(path);
            }
        }
        self.surplus.clear();
    }

    /// Remove the unix socket files (at exit), if they are this master's.
    pub fn remove_socket_files(&self) {
        if !self.owns_files {
            return;
        }
        let open = self.bound.iter().filter_map(|bound| match bound {
            Bound::Shared {
                addr: BindAddr::Unix(path),
                ..
            } => Some(path),
            _ => None,
        });
        for path in open.chain(&self.closed_files) {
            let _ = std::fs::remove_file(path);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_name_gives_the_socket_its_slot_back() {
        for (bind, slot) in [(0, Some(0)), (2, Some(11)), (1, None)] {
            assert_eq!(stored_role(&store_name(bind, slot)), Some(slot));
        }
        // A `.socket` unit's socket, and names that only look like ferrocorn's.
        for name in [
            "ferrocorn.socket",
            "http",
            "ferrocorn-slot-x-bind-0",
            "ferrocorn-",
        ] {
            assert_eq!(stored_role(name), None, "{name}");
        }
    }

    #[test]
    fn a_configured_port_0_is_served_by_a_passed_socket_on_any_port_of_its_address() {
        let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let fixed: SocketAddr = "127.0.0.1:8000".parse().expect("addr");
        assert!(serves(any, "127.0.0.1:41234".parse().expect("addr")));
        assert!(serves(fixed, fixed));
        assert!(!serves(fixed, "127.0.0.1:8001".parse().expect("addr")));
        assert!(!serves(any, "0.0.0.0:8000".parse().expect("addr")));
    }
}
