//! The query API through the real binary: datasets, parameters, formats, errors, limits,
//! deadlines, cancellation, overload, and the sandbox.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::json;

use crate::support::{
    Conn, Setup, encode, get, get_with, poll_until, post_json, post_raw, query_in_background,
};

fn query(server: &crate::support::Server, body: serde_json::Value) -> crate::support::Response {
    post_json(server.addr(), "/v1/query", &body).expect("query")
}

#[test]
fn datasets_are_listed_with_columns_files_bytes_rows_and_version() {
    let server = Setup::new().with_sample_data().start();
    let response = get(server.addr(), "/v1/datasets").expect("datasets");
    assert_eq!(response.status, 200);
    let body = response.json();
    let names: Vec<&str> = body["datasets"]
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|d| d["name"].as_str())
        .collect();
    assert_eq!(names, ["customers", "events", "orders"]);
    let orders = get(server.addr(), "/v1/datasets/orders")
        .expect("orders")
        .json();
    assert_eq!(orders["row_estimate"], 5000);
    assert!(orders["bytes"].as_u64().is_some_and(|b| b > 0));
    assert_eq!(orders["files"], json!(["orders.parquet"]));
    let columns = orders["columns"].as_array().expect("columns");
    assert_eq!(columns[0], json!({"name": "order_id", "type": "BIGINT"}));
    assert!(columns.iter().any(|c| c["type"] == "DECIMAL(12,2)"));
    let events = get(server.addr(), "/v1/datasets/events")
        .expect("events")
        .json();
    assert_eq!(
        events["files"].as_array().map(Vec::len),
        Some(3),
        "hive partitions"
    );
    assert!(
        events["columns"]
            .as_array()
            .expect("columns")
            .iter()
            .any(|c| c["name"] == "day")
    );
    let missing = get(server.addr(), "/v1/datasets/nope").expect("404");
    assert_eq!(missing.status, 404);
    assert_eq!(missing.json()["code"], "unknown_dataset");
}

#[test]
fn named_and_positional_parameters_are_bound() {
    let server = Setup::new().with_sample_data().start();
    let sql = "SELECT status, count(*) AS n FROM orders WHERE amount > $min GROUP BY 1 ORDER BY 1";
    let named = query(&server, json!({"sql": sql, "params": {"min": 500}}));
    assert_eq!(
        named.status,
        200,
        "{}",
        String::from_utf8_lossy(&named.body)
    );
    let body = named.json();
    assert_eq!(body["columns"][1], json!({"name": "n", "type": "BIGINT"}));
    let total: i64 = body["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| r[1].as_i64().expect("n"))
        .sum();
    let check = query(
        &server,
        json!({"sql": "SELECT count(*) FROM orders WHERE amount > ?", "params": [500]}),
    );
    assert_eq!(check.json()["rows"][0][0].as_i64(), Some(total));
    let typed = query(
        &server,
        json!({"sql": "SELECT count(*) FROM orders WHERE ordered_at >= $d AND amount < $a",
               "params": {"d": {"type": "date", "value": "2024-07-01"}, "a": {"type": "decimal", "value": "250.50"}}}),
    );
    assert_eq!(
        typed.status,
        200,
        "{}",
        String::from_utf8_lossy(&typed.body)
    );
    for (params, code) in [
        (
            json!({"sql": "SELECT $x", "params": {}}),
            "invalid_parameter",
        ),
        (
            json!({"sql": "SELECT $1", "params": [1, 2]}),
            "invalid_parameter",
        ),
        (
            json!({"sql": "SELECT $x", "params": {"x": 1, "y": 2}}),
            "invalid_parameter",
        ),
        (
            json!({"sql": "SELECT $x", "params": {"x": [1]}}),
            "invalid_parameter",
        ),
        // DuckDB binds the text to the INTEGER the parameter must be: a binder error.
        (
            json!({"sql": "SELECT 1::INT + $x", "params": {"x": "abc"}}),
            "sql_binder",
        ),
    ] {
        let response = query(&server, params.clone());
        assert_eq!(response.status, 400, "{params}");
        assert_eq!(response.json()["code"], code, "{params}");
    }
}

#[test]
fn json_is_exact_for_big_integers_decimals_and_dates() {
    let server = Setup::new().start();
    let response = query(
        &server,
        json!({"sql": "SELECT 9007199254740993::BIGINT AS big, 42::BIGINT AS small, \
               12345678901234567890123::HUGEINT AS huge, 1234567.891::DECIMAL(18,3) AS dec, \
               DATE '2024-02-29' AS d, TIMESTAMP '2024-01-02 03:04:05' AS ts, NULL::INT AS nothing, \
               'a\"b' AS s, [1, 2] AS l, {'k': 1} AS st"}),
    );
    assert_eq!(
        response.status,
        200,
        "{}",
        String::from_utf8_lossy(&response.body)
    );
    let body = response.json();
    let row = &body["rows"][0];
    assert_eq!(row[0], "9007199254740993");
    assert_eq!(row[1], 42);
    assert_eq!(row[2], "12345678901234567890123");
    assert_eq!(row[3], "1234567.891");
    assert_eq!(row[4], "2024-02-29");
    assert!(
        row[5]
            .as_str()
            .is_some_and(|t| t.starts_with("2024-01-02T03:04:05"))
    );
    assert_eq!(row[6], serde_json::Value::Null);
    assert_eq!(row[7], "a\"b");
    assert_eq!(row[8], json!([1, 2]));
    assert_eq!(row[9], json!({"k": 1}));
    assert_eq!(body["truncated"], false);
    assert_eq!(body["row_count"], 1);
}

#[test]
fn every_format_by_parameter_and_by_accept() {
    let server = Setup::new().with_sample_data().start();
    let sql = encode("SELECT order_id, status FROM orders ORDER BY order_id LIMIT 3");
    let csv = get(server.addr(), &format!("/v1/query?sql={sql}&format=csv")).expect("csv");
    assert_eq!(csv.status, 200);
    assert!(
        csv.header("content-type")
            .is_some_and(|t| t.starts_with("text/csv"))
    );
    let text = String::from_utf8(csv.body.clone()).expect("utf8");
    assert_eq!(text.lines().next(), Some("order_id,status"));
    assert_eq!(text.lines().count(), 4);

    let ndjson = get_with(
        server.addr(),
        &format!("/v1/query?sql={sql}"),
        &[("Accept", "application/x-ndjson")],
    )
    .expect("ndjson");
    let lines: Vec<serde_json::Value> = String::from_utf8(ndjson.body.clone())
        .expect("utf8")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["order_id"], 1);

    let arrow = get_with(
        server.addr(),
        &format!("/v1/query?sql={sql}"),
        &[(
            "Accept",
            "application/json;q=0.5, application/vnd.apache.arrow.stream",
        )],
    )
    .expect("arrow");
    assert_eq!(
        arrow.header("content-type"),
        Some("application/vnd.apache.arrow.stream")
    );
    assert_eq!(
        &arrow.body[..4],
        &[0xff, 0xff, 0xff, 0xff],
        "IPC continuation marker"
    );

    let parquet = get(
        server.addr(),
        &format!("/v1/query?sql={sql}&format=parquet"),
    )
    .expect("parquet");
    assert_eq!(&parquet.body[..4], b"PAR1");
    assert_eq!(&parquet.body[parquet.body.len() - 4..], b"PAR1");

    let refused = get_with(
        server.addr(),
        &format!("/v1/query?sql={sql}"),
        &[("Accept", "image/png")],
    )
    .expect("406");
    assert_eq!(refused.status, 406);
    assert_eq!(refused.json()["code"], "not_acceptable");
}

