//! Operations (issue 12): `/metrics` for the whole pool, the access log written at the end of
//! the body, request ids, exit causes, the memory guard, and the deploy files' own checks.

use std::time::Duration;

use nix::sys::signal::Signal;

use crate::support::{Load, Setup, get, poll_until, post_json, post_raw, scrape, toml_str};

#[test]
fn metrics_describe_the_whole_pool_and_add_up_to_the_requests_sent() {
    let server = Setup::new().with_sample_data().start();
    let addr = server.addr();
    let before = scrape(addr).per_worker("ferrocorn_worker_requests");
    for _ in 0..30 {
        assert_eq!(get(addr, "/v1/datasets").expect("datasets").status, 200);
    }
    for i in 0..8 {
        let sql = format!("SELECT {i} AS n");
        let answer =
            post_json(addr, "/v1/query", &serde_json::json!({ "sql": sql })).expect("query");
        assert_eq!(answer.status, 200);
    }
    for _ in 0..5 {
        assert_eq!(get(addr, "/nope").expect("404").status, 404);
    }
    // Responses are counted when their last byte is sent: poll until the last one is in.
    let metrics = poll_until("every response counted", Duration::from_secs(10), || {
        let m = scrape(addr);
        (m.sum("ferrocorn_http_requests_total", &[("route", "other")]) >= 5.0).then_some(m)
    });
    let count = |labels: &[(&str, &str)]| metrics.sum("ferrocorn_http_requests_total", labels);
    assert_eq!(
        count(&[
            ("route", "/v1/datasets"),
            ("method", "GET"),
            ("status", "200")
        ]),
        30.0
    );
    assert_eq!(
        count(&[
            ("route", "/v1/query"),
            ("method", "POST"),
            ("status", "200")
        ]),
        8.0
    );
    assert_eq!(count(&[("route", "other"), ("status", "404")]), 5.0);
    assert_eq!(
        metrics.sum(
            "ferrocorn_http_request_duration_seconds_count",
            &[("route", "/v1/query")]
        ),
        8.0
    );
    for name in [
        "ferrocorn_query_queue_seconds_count",
        "ferrocorn_query_execution_seconds_count",
        "ferrocorn_query_encoding_seconds_count",
    ] {
        assert_eq!(metrics.sum(name, &[]), 8.0, "{name}");
    }
    // The requests were served by both workers, and their counts add up to what was sent (the
    // two scrapes are requests too).
    let after = metrics.per_worker("ferrocorn_worker_requests");
    assert_eq!(after.len(), 2, "{after:?}");
    let served: f64 = after
        .iter()
        .map(|(pid, n)| n - before.get(pid).copied().unwrap_or(0.0))
        .sum();
    assert_eq!(served, 30.0 + 8.0 + 5.0 + 1.0, "{before:?} → {after:?}");
    assert!(
        after
            .iter()
            .all(|(pid, n)| n - before.get(pid).copied().unwrap_or(0.0) >= 2.0),
        "both workers served: {before:?} → {after:?}"
    );
    assert_eq!(metrics.sum("ferrocorn_worker_starts_total", &[]), 2.0);
    assert_eq!(metrics.sum("ferrocorn_workers", &[("state", "ready")]), 2.0);
    assert_eq!(metrics.sum("ferrocorn_workers_desired", &[]), 2.0);
    assert_eq!(metrics.samples("ferrocorn_build_info", &[]).count(), 1);
    let heartbeats = metrics.per_worker("ferrocorn_worker_heartbeat_age_seconds");
    assert!(heartbeats.values().all(|&age| age < 5.0), "{heartbeats:?}");
    assert_eq!(
        metrics
            .per_worker("ferrocorn_worker_open_connections")
            .len(),
        2
    );
    assert_eq!(
        metrics
            .samples("ferrocorn_listener_accept_queue", &[])
            .count(),
        2
    );
    // The master samples memory and CPU every second.
    let sampled = poll_until("RSS sampled", Duration::from_secs(10), || {
        let m = scrape(addr);
        let rss = m.per_worker("ferrocorn_worker_resident_memory_bytes");
        (rss.len() == 2 && rss.values().all(|&b| b > 1e6)).then_some(m)
    });
    let rss: f64 = sampled
        .per_worker("ferrocorn_worker_resident_memory_bytes")
        .values()
        .sum();
    assert_eq!(
        sampled.sum("ferrocorn_pool_resident_memory_bytes", &[]),
        rss
    );
    assert_eq!(
        sampled.sum("ferrocorn_pool_memory_budget_bytes", &[]),
        512e6,
        "duckdb_memory_limit = 512MB"
    );
}

