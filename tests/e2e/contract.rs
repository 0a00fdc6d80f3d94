//! The contract, fuzzed: schemathesis (PyPI) generates requests from `/openapi.json` of a real
//! pool, in development and in production with an admin key, and checks every answer against
//! the document — no 5xx, no status, media type or body the contract does not describe, no
//! credential the contract asks for going unchecked — while the pool must lose no worker and
//! log no panic. The run is bounded (examples per operation, a fixed seed, one client) so that
//! it takes seconds of the suite.
//!
//! Beside it, one test per answer the fuzzer found outside the contract.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{
    BIN, Response, Server, Setup, encode, get, get_with, login, post_json, toml_str,
};

const SECRET: &str = "a-contract-secret-of-sixty-four-characters-0123456789abcdefghijk";

/// Examples per operation and phase: enough to cover every operation's documented answers
/// (the coverage phase adds its own boundary cases), few enough for seconds of a debug build.
const EXAMPLES: &str = "100";

/// Longest one schemathesis run may take before the test kills it and fails.
const RUN_DEADLINE: Duration = Duration::from_secs(120);

/// What schemathesis is told beyond its defaults; every line is a decision about this API.
const CONFIG: &str = r#"
# /v1/query: a schema can say that `sql` is a non-empty string and `params` (in a query string)
# a string, not that they are SQL and JSON. Generated statements are mostly not SQL, and 400
# (`sql_syntax`, `invalid_query_string`) is the API doing its job, not refusing valid input.
# A query past its deadline is 504 `query_timeout` by design (ARCHITECTURE.md, invariant 4),
# and `timeout_ms` is the client's: 0 or 1 ms makes even `SELECT 42` one.
[[operations]]
include-path = "/v1/query"
checks.positive_data_acceptance.expected-statuses = ["2xx", "3xx", "400", "401", "403", "404", "409", "429", "5xx"]
checks.not_a_server_error.expected-statuses = ["2xx", "3xx", "4xx", "504"]
"#;

/// The schemathesis command: its executable on `PATH`, or the module of the Python on `PATH`.
fn schemathesis() -> Command {
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|dir| dir.join("schemathesis"))
        .find(|candidate| is_executable(candidate));
    if let Some(executable) = on_path {
        return Command::new(executable);
    }
    let module = Command::new("python3")
        .args(["-c", "import schemathesis.cli"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        module,
        "schemathesis is not installed: pip install schemathesis==4.32.5 (.ci/run installs it)"
    );
    let mut command = Command::new("python3");
    command.args(["-m", "schemathesis.cli"]);
    command
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A pool for the fuzzer: the sample data, limits raised out of its way (their own tests set
/// them), and no recycling, so that every worker alive at the start must be alive at the end.
fn fuzzed(setup: Setup) -> Setup {
    setup
        .with_sample_data()
        .key("max_requests", "0")
        .key("rate_limit_per_minute", "60000")
        .key("rate_limit_auth_per_minute", "60000")
}

/// A production pool whose users file holds one admin API key; the server and the key.
fn production(setup: Setup) -> (Server, String) {
    let users = setup.path("users.toml");
    let output = Command::new(BIN)
        .args(["key", "add", "fuzzer", "--scope", "admin", "--users-file"])
        .arg(&users)
        .stdin(Stdio::null())
        .output()
        .expect("ferrocorn key add");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let key = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    let server = setup
        .key("users_file", &toml_str(&users))
        .env("ENVIRONMENT", "production")
        .env("SECRET_KEY", SECRET)
        .start();
    (server, key)
}

/// Run schemathesis with every check against `server`'s contract (with `key` as the bearer
/// credential, if any) and assert it passed, the workers all lived and nothing panicked.
fn fuzz(server: &Server, key: Option<&str>, seed: &str) {
    let workers = server.workers();
    assert!(!workers.is_empty());
    let config = server.setup.path("schemathesis.toml");
    std::fs::write(&config, CONFIG).expect("write the schemathesis config");
    let mut command = schemathesis();
    command
        .arg("--config-file")
        .arg(&config)
        .args(["run", &format!("http://{}/openapi.json", server.addr())])
        .args([
            "--checks",
            "all",
            "--max-examples",
            EXAMPLES,
            "--seed",
            seed,
        ])
        // One client: with several, queries wait on each other and a short `timeout_ms` can
        // make one of them 503 `overloaded` (documented, but not what this test is about).
        .args([
            "--workers",
            "1",
            "--generation-database",
            "none",
            "--no-color",
        ]);
    if let Some(key) = key {
        command.args(["--header", &format!("Authorization: Bearer {key}")]);
    }
    // Its caches (`.schemathesis`, `.hypothesis`) stay in the test's directory.
    let out = server.setup.path("schemathesis.out");
    let child = command
        .current_dir(server.setup.dir.path())
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).expect("output file"))
        .stderr(Stdio::from(
            std::fs::File::options()
                .append(true)
                .open(&out)
                .expect("output file"),
        ))
        .spawn()
        .expect("run schemathesis");
    let started = Instant::now();
    let status = wait_or_kill(child, RUN_DEADLINE);
    let report = std::fs::read_to_string(&out).unwrap_or_default();
    println!("schemathesis ({:?}):\n{report}", started.elapsed());
    assert!(
        status.is_some_and(|s| s.success()),
        "schemathesis failed ({status:?}); its report is above"
    );
    assert!(
        report.contains("Tested: 9"),
        "every operation of the contract was tested"
    );
    let after = server.workers();
    let lost: BTreeSet<_> = workers.difference(&after).collect();
    assert!(lost.is_empty(), "workers {lost:?} died under the fuzzer");
    assert!(!server.log().contains("panicked"), "a worker panicked");
}

