//! CORS in a real browser: Debian's chromium, headless, loads a page from an allowed origin and
//! from another, each calling the API with a bearer token (a preflighted request). The browser,
//! not the test, decides what the page may read.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::auth::{production_pool_with, token};
use crate::support::{Conn, Setup};

/// A page server on loopback: answers every request with the current `page`.
fn page_server() -> (SocketAddr, Arc<Mutex<String>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let page = Arc::new(Mutex::new(String::new()));
    let served = page.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(100).flatten() {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
            let mut reader = BufReader::new(&stream);
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            let body = served.lock().map(|p| p.clone()).unwrap_or_default();
            let _ = (&stream).write_all(
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            );
        }
    });
    (addr, page)
}

/// What the page wrote after calling the API, as chromium rendered it.
fn render(page_addr: SocketAddr, profile: &std::path::Path) -> String {
    let output = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=10000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("http://{page_addr}/"))
        .output()
        .expect("chromium (Debian's package; .ci/run installs it)");
    let dom = String::from_utf8_lossy(&output.stdout).into_owned();
    dom.split("<pre id=\"out\">")
        .nth(1)
        .and_then(|rest| rest.split("</pre>").next())
        .unwrap_or(&dom)
        .to_owned()
}

fn page(api: SocketAddr, bearer: &str) -> String {
    format!(
        r#"<html><body><pre id="out">pending</pre><script>
fetch("http://{api}/v1/query", {{
  method: "POST",
  headers: {{"Authorization": "Bearer {bearer}", "Content-Type": "application/json"}},
  body: JSON.stringify({{sql: "SELECT 6 * 7 AS answer"}})
}}).then(r => r.json().then(j => {{
  document.getElementById("out").textContent =
    "status=" + r.status + " answer=" + j.rows[0][0] + " request-id=" + (r.headers.get("x-request-id") ? "exposed" : "hidden");
}})).catch(e => {{ document.getElementById("out").textContent = "blocked: " + e; }});
</script></body></html>"#
    )
}

#[test]
fn a_page_from_an_allowed_origin_reads_a_result_and_one_from_another_is_blocked() {
    let (allowed, allowed_page) = page_server();
    let (other, other_page) = page_server();
    let (server, _) = production_pool_with(
        Setup::new()
            .key("cors_origins", &format!("[\"http://{allowed}\"]"))
            .key("rate_limit_auth_per_minute", "100"),
    );
    let bearer = token(&server, "alice");
    // The preflight as the browser sends it (no credential), and what each origin is told.
    let preflight = |origin: SocketAddr| {
        Conn::open(server.addr())
            .and_then(|mut c| {
                c.send_raw(
                    format!(
                        "OPTIONS /v1/query HTTP/1.1\r\nHost: test\r\nOrigin: http://{origin}\r\n\
                         Access-Control-Request-Method: POST\r\n\
                         Access-Control-Request-Headers: authorization, content-type\r\n\
                         Connection: close\r\n\r\n"
                    )
                    .as_bytes(),
                )
            })
            .expect("preflight")
    };
    let yes = preflight(allowed);
    assert_eq!(yes.status, 200);
    assert_eq!(
        yes.header("access-control-allow-origin"),
        Some(format!("http://{allowed}").as_str())
    );
    assert!(
        yes.header("vary")
            .is_some_and(|v| v.to_ascii_lowercase().contains("origin")),
        "{:?}",
        yes.header("vary")
    );
    assert!(
        yes.header("access-control-allow-headers")
            .is_some_and(|h| h.contains("authorization")),
        "{:?}",
        yes.header("access-control-allow-headers")
    );
    let no = preflight(other);
    assert_eq!(no.header("access-control-allow-origin"), None);
    *allowed_page.lock().expect("page") = page(server.addr(), &bearer);
    *other_page.lock().expect("page") = page(server.addr(), &bearer);
    let profile = tempfile::tempdir().expect("profile");
    let seen = render(allowed, &profile.path().join("a"));
    assert_eq!(
        seen, "status=200 answer=42 request-id=exposed",
        "allowed origin"
    );
    let seen = render(other, &profile.path().join("b"));
    assert!(seen.starts_with("blocked:"), "other origin: {seen}");
}
