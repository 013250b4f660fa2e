//! Sessions between two processes of an upgrade: the old one passes its spliced sessions on,
//! the new one goes on with them.
//!
//! A session travels as names (listener, server) rather than backend ids, since ids are a
//! property of one configuration; [`Proxy::backend_by_name`] is the one place that maps them.
use std::{
    collections::HashSet,
    net::SocketAddr,
    os::fd::{AsFd as _, BorrowedFd},
    sync::Arc,
    time::Duration,
};

use tokio::{sync::mpsc, time::Instant};
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::{
    Proxy,
    counters::{BackendTotals, ListenerTotals},
    session::Session,
};
use crate::{
    dataplane::{Detached, KillReason, Outcome},
    fdstore::{FdStore, SessionNames},
};

/// The stats' totals a successor goes on from (see [`Proxy::carry_counters`]).
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct CarriedCounters {
    pub backends: Vec<CarriedBackend>,
    /// (listener name, totals).
    pub listeners: Vec<(String, ListenerTotals)>,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct CarriedBackend {
    pub listener: String,
    pub server: String,
    pub id: u32,
    pub totals: BackendTotals,
}

/// A spliced session on its way to a successor process.
pub struct HandedSession {
    pub listener: String,
    pub server: String,
    pub client: SocketAddr,
    /// How long ago the client was accepted, for the session's total time in the log.
    pub age: Duration,
    pub sockets: Detached,
}

#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    #[error("listener {listener:?} server {server:?} is not in this configuration")]
    UnknownServer { listener: String, server: String },
    #[error("the data path is the fallback: it cannot go on with spliced sessions")]
    NotSpliced,
}

impl Proxy {
    /// Makes every spliced session, and every one spliced from now on, leave its sockets in
    /// the kernel's maps and come out on `to` for a successor. Fallback sessions, and those of
    /// the backends in `kept_here` ([`Proxy::retire_servers`]), run on here.
    pub fn hand_over_sessions(
        &self,
        to: mpsc::UnboundedSender<HandedSession>,
        kept_here: HashSet<u32>,
    ) {
        *self.successor.lock().expect("successor lock") = Some(to);
        self.sessions.hand_over_all(kept_here);
    }

    /// The stats' totals, for a successor to go on counting from.
    pub fn carry_counters(&self) -> CarriedCounters {
        let config = self.config();
        CarriedCounters {
            backends: self
                .ids
                .backends()
                .map(|(key, id)| {
                    let l = &config.listeners[key.listener];
                    CarriedBackend {
                        listener: l.name.clone(),
                        server: l.servers[key.server].name.clone(),
                        id,
                        totals: self.counters(id).totals(),
                    }
                })
                .collect(),
            listeners: config
                .listeners
                .iter()
                .zip(&self.listener_counters)
                .map(|(l, c)| (l.name.clone(), c.totals()))
                .collect(),
        }
    }

    /// Goes on counting from a predecessor's totals: a server that kept its id (and so is the
    /// same backend), and a listener of the same name.
    pub fn carry_on_counters(&self, carried: &CarriedCounters) {
        for b in &carried.backends {
            if self.ids.id_of(&b.listener, &b.server) == Some(b.id) {
                self.counters(b.id).carry_on(&b.totals);
            }
        }
        let config = self.config();
        for (name, totals) in &carried.listeners {
            if let Some(li) = config.listeners.iter().position(|l| &l.name == name) {
                self.listener_counters[li].carry_on(totals);
            }
        }
    }

    /// Keeps each spliced session's sockets in systemd's fd store from now on.
    pub fn keep_sessions_in(&self, store: FdStore) {
        let _ = self.fd_store.set(store);
    }

    /// Stores a session about to be spliced in the fd store, if there is one; the names to
    /// remove it by when it ends.
    pub(super) fn store_session(
        &self,
        session: &Session,
        client: BorrowedFd<'_>,
        backend: BorrowedFd<'_>,
    ) -> Option<SessionNames> {
        let store = self.fd_store.get()?;
        self.dataplane.kernel()?;
        let (listener, server) = self.session_names(session);
        store.store_session(&listener, &server, client, backend)
    }

    /// Removes an ended session's sockets from the fd store.
    pub(super) fn unstore_session(&self, names: Option<SessionNames>) {
        if let (Some(store), Some(names)) = (self.fd_store.get(), names) {
            store.remove(&names);
        }
    }

    fn session_names(&self, session: &Session) -> (String, String) {
        let config = self.config();
        let listener = &config.listeners[session.listener];
        (
            listener.name.clone(),
            listener.servers[session.server].name.clone(),
        )
    }

