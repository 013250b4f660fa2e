//! Map keys and values of the XDP allowlist (`patroxy_xdp`, its own eBPF object).
//!
//! A TCP packet to a protected port passes when a rule allows its source: the rule maps are LPM
//! tries keyed by (destination port, source address), so the longest prefix match finds the
//! rule of that port and address in one lookup, and rules for different ports never shadow each
//! other. Validation refuses overlapping rules, so at most one rule matches a (port, address).

/// Data of an ALLOW_V4 key: the prefix length counts the 16 port bits plus the CIDR's bits, so
/// every entry matches one port exactly. The port is in host byte order (it is always matched
/// whole, so its byte order does not matter to the trie, and bpftool then shows the number).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AllowV4 {
    pub port: u16,
    /// The source network, in network byte order as on the wire.
    pub addr: [u8; 4],
}

/// Data of an ALLOW_V6 key, as [`AllowV4`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AllowV6 {
    pub port: u16,
    pub addr: [u8; 16],
}

/// Bits of the port in an allow key's prefix length.
pub const PORT_BITS: u32 = 16;

/// Value of the allow tries: the index of the rule (in file order) that allows the entry.
pub type RuleIndex = u16;

/// Per-CPU counters of one rule (RULE_COUNTERS) or one protected port (PORT_COUNTERS).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XdpCounters {
    /// TCP packets from an allowed source, passed to the stack.
    pub passed: u64,
    /// TCP packets no rule allows, dropped (always 0 for a rule: such packets match none).
    pub denied: u64,
    /// SYNs from an allowed source over its SYN rate, dropped.
    pub syn_limited: u64,
}

/// The SYN rate limit, one entry in SYN_LIMIT, written by userspace (at start and on reload).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SynLimit {
    /// SYNs per second per source (IPv4 /32, IPv6 /64); 0 = no limit.
    pub rate: u64,
    /// SYNs a quiet source may send at once.
    pub burst: u64,
}

/// Key of SYN_BUCKETS: one source, an IPv4 address or the /64 of an IPv6 one.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SynSource {
    /// IPv4: the address in its first 4 bytes; IPv6: the /64 prefix in its first 8 bytes.
    pub addr: [u8; 8],
    /// 4 or 6.
    pub family: u8,
    pub _pad: [u8; 7],
}

/// Value of SYN_BUCKETS: one source's token bucket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SynBucket {
    /// `bpf_ktime_get_ns` of the last refill.
    pub last_ns: u64,
    /// SYNs left, in units of 1/1e9 SYN (refilled by `rate` per elapsed ns).
    pub credit: u64,
}

/// Most allow rules (RULE_COUNTERS' size; rule indexes fit a `RuleIndex`).
pub const MAX_RULES: u32 = 256;
/// Most protected ports.
pub const MAX_PROTECTED_PORTS: u32 = 64;
/// Capacity of each allow trie: a rule's CIDRs times its ports, summed over the rules.
pub const MAX_ALLOW_ENTRIES: u32 = 16_384;
/// Sources whose SYN buckets are kept; the least recently seen are evicted past this.
pub const MAX_SYN_SOURCES: u32 = 65_536;
/// Highest configurable SYN rate and burst: keeps the bucket's arithmetic within u64.
pub const MAX_SYN_RATE: u64 = 1_000_000;