#[test]
fn sql_errors_have_stable_codes_and_duckdb_messages() {
    let server = Setup::new().with_sample_data().start();
    let cases = [
        ("SELEC 1", 400, "sql_syntax", "syntax error"),
        ("SELECT * FROM order_s", 400, "sql_binder", "orders"),
        ("SELECT nope FROM orders", 400, "sql_binder", "nope"),
        (
            "SELECT 1; SELECT 2",
            400,
            "multiple_statements",
            "one statement",
        ),
        (
            "COPY orders TO 'x.csv'",
            403,
            "statement_not_allowed",
            "COPY",
        ),
        ("SELECT 1/0::INT AS x, 'abc'::INT", 400, "sql_error", "abc"),
    ];
    for (sql, status, code, detail) in cases {
        let response = query(&server, json!({"sql": sql}));
        assert_eq!(
            response.status,
            status,
            "{sql}: {}",
            String::from_utf8_lossy(&response.body)
        );
        assert_eq!(
            response.header("content-type"),
            Some("application/problem+json")
        );
        let body = response.json();
        assert_eq!(body["code"], code, "{sql}");
        assert!(
            body["detail"].as_str().is_some_and(|d| d.contains(detail)),
            "{sql}: {body}"
        );
        assert_eq!(body["request_id"].as_str(), response.header("x-request-id"));
    }
}

#[test]
fn results_are_truncated_exactly_at_the_limit() {
    let server = Setup::new()
        .with_sample_data()
        .key("max_result_rows", "4000")
        .start();
    let cut = query(&server, json!({"sql": "SELECT * FROM orders", "limit": 10}));
    let body = cut.json();
    assert_eq!(body["rows"].as_array().map(Vec::len), Some(10));
    assert_eq!(body["truncated"], true);
    let exact = query(
        &server,
        json!({"sql": "SELECT * FROM orders LIMIT 10", "limit": 10}),
    )
    .json();
    assert_eq!(exact["truncated"], false);
    let capped = query(
        &server,
        json!({"sql": "SELECT * FROM orders", "limit": 100000}),
    )
    .json();
    assert_eq!(capped["row_count"], 4000, "the server maximum wins");
    assert_eq!(capped["truncated"], true);
    let csv = get(
        server.addr(),
        &format!(
            "/v1/query?sql={}&format=csv&limit=5",
            encode("SELECT * FROM orders")
        ),
    )
    .expect("csv");
    assert_eq!(csv.header("x-result-truncated"), Some("true"));
    assert_eq!(csv.header("x-result-rows"), Some("5"));
    assert!(
        csv.header("server-timing")
            .is_some_and(|t| t.contains("exec;dur="))
    );
}

