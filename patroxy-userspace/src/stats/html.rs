//! The stats page: one table per listener, a row per server, coloured like HAProxy's page
//! (green UP, yellow going down, orange going up, red DOWN, grey not checked, brown MAINT, blue
//! DRAIN).
//! One self-contained document with inline CSS and no script or external asset, so it works on
//! a network without internet; the table scrolls sideways on a phone with the server column
//! pinned.
use std::fmt::Write as _;

use super::model::{ListenerStats, ServerStats, StateClass, StatsSnapshot, XdpStats};

/// `refresh`: whether the page reloads itself (off for `/;norefresh`).
pub fn render(snap: &StatsSnapshot, refresh: bool) -> String {
    let mut h = String::with_capacity(16 * 1024);
    h.push_str("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n");
    h.push_str("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n");
    if refresh {
        let _ = writeln!(
            h,
            "<meta http-equiv=\"refresh\" content=\"{}\">",
            snap.refresh_secs
        );
    }
    let _ = writeln!(h, "<title>patroxy stats (pid {})</title>", snap.pid);
    h.push_str(STYLE);
    h.push_str("</head><body>\n");
    header(&mut h, snap);
    for l in &snap.listeners {
        listener(&mut h, snap, l);
    }
    if let Some(x) = &snap.xdp {
        xdp(&mut h, x);
    }
    footer(&mut h, snap);
    h.push_str("</body></html>\n");
    h
}

