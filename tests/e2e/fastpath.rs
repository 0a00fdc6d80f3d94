//! The fast data path through the real binary: snapshots shared by the workers, the result
//! cache, conditional requests and `/metrics`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::json;

use crate::support::{Response, Server, Setup, get, poll_until, post_raw};

fn query_with(addr: SocketAddr, body: &serde_json::Value, headers: &[(&str, &str)]) -> Response {
    post_raw(
        addr,
        "/v1/query",
        "application/json",
        &serde_json::to_vec(body).expect("json"),
        headers,
    )
    .expect("query")
}

fn query(addr: SocketAddr, sql: &str) -> Response {
    query_with(addr, &json!({ "sql": sql }), &[])
}

/// `/metrics` as sample name (with labels) → value.
fn metrics(addr: SocketAddr) -> BTreeMap<String, f64> {
    let response = get(addr, "/metrics").expect("metrics");
    assert_eq!(response.status, 200);
    assert!(
        response
            .header("content-type")
            .is_some_and(|t| t.starts_with("text/plain; version=0.0.4"))
    );
    String::from_utf8_lossy(&response.body)
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

fn metric(addr: SocketAddr, name: &str) -> f64 {
    metrics(addr).get(name).copied().unwrap_or(f64::NAN)
}

/// Wait until `dataset` is served from a snapshot of a version other than `not_version`.
fn wait_for_snapshot(server: &Server, dataset: &str, not_version: &str) -> serde_json::Value {
    poll_until(
        &format!("{dataset} to be served from a new snapshot"),
        Duration::from_secs(60),
        || {
            let info = get(server.addr(), &format!("/v1/datasets/{dataset}"))
                .ok()?
                .json();
            (info["storage"] == "snapshot"
                && info["pending_version"].is_null()
                && info["dataset_version"] != not_version)
                .then_some(info)
        },
    )
}

fn files_with_suffix(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    found.retain(|p| p.to_string_lossy().ends_with(suffix));
    found
}

#[test]
fn replacing_a_parquet_file_under_load_gives_new_answers_and_never_the_old_one_again() {
    // One worker, so that "after the first new answer" is one order of events.
    let setup = Setup::new().with_sample_data().key("workers", "1");
    let data = setup.path("data");
    let server = setup.start();
    let before = wait_for_snapshot(&server, "orders", "");
    assert!(before["snapshot_bytes"].as_u64().is_some_and(|b| b > 0));
    let sql = "SELECT count(*) AS n FROM orders";
    assert_eq!(query(server.addr(), sql).json()["rows"][0][0], 5000);

    // Clients repeat the (cacheable) query while the file is replaced.
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..3)
        .map(|_| {
            let stop = stop.clone();
            let addr = server.addr();
            std::thread::spawn(move || {
                let mut seen = Vec::new();
                let started = Instant::now();
                while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(60) {
                    let sent = Instant::now();
                    let response = query(addr, sql);
                    let answered = Instant::now();
                    let answer = (response.status == 200)
                        .then(|| response.json()["rows"][0][0].as_u64())
                        .flatten();
                    seen.push((sent, answered, response.status, answer));
                }
                seen
            })
        })
        .collect();
    poll_until(
        "the clients to get cache hits",
        Duration::from_secs(10),
        || (metric(server.addr(), "ferrocorn_result_cache_hits_total") > 10.0).then_some(()),
    );
    let staging = data.join(".staging.parquet");
    std::fs::copy(data.join("customers.parquet"), &staging).expect("copy");
    std::fs::rename(&staging, data.join("orders.parquet")).expect("rename");
    let replaced = Instant::now();
    let old_version = before["dataset_version"].as_str().expect("version");
    wait_for_snapshot(&server, "orders", old_version);
    poll_until(
        "a few answers after the switch",
        Duration::from_secs(10),
        || (query(server.addr(), sql).json()["rows"][0][0] == 500).then_some(()),
    );
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let mut seen: Vec<_> = clients
        .into_iter()
        .flat_map(|c| c.join().expect("client"))
        .collect();
    seen.sort_by_key(|s| s.0);

    let failed: Vec<_> = seen.iter().filter(|s| s.2 != 200).collect();
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    assert!(seen.iter().all(|s| matches!(s.3, Some(5000 | 500))));
    let first_new = seen
        .iter()
        .filter(|s| s.3 == Some(500))
        .map(|s| s.1)
        .min()
        .expect("a new answer");
    let stale: Vec<_> = seen
        .iter()
        .filter(|s| s.0 > first_new && s.3 == Some(5000))
        .collect();
    assert!(
        stale.is_empty(),
        "old answers after the first new one: {}",
        stale.len()
    );
    println!(
        "{} answers, first new answer {:?} after the replacement",
        seen.len(),
        first_new.saturating_duration_since(replaced)
    );
    assert!(metric(server.addr(), "ferrocorn_result_cache_hits_total") > 10.0);
}

