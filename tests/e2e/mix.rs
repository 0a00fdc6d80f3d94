//! A BI mix of users for the chaos and container tests: each user keeps one keep-alive
//! connection, learns which worker serves it (`/healthz` answers the pid), and sends, back to
//! back, mostly light queries — point lookups, dashboard aggregates, the catalogue — and a few
//! heavy ones, over the sample dataset (`orders`, `customers`), with random parameters so that
//! the result cache answers only some.
//!
//! Like an HTTP client library, a user checks before it reuses its connection that the server
//! has not closed it (a worker that drained or died): such a connection is replaced, not counted
//! as a failure, since nothing was sent on it. Everything sent and not answered 200 is a failure,
//! kept with the worker it went to and the moment it was sent, so that a test can tell a request
//! lost with a killed worker from one the pool dropped.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::support::Conn;

/// Upper bounds of any mix, whatever the test does.
const MAX_REQUESTS_PER_USER: u64 = 1_000_000;
const MAX_DURATION: Duration = Duration::from_secs(600);

/// A request that was sent and not answered 200.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The worker its connection was served by (0: not known yet).
    pub pid: i32,
    /// When the user committed it to its connection (checked the connection open, then wrote).
    pub sent: Instant,
    pub what: String,
    /// The connection failed (reset, or closed without an answer), rather than a status.
    pub reset: bool,
}

/// What the users saw.
#[derive(Debug, Default)]
pub struct Report {
    pub sent: u64,
    pub ok: u64,
    /// Connections refused: nothing was delivered, a client may retry elsewhere.
    pub refused: u64,
    pub failures: Vec<Failure>,
    /// Latencies of the answered requests, in microseconds.
    pub latencies_us: Vec<u64>,
}

impl Report {
    pub fn resets(&self) -> usize {
        self.failures.iter().filter(|f| f.reset).count()
    }

    /// `sent 1234, ok 1230, failed 4 (reset 4), refused 0`.
    pub fn summary(&self) -> String {
        format!(
            "sent {}, ok {}, failed {} (reset {}), refused {}",
            self.sent,
            self.ok,
            self.failures.len(),
            self.resets(),
            self.refused
        )
    }

    /// The first few failures, a line each, for an assertion's message.
    pub fn failure_sample(&self) -> String {
        let lines: Vec<String> = self
            .failures
            .iter()
            .take(5)
            .map(|f| format!("pid {}: {}", f.pid, f.what))
            .collect();
        lines.join("\n")
    }

    /// The `q` quantile (0..=1) of the answered requests' latencies.
    pub fn latency(&mut self, q: f64) -> Duration {
        self.latencies_us.sort_unstable();
        let n = self.latencies_us.len();
        if n == 0 {
            return Duration::ZERO;
        }
        let index = ((n as f64 - 1.0) * q).round() as usize;
        Duration::from_micros(self.latencies_us[index.min(n - 1)])
    }
}

/// Running users; [`Mix::stop`] ends them and adds up what they saw.
pub struct Mix {
    stop: Arc<AtomicBool>,
    users: Vec<JoinHandle<Report>>,
}

impl Mix {
    pub fn start(addr: SocketAddr, users: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let users = (0..users)
            .map(|user| {
                let stop = stop.clone();
                std::thread::spawn(move || run_user(addr, &stop, user as u64))
            })
            .collect();
        Self { stop, users }
    }

    pub fn stop(self) -> Report {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = Report::default();
        for user in self.users {
            let report = user.join().expect("a user thread");
            total.sent += report.sent;
            total.ok += report.ok;
            total.refused += report.refused;
            total.failures.extend(report.failures);
            total.latencies_us.extend(report.latencies_us);
        }
        total
    }
}

