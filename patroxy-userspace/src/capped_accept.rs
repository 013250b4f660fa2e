//! The accept loop the stats server and the runtime socket share: at most `maxconn`
//! connections at once (past the cap, clients wait in the kernel's backlog and hold no file
//! descriptor of the daemon), a pause after a failed accept, and at `stop` a bounded wait for
//! the connections still open.
use std::{future::Future, io, sync::Arc, time::Duration};

use tokio::{
    net::{TcpListener, TcpStream, UnixListener, UnixStream},
    sync::Semaphore,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::warn;

/// After a failed accept (out of file descriptors, say), wait this long before the next.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// A listening socket the loop accepts from: TCP for the stats page, Unix for the runtime socket.
pub trait Listener {
    type Connection: Send + 'static;
    fn accept(&self) -> impl Future<Output = io::Result<Self::Connection>> + Send;
}

impl Listener for TcpListener {
    type Connection = (TcpStream, std::net::SocketAddr);
    fn accept(&self) -> impl Future<Output = io::Result<Self::Connection>> + Send {
        TcpListener::accept(self)
    }
}

impl Listener for UnixListener {
    type Connection = (UnixStream, tokio::net::unix::SocketAddr);
    fn accept(&self) -> impl Future<Output = io::Result<Self::Connection>> + Send {
        UnixListener::accept(self)
    }
}

/// Accepts from `listener` and runs `serve` on each connection, at most `maxconn` at once,
/// until `stop`; then closes the listener and waits up to `close_wait` for the connections
/// (each `serve` must end within that of `stop`). `what` names the server in the log.
pub async fn run<L, S, F>(
    what: &str,
    listener: L,
    maxconn: usize,
    stop: &CancellationToken,
    close_wait: Duration,
    serve: S,
) where
    L: Listener,
    S: Fn(L::Connection) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(maxconn));
    let connections = TaskTracker::new();
    loop {
        // Accept only with a free slot: past the cap, clients wait in the kernel's backlog.
        let slot = tokio::select! {
            _ = stop.cancelled() => break,
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
        };
        let connection = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    warn!("{what}: accept failed: {e}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let served = serve(connection);
        connections.spawn(async move {
            served.await;
            drop(slot);
        });
    }
    drop(listener);
    connections.close();
    if tokio::time::timeout(close_wait, connections.wait())
        .await
        .is_err()
    {
        warn!(
            open = connections.len(),
            "{what}: connections still open at exit"
        );
    }
}
