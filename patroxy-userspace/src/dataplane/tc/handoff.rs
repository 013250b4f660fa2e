//! Moving one sockmap session to the TC program without losing or duplicating a byte.
//!
//! The order makes every failure safe to undo:
//! 1. both flows go into FLOWS as pending: from now on the program drops the session's data,
//!    FIN and RST segments (a sender retransmits them) and keeps their acknowledgments; bare
//!    ACKs still reach the sockets. So the sockets' receive side can no longer change.
//! 2. the sockets must have settled: nothing unread, nothing waiting in the sockmap's queues
//!    (each socket's TCP counted exactly the bytes the verdict gave it);
//! 3. both sockets leave SOCKS (their psocks are empty), enter TCP_REPAIR and give their
//!    sequence numbers; every byte each one sent must have reached its peer (acknowledged to
//!    the socket, or by a segment the program dropped), and the counters must not have moved
//!    since 2 (a packet the program passed just before 1 reaches its socket by then);
//! 4. the entries become active with the offsets between the two connections, and a sender
//!    whose segments were dropped gets duplicate ACKs (`nudge`) so that it retransmits them
//!    at once; the first dropped segment, if the program kept it, goes on to the other end.
//!
//! Otherwise the sockets go back to the sockmap, what the program held of the dropped segments
//! is given back to them, the entries go, and the session is tried again later. A
//! [`Mode::Quiet`] hand-off starts only from a quiet session and checks once, so it drops at
//! most what arrives during that check; a [`Mode::Fenced`] one (for a session that is never
//! quiet) waits behind the fence, [`FENCE_WINDOW`] or as long as its sockets still drain what
//! the sockmap had queued ([`FenceClock`]), for 2 and 3 to hold.
//!
//! Only sessions whose legs can be joined are tried: both legs of one family (a packet cannot
//! change from IPv6 to IPv4 by a rewrite), neither leg with timestamps (the SYN option
//! stripping keeps them out), SACK on both legs or neither, equal window scales crosswise and
//! equal MSS, and both local addresses on interfaces the programs are attached to.
use std::{
    net::{SocketAddr, TcpStream},
    sync::{Arc, atomic::Ordering},
};

use patroxy_common::{
    SIDE_BACKEND, SIDE_CLIENT,
    tc::{
        FLOW_ACKED, FLOW_ACTIVE, FLOW_DROPPED, FLOW_PENDING, FlowEntry, FlowKey, HeldSegment,
        V4_MAPPED,
    },
};
use tokio::time::{Duration, Instant};
use tracing::debug;

use super::{Flow, TcPath, nudge, repair};
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

/// How a hand-off knows that no byte is in flight between the proxy's two sockets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Only from a moment the session is already quiet: nothing is dropped but what arrives
    /// during the one check; a session under continuous load has no such moment (each side's
    /// next message carries the ack of the last one).
    Quiet,
    /// Fence first: the program drops the session's data segments (keeping their acks) while
    /// the sockets settle ([`FenceClock`]). A sender retransmits what was dropped
    /// after its retransmission timeout (200 ms at least), rewritten then: one pause per
    /// direction that was sending, the price of a busy session's hand-off.
    Fenced,
}

/// How long a fenced hand-off waits for the sockets to settle before it lifts the fence, unless
/// they are still draining.
const FENCE_WINDOW: Duration = Duration::from_millis(150);
/// How long a fenced hand-off may wait in all for sockets that are still sending what the sockmap
/// had queued when the fence went up: the sender the fence stops pays it once, and a bulk upload
/// whose client outran its server (the sockmap queues without limit) is worth it.
const FENCE_MAX: Duration = Duration::from_secs(1);
/// Added to a drain's estimate: the acknowledgment of its last bytes.
const DRAIN_SLACK: Duration = Duration::from_millis(10);
/// How often a drain's progress is looked at: a socket whose peer stops reading (its window
/// closed) stops draining, and its fence must not stand for the rest of an estimate.
const DRAIN_CHECK: Duration = Duration::from_millis(25);
/// How often a fenced hand-off looks at the sockets.
const FENCE_POLL: Duration = Duration::from_millis(1);

