//! Every `unsafe` operation of the supervisor, in one place (the scoreboard's mapping is the
//! scoreboard crate's).
//!
//! - [`fork`]: forking a worker (sound only because the master is single-threaded, see the
//!   crate docs);
//! - [`steer_reuseport`]: the classic BPF program that limits which of a port's `SO_REUSEPORT`
//!   listeners receive new connections;
//! - [`accept_queue`]: `TCP_INFO` on a listener;
//! - [`default_signals_on_exec`]: the signal mask a spawned program starts with;
//! - [`passed_descriptors`] and [`claim_inherited`]: taking ownership of descriptors another
//!   process passed by number (systemd's socket activation and file-descriptor store, a binary
//!   upgrade's predecessor).
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::unistd::ForkResult;

/// Fork the process.
pub fn fork() -> io::Result<ForkResult> {
    // SAFETY: the master is single-threaded whenever it forks (the supervisor's fork rules: no
    // tokio runtime, DuckDB handle or logging thread ever exists in it, and a test checks the
    // thread count), so the child cannot inherit a lock held by another thread and may run
    // arbitrary code, not only async-signal-safe functions.
    unsafe { nix::unistd::fork() }.map_err(io::Error::from)
}

/// Steer new connections of a `SO_REUSEPORT` group to its first `active` listeners.
///
/// The kernel numbers a group's listeners in the order they joined it, and removing one moves the
/// last into its place; ferrocorn only ever adds and removes the highest slot, so index `i` is
/// slot `i`. The program returns a random index below `active`: a slot being added receives
/// nothing until its worker is ready, and a slot being removed stops receiving before its queue
/// is drained and its listener closed.
pub fn steer_reuseport(listener: BorrowedFd<'_>, active: u32) -> io::Result<()> {
    if active == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "no active slot",
        ));
    }
    // Classic BPF opcodes (linux/filter.h, linux/bpf_common.h).
    const BPF_LD_W_ABS: u16 = 0x20;
    const BPF_ALU_MOD_K: u16 = 0x04 | 0x90;
    const BPF_RET_A: u16 = 0x06 | 0x10;
    // SKF_AD_OFF + SKF_AD_RANDOM: the ancillary load of a random u32.
    const SKF_AD_RANDOM: u32 = (-0x1000i32) as u32 + 56;
    let mut program = [
        libc::sock_filter {
            code: BPF_LD_W_ABS,
            jt: 0,
            jf: 0,
            k: SKF_AD_RANDOM,
        },
        libc::sock_filter {
            code: BPF_ALU_MOD_K,
            jt: 0,
            jf: 0,
            k: active,
        },
        libc::sock_filter {
            code: BPF_RET_A,
            jt: 0,
            jf: 0,
            k: 0,
        },
    ];
    attach_cbpf(listener, libc::SO_ATTACH_REUSEPORT_CBPF, &mut program)
}

/// Make a TCP listener drop new connection attempts (SYN segments) while it completes the
/// handshakes under way and keeps what it has queued: a socket filter that passes every segment
/// but a SYN without ACK. A client whose SYN is dropped retransmits it and, the listener closed
/// by then, is refused: nothing it sent was delivered. Used when the pool stops, so that closing
/// a listener once its queue is taken resets no connection the kernel completed meanwhile.
pub fn refuse_new_connections(listener: BorrowedFd<'_>) -> io::Result<()> {
    // Classic BPF opcodes (linux/filter.h, linux/bpf_common.h). A TCP socket's filter sees the
    // segment from its TCP header on: byte 13 holds the flags (SYN 0x02, ACK 0x10).
    const BPF_LD_B_ABS: u16 = 0x30;
    const BPF_ALU_AND_K: u16 = 0x04 | 0x50;
    const BPF_JMP_JEQ_K: u16 = 0x05 | 0x10;
    const BPF_RET_K: u16 = 0x06;
    let op = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    let mut program = [
        op(BPF_LD_B_ABS, 0, 0, 13),
        op(BPF_ALU_AND_K, 0, 0, 0x12),
        // A SYN without ACK: drop (keep 0 bytes); anything else: keep it whole.
        op(BPF_JMP_JEQ_K, 0, 1, 0x02),
        op(BPF_RET_K, 0, 0, 0),
        op(BPF_RET_K, 0, 0, u32::MAX),
    ];
    attach_cbpf(listener, libc::SO_ATTACH_FILTER, &mut program)
}