#[test]
fn bad_bodies_are_4xx_naming_the_problem() {
    let server = Setup::new().key("max_body_size", "\"2KiB\"").start();
    let addr = server.addr();
    let unknown = post_json(
        addr,
        "/v1/query",
        &json!({"sql": "SELECT 1", "fromat": "csv"}),
    )
    .expect("unknown");
    assert_eq!(unknown.status, 400);
    assert!(
        unknown.json()["detail"]
            .as_str()
            .is_some_and(|d| d.contains("fromat"))
    );
    let not_object = post_json(addr, "/v1/query", &json!(["SELECT 1"])).expect("array");
    assert_eq!(not_object.status, 400);
    let not_utf8 = post_raw(
        addr,
        "/v1/query",
        "application/json",
        b"{\"sql\": \"\xff\xfe\"}",
        &[],
    )
    .expect("bytes");
    assert_eq!(not_utf8.status, 400);
    let big = format!("{{\"sql\": \"SELECT '{}'\"}}", "x".repeat(4096));
    let too_large =
        post_raw(addr, "/v1/query", "application/json", big.as_bytes(), &[]).expect("big");
    assert_eq!(too_large.status, 413);
    assert_eq!(too_large.json()["code"], "payload_too_large");
    let wrong_type = post_raw(addr, "/v1/query", "text/plain", b"SELECT 1", &[]).expect("type");
    assert_eq!(wrong_type.status, 415);
    let no_sql = get(addr, "/v1/query").expect("no sql");
    assert_eq!(no_sql.status, 400);
    let unknown_key = get(addr, "/v1/query?sql=SELECT+1&fromat=csv").expect("unknown key");
    assert_eq!(unknown_key.status, 400);
    assert_eq!(unknown_key.json()["code"], "invalid_query_string");
    assert_eq!(
        query(&server, json!({"sql": "SELECT 1"})).status,
        200,
        "still serving"
    );
}

/// A query that keeps one DuckDB thread busy for seconds.
const SLOW_SQL: &str = "SELECT sum(a.range * b.range) FROM range(100000) a, range(100000) b";

#[test]
fn deadline_interrupts_the_query_and_the_worker_keeps_serving() {
    let server = Setup::new().key("workers", "1").start();
    let started = Instant::now();
    let response = query(&server, json!({"sql": SLOW_SQL, "timeout_ms": 300}));
    assert_eq!(
        response.status,
        504,
        "{}",
        String::from_utf8_lossy(&response.body)
    );
    assert_eq!(response.json()["code"], "query_timeout");
    println!("timeout answered after {:?}", started.elapsed());
    assert_eq!(query(&server, json!({"sql": "SELECT 1"})).status, 200);
}

#[test]
fn a_deadline_that_passes_before_the_query_executes_still_stops_it() {
    let server = Setup::new().key("workers", "1").start();
    // DuckDB clears an interrupt when execution starts: a deadline that passes while the
    // statement is still being checked or prepared must interrupt it again once it runs.
    for timeout_ms in [0, 0, 1, 1, 2] {
        let sql = format!("{SLOW_SQL} -- {timeout_ms}");
        let response = query(&server, json!({"sql": sql, "timeout_ms": timeout_ms}));
        assert_eq!(
            response.status,
            504,
            "{}",
            String::from_utf8_lossy(&response.body)
        );
    }
}

