//! The allowlist's maps and its decision, shared by the XDP and the tc program (`xdp.rs`):
//! one object, so both read and count in the same maps whichever an interface runs.
//!
//! A TCP packet to a protected port (PROTECTED_PORTS: the ports the rules name) passes when an
//! allow rule covers its source: ALLOW_V4/ALLOW_V6 are LPM tries keyed by (port, source), see
//! `patroxy_common::xdp`. Otherwise it is dropped and counted. Every other packet passes
//! untouched: other ports (the replies to patroxy's own connections to the servers arrive on
//! ephemeral ports), other protocols, fragments after the first (the first one carries the TCP
//! header and is judged; without it the kernel cannot reassemble the rest).
//!
//! An allowed SYN (without ACK) also takes a token from its source's bucket in SYN_BUCKETS
//! (IPv4 /32, IPv6 /64) when SYN_LIMIT sets a rate; a SYN over the rate is dropped before it
//! reaches the listen queue. The client retransmits it about a second later, so a reconnect
//! storm is spread out rather than refused.
use crate::token_bucket::{self, NS_PER_SEC};
use aya_ebpf::{
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, lpm_trie::Key},
    helpers::bpf_ktime_get_ns,
    macros::btf_map,
};
use patroxy_common::xdp::{
    AllowV4, AllowV6, MAX_ALLOW_ENTRIES, MAX_PROTECTED_PORTS, MAX_RULES, MAX_SYN_SOURCES,
    PORT_BITS, RuleIndex, SynBucket, SynLimit, SynSource, XdpCounters,
};

/// (port, IPv4 source network) -> index of the rule that allows it.
#[btf_map]
static ALLOW_V4: LpmTrie<AllowV4, RuleIndex, { MAX_ALLOW_ENTRIES as usize }> = LpmTrie::new();

/// (port, IPv6 source network) -> index of the rule that allows it.
#[btf_map]
static ALLOW_V6: LpmTrie<AllowV6, RuleIndex, { MAX_ALLOW_ENTRIES as usize }> = LpmTrie::new();

/// The ports the rules protect (host byte order); the value is unused.
#[btf_map]
static PROTECTED_PORTS: HashMap<u16, u8, { MAX_PROTECTED_PORTS as usize }> = HashMap::new();

/// Per rule index: packets passed and SYNs limited, per CPU.
#[btf_map]
static RULE_COUNTERS: PerCpuArray<XdpCounters, { MAX_RULES as usize }> = PerCpuArray::new();

/// Per protected port: packets passed, denied and SYNs limited, per CPU. Userspace creates the
/// entry of each port before protecting it.
#[btf_map]
static PORT_COUNTERS: PerCpuHashMap<u16, XdpCounters, { MAX_PROTECTED_PORTS as usize }> =
    PerCpuHashMap::new();

/// The SYN rate and burst per source; rate 0 = no limit.
#[btf_map]
static SYN_LIMIT: Array<SynLimit, 1> = Array::new();

/// Token bucket per source; LRU, so a flood of spoofed sources evicts the quietest ones.
#[btf_map]
static SYN_BUCKETS: LruHashMap<SynSource, SynBucket, { MAX_SYN_SOURCES as usize }> =
    LruHashMap::new();

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_TCP: u8 = 6;
const IPV6_HLEN: usize = 40;
/// IPv6 extension headers walked to find TCP: hop-by-hop, routing, fragment, destination.
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_DEST: u8 = 60;
/// TCP flags byte (offset 13): SYN and ACK.
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// A packet as a program type sees it, starting at its Ethernet header.
pub trait Packet {
    /// A `T` at `offset`, if the packet is that long.
    fn read<T: Copy>(&self, offset: usize) -> Option<T>;
}

/// What happens to a packet the allowlist judged.
pub enum Verdict {
    Pass,
    Drop,
}

/// The TCP header's fields the verdict needs.
struct Tcp {
    port: u16,
    syn_only: bool,
}

/// `None` = not a packet this program judges (it passes).
#[inline(always)]
pub fn judge<P: Packet>(packet: &P) -> Option<Verdict> {
    let mut offset = ETH_HLEN;
    let mut ethertype = u16::from_be(packet.read::<u16>(12)?);
    // One VLAN tag (802.1Q or QinQ's outer): the allowlist applies to tagged frames too.
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        ethertype = u16::from_be(packet.read::<u16>(offset + 2)?);
        offset += 4;
    }
    match ethertype {
        ETH_P_IP => ipv4(packet, offset),
        ETH_P_IPV6 => ipv6(packet, offset),
        _ => None,
    }
}

