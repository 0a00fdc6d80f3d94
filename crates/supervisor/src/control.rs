//! The control socket: `ferrocorn status`, `ferrocorn reload` and `ferrocorn scale N` talk to
//! the running master through a unix socket in its cache directory (`cache_dir/control.sock`,
//! mode 0600: only the pool's own user, or root, may use it).
//!
//! One command per connection, one line of text; the master answers in text and closes. A
//! reload is answered twice: at once (refused, with the error, the running pool unchanged; or
//! accepted), and again when the roll is complete. The master serves the socket from its
//! single-threaded loop with non-blocking accepts and a short read deadline, so a client that
//! sends nothing cannot stall it for long.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The socket's name in the cache directory.
pub const SOCKET_NAME: &str = "control.sock";

/// How long the master waits for a client's command line.
const READ_DEADLINE: Duration = Duration::from_millis(200);

/// A command, as the client sends it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    Status,
    Reload,
    Scale(usize),
}

impl Request {
    pub fn parse(line: &str) -> Result<Self, String> {
        let mut words = line.split_whitespace();
        match (words.next(), words.next(), words.next()) {
            (Some("status"), None, _) => Ok(Self::Status),
            (Some("reload"), None, _) => Ok(Self::Reload),
            (Some("scale"), Some(n), None) => n
                .parse()
                .ok()
                .filter(|n| (1..=ferrocorn_scoreboard::MAX_WORKERS).contains(n))
                .map(Self::Scale)
                .ok_or_else(|| {
                    format!(
                        "scale takes a number of workers from 1 to {}",
                        ferrocorn_scoreboard::MAX_WORKERS
                    )
                }),
            _ => Err(format!(
                "unknown command {line:?} (status, reload, scale N)"
            )),
        }
    }

    fn line(&self) -> String {
        match self {
            Self::Status => "status".to_owned(),
            Self::Reload => "reload".to_owned(),
            Self::Scale(n) => format!("scale {n}"),
        }
    }
}

/// The master's end: the listening socket, removed when dropped.
#[derive(Debug)]
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ControlSocket {
    /// Bind `cache_dir/control.sock` with mode 0600. A file left there by an earlier master is
    /// replaced: the pool lock, already held, says no live pool uses this directory.
    pub fn bind(cache_dir: &Path) -> io::Result<Self> {
        let path = cache_dir.join(SOCKET_NAME);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        // Created without group or other permissions: no moment exists when another user may
        // connect.
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
        let bound = UnixListener::bind(&path);
        nix::sys::stat::umask(old);
        let listener = bound?;
        // Read and write for the owner (umask leaves the execute bit, which means nothing here).
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        Ok(Self { listener, path })
    }

    /// The socket a binary upgrade's predecessor handed over. Its file stays the predecessor's
    /// (not removed when this is dropped) until [`Self::claim_file`].
    pub fn adopt(fd: std::os::fd::OwnedFd) -> io::Result<Self> {
        let listener = UnixListener::from(fd);
        listener.set_nonblocking(true)?;
        Ok(Self {
            listener,
            path: PathBuf::new(),
        })
    }

    /// Take over the socket's file in `cache_dir` (removed when this is dropped).
    pub fn claim_file(&mut self, cache_dir: &Path) {
        self.path = cache_dir.join(SOCKET_NAME);
    }

    pub fn listener(&self) -> &UnixListener {
        &self.listener
    }

    /// Close the socket and leave its file in place (in a forked child; in a master that hands
    /// the pool to its successor).
    pub fn close_keeping_file(mut self) {
        self.path = PathBuf::new();
    }

    /// The commands waiting: each with the connection to answer on.
    pub fn accept_all(&self) -> Vec<(UnixStream, Result<Request, String>)> {
        let mut commands = Vec::new();
        while let Ok((stream, _)) = self.listener.accept() {
            let read = stream
                .set_nonblocking(false)
                .and_then(|()| stream.set_read_timeout(Some(READ_DEADLINE)))
                .and_then(|()| stream.set_write_timeout(Some(READ_DEADLINE)));
            if read.is_err() {
                continue;
            }
            let mut line = String::new();
            let parsed = match BufReader::new((&stream).take(256)).read_line(&mut line) {
                Ok(_) => Request::parse(line.trim()),
                Err(e) => Err(format!("no command read: {e}")),
            };
            commands.push((stream, parsed));
        }
        commands
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Write `text` as the last answer and end the connection. `shutdown`, not just a close: a
/// worker forked while the connection was open holds a copy of its descriptor.
pub fn finish(stream: &UnixStream, text: &str) {
    answer(stream, text);
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

/// Write `text` to a client (a client that went away is no error of the master's).
pub fn answer(mut stream: &UnixStream, text: &str) {
    let _ = stream.write_all(text.as_bytes());
    if !text.ends_with('\n') {
        let _ = stream.write_all(b"\n");
    }
}

/// The client's end: send `request` to the pool whose cache directory is `cache_dir`, print
/// what it answers; exit 0, 1 if it answered an error, 69 if no pool answers.
pub fn run(cache_dir: &Path, request: &Request, wait: Duration) -> i32 {
    let path = cache_dir.join(SOCKET_NAME);
    let mut stream = match UnixStream::connect(&path) {
        Ok(stream) => stream,
        Err(e) => {
            eprintln!(
                "ferrocorn: no pool answers on {}: {e} (is it running with this configuration?)",
                path.display()
            );
            return crate::EXIT_UNAVAILABLE;
        }
    };
    let sent = stream
        .set_read_timeout(Some(wait))
        .and_then(|()| stream.write_all(format!("{}\n", request.line()).as_bytes()));
    if let Err(e) = sent {
        eprintln!("ferrocorn: {}: {e}", path.display());
        return crate::EXIT_UNAVAILABLE;
    }
    let mut failed = false;
    let mut any = false;
    for line in BufReader::new(stream).lines() {
        match line {
            Ok(line) => {
                any = true;
                failed |= line.starts_with("error:");
                println!("{line}");
            }
            Err(e) => {
                eprintln!("ferrocorn: no complete answer within {wait:?}: {e}");
                return 1;
            }
        }
    }
    if !any {
        eprintln!("ferrocorn: the pool closed the connection without an answer");
        return 1;
    }
    i32::from(failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse_and_bad_ones_say_why() {
        assert_eq!(Request::parse("status"), Ok(Request::Status));
        assert_eq!(Request::parse("scale 3"), Ok(Request::Scale(3)));
        for bad in [
            "",
            "scale",
            "scale 0",
            "scale 9999",
            "scale x",
            "reload now",
            "rm -rf /",
        ] {
            assert!(Request::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_socket_is_the_owners_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = ControlSocket::bind(dir.path()).expect("bind");
        let mode = std::fs::metadata(dir.path().join(SOCKET_NAME))
            .expect("socket file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        drop(socket);
        assert!(
            !dir.path().join(SOCKET_NAME).exists(),
            "removed with the master"
        );
    }
}
