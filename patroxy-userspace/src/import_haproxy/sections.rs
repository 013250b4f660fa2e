//! The parsed sections read into HAProxy's own model: the global settings, each proxy's
//! settings with its `defaults` section folded in, its binds, backend and servers, and the
//! stats proxy. Each directive is read once, where it stands, and what patroxy has no place
//! for is reported there.
use super::{
    At,
    checks::{self, HttpCheck},
    parser::{Directive, Parsed, Section, SectionKind},
    report::Report,
    server_options::ServerOptions,
    values::{Time, binds, number, server_address, time},
};

/// A proxy's settings: its own directives over its `defaults` section's.
#[derive(Clone, Debug, Default)]
pub struct Settings {
    pub timeout_client: Option<At<Time>>,
    pub timeout_server: Option<At<Time>>,
    pub timeout_connect: Option<At<Time>>,
    pub timeout_check: Option<At<Time>>,
    pub timeout_queue: Option<At<Time>>,
    pub retries: Option<At<u32>>,
    pub redispatch: Option<At<bool>>,
    pub balance: Option<At<&'static str>>,
    pub httpchk: Option<At<HttpCheck>>,
    pub check_send: Option<At<HttpCheck>>,
    pub expect_status: Option<At<u16>>,
    /// A frontend's `maxconn`.
    pub maxconn: Option<At<u32>>,
    pub default_server: ServerOptions,
}

/// A frontend, backend or listen section.
#[derive(Debug)]
pub struct Proxy {
    pub kind: SectionKind,
    pub name: String,
    pub header: Directive,
    pub settings: Settings,
    pub binds: Vec<At<String>>,
    /// `default_backend`, or an unconditional `use_backend`.
    pub backend: Option<At<String>>,
    pub servers: Vec<Server>,
}

#[derive(Clone, Debug)]
pub struct Server {
    pub name: String,
    /// As patroxy writes it.
    pub address: String,
    /// The line's own options over the `default-server` lines before it.
    pub options: ServerOptions,
    pub directive: Directive,
}

/// The proxy serving HAProxy's stats page (`stats enable`, `stats uri`, ...).
#[derive(Debug, Default)]
pub struct StatsProxy {
    pub header: Option<Directive>,
    pub binds: Vec<At<String>>,
    pub refresh: Option<At<Time>>,
    pub admin: Option<At<&'static str>>,
    pub maxconn: Option<At<u32>>,
}

#[derive(Debug, Default)]
pub struct Haproxy {
    pub maxconn: Option<At<u32>>,
    /// `ca-base`: where relative `ca-file`s are.
    pub ca_base: Option<At<String>>,
    pub proxies: Vec<Proxy>,
    pub stats: Option<StatsProxy>,
    /// The last `defaults` section's settings, for a file without a traffic proxy.
    pub last_defaults: Settings,
}

