//! The stats as plain data: one [`StatsSnapshot`] is built per request from the proxy's state
//! (see `collect`) and every renderer (HTML, CSV, JSON, Prometheus, the `status` command) takes
//! only this struct, so rendering is tested without sockets, maps or clocks.
use serde::{Deserialize, Serialize};

/// Everything one stats page shows, at one moment. Times are already turned into ages.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatsSnapshot {
    pub version: String,
    pub pid: u32,
    /// "sockmap" or "fallback": which data path forwards the bytes.
    pub data_path: String,
    /// Whether bin/bout include the bytes of open sessions (the kernel's counters). On the
    /// fallback path they count closed sessions only.
    pub live_bytes: bool,
    pub uptime_secs: u64,
    /// The page reloads itself this often.
    pub refresh_secs: u64,
    /// Wall clock of the snapshot (seconds since the Unix epoch), shown in the page footer.
    pub generated_unix: u64,
    /// Global maxconn: the frontend's session limit.
    pub global_maxconn: u32,
    /// Configuration reloads since start; absent from older daemons' JSON.
    #[serde(default)]
    pub reload: ReloadStats,
    /// Admin requests refused for a missing or wrong token since start.
    #[serde(default)]
    pub admin_unauthorized: u64,
    /// The DCS watch; absent without `[dcs]` (and from older daemons' JSON).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dcs: Option<DcsStats>,
    pub listeners: Vec<ListenerStats>,
    /// The XDP allowlist's counters; `None` when it is not attached.
    #[serde(default)]
    pub xdp: Option<XdpStats>,
    /// The packet-level splice's counters; `None` without `datapath = "tc"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tc: Option<TcStats>,
}

/// How sessions fared with the packet-level splice (`datapath = "tc"`) since start.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcStats {
    /// Sessions handed from the sockmap path to the TC program.
    pub handed_off: u64,
    /// Sessions the TC program carries now.
    pub carried: u64,
    /// Hand-offs abandoned because a byte moved meanwhile (tried again later).
    pub retried: u64,
    /// Sessions left on the sockmap path: one leg IPv4, the other IPv6.
    pub stayed_mixed_family: u64,
    /// Sessions left on the sockmap path for options the legs do not share (or a leg on an
    /// interface the programs are not attached to).
    pub stayed_options: u64,
    /// Of `handed_off`, the sessions handed off behind a fence (never quiet).
    #[serde(default)]
    pub handed_off_fenced: u64,
    /// Senders told by duplicate ACKs to retransmit what a fence dropped.
    #[serde(default)]
    pub senders_nudged: u64,
    /// Segments a fence dropped that the proxy sent on itself after the hand-off.
    #[serde(default)]
    pub segments_forwarded: u64,
    /// Segments a fence dropped that the proxy gave back to its own sockets after an abandoned
    /// attempt.
    #[serde(default)]
    pub segments_given_back: u64,
}

/// The XDP allowlist: what it is attached to and its counters (summed over the CPUs).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct XdpStats {
    pub interfaces: Vec<String>,
    /// Each interface the allowlist is attached to, and how.
    #[serde(default)]
    pub attached: Vec<XdpAttached>,
    /// SYNs per second per source; `None` = no limit.
    pub syn_rate: Option<u32>,
    pub rules: Vec<XdpRuleStats>,
    pub ports: Vec<XdpPortStats>,
}

/// One interface's attachment.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct XdpAttached {
    pub interface: String,
    /// "native" or "generic" (XDP), or "tc" (tc ingress).
    pub mode: String,
}

/// One `[[allow]]` rule, by its position in the file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct XdpRuleStats {
    pub index: usize,
    pub from: Vec<String>,
    pub ports: Vec<u16>,
    /// TCP packets this rule let through.
    pub passed: u64,
    /// SYNs over the rate from this rule's sources, dropped.
    pub syn_limited: u64,
}

