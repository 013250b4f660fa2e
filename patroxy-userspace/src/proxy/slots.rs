//! Per-server maxconn: sessions past the limit wait FIFO for a slot (tokio's semaphore is fair).
use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub struct ServerSlots {
    /// The limit and its semaphore; `None` = no maxconn on this server. A reload changes it.
    limit: Mutex<Option<(u32, Arc<Semaphore>)>>,
}

/// Holding one keeps a server slot; dropping it lets the next queued session in.
pub struct Slot {
    _permit: Option<OwnedSemaphorePermit>,
}

impl ServerSlots {
    pub fn new(maxconn: Option<u32>) -> Self {
        Self {
            limit: Mutex::new(maxconn.map(|n| (n, Arc::new(Semaphore::new(n as usize))))),
        }
    }

    /// Takes a slot, waiting in the server's queue for at most `wait`; `None` on expiry.
    pub async fn acquire(&self, wait: Duration) -> Option<Slot> {
        let semaphore = self
            .limit
            .lock()
            .expect("slots lock")
            .as_ref()
            .map(|l| l.1.clone());
        let Some(semaphore) = semaphore else {
            return Some(Slot { _permit: None });
        };
        let permit = tokio::time::timeout(wait, semaphore.acquire_owned())
            .await
            .ok()?
            .ok()?;
        Some(Slot {
            _permit: Some(permit),
        })
    }

    /// A reload's new maxconn. Sessions keep their slots; a changed limit applies to the same
    /// semaphore, so the sessions open now still count. A server that had no limit counts only
    /// the sessions it gets after the reload (the earlier ones hold no slot).
    pub fn resize(&self, maxconn: Option<u32>) {
        let mut limit = self.limit.lock().expect("slots lock");
        match (limit.as_mut(), maxconn) {
            (Some((from, semaphore)), Some(to)) => {
                resize(semaphore, *from, to);
                *from = to;
            }
            (None, None) => {}
            (_, maxconn) => *limit = maxconn.map(|n| (n, Arc::new(Semaphore::new(n as usize)))),
        }
    }
}

/// Changes the number of permits of `semaphore` from `from` to `to`. Permits held now cannot be
/// taken back: those past the new limit are forgotten as they are released, so the limit holds
/// once enough sessions ended.
pub fn resize(semaphore: &Arc<Semaphore>, from: u32, to: u32) {
    if to >= from {
        semaphore.add_permits((to - from) as usize);
        return;
    }
    let excess = (from - to) as usize;
    let left = excess - semaphore.forget_permits(excess);
    if left > 0 {
        let semaphore = semaphore.clone();
        tokio::spawn(async move {
            if let Ok(permits) = semaphore.acquire_many_owned(left as u32).await {
                permits.forget();
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn resize_keeps_held_slots_and_applies_the_new_limit() {
        let slots = ServerSlots::new(Some(2));
        let wait = Duration::from_millis(10);
        let a = slots.acquire(wait).await.unwrap();
        slots.resize(Some(3));
        let b = slots.acquire(wait).await.unwrap();
        let c = slots.acquire(wait).await.unwrap();
        assert!(slots.acquire(wait).await.is_none());
        slots.resize(Some(1));
        drop((a, b));
        tokio::task::yield_now().await;
        // Still 1 held (c): the limit of 1 is reached until it ends.
        assert!(slots.acquire(wait).await.is_none());
        drop(c);
        assert!(slots.acquire(wait).await.is_some());
        slots.resize(None);
        let all: Vec<_> = take_slots(&slots, 5).await;
        assert_eq!(all.len(), 5);
    }

    async fn take_slots(slots: &ServerSlots, n: usize) -> Vec<Slot> {
        let mut held = Vec::new();
        for _ in 0..n {
            held.extend(slots.acquire(Duration::from_millis(10)).await);
        }
        held
    }
}