const STYLE: &str = r#"<style>
:root{--up:#c0ffc0;--up-s:#1e9e3a;--gd:#ffffa0;--gd-s:#c9b400;--gu:#ffd020;--gu-s:#d97e00;
--down:#ff9090;--down-s:#d62b2b;--nc:#e0e0e0;--nc-s:#777;--maint:#e3b378;--maint-s:#9a5a14;
--drain:#8fcbff;--drain-s:#1479c9;--sb:#e4ecf7;--sb-s:#5f7fa8;--ink:#1d2330;--mute:#5b6475;--line:#d5dae3;--head:#2f3b52}
*{box-sizing:border-box}
body{margin:0;font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--ink);background:#f4f6f9}
header{background:var(--head);color:#fff;padding:12px 16px;display:flex;flex-wrap:wrap;align-items:baseline;gap:6px 18px}
header h1{margin:0;font-size:20px;letter-spacing:.5px}
header .meta{display:flex;flex-wrap:wrap;gap:4px 14px;font-size:13px;color:#d6dcea}
header .meta b{color:#fff;font-weight:600}
.path{display:inline-block;padding:1px 8px;border-radius:9px;font-weight:700;font-size:12px}
.path.sockmap{background:#1e9e3a;color:#fff}.path.fallback{background:#d97e00;color:#fff}
main{padding:12px 16px;max-width:1800px;margin:0 auto}
.legend{display:flex;flex-wrap:wrap;gap:6px;margin:0 0 12px;font-size:12px;color:var(--mute)}
.legend span{padding:2px 8px;border-radius:4px;color:var(--ink)}
section{background:#fff;border:1px solid var(--line);border-radius:8px;margin:0 0 16px;box-shadow:0 1px 2px rgba(0,0,0,.05)}
section h2{margin:0;padding:10px 14px 4px;font-size:17px}
.about{padding:0 14px 10px;color:var(--mute);font-size:13px;display:flex;flex-wrap:wrap;gap:2px 16px}
.about b{color:var(--ink);font-weight:600}
.scroll{overflow-x:auto;-webkit-overflow-scrolling:touch;border-top:1px solid var(--line)}
table{border-collapse:collapse;width:100%;font-variant-numeric:tabular-nums;white-space:nowrap}
th,td{padding:5px 7px;border-bottom:1px solid var(--line);text-align:right}
thead th{background:#eef1f6;color:var(--head);font-size:12px;font-weight:600;position:sticky;top:0}
thead tr.group th{text-align:center;border-left:1px solid var(--line);font-size:11px;text-transform:uppercase;letter-spacing:.6px}
th.l,td.l{text-align:left}
td.name,th.name{position:sticky;left:0;z-index:1;text-align:left;font-weight:600;border-right:1px solid var(--line)}
td.name{background:inherit}
tr.srv{background:#fff}
tr.srv.up{background:var(--up)}tr.srv.going-down{background:var(--gd)}tr.srv.going-up{background:var(--gu)}
tr.srv.down{background:var(--down)}tr.srv.no-check{background:var(--nc)}tr.srv.maint{background:var(--maint)}
tr.srv.drain{background:var(--drain)}tr.srv.standby{background:var(--sb)}
tr.fe,tr.be{background:#f7f8fb;color:var(--head)}tr.be td{font-weight:600;border-top:2px solid var(--line)}
.st{display:inline-block;min-width:74px;text-align:center;padding:1px 8px;border-radius:10px;color:#fff;font-weight:700;font-size:12px}
.st.up{background:var(--up-s)}.st.going-down{background:var(--gd-s)}.st.going-up{background:var(--gu-s)}
.st.down{background:var(--down-s)}.st.no-check{background:var(--nc-s)}.st.maint{background:var(--maint-s)}
.st.drain{background:var(--drain-s)}.st.standby{background:var(--sb-s)}
.role{font-weight:600}.role.primary{color:#0b5d1e}.muted{color:var(--mute)}
.fence{margin-left:4px;font-size:11px;color:#fff;background:#7a1f1f;border-radius:3px;padding:0 4px}
footer{padding:4px 16px 24px;color:var(--mute);font-size:12px;max-width:1800px;margin:0 auto}
footer a{color:var(--head)}
@media (max-width:700px){body{font-size:13px}header h1{font-size:18px}main{padding:8px}th,td{padding:4px 6px}}
</style>
"#;

/// "last reload OK|FAILED at <time>", its messages in the tooltip; nothing before the first.
fn last_reload(s: &StatsSnapshot) -> String {
    let r = &s.reload;
    let (Some(ok), Some(at)) = (r.last_ok, r.last_unix) else {
        return String::new();
    };
    format!(
        "<span id=\"last-reload\" title=\"{}\">last reload <b>{}</b> at <b>{}</b> \
         ({} of {} refused)</span>",
        esc(&r.last_messages.join("\n")),
        if ok { "OK" } else { "FAILED" },
        utc(at),
        r.failures,
        r.reloads,
    )
}

/// "packet-level splice <carried> now, <handed off> handed off", what stayed on the sockmap
/// path in the tooltip; nothing without `datapath = "tc"`.
fn packet_splice(s: &StatsSnapshot) -> String {
    let Some(t) = &s.tc else {
        return String::new();
    };
    format!(
        "<span id=\"packet-splice\" title=\"left on the sockmap path: {} IPv4 and IPv6 legs, {} options; \
         {} hand-offs retried; {} handed off behind a fence\">packet-level splice <b>{}</b> now, \
         <b>{}</b> handed off</span>",
        t.stayed_mixed_family,
        t.stayed_options,
        t.retried,
        t.handed_off_fenced,
        t.carried,
        t.handed_off,
    )
}

/// "dcs connected|DISCONNECTED, leader <member> (<server>)", the last event in the tooltip;
/// nothing without `[dcs]`.
fn dcs(s: &StatsSnapshot) -> String {
    let Some(d) = &s.dcs else {
        return String::new();
    };
    let leader = match (&d.leader, &d.leader_server) {
        (Some(m), Some(server)) => format!("{m} ({server})"),
        (Some(m), None) => format!("{m} (no configured server)"),
        (None, _) => "none".to_owned(),
    };
    let last = match (&d.last_event, d.last_event_unix) {
        (Some(what), Some(at)) => format!("last event at {}: {what}", utc(at)),
        _ => "no event yet".to_owned(),
    };
    let error = d.last_error.as_ref().map_or(String::new(), |e| {
        format!("\n{} errors, last: {e}", d.errors)
    });
    format!(
        "<span id=\"dcs\" title=\"{} {}\n{}{}\">dcs <b>{}</b>, leader <b>{}</b> \
         ({} changes)</span>",
        esc(&d.leader_key),
        esc(&d.endpoints.join(",")),
        esc(&last),
        esc(&error),
        if d.connected {
            "connected"
        } else {
            "DISCONNECTED"
        },
        esc(&leader),
        d.leader_changes,
    )
}

fn header(h: &mut String, s: &StatsSnapshot) {
    let _ = write!(
        h,
        "<header><h1>patroxy</h1><div class=\"meta\">\
         <span>version <b>{}</b></span><span>pid <b>{}</b></span><span>uptime <b>{}</b></span>\
         <span>data path <span class=\"path {}\" id=\"data-path\">{}</span></span>\
         {}<span>refresh <b>{}s</b></span><span>at <b>{}</b></span>{}{}</div></header>\n<main>\n",
        esc(&s.version),
        s.pid,
        duration(s.uptime_secs),
        esc(&s.data_path),
        esc(&s.data_path),
        packet_splice(s),
        s.refresh_secs,
        utc(s.generated_unix),
        last_reload(s),
        dcs(s),
    );
    h.push_str("<div class=\"legend\">");
    for (class, text) in [
        (StateClass::Up, "UP"),
        (StateClass::GoingDown, "UP, going down"),
        (StateClass::GoingUp, "DOWN, going up"),
        (StateClass::Down, "DOWN"),
        (
            StateClass::Standby,
            "STANDBY: a healthy replica, not the leader",
        ),
        (StateClass::NoCheck, "not checked"),
        (StateClass::Maint, "MAINT"),
        (StateClass::Drain, "DRAIN"),
    ] {
        let _ = write!(
            h,
            "<span style=\"background:var(--{})\">{text}</span>",
            match class {
                StateClass::Up => "up",
                StateClass::GoingDown => "gd",
                StateClass::GoingUp => "gu",
                StateClass::Down => "down",
                StateClass::Standby => "sb",
                StateClass::NoCheck => "nc",
                StateClass::Maint => "maint",
                StateClass::Drain => "drain",
            }
        );
    }
    h.push_str("</div>\n");
}

const HEAD: &str = "<thead><tr class=\"group\"><th class=\"name\" rowspan=\"2\">Server</th>\
<th rowspan=\"2\">Status</th><th colspan=\"2\">Patroni</th><th colspan=\"4\">Last check</th>\
<th colspan=\"5\">Sessions</th><th colspan=\"2\">Queue</th><th colspan=\"2\">Bytes</th>\
<th colspan=\"3\">Errors</th><th colspan=\"4\">Health</th></tr>\n<tr>\
<th class=\"l\">Role</th><th>TL</th><th class=\"l\">Check</th><th>Code</th><th>Time</th>\
<th>Age</th><th>Cur</th><th>Max</th><th>Limit</th><th>Total</th><th>Rate</th><th>Cur</th>\
<th>Max</th><th>In</th><th>Out</th><th title=\"failed connects\">Conn</th>\
<th title=\"retries\">Retr</th><th title=\"redispatches\">Redis</th>\
<th title=\"failed checks\">Fail</th><th title=\"UP to DOWN transitions\">Down</th>\
<th title=\"time since the last UP/DOWN change\">Last chg</th><th>Downtime</th></tr></thead>\n";

fn listener(h: &mut String, snap: &StatsSnapshot, l: &ListenerStats) {
    let _ = writeln!(
        h,
        "<section class=\"listener\" id=\"listener-{n}\" data-listener=\"{n}\"><h2>{n}</h2>\
         <div class=\"about\"><span>bind <b>{}</b></span><span>balance <b>{}</b></span>\
         <span>check <b>{}</b></span><span>leader <b>{}</b></span>\
         <span>leader changes <b>{}</b></span><span>data path <b>{}</b></span>\
         <span title=\"CancelRequests: received, taken by a server, dropped by the rate limits, \
         taken by none\">cancels <b>{} / {} / {} / {}</b></span></div>",
        esc(&l.bind),
        esc(&l.balance),
        l.check.as_deref().map_or("none".into(), esc),
        l.leader().map_or("none".into(), |s| esc(&s.name)),
        l.primary_changes,
        esc(&snap.data_path),
        l.frontend.cancels.received,
        l.frontend.cancels.delivered,
        l.frontend.cancels.dropped,
        l.frontend.cancels.failed,
        n = esc(&l.name),
    );
    h.push_str("<div class=\"scroll\"><table>\n");
    h.push_str(HEAD);
    h.push_str("<tbody>\n");
    let f = &l.frontend;
    let backend = l.backend();
    let t = &backend.traffic;
    let _ = writeln!(
        h,
        "<tr class=\"fe\"><td class=\"name\">Frontend</td><td><span class=\"st up\">OPEN</span></td>\
         <td colspan=\"6\" class=\"l muted\" title=\"clients waiting for an UP server; clients \
         closed: no server UP / servers full / connect failed\">waiting {}, refused {}/{}/{}</td><td>{}</td><td></td><td>{}</td><td>{}</td><td>{}</td>\
         <td></td><td></td><td>{}</td><td>{}</td><td colspan=\"7\"></td></tr>",
        f.waiting,
        f.no_server,
        f.queue_full,
        f.connect_failed,
        f.scur,
        snap.global_maxconn,
        f.stot,
        f.rate,
        bytes(t.bin),
        bytes(t.bout),
    );
    for s in &l.servers {
        server(h, l, s);
    }
    let _ = writeln!(
        h,
        "<tr class=\"be\"><td class=\"name\">Backend</td><td><span class=\"st {}\">{}</span></td>\
         <td colspan=\"6\" class=\"l\">{} of {} servers active</td><td>{}</td><td></td><td></td>\
         <td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
         <td>{}</td><td colspan=\"4\"></td></tr>",
        if backend.up { "up" } else { "down" },
        if backend.up { "UP" } else { "DOWN" },
        backend.active_servers,
        l.servers.len(),
        t.scur,
        t.stot,
        t.rate,
        t.qcur,
        t.qmax,
        bytes(t.bin),
        bytes(t.bout),
        t.econ,
        t.wretr,
        t.wredis,
    );
    h.push_str("</tbody></table></div></section>\n");
}

/// "eth0 (native), veth1 (tc)"; the configured interfaces when no pin says more.
fn attached(x: &XdpStats) -> String {
    if x.attached.is_empty() {
        return x.interfaces.join(", ");
    }
    let each: Vec<String> = x
        .attached
        .iter()
        .map(|a| format!("{} ({})", a.interface, a.mode))
        .collect();
    each.join(", ")
}

/// The XDP allowlist: its counters per protected port, then per rule.
fn xdp(h: &mut String, x: &XdpStats) {
    let _ = writeln!(
        h,
        "<section class=\"xdp\" id=\"xdp\"><h2>XDP allowlist</h2><div class=\"about\">\
         <span>interfaces <b>{}</b></span><span>SYN rate per source <b>{}</b></span></div>\
         <div class=\"scroll\"><table><thead><tr><th class=\"name\">Port</th><th>Passed</th>\
         <th>Denied</th><th>SYN limited</th><th class=\"l\"></th></tr></thead><tbody>",
        esc(&attached(x)),
        x.syn_rate.map_or("no limit".into(), |r| format!("{r}/s")),
    );
    for p in &x.ports {
        let _ = writeln!(
            h,
            "<tr><td class=\"name\">{}</td><td>{}</td><td>{}</td><td>{}</td><td></td></tr>",
            p.port, p.passed, p.denied, p.syn_limited
        );
    }
    h.push_str(
        "</tbody><thead><tr><th class=\"name\">Rule</th><th>Passed</th><th></th>\
         <th>SYN limited</th><th class=\"l\">From, to ports</th></tr></thead><tbody>\n",
    );
    for r in &x.rules {
        let ports: Vec<String> = r.ports.iter().map(u16::to_string).collect();
        let _ = writeln!(
            h,
            "<tr><td class=\"name\">{}</td><td>{}</td><td></td><td>{}</td>\
             <td class=\"l\">{} &rarr; {}</td></tr>",
            r.index,
            r.passed,
            r.syn_limited,
            esc(&r.from.join(", ")),
            ports.join(", ")
        );
    }
    h.push_str("</tbody></table></div></section>\n");
}

fn server(h: &mut String, l: &ListenerStats, s: &ServerStats) {
    let class = s.class.css();
    let role = match &s.role {
        Some(r) => format!("<span class=\"role {0}\">{0}</span>", esc(r)),
        None => "<span class=\"muted\">?</span>".into(),
    };
    let fence = if s.fenced {
        "<span class=\"fence\" title=\"the kernel refuses to forward\">fenced</span>"
    } else {
        ""
    };
    let (check, code, took, age) = match &s.last_check {
        Some(c) => (
            format!("<span title=\"{}\">{}</span>", esc(&c.desc), esc(&c.status)),
            c.code.map_or(String::new(), |c| c.to_string()),
            format!("{}ms", c.duration_ms),
            duration(c.age_secs),
        ),
        None => Default::default(),
    };
    let checked = l.check.is_some();
    let t = &s.traffic;
    let health = |v: String| if checked { v } else { String::new() };
    let _ = writeln!(
        h,
        "<tr class=\"srv {class}\" id=\"srv-{lname}-{name}\" data-server=\"{name}\" \
         data-status=\"{status}\"><td class=\"name\" title=\"{addr}\">{name}</td>\
         <td><span class=\"st {class}\">{status}</span>{fence}</td><td class=\"l\">{role}</td>\
         <td>{tl}</td><td class=\"l\">{check}</td><td>{code}</td><td>{took}</td><td>{age}</td>\
         <td>{scur}</td><td>{smax}</td><td>{slim}</td><td>{stot}</td><td>{rate}</td>\
         <td>{qcur}</td><td>{qmax}</td><td title=\"{bin} bytes\">{hbin}</td>\
         <td title=\"{bout} bytes\">{hbout}</td><td>{econ}</td><td>{wretr}</td><td>{wredis}</td>\
         <td>{chkfail}</td><td>{chkdown}</td><td>{lastchg}</td><td>{downtime}</td></tr>",
        lname = esc(&l.name),
        name = esc(&s.name),
        status = esc(&s.status),
        addr = esc(&s.address),
        tl = s.timeline.map_or(String::new(), |t| t.to_string()),
        scur = t.scur,
        smax = s.smax,
        slim = s.slim.map_or("-".into(), |l| l.to_string()),
        stot = t.stot,
        rate = t.rate,
        qcur = t.qcur,
        qmax = t.qmax,
        bin = t.bin,
        bout = t.bout,
        hbin = bytes(t.bin),
        hbout = bytes(t.bout),
        econ = t.econ,
        wretr = t.wretr,
        wredis = t.wredis,
        chkfail = health(s.chkfail.to_string()),
        chkdown = health(s.chkdown.to_string()),
        lastchg = duration(s.lastchg_secs),
        downtime = health(duration(s.downtime_secs)),
    );
}

fn footer(h: &mut String, s: &StatsSnapshot) {
    let bytes_note = match (s.live_bytes, &s.tc) {
        (true, None) => "Bytes include open sessions (counted by the kernel's verdict program).",
        (true, Some(_)) => {
            "Bytes include open sessions (counted by the kernel's verdict program, then by the \
             TC program once a session is handed to the packet-level splice)."
        }
        (false, _) => "Bytes count closed sessions only on the fallback data path.",
    };
    let _ = writeln!(
        h,
        "</main><footer>{bytes_note} Rates are sessions per second over the last 10 s. \
         Also as <a href=\"/;csv\">CSV</a> (HAProxy's format), <a href=\"/;json\">JSON</a> and \
         <a href=\"/metrics\">Prometheus metrics</a>.</footer>"
    );
}

/// HTML-escapes text for element content and attribute values.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// 1536 -> "1.5 KiB".
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// HAProxy-style compact durations: "42s", "3m05s", "2h07m", "1d01h".
pub fn duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if d > 0 {
        format!("{d}d{h:02}h")
    } else if h > 0 {
        format!("{h}h{m:02}m")
    } else if m > 0 {
        format!("{m}m{s:02}s")
    } else {
        format!("{s}s")
    }
}

/// Seconds since the epoch as "2023-11-14 22:13:20 UTC" (civil-from-days, no time crate).
fn utc(unix: u64) -> String {
    let (days, rem) = ((unix / 86400) as i64, unix % 86400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::super::model::sample;
    use super::*;

    #[test]
    fn page_has_a_table_per_listener_and_a_row_per_server() {
        let page = render(&sample::snapshot(), true);
        assert!(page.contains("<meta http-equiv=\"refresh\" content=\"5\">"));
        assert_eq!(page.matches("<table>").count(), 2);
        assert_eq!(page.matches("<tr class=\"srv ").count(), 4);
        assert!(page.contains(
            "<tr class=\"srv up\" id=\"srv-postgres_write-pg1\" data-server=\"pg1\" data-status=\"UP\">"
        ));
        assert!(page.contains("data-status=\"DOWN\""));
        assert!(page.contains("<tr class=\"srv going-down\""));
        assert!(page.contains("<span class=\"st going-down\">UP 2/3</span>"));
        assert!(page.contains("<tr class=\"srv no-check\""));
        assert!(page.contains("<span class=\"role primary\">primary</span>"));
        assert!(page.contains("id=\"data-path\">sockmap</span>"));
        assert!(page.contains("<b>1d01h</b>"), "uptime");
        assert!(page.contains("117.7 MiB"), "bytes out of pg1");
        assert!(page.contains("leader <b>pg1</b>"));
        assert!(page.contains("2023-11-14 22:13:20 UTC"));
        assert!(
            !page.contains("http://") && !page.contains("https://"),
            "no external asset"
        );
        assert!(!render(&sample::snapshot(), false).contains("http-equiv=\"refresh\""));
    }

    #[test]
    fn maint_and_drain_rows_have_their_own_colours() {
        let mut snap = sample::snapshot();
        let servers = &mut snap.listeners[0].servers;
        (servers[1].status, servers[1].class) = ("MAINT".into(), StateClass::Maint);
        (servers[2].status, servers[2].class) = ("DRAIN 2/3".into(), StateClass::Drain);
        let page = render(&snap, false);
        assert!(page.contains("<tr class=\"srv maint\" id=\"srv-postgres_write-pg2\""));
        assert!(page.contains("<span class=\"st maint\">MAINT</span>"));
        assert!(page.contains("<tr class=\"srv drain\" id=\"srv-postgres_write-pg3\""));
        assert!(page.contains("data-status=\"DRAIN 2/3\""));
        // HAProxy's legend colours: brown for maintenance, blue for draining.
        assert!(page.contains("--maint:#e3b378") && page.contains("--drain:#8fcbff"));
        assert!(page.contains("tr.srv.maint{background:var(--maint)}"));
    }

    #[test]
    fn the_xdp_section_shows_ports_and_rules() {
        let mut snap = sample::snapshot();
        assert!(!render(&snap, false).contains("XDP allowlist"));
        snap.xdp = Some(sample::xdp());
        let page = render(&snap, false);
        assert!(page.contains("<h2>XDP allowlist</h2>"), "{page}");
        assert!(page.contains("<b>200/s</b>"), "{page}");
        assert!(page.contains("<b>eth0 (native)</b>"), "{page}");
        assert!(
            page.contains("<td class=\"name\">5432</td><td>1000</td><td>42</td><td>7</td>"),
            "{page}"
        );
        assert!(
            page.contains("10.100.100.0/24 &rarr; 5432, 5433, 7000"),
            "{page}"
        );
    }

    #[test]
    fn names_are_escaped() {
        let mut snap = sample::snapshot();
        snap.listeners[0].servers[0].name = "<b>x</b>".into();
        let page = render(&snap, true);
        assert!(page.contains("&lt;b&gt;x&lt;/b&gt;") && !page.contains("<b>x</b>"));
    }

    #[test]
    fn formats() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(duration(0), "0s");
        assert_eq!(duration(185), "3m05s");
        assert_eq!(duration(7620), "2h07m");
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
    }
}
