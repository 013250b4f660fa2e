//! Moving one sockmap session to the TC program without losing or duplicating a byte.
//!
//! The order makes every failure safe to undo:
//! 1. the session must be quiet: nothing unread, nothing unacknowledged, nothing waiting in the
//!    sockmap's queues (each socket's TCP counted exactly the bytes the verdict gave it);
//! 2. both flows go into FLOWS as pending: from now on the program drops the session's packets
//!    (a sender retransmits them), so the sockets' state can no longer change;
//! 3. quiet again, and the counters unchanged since 1 (a packet that passed the program just
//!    before 2 has reached its socket by then): otherwise the entries go and the session stays
//!    on the sockmap, to be tried again later;
//! 4. both sockets leave SOCKS (their psocks are empty), enter TCP_REPAIR and give their
//!    sequence numbers; quiet and unchanged once more (else back to the sockmap, retried
//!    later); the entries become active with the offsets between the two connections.
//!
//! Only sessions whose legs can be joined are tried: both legs of one family (a packet cannot
//! change from IPv6 to IPv4 by a rewrite), neither leg with timestamps or SACK (the SYN option
//! stripping keeps them out), equal window scales crosswise and equal MSS, and both local
//! addresses on interfaces the programs are attached to.
use std::{
    net::{SocketAddr, TcpStream},
    sync::{Arc, atomic::Ordering},
};

use patroxy_common::{
    SIDE_BACKEND, SIDE_CLIENT,
    tc::{FLOW_ACTIVE, FLOW_PENDING, FlowEntry, FlowKey, V4_MAPPED},
};
use tracing::debug;

use super::{Flow, TcPath, repair};
use crate::dataplane::{KernelMaps, sockopt};

/// Bytes userspace wrote to each socket before the sockmap took it (the verdict's counters
/// start after them).
#[derive(Clone, Copy, Debug, Default)]
pub struct Baseline {
    pub client_written: u64,
    pub backend_written: u64,
}

impl Baseline {
    pub fn read(client: &impl std::os::fd::AsFd, backend: &impl std::os::fd::AsFd) -> Self {
        let written =
            |s: std::os::fd::BorrowedFd| sockopt::tcp_counters(&s).map_or(0, |c| c.bytes_written);
        Self {
            client_written: written(client.as_fd()),
            backend_written: written(backend.as_fd()),
        }
    }
}

pub enum Attempt {
    HandedOff(Flow),
    /// Not quiet now (or a byte moved): try again later.
    NotNow,
    /// This session stays on the sockmap path (counted).
    Never,
}

/// The session's two legs, as the program sees them.
struct Legs {
    /// client -> proxy listener
    client: (SocketAddr, SocketAddr),
    /// server -> proxy's connecting socket
    server: (SocketAddr, SocketAddr),
    client_ifindex: u32,
    server_ifindex: u32,
}

