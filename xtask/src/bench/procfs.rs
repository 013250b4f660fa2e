//! The /proc counters the workloads read: a process's CPU time and resident set, the kernel's
//! slab, system-wide busy and softirq time, and the kworker/ksoftirqd threads' time.

use std::collections::HashMap;

/// Clock ticks per second (USER_HZ) for /proc times.
pub fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// utime+stime in ticks from the text of a /proc/PID/stat file.
fn stat_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) may hold spaces: count fields after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime field 15.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// A process's CPU time (all its threads, user + system) in ticks.
pub fn proc_ticks(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| stat_ticks(&s))
        .unwrap_or(0)
}

/// A process's resident set in KiB (VmRSS).
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// A field of /proc/meminfo in KiB.
pub fn meminfo_kib(field: &str) -> u64 {
    let info = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    info.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The aggregate `cpu` line of /proc/stat: (busy ticks, softirq ticks).
/// Busy = user+nice+system+irq+softirq+steal (idle and iowait excluded).
fn system_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let line = stat.lines().find(|l| l.starts_with("cpu ")).unwrap_or("");
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let g = |i: usize| v.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal
    (g(0) + g(1) + g(2) + g(5) + g(6) + g(7), g(6))
}

/// CPU ticks of every kworker/ksoftirqd thread, by pid (kworkers come and go: a delta sums
/// per pid, counting a new one from zero).
fn kernel_thread_ticks() -> HashMap<u32, u64> {
    let mut map = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return map;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let comm = stat
            .find('(')
            .and_then(|a| stat.rfind(')').map(|b| &stat[a + 1..b]))
            .unwrap_or("");
        if (comm.starts_with("kworker") || comm.starts_with("ksoftirqd"))
            && let Some(t) = stat_ticks(&stat)
        {
            map.insert(pid, t);
        }
    }
    map
}

/// A snapshot of the CPU counters around one run.
pub struct Counters {
    proxy: Option<u64>,
    busy: u64,
    softirq: u64,
    kthreads: HashMap<u32, u64>,
}

impl Counters {
    pub fn take(pid: Option<u32>) -> Counters {
        let (busy, softirq) = system_ticks();
        Counters {
            proxy: pid.map(proc_ticks),
            busy,
            softirq,
            kthreads: kernel_thread_ticks(),
        }
    }
}

/// CPU spent between two snapshots, in milliseconds.
pub struct CpuDelta {
    pub proxy_ms: Option<f64>,
    pub busy_ms: f64,
    pub softirq_ms: f64,
    pub kthreads_ms: f64,
}

pub fn delta(a: &Counters, b: &Counters) -> CpuDelta {
    let ms = 1000.0 / clk_tck();
    let kt: u64 = b
        .kthreads
        .iter()
        .map(|(pid, t)| t.saturating_sub(a.kthreads.get(pid).copied().unwrap_or(0)))
        .sum();
    CpuDelta {
        proxy_ms: a
            .proxy
            .zip(b.proxy)
            .map(|(x, y)| y.saturating_sub(x) as f64 * ms),
        busy_ms: b.busy.saturating_sub(a.busy) as f64 * ms,
        softirq_ms: b.softirq.saturating_sub(a.softirq) as f64 * ms,
        kthreads_ms: kt as f64 * ms,
    }
}

#[cfg(test)]
mod tests {
    use super::stat_ticks;

    #[test]
    fn stat_ticks_sums_utime_and_stime_after_the_command_name() {
        // The command name may hold spaces and parentheses; utime and stime are fields 14, 15.
        let stat = "4242 (my (odd) proc) S 1 4242 4242 0 -1 4194560 100 0 0 0 7 5 0 0 20 0 3 0";
        assert_eq!(stat_ticks(stat), Some(12));
        assert_eq!(stat_ticks("4242 (short) S 1"), None);
    }
}
