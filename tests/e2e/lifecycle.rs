//! The master and its pool: fork rules, replacement without failures, hangs, crashes, signals.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::support::{self, Conn, Load, Setup, get, poll_until, proc_status};

#[test]
fn master_is_single_threaded_and_workers_are_its_children() {
    let server = Setup::new()
        .key("workers", "3")
        .key("max_requests", "0")
        .start();
    assert_eq!(
        proc_status(server.pid().as_raw(), "Threads").as_deref(),
        Some("1"),
        "the master must be single-threaded"
    );
    let workers = server.workers();
    assert_eq!(workers.len(), 3, "three worker children: {workers:?}");

    // Every child answers /readyz with its own pid after DuckDB's SELECT 1.
    let mut seen = BTreeSet::new();
    for _ in 0..2000 {
        let response = get(server.addr(), "/readyz").expect("readyz");
        assert_eq!(response.status, 200);
        let body = response.json();
        assert!(body["duckdb"].as_str().is_some_and(|v| v.starts_with('v')));
        seen.insert(body["pid"].as_i64().expect("pid") as i32);
        if seen.len() == 3 {
            break;
        }
    }
    assert_eq!(seen, workers, "each worker answered with its own DuckDB");
    for pid in &workers {
        let threads: usize = proc_status(*pid, "Threads")
            .and_then(|t| t.parse().ok())
            .expect("worker threads");
        assert!(threads >= 1);
    }
    // The lifecycle is logged with the word worker, the slot and the pid.
    for pid in &workers {
        assert_eq!(
            server.count(&["worker spawned", &format!("pid={pid}")]),
            1,
            "spawn of {pid} logged"
        );
        assert_eq!(
            server.count(&["worker ready", &format!("pid={pid}"), "slot="]),
            1
        );
    }
}

#[test]
fn no_failed_request_across_recycling_resizing_and_reload() {
    let setup = Setup::new()
        .key("workers", "2")
        .key("max_requests", "300")
        .key("max_requests_jitter", "50")
        .key("recycle_interval", "0");
    let config_path = setup.config_path();
    let server = setup.start();
    // The request budget counts API requests only; health probes come along.
    let load = Load::start_on(server.addr(), 3, "/v1/datasets");
    let probes = Load::start(server.addr(), 1);

    // Recycling: several workers reach their budget and are replaced.
    server.wait_log(&["recycling"], 20, Duration::from_secs(120));

    // TTIN: a third slot joins once its worker is ready.
    server.signal(Signal::SIGTTIN);
    server.wait_log(&["adding slot", "slot=2"], 1, Duration::from_secs(30));
    poll_until("the third slot to serve", Duration::from_secs(30), || {
        server
            .log_lines(&["worker ready", "slot=2"])
            .first()
            .cloned()
    });

    // TTOU: the third slot is drained and removed.
    server.signal(Signal::SIGTTOU);
    server.wait_log(&["removing slot", "slot=2"], 1, Duration::from_secs(30));
    server.wait_log(&["worker exited", "slot=2"], 1, Duration::from_secs(60));

    // HUP with a bigger pool: every worker is rolled, one at a time.
    let text = std::fs::read_to_string(&config_path).expect("config");
    std::fs::write(&config_path, text.replace("workers = 2", "workers = 3")).expect("config");
    server.signal(Signal::SIGHUP);
    server.wait_log(&["reload complete"], 1, Duration::from_secs(90));

    let mut stats = load.stop();
    let probed = probes.stop();
    stats.ok += probed.ok;
    stats.errors.extend(probed.errors);
    stats.pids.extend(probed.pids);
    // Without load no worker reaches its budget, so the pool settles at exactly three.
    poll_until("three workers", Duration::from_secs(30), || {
        (server.workers().len() == 3).then_some(())
    });
    let recycles = server.count(&["recycling"]);
    println!(
        "zero-failure run: {} requests, {} recycles, {} distinct workers answered, {} workers spawned",
        stats.ok,
        recycles,
        stats.pids.len(),
        server.count(&["worker spawned"])
    );
    assert!(
        stats.errors.is_empty(),
        "{} failed requests: {:?}",
        stats.errors.len(),
        &stats.errors[..stats.errors.len().min(10)]
    );
    assert!(stats.ok > 1000, "the load ran: {} requests", stats.ok);
    assert!(recycles >= 20);
}

