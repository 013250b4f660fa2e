//! HAProxy's equivalent of a [`ProxyConfig`], in TCP mode.

use std::fmt::Write as _;

use super::{CheckConfig, OnMarkedDown, ProxyConfig, duration};

/// Where HAProxy's own log goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HaproxyLog {
    /// No `log` line: HAProxy logs nothing.
    Off,
    /// Raw lines on stderr, which the harness keeps in the proxy's log file.
    Stderr,
}

impl ProxyConfig {
    /// HAProxy's equivalent in TCP mode: patroxy's `[default_server]` is repeated as each
    /// listener's `default-server` line, and a listener's servers get `check` when it has a
    /// check. patroxy-only settings (the data path, pins, eBPF log, stats admin) have no line.
    pub fn to_haproxy_cfg(&self, log: HaproxyLog) -> String {
        let mut cfg = Haproxy::default();
        cfg.section("global");
        cfg.line(self.global.maxconn.map(|m| format!("maxconn {m}")));
        if log == HaproxyLog::Stderr {
            cfg.line(Some("log stderr format raw local0"));
        }

        let d = &self.defaults;
        cfg.section("defaults");
        if log == HaproxyLog::Stderr {
            cfg.line(Some("log global"));
        }
        cfg.line(Some("mode tcp"));
        cfg.line(d.retries.map(|r| format!("retries {r}")));
        cfg.line(Some(format!(
            "timeout client {}",
            duration(d.timeout_client)
        )));
        cfg.line(Some(format!(
            "timeout connect {}",
            duration(d.timeout_connect)
        )));
        cfg.line(Some(format!(
            "timeout server {}",
            duration(d.timeout_server)
        )));
        cfg.line(
            d.timeout_check
                .map(|t| format!("timeout check {}", duration(t))),
        );
        cfg.line(
            d.timeout_queue
                .map(|t| format!("timeout queue {}", duration(t))),
        );

        if let Some(s) = &self.stats {
            cfg.section("listen stats");
            cfg.line(Some("mode http"));
            cfg.line(Some(format!("bind {}", s.bind)));
            cfg.line(Some("stats enable"));
            cfg.line(Some("stats uri /"));
            cfg.line(s.refresh.map(|r| format!("stats refresh {}", duration(r))));
        }

        let default_server = self.haproxy_default_server();
        for l in &self.listeners {
            cfg.section(&format!("listen {}", l.name));
            cfg.line(Some(format!("bind {}", l.bind)));
            if let Some(c) = &l.check {
                let method = c
                    .method
                    .map(|m| format!("{} ", m.name()))
                    .unwrap_or_default();
                cfg.line(Some(format!("option httpchk {method}{}", c.path)));
                cfg.line(
                    c.expect_status
                        .map(|s| format!("http-check expect status {s}")),
                );
            }
            cfg.line(l.balance.map(|b| format!("balance {}", b.name())));
            cfg.line(
                default_server
                    .as_ref()
                    .map(|d| format!("default-server {d}")),
            );
            for name in &l.servers {
                cfg.line(Some(self.haproxy_server(name, l.check.as_ref())));
            }
        }
        cfg.finish()
    }

    /// The `default-server` line's settings, `None` when nothing is set.
    fn haproxy_default_server(&self) -> Option<String> {
        let ds = &self.default_server;
        let settings: Vec<String> = [
            ds.inter.map(|d| format!("inter {}", duration(d))),
            ds.fastinter.map(|d| format!("fastinter {}", duration(d))),
            ds.downinter.map(|d| format!("downinter {}", duration(d))),
            ds.fall.map(|n| format!("fall {n}")),
            ds.rise.map(|n| format!("rise {n}")),
            // HAProxy's default does nothing and has no keyword of its own.
            ds.on_marked_down
                .filter(|o| *o == OnMarkedDown::ShutdownSessions)
                .map(|o| format!("on-marked-down {}", o.name())),
            ds.maxconn.map(|n| format!("maxconn {n}")),
        ]
        .into_iter()
        .flatten()
        .collect();
        (!settings.is_empty()).then(|| settings.join(" "))
    }

