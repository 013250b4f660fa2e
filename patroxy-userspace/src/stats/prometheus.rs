//! `/metrics` in the Prometheus text format. Names follow HAProxy's exporter where they mean the
//! same thing (`haproxy_server_status` -> `patroxy_server_status`, with the same `proxy` and
//! `server` labels); patroxy's own additions (Patroni's role and timeline, leader changes,
//! mark-down resets, the data path) have their own names.
//!
//! A registry is built per scrape from the snapshot; only the check-duration histograms live
//! longer (they accumulate observations in the [`StatsHistory`](super::history::StatsHistory)
//! between scrapes).
use prometheus_client::{
    encoding::prometheus_text,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::{Registry, Unit},
};
use std::sync::atomic::AtomicU64;

use super::{
    history::CheckDurations,
    model::{ListenerStats, ServerStats, StatsSnapshot},
};

pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

type Labels = Vec<(&'static str, String)>;

/// The states HAProxy's exporter lists for `haproxy_server_status`.
const STATES: [&str; 4] = ["DOWN", "UP", "MAINT", "DRAIN"];

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
        "patroxy's version and the data path in use (sockmap or fallback)",
        info,
    );
    let uptime: Gauge = Gauge::default();
    uptime.set(snap.uptime_secs as i64);
    reg.register_with_unit("process_uptime", "Time since start", Unit::Seconds, uptime);
    let mut out = String::new();
    prometheus_text::encode(&mut out, &reg).expect("writing to a String cannot fail");
    out
}

fn server_labels(l: &ListenerStats, s: &ServerStats) -> Labels {
    vec![("proxy", l.name.clone()), ("server", s.name.clone())]
}

/// Registers a gauge family with one value per server.
fn server_gauge(
    reg: &mut Registry,
    snap: &StatsSnapshot,
    name: &str,
    help: &str,
    value: impl Fn(&ServerStats) -> Option<i64>,
) {
    let family: Family<Labels, Gauge> = Family::default();
    for l in &snap.listeners {
        for s in &l.servers {
            if let Some(v) = value(s) {
                family.get_or_create(&server_labels(l, s)).set(v);
            }
        }
    }
    reg.register(name, help, family);
}

