//! After a fenced hand-off of a session whose legs did not negotiate SACK (a host with SACK
//! off), a sender whose segments the program dropped learns at once that they were lost: ten
//! duplicate ACKs from the proxy's end of its connection. The first may count as a window
//! update, the next ones start a fast retransmit (NewReno's count: more than the connection's
//! reordering estimate, three at first), and the retransmission meets the active flow. Without
//! them the sender waits for its retransmission timeout, 200 ms at least, and a bulk sender
//! then restarts from a window of one segment. They fail where the sender's reordering estimate
//! has grown past its flight (Linux keeps it per destination in `tcp_metrics`: the bench's
//! server reached 270 on its connections from the proxy host), which is one reason SACK is kept
//! on spliced connections now: with it, a sender learns of the loss from the other end's SACK
//! of what it sends next, or from its tail loss probe, whatever its reordering estimate, and
//! takes no notice of duplicate ACKs without SACK blocks, so none are sent.
//!
//! A sender with fewer than four segments in flight (a query, an answer of a few KB) cannot
//! fast-retransmit: without SACK, three duplicates need three segments beyond the lost one;
//! with SACK, nothing after it is sent to be SACKed, and Linux delays the tail loss probe of a
//! lone segment by its minimum timeout (200 ms). For it the program
//! kept a copy of what it dropped (HELD, up to `HELD_MAX` bytes), and the proxy sends it on to
//! the other end itself, as the flow would have, cut to that connection's MSS; the other end's
//! acknowledgment then reaches the sender through the flow. Should the sender retransmit it
//! anyway, the copy that arrives second is an old segment, which TCP discards. After an
//! abandoned attempt the same copy goes to the proxy's own socket instead, from the sender's
//! address (`handoff::give_back`): the kernel delivers a packet to a local address locally.
//!
//! Sent on IPPROTO_RAW sockets, which only send (they are handed no incoming packet), opened
//! at start-up while CAP_NET_RAW is still held.
use std::{
    io,
    net::{IpAddr, SocketAddr},
};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tracing::debug;

/// Enough for a sender whose reordering estimate has grown past NewReno's three (Linux raises
/// it when more duplicates arrive than segments are in flight, which two CPUs delivering one
/// flow, or an earlier nudge of a short flight, can cause: `ss -ti` shows `reordering:4` on
/// the lab's hosts), plus one: the first ACK after the sender's last window update is itself
/// one (RFC 5681 counts only ACKs that leave the window alone). A sender with fewer segments
/// in flight than duplicates takes the extra ones for reordering and does not retransmit fast;
/// what it sent is held and sent on by the proxy instead (below 8 KiB).
const DUP_ACKS: usize = 10;
const IPPROTO_TCP: u8 = 6;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;

/// The proxy's end of one connection (or, giving held segments back to the proxy's socket, the
/// peer's end), as the raw sockets speak for it: from `from` to `to`,
/// numbered `seq` (what `to` expects next), acknowledging `ack` (the first byte `to` sent and has
/// not had acknowledged), with `window` as `to` reads the field (scaled), in segments of at most
/// `mss` payload bytes.
#[derive(Clone, Copy, Debug)]
pub struct ProxyEnd {
    pub from: SocketAddr,
    pub to: SocketAddr,
    pub seq: u32,
    pub ack: u32,
    pub window: u16,
    pub mss: usize,
}

pub struct Nudger {
    v4: Option<Socket>,
    v6: Option<Socket>,
}

impl Nudger {
    /// The two raw sockets; one that cannot be had (no CAP_NET_RAW, no IPv6) only means its
    /// family's senders wait for their timeout.
    pub fn open() -> Self {
        let raw = |domain| {
            Socket::new(domain, Type::RAW, Some(Protocol::from(libc::IPPROTO_RAW)))
                .map_err(|e| {
                    debug!(
                        ?domain,
                        "no raw socket for the hand-off's duplicate ACKs: {e}"
                    )
                })
                .ok()
        };
        Self {
            v4: raw(Domain::IPV4),
            v6: raw(Domain::IPV6),
        }
    }

    /// The raw sockets a predecessor opened (an upgrade: this process has no CAP_NET_RAW to
    /// open its own), [IPv4, IPv6].
    pub fn from_handed(handed: [Option<std::os::fd::OwnedFd>; 2]) -> Self {
        let [v4, v6] = handed.map(|fd| fd.map(Socket::from));
        Self { v4, v6 }
    }

    /// The raw sockets, [IPv4, IPv6], for a successor.
    pub fn sockets(&self) -> [Option<std::os::fd::BorrowedFd<'_>>; 2] {
        use std::os::fd::AsFd as _;
        [
            self.v4.as_ref().map(|s| s.as_fd()),
            self.v6.as_ref().map(|s| s.as_fd()),
        ]
    }

