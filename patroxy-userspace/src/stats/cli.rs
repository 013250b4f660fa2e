//! The operator's commands: `patroxy status` (the stats table from the running daemon),
//! `patroxy sessions` (open sessions from the pinned maps), `patroxy maps` (pinned paths and the
//! bpftool commands to look inside), `patroxy set-state` (a server's READY/DRAIN/MAINT).
use std::{
    collections::HashMap,
    io::IsTerminal as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
};

use anyhow::{Context as _, bail};
use patroxy_common::{BackendEntry, SessionEntry};

use super::{
    html::{bytes, duration},
    model::{StateClass, StatsSnapshot},
};
use crate::{
    config::Config,
    dataplane::{
        maps::{MAP_BACKENDS, MAP_LOG_LIMIT, MAP_SESSIONS, MAP_SOCKS, OpenSessions, open_pinned},
        sockopt::monotonic_ns,
    },
    operator_state::AdminState,
};

/// The stats URL of the daemon configured in `config`: its `[stats]` bind, with an unspecified
/// address (`*`, 0.0.0.0, ::) replaced by loopback.
pub fn url_from_config(config: &Config) -> anyhow::Result<String> {
    let Some(stats) = &config.stats else {
        bail!("the configuration has no [stats] section; pass --url");
    };
    let mut addr: SocketAddr = stats.bind;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        });
    }
    Ok(format!("http://{addr}"))
}

/// `patroxy status`: fetches `<url>/;json` and prints one table per listener.
pub async fn status(url: &str) -> anyhow::Result<()> {
    let url = format!("{}/;json", url.trim_end_matches('/'));
    let snap: StatsSnapshot = reqwest::get(&url)
        .await
        .and_then(|r| r.error_for_status())
        .with_context(|| format!("fetching {url} (is patroxy running with [stats]?)"))?
        .json()
        .await
        .with_context(|| format!("reading {url}"))?;
    print!("{}", status_table(&snap, std::io::stdout().is_terminal()));
    Ok(())
}

/// `patroxy set-state <listener>/<server> <state>`: posts to the daemon's admin endpoint and
/// prints its answer; a refusal (unknown name, bad state, forbidden) is an error with the
/// daemon's reason.
pub async fn set_state(url: &str, target: &str, state: AdminState) -> anyhow::Result<()> {
    let Some((listener, server)) = target.split_once('/') else {
        bail!("expected <listener>/<server>, got {target:?}");
    };
    let mut endpoint =
        reqwest::Url::parse(url).with_context(|| format!("{url} is not a valid URL"))?;
    endpoint
        .path_segments_mut()
        .map_err(|()| anyhow::anyhow!("{url} cannot take a path"))?
        .pop_if_empty()
        .extend(["admin", "servers", listener, server]);
    endpoint
        .query_pairs_mut()
        .append_pair("state", state.as_str());
    let response = reqwest::Client::new()
        .post(endpoint.clone())
        .send()
        .await
        .with_context(|| format!("posting to {endpoint} (is patroxy running with [stats]?)"))?;
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    if !status.is_success() {
        bail!("{status}: {}", text.trim_end());
    }
    print!("{text}");
    Ok(())
}

/// The `status` output; `color` adds ANSI colours to the status column.
pub fn status_table(snap: &StatsSnapshot, color: bool) -> String {
    let mut out = format!(
        "patroxy {} pid {} up {} data path {}{}\n",
        snap.version,
        snap.pid,
        duration(snap.uptime_secs),
        snap.data_path,
        if snap.live_bytes {
            ""
        } else {
            " (bytes of closed sessions only)"
        }
    );
    for l in &snap.listeners {
        out.push_str(&format!(
            "\n{}  bind {}  balance {}  check {}  leader {}  leader changes {}  clients {} (waiting {})\n",
            l.name,
            l.bind,
            l.balance,
            l.check.as_deref().unwrap_or("none"),
            l.leader().map_or("none", |s| s.name.as_str()),
            l.primary_changes,
            l.frontend.scur,
            l.frontend.waiting,
        ));
        let mut rows = vec![
            [
                "SERVER", "STATUS", "ROLE", "TL", "CHECK", "CUR", "MAX", "LIMIT", "TOTAL", "RATE",
                "QUEUE", "IN", "OUT", "CHKFAIL", "CHKDOWN", "LASTCHG", "DOWNTIME",
            ]
            .map(String::from)
            .to_vec(),
        ];
        let mut classes = vec![None];
        for s in &l.servers {
            let check = s.last_check.as_ref().map_or(String::new(), |c| {
                let code = c.code.map_or(String::new(), |c| format!("/{c}"));
                format!(
                    "{}{code} {}ms {} ago",
                    c.status,
                    c.duration_ms,
                    duration(c.age_secs)
                )
            });
            rows.push(vec![
                s.name.clone(),
                s.status.clone(),
                s.role.clone().unwrap_or_else(|| "?".into()),
                s.timeline.map_or(String::new(), |t| t.to_string()),
                check,
                s.scur.to_string(),
                s.smax.to_string(),
                s.slim.map_or("-".into(), |l| l.to_string()),
                s.stot.to_string(),
                s.rate.to_string(),
                format!("{}/{}", s.qcur, s.qmax),
                bytes(s.bin),
                bytes(s.bout),
                s.chkfail.to_string(),
                s.chkdown.to_string(),
                duration(s.lastchg_secs),
                duration(s.downtime_secs),
            ]);
            classes.push(Some(s.class));
        }
        out.push_str(&table(&rows, &classes, color));
    }
    out
}

