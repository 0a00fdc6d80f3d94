//! Test harness: runs the real `ferrocorn` binary in a temp directory on port 0, talks raw
//! HTTP/1.1 to it, and polls its log for readiness (never sleeps a fixed time to wait for it).

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

pub const BIN: &str = env!("CARGO_BIN_EXE_ferrocorn");

/// How long any readiness poll may take before the test fails.
pub const READY_DEADLINE: Duration = Duration::from_secs(60);

/// A loopback port free at the moment (for a process that must be told its port).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Poll `check` every 20 ms until it returns `Some`, or panic after `deadline`.
pub fn poll_until<T>(what: &str, deadline: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A temp directory with a config file, a data directory and a temp directory.
pub struct Setup {
    pub dir: tempfile::TempDir,
    pub keys: BTreeMap<String, String>,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// The binary the server is started from ([`BIN`] unless [`Setup::own_binary`]).
    pub binary: PathBuf,
}

impl Default for Setup {
    fn default() -> Self {
        Self::new()
    }
}

impl Setup {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("data")).expect("data dir");
        std::fs::create_dir(dir.path().join("tmp")).expect("tmp dir");
        let mut keys = BTreeMap::new();
        let mut set = |k: &str, v: String| {
            keys.insert(k.to_owned(), v);
        };
        set("bind", r#"["127.0.0.1:0"]"#.to_owned());
        set("workers", "2".to_owned());
        set("data_dir", toml_str(&dir.path().join("data")));
        set("temp_dir", toml_str(&dir.path().join("tmp")));
        set("cache_dir", toml_str(&dir.path().join("cache")));
        set("duckdb_memory_limit", r#""512MB""#.to_owned());
        set("duckdb_threads", "1".to_owned());
        Self {
            dir,
            keys,
            args: Vec::new(),
            env: Vec::new(),
            binary: PathBuf::from(BIN),
        }
    }

    /// Start the server from a copy of the binary in the test's directory, which the test may
    /// replace (a binary upgrade).
    pub fn own_binary(mut self) -> Self {
        let copy = self.path("ferrocorn");
        std::fs::copy(BIN, &copy).expect("copy the binary");
        self.binary = copy;
        self
    }

    /// Run `ferrocorn --config <this config> args…` (a command that exits by itself, such as
    /// `status`), from the tested binary whatever the server runs: exit code, stdout, stderr.
    pub fn run_command(&self, args: &[&str]) -> (Option<i32>, String, String) {
        let output = Command::new(BIN)
            .arg("--config")
            .arg(self.config_path())
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .expect("run ferrocorn");
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    /// Copy the repository's sample dataset (data/sample) into the data directory.
    pub fn with_sample_data(self) -> Self {
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/sample");
        copy_dir(&source, &self.path("data"));
        self
    }

    /// Set a key to a TOML value (written as given).
    pub fn key(mut self, key: &str, toml_value: &str) -> Self {
        self.keys.insert(key.to_owned(), toml_value.to_owned());
        self
    }

    pub fn arg(mut self, arg: &str) -> Self {
        self.args.push(arg.to_owned());
        self
    }

    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn config_path(&self) -> PathBuf {
        self.path("ferrocorn.toml")
    }

    pub fn write_config(&self) {
        let text: String = self
            .keys
            .iter()
            .map(|(k, v)| format!("{k} = {v}\n"))
            .collect();
        std::fs::write(self.config_path(), text).expect("write config");
    }

    fn command(&self) -> Command {
        self.write_config();
        let mut command = Command::new(&self.binary);
        command
            .arg("--config")
            .arg(self.config_path())
            .args(&self.args)
            .current_dir(self.dir.path())
            .env_remove("WORKERS")
            .env_remove("DUCKDB_MEMORY_LIMIT")
            .env_remove("DEBUG")
            .env_remove("FERROCORN_LOG")
            .stdin(Stdio::null());
        for (k, v) in &self.env {
            command.env(k, v);
        }
        command
    }

    /// Run the binary to completion (for commands that exit by themselves).
    pub fn run_to_exit(&self) -> (ExitStatus, String, String) {
        let output = self.command().output().expect("run ferrocorn");
        (
            output.status,
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    /// Start the server without waiting for it.
    pub fn spawn(self) -> Server {
        let log = self.path("server.log");
        let file = File::create(&log).expect("log file");
        let child = self
            .command()
            .stdout(Stdio::null())
            .stderr(file)
            .process_group(0)
            .spawn()
            .expect("spawn ferrocorn");
        Server {
            child,
            log,
            setup: self,
            addr: None,
        }
    }

    /// Start the server and wait until every worker is ready.
    pub fn start(self) -> Server {
        let mut server = self.spawn();
        server.wait_ready();
        server
    }
}

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read sample dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

pub fn toml_str(path: &Path) -> String {
    format!("{:?}", path.display().to_string())
}

/// A running `ferrocorn` master.
pub struct Server {
    pub child: Child,
    pub log: PathBuf,
    pub setup: Setup,
    addr: Option<SocketAddr>,
}

impl Server {
    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Lines of the log containing every one of `parts`.
    pub fn log_lines(&self, parts: &[&str]) -> Vec<String> {
        self.log()
            .lines()
            .filter(|line| parts.iter().all(|p| line.contains(p)))
            .map(str::to_owned)
            .collect()
    }

    pub fn count(&self, parts: &[&str]) -> usize {
        self.log_lines(parts).len()
    }

    /// Wait until at least `n` log lines contain all of `parts`.
    pub fn wait_log(&self, parts: &[&str], n: usize, deadline: Duration) {
        poll_until(&format!("{n} log lines with {parts:?}"), deadline, || {
            (self.count(parts) >= n).then_some(())
        });
    }

    pub fn wait_ready(&mut self) {
        let log = self.log.clone();
        poll_until("all workers ready", READY_DEADLINE, || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("ferrocorn exited early with {status}:\n{text}");
            }
            text.contains("all workers ready").then_some(())
        });
        self.addr = Some(self.find_addr());
    }

    fn find_addr(&self) -> SocketAddr {
        self.log()
            .lines()
            .filter(|l| l.contains("listening"))
            .find_map(|l| {
                let text = l.split("address=").nth(1)?;
                text.split_whitespace().next()?.parse().ok()
            })
            .expect("a TCP listening address in the log")
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr.expect("server is ready")
    }

    pub fn signal(&self, signal: Signal) {
        kill(self.pid(), signal).expect("signal the master");
    }

    /// The master's live child processes.
    pub fn workers(&self) -> BTreeSet<i32> {
        children_of(self.child.id() as i32)
    }

    /// Wait for the master to exit; returns its status.
    pub fn wait_exit(&mut self, deadline: Duration) -> ExitStatus {
        poll_until("the master to exit", deadline, || {
            self.child.try_wait().ok().flatten()
        })
    }

    /// `ferrocorn` pids that answered on the `worker ready` log lines.
    pub fn ready_count(&self) -> usize {
        self.count(&["worker ready"])
    }
}

impl Server {
    /// Stop the server with TERM, wait for it to exit, and start it again on the same
    /// directories and configuration (its port may change).
    pub fn restart(mut self) -> Server {
        self.signal(Signal::SIGTERM);
        assert_eq!(self.wait_exit(Duration::from_secs(30)).code(), Some(0));
        // A fresh Setup stands in for the moved-out one until this value drops.
        let setup = std::mem::take(&mut self.setup);
        setup.start()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // The master and its workers share a process group of their own.
        let _ = kill(Pid::from_raw(-(self.child.id() as i32)), Signal::SIGKILL);
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- server log ----\n{}", self.log());
        }
    }
}

/// Kills a process group when dropped: a process the test started outside [`Server`], with
/// `process_group(0)`, and whatever it started.
pub struct KillGroup(pub i32);

impl Drop for KillGroup {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(-self.0), Signal::SIGKILL);
    }
}