    /// With an empty `payload`, the duplicate ACKs; else the segments carrying it. Returns how
    /// many packets went.
    pub fn send(&self, end: &ProxyEnd, payload: &[u8]) -> io::Result<usize> {
        let packets = packets(end, payload)?;
        for packet in &packets {
            self.send_packet(end.to, packet)?;
        }
        Ok(packets.len())
    }

    fn send_packet(&self, to: SocketAddr, packet: &[u8]) -> io::Result<()> {
        let socket = match to {
            SocketAddr::V4(_) => self.v4.as_ref(),
            SocketAddr::V6(_) => self.v6.as_ref(),
        }
        .ok_or_else(|| io::Error::other("no raw socket for this family"))?;
        // The port of a raw socket's destination must be 0 (or the protocol).
        socket.send_to(packet, &SockAddr::from(SocketAddr::new(to.ip(), 0)))?;
        Ok(())
    }
}

/// With an empty `payload`, `DUP_ACKS` bare ACKs; else the payload in segments of at most
/// `end.mss` bytes (536, the least a host must take, should the MSS be unknown), numbered on
/// from `end.seq`.
fn packets(end: &ProxyEnd, payload: &[u8]) -> io::Result<Vec<Vec<u8>>> {
    if payload.is_empty() {
        return Ok(vec![segment(end, payload)?; DUP_ACKS]);
    }
    let mss = if end.mss == 0 { 536 } else { end.mss };
    let mut seq = end.seq;
    payload
        .chunks(mss)
        .map(|chunk| {
            let packet = segment(&ProxyEnd { seq, ..*end }, chunk);
            seq = seq.wrapping_add(chunk.len() as u32);
            packet
        })
        .collect()
}

/// An IP packet holding a TCP segment with ACK (and PSH with a payload), no options,
/// checksums included.
fn segment(end: &ProxyEnd, payload: &[u8]) -> io::Result<Vec<u8>> {
    let ProxyEnd {
        from,
        to,
        seq,
        ack,
        window,
        ..
    } = *end;
    let mut tcp = vec![0u8; 20 + payload.len()];
    tcp[20..].copy_from_slice(payload);
    let tcp_len = u16::try_from(tcp.len()).map_err(|_| io::Error::other("payload too long"))?;
    let [len_hi, len_lo] = tcp_len.to_be_bytes();
    tcp[0..2].copy_from_slice(&from.port().to_be_bytes());
    tcp[2..4].copy_from_slice(&to.port().to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[8..12].copy_from_slice(&ack.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = if payload.is_empty() {
        TCP_ACK
    } else {
        TCP_ACK | TCP_PSH
    };
    tcp[14..16].copy_from_slice(&window.to_be_bytes());
    let mut packet = Vec::with_capacity(60);
    match (from.ip(), to.ip()) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            let mut pseudo = Vec::with_capacity(12);
            pseudo.extend_from_slice(&src.octets());
            pseudo.extend_from_slice(&dst.octets());
            pseudo.extend_from_slice(&[0, IPPROTO_TCP, len_hi, len_lo]);
            let sum = checksum(&[&pseudo, &tcp]);
            tcp[16..18].copy_from_slice(&sum.to_be_bytes());
            // Version 4, 5 words; don't fragment; TTL 64. The kernel fills in the header
            // checksum (and the id) of an IPPROTO_RAW packet.
            let [tot_hi, tot_lo] = (tcp_len + 20).to_be_bytes();
            packet.extend_from_slice(&[0x45, 0, tot_hi, tot_lo, 0, 0, 0x40, 0, 64, IPPROTO_TCP]);
            packet.extend_from_slice(&[0, 0]);
            packet.extend_from_slice(&src.octets());
            packet.extend_from_slice(&dst.octets());
        }
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            let mut pseudo = Vec::with_capacity(40);
            pseudo.extend_from_slice(&src.octets());
            pseudo.extend_from_slice(&dst.octets());
            pseudo.extend_from_slice(&[0, 0, len_hi, len_lo, 0, 0, 0, IPPROTO_TCP]);
            let sum = checksum(&[&pseudo, &tcp]);
            tcp[16..18].copy_from_slice(&sum.to_be_bytes());
            // Version 6; next header TCP; hop limit 64.
            packet.extend_from_slice(&[0x60, 0, 0, 0, len_hi, len_lo, IPPROTO_TCP, 64]);
            packet.extend_from_slice(&src.octets());
            packet.extend_from_slice(&dst.octets());
        }
        _ => return Err(io::Error::other("an IPv4 and an IPv6 address")),
    }
    packet.extend_from_slice(&tcp);
    Ok(packet)
}

