//! What the master samples from `/proc`: each worker's resident memory and CPU time, published
//! in the scoreboard for `/metrics`, and the memory guard's input. (The accept queues come from
//! the listeners themselves: [`crate::listeners::Listeners::accept_queues`].)

/// A process's resident memory in bytes and CPU time (user + system) in milliseconds.
pub fn process(pid: i32) -> Option<(u64, u64)> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let resident_pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some((resident_pages * page_size(), cpu_ms(&stat)?))
}

fn page_size() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .map_or(4096, |n| n as u64)
}

/// utime + stime of a `/proc/<pid>/stat` line, in milliseconds. The command name (field 2) may
/// hold spaces and parentheses: the fields are counted after its last `)`.
fn cpu_ms(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    let mut fields = after.split_whitespace();
    // After the name: state is field 3, utime field 14, stime field 15.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100, |n| n.max(1) as u64);
    Some((utime + stime) * 1000 / ticks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_is_read_past_a_tricky_command_name() {
        let stat = "4242 (a) b (c)) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0 5 0 0";
        let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .map_or(100, |n| n as u64);
        assert_eq!(cpu_ms(stat), Some(300 * 1000 / ticks));
    }

    #[test]
    fn this_process_has_memory_and_cpu() {
        let (rss, _cpu) = process(std::process::id() as i32).expect("own /proc");
        assert!(rss > 1 << 20, "{rss}");
    }
}
