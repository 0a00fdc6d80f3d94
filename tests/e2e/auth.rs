//! Production mode, accounts and tokens, through the real binary: `ferrocorn user add` and
//! `ferrocorn key add` write the users file, the pool starts with `ENVIRONMENT=production`.

use std::io::Write;
use std::process::{Command, Stdio};

use crate::support::{BIN, Response, Server, Setup, get, get_with, login, post_raw, toml_str};

const SECRET: &str = "a-test-secret-of-sixty-four-characters-0123456789abcdefghijklmnop";

/// `ferrocorn ARGS` with `stdin` as its standard input: (exit code, stdout, stderr).
fn run_with_stdin(args: &[&str], stdin: &str) -> (Option<i32>, String, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ferrocorn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    let output = child.wait_with_output().expect("wait");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A production pool whose users file has alice (query on orders only), root (admin) and an
/// API key with the datasets scope; returns the server and the key. The rate limits are raised
/// out of the way (the test of the limits sets its own).
fn production_pool() -> (Server, String) {
    production_pool_with(
        Setup::new()
            .key("rate_limit_per_minute", "10000")
            .key("rate_limit_auth_per_minute", "10000"),
    )
}

pub fn production_pool_with(setup: Setup) -> (Server, String) {
    let setup = setup.with_sample_data();
    let users = setup.path("users.toml");
    let users_arg = users.display().to_string();
    for (name, scope, dataset) in [("alice", "query", Some("orders")), ("root", "admin", None)] {
        let mut args = vec![
            "user",
            "add",
            name,
            "--scope",
            scope,
            "--users-file",
            &users_arg,
        ];
        if let Some(dataset) = dataset {
            args.extend(["--dataset", dataset]);
        }
        let (code, _, stderr) = run_with_stdin(&args, "s3cret pass\ns3cret pass\n");
        assert_eq!(code, Some(0), "{stderr}");
    }
    let (code, key, stderr) = run_with_stdin(
        &[
            "key",
            "add",
            "board",
            "--scope",
            "datasets",
            "--users-file",
            &users_arg,
        ],
        "",
    );
    assert_eq!(code, Some(0), "{stderr}");
    // The key from the environment, unless the test put it in the file (to rotate it on HUP).
    let setup = if setup.keys.contains_key("secret_key") {
        setup
    } else {
        setup.env("SECRET_KEY", SECRET)
    };
    let server = setup
        .key("users_file", &toml_str(&users))
        .env("ENVIRONMENT", "production")
        .start();
    (server, key.trim().to_owned())
}

pub fn token(server: &Server, user: &str) -> String {
    let response = login(
        server,
        &format!(r#"{{"username": "{user}", "password": "s3cret pass"}}"#),
        "application/json",
    );
    assert_eq!(response.status, 200, "{:?}", response.json());
    assert_eq!(response.header("cache-control"), Some("no-store"));
    response.json()["access_token"]
        .as_str()
        .expect("access_token")
        .to_owned()
}

fn query(server: &Server, sql: &str, bearer: Option<&str>) -> Response {
    let auth = bearer.map(|b| format!("Bearer {b}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| vec![("Authorization", a)])
        .unwrap_or_default();
    let body = serde_json::to_vec(&serde_json::json!({ "sql": sql })).expect("json");
    post_raw(
        server.addr(),
        "/v1/query",
        "application/json",
        &body,
        &headers,
    )
    .expect("query")
}

fn code(response: &Response) -> String {
    response.json()["code"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn production_needs_a_credential_everywhere_but_the_probes_and_the_login() {
    let (server, key) = production_pool();
    let addr = server.addr();
    let health = get(addr, "/healthz").expect("healthz");
    assert_eq!(health.status, 200);
    assert_eq!(health.header("x-content-type-options"), Some("nosniff"));
    assert!(
        health
            .header("content-security-policy")
            .is_some_and(|p| p.contains("default-src 'none'")),
        "{:?}",
        health.header("content-security-policy")
    );
    assert_eq!(get(addr, "/readyz").expect("readyz").status, 200);
    for path in [
        "/v1/datasets",
        "/metrics",
        "/openapi.json",
        "/no/such/thing",
    ] {
        let response = get(addr, path).expect("get");
        assert_eq!(response.status, 401, "{path}");
        assert_eq!(code(&response), "unauthorized", "{path}");
        assert_eq!(response.header("x-content-type-options"), Some("nosniff"));
        assert_eq!(
            response.header("www-authenticate"),
            Some("Bearer realm=\"ferrocorn\""),
            "{path}"
        );
    }
    let anonymous = query(&server, "SELECT 1", None);
    assert_eq!(
        (anonymous.status, code(&anonymous).as_str()),
        (401, "unauthorized")
    );

    // A wrong password and an unknown user get the same answer.
    for body in [
        r#"{"username": "alice", "password": "wrong"}"#,
        r#"{"username": "mallory", "password": "s3cret pass"}"#,
        r#"{"username": "al\u0007ice", "password": "s3cret pass"}"#,
    ] {
        let refused = login(&server, body, "application/json");
        assert_eq!(refused.status, 401, "{body}");
        assert_eq!(code(&refused), "invalid_credentials", "{body}");
    }
    // The OAuth 2.0 password grant form works too.
    let form = login(
        &server,
        "grant_type=password&username=alice&password=s3cret%20pass",
        "application/x-www-form-urlencoded",
    );
    assert_eq!(form.status, 200, "{:?}", form.json());
    assert_eq!(form.json()["token_type"], "bearer");
    assert_eq!(form.json()["scope"], "query");

    let alice = token(&server, "alice");
    let answered = query(&server, "SELECT count(*) AS n FROM orders", Some(&alice));
    assert_eq!(answered.status, 200, "{:?}", answered.json());
    // A scope alice lacks.
    let metrics = get_with(
        addr,
        "/metrics",
        &[("Authorization", &format!("Bearer {alice}"))],
    )
    .expect("metrics");
    assert_eq!(
        (metrics.status, code(&metrics).as_str()),
        (403, "insufficient_scope")
    );
    assert!(
        metrics
            .header("www-authenticate")
            .is_some_and(|c| c.contains("insufficient_scope")),
        "{:?}",
        metrics.header("www-authenticate")
    );
    // A tampered token: one character of the signature changed.
    let mut tampered = alice.clone().into_bytes();
    let last = tampered.len() - 2;
    tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).expect("ascii");
    let refused = query(&server, "SELECT 1", Some(&tampered));
    assert_eq!(
        (refused.status, code(&refused).as_str()),
        (401, "invalid_token")
    );

    // The admin reads the metrics; the API key lists datasets but may not query.
    let root = token(&server, "root");
    let metrics = get_with(
        addr,
        "/metrics",
        &[("Authorization", &format!("Bearer {root}"))],
    )
    .expect("metrics");
    assert_eq!(metrics.status, 200);
    let listed = get_with(
        addr,
        "/v1/datasets",
        &[("Authorization", &format!("Bearer {key}"))],
    )
    .expect("datasets");
    assert_eq!(listed.status, 200);
    let refused = query(&server, "SELECT 1", Some(&key));
    assert_eq!(
        (refused.status, code(&refused).as_str()),
        (403, "insufficient_scope")
    );
}

#[test]
fn production_refuses_to_start_without_a_strong_secret_or_with_debug() {
    for (env, setting) in [
        (vec![("ENVIRONMENT", "production")], "secret_key"),
        (
            vec![("ENVIRONMENT", "production"), ("SECRET_KEY", "short")],
            "secret_key",
        ),
        (
            vec![
                ("ENVIRONMENT", "production"),
                ("SECRET_KEY", SECRET),
                ("DEBUG", "true"),
            ],
            "debug",
        ),
        (
            vec![
                ("ENVIRONMENT", "production"),
                ("SECRET_KEY", SECRET),
                ("BACKEND_CORS_ORIGINS", r#"["*"]"#),
            ],
            "cors_origins",
        ),
        (
            vec![("BACKEND_CORS_ORIGINS", r#"["https://bi.example.com/app"]"#)],
            "cors_origins",
        ),
    ] {
        let mut setup = Setup::new();
        for (name, value) in &env {
            setup = setup.env(name, value);
        }
        let (status, _, stderr) = setup.run_to_exit();
        assert_eq!(status.code(), Some(64), "{env:?}: {stderr}");
        assert!(stderr.contains(setting), "{env:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
        assert!(
            !stderr.contains(SECRET),
            "the secret is never printed: {stderr}"
        );
    }
}

#[test]
fn development_says_so_and_print_config_never_shows_the_secret() {
    let (status, stdout, stderr) = Setup::new()
        .env("SECRET_KEY", SECRET)
        .arg("--print-config")
        .run_to_exit();
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(!stdout.contains(SECRET), "{stdout}");
    assert!(
        stdout.contains("secret_key = \"<redacted: 65 characters>\"  # env SECRET_KEY"),
        "{stdout}"
    );
    let server = Setup::new().with_sample_data().start();
    assert!(
        server.log().contains("DEVELOPMENT MODE"),
        "{}",
        server.log()
    );
    assert_eq!(query(&server, "SELECT 1", None).status, 200);
}

#[test]
fn a_token_limited_to_orders_cannot_read_customers_by_any_spelling() {
    let (server, _) = production_pool();
    let alice = token(&server, "alice");
    let allowed = query(&server, "SELECT count(*) FROM orders", Some(&alice));
    assert_eq!(allowed.status, 200, "{:?}", allowed.json());
    for sql in [
        "SELECT * FROM customers",
        "SELECT * FROM orders o JOIN customers c ON true",
        "WITH c AS (SELECT * FROM customers) SELECT * FROM c",
        "WITH orders AS (SELECT * FROM customers) SELECT * FROM orders",
        "SELECT * FROM orders WHERE EXISTS (SELECT 1 FROM customers)",
        "SELECT (SELECT count(*) FROM customers)",
        "SELECT * FROM \"customers\"",
        "SELECT * FROM CUSTOMERS",
        "SELECT * FROM main.Customers",
        "FROM customers SELECT *",
        "FROM customers",
        "SELECT * FROM orders UNION ALL SELECT * FROM customers",
    ] {
        let refused = query(&server, sql, Some(&alice));
        assert_eq!(refused.status, 403, "{sql}: {:?}", refused.json());
        assert_eq!(code(&refused), "dataset_forbidden", "{sql}");
    }
    // A typo's suggestion names only what the caller may read.
    let typo = query(&server, "SELECT * FROM customer", Some(&alice));
    assert_eq!(typo.status, 400);
    let body = String::from_utf8_lossy(&typo.body).into_owned();
    assert!(!body.contains("customers"), "{body}");
    let root = token(&server, "root");
    let typo = query(&server, "SELECT * FROM customer", Some(&root));
    let body = String::from_utf8_lossy(&typo.body).into_owned();
    assert!(
        body.contains("customers"),
        "the suggestion exists for others: {body}"
    );
    let listed = get_with(
        server.addr(),
        "/v1/datasets",
        &[("Authorization", &format!("Bearer {alice}"))],
    )
    .expect("datasets");
    let names: Vec<String> = listed.json()["datasets"]
        .as_array()
        .expect("datasets")
        .iter()
        .map(|d| d["name"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(names, ["orders"]);
    let one = get_with(
        server.addr(),
        "/v1/datasets/customers",
        &[("Authorization", &format!("Bearer {alice}"))],
    )
    .expect("dataset");
    assert_eq!(
        (one.status, code(&one).as_str()),
        (403, "dataset_forbidden")
    );
}

#[test]
fn rate_limits_hold_for_the_whole_pool_and_survive_a_worker_s_replacement() {
    let access_log = tempfile::NamedTempFile::new().expect("access log");
    let (server, _) = production_pool_with(
        Setup::new()
            .key("accesslog", &toml_str(access_log.path()))
            .key("workers", "4")
            .key("metrics_public", "true")
            .key("rate_limit_per_minute", "60")
            .key("rate_limit_auth_per_minute", "5"),
    );
    let addr = server.addr();
    // Five logins from this address pass (one of them for a token), the sixth is refused.
    let alice = token(&server, "alice");
    for _ in 0..4 {
        let wrong = login(
            &server,
            r#"{"username": "alice", "password": "wrong"}"#,
            "application/json",
        );
        assert_eq!(wrong.status, 401);
    }
    let sixth = login(
        &server,
        r#"{"username": "alice", "password": "s3cret pass"}"#,
        "application/json",
    );
    assert_eq!((sixth.status, code(&sixth).as_str()), (429, "rate_limited"));
    assert!(sixth.header("retry-after").is_some());
    assert_eq!(
        sixth.header("ratelimit-policy"),
        Some("\"minute\";q=5;w=60")
    );
    // A client behind the trusted proxy (loopback, the default) is another address.
    let proxied = post_raw(
        addr,
        "/v1/auth/token",
        "application/json",
        br#"{"username": "alice", "password": "s3cret pass"}"#,
        &[("X-Forwarded-For", "203.0.113.7")],
    )
    .expect("login");
    assert_eq!(proxied.status, 200);
    // ... and the access log names it.
    crate::support::poll_until(
        "the proxied client in the access log",
        std::time::Duration::from_secs(10),
        || {
            std::fs::read_to_string(access_log.path())
                .ok()
                .filter(|log| log.lines().any(|l| l.starts_with("203.0.113.7 ")))
                .map(|_| ())
        },
    );

    // Sixty API requests pass, spread over the workers; the sixty-first is refused.
    let auth = format!("Bearer {alice}");
    let before = crate::support::scrape(addr).per_worker("ferrocorn_worker_requests");
    for i in 0..60 {
        let response = get_with(addr, "/v1/datasets", &[("Authorization", &auth)]).expect("get");
        assert_eq!(response.status, 200, "request {}", i + 1);
    }
    // Each scrape is one request of some worker: a worker that started two or more in between
    // served at least one of the sixty.
    let after = crate::support::scrape(addr).per_worker("ferrocorn_worker_requests");
    let served: Vec<i32> = after
        .iter()
        .filter(|(pid, n)| **n - before.get(*pid).copied().unwrap_or(0.0) >= 2.0)
        .map(|(pid, _)| *pid)
        .collect();
    assert!(
        served.len() >= 2,
        "the requests went to one worker only: {before:?} → {after:?}"
    );
    let refused = get_with(addr, "/v1/datasets", &[("Authorization", &auth)]).expect("get");
    assert_eq!(
        (refused.status, code(&refused).as_str()),
        (429, "rate_limited")
    );
    assert!(refused.header("retry-after").is_some());
    assert!(
        refused
            .header("ratelimit")
            .is_some_and(|v| v.contains("r=0"))
    );

    // Every worker replaced (SIGKILL): the budget is still spent.
    let before = server.workers();
    for pid in &before {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    crate::support::poll_until(
        "the workers replaced",
        std::time::Duration::from_secs(60),
        || {
            let now = server.workers();
            (now.len() == 4 && now.is_disjoint(&before) && server.ready_count() >= 8).then_some(())
        },
    );
    let after = get_with(addr, "/v1/datasets", &[("Authorization", &auth)]).expect("get");
    assert_eq!(after.status, 429, "a new worker reset the budget");
}

#[test]
fn production_error_bodies_name_no_directory_of_the_server() {
    let setup = Setup::new();
    std::fs::write(setup.path("data").join("broken.parquet"), b"not parquet").expect("write");
    let data_dir = setup.path("data").canonicalize().expect("data dir");
    let (server, _) = production_pool_with(setup.key("rate_limit_auth_per_minute", "100"));
    let root = token(&server, "root");
    let refused = query(&server, "SELECT * FROM broken", Some(&root));
    assert_eq!(refused.status, 503, "{:?}", refused.json());
    let body = String::from_utf8_lossy(&refused.body).into_owned();
    assert!(body.contains("<data_dir>"), "{body}");
    assert!(!body.contains(&data_dir.display().to_string()), "{body}");
}

#[test]
fn workers_drop_to_the_configured_user_while_the_master_keeps_its_own() {
    let setup = Setup::new().with_sample_data();
    if !nix::unistd::geteuid().is_root() {
        // Without root there is nothing to drop to: the start is refused, naming the setting.
        let (status, _, stderr) = setup.key("user", "\"nobody\"").run_to_exit();
        assert_eq!(status.code(), Some(64), "{stderr}");
        assert!(stderr.contains("user"), "{stderr}");
        return;
    }
    // What an operator gives the workers' user: a readable data directory, a writable temp_dir.
    use std::os::unix::fs::PermissionsExt;
    let nobody = nix::unistd::User::from_name("nobody")
        .expect("lookup")
        .expect("a nobody user");
    let open = |path: &std::path::Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    };
    open(setup.dir.path(), 0o755);
    for entry in walkdir(&setup.path("data")) {
        open(&entry, if entry.is_dir() { 0o755 } else { 0o644 });
    }
    std::os::unix::fs::chown(setup.path("tmp"), Some(nobody.uid.as_raw()), None).expect("chown");
    let log = setup.path("access.log");
    let server = setup
        .key("user", "\"nobody\"")
        .key("accesslog", &toml_str(&log))
        .start();
    let master = server.pid().as_raw();
    assert_eq!(
        crate::support::proc_status(master, "Uid")
            .and_then(|u| u.split_whitespace().next().map(str::to_owned)),
        Some("0".to_owned())
    );
    let workers = server.workers();
    assert!(!workers.is_empty());
    for pid in &workers {
        let uids = crate::support::proc_status(*pid, "Uid").expect("status");
        assert!(
            uids.split_whitespace().all(|u| u == nobody.uid.to_string()),
            "worker {pid}: real, effective, saved and fs uids are nobody's: {uids}"
        );
        let groups = crate::support::proc_status(*pid, "Groups").expect("status");
        assert_eq!(groups, nobody.gid.to_string(), "supplementary groups");
    }
    // The control socket stays the master's: a worker cannot reload or resize its pool.
    let socket =
        std::path::Path::new(server.setup.keys["cache_dir"].trim_matches('"')).join("control.sock");
    let owner = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&socket).expect("socket"));
    assert_eq!(owner, 0, "{}", socket.display());
    // It still serves, snapshots and the result cache included (cache_dir is the user's).
    let answered = query(&server, "SELECT count(*) AS n FROM orders", None);
    assert_eq!(answered.status, 200, "{:?}", answered.json());
    crate::support::poll_until("an access line", std::time::Duration::from_secs(10), || {
        std::fs::read_to_string(&log)
            .ok()
            .filter(|t| t.contains("/v1/query"))
            .map(|_| ())
    });
}

fn walkdir(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut all = vec![dir.to_owned()];
    for entry in std::fs::read_dir(dir).expect("read_dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            all.extend(walkdir(&path));
        } else {
            all.push(path);
        }
    }
    all
}

#[test]
fn a_new_secret_key_on_hup_invalidates_old_tokens_unless_kept_as_the_previous_key() {
    let new_secret = SECRET.replace('a', "b");
    let setup = Setup::new()
        .key("secret_key", &format!("\"{SECRET}\""))
        .key("rate_limit_auth_per_minute", "100")
        .key("metrics_public", "true");
    let (server, _) = production_pool_with(setup);
    // metrics_public: a scraper needs no token; the API still does.
    assert_eq!(get(server.addr(), "/metrics").expect("metrics").status, 200);
    assert_eq!(
        get(server.addr(), "/v1/datasets").expect("datasets").status,
        401
    );
    let old = token(&server, "alice");
    assert_eq!(query(&server, "SELECT 1", Some(&old)).status, 200);

    let reload = |secret: &str, previous: Option<&str>, n: usize| {
        let mut setup_keys = server.setup.keys.clone();
        setup_keys.insert("secret_key".into(), format!("\"{secret}\""));
        if let Some(previous) = previous {
            setup_keys.insert("secret_key_previous".into(), format!("\"{previous}\""));
        } else {
            setup_keys.remove("secret_key_previous");
        }
        let text: String = setup_keys
            .iter()
            .map(|(k, v)| format!("{k} = {v}\n"))
            .collect();
        std::fs::write(server.setup.config_path(), text).expect("config");
        server.signal(nix::sys::signal::Signal::SIGHUP);
        server.wait_log(&["reload complete"], n, std::time::Duration::from_secs(90));
    };
    // Rotated with a grace period: the old token still works, new ones are signed anew.
    reload(&new_secret, Some(SECRET), 1);
    assert_eq!(query(&server, "SELECT 1", Some(&old)).status, 200);
    let new = token(&server, "alice");
    assert_eq!(query(&server, "SELECT 1", Some(&new)).status, 200);
    // The grace period over: the old token is refused, the new one is not.
    reload(&new_secret, None, 2);
    let refused = query(&server, "SELECT 1", Some(&old));
    assert_eq!(
        (refused.status, code(&refused).as_str()),
        (401, "invalid_token")
    );
    assert_eq!(query(&server, "SELECT 1", Some(&new)).status, 200);
}
