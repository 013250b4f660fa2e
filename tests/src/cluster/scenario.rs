//! The failover scenarios shared by the integration tests and `cargo xtask failover-bench`:
//! an event on the primary under the continuous writer, measured through one proxy.

use std::time::{Duration, Instant, SystemTime};

use super::netns;
use super::patroni::http_get;
use super::proxy::{Kind, Proxy};
use super::timeline::{self, Timeline};
use super::writer::{self, ErrorKind, Report, Writer};
use super::{Cluster, err};
use crate::postgres::PgError;

/// What happens to the primary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// `patronictl switchover --force` to the next node.
    Switchover,
    /// kill -9 of the primary's patroni and PostgreSQL.
    Kill,
    /// The primary's veth link down.
    Partition,
}

impl Event {
    pub fn name(self) -> &'static str {
        match self {
            Event::Switchover => "switchover",
            Event::Kill => "kill -9 primary",
            Event::Partition => "primary link down",
        }
    }

    /// The name `cargo xtask failover-bench --events` takes.
    pub fn short_name(self) -> &'static str {
        match self {
            Event::Switchover => "switchover",
            Event::Kill => "kill",
            Event::Partition => "partition",
        }
    }
}

/// The measurements of one scenario run through one proxy.
#[derive(Debug)]
pub struct Outcome {
    pub event: Event,
    pub proxy: Kind,
    pub old: String,
    pub new: String,
    pub old_ip: String,
    pub report: Report,
    pub t_event: SystemTime,
    /// When Patroni had a new primary taking writes: 200 on /primary with role primary in its
    /// body (Patroni's own floor; its first 200 comes with the key, before the promotion).
    pub patroni_new_primary: Option<Duration>,
    /// When the proxy marked the old primary DOWN on the write listener: patroxy's log
    /// timestamp, or for HAProxy (no timestamps on stderr) when the harness saw the line,
    /// polling every 50 ms.
    pub t_old_down: Option<SystemTime>,
    pub down_line: Option<String>,
    /// Idle sessions opened on the old primary before the event that were not closed.
    pub idle_left: usize,
    pub idle_total: usize,
    /// patroxy with the DCS watch: when it logged the leader key leaving the old primary.
    pub t_key_moved: Option<SystemTime>,
    /// The event's timeline (see [`Timeline`]), one line per point.
    pub timeline: String,
}

impl Outcome {
    pub fn outage(&self) -> Duration {
        self.report.outage().0
    }

    /// How much longer writes were out than Patroni took to have a new primary answering
    /// /primary: the part of the outage a proxy controls (negative when writes continued on
    /// the old primary during part of a switchover).
    pub fn outage_past_patroni(&self) -> Option<f64> {
        self.patroni_new_primary
            .map(|p| self.outage().as_secs_f64() - p.as_secs_f64())
    }

    /// The proxy's share past Patroni's own promotion: from the harness's first `/primary`
    /// 200 with role primary on the new leader (polled directly every 20 ms) to the first write through the
    /// proxy that succeeded on it. Negative when the proxy got there before the harness's poll.
    pub fn proxy_share(&self) -> Option<f64> {
        let promoted = self.t_event + self.patroni_new_primary?;
        let first = self
            .report
            .first_success_elsewhere(&self.old_ip, self.t_event)?;
        Some(match first.duration_since(promoted) {
            Ok(d) => d.as_secs_f64(),
            Err(e) => -e.duration().as_secs_f64(),
        })
    }

    /// Writes sent after the leader key left the old primary that the old primary took.
    pub fn writes_on_old_after_key_moved(&self) -> Option<usize> {
        self.t_key_moved
            .map(|t| self.report.successes_on_after(&self.old_ip, t))
    }

    /// Read-only errors on sessions established after the proxy marked the old primary down.
    pub fn ro_new_sessions_after_down(&self) -> Option<usize> {
        self.t_old_down
            .map(|t| self.report.count_connected_after(ErrorKind::ReadOnly, t))
    }

    /// Read-only errors (any session) after the proxy marked the old primary down.
    pub fn ro_after_down(&self) -> Option<usize> {
        self.t_old_down
            .map(|t| self.report.count_after(ErrorKind::ReadOnly, t))
    }

