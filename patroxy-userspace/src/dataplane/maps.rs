//! The verdict program and its maps by name (in the eBPF object and under the pin directory),
//! and reading the pinned maps from outside the data path: the stats and the operator's
//! commands open their own handle on a pin, so they never hold the data path's lock on a map.
use std::{collections::HashMap, path::Path};

use aya::{
    Pod,
    maps::{HashMap as BpfHashMap, Map, MapData, MapError},
};
use patroxy_common::{SIDE_CLIENT, SessionEntry};

/// Socket cookie -> socket: the sockhash the verdict program is attached to.
pub const MAP_SOCKS: &str = "SOCKS";
/// Per socket: its peer, bytes each way, last activity, backend, listener and side.
pub const MAP_SESSIONS: &str = "SESSIONS";
/// Per backend id: address, listener, state, role, fence and session count.
pub const MAP_BACKENDS: &str = "BACKENDS";
/// Per CPU: the debug log's token bucket and its counts.
pub const MAP_LOG_LIMIT: &str = "LOG_LIMIT";
/// aya-log-ebpf's ring buffer (not pinned).
pub const MAP_LOG_RING: &str = "AYA_LOGS";
/// The sk_skb verdict program.
pub const PROGRAM: &str = "patroxy_verdict";
/// The maps pinned under the pin directory.
pub const PINNED: [&str; 4] = [MAP_SOCKS, MAP_SESSIONS, MAP_BACKENDS, MAP_LOG_LIMIT];

/// Opens pinned hash map `name` of `pin_dir` through a handle of its own.
pub fn open_pinned<K: Pod, V: Pod>(
    pin_dir: &Path,
    name: &str,
) -> Result<BpfHashMap<MapData, K, V>, MapError> {
    let map = Map::from_map_data(MapData::from_pin(pin_dir.join(name))?)?;
    BpfHashMap::try_from(map)
}

/// Bytes of open sessions per backend id: (client->server, server->client).
pub type LiveBytes = HashMap<u32, (u64, u64)>;

/// The open sockmap sessions, as the pinned SESSIONS map held them when read. Each session has
/// two entries, one per socket, keyed by socket cookie; the client side's holds both directions.
pub struct OpenSessions(HashMap<u64, SessionEntry>);

impl OpenSessions {
    /// Reads SESSIONS of `pin_dir`.
    pub fn read(pin_dir: &Path) -> Result<Self, MapError> {
        let sessions = open_pinned::<u64, SessionEntry>(pin_dir, MAP_SESSIONS)?;
        // A session that ends during the walk makes `iter` report an error for its key: skip it.
        Ok(Self(sessions.iter().flatten().collect()))
    }

    /// Each session once: the cookie and entry of its client side.
    pub fn clients(&self) -> impl Iterator<Item = (u64, &SessionEntry)> {
        self.0
            .iter()
            .filter(|(_, e)| e.side == SIDE_CLIENT)
            .map(|(cookie, e)| (*cookie, e))
    }

    /// The last activity of `client`'s session: the later of its two sockets' (ns, monotonic).
    pub fn last_activity_ns(&self, client: &SessionEntry) -> u64 {
        self.0
            .get(&client.peer)
            .map_or(client.last_ns, |p| p.last_ns.max(client.last_ns))
    }

    /// The sessions' bytes summed per backend.
    pub fn bytes_per_backend(&self) -> LiveBytes {
        let mut out = LiveBytes::new();
        for (_, e) in self.clients() {
            let b = out.entry(e.backend).or_default();
            b.0 += e.bytes_rx;
            b.1 += e.bytes_tx;
        }
        out
    }
}
