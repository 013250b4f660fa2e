//! The packet-level splice (`datapath = "tc"`): TC programs on the interfaces the config names.
//!
//! `patroxy_tc_ingress` forwards the packets of a handed-off session straight from one of its
//! connections to the other: FLOWS, keyed by the packet's 4-tuple, says which addresses, ports
//! and sequence/ack offsets the other connection has and which interface it leaves by; the
//! program rewrites them, fixes the checksums and redirects the packet there, so the proxy's own
//! TCP stack never sees it. Packets of other connections pass untouched. IPv4 and IPv6 (an
//! IPv6 packet with extension headers passes to the stack: it belongs to no flow patroxy set up,
//! the hand-off never joins an IPv6 leg with an IPv4 one).
//!
//! Both programs also keep TCP timestamps out of the connections patroxy may splice: in a SYN
//! to a listener's port (SYN_PORTS, at ingress) and in a SYN of one of patroxy's own backend
//! sockets while it connects (SYN_SOCKETS, at egress, by socket cookie) the option becomes
//! NOPs, so neither leg negotiates it (each leg's timestamps have their own clock offset, which
//! the program cannot know). SACK stays: the ingress program moves each SACK edge by the same
//! offset as the ack it comes with. The host's sysctls are left alone: other connections keep
//! timestamps, other local clients of the same server port included.
use aya_ebpf::{
    bindings::{
        BPF_F_CURRENT_NETNS, BPF_F_PSEUDO_HDR, BPF_NOEXIST, bpf_sock_tuple,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2,
    },
    btf_maps::{HashMap, LruHashMap, PerCpuArray},
    cty::c_void,
    helpers::{
        bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_redirect_neigh, bpf_sk_lookup_tcp,
        bpf_sk_release, bpf_skb_load_bytes, bpf_tcp_sock,
    },
    macros::{btf_map, classifier},
    programs::TcContext,
};
use patroxy_common::tc::{
    FLOW_ACKED, FLOW_ACTIVE, FLOW_DROPPED, FLOW_FIN, FLOW_RST, FlowEntry, FlowKey, HELD_MAX,
    HeldSegment, MAX_FLOWS, MAX_HELD, MAX_SYN_PORTS, MAX_SYN_SOCKETS, SYN_TO_LISTENER, V4_MAPPED,
};

use crate::BACKENDS;

/// One direction of a handed-off connection -> how to rewrite it (typed in `bpftool map dump`).
#[btf_map]
pub static FLOWS: HashMap<FlowKey, FlowEntry, { MAX_FLOWS as usize }> = HashMap::new();

/// One direction of a session in a hand-off -> the data its fence dropped first. LRU:
/// an entry a packet added just after the hand-off took the others is evicted in time, not
/// kept for good.
#[btf_map]
static HELD: LruHashMap<FlowKey, HeldSegment, { MAX_HELD as usize }> = LruHashMap::new();

/// Where a held segment is put together before it goes into HELD (too large for the stack).
#[btf_map]
static HELD_SCRATCH: PerCpuArray<HeldSegment, 1> = PerCpuArray::new();

/// Destination port (host byte order) -> `SYN_TO_LISTENER`.
#[btf_map]
static SYN_PORTS: HashMap<u16, u8, { MAX_SYN_PORTS as usize }> = HashMap::new();

/// Socket cookies of patroxy's backend sockets while they connect (the value is unused).
#[btf_map]
static SYN_SOCKETS: HashMap<u64, u8, { MAX_SYN_SOCKETS as usize }> = HashMap::new();

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPV6_HLEN: usize = 40;
const IPPROTO_TCP: u8 = 6;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
const TCPOPT_NOP: u8 = 1;
const TCPOPT_SACK: u8 = 5;
const TCPOPT_TIMESTAMP: u8 = 8;
/// Options walked in a header: real stacks send at most 8 (NOPs included).
const MAX_OPTIONS: usize = 12;
/// A SACK option without timestamps carries at most four blocks (2 + 4 x 8 of 40 bytes).
const MAX_SACK_BLOCKS: usize = 4;
/// The classifier's verdicts (include/uapi/linux/pkt_cls.h); TC_ACT_REDIRECT is also what
/// bpf_redirect_neigh returns on success. A packet the programs let by goes on with
/// TC_ACT_UNSPEC (tcx's TCX_NEXT): to the next program on the interface, then the stack.
/// TC_ACT_OK would end the interface's chain there, and the programs other owners attached
/// after these (another patroxy's among them) would never see a packet.
const TC_ACT_UNSPEC: i32 = -1;
const TC_ACT_SHOT: i32 = 2;
const TC_ACT_REDIRECT: i32 = 7;

