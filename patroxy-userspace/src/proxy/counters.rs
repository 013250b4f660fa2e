//! Per-backend and per-listener counters kept by the proxy for the stats (HAProxy's scur/smax,
//! stot, qcur/qmax, econ, wretr, wredis ...). Current sessions live in the `BackendTable` (the
//! kernel reads them too); bytes of open sockmap sessions live in SESSIONS, so only bytes of
//! closed sessions are added here. An upgrade or a structural reload carries the totals over
//! ([`BackendTotals`], [`ListenerTotals`]), so they do not start again from zero.
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};

use serde::{Deserialize, Serialize};

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

/// A backend's counters that keep counting in a successor process (not the current ones: its
/// queue is this process's).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendTotals {
    pub max_sessions: u32,
    pub total_sessions: u64,
    pub max_queued: u32,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub connect_errors: u64,
    pub retries: u64,
    pub redispatches: u64,
    pub markdown_resets: u64,
}

impl BackendCounters {
    pub fn totals(&self) -> BackendTotals {
        BackendTotals {
            max_sessions: self.max_sessions.load(Relaxed),
            total_sessions: self.total_sessions.load(Relaxed),
            max_queued: self.max_queued.load(Relaxed),
            bytes_in: self.bytes_in.load(Relaxed),
            bytes_out: self.bytes_out.load(Relaxed),
            connect_errors: self.connect_errors.load(Relaxed),
            retries: self.retries.load(Relaxed),
            redispatches: self.redispatches.load(Relaxed),
            markdown_resets: self.markdown_resets.load(Relaxed),
        }
    }

    /// Adds a predecessor's totals to this process's.
    pub fn carry_on(&self, t: &BackendTotals) {
        self.max_sessions.fetch_max(t.max_sessions, Relaxed);
        self.total_sessions.fetch_add(t.total_sessions, Relaxed);
        self.max_queued.fetch_max(t.max_queued, Relaxed);
        self.bytes_in.fetch_add(t.bytes_in, Relaxed);
        self.bytes_out.fetch_add(t.bytes_out, Relaxed);
        self.connect_errors.fetch_add(t.connect_errors, Relaxed);
        self.retries.fetch_add(t.retries, Relaxed);
        self.redispatches.fetch_add(t.redispatches, Relaxed);
        self.markdown_resets.fetch_add(t.markdown_resets, Relaxed);
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

/// A listener's counters that keep counting in a successor process.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerTotals {
    pub accepted: u64,
    pub no_server: u64,
    pub queue_full: u64,
    pub connect_failed: u64,
}

impl ListenerCounters {
    pub fn totals(&self) -> ListenerTotals {
        ListenerTotals {
            accepted: self.accepted.load(Relaxed),
            no_server: self.no_server.load(Relaxed),
            queue_full: self.queue_full.load(Relaxed),
            connect_failed: self.connect_failed.load(Relaxed),
        }
    }

    pub fn carry_on(&self, t: &ListenerTotals) {
        self.accepted.fetch_add(t.accepted, Relaxed);
        self.no_server.fetch_add(t.no_server, Relaxed);
        self.queue_full.fetch_add(t.queue_full, Relaxed);
        self.connect_failed.fetch_add(t.connect_failed, Relaxed);
    }
}