    pub fn summary(&self) -> String {
        format!(
            "{} via {}: {} -> {}: {}; Patroni's new primary after {}; old DOWN at {}; \
             read-only after DOWN {:?} (new sessions {:?}); idle sessions left on old \
             primary {}/{}",
            self.event.name(),
            self.proxy.name(),
            self.old,
            self.new,
            self.report.summary(),
            self.patroni_new_primary
                .map_or("?".into(), |d| format!("{:.2}s", d.as_secs_f64())),
            self.t_old_down.map_or("?".into(), |t| format!(
                "+{:.2}s",
                t.duration_since(self.t_event)
                    .unwrap_or_default()
                    .as_secs_f64()
            )),
            self.ro_after_down(),
            self.ro_new_sessions_after_down(),
            self.idle_left,
            self.idle_total,
        )
    }
}

/// Runs `event` on the current primary with the writer going through `proxy`'s write port,
/// waits for writes to resume on another node, restores the cluster to three healthy
/// members, and returns the measurements.
pub fn failover(cluster: &mut Cluster, proxy: &Proxy, event: Event) -> Result<Outcome, PgError> {
    let leader = cluster.restore()?;
    let candidate = (leader + 1) % 3;
    let old = cluster.nodes[leader].clone();
    // The proxy must route to this leader before we start (it may still be rising).
    wait_routed(proxy.write_port, &old.ip, Duration::from_secs(30))?;

    // Idle sessions on the old primary: must be closed by the proxy (or by the node) after.
    let mut idle = Vec::new();
    for _ in 0..3 {
        let mut c = writer::connect(proxy.write_port, "ptx-idle").map_err(pg)?;
        let row = writer::query_row(&mut c, "SELECT host(inet_server_addr())").map_err(pg)?;
        if row.first().map(String::as_str) == Some(old.ip.as_str()) {
            idle.push(c);
        }
    }
    let idle_total = idle.len();

    let w = Writer::start(proxy.write_port, Duration::from_millis(20));
    if !w.wait_successes_on(None, 25, Duration::from_secs(10)) {
        let r = w.stop();
        return Err(err(format!(
            "writer not writing before the event: {}\n{}",
            r.summary(),
            r.sample_errors()
        )));
    }
    let down_needle = format!("Server postgres_write/{} is DOWN", old.name);
    let mut down_watch = DownWatch::new(proxy, &down_needle);
    let mut points = Points::default();
    let t_event = SystemTime::now();
    let started = Instant::now();
    if event == Event::Kill {
        cluster.kill_node(leader);
    }
    let cluster_ref = &*cluster;
    std::thread::scope(|scope| -> Result<(), PgError> {
        // patronictl returns only once the switchover is done: the poll below must run
        // meanwhile, or Patroni's new primary would be seen late and the proxy's share short.
        let switchover = (event == Event::Switchover).then(|| {
            scope.spawn(move || {
                let r = cluster_ref.switchover(leader, candidate);
                (r, SystemTime::now())
            })
        });
        match event {
            Event::Switchover | Event::Kill => {}
            Event::Partition => netns::link_down(&old.ns)?,
        }
        poll_new_primary(
            cluster_ref,
            leader,
            &w,
            &old.ip,
            t_event,
            started,
            proxy,
            &mut down_watch,
            &mut points,
        );
        if let Some(handle) = switchover {
            let (result, returned) = handle.join().expect("the patronictl thread");
            result?;
            points.ctl_returned = Some(returned);
        }
        Ok(())
    })?;
    let Points {
        patroni_new_primary,
        new_idx,
        ctl_returned,
        first_200,
    } = points;
    down_watch.poll(proxy);
    std::thread::sleep(Duration::from_secs(1));
    let resumed = w.wait_successes_on(Some(&old.ip), 5, Duration::from_secs(5));
    // HAProxy may mark the old primary DOWN well after writes resumed elsewhere (fall x
    // inter); keep the writer running until then so its read-only errors are counted.
    let down_deadline = Instant::now() + Duration::from_secs(30);
    while !down_watch.seen() && Instant::now() < down_deadline {
        down_watch.poll(proxy);
        std::thread::sleep(Duration::from_millis(50));
    }
    let report = w.stop();

    // Idle sessions still answering (or hanging) on the old primary were left behind.
    let idle_left = idle
        .into_iter()
        .map(|mut c| {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let r = writer::query_row(&mut c, "SELECT host(inet_server_addr())");
                let _ = tx.send(r.ok().and_then(|r| r.into_iter().next()));
            });
            match rx.recv_timeout(Duration::from_secs(3)) {
                Ok(Some(_)) => 1, // still connected somewhere: not reset
                Ok(None) => 0,
                Err(_) => 1, // hanging on a node the proxy never let go of
            }
        })
        .sum();

    let t_key_moved = (proxy.kind == Kind::PatroxyDcs)
        .then(|| proxy.logged_at("dcs: leader key", t_event))
        .flatten();
    let (t_old_down, down_line) = if proxy.kind != Kind::Haproxy {
        // patroxy stamps its log lines: the exact time it marked the old primary DOWN.
        let t = proxy.logged_at(&down_needle, t_event);
        let line = t.and_then(|_| {
            proxy
                .log()
                .lines()
                .rfind(|l| l.contains(&down_needle))
                .map(str::to_owned)
        });
        (t, line)
    } else {
        (down_watch.seen_at, down_watch.line)
    };

    let new_name = new_idx.map_or("?".to_owned(), |i| cluster.nodes[i].name.clone());
    let timeline = {
        let until = report
            .first_success_elsewhere(&old.ip, t_event)
            .map_or(t_event + Duration::from_secs(30), |t| t + timeline::AFTER);
        let mut tl = Timeline::new(t_event, until);
        tl.point(t_event, "harness", event.name());
        if let Some(t) = ctl_returned {
            tl.point(t, "harness", "patronictl switchover returned");
        }
        if let Some((d, i)) = first_200 {
            tl.point(
                t_event + d,
                "harness",
                format!(
                    "{} answers 200 on /primary (first; polled every {PRIMARY_POLL:?})",
                    cluster.nodes[i].name
                ),
            );
        }
        if let Some(d) = patroni_new_primary {
            tl.point(
                t_event + d,
                "harness",
                format!("{new_name} answers 200 on /primary with role primary: takes writes"),
            );
        }
        tl.writer(&report, &old.ip);
        if proxy.kind != Kind::Haproxy {
            tl.proxy_log(proxy.kind.name(), &proxy.log());
        }
        let mut leaders = vec![leader];
        leaders.extend(new_idx);
        for i in leaders {
            let node = &cluster.nodes[i];
            let log = std::fs::read_to_string(node.log_path()).unwrap_or_default();
            tl.patroni_log(&node.name, &log);
        }
        tl.render()
    };
    // Restore three healthy members for what follows.
    match event {
        Event::Switchover => {}
        Event::Kill => cluster.start_node(leader)?,
        Event::Partition => netns::link_up(&old.ns)?,
    }
    if !resumed {
        return Err(err(format!(
            "writes did not resume on a new primary after {}: {}\n{}",
            event.name(),
            report.summary(),
            report.sample_errors()
        )));
    }
    cluster.restore()?;
    Ok(Outcome {
        event,
        proxy: proxy.kind,
        old: old.name.clone(),
        new: new_name,
        old_ip: old.ip.clone(),
        report,
        t_event,
        patroni_new_primary,
        t_old_down,
        down_line,
        idle_left,
        idle_total,
        t_key_moved,
        timeline,
    })
}

