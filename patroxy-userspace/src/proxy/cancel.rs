//! CancelRequests: recognised in a connection's first bytes and passed on to the servers that
//! may run the backend they name, instead of being balanced like a session.
//!
//! libpq (psql's Ctrl-C, `PQcancel`), JDBC and the other drivers cancel a query by opening a new
//! connection to the same address and sending 16 bytes: length 16, code 80877102, the backend's
//! pid and secret key. Balanced like any connection (as HAProxy does), it reaches the other
//! server of a round-robin listener as often as not, and that server ignores it. PostgreSQL
//! ignores a cancel whose pid and key do not match one of its backends, so passing it to every
//! server that may hold the backend is safe: first the servers where the same client address
//! has live sessions, else every UP server of the listener (and, for a `first` listener, the
//! server it wrote to before the current one: after a failover the old primary may still run
//! the query). A cancel takes no server slot and waits in no queue; every server connection it
//! opens is a fork on that server, hence the rate limit (`cancel_limit`).
//!
//! Cancels sent over TLS (PostgreSQL 17+ libpq, when the session used TLS) start with an
//! SSLRequest like any TLS session: patroxy passes TLS through unread, so it cannot tell them
//! apart; they are balanced as before, and counted among the encrypted starts.
use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, atomic::Ordering::Relaxed},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    task::JoinSet,
    time::timeout,
};
use tracing::{info, warn};

use super::{Proxy, cancel_limit::CancelDropped};
use crate::config::Balance;

/// Length and code of a CancelRequest: its first 8 bytes.
const CANCEL_HEADER: [u8; 8] = [0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e];
/// A CancelRequest's length: the header, the backend's pid and its secret key.
pub(super) const CANCEL_LEN: usize = 16;
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
const GSSENC_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30];
/// A TLS handshake record: PostgreSQL 17's direct TLS (`sslnegotiation=direct`) starts so.
const TLS_HANDSHAKE: u8 = 0x16;
/// How long a server gets to take a cancel and close: PostgreSQL signals the backend and
/// closes at once, so a slower answer means the server is in trouble.
const SERVER_ANSWER: Duration = Duration::from_secs(2);

/// What a connection's first bytes (peeked, not read) say it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum FirstBytes {
    /// A CancelRequest, all 16 bytes of it arrived.
    Cancel,
    /// So far a prefix of a CancelRequest: wait for more before deciding.
    Incomplete,
    /// An SSLRequest, a GSSENCRequest or a TLS handshake: passed through unread.
    Encrypted,
    /// Anything else (a startup packet): a session, as ever.
    Session,
}

/// Classifies a connection by the bytes arrived so far (at least one). Only a CancelRequest's
/// prefix of at least its length field waits for more; every other start is decided by what is
/// there, so no session start is delayed. Fewer than 4 bytes are a session: libpq sends a
/// cancel in one write, and a client that sends a byte and waits for its answer (no PostgreSQL
/// client, but a test's echo protocol) must not wait for bytes it will never send.
pub(super) fn classify(first: &[u8]) -> FirstBytes {
    let header = &first[..first.len().min(CANCEL_HEADER.len())];
    if header.len() >= 4 && CANCEL_HEADER.starts_with(header) {
        return if first.len() >= CANCEL_LEN {
            FirstBytes::Cancel
        } else {
            FirstBytes::Incomplete
        };
    }
    if first[0] == TLS_HANDSHAKE
        || first.starts_with(&SSL_REQUEST)
        || first.starts_with(&GSSENC_REQUEST)
    {
        return FirstBytes::Encrypted;
    }
    FirstBytes::Session
}

/// Per listener, the last two servers sessions went to: for a `first` listener, the current
/// write target and the one before it (the primary before a failover).
#[derive(Default)]
pub(super) struct RecentServers(Mutex<(Option<usize>, Option<usize>)>);

impl RecentServers {
    pub(super) fn note(&self, server: usize) {
        let mut recent = self.0.lock().expect("recent servers lock");
        if recent.0 != Some(server) {
            *recent = (Some(server), recent.0);
        }
    }

    fn previous(&self) -> Option<usize> {
        self.0.lock().expect("recent servers lock").1
    }
}

