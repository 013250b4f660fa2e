//! Undoes writes to BACKENDS the daemon did not make. A fence set by hand (`bpftool map
//! update`) makes the verdict drop a backend's bytes while userspace, not told, keeps its
//! sessions open: clients hang and sockets sit in CLOSE-WAIT. Once a second the daemon
//! compares the map with what it wrote, puts its own entries back and resets the sessions a
//! foreign fence blocked, as a mark-down does: the bytes the verdict dropped are lost, so
//! those streams cannot go on.
use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::Proxy;
use crate::dataplane::{ForeignWrite, KillReason};

/// How often BACKENDS is compared: a foreign fence blackholes sessions for at most this long.
const AUDIT_INTERVAL: Duration = Duration::from_secs(1);

impl Proxy {
    /// Runs until `stop` on the sockmap path (the fallback path has no map to audit).
    pub(super) async fn undo_foreign_writes(self: Arc<Self>, stop: CancellationToken) {
        if self.dataplane.kernel().is_none() {
            return;
        }
        let mut tick = tokio::time::interval(AUDIT_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.cancelled() => return,
            }
            for write in self.backends.restore_foreign_writes() {
                self.report_foreign_write(&write);
            }
        }
    }

    fn report_foreign_write(&self, write: &ForeignWrite) {
        let (listener, server) = self.names(write.id);
        let tool =
            format!("`patroxy set-state {listener}/{server} maint` takes a server out of rotation");
        if write.blocked_forwarding() {
            let n = self
                .sessions
                .kill_backend(write.id, KillReason::ForeignFence);
            let how = if write.theirs.is_some() {
                "fenced"
            } else {
                "deleted"
            };
            warn!(
                backend = write.id, %listener, %server, sessions = n,
                "BACKENDS entry {how} outside patroxy (bpftool?): the kernel dropped its sessions' \
                 bytes; restored the entry and resetting its sessions. {tool}"
            );
        } else {
            warn!(
                backend = write.id, %listener, %server, found = ?write.theirs,
                "BACKENDS entry changed outside patroxy (bpftool?); restored it. {tool}"
            );
        }
    }

    /// The listener's and server's names of backend `id`.
    fn names(&self, id: u32) -> (String, String) {
        let (listener, server) = self
            .ids
            .names(id)
            .expect("backend ids come from the id table");
        (listener.to_owned(), server.to_owned())
    }
}
