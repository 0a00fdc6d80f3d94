//! The command line: configuration checking and printing, and start-up failures.

use std::net::TcpListener;
use std::time::Duration;

use crate::support::{Setup, get};

#[test]
fn check_config_accepts_a_valid_configuration() {
    let (status, _, stderr) = Setup::new().arg("--check-config").run_to_exit();
    assert_eq!(status.code(), Some(0), "{stderr}");
}

#[test]
fn check_config_rejects_an_unknown_key_naming_it() {
    let (status, _, stderr) = Setup::new()
        .key("wrokers", "3")
        .arg("--check-config")
        .run_to_exit();
    assert_eq!(status.code(), Some(64));
    assert!(stderr.contains("wrokers"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
}

#[test]
fn check_config_rejects_bad_values_naming_the_key() {
    for (key, value) in [
        ("workers", "0"),
        ("workers", "\"four\""),
        ("timeout", "-1"),
        ("bind", "[\"nowhere\"]"),
        ("duckdb_memory_limit", "\"lots\""),
        ("loglevel", "\"chatty\""),
    ] {
        let (status, _, stderr) = Setup::new()
            .key(key, value)
            .arg("--check-config")
            .run_to_exit();
        assert_eq!(status.code(), Some(64), "{key} = {value}: {stderr}");
        assert!(stderr.contains(key), "{key} = {value}: {stderr}");
    }
}

#[test]
fn bad_environment_and_flag_values_exit_64() {
    let (status, _, stderr) = Setup::new()
        .env("WORKERS", "many")
        .arg("--check-config")
        .run_to_exit();
    assert_eq!(status.code(), Some(64));
    assert!(stderr.contains("WORKERS"), "{stderr}");
    let (status, _, _) = Setup::new()
        .arg("--workers")
        .arg("x")
        .arg("--check-config")
        .run_to_exit();
    assert_eq!(status.code(), Some(64));
}

#[test]
fn missing_data_dir_is_a_config_error() {
    let setup = Setup::new();
    let missing = setup.path("nope");
    let (status, _, stderr) = setup
        .key("data_dir", &crate::support::toml_str(&missing))
        .run_to_exit();
    assert_eq!(status.code(), Some(64));
    assert!(stderr.contains("data_dir"), "{stderr}");
}

#[test]
fn print_config_shows_each_value_with_its_origin() {
    let (status, stdout, stderr) = Setup::new()
        .key("keepalive", "7")
        .env("WORKERS", "3")
        .env("FERROCORN_MAX_REQUESTS", "500")
        .arg("--timeout")
        .arg("9")
        .arg("--print-config")
        .run_to_exit();
    assert_eq!(status.code(), Some(0), "{stderr}");
    let line = |key: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(&format!("{key} = ")))
            .unwrap_or_else(|| panic!("{key} in {stdout}"))
            .to_owned()
    };
    assert!(line("keepalive").starts_with("keepalive = 7  # file "));
    assert_eq!(line("workers"), "workers = 3  # env WORKERS");
    assert_eq!(
        line("max_requests"),
        "max_requests = 500  # env FERROCORN_MAX_REQUESTS"
    );
    assert_eq!(line("timeout"), "timeout = 9  # flag --timeout");
    assert_eq!(line("graceful_timeout"), "graceful_timeout = 30  # default");
}

#[test]
fn flags_beat_environment_beats_file() {
    let (_, stdout, _) = Setup::new()
        .key("workers", "2")
        .env("WORKERS", "3")
        .arg("--workers")
        .arg("5")
        .arg("--print-config")
        .run_to_exit();
    assert!(stdout.contains("workers = 5  # flag --workers"), "{stdout}");
}

#[test]
fn port_in_use_is_a_one_line_error_with_exit_69() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let (status, _, stderr) = Setup::new()
        .key("bind", &format!("[\"{addr}\"]"))
        .key("reuse_port", "false")
        .run_to_exit();
    assert_eq!(status.code(), Some(69), "{stderr}");
    assert!(
        stderr.contains(&addr.to_string()) && stderr.contains("in use"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
}

#[test]
fn port_held_by_another_reuseport_owner_is_refused() {
    // A listener without SO_REUSEPORT blocks the port even for ferrocorn's reuse_port sockets.
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let (status, _, stderr) = Setup::new()
        .key("bind", &format!("[\"{addr}\"]"))
        .run_to_exit();
    assert_eq!(status.code(), Some(69), "{stderr}");
}

/// A free TCP port on loopback (bound, read and released; the test binds it again at once).
fn free_port() -> std::net::SocketAddr {
    let probe = TcpListener::bind("127.0.0.1:0").expect("bind");
    probe.local_addr().expect("addr")
}

#[test]
fn a_second_pool_on_the_same_address_or_cache_is_refused_and_the_first_keeps_its_traffic() {
    let addr = free_port();
    let bind = format!("[\"{addr}\"]");
    let first = Setup::new()
        .with_sample_data()
        .key("bind", &bind)
        .key("workers", "4")
        .start();
    let first_workers = first.workers();
    assert_eq!(first_workers.len(), 4);

    // Spawned, not run to exit: a pool that is wrongly not refused must not hang the test.
    let refused = |setup: Setup| {
        let mut second = setup.spawn();
        let status = second.wait_exit(Duration::from_secs(30));
        (status, second.log())
    };
    // The same address with another cache directory: the SO_REUSEPORT group is detected.
    let (status, stderr) = refused(Setup::new().key("bind", &bind));
    assert_eq!(status.code(), Some(69), "{stderr}");
    assert!(
        stderr.contains(&addr.to_string()) && stderr.contains("another ferrocorn pool"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");

    // Another address with the first pool's cache directory: the lock is held.
    let (status, stderr) = refused(Setup::new().key("cache_dir", &first.setup.keys["cache_dir"]));
    assert_eq!(status.code(), Some(69), "{stderr}");
    assert!(
        stderr.contains(&format!("pid {}", first.pid())) && stderr.contains("cache directory"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");

    // Every request still reaches the first pool's workers.
    let answered: Vec<i32> = (0..40)
        .map(|_| {
            let response = get(addr, "/healthz").expect("healthz");
            assert_eq!(response.status, 200);
            response.json()["pid"].as_i64().expect("pid") as i32
        })
        .collect();
    assert!(
        answered.iter().all(|pid| first_workers.contains(pid)),
        "{answered:?} vs {first_workers:?}"
    );
}

#[test]
fn healthcheck_is_0_while_the_pool_serves_and_1_once_it_is_gone() {
    let addr = free_port();
    let setup = Setup::new().key("bind", &format!("[\"{addr}\"]"));
    let config = setup.config_path();
    let mut server = setup.start();
    let check = || {
        std::process::Command::new(crate::support::BIN)
            .args([
                "--config",
                &config.display().to_string(),
                "healthcheck",
                "--timeout",
                "5",
            ])
            .output()
            .expect("ferrocorn healthcheck")
    };
    let healthy = check();
    assert_eq!(
        healthy.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&healthy.stderr)
    );
    server.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(server.wait_exit(Duration::from_secs(35)).code(), Some(0));
    let gone = check();
    assert_eq!(gone.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&gone.stderr);
    assert!(stderr.contains(&addr.to_string()), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}
