//! The sessions the TC program carries, as the stats and `patroxy sessions` read them from the
//! pinned FLOWS map (a handle of their own, like [`OpenSessions`](crate::dataplane::maps::OpenSessions)):
//! what each handed-off session forwarded since its hand-off, and when. Its SESSIONS entries
//! stay while the flow lives, frozen at the hand-off, so a session's bytes are the two summed.
use std::{collections::HashMap, path::Path};

use aya::maps::MapError;
use patroxy_common::{
    SIDE_CLIENT,
    tc::{FLOW_ACTIVE, FlowEntry, FlowKey},
};

use super::{MAP_FLOWS, handoff::key as flow_key};
use crate::dataplane::{
    maps::{LiveBytes, open_pinned},
    sock_diag::SocketEnds,
};

/// The active FLOWS entries, as read at one moment. Empty without `datapath = "tc"` (no pin).
#[derive(Debug, Default)]
pub struct OpenFlows(HashMap<FlowKey, FlowEntry>);

/// What the TC program counted of one session since its hand-off.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SessionFlows {
    pub bytes_from_client: u64,
    pub bytes_from_server: u64,
    /// The later of the two directions' last packets (ns, monotonic).
    pub last_ns: u64,
}

impl OpenFlows {
    /// Reads FLOWS under `pin_dir`; none when it is not pinned (the packet-level splice is off).
    pub fn read(pin_dir: &Path) -> Result<Self, MapError> {
        if !pin_dir.join(MAP_FLOWS).exists() {
            return Ok(Self::default());
        }
        let flows = open_pinned::<FlowKey, FlowEntry>(pin_dir, MAP_FLOWS)?;
        // Pending entries belong to a hand-off in progress, which may still be abandoned; a
        // flow that ends during the walk makes `iter` report an error for its key: skip both.
        Ok(Self(
            flows
                .iter()
                .flatten()
                .filter(|(_, e)| e.state == FLOW_ACTIVE)
                .collect(),
        ))
    }

    /// Sessions the program carries now.
    pub fn sessions(&self) -> usize {
        self.0.values().filter(|e| e.side == SIDE_CLIENT).count()
    }

    /// The flows of the session whose client socket is `client` and backend socket `backend`,
    /// if it was handed off.
    pub fn of_session(&self, client: &SocketEnds, backend: &SocketEnds) -> Option<SessionFlows> {
        // Each direction is keyed as its packets arrive at the proxy: from the peer to the
        // proxy's socket.
        let to_server = self.0.get(&flow_key(client.remote, client.local))?;
        let to_client = self.0.get(&flow_key(backend.remote, backend.local))?;
        Some(SessionFlows {
            bytes_from_client: to_server.bytes,
            bytes_from_server: to_client.bytes,
            last_ns: to_server.last_ns.max(to_client.last_ns),
        })
    }

    /// The flows' bytes summed per backend: (client->server, server->client).
    pub fn bytes_per_backend(&self) -> LiveBytes {
        let mut out = LiveBytes::new();
        for e in self.0.values() {
            let b = out.entry(e.backend).or_default();
            if e.side == SIDE_CLIENT {
                b.0 += e.bytes;
            } else {
                b.1 += e.bytes;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use patroxy_common::SIDE_BACKEND;

    use super::*;

    fn ends(local: &str, remote: &str) -> SocketEnds {
        SocketEnds {
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
        }
    }

    #[test]
    fn a_sessions_flows_are_found_by_its_sockets_addresses() {
        let client = ends("10.0.1.1:5432", "10.0.1.2:40000");
        // A listener on `::` sees IPv4 clients as mapped addresses.
        let backend = ends("[::ffff:10.0.2.1]:50000", "[::ffff:10.0.2.2]:5433");
        let entry = |side, bytes, last_ns| FlowEntry {
            backend: 3,
            state: FLOW_ACTIVE,
            side,
            bytes,
            last_ns,
            ..FlowEntry::default()
        };
        let key = |from: &str, to: &str| flow_key(from.parse().unwrap(), to.parse().unwrap());
        let flows = OpenFlows(HashMap::from([
            (
                key("10.0.1.2:40000", "10.0.1.1:5432"),
                entry(SIDE_CLIENT, 100, 7),
            ),
            (
                key("10.0.2.2:5433", "10.0.2.1:50000"),
                entry(SIDE_BACKEND, 2000, 9),
            ),
        ]));
        assert_eq!(
            flows.of_session(&client, &backend),
            Some(SessionFlows {
                bytes_from_client: 100,
                bytes_from_server: 2000,
                last_ns: 9,
            })
        );
        assert_eq!(flows.sessions(), 1);
        assert_eq!(flows.bytes_per_backend().get(&3), Some(&(100, 2000)));
        // Another client on the same listener has no flows.
        let other = ends("10.0.1.1:5432", "10.0.1.2:40001");
        assert_eq!(flows.of_session(&other, &backend), None);
        // An IPv6 session's flows are keyed by its IPv6 addresses.
        let v6_client = ends("[fd00::1]:5432", "[fd00::2]:40000");
        let v6_backend = ends("[fd00:1::1]:50000", "[fd00:1::2]:5432");
        assert_eq!(flows.of_session(&v6_client, &v6_backend), None);
        let mut flows = flows;
        flows.0.insert(
            key("[fd00::2]:40000", "[fd00::1]:5432"),
            entry(SIDE_CLIENT, 5, 1),
        );
        flows.0.insert(
            key("[fd00:1::2]:5432", "[fd00:1::1]:50000"),
            entry(SIDE_BACKEND, 6, 2),
        );
        assert_eq!(
            flows.of_session(&v6_client, &v6_backend),
            Some(SessionFlows {
                bytes_from_client: 5,
                bytes_from_server: 6,
                last_ns: 2,
            })
        );
    }
}
