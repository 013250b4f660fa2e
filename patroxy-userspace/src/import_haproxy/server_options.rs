//! The options of a `server` or `default-server` line (`check port 8008 inter 3s ...`), read into
//! what patroxy can use; every other option is reported where it stands.
use super::{
    At,
    parser::Directive,
    report::Report,
    values::{Time, number, time},
};

/// What a `server` (or `default-server`) line says that patroxy has a place for. A server's
/// own options are laid over its `default-server` lines' with [`ServerOptions::over`].
#[derive(Clone, Debug, Default)]
pub struct ServerOptions {
    pub check: Option<At<bool>>,
    pub inter: Option<At<Time>>,
    pub fastinter: Option<At<Time>>,
    pub downinter: Option<At<Time>>,
    pub rise: Option<At<u32>>,
    pub fall: Option<At<u32>>,
    /// The check's port (Patroni's REST API).
    pub port: Option<At<u16>>,
    /// The check's address, when it is not the server's.
    pub addr: Option<At<String>>,
    pub maxconn: Option<At<u32>>,
    pub on_marked_down: Option<At<&'static str>>,
    pub on_marked_up: Option<At<&'static str>>,
    pub init_state: Option<At<&'static str>>,
    /// `check-ssl`: the check speaks https.
    pub check_ssl: Option<At<bool>>,
    pub verify_none: Option<At<bool>>,
    pub ca_file: Option<At<String>>,
    /// A client certificate and its key in one PEM file.
    pub crt: Option<At<String>>,
    pub backup: Option<At<bool>>,
    pub weight: Option<At<u32>>,
}

impl ServerOptions {
    /// `self` where it says something, else `under` (a `default-server` line).
    pub fn over(&self, under: &ServerOptions) -> ServerOptions {
        macro_rules! pick {
            ($($field:ident),*) => {
                ServerOptions { $($field: self.$field.clone().or_else(|| under.$field.clone())),* }
            };
        }
        pick!(
            check,
            inter,
            fastinter,
            downinter,
            rise,
            fall,
            port,
            addr,
            maxconn,
            on_marked_down,
            on_marked_up,
            init_state,
            check_ssl,
            verify_none,
            ca_file,
            crt,
            backup,
            weight
        )
    }

