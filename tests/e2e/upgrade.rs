//! Handing the pool's sockets to a new master: the binary upgrade (USR2), and systemd's
//! file-descriptor store across a restart. In both, clients under load see no failed request.

use std::collections::BTreeSet;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::support::{
    BIN, KillGroup, Load, LoadStats, Setup, children_of, poll_until, proc_status, scrape, toml_str,
};

/// Put `staged` in place of `path` the way a package upgrade does: a new file renamed over the
/// old one (a running master keeps the old inode).
fn install(staged: &Path, path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(staged, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::rename(staged, path).expect("rename over the binary");
}

fn install_binary(path: &Path) {
    let staged = path.with_extension("staged");
    std::fs::copy(BIN, &staged).expect("stage the binary");
    install(&staged, path);
}

fn install_script(path: &Path, script: &str) {
    let staged = path.with_extension("staged");
    std::fs::write(&staged, script).expect("stage the script");
    install(&staged, path);
}

fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn alive(pid: i32) -> bool {
    proc_status(pid, "State").is_some_and(|state| !state.starts_with('Z'))
}

/// A setup with its own copy of the binary, a pid file and the sample data.
fn upgradable() -> (Setup, PathBuf) {
    let setup = Setup::new().with_sample_data().own_binary();
    let pidfile = setup.path("ferrocorn.pid");
    let setup = setup.key("pidfile", &toml_str(&pidfile));
    (setup, pidfile)
}

/// Poll until the pool has answered at least `n` requests on `/healthz`.
fn wait_served(addr: std::net::SocketAddr, n: f64) {
    poll_until(
        "the load reaching the pool",
        Duration::from_secs(30),
        || {
            let served =
                scrape(addr).sum("ferrocorn_http_requests_total", &[("route", "/healthz")]);
            (served >= n).then_some(())
        },
    );
}

/// Poll until each of `workers` has answered part of the load.
fn wait_serving(addr: std::net::SocketAddr, workers: &BTreeSet<i32>) {
    poll_until(
        "the new workers serving the load",
        Duration::from_secs(30),
        || {
            let served = scrape(addr).per_worker("ferrocorn_worker_requests");
            (workers.iter())
                .all(|pid| served.get(pid).is_some_and(|n| *n > 0.0))
                .then_some(())
        },
    );
}

fn no_failure(stats: &LoadStats) {
    assert!(
        stats.errors.is_empty(),
        "{} failed requests, e.g. {:?}",
        stats.errors.len(),
        stats.errors.iter().take(5).collect::<Vec<_>>()
    );
}

/// The load saw no failure, and workers of both pools answered it.
fn both_pools_answered_without_a_failure(
    stats: LoadStats,
    before: &BTreeSet<i32>,
    after: &BTreeSet<i32>,
) {
    no_failure(&stats);
    let answered: BTreeSet<i32> = stats.pids.iter().map(|p| *p as i32).collect();
    assert!(!answered.is_disjoint(before), "{answered:?}");
    assert!(!answered.is_disjoint(after), "{answered:?}");
}

/// Whether `GET /healthz` answers 200 on the unix socket `path`.
fn healthy_on(path: &Path) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::os::unix::net::UnixStream::connect(path) else {
        return false;
    };
    let mut text = String::new();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .and_then(|()| stream.read_to_string(&mut text))
        .is_ok_and(|_| text.starts_with("HTTP/1.1 200"))
}

