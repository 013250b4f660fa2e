//! A session the TC program carries: watched through its two FLOWS entries until FIN both
//! ways, a RST, the idle timeout or a kill ends it. The proxy's two sockets stay open in repair
//! mode meanwhile, so the local ports stay reserved, and are closed silently at the end.
use std::{net::SocketAddr, time::Duration};

use patroxy_common::tc::{FLOW_FIN, FLOW_RST, FlowEntry, FlowKey};
use tokio::time::sleep;
use tracing::debug;

use super::{TcPath, repair};
use crate::dataplane::{EndReason, KillSwitch, sockopt};

/// How often the entries of a flow that is moving are read: the delay of a session's end.
const POLL: Duration = Duration::from_millis(20);
/// ... and, doubling from [`POLL`] while no packet passes, of an idle one: a thousand idle
/// spliced sessions wake the proxy 2000 times a second rather than 50,000. A FIN or RST after
/// a long silence is noticed this late at most; the idle timeout still ends on time.
const IDLE_POLL: Duration = Duration::from_millis(500);
/// After FIN both ways the entries stay until neither end has sent anything for this long: a
/// lost FIN, last bytes or last ACK are sent again (RTO from 200 ms, doubling) and must still
/// find their flow; seeing a FIN pass says nothing of its arrival. Under 1 % loss a 200 ms
/// linger left a client in FIN-WAIT-2 for good (the server's retransmitted "bye" and FIN met
/// no entry).
const QUIET_AFTER_FIN: Duration = Duration::from_secs(1);
/// ... but no longer than this: a peer that keeps sending after both FINs is not waited for.
const MAX_LINGER: Duration = Duration::from_secs(5);

pub struct Flow {
    /// [client -> proxy, server -> proxy].
    keys: [FlowKey; 2],
    /// (client, listener address), (server, proxy's address toward it).
    legs: ((SocketAddr, SocketAddr), (SocketAddr, SocketAddr)),
}

/// How the watch of a flow ended.
pub enum FlowOutcome {
    Ended(FlowEnd),
    /// A successor watches it from now on: the entries stay, the sockets (client, backend)
    /// go to it.
    HandedOver(std::net::TcpStream, std::net::TcpStream),
}

/// Bytes the program forwarded (from client, from server) and how the flow ended.
pub struct FlowEnd {
    pub reason: EndReason,
    pub bytes_from_client: u64,
    pub bytes_from_server: u64,
}

impl Flow {
    pub(super) fn new(
        keys: [FlowKey; 2],
        legs: ((SocketAddr, SocketAddr), (SocketAddr, SocketAddr)),
    ) -> Self {
        Self { keys, legs }
    }

    fn entries(&self, tc: &TcPath) -> [Option<FlowEntry>; 2] {
        tc.flow_entries(&self.keys)
    }

    /// Watches the flow until it ends (or a successor takes it over); `client` and `backend`
    /// are the repair-mode sockets, closed silently at the end.
    pub async fn run(
        self,
        tc: &TcPath,
        client: std::net::TcpStream,
        backend: std::net::TcpStream,
        idle_timeout: Duration,
        kill: &KillSwitch,
    ) -> FlowOutcome {
        let mut last = self.entries(tc);
        let mut pause = POLL;
        let reason = loop {
            tokio::select! {
                reason = kill.killed() => {
                    // The resets need the sequence numbers of now, not of the last read (up
                    // to IDLE_POLL ago, and packets may have passed since).
                    if let now @ [Some(_), Some(_)] = self.entries(tc) {
                        last = now;
                    }
                    break EndReason::Killed(reason);
                }
                // The program forwards on meanwhile; after the FINs the linger below is not
                // cut short (at most MAX_LINGER), so a successor never meets a closing flow.
                () = kill.handing_over() => return FlowOutcome::HandedOver(client, backend),
                () = sleep(pause) => {}
            }
            let now = self.entries(tc);
            let [Some(to_server), Some(to_client)] = now else {
                // A SYN on the client's 4-tuple cleared it: the client started anew.
                break EndReason::ClientClose;
            };
            let moved = last_activity(&last) != last_activity(&now);
            last = now;
            // FIN both ways first: a RST seen since then (a host whose socket is gone answering
            // a late duplicate) does not make a clean close a reset.
            if to_server.seen & to_client.seen & FLOW_FIN != 0 {
                last = self.linger(tc, kill).await.unwrap_or(last);
                break if to_client.fin_ns < to_server.fin_ns {
                    EndReason::ServerClose
                } else {
                    EndReason::ClientClose
                };
            }
            if to_server.seen & FLOW_RST != 0 {
                break EndReason::ClientReset;
            }
            if to_client.seen & FLOW_RST != 0 {
                break EndReason::ServerReset;
            }
            let idle_ns =
                sockopt::monotonic_ns().saturating_sub(to_server.last_ns.max(to_client.last_ns));
            let idle = Duration::from_nanos(idle_ns);
            if idle >= idle_timeout {
                break EndReason::Timeout;
            }
            pause = next_pause(pause, moved, idle_timeout - idle);
        };
        self.remove(tc);
        let bytes = |e: &Option<FlowEntry>| e.map_or(0, |e| e.bytes);
        let end = FlowEnd {
            bytes_from_client: bytes(&last[0]),
            bytes_from_server: bytes(&last[1]),
            reason,
        };
        // Closed in repair mode: the kernel sends nothing for either socket (and the resets
        // below rebuild sockets on their 4-tuples).
        drop((client, backend));
        if matches!(end.reason, EndReason::Killed(_) | EndReason::Timeout)
            && let [Some(to_server), Some(to_client)] = last
        {
            self.reset_both(&to_server, &to_client);
        }
        FlowOutcome::Ended(end)
    }