#[test]
fn overload_is_503_with_retry_after_and_disconnect_cancels() {
    let server = Setup::new()
        .key("workers", "1")
        .key("max_concurrent_queries", "1")
        .key("query_queue_depth", "0")
        .start();
    // The worker checks a statement (DuckDB parses it) before it queues it; a first, quickly
    // stopped run makes that check of the slow query a cached one, so that the polls below cannot
    // take the slot while it is being checked.
    let warm = query(&server, json!({"sql": SLOW_SQL, "timeout_ms": 1}));
    assert_eq!(warm.status, 504, "{}", String::from_utf8_lossy(&warm.body));
    // A slow query holds the only slot…
    let body = serde_json::to_vec(&json!({"sql": SLOW_SQL})).expect("json");
    let mut slow = Conn::open(server.addr()).expect("connect");
    slow.send_only(
        format!(
            "POST /v1/query HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .expect("head");
    slow.send_only(&body).expect("body");
    // …so another is refused at once.
    let refused = poll_until("the slot to be taken", Duration::from_secs(10), || {
        let r = query(&server, json!({"sql": "SELECT 1"}));
        (r.status == 503).then_some(r)
    });
    assert_eq!(refused.json()["code"], "overloaded");
    assert_eq!(refused.header("retry-after"), Some("1"));
    // Closing the slow query's connection interrupts it and frees the slot.
    drop(slow);
    poll_until(
        "the cancelled query to free its slot",
        Duration::from_secs(10),
        || (query(&server, json!({"sql": "SELECT 1"})).status == 200).then_some(()),
    );
}

/// Send `n` different queries of about the same cost at once, each with `timeout_ms`; their
/// answers.
fn burst(
    server: &crate::support::Server,
    n: usize,
    timeout_ms: u64,
) -> Vec<crate::support::Response> {
    let addr = server.addr();
    let threads: Vec<_> = (0..n)
        .map(|i| {
            // Each statement differs, so that no answer comes from the result cache.
            let sql =
                format!("SELECT sum(a.range * b.range) + {i} FROM range(4000) a, range(4000) b");
            std::thread::spawn(move || {
                post_json(
                    addr,
                    "/v1/query",
                    &json!({"sql": sql, "timeout_ms": timeout_ms}),
                )
                .expect("answered")
            })
        })
        .collect();
    threads
        .into_iter()
        .map(|t| t.join().expect("client thread"))
        .collect()
}

#[test]
fn a_burst_beyond_the_slots_waits_when_deadlines_allow_and_is_refused_when_they_do_not() {
    let server = Setup::new()
        .key("workers", "1")
        .key("max_concurrent_queries", "1")
        .start();
    // Fifty queries on one slot, with the default deadline: every one waits its turn.
    let started = Instant::now();
    let patient = burst(&server, 50, 30_000);
    let elapsed = started.elapsed();
    let statuses: Vec<u16> = patient.iter().map(|r| r.status).collect();
    assert!(
        statuses.iter().all(|&s| s == 200),
        "every query fits in its deadline: {statuses:?}"
    );
    println!("50 queries on one slot: all 200 in {elapsed:?}");

    // The same burst with a deadline of a few queries' time: the queue serves what it can in
    // time and refuses the rest at once, saying when to come back.
    let one = elapsed / 50;
    let timeout_ms = (one * 4).as_millis().max(20) as u64;
    let hurried = burst(&server, 50, timeout_ms);
    let ok = hurried.iter().filter(|r| r.status == 200).count();
    let refused: Vec<_> = hurried.iter().filter(|r| r.status == 503).collect();
    println!(
        "50 queries with timeout_ms {timeout_ms}: {ok} × 200, {} × 503",
        refused.len()
    );
    assert!(ok >= 1, "the first ones are served");
    assert!(
        refused.len() >= 25,
        "most cannot finish in time: {ok} served"
    );
    assert_eq!(ok + refused.len(), 50, "nothing but 200 and 503");
    for response in refused {
        assert_eq!(response.json()["code"], "overloaded");
        let retry: u64 = response
            .header("retry-after")
            .and_then(|v| v.parse().ok())
            .expect("Retry-After in whole seconds");
        assert!(retry >= 1);
    }
}

fn decode(response: &crate::support::Response) -> Vec<u8> {
    use std::io::Read;
    let mut out = Vec::new();
    match response.header("content-encoding") {
        Some("zstd") => {
            zstd::stream::read::Decoder::new(response.body.as_slice())
                .expect("zstd decoder")
                .read_to_end(&mut out)
                .expect("valid zstd");
        }
        Some("gzip") => {
            flate2::read::GzDecoder::new(response.body.as_slice())
                .read_to_end(&mut out)
                .expect("valid gzip");
        }
        None => out = response.body.clone(),
        Some(other) => panic!("unexpected coding {other}"),
    }
    out
}

#[test]
fn results_are_compressed_as_negotiated_cached_per_coding_and_say_vary() {
    let server = Setup::new().with_sample_data().start();
    let addr = server.addr();
    let path = format!(
        "/v1/query?sql={}",
        encode("SELECT * FROM orders ORDER BY 1")
    );
    let plain = get_with(addr, &path, &[]).expect("plain");
    assert_eq!(plain.status, 200);
    assert_eq!(plain.header("content-encoding"), None);
    assert_eq!(plain.header("vary"), Some("Accept, Accept-Encoding"));
    for (accept, coding) in [
        ("gzip, deflate, br, zstd", "zstd"),
        ("gzip", "gzip"),
        ("zstd;q=0.1, gzip;q=0.9", "gzip"),
    ] {
        for round in ["stored", "from the result cache"] {
            let fetch = || get_with(addr, &path, &[("Accept-Encoding", accept)]).expect("coded");
            let response = if round == "stored" {
                fetch()
            } else {
                // The store happens after the answer: the next request finds it soon.
                poll_until(
                    "the coded result in the cache",
                    Duration::from_secs(10),
                    || {
                        let r = fetch();
                        (r.header("x-cache") == Some("hit")).then_some(r)
                    },
                )
            };
            assert_eq!(response.status, 200);
            assert_eq!(
                response.header("content-encoding"),
                Some(coding),
                "{accept}, {round}"
            );
            assert_eq!(response.header("vary"), Some("Accept, Accept-Encoding"));
            assert_eq!(decode(&response), plain.body, "{accept}, {round}");
            if round == "from the result cache" {
                assert_eq!(response.header("x-cache"), Some("hit"));
            }
            // Each coding is its own representation, with its own ETag.
            assert_ne!(response.header("etag"), plain.header("etag"));
        }
    }
    // A conditional request names its representation; the 304 says Vary too.
    let gzip = get_with(addr, &path, &[("Accept-Encoding", "gzip")]).expect("gzip");
    let etag = gzip.header("etag").expect("etag").to_owned();
    let revalidated = get_with(
        addr,
        &path,
        &[("Accept-Encoding", "gzip"), ("If-None-Match", &etag)],
    )
    .expect("304");
    assert_eq!(revalidated.status, 304);
    assert_eq!(revalidated.header("vary"), Some("Accept, Accept-Encoding"));
    // Parquet is compressed by its own pages: never again.
    let parquet = get_with(
        addr,
        &format!("{path}&format=parquet"),
        &[("Accept-Encoding", "zstd, gzip")],
    )
    .expect("parquet");
    assert_eq!(parquet.header("content-encoding"), None);
    assert_eq!(parquet.header("vary"), Some("Accept, Accept-Encoding"));
}

#[test]
fn a_streamed_result_is_compressed_whole() {
    let server = Setup::new().start();
    // Several MiB of NDJSON that compress to more than the first buffer: streamed, chunk by
    // chunk.
    let sql = "SELECT range AS n, md5(range::VARCHAR) AS h FROM range(300000)";
    let path = format!("/v1/query?format=ndjson&sql={}", encode(sql));
    let plain = get_with(server.addr(), &path, &[("Cache-Control", "no-store")]).expect("plain");
    assert_eq!(plain.status, 200);
    assert!(plain.body.len() > 4 << 20, "{} bytes", plain.body.len());
    for coding in ["zstd", "gzip"] {
        let response = get_with(
            server.addr(),
            &path,
            &[("Accept-Encoding", coding), ("Cache-Control", "no-store")],
        )
        .expect("compressed");
        assert_eq!(response.header("content-encoding"), Some(coding));
        assert!(response.header("content-length").is_none(), "streamed");
        assert!(response.body.len() < plain.body.len() * 2 / 3);
        assert_eq!(decode(&response), plain.body, "{coding}");
    }
}

#[test]
fn term_lets_an_in_flight_query_finish_then_exits_zero() {
    let mut server = Setup::new()
        .key("workers", "1")
        .key("graceful_timeout", "30")
        .start();
    let addr = server.addr();
    let client = query_in_background(
        addr,
        "SELECT sum(a.range * b.range) FROM range(40000) a, range(40000) b",
    );
    // Let the request reach the worker before TERM.
    std::thread::sleep(Duration::from_millis(300));
    let term_sent = Instant::now();
    server.signal(Signal::SIGTERM);
    let (response, answered) = client.join().expect("client");
    let response = response.expect("the in-flight query is answered");
    assert_eq!(
        response.status,
        200,
        "{}",
        String::from_utf8_lossy(&response.body)
    );
    assert!(answered > term_sent, "the answer came after TERM");
    assert_eq!(response.header("connection"), Some("close"));
    assert_eq!(server.wait_exit(Duration::from_secs(30)).code(), Some(0));
}

#[test]
fn new_and_replaced_files_are_seen_without_a_restart() {
    let setup = Setup::new().with_sample_data().key("workers", "1");
    let data = setup.path("data");
    let server = setup.start();
    let before = get(server.addr(), "/v1/datasets/customers")
        .expect("customers")
        .json();
    // Replace customers.parquet by an atomic rename, and add a new dataset.
    let staging = data.join(".staging.parquet");
    std::fs::copy(data.join("orders.parquet"), &staging).expect("copy");
    std::fs::rename(&staging, data.join("customers.parquet")).expect("rename");
    std::fs::copy(
        data.join("orders.parquet"),
        data.join("orders_copy.parquet"),
    )
    .expect("copy");
    poll_until("the catalogue to change", Duration::from_secs(10), || {
        let after = get(server.addr(), "/v1/datasets/customers").ok()?.json();
        (after["dataset_version"] != before["dataset_version"]).then_some(())
    });
    let rows = query(&server, json!({"sql": "SELECT count(*) FROM customers"})).json();
    assert_eq!(rows["rows"][0][0], 5000);
    let new = query(&server, json!({"sql": "SELECT count(*) FROM orders_copy"}));
    assert_eq!(new.status, 200, "{}", String::from_utf8_lossy(&new.body));
}

#[test]
fn sandbox_refuses_every_escape_and_nothing_is_written() {
    let setup = Setup::new().with_sample_data();
    let outside = setup.path("outside");
    std::fs::create_dir(&outside).expect("mkdir");
    std::fs::write(outside.join("secret.csv"), "a\n1\n").expect("write");
    let secret = outside.join("secret.csv").display().to_string();
    let out = outside.display().to_string();
    let server = setup.start();
    let attempts = vec![
        format!("COPY orders TO '{out}/x.csv'"),
        format!("COPY (SELECT 1) TO '{out}/x.parquet' (FORMAT parquet)"),
        format!("EXPORT DATABASE '{out}/db'"),
        format!("ATTACH '{out}/x.db' AS x"),
        "ATTACH ':memory:' AS m".to_owned(),
        "DETACH memory".to_owned(),
        "INSTALL httpfs".to_owned(),
        "LOAD httpfs".to_owned(),
        "FORCE INSTALL json".to_owned(),
        "SET enable_external_access = true".to_owned(),
        "SET memory_limit = '100GB'".to_owned(),
        "RESET memory_limit".to_owned(),
        "PRAGMA enable_profiling".to_owned(),
        "SELECT 1; SELECT 2".to_owned(),
        format!("SELECT 1; COPY orders TO '{out}/y.csv'"),
        format!("SELECT * FROM read_csv('{secret}')"),
        format!("SELECT * FROM read_csv_auto('{secret}')"),
        format!("SELECT * FROM read_text('{secret}')"),
        format!("SELECT * FROM read_blob('{secret}')"),
        "SELECT * FROM read_text('/etc/passwd')".to_owned(),
        "SELECT * FROM glob('/etc/*')".to_owned(),
        format!("SELECT * FROM '{secret}'"),
        format!("SELECT * FROM read_parquet('{out}/*.parquet')"),
        "SELECT getenv('HOME')".to_owned(),
        "CREATE TABLE t AS SELECT 1".to_owned(),
        "CREATE VIEW v AS SELECT 1".to_owned(),
        "INSERT INTO orders VALUES (1)".to_owned(),
        "DROP VIEW orders".to_owned(),
        "ALTER VIEW orders RENAME TO o".to_owned(),
        "CALL pragma_version()".to_owned(),
        "CHECKPOINT".to_owned(),
        "USE memory".to_owned(),
        "WITH t AS (SELECT 1) INSERT INTO x SELECT * FROM t".to_owned(),
        format!("EXPLAIN ANALYZE COPY orders TO '{out}/z.csv'"),
        "SELECT * FROM read_csv('/etc/passwd')".to_owned(),
        "SELECT current_setting('enable_external_access'); SET threads = 8".to_owned(),
        format!("SELECT * FROM read_json('{out}/none.json')"),
        "SELECT * FROM read_text('/proc/self/environ')".to_owned(),
    ];
    assert!(attempts.len() >= 30);
    for sql in &attempts {
        let response = query(&server, json!({"sql": sql}));
        assert!(
            (400..500).contains(&response.status),
            "{sql} must be refused: {} {}",
            response.status,
            String::from_utf8_lossy(&response.body)
        );
    }
    let left: Vec<_> = std::fs::read_dir(&outside)
        .expect("read")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(left.len(), 1, "nothing was written outside: {left:?}");
    let data_files = std::fs::read_dir(server.setup.path("data"))
        .expect("read")
        .count();
    assert_eq!(data_files, 3, "nothing was written into the data directory");
    assert_eq!(
        query(&server, json!({"sql": "SELECT count(*) FROM orders"})).status,
        200
    );
}

/// Check `value` against an OpenAPI 3.1 schema (types, required properties, items), resolving
/// `$ref`s in `spec`. Returns the first mismatch.
fn check_schema(
    value: &serde_json::Value,
    schema: &serde_json::Value,
    spec: &serde_json::Value,
    at: &str,
) -> Result<(), String> {
    if let Some(reference) = schema["$ref"].as_str() {
        let name = reference.rsplit('/').next().unwrap_or("");
        return check_schema(value, &spec["components"]["schemas"][name], spec, at);
    }
    for key in ["oneOf", "anyOf"] {
        if let Some(options) = schema[key].as_array() {
            return if options
                .iter()
                .any(|o| check_schema(value, o, spec, at).is_ok())
            {
                Ok(())
            } else {
                Err(format!("{at}: {value} matches none of {key}"))
            };
        }
    }
    let types: Vec<&str> = match &schema["type"] {
        serde_json::Value::String(t) => vec![t.as_str()],
        serde_json::Value::Array(ts) => ts.iter().filter_map(|t| t.as_str()).collect(),
        _ => return Ok(()),
    };
    let actual = match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "boolean",
        serde_json::Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        serde_json::Value::Number(_) => "number",
        serde_json::Value::String(_) => "string",
        serde_json::Value::Array(_) => "array",
        serde_json::Value::Object(_) => "object",
    };
    if !types
        .iter()
        .any(|t| *t == actual || (*t == "number" && actual == "integer"))
    {
        return Err(format!("{at}: {actual} where the contract says {types:?}"));
    }
    if let (Some(object), Some(properties)) = (value.as_object(), schema["properties"].as_object())
    {
        for required in schema["required"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r.as_str())
        {
            if !object.contains_key(required) {
                return Err(format!("{at}: required property {required} is missing"));
            }
        }
        for (key, field) in object {
            let property = properties
                .get(key)
                .ok_or_else(|| format!("{at}: property {key} is not in the contract"))?;
            check_schema(field, property, spec, &format!("{at}.{key}"))?;
        }
    }
    if let (Some(items), Some(item_schema)) = (value.as_array(), schema.get("items")) {
        for (i, item) in items.iter().enumerate() {
            check_schema(item, item_schema, spec, &format!("{at}[{i}]"))?;
        }
    }
    Ok(())
}

#[test]
fn openapi_describes_every_endpoint_and_real_responses_match_it() {
    let server = Setup::new()
        .with_sample_data()
        .key("max_body_size", "\"2KiB\"")
        .start();
    let addr = server.addr();
    let spec = get(addr, "/openapi.json").expect("openapi").json();
    assert!(
        spec["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3."))
    );
    let sql = encode("SELECT * FROM orders LIMIT 2");
    let cases = vec![
        ("get", "/healthz", get(addr, "/healthz")),
        ("get", "/readyz", get(addr, "/readyz")),
        ("get", "/v1/datasets", get(addr, "/v1/datasets")),
        (
            "get",
            "/v1/datasets/{name}",
            get(addr, "/v1/datasets/orders"),
        ),
        ("get", "/v1/datasets/{name}", get(addr, "/v1/datasets/nope")),
        (
            "get",
            "/v1/query",
            get(addr, &format!("/v1/query?sql={sql}")),
        ),
        (
            "get",
            "/v1/query",
            get(addr, &format!("/v1/query?sql={sql}&format=csv")),
        ),
        (
            "get",
            "/v1/query",
            get_with(
                addr,
                &format!("/v1/query?sql={sql}"),
                &[("Accept", "image/png")],
            ),
        ),
        (
            "post",
            "/v1/query",
            post_json(addr, "/v1/query", &json!({"sql": "SELECT 1 AS one"})),
        ),
        (
            "post",
            "/v1/query",
            post_json(addr, "/v1/query", &json!({"sql": "SELEC 1"})),
        ),
        (
            "post",
            "/v1/query",
            post_json(addr, "/v1/query", &json!({"sql": "DROP VIEW orders"})),
        ),
        (
            "post",
            "/v1/query",
            post_json(
                addr,
                "/v1/query",
                &json!({"sql": "SELECT 1", "format": "arrow"}),
            ),
        ),
        (
            "post",
            "/v1/query",
            post_raw(addr, "/v1/query", "text/plain", b"x", &[]),
        ),
        (
            "post",
            "/v1/query",
            post_raw(
                addr,
                "/v1/query",
                "application/json",
                &vec![b' '; 4096],
                &[],
            ),
        ),
    ];
    let mut statuses = std::collections::BTreeSet::new();
    for (method, path, response) in cases {
        let response = response.expect("response");
        let operation = &spec["paths"][path][method];
        assert!(
            operation.is_object(),
            "{method} {path} is not in the contract"
        );
        let documented = &operation["responses"][response.status.to_string()];
        assert!(
            documented.is_object(),
            "{method} {path} answered {} which the contract does not list",
            response.status
        );
        let media = response
            .header("content-type")
            .and_then(|t| t.split(';').next())
            .expect("content type")
            .to_owned();
        let content = documented["content"]
            .as_object()
            .and_then(|c| {
                c.iter()
                    .find(|(k, _)| k.split(';').next() == Some(media.as_str()))
            })
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| {
                panic!(
                    "{method} {path} {}: {media} not in {}",
                    response.status, documented["content"]
                )
            });
        if media.ends_with("json") {
            check_schema(&response.json(), &content["schema"], &spec, "body")
                .unwrap_or_else(|e| panic!("{method} {path} {}: {e}", response.status));
        }
        statuses.insert(response.status);
    }
    assert_eq!(
        statuses.into_iter().collect::<Vec<_>>(),
        [200, 400, 403, 404, 406, 413, 415]
    );
}