/// Child pids of `parent`, from /proc.
pub fn children_of(parent: i32) -> BTreeSet<i32> {
    let mut children = BTreeSet::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return children;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the parenthesised command: state ppid ...
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next().unwrap_or("");
        let ppid = fields.next().and_then(|p| p.parse::<i32>().ok());
        if ppid == Some(parent) && state != "Z" {
            children.insert(pid);
        }
    }
    children
}

/// A field of /proc/<pid>/status.
pub fn proc_status(pid: i32, field: &str) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.trim().to_owned())
}

/// An HTTP response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Trailer fields of a chunked body.
    pub trailers: Vec<(String, String)>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        field(&self.headers, name)
    }

    pub fn trailer(&self, name: &str) -> Option<&str> {
        field(&self.trailers, name)
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn closes(&self) -> bool {
        self.header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
    }
}

fn field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Read header (or trailer) fields up to the empty line that ends them.
fn read_fields(reader: &mut impl BufRead, what: &str) -> io::Result<Vec<(String, String)>> {
    let mut fields = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("eof in {what}"),
            ));
        }
        let trimmed = line.trim_end();
        if trimmed.is_empty() {
            return Ok(fields);
        }
        if let Some((k, v)) = trimmed.split_once(':') {
            fields.push((k.trim().to_owned(), v.trim().to_owned()));
        }
    }
}

