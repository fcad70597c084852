//! What the kernel says about a process: CPU time from `/proc/<pid>/stat`
//! and resident memory from `/proc/<pid>/status` (Linux only).

use crate::error::{BenchError, Result};
use std::process::Command;
use std::sync::OnceLock;

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`), read once via
/// `getconf CLK_TCK` so no libc binding is needed. Linux has used 100 on
/// every mainstream architecture for decades, hence the fallback.
pub fn clock_ticks_per_sec() -> u64 {
    static TCK: OnceLock<u64> = OnceLock::new();
    *TCK.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<u64>().ok())
            .filter(|&t| t > 0)
            .unwrap_or(100)
    })
}

/// User + system CPU time of a process so far, in microseconds (tick resolution).
pub fn cpu_us(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let text =
        std::fs::read_to_string(&path).map_err(|e| BenchError::io("read cpu time", &path, e))?;
    let ticks = parse_stat_cpu_ticks(&text)
        .ok_or_else(|| BenchError::Invalid(format!("cannot parse {path}: {text:?}")))?;
    Ok(ticks * 1_000_000 / clock_ticks_per_sec())
}

/// utime + stime (fields 14 and 15) of a `/proc/<pid>/stat` line. The
/// command name (field 2) may contain spaces and parentheses, so fields
/// are counted after its last `)`.
pub fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state), so field 14 is fields[11].
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Resident set size of a process, in KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text =
        std::fs::read_to_string(&path).map_err(|e| BenchError::io("read memory", &path, e))?;
    parse_status_rss_kib(&text)
        .ok_or_else(|| BenchError::Invalid(format!("no VmRSS line in {path}")))
}

/// The `VmRSS:   1234 kB` line of `/proc/<pid>/status`.
pub fn parse_status_rss_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_ticks_even_with_odd_command_names() {
        let stat = "4242 (we ird) name)) S 1 4242 4242 0 -1 4194560 100 0 0 0 37 5 0 0 20 0 4 0 1000 1000 100";
        assert_eq!(parse_stat_cpu_ticks(stat), Some(42));
        assert_eq!(parse_stat_cpu_ticks("garbage"), None);
    }

    #[test]
    fn parses_rss_and_reads_our_own_process() {
        assert_eq!(
            parse_status_rss_kib("Name:\tx\nVmRSS:\t   2048 kB\nVmSwap: 0 kB\n"),
            Some(2048)
        );
        let me = std::process::id();
        assert!(rss_kib(me).unwrap() > 0);
        // Burn CPU until the counter moves: it counts in clock ticks of CPU
        // time, so a fixed wall-clock burn can see none on a loaded machine
        // (it did on 2 busy cores). Ten seconds of wall time is the bound.
        let mut x = 0u64;
        let start = std::time::Instant::now();
        while cpu_us(me).unwrap() == 0 && start.elapsed() < std::time::Duration::from_secs(10) {
            for _ in 0..100_000 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            }
        }
        assert!(x != 1);
        assert!(cpu_us(me).unwrap() > 0);
        assert!(clock_ticks_per_sec() >= 100);
    }
}
