//! Live sessions by backend, so a mark-down (or shutdown) can reset all of a server's sessions,
//! and with their client's address, so a CancelRequest finds the servers its client talks to.
use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use crate::dataplane::{KillReason, KillSwitch};

#[derive(Default)]
pub struct SessionRegistry {
    next_id: AtomicU64,
    /// backend id -> session id -> its kill switch and client address.
    by_backend: Mutex<HashMap<u32, HashMap<u64, Live>>>,
    /// Set by `hand_over_all`: a session registered later is handed over as soon as it is
    /// spliced, so none is left behind in a process about to exit.
    handing_over: AtomicBool,
    /// Backends whose sessions are not handed over but finish here (see `hand_over_all`).
    kept_here: Mutex<HashSet<u32>>,
}

/// One live session: how to reset it, and whose it is.
struct Live {
    kill: KillSwitch,
    client: IpAddr,
}

/// Removes its session from the registry when dropped.
pub struct Registered<'a> {
    registry: &'a SessionRegistry,
    backend: u32,
    id: u64,
    pub kill: KillSwitch,
}

impl SessionRegistry {
    pub fn register(&self, backend: u32, client: IpAddr) -> Registered<'_> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let kill = KillSwitch::default();
        let mut by_backend = self.by_backend.lock().expect("registry lock");
        by_backend.entry(backend).or_default().insert(
            id,
            Live {
                kill: kill.clone(),
                client,
            },
        );
        // Read under the lock `hand_over_all` takes after setting it: no session slips by.
        if self.handing_over.load(Ordering::SeqCst)
            && !self.kept_here.lock().expect("kept lock").contains(&backend)
        {
            kill.hand_over();
        }
        drop(by_backend);
        Registered {
            registry: self,
            backend,
            id,
            kill,
        }
    }

    /// Resets every session of `backend`; returns how many were told to.
    pub fn kill_backend(&self, backend: u32, reason: KillReason) -> usize {
        let sessions = self
            .by_backend
            .lock()
            .expect("registry lock")
            .get(&backend)
            .map(|m| m.values().map(|l| l.kill.clone()).collect::<Vec<_>>())
            .unwrap_or_default();
        sessions.iter().for_each(|k| k.kill(reason));
        sessions.len()
    }

    /// Asks every session, and every one registered from now on, to leave its sockets to a
    /// successor (see [`KillSwitch::hand_over`]), except those of the backends in `kept_here`.
    pub fn hand_over_all(&self, kept_here: HashSet<u32>) {
        *self.kept_here.lock().expect("kept lock") = kept_here;
        self.handing_over.store(true, Ordering::SeqCst);
        // In `register`'s order: the sessions first, then the kept set.
        let by_backend = self.by_backend.lock().expect("registry lock");
        let kept_here = self.kept_here.lock().expect("kept lock");
        by_backend
            .iter()
            .filter(|(backend, _)| !kept_here.contains(backend))
            .flat_map(|(_, sessions)| sessions.values())
            .for_each(|l| l.kill.hand_over());
    }

    /// The backends with at least one live session from `client`.
    pub fn backends_of_client(&self, client: IpAddr) -> Vec<u32> {
        self.by_backend
            .lock()
            .expect("registry lock")
            .iter()
            .filter(|(_, sessions)| sessions.values().any(|l| l.client == client))
            .map(|(backend, _)| *backend)
            .collect()
    }

    pub fn kill_all(&self, reason: KillReason) -> usize {
        let backends: Vec<u32> = self
            .by_backend
            .lock()
            .expect("registry lock")
            .keys()
            .copied()
            .collect();
        backends
            .into_iter()
            .map(|b| self.kill_backend(b, reason))
            .sum()
    }
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        let mut map = self.registry.by_backend.lock().expect("registry lock");
        if let Some(sessions) = map.get_mut(&self.backend) {
            sessions.remove(&self.id);
        }
    }
}
