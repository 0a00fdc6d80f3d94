//! The read-only promise against a hostile client: a corpus of statements that try to write,
//! read outside the datasets, leave state behind, poison the result cache, look at other
//! requests or escape their deadline, each sent to the real binary with one worker, so that
//! anything a statement left on a pooled connection would be seen by the next one.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use serde_json::json;

use crate::support::{Response, Server, Setup, poll_until, post_raw};

/// Send `body` to `/v1/query`, bypassing the result cache: every answer is computed afresh.
fn fresh(server: &Server, body: &serde_json::Value) -> Response {
    post_raw(
        server.addr(),
        "/v1/query",
        "application/json",
        &serde_json::to_vec(body).expect("json"),
        &[("Cache-Control", "no-store")],
    )
    .expect("query")
}

fn detail(response: &Response) -> String {
    String::from_utf8_lossy(&response.body).into_owned()
}

/// A digest of every dataset's rows, as the server answers it.
fn fingerprint(server: &Server) -> Vec<String> {
    ["orders", "customers", "events"]
        .iter()
        .map(|name| {
            let sql = digest_sql(name);
            let response = fresh(server, &json!({"sql": sql}));
            assert_eq!(response.status, 200, "{sql}: {}", detail(&response));
            response.json()["rows"][0][0]
                .as_str()
                .expect("digest")
                .to_owned()
        })
        .collect()
}

fn digest_sql(relation: &str) -> String {
    format!("SELECT md5(string_agg(t::VARCHAR, '|' ORDER BY t::VARCHAR)) FROM {relation} t")
}

/// The same digests computed by DuckDB itself on the files.
fn fingerprint_of_files(data: &Path) -> Vec<String> {
    let conn = duckdb::Connection::open_in_memory().expect("duckdb");
    let d = data.display();
    [
        format!("read_parquet('{d}/orders.parquet')"),
        format!("read_parquet('{d}/customers.parquet')"),
        format!("read_parquet('{d}/events/**/*.parquet', hive_partitioning = true, union_by_name = true)"),
    ]
    .iter()
    .map(|relation| {
        conn.query_row(&digest_sql(relation), [], |row| row.get::<_, String>(0))
            .expect("digest")
    })
    .collect()
}

fn listing(dir: &Path) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).expect("read dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path.clone());
            }
            names.insert(path.display().to_string());
        }
    }
    names
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// Refused before anything runs: 400 or 403.
    Refused,
    /// Runs, and is stopped by its deadline: 504.
    Deadline,
    /// DuckDB reads it as one harmless query (the "second statement" is inside a literal or an
    /// identifier): answered, and nothing else happens.
    Harmless,
}

