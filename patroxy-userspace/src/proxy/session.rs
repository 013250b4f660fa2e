//! One client's way through the proxy: wait for a server slot, connect with retries, splice.
use std::{
    net::SocketAddr,
    os::fd::AsFd as _,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering::Relaxed},
    },
    time::Duration,
};

use tokio::{
    net::TcpStream,
    sync::OwnedSemaphorePermit,
    time::{Instant, sleep, timeout},
};
use tracing::{debug, info, warn};

use super::{
    Proxy,
    cancel::{self, FirstBytes},
    refusal::{self, Refusal},
    slots::Slot,
};
use crate::{
    config::Config,
    dataplane::{Outcome, SessionEnd, SessionMeta},
};

/// A session's place in the configuration and its age, from its first to its last process.
pub(super) struct Session {
    pub listener: usize,
    pub server: usize,
    pub backend_id: u32,
    pub peer: SocketAddr,
    /// When the client was accepted (by this process or by a predecessor).
    pub accepted: Instant,
}

/// A client's server, connected, with HAProxy's Tw (queue) and Tc (connect) milestones.
struct Connected {
    server: usize,
    stream: TcpStream,
    /// Held for the session's life: the per-server maxconn slot.
    slot: Slot,
    /// When the client left the queue (got a server and a slot).
    dequeued: Instant,
    connected: Instant,
}

impl Proxy {
    pub(super) async fn serve_client(
        self: Arc<Self>,
        listener: usize,
        client: TcpStream,
        peer: SocketAddr,
        global_permit: OwnedSemaphorePermit,
    ) {
        let accepted = Instant::now();
        let config = self.config();
        let lname = &config.listeners[listener].name;
        let lcounters = &self.listener_counters[listener];
        // Wait for the client's first bytes (left unread for the data path) before taking a
        // server slot: a client that connects and says nothing would otherwise hold a slot
        // and a backend connection until PostgreSQL's own authentication_timeout.
        let startup = config.defaults.timeout_startup;
        let first = timeout(startup, first_bytes(&client)).await;
        if let Ok(Ok(Some(FirstBytes::Cancel))) = first {
            // Not a session: no maxconn permit, no count of accepted clients.
            drop(global_permit);
            return self.serve_cancel(listener, client, peer).await;
        }
        lcounters.accepted.fetch_add(1, Relaxed);
        let gone = match first {
            Ok(Ok(None)) => Some("client closed before sending anything".to_owned()),
            Ok(Err(e)) => Some(format!("client failed before sending anything: {e}")),
            Ok(Ok(Some(kind))) => {
                if kind == FirstBytes::Encrypted {
                    lcounters.cancels.encrypted_starts.fetch_add(1, Relaxed);
                }
                None
            }
            Err(_) => {
                if self.log_limit.allow() {
                    warn!(
                        client = %peer, listener = %lname,
                        "closing client: sent nothing within timeout startup ({startup:?})"
                    );
                }
                return;
            }
        };
        // A client gone before its first byte (a port probe, a health check of the proxy's
        // port) needs no backend connection: nothing could reach one.
        if let Some(why) = gone {
            // A flood of port probes must not flood the log: the debug lines' budget.
            if self.debug_line_allowed() {
                debug!(client = %peer, listener = %lname, "session closed: {why}");
            }
            return;
        }
        // HAProxy's Tw (queue time) starts here: the client's silence is not queueing.
        let spoke = Instant::now();
        let Connected {
            server,
            stream: backend,
            slot: _slot,
            dequeued,
            connected,
        } = match self.connect_backend(&config, listener, peer).await {
            Ok(x) => x,
            Err(refusal) => {
                match &refusal {
                    Refusal::QueueTimeout { up_servers: false } => &lcounters.no_server,
                    Refusal::QueueTimeout { up_servers: true } => &lcounters.queue_full,
                    Refusal::ConnectFailed { .. } => &lcounters.connect_failed,
                }
                .fetch_add(1, Relaxed);
                if self.log_limit.allow() {
                    warn!(
                        client = %peer, listener = %lname,
                        wait_ms = spoke.elapsed().as_millis() as u64,
                        "closing client: {}", refusal.describe()
                    );
                }
                let message = format!("patroxy: {lname}: {}", refusal.describe());
                refusal::refuse(client, refusal.sqlstate(), &message).await;
                return;
            }
        };
        let sname = &config.listeners[listener].servers[server].name;
        if self.debug_line_allowed() {
            debug!(
                client = %peer, listener = %lname, server = %sname,
                queue_ms = (dequeued - spoke).as_millis() as u64,
                connect_ms = (connected - dequeued).as_millis() as u64,
                "session routed"
            );
        }
        let backend_id = self.backend_id(listener, server);
        let meta = session_meta(&config, listener, backend_id);
        self.recent_servers[listener].note(server);
        let local = backend.local_addr().ok();
        let registered = self.sessions.register(backend_id, peer.ip());
        // A mark-down between our pick and this registration fenced the server without
        // seeing us: reset now rather than sit behind the fence.
        if self.backends.get(backend_id).is_some_and(|e| e.fenced != 0) {
            registered
                .kill
                .kill(crate::dataplane::KillReason::MarkedDown);
        }
        self.backends.session_opened(backend_id);
        let counters = self.counters(backend_id);
        counters.opened(self.backends.get(backend_id).map_or(0, |e| e.sessions));
        let session = Session {
            listener,
            server,
            backend_id,
            peer,
            accepted,
        };
        let stored = self.store_session(&session, client.as_fd(), backend.as_fd());
        let outcome = self
            .dataplane
            .run(client, backend, meta, &registered.kill)
            .await;
        drop(registered);
        match outcome {
            Outcome::Ended(end) => {
                self.unstore_session(stored);
                self.session_ended(&session, &end);
                if self.log_limit.allow() {
                    info!(
                        client = %peer, listener = %lname,
                        server = %sname,
                        local = %local.map_or_else(|| "?".to_owned(), |a| a.to_string()),
                        queue_ms = (dequeued - spoke).as_millis() as u64,
                        connect_ms = (connected - dequeued).as_millis() as u64,
                        total_ms = accepted.elapsed().as_millis() as u64,
                        bytes_in = end.bytes_from_client, bytes_out = end.bytes_from_server,
                        path = self.dataplane.session_path(&end),
                        "session closed: {}", end.reason
                    );
                }
            }
            Outcome::HandedOver(sockets) => self.pass_to_successor(&session, sockets),
        }
    }

