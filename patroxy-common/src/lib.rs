//! Map keys and values shared by the eBPF programs and the userspace control plane.
//!
//! Every type is `#[repr(C)]` with explicit padding so both sides agree on the layout and
//! `bpftool map dump` shows named, typed fields (the maps carry BTF).
#![no_std]

pub mod tc;
pub mod xdp;

/// Key of SOCKS and SESSIONS: the kernel's socket cookie (`SO_COOKIE`).
pub type SocketCookie = u64;

/// Backend ids index BACKENDS; 0 is never a real backend.
pub type BackendId = u32;

/// One entry per spliced socket (two per session), kept current by the verdict program.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SessionEntry {
    /// Cookie of the socket this one is spliced to.
    pub peer: SocketCookie,
    /// Bytes that arrived on this socket and were forwarded to the peer.
    pub bytes_rx: u64,
    /// Bytes forwarded to this socket from the peer.
    pub bytes_tx: u64,
    /// `bpf_ktime_get_ns` of the last byte in either direction (CLOCK_MONOTONIC).
    pub last_ns: u64,
    /// The backend this session goes to; the verdict refuses to forward while it is fenced.
    pub backend: BackendId,
    /// Index of the listener that accepted the session.
    pub listener: u16,
    /// `SIDE_CLIENT` or `SIDE_BACKEND`.
    pub side: u8,
    pub _pad: u8,
}

pub const SIDE_CLIENT: u8 = 0;
pub const SIDE_BACKEND: u8 = 1;

/// State of one backend as the kernel sees it; written by userspace on every change.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendEntry {
    /// IPv4 address in network byte order (as in `sockaddr_in`), 0 for IPv6 backends.
    pub addr_v4: u32,
    /// Traffic port in host byte order.
    pub port: u16,
    /// Index of the listener this backend serves.
    pub listener: u16,
    /// `STATE_*` as routing sees the server: MAINT (the operator's) whatever its checks say,
    /// else DOWN by its checks, else DRAIN (the operator's: no new sessions), else UP.
    pub state: u8,
    /// `ROLE_*` as last reported by Patroni.
    pub role: u8,
    /// 1 = the verdict refuses to forward for this backend's sessions (set when the server is
    /// marked down with on_marked_down = shutdown-sessions, just before they are reset).
    pub fenced: u8,
    pub _pad: u8,
    /// Sessions currently open to this backend.
    pub sessions: u32,
}

pub const STATE_DOWN: u8 = 0;
pub const STATE_UP: u8 = 1;
/// `patroxy set-state ... maint`: out of rotation, fenced like DOWN per on_marked_down.
pub const STATE_MAINT: u8 = 2;
/// `patroxy set-state ... drain`: UP, no new sessions, open ones still forwarded.
pub const STATE_DRAIN: u8 = 3;

pub const ROLE_UNKNOWN: u8 = 0;
pub const ROLE_PRIMARY: u8 = 1;
pub const ROLE_REPLICA: u8 = 2;
pub const ROLE_STANDBY_LEADER: u8 = 3;

/// Value of the one-entry per-CPU LOG_LIMIT map: the token bucket that rate-limits the verdict
/// program's debug log lines on one CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogLimit {
    /// `bpf_ktime_get_ns` of the last refill.
    pub last_ns: u64,
    /// Available lines, in units of 1/1e9 line (refilled by `rate` per elapsed ns).
    pub credit: u64,
    /// Lines handed to the ring buffer.
    pub printed: u64,
    /// Lines over the rate, counted instead of printed.
    pub suppressed: u64,
}

/// Capacity of the SOCKS/SESSIONS maps (two entries per session).
pub const MAX_SOCKETS: u32 = 65_536;
/// Capacity of BACKENDS.
pub const MAX_BACKENDS: u32 = 1_024;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all are repr(C) with explicit padding (or none needed) and no pointers; every bit
    // pattern is valid.
    unsafe impl aya::Pod for super::SessionEntry {}
    unsafe impl aya::Pod for super::BackendEntry {}
    unsafe impl aya::Pod for super::LogLimit {}
    unsafe impl aya::Pod for super::tc::FlowKey {}
    unsafe impl aya::Pod for super::tc::FlowEntry {}
    unsafe impl aya::Pod for super::tc::HeldSegment {}
    unsafe impl aya::Pod for super::xdp::AllowV4 {}
    unsafe impl aya::Pod for super::xdp::AllowV6 {}
    unsafe impl aya::Pod for super::xdp::XdpCounters {}
    unsafe impl aya::Pod for super::xdp::SynLimit {}
    unsafe impl aya::Pod for super::xdp::SynSource {}
    unsafe impl aya::Pod for super::xdp::SynBucket {}
}
