//! The kernel's sandbox on its own, and bad files in the data directory.

use std::time::Duration;

use serde_json::json;

use crate::support::{Setup, get, poll_until, post_json};

fn query(server: &crate::support::Server, sql: &str) -> crate::support::Response {
    post_json(server.addr(), "/v1/query", &json!({"sql": sql})).expect("query")
}

fn text(response: &crate::support::Response) -> String {
    String::from_utf8_lossy(&response.body).into_owned()
}

/// With DuckDB's own sandbox and the statement gate switched off (a switch only test builds
/// have), Landlock alone still keeps the worker out of everything but its directories.
#[cfg(feature = "test-hooks")]
#[test]
fn the_kernel_alone_confines_a_worker_whose_duckdb_is_loosened() {
    let setup = Setup::new()
        .with_sample_data()
        .key("workers", "1")
        .key("sandbox", "\"required\"")
        .env("FERROCORN_TEST_UNLOCK_DUCKDB", "1");
    let outside = setup.path("outside");
    std::fs::create_dir(&outside).expect("mkdir");
    std::fs::write(outside.join("secret.txt"), "secret").expect("write");
    let data = setup.path("data");
    let server = setup.start();
    let ready = get(server.addr(), "/readyz").expect("readyz").json();
    assert!(
        ready["sandbox"]
            .as_str()
            .is_some_and(|s| s.starts_with("landlock")),
        "{ready}"
    );

    // The loosened worker really runs anything: DuckDB reads a data file by path and writes to
    // its spill directory, which neither the gate nor DuckDB's settings would allow.
    let inside = query(
        &server,
        &format!(
            "SELECT count(*) FROM read_text('{}')",
            data.join("orders.parquet").display()
        ),
    );
    assert_eq!(inside.status, 200, "{}", text(&inside));

    // What only the kernel now stops.
    let write_data = data.join("evil.csv");
    let attempts = [
        format!("COPY (SELECT 42 AS x) TO '{}'", write_data.display()),
        format!(
            "COPY (SELECT 42 AS x) TO '{}'",
            outside.join("evil.csv").display()
        ),
        format!(
            "SELECT * FROM read_text('{}')",
            outside.join("secret.txt").display()
        ),
        "SELECT * FROM read_text('/etc/passwd')".to_owned(),
        "SELECT * FROM read_text('/proc/self/environ')".to_owned(),
    ];
    for sql in &attempts {
        let response = query(&server, sql);
        assert_ne!(response.status, 200, "{sql}: {}", text(&response));
        assert!(
            text(&response).contains("Permission denied"),
            "{sql}: the kernel refused it: {}",
            text(&response)
        );
    }
    assert!(
        !write_data.exists(),
        "nothing was written into the data directory"
    );
    assert!(
        !outside.join("evil.csv").exists(),
        "nothing was written outside"
    );
}

/// On a kernel without Landlock (simulated: a switch only test builds have), a worker says so
/// once, `/readyz` says its sandbox is DuckDB's alone, and `sandbox = "required"` refuses to boot.
#[cfg(feature = "test-hooks")]
#[test]
fn without_landlock_a_worker_says_so_and_required_refuses_to_boot() {
    let server = Setup::new()
        .with_sample_data()
        .env("FERROCORN_TEST_NO_LANDLOCK", "1")
        .start();
    let ready = get(server.addr(), "/readyz").expect("readyz").json();
    assert!(
        ready["sandbox"]
            .as_str()
            .is_some_and(|s| s.starts_with("duckdb only")),
        "{ready}"
    );
    assert_eq!(
        server.count(&["no kernel sandbox"]),
        2,
        "one warning per worker"
    );
    let refused = query(&server, "SELECT * FROM read_text('/etc/passwd')");
    assert_eq!(refused.status, 403, "{}", text(&refused));
    drop(server);

    let mut required = Setup::new()
        .with_sample_data()
        .key("sandbox", "\"required\"")
        .env("FERROCORN_TEST_NO_LANDLOCK", "1")
        .spawn();
    let status = required.wait_exit(crate::support::READY_DEADLINE);
    assert_eq!(status.code(), Some(3), "{}", required.log());
    assert!(
        required.log().contains("sandbox = \"required\""),
        "{}",
        required.log()
    );
}