    /// Accounts for a session that ended in this process.
    pub(super) fn session_ended(&self, session: &Session, end: &SessionEnd) {
        self.backends.session_closed(session.backend_id);
        self.counters(session.backend_id)
            .closed(end.bytes_from_client, end.bytes_from_server);
    }

    /// Chooses a server (waiting in the queue while none is UP or all are full), then connects
    /// with HAProxy's `retries`, turn-around delay and `option redispatch`.
    async fn connect_backend(
        &self,
        config: &Config,
        listener: usize,
        peer: SocketAddr,
    ) -> Result<Connected, Refusal> {
        let d = &config.defaults;
        let queue_deadline = Instant::now() + d.timeout_queue;
        let turnaround = d.timeout_connect.min(Duration::from_secs(1));
        let mut excluded = Vec::new();
        let (mut server, mut slot) = self
            .wait_for_slot(listener, &excluded, queue_deadline)
            .await?;
        let dequeued = Instant::now();
        let mut attempts = 0;
        loop {
            attempts += 1;
            let addr = config.listeners[listener].servers[server].address;
            let err = match timeout(d.timeout_connect, self.dataplane.connect(addr)).await {
                Ok(Ok(stream)) => {
                    return Ok(Connected {
                        server,
                        stream,
                        slot,
                        dequeued,
                        connected: Instant::now(),
                    });
                }
                Ok(Err(e)) => e,
                Err(_) => std::io::Error::new(std::io::ErrorKind::TimedOut, "timeout connect"),
            };
            let counters = self.counters(self.backend_id(listener, server));
            counters.connect_errors.fetch_add(1, Relaxed);
            let retries_left = d.retries + 1 - attempts;
            if retries_left == 0 {
                return Err(Refusal::ConnectFailed {
                    attempts,
                    last: err,
                });
            }
            counters.retries.fetch_add(1, Relaxed);
            // Each attempt, when debug lines are on (under their budget: a server refusing
            // every client must not flood the log).
            if self.debug_line_allowed() {
                debug!(
                    client = %peer, server = %addr, attempt = attempts,
                    "connect failed, retrying in {turnaround:?}: {err}"
                );
            }
            // A server that stops taking sessions meanwhile (DOWN, fenced by its leader key,
            // DRAIN, MAINT) is not retried: choose again at once, as a client queued on it
            // would, rather than sleeping out the turn-around towards a refusal.
            let closed = tokio::select! {
                () = sleep(turnaround) => false,
                () = self.until_closed_to_new_sessions(listener, server) => true,
            };
            if closed {
                counters.redispatches.fetch_add(1, Relaxed);
                drop(slot);
                let deadline = Instant::now() + d.timeout_queue;
                (server, slot) = self.wait_for_slot(listener, &[], deadline).await?;
                continue;
            }
            if retries_left == 1 && d.redispatch {
                counters.redispatches.fetch_add(1, Relaxed);
                // The last retry may go elsewhere; fall back to the same server if none other.
                excluded.push(server);
                drop(slot);
                let deadline = Instant::now() + d.timeout_queue;
                (server, slot) = match self.wait_for_slot(listener, &excluded, deadline).await {
                    Ok(x) => x,
                    Err(_) => {
                        excluded.clear();
                        self.wait_for_slot(listener, &excluded, deadline).await?
                    }
                };
            }
        }
    }

