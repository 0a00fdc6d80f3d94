//! The production checklist of the stack ferrocorn replaces, run on the container (issue 19):
//! the image of `deploy/Dockerfile` (its `prebuilt` target: the runtime stage around the binary
//! these tests run), under that stack's limits — 2 CPUs, 2 GB, a read-only root file system with
//! the cache on a named volume, a non-root user, the data mounted read-only — on the host's
//! network, talking to loopback only.
//!
//! `scripts/test.sh` runs `scripts/docker_setup.sh` first (Debian's docker.io, a daemon, the
//! base image made with debootstrap); the image itself is built here, once per binary (Docker's
//! layer cache makes the other builds instant), under a lock shared by the test processes.
//! Figures the checklist asks for (seconds to healthy, seconds without service, peak memory)
//! are printed; `scripts/capacity.sh` does the measuring.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::mix::Mix;
use crate::support::{BIN, children_of, free_port, get, poll_until, proc_status};

/// The test image's tag.
const IMAGE: &str = "ferrocorn:e2e";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The docker client matching the daemon `scripts/docker_setup.sh` started.
fn docker_bin() -> String {
    std::env::var("FERROCORN_DOCKER").unwrap_or_else(|_| "/usr/bin/docker".to_owned())
}

fn docker(args: &[&str]) -> Output {
    Command::new(docker_bin())
        .args(args)
        .output()
        .expect("run docker")
}

