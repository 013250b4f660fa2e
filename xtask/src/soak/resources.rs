//! What a patroxy holds, read from outside: open fds (/proc), resident memory, open sessions
//! (stats CSV) and the entries of its SESSIONS and SOCKS maps (bpftool on the pinned maps).

use std::path::Path;
use std::process::Command;

use super::lab::Target;
use super::scrape;

#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    pub fds: u64,
    pub rss_kib: u64,
    pub open_sessions: u64,
    /// Sessions since the start (the stats' `stot`), to say how many the soak opened.
    pub total_sessions: u64,
    /// SESSIONS and SOCKS entries (the sockmap path only).
    pub map_entries: Option<(u64, u64)>,
}

pub fn usage(t: &Target) -> Usage {
    let fds = std::fs::read_dir(format!("/proc/{}/fd", t.pid))
        .map(|d| d.count() as u64)
        .unwrap_or(0);
    Usage {
        fds,
        rss_kib: patroxy_tests::process::memory(t.pid).map_or(0, |m| m.rss_kib),
        open_sessions: scrape::frontend_sum(t, "scur").unwrap_or(u64::MAX),
        total_sessions: scrape::frontend_sum(t, "stot").unwrap_or(0),
        map_entries: t.sockmap.then(|| {
            (
                map_entries(&t.pin, "SESSIONS"),
                map_entries(&t.pin, "SOCKS"),
            )
        }),
    }
}

/// Entries of a pinned map, as `bpftool -j map dump` lists them (u64::MAX if it cannot).
fn map_entries(pin: &Path, map: &str) -> u64 {
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(pin.join(map))
        .output();
    match out {
        Ok(o) if o.status.success() => serde_json::from_slice::<serde_json::Value>(&o.stdout)
            .ok()
            .and_then(|v| v.as_array().map(|a| a.len() as u64))
            .unwrap_or(u64::MAX),
        _ => u64::MAX,
    }
}

/// How far above its baseline a patroxy may end, and why.
///
/// - fds: the baseline plus one per health-checked server. The checker's HTTP client keeps a
///   connection to each Patroni API alive between checks and reopens it after a node restarts
///   or flaps, so at any instant one per server may be open or not; anything past that grows
///   with sessions and is a leak.
/// - RSS: the baseline plus 16 MiB. The allocator keeps freed memory for reuse (per-thread
///   arenas sized by the busiest moment), so RSS after a load ends sits above the idle
///   baseline by a bounded amount; a per-session leak over the soak's tens of thousands of
///   sessions grows past it.
/// - sessions and map entries: back to exactly the baseline (none open).
pub fn within(base: &Usage, end: &Usage, servers: u64) -> Vec<String> {
    let mut problems = Vec::new();
    if end.fds > base.fds + servers {
        problems.push(format!(
            "fds {} -> {} (tolerance +{servers})",
            base.fds, end.fds
        ));
    }
    if end.rss_kib > base.rss_kib + RSS_SLACK_KIB {
        problems.push(format!(
            "RSS {} -> {} KiB (tolerance +{RSS_SLACK_KIB} KiB)",
            base.rss_kib, end.rss_kib
        ));
    }
    if end.open_sessions > base.open_sessions {
        problems.push(format!("{} sessions still open", end.open_sessions));
    }
    if let (Some(b), Some(e)) = (base.map_entries, end.map_entries)
        && (e.0 > b.0 || e.1 > b.1)
    {
        problems.push(format!(
            "map entries SESSIONS/SOCKS {}/{} -> {}/{}",
            b.0, b.1, e.0, e.1
        ));
    }
    problems
}

pub const RSS_SLACK_KIB: u64 = 16 * 1024;
