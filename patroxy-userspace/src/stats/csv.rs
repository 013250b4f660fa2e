//! HAProxy's CSV stats (`/;csv`), so the scrapers, Nagios checks and scripts that read HAProxy's
//! page keep working: the same header in the same field order, one FRONTEND row, one row per
//! server and one BACKEND row per listener, every line ending in a comma. Fields patroxy has no
//! value for (HTTP, compression, agent checks, ...) are empty, as HAProxy leaves them for a TCP
//! proxy.
use std::fmt::Write as _;

use super::model::{ListenerStats, ServerStats, StatsSnapshot, Traffic};

/// HAProxy's fields 0..=99 in order (doc/management.txt, "9.1. CSV format").
pub const FIELDS: [&str; 100] = [
    "pxname",
    "svname",
    "qcur",
    "qmax",
    "scur",
    "smax",
    "slim",
    "stot",
    "bin",
    "bout",
    "dreq",
    "dresp",
    "ereq",
    "econ",
    "eresp",
    "wretr",
    "wredis",
    "status",
    "weight",
    "act",
    "bck",
    "chkfail",
    "chkdown",
    "lastchg",
    "downtime",
    "qlimit",
    "pid",
    "iid",
    "sid",
    "throttle",
    "lbtot",
    "tracked",
    "type",
    "rate",
    "rate_lim",
    "rate_max",
    "check_status",
    "check_code",
    "check_duration",
    "hrsp_1xx",
    "hrsp_2xx",
    "hrsp_3xx",
    "hrsp_4xx",
    "hrsp_5xx",
    "hrsp_other",
    "hanafail",
    "req_rate",
    "req_rate_max",
    "req_tot",
    "cli_abrt",
    "srv_abrt",
    "comp_in",
    "comp_out",
    "comp_byp",
    "comp_rsp",
    "lastsess",
    "last_chk",
    "last_agt",
    "qtime",
    "ctime",
    "rtime",
    "ttime",
    "agent_status",
    "agent_code",
    "agent_duration",
    "check_desc",
    "agent_desc",
    "check_rise",
    "check_fall",
    "check_health",
    "agent_rise",
    "agent_fall",
    "agent_health",
    "addr",
    "cookie",
    "mode",
    "algo",
    "conn_rate",
    "conn_rate_max",
    "conn_tot",
    "intercepted",
    "dcon",
    "dses",
    "wrew",
    "connect",
    "reuse",
    "cache_lookups",
    "cache_hits",
    "srv_icur",
    "src_ilim",
    "qtime_max",
    "ctime_max",
    "rtime_max",
    "ttime_max",
    "eint",
    "idle_conn_cur",
    "safe_conn_cur",
    "used_conn_cur",
    "need_conn_est",
    "uweight",
];

/// HAProxy's `type` field.
const TYPE_FRONTEND: u8 = 0;
const TYPE_BACKEND: u8 = 1;
const TYPE_SERVER: u8 = 2;

pub fn render(snap: &StatsSnapshot) -> String {
    let mut out = String::from("# ");
    for f in FIELDS {
        out.push_str(f);
        out.push(',');
    }
    out.push('\n');
    for (i, l) in snap.listeners.iter().enumerate() {
        let iid = i + 1;
        line(&mut out, frontend(snap, l, iid));
        for s in &l.servers {
            line(&mut out, server(snap, l, s, iid));
        }
        line(&mut out, backend(snap, l, iid));
    }
    out
}

/// One row being filled by field name.
struct Row(Vec<String>);

impl Row {
    /// A row of listener `l` (the `iid`th): the fields every row has.
    fn new(snap: &StatsSnapshot, l: &ListenerStats, iid: usize, svname: &str, kind: u8) -> Self {
        Row(vec![String::new(); FIELDS.len()])
            .set("pxname", &l.name)
            .set("svname", svname)
            .set("pid", snap.pid)
            .set("iid", iid)
            .set("type", kind)
            .set("mode", "tcp")
    }

    fn set(mut self, field: &str, value: impl ToString) -> Self {
        let i = FIELDS
            .iter()
            .position(|f| *f == field)
            .unwrap_or_else(|| panic!("unknown CSV field {field}"));
        self.0[i] = value.to_string();
        self
    }