#[test]
fn usr2_hands_the_pool_to_the_new_binary_under_load_without_a_failed_request() {
    let (setup, pidfile) = upgradable();
    let manager = Manager::new(setup.dir.path());
    let notify = manager.path.to_string_lossy().into_owned();
    // A unix socket too: its file is the old master's, then the new one's.
    let socket = setup.path("ferrocorn.sock");
    let binds = format!("[\"127.0.0.1:0\", \"unix:{}\"]", socket.display());
    let mut server = setup
        .key("bind", &binds)
        .env("NOTIFY_SOCKET", &notify)
        .start();
    assert!(healthy_on(&socket));
    let addr = server.addr();
    let old = server.pid().as_raw();
    assert_eq!(read_pid(&pidfile), Some(old));
    let old_workers = server.workers();
    let load = Load::start(addr, 4);
    wait_served(addr, 200.0);

    install_binary(&server.setup.binary);
    server.signal(Signal::SIGUSR2);
    let new = poll_until(
        "the pid file naming the new master",
        Duration::from_secs(60),
        || read_pid(&pidfile).filter(|pid| *pid != old),
    );
    // The old master drains its workers and exits 0 once the new one serves, leaving the unix
    // socket's file to it.
    assert_eq!(server.wait_exit(Duration::from_secs(60)).code(), Some(0));
    assert!(
        healthy_on(&socket),
        "the unix socket after the old master's exit"
    );
    // The new master runs the file now at the path, not the one the old master was started from.
    assert_eq!(
        std::fs::read_link(format!("/proc/{new}/exe")).expect("exe"),
        server.setup.binary
    );
    let new_workers = children_of(new);
    assert_eq!(new_workers.len(), 2, "{new_workers:?}");
    assert!(new_workers.is_disjoint(&old_workers));
    wait_serving(addr, &new_workers);
    both_pools_answered_without_a_failure(load.stop(), &old_workers, &new_workers);
    assert_eq!(server.count(&["binary upgrade complete"]), 1);

    // The control socket, the lock and the files are the new master's.
    let (code, out, err) = server.setup.run_command(&["status"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.starts_with("2/2 workers ready"), "{out}");
    assert!(
        new_workers.iter().all(|pid| out.contains(&pid.to_string())),
        "{out}"
    );
    let lock = server.setup.path("cache/ferrocorn.lock");
    assert_eq!(read_pid(&lock), Some(new));
    // systemd heard of the new main process, and nothing of a stop: the service runs on.
    let told = manager.drain();
    let main_pid = told
        .iter()
        .position(|m| m.lines().any(|l| l == format!("MAINPID={new}")))
        .unwrap_or_else(|| panic!("no MAINPID={new} in {told:?}"));
    assert!(!told.iter().any(|m| m.contains("STOPPING=1")), "{told:?}");
    assert!(
        told[main_pid..].iter().any(|m| m.contains("READY=1")),
        "{told:?}"
    );
    kill(Pid::from_raw(new), Signal::SIGTERM).expect("stop the new master");
    poll_until("the new master to exit", Duration::from_secs(60), || {
        (!alive(new)).then_some(())
    });
    assert!(!pidfile.exists(), "the new master removes its pid file");
    assert!(!socket.exists(), "and its unix socket's file");
    assert!(!server.setup.path("cache/control.sock").exists());
}

#[test]
fn a_failed_upgrade_leaves_the_old_pool_serving() {
    let (setup, pidfile) = upgradable();
    // The new master must be ready within `timeout`.
    let mut server = setup.key("timeout", "3").start();
    let addr = server.addr();
    let old = server.pid().as_raw();
    let binary = server.setup.binary.clone();
    let load = Load::start(addr, 2);
    wait_served(addr, 50.0);
    let still_serving = |server: &crate::support::Server, failures: usize| {
        server.wait_log(
            &["binary upgrade failed"],
            failures,
            Duration::from_secs(60),
        );
        assert_eq!(read_pid(&pidfile), Some(old));
        assert_eq!(
            read_pid(&server.setup.path("cache/ferrocorn.lock")),
            Some(old)
        );
        let (code, out, err) = server.setup.run_command(&["status"]);
        assert_eq!(code, Some(0), "{err}");
        assert!(out.starts_with("2/2 workers ready, generation 1"), "{out}");
    };

    // A build that fails at once.
    install_script(
        &binary,
        "#!/bin/sh\necho 'this build is broken' >&2\nexit 1\n",
    );
    server.signal(Signal::SIGUSR2);
    still_serving(&server, 1);
    assert_eq!(server.count(&["binary upgrade failed", "exit code 1"]), 1);

    // One that never becomes ready: stopped after `timeout`.
    install_script(&binary, "#!/bin/sh\nexec sleep 600\n");
    server.signal(Signal::SIGUSR2);
    still_serving(&server, 2);
    assert_eq!(server.count(&["not ready within timeout"]), 1);

    // The real binary, with a configuration it refuses (exit 64): the running pool keeps the
    // configuration it has.
    install_binary(&binary);
    let config = server.setup.config_path();
    let good = std::fs::read_to_string(&config).expect("config");
    std::fs::write(&config, format!("{good}workers = \"many\"\n")).expect("bad config");
    server.signal(Signal::SIGUSR2);
    server.wait_log(&["binary upgrade failed"], 3, Duration::from_secs(60));
    assert_eq!(server.count(&["binary upgrade failed", "exit code 64"]), 1);
    // Mended (`ferrocorn status` reads the configuration too), the same pool upgrades.
    std::fs::write(&config, good).expect("config");
    still_serving(&server, 3);
    server.signal(Signal::SIGUSR2);
    assert_eq!(server.wait_exit(Duration::from_secs(60)).code(), Some(0));
    let new = read_pid(&pidfile).expect("pid file");
    assert_ne!(new, old);
    no_failure(&load.stop());
}

/// The test's stand-in for systemd: the notify socket, and the descriptors it stores.
struct Manager {
    socket: UnixDatagram,
    path: PathBuf,
}

impl Manager {
    fn new(dir: &Path) -> Self {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("notify socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        Self { socket, path }
    }

    /// The next message and the descriptors it carried (open in this process from now on, and
    /// inherited by what it starts, as systemd's store passes them on).
    fn next(&self) -> Option<(String, Vec<RawFd>)> {
        use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
        let mut buf = [0u8; 4096];
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let mut space = nix::cmsg_space!([RawFd; 8]);
        let msg = recvmsg::<()>(
            self.socket.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::empty(),
        )
        .ok()?;
        let mut fds = Vec::new();
        for cmsg in msg.cmsgs().ok()? {
            if let ControlMessageOwned::ScmRights(passed) = cmsg {
                fds.extend(passed);
            }
        }
        let len = msg.bytes;
        Some((String::from_utf8_lossy(&buf[..len]).into_owned(), fds))
    }

    /// Every message waiting (until none comes for a moment).
    fn drain(&self) -> Vec<String> {
        std::iter::from_fn(|| self.next().map(|(text, _)| text))
            .take(10_000)
            .collect()
    }

    /// Read messages until `stored` holds a descriptor for each of `names`; returns every
    /// message read.
    fn collect_store(&self, names: &[&str], stored: &mut Vec<(String, RawFd)>) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut messages = Vec::new();
        while names.iter().any(|n| !stored.iter().any(|(s, _)| s == n)) {
            assert!(
                Instant::now() < deadline,
                "stored only {stored:?}: {messages:?}"
            );
            let Some((text, fds)) = self.next() else {
                continue;
            };
            if text.lines().any(|l| l == "FDSTORE=1") {
                let name = text
                    .lines()
                    .find_map(|l| l.strip_prefix("FDNAME="))
                    .expect("a stored descriptor has a name");
                assert_eq!(fds.len(), 1, "{text}");
                stored.push((name.to_owned(), fds[0]));
            }
            messages.push(text);
        }
        messages
    }
}

#[test]
fn the_listeners_kept_in_systemds_fd_store_refuse_nothing_across_a_restart() {
    let setup = Setup::new().with_sample_data();
    let manager = Manager::new(setup.dir.path());
    let notify = manager.path.to_string_lossy().into_owned();
    let mut server = setup
        .env("NOTIFY_SOCKET", &notify)
        .env("FDSTORE", "16")
        .start();
    let addr = server.addr();
    let names = ["ferrocorn-slot-0-bind-0", "ferrocorn-slot-1-bind-0"];
    let mut stored = Vec::new();
    manager.collect_store(&names, &mut stored);
    let first_workers = server.workers();
    let load = Load::start(addr, 4);
    wait_served(addr, 200.0);

    // systemctl restart: the master stops, and systemd starts the next one with the store.
    server.signal(Signal::SIGTERM);
    assert_eq!(server.wait_exit(Duration::from_secs(60)).code(), Some(0));
    let fd_of = |name: &str| {
        stored
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, fd)| *fd)
            .expect("stored")
    };
    let (a, b) = (fd_of(names[0]), fd_of(names[1]));
    // As systemd does: the descriptors from 3 on, named, for this pid (bash keeps its pid when
    // it execs the binary).
    let script = format!(
        "exec 20<&{a} 21<&{b} {a}<&- {b}<&-; exec 3<&20 4<&21 20<&- 21<&-; \
         export LISTEN_PID=$$ LISTEN_FDS=2 LISTEN_FDNAMES={}:{}; exec \"$0\" \"$@\"",
        names[0], names[1]
    );
    let log = server.setup.path("restarted.log");
    let mut restarted = std::process::Command::new("bash")
        .arg("-c")
        .arg(script)
        .arg(BIN)
        .arg("--config")
        .arg(server.setup.config_path())
        .current_dir(server.setup.dir.path())
        .env("NOTIFY_SOCKET", &notify)
        .env("FDSTORE", "16")
        .env_remove("WORKERS")
        .env_remove("DUCKDB_MEMORY_LIMIT")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .process_group(0)
        .spawn()
        .expect("bash");
    let _group = KillGroup(restarted.id() as i32);
    let text = poll_until("the restarted pool ready", Duration::from_secs(60), || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Ok(Some(status)) = restarted.try_wait() {
            panic!("the restarted master exited with {status}:\n{text}");
        }
        text.contains("all workers ready").then_some(text)
    });
    assert!(
        text.contains("adopting the listeners systemd kept"),
        "{text}"
    );
    assert!(
        text.lines()
            .filter(|l| l.contains("listening address="))
            .all(|l| l.contains(&addr.to_string())),
        "the same port, from the same sockets:\n{text}"
    );
    // The restarted master stores its set afresh: what it was passed, dropped, then stored again.
    let mut again = Vec::new();
    let messages = manager.collect_store(&names, &mut again);
    for name in names {
        assert!(
            messages
                .iter()
                .any(|m| m.contains("FDSTOREREMOVE=1") && m.contains(&format!("FDNAME={name}"))),
            "{messages:?}"
        );
    }
    let second_workers = children_of(restarted.id() as i32);
    wait_serving(addr, &second_workers);
    both_pools_answered_without_a_failure(load.stop(), &first_workers, &second_workers);
}

#[test]
fn a_stop_during_an_upgrade_stops_the_new_master_too() {
    let (setup, _) = upgradable();
    let mut server = setup.start();
    install_script(&server.setup.binary, "#!/bin/sh\nexec sleep 600\n");
    server.signal(Signal::SIGUSR2);
    server.wait_log(&["started a new master"], 1, Duration::from_secs(30));
    let new: i32 = server.log_lines(&["started a new master"])[0]
        .split("new_master=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|pid| pid.parse().ok())
        .expect("the new master's pid in the log");
    assert!(alive(new));
    server.signal(Signal::SIGTERM);
    assert_eq!(server.wait_exit(Duration::from_secs(60)).code(), Some(0));
    // The old master exited after the new one: nothing of the upgrade is left running.
    assert!(!alive(new), "the new master outlived the stop");
    assert_eq!(server.count(&["binary upgrade abandoned"]), 1);
}