#[classifier]
pub fn patroxy_tc_ingress(ctx: TcContext) -> i32 {
    try_ingress(&ctx).unwrap_or(TC_ACT_UNSPEC)
}

#[classifier]
pub fn patroxy_tc_egress(ctx: TcContext) -> i32 {
    if let Some(tcp) = ip_tcp(&ctx)
        && tcp.flags & (TCP_SYN | TCP_ACK) == TCP_SYN
        && is_backend_connect(&ctx)
    {
        strip_syn_options(&ctx, &tcp);
    }
    TC_ACT_UNSPEC
}

/// Whether the packet comes from one of patroxy's backend sockets while it connects: matched by
/// socket cookie, so another local client of the same server port keeps its options (a SYN
/// the host forwards as a router has no socket, cookie 0, never registered).
#[inline(always)]
fn is_backend_connect(ctx: &TcContext) -> bool {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    cookie != 0 && unsafe { SYN_SOCKETS.get(cookie) }.is_some()
}

/// Where the headers of a TCP packet are, and the fields the programs read.
struct Tcp {
    ip: usize,
    v6: bool,
    at: usize,
    /// TCP header length in bytes.
    len: usize,
    /// The TCP segment's length (header and payload) as the IP header says, 0 where it does
    /// not (a GSO packet past 64 KiB, BIG TCP).
    segment: usize,
    key: FlowKey,
    dport: u16,
    flags: u8,
    seq: u32,
    ack: u32,
}

/// The TCP packet's headers: IPv4 (not a later fragment) or IPv6 with TCP right after its
/// fixed header. Anything else is not for the programs.
#[inline(always)]
fn ip_tcp(ctx: &TcContext) -> Option<Tcp> {
    let ethertype = u16::from_be(ctx.load::<u16>(12).ok()?);
    let ip = ETH_HLEN;
    let (v6, at, segment, saddr, daddr) = match ethertype {
        ETH_P_IP => {
            let [version_ihl, _] = ctx.load::<[u8; 2]>(ip).ok()?;
            let total = usize::from(u16::from_be(ctx.load::<u16>(ip + 2).ok()?));
            let header = usize::from(version_ihl & 0x0f) * 4;
            let [_, protocol] = ctx.load::<[u8; 2]>(ip + 8).ok()?;
            let frag = u16::from_be(ctx.load::<u16>(ip + 6).ok()?);
            if protocol != IPPROTO_TCP || frag & 0x1fff != 0 {
                return None;
            }
            let mapped = |a: u32| [0, 0, V4_MAPPED, a];
            (
                false,
                ip + header,
                total.saturating_sub(header),
                mapped(ctx.load::<u32>(ip + 12).ok()?),
                mapped(ctx.load::<u32>(ip + 16).ok()?),
            )
        }
        ETH_P_IPV6 => {
            let [next_header, _] = ctx.load::<[u8; 2]>(ip + 6).ok()?;
            let payload = usize::from(u16::from_be(ctx.load::<u16>(ip + 4).ok()?));
            if next_header != IPPROTO_TCP {
                return None;
            }
            (
                true,
                ip + IPV6_HLEN,
                payload,
                ctx.load::<[u32; 4]>(ip + 8).ok()?,
                ctx.load::<[u32; 4]>(ip + 24).ok()?,
            )
        }
        _ => return None,
    };
    let [sport, dport] = ctx.load::<[u16; 2]>(at).ok()?;
    let seq = ctx.load::<u32>(at + 4).ok()?;
    let ack = ctx.load::<u32>(at + 8).ok()?;
    let [doff, flags] = ctx.load::<[u8; 2]>(at + 12).ok()?;
    Some(Tcp {
        ip,
        v6,
        at,
        len: usize::from(doff >> 4) * 4,
        segment,
        key: FlowKey {
            saddr,
            daddr,
            sport,
            dport,
        },
        dport: u16::from_be(dport),
        flags,
        seq: u32::from_be(seq),
        ack: u32::from_be(ack),
    })
}

