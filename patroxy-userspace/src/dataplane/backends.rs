//! The backend set as the kernel sees it: one BACKENDS entry per (listener, server), rewritten on
//! every state or session-count change. The verdict program reads `fenced` to stop forwarding
//! for a server marked down; bpftool shows the whole table. The daemon is its one writer: each
//! write first checks that the map still holds the daemon's last value, and
//! [`BackendTable::restore_foreign_writes`] reports what anyone else wrote.
use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use aya::maps::{HashMap, MapData, MapError};
use patroxy_common::BackendEntry;
use tracing::error;

use super::KernelMaps;

pub struct BackendTable {
    kernel: Option<Arc<KernelMaps>>,
    /// Cleared while a successor takes the maps over: from then on it writes BACKENDS.
    writes_kernel: AtomicBool,
    written: Mutex<Written>,
}

struct Written {
    /// What the daemon last wrote; index = backend id - 1.
    entries: Vec<BackendEntry>,
    /// Foreign values the daemon's own writes found and replaced since the last
    /// `restore_foreign_writes`, at most one per backend: a write follows every health check
    /// and session, so it often overwrites a foreign fence before the audit would see it.
    overwritten: Vec<ForeignWrite>,
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
        // New maps, or a predecessor's taken over (whose values this daemon now owns): nothing
        // to compare with yet.
        if let Some(kernel) = &kernel {
            let mut map = kernel.backends.lock().expect("BACKENDS lock");
            for (index, entry) in entries.iter().enumerate() {
                write(&mut map, index as u32 + 1, entry);
            }
        }
        Self {
            kernel,
            writes_kernel: AtomicBool::new(true),
            written: Mutex::new(Written {
                entries,
                overwritten: Vec::new(),
            }),
        }
    }

    pub fn get(&self, id: u32) -> Option<BackendEntry> {
        let written = self.written.lock().expect("backends lock");
        written.entries.get(id as usize - 1).copied()
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

    /// Finds where someone else wrote BACKENDS (an operator's `bpftool map update` or
    /// `delete`): entries that differ from what the daemon last wrote, which are written back,
    /// and those the daemon's own writes replaced since the last call. None in the fallback
    /// path, which has no map, nor while a successor writes it.
    pub fn restore_foreign_writes(&self) -> Vec<ForeignWrite> {
        let Some(kernel) = &self.kernel else {
            return Vec::new();
        };
        // Under the table's lock, as `update`: none of the daemon's own writes is in flight.
        let mut written = self.written.lock().expect("backends lock");
        if !self.writes_kernel.load(Ordering::SeqCst) {
            return Vec::new();
        }
        let mut map = kernel.backends.lock().expect("BACKENDS lock");
        let mut found = std::mem::take(&mut written.overwritten);
        for (index, ours) in written.entries.iter().enumerate() {
            let id = index as u32 + 1;
            if let Some(foreign) = foreign_value(&map, id, ours) {
                write(&mut map, id, ours);
                found.push(foreign);
            }
        }
        found
    }

    /// Applies `change` and writes the entry through to BACKENDS (under the same lock, so the
    /// kernel never sees an older value after a newer one).
    fn update(&self, id: u32, change: impl FnOnce(&mut BackendEntry)) {
        let mut guard = self.written.lock().expect("backends lock");
        let written = &mut *guard;
        let Some(entry) = written.entries.get_mut(id as usize - 1) else {
            return;
        };
        let Some(kernel) = self
            .kernel
            .as_ref()
            .filter(|_| self.writes_kernel.load(Ordering::SeqCst))
        else {
            change(entry);
            return;
        };
        let mut map = kernel.backends.lock().expect("BACKENDS lock");
        if let Some(foreign) = foreign_value(&map, id, entry)
            && !written.overwritten.iter().any(|w| w.id == id)
        {
            written.overwritten.push(foreign);
        }
        change(entry);
        write(&mut map, id, entry);
    }
}

type BackendsMap = HashMap<MapData, u32, BackendEntry>;

/// What BACKENDS holds for `id` if that is not `ours`.
fn foreign_value(map: &BackendsMap, id: u32, ours: &BackendEntry) -> Option<ForeignWrite> {
    let theirs = match map.get(&id, 0) {
        Ok(theirs) if theirs == *ours => return None,
        Ok(theirs) => Some(theirs),
        Err(MapError::KeyNotFound) => None,
        Err(e) => {
            error!(backend = id, "reading BACKENDS failed: {e}");
            return None;
        }
    };
    Some(ForeignWrite {
        id,
        theirs,
        ours: *ours,
    })
}

fn write(map: &mut BackendsMap, id: u32, entry: &BackendEntry) {
    if let Err(e) = map.insert(id, *entry, 0) {
        error!(backend = id, "writing BACKENDS failed: {e}");
    }
}

/// A BACKENDS entry found different from what the daemon wrote, and put back.
#[derive(Debug)]
pub struct ForeignWrite {
    pub id: u32,
    /// What the map held; `None` when the entry had been deleted.
    pub theirs: Option<BackendEntry>,
    /// The daemon's entry, written back.
    pub ours: BackendEntry,
}

impl ForeignWrite {
    /// Whether the verdict was stopping this backend's sessions when the daemon was not: a
    /// fence, or a deleted entry (the verdict drops the bytes of a backend it does not know).
    pub fn blocked_forwarding(&self) -> bool {
        self.ours.fenced == 0 && self.theirs.is_none_or(|t| t.fenced != 0)
    }
}
