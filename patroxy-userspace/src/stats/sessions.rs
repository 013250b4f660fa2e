//! The open sockmap sessions as `patroxy sessions` and the runtime socket's `show sessions`
//! print them: one row per session (names from the server ids when known), as a table or
//! as JSON, with the session's addresses (`dataplane::sock_diag`): the client, and the proxy's
//! own address toward the server, whose port is the server's `pg_stat_activity.client_port`.
use std::{collections::HashMap, net::SocketAddr};

use serde::Serialize;

use super::text::columns;
use crate::{
    dataplane::{maps::OpenSessions, sock_diag::SocketEnds},
    server_ids::ServerIds,
};

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
    /// Client -> server and server -> client.
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub idle_secs: f64,
}

/// The sessions in `sessions`, by client cookie, with their addresses from `sockets` (by
/// cookie, [`crate::dataplane::sock_diag::tcp_sockets`]); `now_ns` is the monotonic clock's now.
pub fn rows(
    sessions: &OpenSessions,
    sockets: &HashMap<u64, SocketEnds>,
    ids: Option<&ServerIds>,
    now_ns: u64,
) -> Vec<SessionRow> {
    let names: HashMap<u32, (String, String)> = ids.map_or_else(HashMap::new, |ids| {
        ids.backends()
            .filter_map(|(_, id)| {
                let (listener, server) = ids.names(id)?;
                Some((id, (listener.to_owned(), server.to_owned())))
            })
            .collect()
    });
    let mut rows: Vec<SessionRow> = sessions
        .clients()
        .map(|(cookie, e)| {
            let (listener, server) = match names.get(&e.backend) {
                Some((l, s)) => (l.clone(), Some(s.clone())),
                None => (e.listener.to_string(), None),
            };
            let idle_ns = now_ns.saturating_sub(sessions.last_activity_ns(e));
            SessionRow {
                client_cookie: cookie,
                backend_cookie: e.peer,
                listener,
                server,
                backend_id: e.backend,
                client_addr: sockets.get(&cookie).map(|s| s.remote),
                proxy_addr: sockets.get(&e.peer).map(|s| s.local),
                bytes_in: e.bytes_rx,
                bytes_out: e.bytes_tx,
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
            bytes_in: 1000,
            bytes_out: 20,
            idle_secs: 1.5,
        };
        let text = table(&[row(10, Some("pg2")), row(12, None)]);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("CLIENT_COOKIE  BACKEND_COOKIE  LISTENER"));
        assert!(
            lines[1].contains("pg2 (#2)")
                && lines[1].contains("10.0.0.7:51234  10.0.0.2:40312")
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
