//! Applies health changes to the data path: the checker's snapshot, with the operator's admin
//! states folded in (a [`View`]), is written to BACKENDS (state and role), and a server marked down (by its
//! checks or set to MAINT) has its sessions fenced in the kernel (the verdict stops forwarding
//! the moment its BACKENDS entry is fenced) and then reset, per `on_marked_down`. So has a
//! primary superseded by a newer timeline (split brain), though its checks still pass.
use std::sync::Arc;

use patroxy_common::{
    ROLE_PRIMARY, ROLE_REPLICA, ROLE_STANDBY_LEADER, ROLE_UNKNOWN, STATE_DOWN, STATE_DRAIN,
    STATE_MAINT, STATE_UP,
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::Proxy;
use crate::{
    config::{OnMarkedDown, OnMarkedUp},
    dataplane::KillReason,
    operator_state::AdminState,
    patroni::{Role, health::Transition},
    routing::superseded_leaders,
    view::{ServerView, View},
};

impl Proxy {
    /// Runs until `stop`: mirrors every published snapshot and every admin change into the
    /// data path, then publishes the combined view to routing and the stats.
    pub async fn follow_health(self: Arc<Self>, stop: CancellationToken) {
        // Start from what `Proxy::new` applied; anything the checker or the operator published
        // since makes the first `changed()` fire at once.
        let mut rx = self.checks.clone();
        let mut admin = self.admin_states.clone();
        let mut previous = self.view.borrow().clone();
        // A daemon restarted after a crash starts its servers from these (see `FdStore`).
        let mut stored_health = Vec::new();
        if let Some(store) = self.fd_store.get() {
            stored_health = rx.borrow().carry(&self.config());
            store.store_health(&stored_health);
        }
        loop {
            tokio::select! {
                changed = rx.changed() => if changed.is_err() { return },
                changed = admin.changed() => if changed.is_err() { return },
                _ = stop.cancelled() => return,
            }
            let checks = rx.borrow_and_update().clone();
            let current = Arc::new(View::fold(&checks, &admin.borrow_and_update()));
            if let Some(store) = self.fd_store.get() {
                let health = checks.carry(&self.config());
                if health != stored_health {
                    store.store_health(&health);
                    stored_health = health;
                }
            }
            // Fence first: the kernel stops forwarding before userspace starts resetting; and
            // routing sees a server UP only once its fence is lifted.
            self.write_states(&current);
            self.applied.send_replace(current.clone());
            let config = self.config();
            for (key, transition) in current.changes_since(&previous) {
                let spec = &config.listeners[key.listener].servers[key.server];
                let id = self.backend_id(key.listener, key.server);
                match transition {
                    Transition::WentDown
                        if spec.on_marked_down == OnMarkedDown::ShutdownSessions =>
                    {
                        let maint = current
                            .server(key)
                            .is_some_and(|s| s.admin == AdminState::Maint);
                        let (reason, why) = if maint {
                            (KillReason::Maintenance, "server set to MAINT")
                        } else {
                            (KillReason::MarkedDown, "server marked down")
                        };
                        let n = self.reset_backend(id, reason);
                        info!(
                            listener = %config.listeners[key.listener].name,
                            server = %spec.name, sessions = n,
                            "{why}: resetting its sessions"
                        );
                    }
                    Transition::WentUp
                        if spec.on_marked_up == OnMarkedUp::ShutdownBackupSessions =>
                    {
                        // patroxy has no backup servers: the sessions a returning server
                        // supersedes are those left on servers of its listener that are not UP.
                        let listener = current.listener(key.listener);
                        for other in listener.iter().filter(|s| !s.is_up()) {
                            self.sessions.kill_backend(other.id, KillReason::MarkedUp);
                        }
                    }
                    _ => {}
                }
            }
            self.reset_superseded(&current, &previous);
            previous = current;
        }
    }

    /// Resets the sessions of primaries that became superseded by a newer timeline since
    /// `previous` (a split brain appeared): their writes would be lost, and HAProxy, blind to
    /// timelines, would keep them until the old primary's checks fail.
    fn reset_superseded(&self, current: &View, previous: &View) {
        let config = self.config();
        for (li, listener) in current.listeners.iter().enumerate() {
            let before = superseded_leaders(previous.listener(li));
            for index in superseded_leaders(&listener.servers) {
                let spec = &config.listeners[li].servers[index];
                if before.contains(&index) || spec.on_marked_down != OnMarkedDown::ShutdownSessions
                {
                    continue;
                }
                let id = self.backend_id(li, index);
                let n = self.reset_backend(id, KillReason::Superseded);
                warn!(
                    listener = %config.listeners[li].name,
                    server = %spec.name, sessions = n,
                    "split brain: primary on an older timeline than another UP primary: \
                     fencing and resetting its sessions"
                );
            }
        }
    }

    pub(super) fn write_states(&self, view: &View) {
        let config = self.config();
        for (li, listener) in view.listeners.iter().enumerate() {
            let superseded = superseded_leaders(&listener.servers);
            for (index, server) in listener.servers.iter().enumerate() {
                let spec = &config.listeners[li].servers[index];
                // With on_marked_down = none, HAProxy keeps a down server's sessions: so do we.
                // MAINT is down here (`is_up`), so it fences exactly like a mark-down.
                let unwanted = !server.is_up() || superseded.contains(&index);
                let fenced = unwanted && spec.on_marked_down == OnMarkedDown::ShutdownSessions;
                self.backends
                    .set_state(server.id, state_code(server), role_code(server), fenced);
            }
        }
    }
}

/// BACKENDS' `state`, with the precedence of HAProxy's stats: MAINT whatever the checks say,
/// then DOWN, then DRAIN (a draining server that fails its checks shows DOWN), then UP.
fn state_code(server: &ServerView) -> u8 {
    match (server.admin, server.health.is_up()) {
        (AdminState::Maint, _) => STATE_MAINT,
        (_, false) => STATE_DOWN,
        (AdminState::Drain, true) => STATE_DRAIN,
        (AdminState::Ready, true) => STATE_UP,
    }
}

fn role_code(server: &ServerView) -> u8 {
    match server.health.role {
        Some(Role::Primary) => ROLE_PRIMARY,
        Some(Role::Replica) => ROLE_REPLICA,
        Some(Role::StandbyLeader) => ROLE_STANDBY_LEADER,
        _ => ROLE_UNKNOWN,
    }
}