/// When a fenced attempt stops waiting for its sockets to settle: after [`FENCE_WINDOW`], or, while
/// they are still sending what the sockmap queued before the fence (nothing new comes in behind
/// it), once that is sent at the pace of the last stretch ([`DRAIN_CHECK`] long, the first
/// [`FENCE_WINDOW`]); never past [`FENCE_MAX`], and at once when the estimate goes past it or a
/// stretch sent nothing (a wait that cannot succeed only stalls the senders longer).
#[derive(Debug)]
struct FenceClock {
    fenced_at: Instant,
    deadline: Instant,
    /// When the deadline was last set, and the bytes unsent then.
    last: (Instant, Option<u64>),
}

impl FenceClock {
    fn new(now: Instant, unsent: Option<u64>) -> Self {
        Self {
            fenced_at: now,
            deadline: now + FENCE_WINDOW,
            last: (now, unsent),
        }
    }

    /// Whether to look at the sockets again; `unsent` reads how many bytes they have yet to send.
    fn keep_waiting(&mut self, now: Instant, unsent: impl FnOnce() -> Option<u64>) -> bool {
        if now < self.deadline {
            return true;
        }
        let (then, before) = self.last;
        let (Some(before), Some(unsent)) = (before, unsent()) else {
            return false;
        };
        let drained = before.saturating_sub(unsent);
        if drained == 0 {
            return false;
        }
        // At the last stretch's pace, with a quarter more for its ups and downs.
        let rest = (now - then).mul_f64(1.25 * unsent as f64 / drained as f64) + DRAIN_SLACK;
        if now + rest > self.fenced_at + FENCE_MAX {
            return false;
        }
        self.deadline = now + rest.min(DRAIN_CHECK);
        self.last = (now, Some(unsent));
        true
    }
}

/// The session's two legs, as the program sees them.
struct Legs {
    /// client -> proxy listener
    client: (SocketAddr, SocketAddr),
    /// server -> proxy's connecting socket
    server: (SocketAddr, SocketAddr),
    client_ifindex: u32,
    server_ifindex: u32,
    /// Both legs negotiated SACK (else neither did).
    sack: bool,
}

/// The session's sockets and what the checks compare them with.
struct Session<'a> {
    maps: &'a KernelMaps,
    client: &'a TcpStream,
    backend: &'a TcpStream,
    cookies: (u64, u64),
    baseline: Baseline,
}

