//! Chaos under a 30-user BI mix (issue 19): workers killed, stopped, recycled, rolled and
//! resized, and the master killed, while the users keep sending.
//!
//! Each scenario runs for `FERROCORN_CHAOS_SECONDS` (6 by default: the short form the suite
//! runs; `scripts/chaos.sh` runs the long form) and prints what the users saw: requests sent,
//! answered, failed, reset and refused. The rules:
//! - graceful events (HUP, recycling, TTIN/TTOU) fail nothing;
//! - a SIGKILL (or a SIGSTOP that ends in the heartbeat's SIGABRT) may fail only the requests in
//!   flight on the worker that died: each failure was sent to that worker before it died;
//! - after SIGKILL of the master, its workers drain what they had read and exit, and nothing
//!   holds the port: a new pool binds it at once and serves.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::mix::{Mix, Report};
use crate::support::{Server, Setup, get, poll_until, proc_status};

const USERS: usize = 30;

/// How long each scenario's chaos lasts.
fn chaos_time() -> Duration {
    let seconds = std::env::var("FERROCORN_CHAOS_SECONDS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(6)
        .clamp(1, 3600);
    Duration::from_secs(seconds)
}

fn pool(keys: &[(&str, &str)]) -> Server {
    let mut setup = Setup::new()
        .with_sample_data()
        .key("workers", "2")
        .key("graceful_timeout", "10");
    for (key, value) in keys {
        setup = setup.key(key, value);
    }
    setup.start()
}

/// Run the mix against `server` while `chaos` is called every `every` (given the moment the
/// scenario started); returns what the users saw.
fn under_load(
    name: &str,
    server: &Server,
    every: Duration,
    mut chaos: impl FnMut(&Server),
) -> Report {
    let mix = Mix::start(server.addr(), USERS);
    let started = Instant::now();
    let mut next = started + every;
    while started.elapsed() < chaos_time() {
        // The scenario's own cadence (a pace, not a wait for readiness).
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        next += every;
        chaos(server);
    }
    let report = mix.stop();
    println!("chaos {name}: {}", report.summary());
    report
}

/// The pool serves again with every slot filled by a ready worker.
fn assert_recovers(server: &Server, workers: usize) {
    poll_until(
        "the pool to serve every slot",
        Duration::from_secs(60),
        || {
            let live = server.workers();
            let ready = live
                .iter()
                .filter(|pid| proc_status(**pid, "State").is_some_and(|s| !s.starts_with('T')))
                .count();
            (live.len() == workers && ready == workers).then_some(())
        },
    );
    assert_eq!(get(server.addr(), "/healthz").expect("healthz").status, 200);
}

fn assert_no_failure(report: &Report) {
    assert!(report.ok > 0, "{}", report.summary());
    assert!(
        report.failures.is_empty() && report.refused == 0,
        "{}:\n{}",
        report.summary(),
        report.failure_sample()
    );
}

/// The moment `pid` is gone (a zombie or reaped): requests sent to it before then were in
/// flight when it died.
fn wait_death(pid: i32) -> Instant {
    poll_until("the worker to die", Duration::from_secs(30), || {
        proc_status(pid, "State")
            .is_none_or(|s| s.starts_with('Z') || s.starts_with('X'))
            .then(Instant::now)
    })
}

/// Every failure is a request that was in flight on a worker that died: sent to it (or, on a
/// connection not yet identified, sent within a second of a death) before it died.
fn assert_failures_in_flight_on(report: &Report, deaths: &BTreeMap<i32, Instant>) {
    for failure in &report.failures {
        let in_flight = match deaths.get(&failure.pid) {
            Some(died) => failure.sent <= *died,
            None if failure.pid == 0 => deaths.values().any(|died| {
                failure.sent <= *died && died.duration_since(failure.sent) < Duration::from_secs(1)
            }),
            None => false,
        };
        assert!(
            in_flight,
            "a failure not in flight on a killed worker: {failure:?}; {}",
            report.summary()
        );
    }
    assert!(
        report.refused == 0,
        "the listeners stay open: {}",
        report.summary()
    );
}

fn random_worker(server: &Server, seed: &mut u64) -> Option<i32> {
    let workers: Vec<i32> = server.workers().into_iter().collect();
    *seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
    (!workers.is_empty()).then(|| workers[(*seed >> 33) as usize % workers.len()])
}

#[test]
fn chaos_sigkill_of_a_random_worker_every_two_seconds_fails_only_its_requests_in_flight() {
    let server = pool(&[]);
    let mut deaths = BTreeMap::new();
    let mut seed = 7;
    let report = under_load(
        "sigkill-worker",
        &server,
        Duration::from_secs(2),
        |server| {
            if let Some(pid) = random_worker(server, &mut seed) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                deaths.insert(pid, wait_death(pid));
            }
        },
    );
    assert!(!deaths.is_empty() && report.ok > 0, "{}", report.summary());
    assert_failures_in_flight_on(&report, &deaths);
    assert_recovers(&server, 2);
}