#[test]
fn the_request_budget_counts_api_requests_not_probes() {
    let server = Setup::new()
        .key("workers", "1")
        .key("max_requests", "20")
        .key("max_requests_jitter", "0")
        .start();
    let mut conn = Conn::open(server.addr()).expect("connect");
    for path in [
        "/healthz",
        "/readyz",
        "/metrics",
        "/openapi.json",
        "/nowhere",
    ] {
        for _ in 0..10 {
            conn.get(path).expect("answered");
        }
    }
    for _ in 0..19 {
        assert_eq!(conn.get("/v1/datasets").expect("answered").status, 200);
    }
    assert_eq!(
        server.count(&["recycling"]),
        0,
        "50 probes and 19 API requests"
    );
    assert_eq!(conn.get("/v1/datasets").expect("answered").status, 200);
    server.wait_log(&["recycling"], 1, Duration::from_secs(10));
}

#[test]
fn sigkill_worker_is_replaced_and_pool_serves_within_a_second() {
    let server = Setup::new().key("workers", "2").start();
    let before = server.workers();
    let victim = *before.iter().next().expect("a worker");
    let ready_before = server.ready_count();
    let killed_at = Instant::now();
    kill(Pid::from_raw(victim), Signal::SIGKILL).expect("kill");
    poll_until("a replacement worker", Duration::from_secs(1), || {
        (server.ready_count() > ready_before).then_some(())
    });
    // Every new connection is served: none lands on a listener without a worker.
    for _ in 0..50 {
        let response = get(server.addr(), "/healthz").expect("served");
        assert_eq!(response.status, 200);
    }
    println!("SIGKILL to serving again: {:?}", killed_at.elapsed());
    let after = server.workers();
    assert_eq!(after.len(), 2);
    assert!(!after.contains(&victim));
    assert_eq!(
        server.count(&["worker died unexpectedly", &format!("pid={victim}")]),
        1
    );
}

#[test]
fn stopped_worker_is_killed_and_replaced_within_timeout() {
    let timeout = Duration::from_secs(2);
    let server = Setup::new().key("workers", "2").key("timeout", "2").start();
    let victim = *server.workers().iter().next().expect("a worker");
    let ready_before = server.ready_count();
    let stopped_at = Instant::now();
    kill(Pid::from_raw(victim), Signal::SIGSTOP).expect("stop");
    poll_until(
        "the hung worker to be replaced",
        timeout + Duration::from_secs(2),
        || {
            (server.ready_count() > ready_before && !server.workers().contains(&victim))
                .then_some(())
        },
    );
    println!("SIGSTOP to replaced: {:?}", stopped_at.elapsed());
    let lines = server.log_lines(&["WORKER TIMEOUT", &format!("pid={victim}")]);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("slot=") && lines[0].contains("serving="));
    assert_eq!(server.workers().len(), 2);
    assert_eq!(get(server.addr(), "/healthz").expect("healthz").status, 200);
}

#[test]
#[cfg(feature = "test-hooks")]
fn worker_that_cannot_boot_stops_the_master_with_code_3() {
    // (A bad dataset no longer keeps a worker from booting: see the sandbox tests.)
    let setup = Setup::new().env("FERROCORN_TEST_FAIL_BOOT", "the disk is on fire");
    let mut server = setup.spawn();
    let status = server.wait_exit(support::READY_DEADLINE);
    assert_eq!(status.code(), Some(3), "{}", server.log());
    let log = server.log();
    assert!(log.contains("worker failed to boot"), "{log}");
    assert!(
        log.contains("the disk is on fire"),
        "the reason is the worker's: {log}"
    );
    assert!(server.workers().is_empty());
}

#[test]
fn hup_with_an_invalid_config_leaves_the_pool_untouched() {
    let setup = Setup::new();
    let config_path = setup.config_path();
    let server = setup.start();
    let before = server.workers();
    std::fs::write(&config_path, "workers = \"many\"\n").expect("config");
    server.signal(Signal::SIGHUP);
    server.wait_log(
        &["reload: invalid configuration"],
        1,
        Duration::from_secs(10),
    );
    assert_eq!(server.workers(), before);
    assert_eq!(get(server.addr(), "/healthz").expect("healthz").status, 200);
}