    fn opt(self, field: &str, value: Option<impl ToString>) -> Self {
        match value {
            Some(v) => self.set(field, v),
            None => self,
        }
    }

    /// The fields a server row and a BACKEND row both fill from their [`Traffic`].
    fn traffic(self, t: &Traffic) -> Self {
        self.set("qcur", t.qcur)
            .set("qmax", t.qmax)
            .set("scur", t.scur)
            .set("stot", t.stot)
            .set("lbtot", t.stot)
            .set("rate", t.rate)
            .set("bin", t.bin)
            .set("bout", t.bout)
            .set("econ", t.econ)
            .set("eresp", 0)
            .set("wretr", t.wretr)
            .set("wredis", t.wredis)
    }

    /// HAProxy's weight and act: `n` active servers (a server row counts itself); no backup
    /// servers (bck).
    fn active(self, n: u64) -> Self {
        self.set("weight", n).set("act", n).set("bck", 0)
    }
}

fn line(out: &mut String, row: Row) {
    for v in row.0 {
        if v.contains([',', '"', '\n']) {
            let _ = write!(out, "\"{}\"", v.replace('"', "\"\"").replace('\n', " "));
        } else {
            out.push_str(&v);
        }
        out.push(',');
    }
    out.push('\n');
}

fn frontend(snap: &StatsSnapshot, l: &ListenerStats, iid: usize) -> Row {
    let f = &l.frontend;
    let bytes = l.backend().traffic;
    Row::new(snap, l, iid, "FRONTEND", TYPE_FRONTEND)
        .set("scur", f.scur)
        .set("slim", snap.global_maxconn)
        .set("stot", f.stot)
        .set("bin", bytes.bin)
        .set("bout", bytes.bout)
        .set("status", "OPEN")
        .set("sid", 0)
        .set("rate", f.rate)
        .set("rate_max", f.rate_max)
        .set("conn_rate", f.rate)
        .set("conn_rate_max", f.rate_max)
        .set("conn_tot", f.stot)
}

fn server(snap: &StatsSnapshot, l: &ListenerStats, s: &ServerStats, iid: usize) -> Row {
    let mut row = Row::new(snap, l, iid, &s.name, TYPE_SERVER)
        .traffic(&s.traffic)
        .active(1)
        .set("smax", s.smax)
        .opt("slim", s.slim)
        .set("status", s.haproxy_status())
        .set("lastchg", s.lastchg_secs)
        .set("sid", s.sid)
        .set("rate_max", s.rate_max)
        .set("addr", &s.address);
    if l.check.is_some() {
        row = row
            .set("chkfail", s.chkfail)
            .set("chkdown", s.chkdown)
            .set("downtime", s.downtime_secs)
            .set("check_rise", s.rise)
            .set("check_fall", s.fall);
    }
    if let Some(c) = &s.last_check {
        row = row
            .set("check_status", &c.status)
            .opt("check_code", c.code)
            .set("check_duration", c.duration_ms)
            .set("last_chk", &c.desc)
            .set("check_desc", &c.desc);
    }
    row
}

fn backend(snap: &StatsSnapshot, l: &ListenerStats, iid: usize) -> Row {
    let t = l.backend();
    Row::new(snap, l, iid, "BACKEND", TYPE_BACKEND)
        .traffic(&t.traffic)
        .active(t.active_servers)
        .set("slim", snap.global_maxconn)
        .set("status", if t.up { "UP" } else { "DOWN" })
        .opt("lastchg", t.lastchg_secs)
        .set("sid", 0)
        .set("algo", &l.balance)
}

#[cfg(test)]
mod tests {
    use super::super::model::{StateClass, sample};
    use super::*;

    fn parse(csv: &str) -> (Vec<String>, Vec<Vec<String>>) {
        let mut lines = csv.lines();
        let header = lines.next().unwrap().strip_prefix("# ").unwrap();
        let names = header.trim_end_matches(',').split(',').map(String::from);
        let rows = lines
            .map(|l| {
                let l = l.strip_suffix(',').expect("lines end in a comma");
                l.split(',').map(String::from).collect()
            })
            .collect();
        (names.collect(), rows)
    }