/// Read one response from `reader`.
pub fn read_response(reader: &mut impl BufRead) -> io::Result<Response> {
    let mut response = read_head(reader)?.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed before a response",
        )
    })?;
    read_body(reader, &mut response, true)?;
    Ok(response)
}

/// Read a response's status line and header fields; `None` when the connection closes first.
pub fn read_head(reader: &mut impl BufRead) -> io::Result<Option<Response>> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad status line {line:?}"),
            )
        })?;
    let headers = read_fields(reader, "headers")?;
    Ok(Some(Response {
        status,
        headers,
        body: Vec::new(),
        trailers: Vec::new(),
    }))
}

/// Read the body `response`'s head announces (and a chunked body's trailers); without a length
/// or chunking, up to the connection's end when `until_close`, else nothing.
pub fn read_body(
    reader: &mut impl BufRead,
    response: &mut Response,
    until_close: bool,
) -> io::Result<()> {
    if let Some(len) = response.header("content-length") {
        let len: usize = len
            .parse()
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad content-length"))?;
        response.body.resize(len, 0);
        reader.read_exact(&mut response.body)?;
    } else if response
        .header("transfer-encoding")
        .is_some_and(|v| v.contains("chunked"))
    {
        let mut line = String::new();
        loop {
            line.clear();
            reader.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim(), 16)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
            if size == 0 {
                response.trailers = read_fields(reader, "trailers")?;
                break;
            }
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk)?;
            chunk.truncate(size);
            response.body.extend_from_slice(&chunk);
        }
    } else if until_close && response.status != 204 && response.status != 304 {
        reader.read_to_end(&mut response.body)?;
    }
    Ok(())
}

/// A keep-alive HTTP/1.1 connection.
pub struct Conn {
    reader: BufReader<TcpStream>,
}

impl Conn {
    pub fn open(addr: SocketAddr) -> io::Result<Self> {
        let stream = TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        stream.set_nodelay(true)?;
        Ok(Self {
            reader: BufReader::new(stream),
        })
    }

    pub fn stream(&self) -> &TcpStream {
        self.reader.get_ref()
    }

    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<Response> {
        self.reader.get_mut().write_all(bytes)?;
        read_response(&mut self.reader)
    }

    pub fn get(&mut self, path: &str) -> io::Result<Response> {
        self.send_raw(format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes())
    }

    /// Whether nothing at all (no byte, no close) arrives within `wait`.
    pub fn silent_for(&self, wait: Duration) -> bool {
        let stream = self.reader.get_ref();
        let _ = stream.set_read_timeout(Some(wait));
        let mut buf = [0u8; 1];
        let silent = match stream.peek(&mut buf) {
            Ok(_) => false,
            Err(e) => matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
        silent && self.reader.buffer().is_empty()
    }

    /// Read the next response (after [`Conn::send_only`]).
    pub fn read(&mut self) -> io::Result<Response> {
        read_response(&mut self.reader)
    }

    /// Send bytes without waiting for an answer.
    pub fn send_only(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.reader.get_mut().write_all(bytes)
    }

    /// Whether the server closes the connection (EOF or reset) within `wait`; false when the
    /// connection is still open after it.
    pub fn closed_within(&mut self, wait: Duration) -> bool {
        let _ = self.reader.get_ref().set_read_timeout(Some(wait));
        let mut buf = [0u8; 1];
        match self.reader.read(&mut buf) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => !matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
        }
    }
}

/// `POST /v1/query` with a JSON body on a fresh connection.
pub fn post_json(addr: SocketAddr, path: &str, body: &serde_json::Value) -> io::Result<Response> {
    post_raw(
        addr,
        path,
        "application/json",
        &serde_json::to_vec(body).unwrap_or_default(),
        &[],
    )
}

/// A POST with any body and extra headers on a fresh connection.
pub fn post_raw(
    addr: SocketAddr,
    path: &str,
    content_type: &str,
    body: &[u8],
    headers: &[(&str, &str)],
) -> io::Result<Response> {
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    let mut bytes = request.into_bytes();
    bytes.extend_from_slice(body);
    Conn::open(addr)?.send_raw(&bytes)
}

/// `POST /v1/auth/token` with `body` as `content_type` (JSON or the OAuth 2.0 form).
pub fn login(server: &Server, body: &str, content_type: &str) -> Response {
    post_raw(
        server.addr(),
        "/v1/auth/token",
        content_type,
        body.as_bytes(),
        &[],
    )
    .expect("login")
}

