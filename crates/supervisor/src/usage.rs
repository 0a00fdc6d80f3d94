//! What the master samples from `/proc`: each worker's resident memory and CPU time, and each
//! listener's accept queue — published in the scoreboard for `/metrics`, and the memory guard's
//! input.

use std::collections::HashMap;

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

/// The accept-queue length of every listening TCP socket, by inode: a listener's `rx_queue` in
/// `/proc/net/tcp{,6}` is the connections waiting for `accept`.
pub fn accept_queues() -> HashMap<u64, u32> {
    let mut queues = HashMap::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        if let Ok(text) = std::fs::read_to_string(table) {
            parse_tcp_table(&text, &mut queues);
        }
    }
    queues
}

fn parse_tcp_table(text: &str, queues: &mut HashMap<u64, u32>) {
    for line in text.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // sl local rem st tx:rx tr:when retrnsmt uid timeout inode
        let (Some(state), Some(queues_field), Some(inode)) =
            (fields.get(3), fields.get(4), fields.get(9))
        else {
            continue;
        };
        if *state != "0A" {
            continue; // not LISTEN
        }
        let rx = queues_field
            .split_once(':')
            .and_then(|(_, rx)| u32::from_str_radix(rx, 16).ok());
        if let (Some(rx), Ok(inode)) = (rx, inode.parse::<u64>()) {
            queues.insert(inode, rx);
        }
    }
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
    fn listening_sockets_give_their_queue_by_inode() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:1F40 00000000:0000 0A 00000000:00000007 00:00000000 00000000     0        0 91234 1 0000000000000000 100 0 0 10 0\n\
   1: 0100007F:1F40 0100007F:9C40 01 00000000:00000003 00:00000000 00000000     0        0 91240 1 0000000000000000 20 4 30 10 -1\n";
        let mut queues = HashMap::new();
        parse_tcp_table(table, &mut queues);
        assert_eq!(queues.get(&91234), Some(&7));
        assert_eq!(queues.len(), 1, "only LISTEN sockets");
    }

    #[test]
    fn this_process_has_memory_and_cpu() {
        let (rss, _cpu) = process(std::process::id() as i32).expect("own /proc");
        assert!(rss > 1 << 20, "{rss}");
    }
}