    /// A listener's `server` line for the server named `name`.
    fn haproxy_server(&self, name: &str, check: Option<&CheckConfig>) -> String {
        let s = self
            .servers
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("a listener names server {name:?}, which is not defined"));
        let mut line = format!("server {} {}", s.name, s.address);
        if let Some(m) = s.maxconn {
            write!(line, " maxconn {m}").unwrap();
        }
        if let Some(check) = check {
            line.push_str(" check");
            if let Some(p) = s.check_port {
                write!(line, " port {p}").unwrap();
            }
            if let Some(ca) = &check.ca_file {
                write!(line, " check-ssl verify required ca-file {}", ca.display()).unwrap();
            }
        }
        line
    }
}

/// An haproxy.cfg being written: sections, each line indented under its section, a blank line
/// between sections.
#[derive(Default)]
struct Haproxy {
    out: String,
}

impl Haproxy {
    fn section(&mut self, header: &str) {
        if !self.out.is_empty() {
            self.out.push('\n');
        }
        writeln!(self.out, "{header}").unwrap();
    }

    fn line(&mut self, line: Option<impl AsRef<str>>) {
        if let Some(line) = line {
            writeln!(self.out, "    {}", line.as_ref()).unwrap();
        }
    }

    fn finish(self) -> String {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::tests::{local, two_listeners};
    use crate::config::{Defaults, ListenerConfig, ServerConfig};

    #[test]
    fn haproxy_cfg_has_the_same_values() {
        assert_eq!(
            two_listeners().to_haproxy_cfg(HaproxyLog::Stderr),
            "global
    maxconn 2000
    log stderr format raw local0

defaults
    log global
    mode tcp
    retries 2
    timeout client 30m
    timeout connect 4s
    timeout server 30m
    timeout check 5s

listen stats
    mode http
    bind 127.0.0.1:7000
    stats enable
    stats uri /
    stats refresh 5s

listen write
    bind 127.0.0.1:5000
    option httpchk GET /primary
    http-check expect status 200
    default-server inter 3s fastinter 500ms fall 3 rise 2 on-marked-down shutdown-sessions
    server a 10.0.0.1:5432 maxconn 200 check port 8008
    server b 10.0.0.2:5432 check port 8008

listen read
    bind 127.0.0.1:5001
    option httpchk /replica
    balance roundrobin
    default-server inter 3s fastinter 500ms fall 3 rise 2 on-marked-down shutdown-sessions
    server a 10.0.0.1:5432 maxconn 200 check port 8008
    server b 10.0.0.2:5432 check port 8008
"
        );
    }

    #[test]
    fn unchecked_servers_get_no_check_and_no_log_means_no_log_lines() {
        let config = ProxyConfig::new(Defaults::new(
            Duration::from_secs(60),
            Duration::from_secs(1),
        ))
        .server(ServerConfig::new("s", local(6000)).check_port(8008))
        .listener(ListenerConfig::new("l", local(5000), ["s"]));
        assert_eq!(
            config.to_haproxy_cfg(HaproxyLog::Off),
            "global\n\ndefaults\n    mode tcp\n    timeout client 1m\n    timeout connect 1s\n    \
             timeout server 1m\n\nlisten l\n    bind 127.0.0.1:5000\n    server s 127.0.0.1:6000\n"
        );
    }

    #[test]
    fn a_tls_check_verifies_against_its_ca() {
        let mut config = two_listeners();
        config.listeners[0].check = Some(CheckConfig::new("/primary").tls("/etc/ca.pem"));
        let cfg = config.to_haproxy_cfg(HaproxyLog::Off);
        assert!(cfg.contains(
            "server a 10.0.0.1:5432 maxconn 200 check port 8008 check-ssl verify required \
             ca-file /etc/ca.pem\n"
        ));
    }

    #[test]
    fn on_marked_down_none_is_haproxys_default() {
        let mut config = two_listeners();
        config.default_server.on_marked_down = Some(OnMarkedDown::Nothing);
        let cfg = config.to_haproxy_cfg(HaproxyLog::Off);
        assert!(cfg.contains("default-server inter 3s fastinter 500ms fall 3 rise 2\n"));
    }
}