#[test]
fn etag_revalidation_cache_control_and_metrics() {
    // Every result on disk, however quick (the disk's byte count is among the metrics).
    let server = Setup::new()
        .with_sample_data()
        .key("result_cache_min_ms", "0")
        .start();
    let addr = server.addr();
    let body =
        json!({"sql": "SELECT status, count(*) AS n FROM orders GROUP BY status ORDER BY status"});

    let first = query_with(addr, &body, &[]);
    assert_eq!(first.status, 200);
    assert_eq!(first.header("x-cache"), Some("miss"));
    assert_eq!(first.header("cache-control"), Some("private, no-cache"));
    let etag = first.header("etag").expect("etag").to_owned();
    assert!(etag.starts_with('"') && etag.len() == 66, "{etag}");

    // The stored entry is shared by both workers.
    let hit = poll_until("a cache hit", Duration::from_secs(10), || {
        let r = query_with(addr, &body, &[]);
        (r.header("x-cache") == Some("hit")).then_some(r)
    });
    assert_eq!(hit.body, first.body);
    assert_eq!(hit.header("etag"), Some(etag.as_str()));
    assert_eq!(hit.header("x-result-rows"), first.header("x-result-rows"));

    let not_modified = query_with(addr, &body, &[("If-None-Match", &etag)]);
    assert_eq!(not_modified.status, 304);
    assert!(not_modified.body.is_empty());
    assert_eq!(not_modified.header("etag"), Some(etag.as_str()));
    let other_tag = query_with(addr, &body, &[("If-None-Match", "\"something-else\"")]);
    assert_eq!(other_tag.status, 200);

    // The client can skip the lookup, or the cache altogether.
    for directive in ["no-cache", "no-store"] {
        let r = query_with(addr, &body, &[("Cache-Control", directive)]);
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-cache"), Some("bypass"), "{directive}");
        assert_eq!(r.body, first.body);
    }

    // Another format, other parameters or another limit is another result.
    let csv = query_with(addr, &json!({"sql": body["sql"], "format": "csv"}), &[]);
    assert_ne!(csv.header("etag"), Some(etag.as_str()));
    let limited = query_with(addr, &json!({"sql": body["sql"], "limit": 2}), &[]);
    assert_ne!(limited.header("etag"), Some(etag.as_str()));
    let sql = "SELECT count(*) FROM orders WHERE status = $1";
    let open = query_with(addr, &json!({"sql": sql, "params": ["open"]}), &[]);
    let shipped = query_with(addr, &json!({"sql": sql, "params": ["shipped"]}), &[]);
    assert_ne!(open.header("etag"), shipped.header("etag"));
    assert_ne!(open.body, shipped.body);

    // Volatile statements are never cached nor validated.
    for sql in [
        "SELECT random() FROM orders LIMIT 1",
        "SELECT now(), count(*) FROM orders",
        "SELECT 1",
    ] {
        let r = query(addr, sql);
        assert_eq!(r.status, 200, "{sql}");
        assert_eq!(r.header("cache-control"), Some("no-store"), "{sql}");
        assert_eq!(r.header("etag"), None, "{sql}");
    }
    let random = "SELECT random() AS r FROM orders LIMIT 1";
    assert_ne!(query(addr, random).body, query(addr, random).body);

    let m = metrics(addr);
    assert!(m["ferrocorn_result_cache_hits_total"] >= 1.0, "{m:?}");
    assert!(m["ferrocorn_result_cache_misses_total"] >= 1.0, "{m:?}");
    assert!(m["ferrocorn_result_cache_stores_total"] >= 1.0, "{m:?}");
    assert!(m["ferrocorn_queries_not_modified_total"] >= 1.0, "{m:?}");
    assert!(m["ferrocorn_result_cache_bytes"] > 0.0, "{m:?}");
    assert_eq!(m["ferrocorn_workers{state=\"ready\"}"], 2.0);
    assert!(m["ferrocorn_queries_total"] >= 15.0, "{m:?}");
    assert!(m["ferrocorn_requests_total"] > m["ferrocorn_queries_total"]);
}

