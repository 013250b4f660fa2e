//! A failover's timeline: the harness's own reference points, the writer's successes and
//! errors, the proxy's log lines and the old and new leader's Patroni log lines, merged by time
//! relative to the event, to tell where a switchover's time goes (`cargo xtask failover-bench
//! --timeline`).

use std::time::{Duration, SystemTime};

use super::writer::Report;

/// One moment of the timeline: when, who says it, what.
struct Point {
    at: SystemTime,
    source: String,
    what: String,
}

/// Builds a timeline of the window `[t_event, until]`.
pub struct Timeline {
    t_event: SystemTime,
    until: SystemTime,
    points: Vec<Point>,
}

/// Proxy log lines worth a place on the timeline (the rest is the proxy's routine).
const PROXY_NEEDLES: &[&str] = &[
    "dcs:",
    " is DOWN",
    " is UP",
    "without waiting for rise",
    "session routed",
    "check http",
    "closing client",
    "sessions reset",
];

/// Patroni log lines worth a place (its HA loop's routine "no action" lines are left out).
const PATRONI_NEEDLES: &[&str] = &[
    "promot",
    "demot",
    "leader",
    "lock",
    "switchover",
    "shut",
    "role",
    "Lock owner",
    "starting as",
    "establishing",
];

impl Timeline {
    pub fn new(t_event: SystemTime, until: SystemTime) -> Timeline {
        Timeline {
            t_event,
            until,
            points: Vec::new(),
        }
    }

    pub fn point(&mut self, at: SystemTime, source: &str, what: impl Into<String>) {
        if at >= self.t_event && at <= self.until {
            self.points.push(Point {
                at,
                source: source.to_owned(),
                what: what.into(),
            });
        }
    }

    /// The writer's errors, its last success on the old primary and its first successes on
    /// another server.
    pub fn writer(&mut self, report: &Report, old_ip: &str) {
        for e in &report.errors {
            self.point(e.at, "writer", format!("{:?}: {}", e.kind, e.message));
        }
        if let Some(s) = report.successes.iter().rfind(|s| s.server == old_ip) {
            self.point(
                s.at,
                "writer",
                format!("last write on the old primary {}", s.server),
            );
        }
        let t_event = self.t_event;
        for s in report
            .successes
            .iter()
            .filter(|s| s.server != old_ip && s.at >= t_event)
            .take(3)
        {
            let connected =
                s.at.duration_since(s.connected_at)
                    .unwrap_or_default()
                    .as_millis();
            self.point(
                s.at,
                "writer",
                format!(
                    "write on {} (sent {:+.0} ms, its session connected {connected} ms before, \
                     connecting took {} ms)",
                    s.server,
                    rel_ms(s.sent_at, t_event),
                    s.connect_took.as_millis()
                ),
            );
        }
    }

    /// The proxy's log lines (RFC 3339 timestamps first) that say something about the failover.
    pub fn proxy_log(&mut self, source: &str, log: &str) {
        for line in log.lines() {
            if !PROXY_NEEDLES.iter().any(|n| line.contains(n)) {
                continue;
            }
            let mut parts = line.splitn(2, char::is_whitespace);
            let Some(t) = parts
                .next()
                .and_then(|ts| humantime::parse_rfc3339_weak(ts.trim_end_matches('Z')).ok())
            else {
                continue;
            };
            self.point(
                t,
                source,
                strip_ansi(parts.next().unwrap_or_default().trim()),
            );
        }
    }

    /// A Patroni log ("2026-12-03 17:20:01,123 INFO: ...", UTC).
    pub fn patroni_log(&mut self, source: &str, log: &str) {
        for line in log.lines() {
            if !PATRONI_NEEDLES.iter().any(|n| line.contains(n)) {
                continue;
            }
            let Some((stamp, rest)) = line.get(..23).zip(line.get(23..)) else {
                continue;
            };
            let Ok(t) = humantime::parse_rfc3339_weak(&stamp.replace(',', ".")) else {
                continue;
            };
            self.point(t, source, rest.trim());
        }
    }

    pub fn render(mut self) -> String {
        self.points.sort_by_key(|p| p.at);
        self.points
            .iter()
            .map(|p| {
                format!(
                    "{:+9.1} ms  {:<12} {}\n",
                    rel_ms(p.at, self.t_event),
                    p.source,
                    p.what
                )
            })
            .collect()
    }
}

/// `at` - `t0` in milliseconds (negative before `t0`).
pub fn rel_ms(at: SystemTime, t0: SystemTime) -> f64 {
    match at.duration_since(t0) {
        Ok(d) => d.as_secs_f64() * 1000.0,
        Err(e) => -e.duration().as_secs_f64() * 1000.0,
    }
}

/// The window a timeline needs after the writer's first write on the new primary.
pub const AFTER: Duration = Duration::from_millis(300);

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
