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
    let hog = post_raw(
        addr,
        "/test-hooks/hog",
        "text/plain",
        hunger(700).as_bytes(),
        &[],
    )
    .expect("hog");
    assert_eq!(hog.status, 200);
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