#[test]
fn a_streamed_result_is_logged_at_its_end_with_the_bytes_sent() {
    let access_log = tempfile::NamedTempFile::new().expect("access log");
    let server = Setup::new()
        .with_sample_data()
        .key("accesslog", &toml_str(access_log.path()))
        .start();
    let addr = server.addr();
    // Several MiB of CSV: more than the buffer sent whole, so it streams without a length.
    let sql = "SELECT range AS n, repeat('x', 40) AS pad FROM range(200000)";
    let streamed = post_raw(
        addr,
        "/v1/query?format=csv",
        "application/json",
        serde_json::json!({ "sql": sql }).to_string().as_bytes(),
        &[("X-Request-Id", "streamed-1")],
    )
    .expect("query");
    assert_eq!(streamed.status, 200);
    assert!(streamed.header("content-length").is_none(), "it streamed");
    assert!(streamed.body.len() > 2 << 20, "{}", streamed.body.len());
    let line = poll_until("the access line", Duration::from_secs(10), || {
        std::fs::read_to_string(access_log.path())
            .ok()?
            .lines()
            .find(|l| l.ends_with(" streamed-1"))
            .map(str::to_owned)
    });
    let fields: Vec<&str> = line
        .split('"')
        .nth(2)
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(fields.first(), Some(&"200"), "{line}");
    // The wire carries chunk framing around the body: the log counts the body's bytes.
    assert_eq!(
        fields.get(1),
        Some(&streamed.body.len().to_string().as_str()),
        "{line}"
    );

    // A traceparent's trace id becomes the request id; without one, a UUIDv7.
    let traced = crate::support::get_with(
        addr,
        "/healthz",
        &[(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )],
    )
    .expect("traced");
    assert_eq!(
        traced.header("x-request-id"),
        Some("4bf92f3577b34da6a3ce929d0e0e4736")
    );
    let plain = get(addr, "/healthz").expect("plain");
    let id = plain.header("x-request-id").expect("id");
    assert_eq!((id.len(), &id[14..15]), (36, "7"), "a UUIDv7: {id}");
}

#[test]
fn worker_exits_are_counted_by_cause() {
    let mut server = Setup::new().with_sample_data().key("workers", "3").start();
    let addr = server.addr();
    let exits = |cause: &str| scrape(addr).sum("ferrocorn_worker_exits_total", &[("cause", cause)]);
    // A crash.
    let victim = *server.workers().iter().next().expect("a worker");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim), Signal::SIGKILL).expect("kill");
    poll_until("the crash counted", Duration::from_secs(30), || {
        (exits("crash") == 1.0).then_some(())
    });
    server.wait_log(&["worker ready"], 4, Duration::from_secs(60));
    // A scale-down.
    server.signal(Signal::SIGTTOU);
    poll_until("the scale-down counted", Duration::from_secs(60), || {
        (exits("scale") == 1.0).then_some(())
    });
    // A reload rolls the two left.
    server.signal(Signal::SIGHUP);
    poll_until("the reload counted", Duration::from_secs(60), || {
        (exits("reload") == 2.0).then_some(())
    });
    let metrics = scrape(addr);
    assert_eq!(metrics.sum("ferrocorn_worker_exits_total", &[]), 4.0);
    // 3, the crashed one's replacement, and the reload's: two successors, and the slot the
    // configuration (still 3 workers) brings back.
    assert_eq!(
        metrics.sum("ferrocorn_worker_starts_total", &[]),
        3.0 + 1.0 + 3.0
    );
    // The lifecycle lines name slot, pid, generation and cause.
    let crash = server.log_lines(&["worker died unexpectedly", &format!("pid={victim}")]);
    assert!(
        crash.iter().any(|l| l.contains("slot=")
            && l.contains("generation=1")
            && l.contains("cause=\"crash\"")),
        "{crash:?}"
    );
    server.signal(Signal::SIGTERM);
    assert_eq!(server.wait_exit(Duration::from_secs(60)).code(), Some(0));
}