#[allow(clippy::too_many_arguments)]
pub async fn try_hand_off(
    tc: &TcPath,
    maps: &Arc<KernelMaps>,
    client: &TcpStream,
    backend: &TcpStream,
    cookies: (u64, u64),
    baseline: Baseline,
    backend_id: u32,
    mode: Mode,
    interrupted: impl Future<Output = ()>,
) -> Attempt {
    let legs = match legs(tc, client, backend) {
        Ok(legs) => legs,
        Err(counter) => {
            counter.fetch_add(1, Ordering::Relaxed);
            return Attempt::Never;
        }
    };
    let session = Session {
        maps,
        client,
        backend,
        cookies,
        baseline,
    };
    // A quiet session's counters must not move behind the fence: a packet the program passed
    // just before it would reach its socket by the checks after.
    let expected = match mode {
        Mode::Quiet => match session.quiet() {
            Some(counters) => Some(counters),
            None => return Attempt::NotNow,
        },
        Mode::Fenced => None,
    };
    let keys = flow_keys(legs.client, legs.server);
    let pending = FlowEntry {
        backend: backend_id,
        state: FLOW_PENDING,
        ..FlowEntry::default()
    };
    // HELD is to hold this attempt's drops only: an entry a packet left just after an earlier
    // attempt took its own (or one of an earlier connection on the same 4-tuple, in another
    // sequence space) must not be sent on or given back.
    take_held(tc, &keys);
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
    // The program drops the session's data from now on. A quiet session is checked once; a
    // busy one until its sockets settle, first after a pause that lets a packet passed just
    // before the fence reach its socket.
    let unsent = match mode {
        Mode::Fenced => session.unsent(),
        Mode::Quiet => None,
    };
    let mut clock = FenceClock::new(Instant::now(), unsent);
    let mut interrupted = std::pin::pin!(interrupted);
    let taken = loop {
        if mode == Mode::Fenced {
            // A kill or a hand-over to a successor does not wait for a long drain.
            tokio::select! {
                () = tokio::time::sleep(FENCE_POLL) => {}
                () = &mut interrupted => break None,
            }
        }
        match session.take_over(tc, &keys, expected) {
            Ok(Some(sequences)) => break Some(sequences),
            Ok(None)
                if mode == Mode::Fenced
                    && clock.keep_waiting(Instant::now(), || session.unsent()) => {}
            Ok(None) => break None,
            Err(e) => {
                // Without TCP_REPAIR (no CAP_NET_ADMIN) no session can be handed off: back to
                // the sockmap, for good.
                debug!("TCP_REPAIR failed ({e}); the session stays on the sockmap path");
                abandon(tc, &legs, (client, backend), &keys, mode).await;
                tc.counters.mismatched.fetch_add(1, Ordering::Relaxed);
                return Attempt::Never;
            }
        }
    };
    let Some(Taken {
        client: (a_snd, a_rcv),
        backend: (b_snd, b_rcv),
        dropped,
    }) = taken
    else {
        let given_back = abandon(tc, &legs, (client, backend), &keys, mode).await;
        debug!(
            ?mode,
            ?given_back,
            "hand-off abandoned: the session did not settle"
        );
        tc.counters.retried.fetch_add(1, Ordering::Relaxed);
        return Attempt::NotNow;
    };
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
        start_seq: b_snd,
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
        start_seq: a_snd,
        last_ns: now,
        ..FlowEntry::default()
    };
    {
        let mut flows = tc.flows.lock().expect("flows lock");
        let _ = flows.insert(keys[0], to_server, 0);
        let _ = flows.insert(keys[1], to_client, 0);
    }
    tc.counters.handed_off.fetch_add(1, Ordering::Relaxed);
    if mode == Mode::Fenced {
        tc.counters.fenced.fetch_add(1, Ordering::Relaxed);
    }
    // Held data from where the proxy's socket stopped receiving goes on (below), from the
    // proxy's end of the other connection, in that connection's numbers.
    let held = take_held(tc, &keys);
    let rest = [(0, a_rcv), (1, b_rcv)].map(|(i, rcv)| {
        held[i]
            .as_ref()
            .filter(|_| dropped[i])
            .and_then(|h| h.from_seq(rcv))
    });
    let held_bytes = rest.map(|r| r.map_or(0, <[u8]>::len));
    // Where each direction's held data starts relative to what the proxy's socket expected
    // next, and how long it is: a copy that does not start at or before it cannot be used.
    let held_at = [(0, a_rcv), (1, b_rcv)].map(|(i, rcv)| {
        held[i]
            .as_ref()
            .map(|h| (h.seq.wrapping_sub(rcv) as i32, h.len))
    });
    let fenced_ms = clock.fenced_at.elapsed().as_millis();
    debug!(client = %legs.client.0, ?mode, fenced_ms, ?dropped, ?held_bytes, ?held_at, "session handed to the TC program");
    // Without SACK, the senders of what the fence dropped retransmit it now rather than at
    // their timeout, to the active flows. Sent from the proxy's end of each connection, in its
    // numbers. (A SACK sender takes no notice of duplicate ACKs without SACK blocks: it learns
    // of the loss from the other end's SACK of what it sends next, or from its tail loss probe.)
    let client_end = (client, legs.client, (a_snd, a_rcv));
    let server_end = (backend, legs.server, (b_snd, b_rcv));
    if !legs.sack {
        if dropped[0] {
            speak_for(tc, client_end, &[]);
        }
        if dropped[1] {
            speak_for(tc, server_end, &[]);
        }
    }
    if let Some(rest) = rest[0] {
        speak_for(tc, server_end, rest);
    }
    if let Some(rest) = rest[1] {
        speak_for(tc, client_end, rest);
    }
    Attempt::HandedOff(Flow::new(keys, (legs.client, legs.server)))
}

