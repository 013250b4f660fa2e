//! Where the stats server runs, and how much of the daemon it may take: its own OS thread and
//! current-thread runtime (a slow page or a flood of clients never delays the proxy's tasks),
//! at most `[stats] maxconn` connections (the rest wait in the kernel's backlog and hold no file
//! descriptor of the daemon), a header-read timeout and a deadline per connection (a client
//! that sends half a request and stalls is closed), and a short grace at shutdown (a stalled
//! client never holds up the exit).
use std::{future::Future, io, thread, time::Duration};

use axum::{Router, extract::ConnectInfo, http::Request};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_service::Service as _;
use tracing::{debug, info, warn};

use super::admin_endpoint::Peer;
use crate::capped_accept;

/// A client must send a whole request head within this.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection is closed this long after it was accepted, kept alive or not (after the request
/// in flight): a browser's keep-alive connection cannot hold a slot for ever.
pub const CONNECTION_DEADLINE: Duration = Duration::from_secs(60);
/// At shutdown, or at the deadline, requests in flight get this long before the connection is cut.
pub const CLOSE_GRACE: Duration = Duration::from_millis(500);
/// Threads reading SESSIONS for the stats (each holds the pinned map's fd while it reads).
const BLOCKING_THREADS: usize = 1;

/// Starts the stats server's thread: it serves `app` on `listener`, at most `maxconn`
/// connections at once, runs `background` alongside, and returns once `stop` is cancelled and
/// its connections are closed (at most [`CLOSE_GRACE`] later).
pub fn spawn(
    listener: std::net::TcpListener,
    app: Router,
    maxconn: usize,
    background: impl Future<Output = ()> + Send + 'static,
    stop: CancellationToken,
) -> io::Result<thread::JoinHandle<()>> {
    listener.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(BLOCKING_THREADS)
        .thread_name("patroxy-stats-blocking")
        .build()?;
    thread::Builder::new()
        .name("patroxy-stats".into())
        .spawn(move || {
            runtime.block_on(async move {
                let listener = match TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => return warn!("stats server not started: {e}"),
                };
                tokio::spawn(background);
                accept_loop(listener, app, maxconn, stop).await;
            });
            // A SESSIONS read still in progress must not hold up the exit.
            runtime.shutdown_background();
        })
}

async fn accept_loop(listener: TcpListener, app: Router, maxconn: usize, stop: CancellationToken) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, maxconn, "stats page listening");
    }
    // Every connection closes within CLOSE_GRACE of `stop`; the margin covers the wake-ups.
    capped_accept::run(
        "stats",
        listener,
        maxconn,
        &stop,
        CLOSE_GRACE * 2,
        |(stream, remote)| {
            let peer = Peer {
                remote,
                local: stream.local_addr().ok(),
            };
            serve_connection(stream, peer, app.clone(), stop.clone())
        },
    )
    .await;
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    peer: Peer,
    app: Router,
    stop: CancellationToken,
) {
    let service = service_fn(move |mut request: Request<Incoming>| {
        request.extensions_mut().insert(ConnectInfo(peer));
        let mut app = app.clone();
        async move { app.call(request).await }
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service);
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        done = connection.as_mut() => {
            if let Err(e) = done {
                debug!(peer = %peer.remote, "stats connection: {e}");
            }
            return;
        }
        _ = stop.cancelled() => {}
        _ = tokio::time::sleep(CONNECTION_DEADLINE) => {}
    }
    // Finish the request in flight, if any, then close; cut whatever is still open after the grace.
    connection.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(CLOSE_GRACE, connection).await;
}