#[test]
fn the_memory_guard_recycles_a_hungry_worker_while_the_others_serve() {
    let server = Setup::new()
        .with_sample_data()
        .key("max_worker_memory", r#""400MiB""#)
        .start();
    let addr = server.addr();
    let idle = poll_until("RSS sampled", Duration::from_secs(10), || {
        let rss = scrape(addr).per_worker("ferrocorn_worker_resident_memory_bytes");
        (rss.len() == 2 && rss.values().all(|&b| b > 0.0))
            .then(|| rss.values().copied().fold(f64::MAX, f64::min) as u64 >> 20)
    });
    assert!(idle < 300, "an idle worker holds {idle} MiB");
    // Enough memory taken for good to pass 400 MiB (the ceiling) but not 600 (the hard one).
    let hunger = |target_mib: u64| (target_mib - idle).to_string();
    let load = Load::start(addr, 4);
    let hog = post_raw(
        addr,
        "/test-hooks/hog",
        "text/plain",
        hunger(475).as_bytes(),
        &[],
    )
    .expect("hog");
    assert_eq!(hog.status, 200);
    poll_until(
        "the hungry worker recycled",
        Duration::from_secs(60),
        || {
            (scrape(addr).sum("ferrocorn_worker_exits_total", &[("cause", "memory")]) == 1.0)
                .then_some(())
        },
    );
    let stats = load.stop();
    assert!(
        stats.errors.is_empty(),
        "{:?}",
        &stats.errors[..stats.errors.len().min(5)]
    );
    assert!(stats.ok > 0);
    assert_eq!(
        server.count(&["recycling it once its successor is ready"]),
        1,
        "{}",
        server.log()
    );
    assert_eq!(
        server.count(&["killing it"]),
        0,
        "a graceful recycle, not a kill"
    );
    assert_eq!(
        scrape(addr).sum("ferrocorn_workers", &[("state", "ready")]),
        2.0
    );

    // Past the hard ceiling: killed at once, and replaced.
    // (The kill may come before the answer does.)
    let _ = post_raw(
        addr,
        "/test-hooks/hog",
        "text/plain",
        hunger(700).as_bytes(),
        &[],
    );
    poll_until(
        "the worker over the hard ceiling killed",
        Duration::from_secs(60),
        || {
            (scrape(addr).sum("ferrocorn_worker_exits_total", &[("cause", "memory")]) == 2.0)
                .then_some(())
        },
    );
    assert_eq!(server.count(&["over the hard memory ceiling"]), 1);
}

#[test]
fn the_prometheus_rules_and_their_tests_pass_promtool() {
    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/prometheus");
    for args in [
        ["check", "rules", "ferrocorn-rules.yml"],
        ["test", "rules", "ferrocorn-rules.test.yml"],
    ] {
        let output = std::process::Command::new("promtool")
            .args(args)
            .current_dir(&deploy)
            .output()
            .expect("promtool (Debian's prometheus package; .ci/run installs it)");
        assert!(
            output.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

#[test]
fn the_grafana_dashboard_uses_only_metrics_the_server_exports() {
    let server = Setup::new().with_sample_data().start();
    let exported = String::from_utf8_lossy(&get(server.addr(), "/metrics").expect("metrics").body)
        .into_owned();
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy/grafana/ferrocorn-dashboard.json");
    let text = std::fs::read_to_string(path).expect("dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    assert!(
        dashboard["panels"]
            .as_array()
            .is_some_and(|p| !p.is_empty())
    );
    let mut names: Vec<&str> = text
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("ferrocorn_"))
        .collect();
    names.sort_unstable();
    names.dedup();
    assert!(names.len() > 10, "{names:?}");
    for name in names {
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        assert!(
            exported.contains(&format!("# TYPE {base} ")),
            "the dashboard uses {name}, which /metrics does not export"
        );
    }
}

#[test]
fn the_watchdog_is_fed_only_while_a_quorum_of_workers_lives() {
    use std::os::unix::net::UnixDatagram;
    let setup = Setup::new();
    let socket_path = setup.path("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("notify socket");
    let mut server = setup
        .env("NOTIFY_SOCKET", &socket_path.display().to_string())
        .env("WATCHDOG_USEC", "900000")
        .spawn();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let mut buf = [0u8; 256];
    let mut watchdogs_within = |window: Duration| {
        let start = std::time::Instant::now();
        let mut fed = 0;
        while start.elapsed() < window {
            if let Ok(n) = socket.recv(&mut buf) {
                fed += usize::from(&buf[..n] == b"WATCHDOG=1\n");
            }
        }
        fed
    };
    server.wait_ready();
    assert!(
        watchdogs_within(Duration::from_secs(2)) >= 2,
        "fed while serving"
    );
    // Both workers stop: their heartbeats go stale within a second, and feeding stops.
    let workers = server.workers();
    for pid in &workers {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), Signal::SIGSTOP).expect("stop");
    }
    watchdogs_within(Duration::from_millis(1500));
    assert_eq!(
        watchdogs_within(Duration::from_secs(2)),
        0,
        "fed without a live worker"
    );
    for pid in &workers {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), Signal::SIGCONT).expect("cont");
    }
    assert!(watchdogs_within(Duration::from_secs(3)) >= 1, "fed again");
    server.signal(Signal::SIGTERM);
    assert_eq!(server.wait_exit(Duration::from_secs(30)).code(), Some(0));
}