pub fn try_hand_off(
    tc: &TcPath,
    maps: &Arc<KernelMaps>,
    client: &TcpStream,
    backend: &TcpStream,
    cookies: (u64, u64),
    baseline: Baseline,
    backend_id: u32,
) -> Attempt {
    let legs = match legs(tc, client, backend) {
        Ok(legs) => legs,
        Err(counter) => {
            counter.fetch_add(1, Ordering::Relaxed);
            return Attempt::Never;
        }
    };
    let Some(before) = quiet(maps, client, backend, cookies, baseline) else {
        return Attempt::NotNow;
    };
    let keys = [
        key(legs.client.0, legs.client.1),
        key(legs.server.0, legs.server.1),
    ];
    let pending = FlowEntry {
        backend: backend_id,
        state: FLOW_PENDING,
        ..FlowEntry::default()
    };
    {
        let mut flows = tc.flows.lock().expect("flows lock");
        for k in &keys {
            if let Err(e) = flows.insert(k, pending, 0) {
                debug!("hand-off: inserting the pending flows failed: {e}");
                let _ = flows.remove(&keys[0]);
                return Attempt::NotNow;
            }
        }
    }
    let abandon = |tc: &TcPath| {
        let mut flows = tc.flows.lock().expect("flows lock");
        for k in &keys {
            let _ = flows.remove(k);
        }
        tc.counters.retried.fetch_add(1, Ordering::Relaxed);
        Attempt::NotNow
    };
    let after = quiet(maps, client, backend, cookies, baseline);
    if after != Some(before) {
        debug!(?before, ?after, "hand-off abandoned: the session moved");
        return abandon(tc);
    }
    {
        let mut socks = maps.socks.lock().expect("socks lock");
        let _ = socks.remove(&cookies.0);
        let _ = socks.remove(&cookies.1);
    }
    let sequences = (|| {
        repair::enter(client)?;
        repair::enter(backend)?;
        let a = repair::sequences(client)?;
        let b = repair::sequences(backend)?;
        repair::quiet(client)?;
        repair::quiet(backend)?;
        std::io::Result::Ok((a, b))
    })();
    let ((a_snd, a_rcv), (b_snd, b_rcv)) = match sequences {
        Ok(s) => s,
        Err(e) => {
            // Without TCP_REPAIR (no CAP_NET_ADMIN) no session can be handed off: back to the
            // sockmap, for good.
            debug!("TCP_REPAIR failed ({e}); the session stays on the sockmap path");
            let _ = repair::leave(client);
            let _ = repair::leave(backend);
            reinsert(maps, client, backend, cookies);
            abandon(tc);
            tc.counters.mismatched.fetch_add(1, Ordering::Relaxed);
            return Attempt::Never;
        }
    };
    // A packet the program passed just before the fence may reach its socket only now (it sat
    // in the socket's backlog while a check above held the socket): a last look, after the
    // sequence numbers were read, so that none moved unseen.
    let last = quiet(maps, client, backend, cookies, baseline);
    if last != Some(before) {
        debug!(
            ?before,
            ?last,
            "hand-off abandoned: the session moved while it was read"
        );
        let _ = repair::leave(client);
        let _ = repair::leave(backend);
        reinsert(maps, client, backend, cookies);
        return abandon(tc);
    }
    // The idle timeout counts from the hand-off until the program sees a packet.
    let now = sockopt::monotonic_ns();
    // client -> server: the client's bytes continue the backend socket's stream; its acks
    // acknowledge what the backend socket received from the server.
    let to_server = FlowEntry {
        saddr: addr(legs.server.1),
        daddr: addr(legs.server.0),
        sport: legs.server.1.port().to_be(),
        dport: legs.server.0.port().to_be(),
        seq_delta: b_snd.wrapping_sub(a_rcv),
        ack_delta: b_rcv.wrapping_sub(a_snd),
        ifindex: legs.server_ifindex,
        backend: backend_id,
        state: FLOW_ACTIVE,
        side: SIDE_CLIENT,
        next_seq: b_snd,
        last_ns: now,
        ..FlowEntry::default()
    };
    let to_client = FlowEntry {
        saddr: addr(legs.client.1),
        daddr: addr(legs.client.0),
        sport: legs.client.1.port().to_be(),
        dport: legs.client.0.port().to_be(),
        seq_delta: a_snd.wrapping_sub(b_rcv),
        ack_delta: a_rcv.wrapping_sub(b_snd),
        ifindex: legs.client_ifindex,
        backend: backend_id,
        state: FLOW_ACTIVE,
        side: SIDE_BACKEND,
        next_seq: a_snd,
        last_ns: now,
        ..FlowEntry::default()
    };
    {
        let mut flows = tc.flows.lock().expect("flows lock");
        let _ = flows.insert(keys[0], to_server, 0);
        let _ = flows.insert(keys[1], to_client, 0);
    }
    tc.counters.handed_off.fetch_add(1, Ordering::Relaxed);
    debug!(client = %legs.client.0, "session handed to the TC program");
    Attempt::HandedOff(Flow::new(keys, (legs.client, legs.server)))
}

/// FLOWS' key of the packets from `from` to `to` (also what the stats look flows up by).
pub(super) fn key(from: SocketAddr, to: SocketAddr) -> FlowKey {
    FlowKey {
        saddr: addr(from),
        daddr: addr(to),
        sport: from.port().to_be(),
        dport: to.port().to_be(),
    }
}

/// An address as FLOWS holds it: the packet's bytes in native u32 words, IPv4 mapped.
fn addr(a: SocketAddr) -> [u32; 4] {
    let word = |b: &[u8]| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
    match a {
        SocketAddr::V4(a) => [0, 0, V4_MAPPED, word(&a.ip().octets())],
        SocketAddr::V6(a) => {
            let o = a.ip().octets();
            [word(&o[0..]), word(&o[4..]), word(&o[8..]), word(&o[12..])]
        }
    }
}

