//! Map keys and values of the packet-level splice (`datapath = "tc"`): the TC program forwards a
//! handed-off session's packets between its two connections by rewriting addresses, ports and
//! sequence numbers, so the proxy's own TCP stack no longer handles them.

/// Key of FLOWS: one direction of one connection as its packets arrive at the proxy. Addresses
/// and ports in network byte order, as on the wire; an IPv4 address as IPv4-mapped IPv6
/// (`::ffff:a.b.c.d`, `V4_MAPPED` in word 2), which no IPv6 packet carries on the wire.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
    pub sport: u16,
    pub dport: u16,
}

/// Word 2 of an IPv4-mapped address (`::ffff:0:0`), as it sits in memory.
pub const V4_MAPPED: u32 = 0xffffu32.to_be();

/// Value of FLOWS: how to rewrite and where to send the packets of one direction, and what the
/// program saw of them. Two per spliced session (client->server, server->client).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEntry {
    /// The packet's new addresses and ports (network byte order, as in `FlowKey`): the other
    /// connection's, of the same family.
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
    pub sport: u16,
    pub dport: u16,
    /// Added to the sequence number: the other connection's send sequence at the hand-off minus
    /// this one's receive sequence.
    pub seq_delta: u32,
    /// Added to the acknowledgment number (the reverse mapping of the other direction).
    pub ack_delta: u32,
    /// The interface the rewritten packet leaves by (`bpf_redirect_neigh`).
    pub ifindex: u32,
    /// The session's backend: while BACKENDS fences it, the program drops the packets.
    pub backend: u32,
    /// `FLOW_PENDING` (the hand-off is checking the sockets: segments with data, FIN or RST are
    /// dropped and the sender retransmits them; bare ACKs reach the proxy's socket) or
    /// `FLOW_ACTIVE`.
    pub state: u8,
    /// `FLOW_FIN` and `FLOW_RST` as seen in this direction; while pending, `FLOW_ACKED` once
    /// `peer_ack` holds and `FLOW_DROPPED` once a segment was dropped.
    pub seen: u8,
    /// `SIDE_CLIENT` for client->server, `SIDE_BACKEND` for server->client.
    pub side: u8,
    pub _pad: u8,
    /// The next sequence number the receiver expects, as rewritten (highest seen end): what a
    /// reset of the receiver must carry.
    pub next_seq: u32,
    /// While pending: the highest acknowledgment number among the segments the program dropped
    /// (valid once `seen` has `FLOW_ACKED`). It covers the proxy socket's own stream: what the
    /// sender had received from the proxy, which the hand-off need not wait to see acked again.
    pub peer_ack: u32,
    /// Payload bytes forwarded, each once (a retransmission adds nothing): how far past
    /// `start_seq` the sender's stream has reached, as a 64-bit count. The program sets it
    /// (never adds to it) from a packet's end, so two CPUs carrying the flow's packets at once
    /// cannot count a byte twice; the lower of two such stores is made good by the next packet.
    pub bytes: u64,
    /// `bpf_ktime_get_ns` of the last packet (CLOCK_MONOTONIC).
    pub last_ns: u64,
    /// `bpf_ktime_get_ns` of the first FIN, 0 before: which side closed first.
    pub fin_ns: u64,
    /// `next_seq` at the hand-off: where `bytes` counts from.
    pub start_seq: u32,
    pub _pad2: u32,
}

/// Value of HELD (key: the direction's `FlowKey`): a copy of what the hand-off's fence dropped
/// first in one direction, a segment with data that starts at the proxy's socket's next
/// expected byte and the segments that continue it, up to `HELD_MAX` bytes. After the hand-off
/// the proxy sends it on to the other end itself; after an abandoned attempt, to its own
/// socket, as the sender sent it. Either way a sender with fewer
/// than four segments in flight (a query, an answer of a few KB), which cannot be made to
/// retransmit them at once (NewReno needs three duplicate ACKs beyond the lost segment), does
/// not wait for its timeout.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct HeldSegment {
    /// Its sequence number, as the sender numbered it.
    pub seq: u32,
    /// Payload bytes in `data`.
    pub len: u32,
    /// The first held segment's acknowledgment number and window field (host byte order), as
    /// the sender sent them: what a copy given back to the proxy's own socket carries.
    pub ack: u32,
    pub window: u16,
    pub _pad: u16,
    /// Twice `HELD_MAX`: the program appends a segment of up to `HELD_MAX` bytes at an offset
    /// below `HELD_MAX`, both bounded by masks, which the verifier checks only together.
    pub data: [u8; 2 * HELD_MAX],
}

#[cfg(feature = "user")]
impl HeldSegment {
    /// The payload bytes.
    pub fn payload(&self) -> &[u8] {
        &self.data[..(self.len as usize).min(HELD_MAX)]
    }

    /// The held bytes from sequence number `seq` on, if `seq` is among them (a receiver that
    /// already has the first of them, retransmitted, needs only the rest).
    pub fn from_seq(&self, seq: u32) -> Option<&[u8]> {
        let payload = self.payload();
        let skip = seq.wrapping_sub(self.seq) as usize;
        (skip < payload.len()).then(|| &payload[skip..])
    }
}

/// The most payload HELD keeps per direction (a power of two, for the program's masks): five
/// full-sized segments of a 1500-byte MTU and then some, whether they came as one GSO packet
/// or one by one.
pub const HELD_MAX: usize = 8192;
/// Capacity of HELD (two per session in a hand-off at once); its entries are preallocated,
/// 16 KiB each.
pub const MAX_HELD: u32 = 512;

pub const FLOW_PENDING: u8 = 0;
pub const FLOW_ACTIVE: u8 = 1;
pub const FLOW_FIN: u8 = 1;
pub const FLOW_RST: u8 = 2;
pub const FLOW_ACKED: u8 = 4;
/// While pending: the program dropped a segment with data, FIN or RST in this direction.
pub const FLOW_DROPPED: u8 = 8;

/// Capacity of FLOWS (two per spliced session).
pub const MAX_FLOWS: u32 = 32_768;
/// Most ports in SYN_PORTS.
pub const MAX_SYN_PORTS: u32 = 256;
/// Most backend connects in flight at once in SYN_SOCKETS; past it a connect keeps its
/// options and its session stays on the sockmap path.
pub const MAX_SYN_SOCKETS: u32 = 8_192;

/// Value of SYN_PORTS (key: a listener's port, host byte order): SYNs arriving to it get their
/// timestamp and SACK-permitted options replaced by NOPs, so the connections patroxy may splice
/// never negotiate them (the two legs' timestamps and SACK edges would not match). The
/// backend legs' SYNs are matched by socket cookie instead (SYN_SOCKETS).
pub const SYN_TO_LISTENER: u8 = 1;

#[cfg(all(test, feature = "user"))]
mod tests {
    use super::*;

    #[test]
    fn held_bytes_are_taken_from_a_sequence_number_among_them() {
        let mut held = HeldSegment {
            seq: u32::MAX - 1,
            len: 5,
            ack: 0,
            window: 0,
            _pad: 0,
            data: [0; 2 * HELD_MAX],
        };
        held.data[..5].copy_from_slice(b"abcde");
        assert_eq!(held.from_seq(u32::MAX - 1), Some(&b"abcde"[..]));
        // Across the wrap of the sequence space.
        assert_eq!(held.from_seq(1), Some(&b"de"[..]));
        assert_eq!(held.from_seq(3), None, "past the held bytes");
        assert_eq!(held.from_seq(u32::MAX - 2), None, "before them");
    }
}
