//! `patroxy sessions`: the open sockmap sessions, from the pinned SESSIONS map.
use std::{collections::HashMap, path::Path};

use anyhow::Context as _;
use patroxy::{
    config::Config,
    dataplane::{
        maps::{MAP_SESSIONS, OpenSessions},
        sockopt::monotonic_ns,
    },
    stats::text::columns,
};
use patroxy_common::SessionEntry;

/// Prints one line per open session. With the daemon's config, listener and backend ids are
/// shown as names.
pub fn run(pin_dir: &Path, config: Option<&Config>) -> anyhow::Result<()> {
    let sessions = OpenSessions::read(pin_dir).with_context(|| {
        format!(
            "opening {} (is patroxy running with the sockmap data path? root needed)",
            pin_dir.join(MAP_SESSIONS).display()
        )
    })?;
    let names: HashMap<u32, (String, String)> = config.map_or_else(HashMap::new, |c| {
        patroxy::patroni::backends(c)
            .map(|(k, id)| {
                let l = &c.listeners[k.listener];
                (id, (l.name.clone(), l.servers[k.server].name.clone()))
            })
            .collect()
    });
    let now = monotonic_ns();
    let mut rows = vec![
        [
            "CLIENT_COOKIE",
            "BACKEND_COOKIE",
            "LISTENER",
            "BACKEND",
            "BYTES_IN",
            "BYTES_OUT",
            "IDLE",
        ]
        .map(String::from)
        .to_vec(),
    ];
    let mut clients: Vec<(u64, &SessionEntry)> = sessions.clients().collect();
    clients.sort_by_key(|(cookie, _)| *cookie);
    for (cookie, e) in clients {
        let last = sessions.last_activity_ns(e);
        let (listener, backend) = match names.get(&e.backend) {
            Some((l, s)) => (l.clone(), format!("{s} (#{})", e.backend)),
            None => (e.listener.to_string(), format!("#{}", e.backend)),
        };
        rows.push(vec![
            cookie.to_string(),
            e.peer.to_string(),
            listener,
            backend,
            e.bytes_rx.to_string(),
            e.bytes_tx.to_string(),
            format!("{:.1}s", now.saturating_sub(last) as f64 / 1e9),
        ]);
    }
    let n = rows.len() - 1;
    print!("{}", columns(&rows, &vec![None; rows.len()], false));
    println!("{n} open session(s) on the sockmap path (bytes: client->server / server->client)");
    Ok(())
}