    /// Reads `words` (the options after the keyword, or after name and address), reporting
    /// what is not carried at `directive`'s line.
    pub fn read(directive: &Directive, words: &[String], report: &mut Report) -> ServerOptions {
        let mut o = ServerOptions::default();
        macro_rules! at {
            ($value:expr) => {
                At::new($value, directive)
            };
        }
        let line = directive.line;
        let mut i = 0;
        while i < words.len() {
            let kw = words[i].as_str();
            let value = words.get(i + 1).map(String::as_str);
            let takes_value = !is_flag(kw);
            let shown = match (takes_value, value) {
                (true, Some(v)) => format!("{kw} {v}"),
                _ => kw.to_owned(),
            };
            i += if takes_value { 2 } else { 1 };
            if takes_value && value.is_none() {
                report.unsupported(line, &shown, format!("`{kw}` needs a value"));
                continue;
            }
            let v = value.unwrap_or_default();
            let mut bad = |e: String| report.unsupported(line, &shown, e);
            match kw {
                "check" => o.check = Some(at!(true)),
                "no-check" => o.check = Some(at!(false)),
                "inter" => time(v).map(|t| o.inter = Some(at!(t))).unwrap_or_else(bad),
                "fastinter" => time(v)
                    .map(|t| o.fastinter = Some(at!(t)))
                    .unwrap_or_else(bad),
                "downinter" => time(v)
                    .map(|t| o.downinter = Some(at!(t)))
                    .unwrap_or_else(bad),
                "rise" => number(v, "rise")
                    .map(|n| o.rise = Some(at!(n)))
                    .unwrap_or_else(bad),
                "fall" => number(v, "fall")
                    .map(|n| o.fall = Some(at!(n)))
                    .unwrap_or_else(bad),
                "port" => number(v, "port")
                    .map(|n| o.port = Some(at!(n)))
                    .unwrap_or_else(bad),
                "maxconn" => number(v, "maxconn")
                    .map(|n| o.maxconn = Some(at!(n)))
                    .unwrap_or_else(bad),
                "weight" => number(v, "weight")
                    .map(|n| o.weight = Some(at!(n)))
                    .unwrap_or_else(bad),
                "addr" => o.addr = Some(at!(v.to_owned())),
                "on-marked-down" if v == "shutdown-sessions" => {
                    o.on_marked_down = Some(at!("shutdown-sessions"));
                }
                "on-marked-up" if v == "shutdown-backup-sessions" => {
                    o.on_marked_up = Some(at!("shutdown-backup-sessions"));
                }
                "init-state" => match v {
                    "up" | "down" => {
                        o.init_state = Some(at!(if v == "up" { "up" } else { "down" }))
                    }
                    "fully-up" | "fully-down" => {
                        let state = if v == "fully-up" { "up" } else { "down" };
                        o.init_state = Some(at!(state));
                        report.approximated(
                            line,
                            &shown,
                            format!(
                                "init_state = \"{state}\" (patroxy's states have no \"fully\")"
                            ),
                        );
                    }
                    _ => report.unsupported(line, &shown, format!("unknown init-state `{v}`")),
                },
                "check-ssl" => o.check_ssl = Some(at!(true)),
                "no-check-ssl" => o.check_ssl = Some(at!(false)),
                "verify" if v == "required" => o.verify_none = Some(at!(false)),
                "verify" if v == "none" => {
                    o.verify_none = Some(at!(true));
                    bad(
                        "patroxy always verifies the check's TLS certificate (give ca-file)".into(),
                    );
                }
                "ca-file" => o.ca_file = Some(at!(v.to_owned())),
                "crt" => o.crt = Some(at!(v.to_owned())),
                "backup" => o.backup = Some(at!(true)),
                "no-backup" => o.backup = Some(at!(false)),
                _ => report_option(kw, line, &shown, report),
            }
        }
        o
    }
}

/// Server options that take no value; every other one takes one (HAProxy errors on an unknown
/// option, so the arity of one this does not know cannot matter for a file HAProxy accepts).
fn is_flag(kw: &str) -> bool {
    matches!(
        kw,
        "check"
            | "no-check"
            | "backup"
            | "no-backup"
            | "check-ssl"
            | "no-check-ssl"
            | "ssl"
            | "no-ssl"
            | "send-proxy"
            | "send-proxy-v2"
            | "send-proxy-v2-ssl"
            | "send-proxy-v2-ssl-cn"
            | "no-send-proxy"
            | "no-send-proxy-v2"
            | "check-send-proxy"
            | "no-check-send-proxy"
            | "agent-check"
            | "no-agent-check"
            | "disabled"
            | "enabled"
            | "non-stick"
            | "stick"
            | "tfo"
            | "no-tfo"
            | "allow-0rtt"
            | "no-verifyhost"
            | "ssl-reuse"
            | "no-ssl-reuse"
            | "tls-tickets"
            | "no-tls-tickets"
            | "force-sslv3"
            | "force-tlsv10"
            | "force-tlsv11"
            | "force-tlsv12"
            | "force-tlsv13"
            | "no-sslv3"
            | "no-tlsv10"
            | "no-tlsv11"
            | "no-tlsv12"
            | "no-tlsv13"
            | "check-via-socks4"
    ) || kw.starts_with("no-")
}

