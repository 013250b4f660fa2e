//! Per-server maxconn: sessions past the limit wait FIFO for a slot (tokio's semaphore is fair).
use std::{sync::Arc, time::Duration};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub struct ServerSlots {
    /// `None` = no maxconn on this server.
    semaphore: Option<Arc<Semaphore>>,
}

/// Holding one keeps a server slot; dropping it lets the next queued session in.
pub struct Slot {
    _permit: Option<OwnedSemaphorePermit>,
}

impl ServerSlots {
    pub fn new(maxconn: Option<u32>) -> Self {
        Self {
            semaphore: maxconn.map(|n| Arc::new(Semaphore::new(n as usize))),
        }
    }

    /// Takes a slot, waiting in the server's queue for at most `wait`; `None` on expiry.
    pub async fn acquire(&self, wait: Duration) -> Option<Slot> {
        let Some(semaphore) = &self.semaphore else {
            return Some(Slot { _permit: None });
        };
        let permit = tokio::time::timeout(wait, semaphore.clone().acquire_owned())
            .await
            .ok()?
            .ok()?;
        Some(Slot {
            _permit: Some(permit),
        })
    }
}