#[inline(always)]
fn syn_port(port: u16) -> u8 {
    unsafe { SYN_PORTS.get(port) }.copied().unwrap_or(0)
}

#[inline(always)]
fn try_ingress(ctx: &TcContext) -> Option<i32> {
    let tcp = ip_tcp(ctx)?;
    let syn = tcp.flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    if syn {
        // A new connection on a 4-tuple whose flow is still here: that session is over (its
        // client reused the port), so its entry goes and the SYN reaches the listener.
        if unsafe { FLOWS.get(tcp.key) }.is_some() {
            let _ = FLOWS.remove(tcp.key);
        }
        if syn_port(tcp.dport) == SYN_TO_LISTENER {
            strip_syn_options(ctx, &tcp);
        }
        return None;
    }
    let flow = FLOWS.get_ptr_mut(tcp.key)?;
    let entry = unsafe { *flow };
    // The mark-down fence holds here too.
    let fenced = unsafe { BACKENDS.get(entry.backend) }.is_none_or(|b| b.fenced != 0);
    if fenced {
        return Some(TC_ACT_SHOT);
    }
    // The IP header's length, not the frame's: a NIC pads a bare ACK's frame to 60 bytes, and
    // those bytes would count as payload and push `next_seq` past what the receiver expects.
    let payload = if tcp.segment != 0 {
        tcp.segment.saturating_sub(tcp.len)
    } else {
        (ctx.len() as usize).saturating_sub(tcp.at + tcp.len)
    } as u32;
    if entry.state != FLOW_ACTIVE {
        let verdict = hold_while_pending(flow, &tcp, payload);
        if verdict == TC_ACT_SHOT {
            keep_dropped(ctx, &tcp, payload);
        }
        return Some(verdict);
    }
    // A packet of an active flow never goes on to the stack: the proxy's repair-mode socket
    // would take (and acknowledge) bytes the other end never gets. One that cannot be
    // rewritten (the helpers fail only when the packet cannot be made writable) is dropped,
    // and its sender sends it again.
    if rewrite(ctx, &tcp, &entry).is_err() {
        return Some(TC_ACT_SHOT);
    }
    let data_end = tcp.seq.wrapping_add(entry.seq_delta).wrapping_add(payload);
    let fin = tcp.flags & TCP_FIN != 0;
    let end = if fin {
        data_end.wrapping_add(1)
    } else {
        data_end
    };
    let now = unsafe { bpf_ktime_get_ns() };
    // Two CPUs can carry one flow's packets at once (a sender's process and the softirq of the
    // ACKs it receives both send, and a veth delivers on the sending CPU), and this BPF CPU
    // version has no compare-and-swap: so `bytes` is stored as the stream's reach, one 64-bit
    // store, never added to. A race can at worst leave the lower of two reaches, which the
    // flow's next segment with data or FIN repairs (a session ends with one); it cannot count
    // a byte twice. Bare ACKs and RSTs do not count: after a FIN their sequence number is one
    // past the data. `next_seq`, which resets carry, is kept as before.
    unsafe {
        if payload > 0 || fin {
            let reached = core::ptr::read_volatile(&(*flow).bytes);
            let from = (*flow).start_seq.wrapping_add(reached as u32);
            let beyond = data_end.wrapping_sub(from) as i32;
            if beyond > 0 {
                core::ptr::write_volatile(&mut (*flow).bytes, reached + beyond as u64);
            }
        }
        if (end.wrapping_sub(core::ptr::read_volatile(&(*flow).next_seq)) as i32) > 0 {
            (*flow).next_seq = end;
        }
        (*flow).last_ns = now;
        if fin {
            (*flow).seen |= FLOW_FIN;
            if (*flow).fin_ns == 0 {
                (*flow).fin_ns = now;
            }
        }
        if tcp.flags & TCP_RST != 0 {
            (*flow).seen |= FLOW_RST;
        }
    }
    Some(unsafe { bpf_redirect_neigh(entry.ifindex, core::ptr::null_mut(), 0, 0) } as i32)
        .filter(|&r| r == TC_ACT_REDIRECT)
        .or(Some(TC_ACT_SHOT))
}