/// A small deterministic generator (xorshift), one per user.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// The next request of the mix: a method, a path and a JSON body (for `POST`).
fn next_request(rng: &mut Rng) -> (&'static str, &'static str, Option<String>) {
    let query = |sql: &str, params: String| {
        Some(format!(
            r#"{{"sql": "{sql}", "params": {params}, "format": "json"}}"#
        ))
    };
    match rng.below(100) {
        // Point lookups by a random existing key.
        0..40 => (
            "POST",
            "/v1/query",
            query(
                "SELECT * FROM orders WHERE order_id = $1",
                format!("[{}]", 1 + rng.below(500)),
            ),
        ),
        // A dashboard tile: an aggregate over a random period.
        40..65 => (
            "POST",
            "/v1/query",
            query(
                "SELECT status, count(*) AS n, sum(amount) AS total FROM orders \
                 WHERE amount >= $1 GROUP BY 1 ORDER BY 1",
                format!("[{}]", rng.below(1000)),
            ),
        ),
        65..80 => ("GET", "/v1/datasets", None),
        // A join with a top-10.
        80..95 => (
            "POST",
            "/v1/query",
            query(
                "SELECT c.name, count(*) AS n FROM orders o JOIN customers c USING (customer_id) \
                 WHERE o.amount > $1 GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 10",
                format!("[{}]", rng.below(900)),
            ),
        ),
        // The heavy one: every order against a few hundred scenarios.
        _ => (
            "POST",
            "/v1/query",
            query(
                "SELECT status, count(*) AS n, avg(amount * (r.range % $1)) AS a \
                 FROM orders, range(400) r GROUP BY 1 ORDER BY 1",
                format!("[{}]", 2 + rng.below(50)),
            ),
        ),
    }
}

fn raw(method: &str, path: &str, body: Option<&str>) -> Vec<u8> {
    match body {
        Some(body) => format!(
            "{method} {path} HTTP/1.1\r\nHost: mix\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        ),
        None => format!("{method} {path} HTTP/1.1\r\nHost: mix\r\n\r\n"),
    }
    .into_bytes()
}

/// Whether the server has closed `conn` (EOF or an error waiting to be read): a client checks
/// this before it reuses a pooled connection.
fn closed_by_server(conn: &Conn) -> bool {
    let stream = conn.stream();
    if stream.set_nonblocking(true).is_err() {
        return true;
    }
    let mut byte = [0u8; 1];
    let closed = match stream.peek(&mut byte) {
        Ok(_) => true,
        Err(e) => e.kind() != io::ErrorKind::WouldBlock,
    };
    closed || stream.set_nonblocking(false).is_err()
}

fn run_user(addr: SocketAddr, stop: &AtomicBool, user: u64) -> Report {
    let mut report = Report::default();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (user + 1).wrapping_mul(0x2545_F491_4F6C_DD1D));
    let started = Instant::now();
    let mut conn: Option<(Conn, i32)> = None;
    while !stop.load(Ordering::Relaxed)
        && report.sent < MAX_REQUESTS_PER_USER
        && started.elapsed() < MAX_DURATION
    {
        // The moment the user commits its next request to a connection: it then checks the
        // connection is open (a reused one) or opens one, and writes.
        let committed = Instant::now();
        let (mut c, pid) = match conn.take() {
            Some((c, pid)) if !closed_by_server(&c) => (c, pid),
            _ => match Conn::open(addr) {
                Ok(c) => (c, 0),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    report.refused += 1;
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
                Err(e) => {
                    report.failures.push(Failure {
                        pid: 0,
                        sent: Instant::now(),
                        what: format!("connect: {e}"),
                        reset: true,
                    });
                    continue;
                }
            },
        };
        // A new connection first asks which worker serves it.
        let (method, path, body) = if pid == 0 {
            ("GET", "/healthz", None)
        } else {
            next_request(&mut rng)
        };
        let sent = committed;
        report.sent += 1;
        match c.send_raw(&raw(method, path, body.as_deref())) {
            Ok(response) if response.status == 200 => {
                report.ok += 1;
                report.latencies_us.push(sent.elapsed().as_micros() as u64);
                let pid = if pid == 0 {
                    response.json()["pid"].as_i64().unwrap_or(0) as i32
                } else {
                    pid
                };
                if !response.closes() {
                    conn = Some((c, pid));
                }
            }
            Ok(response) => report.failures.push(Failure {
                pid,
                sent,
                what: format!(
                    "{method} {path}: status {}: {}",
                    response.status,
                    String::from_utf8_lossy(&response.body)
                ),
                reset: false,
            }),
            Err(e) => report.failures.push(Failure {
                pid,
                sent,
                what: format!("{method} {path}: {e}"),
                reset: true,
            }),
        }
    }
    report
}