    /// Resets the sessions still running here (fallback ones, once an upgrade's grace is over).
    pub fn reset_remaining(&self, reason: KillReason) -> usize {
        self.sessions.kill_all(reason)
    }

    /// The BACKENDS table, which a predecessor stops writing once its successor starts.
    pub fn backends(&self) -> &crate::dataplane::BackendTable {
        &self.backends
    }

    pub(super) fn pass_to_successor(&self, session: &Session, sockets: Detached) {
        let (listener, server) = self.session_names(session);
        let handed = HandedSession {
            listener,
            server,
            client: session.peer,
            age: session.accepted.elapsed(),
            sockets,
        };
        let successor = self.successor.lock().expect("successor lock");
        if let Some(Err(mpsc::error::SendError(lost))) = successor.as_ref().map(|s| s.send(handed))
        {
            warn!(client = %lost.client, "the successor is gone: resetting the session");
            crate::dataplane::reset_both(&lost.sockets.client, &lost.sockets.backend);
        }
    }

    /// The (listener index, server index, backend id) of a server named in a hand-over.
    fn backend_by_name(&self, listener: &str, server: &str) -> Option<(usize, usize, u32)> {
        let config = self.config();
        let id = self.ids.id_of(listener, server)?;
        let li = config.listeners.iter().position(|l| l.name == listener)?;
        let si = config.listeners[li]
            .servers
            .iter()
            .position(|s| s.name == server)?;
        Some((li, si, id))
    }

    /// Goes on with a session a predecessor spliced; its task joins `tracker`.
    pub fn adopt(
        self: &Arc<Self>,
        handed: HandedSession,
        tracker: &TaskTracker,
    ) -> Result<(), AdoptError> {
        let Some((listener, server, backend_id)) =
            self.backend_by_name(&handed.listener, &handed.server)
        else {
            crate::dataplane::reset_both(&handed.sockets.client, &handed.sockets.backend);
            return Err(AdoptError::UnknownServer {
                listener: handed.listener,
                server: handed.server,
            });
        };
        if self.dataplane.kernel().is_none() {
            crate::dataplane::reset_both(&handed.sockets.client, &handed.sockets.backend);
            return Err(AdoptError::NotSpliced);
        }
        // Established sessions are never refused: they count against maxconn when there is
        // room, as they did in the predecessor.
        let global = self.global.clone().try_acquire_owned().ok();
        let session = Session {
            listener,
            server,
            backend_id,
            peer: handed.client,
            accepted: Instant::now()
                .checked_sub(handed.age)
                .unwrap_or_else(Instant::now),
        };
        // Stored by the predecessor (or before the crash) under the same names.
        let stored = self.fd_store.get().and_then(|_| {
            SessionNames::of(
                &handed.listener,
                &handed.server,
                handed.sockets.client.as_fd(),
            )
        });
        let proxy = self.clone();
        let meta = super::session::session_meta(&self.config(), listener, backend_id);
        let local = handed.sockets.backend.local_addr().ok();
        tracker.spawn(async move {
            let _global = global;
            let registered = proxy.sessions.register(backend_id, session.peer.ip());
            let kill = registered.kill.clone();
            // A server fenced here (marked down meanwhile) resets it, as a mark-down does.
            if proxy
                .backends
                .get(backend_id)
                .is_some_and(|e| e.fenced != 0)
            {
                kill.kill(KillReason::MarkedDown);
            }
            proxy.backends.session_opened(backend_id);
            // Counted in stot by the process that accepted it (whose totals carry over).
            proxy.counters(backend_id).max_sessions.fetch_max(
                proxy.backends.get(backend_id).map_or(0, |e| e.sessions),
                std::sync::atomic::Ordering::Relaxed,
            );
            let slot = proxy.slots(backend_id).acquire(Duration::ZERO).await;
            let outcome = proxy.dataplane.resume(handed.sockets, meta, &kill).await;
            drop(slot);
            drop(registered);
            match outcome {
                Some(Outcome::Ended(end)) => {
                    proxy.unstore_session(stored);
                    proxy.session_ended(&session, &end);
                    if proxy.log_limit.allow() {
                        let (listener, server) = proxy.session_names(&session);
                        info!(
                            client = %session.peer,
                            listener = %listener,
                            server = %server,
                            local = %local.map_or_else(|| "?".to_owned(), |a| a.to_string()),
                            total_ms = session.accepted.elapsed().as_millis() as u64,
                            bytes_in = end.bytes_from_client, bytes_out = end.bytes_from_server,
                            path = proxy.dataplane.session_path(&end),
                            "session closed (taken over): {}", end.reason
                        );
                    }
                }
                Some(Outcome::HandedOver(sockets)) => proxy.pass_to_successor(&session, sockets),
                None => {}
            }
        });
        Ok(())
    }
}