    #[test]
    fn header_is_haproxys() {
        let csv = render(&sample::snapshot());
        let first = csv.lines().next().unwrap();
        assert!(first.starts_with(
            "# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,dreq,dresp,ereq,econ,eresp,\
             wretr,wredis,status,weight,act,bck,chkfail,chkdown,lastchg,downtime,qlimit,pid,iid,\
             sid,throttle,lbtot,tracked,type,rate,rate_lim,rate_max,check_status,check_code,\
             check_duration,hrsp_1xx,"
        ));
        assert!(first.ends_with("last_chk,last_agt,qtime,ctime,rtime,ttime,agent_status,agent_code,agent_duration,check_desc,agent_desc,check_rise,check_fall,check_health,agent_rise,agent_fall,agent_health,addr,cookie,mode,algo,conn_rate,conn_rate_max,conn_tot,intercepted,dcon,dses,wrew,connect,reuse,cache_lookups,cache_hits,srv_icur,src_ilim,qtime_max,ctime_max,rtime_max,ttime_max,eint,idle_conn_cur,safe_conn_cur,used_conn_cur,need_conn_est,uweight,"));
    }

    #[test]
    fn rows_per_listener_and_values_in_place() {
        let (names, rows) = parse(&render(&sample::snapshot()));
        let col = |n: &str| names.iter().position(|x| x == n).unwrap();
        let kinds: Vec<_> = rows.iter().map(|r| format!("{}/{}", r[0], r[1])).collect();
        assert_eq!(
            kinds,
            [
                "postgres_write/FRONTEND",
                "postgres_write/pg1",
                "postgres_write/pg2",
                "postgres_write/pg3",
                "postgres_write/BACKEND",
                "postgres_read/FRONTEND",
                "postgres_read/pg1",
                "postgres_read/BACKEND",
            ]
        );
        for r in &rows {
            assert_eq!(r.len(), names.len(), "{r:?}");
        }
        let pg1 = &rows[1];
        assert_eq!(pg1[col("status")], "UP");
        assert_eq!(pg1[col("scur")], "3");
        assert_eq!(pg1[col("slim")], "200");
        assert_eq!(pg1[col("bin")], "5000000");
        assert_eq!(pg1[col("bout")], "123456789");
        assert_eq!(pg1[col("check_status")], "L7OK");
        assert_eq!(pg1[col("check_code")], "200");
        assert_eq!(pg1[col("type")], "2");
        let pg2 = &rows[2];
        assert_eq!(pg2[col("status")], "DOWN");
        assert_eq!(pg2[col("check_code")], "503");
        assert_eq!(
            (pg2[col("chkfail")].as_str(), pg2[col("chkdown")].as_str()),
            ("5", "1")
        );
        assert_eq!(pg2[col("downtime")], "3725");
        assert_eq!(rows[3][col("status")], "UP 2/3");
        assert_eq!(rows[3][col("check_code")], "");
        assert_eq!(rows[0][col("status")], "OPEN");
        assert_eq!(rows[0][col("slim")], "2000");
        assert_eq!(rows[4][col("status")], "UP");
        assert_eq!(rows[4][col("act")], "2");
        assert_eq!(rows[4][col("algo")], "first");
        assert_eq!(rows[6][col("status")], "no check");
        // A STANDBY replica is HAProxy's DOWN for the CSV's scrapers.
        let mut snap = sample::snapshot();
        let pg2 = &mut snap.listeners[0].servers[1];
        (pg2.status, pg2.class) = ("STANDBY".into(), StateClass::Standby);
        let (_, rows) = parse(&render(&snap));
        assert_eq!(rows[2][col("status")], "DOWN");
        assert_eq!(
            rows[6][col("chkfail")],
            "",
            "unchecked servers have no check counters"
        );
    }

    #[test]
    fn commas_in_values_are_quoted() {
        let mut snap = sample::snapshot();
        snap.listeners[0].servers[0]
            .last_check
            .as_mut()
            .unwrap()
            .desc = "a, \"b\"".into();
        let csv = render(&snap);
        assert!(csv.contains(r#","a, ""b""","#), "{csv}");
    }
}
