//! The open sockmap sessions as `patroxy sessions` and the runtime socket's `show sessions`
//! print them: one row per session (names from the server ids when known), as a table or
//! as JSON, with the session's addresses (`dataplane::sock_diag`): the client, and the proxy's
//! own address toward the server, whose port is the server's `pg_stat_activity.client_port`.
//! A session handed to the packet-level splice keeps its SESSIONS entries (frozen at the
//! hand-off): its row adds what FLOWS counted since, found by those addresses.
use std::{collections::HashMap, net::SocketAddr};

use patroxy_common::BackendEntry;
use serde::Serialize;

use super::text::columns;
use crate::{
    config::Config,
    dataplane::{maps::OpenSessions, sock_diag::SocketEnds, tc::OpenFlows},
    server_ids::ServerIds,
};

/// (listener, server) names by backend id: what the rows show instead of bare ids.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BackendNames(HashMap<u32, (String, String)>);

impl BackendNames {
    /// The running daemon's own ids.
    pub fn of_ids(ids: &ServerIds) -> Self {
        Self(
            ids.backends()
                .filter_map(|(_, id)| {
                    let (listener, server) = ids.names(id)?;
                    Some((id, (listener.to_owned(), server.to_owned())))
                })
                .collect(),
        )
    }

    /// From outside the daemon: the BACKENDS map's entries (id -> listener index, address)
    /// matched against `config`. Ids cannot be derived from the file alone: a structural
    /// reload or a restart after one numbers servers differently from a fresh start. An IPv6
    /// server (the entry holds no IPv6 address) is matched by listener and port when that
    /// pair is unique; an entry matching nothing is shown by id.
    pub fn from_backends(
        config: &Config,
        backends: impl IntoIterator<Item = (u32, BackendEntry)>,
    ) -> Self {
        let matches = |entry: &BackendEntry, address: SocketAddr| {
            address.port() == entry.port
                && match address {
                    SocketAddr::V4(v4) => u32::from_ne_bytes(v4.ip().octets()) == entry.addr_v4,
                    SocketAddr::V6(_) => entry.addr_v4 == 0,
                }
        };
        let names = backends
            .into_iter()
            .filter_map(|(id, entry)| {
                let listener = config.listeners.get(entry.listener as usize)?;
                let mut servers = listener
                    .servers
                    .iter()
                    .filter(|s| matches(&entry, s.address));
                let server = servers.next()?;
                if servers.next().is_some() {
                    return None;
                }
                Some((id, (listener.name.clone(), server.name.clone())))
            })
            .collect();
        Self(names)
    }
}

/// One open session, by its client socket.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SessionRow {
    pub client_cookie: u64,
    pub backend_cookie: u64,
    /// The listener's name, or its index without the server ids.
    pub listener: String,
    /// The server's name; `None` without the server ids.
    pub server: Option<String>,
    pub backend_id: u32,
    /// The client's address and port; `None` if its socket closed before it was looked up.
    pub client_addr: Option<SocketAddr>,
    /// The proxy's address and port toward the server: PostgreSQL's `client_addr` and
    /// `client_port` of this session's backend.
    pub proxy_addr: Option<SocketAddr>,
    /// "sockmap", or "sockmap+tc" once handed to the packet-level splice.
    pub path: &'static str,
    /// Client -> server and server -> client.
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub idle_secs: f64,
}

/// The sessions in `sessions`, by client cookie, with their addresses from `sockets` (by
/// cookie, [`crate::dataplane::sock_diag::tcp_sockets`]) and, once handed off, their `flows`;
/// `now_ns` is the monotonic clock's now.
pub fn rows(
    sessions: &OpenSessions,
    flows: &OpenFlows,
    sockets: &HashMap<u64, SocketEnds>,
    names: &BackendNames,
    now_ns: u64,
) -> Vec<SessionRow> {
    let mut rows: Vec<SessionRow> = sessions
        .clients()
        .map(|(cookie, e)| {
            let (listener, server) = match names.0.get(&e.backend) {
                Some((l, s)) => (l.clone(), Some(s.clone())),
                None => (e.listener.to_string(), None),
            };
            let (client, backend) = (sockets.get(&cookie), sockets.get(&e.peer));
            let flow = client
                .zip(backend)
                .and_then(|(c, b)| flows.of_session(c, b));
            let after_hand_off = flow.unwrap_or_default();
            let last_ns = sessions.last_activity_ns(e).max(after_hand_off.last_ns);
            let idle_ns = now_ns.saturating_sub(last_ns);
            SessionRow {
                client_cookie: cookie,
                backend_cookie: e.peer,
                listener,
                server,
                backend_id: e.backend,
                client_addr: client.map(|s| s.remote),
                proxy_addr: backend.map(|s| s.local),
                path: if flow.is_some() {
                    "sockmap+tc"
                } else {
                    "sockmap"
                },
                bytes_in: e.bytes_rx + after_hand_off.bytes_from_client,
                bytes_out: e.bytes_tx + after_hand_off.bytes_from_server,
                idle_secs: idle_ns as f64 / 1e9,
            }
        })
        .collect();
    rows.sort_by_key(|r| r.client_cookie);
    rows
}

