//! HAProxy's model -> patroxy's: a listener per bound frontend (or listen) with its backend's
//! servers and check, servers defined once by name, and the settings patroxy keeps once for all
//! listeners (`[defaults]`) or all servers (`[default_server]`) chosen as most of them have them,
//! every proxy or server that had another value reported at the line that set it.
use std::collections::HashSet;

use super::{
    At,
    report::Report,
    sections::{Haproxy, Proxy, Server, Settings},
    values::{MAX_TIME, Time},
};
use crate::import_haproxy::parser::SectionKind;

/// patroxy's configuration, each value with the HAProxy line it came from.
#[derive(Debug, Default)]
pub struct Plan {
    pub maxconn: Option<At<u32>>,
    pub defaults: Defaults,
    pub default_server: DefaultServer,
    pub servers: Vec<PlanServer>,
    pub listeners: Vec<PlanListener>,
    pub stats: Option<PlanStats>,
}

#[derive(Debug, Default)]
pub struct Defaults {
    pub retries: Option<At<u32>>,
    pub redispatch: Option<At<bool>>,
    pub timeout_client: Option<At<Time>>,
    pub timeout_server: Option<At<Time>>,
    pub timeout_connect: Option<At<Time>>,
    pub timeout_check: Option<At<Time>>,
    pub timeout_queue: Option<At<Time>>,
}

#[derive(Debug, Default)]
pub struct DefaultServer {
    pub inter: Option<At<Time>>,
    pub fastinter: Option<At<Time>>,
    pub downinter: Option<At<Time>>,
    pub rise: Option<At<u32>>,
    pub fall: Option<At<u32>>,
    pub on_marked_down: Option<At<&'static str>>,
    pub on_marked_up: Option<At<&'static str>>,
    pub init_state: Option<At<&'static str>>,
}

#[derive(Debug)]
pub struct PlanServer {
    pub name: String,
    pub address: At<String>,
    pub check_port: Option<At<u16>>,
    pub check_address: Option<At<String>>,
    pub maxconn: Option<At<u32>>,
}

impl PlanServer {
    fn same_as(&self, other: &PlanServer) -> bool {
        let v = |a: &Option<At<u16>>| a.as_ref().map(|a| a.value);
        self.address.value == other.address.value
            && v(&self.check_port) == v(&other.check_port)
            && self.maxconn.as_ref().map(|m| m.value) == other.maxconn.as_ref().map(|m| m.value)
            && self.check_address.as_ref().map(|a| &a.value)
                == other.check_address.as_ref().map(|a| &a.value)
    }
}

#[derive(Debug)]
pub struct PlanListener {
    pub name: String,
    /// The frontend's (or listen's) header.
    pub header: At<String>,
    pub bind: At<String>,
    pub balance: Option<At<&'static str>>,
    pub servers: Vec<String>,
    pub check: Option<PlanCheck>,
}

#[derive(Debug)]
pub struct PlanCheck {
    /// Where the check was defined (`option httpchk`).
    pub origin: At<()>,
    pub method: &'static str,
    pub path: String,
    pub expect_status: Option<At<u16>>,
    pub tls: Option<PlanTls>,
}

#[derive(Debug)]
pub struct PlanTls {
    pub ca_file: At<String>,
    pub client_cert: Option<At<String>>,
}

#[derive(Debug)]
pub struct PlanStats {
    pub bind: At<String>,
    pub refresh: Option<At<Time>>,
    pub admin: Option<At<&'static str>>,
    pub maxconn: Option<At<u32>>,
}

/// One listener's HAProxy pieces: the bound proxy and the backend it routes to.
struct Route<'h> {
    frontend: &'h Proxy,
    backend: &'h Proxy,
}

pub fn convert(haproxy: &Haproxy, report: &mut Report) -> Plan {
    let mut plan = Plan {
        maxconn: haproxy.maxconn.clone(),
        ..Plan::default()
    };
    let routes = routes(haproxy, report);
    for route in &routes {
        listeners(route, haproxy, &mut plan, report);
    }
    frontend_limits(&routes, haproxy, report);
    plan.defaults = defaults(&routes, &haproxy.last_defaults, report);
    plan.default_server = default_server(&routes, report);
    plan.stats = stats(haproxy, report);
    plan
}