/// `GET` with extra headers on a fresh connection.
pub fn get_with(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> io::Result<Response> {
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    Conn::open(addr)?.send_raw(request.as_bytes())
}

/// Percent-encode a query-string value.
pub fn encode(text: &str) -> String {
    let mut out = String::new();
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `POST /v1/query` with `sql` from another thread; the handle yields the response and the
/// moment it arrived (to show what happened while the query ran).
pub fn query_in_background(
    addr: SocketAddr,
    sql: &str,
) -> std::thread::JoinHandle<(io::Result<Response>, Instant)> {
    let body = serde_json::json!({ "sql": sql });
    std::thread::spawn(move || (post_json(addr, "/v1/query", &body), Instant::now()))
}

/// One request on a fresh connection.
pub fn get(addr: SocketAddr, path: &str) -> io::Result<Response> {
    Conn::open(addr)?.send_raw(
        format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
    )
}

/// What a load generator saw.
#[derive(Debug, Default)]
pub struct LoadStats {
    pub ok: u64,
    pub errors: Vec<String>,
    pub pids: BTreeSet<u64>,
}

/// Concurrent clients sending `GET /healthz` (or another path) on keep-alive connections until
/// stopped.
pub struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<LoadStats>>,
}

/// Upper bounds of any load run, whatever the test does.
const LOAD_MAX_REQUESTS_PER_CLIENT: u64 = 2_000_000;
const LOAD_MAX_DURATION: Duration = Duration::from_secs(180);

impl Load {
    pub fn start(addr: SocketAddr, clients: usize) -> Self {
        Self::start_on(addr, clients, "/healthz")
    }

    /// Clients sending `GET path`, which must answer 200.
    pub fn start_on(addr: SocketAddr, clients: usize, path: &'static str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..clients)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || client_loop(addr, &stop, path))
            })
            .collect();
        Self { stop, threads }
    }

    pub fn stop(self) -> LoadStats {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = LoadStats::default();
        for thread in self.threads {
            let stats = thread.join().expect("load thread");
            total.ok += stats.ok;
            total.errors.extend(stats.errors);
            total.pids.extend(stats.pids);
        }
        total
    }
}

fn client_loop(addr: SocketAddr, stop: &AtomicBool, path: &str) -> LoadStats {
    let mut stats = LoadStats::default();
    let started = Instant::now();
    let mut conn: Option<Conn> = None;
    let mut sent = 0u64;
    while !stop.load(Ordering::Relaxed)
        && sent < LOAD_MAX_REQUESTS_PER_CLIENT
        && started.elapsed() < LOAD_MAX_DURATION
    {
        sent += 1;
        let c = match conn.take() {
            Some(c) => c,
            None => match Conn::open(addr) {
                Ok(c) => c,
                Err(e) => {
                    stats.errors.push(format!("connect: {e}"));
                    continue;
                }
            },
        };
        let mut c = c;
        match c.get(path) {
            Ok(response) if response.status == 200 => {
                stats.ok += 1;
                if let Some(pid) = response.json()["pid"].as_u64() {
                    stats.pids.insert(pid);
                }
                if !response.closes() {
                    conn = Some(c);
                }
            }
            Ok(response) => stats.errors.push(format!("status {}", response.status)),
            Err(e) => stats.errors.push(format!("request: {e}")),
        }
    }
    stats
}

/// `/metrics`, read by a Prometheus text-format parser.
pub fn scrape(addr: SocketAddr) -> Metrics {
    let response = get(addr, "/metrics").expect("GET /metrics");
    let text = String::from_utf8_lossy(&response.body).into_owned();
    assert_eq!(response.status, 200, "{text}");
    let lines = text.lines().map(|l| Ok(l.to_owned())).collect::<Vec<_>>();
    Metrics(prometheus_parse::Scrape::parse(lines.into_iter()).expect("Prometheus text format"))
}

/// A parsed scrape.
#[derive(Debug)]
pub struct Metrics(pub prometheus_parse::Scrape);

impl Metrics {
    /// The value of every sample of `name` whose labels include `labels`, with its labels.
    pub fn samples<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = (&'a prometheus_parse::Labels, f64)> + 'a {
        self.0.samples.iter().filter_map(move |s| {
            let wanted =
                s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v));
            let value = match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => Some(v),
                _ => None,
            };
            wanted.then_some(()).and(value).map(|v| (&s.labels, v))
        })
    }

    /// The sum of the samples of `name` with `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples(name, labels).map(|(_, v)| v).sum()
    }

    /// Each worker's value of the per-worker metric `name`, by pid.
    pub fn per_worker(&self, name: &str) -> BTreeMap<i32, f64> {
        self.samples(name, &[])
            .filter_map(|(labels, v)| Some((labels.get("pid")?.parse().ok()?, v)))
            .collect()
    }
}