/// Registers a counter family (`<name>_total`) with one value per server.
fn server_counter(
    reg: &mut Registry,
    snap: &StatsSnapshot,
    name: &str,
    help: &str,
    value: impl Fn(&ServerStats) -> u64,
) {
    let family: Family<Labels, Counter> = Family::default();
    for l in &snap.listeners {
        for s in &l.servers {
            family.get_or_create(&server_labels(l, s)).inc_by(value(s));
        }
    }
    reg.register(name, help, family);
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
    let g = |s: u64| Some(s as i64);
    server_gauge(
        reg,
        snap,
        "server_current_sessions",
        "Current sessions",
        |s| g(s.traffic.scur),
    );
    server_gauge(
        reg,
        snap,
        "server_max_sessions",
        "Highest concurrent sessions",
        |s| g(s.smax),
    );
    server_gauge(reg, snap, "server_limit_sessions", "Server maxconn", |s| {
        s.slim.map(i64::from)
    });
    server_gauge(reg, snap, "server_current_queue", "Clients queued", |s| {
        g(s.traffic.qcur)
    });
    server_gauge(reg, snap, "server_max_queue", "Most clients queued", |s| {
        g(s.traffic.qmax)
    });
    server_gauge(
        reg,
        snap,
        "server_current_session_rate",
        "Sessions per second over the last 10 seconds",
        |s| g(s.traffic.rate),
    );
    server_gauge(
        reg,
        snap,
        "server_check_last_change_seconds",
        "Seconds since the last UP/DOWN change",
        |s| g(s.lastchg_secs),
    );
    server_gauge(
        reg,
        snap,
        "server_check_code",
        "HTTP status of the last health check",
        |s| s.last_check.as_ref()?.code.map(i64::from),
    );
    server_gauge(reg, snap, "server_timeline", "Patroni's timeline", |s| {
        s.timeline.map(|t| t as i64)
    });
    server_gauge(
        reg,
        snap,
        "server_is_leader",
        "1 when Patroni reports the primary (or standby leader) role",
        |s| {
            s.role
                .as_deref()
                .map(|r| i64::from(matches!(r, "primary" | "standby_leader")))
        },
    );
    server_gauge(
        reg,
        snap,
        "server_fenced",
        "1 while the kernel refuses to forward for this server",
        |s| Some(i64::from(s.fenced)),
    );
    server_counter(reg, snap, "server_sessions", "Sessions established", |s| {
        s.traffic.stot
    });
    server_counter(
        reg,
        snap,
        "server_bytes_in",
        "Bytes client to server",
        |s| s.traffic.bin,
    );
    server_counter(
        reg,
        snap,
        "server_bytes_out",
        "Bytes server to client",
        |s| s.traffic.bout,
    );
    server_counter(
        reg,
        snap,
        "server_connection_errors",
        "Failed connects",
        |s| s.traffic.econ,
    );
    server_counter(reg, snap, "server_retry_warnings", "Connect retries", |s| {
        s.traffic.wretr
    });
    server_counter(
        reg,
        snap,
        "server_redispatch_warnings",
        "Retries sent to another server",
        |s| s.traffic.wredis,
    );
    server_counter(reg, snap, "server_check_failures", "Failed checks", |s| {
        s.chkfail
    });
    server_counter(
        reg,
        snap,
        "server_check_up_down",
        "UP to DOWN transitions",
        |s| s.chkdown,
    );
    server_counter(
        reg,
        snap,
        "server_markdown_resets",
        "Sessions reset because the server was marked down",
        |s| s.markdown_resets,
    );
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
    let gauge = |name: &str, help: &str, v: &dyn Fn(&ListenerStats) -> u64, reg: &mut Registry| {
        let family: Family<Labels, Gauge> = Family::default();
        for l in &snap.listeners {
            family
                .get_or_create(&vec![("proxy", l.name.clone())])
                .set(v(l) as i64);
        }
        reg.register(name, help, family);
    };
    let counter =
        |name: &str, help: &str, v: &dyn Fn(&ListenerStats) -> u64, reg: &mut Registry| {
            let family: Family<Labels, Counter> = Family::default();
            for l in &snap.listeners {
                family
                    .get_or_create(&vec![("proxy", l.name.clone())])
                    .inc_by(v(l));
            }
            reg.register(name, help, family);
        };
    gauge(
        "frontend_current_sessions",
        "Clients connected: in a session, queued or waiting",
        &|l| l.frontend.scur,
        reg,
    );
    gauge(
        "frontend_limit_sessions",
        "Global maxconn",
        &|_| u64::from(snap.global_maxconn),
        reg,
    );
    gauge(
        "frontend_current_session_rate",
        "Clients accepted per second over the last 10 seconds",
        &|l| l.frontend.rate,
        reg,
    );
    gauge(
        "listener_waiting_clients",
        "Clients waiting for any server to come UP",
        &|l| l.frontend.waiting,
        reg,
    );
    gauge(
        "backend_active_servers",
        "Servers taking new sessions",
        &|l| l.backend().active_servers,
        reg,
    );
    counter(
        "frontend_sessions",
        "Clients accepted",
        &|l| l.frontend.stot,
        reg,
    );
    counter(
        "frontend_bytes_in",
        "Bytes client to server",
        &|l| l.backend().traffic.bin,
        reg,
    );
    counter(
        "frontend_bytes_out",
        "Bytes server to client",
        &|l| l.backend().traffic.bout,
        reg,
    );
    counter(
        "listener_primary_changes",
        "Times the UP leader became another server (failovers, switchovers)",
        &|l| l.primary_changes,
        reg,
    );
    counter(
        "listener_no_server",
        "Clients closed: no server UP before timeout queue",
        &|l| l.frontend.no_server,
        reg,
    );
    counter(
        "listener_queue_timeouts",
        "Clients closed: servers at maxconn until timeout queue",
        &|l| l.frontend.queue_full,
        reg,
    );
    counter(
        "listener_connect_failures",
        "Clients closed: every connect attempt failed",
        &|l| l.frontend.connect_failed,
        reg,
    );
}

#[cfg(test)]
mod tests {
    use super::super::{history::ServerLabels, model::sample};
    use super::*;

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
    }
}
