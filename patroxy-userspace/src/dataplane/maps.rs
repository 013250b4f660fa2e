//! The verdict program and its maps by name, in the eBPF object and under the pin directory:
//! the loader, the kernel log, the stats and the operator's commands all take them from here.

/// Socket cookie -> socket: the sockhash the verdict program is attached to.
pub const MAP_SOCKS: &str = "SOCKS";
/// Per socket: its peer, bytes each way, last activity, backend, listener and side.
pub const MAP_SESSIONS: &str = "SESSIONS";
/// Per backend id: address, listener, state, role, fence and session count.
pub const MAP_BACKENDS: &str = "BACKENDS";
/// Per CPU: the debug log's token bucket and its counts.
pub const MAP_LOG_LIMIT: &str = "LOG_LIMIT";
/// aya-log-ebpf's ring buffer (not pinned).
pub const MAP_LOG_RING: &str = "AYA_LOGS";
/// The sk_skb verdict program.
pub const PROGRAM: &str = "patroxy_verdict";
/// The maps pinned under the pin directory.
pub const PINNED: [&str; 4] = [MAP_SOCKS, MAP_SESSIONS, MAP_BACKENDS, MAP_LOG_LIMIT];