/// The corpus. `{out}` is a directory outside everything the server may use, `{data}` the data
/// directory, `{cache}` the cache directory, `{secret}` a file in `{out}`, `{dot}` a dot-file in
/// the data directory.
const CORPUS: &[(&str, Expect)] = {
    use Expect::{Deadline, Harmless, Refused};
    &[
        // Statements that are not queries.
        ("COPY orders TO '{out}/a.csv'", Refused),
        (
            "COPY orders TO '{data}/a.parquet' (FORMAT parquet)",
            Refused,
        ),
        ("EXPORT DATABASE '{out}/db'", Refused),
        ("ATTACH '{out}/a.duckdb' AS a", Refused),
        ("ATTACH ':memory:' AS m", Refused),
        (
            "CREATE OR REPLACE VIEW orders AS SELECT 42 AS order_id",
            Refused,
        ),
        ("CREATE TEMP TABLE t AS SELECT 1", Refused),
        ("CREATE MACRO orders_count() AS 42", Refused),
        ("SET search_path = 'pg_catalog'", Refused),
        ("SET VARIABLE v = 1", Refused),
        ("SET threads = 64", Refused),
        ("RESET ALL", Refused),
        ("USE system", Refused),
        ("BEGIN TRANSACTION", Refused),
        ("PRAGMA enable_profiling", Refused),
        ("INSTALL httpfs", Refused),
        ("LOAD json", Refused),
        ("CALL pragma_version()", Refused),
        ("PREPARE p AS SELECT 1", Refused),
        ("EXECUTE p", Refused),
        ("CHECKPOINT", Refused),
        ("DETACH memory", Refused),
        // EXPLAIN is not accepted in the text: what it wraps could write (ANALYZE runs it).
        ("EXPLAIN ANALYZE COPY orders TO '{out}/b.csv'", Refused),
        ("EXPLAIN SELECT 1", Refused),
        // Writes DuckDB 2.0 accepts inside a query.
        (
            "WITH w AS (COPY orders TO '{data}/c.csv') SELECT * FROM w",
            Refused,
        ),
        (
            "WITH w AS (COPY (SELECT 1) TO '{cache}/snapshots/orders.0000000000000000.duckdb') SELECT 1",
            Refused,
        ),
        (
            "WITH w AS (INSERT INTO orders VALUES (1) RETURNING *) SELECT * FROM w",
            Refused,
        ),
        (
            "WITH w AS (DELETE FROM orders RETURNING *) SELECT count(*) FROM w",
            Refused,
        ),
        // Smuggling a second statement past a lexer that disagrees with DuckDB's tokeniser.
        ("SELECT 1 --\r; COPY orders TO '{out}/d.csv'", Refused),
        ("SELECT 1 --\u{0b}\n; COPY orders TO '{out}/e.csv'", Refused),
        (
            "SELECT `'` ; COPY orders TO '{out}/f.csv' ; SELECT '`'",
            Refused,
        ),
        (
            "SELECT 1 AS \"a\"\"\" ; COPY orders TO '{out}/g.csv' ; SELECT \"",
            Refused,
        ),
        (
            "SELECT 1 AS x$t$ ; COPY orders TO '{out}/h.csv' ; SELECT $t$",
            Refused,
        ),
        ("SELECT $é$ ; COPY orders TO '{out}/i.csv' ; $é$", Harmless),
        (
            "SELECT $tag$ $tag ; COPY orders TO '{out}/j.csv'; $tag$",
            Harmless,
        ),
        (
            "SELECT /* /* */ 1 ; COPY orders TO '{out}/k.csv' ; /* */",
            Refused,
        ),
        ("SELECT 1 /* */ */ ; COPY orders TO '{out}/l.csv'", Refused),
        (
            "SELECT E'\\'' ; COPY orders TO '{out}/m.csv' ; SELECT '",
            Refused,
        ),
        (
            "SELECT 'a' 'b' ; CREATE OR REPLACE VIEW orders AS SELECT 1",
            Refused,
        ),
        ("SELECT 1\u{37e} COPY orders TO '{out}/n.csv'", Refused),
        ("SELECT 1\u{ff1b} COPY orders TO '{out}/o.csv'", Refused),
        ("SELECT 1 --\r; ATTACH '{out}/p.duckdb' AS p", Refused),
        ("SELECT 1 --\r; SET threads = 64", Refused),
        ("SELECT 1 --\r; EXPORT DATABASE '{out}/export'", Refused),
        ("SELECT 1 --\r; BEGIN TRANSACTION", Refused),
        ("SELECT `a` ; USE system", Refused),
        ("SELECT $$x$$ ; SET search_path = 'pg_catalog'", Refused),
        (
            "SELECT 1 /* /* */ */ ; CREATE OR REPLACE VIEW orders AS SELECT 1",
            Refused,
        ),
        ("SELECT 1; SELECT 2", Refused),
        // A PIVOT without its values runs CREATE TYPE and DROP TYPE around the query.
        ("PIVOT orders ON status USING count(*)", Refused),
        (";;", Refused),
        ("-- only a comment", Refused),
        // Files by path, inside and outside the data directory.
        ("SELECT * FROM read_text('/etc/passwd')", Refused),
        ("SELECT * FROM read_csv('{secret}')", Refused),
        ("SELECT * FROM read_csv('{dot}')", Refused),
        ("SELECT * FROM '{dot}'", Refused),
        ("SELECT * FROM \"{secret}\"", Refused),
        (
            "SELECT * FROM read_parquet('{data}/orders.parquet')",
            Refused,
        ),
        ("SELECT * FROM glob('{data}/*')", Refused),
        ("SELECT * FROM glob('{cache}/**')", Refused),
        ("SELECT * FROM read_blob('{cache}/results/*')", Refused),
        (
            "SELECT * FROM parquet_metadata('{data}/orders.parquet')",
            Refused,
        ),
        ("SELECT * FROM sniff_csv('{secret}')", Refused),
        ("SELECT * FROM read_json('{secret}')", Refused),
        ("SELECT * FROM (SELECT 1) x, read_text('{secret}')", Refused),
        (
            "SELECT (SELECT count(*) FROM read_text('{secret}'))",
            Refused,
        ),
        (
            "WITH \"{secret}\" AS (SELECT 1) SELECT * FROM (SELECT * FROM \"{secret}\")",
            Harmless,
        ),
        (
            "SELECT * FROM (WITH \"{secret}\" AS (SELECT 1) SELECT * FROM \"{secret}\") x, \"{secret}\"",
            Refused,
        ),
        (
            "WITH \"{secret}\" AS (SELECT * FROM \"{secret}\") SELECT * FROM \"{secret}\"",
            Refused,
        ),
        (
            "WITH x AS (SELECT * FROM \"{secret}\") SELECT * FROM x",
            Refused,
        ),
        ("DESCRIBE '{secret}'", Refused),
        ("SUMMARIZE '{dot}'", Refused),
        ("SELECT * FROM query_table('{secret}')", Refused),
        (
            "SELECT * FROM query('SELECT * FROM read_text(''/etc/passwd'')')",
            Refused,
        ),
        // Introspection of the server and of other requests.
        ("SELECT * FROM duckdb_prepared_statements()", Refused),
        ("SELECT * FROM duckdb_settings()", Refused),
        ("SELECT * FROM duckdb_databases()", Refused),
        ("SELECT * FROM duckdb_temporary_files()", Refused),
        ("SELECT * FROM duckdb_views()", Refused),
        ("SELECT current_setting('temp_directory')", Refused),
        ("SELECT * FROM information_schema.tables", Refused),
        ("SELECT * FROM pg_catalog.pg_class", Refused),
        ("SELECT * FROM duckdb_tables", Refused),
        ("SELECT * FROM system.main.duckdb_settings()", Refused),
        ("SELECT * FROM pragma_database_list", Refused),
        ("SHOW databases", Refused),
        ("SHOW TABLES", Refused),
        ("SHOW temp_directory", Refused),
        ("SELECT * FROM ferrocorn_snapshot_0.main.data", Refused),
        // State through a function.
        ("SELECT setseed(0.5)", Refused),
        ("SELECT nextval('s')", Refused),
        // SQL in a string runs where no deadline reaches it.
        (
            "SELECT * FROM json_execute_serialized_sql(json_serialize_sql('SELECT 1'))",
            Refused,
        ),
        (
            "SELECT json_serialize_plan('SELECT * FROM orders')",
            Refused,
        ),
        // Deadline escapes: each is interrupted at its deadline.
        ("SELECT sleep_ms(600000)", Deadline),
        ("SELECT count(*) FROM range(1000000000000)", Deadline),
        (
            "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT count(*) FROM r",
            Deadline,
        ),
        (
            "SELECT count(*) FROM orders a, orders b, orders c",
            Deadline,
        ),
    ]
};

