//! The in-kernel half of patroxy's data path.
//!
//! `patroxy_verdict` is an sk_skb stream-verdict program attached to the SOCKS sockhash. Both
//! sockets of every established client<->backend pair sit in SOCKS keyed by their socket cookie;
//! each skb arriving on one of them is redirected to the egress of its peer, so userspace never
//! copies a byte. The program also keeps the per-socket counters in SESSIONS and refuses to forward
//! for a session whose backend is fenced in BACKENDS (the mark-down fence).
//!
//! `tc.rs` holds the packet-level splice (`datapath = "tc"`): the TC programs that forward a
//! handed-off session's packets between its two connections, sharing BACKENDS for the fence.
//!
//! For debugging it can say what it decided (aya-log, target `patroxy::ebpf`): off unless the
//! loader sets `PATROXY_LOG`, and rate-limited per CPU by a token bucket in LOG_LIMIT so a bulk
//! transfer cannot flood the log ring buffer.
#![no_std]
#![no_main]

mod tc;
mod token_bucket;

use aya_ebpf::{
    Global,
    bindings::sk_action::{SK_DROP, SK_PASS},
    btf_maps::{HashMap, PerCpuArray},
    helpers::{bpf_get_socket_cookie, bpf_ktime_get_ns},
    macros::{btf_map, map, stream_verdict},
    maps::SockHash,
    programs::SkBuffContext,
};
use aya_log_ebpf::info;
use patroxy_common::{
    BackendEntry, LogLimit, MAX_BACKENDS, MAX_SOCKETS, SessionEntry, SocketCookie,
};
use token_bucket::NS_PER_SEC;

/// Established sockets keyed by SO_COOKIE. A legacy map: the kernel refuses BTF on sockmaps.
#[map]
static SOCKS: SockHash<SocketCookie> = SockHash::with_max_entries(MAX_SOCKETS, 0);

/// Per-socket session state and counters (typed in `bpftool map dump`).
#[btf_map]
static SESSIONS: HashMap<SocketCookie, SessionEntry, { MAX_SOCKETS as usize }> = HashMap::new();

/// Backend id -> address, state and role, written by the control plane on every change.
#[btf_map]
static BACKENDS: HashMap<u32, BackendEntry, { MAX_BACKENDS as usize }> = HashMap::new();

/// 1 = log decisions, set by the loader from `bpf_log`. It lives in .rodata, which aya freezes:
/// the verifier then knows its value and removes the logging code when it is 0, so a program
/// without logging pays nothing for it.
#[unsafe(no_mangle)]
static PATROXY_LOG: Global<u8> = Global::new(0);

/// Lines per second per CPU (`bpf_log_rate`); also the burst, one second's worth.
#[unsafe(no_mangle)]
static PATROXY_LOG_RATE: Global<u64> = Global::new(100);

/// Token bucket of the log lines, one per CPU so no two programs race on it.
#[btf_map]
static LOG_LIMIT: PerCpuArray<LogLimit, 1> = PerCpuArray::new();

const LOG_TARGET: &str = "patroxy::ebpf";

/// Whether to print one line now: logging is on and this CPU's bucket has a line left.
#[inline(always)]
fn logging() -> bool {
    PATROXY_LOG.load() != 0 && take_token()
}

#[inline(always)]
fn take_token() -> bool {
    let Some(bucket) = LOG_LIMIT.get_ptr_mut(0) else {
        return false;
    };
    let rate = PATROXY_LOG_RATE.load();
    let full = rate * NS_PER_SEC;
    let now = unsafe { bpf_ktime_get_ns() };
    // The verdict can run in process context and in softirq on one CPU; a lost update here only
    // miscounts a debug line.
    let bucket = unsafe { &mut *bucket };
    let taken = token_bucket::take(
        &mut bucket.last_ns,
        &mut bucket.credit,
        now,
        rate,
        full,
        NS_PER_SEC,
    );
    if taken {
        bucket.printed += 1;
    } else {
        bucket.suppressed += 1;
    }
    taken
}

#[stream_verdict]
pub fn patroxy_verdict(ctx: SkBuffContext) -> u32 {
    try_verdict(&ctx)
}

#[inline(always)]
fn try_verdict(ctx: &SkBuffContext) -> u32 {
    let len = ctx.len() as u64;
    // A zero-length skb carries a FIN alone. TCP already recorded the FIN (RCV_SHUTDOWN, so
    // EPOLLRDHUP fires for the close watcher) before the verdict runs; the skb carries no byte,
    // so drop it. Neither SK_PASS nor a redirect is safe: SK_PASS queues it on this socket's
    // psock behind the peer's bytes still waiting to be sent here (a client that half-closes
    // while its echo is in flight), and the psock backlog then takes the zero-length
    // enqueue for a hard error: EPIPE on this socket, its psock stops sending, every byte still
    // queued for it is dropped (Linux 6.18, net/core/skmsg.c sk_psock_backlog: ret <= 0 and
    // not -EAGAIN breaks the pipe). A redirect fails the same way on the peer.
    if len == 0 {
        if logging() {
            let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
            info!(ctx, target: LOG_TARGET, "drop bare FIN skb on cookie {}", cookie);
        }
        return SK_DROP;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    let Some(entry) = SESSIONS.get_ptr_mut(cookie) else {
        // Not a session we spliced (yet): leave the bytes to the socket's owner.
        if logging() {
            info!(ctx, target: LOG_TARGET, "pass {} bytes on cookie {}: session unknown", len, cookie);
        }
        return SK_PASS;
    };
    let (peer, backend) = unsafe { ((*entry).peer, (*entry).backend) };
    // The fence: one write to BACKENDS stops every session of a marked-down server at once.
    match unsafe { BACKENDS.get(backend) } {
        Some(b) if b.fenced == 0 => {}
        Some(_) => {
            if logging() {
                info!(ctx, target: LOG_TARGET, "drop {} bytes from cookie {}: backend {} fenced", len, cookie, backend);
            }
            return SK_DROP;
        }
        None => {
            if logging() {
                info!(ctx, target: LOG_TARGET, "drop {} bytes from cookie {}: backend {} unknown", len, cookie, backend);
            }
            return SK_DROP;
        }
    }
    let Some(peer_entry) = SESSIONS.get_ptr_mut(peer) else {
        // Redirecting to a missing key drops the skb; keep the bytes instead.
        if logging() {
            info!(ctx, target: LOG_TARGET, "pass {} bytes on cookie {}: peer {} unknown", len, cookie, peer);
        }
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
    let verdict = SOCKS.redirect_skb(ctx, &mut key, 0) as u32;
    if logging() {
        if verdict == SK_PASS {
            info!(ctx, target: LOG_TARGET, "redirect {} bytes from cookie {} to {}", len, cookie, peer);
        } else {
            info!(ctx, target: LOG_TARGET, "drop {} bytes from cookie {}: peer {} not in SOCKS", len, cookie, peer);
        }
    }
    verdict
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