/// Left-aligned columns two spaces apart; column 1 coloured by state when asked.
fn table(rows: &[Vec<String>], classes: &[Option<StateClass>], color: bool) -> String {
    let cols = rows[0].len();
    let widths: Vec<usize> = (0..cols)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for (row, class) in rows.iter().zip(classes) {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            let padded = format!("{cell:<w$}", w = widths[c]);
            match (c, class, color) {
                (1, Some(class), true) => {
                    let code = match class {
                        StateClass::Up => "32",
                        StateClass::GoingDown => "33",
                        StateClass::GoingUp => "33;1",
                        StateClass::Down => "31;1",
                        StateClass::NoCheck => "90",
                        // HAProxy's colours: brown (256-colour 130) and blue.
                        StateClass::Maint => "38;5;130",
                        StateClass::Drain => "34",
                    };
                    line.push_str(&format!("\x1b[{code}m{padded}\x1b[0m"));
                }
                _ => line.push_str(&padded),
            }
            line.push_str("  ");
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `patroxy sessions`: one line per open sockmap session from the pinned SESSIONS map. With the
/// daemon's config, listener and backend ids are shown as names.
pub fn sessions(pin_dir: &Path, config: Option<&Config>) -> anyhow::Result<()> {
    let sessions = OpenSessions::read(pin_dir).with_context(|| {
        format!(
            "opening {} (is patroxy running with the sockmap data path? root needed)",
            pin_dir.join(MAP_SESSIONS).display()
        )
    })?;
    let names: HashMap<u32, (String, String)> = config.map_or_else(HashMap::new, |c| {
        crate::patroni::backends(c)
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
    print!("{}", table(&rows, &vec![None; rows.len()], false));
    println!("{n} open session(s) on the sockmap path (bytes: client->server / server->client)");
    Ok(())
}

/// `patroxy maps`: the pinned maps and how to read them with bpftool.
pub fn maps(pin_dir: &Path) -> anyhow::Result<()> {
    println!("pinned under {}:", pin_dir.display());
    for (name, what) in [
        (
            MAP_SOCKS,
            "sockhash: socket cookie -> socket (no BTF: the kernel refuses it for sockmaps)",
        ),
        (
            MAP_SESSIONS,
            "per socket: peer cookie, bytes each way, last activity, backend, listener, side",
        ),
        (
            MAP_BACKENDS,
            "per backend id: address, listener, state, role, fenced, sessions",
        ),
        (
            MAP_LOG_LIMIT,
            "per CPU: the debug log's token bucket, lines printed and suppressed (bpf_log)",
        ),
    ] {
        let path = pin_dir.join(name);
        let count = match name {
            MAP_SESSIONS => open_pinned::<u64, SessionEntry>(pin_dir, name)
                .ok()
                .map(|m| m.keys().count()),
            MAP_BACKENDS => open_pinned::<u32, BackendEntry>(pin_dir, name)
                .ok()
                .map(|m| m.keys().count()),
            _ => None,
        };
        let state = match (path.exists(), count) {
            (false, _) => "missing".to_string(),
            (true, Some(n)) => format!("{n} entries"),
            (true, None) => "present".to_string(),
        };
        println!(
            "\n  {name:<9} {} ({state})\n            {what}",
            path.display()
        );
        println!("            bpftool map show pinned {}", path.display());
        println!("            bpftool map dump pinned {}", path.display());
    }
    println!("\nthe verdict program:\n  bpftool prog show name patroxy_verdict");
    println!(
        "  bpftool -j map dump pinned {} | jq .  # typed JSON",
        pin_dir.join(MAP_SESSIONS).display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::model::sample;
    use super::*;

    #[test]
    fn status_table_lists_every_server() {
        let text = status_table(&sample::snapshot(), false);
        assert!(text.starts_with("patroxy 0.1.0 pid 4242 up 1d01h data path sockmap\n"));
        let pg2 = text.lines().find(|l| l.starts_with("pg2 ")).unwrap();
        assert!(
            pg2.contains("DOWN") && pg2.contains("L7STS/503 2ms 0s ago"),
            "{pg2}"
        );
        assert!(text.contains("leader pg1"));
        assert!(
            text.lines()
                .any(|l| l.starts_with("pg3 ") && l.contains("UP 2/3"))
        );
        let colored = status_table(&sample::snapshot(), true);
        assert!(colored.contains("\x1b[31;1mDOWN"));
    }
}
