//! Per-backend and per-listener counters kept by the proxy for the stats (HAProxy's scur/smax,
//! stot, qcur/qmax, econ, wretr, wredis ...). Current sessions live in the `BackendTable` (the
//! kernel reads them too); bytes of open sockmap sessions live in SESSIONS, so only bytes of
//! closed sessions are added here.
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};

#[derive(Debug, Default)]
pub struct BackendCounters {
    /// Highest number of concurrent sessions seen (smax).
    pub max_sessions: AtomicU32,
    /// Sessions ever established (stot).
    pub total_sessions: AtomicU64,
    /// Clients waiting for a slot on this server now (qcur) and at most (qmax).
    pub queued: AtomicU32,
    pub max_queued: AtomicU32,
    /// Payload bytes of closed sessions, client->server (bin) and server->client (bout).
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    /// Failed connection attempts (econ), retries (wretr), redispatches (wredis).
    pub connect_errors: AtomicU64,
    pub retries: AtomicU64,
    pub redispatches: AtomicU64,
    /// Sessions reset because the server was marked down.
    pub markdown_resets: AtomicU64,
}

impl BackendCounters {
    pub fn opened(&self, now_current: u32) {
        self.total_sessions.fetch_add(1, Relaxed);
        self.max_sessions.fetch_max(now_current, Relaxed);
    }

    pub fn closed(&self, bytes_in: u64, bytes_out: u64) {
        self.bytes_in.fetch_add(bytes_in, Relaxed);
        self.bytes_out.fetch_add(bytes_out, Relaxed);
    }

    /// Counts this client in the server's queue until the guard drops.
    pub fn enqueue(&self) -> QueueGuard<'_> {
        let now = self.queued.fetch_add(1, Relaxed) + 1;
        self.max_queued.fetch_max(now, Relaxed);
        QueueGuard(&self.queued)
    }
}

pub struct QueueGuard<'a>(&'a AtomicU32);

impl Drop for QueueGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

#[derive(Debug, Default)]
pub struct ListenerCounters {
    /// Clients accepted (stot of the frontend).
    pub accepted: AtomicU64,
    /// Clients closed because `timeout queue` expired with no UP server.
    pub no_server: AtomicU64,
    /// Clients closed because `timeout queue` expired with every server full.
    pub queue_full: AtomicU64,
    /// Clients closed because every connection attempt failed.
    pub connect_failed: AtomicU64,
    /// Clients waiting for any UP server now.
    pub waiting_for_server: AtomicU32,
    /// CancelRequests: not sessions, so counted apart from all of the above.
    pub cancels: CancelCounters,
}

/// What became of the CancelRequests a listener received (`proxy::cancel`).
#[derive(Debug, Default)]
pub struct CancelCounters {
    /// CancelRequests recognised in a connection's first bytes.
    pub received: AtomicU64,
    /// Passed on to at least one server, which took it and closed.
    pub delivered: AtomicU64,
    /// Refused by the per-client or the total rate limit, before any server saw them.
    pub dropped: AtomicU64,
    /// Passed on to no server: every connection failed or timed out.
    pub failed: AtomicU64,
    /// Connections opened to servers for cancels (one cancel may go to several servers).
    pub server_connections: AtomicU64,
    /// Connections that began with an SSLRequest, a GSSENCRequest or a TLS handshake: patroxy
    /// passes them through unread, so a cancel among them (PostgreSQL 17+ libpq cancels over
    /// TLS when the session used TLS) goes where balancing sends it, as through HAProxy.
    pub encrypted_starts: AtomicU64,
}