impl Proxy {
    /// Serves a connection whose first bytes are a CancelRequest (see [`classify`]): reads it,
    /// applies the rate limits, passes it to [`Proxy::cancel_targets`] and closes the client
    /// once the servers have closed (libpq waits for that close).
    pub(super) async fn serve_cancel(
        self: Arc<Self>,
        listener: usize,
        mut client: TcpStream,
        peer: SocketAddr,
    ) {
        let config = self.config();
        let lname = &config.listeners[listener].name;
        let counters = &self.listener_counters[listener].cancels;
        counters.received.fetch_add(1, Relaxed);
        let mut packet = [0u8; CANCEL_LEN];
        // Peeked already: the read cannot wait.
        if client.read_exact(&mut packet).await.is_err() {
            counters.failed.fetch_add(1, Relaxed);
            return;
        }
        let pid = u32::from_be_bytes(packet[8..12].try_into().expect("4 bytes"));
        if let Err(limit) = self.cancel_limit.allow(peer.ip()) {
            counters.dropped.fetch_add(1, Relaxed);
            if self.log_limit.allow() {
                let which = match limit {
                    CancelDropped::PerClient => "cancel_rate_per_client",
                    CancelDropped::Total => "cancel_rate",
                };
                warn!(client = %peer, listener = %lname, pid, "cancel request dropped: over {which}");
            }
            return;
        }
        let targets = self.cancel_targets(listener, peer.ip());
        let mut sends = JoinSet::new();
        for &server in &targets {
            let addr = config.listeners[listener].servers[server].address;
            counters.server_connections.fetch_add(1, Relaxed);
            sends.spawn(pass_on(addr, packet, config.defaults.timeout_connect));
        }
        let mut reached = 0;
        while let Some(sent) = sends.join_next().await {
            reached += usize::from(matches!(sent, Ok(Ok(()))));
        }
        if reached > 0 {
            counters.delivered.fetch_add(1, Relaxed);
        } else {
            counters.failed.fetch_add(1, Relaxed);
        }
        if self.log_limit.allow() {
            let names: Vec<&str> = targets
                .iter()
                .map(|&s| config.listeners[listener].servers[s].name.as_str())
                .collect();
            info!(
                client = %peer, listener = %lname, pid, servers = %names.join(","),
                reached, "cancel request passed on"
            );
        }
    }

    /// The servers of `listener` a cancel from `client` goes to: those where `client` has live
    /// sessions, else every UP server, plus for a `first` listener its previous write target.
    fn cancel_targets(&self, listener: usize, client: IpAddr) -> Vec<usize> {
        let config = self.config();
        let servers = 0..config.listeners[listener].servers.len();
        let of_client = self.sessions.backends_of_client(client);
        let talked_to: Vec<usize> = servers
            .clone()
            .filter(|&s| of_client.contains(&self.backend_id(listener, s)))
            .collect();
        if !talked_to.is_empty() {
            return talked_to;
        }
        let view = self.view.borrow().clone();
        let mut targets: Vec<usize> = servers
            .filter(|&s| view.listener(listener)[s].is_up())
            .collect();
        if config.listeners[listener].balance == Balance::First {
            let previous = self.recent_servers[listener].previous();
            targets.extend(previous.filter(|p| !targets.contains(p)));
        }
        targets
    }
}

/// Sends `packet` to the server at `addr` and waits for it to close.
async fn pass_on(
    addr: SocketAddr,
    packet: [u8; CANCEL_LEN],
    connect: Duration,
) -> std::io::Result<()> {
    let mut server = timeout(connect, TcpStream::connect(addr)).await??;
    server.write_all(&packet).await?;
    match timeout(SERVER_ANSWER, server.read(&mut [0u8; 1])).await?? {
        0 => Ok(()),
        _ => Err(std::io::Error::other(
            "server answered a cancel request with data",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cancel(pid: u32, key: u32) -> Vec<u8> {
        let mut p = CANCEL_HEADER.to_vec();
        p.extend(pid.to_be_bytes());
        p.extend(key.to_be_bytes());
        p
    }

    #[test]
    fn a_whole_cancel_request_is_recognised() {
        let p = cancel(4242, 0xdead_beef);
        assert_eq!(p.len(), CANCEL_LEN);
        assert_eq!(classify(&p), FirstBytes::Cancel);
        assert_eq!(u32::from_be_bytes(p[4..8].try_into().unwrap()), 80_877_102);
    }

    #[test]
    fn a_cancel_request_in_pieces_waits_for_the_rest() {
        let p = cancel(1, 2);
        for n in 4..CANCEL_LEN {
            assert_eq!(classify(&p[..n]), FirstBytes::Incomplete, "{n} bytes");
        }
        // Less than its length: decided at once, as a session (balanced as before).
        for n in 1..4 {
            assert_eq!(classify(&p[..n]), FirstBytes::Session, "{n} bytes");
        }
    }

    #[test]
    fn other_starts_are_decided_at_once() {
        // A startup packet of length 16 differs from a cancel only by its code.
        let mut startup = vec![0, 0, 0, 16, 0, 3, 0, 0];
        startup.extend(b"user\0x\0\0");
        assert_eq!(classify(&startup), FirstBytes::Session);
        assert_eq!(classify(&startup[..5]), FirstBytes::Session);
        let long_startup = [0, 0, 0, 84, 0, 3, 0, 0];
        assert_eq!(classify(&long_startup[..4]), FirstBytes::Session);
        assert_eq!(classify(&SSL_REQUEST), FirstBytes::Encrypted);
        assert_eq!(classify(&GSSENC_REQUEST), FirstBytes::Encrypted);
        assert_eq!(classify(&[0x16, 0x03, 0x01]), FirstBytes::Encrypted);
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), FirstBytes::Session);
    }

    #[test]
    fn recent_servers_keep_the_write_target_before_the_current() {
        let recent = RecentServers::default();
        assert_eq!(recent.previous(), None);
        recent.note(0);
        recent.note(0);
        assert_eq!(recent.previous(), None);
        recent.note(2);
        recent.note(2);
        assert_eq!(recent.previous(), Some(0));
    }
}