#[test]
fn access_log_rotation_under_load_loses_no_line() {
    let setup = Setup::new();
    let access = setup.path("access.log");
    let server = setup.key("accesslog", &toml_str(&access)).start();
    let addr = server.addr();
    let load = Load::start(addr, 4);
    poll_until("lines being written", Duration::from_secs(10), || {
        std::fs::read_to_string(&access)
            .ok()
            .filter(|t| t.lines().count() > 200)
    });
    // What logrotate does: rename, then USR1 to the master, which tells every worker.
    let rotated = access.with_extension("log.1");
    std::fs::rename(&access, &rotated).expect("rotate");
    server.signal(Signal::SIGUSR1);
    server.wait_log(&["worker reopened log files"], 2, Duration::from_secs(10));
    poll_until("lines in the new file", Duration::from_secs(10), || {
        std::fs::read_to_string(&access)
            .ok()
            .filter(|t| t.lines().count() > 200)
    });
    let stats = load.stop();
    assert!(
        stats.errors.is_empty(),
        "{:?}",
        &stats.errors[..stats.errors.len().min(5)]
    );
    let lines = |path: &std::path::Path| {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("\"GET /healthz HTTP/1.1\" 200 "))
            .count() as u64
    };
    // Every answered request has its line, in one file or the other (each written whole).
    poll_until("every line written", Duration::from_secs(10), || {
        (lines(&rotated) + lines(&access) == stats.ok).then_some(())
    });
    assert!(lines(&rotated) > 0 && lines(&access) > 0);
}

#[test]
fn as_pid_1_of_a_pid_namespace_the_master_reaps_orphans_and_exits_with_the_pool() {
    let setup = Setup::new();
    setup.write_config();
    // `sh` starts a short-lived child and becomes the master: the child is the master's to reap,
    // as an orphan reparented to PID 1 would be.
    let script = format!(
        "sleep 0.2 & exec {} --config {}",
        crate::support::BIN,
        setup.config_path().display()
    );
    let log = setup.path("server.log");
    let mut unshare = std::process::Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "sh", "-c", &script])
        .current_dir(setup.dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("unshare (util-linux)");
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    poll_until("all workers ready", crate::support::READY_DEADLINE, || {
        text().contains("all workers ready").then_some(())
    });
    // The master is unshare's child; inside the namespace it is PID 1.
    let master = crate::support::children_of(unshare.id() as i32)
        .into_iter()
        .next()
        .expect("the master");
    assert_eq!(
        crate::support::proc_status(master, "NSpid")
            .as_deref()
            .and_then(|v| v.split_whitespace().last()),
        Some("1")
    );
    // The sleeper exits and is reaped: no zombie stays among the master's children.
    poll_until("the orphan reaped", Duration::from_secs(10), || {
        let children = crate::support::children_of(master);
        (children.len() == 2
            && children.iter().all(|c| {
                crate::support::proc_status(*c, "State").is_some_and(|s| !s.starts_with('Z'))
            }))
        .then_some(())
    });
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(master), Signal::SIGTERM).expect("term");
    let status = poll_until("unshare to exit", Duration::from_secs(30), || {
        unshare.try_wait().ok().flatten()
    });
    assert_eq!(status.code(), Some(0), "{}", text());
}