/// A socket's address as its packets carry it: an IPv4 client of a dual-stack listener is
/// IPv4 on the wire.
fn wire(a: std::io::Result<SocketAddr>) -> Option<SocketAddr> {
    let a = a.ok()?;
    Some(SocketAddr::new(a.ip().to_canonical(), a.port()))
}

/// The legs if this session can be spliced, else the counter that says why not.
fn legs<'a>(
    tc: &'a TcPath,
    client: &TcpStream,
    backend: &TcpStream,
) -> Result<Legs, &'a std::sync::atomic::AtomicU64> {
    let (Some(c_peer), Some(c_local), Some(s_peer), Some(s_local)) = (
        wire(client.peer_addr()),
        wire(client.local_addr()),
        wire(backend.peer_addr()),
        wire(backend.local_addr()),
    ) else {
        return Err(&tc.counters.mismatched);
    };
    if c_local.is_ipv4() != s_local.is_ipv4() {
        debug!(client = %c_peer, server = %s_peer, "session not joinable at the packet level: an IPv4 leg and an IPv6 leg");
        return Err(&tc.counters.mixed_family);
    }
    let (Ok(a), Ok(b)) = (repair::negotiated(client), repair::negotiated(backend)) else {
        return Err(&tc.counters.mismatched);
    };
    // The client's windows reach the server unscaled, and the other way round.
    let joinable = !a.timestamps_or_sack
        && !b.timestamps_or_sack
        && a.snd_wscale == b.rcv_wscale
        && b.snd_wscale == a.rcv_wscale
        && a.mss == b.mss;
    let ifaces = (tc.interface_of(c_local.ip()), tc.interface_of(s_local.ip()));
    match ifaces {
        (Some(client_ifindex), Some(server_ifindex)) if joinable => Ok(Legs {
            client: (c_peer, c_local),
            server: (s_peer, s_local),
            client_ifindex,
            server_ifindex,
        }),
        _ => {
            debug!(?a, ?b, ?ifaces, "session not joinable at the packet level");
            Err(&tc.counters.mismatched)
        }
    }
}

/// The sockets' counters if the session is quiet: both established, nothing unread, nothing
/// unacknowledged, and every byte the verdict forwarded to a socket handed to its TCP.
fn quiet(
    maps: &KernelMaps,
    client: &TcpStream,
    backend: &TcpStream,
    cookies: (u64, u64),
    baseline: Baseline,
) -> Option<[u64; 4]> {
    let forwarded_to = |cookie| {
        maps.sessions
            .lock()
            .expect("sessions lock")
            .get(&cookie, 0)
            .map(|e| e.bytes_tx)
            .ok()
    };
    let (to_client, to_backend) = (forwarded_to(cookies.0)?, forwarded_to(cookies.1)?);
    let (c, b) = (
        sockopt::tcp_counters(client).ok()?,
        sockopt::tcp_counters(backend).ok()?,
    );
    let established = c.state == 1 && b.state == 1;
    let drained = sockopt::queued_bytes(client).ok()? == 0
        && sockopt::queued_bytes(backend).ok()? == 0
        && repair::unacked_bytes(client).ok()? == 0
        && repair::unacked_bytes(backend).ok()? == 0;
    let delivered = c.bytes_written == baseline.client_written + to_client
        && b.bytes_written == baseline.backend_written + to_backend;
    if !(established && drained && delivered) {
        tracing::trace!(
            established,
            drained,
            delivered,
            ?c,
            ?b,
            to_client,
            to_backend,
            ?baseline,
            "not quiet"
        );
    }
    (established && drained && delivered).then_some([
        c.bytes_received,
        c.bytes_acked,
        b.bytes_received,
        b.bytes_acked,
    ])
}

fn reinsert(maps: &KernelMaps, client: &TcpStream, backend: &TcpStream, cookies: (u64, u64)) {
    use std::os::fd::AsRawFd as _;
    let mut socks = maps.socks.lock().expect("socks lock");
    let _ = socks.insert(cookies.1, backend.as_raw_fd(), 0);
    let _ = socks.insert(cookies.0, client.as_raw_fd(), 0);
    drop(socks);
    let _ = sockopt::kick(client);
    let _ = sockopt::kick(backend);
}
