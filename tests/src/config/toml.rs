//! patroxy's config file from a [`ProxyConfig`].

use std::fmt::Write as _;
use std::time::Duration;

use super::{PortRef, ProxyConfig, duration};

impl ProxyConfig {
    /// patroxy's config file.
    pub fn to_toml(&self) -> String {
        let mut toml = Toml::default();
        let g = &self.global;
        toml.table("[global]");
        toml.key("maxconn", g.maxconn);
        toml.key("bpf", g.bpf.map(|b| quoted(b.name())));
        toml.key(
            "pin_path",
            g.pin_path.as_ref().map(|p| quoted(&p.to_string_lossy())),
        );
        toml.key("bpf_log", g.bpf_log);
        toml.key("bpf_log_rate", g.bpf_log_rate);
        toml.key("session_log_rate", g.session_log_rate);
        toml.key("cancel_rate", g.cancel_rate);
        toml.key("cancel_rate_per_client", g.cancel_rate_per_client);
        toml.key(
            "datapath",
            self.tc_interfaces.as_ref().map(|_| quoted("tc")),
        );

        let d = &self.defaults;
        toml.table("[defaults]");
        toml.key("retries", d.retries);
        toml.key("timeout_client", Some(quoted_duration(d.timeout_client)));
        toml.key("timeout_server", Some(quoted_duration(d.timeout_server)));
        toml.key("timeout_connect", Some(quoted_duration(d.timeout_connect)));
        toml.key("timeout_check", d.timeout_check.map(quoted_duration));
        toml.key("timeout_queue", d.timeout_queue.map(quoted_duration));
        toml.key("timeout_startup", d.timeout_startup.map(quoted_duration));

        let ds = &self.default_server;
        toml.table("[default_server]");
        toml.key("inter", ds.inter.map(quoted_duration));
        toml.key("fastinter", ds.fastinter.map(quoted_duration));
        toml.key("downinter", ds.downinter.map(quoted_duration));
        toml.key("fall", ds.fall);
        toml.key("rise", ds.rise);
        toml.key(
            "on_marked_down",
            ds.on_marked_down.map(|o| quoted(o.name())),
        );
        toml.key("maxconn", ds.maxconn);

        for s in &self.servers {
            toml.table("[[server]]");
            toml.key("name", Some(quoted(&s.name)));
            toml.key("address", Some(quoted(&s.address.to_string())));
            toml.key("check_port", s.check_port);
            toml.key("maxconn", s.maxconn);
        }

        for l in &self.listeners {
            toml.table("[[listener]]");
            toml.key("name", Some(quoted(&l.name)));
            toml.key("bind", Some(quoted(&l.bind.to_string())));
            toml.key("balance", l.balance.map(|b| quoted(b.name())));
            let servers: Vec<String> = l.servers.iter().map(|s| quoted(s)).collect();
            toml.key("servers", Some(format!("[{}]", servers.join(", "))));
            if let Some(c) = &l.check {
                toml.subtable("[listener.check]");
                toml.key("method", c.method.map(|m| quoted(m.name())));
                toml.key("path", Some(quoted(&c.path)));
                toml.key("expect_status", c.expect_status);
                toml.key(
                    "tls",
                    c.ca_file
                        .as_ref()
                        .map(|f| format!("{{ ca_file = {} }}", quoted(&f.to_string_lossy()))),
                );
            }
        }

        if let Some(s) = &self.stats {
            toml.table("[stats]");
            toml.key("bind", Some(quoted(&s.bind.to_string())));
            toml.key("refresh", s.refresh.map(quoted_duration));
            toml.key("admin", s.admin.map(|a| quoted(a.name())));
            toml.key(
                "admin_auth_file",
                s.admin_auth_file
                    .as_ref()
                    .map(|f| quoted(&f.to_string_lossy())),
            );
        }

        if let Some(r) = &self.runtime {
            toml.table("[runtime]");
            toml.key("socket", Some(quoted(&r.socket.to_string_lossy())));
            toml.key("mode", r.mode.as_deref().map(quoted));
            toml.key("user", r.user.as_deref().map(quoted));
            toml.key("group", r.group.as_deref().map(quoted));
            toml.key("maxconn", r.maxconn);
        }

        for a in &self.allow {
            toml.table("[[allow]]");
            let from: Vec<String> = a.from.iter().map(|f| quoted(f)).collect();
            toml.key("from", Some(format!("[{}]", from.join(", "))));
            let to: Vec<String> =
                a.to.iter()
                    .map(|t| match t {
                        PortRef::Port(p) => p.to_string(),
                        PortRef::Name(n) => quoted(n),
                    })
                    .collect();
            toml.key("to", Some(format!("[{}]", to.join(", "))));
        }

        if let Some(x) = &self.xdp {
            toml.table("[xdp]");
            toml.key("enabled", x.enabled.map(|b| quoted(b.name())));
            let interfaces: Vec<String> = x.interfaces.iter().map(|i| quoted(i)).collect();
            toml.key("interfaces", Some(format!("[{}]", interfaces.join(", "))));
            toml.key("mode", x.mode.as_deref().map(quoted));
            toml.key("syn_rate", x.syn_rate);
            toml.key("syn_burst", x.syn_burst);
        }
        if let Some(interfaces) = &self.tc_interfaces {
            toml.table("[tc]");
            let interfaces: Vec<String> = interfaces.iter().map(|i| quoted(i)).collect();
            toml.key("interfaces", Some(format!("[{}]", interfaces.join(", "))));
        }
        if let Some(d) = &self.dcs {
            toml.table("[dcs]");
            let endpoints: Vec<String> = d.etcd.iter().map(|e| quoted(e)).collect();
            toml.key("etcd", Some(format!("[{}]", endpoints.join(", "))));
            toml.key("namespace", d.namespace.as_deref().map(quoted));
            toml.key("scope", Some(quoted(&d.scope)));
            toml.key("burst_inter", d.burst_inter.map(quoted_duration));
            toml.key(
                "tls",
                d.tls.as_ref().map(|t| {
                    let path = |p: &std::path::Path| quoted(&p.to_string_lossy());
                    let client = t.client.as_ref().map_or(String::new(), |(cert, key)| {
                        format!(", client_cert = {}, client_key = {}", path(cert), path(key))
                    });
                    format!("{{ ca_file = {}{client} }}", path(&t.ca_file))
                }),
            );
            toml.key("user", d.auth.as_ref().map(|(u, _)| quoted(u)));
            toml.key("password", d.auth.as_ref().map(|(_, p)| quoted(p)));
        }
        toml.finish()
    }
}