/// The rows as a table, with a last line counting them.
pub fn table(rows: &[SessionRow]) -> String {
    let mut cells = vec![
        [
            "CLIENT_COOKIE",
            "BACKEND_COOKIE",
            "LISTENER",
            "BACKEND",
            "CLIENT",
            "PROXY_ADDR",
            "PATH",
            "BYTES_IN",
            "BYTES_OUT",
            "IDLE",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for r in rows {
        cells.push(vec![
            r.client_cookie.to_string(),
            r.backend_cookie.to_string(),
            r.listener.clone(),
            match &r.server {
                Some(s) => format!("{s} (#{})", r.backend_id),
                None => format!("#{}", r.backend_id),
            },
            addr(r.client_addr),
            addr(r.proxy_addr),
            r.path.to_owned(),
            r.bytes_in.to_string(),
            r.bytes_out.to_string(),
            format!("{:.1}s", r.idle_secs),
        ]);
    }
    let mut out = columns(&cells, &vec![None; cells.len()], false);
    out.push_str(&format!(
        "{} open session(s) on the sockmap path (bytes: client->server / server->client)\n",
        rows.len()
    ));
    out
}

fn addr(a: Option<SocketAddr>) -> String {
    a.map_or_else(|| "-".into(), |a| a.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::patroni::test_config::*;

    #[test]
    fn names_from_backends_follow_the_kernels_ids_not_the_file_order() {
        let check = "127.0.0.1:8008".parse().unwrap();
        let t = timing(100, 50, 100, 2, 3);
        let at = |name, address: &str| {
            let mut s = server(name, check, t);
            s.address = address.parse().unwrap();
            s
        };
        let config = config(
            vec![
                listener(
                    "w",
                    None,
                    vec![at("a", "10.0.0.1:5432"), at("b", "10.0.0.2:5432")],
                ),
                listener(
                    "v6",
                    None,
                    vec![at("c", "[fd00::3]:5432"), at("d", "[fd00::4]:5433")],
                ),
            ],
            None,
        );
        let v4 = |ip: [u8; 4], listener| BackendEntry {
            addr_v4: u32::from_ne_bytes(ip),
            port: 5432,
            listener,
            ..Default::default()
        };
        let v6 = |port, listener| BackendEntry {
            port,
            listener,
            ..Default::default()
        };
        // After a reload removed a server before "b", "b" is id 7, not 2.
        let names = BackendNames::from_backends(
            &config,
            [
                (7, v4([10, 0, 0, 2], 0)),
                (9, v4([10, 0, 0, 9], 0)),
                (11, v6(5433, 1)),
                (12, v6(5432, 1)),
                (13, v4([10, 0, 0, 1], 5)),
            ],
        );
        let name = |id| names.0.get(&id).map(|(l, s)| (l.as_str(), s.as_str()));
        assert_eq!(name(7), Some(("w", "b")));
        assert_eq!(name(9), None, "an address no server of its listener has");
        assert_eq!(name(11), Some(("v6", "d")), "IPv6: by listener and port");
        assert_eq!(name(12), Some(("v6", "c")));
        assert_eq!(name(13), None, "a listener index past the file's");
    }

    #[test]
    fn table_names_servers_when_it_can() {
        let row = |cookie, server: Option<&str>| SessionRow {
            client_cookie: cookie,
            backend_cookie: cookie + 1,
            listener: "postgres_read".into(),
            server: server.map(String::from),
            backend_id: 2,
            client_addr: Some("10.0.0.7:51234".parse().unwrap()),
            proxy_addr: server.map(|_| "10.0.0.2:40312".parse().unwrap()),
            path: "sockmap+tc",
            bytes_in: 1000,
            bytes_out: 20,
            idle_secs: 1.5,
        };
        let text = table(&[row(10, Some("pg2")), row(12, None)]);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("CLIENT_COOKIE  BACKEND_COOKIE  LISTENER"));
        assert!(
            lines[1].contains("pg2 (#2)")
                && lines[1].contains("10.0.0.7:51234  10.0.0.2:40312  sockmap+tc  1000")
                && lines[1].ends_with("1.5s"),
            "{text}"
        );
        assert!(lines[2].contains(" #2 "), "{text}");
        assert_eq!(
            lines[3],
            "2 open session(s) on the sockmap path (bytes: client->server / server->client)"
        );
    }
}