/// `docker args…`, which must succeed; its standard output, trimmed.
fn docker_ok(args: &[&str]) -> String {
    let output = docker(args);
    assert!(
        output.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// Build the image around this test build's binary, once per test process, under a lock that
/// the other test processes wait on.
fn image() -> &'static str {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let staged = repo().join("target/docker");
        std::fs::create_dir_all(&staged).expect("target/docker");
        let script = format!(
            "set -e; cp {bin} {dir}/ferrocorn.$$; mv {dir}/ferrocorn.$$ {dir}/ferrocorn; \
             {docker} build -q -f deploy/Dockerfile --target prebuilt -t {IMAGE} . >/dev/null",
            bin = BIN,
            dir = staged.display(),
            docker = docker_bin(),
        );
        let output = Command::new("flock")
            .arg(std::env::temp_dir().join("ferrocorn-e2e-image.lock"))
            .args(["sh", "-c", &script])
            .current_dir(repo())
            .output()
            .expect("flock sh");
        assert!(
            output.status.success(),
            "building the image: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    });
    IMAGE
}

/// A unique name for this test's container and volume.
fn unique(what: &str) -> String {
    format!(
        "ferrocorn-e2e-{what}-{}-{}",
        std::process::id(),
        free_port()
    )
}

/// A container of the test image, removed (with its volume) when dropped.
struct Container {
    name: String,
    volume: String,
    addr: SocketAddr,
    started: Instant,
}

/// How a container is run: the old stack's limits unless a test says otherwise.
struct Run {
    data: PathBuf,
    cpus: &'static str,
    memory: &'static str,
    env: Vec<(String, String)>,
    /// What holds /var/cache/ferrocorn (`None`: the test's own named volume).
    cache: Option<Vec<String>>,
    extra: Vec<String>,
}

impl Default for Run {
    fn default() -> Self {
        Self {
            data: repo().join("data/sample"),
            cpus: "2",
            memory: "2g",
            env: Vec::new(),
            cache: None,
            extra: Vec::new(),
        }
    }
}

impl Run {
    fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    fn arg(mut self, arg: &str) -> Self {
        self.extra.push(arg.to_owned());
        self
    }

    /// Hold /var/cache/ferrocorn with `args` (a `-v` or `--tmpfs` of the test's) instead.
    fn cache(mut self, args: &[&str]) -> Self {
        self.cache = Some(args.iter().map(|a| a.to_string()).collect());
        self
    }

    fn start(self, what: &str) -> Container {
        let image = image();
        let name = unique(what);
        let volume = format!("{name}-cache");
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let mut args: Vec<String> = [
            "run",
            "-d",
            "--name",
            &name,
            "--network",
            "host",
            "--cpus",
            self.cpus,
            "--memory",
            self.memory,
            "--read-only",
            "--tmpfs",
            "/tmp",
            "--stop-timeout",
            "45",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        match self.cache {
            Some(cache) => args.extend(cache),
            None => {
                args.push("-v".into());
                args.push(format!("{volume}:/var/cache/ferrocorn"));
            }
        }
        args.push("-v".into());
        args.push(format!("{}:/data:ro", self.data.display()));
        args.push("-e".into());
        args.push(format!("FERROCORN_BIND={addr}"));
        for (key, value) in &self.env {
            args.push("-e".into());
            args.push(format!("{key}={value}"));
        }
        args.extend(self.extra);
        args.push(image.to_owned());
        let started = Instant::now();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        docker_ok(&args);
        Container {
            name,
            volume,
            addr,
            started,
        }
    }
}

impl Container {
    fn inspect(&self, format: &str) -> String {
        docker_ok(&["inspect", "-f", format, &self.name])
    }

    fn logs(&self) -> String {
        let output = docker(&["logs", &self.name]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    }

    /// The host's pid of the container's PID 1 (0 when it is not running).
    fn pid(&self) -> i32 {
        self.inspect("{{.State.Pid}}").parse().unwrap_or(0)
    }

    /// Wait for Docker's own health check to say healthy; returns the time since `since`.
    fn wait_healthy(&self, since: Instant, deadline: Duration) -> Duration {
        poll_until(&format!("{} healthy", self.name), deadline, || {
            match self.inspect("{{.State.Health.Status}}").as_str() {
                "healthy" => Some(since.elapsed()),
                "unhealthy" => panic!("unhealthy:\n{}", self.logs()),
                _ => None,
            }
        })
    }

    /// Peak memory of the container's cgroup, from the cgroup itself: v1's
    /// `memory.max_usage_in_bytes`, or v2's `memory.peak`.
    fn memory_peak(&self) -> Option<u64> {
        let cgroup = std::fs::read_to_string(format!("/proc/{}/cgroup", self.pid())).ok()?;
        let root = Path::new("/sys/fs/cgroup");
        let v1 = cgroup
            .lines()
            .find_map(|l| l.split_once(":memory:").map(|(_, path)| path))
            .map(|path| {
                root.join("memory")
                    .join(path.trim_start_matches('/'))
                    .join("memory.max_usage_in_bytes")
            });
        let v2 = cgroup
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .map(|path| root.join(path.trim_start_matches('/')).join("memory.peak"));
        [v1, v2]
            .into_iter()
            .flatten()
            .find_map(|file| std::fs::read_to_string(file).ok()?.trim().parse().ok())
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- {} logs ----\n{}", self.name, self.logs());
        }
        let _ = docker(&["rm", "-f", "-v", &self.name]);
        let _ = docker(&["volume", "rm", "-f", &self.volume]);
    }
}

#[test]
fn container_is_healthy_in_the_start_period_as_pid_1_sized_from_its_cgroup() {
    let container = Run::default().start("healthy");
    let healthy = container.wait_healthy(container.started, Duration::from_secs(40));
    println!(
        "container: healthy {:.1} s after docker run (the old stack's start period: 40 s)",
        healthy.as_secs_f64()
    );
    // PID 1 is the master, as a non-root user, with a worker per CPU of the quota.
    let master = container.pid();
    let comm = std::fs::read_to_string(format!("/proc/{master}/comm")).unwrap_or_default();
    assert_eq!(comm.trim(), "ferrocorn");
    assert_eq!(
        docker_ok(&["exec", &container.name, "cat", "/proc/1/comm"]),
        "ferrocorn"
    );
    let uid = proc_status(master, "Uid").unwrap_or_default();
    assert!(!uid.starts_with("0\t") && !uid.starts_with("0 "), "{uid}");
    assert_eq!(children_of(master).len(), 2, "a worker per CPU");
    // --print-config inside says so, with the origin of each value.
    let printed = docker_ok(&["exec", &container.name, "ferrocorn", "--print-config"]);
    let line = |key: &str| {
        printed
            .lines()
            .find(|l| l.split_whitespace().next() == Some(key))
            .unwrap_or_else(|| panic!("{key} in\n{printed}"))
            .to_owned()
    };
    assert!(
        line("workers").starts_with("workers = 2 ") && line("workers").contains("cgroup"),
        "{printed}"
    );
    let memory = line("duckdb_memory_limit");
    assert!(memory.contains("cgroup"), "{memory}");
    let answer = get(container.addr, "/v1/datasets").expect("datasets");
    assert_eq!(answer.status, 200);
}

#[test]
fn docker_stop_under_load_answers_every_accepted_request_and_exits_zero() {
    let container = Run::default().start("stop");
    container.wait_healthy(container.started, Duration::from_secs(40));
    let mix = Mix::start(container.addr, 30);
    poll_until("the users answered", Duration::from_secs(20), || {
        let answer = get(container.addr, "/metrics").ok()?;
        let text = String::from_utf8_lossy(&answer.body).into_owned();
        text.lines()
            .filter(|l| l.starts_with("ferrocorn_requests_total"))
            .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
            .any(|n| n > 3000.0)
            .then_some(())
    });
    let stopping = Instant::now();
    docker_ok(&["stop", "-t", "45", &container.name]);
    let took = stopping.elapsed();
    let report = mix.stop();
    println!(
        "container: docker stop under 30 users took {:.2} s; {}",
        took.as_secs_f64(),
        report.summary()
    );
    assert_eq!(container.inspect("{{.State.ExitCode}}"), "0");
    assert_eq!(container.inspect("{{.State.OOMKilled}}"), "false");
    assert!(took < Duration::from_secs(45), "within the grace period");
    assert!(report.ok > 0 && report.refused > 0, "{}", report.summary());
    assert!(
        report.failures.is_empty(),
        "{}:\n{}",
        report.summary(),
        report.failure_sample()
    );
}

#[test]
fn failover_sigkill_of_pid_1_restarts_the_container_reusing_its_snapshots() {
    let container = Run::default()
        .arg("--restart")
        .arg("unless-stopped")
        .start("failover");
    container.wait_healthy(container.started, Duration::from_secs(40));
    poll_until("every snapshot built", Duration::from_secs(60), || {
        let list = get(container.addr, "/v1/datasets").ok()?.json();
        let datasets = list["datasets"].as_array()?.clone();
        (!datasets.is_empty() && datasets.iter().all(|d| d["storage"] == "snapshot")).then_some(())
    });
    let built = container.logs().matches("snapshot built").count();
    assert!(built > 0, "{}", container.logs());
    let mix = Mix::start(container.addr, 10);
    poll_until("the users answered", Duration::from_secs(20), || {
        get(container.addr, "/healthz").ok().map(|_| ())
    });
    let master = container.pid();
    let killed = Instant::now();
    kill(Pid::from_raw(master), Signal::SIGKILL).expect("kill PID 1 from the host");
    // Without service from the kill until a new master's worker answers.
    let back = poll_until("service back", Duration::from_secs(60), || {
        let answer = get(container.addr, "/readyz").ok()?;
        (answer.status == 200 && container.pid() != master && container.pid() != 0)
            .then(|| killed.elapsed())
    });
    let healthy = container.wait_healthy(killed, Duration::from_secs(60));
    let report = mix.stop();
    println!(
        "container: failover after SIGKILL of PID 1: {:.2} s without service, healthy again \
         after {:.1} s; {}",
        back.as_secs_f64(),
        healthy.as_secs_f64(),
        report.summary()
    );
    assert_eq!(container.inspect("{{.RestartCount}}"), "1");
    // The snapshots on the named volume serve again: nothing was rebuilt.
    let list = get(container.addr, "/v1/datasets")
        .expect("datasets")
        .json();
    for dataset in list["datasets"].as_array().expect("datasets") {
        assert_eq!(dataset["storage"], "snapshot", "{dataset}");
    }
    assert_eq!(
        container.logs().matches("snapshot built").count(),
        built,
        "no snapshot was built again:\n{}",
        container.logs()
    );
}

#[test]
fn a_killed_or_stopped_worker_is_replaced_inside_the_running_container() {
    let container = Run::default()
        .env("FERROCORN_TIMEOUT", "3")
        .start("workers");
    container.wait_healthy(container.started, Duration::from_secs(40));
    let master = container.pid();
    let started_at = container.inspect("{{.State.StartedAt}}");
    let mut replaced = BTreeMap::new();
    for signal in [Signal::SIGKILL, Signal::SIGSTOP] {
        let workers = children_of(master);
        let victim = *workers.iter().next().expect("a worker");
        let sent = Instant::now();
        kill(Pid::from_raw(victim), signal).expect("signal a worker");
        poll_until("a replacement", Duration::from_secs(30), || {
            let now = children_of(master);
            (now.len() == 2 && !now.contains(&victim)).then_some(())
        });
        poll_until("the pool answers", Duration::from_secs(30), || {
            (get(container.addr, "/readyz").ok()?.status == 200).then_some(())
        });
        replaced.insert(format!("{signal}"), sent.elapsed());
    }
    println!("container: workers replaced after {replaced:?}");
    assert_eq!(container.pid(), master, "the master stayed");
    assert_eq!(container.inspect("{{.RestartCount}}"), "0");
    assert_eq!(container.inspect("{{.State.StartedAt}}"), started_at);
    let logs = container.logs();
    assert!(logs.contains("WORKER TIMEOUT"), "{logs}");
}

/// TPC-H Q1 (scripts/tpch/q01.sql) as one line of JSON.
fn q1_body() -> String {
    let sql: String = std::fs::read_to_string(repo().join("scripts/tpch/q01.sql"))
        .expect("q01.sql")
        .lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join(" ");
    serde_json::json!({ "sql": sql }).to_string()
}

#[test]
fn a_hundred_concurrent_tpch_q1_on_sf1_are_all_answered_within_the_memory_limit() {
    let data = repo().join("data/tpch-sf1");
    assert!(
        data.join("lineitem.parquet").exists(),
        "TPC-H SF1 in data/tpch-sf1 (scripts/test.sh generates it)"
    );
    let container = Run {
        data,
        ..Run::default()
    }
    .start("q1");
    container.wait_healthy(container.started, Duration::from_secs(40));
    let body = q1_body();
    let started = Instant::now();
    let clients: Vec<_> = (0..100)
        .map(|_| {
            let (addr, body) = (container.addr, body.clone());
            std::thread::spawn(move || {
                crate::support::post_raw(
                    addr,
                    "/v1/query",
                    "application/json",
                    body.as_bytes(),
                    &[("Cache-Control", "no-cache")],
                )
            })
        })
        .collect();
    let mut statuses = BTreeMap::new();
    for client in clients {
        let status = match client.join().expect("client") {
            Ok(response) => response.status.to_string(),
            Err(e) => format!("{e}"),
        };
        *statuses.entry(status).or_insert(0) += 1;
    }
    let wall = started.elapsed();
    let peak = container.memory_peak();
    println!(
        "container: 100 concurrent Q1 on SF1 in {:.1} s: {statuses:?}; peak memory {} MiB of 2048",
        wall.as_secs_f64(),
        peak.map_or("?".to_owned(), |b| (b >> 20).to_string())
    );
    assert_eq!(statuses.get("200"), Some(&100), "{statuses:?}");
    assert_eq!(container.inspect("{{.State.OOMKilled}}"), "false");
    assert_eq!(container.inspect("{{.State.Running}}"), "true");
    let peak = peak.expect("the cgroup's memory.peak");
    assert!(peak < 2 << 30, "peak {peak} bytes");
}

impl Container {
    /// Wait for the container to exit; its exit code and the last line it logged.
    fn wait_exit(&self) -> (String, String) {
        poll_until(
            &format!("{} to exit", self.name),
            Duration::from_secs(30),
            || (self.inspect("{{.State.Status}}") == "exited").then_some(()),
        );
        let logs = self.logs();
        let last = logs.lines().last().unwrap_or_default().to_owned();
        (self.inspect("{{.State.ExitCode}}"), last)
    }
}

/// Bad deployments stop at once with one line that says why and a documented exit code, or
/// serve what they can with the reason where the operator looks.
#[test]
fn a_bad_deployment_says_why_in_one_line_and_never_crashes_in_a_loop() {
    // No data directory: 64, naming the key.
    let missing = Run::default()
        .env("FERROCORN_DATA_DIR", "/no/such/dir")
        .start("nodata");
    let (code, line) = missing.wait_exit();
    assert_eq!(code, "64");
    assert!(
        line.contains("data_dir") && line.contains("/no/such/dir"),
        "{line}"
    );

    // A cache volume it cannot write: 73.
    let volume = unique("rocache");
    docker_ok(&["volume", "create", &volume]);
    let read_only = Run::default()
        .cache(&["-v", &format!("{volume}:/var/cache/ferrocorn:ro")])
        .start("rocache");
    let (code, line) = read_only.wait_exit();
    drop(read_only);
    let _ = docker(&["volume", "rm", "-f", &volume]);
    assert_eq!(code, "73");
    assert!(
        line.contains("/var/cache/ferrocorn") && line.contains("Read-only"),
        "{line}"
    );

    // Less memory than one worker needs: 64, before a worker is forked.
    let small = Run {
        memory: "64m",
        ..Run::default()
    }
    .start("smallmem");
    let (code, line) = small.wait_exit();
    assert_eq!(code, "64");
    assert!(
        line.contains("memory limit (64 MiB)") && line.contains("workers"),
        "{line}"
    );
    assert!(!small.logs().contains("worker spawned"), "{}", small.logs());

    // A file it cannot read makes its own dataset unavailable, with the reason; the rest serve.
    let data = tempfile::tempdir().expect("tempdir");
    for name in ["orders.parquet", "customers.parquet"] {
        std::fs::copy(
            repo().join("data/sample").join(name),
            data.path().join(name),
        )
        .expect("copy");
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        data.path().join("orders.parquet"),
        std::fs::Permissions::from_mode(0o000),
    )
    .expect("chmod");
    std::fs::set_permissions(data.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let unreadable = Run {
        data: data.path().to_owned(),
        ..Run::default()
    }
    .start("unreadable");
    unreadable.wait_healthy(unreadable.started, Duration::from_secs(40));
    let orders = get(unreadable.addr, "/v1/datasets/orders")
        .expect("orders")
        .json();
    assert_eq!(orders["available"], false);
    assert!(
        orders["error"]
            .as_str()
            .is_some_and(|e| e.contains("Permission denied")),
        "{orders}"
    );
    let customers = get(
        unreadable.addr,
        "/v1/query?sql=SELECT%20count(*)%20FROM%20customers",
    )
    .expect("query");
    assert_eq!(customers.status, 200);

    // A full cache: the snapshots cannot be written; the datasets serve from Parquet, and
    // /v1/datasets says why.
    let uid = docker_ok(&["run", "--rm", "--entrypoint", "id", image(), "-u"]);
    let full = Run::default()
        .cache(&[
            "--tmpfs",
            &format!("/var/cache/ferrocorn:size=16k,uid={uid}"),
        ])
        .start("fullcache");
    full.wait_healthy(full.started, Duration::from_secs(40));
    let orders = poll_until("the failed build reported", Duration::from_secs(30), || {
        let orders = get(full.addr, "/v1/datasets/orders").ok()?.json();
        orders["snapshot_error"].is_string().then_some(orders)
    });
    assert!(
        orders["snapshot_error"]
            .as_str()
            .is_some_and(|e| e.contains("No space left on device")),
        "{orders}"
    );
    assert_eq!(orders["storage"], "parquet");
    let answer = get(full.addr, "/v1/query?sql=SELECT%20count(*)%20FROM%20orders").expect("query");
    assert_eq!(answer.status, 200);
    assert!(
        !full.logs().contains("Unknown error code"),
        "{}",
        full.logs()
    );
}

/// `deploy/docker-compose.yml` itself, run by Debian's Compose (1.29, `--compatibility` for the
/// resource limits), with the test override (the image built here, loopback).
#[test]
fn the_compose_file_runs_the_pool_with_the_old_stacks_limits() {
    let image = image();
    let project = unique("compose");
    let bind = format!("127.0.0.1:{}", free_port());
    let compose = |args: &[&str]| {
        Command::new("docker-compose")
            .args([
                "-p",
                &project,
                "-f",
                "deploy/docker-compose.yml",
                "-f",
                "deploy/docker-compose.test.yml",
                "--compatibility",
            ])
            .args(args)
            .current_dir(repo())
            .env("FERROCORN_BIND", &bind)
            .env("FERROCORN_DATA", repo().join("data/sample"))
            .env("FERROCORN_TEST_IMAGE", image)
            .env("FERROCORN_TEST_CACHE_VOLUME", format!("{project}-cache"))
            .env(
                "PATH",
                format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default()),
            )
            .output()
            .expect("docker-compose")
    };
    struct Down<F: Fn(&[&str]) -> Output>(F);
    impl<F: Fn(&[&str]) -> Output> Drop for Down<F> {
        fn drop(&mut self) {
            let _ = (self.0)(&["down", "-v", "--timeout", "45"]);
        }
    }
    let down = Down(compose);
    let up = (down.0)(&["up", "-d", "--no-build"]);
    assert!(
        up.status.success(),
        "docker-compose up: {}",
        String::from_utf8_lossy(&up.stderr)
    );
    let ps = (down.0)(&["ps", "-q"]);
    let id = String::from_utf8_lossy(&ps.stdout).trim().to_owned();
    assert!(!id.is_empty(), "{}", String::from_utf8_lossy(&ps.stderr));
    let started = Instant::now();
    let healthy = poll_until(
        "the compose service healthy",
        Duration::from_secs(40),
        || {
            (docker_ok(&["inspect", "-f", "{{.State.Health.Status}}", &id]) == "healthy")
                .then(|| started.elapsed())
        },
    );
    println!(
        "container: the compose service was healthy {:.1} s after up",
        healthy.as_secs_f64()
    );
    let limits = docker_ok(&[
        "inspect",
        "-f",
        "{{.HostConfig.NanoCpus}} {{.HostConfig.Memory}} {{.HostConfig.NetworkMode}}",
        &id,
    ]);
    assert_eq!(limits, format!("2000000000 {} host", 2u64 << 30));
    let addr: SocketAddr = bind.parse().expect("addr");
    let list = get(addr, "/v1/datasets").expect("datasets").json();
    assert!(list["datasets"].as_array().is_some_and(|d| !d.is_empty()));
    let stop = (down.0)(&["stop", "--timeout", "45"]);
    assert!(stop.status.success());
    assert_eq!(
        docker_ok(&["inspect", "-f", "{{.State.ExitCode}}", &id]),
        "0"
    );
}