#[test]
fn a_worker_proves_its_sandbox_with_a_probe_it_created_and_the_master_cleans_up() {
    let setup = Setup::new().with_sample_data().key("workers", "1");
    let temp = setup.path("tmp");
    let mut server = setup.start();
    let ready = get(server.addr(), "/readyz").expect("readyz").json();
    assert!(
        ready["sandbox"]
            .as_str()
            .is_some_and(|s| s.starts_with("landlock")),
        "{ready}"
    );
    let worker = *server.workers().iter().next().expect("a worker");
    let spill = temp.join(format!("ferrocorn-{}-{worker}", server.pid()));
    let probe = temp.join(format!("ferrocorn-{}-{worker}.probe", server.pid()));
    assert!(spill.is_dir(), "the worker's spill directory exists");
    assert!(
        probe.is_file(),
        "the worker created its probe outside its directories"
    );
    // The probe is outside everything a query may read.
    let response = query(
        &server,
        &format!("SELECT * FROM read_text('{}')", probe.display()),
    );
    assert_eq!(response.status, 403, "{}", text(&response));

    server.signal(nix::sys::signal::Signal::SIGTERM);
    server.wait_exit(Duration::from_secs(30));
    assert!(!probe.exists(), "the master removed the probe");
    assert!(!spill.exists(), "the master removed the spill directory");
}

#[test]
fn bad_files_in_the_data_directory_do_not_take_the_pool_down() {
    let setup = Setup::new().with_sample_data();
    let data = setup.path("data");
    std::fs::write(
        data.join("broken.parquet"),
        b"PAR1 this is not parquet PAR1",
    )
    .expect("write");
    std::fs::copy(data.join("orders.parquet"), data.join(".hidden.parquet")).expect("copy");
    std::fs::write(data.join("notes.txt"), "not a dataset").expect("write");
    // A link to a file outside the data directory: DuckDB would follow it, the kernel does not.
    let outside = setup.path("outside.parquet");
    std::fs::copy(data.join("orders.parquet"), &outside).expect("copy");
    std::os::unix::fs::symlink(&outside, data.join("leak.parquet")).expect("symlink");
    nix::unistd::mkfifo(
        &data.join("fifo.parquet"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .expect("mkfifo");
    let server = setup.start();

    let catalogue = get(server.addr(), "/v1/datasets").expect("datasets").json();
    let datasets = catalogue["datasets"].as_array().expect("datasets");
    let names: Vec<&str> = datasets.iter().filter_map(|d| d["name"].as_str()).collect();
    assert_eq!(
        names,
        ["broken", "customers", "events", "fifo", "leak", "orders"],
        "{catalogue}"
    );
    for bad in ["broken", "fifo", "leak"] {
        let entry = datasets.iter().find(|d| d["name"] == bad).expect("listed");
        assert_eq!(entry["available"], false, "{entry}");
        assert!(
            entry["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{entry}"
        );
        let response = query(&server, &format!("SELECT count(*) FROM {bad}"));
        assert_eq!(response.status, 503, "{}", text(&response));
        assert_eq!(response.json()["code"], "dataset_unavailable");
    }
    let orders = query(&server, "SELECT count(*) FROM orders");
    assert_eq!(orders.json()["rows"][0][0], 5000);
    let joined = query(
        &server,
        "SELECT count(*) FROM orders JOIN customers USING (customer_id)",
    );
    assert_eq!(joined.status, 200, "{}", text(&joined));

    // The dot-file and the text file are not datasets, and no statement reaches them.
    for sql in [
        "SELECT * FROM \".hidden\"".to_owned(),
        format!("SELECT * FROM '{}'", data.join(".hidden.parquet").display()),
        format!(
            "SELECT * FROM read_parquet('{}')",
            data.join(".hidden.parquet").display()
        ),
        format!(
            "SELECT * FROM read_text('{}')",
            data.join("notes.txt").display()
        ),
    ] {
        let response = query(&server, &sql);
        assert!(
            response.status == 400 || response.status == 403,
            "{sql}: {}",
            text(&response)
        );
    }

    // A bad file arriving while the pool serves: that dataset only.
    std::fs::write(data.join("late.parquet"), b"garbage").expect("write");
    poll_until(
        "the late dataset to be listed",
        Duration::from_secs(20),
        || {
            let entry = get(server.addr(), "/v1/datasets/late").ok()?.json();
            (entry["available"] == false).then_some(())
        },
    );
    assert_eq!(query(&server, "SELECT count(*) FROM orders").status, 200);
    assert_eq!(server.workers().len(), 2, "both workers serve");
}