#[test]
fn ten_hups_in_a_second_lose_no_slot() {
    let server = Setup::new().key("workers", "2").start();
    for _ in 0..10 {
        server.signal(Signal::SIGHUP);
        std::thread::sleep(Duration::from_millis(100));
    }
    server.wait_log(&["reload complete"], 1, Duration::from_secs(60));
    poll_until(
        "two workers after the HUP storm",
        Duration::from_secs(60),
        || {
            let log = server.log();
            let last_complete = log.rfind("reload complete")?;
            let last_reload = log.rfind("reloading: rolling")?;
            (last_complete > last_reload && server.workers().len() == 2).then_some(())
        },
    );
    for _ in 0..20 {
        assert_eq!(get(server.addr(), "/healthz").expect("healthz").status, 200);
    }
    assert!(!server.log().contains("panicked"));
}

#[test]
fn term_drains_and_exits_zero_and_removes_the_pid_file() {
    let setup = Setup::new().key("graceful_timeout", "10");
    let pidfile = setup.path("ferrocorn.pid");
    let setup = setup.key("pidfile", &support::toml_str(&pidfile));
    let mut server = setup.start();
    let written: i32 = std::fs::read_to_string(&pidfile)
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid");
    assert_eq!(written, server.pid().as_raw());
    server.signal(Signal::SIGTERM);
    let status = server.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0));
    assert!(!pidfile.exists(), "pid file removed");
    let log = server.log();
    let phases: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("master phase"))
        .filter_map(|l| l.split("phase=").nth(1))
        .collect();
    assert_eq!(phases, ["Starting", "Running", "Stopping", "Exited"]);
}

#[test]
fn quit_stops_at_once() {
    let mut server = Setup::new().start();
    server.signal(Signal::SIGQUIT);
    let status = server.wait_exit(Duration::from_secs(5));
    assert_eq!(status.code(), Some(0));
}

#[test]
fn usr1_reopens_the_error_log() {
    let setup = Setup::new();
    let errorlog = setup.path("error.log");
    let setup = setup.key("errorlog", &support::toml_str(&errorlog));
    let mut server = setup.spawn();
    poll_until(
        "workers ready in the error log",
        support::READY_DEADLINE,
        || {
            std::fs::read_to_string(&errorlog)
                .ok()
                .filter(|t| t.contains("all workers ready"))
        },
    );
    let rotated = errorlog.with_extension("log.1");
    std::fs::rename(&errorlog, &rotated).expect("rotate");
    server.signal(Signal::SIGUSR1);
    poll_until("a new error log", Duration::from_secs(10), || {
        let text = std::fs::read_to_string(&errorlog).ok()?;
        (text.contains("master reopened log files")
            && text.matches("worker reopened log files").count() == 2)
            .then_some(())
    });
    server.signal(Signal::SIGTERM);
    assert_eq!(server.wait_exit(Duration::from_secs(35)).code(), Some(0));
}