/// The flow of a session a predecessor (an upgrade) or a crashed run had handed to the TC
/// program, if both its entries are in FLOWS and active: the program goes on forwarding it and
/// only the watch starts again. Entries an attempt left pending (a crash behind its fence) are
/// removed, so the session's packets reach its sockets again.
pub fn carried_flow(tc: &TcPath, client: &TcpStream, backend: &TcpStream) -> Option<Flow> {
    let (client_leg, server_leg) = wire_legs(client, backend)?;
    let keys = flow_keys(client_leg, server_leg);
    match tc.flow_entries(&keys) {
        [None, None] => None,
        [Some(a), Some(b)] if a.state == FLOW_ACTIVE && b.state == FLOW_ACTIVE => {
            Some(Flow::new(keys, (client_leg, server_leg)))
        }
        _ => {
            debug!(client = %client_leg.0, "a taken-over session's flows were pending: the fence is lifted");
            lift_fence(tc, &keys);
            None
        }
    }
}

/// Sends, from the proxy's end of a connection (`socket` in repair mode, its `leg` (peer,
/// proxy's address), its `(snd_nxt, rcv_nxt)`), duplicate ACKs (an empty `payload`) or what the
/// program held, and counts them.
fn speak_for(
    tc: &TcPath,
    (socket, leg, (snd, rcv)): (&TcpStream, (SocketAddr, SocketAddr), (u32, u32)),
    payload: &[u8],
) {
    let sent = repair::negotiated(socket).and_then(|n| {
        let end = nudge::ProxyEnd {
            from: leg.1,
            to: leg.0,
            seq: snd,
            ack: rcv,
            window: repair::advertised_window(socket, n.rcv_wscale)?,
            mss: n.mss as usize,
        };
        tc.nudger.send(&end, payload)
    });
    // Senders nudged count once; held segments, each.
    let (counter, what) = if payload.is_empty() {
        (&tc.counters.nudged, "duplicate ACKs")
    } else {
        (&tc.counters.forwarded, "the held segments")
    };
    match sent {
        Ok(packets) => {
            let n = if payload.is_empty() { 1 } else { packets };
            counter.fetch_add(n as u64, Ordering::Relaxed);
        }
        Err(e) => {
            debug!(peer = %leg.0, "{what} not sent after the hand-off ({e}): the sender retransmits at its timeout")
        }
    }
}

/// The held segments of both directions, removed from HELD.
fn take_held(tc: &TcPath, keys: &[FlowKey; 2]) -> [Option<HeldSegment>; 2] {
    let mut held = tc.held.lock().expect("held lock");
    keys.map(|k| {
        let segment = held.get(&k, 0).ok();
        let _ = held.remove(&k);
        segment
    })
}

/// What [`Session::take_over`] took: each socket's (send, receive) sequence numbers, and
/// whether the program dropped segments from [client, server] behind the fence.
struct Taken {
    client: (u32, u32),
    backend: (u32, u32),
    dropped: [bool; 2],
}

/// The pending entries go: the session's packets reach its sockets again (and the ones dropped
/// meanwhile are retransmitted to them). Returns what the program held of them.
fn lift_fence(tc: &TcPath, keys: &[FlowKey; 2]) -> [Option<HeldSegment>; 2] {
    let mut flows = tc.flows.lock().expect("flows lock");
    for k in keys {
        let _ = flows.remove(k);
    }
    drop(flows);
    take_held(tc, keys)
}

