//! Binding the listeners and the one accept loop that serves them all under HAProxy's global
//! maxconn.
//!
//! The loop takes a global permit first and only then accepts, so past maxconn nothing is
//! accepted and the kernel's backlog holds new clients. One loop for all listeners, rather than
//! one per listener, because each idle loop would hold a permit while it waits in `accept()`:
//! with K listeners only `maxconn - (K - 1)` sessions could ever run at once.
use std::{
    io,
    net::SocketAddr,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, warn};

use super::Proxy;

/// Binds one listening socket. The backlog holds the clients waiting while maxconn is reached.
pub fn bind(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog.max(128))
}

impl Proxy {
    pub(super) async fn accept_loop(
        self: Arc<Self>,
        listeners: Vec<TcpListener>,
        stop: CancellationToken,
        tracker: TaskTracker,
    ) {
        let mut backoff = Duration::from_millis(5);
        // Where the next poll starts, so a busy listener cannot starve the others.
        let mut start = 0;
        loop {
            // At global maxconn, stop accepting: the kernel's backlog holds new clients.
            let permit = tokio::select! {
                p = self.global.clone().acquire_owned() => p.expect("semaphore never closed"),
                _ = stop.cancelled() => return,
            };
            let (index, accepted) = tokio::select! {
                r = std::future::poll_fn(|cx| poll_any(&listeners, start, cx)) => r,
                _ = stop.cancelled() => return,
            };
            start = (index + 1) % listeners.len();
            let config = self.config();
            let name = &config.listeners[index].name;
            match accepted {
                Ok((client, peer)) => {
                    backoff = Duration::from_millis(5);
                    if self.debug_line_allowed() {
                        debug!(listener = %name, %peer, "accepted");
                    }
                    tracker.spawn(self.clone().serve_client(index, client, peer, permit));
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(listener = %name, "accept failed: {e}; retrying in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }
}

/// The first listener, from `start` round, with a client (or an error) to accept.
fn poll_any(
    listeners: &[TcpListener],
    start: usize,
    cx: &mut Context<'_>,
) -> Poll<(usize, io::Result<(TcpStream, SocketAddr)>)> {
    (0..listeners.len())
        .map(|i| (start + i) % listeners.len())
        .find_map(|i| match listeners[i].poll_accept(cx) {
            Poll::Ready(r) => Some(Poll::Ready((i, r))),
            Poll::Pending => None,
        })
        .unwrap_or(Poll::Pending)
}