#[test]
fn serves_ipv4_ipv6_and_unix_socket_at_once() {
    let setup = Setup::new();
    let socket = setup.path("ferrocorn.sock");
    let binds = format!(
        "[\"127.0.0.1:0\", \"[::1]:0\", \"unix:{}\"]",
        socket.display()
    );
    let server = setup.key("bind", &binds).start();
    let addresses: Vec<String> = server
        .log_lines(&["listening"])
        .iter()
        .filter_map(|l| l.split("address=").nth(1).map(|a| a.trim().to_owned()))
        .collect();
    assert_eq!(addresses.len(), 3, "{addresses:?}");
    for address in &addresses {
        if let Ok(addr) = address.parse() {
            assert_eq!(get(addr, "/healthz").expect("tcp").status, 200, "{address}");
        }
    }
    use std::io::{Read, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(&socket).expect("unix connect");
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("write");
    let mut text = String::new();
    stream.read_to_string(&mut text).expect("read");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
}

#[test]
fn shared_listener_mode_serves_from_every_worker() {
    let server = Setup::new()
        .key("workers", "2")
        .key("reuse_port", "false")
        .start();
    let load = Load::start(server.addr(), 4);
    poll_until("both workers to answer", Duration::from_secs(30), || {
        let mut pids = BTreeSet::new();
        for _ in 0..50 {
            let body = get(server.addr(), "/healthz").ok()?.json();
            pids.insert(body["pid"].as_i64()? as i32);
        }
        (pids == server.workers()).then_some(())
    });
    server.signal(Signal::SIGTTOU);
    server.wait_log(&["worker exited"], 1, Duration::from_secs(30));
    let stats = load.stop();
    assert!(
        stats.errors.is_empty(),
        "{:?}",
        &stats.errors[..stats.errors.len().min(10)]
    );
}

#[test]
fn systemd_is_told_ready_reloading_and_stopping_with_status_lines() {
    use std::os::unix::net::UnixDatagram;
    let setup = Setup::new();
    let socket_path = setup.path("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("notify socket");
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut server = setup
        .env("NOTIFY_SOCKET", &socket_path.display().to_string())
        .spawn();
    let mut buf = [0u8; 256];
    let mut next = || {
        let n = socket.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert_eq!(next(), "READY=1\nSTATUS=2/2 workers ready, generation 1\n");
    // Not before: both workers had said they were ready (DuckDB answering, datasets registered).
    assert_eq!(server.count(&["worker ready"]), 2, "{}", server.log());
    server.wait_ready();
    assert!(server.log().contains("all workers ready"));
    // A reload: RELOADING=1 with the moment it began, then READY=1 once the roll is done.
    server.signal(Signal::SIGHUP);
    let reloading = next();
    let lines: Vec<&str> = reloading.lines().collect();
    assert_eq!(lines.first(), Some(&"RELOADING=1"), "{reloading}");
    assert!(
        lines.iter().any(|l| l
            .strip_prefix("MONOTONIC_USEC=")
            .is_some_and(|v| v.parse::<u64>().is_ok_and(|n| n > 0))),
        "{reloading}"
    );
    assert!(
        lines.contains(&"STATUS=reloading: generation 2"),
        "{reloading}"
    );
    assert_eq!(next(), "READY=1\nSTATUS=2/2 workers ready, generation 2\n");
    server.signal(Signal::SIGTERM);
    assert_eq!(
        next(),
        "STOPPING=1\nSTATUS=stopping: draining the workers\n"
    );
    assert_eq!(server.wait_exit(Duration::from_secs(35)).code(), Some(0));
}

#[test]
fn access_log_has_a_line_per_request_and_is_reopened_on_usr1() {
    let setup = Setup::new();
    let access = setup.path("access.log");
    let server = setup.key("accesslog", &support::toml_str(&access)).start();
    let addr = server.addr();
    let mut conn = crate::support::Conn::open(addr).expect("connect");
    conn.send_raw(
        b"GET /healthz?x=1 HTTP/1.1\r\nHost: x\r\nUser-Agent: probe/1\r\nX-Request-Id: req-42\r\n\r\n",
    )
    .expect("healthz");
    let line = poll_until("the access line", Duration::from_secs(10), || {
        std::fs::read_to_string(&access)
            .ok()?
            .lines()
            .find(|l| l.contains("req-42"))
            .map(str::to_owned)
    });
    assert!(line.starts_with("127.0.0.1 - - ["), "{line}");
    assert!(
        line.contains("\"GET /healthz?x=1 HTTP/1.1\" 200 ") && line.contains("\"probe/1\""),
        "{line}"
    );
    assert!(line.ends_with("ms req-42"), "{line}");

    let rotated = access.with_extension("log.1");
    std::fs::rename(&access, &rotated).expect("rotate");
    server.signal(Signal::SIGUSR1);
    server.wait_log(&["worker reopened log files"], 2, Duration::from_secs(10));
    for _ in 0..10 {
        get(addr, "/healthz").expect("healthz");
    }
    let fresh = poll_until(
        "lines in the reopened file",
        Duration::from_secs(10),
        || {
            std::fs::read_to_string(&access)
                .ok()
                .filter(|t| t.lines().count() == 10)
        },
    );
    assert!(
        fresh
            .lines()
            .all(|l| l.contains("\"GET /healthz HTTP/1.1\" 200 "))
    );
    assert!(
        std::fs::read_to_string(&rotated)
            .expect("rotated")
            .contains("req-42")
    );
}

/// The value of `key=` in a log line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|part| part.strip_prefix(key)?.strip_prefix('='))
}

#[test]
fn a_successor_is_promoted_only_after_its_warm_up() {
    let server = Setup::new()
        .with_sample_data()
        .key("workers", "1")
        .key("max_requests", "5")
        .key("max_requests_jitter", "0")
        .key("recycle_interval", "0")
        .key(
            "datasets",
            r#"{ orders = { warmup = ["SELECT sum(range) FROM range(200000000)"] } }"#,
        )
        .start();
    let probes = Load::start(server.addr(), 2);
    let mut conn = Conn::open(server.addr()).expect("connect");
    for _ in 0..5 {
        assert_eq!(conn.get("/v1/datasets").expect("answered").status, 200);
    }
    server.wait_log(&["worker ready"], 2, Duration::from_secs(60));
    let stats = probes.stop();
    assert!(
        stats.errors.is_empty(),
        "{:?}",
        &stats.errors[..stats.errors.len().min(5)]
    );

    let log = server.log();
    let lines: Vec<&str> = log.lines().collect();
    let position = |parts: &[&str], pid: &str| {
        lines
            .iter()
            .position(|l| parts.iter().all(|p| l.contains(p)) && field(l, "pid") == Some(pid))
    };
    let warmed: Vec<&str> = lines
        .iter()
        .filter(|l| l.contains("worker warmed"))
        .copied()
        .collect();
    assert_eq!(warmed.len(), 2, "both workers warmed:\n{log}");
    for line in warmed {
        let pid = field(line, "pid").expect("a pid");
        assert_eq!(field(line, "queries"), Some("3"), "{line}");
        let warmed_at = position(&["worker warmed"], pid);
        let ready_at = position(&["worker ready"], pid).expect("the worker became ready");
        assert!(
            warmed_at < Some(ready_at),
            "worker {pid} was promoted before its warm-up finished:\n{log}"
        );
    }
}

#[test]
fn continuous_query_load_across_recycles_is_answered_200() {
    let server = Setup::new()
        .with_sample_data()
        .key("workers", "2")
        .key("max_requests", "40")
        .key("max_requests_jitter", "10")
        .key("recycle_interval", "0")
        .start();
    let spawned = server.count(&["worker spawned"]);
    // Queries on keep-alive connections, cached and not: the recycles happen under them.
    let cached = Load::start_on(
        server.addr(),
        2,
        "/v1/query?sql=SELECT%20status%2C%20count(*)%20FROM%20orders%20GROUP%20BY%201",
    );
    let uncached = Load::start_on(
        server.addr(),
        2,
        "/v1/query?sql=SELECT%20count(*)%20FROM%20orders%20WHERE%20amount%20%3E%20random()",
    );
    server.wait_log(&["worker spawned"], spawned + 8, Duration::from_secs(120));
    let mut stats = cached.stop();
    let other = uncached.stop();
    stats.ok += other.ok;
    stats.errors.extend(other.errors);
    println!(
        "{} queries across {} recycles",
        stats.ok,
        server.count(&["worker spawned"]) - spawned
    );
    assert!(
        stats.errors.is_empty(),
        "{} failed: {:?}",
        stats.errors.len(),
        &stats.errors[..stats.errors.len().min(10)]
    );
    assert!(stats.ok > 300, "the load ran: {}", stats.ok);
}

/// Invariant 8, and the `docker stop` of issue 19 that reset every client: TERM closes the
/// listeners as the drain starts. A client that arrives during the drain is refused (nothing
/// delivered: safe to retry elsewhere), a request already sent is answered, and no connection
/// the kernel completed is reset when the master exits.
#[test]
fn term_refuses_late_clients_and_resets_no_accepted_connection() {
    const SLOW_SQL: &str = "SELECT sum(a.range * b.range) FROM range(60000) a, range(60000) b";
    let mut server = Setup::new()
        .key("workers", "2")
        .key("graceful_timeout", "60")
        .key("query_timeout_ms", "60000")
        .start();
    let addr = server.addr();
    // A query that keeps one worker draining for a while after TERM.
    let mut slow = Conn::open(addr).expect("connect");
    let body = format!(r#"{{"sql": "{SLOW_SQL}"}}"#);
    slow.send_only(
        format!(
            "POST /v1/query HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .expect("send the slow query");
    poll_until("the slow query in flight", Duration::from_secs(20), || {
        let in_flight = support::scrape(addr).sum("ferrocorn_worker_in_flight_requests", &[]);
        (in_flight >= 2.0).then_some(())
    });
    // Clients that each send one request per new connection, as the reported load did.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..10)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let (mut answered, mut failed, mut refused) = (0u32, Vec::new(), 0u32);
                let started = Instant::now();
                while !stop.load(std::sync::atomic::Ordering::Relaxed)
                    && started.elapsed() < Duration::from_secs(60)
                {
                    let mut conn = match Conn::open(addr) {
                        Ok(conn) => conn,
                        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                            refused += 1;
                            std::thread::sleep(Duration::from_millis(5));
                            continue;
                        }
                        Err(e) => {
                            failed.push(format!("connect: {e}"));
                            continue;
                        }
                    };
                    match conn.get("/v1/datasets") {
                        Ok(r) if r.status == 200 => answered += 1,
                        Ok(r) => failed.push(format!("status {}", r.status)),
                        Err(e) => failed.push(format!("after connecting: {e}")),
                    }
                }
                (answered, failed, refused)
            })
        })
        .collect();
    poll_until("load answered", Duration::from_secs(20), || {
        (support::scrape(addr).sum("ferrocorn_requests_total", &[]) > 50.0).then_some(())
    });
    server.signal(Signal::SIGTERM);
    // While the slow query still runs, a new connection is refused at once.
    poll_until("a refused connection", Duration::from_secs(10), || {
        match std::net::TcpStream::connect(addr) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Some(()),
            _ => None,
        }
    });
    assert!(
        kill(server.pid(), None).is_ok(),
        "refused while the master still drains"
    );
    let response = slow.read().expect("the slow query is answered");
    assert_eq!(
        response.status,
        200,
        "{}",
        String::from_utf8_lossy(&response.body)
    );
    let status = server.wait_exit(Duration::from_secs(60));
    assert_eq!(status.code(), Some(0));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut answered, mut refused, mut failed) = (0, 0, Vec::new());
    for client in clients {
        let (a, f, r) = client.join().expect("client");
        answered += a;
        refused += r;
        failed.extend(f);
    }
    assert!(
        answered > 0 && refused > 0,
        "{answered} answered, {refused} refused"
    );
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
}