/// One protected port.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct XdpPortStats {
    pub port: u16,
    pub passed: u64,
    /// TCP packets from sources no rule allows, dropped.
    pub denied: u64,
    pub syn_limited: u64,
}

/// The DCS watch of Patroni's leader key.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DcsStats {
    pub endpoints: Vec<String>,
    /// `<namespace>/<scope>/leader`.
    pub leader_key: String,
    pub connected: bool,
    /// The member the key names, and the configured server that member is.
    pub leader: Option<String>,
    pub leader_server: Option<String>,
    pub leader_changes: u64,
    /// Wall clock (seconds since the Unix epoch) and text of the last leader or connection
    /// change.
    pub last_event_unix: Option<u64>,
    pub last_event: Option<String>,
    pub errors: u64,
    pub last_error: Option<String>,
}

/// Configuration reloads since start (SIGHUP, `patroxy reload`) and the last one's outcome.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ReloadStats {
    pub reloads: u64,
    /// Reloads refused (invalid file, or a change that needs a restart).
    pub failures: u64,
    /// Wall clock of the last reload (seconds since the Unix epoch); `None` before the first.
    pub last_unix: Option<u64>,
    pub last_ok: Option<bool>,
    /// What the last reload changed, or why it was refused, one line each.
    pub last_messages: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ListenerStats {
    pub name: String,
    pub bind: String,
    /// "first", "roundrobin" or "leastconn".
    pub balance: String,
    /// The health check, e.g. "GET /primary"; `None` when the servers are not checked.
    pub check: Option<String>,
    /// Times the leader (UP server with Patroni role primary/standby leader) became another
    /// server: failovers and switchovers seen by this listener.
    pub primary_changes: u64,
    pub frontend: FrontendStats,
    pub servers: Vec<ServerStats>,
}

/// The listener's accepting side (HAProxy's FRONTEND row).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FrontendStats {
    /// Clients accepted and not yet closed: in a session, queued or waiting for a server.
    pub scur: u64,
    /// Clients accepted since start.
    pub stot: u64,
    /// Accepted clients per second (10 s average) and the highest per-second rate seen.
    pub rate: u64,
    pub rate_max: u64,
    /// Clients waiting for any server to come UP now.
    pub waiting: u64,
    /// Clients closed because no server was UP before `timeout queue`.
    pub no_server: u64,
    /// Clients closed because every server stayed at maxconn until `timeout queue`.
    pub queue_full: u64,
    /// Clients closed because every connection attempt failed.
    pub connect_failed: u64,
    /// CancelRequests, which are not sessions and count in none of the above.
    #[serde(default)]
    pub cancels: CancelStats,
}

/// What became of a listener's CancelRequests (`proxy::cancel`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CancelStats {
    pub received: u64,
    /// Taken by at least one server.
    pub delivered: u64,
    /// Refused by `cancel_rate_per_client` or `cancel_rate`.
    pub dropped: u64,
    /// Taken by no server (every connection failed).
    pub failed: u64,
    /// Connections opened to servers for cancels (one cancel may go to several).
    pub server_connections: u64,
    /// Connections that began encrypted (SSL/GSS request, TLS): their cancels cannot be read.
    pub encrypted_starts: u64,
}

/// How a server's status is coloured: the states of HAProxy's stats page legend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StateClass {
    Up,
    /// UP but failing checks ("UP 1/3").
    GoingDown,
    /// DOWN but passing checks ("DOWN 1/2").
    GoingUp,
    Down,
    /// DOWN on a listener that asks for the leader, because Patroni says it is a healthy
    /// replica: shown STANDBY, calm, so that an alert on DOWN means a node in trouble. The CSV
    /// keeps HAProxy's DOWN for existing scrapers.
    Standby,
    NoCheck,
    Maint,
    Drain,
}

impl StateClass {
    /// Whether the server takes new sessions in this state.
    pub fn serving(self) -> bool {
        matches!(self, Self::Up | Self::GoingDown | Self::NoCheck)
    }