/// The report for a server option patroxy does not carry.
fn report_option(kw: &str, line: usize, shown: &str, report: &mut Report) {
    match kw {
        "on-marked-down" | "on-marked-up" => report.unsupported(
            line,
            shown,
            "patroxy knows on-marked-down shutdown-sessions and on-marked-up shutdown-backup-sessions only",
        ),
        "ssl" => report.unsupported(
            line,
            shown,
            "TLS to the server: PostgreSQL clients and servers negotiate TLS themselves, through patroxy",
        ),
        k if k.starts_with("agent-") => report.unsupported(
            line,
            shown,
            "agent checks: patroxy's servers are checked on Patroni's REST API only",
        ),
        k if k.starts_with("send-proxy") || k == "proxy-v2-options" => {
            report.unsupported(line, shown, "the PROXY protocol")
        }
        "resolvers" | "resolve-prefer" | "resolve-net" | "resolve-opts" | "init-addr" => report
            .approximated(
                line,
                shown,
                "patroxy resolves a server's host name once, when the config is loaded",
            ),
        "id" | "cookie" | "non-stick" | "stick" | "enabled" | "guid" | "hash-key" => {
            report.no_meaning(line, shown, "patroxy has no server ids, cookies or stickiness")
        }
        "sni" | "verifyhost" | "no-verifyhost" | "check-sni" | "alpn" | "check-alpn" | "ciphers"
        | "ciphersuites" | "crl-file" | "ssl-min-ver" | "ssl-max-ver" | "curves" | "sigalgs"
        | "client-sigalgs" => report.unsupported(
            line,
            shown,
            "patroxy's check TLS takes a CA file and a client certificate only",
        ),
        "slowstart" | "on-error" | "error-limit" | "observe" | "track" | "minconn" | "maxqueue"
        | "disabled" => report.unsupported(
            line,
            shown,
            format!("patroxy has no `{kw}` for servers"),
        ),
        _ => report.unsupported(line, shown, format!("patroxy has no server option `{kw}`")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::import_haproxy::parser::parse;

    fn read(line: &str) -> (ServerOptions, Vec<String>) {
        let parsed = parse(&format!("backend b\n{line}\n")).unwrap();
        let d = &parsed.sections[0].directives[0];
        let mut report = Report::default();
        let o = ServerOptions::read(d, &d.words[3..], &mut report);
        (
            o,
            report
                .into_findings()
                .iter()
                .map(ToString::to_string)
                .collect(),
        )
    }

    #[test]
    fn carried_options() {
        let (o, lost) = read(
            "server a 1.2.3.4:5432 check port 8008 inter 3s fastinter 1s downinter 5s rise 2 fall 3 \
             maxconn 200 addr 10.0.0.9 on-marked-down shutdown-sessions check-ssl verify required \
             ca-file /etc/ca.pem crt /etc/client.pem backup weight 10",
        );
        assert!(lost.is_empty(), "{lost:?}");
        assert_eq!(o.port.unwrap().value, 8008);
        assert_eq!(o.inter.unwrap().value.toml, "\"3s\"");
        assert_eq!(o.maxconn.unwrap().value, 200);
        assert_eq!(o.addr.unwrap().value, "10.0.0.9");
        assert_eq!(o.on_marked_down.unwrap().value, "shutdown-sessions");
        assert_eq!(o.ca_file.unwrap().value, "/etc/ca.pem");
        assert!(o.backup.unwrap().value && o.check_ssl.unwrap().value);
        assert_eq!(o.weight.unwrap().value, 10);
    }

    #[test]
    fn reported_options_keep_parsing_past_them() {
        let (o, lost) = read(
            "server a 1.2.3.4:5432 agent-check agent-port 5555 send-proxy check ssl verify none slowstart 10s rise 4",
        );
        assert_eq!(o.rise.unwrap().value, 4);
        assert!(o.check.unwrap().value);
        let joined = lost.join("\n");
        for what in [
            "`agent-check`",
            "`agent-port 5555`",
            "`send-proxy`",
            "`ssl`",
            "`verify none`",
            "`slowstart 10s`",
        ] {
            assert!(joined.contains(what), "{what} in {joined}");
        }
        assert!(lost.iter().all(|l| l.starts_with("2: ")), "{joined}");
    }

    #[test]
    fn a_server_line_overrides_its_default_server() {
        let (defaults, _) = read("default-server x y inter 3s rise 2 port 8008");
        let (own, _) = read("server a 1.2.3.4:5432 inter 1s");
        let merged = own.over(&defaults);
        assert_eq!(merged.inter.unwrap().value.toml, "\"1s\"");
        assert_eq!(merged.rise.unwrap().value, 2);
        assert_eq!(merged.port.unwrap().value, 8008);
    }
}