/// The bound frontends and listens with the backend each routes to; backends no one routes to
/// are reported.
fn routes<'h>(haproxy: &'h Haproxy, report: &mut Report) -> Vec<Route<'h>> {
    let mut routes = Vec::new();
    let mut used = HashSet::new();
    let backend_named = |name: &str| {
        haproxy.proxies.iter().find(|p| {
            p.name == name && matches!(p.kind, SectionKind::Backend | SectionKind::Listen)
        })
    };
    for proxy in &haproxy.proxies {
        if proxy.kind == SectionKind::Backend {
            continue;
        }
        if proxy.binds.is_empty() {
            if proxy.kind == SectionKind::Frontend {
                report.unsupported(
                    proxy.header.line,
                    &proxy.header.text,
                    "a frontend without a bind",
                );
            }
            continue;
        }
        let backend = match &proxy.backend {
            Some(name) => match backend_named(&name.value) {
                Some(b) => b,
                None => {
                    report.unsupported(name.line, &name.text, "no backend of that name");
                    continue;
                }
            },
            None if !proxy.servers.is_empty() => proxy,
            None => {
                report.unsupported(
                    proxy.header.line,
                    &proxy.header.text,
                    "no servers and no default_backend: nothing to route to",
                );
                continue;
            }
        };
        used.insert(backend.name.as_str());
        routes.push(Route {
            frontend: proxy,
            backend,
        });
    }
    for proxy in &haproxy.proxies {
        let unbound = proxy.kind == SectionKind::Backend
            || (proxy.kind == SectionKind::Listen && proxy.binds.is_empty());
        if unbound && !used.contains(proxy.name.as_str()) {
            let why = "no bound frontend or listen routes to it; its servers are not carried";
            report.unsupported(proxy.header.line, &proxy.header.text, why);
            for s in &proxy.servers {
                report.unsupported(s.directive.line, &s.directive.text, why);
            }
        }
    }
    routes
}

/// A listener for each bind of the route's frontend (patroxy listeners bind one address).
fn listeners(route: &Route, haproxy: &Haproxy, plan: &mut Plan, report: &mut Report) {
    let backend = route.backend;
    let servers = members(backend, report);
    let mut names = Vec::new();
    for server in &servers {
        names.push(define_server(server, backend, plan, report));
    }
    let check = check(backend, &servers, haproxy, report);
    for (i, bind) in route.frontend.binds.iter().enumerate() {
        let name = match i {
            0 => route.frontend.name.clone(),
            _ => {
                let name = format!("{}_{}", route.frontend.name, i + 1);
                report.approximated(
                    bind.line,
                    &bind.value,
                    format!(
                        "a listener of its own, `{name}` (a patroxy listener binds one address)"
                    ),
                );
                name
            }
        };
        plan.listeners.push(PlanListener {
            name,
            header: At::new(String::new(), &route.frontend.header),
            bind: bind.clone(),
            balance: backend.settings.balance.clone(),
            servers: names.clone(),
            check: check.as_ref().map(PlanCheck::clone_shallow),
        });
    }
}

impl PlanCheck {
    fn clone_shallow(&self) -> PlanCheck {
        PlanCheck {
            origin: self.origin.clone(),
            method: self.method,
            path: self.path.clone(),
            expect_status: self.expect_status.clone(),
            tls: self.tls.as_ref().map(|t| PlanTls {
                ca_file: t.ca_file.clone(),
                client_cert: t.client_cert.clone(),
            }),
        }
    }
}

/// The servers that carry traffic: backups are left out, unequal weights reported.
fn members<'p>(backend: &'p Proxy, report: &mut Report) -> Vec<&'p Server> {
    let mut members = Vec::new();
    for s in &backend.servers {
        if let Some(backup) = s.options.backup.as_ref().filter(|b| b.value) {
            report.unsupported(
                backup.line,
                format!("server {} ... backup", s.name),
                "patroxy has no backup servers; left out of the listener (list it in `servers` to make it a regular one)",
            );
        } else {
            members.push(s);
        }
    }
    let weights: HashSet<u32> = members
        .iter()
        .map(|s| s.options.weight.as_ref().map_or(1, |w| w.value))
        .collect();
    if weights.len() > 1 || weights.contains(&0) {
        for s in &members {
            if let Some(w) = &s.options.weight {
                report.unsupported(
                    w.line,
                    format!("weight {}", w.value),
                    "patroxy balances a listener's servers equally",
                );
            }
        }
    }
    members
}