/// Ends an abandoned attempt. After a fenced one, what the fence dropped and the program held
/// goes back to the proxy's sockets while the fence still stands, and the fence lifts once each
/// sender has had time to get their acknowledgment (two round trips, 1 to 20 ms): what was
/// held can be up to [`FENCE_MAX`] old, so a sender's retransmission of it may be on its
/// way, and one that covers more than was given back would overlap it, which the sockmap
/// forwards twice (the kernel's `tcp_read_skb`, README "Data path"); the fence drops it
/// instead. What was held during that wait (an answer to what was given back), and all a
/// quiet attempt held (during its one check), goes back after the lift: it is too fresh for
/// its sender to retransmit yet. (A quiet attempt of a bulk session holding its fence for
/// milliseconds would cost the sender a window of drops each time.) Returns the bytes given
/// back each way.
async fn abandon(
    tc: &TcPath,
    legs: &Legs,
    sockets: (&TcpStream, &TcpStream),
    keys: &[FlowKey; 2],
    mode: Mode,
) -> [usize; 2] {
    let first = match mode {
        Mode::Fenced => give_back(tc, legs, sockets, take_held(tc, keys)),
        Mode::Quiet => [0, 0],
    };
    if first != [0, 0] {
        let rtt = |s: &TcpStream| sockopt::tcp_info(s).map_or(0, |i| i.tcpi_rtt);
        let rtt = Duration::from_micros(u64::from(rtt(sockets.0).max(rtt(sockets.1))));
        tokio::time::sleep((2 * rtt).clamp(ACK_WAIT_MIN, ACK_WAIT_MAX)).await;
    }
    let held = lift_fence(tc, keys);
    let then = give_back(tc, legs, sockets, held);
    [first[0] + then[0], first[1] + then[1]]
}

/// How long [`abandon`] keeps the fence after giving back, at least and at most.
const ACK_WAIT_MIN: Duration = Duration::from_millis(1);
const ACK_WAIT_MAX: Duration = Duration::from_millis(20);

/// Gives what the fence dropped and the program held to the proxy's own sockets (client's,
/// then server's direction), as its sender sent it: a raw packet from the peer's address to the
/// socket's, which the kernel delivers locally (not through the interfaces the programs are
/// on). The sender then has it acknowledged at once rather than retransmitting it at its
/// timeout, 200 ms at least and one pause per abandoned attempt. The program holds only from
/// the socket's next expected byte on, so nothing given back overlaps what the socket has.
/// Returns the bytes given back each way.
fn give_back(
    tc: &TcPath,
    legs: &Legs,
    (client, backend): (&TcpStream, &TcpStream),
    held: [Option<HeldSegment>; 2],
) -> [usize; 2] {
    let mut given = [0; 2];
    let ends = [(legs.client, client), (legs.server, backend)];
    for (i, ((peer, local), socket)) in ends.into_iter().enumerate() {
        let Some(held) = &held[i] else { continue };
        let payload = held.payload();
        let sent = repair::negotiated(socket).and_then(|n| {
            let sender = nudge::ProxyEnd {
                from: peer,
                to: local,
                seq: held.seq,
                ack: held.ack,
                window: held.window,
                mss: n.mss as usize,
            };
            tc.nudger.send(&sender, payload)
        });
        match sent {
            Ok(packets) => {
                tc.counters
                    .given_back
                    .fetch_add(packets as u64, Ordering::Relaxed);
                given[i] = payload.len();
            }
            Err(e) => {
                debug!(%peer, "held segments not given back to the proxy's socket ({e}): the sender retransmits at its timeout");
            }
        }
    }
    given
}

