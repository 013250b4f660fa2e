//! The plan written as patroxy's TOML, commented like the shipped patroxy.toml: each value says
//! the HAProxy line it came from, and what was not carried over is listed at the end.
use std::fmt::Write as _;

use crate::config::WRITE_PATHS;

use super::{
    At,
    convert::{Plan, PlanCheck, PlanListener, PlanServer},
    report::{Finding, one_line},
    values::MAX_TIME,
};

pub fn emit(plan: &Plan, findings: &[Finding], origin: &str) -> String {
    let mut w = Writer {
        out: String::new(),
        origin: one_line(origin),
    };
    w.header(findings.is_empty());
    w.global(plan);
    w.defaults(plan);
    w.default_server(plan);
    if !plan.servers.is_empty() {
        w.raw("\n# The cluster members, defined once and referenced by the listeners.");
    }
    for s in &plan.servers {
        w.server(s);
    }
    for l in &plan.listeners {
        w.listener(l);
    }
    w.stats(plan);
    w.losses(findings);
    w.out
}

/// A TOML string literal.
fn string(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

struct Writer {
    out: String,
    origin: String,
}

impl Writer {
    fn raw(&mut self, line: &str) {
        self.out.push_str(line);
        self.out.push('\n');
    }

    /// `key = value  # origin:line: directive`
    fn value<T>(&mut self, key: &str, value: &str, at: &At<T>) {
        let _ = writeln!(
            self.out,
            "{key} = {value}  # {}:{}: {}",
            self.origin,
            at.line,
            one_line(&at.text)
        );
    }

    fn header(&mut self, clean: bool) {
        let _ = writeln!(
            self.out,
            "# patroxy configuration imported from {} by `patroxy import-haproxy`.",
            self.origin
        );
        self.raw("# Each value names the line it came from. Durations are \"4s\", \"30m\", \"1h30m\", \"250ms\" or an");
        self.raw("# integer of milliseconds, as in HAProxy.");
        if clean {
            self.raw("# Every directive was carried over.");
        } else {
            self.raw("# Directives not carried over exactly are listed at the end (and were reported on stderr).");
        }
    }

    fn global(&mut self, plan: &Plan) {
        self.raw("\n[global]");
        match &plan.maxconn {
            Some(m) => self.value("maxconn", &m.value.to_string(), m),
            None => self.raw(
                "# maxconn: not set (HAProxy derives one from its fd limit); patroxy's default is 2000",
            ),
        }
        self.raw(
            "# patroxy's own: bpf = \"auto\" splices sessions in the kernel (sockmap) when it can.",
        );
    }

    fn defaults(&mut self, plan: &Plan) {
        let d = &plan.defaults;
        self.raw("\n[defaults]");
        match &d.retries {
            Some(r) => self.value("retries", &r.value.to_string(), r),
            None => self.raw("# retries: not set; 3, as in HAProxy"),
        }
        if let Some(r) = &d.redispatch {
            self.value("redispatch", &r.value.to_string(), r);
        }
        for (key, t) in [
            ("timeout_client", &d.timeout_client),
            ("timeout_server", &d.timeout_server),
            ("timeout_connect", &d.timeout_connect),
        ] {
            match t {
                Some(t) => self.value(key, &t.value.toml, t),
                None => {
                    let _ = writeln!(
                        self.out,
                        "{key} = {}  # not set in {} (HAProxy waits forever): the longest patroxy takes",
                        MAX_TIME.as_millis(),
                        self.origin
                    );
                }
            }
        }
        match &d.timeout_check {
            Some(t) => self.value("timeout_check", &t.value.toml, t),
            None => self.raw("# timeout_check: not set; inter bounds each check, as in HAProxy"),
        }
        match &d.timeout_queue {
            Some(t) => self.value("timeout_queue", &t.value.toml, t),
            None => self.raw("# timeout_queue: not set; timeout_connect, as in HAProxy"),
        }
        self.raw("# patroxy's own: timeout_startup = \"10s\" closes a client that sends nothing (HAProxy has none).");
    }

    fn default_server(&mut self, plan: &Plan) {
        let d = &plan.default_server;
        self.raw("\n[default_server]");
        for (key, t) in [
            ("inter", &d.inter),
            ("fastinter", &d.fastinter),
            ("downinter", &d.downinter),
        ] {
            if let Some(t) = t {
                self.value(key, &t.value.toml, t);
            }
        }
        if d.inter.is_none() {
            self.raw("# inter: not set; patroxy's default is 1s (HAProxy's 2s)");
        }
        if d.fastinter.is_none() {
            self.raw("# fastinter: not set; patroxy's default is 250ms or inter if shorter (HAProxy's is inter)");
        }
        for (key, n) in [("rise", &d.rise), ("fall", &d.fall)] {
            if let Some(n) = n {
                self.value(key, &n.value.to_string(), n);
            }
        }
        for (key, word) in [
            ("on_marked_down", &d.on_marked_down),
            ("on_marked_up", &d.on_marked_up),
            ("init_state", &d.init_state),
        ] {
            if let Some(word) = word {
                self.value(key, &string(word.value), word);
            }
        }
        if d.init_state.is_none() {
            self.raw("# init_state: patroxy starts servers DOWN until `rise` checks pass; \"up\" is HAProxy's way");
        }
    }

    fn server(&mut self, s: &PlanServer) {
        self.raw("\n[[server]]");
        let _ = writeln!(self.out, "name = {}", string(&s.name));
        self.value("address", &string(&s.address.value), &s.address);
        if let Some(p) = &s.check_port {
            self.value("check_port", &p.value.to_string(), p);
        }
        if let Some(a) = &s.check_address {
            self.value("check_address", &string(&a.value), a);
        }
        if let Some(m) = &s.maxconn {
            self.value("maxconn", &m.value.to_string(), m);
        }
    }

    fn listener(&mut self, l: &PlanListener) {
        self.raw("\n[[listener]]");
        self.value("name", &string(&l.name), &l.header);
        self.value("bind", &string(&l.bind.value), &l.bind);
        match &l.balance {
            Some(b) => self.value("balance", &string(b.value), b),
            None => {
                let write_path = l.check.as_ref().is_some_and(|c| {
                    WRITE_PATHS.contains(&c.path.split('?').next().unwrap_or_default())
                });
                if write_path {
                    self.raw("# balance: not set (HAProxy: roundrobin); patroxy's default for a leader check is \"first\",");
                    self.raw("# the same with one primary UP, and under split brain it picks the newest timeline");
                } else {
                    self.raw("# balance: not set; roundrobin, as in HAProxy");
                }
            }
        }
        let servers: Vec<String> = l.servers.iter().map(|s| string(s)).collect();
        let _ = writeln!(self.out, "servers = [{}]", servers.join(", "));
        match &l.check {
            Some(c) => self.check(c),
            None => self
                .raw("# no check: the servers are always UP (HAProxy's servers without `check`)"),
        }
    }

    fn check(&mut self, c: &PlanCheck) {
        self.raw("[listener.check]");
        self.value("method", &string(c.method), &c.origin);
        self.value("path", &string(&c.path), &c.origin);
        match &c.expect_status {
            Some(s) => self.value("expect_status", &s.value.to_string(), s),
            None => self.raw("# expect_status: not set (HAProxy accepts 2xx and 3xx); 200, which is what Patroni answers"),
        }
        if let Some(t) = &c.tls {
            let mut table = format!("tls = {{ ca_file = {}", string(&t.ca_file.value));
            if let Some(crt) = &t.client_cert {
                // HAProxy's `crt` is one PEM holding certificate and key.
                let _ = write!(
                    table,
                    ", client_cert = {0}, client_key = {0}",
                    string(&crt.value)
                );
            }
            table.push_str(" }");
            let _ = writeln!(
                self.out,
                "{table}  # {}:{}: {}",
                self.origin,
                t.ca_file.line,
                one_line(&t.ca_file.text)
            );
        }
    }

    fn stats(&mut self, plan: &Plan) {
        let Some(s) = &plan.stats else {
            return;
        };
        self.raw("\n# Status page (HTML, CSV, JSON, Prometheus) and the admin endpoint (`patroxy set-state`).");
        self.raw("[stats]");
        self.value("bind", &string(&s.bind.value), &s.bind);
        if let Some(r) = &s.refresh {
            self.value("refresh", &r.value.toml, r);
        }
        match &s.admin {
            Some(a) => self.value("admin", &string(a.value), a),
            None => self.raw(
                "admin = \"off\"  # no `stats admin`: nobody changes server states here (\"local\" lets this host's users)",
            ),
        }
        if let Some(m) = &s.maxconn {
            self.value("maxconn", &m.value.to_string(), m);
        }
    }

    fn losses(&mut self, findings: &[Finding]) {
        if findings.is_empty() {
            return;
        }
        self.raw("\n# Not carried over exactly:");
        for f in findings {
            let _ = writeln!(self.out, "# {}:{}", self.origin, one_line(&f.to_string()));
        }
    }
}