#[test]
fn an_error_after_the_first_byte_never_passes_for_a_complete_result() {
    let server = Setup::new()
        .key("workers", "1")
        .key("max_result_rows", "10000000")
        .start();
    // Megabytes of rows, then DuckDB raises: the headers have long been sent. (DuckDB runs
    // ahead of its reader by up to about a million rows, hence the size.)
    let sql = encode(
        "SELECT CASE WHEN range < 3000000 THEN range ELSE error('boom at row ' || range) END AS x FROM range(4000000)",
    );
    let ndjson = get(server.addr(), &format!("/v1/query?sql={sql}&format=ndjson")).expect("ndjson");
    assert_eq!(ndjson.status, 200);
    let text = String::from_utf8(ndjson.body).expect("utf8");
    let last: serde_json::Value =
        serde_json::from_str(text.lines().last().expect("lines")).expect("json");
    assert_eq!(last["error"]["code"], "sql_error", "{last}");
    assert!(
        last["error"]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("boom"))
    );

    let csv = get(server.addr(), &format!("/v1/query?sql={sql}&format=csv"));
    assert!(
        csv.is_err(),
        "a CSV body cut by an error must not read as complete"
    );
    let after = query(&server, json!({"sql": "SELECT 1"}));
    assert_eq!(
        after.status,
        200,
        "the worker lives: {}",
        String::from_utf8_lossy(&after.body)
    );
}