/// The hand-off's fence while it checks the sockets: nothing that moves a socket's receive
/// side gets through (data, FIN and RST are dropped; the sender retransmits them, rewritten
/// once the flow is active), bare ACKs do, so the proxy's sent bytes get acknowledged and a
/// window that opens lets its queued bytes out. A dropped segment's acknowledgment is kept:
/// the peer had what it acknowledges, whether or not the proxy's socket hears it. A drop is
/// noted too: the hand-off then tells the sender at once (duplicate ACKs).
#[inline(always)]
fn hold_while_pending(flow: *mut FlowEntry, tcp: &Tcp, payload: u32) -> i32 {
    if payload == 0 && tcp.flags & (TCP_SYN | TCP_FIN | TCP_RST) == 0 {
        return TC_ACT_UNSPEC;
    }
    // Two CPUs racing here can only leave a lower acknowledgment: the hand-off then waits
    // longer, never less.
    unsafe {
        let mut seen = (*flow).seen | FLOW_DROPPED;
        if tcp.flags & TCP_ACK != 0
            && (seen & FLOW_ACKED == 0 || (tcp.ack.wrapping_sub((*flow).peer_ack) as i32) > 0)
        {
            (*flow).peer_ack = tcp.ack;
            seen |= FLOW_ACKED;
        }
        (*flow).seen = seen;
    }
    TC_ACT_SHOT
}

/// Copies a dropped segment with data (no FIN, RST or SYN) into HELD: the first of its
/// direction, and then each that continues what is held while the whole fits in `HELD_MAX`.
/// The hand-off sends it on itself.
#[inline(always)]
fn keep_dropped(ctx: &TcContext, tcp: &Tcp, payload: u32) {
    if payload == 0 || payload as usize > HELD_MAX || tcp.flags & (TCP_SYN | TCP_FIN | TCP_RST) != 0
    {
        return;
    }
    if let Some(held) = HELD.get_ptr_mut(tcp.key) {
        let held = unsafe { &mut *held };
        let len = held.len;
        if tcp.seq != held.seq.wrapping_add(len) || len as usize + payload as usize > HELD_MAX {
            return;
        }
        // `len` is below HELD_MAX here: the mask only tells the verifier so (on a volatile
        // copy, which the compiler cannot prove it a no-op on), and the append ends within the
        // buffer of twice HELD_MAX.
        let at = (unsafe { core::ptr::read_volatile(&len) } & (HELD_MAX as u32 - 1)) as usize;
        if load_payload(ctx, tcp, unsafe { held.data.as_mut_ptr().add(at) }, payload) {
            held.len = len + payload;
        }
        return;
    }
    // Held only from where the proxy's socket stopped receiving. What it may give back must
    // not overlap what the socket has: the sockmap forwards such a segment whole, its old
    // bytes a second time (the kernel's tcp_read_skb, README "Data path"). A first dropped
    // segment often starts before (a tail loss probe of bytes the socket has, its ACK delayed),
    // and one past a gap may come to overlap the sender's own retransmission.
    if socket_rcv_nxt(ctx, tcp) != Some(tcp.seq) {
        return;
    }
    let Some(scratch) = HELD_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    let held = unsafe { &mut *scratch };
    if !load_payload(ctx, tcp, held.data.as_mut_ptr(), payload) {
        return;
    }
    held.seq = tcp.seq;
    held.len = payload;
    held.ack = tcp.ack;
    held.window = ctx.load::<u16>(tcp.at + 14).map_or(0, u16::from_be);
    // Never over an entry another CPU put there meanwhile: a replaced entry goes back to the
    // map's free list at once (its elements are preallocated) while that CPU may still be
    // appending to it, and its late bytes would land in whatever entry reuses it.
    let _ = HELD.insert(tcp.key, &*held, BPF_NOEXIST.into());
}