/// A statement whose "comment" DuckDB executes, sent first: it must not change what the honest
/// query it resembles answers from the result cache (a lexer that ends `--` comments only at
/// `\n` sees these as the honest query; DuckDB also ends them at `\r`).
const POISON: &[(&str, &str)] = &[
    (
        "SELECT count(*) FROM orders --\rWHERE order_id < 10",
        "SELECT count(*) FROM orders",
    ),
    (
        "SELECT count(*) FROM orders --\r WHERE order_id < 20 -- and the rest",
        "SELECT count(*) FROM orders",
    ),
];

#[test]
fn hostile_statements_are_refused_and_leave_nothing_behind() {
    let setup = Setup::new()
        .with_sample_data()
        .key("workers", "1")
        .key("query_timeout_ms", "2000");
    let out = setup.path("outside");
    std::fs::create_dir(&out).expect("mkdir");
    std::fs::write(out.join("secret.csv"), "secret\n1\n").expect("write");
    std::fs::write(setup.path("data").join(".secret.csv"), "secret\n2\n").expect("write");
    let data = setup.path("data");
    let cache = setup.path("cache");
    let mut server = setup.start();
    let worker = server.workers();
    // Let the snapshots the pool builds at start be published first: after that, no file may
    // appear in their directory.
    poll_until("the snapshots to serve", Duration::from_secs(30), || {
        let list = crate::support::get(server.addr(), "/v1/datasets")
            .ok()?
            .json();
        list["datasets"]
            .as_array()?
            .iter()
            .all(|d| d["storage"] == "snapshot" && d["pending_version"].is_null())
            .then_some(())
    });
    let expected = fingerprint_of_files(&data);
    assert_eq!(
        fingerprint(&server),
        expected,
        "the server answers what the files hold"
    );
    let data_before = listing(&data);
    let out_before = listing(&out);
    let snapshots_before = listing(&cache.join("snapshots"));

    assert!(CORPUS.len() >= 60, "{} statements", CORPUS.len());
    let mut wrong = Vec::new();
    for (template, expect) in CORPUS {
        let sql = template
            .replace("{out}", &out.display().to_string())
            .replace("{data}", &data.display().to_string())
            .replace("{cache}", &cache.display().to_string())
            .replace("{secret}", &out.join("secret.csv").display().to_string())
            .replace("{dot}", &data.join(".secret.csv").display().to_string());
        let response = fresh(&server, &json!({"sql": sql, "timeout_ms": 300}));
        let body = response.json();
        let as_expected = match expect {
            Expect::Refused => response.status == 400 || response.status == 403,
            Expect::Deadline => {
                (response.status, body["code"].as_str()) == (504, Some("query_timeout"))
            }
            Expect::Harmless => response.status == 200,
        };
        if !as_expected {
            wrong.push(format!(
                "{expect:?} {sql:?}: {} {}",
                response.status,
                detail(&response)
            ));
        }
        // The next request on the same (only) worker sees the datasets as they are.
        assert_eq!(fingerprint(&server), expected, "after {sql:?}");
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));

    for (hostile, honest) in POISON {
        let cached = |sql: &str| {
            crate::support::post_json(server.addr(), "/v1/query", &json!({"sql": sql}))
                .expect("query")
                .json()
        };
        let smuggled = cached(hostile);
        assert_ne!(
            smuggled["rows"][0][0], 5000,
            "DuckDB runs the \"comment\" of {hostile:?}"
        );
        assert_eq!(cached(honest)["rows"][0][0], 5000, "after {hostile:?}");
    }

    assert_eq!(
        listing(&data),
        data_before,
        "nothing new in the data directory"
    );
    assert_eq!(listing(&out), out_before, "nothing written outside");
    assert_eq!(
        listing(&cache.join("snapshots")),
        snapshots_before,
        "no snapshot written by a request"
    );
    assert_eq!(server.workers(), worker, "the worker never crashed");
    assert_eq!(fingerprint(&server), expected);
    let _ = &mut server;
}