    /// A server of `listener` and a slot on it, or `QueueTimeout` once `deadline` passes.
    async fn wait_for_slot(
        &self,
        listener: usize,
        excluded: &[usize],
        deadline: Instant,
    ) -> Result<(usize, Slot), Refusal> {
        loop {
            let mut changes = self.view_changes();
            let Some(server) = self.pick(listener, excluded) else {
                let _waiting =
                    WaitingGuard::new(&self.listener_counters[listener].waiting_for_server);
                if !Self::wait_for_change(&mut changes, deadline).await {
                    return Err(Refusal::QueueTimeout { up_servers: false });
                }
                continue;
            };
            let id = self.backend_id(listener, server);
            let wait = deadline.saturating_duration_since(Instant::now());
            let _queued = self.counters(id).enqueue();
            // As HAProxy redistributes a server's queue when it goes DOWN or to MAINT/DRAIN, a
            // client queued on it chooses again. Checked after the slot too: a mark-down frees
            // slots by resetting sessions only after routing sees the server down.
            let slot = tokio::select! {
                slot = self.slots(id).acquire(wait) => slot,
                () = self.until_closed_to_new_sessions(listener, server) => continue,
            };
            return match slot {
                Some(_) if !self.takes_new_sessions(listener, server) => continue,
                Some(slot) => Ok((server, slot)),
                None => Err(Refusal::QueueTimeout { up_servers: true }),
            };
        }
    }
}

/// The kind of the client's first bytes, peeked (left in the socket for the data path); `None`
/// if it closed first. Waits past the first segment only while the bytes could still be a
/// CancelRequest's (see [`cancel::classify`]).
async fn first_bytes(client: &TcpStream) -> std::io::Result<Option<FirstBytes>> {
    let mut buf = [0u8; cancel::CANCEL_LEN];
    loop {
        // `peek` (not `readable`, which may wake spuriously) leaves the bytes in the socket.
        let n = client.peek(&mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        match cancel::classify(&buf[..n]) {
            // `peek` returns at once while bytes wait: poll for the rest of the 16.
            FirstBytes::Incomplete => sleep(Duration::from_millis(5)).await,
            kind => return Ok(Some(kind)),
        }
    }
}

/// What the data path needs to know about a session on backend `backend_id`, under `config`'s
/// timeouts (a session keeps those it started with).
pub(super) fn session_meta(config: &Config, listener: usize, backend_id: u32) -> SessionMeta {
    SessionMeta {
        backend_id,
        listener: listener as u16,
        idle_timeout: config
            .defaults
            .timeout_client
            .min(config.defaults.timeout_server),
    }
}

/// Counts a client waiting for any UP server while it lives.
struct WaitingGuard<'a>(&'a AtomicU32);

impl<'a> WaitingGuard<'a> {
    fn new(counter: &'a AtomicU32) -> Self {
        counter.fetch_add(1, Relaxed);
        Self(counter)
    }
}

impl Drop for WaitingGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}
