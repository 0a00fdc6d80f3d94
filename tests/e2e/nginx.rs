//! `deploy/nginx/ferrocorn.conf` run for real: Debian's nginx on loopback terminating TLS with a
//! self-signed certificate made here, in front of one pool (curl as the client) or of three
//! (a BI mix of users as the clients, over a plain-HTTP door the tests add).

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::mix::Mix;
use crate::support::{self, Server, Setup, free_port, poll_until};

/// Stops nginx when the test ends, however it ends.
struct Nginx(Child);

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run(program: &str, args: &[&str]) -> std::process::Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} (Debian's package; .ci/run installs it): {e}"))
}

/// `curl` a URL: (status, headers, body).
fn curl(args: &[&str]) -> (u16, String, Vec<u8>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let headers = dir.path().join("headers");
    let headers_arg = headers.display().to_string();
    let mut all = vec!["-sS", "--max-time", "30", "-D", &headers_arg, "-o", "-"];
    all.extend_from_slice(args);
    let output = run("curl", &all);
    assert!(
        output.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let head = std::fs::read_to_string(&headers).unwrap_or_default();
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head, output.stdout)
}

/// nginx with the shipped site, its upstream the comma-separated `upstream` addresses, TLS on
/// `https`, the redirect on `http`, and plain HTTP on `plain`.
fn start_nginx(dir: &Path, upstream: &str, https: u16, http: u16, plain: u16) -> Nginx {
    let (key, cert) = (dir.join("key.pem"), dir.join("cert.pem"));
    let made = run(
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
            "-keyout",
            &key.display().to_string(),
            "-out",
            &cert.display().to_string(),
        ],
    );
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let shipped = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/nginx/ferrocorn.conf"),
    )
    .expect("deploy/nginx/ferrocorn.conf");
    // Only what a deployment changes: addresses, ports, names and certificate paths.
    let site = shipped
        .replace(
            "    server 127.0.0.1:8000 max_fails=1 fail_timeout=5s;",
            &upstream
                .split(',')
                .map(|server| format!("    server {server} max_fails=1 fail_timeout=5s;"))
                .collect::<Vec<_>>()
                .join("\n"),
        )
        .replace("listen 443 ssl;", &format!("listen 127.0.0.1:{https} ssl;"))
        .replace("listen 80;", &format!("listen 127.0.0.1:{http};"))
        .replace("bi.example.com;", "localhost;")
        .replace(
            "/etc/ssl/certs/bi.example.com.pem",
            &cert.display().to_string(),
        )
        .replace(
            "/etc/ssl/private/bi.example.com.key",
            &key.display().to_string(),
        );
    for server in upstream.split(',') {
        assert!(
            site.contains(&format!("server {server} ")),
            "the upstream line moved: {site}"
        );
    }
    // The tests' own door: plain HTTP beside TLS, with the same location.
    let site = site.replacen(
        &format!("listen 127.0.0.1:{https} ssl;"),
        &format!("listen 127.0.0.1:{https} ssl;\n    listen 127.0.0.1:{plain};"),
        1,
    );
    std::fs::write(dir.join("site.conf"), site).expect("site");
    let d = dir.display();
    std::fs::write(
        dir.join("nginx.conf"),
        format!(
            "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{}}\nhttp {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/body;\n  \
             proxy_temp_path {d}/proxy;\n  include {d}/site.conf;\n}}\n"
        ),
    )
    .expect("nginx.conf");
    let child = Command::new("nginx")
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nginx (Debian's package; .ci/run installs it)");
    let nginx = Nginx(child);
    poll_until("nginx listening", Duration::from_secs(30), || {
        std::net::TcpStream::connect(("127.0.0.1", https))
            .ok()
            .map(|_| ())
    });
    nginx
}

