//! HTTP behaviour of a worker: limits, bad input, keep-alive, slow clients, connection caps.

use std::io::Write;
use std::time::Duration;

use crate::support::{Conn, Setup, get};

#[test]
fn health_and_request_ids() {
    let server = Setup::new().start();
    let mut conn = Conn::open(server.addr()).expect("connect");
    let response = conn.get("/healthz").expect("healthz");
    assert_eq!(response.status, 200);
    assert_eq!(response.json()["status"], "ok");
    let generated = response
        .header("x-request-id")
        .expect("request id")
        .to_owned();
    let again = conn.get("/healthz").expect("again");
    assert_ne!(again.header("x-request-id"), Some(generated.as_str()));
    let echoed = conn
        .send_raw(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Request-Id: abc-123\r\n\r\n")
        .expect("with id");
    assert_eq!(echoed.header("x-request-id"), Some("abc-123"));
}

#[test]
fn unknown_paths_are_problem_documents() {
    let server = Setup::new().start();
    let response = get(server.addr(), "/nope").expect("404");
    assert_eq!(response.status, 404);
    assert_eq!(
        response.header("content-type"),
        Some("application/problem+json")
    );
    let body = response.json();
    assert_eq!(body["code"], "not_found");
    assert_eq!(body["status"], 404);
    assert_eq!(body["request_id"].as_str(), response.header("x-request-id"));
    let mut conn = Conn::open(server.addr()).expect("connect");
    let response = conn
        .send_raw(b"DELETE /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("405");
    assert_eq!(response.status, 405);
    assert_eq!(response.json()["code"], "method_not_allowed");
}

#[test]
fn malformed_requests_get_400_and_the_worker_lives() {
    let server = Setup::new().key("workers", "1").start();
    let workers = server.workers();
    for garbage in [
        &b"HELLO\r\n\r\n"[..],
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
        b"\x00\x01\x02\x03\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
    ] {
        let mut conn = Conn::open(server.addr()).expect("connect");
        let response = conn.send_raw(garbage).expect("a response");
        assert_eq!(
            response.status,
            400,
            "{:?}",
            String::from_utf8_lossy(garbage)
        );
    }
    let response = Conn::open(server.addr())
        .expect("connect")
        .send_raw(b"GET / HTTP/9.9\r\n\r\n")
        .expect("a response");
    assert!(
        response.status >= 400,
        "unsupported version: {}",
        response.status
    );
    assert_eq!(get(server.addr(), "/healthz").expect("healthz").status, 200);
    assert_eq!(server.workers(), workers, "no worker was lost");
}

#[test]
fn header_and_request_line_limits() {
    let server = Setup::new()
        .key("workers", "1")
        .key("limit_request_line", "200")
        .key("limit_request_fields", "10")
        .key("limit_request_field_size", "300")
        .start();
    let long_path = format!("/healthz?{}", "a".repeat(300));
    let response = get(server.addr(), &long_path).expect("414");
    assert_eq!(response.status, 414);
    assert_eq!(response.json()["code"], "request_line_too_long");

    let mut request = String::from("GET /healthz HTTP/1.1\r\nHost: x\r\n");
    request.push_str(&format!("X-Big: {}\r\n\r\n", "b".repeat(400)));
    let response = Conn::open(server.addr())
        .expect("connect")
        .send_raw(request.as_bytes())
        .expect("431");
    assert_eq!(response.status, 431);
    assert_eq!(response.json()["code"], "header_too_large");

    let mut request = String::from("GET /healthz HTTP/1.1\r\nHost: x\r\n");
    for i in 0..20 {
        request.push_str(&format!("X-H{i}: v\r\n"));
    }
    request.push_str("\r\n");
    let response = Conn::open(server.addr())
        .expect("connect")
        .send_raw(request.as_bytes())
        .expect("431");
    assert_eq!(response.status, 431);
    assert_eq!(get(server.addr(), "/healthz").expect("healthz").status, 200);
}

#[test]
fn idle_keep_alive_connections_close_after_keepalive() {
    let server = Setup::new().key("keepalive", "1").start();
    let mut conn = Conn::open(server.addr()).expect("connect");
    assert_eq!(conn.get("/healthz").expect("healthz").status, 200);
    assert!(
        conn.closed_within(Duration::from_secs(5)),
        "the idle connection is closed after keepalive"
    );
}

#[test]
fn slow_headers_are_cut_off() {
    let server = Setup::new().key("keepalive", "1").start();
    let mut conn = Conn::open(server.addr()).expect("connect");
    conn.stream()
        .try_clone()
        .expect("clone")
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .expect("partial headers");
    assert!(
        conn.closed_within(Duration::from_secs(5)),
        "a client that never finishes its headers is disconnected"
    );
}

#[test]
fn worker_connections_caps_concurrent_connections() {
    let server = Setup::new()
        .key("workers", "1")
        .key("worker_connections", "2")
        .key("keepalive", "30")
        .start();
    let mut first = Conn::open(server.addr()).expect("first");
    let mut second = Conn::open(server.addr()).expect("second");
    assert_eq!(first.get("/healthz").expect("first").status, 200);
    assert_eq!(second.get("/healthz").expect("second").status, 200);

    // The third connection waits in the kernel queue while two are open.
    let mut third = Conn::open(server.addr()).expect("third connects (queued)");
    third
        .send_only(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("send");
    assert!(
        third.silent_for(Duration::from_millis(500)),
        "no answer while the cap is reached"
    );
    drop(first);
    let response = third.read().expect("served once a connection frees");
    assert_eq!(response.status, 200);
    drop(second);
}
