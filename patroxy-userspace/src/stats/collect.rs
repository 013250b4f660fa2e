//! Builds a [`StatsSnapshot`] from the daemon's state. Only reads, through [`StatsSource`]: the
//! proxy's view of the servers, the backend table, the proxy's counters, and (sockmap path) the
//! bytes of open sessions the caller read from the kernel's SESSIONS, and the XDP allowlist's
//! counters from its pins.
use std::{
    path::Path,
    sync::atomic::Ordering::Relaxed,
    time::{SystemTime, UNIX_EPOCH},
};

use tokio::time::Instant;
use tracing::warn;

use super::{
    history::StatsHistory,
    model::{
        CancelStats, DcsStats, FrontendStats, LastCheckStats, ListenerStats, ReloadStats,
        ServerStats, StateClass, StatsSnapshot, TcStats, Traffic, XdpAttached, XdpPortStats,
        XdpRuleStats, XdpStats,
    },
};
use crate::{
    config::model::{Balance, CheckMethod, Firewall, XdpEnabled},
    dataplane::{
        maps::{LiveBytes, OpenSessions},
        tc::{OpenFlows, TcCounters},
    },
    operator_state::AdminState,
    patroni::{Role, ServerState, dcs::DcsStatus},
    proxy::{StatsSource, counters::CancelCounters},
    reload::ReloadStatus,
    view::ServerView,
};

/// The bytes of open sessions per backend, read from SESSIONS under `pin_dir` (the sockmap
/// path) plus, for sessions handed to the packet-level splice, what FLOWS counted since; none
/// on the fallback path or when a map cannot be read (logged).
pub async fn live_bytes(pin_dir: Option<&Path>) -> LiveBytes {
    let Some(dir) = pin_dir else {
        return LiveBytes::new();
    };
    let dir = dir.to_owned();
    // Walking SESSIONS is one syscall per entry: keep it off the async workers.
    let read = move || {
        let mut live = OpenSessions::read(&dir)?.bytes_per_backend();
        for (backend, (from_client, from_server)) in OpenFlows::read(&dir)?.bytes_per_backend() {
            let b = live.entry(backend).or_default();
            b.0 += from_client;
            b.1 += from_server;
        }
        Ok::<_, aya::maps::MapError>(live)
    };
    match tokio::task::spawn_blocking(read).await {
        Ok(Ok(live)) => live,
        Ok(Err(e)) => {
            warn!("stats: reading SESSIONS or FLOWS failed ({e}); bytes of open sessions missing");
            LiveBytes::new()
        }
        Err(e) => {
            warn!("stats: SESSIONS reader panicked: {e}");
            LiveBytes::new()
        }
    }
}