/// Behind a load balancer (issue 20): with `deregistration_delay`, TERM turns `/readyz` to 503
/// at once while the pool serves on; the listeners close, and the workers drain, only when the
/// delay is over.
#[test]
fn term_with_a_deregistration_delay_fails_readyz_and_serves_on_until_the_drain() {
    let delay = Duration::from_secs(2);
    let mut server = Setup::new()
        .key("workers", "2")
        .key("deregistration_delay", "2")
        .start();
    let addr = server.addr();
    assert_eq!(get(addr, "/readyz").expect("readyz").status, 200);
    server.signal(Signal::SIGTERM);
    let termed = Instant::now();
    let answer = poll_until("/readyz to turn 503", Duration::from_secs(5), || {
        let answer = get(addr, "/readyz").ok()?;
        (answer.status == 503).then_some(answer)
    });
    assert_eq!(answer.json()["code"], "deregistering");
    // Meanwhile every new connection is served.
    let mut served = 0;
    while termed.elapsed() < delay - Duration::from_millis(500) {
        let answer = get(addr, "/v1/datasets").expect("served while de-registering");
        assert_eq!(answer.status, 200);
        served += 1;
    }
    assert!(served > 0);
    poll_until("a refused connection", Duration::from_secs(10), || {
        match std::net::TcpStream::connect(addr) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Some(()),
            _ => None,
        }
    });
    assert!(termed.elapsed() >= delay, "not before the delay");
    assert_eq!(server.wait_exit(Duration::from_secs(30)).code(), Some(0));
    let phases: Vec<String> = server
        .log_lines(&["master phase"])
        .iter()
        .filter_map(|l| l.split("phase=").nth(1).map(str::to_owned))
        .collect();
    assert_eq!(
        phases,
        ["Starting", "Running", "Deregistering", "Stopping", "Exited"]
    );
}
