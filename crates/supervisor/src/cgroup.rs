//! The resources the pool's control group grants: a CPU quota and a memory limit.
//!
//! Inside a container (Docker's `--cpus` and `--memory`, compose's `deploy.resources.limits`,
//! systemd's `CPUQuota=` and `MemoryMax=`) the machine's core count and memory say nothing of
//! what the pool may use. When the operator has not set them, the defaults of `workers`,
//! `duckdb_threads` and `duckdb_memory_limit` follow the group instead (see
//! [`crate::keys`]): a worker per granted CPU, and three quarters of the group's memory for
//! DuckDB, the rest for the workers' own memory and the page cache the group is charged for.
//! Both cgroup v2 (`cpu.max`, `memory.max`) and v1 (`cpu.cfs_quota_us`, `memory.limit_in_bytes`)
//! are read.

use std::path::{Path, PathBuf};

/// What the group grants; `None` where it sets no limit.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Limits {
    /// CPUs the quota is worth (quota / period).
    pub cpus: Option<f64>,
    pub memory_bytes: Option<u64>,
}

/// The least memory of the group a worker needs: its process (the binary, tokio, DuckDB's
/// caches; about 60 MiB resident when idle) and a useful DuckDB share.
pub const MIN_WORKER_MEMORY: u64 = 128 << 20;

/// A v1 memory limit at or above this is "no limit" (the kernel reports the largest page-aligned
/// value).
const V1_UNLIMITED: u64 = 1 << 62;

impl Limits {
    /// The limits of this process's group, read once per process (the defaults of several keys
    /// and the configuration's CPU count all ask, at every load and reload).
    pub fn detect() -> Self {
        static DETECTED: std::sync::OnceLock<Limits> = std::sync::OnceLock::new();
        *DETECTED.get_or_init(|| {
            let membership = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
            Self::read(&membership, Path::new("/sys/fs/cgroup"))
        })
    }