/// Wait for `child` at most `deadline`; kill it past that (`None`).
fn wait_or_kill(
    mut child: std::process::Child,
    deadline: Duration,
) -> Option<std::process::ExitStatus> {
    let started = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if started.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn schemathesis_finds_nothing_in_development() {
    let server = fuzzed(Setup::new()).start();
    fuzz(&server, None, "20261208");
}

#[test]
fn schemathesis_finds_nothing_in_production_with_a_key() {
    let (server, key) = production(fuzzed(Setup::new()));
    fuzz(&server, Some(&key), "20261209");
}

/// The contract a pool serves.
fn contract(server: &Server, key: Option<&str>) -> Value {
    let auth = key.map(|k| format!("Bearer {k}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| vec![("Authorization", a)])
        .unwrap_or_default();
    let response = get_with(server.addr(), "/openapi.json", &headers).expect("/openapi.json");
    assert_eq!(response.status, 200);
    response.json()
}

/// Assert that `response` (to `method path`) is an answer the contract documents, with the
/// media type it documents.
fn assert_documented(spec: &Value, method: &str, path: &str, response: &Response) {
    let status = response.status.to_string();
    let answer = &spec["paths"][path][method]["responses"][&status];
    assert!(
        answer.is_object(),
        "{method} {path} answered {status}, which the contract does not list: {}",
        String::from_utf8_lossy(&response.body)
    );
    let media = response
        .header("content-type")
        .and_then(|v| v.split(';').next())
        .unwrap_or_default();
    assert!(
        answer["content"][media].is_object(),
        "{method} {path} {status} as {media} is not in the contract"
    );
}

#[test]
fn a_rate_limited_login_is_429_in_the_contract() {
    // Found: a login past `rate_limit_auth_per_minute` answered 429, which the contract did not
    // list for POST /v1/auth/token.
    let server = Setup::new()
        .key("rate_limit_auth_per_minute", "1")
        .env("SECRET_KEY", SECRET)
        .start();
    let spec = contract(&server, None);
    let body = r#"{"username": "nobody", "password": "wrong"}"#;
    let first = login(&server, body, "application/json");
    assert_eq!(first.status, 401);
    assert_documented(&spec, "post", "/v1/auth/token", &first);
    let second = login(&server, body, "application/json");
    assert_eq!(second.status, 429);
    assert_eq!(second.json()["code"], "rate_limited");
    assert!(second.header("retry-after").is_some());
    assert_documented(&spec, "post", "/v1/auth/token", &second);
}

#[test]
fn a_pool_without_a_secret_answers_a_login_404_not_503() {
    // Found: without a `secret_key` every login was 503 `tokens_unavailable`, a server error
    // (that proxies retry and alerts count) for a request no retry can get past.
    let server = Setup::new().start();
    let spec = contract(&server, None);
    let response = login(
        &server,
        "username=alice&password=x",
        "application/x-www-form-urlencoded",
    );
    assert_eq!(response.status, 404);
    assert_eq!(response.json()["code"], "tokens_unavailable");
    assert_documented(&spec, "post", "/v1/auth/token", &response);
}

#[test]
fn a_form_login_with_grant_type_null_is_refused_and_not_offered() {
    // Found: the contract offered `grant_type: null`, which a form sends as the text "null",
    // and the server refused it. Only the password grant is offered now, and still refused.
    let server = Setup::new().env("SECRET_KEY", SECRET).start();
    let spec = contract(&server, None);
    let grant = &spec["components"]["schemas"]["Credentials"]["properties"]["grant_type"];
    assert_eq!(grant["$ref"], "#/components/schemas/GrantType");
    let form = "application/x-www-form-urlencoded";
    for (body, status) in [
        ("grant_type=null&username=a&password=b", 400),
        ("grant_type=password&username=a&password=b", 401),
        ("username=a&password=b", 401),
    ] {
        let response = login(&server, body, form);
        assert_eq!(response.status, status, "{body}");
        assert_documented(&spec, "post", "/v1/auth/token", &response);
    }
    let json_null = login(
        &server,
        r#"{"username": "a", "password": "b", "grant_type": null}"#,
        "application/json",
    );
    assert_eq!(json_null.status, 401, "JSON's null is an absent grant_type");
}

#[test]
fn a_long_statement_in_a_query_string_is_414_in_the_contract() {
    // Found: GET /v1/query with a request line past `limit_request_line` answered 414, which
    // the contract did not list.
    let server = Setup::new().start();
    let spec = contract(&server, None);
    let sql = format!("SELECT '{}' AS long", "x".repeat(5000));
    let response = get(server.addr(), &format!("/v1/query?sql={}", encode(&sql))).expect("get");
    assert_eq!(response.status, 414);
    assert_documented(&spec, "get", "/v1/query", &response);
}

#[test]
fn what_the_contract_admits_the_server_answers() {
    // Found: `limit` and `timeout_ms` were int64 in the contract and the server takes any u64;
    // `params` was an object only and positional parameters are an array; `format` and
    // `explain` were any string. Each value the contract now admits is answered 200.
    let server = Setup::new().with_sample_data().start();
    let spec = contract(&server, None);
    let mut bodies = vec![
        json!({"sql": "SELECT 42 AS answer", "limit": u64::MAX, "timeout_ms": u64::MAX}),
        json!({"sql": "SELECT 42 AS answer", "limit": 1u64 << 63}),
        json!({"sql": "SELECT $1::INTEGER AS x", "params": [7]}),
        json!({"sql": "SELECT $x::INTEGER AS x", "params": {"x": 7}}),
        json!({"sql": "SELECT 42 AS answer", "params": null}),
    ];
    let names = |schema: &str| -> Vec<String> {
        spec["components"]["schemas"][schema]["enum"]
            .as_array()
            .expect("an enum")
            .iter()
            .map(|n| n.as_str().expect("a name").to_owned())
            .collect()
    };
    for format in names("FormatName") {
        bodies.push(json!({"sql": "SELECT 42 AS answer", "format": format}));
    }
    for explain in names("ExplainName") {
        bodies.push(json!({"sql": "SELECT 42 AS answer", "explain": explain}));
    }
    for body in bodies {
        let response = post_json(server.addr(), "/v1/query", &body).expect("query");
        assert_eq!(
            response.status,
            200,
            "{body}: {}",
            String::from_utf8_lossy(&response.body)
        );
        assert_documented(&spec, "post", "/v1/query", &response);
    }
}