    /// Waits after FIN both ways until the flow has been quiet for [`QUIET_AFTER_FIN`] (or
    /// [`MAX_LINGER`] passed, the entries went, or the session was killed); the entries then.
    async fn linger(&self, tc: &TcPath, kill: &KillSwitch) -> Option<[Option<FlowEntry>; 2]> {
        let deadline = tokio::time::Instant::now() + MAX_LINGER;
        loop {
            tokio::select! {
                _ = kill.killed() => return None,
                () = sleep(POLL) => {}
            }
            let now = self.entries(tc);
            let [Some(to_server), Some(to_client)] = now else {
                return None;
            };
            let quiet_ns =
                sockopt::monotonic_ns().saturating_sub(to_server.last_ns.max(to_client.last_ns));
            if Duration::from_nanos(quiet_ns) >= QUIET_AFTER_FIN
                || tokio::time::Instant::now() >= deadline
            {
                return Some(now);
            }
        }
    }

    fn remove(&self, tc: &TcPath) {
        let mut flows = tc.flows.lock().expect("flows lock");
        for k in &self.keys {
            let _ = flows.remove(k);
        }
    }

    /// A RST to each end with the sequence numbers it expects now.
    fn reset_both(&self, to_server: &FlowEntry, to_client: &FlowEntry) {
        let ((client, listener), (server, local)) = self.legs;
        // What each end sent last, in its own sequence space.
        let client_next = to_server.next_seq.wrapping_sub(to_server.seq_delta);
        let server_next = to_client.next_seq.wrapping_sub(to_client.seq_delta);
        for (local, peer, snd, rcv) in [
            (listener, client, to_client.next_seq, client_next),
            (local, server, to_server.next_seq, server_next),
        ] {
            if let Err(e) = repair::reset_peer(local, peer, snd, rcv) {
                debug!(%peer, "resetting a spliced connection's end: {e}");
            }
        }
    }
}

/// The newest packet time of either direction (what "moved" compares).
fn last_activity(entries: &[Option<FlowEntry>; 2]) -> Option<u64> {
    entries.iter().flatten().map(|e| e.last_ns).max()
}

/// The pause before the next read: [`POLL`] after a packet passed, else twice the last, up
/// to [`IDLE_POLL`] and never past the idle timeout (`until_timeout` from now).
fn next_pause(pause: Duration, moved: bool, until_timeout: Duration) -> Duration {
    let pause = if moved {
        POLL
    } else {
        (pause * 2).min(IDLE_POLL)
    };
    pause.min(until_timeout).max(Duration::from_millis(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_flow_is_read_less_and_less_often_and_a_moving_one_every_poll() {
        let far = Duration::from_secs(3600);
        let mut pause = POLL;
        let mut seen = Vec::new();
        for _ in 0..7 {
            pause = next_pause(pause, false, far);
            seen.push(pause.as_millis());
        }
        assert_eq!(seen, [40, 80, 160, 320, 500, 500, 500]);
        assert_eq!(next_pause(IDLE_POLL, true, far), POLL);
    }

    #[test]
    fn the_pause_never_passes_the_idle_timeout() {
        let pause = next_pause(IDLE_POLL, false, Duration::from_millis(70));
        assert_eq!(pause, Duration::from_millis(70));
        // At the deadline itself, the next read comes at once (a millisecond).
        assert_eq!(
            next_pause(POLL, false, Duration::ZERO),
            Duration::from_millis(1)
        );
    }
}
