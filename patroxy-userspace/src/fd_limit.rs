//! The open-files limit that `maxconn` needs.
use crate::config::Config;

/// File descriptors the daemon needs besides its sessions, health checks and stats connections:
/// listeners, maps and programs, the SESSIONS reader, the runtime, logs.
const BASE_FDS: u64 = 256;

/// Each session holds two sockets, each health check and stats connection one: like HAProxy,
/// raise the soft fd limit to fit them (up to the hard limit, which only an administrator can
/// raise) and say so if it cannot. Called at start and by every reload, since a reload can
/// raise `maxconn`. The stats server never holds more than its `maxconn` plus its listener, so it
/// cannot take the proxy's share.
pub fn raise(config: &Config) {
    let stats = config
        .stats
        .as_ref()
        .map_or(0, |s| u64::from(s.maxconn) + 1);
    // At most one check connection per server (the checker shares one per node).
    let checks: u64 = config
        .listeners
        .iter()
        .map(|l| l.servers.len() as u64)
        .sum();
    let runtime = config
        .runtime
        .as_ref()
        .map_or(0, |r| u64::from(r.maxconn) + 1);
    let wanted = u64::from(config.global.maxconn) * 2 + checks + stats + runtime + BASE_FDS;
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return;
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: valid rlimit; only the soft limit changes.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    }
    if lim.rlim_cur < wanted {
        tracing::warn!(
            limit = lim.rlim_cur,
            wanted,
            "the open-files limit is below what maxconn and [stats] maxconn need (2 per session, 1 per stats connection); raise LimitNOFILE"
        );
    }
}
