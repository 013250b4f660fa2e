//! The in-kernel half of patroxy's data path.
//!
//! `patroxy_verdict` is an sk_skb stream-verdict program attached to the SOCKS sockhash. Both
//! sockets of every established client<->backend pair sit in SOCKS keyed by their socket cookie;
//! each skb arriving on one of them is redirected to the egress of its peer, so userspace never
//! copies a byte. The program also keeps the per-socket counters in SESSIONS and refuses to forward
//! for a session whose backend is fenced in BACKENDS (the mark-down fence).
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::sk_action::{SK_DROP, SK_PASS},
    btf_maps::HashMap,
    helpers::{bpf_get_socket_cookie, bpf_ktime_get_ns},
    macros::{btf_map, map, stream_verdict},
    maps::SockHash,
    programs::SkBuffContext,
};
use patroxy_common::{BackendEntry, MAX_BACKENDS, MAX_SOCKETS, SessionEntry, SocketCookie};

/// Established sockets keyed by SO_COOKIE. A legacy map: the kernel refuses BTF on sockmaps.
#[map]
static SOCKS: SockHash<SocketCookie> = SockHash::with_max_entries(MAX_SOCKETS, 0);

/// Per-socket session state and counters (typed in `bpftool map dump`).
#[btf_map]
static SESSIONS: HashMap<SocketCookie, SessionEntry, { MAX_SOCKETS as usize }> = HashMap::new();

/// Backend id -> address, state and role, written by the control plane on every change.
#[btf_map]
static BACKENDS: HashMap<u32, BackendEntry, { MAX_BACKENDS as usize }> = HashMap::new();

#[stream_verdict]
pub fn patroxy_verdict(ctx: SkBuffContext) -> u32 {
    try_verdict(&ctx)
}

#[inline(always)]
fn try_verdict(ctx: &SkBuffContext) -> u32 {
    let len = ctx.len() as u64;
    // A zero-length skb carries a FIN: it must stay on its own socket so userspace sees EOF.
    if len == 0 {
        return SK_PASS;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    let Some(entry) = SESSIONS.get_ptr_mut(cookie) else {
        // Not a session we spliced (yet): leave the bytes to the socket's owner.
        return SK_PASS;
    };
    let (peer, backend) = unsafe { ((*entry).peer, (*entry).backend) };
    // The fence: one write to BACKENDS stops every session of a marked-down server at once.
    match unsafe { BACKENDS.get(backend) } {
        Some(b) if b.fenced == 0 => {}
        _ => return SK_DROP,
    }
    let Some(peer_entry) = SESSIONS.get_ptr_mut(peer) else {
        // Redirecting to a missing key drops the skb; keep the bytes instead.
        return SK_PASS;
    };
    let now = unsafe { bpf_ktime_get_ns() };
    // The verdict of one socket runs under that socket's lock, so `bytes_rx` of this socket and
    // `bytes_tx` of its peer each have exactly one writer: plain adds are exact (the BPF target
    // has no fetch_add in core, and none is needed).
    unsafe {
        (*entry).bytes_rx += len;
        (*peer_entry).bytes_tx += len;
        (*entry).last_ns = now;
        (*peer_entry).last_ns = now;
    }
    let mut key = peer;
    SOCKS.redirect_skb(ctx, &mut key, 0) as u32
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