#[test]
fn a_2_cpu_2_gb_control_group_sizes_the_pool_without_settings() {
    // A v1 hierarchy (this machine's); a v2 one is read the same way (unit tests in cgroup.rs).
    let name = format!("ferrocorn-test-{}", std::process::id());
    let cpu = std::path::Path::new("/sys/fs/cgroup/cpu").join(&name);
    let memory = std::path::Path::new("/sys/fs/cgroup/memory").join(&name);
    struct Group(Vec<std::path::PathBuf>);
    impl Drop for Group {
        fn drop(&mut self) {
            for dir in &self.0 {
                let _ = std::fs::remove_dir(dir);
            }
        }
    }
    std::fs::create_dir(&cpu).expect("a cpu cgroup (run as root)");
    std::fs::create_dir(&memory).expect("a memory cgroup");
    let _group = Group(vec![cpu.clone(), memory.clone()]);
    std::fs::write(cpu.join("cpu.cfs_period_us"), "100000").expect("period");
    std::fs::write(cpu.join("cpu.cfs_quota_us"), "200000").expect("quota");
    std::fs::write(memory.join("memory.limit_in_bytes"), "2147483648").expect("memory");
    // The pool's own settings, without workers, DuckDB's memory or threads.
    let setup = Setup::new();
    let mut setup = setup;
    for key in ["workers", "duckdb_memory_limit", "duckdb_threads"] {
        setup.keys.remove(key);
    }
    setup.write_config();
    let script = format!(
        "echo $$ > {}/cgroup.procs && echo $$ > {}/cgroup.procs && exec {} --config {} --print-config",
        cpu.display(),
        memory.display(),
        crate::support::BIN,
        setup.config_path().display()
    );
    let output = std::process::Command::new("sh")
        .args(["-c", &script])
        .env_remove("WORKERS")
        .env_remove("DUCKDB_MEMORY_LIMIT")
        .output()
        .expect("sh");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(text.contains("workers = 2  # default"), "{text}");
    assert!(
        text.contains("duckdb_memory_limit = \"1536MiB\"  # default"),
        "{text}"
    );
    // Outside the group, the built-in defaults.
    let plain = std::process::Command::new(crate::support::BIN)
        .args([
            "--config",
            &setup.config_path().display().to_string(),
            "--print-config",
        ])
        .env_remove("WORKERS")
        .env_remove("DUCKDB_MEMORY_LIMIT")
        .output()
        .expect("ferrocorn");
    let plain = String::from_utf8_lossy(&plain.stdout);
    assert!(plain.contains("workers = 4  # default"), "{plain}");
}