#[test]
fn a_query_over_https_through_nginx_returns_the_same_bytes_as_direct() {
    let server = Setup::new().with_sample_data().start();
    let dir = tempfile::tempdir().expect("tempdir");
    let (https, http) = (free_port(), free_port());
    let _nginx = start_nginx(
        dir.path(),
        &server.addr().to_string(),
        https,
        http,
        free_port(),
    );
    let cert = dir.path().join("cert.pem").display().to_string();
    let resolve = format!("localhost:{https}:127.0.0.1");
    let target = "/v1/query?sql=SELECT%20*%20FROM%20orders%20ORDER%20BY%201&format=csv";

    let (status, _, direct) = curl(&[&format!("http://{}{target}", server.addr())]);
    assert_eq!(status, 200);
    assert!(!direct.is_empty());
    // Twice through nginx: the second request reuses its kept-alive upstream connection.
    for _ in 0..2 {
        let (status, head, proxied) = curl(&[
            "--cacert",
            &cert,
            "--resolve",
            &resolve,
            &format!("https://localhost:{https}{target}"),
        ]);
        assert_eq!(status, 200, "{head}");
        assert_eq!(proxied, direct, "the same bytes through nginx");
        assert!(head.to_ascii_lowercase().contains("x-request-id"), "{head}");
    }
    // Plain HTTP is sent to HTTPS.
    let (status, head, _) = curl(&[&format!("http://127.0.0.1:{http}/healthz")]);
    assert_eq!(status, 301, "{head}");
    assert!(head.contains("https://"), "{head}");
}

/// Issue 20: three instances behind the shipped nginx site. Under a 30-user BI mix through
/// nginx, one instance's master is killed (SIGKILL) and later started again on its port, and
/// another is stopped (TERM, with a de-registration delay): no request fails, because a stopping
/// pool closes its listeners and answers what it accepted, and nginx sends what an instance
/// refused to the next one.
#[test]
fn three_instances_behind_nginx_lose_no_request_to_a_killed_or_stopped_instance() {
    let pool = |bind: Option<SocketAddr>| {
        let mut setup = Setup::new()
            .with_sample_data()
            .key("workers", "1")
            .key("deregistration_delay", "1");
        if let Some(addr) = bind {
            setup = setup.arg("--bind").arg(&addr.to_string());
        }
        setup.start()
    };
    let mut instances: Vec<Server> = (0..3).map(|_| pool(None)).collect();
    let upstream: Vec<String> = instances.iter().map(|s| s.addr().to_string()).collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let plain = free_port();
    let _nginx = start_nginx(
        dir.path(),
        &upstream.join(","),
        free_port(),
        free_port(),
        plain,
    );
    let front: SocketAddr = format!("127.0.0.1:{plain}").parse().expect("addr");
    let answered =
        |server: &Server| support::scrape(server.addr()).sum("ferrocorn_requests_total", &[]);
    let mix = Mix::start(front, 30);
    poll_until("every instance answered", Duration::from_secs(30), || {
        instances.iter().all(|s| answered(s) > 50.0).then_some(())
    });

    // SIGKILL of one master: its worker drains what it read and exits; nginx retries the rest.
    let killed = instances[0].addr();
    instances[0].signal(Signal::SIGKILL);
    let _ = instances[0].wait_exit(Duration::from_secs(10));
    poll_until(
        "the killed instance's port refused",
        Duration::from_secs(15),
        || std::net::TcpStream::connect(killed).is_err().then_some(()),
    );
    let before = answered(&instances[1]) + answered(&instances[2]);
    poll_until(
        "the survivors carrying the load",
        Duration::from_secs(15),
        || (answered(&instances[1]) + answered(&instances[2]) > before + 200.0).then_some(()),
    );
    // Started again on its port: nginx sends it requests once its fail_timeout has passed.
    instances[0] = pool(Some(killed));
    poll_until(
        "the restarted instance answering",
        Duration::from_secs(30),
        || (answered(&instances[0]) > 20.0).then_some(()),
    );

    // TERM of another, with its de-registration delay.
    instances[1].signal(Signal::SIGTERM);
    assert_eq!(
        instances[1].wait_exit(Duration::from_secs(30)).code(),
        Some(0)
    );
    let before = answered(&instances[0]) + answered(&instances[2]);
    poll_until(
        "the others carrying the load",
        Duration::from_secs(15),
        || (answered(&instances[0]) + answered(&instances[2]) > before + 200.0).then_some(()),
    );
    let report = mix.stop();
    println!(
        "nginx, three instances, one killed and one stopped: {}",
        report.summary()
    );
    assert!(report.ok > 1000, "{}", report.summary());
    assert!(
        report.failures.is_empty() && report.refused == 0,
        "{}:\n{}",
        report.summary(),
        report.failure_sample()
    );
}