/// What the harness saw of Patroni during the event.
#[derive(Default)]
struct Points {
    /// Since the event: Patroni's new primary answering 200 on /primary (the poll's answer).
    patroni_new_primary: Option<Duration>,
    new_idx: Option<usize>,
    /// When `patronictl switchover` returned.
    ctl_returned: Option<SystemTime>,
    /// Since the event: the first 200 on /primary of another node (Patroni holds the leader
    /// key; its PostgreSQL may still be in recovery), and which node.
    first_200: Option<(Duration, usize)>,
}

/// The `role` of Patroni's status JSON.
fn body_role(body: &str) -> Option<String> {
    let json: serde_json::Value = serde_json::from_str(body).ok()?;
    json.get("role")?.as_str().map(str::to_owned)
}

/// How often the harness asks the other nodes' /primary: the granularity of "Patroni's new
/// primary" (plus one request, a few ms on these namespaces).
const PRIMARY_POLL: Duration = Duration::from_millis(20);

/// Polls the nodes other than `leader` for Patroni's new primary, directly (not through a
/// proxy), until writes through the proxy resumed on another server than `old_ip`.
#[allow(clippy::too_many_arguments)]
fn poll_new_primary(
    cluster: &Cluster,
    leader: usize,
    w: &Writer,
    old_ip: &str,
    t_event: SystemTime,
    started: Instant,
    proxy: &Proxy,
    down_watch: &mut DownWatch,
    points: &mut Points,
) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while Instant::now() < deadline {
        down_watch.poll(proxy);
        if points.patroni_new_primary.is_none() {
            for (i, n) in cluster.nodes.iter().enumerate() {
                if i == leader {
                    continue;
                }
                let Ok((200, body)) =
                    http_get(n.api_addr(), "/primary", Duration::from_millis(300))
                else {
                    continue;
                };
                let at = started.elapsed();
                points.first_200.get_or_insert((at, i));
                // Patroni answers 200 once it holds the leader key; the body's role (asked of
                // PostgreSQL each time) says primary once it has left recovery and takes writes.
                if body_role(&body).as_deref() == Some("primary") {
                    points.patroni_new_primary = Some(at);
                    points.new_idx = Some(i);
                }
            }
        }
        if points.patroni_new_primary.is_some()
            && w.wait_successes_since(Some(old_ip), 10, t_event, Duration::from_millis(100))
        {
            return;
        }
        std::thread::sleep(PRIMARY_POLL);
    }
}

