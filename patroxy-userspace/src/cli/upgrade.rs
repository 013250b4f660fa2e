//! `patroxy upgrade`: asks the running daemon (SIGUSR2) to start its successor from the binary
//! at the path it was started from and hand it every listener and session, then waits until
//! the old process is gone and the stats page answers from the new one.
use std::time::Duration;

use anyhow::{Context as _, bail};
use patroxy::stats::StatsSnapshot;

/// `pid`, or the daemon's pid from its stats page at `url`; gives up after `timeout`.
pub async fn run(url: &str, pid: Option<u32>, timeout: Duration) -> anyhow::Result<()> {
    let old = match pid {
        Some(pid) => pid,
        None => stats_pid(url).await?,
    };
    // SAFETY: kill has no memory-safety preconditions.
    if unsafe { libc::kill(old as libc::pid_t, libc::SIGUSR2) } != 0 {
        return Err(std::io::Error::last_os_error()).context(format!("signalling pid {old}"));
    }
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if running(old) {
            continue;
        }
        match stats_pid(url).await {
            Ok(new) if new != old => {
                println!("patroxy upgraded: pid {old} -> {new}");
                return Ok(());
            }
            _ => bail!("pid {old} exited but no successor answers at {url}; see the daemon's log"),
        }
    }
    bail!(
        "pid {old} still runs after {timeout:?} (an upgrade that failed leaves it running: see \
         its log)"
    )
}

async fn stats_pid(url: &str) -> anyhow::Result<u32> {
    let url = format!("{}/;json", url.trim_end_matches('/'));
    let snap: StatsSnapshot = reqwest::get(&url)
        .await
        .and_then(|r| r.error_for_status())
        .with_context(|| format!("fetching {url} (is patroxy running with [stats]? else --pid)"))?
        .json()
        .await
        .with_context(|| format!("reading {url}"))?;
    Ok(snap.pid)
}

/// Alive and not a zombie waiting for its parent.
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}
