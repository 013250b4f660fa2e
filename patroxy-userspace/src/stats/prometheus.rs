//! `/metrics` in the Prometheus text format. Names follow HAProxy's exporter where they mean the
//! same thing (`haproxy_server_status` -> `patroxy_server_status`, with the same `proxy` and
//! `server` labels); patroxy's own additions (Patroni's role and timeline, leader changes,
//! mark-down resets, the data path) have their own names.
//!
//! A registry is built per scrape from the snapshot; only the check-duration histograms live
//! longer (they accumulate observations in the [`StatsHistory`](super::history::StatsHistory)
//! between scrapes).
use std::{fmt, sync::atomic::AtomicU64};

use prometheus_client::{
    encoding::{EncodeMetric, prometheus_text},
    metrics::{TypedMetric, counter::Counter, family::Family, gauge::Gauge},
    registry::{Registry, Unit},
};

use super::{
    history::CheckDurations,
    model::{DcsStats, ListenerStats, ReloadStats, ServerStats, StatsSnapshot, TcStats, XdpStats},
};

pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

type Labels = Vec<(&'static str, String)>;

/// The states HAProxy's exporter lists for `haproxy_server_status`, and patroxy's STANDBY (a
/// healthy replica on a leader listener), which an alert on `state="DOWN"` does not match.
const STATES: [&str; 5] = ["DOWN", "UP", "MAINT", "DRAIN", "STANDBY"];

pub fn render(snap: &StatsSnapshot, check_durations: &CheckDurations) -> String {
    let mut reg = Registry::with_prefix("patroxy");
    servers(&mut reg, snap);
    listeners(&mut reg, snap);
    reg.register_with_unit(
        "server_check_duration",
        "Duration of the health checks of a server",
        Unit::Seconds,
        check_durations.clone(),
    );
    let info: Family<Labels, Gauge> = Family::default();
    info.get_or_create(&vec![
        ("version", snap.version.clone()),
        ("data_path", snap.data_path.clone()),
    ])
    .set(1);
    reg.register(
        "build_info",
        "patroxy's version and the data path in use (sockmap, sockmap+tc or fallback)",
        info,
    );
    reload(&mut reg, &snap.reload);
    if let Some(x) = &snap.xdp {
        xdp(&mut reg, x);
    }
    if let Some(d) = &snap.dcs {
        dcs(&mut reg, d);
    }
    if let Some(t) = &snap.tc {
        tc(&mut reg, t);
    }
    let uptime: Gauge = Gauge::default();
    uptime.set(snap.uptime_secs as i64);
    reg.register_with_unit("process_uptime", "Time since start", Unit::Seconds, uptime);
    counter(
        &mut reg,
        "admin_unauthorized_requests",
        "Admin requests refused for a missing or wrong token (HTTP 401)",
        snap.admin_unauthorized,
    );
    let mut out = String::new();
    prometheus_text::encode(&mut out, &reg).expect("writing to a String cannot fail");
    out
}

/// The XDP allowlist's packets per protected port and per rule, by verdict.
fn xdp(reg: &mut Registry, x: &XdpStats) {
    register(
        reg,
        Kind::Gauge,
        "xdp_attached",
        "1 for each interface the allowlist is attached to, by mode: native or generic (XDP), \
         tc (tc ingress)",
        x.attached.iter().map(|a| {
            (
                vec![("interface", a.interface.clone()), ("mode", a.mode.clone())],
                1,
            )
        }),
    );
    let per_port = x.ports.iter().flat_map(|p| {
        [
            ("passed", p.passed),
            ("denied", p.denied),
            ("syn_limited", p.syn_limited),
        ]
        .map(|(verdict, n)| {
            (
                vec![("port", p.port.to_string()), ("verdict", verdict.into())],
                n,
            )
        })
    });
    register(
        reg,
        Kind::Counter,
        "xdp_port_packets",
        "TCP packets to a protected port: passed (an allowed source), denied (no rule allows the \
         source; dropped), syn_limited (a SYN over its source's rate; dropped)",
        per_port,
    );
    let per_rule = x.rules.iter().flat_map(|r| {
        [("passed", r.passed), ("syn_limited", r.syn_limited)].map(|(verdict, n)| {
            (
                vec![
                    ("rule", r.index.to_string()),
                    ("from", r.from.join(",")),
                    ("verdict", verdict.into()),
                ],
                n,
            )
        })
    });
    register(
        reg,
        Kind::Counter,
        "xdp_rule_packets",
        "TCP packets an [[allow]] rule matched: passed, or syn_limited (dropped)",
        per_rule,
    );
}

/// Configuration reloads: counts, the last one's outcome and time (absent before the first).
fn reload(reg: &mut Registry, r: &ReloadStats) {
    counter(
        reg,
        "config_reloads",
        "Configuration reloads attempted (SIGHUP, patroxy reload)",
        r.reloads,
    );
    counter(
        reg,
        "config_reload_failures",
        "Configuration reloads refused; the running configuration was kept",
        r.failures,
    );
    if let (Some(ok), Some(at)) = (r.last_ok, r.last_unix) {
        let successful: Gauge = Gauge::default();
        successful.set(i64::from(ok));
        reg.register(
            "config_last_reload_successful",
            "Whether the last configuration reload was applied (1) or refused (0)",
            successful,
        );
        let time: Gauge = Gauge::default();
        time.set(at as i64);
        reg.register_with_unit(
            "config_last_reload_timestamp",
            "When the last configuration reload happened, since the Unix epoch",
            Unit::Seconds,
            time,
        );
    }
}

/// The DCS watch: connected, leader changes, errors, the last event's time, and the leader
/// the key names (an info series, absent while no member holds it).
fn dcs(reg: &mut Registry, d: &DcsStats) {
    let connected: Gauge = Gauge::default();
    connected.set(i64::from(d.connected));
    reg.register(
        "dcs_connected",
        "Whether the DCS watch is connected and following Patroni's leader key",
        connected,
    );
    counter(
        reg,
        "dcs_leader_changes",
        "Leader key changes seen by the DCS watch (deleted, or naming another member)",
        d.leader_changes,
    );
    counter(
        reg,
        "dcs_errors",
        "Failed connections, reads and watches of the DCS (each followed by a reconnect)",
        d.errors,
    );
    if let Some(at) = d.last_event_unix {
        let time: Gauge = Gauge::default();
        time.set(at as i64);
        reg.register_with_unit(
            "dcs_last_event_timestamp",
            "When the DCS watch last saw a leader or connection change, since the Unix epoch",
            Unit::Seconds,
            time,
        );
    }
    let leader: Family<Labels, Gauge> = Family::default();
    if let Some(member) = &d.leader {
        leader
            .get_or_create(&vec![
                ("key", d.leader_key.clone()),
                ("member", member.clone()),
                ("server", d.leader_server.clone().unwrap_or_default()),
            ])
            .set(1);
    }
    reg.register(
        "dcs_leader",
        "The member Patroni's leader key names, and the configured server it is",
        leader,
    );
}

/// The packet-level splice (`datapath = "tc"`): sessions handed to it, carried by it now, and
/// left on the sockmap path, by reason.
fn tc(reg: &mut Registry, t: &TcStats) {
    counter(
        reg,
        "tc_sessions_handed_off",
        "Sessions handed from the sockmap path to the packet-level splice (datapath = \"tc\")",
        t.handed_off,
    );
    let carried: Gauge = Gauge::default();
    carried.set(t.carried as i64);
    reg.register(
        "tc_sessions_carried",
        "Sessions the packet-level splice carries now",
        carried,
    );
    counter(
        reg,
        "tc_sessions_handed_off_fenced",
        "Of the sessions handed off, those handed off behind a fence (busy, never quiet)",
        t.handed_off_fenced,
    );
    counter(
        reg,
        "tc_fence_senders_nudged",
        "Senders told by duplicate ACKs to retransmit what a hand-off's fence dropped",
        t.senders_nudged,
    );
    counter(
        reg,
        "tc_fence_segments_forwarded",
        "Segments a hand-off's fence dropped that the proxy sent on itself",
        t.segments_forwarded,
    );
    counter(
        reg,
        "tc_fence_segments_given_back",
        "Segments an abandoned hand-off's fence dropped that the proxy gave back to its own sockets",
        t.segments_given_back,
    );
    counter(
        reg,
        "tc_handoffs_retried",
        "Hand-offs abandoned because a byte moved meanwhile (tried again later)",
        t.retried,
    );
    register(
        reg,
        Kind::Counter,
        "tc_sessions_not_joinable",
        "Sessions left on the sockmap path: mixed_family (an IPv4 and an IPv6 leg), options (the legs' TCP options \
         differ, or a leg is on an interface the programs are not attached to)",
        [
            ("mixed_family", t.stayed_mixed_family),
            ("options", t.stayed_options),
        ]
        .into_iter()
        .map(|(reason, n)| (vec![("reason", reason.to_owned())], n)),
    );
}

/// One counter without labels (a total since start, `_total` in the name).
fn counter(reg: &mut Registry, name: &str, help: &str, value: u64) {
    let c: Counter = Counter::default();
    c.inc_by(value);
    reg.register(name, help, c);
}

/// Gauges (a value now) or counters (a total since start, `_total` in the name).
#[derive(Clone, Copy)]
enum Kind {
    Gauge,
    Counter,
}

/// A family with one series per server: its kind, name, help, and the server's value (`None`:
/// no series for that server).
type PerServer = (
    Kind,
    &'static str,
    &'static str,
    fn(&ServerStats) -> Option<u64>,
);
/// A family with one series per listener.
type PerListener = (
    Kind,
    &'static str,
    &'static str,
    fn(&StatsSnapshot, &ListenerStats) -> u64,
);

/// The families with a series per server (after `server_status`), in the order of the text.
const SERVER_METRICS: [PerServer; 20] = [
    (
        Kind::Gauge,
        "server_current_sessions",
        "Current sessions",
        |s| Some(s.traffic.scur),
    ),
    (
        Kind::Gauge,
        "server_max_sessions",
        "Highest concurrent sessions",
        |s| Some(s.smax),
    ),
    (
        Kind::Gauge,
        "server_limit_sessions",
        "Server maxconn",
        |s| s.slim.map(u64::from),
    ),
    (Kind::Gauge, "server_current_queue", "Clients queued", |s| {
        Some(s.traffic.qcur)
    }),
    (
        Kind::Gauge,
        "server_max_queue",
        "Most clients queued",
        |s| Some(s.traffic.qmax),
    ),
    (
        Kind::Gauge,
        "server_current_session_rate",
        "Sessions per second over the last 10 seconds",
        |s| Some(s.traffic.rate),
    ),
    (
        Kind::Gauge,
        "server_check_last_change_seconds",
        "Seconds since the last UP/DOWN change",
        |s| Some(s.lastchg_secs),
    ),
    (
        Kind::Gauge,
        "server_check_code",
        "HTTP status of the last health check",
        |s| s.last_check.as_ref()?.code.map(u64::from),
    ),
    (Kind::Gauge, "server_timeline", "Patroni's timeline", |s| {
        s.timeline
    }),
    (
        Kind::Gauge,
        "server_is_leader",
        "1 when Patroni reports the primary (or standby leader) role",
        |s| {
            Some(u64::from(matches!(
                s.role.as_deref()?,
                "primary" | "standby_leader"
            )))
        },
    ),
    (
        Kind::Gauge,
        "server_fenced",
        "1 while the kernel refuses to forward for this server",
        |s| Some(u64::from(s.fenced)),
    ),
    (
        Kind::Counter,
        "server_sessions",
        "Sessions established",
        |s| Some(s.traffic.stot),
    ),
    (
        Kind::Counter,
        "server_bytes_in",
        "Bytes client to server",
        |s| Some(s.traffic.bin),
    ),
    (
        Kind::Counter,
        "server_bytes_out",
        "Bytes server to client",
        |s| Some(s.traffic.bout),
    ),
    (
        Kind::Counter,
        "server_connection_errors",
        "Failed connects",
        |s| Some(s.traffic.econ),
    ),
    (
        Kind::Counter,
        "server_retry_warnings",
        "Connect retries",
        |s| Some(s.traffic.wretr),
    ),
    (
        Kind::Counter,
        "server_redispatch_warnings",
        "Retries sent to another server",
        |s| Some(s.traffic.wredis),
    ),
    (
        Kind::Counter,
        "server_check_failures",
        "Failed checks",
        |s| Some(s.chkfail),
    ),
    (
        Kind::Counter,
        "server_check_up_down",
        "UP to DOWN transitions",
        |s| Some(s.chkdown),
    ),
    (
        Kind::Counter,
        "server_markdown_resets",
        "Sessions reset because the server was marked down",
        |s| Some(s.markdown_resets),
    ),
];

/// The families with a series per listener, in the order of the text.
const LISTENER_METRICS: [PerListener; 18] = [
    (
        Kind::Gauge,
        "frontend_current_sessions",
        "Clients connected: in a session, queued or waiting",
        |_, l| l.frontend.scur,
    ),
    (
        Kind::Gauge,
        "frontend_limit_sessions",
        "Global maxconn",
        |snap, _| u64::from(snap.global_maxconn),
    ),
    (
        Kind::Gauge,
        "frontend_current_session_rate",
        "Clients accepted per second over the last 10 seconds",
        |_, l| l.frontend.rate,
    ),
    (
        Kind::Gauge,
        "listener_waiting_clients",
        "Clients waiting for any server to come UP",
        |_, l| l.frontend.waiting,
    ),
    (
        Kind::Gauge,
        "backend_active_servers",
        "Servers taking new sessions",
        |_, l| l.backend().active_servers,
    ),
    (
        Kind::Counter,
        "frontend_sessions",
        "Clients accepted",
        |_, l| l.frontend.stot,
    ),
    (
        Kind::Counter,
        "frontend_bytes_in",
        "Bytes client to server",
        |_, l| l.backend().traffic.bin,
    ),
    (
        Kind::Counter,
        "frontend_bytes_out",
        "Bytes server to client",
        |_, l| l.backend().traffic.bout,
    ),
    (
        Kind::Counter,
        "listener_primary_changes",
        "Times the UP leader became another server (failovers, switchovers)",
        |_, l| l.primary_changes,
    ),
    (
        Kind::Counter,
        "listener_no_server",
        "Clients closed: no server UP before timeout queue",
        |_, l| l.frontend.no_server,
    ),
    (
        Kind::Counter,
        "listener_queue_timeouts",
        "Clients closed: servers at maxconn until timeout queue",
        |_, l| l.frontend.queue_full,
    ),
    (
        Kind::Counter,
        "listener_connect_failures",
        "Clients closed: every connect attempt failed",
        |_, l| l.frontend.connect_failed,
    ),
    (
        Kind::Counter,
        "listener_cancels_received",
        "CancelRequests received (not sessions)",
        |_, l| l.frontend.cancels.received,
    ),
    (
        Kind::Counter,
        "listener_cancels_delivered",
        "CancelRequests taken by at least one server",
        |_, l| l.frontend.cancels.delivered,
    ),
    (
        Kind::Counter,
        "listener_cancels_dropped",
        "CancelRequests dropped by cancel_rate_per_client or cancel_rate",
        |_, l| l.frontend.cancels.dropped,
    ),
    (
        Kind::Counter,
        "listener_cancels_failed",
        "CancelRequests no server took (every connection failed)",
        |_, l| l.frontend.cancels.failed,
    ),
    (
        Kind::Counter,
        "listener_cancel_server_connections",
        "Connections opened to servers to pass CancelRequests on",
        |_, l| l.frontend.cancels.server_connections,
    ),
    (
        Kind::Counter,
        "listener_encrypted_starts",
        "Connections that began with an SSL/GSS request or TLS (passed through unread)",
        |_, l| l.frontend.cancels.encrypted_starts,
    ),
];

fn server_labels(l: &ListenerStats, s: &ServerStats) -> Labels {
    vec![("proxy", l.name.clone()), ("server", s.name.clone())]
}

fn servers(reg: &mut Registry, snap: &StatsSnapshot) {
    let status: Family<Labels, Gauge> = Family::default();
    for l in &snap.listeners {
        for s in &l.servers {
            for state in STATES {
                let mut labels = server_labels(l, s);
                labels.push(("state", state.into()));
                let on = s.class.prometheus_state() == state;
                status.get_or_create(&labels).set(i64::from(on));
            }
        }
    }
    reg.register(
        "server_status",
        "Current status of the server (1 for the state it is in)",
        status,
    );
    let per_server = |value: fn(&ServerStats) -> Option<u64>| {
        let all = snap
            .listeners
            .iter()
            .flat_map(|l| l.servers.iter().map(move |s| (l, s)));
        all.filter_map(move |(l, s)| Some((server_labels(l, s), value(s)?)))
    };
    for (kind, name, help, value) in SERVER_METRICS {
        register(reg, kind, name, help, per_server(value));
    }
    let downtime: Family<Labels, Counter<f64, AtomicU64>> = Family::default();
    for l in &snap.listeners {
        for s in &l.servers {
            downtime
                .get_or_create(&server_labels(l, s))
                .inc_by(s.downtime_secs as f64);
        }
    }
    reg.register_with_unit(
        "server_downtime",
        "Total time DOWN",
        Unit::Seconds,
        downtime,
    );
}

fn listeners(reg: &mut Registry, snap: &StatsSnapshot) {
    for (kind, name, help, value) in LISTENER_METRICS {
        let series = snap
            .listeners
            .iter()
            .map(|l| (vec![("proxy", l.name.clone())], value(snap, l)));
        register(reg, kind, name, help, series);
    }
}

/// Registers family `name` with one series per labels and value.
fn register(
    reg: &mut Registry,
    kind: Kind,
    name: &str,
    help: &str,
    series: impl Iterator<Item = (Labels, u64)>,
) {
    match kind {
        Kind::Gauge => reg.register(name, help, family(series, |g: &Gauge, v| g.set(v as i64))),
        Kind::Counter => reg.register(name, help, family(series, |c: &Counter, v| c.inc_by(v))),
    }
}

/// A family of metrics `M`, each given its value by `put`.
fn family<M, T>(
    series: impl Iterator<Item = (Labels, u64)>,
    put: fn(&M, u64) -> T,
) -> Family<Labels, M>
where
    M: EncodeMetric + TypedMetric + Default + fmt::Debug + Send + Sync + 'static,
{
    let family = Family::default();
    for (labels, value) in series {
        put(&family.get_or_create(&labels), value);
    }
    family
}

#[cfg(test)]
mod tests {
    use super::super::{
        history::ServerLabels,
        model::{StateClass, sample},
    };
    use super::*;

    #[test]
    fn a_standby_replica_is_not_down() {
        let mut snap = sample::snapshot();
        let pg2 = &mut snap.listeners[0].servers[1];
        (pg2.status, pg2.class) = ("STANDBY".into(), StateClass::Standby);
        let durations = CheckDurations::new_with_constructor(super::super::history::CheckBuckets);
        let text = render(&snap, &durations);
        for line in [
            r#"patroxy_server_status{proxy="postgres_write",server="pg2",state="STANDBY"} 1"#,
            r#"patroxy_server_status{proxy="postgres_write",server="pg2",state="DOWN"} 0"#,
            r#"patroxy_server_status{proxy="postgres_write",server="pg1",state="STANDBY"} 0"#,
        ] {
            assert!(text.contains(line), "missing {line}:\n{text}");
        }
    }

    #[test]
    fn haproxy_exporter_names_and_values() {
        let durations = CheckDurations::new_with_constructor(super::super::history::CheckBuckets);
        durations
            .get_or_create(&ServerLabels {
                proxy: "postgres_write".into(),
                server: "pg1".into(),
            })
            .observe(0.003);
        let text = render(&sample::snapshot(), &durations);
        for line in [
            r#"patroxy_server_status{proxy="postgres_write",server="pg1",state="UP"} 1"#,
            r#"patroxy_server_status{proxy="postgres_write",server="pg1",state="DOWN"} 0"#,
            r#"patroxy_server_status{proxy="postgres_write",server="pg2",state="DOWN"} 1"#,
            r#"patroxy_server_status{proxy="postgres_write",server="pg3",state="UP"} 1"#,
            r#"patroxy_server_status{proxy="postgres_read",server="pg1",state="UP"} 1"#,
            r#"patroxy_server_current_sessions{proxy="postgres_write",server="pg1"} 3"#,
            r#"patroxy_server_bytes_in_total{proxy="postgres_write",server="pg1"} 5000000"#,
            r#"patroxy_server_bytes_out_total{proxy="postgres_write",server="pg1"} 123456789"#,
            r#"patroxy_server_check_failures_total{proxy="postgres_write",server="pg2"} 5"#,
            r#"patroxy_server_check_up_down_total{proxy="postgres_write",server="pg2"} 1"#,
            r#"patroxy_server_downtime_seconds_total{proxy="postgres_write",server="pg2"} 3725.0"#,
            r#"patroxy_server_timeline{proxy="postgres_write",server="pg1"} 4"#,
            r#"patroxy_server_is_leader{proxy="postgres_write",server="pg1"} 1"#,
            r#"patroxy_listener_primary_changes_total{proxy="postgres_write"} 1"#,
            r#"patroxy_backend_active_servers{proxy="postgres_write"} 2"#,
            r#"patroxy_server_check_duration_seconds_count{proxy="postgres_write",server="pg1"} 1"#,
            r#"patroxy_build_info{version="0.1.0",data_path="sockmap"} 1"#,
            "# TYPE patroxy_server_check_duration_seconds histogram",
            "# TYPE patroxy_server_bytes_in_total counter",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        // Unset limits are absent, not 0.
        assert!(!text.contains(r#"patroxy_server_limit_sessions{proxy="postgres_read""#));
        assert!(
            !text.contains("patroxy_xdp_"),
            "no allowlist, no XDP metrics"
        );
    }

    #[test]
    fn xdp_counters_per_port_and_rule() {
        let mut snap = sample::snapshot();
        snap.xdp = Some(sample::xdp());
        let durations = CheckDurations::new_with_constructor(super::super::history::CheckBuckets);
        let text = render(&snap, &durations);
        for line in [
            r#"patroxy_xdp_attached{interface="eth0",mode="native"} 1"#,
            r#"patroxy_xdp_port_packets_total{port="5432",verdict="denied"} 42"#,
            r#"patroxy_xdp_port_packets_total{port="5432",verdict="syn_limited"} 7"#,
            r#"patroxy_xdp_port_packets_total{port="5433",verdict="passed"} 500"#,
            r#"patroxy_xdp_rule_packets_total{rule="0",from="10.100.100.0/24",verdict="passed"} 1500"#,
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }

    #[test]
    fn the_dcs_watch_has_its_series_only_when_configured() {
        let durations = CheckDurations::new_with_constructor(super::super::history::CheckBuckets);
        let text = render(&sample::snapshot(), &durations);
        assert!(
            !text.contains("patroxy_dcs_"),
            "no [dcs], no series:\n{text}"
        );
        let mut snap = sample::snapshot();
        snap.dcs = Some(DcsStats {
            endpoints: vec!["http://10.0.0.9:2379".into()],
            leader_key: "/service/demo/leader".into(),
            connected: false,
            leader: Some("pg-sv02".into()),
            leader_server: Some("pg2".into()),
            leader_changes: 3,
            last_event_unix: Some(1_780_000_000),
            last_event: Some("disconnected: the watch stream ended".into()),
            errors: 2,
            last_error: Some("the watch stream ended".into()),
        });
        let text = render(&snap, &durations);
        for line in [
            "patroxy_dcs_connected 0",
            "patroxy_dcs_leader_changes_total 3",
            "patroxy_dcs_errors_total 2",
            "patroxy_dcs_last_event_timestamp_seconds 1780000000",
            r#"patroxy_dcs_leader{key="/service/demo/leader",member="pg-sv02",server="pg2"} 1"#,
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }
}