impl Session<'_> {
    /// The sockets' counters if the session is quiet now: settled, and every byte each socket
    /// sent acknowledged.
    fn quiet(&self) -> Option<[u64; 2]> {
        let counters = self.settled()?;
        let acked = |socket| repair::unacked_bytes(socket).is_ok_and(|n| n == 0);
        (acked(self.client) && acked(self.backend)).then_some(counters)
    }

    /// Behind the fence: if the sockets have settled and every byte they sent reached its peer
    /// (acknowledged to the socket, or in a segment the program dropped), both sockets leave
    /// SOCKS and stay in repair mode, and their (send, receive) sequence numbers come back.
    /// `None`: not yet (or the counters are not `expected`), and the sockets are as they were.
    fn take_over(
        &self,
        tc: &TcPath,
        keys: &[FlowKey; 2],
        expected: Option<[u64; 2]>,
    ) -> std::io::Result<Option<Taken>> {
        let Some(before) = self.settled() else {
            return Ok(None);
        };
        if expected.is_some_and(|e| e != before) {
            return Ok(None);
        }
        let (client, backend) = (self.client, self.backend);
        // A socket with bytes unacknowledged whose peer has sent no acknowledgment behind the
        // fence cannot pass the check below yet: not worth taking the sockets out of SOCKS and
        // into repair mode for (a fenced attempt looks every millisecond).
        let pending = tc.flow_entries(keys);
        let waiting_for_ack = |socket: &TcpStream, from_peer: Option<FlowEntry>| {
            repair::unacked_bytes(socket).is_ok_and(|n| n > 0)
                && from_peer.is_none_or(|e| e.seen & FLOW_ACKED == 0)
        };
        if waiting_for_ack(client, pending[0]) || waiting_for_ack(backend, pending[1]) {
            return Ok(None);
        }
        {
            let mut socks = self.maps.socks.lock().expect("socks lock");
            let _ = socks.remove(&self.cookies.0);
            let _ = socks.remove(&self.cookies.1);
        }
        let sequences = (|| {
            repair::enter(client)?;
            repair::enter(backend)?;
            let a = repair::sequences(client)?;
            let b = repair::sequences(backend)?;
            std::io::Result::Ok((a, b))
        })();
        let back = || {
            let _ = repair::leave(client);
            let _ = repair::leave(backend);
            reinsert(self.maps, client, backend, self.cookies);
        };
        let (a, b) = match sequences {
            Ok(s) => s,
            Err(e) => {
                back();
                return Err(e);
            }
        };
        let pending = tc.flow_entries(keys);
        let reached = |socket: &TcpStream, snd_nxt: u32, from_peer: Option<FlowEntry>| {
            repair::unacked_bytes(socket).is_ok_and(|n| n == 0)
                || from_peer.is_some_and(|e| {
                    e.seen & FLOW_ACKED != 0 && e.peer_ack.wrapping_sub(snd_nxt) as i32 >= 0
                })
        };
        let acked = reached(client, a.0, pending[0]) && reached(backend, b.0, pending[1]);
        // A packet the program passed just before the fence may reach its socket only now (it
        // sat in the socket's backlog while a check above held the socket): a last look, after
        // the sequence numbers were read, so that none moved unseen.
        let after = self.settled();
        if !acked || after != Some(before) {
            tracing::trace!(acked, ?before, ?after, "hand-off: not settled yet");
            back();
            return Ok(None);
        }
        if let Err(e) = repair::quiet(client).and_then(|()| repair::quiet(backend)) {
            back();
            return Err(e);
        }
        Ok(Some(Taken {
            client: a,
            backend: b,
            dropped: pending.map(|e| e.is_some_and(|e| e.seen & FLOW_DROPPED != 0)),
        }))
    }

    /// The bytes the sockmap gave the two sockets to send that they have not sent yet (still in
    /// its queue or in their send queues).
    fn unsent(&self) -> Option<u64> {
        let sides = self.sides()?;
        Some(
            sides
                .iter()
                .map(|(c, given)| given.saturating_sub(c.bytes_written - c.not_sent))
                .sum(),
        )
    }

    /// Each socket's TCP counters and the bytes it was given to send (written by userspace
    /// before the splice, then forwarded by the verdict), client's then backend's.
    ///
    /// The sockets first, the verdict's counts after: the verdict runs in the same locked step
    /// as the receive it counts, so every byte a socket counted as received is in the counts
    /// read after it. Read the other way round, a segment arriving in between is in the
    /// socket's count but not yet forwarded, and a busy session passes for quiet.
    fn sides(&self) -> Option<[(sockopt::TcpCounters, u64); 2]> {
        let counters = [
            sockopt::tcp_counters(self.client).ok()?,
            sockopt::tcp_counters(self.backend).ok()?,
        ];
        let sessions = self.maps.sessions.lock().expect("sessions lock");
        let forwarded = |cookie| sessions.get(&cookie, 0).map(|e| e.bytes_tx).ok();
        Some([
            (
                counters[0],
                self.baseline.client_written + forwarded(self.cookies.0)?,
            ),
            (
                counters[1],
                self.baseline.backend_written + forwarded(self.cookies.1)?,
            ),
        ])
    }

    /// The bytes each socket received if the session has settled: both established, nothing
    /// unread, every byte the verdict forwarded to a socket handed to its TCP, and sent. (Bytes
    /// a socket sent may still be unacknowledged: [`Session::take_over`] asks about those.)
    ///
    /// Nothing unsent, because a socket in repair mode with its send queue selected (as
    /// [`repair::sequences`] selects it to read it) "sends" its whole unsent queue without
    /// transmitting it when an ACK arrives: the bytes then wait for the retransmission timeout
    /// once the attempt is abandoned, and TCP_INFO never counts them as sent (only as
    /// retransmitted), so the session would never look delivered again.
    fn settled(&self) -> Option<[u64; 2]> {
        let [(c, to_client), (b, to_backend)] = self.sides()?;
        let drained = sockopt::queued_bytes(self.client).ok()? == 0
            && sockopt::queued_bytes(self.backend).ok()? == 0
            && c.not_sent == 0
            && b.not_sent == 0;
        let established = c.state == 1 && b.state == 1;
        let delivered = c.bytes_written == to_client && b.bytes_written == to_backend;
        if !(established && drained && delivered) {
            tracing::trace!(
                established,
                drained,
                delivered,
                ?c,
                ?b,
                to_client,
                to_backend,
                client_mem = ?sockopt::meminfo(self.client).ok(),
                backend_mem = ?sockopt::meminfo(self.backend).ok(),
                "not settled"
            );
        }
        (established && drained && delivered).then_some([c.bytes_received, b.bytes_received])
    }
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