pub fn read(parsed: &Parsed, report: &mut Report) -> Haproxy {
    let mut haproxy = Haproxy::default();
    for d in &parsed.stray {
        let why = if d.keyword().starts_with('.') {
            "a conditional block or message, which HAProxy evaluates at start; the lines inside are read as if it held"
        } else {
            "outside any section (HAProxy refuses it)"
        };
        report.unsupported(d.line, d.text.clone(), why);
    }
    let mut defaults: Vec<(Option<String>, Settings)> = Vec::new();
    for section in &parsed.sections {
        for d in std::iter::once(&section.header).chain(&section.directives) {
            if !d.env_vars.is_empty() {
                report.approximated(
                    d.line,
                    d.text.clone(),
                    format!(
                        "environment variable(s) {} written unexpanded (HAProxy expands them at start)",
                        d.env_vars.join(", ")
                    ),
                );
            }
        }
        match &section.kind {
            SectionKind::Global => global(section, &mut haproxy, report),
            SectionKind::Defaults => {
                let base = inherited(section, &defaults, report);
                let mut reader = ProxyReader::new(section, base, report);
                reader.read_all();
                defaults.push((section.name().map(str::to_owned), reader.settings.clone()));
                haproxy.last_defaults = reader.settings;
            }
            SectionKind::Other(kind) => {
                for d in std::iter::once(&section.header).chain(&section.directives) {
                    report.no_meaning(
                        d.line,
                        d.text.clone(),
                        format!("in a `{kind}` section, which patroxy has no equivalent of"),
                    );
                }
            }
            _ if is_stats(section) => stats(section, &mut haproxy, report),
            kind => {
                let base = inherited(section, &defaults, report);
                let mut binds = Vec::new();
                // Old syntax: `listen name addr:port` binds in the header.
                if let Some(addr) = section.header.arg(1).filter(|a| *a != "from") {
                    header_bind(&section.header, addr, &mut binds, report);
                }
                let mut reader = ProxyReader::new(section, base, report);
                reader.read_all();
                binds.append(&mut reader.binds);
                haproxy.proxies.push(Proxy {
                    kind: kind.clone(),
                    name: section.name().unwrap_or_default().to_owned(),
                    header: section.header.clone(),
                    settings: reader.settings,
                    binds,
                    backend: reader.backend,
                    servers: reader.servers,
                });
            }
        }
    }
    haproxy
}

/// The settings of the `defaults` section a proxy takes: `from <name>`, else the last one.
fn inherited(
    section: &Section,
    defaults: &[(Option<String>, Settings)],
    report: &mut Report,
) -> Settings {
    let words = &section.header.words;
    match words.iter().position(|w| w == "from") {
        Some(i) => {
            let name = words.get(i + 1).map(String::as_str).unwrap_or_default();
            match defaults
                .iter()
                .rev()
                .find(|(n, _)| n.as_deref() == Some(name))
            {
                Some((_, s)) => s.clone(),
                None => {
                    report.unsupported(
                        section.header.line,
                        format!("from {name}"),
                        "no `defaults` section of that name before it",
                    );
                    Settings::default()
                }
            }
        }
        None => defaults.last().map(|(_, s)| s.clone()).unwrap_or_default(),
    }
}

fn header_bind(header: &Directive, addr: &str, out: &mut Vec<At<String>>, report: &mut Report) {
    match binds(addr) {
        Ok(list) => out.extend(list.into_iter().map(|b| At::new(b, header))),
        Err(e) => report.unsupported(header.line, addr.to_owned(), e),
    }
}

fn global(section: &Section, haproxy: &mut Haproxy, report: &mut Report) {
    for d in &section.directives {
        let (line, text) = (d.line, d.text.clone());
        match d.keyword() {
            "maxconn" => match d.arg(0).map(|v| number::<u32>(v, "maxconn")) {
                Some(Ok(n)) => haproxy.maxconn = Some(At::new(n, d)),
                Some(Err(e)) => report.unsupported(line, text, e),
                None => report.unsupported(line, text, "maxconn needs a value"),
            },
            "ca-base" => haproxy.ca_base = d.arg(0).map(|v| At::new(v.to_owned(), d)),
            // patroxy logs to stderr: journald under systemd, which forwards to syslog.
            "log" => {}
            "daemon" | "master-worker" | "pidfile" | "user" | "group" | "uid" | "gid"
            | "chroot" | "ulimit-n" | "nbproc" | "nbthread" | "cpu-map" | "node"
            | "description" | "log-send-hostname" | "log-tag" | "hard-stop-after"
            | "set-dumpable" | "localpeer" => report.no_meaning(
                line,
                text,
                "process management: the systemd unit runs patroxy (its user, limits, restarts)",
            ),
            "stats" => report.unsupported(
                line,
                text,
                "HAProxy's runtime socket: patroxy's operator commands use the [stats] server",
            ),
            k if k.starts_with("ssl-") || k.starts_with("tune.") || k == "crt-base" => {
                report.no_meaning(line, text, "TLS and tuning of HAProxy's own proxying")
            }
            k => report.unsupported(line, text, format!("patroxy has no global `{k}`")),
        }
    }
}