#[test]
fn logs_in_json_and_access_lines_in_gunicorns_atoms() {
    // JSON: both streams, one object per line, escaped.
    let setup = Setup::new();
    let access = setup.path("access.log");
    let errors = setup.path("error.log");
    let server = setup
        .key("accesslog", &toml_str(&access))
        .key("errorlog", &toml_str(&errors))
        .key("log_format", r#""json""#)
        .spawn();
    poll_until(
        "ready in the error log",
        crate::support::READY_DEADLINE,
        || {
            std::fs::read_to_string(&errors)
                .ok()
                .filter(|t| t.contains("all workers ready"))
        },
    );
    let addr = poll_until("the address", Duration::from_secs(5), || {
        std::fs::read_to_string(&errors)
            .ok()?
            .lines()
            .find_map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).ok()?;
                v["address"].as_str()?.parse::<std::net::SocketAddr>().ok()
            })
    });
    for line in std::fs::read_to_string(&errors).expect("error log").lines() {
        let record: serde_json::Value = serde_json::from_str(line).expect("a JSON object per line");
        assert!(
            record["level"].is_string() && record["message"].is_string(),
            "{line}"
        );
    }
    let odd = crate::support::get_with(addr, "/healthz?q=%22x%22", &[("User-Agent", "say \"hi\"")])
        .expect("healthz");
    assert_eq!(odd.status, 200);
    let record = poll_until("the access record", Duration::from_secs(10), || {
        let text = std::fs::read_to_string(&access).ok()?;
        let line = text.lines().next()?.to_owned();
        Some(serde_json::from_str::<serde_json::Value>(&line).expect("JSON"))
    });
    assert_eq!(record["user_agent"], "say \"hi\"");
    assert_eq!(record["target"], "/healthz?q=%22x%22");
    assert_eq!(record["status"], 200);
    assert_eq!(record["bytes"].as_u64(), Some(odd.body.len() as u64));
    drop(server);

    // Gunicorn's atoms, a request header and a response header among them.
    let setup = Setup::new();
    let access = setup.path("access.log");
    let server = setup
        .key("accesslog", &toml_str(&access))
        .key(
            "access_log_format",
            r#"'%(h)s %(m)s %(U)s %(q)s %(s)s %(B)s %(p)s %({x-trace}i)s %({x-request-id}o)s'"#,
        )
        .start();
    let response = crate::support::get_with(
        server.addr(),
        "/healthz?a=1",
        &[("X-Trace", "t-9"), ("X-Request-Id", "rid-7")],
    )
    .expect("healthz");
    let line = poll_until("the access line", Duration::from_secs(10), || {
        std::fs::read_to_string(&access)
            .ok()?
            .lines()
            .next()
            .map(str::to_owned)
    });
    let pid = response.json()["pid"].as_u64().expect("pid");
    assert_eq!(
        line,
        format!(
            "127.0.0.1 GET /healthz a=1 200 {} <{pid}> t-9 rid-7",
            response.body.len()
        )
    );
    // A format with an unknown atom is refused before anything starts.
    let (status, _, stderr) = Setup::new()
        .key("access_log_format", r#""%(z)s""#)
        .arg("--check-config")
        .run_to_exit();
    assert_eq!(status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("access_log_format"), "{stderr}");
}

#[test]
fn server_status_lists_every_worker_for_a_script_and_a_person() {
    let server = Setup::new().with_sample_data().start();
    let addr = server.addr();
    poll_until("RSS sampled", Duration::from_secs(10), || {
        let rss = scrape(addr).per_worker("ferrocorn_worker_resident_memory_bytes");
        (rss.len() == 2 && rss.values().all(|&b| b > 0.0)).then_some(())
    });
    let status = get(addr, "/server-status").expect("status").json();
    let workers = status["workers"].as_array().expect("workers");
    let pids: std::collections::BTreeSet<i32> = workers
        .iter()
        .map(|w| w["pid"].as_i64().expect("pid") as i32)
        .collect();
    assert_eq!(pids, server.workers());
    for worker in workers {
        assert_eq!(worker["state"], "ready");
        assert_eq!(worker["generation"], 1);
        assert!(
            worker["rss_bytes"].as_u64().is_some_and(|b| b > 0),
            "{worker}"
        );
        assert!(
            worker["heartbeat_age_seconds"]
                .as_f64()
                .is_some_and(|a| a < 5.0)
        );
    }
    // The answering worker is serving this very request.
    let serving: Vec<&serde_json::Value> =
        workers.iter().filter(|w| !w["serving"].is_null()).collect();
    assert_eq!(serving.len(), 1, "{status}");
    assert_eq!(serving[0]["serving"], "GET /server-status");
    assert!(serving[0]["serving_seconds"].as_f64().is_some());

    let page =
        crate::support::get_with(addr, "/server-status", &[("Accept", "text/html")]).expect("page");
    assert!(
        page.header("content-type")
            .is_some_and(|t| t.starts_with("text/html"))
    );
    let html = String::from_utf8_lossy(&page.body);
    assert!(html.contains("<table"), "{html}");
    assert!(
        pids.iter()
            .all(|pid| html.contains(&format!("<td>{pid}</td>"))),
        "{html}"
    );
}

#[test]
fn server_status_needs_the_admin_scope_in_production() {
    let (server, _) = crate::auth::production_pool_with(Setup::new());
    let addr = server.addr();
    assert_eq!(get(addr, "/server-status").expect("anonymous").status, 401);
    let alice = crate::auth::token(&server, "alice");
    let refused = crate::support::get_with(
        addr,
        "/server-status",
        &[("Authorization", &format!("Bearer {alice}"))],
    )
    .expect("alice");
    assert_eq!(refused.status, 403);
    let root = crate::auth::token(&server, "root");
    let allowed = crate::support::get_with(
        addr,
        "/server-status",
        &[("Authorization", &format!("Bearer {root}"))],
    )
    .expect("root");
    assert_eq!(allowed.status, 200);
    assert_eq!(allowed.json()["workers"].as_array().map(Vec::len), Some(2));
}