/// The server's name in patroxy's `[[server]]` list: its own, unless a server of that name
/// with another address or settings is there already.
fn define_server(s: &Server, backend: &Proxy, plan: &mut Plan, report: &mut Report) -> String {
    let o = &s.options;
    let mut server = PlanServer {
        name: s.name.clone(),
        address: At::new(s.address.clone(), &s.directive),
        check_port: o.port.clone(),
        check_address: o.addr.clone(),
        maxconn: o.maxconn.clone(),
    };
    match plan.servers.iter().find(|p| p.name == server.name) {
        Some(existing) if existing.same_as(&server) => return server.name,
        Some(_) => {
            server.name = format!("{}_{}", backend.name, s.name);
            report.approximated(
                s.directive.line,
                &s.directive.text,
                format!(
                    "written as server `{}`: a server `{}` with another address or settings is defined before",
                    server.name, s.name
                ),
            );
            if plan.servers.iter().any(|p| p.name == server.name) {
                return server.name;
            }
        }
        None => {}
    }
    let name = server.name.clone();
    plan.servers.push(server);
    name
}

fn check(
    backend: &Proxy,
    servers: &[&Server],
    haproxy: &Haproxy,
    report: &mut Report,
) -> Option<PlanCheck> {
    let is_checked = |s: &&&Server| s.options.check.as_ref().is_some_and(|c| c.value);
    let checked: Vec<&&Server> = servers.iter().filter(is_checked).collect();
    let first = checked.first()?;
    for s in servers.iter().filter(|s| !is_checked(s)) {
        report.approximated(
            s.directive.line,
            &s.directive.text,
            "checked like the other servers of its backend (a patroxy listener checks all its servers or none)",
        );
    }
    let settings: &Settings = &backend.settings;
    let Some(httpchk) = &settings.httpchk else {
        report.unsupported(
            first.directive.line,
            &first.directive.text,
            "a TCP check (no `option httpchk`): patroxy checks Patroni's REST API; written without a check, so the servers are always UP",
        );
        return None;
    };
    let send = settings.check_send.as_ref().map(|s| &s.value);
    let method = send
        .and_then(|s| s.method.clone())
        .or_else(|| httpchk.value.method.clone())
        .unwrap_or_else(|| "OPTIONS".into());
    let method = match method.to_ascii_uppercase().as_str() {
        "GET" => "GET",
        "HEAD" => "HEAD",
        "OPTIONS" => "OPTIONS",
        _ => {
            let at = settings
                .check_send
                .as_ref()
                .map_or(httpchk.line, |s| s.line);
            report.approximated(
                at,
                method.clone(),
                "method = \"GET\": patroxy's check sends GET, HEAD or OPTIONS",
            );
            "GET"
        }
    };
    let path = send
        .and_then(|s| s.uri.clone())
        .or_else(|| httpchk.value.uri.clone())
        .unwrap_or_else(|| "/".into());
    Some(PlanCheck {
        origin: httpchk.map(|_| ()),
        method,
        path,
        expect_status: settings.expect_status.clone(),
        tls: tls(&checked, haproxy, report),
    })
}

/// https checks: `check-ssl` with `ca-file` (and `crt`), the same for all of a backend's servers.
fn tls(checked: &[&&Server], haproxy: &Haproxy, report: &mut Report) -> Option<PlanTls> {
    let is_tls = |s: &&&Server| s.options.check_ssl.as_ref().is_some_and(|c| c.value);
    let first = checked.iter().find(|s| is_tls(s))?;
    for s in checked.iter().filter(|s| !is_tls(s)) {
        report.approximated(
            s.directive.line,
            &s.directive.text,
            "checked over https like the others (patroxy's check TLS is per listener)",
        );
    }
    let Some(ca) = &first.options.ca_file else {
        report.unsupported(
            first.directive.line,
            &first.directive.text,
            "check-ssl without ca-file: patroxy verifies the check's certificate against a CA file",
        );
        return None;
    };
    for s in checked.iter().filter(|s| is_tls(s)) {
        let ca_of = |s: &Server| s.options.ca_file.as_ref().map(|c| c.value.clone());
        let crt_of = |s: &Server| s.options.crt.as_ref().map(|c| c.value.clone());
        if ca_of(s) != ca_of(first) || crt_of(s) != crt_of(first) {
            report.approximated(
                s.directive.line,
                &s.directive.text,
                format!(
                    "checked with the CA file and certificate of server {} (patroxy's check TLS is per listener)",
                    first.name
                ),
            );
        }
    }
    let based = |a: &At<String>| {
        let mut a = a.clone();
        if let Some(base) = haproxy
            .ca_base
            .as_ref()
            .filter(|_| !a.value.starts_with('/'))
        {
            a.value = format!("{}/{}", base.value.trim_end_matches('/'), a.value);
        }
        a
    };
    Some(PlanTls {
        ca_file: based(ca),
        client_cert: first.options.crt.clone(),
    })
}