/// The Internet checksum (RFC 1071) of the parts, each but the last of even length.
fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = parts
        .iter()
        .flat_map(|p| p.chunks(2))
        .map(|w| u32::from(u16::from_be_bytes([w[0], w.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn end(from: SocketAddr, to: SocketAddr, seq: u32, ack: u32, window: u16) -> ProxyEnd {
        ProxyEnd {
            from,
            to,
            seq,
            ack,
            window,
            mss: 1460,
        }
    }

    #[test]
    fn an_ipv4_ack_checks_out_with_its_own_checksum() {
        let from: SocketAddr = "10.0.0.1:5432".parse().unwrap();
        let to: SocketAddr = "10.0.0.2:40000".parse().unwrap();
        let p = segment(&end(from, to, 0x0102_0304, 0xa0b0_c0d0, 512), &[]).unwrap();
        assert_eq!(p.len(), 40);
        assert_eq!(&p[24..28], &[1, 2, 3, 4], "seq");
        assert_eq!(&p[28..32], &[0xa0, 0xb0, 0xc0, 0xd0], "ack");
        assert_eq!(p[33], TCP_ACK);
        // Summing the pseudo-header and the segment, its checksum included, gives 0.
        let pseudo = [&p[12..20], &[0, IPPROTO_TCP, 0, 20][..]].concat();
        assert_eq!(checksum(&[&pseudo, &p[20..]]), 0);
    }

    #[test]
    fn an_ipv6_ack_checks_out_with_its_own_checksum() {
        let from: SocketAddr = "[fd00::1]:5432".parse().unwrap();
        let to: SocketAddr = "[fd00::2]:40000".parse().unwrap();
        let p = segment(&end(from, to, 7, 9, 1024), &[]).unwrap();
        assert_eq!(p.len(), 60);
        assert_eq!(p[0] >> 4, 6);
        let pseudo = [&p[8..40], &[0, 0, 0, 20, 0, 0, 0, IPPROTO_TCP][..]].concat();
        assert_eq!(checksum(&[&pseudo, &p[40..]]), 0);
    }

    #[test]
    fn mixed_families_are_refused() {
        let from: SocketAddr = "10.0.0.1:1".parse().unwrap();
        let to: SocketAddr = "[fd00::2]:2".parse().unwrap();
        assert!(segment(&end(from, to, 0, 0, 0), &[]).is_err());
    }

    #[test]
    fn a_segment_with_an_odd_payload_checks_out_and_carries_it() {
        let from: SocketAddr = "10.0.0.1:5432".parse().unwrap();
        let to: SocketAddr = "10.0.0.2:40000".parse().unwrap();
        let payload = b"SELECT 1;";
        let p = segment(&end(from, to, 1, 2, 64), payload).unwrap();
        assert_eq!(p.len(), 40 + payload.len());
        assert_eq!(
            u16::from_be_bytes([p[2], p[3]]) as usize,
            p.len(),
            "total length"
        );
        assert_eq!(p[33], TCP_ACK | TCP_PSH);
        assert_eq!(&p[40..], payload);
        let len = (20 + payload.len()) as u8;
        let pseudo = [&p[12..20], &[0, IPPROTO_TCP, 0, len][..]].concat();
        assert_eq!(checksum(&[&pseudo, &p[20..]]), 0);
    }

    #[test]
    fn a_held_payload_goes_in_segments_of_the_mss_numbered_on() {
        let from: SocketAddr = "10.0.0.1:5432".parse().unwrap();
        let to: SocketAddr = "10.0.0.2:40000".parse().unwrap();
        let payload: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        // Numbered across the wrap of the sequence space.
        let at = u32::MAX - 99;
        let held = packets(&end(from, to, at, 2, 64), &payload).unwrap();
        let lens: Vec<usize> = held.iter().map(|p| p.len() - 40).collect();
        assert_eq!(lens, [1460, 1460, 80]);
        let seqs: Vec<u32> = held
            .iter()
            .map(|p| u32::from_be_bytes([p[24], p[25], p[26], p[27]]))
            .collect();
        assert_eq!(seqs, [at, at.wrapping_add(1460), at.wrapping_add(2920)]);
        let carried: Vec<u8> = held.iter().flat_map(|p| p[40..].to_vec()).collect();
        assert_eq!(carried, payload);
        for p in &held {
            let len = u16::try_from(p.len() - 20).unwrap().to_be_bytes();
            let pseudo = [&p[12..20], &[0, IPPROTO_TCP, len[0], len[1]][..]].concat();
            assert_eq!(checksum(&[&pseudo, &p[20..]]), 0);
        }
        // Duplicate ACKs: DUP_ACKS bare, identical segments.
        let acks = packets(&end(from, to, at, 2, 64), &[]).unwrap();
        assert_eq!(acks.len(), DUP_ACKS);
        assert!(acks.iter().all(|p| p.len() == 40 && *p == acks[0]));
    }
}