#[inline(always)]
fn ipv4<P: Packet>(packet: &P, ip: usize) -> Option<Verdict> {
    let [version_ihl, _] = packet.read::<[u8; 2]>(ip)?;
    let [_, protocol] = packet.read::<[u8; 2]>(ip + 8)?;
    if protocol != IPPROTO_TCP {
        return None;
    }
    // A fragment after the first has no TCP header.
    let frag = u16::from_be(packet.read::<u16>(ip + 6)?);
    if frag & 0x1fff != 0 {
        return None;
    }
    let src = packet.read::<[u8; 4]>(ip + 12)?;
    let tcp = tcp(packet, ip + usize::from(version_ihl & 0x0f) * 4)?;
    if !is_protected(tcp.port) {
        return None;
    }
    let key = Key::new(
        PORT_BITS + 32,
        AllowV4 {
            port: tcp.port,
            addr: src,
        },
    );
    let rule = ALLOW_V4.get(&key).copied();
    let mut source = SynSource {
        family: 4,
        ..SynSource::default()
    };
    source.addr[..4].copy_from_slice(&src);
    Some(verdict(rule, &tcp, &source))
}

#[inline(always)]
fn ipv6<P: Packet>(packet: &P, ip: usize) -> Option<Verdict> {
    let src = packet.read::<[u8; 16]>(ip + 8)?;
    let [mut next, _] = packet.read::<[u8; 2]>(ip + 6)?;
    let mut offset = ip + IPV6_HLEN;
    // A few extension headers before TCP; a longer chain passes (the stack parses it again).
    for _ in 0..4 {
        match next {
            IPPROTO_TCP => break,
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                let [following, len] = packet.read::<[u8; 2]>(offset)?;
                next = following;
                offset += (usize::from(len) + 1) * 8;
            }
            NEXTHDR_FRAGMENT => {
                let [following, _, frag_hi, frag_lo] = packet.read::<[u8; 4]>(offset)?;
                if u16::from_be_bytes([frag_hi, frag_lo]) & 0xfff8 != 0 {
                    return None;
                }
                next = following;
                offset += 8;
            }
            _ => return None,
        }
    }
    if next != IPPROTO_TCP {
        return None;
    }
    let tcp = tcp(packet, offset)?;
    if !is_protected(tcp.port) {
        return None;
    }
    let key = Key::new(
        PORT_BITS + 128,
        AllowV6 {
            port: tcp.port,
            addr: src,
        },
    );
    let rule = ALLOW_V6.get(&key).copied();
    let mut source = SynSource {
        family: 6,
        ..SynSource::default()
    };
    source.addr.copy_from_slice(&src[..8]);
    Some(verdict(rule, &tcp, &source))
}

#[inline(always)]
fn tcp<P: Packet>(packet: &P, at: usize) -> Option<Tcp> {
    let port = u16::from_be(packet.read::<u16>(at + 2)?);
    // Bytes 12 (data offset) and 13 (flags), read together: a one-byte read at a variable
    // offset compiles to a bounds check (`>=` instead of `+ 1 >`) the verifier cannot follow.
    let [_, flags] = packet.read::<[u8; 2]>(at + 12)?;
    Some(Tcp {
        port,
        syn_only: flags & (TCP_SYN | TCP_ACK) == TCP_SYN,
    })
}

#[inline(always)]
fn is_protected(port: u16) -> bool {
    unsafe { PROTECTED_PORTS.get(port) }.is_some()
}

/// Drops a packet to a protected port unless `rule` allows it and, for a SYN, its source has a
/// token left; counts either way.
#[inline(always)]
fn verdict(rule: Option<RuleIndex>, tcp: &Tcp, source: &SynSource) -> Verdict {
    let port = PORT_COUNTERS.get_ptr_mut(tcp.port);
    let Some(rule) = rule else {
        count(port, |c| c.denied += 1);
        return Verdict::Drop;
    };
    let rule = RULE_COUNTERS.get_ptr_mut(u32::from(rule));
    if tcp.syn_only && !take_syn_token(source) {
        count(port, |c| c.syn_limited += 1);
        count(rule, |c| c.syn_limited += 1);
        return Verdict::Drop;
    }
    count(port, |c| c.passed += 1);
    count(rule, |c| c.passed += 1);
    Verdict::Pass
}

/// Per-CPU counters: this CPU's copy has one writer at a time (XDP and tc run with preemption off).
#[inline(always)]
fn count(counters: Option<*mut XdpCounters>, bump: impl FnOnce(&mut XdpCounters)) {
    if let Some(c) = counters {
        bump(unsafe { &mut *c });
    }
}

/// Whether `source` may send one more SYN now. Buckets are shared by the CPUs; two SYNs of one
/// source at the same instant on two CPUs may both take the last token, which only loosens the
/// limit by a SYN.
#[inline(always)]
fn take_syn_token(source: &SynSource) -> bool {
    let Some(limit) = SYN_LIMIT.get(0) else {
        return true;
    };
    let (rate, burst) = (limit.rate, limit.burst);
    if rate == 0 {
        return true;
    }
    let full = burst * NS_PER_SEC;
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(bucket) = SYN_BUCKETS.get_ptr_mut(source) else {
        // A new source starts with a full bucket, less this SYN.
        let fresh = SynBucket {
            last_ns: now,
            credit: full.saturating_sub(NS_PER_SEC),
        };
        let _ = SYN_BUCKETS.insert(source, fresh, 0);
        return burst > 0;
    };
    let bucket = unsafe { &mut *bucket };
    token_bucket::take(
        &mut bucket.last_ns,
        &mut bucket.credit,
        now,
        rate,
        full,
        full / rate,
    )
}