    /// The limits for `membership` (the text of `/proc/self/cgroup`) under the hierarchy mounted
    /// at `root`. A group's own file is read, else the root's (inside a cgroup namespace the
    /// container's group is the root).
    pub fn read(membership: &str, root: &Path) -> Self {
        let mut limits = Self::default();
        for line in membership.lines() {
            let mut fields = line.splitn(3, ':');
            let (Some(_), Some(controllers), Some(path)) =
                (fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            let path = path.trim_start_matches('/');
            if controllers.is_empty() {
                // v2: one unified hierarchy.
                let file = |name: &str| read_in(&root.join(path), root, name);
                limits.cpus = limits
                    .cpus
                    .or_else(|| file("cpu.max").and_then(|t| v2_cpus(&t)));
                limits.memory_bytes = limits
                    .memory_bytes
                    .or_else(|| file("memory.max").and_then(|t| t.trim().parse().ok()));
                continue;
            }
            for controller in controllers.split(',') {
                let dir = root.join(controller);
                let file = |name: &str| read_in(&dir.join(path), &dir, name);
                match controller {
                    "cpu" => {
                        let quota =
                            file("cpu.cfs_quota_us").and_then(|t| t.trim().parse::<i64>().ok());
                        let period =
                            file("cpu.cfs_period_us").and_then(|t| t.trim().parse::<i64>().ok());
                        if let (Some(quota), Some(period)) = (quota, period)
                            && quota > 0
                            && period > 0
                        {
                            limits.cpus = Some(quota as f64 / period as f64);
                        }
                    }
                    "memory" => {
                        limits.memory_bytes = file("memory.limit_in_bytes")
                            .and_then(|t| t.trim().parse::<u64>().ok())
                            .filter(|&b| b < V1_UNLIMITED)
                            .or(limits.memory_bytes);
                    }
                    _ => {}
                }
            }
        }
        limits
    }

    /// Whole CPUs for the pool: the quota rounded up, else the machine's.
    pub fn whole_cpus(&self) -> u32 {
        match self.cpus {
            Some(cpus) => cpus.ceil().max(1.0) as u32,
            None => std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
        }
    }

    /// The default pool size: a worker per granted CPU (at most 16); without a quota, the stack
    /// ferrocorn replaces's 4. Never more workers than the group's memory holds
    /// ([`MIN_WORKER_MEMORY`] each), and at least one (a group too small for it is refused by
    /// [`Self::check_workers`]).
    pub fn default_workers(&self) -> u64 {
        let by_cpu = match self.cpus {
            Some(_) => u64::from(self.whole_cpus()).clamp(1, 16),
            None => 4,
        };
        match self.memory_bytes {
            Some(bytes) => by_cpu.min(bytes / MIN_WORKER_MEMORY).max(1),
            None => by_cpu,
        }
    }

    /// Whether the group's memory holds `workers` workers; `Err` says why not, for the
    /// operator (a container started with too small a `--memory` stops at once with that line
    /// instead of crashing its workers again and again).
    pub fn check_workers(&self, workers: u64) -> Result<(), String> {
        match self.memory_bytes {
            Some(bytes) if bytes < workers * MIN_WORKER_MEMORY => Err(format!(
                "the cgroup's memory limit ({} MiB) is below the {} MiB each of {workers} \
                 worker(s) needs: raise the limit (docker run --memory, MemoryMax=) or run \
                 fewer workers",
                bytes >> 20,
                MIN_WORKER_MEMORY >> 20
            )),
            _ => Ok(()),
        }
    }

    /// The default DuckDB memory for the pool: three quarters of the group's memory, else 2 GB.
    pub fn default_memory_limit(&self) -> String {
        match self.memory_bytes {
            Some(bytes) => format!("{}MiB", (bytes / 4 * 3) >> 20),
            None => "2GB".to_owned(),
        }
    }
}

impl Limits {
    /// Why `key`'s built-in default is what it is, when the group decided it (for
    /// `--print-config`): `None` for the other keys, or without a limit.
    pub fn default_reason(&self, key: &str) -> Option<String> {
        match key {
            "workers" => self
                .cpus
                .map(|cpus| format!("a worker per CPU of the cgroup's quota ({cpus} CPUs)")),
            "duckdb_memory_limit" => self.memory_bytes.map(|bytes| {
                format!(
                    "three quarters of the cgroup's memory limit ({} MiB)",
                    bytes >> 20
                )
            }),
            _ => None,
        }
    }
}

/// `name` in `dir`, or else in `root`.
fn read_in(dir: &Path, root: &Path, name: &str) -> Option<String> {
    let candidates: [PathBuf; 2] = [dir.join(name), root.join(name)];
    candidates
        .iter()
        .find_map(|path| std::fs::read_to_string(path).ok())
}

/// `cpu.max`: "max 100000" (no quota) or "200000 100000".
fn v2_cpus(text: &str) -> Option<f64> {
    let mut fields = text.split_whitespace();
    let quota: f64 = fields.next()?.parse().ok()?;
    let period: f64 = fields.next()?.parse().ok()?;
    (quota > 0.0 && period > 0.0).then(|| quota / period)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, text).expect("write");
    }

    #[test]
    fn v2_limits_of_the_group_or_the_namespace_root() {
        let root = tempfile::tempdir().expect("tempdir");
        write(&root.path().join("app/cpu.max"), "150000 100000\n");
        write(&root.path().join("app/memory.max"), "2147483648\n");
        let limits = Limits::read("0::/app\n", root.path());
        assert_eq!(limits.cpus, Some(1.5));
        assert_eq!(limits.memory_bytes, Some(2 << 30));
        assert_eq!(limits.whole_cpus(), 2);
        assert_eq!(limits.default_workers(), 2);
        assert_eq!(limits.default_memory_limit(), "1536MiB");
        assert_eq!(limits.check_workers(16), Ok(()));
        assert!(
            limits
                .check_workers(17)
                .is_err_and(|e| e.contains("(2048 MiB)"))
        );
        assert_eq!(
            limits.default_reason("workers").as_deref(),
            Some("a worker per CPU of the cgroup's quota (1.5 CPUs)")
        );
        assert!(
            limits
                .default_reason("duckdb_memory_limit")
                .is_some_and(|r| r.contains("(2048 MiB)"))
        );

        // Inside a cgroup namespace: the path is "/", the files are at the root.
        let ns = tempfile::tempdir().expect("tempdir");
        write(&ns.path().join("cpu.max"), "max 100000\n");
        write(&ns.path().join("memory.max"), "max\n");
        let none = Limits::read("0::/\n", ns.path());
        assert_eq!(none, Limits::default());
        assert_eq!(none.default_workers(), 4);
        assert_eq!(none.default_memory_limit(), "2GB");
        assert_eq!(none.default_reason("workers"), None);
        assert_eq!(none.check_workers(16), Ok(()));
    }

    #[test]
    fn v1_limits_and_v1_unlimited() {
        let root = tempfile::tempdir().expect("tempdir");
        write(&root.path().join("cpu/box/cpu.cfs_quota_us"), "200000\n");
        write(&root.path().join("cpu/box/cpu.cfs_period_us"), "100000\n");
        write(
            &root.path().join("memory/box/memory.limit_in_bytes"),
            "1073741824\n",
        );
        let membership = "4:memory:/box\n2:cpu,cpuacct:/box\n1:name=systemd:/\n";
        let limits = Limits::read(membership, root.path());
        assert_eq!(limits.cpus, Some(2.0));
        assert_eq!(limits.memory_bytes, Some(1 << 30));

        write(&root.path().join("cpu/box/cpu.cfs_quota_us"), "-1\n");
        write(
            &root.path().join("memory/box/memory.limit_in_bytes"),
            "9223372036854771712\n",
        );
        assert_eq!(Limits::read(membership, root.path()), Limits::default());
    }

    #[test]
    fn a_group_too_small_for_a_worker_per_cpu_gets_fewer_and_one_too_small_for_one_is_refused() {
        let small = Limits {
            cpus: Some(4.0),
            memory_bytes: Some(300 << 20),
        };
        assert_eq!(small.default_workers(), 2, "300 MiB holds two workers");
        assert_eq!(small.check_workers(2), Ok(()));
        let tiny = Limits {
            cpus: Some(2.0),
            memory_bytes: Some(64 << 20),
        };
        assert_eq!(tiny.default_workers(), 1);
        let refused = tiny.check_workers(1).expect_err("64 MiB holds no worker");
        assert!(
            refused.contains("(64 MiB)") && refused.contains("128 MiB"),
            "{refused}"
        );
    }
}