/// Whether a proxy section serves HAProxy's stats page rather than traffic.
fn is_stats(section: &Section) -> bool {
    let has = |kw: &str| section.directives.iter().any(|d| d.keyword() == kw);
    has("stats") && !has("server") && !has("default_backend") && !has("use_backend")
}

fn stats(section: &Section, haproxy: &mut Haproxy, report: &mut Report) {
    if haproxy.stats.is_some() {
        report.unsupported(
            section.header.line,
            section.header.text.clone(),
            "a second stats proxy: patroxy has one [stats] server",
        );
        return;
    }
    let mut s = StatsProxy {
        header: Some(section.header.clone()),
        ..StatsProxy::default()
    };
    if let Some(addr) = section.header.arg(1) {
        header_bind(&section.header, addr, &mut s.binds, report);
    }
    for d in &section.directives {
        let (line, text) = (d.line, d.text.clone());
        let sub = d.arg(0).unwrap_or_default();
        match (d.keyword(), sub) {
            ("mode", "http") | ("stats", "enable") | ("log", _) => {}
            ("bind", _) => read_bind(d, &mut s.binds, report),
            ("stats", "uri") if d.arg(1) == Some("/") => {}
            ("stats", "uri") => {
                report.approximated(line, text, "patroxy serves its stats page at /")
            }
            ("stats", "refresh") => match d.arg(1).map(time) {
                Some(Ok(t)) => s.refresh = Some(At::new(t, d)),
                Some(Err(e)) => report.unsupported(line, text, e),
                None => report.unsupported(line, text, "stats refresh needs a time"),
            },
            ("stats", "admin") => {
                let cond = d.args()[1..].join(" ");
                let admin = match cond.as_str() {
                    "if TRUE" => "any",
                    "if LOCALHOST" | "if { src 127.0.0.1 }" => "local",
                    _ => {
                        report.approximated(
                            line,
                            text,
                            "admin = \"local\": patroxy admits this host's clients, or any, or none",
                        );
                        "local"
                    }
                };
                s.admin = Some(At::new(admin, d));
            }
            ("stats", "auth" | "realm" | "http-request") => report.unsupported(
                line,
                text,
                "patroxy's stats page has no authentication (admin access is by client address)",
            ),
            ("maxconn", _) => match d.arg(0).map(|v| number::<u32>(v, "maxconn")) {
                Some(Ok(n)) => s.maxconn = Some(At::new(n, d)),
                Some(Err(e)) => report.unsupported(line, text, e),
                None => report.unsupported(line, text, "maxconn needs a value"),
            },
            ("http-request", _) if d.text.contains("prometheus-exporter") => {}
            ("stats", _) | ("timeout", _) | ("option", _) => report.no_meaning(
                line,
                text,
                "patroxy's stats page has its own layout and connection deadlines",
            ),
            (k, _) => {
                report.unsupported(line, text, format!("patroxy's stats server has no `{k}`"))
            }
        }
    }
    haproxy.stats = Some(s);
}