pub fn snapshot(
    source: &dyn StatsSource,
    history: &StatsHistory,
    live: &LiveBytes,
    started: Instant,
    reload: &ReloadStatus,
) -> StatsSnapshot {
    let now = Instant::now();
    let view = source.view().borrow().clone();
    let config = source.config();
    let listeners = config
        .listeners
        .iter()
        .enumerate()
        .map(|(li, l)| {
            let servers: Vec<ServerStats> = view
                .listener(li)
                .iter()
                .map(|s| server(source, history, live, s, now))
                .collect();
            let counters = source.listener_counters(li);
            let waiting = u64::from(counters.waiting_for_server.load(Relaxed));
            let (rate, rate_max) = history.listener_rate(li);
            ListenerStats {
                name: l.name.clone(),
                bind: l.bind.to_string(),
                balance: match l.balance {
                    Balance::First => "first",
                    Balance::RoundRobin => "roundrobin",
                    Balance::LeastConn => "leastconn",
                }
                .into(),
                check: l.check.as_ref().map(|c| {
                    let method = match c.method {
                        CheckMethod::Get => "GET",
                        CheckMethod::Head => "HEAD",
                        CheckMethod::Options => "OPTIONS",
                    };
                    let scheme = if c.tls.is_some() { " (https)" } else { "" };
                    format!("{method} {}{scheme}", c.path)
                }),
                primary_changes: history.primary_changes(li),
                frontend: FrontendStats {
                    scur: servers
                        .iter()
                        .map(|s| s.traffic.scur + s.traffic.qcur)
                        .sum::<u64>()
                        + waiting,
                    stot: counters.accepted.load(Relaxed),
                    rate,
                    rate_max,
                    waiting,
                    no_server: counters.no_server.load(Relaxed),
                    queue_full: counters.queue_full.load(Relaxed),
                    connect_failed: counters.connect_failed.load(Relaxed),
                    cancels: cancel_stats(&counters.cancels),
                },
                servers,
            }
        })
        .collect();
    StatsSnapshot {
        version: env!("CARGO_PKG_VERSION").into(),
        pid: std::process::id(),
        data_path: source.data_path().into(),
        live_bytes: source.pin_dir().is_some(),
        uptime_secs: now.saturating_duration_since(started).as_secs(),
        refresh_secs: config
            .stats
            .as_ref()
            .map_or(5, |s| s.refresh.as_secs().max(1)),
        generated_unix: unix_secs(SystemTime::now()),
        global_maxconn: config.global.maxconn,
        reload: reload_stats(reload),
        admin_unauthorized: history.admin_unauthorized.load(Relaxed),
        dcs: view.dcs.as_ref().map(dcs_stats),
        listeners,
        xdp: xdp_stats(&config.firewall, &config.global.pin_path),
        tc: source.tc_counters().map(tc_stats),
    }
}

fn tc_stats(c: &TcCounters) -> TcStats {
    TcStats {
        handed_off: c.handed_off.load(Relaxed),
        carried: c.carried.load(Relaxed),
        retried: c.retried.load(Relaxed),
        stayed_mixed_family: c.mixed_family.load(Relaxed),
        stayed_options: c.mismatched.load(Relaxed),
        handed_off_fenced: c.fenced.load(Relaxed),
        senders_nudged: c.nudged.load(Relaxed),
        segments_forwarded: c.forwarded.load(Relaxed),
        segments_given_back: c.given_back.load(Relaxed),
    }
}

/// The allowlist's counters from its pins; `None` when it is off or not attached (`auto` fell
/// back: its pins are absent).
fn xdp_stats(firewall: &Firewall, pin_path: &Path) -> Option<XdpStats> {
    if firewall.xdp.enabled == XdpEnabled::Off {
        return None;
    }
    let dir = crate::firewall::pin_dir(pin_path);
    if !dir.exists() {
        return None;
    }
    let counters = match crate::firewall::counters::read(&dir, firewall.rules.len()) {
        Ok(c) => c,
        Err(e) => {
            warn!("stats: reading the XDP counters failed ({e})");
            return None;
        }
    };
    Some(XdpStats {
        interfaces: firewall.xdp.interfaces.clone(),
        attached: crate::firewall::attached(&dir)
            .into_iter()
            .map(|(interface, mode)| XdpAttached {
                interface,
                mode: mode.name().into(),
            })
            .collect(),
        syn_rate: firewall.xdp.syn_limit.map(|l| l.rate),
        rules: firewall
            .rules
            .iter()
            .zip(&counters.rules)
            .enumerate()
            .map(|(index, (rule, c))| XdpRuleStats {
                index,
                from: rule.from.iter().map(ToString::to_string).collect(),
                ports: rule.ports.clone(),
                passed: c.passed,
                syn_limited: c.syn_limited,
            })
            .collect(),
        ports: counters
            .ports
            .iter()
            .map(|(port, c)| XdpPortStats {
                port: *port,
                passed: c.passed,
                denied: c.denied,
                syn_limited: c.syn_limited,
            })
            .collect(),
    })
}