#[test]
fn chaos_sigstop_of_a_worker_ends_in_its_replacement_and_fails_only_its_requests() {
    let server = pool(&[("timeout", "3")]);
    let mut deaths = BTreeMap::new();
    let mut stopped = None;
    let report = under_load(
        "sigstop-worker",
        &server,
        Duration::from_secs(1),
        |server| {
            if stopped.is_none() {
                let pid = *server.workers().iter().next().expect("a worker");
                let _ = kill(Pid::from_raw(pid), Signal::SIGSTOP);
                stopped = Some(pid);
                // The master aborts it once its heartbeat is older than `timeout`.
                deaths.insert(pid, wait_death(pid));
            }
        },
    );
    let stopped = stopped.expect("a worker was stopped");
    assert!(
        server.count(&["WORKER TIMEOUT", &format!("pid={stopped}")]) == 1,
        "{}",
        server.log()
    );
    assert_failures_in_flight_on(&report, &deaths);
    assert_recovers(&server, 2);
}

#[test]
fn chaos_hup_every_five_seconds_fails_nothing() {
    let server = pool(&[]);
    let report = under_load("hup", &server, Duration::from_secs(5), |server| {
        server.signal(Signal::SIGHUP);
    });
    assert_no_failure(&report);
    assert!(server.count(&["reloading: rolling every worker"]) >= 1);
    assert_recovers(&server, 2);
}

#[test]
fn chaos_recycling_every_fifty_requests_fails_nothing() {
    let server = pool(&[
        ("max_requests", "50"),
        ("max_requests_jitter", "10"),
        ("recycle_interval", "0"),
    ]);
    let report = under_load("recycle-50", &server, Duration::from_secs(1), |_| {});
    assert_no_failure(&report);
    assert!(
        server.count(&["worker ready"]) > 2,
        "workers were recycled:\n{}",
        server.log()
    );
    assert_recovers(&server, 2);
}

#[test]
fn chaos_ttin_and_ttou_back_and_forth_fail_nothing() {
    let server = pool(&[]);
    let mut grow = true;
    let report = under_load("ttin-ttou", &server, Duration::from_secs(1), |server| {
        server.signal(if grow {
            Signal::SIGTTIN
        } else {
            Signal::SIGTTOU
        });
        grow = !grow;
    });
    assert_no_failure(&report);
    // An odd number of signals leaves one worker more.
    let expected = if grow { 2 } else { 3 };
    assert_recovers(&server, expected);
}

/// With no master, nothing may serve on: the workers (told by the kernel, `PR_SET_PDEATHSIG`)
/// stop accepting, answer what they had read and exit, and the port is free for the next pool.
#[test]
fn chaos_sigkill_of_the_master_leaves_no_orphan_serving_or_holding_the_port() {
    let mut server = pool(&[]);
    let addr = server.addr();
    let workers = server.workers();
    let mix = Mix::start(addr, USERS);
    poll_until("the mix answered", Duration::from_secs(20), || {
        (crate::support::scrape(addr).sum("ferrocorn_requests_total", &[]) > 100.0).then_some(())
    });
    server.signal(Signal::SIGKILL);
    let killed = Instant::now();
    let _ = server.wait_exit(Duration::from_secs(10));
    for pid in &workers {
        poll_until(
            "every orphaned worker to exit",
            Duration::from_secs(15),
            || {
                proc_status(*pid, "State")
                    .is_none_or(|s| s.starts_with('Z'))
                    .then_some(())
            },
        );
    }
    let orphans_gone = killed.elapsed();
    let mut report = mix.stop();
    println!(
        "chaos sigkill-master: {}; the orphans were gone {:.2} s after the kill",
        report.summary(),
        orphans_gone.as_secs_f64()
    );
    assert!(report.ok > 0 && report.refused > 0, "{}", report.summary());
    // What the orphans had read was answered: a failure is a connection the kernel had queued
    // when the last orphan closed the listener (no master is left to hand it to).
    assert!(
        report.failures.iter().all(|f| f.reset),
        "no error status: {:?}",
        report.failures
    );
    assert!(report.latency(1.0) < Duration::from_secs(30));
    // Nothing holds the port: a new pool binds the same address and serves.
    let port = addr.port().to_string();
    let next = Setup::new()
        .with_sample_data()
        .arg("--bind")
        .arg(&format!("127.0.0.1:{port}"))
        .start();
    assert_eq!(next.addr(), addr);
    let answer = get(addr, "/healthz").expect("the new pool answers");
    let pid = answer.json()["pid"].as_i64().unwrap_or_default() as i32;
    assert!(next.workers().contains(&pid), "answered by the new pool");
}