/// A frontend's own `maxconn` has no patroxy equivalent unless the global one is lower anyway.
fn frontend_limits(routes: &[Route], haproxy: &Haproxy, report: &mut Report) {
    let global = haproxy.maxconn.as_ref().map(|m| m.value);
    let mut seen = HashSet::new();
    for route in routes {
        if let Some(m) = &route.frontend.settings.maxconn
            && global.is_none_or(|g| m.value < g)
            && seen.insert(m.line)
        {
            report.approximated(
                m.line,
                &m.text,
                "patroxy limits sessions across all listeners only ([global] maxconn)",
            );
        }
    }
}

/// Picks the value most listeners (or servers) have, reporting each that had another: patroxy
/// keeps it once for all of them. `None` stands for HAProxy's default.
struct Chooser<'r> {
    report: &'r mut Report,
    scope: &'static str,
}

impl Chooser<'_> {
    fn choose<T: Clone, K: PartialEq>(
        &mut self,
        what: &str,
        candidates: Vec<(Option<At<T>>, &At<String>)>,
        key: impl Fn(&T) -> K,
        show: impl Fn(Option<&T>) -> String,
    ) -> Option<At<T>> {
        let k = |c: &Option<At<T>>| c.as_ref().map(|a| key(&a.value));
        let count = |c: &Option<At<T>>| candidates.iter().filter(|(o, _)| k(o) == k(c)).count();
        let chosen = candidates
            .iter()
            .rev()
            .map(|(c, _)| c)
            .max_by_key(|c| count(c))
            .cloned()
            .flatten();
        let chosen_key = k(&chosen);
        let mut reported = HashSet::new();
        for (c, owner) in &candidates {
            if k(c) == chosen_key {
                continue;
            }
            let (line, text) = match c {
                Some(a) => (a.line, a.text.clone()),
                None => (owner.line, owner.text.clone()),
            };
            if reported.insert(line) {
                let chosen_shown = show(chosen.as_ref().map(|a| &a.value));
                self.report.approximated(
                    line,
                    text,
                    format!(
                        "{what} = {chosen_shown} (not {}): patroxy has one {what} for all {}",
                        show(c.as_ref().map(|a| &a.value)),
                        self.scope
                    ),
                );
            }
        }
        chosen
    }
}

impl Chooser<'_> {
    /// A timeout patroxy requires: HAProxy's "forever" when the file has none.
    fn required(
        &mut self,
        chosen: Option<At<Time>>,
        what: &str,
        owner: &At<String>,
    ) -> Option<At<Time>> {
        if chosen.is_none() {
            self.report.approximated(
                owner.line.max(1),
                what,
                format!(
                    "not set (HAProxy then waits forever): written as {} ms, the longest patroxy takes",
                    MAX_TIME.as_millis()
                ),
            );
        }
        chosen
    }
}

fn time_key(t: &Time) -> std::time::Duration {
    t.value
}

fn show_time(default: &'static str) -> impl Fn(Option<&Time>) -> String {
    move |t| t.map_or_else(|| default.to_owned(), |t| t.toml.clone())
}