#[test]
fn bad_input_gets_a_clear_error_and_the_worker_serves_on() {
    let mut server = Setup::new()
        .with_sample_data()
        .key("workers", "1")
        .key("max_body_size", "\"4MiB\"")
        .start();
    let worker = server.workers();
    let big = format!("SELECT 1 AS x /* {} */", "x".repeat(1 << 20));
    let nested = format!("SELECT {}1{}", "(".repeat(10_000), ")".repeat(10_000));
    let long_sum = format!("SELECT {}", vec!["1"; 10_000].join(" + "));
    let deep_but_fine = format!("SELECT {}", vec!["1"; 900].join(" + "));
    for (sql, status) in [
        (&big, 200),
        (&nested, 400),
        (&long_sum, 400),
        (&deep_but_fine, 200),
    ] {
        let response = fresh(&server, &json!({"sql": sql}));
        assert_eq!(
            response.status,
            status,
            "{}…: {}",
            &sql[..40],
            detail(&response)
        );
    }
    assert_eq!(
        fresh(&server, &json!({"sql": deep_but_fine})).json()["rows"][0][0],
        900
    );
    // NUL bytes and invalid UTF-8.
    let nul = fresh(
        &server,
        &json!({"sql": "SELECT 1\u{0}; COPY orders TO '/tmp/x'"}),
    );
    assert_eq!(nul.status, 400, "{}", detail(&nul));
    for body in [
        &b"{\"sql\": \"SELECT '\xff\xfe'\"}"[..],
        &b"{\"sql\": \"SELECT '\\ud800'\"}"[..],
        &b"{\"sql\": \"SELECT 1\", \"params\": [\"\xc3\x28\"]}"[..],
    ] {
        let response =
            post_raw(server.addr(), "/v1/query", "application/json", body, &[]).expect("query");
        assert_eq!(response.status, 400, "{}", detail(&response));
        assert_eq!(response.json()["code"], "invalid_body");
    }
    assert_eq!(server.workers(), worker, "the worker never crashed");
    let ok = fresh(&server, &json!({"sql": "SELECT count(*) FROM orders"}));
    assert_eq!(ok.json()["rows"][0][0], 5000);
    let _ = &mut server;
}
