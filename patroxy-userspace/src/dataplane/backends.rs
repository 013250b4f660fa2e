//! The backend set as the kernel sees it: one BACKENDS entry per (listener, server), rewritten on
//! every state or session-count change. The verdict program reads `fenced` to stop forwarding
//! for a server marked down; bpftool shows the whole table.
use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use patroxy_common::BackendEntry;
use tracing::error;

use super::KernelMaps;

pub struct BackendTable {
    kernel: Option<Arc<KernelMaps>>,
    /// Cleared while a successor takes the maps over: from then on it writes BACKENDS.
    writes_kernel: AtomicBool,
    /// Index = backend id - 1.
    entries: Mutex<Vec<BackendEntry>>,
}

impl BackendTable {
    /// `backends` lists (listener index, traffic address) in backend-id order; every entry starts
    /// DOWN until the first `set_state`.
    pub fn new(
        kernel: Option<Arc<KernelMaps>>,
        backends: impl IntoIterator<Item = (u16, SocketAddr)>,
    ) -> Self {
        let entries: Vec<BackendEntry> = backends
            .into_iter()
            .map(|(listener, addr)| BackendEntry {
                addr_v4: match addr {
                    SocketAddr::V4(v4) => u32::from_ne_bytes(v4.ip().octets()),
                    SocketAddr::V6(_) => 0,
                },
                port: addr.port(),
                listener,
                ..Default::default()
            })
            .collect();
        let table = Self {
            kernel,
            writes_kernel: AtomicBool::new(true),
            entries: Mutex::new(entries),
        };
        let count = table.entries.lock().expect("backends lock").len();
        for id in 1..=count as u32 {
            table.update(id, |_| {});
        }
        table
    }

    pub fn get(&self, id: u32) -> Option<BackendEntry> {
        let entries = self.entries.lock().expect("backends lock");
        entries.get(id as usize - 1).copied()
    }

    /// Records routing's view (checks and admin state); `fenced` makes the kernel stop
    /// forwarding for this backend.
    pub fn set_state(&self, id: u32, state: u8, role: u8, fenced: bool) {
        self.update(id, |e| {
            e.state = state;
            e.role = role;
            e.fenced = u8::from(fenced);
        });
    }

    pub fn session_opened(&self, id: u32) {
        self.update(id, |e| e.sessions += 1);
    }

    pub fn session_closed(&self, id: u32) {
        self.update(id, |e| e.sessions = e.sessions.saturating_sub(1));
    }

    /// Stops (`false`) or resumes writing BACKENDS: an upgrade's successor writes it as soon as
    /// it starts, so a predecessor's late updates (sessions ending) must not overwrite them.
    pub fn write_kernel(&self, on: bool) {
        self.writes_kernel.store(on, Ordering::SeqCst);
    }

    /// Applies `change` and writes the entry through to BACKENDS (under the same lock, so the
    /// kernel never sees an older value after a newer one).
    fn update(&self, id: u32, change: impl FnOnce(&mut BackendEntry)) {
        let mut entries = self.entries.lock().expect("backends lock");
        let Some(entry) = entries.get_mut(id as usize - 1) else {
            return;
        };
        change(entry);
        if let Some(kernel) = &self.kernel
            && self.writes_kernel.load(Ordering::SeqCst)
        {
            let mut map = kernel.backends.lock().expect("BACKENDS lock");
            if let Err(e) = map.insert(id, *entry, 0) {
                error!(backend = id, "writing BACKENDS failed: {e}");
            }
        }
    }
}