#[test]
fn the_result_cache_can_be_switched_off() {
    let server = Setup::new()
        .with_sample_data()
        .key("result_cache", "false")
        .start();
    let sql = "SELECT count(*) FROM customers";
    for _ in 0..3 {
        let r = query(server.addr(), sql);
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-cache"), Some("bypass"));
        assert!(
            r.header("etag").is_some(),
            "conditional requests still work"
        );
    }
    assert_eq!(
        metric(server.addr(), "ferrocorn_result_cache_stores_total"),
        0.0
    );
}

#[test]
fn the_result_cache_stays_within_its_byte_bound() {
    let setup = Setup::new()
        .with_sample_data()
        .key("result_cache_size", "\"1MiB\"")
        // Every result on disk, however quick.
        .key("result_cache_min_ms", "0");
    let results = setup.path("cache/results");
    let server = setup.start();
    let bound = 1u64 << 20;
    let disk = || -> u64 {
        files_with_suffix(&results, ".entry")
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum()
    };
    let mut stored = 0u64;
    for i in 0..150 {
        // About 60 KB of JSON each: 150 of them are several times the bound.
        let sql = format!("SELECT * FROM orders WHERE order_id > {i} ORDER BY order_id LIMIT 600");
        let response = query(server.addr(), &sql);
        assert_eq!(response.status, 200);
        stored += response.body.len() as u64;
        assert!(
            disk() <= bound,
            "{} bytes on disk after {i} results",
            disk()
        );
    }
    assert!(stored > 3 * bound, "the test must overflow the cache");
    let m = poll_until("stores to finish", Duration::from_secs(10), || {
        let m = metrics(server.addr());
        (m["ferrocorn_result_cache_stores_total"] >= 150.0).then_some(m)
    });
    assert!(m["ferrocorn_result_cache_evictions_total"] > 50.0, "{m:?}");
    assert!(m["ferrocorn_result_cache_bytes"] >= disk() as f64, "{m:?}");
    assert!(disk() <= bound);
    assert!(disk() > bound / 2, "the cache is used up to its bound");
}

/// A Parquet file whose snapshot takes a while to build: `rows` rows sorted by a random column.
fn write_slow_dataset(path: &Path, rows: u64) {
    let conn = duckdb::Connection::open_in_memory().expect("duckdb");
    conn.execute_batch(&format!(
        "COPY (SELECT range AS id, hash(range) AS r, range % 1000 AS g FROM range({rows})) \
         TO '{}' (FORMAT parquet)",
        path.display()
    ))
    .expect("write parquet");
}