/// The next sequence number the local socket this segment is for expects (its `rcv_nxt`),
/// if there is one.
#[inline(always)]
fn socket_rcv_nxt(ctx: &TcContext, tcp: &Tcp) -> Option<u32> {
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let size = if tcp.v6 {
        tuple.__bindgen_anon_1.ipv6 = bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2 {
            saddr: tcp.key.saddr,
            daddr: tcp.key.daddr,
            sport: tcp.key.sport,
            dport: tcp.key.dport,
        };
        core::mem::size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2>()
    } else {
        tuple.__bindgen_anon_1.ipv4 = bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 {
            saddr: tcp.key.saddr[3],
            daddr: tcp.key.daddr[3],
            sport: tcp.key.sport,
            dport: tcp.key.dport,
        };
        core::mem::size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>()
    };
    // SAFETY: the tuple is on this stack; a socket found is released below, after the read.
    unsafe {
        let sk = bpf_sk_lookup_tcp(
            ctx.skb.skb as *mut c_void,
            &mut tuple,
            size as u32,
            BPF_F_CURRENT_NETNS as u64,
            0,
        );
        if sk.is_null() {
            return None;
        }
        let tp = bpf_tcp_sock(sk);
        let rcv_nxt = if tp.is_null() {
            None
        } else {
            Some((*tp).rcv_nxt)
        };
        bpf_sk_release(sk as *mut c_void);
        rcv_nxt
    }
}

/// Copies the segment's payload (1..=HELD_MAX bytes) to `to`; true if it was copied.
#[inline(always)]
fn load_payload(ctx: &TcContext, tcp: &Tcp, to: *mut u8, payload: u32) -> bool {
    // Exactly the payload (the frame may be padded past it), in a form the verifier can bound:
    // 1..=HELD_MAX by a mask. The volatile read keeps the compiler from dropping the mask it
    // knows to be a no-op.
    let len =
        (unsafe { core::ptr::read_volatile(&payload) }.wrapping_sub(1) & (HELD_MAX as u32 - 1)) + 1;
    let loaded = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb as *const c_void,
            (tcp.at + tcp.len) as u32,
            to as *mut c_void,
            len,
        )
    };
    loaded == 0
}

/// The other connection's addresses, ports, sequence and ack numbers, checksums kept right (for
/// veth's CHECKSUM_PARTIAL packets the helpers update only the pseudo-header part). An address
/// changes one 32-bit word at a time, in the TCP pseudo-header sum and, for IPv4, in the IP
/// header's own checksum (IPv6 has none).
#[inline(always)]
fn rewrite(ctx: &TcContext, tcp: &Tcp, entry: &FlowEntry) -> Result<(), i64> {
    let ip_csum = tcp.ip + 10;
    let tcp_csum = tcp.at + 16;
    let addr_word = |offset: usize, old: u32, new: u32| -> Result<(), i64> {
        if old == new {
            return Ok(());
        }
        ctx.l4_csum_replace(
            tcp_csum,
            old.into(),
            new.into(),
            (BPF_F_PSEUDO_HDR | 4).into(),
        )?;
        if !tcp.v6 {
            ctx.l3_csum_replace(ip_csum, old.into(), new.into(), 4)?;
        }
        ctx.store(offset, &new, 0)
    };
    if tcp.v6 {
        for i in 0..4 {
            addr_word(tcp.ip + 8 + 4 * i, tcp.key.saddr[i], entry.saddr[i])?;
            addr_word(tcp.ip + 24 + 4 * i, tcp.key.daddr[i], entry.daddr[i])?;
        }
    } else {
        addr_word(tcp.ip + 12, tcp.key.saddr[3], entry.saddr[3])?;
        addr_word(tcp.ip + 16, tcp.key.daddr[3], entry.daddr[3])?;
    }
    let field16 = |offset: usize, old: u16, new: u16| -> Result<(), i64> {
        if old == new {
            return Ok(());
        }
        ctx.l4_csum_replace(tcp_csum, old.into(), new.into(), 2)?;
        ctx.store(offset, &new, 0)
    };
    field16(tcp.at, tcp.key.sport, entry.sport)?;
    field16(tcp.at + 2, tcp.key.dport, entry.dport)?;
    let field32 = |offset: usize, old: u32, delta: u32| -> Result<(), i64> {
        let (old, new) = (old.to_be(), old.wrapping_add(delta).to_be());
        ctx.l4_csum_replace(tcp_csum, old.into(), new.into(), 4)?;
        ctx.store(offset, &new, 0)
    };
    field32(tcp.at + 4, tcp.seq, entry.seq_delta)?;
    if tcp.flags & TCP_ACK != 0 {
        field32(tcp.at + 8, tcp.ack, entry.ack_delta)?;
        // SACK edges number the same bytes as the ack: they move with it.
        if let Some((first, blocks)) = sack_blocks(ctx, tcp) {
            for block in 0..MAX_SACK_BLOCKS {
                if block >= blocks {
                    break;
                }
                for edge in 0..2 {
                    let at = first + 8 * block + 4 * edge;
                    field32(at, u32::from_be(ctx.load::<u32>(at)?), entry.ack_delta)?;
                }
            }
        }
    }
    Ok(())
}