fn read_bind(d: &Directive, out: &mut Vec<At<String>>, report: &mut Report) {
    let Some(addr) = d.arg(0) else {
        report.unsupported(d.line, d.text.clone(), "bind needs an address");
        return;
    };
    match binds(addr) {
        Ok(list) => out.extend(list.into_iter().map(|b| At::new(b, d))),
        Err(e) => report.unsupported(d.line, d.text.clone(), e),
    }
    let mut options = d.args()[1..].iter();
    while let Some(option) = options.next() {
        let why = match option.as_str() {
            "ssl" | "crt" | "ca-file" | "verify" | "alpn" | "ciphers" | "crt-list" => {
                "TLS termination: PostgreSQL clients negotiate TLS with the server, through patroxy"
            }
            "accept-proxy" | "accept-netscaler-cip" => "the PROXY protocol",
            "name" | "id" | "tfo" | "defer-accept" | "process" | "thread" => {
                "a HAProxy listener detail patroxy does not need"
            }
            _ => "patroxy's bind is an address and a port only",
        };
        // Options taking a value carry it along in the report.
        let shown = match option.as_str() {
            "ssl" | "accept-proxy" | "v4v6" | "v6only" | "transparent" | "tfo" | "defer-accept" => {
                option.clone()
            }
            _ => format!("{option} {}", options.next().cloned().unwrap_or_default()),
        };
        report.unsupported(d.line, shown, why);
    }
}

/// Reads a defaults or proxy section's directives into settings, binds and servers.
struct ProxyReader<'a> {
    section: &'a Section,
    report: &'a mut Report,
    settings: Settings,
    binds: Vec<At<String>>,
    backend: Option<At<String>>,
    servers: Vec<Server>,
}

impl<'a> ProxyReader<'a> {
    fn new(section: &'a Section, settings: Settings, report: &'a mut Report) -> Self {
        ProxyReader {
            section,
            report,
            settings,
            binds: Vec::new(),
            backend: None,
            servers: Vec::new(),
        }
    }

    fn read_all(&mut self) {
        for d in &self.section.directives {
            self.directive(d);
        }
    }

    fn time(&mut self, d: &Directive, value: Option<&str>) -> Option<At<Time>> {
        match value.map(time) {
            Some(Ok(t)) => Some(At::new(t, d)),
            Some(Err(e)) => {
                self.report.unsupported(d.line, d.text.clone(), e);
                None
            }
            None => {
                self.report
                    .unsupported(d.line, d.text.clone(), "needs a time");
                None
            }
        }
    }

