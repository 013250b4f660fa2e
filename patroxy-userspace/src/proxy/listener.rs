//! Binding the listeners and the accept loop with HAProxy's global maxconn.
use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use tokio::net::{TcpListener, TcpSocket};
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
        index: usize,
        listener: TcpListener,
        stop: CancellationToken,
        tracker: TaskTracker,
    ) {
        let name = &self.config.listeners[index].name;
        let mut backoff = Duration::from_millis(5);
        loop {
            // At global maxconn, stop accepting: the kernel's backlog holds new clients.
            let permit = tokio::select! {
                p = self.global.clone().acquire_owned() => p.expect("semaphore never closed"),
                _ = stop.cancelled() => return,
            };
            let accepted = tokio::select! {
                r = listener.accept() => r,
                _ = stop.cancelled() => return,
            };
            match accepted {
                Ok((client, peer)) => {
                    backoff = Duration::from_millis(5);
                    debug!(listener = %name, %peer, "accepted");
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