#[test]
fn the_control_command_lists_scales_and_reloads_the_pool() {
    let server = Setup::new().with_sample_data().start();
    let control = |args: &[&str]| server.setup.run_command(args);
    let (code, out, err) = control(&["status"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.starts_with("2/2 workers ready, generation 1"), "{out}");
    for pid in server.workers() {
        assert!(out.contains(&format!(" {pid} ready ")), "{pid} in {out}");
    }

    let (code, out, _) = control(&["scale", "3"]);
    assert_eq!((code, out.trim()), (Some(0), "scaling from 2 to 3 workers"));
    poll_until("three workers", Duration::from_secs(60), || {
        control(&["status"])
            .1
            .starts_with("3/3 workers ready")
            .then_some(())
    });

    // The configuration still says two workers: the reload rolls to it and says when it is done.
    let (code, out, err) = control(&["reload"]);
    assert_eq!(code, Some(0), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines.first(),
        Some(&"reload accepted: rolling to generation 2"),
        "{out}"
    );
    assert_eq!(
        lines.get(1),
        Some(&"reload complete: 2/2 workers ready, generation 2"),
        "{out}"
    );

    // A configuration that does not validate: refused, said so, and the old pool serves on.
    let text = std::fs::read_to_string(server.setup.config_path()).expect("config");
    let broken = text.replace("workers = 2", "workers = 0");
    assert_ne!(broken, text);
    std::fs::write(server.setup.config_path(), broken).expect("break the config");
    let (code, out, _) = control(&["reload"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.starts_with("error: reload refused:") && out.contains("workers"),
        "{out}"
    );
    assert!(
        out.trim_end().ends_with("the running pool is unchanged"),
        "{out}"
    );
    assert_eq!(get(server.addr(), "/healthz").expect("healthz").status, 200);
    assert!(
        control(&["status"])
            .1
            .starts_with("2/2 workers ready, generation 2")
    );

    let (code, _, err) = control(&["scale", "0"]);
    assert_eq!(code, Some(64), "{err}");
}

#[test]
fn socket_activation_serves_the_connection_that_started_the_pool() {
    use std::os::unix::process::CommandExt;
    // A free port for systemd-socket-activate to listen on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let setup = Setup::new().with_sample_data();
    setup.write_config();
    let log = setup.path("server.log");
    let listen = format!("127.0.0.1:{port}");
    let mut activator = std::process::Command::new("systemd-socket-activate")
        .args(["--listen", &listen, crate::support::BIN, "--config"])
        .arg(setup.config_path())
        .current_dir(setup.dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .process_group(0)
        .spawn()
        .expect("systemd-socket-activate (Debian's systemd package)");
    let _group = crate::support::KillGroup(activator.id() as i32);
    let addr: std::net::SocketAddr = listen.parse().expect("addr");
    // The first connection starts the pool and waits in the socket's queue until it serves it.
    let connected = poll_until("the activator listening", Duration::from_secs(10), || {
        std::net::TcpStream::connect(addr).ok()
    });
    drop(connected);
    let first = poll_until(
        "an answer through the passed socket",
        Duration::from_secs(60),
        || get(addr, "/readyz").ok().filter(|r| r.status == 200),
    );
    assert_eq!(first.json()["status"], "ready");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(text.contains("socket activation"), "{text}");
    // The configured bind (port 0 of the test's setup) was not used: only the passed socket.
    assert!(
        text.lines()
            .filter(|l| l.contains("listening address="))
            .all(|l| l.contains(&listen)),
        "{text}"
    );
    let master = crate::support::children_of(activator.id() as i32);
    // systemd-socket-activate execs the command: the activator's pid is the master's.
    assert!(master.len() == 2, "the master's workers: {master:?}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(activator.id() as i32),
        Signal::SIGTERM,
    )
    .expect("term");
    let status = poll_until("the master to exit", Duration::from_secs(30), || {
        activator.try_wait().ok().flatten()
    });
    assert_eq!(status.code(), Some(0));
}
