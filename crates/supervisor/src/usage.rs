//! What the master samples from `/proc`: each worker's resident memory and CPU time, published
//! in the scoreboard for `/metrics`, and the memory guard's input. (The accept queues come from
//! the listeners themselves: [`crate::listeners::Listeners::accept_queues`].)

/// A process's resident memory in bytes and CPU time (user + system) in milliseconds, from one
/// read of `/proc/<pid>/stat`.
pub fn process(pid: i32) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (resident_pages, ticks) = parse_stat(&stat)?;
    Some((
        resident_pages * constants().page_size,
        ticks * 1000 / constants().ticks_per_second,
    ))
}

/// What the sampling divides and multiplies by, asked of the system once.
struct Constants {
    page_size: u64,
    ticks_per_second: u64,
}

fn constants() -> &'static Constants {
    use nix::unistd::{SysconfVar, sysconf};
    static CONSTANTS: std::sync::OnceLock<Constants> = std::sync::OnceLock::new();
    CONSTANTS.get_or_init(|| {
        let ask = |var, default: u64| {
            sysconf(var)
                .ok()
                .flatten()
                .map_or(default, |n| (n as u64).max(1))
        };
        Constants {
            page_size: ask(SysconfVar::PAGE_SIZE, 4096),
            ticks_per_second: ask(SysconfVar::CLK_TCK, 100),
        }
    })
}

/// Resident pages and utime + stime (clock ticks) of a `/proc/<pid>/stat` line. The command
/// name (field 2) may hold spaces and parentheses: the fields are counted after its last `)`.
fn parse_stat(stat: &str) -> Option<(u64, u64)> {
    let after = &stat[stat.rfind(')')? + 1..];
    let mut fields = after.split_whitespace();
    // After the name: state is field 3, utime 14, stime 15, rss 24.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    let rss: u64 = fields.nth(8)?.parse().ok()?;
    Some((rss, utime + stime))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_and_rss_are_read_past_a_tricky_command_name() {
        let stat =
            "4242 (a) b (c)) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0 5 123 77 0";
        assert_eq!(parse_stat(stat), Some((77, 300)));
    }

    #[test]
    fn this_process_has_memory_and_cpu() {
        let (rss, _cpu) = process(std::process::id() as i32).expect("own /proc");
        assert!(rss > 1 << 20, "{rss}");
        // The resident size, not another field: statm's count, give or take what moved since.
        let statm = std::fs::read_to_string("/proc/self/statm").expect("statm");
        let pages: u64 = statm
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .expect("pages");
        let resident = pages * constants().page_size;
        assert!(
            rss / 2 < resident && resident < rss * 2,
            "{rss} vs {resident}"
        );
    }
}
