//! Health-driven choice of a server for a new client, and waiting while none is eligible.
use std::sync::Arc;

use tokio::{
    sync::watch,
    time::{Instant, timeout_at},
};

use super::Proxy;
use crate::{
    routing::{Load, superseded_leaders},
    view::{ServerView, View},
};

impl Proxy {
    /// A server of `listener` for a new client, per its balance algorithm over the current
    /// view; `None` when no eligible server is UP.
    pub(super) fn pick(&self, listener: usize, excluded: &[usize]) -> Option<usize> {
        let view = self.view.borrow().clone();
        let config = self.config();
        let load = |server: usize| {
            let id = self.backend_id(listener, server);
            let entry = self.backends.get(id).unwrap_or_default();
            Load {
                sessions: entry.sessions
                    + self
                        .counters(id)
                        .queued
                        .load(std::sync::atomic::Ordering::Relaxed),
                maxconn: config.listeners[listener].servers[server].maxconn,
            }
        };
        let mut router = self.routers[listener].lock().expect("router lock");
        router.pick(view.listener(listener), &load, excluded)
    }

    /// Whether `server` of `listener` may get a new session now: UP, READY and not a primary
    /// superseded by a newer timeline.
    pub(super) fn takes_new_sessions(&self, listener: usize, server: usize) -> bool {
        takes_new_sessions(self.view.borrow().listener(listener), server)
    }

    /// Returns once `server` of `listener` stops taking new sessions (DOWN, DRAIN, MAINT or
    /// superseded); never while the daemon's health feed lives and the server stays eligible.
    pub(super) async fn until_closed_to_new_sessions(&self, listener: usize, server: usize) {
        let mut rx = self.view.clone();
        loop {
            if !takes_new_sessions(rx.borrow_and_update().listener(listener), server) {
                return;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// A receiver of the view that sees changes from now on: taken before a `pick`, so that
    /// a server coming UP between the pick and the wait still wakes the waiting client.
    pub(super) fn view_changes(&self) -> watch::Receiver<Arc<View>> {
        let mut rx = self.view.clone();
        rx.mark_unchanged();
        rx
    }

    /// Waits until the view changes after `rx` was taken; false once `deadline` passed first.
    pub(super) async fn wait_for_change(
        rx: &mut watch::Receiver<Arc<View>>,
        deadline: Instant,
    ) -> bool {
        matches!(timeout_at(deadline, rx.changed()).await, Ok(Ok(())))
    }
}

fn takes_new_sessions(servers: &[ServerView], server: usize) -> bool {
    servers[server].takes_new_sessions() && !superseded_leaders(servers).contains(&server)
}