fn dcs_stats(status: &DcsStatus) -> DcsStats {
    DcsStats {
        endpoints: status.endpoints.clone(),
        leader_key: status.leader_key.clone(),
        connected: status.connected,
        leader: status.leader.clone(),
        leader_server: status.leader_server.clone(),
        leader_changes: status.leader_changes,
        last_event_unix: status.last_event.as_ref().map(|(at, _)| unix_secs(*at)),
        last_event: status.last_event.as_ref().map(|(_, what)| what.clone()),
        errors: status.errors,
        last_error: status.last_error.clone(),
    }
}

fn reload_stats(status: &ReloadStatus) -> ReloadStats {
    let last = status.last.as_ref();
    ReloadStats {
        reloads: status.reloads,
        failures: status.failures,
        last_unix: last.map(|l| unix_secs(l.at)),
        last_ok: last.map(|l| l.ok),
        last_messages: last.map(|l| l.lines.clone()).unwrap_or_default(),
    }
}

fn unix_secs(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn server(
    source: &dyn StatsSource,
    history: &StatsHistory,
    live: &LiveBytes,
    snap: &ServerView,
    now: Instant,
) -> ServerStats {
    let (listener, index, health) = (snap.key.listener, snap.key.server, &snap.health);
    let config = source.config();
    let spec = &config.listeners[listener].servers[index];
    let checked = config.listeners[listener].check.is_some();
    let id = snap.id;
    let entry = source.backend_entry(id);
    let c = source.backend_counters(id);
    // Closed sessions first, then open ones: a session closing in between is missed for one
    // request (and hidden by the floor), never counted twice.
    let (closed_in, closed_out) = (c.bytes_in.load(Relaxed), c.bytes_out.load(Relaxed));
    let (live_in, live_out) = live.get(&id).copied().unwrap_or_default();
    let (bin, bout) = history.monotonic_bytes(id, closed_in + live_in, closed_out + live_out);
    let (rate, rate_max) = history.backend_rate(id);
    let leader_check = config.listeners[listener]
        .check
        .as_ref()
        .is_some_and(|c| c.asks_for_the_leader());
    let standby = leader_check && health.is_healthy_replica();
    let (status, class) = status(snap.admin, health.server_state(), standby);
    ServerStats {
        name: spec.name.clone(),
        id,
        sid: index as u32 + 1,
        address: spec.address.to_string(),
        check_address: checked.then(|| spec.check_addr.to_string()),
        status,
        class,
        admin: snap.admin.as_str().into(),
        role: health.role.as_ref().map(role_name),
        timeline: health.timeline,
        last_check: health.last_check.as_ref().map(|l| LastCheckStats {
            status: l.status.as_str().into(),
            code: l.code,
            duration_ms: l.duration.as_millis() as u64,
            age_secs: now.saturating_duration_since(l.at).as_secs(),
            desc: match &l.detail {
                Some(d) => format!("{}: {d}", l.status.description()),
                None => l.status.description().into(),
            },
        }),
        rise: spec.timing.rise,
        fall: spec.timing.fall,
        traffic: Traffic {
            scur: u64::from(entry.sessions),
            stot: c.total_sessions.load(Relaxed),
            rate,
            qcur: u64::from(c.queued.load(Relaxed)),
            qmax: u64::from(c.max_queued.load(Relaxed)),
            bin,
            bout,
            econ: c.connect_errors.load(Relaxed),
            wretr: c.retries.load(Relaxed),
            wredis: c.redispatches.load(Relaxed),
        },
        smax: u64::from(c.max_sessions.load(Relaxed)),
        slim: spec.maxconn,
        rate_max,
        markdown_resets: c.markdown_resets.load(Relaxed),
        chkfail: health.failed_checks,
        chkdown: health.down_transitions,
        lastchg_secs: now.saturating_duration_since(health.last_change).as_secs(),
        downtime_secs: health.downtime(now).as_secs(),
        fenced: entry.fenced != 0,
    }
}

/// The status column, as HAProxy's stats write it: MAINT whatever the checks say; DRAIN (or
/// "DRAIN n/m" while failing checks) for a draining server its checks hold UP; otherwise the
/// check state, so a draining server that went DOWN shows DOWN; STANDBY instead of DOWN for a
/// healthy replica on a leader listener (`standby`).
fn status(admin: AdminState, state: ServerState, standby: bool) -> (String, StateClass) {
    match (admin, state) {
        (AdminState::Maint, _) => ("MAINT".into(), StateClass::Maint),
        (AdminState::Drain, ServerState::Up | ServerState::NoCheck) => {
            ("DRAIN".into(), StateClass::Drain)
        }
        (AdminState::Drain, ServerState::GoingDown { n, m }) => {
            (format!("DRAIN {n}/{m}"), StateClass::Drain)
        }
        (_, ServerState::Down) if standby => ("STANDBY".into(), StateClass::Standby),
        _ => (state.to_string(), class_of(state)),
    }
}

fn class_of(state: ServerState) -> StateClass {
    match state {
        ServerState::Up => StateClass::Up,
        ServerState::Down => StateClass::Down,
        ServerState::GoingDown { .. } => StateClass::GoingDown,
        ServerState::GoingUp { .. } => StateClass::GoingUp,
        ServerState::NoCheck => StateClass::NoCheck,
    }
}

pub fn role_name(role: &Role) -> String {
    match role {
        Role::Primary => "primary".into(),
        Role::Replica => "replica".into(),
        Role::StandbyLeader => "standby_leader".into(),
        Role::Other(s) => s.clone(),
    }
}

fn cancel_stats(c: &CancelCounters) -> CancelStats {
    CancelStats {
        received: c.received.load(Relaxed),
        delivered: c.delivered.load(Relaxed),
        dropped: c.dropped.load(Relaxed),
        failed: c.failed.load(Relaxed),
        server_connections: c.server_connections.load(Relaxed),
        encrypted_starts: c.encrypted_starts.load(Relaxed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_shows_the_admin_state_like_haproxy() {
        use AdminState::{Drain, Maint, Ready};
        let s = |admin, state| status(admin, state, false);
        let going_down = ServerState::GoingDown { n: 2, m: 3 };
        let going_up = ServerState::GoingUp { n: 1, m: 2 };
        assert_eq!(s(Ready, ServerState::Up), ("UP".into(), StateClass::Up));
        for state in [
            ServerState::Up,
            ServerState::Down,
            going_up,
            ServerState::NoCheck,
        ] {
            assert_eq!(s(Maint, state), ("MAINT".into(), StateClass::Maint));
        }
        assert_eq!(
            s(Drain, ServerState::Up),
            ("DRAIN".into(), StateClass::Drain)
        );
        assert_eq!(
            s(Drain, ServerState::NoCheck),
            ("DRAIN".into(), StateClass::Drain)
        );
        assert_eq!(
            s(Drain, going_down),
            ("DRAIN 2/3".into(), StateClass::Drain)
        );
        assert_eq!(
            s(Drain, ServerState::Down),
            ("DOWN".into(), StateClass::Down)
        );
        assert_eq!(s(Drain, going_up), ("DOWN 1/2".into(), StateClass::GoingUp));
    }

    #[test]
    fn a_healthy_replica_on_a_leader_listener_is_standby_unless_in_maint() {
        use AdminState::{Drain, Maint, Ready};
        let standby = ("STANDBY".into(), StateClass::Standby);
        assert_eq!(status(Ready, ServerState::Down, true), standby);
        assert_eq!(status(Drain, ServerState::Down, true), standby);
        assert_eq!(
            status(Maint, ServerState::Down, true),
            ("MAINT".into(), StateClass::Maint)
        );
        assert_eq!(
            status(Ready, ServerState::Down, false),
            ("DOWN".into(), StateClass::Down)
        );
    }
}