#[test]
fn streamed_results_report_rows_and_truncation_in_trailers() {
    let server = Setup::new().key("max_result_rows", "300000").start();
    let sql = encode("SELECT range AS x FROM range(1000000)");
    let response = get_with(
        server.addr(),
        &format!("/v1/query?sql={sql}&format=csv"),
        &[("TE", "trailers")],
    )
    .expect("csv");
    assert_eq!(response.status, 200);
    assert!(
        response.header("x-result-truncated").is_none(),
        "streamed, not buffered"
    );
    assert_eq!(response.trailer("x-result-truncated"), Some("true"));
    assert_eq!(response.trailer("x-result-rows"), Some("300000"));
    assert!(
        response
            .trailer("server-timing")
            .is_some_and(|t| t.contains("exec;dur=") && t.contains("encode;dur="))
    );
    assert_eq!(
        response.body.iter().filter(|&&b| b == b'\n').count(),
        300_001
    );
}

#[test]
fn huge_results_are_cut_and_memory_hungry_queries_fail_cleanly() {
    let server = Setup::new()
        .key("workers", "1")
        .key("max_result_rows", "1000")
        .key("duckdb_memory_limit", "\"64MB\"")
        .start();
    let huge = query(&server, json!({"sql": "SELECT * FROM range(100000000)"})).json();
    assert_eq!(huge["row_count"], 1000);
    assert_eq!(huge["truncated"], true);
    let hungry = query(
        &server,
        json!({"sql": "SELECT list(range ORDER BY random()) FROM range(50000000)"}),
    );
    assert!(
        hungry.status == 503 || hungry.status == 400,
        "{} {}",
        hungry.status,
        String::from_utf8_lossy(&hungry.body)
    );
    println!(
        "memory-hungry query: {} {}",
        hungry.status,
        hungry.json()["code"]
    );
    let after = query(&server, json!({"sql": "SELECT 1"}));
    assert_eq!(
        after.status,
        200,
        "the worker lives: {}",
        String::from_utf8_lossy(&after.body)
    );
    assert_eq!(server.workers().len(), 1);
}