    /// The state HAProxy's Prometheus exporter reports (`haproxy_server_status{state=...}`):
    /// transitional states count as the side they are still on.
    pub fn prometheus_state(self) -> &'static str {
        match self {
            Self::Up | Self::GoingDown | Self::NoCheck => "UP",
            Self::Down | Self::GoingUp => "DOWN",
            Self::Standby => "STANDBY",
            Self::Maint => "MAINT",
            Self::Drain => "DRAIN",
        }
    }

    pub fn css(self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::GoingDown => "going-down",
            Self::GoingUp => "going-up",
            Self::Down => "down",
            Self::Standby => "standby",
            Self::NoCheck => "no-check",
            Self::Maint => "maint",
            Self::Drain => "drain",
        }
    }
}

fn ready() -> String {
    "ready".into()
}

/// The traffic a server row and its listener's BACKEND row (its servers added up) both show,
/// under HAProxy's names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Traffic {
    /// Sessions: current and total.
    pub scur: u64,
    pub stot: u64,
    /// Sessions per second (10 s average).
    pub rate: u64,
    /// Clients waiting for a slot: now and at most.
    pub qcur: u64,
    pub qmax: u64,
    /// Payload bytes client->server (bin) and server->client (bout).
    pub bin: u64,
    pub bout: u64,
    /// Failed connects, retries, redispatches (HAProxy's econ, wretr, wredis).
    pub econ: u64,
    pub wretr: u64,
    pub wredis: u64,
}