#[test]
fn a_worker_killed_mid_build_leaves_no_half_written_snapshot_in_use() {
    let setup = Setup::new().key("workers", "1").key(
        "datasets",
        "{ big = { storage = \"snapshot\", sort_key = \"r\" } }",
    );
    let rows = 6_000_000u64;
    write_slow_dataset(&setup.path("data/big.parquet"), rows);
    let snapshots = setup.path("cache/snapshots");
    let mut server = setup.spawn();
    // Kill the worker while its snapshot is being written.
    let temp = poll_until("a build to start", Duration::from_secs(60), || {
        files_with_suffix(&snapshots, ".tmp").pop()
    });
    let builder = *server.workers().iter().next().expect("a worker");
    kill(Pid::from_raw(builder), Signal::SIGKILL).expect("kill");
    assert!(
        files_with_suffix(&snapshots, ".duckdb").is_empty(),
        "nothing was published"
    );
    server.wait_ready();

    // Until the replacement has built a whole snapshot, the Parquet file answers; every answer
    // is complete.
    let expected_sum = rows * (rows - 1) / 2;
    let info = poll_until(
        "the snapshot to be rebuilt",
        Duration::from_secs(120),
        || {
            let r = query(server.addr(), "SELECT count(*), sum(id) FROM big");
            assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
            let answer = r.json();
            assert_eq!(answer["rows"][0][0], rows);
            assert_eq!(
                answer["rows"][0][1].as_str(),
                Some(expected_sum.to_string().as_str())
            );
            let info = get(server.addr(), "/v1/datasets/big").ok()?.json();
            (info["storage"] == "snapshot").then_some(info)
        },
    );
    assert!(info["snapshot_bytes"].as_u64().is_some_and(|b| b > 0));
    assert!(!server.workers().contains(&builder));
    let answer = query(server.addr(), "SELECT count(*), sum(id) FROM big").json();
    assert_eq!(answer["rows"][0][0], rows);
    // The killed builder's temporary file was removed, not attached or published.
    assert_eq!(files_with_suffix(&snapshots, ".duckdb").len(), 1);
    poll_until(
        "the half-written file to be removed",
        Duration::from_secs(30),
        || (!temp.exists()).then_some(()),
    );
}

#[test]
fn snapshots_and_cached_results_survive_a_restart() {
    let setup = Setup::new()
        .with_sample_data()
        .key("workers", "1")
        .key("result_cache_min_ms", "0");
    let snapshots = setup.path("cache/snapshots");
    let server = setup.start();
    let orders = wait_for_snapshot(&server, "orders", "");
    let sql = "SELECT status, sum(amount) AS total FROM orders GROUP BY status ORDER BY status";
    let first = query(server.addr(), sql);
    assert_eq!(first.header("x-cache"), Some("miss"));
    poll_until("the result to be stored", Duration::from_secs(10), || {
        (metric(server.addr(), "ferrocorn_result_cache_stores_total") >= 1.0).then_some(())
    });
    let built: Vec<_> = files_with_suffix(&snapshots, ".duckdb")
        .into_iter()
        .map(|p| {
            (
                p.clone(),
                std::fs::metadata(&p).and_then(|m| m.modified()).ok(),
            )
        })
        .collect();
    assert_eq!(built.len(), 3, "one snapshot per sample dataset: {built:?}");

    let server = server.restart();
    // Served from the same snapshot at once: nothing was rebuilt.
    let info = get(server.addr(), "/v1/datasets/orders")
        .expect("orders")
        .json();
    assert_eq!(info["storage"], "snapshot");
    assert_eq!(info["dataset_version"], orders["dataset_version"]);
    let now: Vec<_> = files_with_suffix(&snapshots, ".duckdb")
        .into_iter()
        .map(|p| {
            (
                p.clone(),
                std::fs::metadata(&p).and_then(|m| m.modified()).ok(),
            )
        })
        .collect();
    assert_eq!(now, built);
    // And the result comes from the cache the first time it is asked.
    let again = query(server.addr(), sql);
    assert_eq!(again.header("x-cache"), Some("hit"));
    assert_eq!(again.body, first.body);
}

#[test]
fn an_idle_pool_rebuilds_a_changed_snapshot_before_any_request() {
    let setup = Setup::new().with_sample_data().key("workers", "1");
    let data = setup.path("data");
    let snapshots = setup.path("cache/snapshots");
    let server = setup.start();
    let before = wait_for_snapshot(&server, "orders", "");
    let old = files_with_suffix(&snapshots, ".duckdb");
    assert!(old.iter().any(|p| p.to_string_lossy().contains("/orders.")));

    let staging = data.join(".staging.parquet");
    std::fs::copy(data.join("customers.parquet"), &staging).expect("copy");
    std::fs::rename(&staging, data.join("orders.parquet")).expect("rename");
    // No request reaches the server until the new snapshot file exists.
    let new = poll_until("the idle worker to build", Duration::from_secs(30), || {
        files_with_suffix(&snapshots, ".duckdb")
            .into_iter()
            .find(|p| p.to_string_lossy().contains("/orders.") && !old.contains(p))
    });
    let after = wait_for_snapshot(
        &server,
        "orders",
        before["dataset_version"].as_str().expect("version"),
    );
    assert_eq!(
        after["snapshot_bytes"],
        std::fs::metadata(&new).expect("new").len()
    );
    assert_eq!(
        query(server.addr(), "SELECT count(*) FROM orders").json()["rows"][0][0],
        500
    );
}