/// The FLOWS keys of a session, [client -> proxy, server -> proxy], from its (peer, local)
/// legs.
fn flow_keys(client: (SocketAddr, SocketAddr), server: (SocketAddr, SocketAddr)) -> [FlowKey; 2] {
    [key(client.0, client.1), key(server.0, server.1)]
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

/// The session's (peer, local) addresses of each socket as its packets carry them.
type WireLegs = ((SocketAddr, SocketAddr), (SocketAddr, SocketAddr));

fn wire_legs(client: &TcpStream, backend: &TcpStream) -> Option<WireLegs> {
    Some((
        (wire(client.peer_addr())?, wire(client.local_addr())?),
        (wire(backend.peer_addr())?, wire(backend.local_addr())?),
    ))
}

/// The legs if this session can be spliced, else the counter that says why not.
fn legs<'a>(
    tc: &'a TcPath,
    client: &TcpStream,
    backend: &TcpStream,
) -> Result<Legs, &'a std::sync::atomic::AtomicU64> {
    let Some(((c_peer, c_local), (s_peer, s_local))) = wire_legs(client, backend) else {
        return Err(&tc.counters.mismatched);
    };
    if c_local.is_ipv4() != s_local.is_ipv4() {
        debug!(client = %c_peer, server = %s_peer, "session not joinable at the packet level: an IPv4 leg and an IPv6 leg");
        return Err(&tc.counters.mixed_family);
    }
    let (Ok(a), Ok(b)) = (repair::negotiated(client), repair::negotiated(backend)) else {
        return Err(&tc.counters.mismatched);
    };
    // The client's windows reach the server unscaled, and the other way round. SACK blocks
    // are moved with the ack, but a sender that negotiated SACK must hear them (RACK and tail
    // loss probes rely on them) and one that did not would drop them: both legs or neither.
    let joinable = !a.timestamps
        && !b.timestamps
        && a.sack == b.sack
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
            sack: a.sack,
        }),
        _ => {
            debug!(?a, ?b, ?ifaces, "session not joinable at the packet level");
            Err(&tc.counters.mismatched)
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_fence_whose_sockets_send_nothing_lifts_after_its_window() {
        let start = Instant::now();
        let mut clock = FenceClock::new(start, Some(5_000_000));
        assert!(clock.keep_waiting(start + 149 * MS, || panic!("read before the window ends")));
        assert!(!clock.keep_waiting(start + FENCE_WINDOW, || Some(5_000_000)));
        let mut unread = FenceClock::new(start, None);
        assert!(!unread.keep_waiting(start + FENCE_WINDOW, || Some(0)));
    }

    #[test]
    fn a_fence_waits_while_a_deep_queue_drains_at_a_pace_that_ends_within_the_cap() {
        let start = Instant::now();
        // 60 MB queued, 30 MB sent in the first 150 ms: 30 MB more take 150 ms, 187.5 ms with
        // the margin, looked at every 25 ms.
        let mut clock = FenceClock::new(start, Some(60_000_000));
        let mut at = start + FENCE_WINDOW;
        assert!(clock.keep_waiting(at, || Some(30_000_000)));
        assert_eq!(clock.deadline, at + DRAIN_CHECK);
        assert!(clock.keep_waiting(at + 20 * MS, || panic!("read before the next check")));
        let mut unsent = 30_000_000;
        while unsent > 0 {
            at = clock.deadline;
            unsent -= 5_000_000;
            assert!(clock.keep_waiting(at, || Some(unsent)), "{unsent} B to go");
        }
        // Drained, the acknowledgments not yet in: a last short wait, then no more.
        assert_eq!(clock.deadline, at + DRAIN_SLACK);
        assert!(!clock.keep_waiting(clock.deadline, || Some(0)));
    }

    #[test]
    fn a_fence_lifts_when_a_stretch_sends_nothing() {
        let start = Instant::now();
        // A client that stopped reading: its window closed 20 MB short.
        let mut clock = FenceClock::new(start, Some(40_000_000));
        let at = start + FENCE_WINDOW;
        assert!(clock.keep_waiting(at, || Some(20_000_000)));
        assert!(!clock.keep_waiting(clock.deadline, || Some(20_000_000)));
    }

    #[test]
    fn a_fence_lifts_at_once_when_the_drain_would_outlast_the_cap() {
        let start = Instant::now();
        // 10 MB sent in 150 ms, 100 MB to go: 1.5 s more, past the 1 s cap.
        let mut clock = FenceClock::new(start, Some(110_000_000));
        assert!(!clock.keep_waiting(start + FENCE_WINDOW, || Some(100_000_000)));
        // A pace that slows later is cut off the same way: 300 KB in 25 ms, 19.7 MB to go.
        let mut clock = FenceClock::new(start, Some(40_000_000));
        let at = start + FENCE_WINDOW;
        assert!(clock.keep_waiting(at, || Some(20_000_000)));
        assert!(!clock.keep_waiting(clock.deadline, || Some(19_700_000)));
    }
}