impl Traffic {
    /// Adds a server's traffic to a BACKEND total: counts add up, the queue peak is the highest.
    fn add(&mut self, s: &Traffic) {
        self.scur += s.scur;
        self.stot += s.stot;
        self.rate += s.rate;
        self.qcur += s.qcur;
        self.qmax = self.qmax.max(s.qmax);
        self.bin += s.bin;
        self.bout += s.bout;
        self.econ += s.econ;
        self.wretr += s.wretr;
        self.wredis += s.wredis;
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LastCheckStats {
    /// HAProxy's code: L7OK, L7STS, L4CON, L4TOUT, ...
    pub status: String,
    /// The HTTP status, when an answer arrived.
    pub code: Option<u16>,
    pub duration_ms: u64,
    pub age_secs: u64,
    /// HAProxy's words for the status, plus the checker's detail if any.
    pub desc: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServerStats {
    pub name: String,
    /// BackendId in the BPF maps.
    pub id: u32,
    /// 1-based position in the listener (HAProxy's sid).
    pub sid: u32,
    pub address: String,
    pub check_address: Option<String>,
    /// As HAProxy writes it: "UP", "DOWN", "UP 1/3", "DOWN 1/2", "MAINT", "DRAIN",
    /// "DRAIN 1/3" (draining and failing checks), "no check"; and patroxy's "STANDBY" (see
    /// [`StateClass::Standby`]; [`ServerStats::haproxy_status`] says DOWN for it).
    pub status: String,
    pub class: StateClass,
    /// The operator's state (`patroxy set-state`): "ready", "drain" or "maint". A draining
    /// server that fails its checks shows `status` DOWN, as in HAProxy; this still says "drain".
    #[serde(default = "ready")]
    pub admin: String,
    /// Patroni's view: role ("primary", "replica", ...) and timeline from the last check body.
    pub role: Option<String>,
    pub timeline: Option<u64>,
    pub last_check: Option<LastCheckStats>,
    pub rise: u32,
    pub fall: u32,
    /// Serialized flat, as HAProxy's fields: `scur`, `stot`, ... beside the others.
    #[serde(flatten)]
    pub traffic: Traffic,
    /// Sessions: highest and limit (maxconn).
    pub smax: u64,
    pub slim: Option<u32>,
    /// The highest per-second session rate seen.
    pub rate_max: u64,
    /// Sessions reset because the server was marked down.
    pub markdown_resets: u64,
    /// Failed checks (chkfail) and UP->DOWN transitions (chkdown).
    pub chkfail: u64,
    pub chkdown: u64,
    /// Seconds since the last UP/DOWN change, and total time DOWN.
    pub lastchg_secs: u64,
    pub downtime_secs: u64,
    /// The kernel refuses to forward this backend's bytes (marked down, sessions being reset).
    pub fenced: bool,
}

impl ServerStats {
    /// The status as HAProxy would write it, for the CSV: STANDBY is HAProxy's DOWN.
    pub fn haproxy_status(&self) -> &str {
        match self.class {
            StateClass::Standby => "DOWN",
            _ => &self.status,
        }
    }
}

/// HAProxy's BACKEND row: the servers of a listener added up.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BackendTotals {
    pub up: bool,
    pub active_servers: u64,
    pub traffic: Traffic,
    /// Seconds since the most recent UP/DOWN change of any of its servers.
    pub lastchg_secs: Option<u64>,
}

impl ListenerStats {
    pub fn backend(&self) -> BackendTotals {
        let mut t = BackendTotals::default();
        for s in &self.servers {
            if s.class.serving() {
                t.up = true;
                t.active_servers += 1;
            }
            t.traffic.add(&s.traffic);
            t.lastchg_secs = Some(
                t.lastchg_secs
                    .map_or(s.lastchg_secs, |l| l.min(s.lastchg_secs)),
            );
        }
        t
    }

    /// The server the write traffic goes to, when there is a leader that is UP.
    pub fn leader(&self) -> Option<&ServerStats> {
        self.servers.iter().find(|s| {
            s.class.serving() && matches!(s.role.as_deref(), Some("primary" | "standby_leader"))
        })
    }
}

#[cfg(test)]
pub(crate) mod sample {
    //! A hand-built snapshot for the renderers' tests: a write listener with a primary UP, a
    //! replica DOWN and one going down, a read listener without checks.
    use super::*;

    pub fn server(name: &str, id: u32, class: StateClass, status: &str) -> ServerStats {
        ServerStats {
            name: name.into(),
            id,
            sid: id,
            address: format!("10.0.0.{id}:5432"),
            check_address: Some(format!("10.0.0.{id}:8008")),
            status: status.into(),
            class,
            admin: match class {
                StateClass::Maint => "maint",
                StateClass::Drain => "drain",
                _ => "ready",
            }
            .into(),
            role: None,
            timeline: None,
            last_check: None,
            rise: 2,
            fall: 3,
            traffic: Traffic::default(),
            smax: 0,
            slim: Some(200),
            rate_max: 0,
            markdown_resets: 0,
            chkfail: 0,
            chkdown: 0,
            lastchg_secs: 95,
            downtime_secs: 0,
            fenced: false,
        }
    }

    pub fn snapshot() -> StatsSnapshot {
        let mut pg1 = server("pg1", 1, StateClass::Up, "UP");
        pg1.role = Some("primary".into());
        pg1.timeline = Some(4);
        pg1.last_check = Some(LastCheckStats {
            status: "L7OK".into(),
            code: Some(200),
            duration_ms: 3,
            age_secs: 1,
            desc: "Layer7 check passed".into(),
        });
        let t = &mut pg1.traffic;
        (t.scur, pg1.smax, t.stot, t.rate, pg1.rate_max) = (3, 7, 1234, 2, 9);
        (t.bin, t.bout) = (5_000_000, 123_456_789);
        (t.qcur, t.qmax) = (1, 4);
        let mut pg2 = server("pg2", 2, StateClass::Down, "DOWN");
        pg2.role = Some("replica".into());
        pg2.timeline = Some(4);
        pg2.last_check = Some(LastCheckStats {
            status: "L7STS".into(),
            code: Some(503),
            duration_ms: 2,
            age_secs: 0,
            desc: "Layer7 wrong status".into(),
        });
        (pg2.chkfail, pg2.chkdown, pg2.downtime_secs) = (5, 1, 3725);
        pg2.traffic.econ = 2;
        let mut pg3 = server("pg3", 3, StateClass::GoingDown, "UP 2/3");
        pg3.last_check = Some(LastCheckStats {
            status: "L4TOUT".into(),
            code: None,
            duration_ms: 1000,
            age_secs: 2,
            desc: "Layer4 timeout".into(),
        });
        pg3.chkfail = 1;
        let mut r1 = server("pg1", 4, StateClass::NoCheck, "no check");
        r1.sid = 1;
        r1.slim = None;
        StatsSnapshot {
            version: "0.1.0".into(),
            pid: 4242,
            data_path: "sockmap".into(),
            live_bytes: true,
            uptime_secs: 90061,
            refresh_secs: 5,
            generated_unix: 1_700_000_000,
            global_maxconn: 2000,
            reload: ReloadStats {
                reloads: 3,
                failures: 1,
                last_unix: Some(1_699_999_000),
                last_ok: Some(false),
                last_messages: vec!["/etc/patroxy/patroxy.toml:12:9: unknown key `balanse`".into()],
            },
            admin_unauthorized: 0,
            dcs: None,
            listeners: vec![
                ListenerStats {
                    name: "postgres_write".into(),
                    bind: "0.0.0.0:5432".into(),
                    balance: "first".into(),
                    check: Some("GET /primary".into()),
                    primary_changes: 1,
                    frontend: FrontendStats {
                        scur: 4,
                        stot: 1300,
                        rate: 2,
                        rate_max: 9,
                        no_server: 3,
                        ..Default::default()
                    },
                    servers: vec![pg1, pg2, pg3],
                },
                ListenerStats {
                    name: "postgres_read".into(),
                    bind: "0.0.0.0:5433".into(),
                    balance: "roundrobin".into(),
                    check: None,
                    primary_changes: 0,
                    frontend: FrontendStats::default(),
                    servers: vec![r1],
                },
            ],
            xdp: None,
            tc: None,
        }
    }

    /// The allowlist of the seed's rule, attached to eth0, after some traffic.
    pub fn xdp() -> XdpStats {
        XdpStats {
            interfaces: vec!["eth0".into()],
            attached: vec![XdpAttached {
                interface: "eth0".into(),
                mode: "native".into(),
            }],
            syn_rate: Some(200),
            rules: vec![XdpRuleStats {
                index: 0,
                from: vec!["10.100.100.0/24".into()],
                ports: vec![5432, 5433, 7000],
                passed: 1500,
                syn_limited: 7,
            }],
            ports: vec![
                XdpPortStats {
                    port: 5432,
                    passed: 1000,
                    denied: 42,
                    syn_limited: 7,
                },
                XdpPortStats {
                    port: 5433,
                    passed: 500,
                    denied: 0,
                    syn_limited: 0,
                },
            ],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_totals_add_up_servers() {
        let snap = sample::snapshot();
        let t = snap.listeners[0].backend();
        assert!(t.up);
        assert_eq!(t.active_servers, 2, "UP and UP 2/3 serve; DOWN does not");
        let traffic = &t.traffic;
        assert_eq!(
            (traffic.scur, traffic.stot, traffic.bin, traffic.econ),
            (3, 1234, 5_000_000, 2)
        );
        assert_eq!(
            snap.listeners[0].leader().map(|s| s.name.as_str()),
            Some("pg1")
        );
        assert_eq!(snap.listeners[1].leader(), None);
    }

    #[test]
    fn json_round_trips() {
        let snap = sample::snapshot();
        let json = serde_json::to_string(&snap).unwrap();
        assert!(json.contains(r#""class":"going_down""#), "{json}");
        let back: StatsSnapshot = serde_json::from_str(&json).unwrap();
        assert_eq!(back, snap);
    }
}