/// Attach a classic BPF `program` to `socket` as `option` (a socket filter, or a reuseport
/// group's steering program).
fn attach_cbpf(
    socket: BorrowedFd<'_>,
    option: libc::c_int,
    program: &mut [libc::sock_filter],
) -> io::Result<()> {
    let fprog = libc::sock_fprog {
        len: u16::try_from(program.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "BPF program too long"))?,
        filter: program.as_mut_ptr(),
    };
    // SAFETY: `fprog` points at `program`, which outlives the call; the kernel copies the program
    // and validates it; the fd is a valid socket for the borrow's lifetime.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&fprog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Connections waiting in a TCP listener's accept queue: for a listening socket, `TCP_INFO`'s
/// `tcpi_unacked` is the queue's length (and `tcpi_sacked` its limit). One system call, unlike
/// reading `/proc/net/tcp`, which walks every socket of the host.
pub fn accept_queue(listener: BorrowedFd<'_>) -> io::Result<u32> {
    // SAFETY: tcp_info is plain old data: all-zero bytes are a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` and `len` are valid for writes of `len` bytes for the call's duration; the
    // kernel writes at most `len` bytes and updates `len`; the fd is a valid socket for the
    // borrow's lifetime.
    let rc = unsafe {
        libc::getsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(info.tcpi_unacked)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Make `command`'s program start with no signal blocked: the master blocks the signals it
/// reads through its signalfd, and a mask survives `exec`.
pub fn default_signals_on_exec(command: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child between fork and exec, where only
    // async-signal-safe calls are sound: it builds an empty set on the stack and calls
    // sigprocmask, allocating nothing and taking no lock.
    unsafe {
        command.pre_exec(|| {
            nix::sys::signal::sigprocmask(
                nix::sys::signal::SigmaskHow::SIG_SETMASK,
                Some(&nix::sys::signal::SigSet::empty()),
                None,
            )
            .map_err(io::Error::from)
        });
    }
}

/// The descriptors systemd passed (`LISTEN_FDS` for this process's `LISTEN_PID`: the sockets of
/// a `.socket` unit, and what the service stored with `FDSTORE=1`), each with its name
/// (`LISTEN_FDNAMES`), owned from here on; none when systemd passed nothing.
pub fn passed_descriptors() -> io::Result<Vec<(OwnedFd, String)>> {
    let fds: Vec<_> = sd_notify::listen_fds_with_names()?.collect();
    Ok(fds
        .into_iter()
        // SAFETY: systemd passed these descriptors to this process (LISTEN_PID is ours) from fd
        // 3 on; nothing else in the process has claimed them, and this function runs once,
        // at start-up, so each is owned exactly once.
        .map(|(fd, name)| (unsafe { OwnedFd::from_raw_fd(fd) }, name))
        .collect())
}

/// Own the descriptor `raw`, which the process that started this one left open for it (a binary
/// upgrade's predecessor names them in its hand-off), and make it close-on-exec again.
///
/// Fails if `raw` is a standard stream or not an open descriptor. The caller claims each number
/// at most once.
pub fn claim_inherited(raw: RawFd) -> io::Result<OwnedFd> {
    if raw <= 2 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("descriptor {raw} is a standard stream"),
        ));
    }
    // SAFETY: F_GETFD only reads the descriptor table entry; an invalid number is EBADF.
    let flags = unsafe { libc::fcntl(raw, libc::F_GETFD) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above; F_SETFD changes only the close-on-exec flag of an open descriptor.
    if unsafe { libc::fcntl(raw, libc::F_SETFD, flags | libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptor is open (checked above), was left to this process by its parent
    // for exactly this use, and the caller claims each number once, so it is owned only here.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    #[test]
    fn the_accept_queue_counts_connections_not_yet_accepted() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        assert_eq!(super::accept_queue(listener.as_fd()).expect("TCP_INFO"), 0);
        let _clients: Vec<_> = (0..3)
            .map(|_| std::net::TcpStream::connect(addr).expect("connect"))
            .collect();
        assert_eq!(super::accept_queue(listener.as_fd()).expect("TCP_INFO"), 3);
        let _accepted = listener.accept().expect("accept");
        assert_eq!(super::accept_queue(listener.as_fd()).expect("TCP_INFO"), 2);
    }
}