#[test]
fn a_dataset_replaced_mid_query_harms_nothing() {
    let setup = Setup::new().with_sample_data().key("workers", "1");
    let data = setup.path("data");
    let server = setup.start();
    let addr = server.addr();
    let slow = query_in_background(
        addr,
        "SELECT sum(o.amount * r.range) FROM orders o, range(40000) r",
    );
    // Replace the file while the query reads it (an atomic rename, as uploads should do).
    std::thread::sleep(Duration::from_millis(300));
    let staging = data.join(".orders.parquet.tmp");
    std::fs::copy(data.join("customers.parquet"), &staging).expect("copy");
    std::fs::rename(&staging, data.join("orders.parquet")).expect("rename");
    let replaced = Instant::now();
    let (response, answered) = slow.join().expect("thread");
    let response = response.expect("answered");
    assert!(
        answered > replaced,
        "the query was still running when its file was replaced"
    );
    // The reader keeps the file it opened, or fails cleanly: never a dead worker.
    assert!(
        response.status == 200 || (400..600).contains(&response.status),
        "{}",
        response.status
    );
    if response.status != 200 {
        assert_eq!(
            response.header("content-type"),
            Some("application/problem+json")
        );
    }
    poll_until("the new orders", Duration::from_secs(10), || {
        let body = query(&server, json!({"sql": "SELECT count(*) FROM orders"})).json();
        (body["rows"][0][0] == 500).then_some(())
    });
    assert_eq!(server.workers().len(), 1);
}