fn defaults(routes: &[Route], last: &Settings, report: &mut Report) -> Defaults {
    let owner: Vec<At<String>> = routes
        .iter()
        .map(|r| At::new(String::new(), &r.frontend.header))
        .collect();
    let from = |f: &dyn Fn(&Route) -> Settings| -> Vec<Settings> { routes.iter().map(f).collect() };
    // Without any listener the last defaults section says what there is to say.
    let (front, back) = if routes.is_empty() {
        (vec![last.clone()], vec![last.clone()])
    } else {
        (
            from(&|r| r.frontend.settings.clone()),
            from(&|r| r.backend.settings.clone()),
        )
    };
    let none = At {
        value: String::new(),
        line: 0,
        text: String::new(),
    };
    let owner_of = |i: usize| owner.get(i).unwrap_or(&none);
    let mut c = Chooser {
        report,
        scope: "listeners",
    };
    macro_rules! pick_time {
        ($settings:expr, $field:ident, $default:expr) => {
            c.choose(
                stringify!($field),
                $settings
                    .iter()
                    .enumerate()
                    .map(|(i, s)| (s.$field.clone(), owner_of(i)))
                    .collect(),
                time_key,
                show_time($default),
            )
        };
    }
    let timeout_client = pick_time!(front, timeout_client, "unset");
    let timeout_client = c.required(timeout_client, "timeout client", owner_of(0));
    let timeout_server = pick_time!(back, timeout_server, "unset");
    let timeout_server = c.required(timeout_server, "timeout server", owner_of(0));
    let timeout_connect = pick_time!(back, timeout_connect, "unset");
    let timeout_connect = c.required(timeout_connect, "timeout connect", owner_of(0));
    Defaults {
        timeout_client,
        timeout_server,
        timeout_connect,
        timeout_check: pick_time!(back, timeout_check, "unset"),
        timeout_queue: pick_time!(back, timeout_queue, "timeout_connect"),
        retries: c.choose(
            "retries",
            back.iter()
                .enumerate()
                .map(|(i, s)| (s.retries.clone(), owner_of(i)))
                .collect(),
            |n| *n,
            |n| n.map_or("3".into(), u32::to_string),
        ),
        redispatch: c.choose(
            "redispatch",
            back.iter()
                .enumerate()
                .map(|(i, s)| (s.redispatch.clone(), owner_of(i)))
                .collect(),
            |b| *b,
            |b| b.copied().unwrap_or(false).to_string(),
        ),
    }
}

fn default_server(routes: &[Route], report: &mut Report) -> DefaultServer {
    let mut all = Vec::new();
    let mut checked = Vec::new();
    for route in routes {
        for s in &route.backend.servers {
            let owner = At::new(String::new(), &s.directive);
            if s.options.check.as_ref().is_some_and(|c| c.value) {
                checked.push((&s.options, owner.clone()));
            }
            all.push((&s.options, owner));
        }
    }
    let mut c = Chooser {
        report,
        scope: "servers",
    };
    macro_rules! pick {
        ($list:expr, $field:ident, $key:expr, $show:expr) => {
            c.choose(
                stringify!($field),
                $list
                    .iter()
                    .map(|(o, owner)| (o.$field.clone(), owner))
                    .collect(),
                $key,
                $show,
            )
        };
    }
    let word = |default: &'static str| {
        move |w: Option<&&'static str>| format!("\"{}\"", w.copied().unwrap_or(default))
    };
    DefaultServer {
        inter: pick!(checked, inter, time_key, show_time("\"1s\"")),
        fastinter: pick!(checked, fastinter, time_key, show_time("min(250ms, inter)")),
        downinter: pick!(checked, downinter, time_key, show_time("inter")),
        rise: pick!(checked, rise, |n: &u32| *n, |n: Option<&u32>| n
            .map_or("2".into(), u32::to_string)),
        fall: pick!(checked, fall, |n: &u32| *n, |n: Option<&u32>| n
            .map_or("3".into(), u32::to_string)),
        on_marked_down: pick!(all, on_marked_down, |w: &&str| *w, word("none")),
        on_marked_up: pick!(all, on_marked_up, |w: &&str| *w, word("none")),
        init_state: pick!(checked, init_state, |w: &&str| *w, word("down")),
    }
}

fn stats(haproxy: &Haproxy, report: &mut Report) -> Option<PlanStats> {
    let s = haproxy.stats.as_ref()?;
    let Some(bind) = s.binds.first() else {
        if let Some(h) = &s.header {
            report.unsupported(h.line, &h.text, "a stats proxy without a bind");
        }
        return None;
    };
    for extra in &s.binds[1..] {
        report.unsupported(
            extra.line,
            &extra.value,
            "patroxy's stats server binds one address",
        );
    }
    Some(PlanStats {
        bind: bind.clone(),
        refresh: s.refresh.clone(),
        admin: s.admin.clone(),
        maxconn: s.maxconn.clone(),
    })
}