    fn directive(&mut self, d: &Directive) {
        let in_defaults = self.section.kind == SectionKind::Defaults;
        let (line, text) = (d.line, d.text.clone());
        let report = &mut *self.report;
        let s = &mut self.settings;
        let a0 = d.arg(0).unwrap_or_default();
        match (d.keyword(), a0) {
            ("mode", "tcp") | ("log", _) | ("no", "log") => {}
            ("option", "tcplog") => {}
            ("mode", _) => report.approximated(
                line,
                text,
                "patroxy forwards TCP: PostgreSQL's protocol is not HTTP",
            ),
            ("timeout", _) => {
                let t = self.time(d, d.arg(1));
                let s = &mut self.settings;
                match a0 {
                    "client" => s.timeout_client = t.or(s.timeout_client.take()),
                    "server" => s.timeout_server = t.or(s.timeout_server.take()),
                    "connect" => s.timeout_connect = t.or(s.timeout_connect.take()),
                    "check" => s.timeout_check = t.or(s.timeout_check.take()),
                    "queue" => s.timeout_queue = t.or(s.timeout_queue.take()),
                    "tunnel" | "client-fin" | "server-fin" => self.report.unsupported(
                        line,
                        text,
                        "patroxy's established sessions time out on timeout_client and timeout_server",
                    ),
                    _ => self.report.no_meaning(line, text, "an HTTP timeout; patroxy is TCP"),
                }
            }
            ("retries", _) => match number(a0, "retries") {
                Ok(n) => s.retries = Some(At::new(n, d)),
                Err(e) => report.unsupported(line, text, e),
            },
            ("option", "redispatch") => s.redispatch = Some(At::new(true, d)),
            ("no", "option") if d.arg(1) == Some("redispatch") => {
                s.redispatch = Some(At::new(false, d));
            }
            ("balance", _) => {
                let (balance, loss) = match a0 {
                    "roundrobin" => ("roundrobin", None),
                    "leastconn" => ("leastconn", None),
                    "first" => ("first", None),
                    "static-rr" => ("roundrobin", Some("balance = \"roundrobin\" (patroxy's servers have no weights)")),
                    _ => ("roundrobin", Some("balance = \"roundrobin\": patroxy balances by first, roundrobin or leastconn")),
                };
                if let Some(why) = loss {
                    report.approximated(line, text, why);
                }
                s.balance = Some(At::new(balance, d));
            }
            ("option", "httpchk") => {
                s.httpchk = Some(At::new(checks::option_httpchk(d, report), d));
                s.check_send = None;
                s.expect_status = None;
            }
            ("http-check", "send") => s.check_send = Some(At::new(checks::http_check_send(d, report), d)),
            ("http-check", "expect") => {
                if let Some(status) = checks::http_check_expect(d, report) {
                    s.expect_status = Some(status);
                }
            }
            ("http-check", "comment" | "set-var" | "unset-var") => {
                report.no_meaning(line, text, "patroxy reports checks its own way");
            }
            ("http-check", _) => report.unsupported(
                line,
                text,
                "patroxy's check is a request to Patroni's REST API (`port` on the server lines sets its port)",
            ),
            ("option", k) if k.ends_with("-check") || k.ends_with("chk") => report.unsupported(
                line,
                text,
                "patroxy checks servers on Patroni's REST API over HTTP (`option httpchk`)",
            ),
            ("tcp-check", _) => report.unsupported(
                line,
                text,
                "patroxy checks servers on Patroni's REST API over HTTP (`option httpchk`)",
            ),
            ("maxconn", _) => match number(a0, "maxconn") {
                Ok(n) => s.maxconn = Some(At::new(n, d)),
                Err(e) => report.unsupported(line, text, e),
            },
            ("default-server", _) => {
                let options = ServerOptions::read(d, d.args(), report);
                s.default_server = options.over(&s.default_server);
            }
            ("option", "dontlognull" | "httplog" | "log-health-checks" | "logasap")
            | ("log-format" | "log-tag" | "description" | "id" | "errorfile" | "fullconn", _) => {
                report.no_meaning(line, text, "patroxy logs one line per session its own way")
            }
            _ if in_defaults => {
                let what = d.words[..d.words.len().min(2)].join(" ");
                report.unsupported(line, text, format!("patroxy has no `{what}` in defaults"));
            }
            ("bind", _) => read_bind(d, &mut self.binds, report),
            ("default_backend", _) => self.backend = Some(At::new(a0.to_owned(), d)),
            ("use_backend", _) if d.args().len() == 1 => {
                self.backend = self.backend.take().or(Some(At::new(a0.to_owned(), d)));
            }
            ("use_backend", _) => report.unsupported(
                line,
                text,
                "conditional routing: a patroxy listener sends all its clients to one set of servers",
            ),
            ("server", _) => self.server(d),
            ("server-template", _) => report.unsupported(
                line,
                text,
                "server-template finds its servers' addresses through DNS (resolvers) at run time; \
                 list the servers one by one",
            ),
            _ => {
                let what = d.words[..d.words.len().min(2)].join(" ");
                report.unsupported(line, text, format!("patroxy has no `{what}`"));
            }
        }
    }

    fn server(&mut self, d: &Directive) {
        let (Some(name), Some(addr)) = (d.arg(0), d.arg(1)) else {
            self.report.unsupported(
                d.line,
                d.text.clone(),
                "a server needs a name and an address",
            );
            return;
        };
        let address = match server_address(addr) {
            Ok(a) => a,
            Err(e) => {
                self.report.unsupported(d.line, d.text.clone(), e);
                return;
            }
        };
        let own = ServerOptions::read(d, &d.args()[2..], self.report);
        self.servers.push(Server {
            name: name.to_owned(),
            address,
            options: own.over(&self.settings.default_server),
            directive: d.clone(),
        });
    }
}