#[test]
fn quick_results_stay_in_memory_and_slow_ones_go_to_disk() {
    let setup = Setup::new()
        .with_sample_data()
        .key("workers", "1")
        .key("result_cache_min_ms", "50");
    let results = setup.path("cache/results");
    let server = setup.start();
    // Quick: a lookup. Its repeat is answered from the worker's memory; nothing reaches disk.
    let quick = "SELECT * FROM orders WHERE order_id = 3";
    for _ in 0..3 {
        assert_eq!(query(server.addr(), quick).status, 200);
    }
    let again = query(server.addr(), quick);
    assert_eq!(again.header("x-cache"), Some("hit"));
    // Slow: the same table crossed with a range, well over 50 ms. It is stored on disk.
    let slow = "SELECT count(*) AS n FROM orders, range(20000000)";
    let first = query(server.addr(), slow);
    assert_eq!(first.status, 200);
    poll_until("the slow result on disk", Duration::from_secs(10), || {
        (files_with_suffix(&results, ".entry").len() == 1).then_some(())
    });
    assert_eq!(query(server.addr(), slow).header("x-cache"), Some("hit"));
    assert_eq!(
        files_with_suffix(&results, ".entry").len(),
        1,
        "only the slow result went to disk"
    );
}

/// Issue 19: a sort key that names no column of its dataset (the sample's `order_id` on another
/// `orders`) is reported once, clearly, in the log and in `/v1/datasets`; the dataset serves from
/// Parquet, and neither a new worker nor the next start builds it again.
#[test]
fn a_sort_key_that_is_not_a_column_is_reported_once_and_not_retried() {
    let setup = Setup::new().with_sample_data().key("workers", "2").key(
        "datasets",
        "{ orders = { storage = \"snapshot\", sort_key = \"no_such_column\" } }",
    );
    let snapshots = setup.path("cache/snapshots");
    let server = setup.start();
    let info = poll_until("the failure reported", Duration::from_secs(60), || {
        let info = get(server.addr(), "/v1/datasets/orders").ok()?.json();
        info["snapshot_error"].is_string().then_some(info)
    });
    let reason = info["snapshot_error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        reason.contains("sort_key \"no_such_column\" is not a column of orders")
            && reason.contains("amount"),
        "{reason}"
    );
    assert_eq!(info["storage"], "parquet");
    assert_eq!(info["available"], true);
    let r = query(server.addr(), "SELECT count(*) FROM orders");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(files_with_suffix(&snapshots, ".failed").len(), 1);
    // Every worker of a new generation sees the record instead of building again.
    let before: BTreeMap<i32, ()> = server.workers().into_iter().map(|p| (p, ())).collect();
    server.signal(Signal::SIGHUP);
    poll_until("a new generation", Duration::from_secs(60), || {
        let now = server.workers();
        (server.ready_count() >= 4 && now.len() == 2 && now.iter().all(|p| !before.contains_key(p)))
            .then_some(())
    });
    for _ in 0..4 {
        let info = get(server.addr(), "/v1/datasets/orders")
            .expect("datasets")
            .json();
        assert_eq!(info["snapshot_error"].as_str(), Some(reason.as_str()));
    }
    assert_eq!(
        server.count(&["snapshot build failed"]),
        1,
        "one attempt for the whole pool:\n{}",
        server.log()
    );
    assert!(
        !server.log().contains("Unknown error code"),
        "{}",
        server.log()
    );
}