/// A TOML file being written: tables with their set keys, a blank line before each table but a
/// sub-table (which reads as part of the table above), and no header for a table with no key
/// set.
#[derive(Default)]
struct Toml {
    out: String,
    /// The header of the table being written, until its first key writes it.
    pending: Option<&'static str>,
}

impl Toml {
    fn table(&mut self, header: &'static str) {
        self.pending = Some(header);
    }

    fn subtable(&mut self, header: &'static str) {
        writeln!(self.out, "{header}").unwrap();
    }

    /// `key = value` when set; `value` is written as it displays (quote strings first).
    fn key(&mut self, key: &str, value: Option<impl std::fmt::Display>) {
        let Some(value) = value else { return };
        if let Some(header) = self.pending.take() {
            if !self.out.is_empty() {
                self.out.push('\n');
            }
            writeln!(self.out, "{header}").unwrap();
        }
        writeln!(self.out, "{key} = {value}").unwrap();
    }

    fn finish(self) -> String {
        self.out
    }
}

/// A TOML basic string (JSON's string escapes are valid TOML ones).
fn quoted(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

fn quoted_duration(d: Duration) -> String {
    quoted(&duration(d))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::tests::{local, two_listeners};
    use crate::config::{
        CheckConfig, Defaults, ListenerConfig, OnMarkedDown, RuntimeConfig, ServerConfig,
    };

    #[test]
    fn toml_has_every_set_key_and_nothing_else() {
        assert_eq!(
            two_listeners().to_toml(),
            r#"[global]
maxconn = 2000
bpf = "auto"
pin_path = "/sys/fs/bpf/t"

[defaults]
retries = 2
timeout_client = "30m"
timeout_server = "30m"
timeout_connect = "4s"
timeout_check = "5s"

[default_server]
inter = "3s"
fastinter = "500ms"
fall = 3
rise = 2
on_marked_down = "shutdown-sessions"

[[server]]
name = "a"
address = "10.0.0.1:5432"
check_port = 8008
maxconn = 200

[[server]]
name = "b"
address = "10.0.0.2:5432"
check_port = 8008

[[listener]]
name = "write"
bind = "127.0.0.1:5000"
servers = ["a", "b"]
[listener.check]
method = "GET"
path = "/primary"
expect_status = 200

[[listener]]
name = "read"
bind = "127.0.0.1:5001"
balance = "roundrobin"
servers = ["a", "b"]
[listener.check]
path = "/replica"

[stats]
bind = "127.0.0.1:7000"
refresh = "5s"
admin = "local"
"#
        );
    }

    #[test]
    fn empty_tables_are_left_out() {
        let config = ProxyConfig::new(Defaults::new(
            Duration::from_secs(60),
            Duration::from_secs(1),
        ))
        .server(ServerConfig::new("s", local(6000)))
        .listener(ListenerConfig::new("l", local(5000), ["s"]));
        assert_eq!(
            config.to_toml(),
            "[defaults]\ntimeout_client = \"1m\"\ntimeout_server = \"1m\"\ntimeout_connect = \"1s\"\n\n\
             [[server]]\nname = \"s\"\naddress = \"127.0.0.1:6000\"\n\n\
             [[listener]]\nname = \"l\"\nbind = \"127.0.0.1:5000\"\nservers = [\"s\"]\n"
        );
    }

    #[test]
    fn strings_are_escaped() {
        assert_eq!(quoted(r#"a"b\c"#), r#""a\"b\\c""#);
    }

    #[test]
    fn a_tls_check_names_its_ca() {
        let mut config = two_listeners();
        config.listeners[0].check = Some(CheckConfig::new("/primary").tls("/etc/ca.pem"));
        assert!(config.to_toml().contains(
            "[listener.check]\npath = \"/primary\"\ntls = { ca_file = \"/etc/ca.pem\" }\n"
        ));
    }

    #[test]
    fn the_runtime_socket_and_the_admin_token_are_written() {
        let mut config = two_listeners();
        config.stats.as_mut().unwrap().admin_auth_file = Some("/etc/patroxy/admin.token".into());
        let config = config.runtime(
            RuntimeConfig::new("/run/patroxy/patroxy.sock")
                .mode("0600")
                .owner("root", "patroxy")
                .maxconn(4),
        );
        assert!(config.to_toml().ends_with(
            "admin = \"local\"\nadmin_auth_file = \"/etc/patroxy/admin.token\"\n\n\
             [runtime]\nsocket = \"/run/patroxy/patroxy.sock\"\nmode = \"0600\"\n\
             user = \"root\"\ngroup = \"patroxy\"\nmaxconn = 4\n"
        ));
    }

    #[test]
    fn on_marked_down_none_is_written() {
        let mut config = two_listeners();
        config.default_server.on_marked_down = Some(OnMarkedDown::Nothing);
        assert!(config.to_toml().contains("on_marked_down = \"none\"\n"));
    }
}
