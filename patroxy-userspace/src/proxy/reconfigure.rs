//! A reload's new settings, applied to the running proxy in place: the listeners and servers
//! stay (a reload that adds, removes or moves any is applied by a successor process instead,
//! see `reload`), so every session, backend id, counter and queue stays too.
use std::sync::Arc;

use tracing::info;

use super::{Proxy, slots};
use crate::{config::Config, dataplane::KillReason, routing::Router};

impl Proxy {
    /// Swaps in `config`: new sessions take its timeouts, retries and balance; the global and
    /// per-server maxconn change in place (open sessions keep their slots and count against the
    /// new limit); a changed `on_marked_down` sets or lifts the fences of servers that are down
    /// now, and a server newly fenced has its sessions reset as if it had just been marked down.
    pub fn reconfigure(&self, config: Arc<Config>) {
        let old = std::mem::replace(
            &mut *self.config.write().expect("config lock"),
            config.clone(),
        );
        slots::resize(&self.global, old.global.maxconn, config.global.maxconn);
        for (key, id) in self.ids.backends() {
            let spec = &config.listeners[key.listener].servers[key.server];
            self.slots(id).resize(spec.maxconn);
        }
        for (li, (was, now)) in old.listeners.iter().zip(&config.listeners).enumerate() {
            if was.balance != now.balance {
                *self.routers[li].lock().expect("router lock") =
                    Router::new(&now.name, now.balance);
            }
        }
        let fenced = |id| self.backends.get(id).is_some_and(|e| e.fenced != 0);
        let before: Vec<(u32, bool)> = self
            .ids
            .backends()
            .map(|(_, id)| (id, fenced(id)))
            .collect();
        let view = self.view.borrow().clone();
        self.write_states(&view);
        for (id, was_fenced) in before {
            if was_fenced || !fenced(id) {
                continue;
            }
            let n = self.reset_backend(id, KillReason::MarkedDown);
            info!(
                backend = id,
                sessions = n,
                "on_marked_down is now shutdown-sessions for a server that is down: resetting its sessions"
            );
        }
    }
}