/// Where a segment's SACK blocks start in the packet, and how many there are. `None` without
/// the option, or (never from Linux, which puts two NOPs before it) with its edges at an odd
/// offset, where a 32-bit checksum update would not line up with the sum's 16-bit words: such
/// a segment goes on with its SACK option turned into NOPs, as if it had none (a sender then
/// recovers by the ack alone).
#[inline(always)]
fn sack_blocks(ctx: &TcContext, tcp: &Tcp) -> Option<(usize, usize)> {
    let (i, size) = find_option(ctx, tcp, TCPOPT_SACK)?;
    let blocks = (size - 2) / 8;
    if (size - 2) % 8 != 0 || blocks == 0 || blocks > MAX_SACK_BLOCKS {
        return None;
    }
    if i % 2 != 0 {
        let _ = nop_out(ctx, tcp.at, 20 + i, size);
        return None;
    }
    // The blocks follow the option's kind and length bytes.
    Some((tcp.at + 20 + i + 2, blocks))
}

/// Replaces the timestamp option of a SYN by NOPs, fixing the checksum per 16-bit word
/// changed. The option is found first and rewritten after: a rewrite inside the walk
/// multiplies the verifier's states past its limit.
#[inline(always)]
fn strip_syn_options(ctx: &TcContext, tcp: &Tcp) {
    if let Some((at, 10)) = find_option(ctx, tcp, TCPOPT_TIMESTAMP) {
        let _ = nop_out(ctx, tcp.at, 20 + at, 10);
    }
}

/// The first option of `kind` in the TCP header: its offset from the options' start and its
/// size (at least 2, within the header). Read through the helpers, as the verifier refuses
/// stack writes at offsets it cannot bound.
#[inline(always)]
fn find_option(ctx: &TcContext, tcp: &Tcp, kind: u8) -> Option<(usize, usize)> {
    let len = tcp.len.saturating_sub(20);
    if len == 0 || len > 40 {
        return None;
    }
    let start = tcp.at + 20;
    let mut i = 0;
    for _ in 0..MAX_OPTIONS {
        if i >= len {
            return None;
        }
        let found = ctx.load::<u8>(start + i).ok()?;
        if found == 0 {
            return None;
        }
        if found == TCPOPT_NOP {
            i += 1;
            continue;
        }
        let size = usize::from(ctx.load::<u8>(start + i + 1).ok()?);
        if size < 2 || i + size > len {
            return None;
        }
        if found == kind {
            return Some((i, size));
        }
        i += size;
    }
    None
}

/// Overwrites `size` (at most 34, a whole SACK option) bytes at `from` (relative to the TCP
/// header) with NOPs, one aligned 16-bit word at a time so the checksum update stays exact.
#[inline(always)]
fn nop_out(ctx: &TcContext, at: usize, from: usize, size: usize) -> Result<(), i64> {
    let end = from + size;
    let mut word = from & !1;
    for _ in 0..18 {
        if word >= end {
            break;
        }
        let old = ctx.load::<[u8; 2]>(at + word)?;
        let mut new = old;
        if word >= from {
            new[0] = TCPOPT_NOP;
        }
        if word + 1 < end {
            new[1] = TCPOPT_NOP;
        }
        let (old, new) = (u16::from_ne_bytes(old), u16::from_ne_bytes(new));
        ctx.l4_csum_replace(at + 16, old.into(), new.into(), 2)?;
        ctx.store(at + word, &new, 0)?;
        word += 2;
    }
    Ok(())
}