/// Watches a proxy's log for a new line containing a needle (HAProxy's log lines carry no
/// timestamp on stderr, so the time the harness first saw the line stands in for it).
struct DownWatch {
    needle: String,
    before: usize,
    seen_at: Option<SystemTime>,
    line: Option<String>,
}

impl DownWatch {
    fn new(proxy: &Proxy, needle: &str) -> DownWatch {
        DownWatch {
            needle: needle.to_owned(),
            before: Self::matching(proxy, needle).len(),
            seen_at: None,
            line: None,
        }
    }

    fn matching(proxy: &Proxy, needle: &str) -> Vec<String> {
        proxy
            .log()
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_owned)
            .collect()
    }

    fn poll(&mut self, proxy: &Proxy) {
        if self.seen_at.is_none() {
            let lines = Self::matching(proxy, &self.needle);
            if lines.len() > self.before {
                self.seen_at = Some(SystemTime::now());
                self.line = lines.into_iter().nth(self.before);
            }
        }
    }

    fn seen(&self) -> bool {
        self.seen_at.is_some()
    }
}

fn pg(e: postgres::Error) -> PgError {
    err(e.to_string())
}

/// Waits until new connections to 127.0.0.1:`port` land on `ip`, five in a row: a proxy
/// that still has a stale server UP (HAProxy round-robins over every UP server, and starts
/// them UP) must have settled before a scenario starts, or it would be measured with that
/// handicap.
pub fn wait_routed(port: u16, ip: &str, timeout: Duration) -> Result<(), PgError> {
    const IN_A_ROW: usize = 5;
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    let mut in_a_row = 0;
    while Instant::now() < deadline {
        match writer::connect(port, "ptx-harness")
            .and_then(|mut c| writer::query_row(&mut c, "SELECT host(inet_server_addr())"))
        {
            Ok(row) if row.first().map(String::as_str) == Some(ip) => {
                in_a_row += 1;
                if in_a_row == IN_A_ROW {
                    return Ok(());
                }
                continue;
            }
            Ok(row) => last = format!("{row:?}"),
            Err(e) => last = e.to_string(),
        }
        in_a_row = 0;
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(err(format!(
        "port {port} never routed to {ip} {IN_A_ROW} times in a row (last: {last})"
    )))
}

/// `SELECT inet_server_addr(), pg_is_in_recovery()` through 127.0.0.1:`port`.
pub fn whoami(port: u16) -> Result<(String, bool), PgError> {
    let mut c = writer::connect(port, "ptx-harness").map_err(pg)?;
    let row = writer::query_row(
        &mut c,
        "SELECT host(inet_server_addr()), pg_is_in_recovery()",
    )
    .map_err(pg)?;
    Ok((row[0].clone(), row[1] == "t"))
}

/// The failover-bench table (markdown) for outcomes of both proxies.
pub fn table(outcomes: &[Outcome]) -> String {
    let mut s = String::from(
        "| scenario | proxy | write outage | Patroni new primary | outage past it | refused | \
         reset | read-only | read-only after DOWN | idle sessions left on old primary | \
         proxy share past promotion | writes on old primary after its key moved |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for o in outcomes {
        s += &format!(
            "| {} | {} | {:.2} s | {} | {} | {} | {} | {} | {} | {}/{} | {} | {} |\n",
            o.event.name(),
            o.proxy.name(),
            o.outage().as_secs_f64(),
            o.patroni_new_primary
                .map_or("?".into(), |d| format!("{:.2} s", d.as_secs_f64())),
            o.outage_past_patroni()
                .map_or("?".into(), |d| format!("{d:.2} s")),
            o.report.count(ErrorKind::Refused) + o.report.count(ErrorKind::Timeout),
            o.report.count(ErrorKind::Reset),
            o.report.count(ErrorKind::ReadOnly),
            o.ro_after_down().map_or("n/a".into(), |n| n.to_string()),
            o.idle_left,
            o.idle_total,
            o.proxy_share()
                .map_or("?".into(), |d| format!("{:.0} ms", d * 1000.0)),
            o.writes_on_old_after_key_moved()
                .map_or("n/a".into(), |n| n.to_string()),
        );
    }
    s
}
