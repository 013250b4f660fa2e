//! Interim: the first configured server; replaced by health-driven routing.
use tokio::time::Instant;

use super::Proxy;

impl Proxy {
    pub(super) fn pick(&self, listener: usize, excluded: &[usize]) -> Option<usize> {
        (0..self.config.listeners[listener].servers.len()).find(|s| !excluded.contains(s))
    }

    /// Waits until the routing answer may have changed; false once `deadline` passed.
    pub(super) async fn wait_for_change(&self, deadline: Instant) -> bool {
        tokio::time::sleep_until(deadline).await;
        false
    }
}
