//! Servers a structural reload removed (or moved to another address): their sessions are
//! handled as a mark-down would handle them, under the server's `on_marked_down`, since the
//! successor process that runs the new configuration does not know them.
use std::collections::HashSet;

use tracing::info;

use super::Proxy;
use crate::{config::OnMarkedDown, dataplane::KillReason};

impl Proxy {
    /// Resets the sessions of the `retired` backends whose `on_marked_down` is
    /// shutdown-sessions; returns the others, whose sessions are left to run in this process
    /// (not handed to the successor) until they end or the drain grace time is over.
    pub fn retire_servers(&self, retired: &[u32]) -> HashSet<u32> {
        let config = self.config();
        let mut left_to_run = HashSet::new();
        for (key, id) in self.ids.backends().filter(|(_, id)| retired.contains(id)) {
            let listener = &config.listeners[key.listener];
            let spec = &listener.servers[key.server];
            if spec.on_marked_down == OnMarkedDown::Nothing {
                left_to_run.insert(id);
                info!(
                    listener = %listener.name, server = %spec.name, backend = id,
                    "server removed by the reload: its sessions run on here (on_marked_down none)"
                );
                continue;
            }
            let n = self.reset_backend(id, KillReason::MarkedDown);
            info!(
                listener = %listener.name, server = %spec.name, backend = id, sessions = n,
                "server removed by the reload: resetting its sessions (on_marked_down shutdown-sessions)"
            );
        }
        left_to_run
    }
}
