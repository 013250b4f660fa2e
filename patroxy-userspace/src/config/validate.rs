//! Raw TOML values -> the typed `Config`, in one pass over a borrowed `RawConfig` (never mutated).
//! Every problem is recorded with the position of the offending value and the pass goes on, so
//! one run reports all mistakes; the built `Config` is thrown away if any were found.
use std::{collections::HashMap, net::SocketAddr, ops::Range, path::PathBuf, time::Duration};

use toml::Spanned;

use super::addr::{binds_overlap, parse_bind, resolve_address, resolve_check_host};
use super::duration::Dur;
use super::error::{Diagnostic, Source};
use super::model::*;
use super::raw::*;
use super::{admin_token::AdminToken, allow, owner, tls};

#[path = "validate_dcs.rs"]
mod dcs;
#[path = "validate_tc.rs"]
mod tc;

/// Check paths whose 200 means "this is the writable node": listeners checking them default to
/// `balance first`, since there is one primary and spreading writes makes no sense.
pub(crate) const WRITE_PATHS: &[&str] = &["/primary", "/master", "/leader", "/read-write", "/"];

/// Highest `bpf_log_rate`: past a few thousand lines a second per CPU the log is no longer
/// readable and printing it costs more than the forwarding it describes.
const MAX_BPF_LOG_RATE: u32 = 10_000;

/// Most connect `retries`. Each waits a turn-around of up to a second, so a hundred already hold
/// a client for minutes (and 2^32-1 overflowed the session's count of attempts).
const MAX_RETRIES: u32 = 100;
/// CancelRequests per second passed on, all clients together: each opens a connection on up to
/// every server of its listener, so 200 a second keeps a flood to a few hundred forks a second
/// per server, far below what PostgreSQL's postmaster takes, while no real workload cancels
/// that often.
const DEFAULT_CANCEL_RATE: u32 = 200;
/// CancelRequests per second from one client address: a driver cancelling every statement of
/// a busy application still fits, a single host's flood does not take the whole budget.
const DEFAULT_CANCEL_RATE_PER_CLIENT: u32 = 20;

/// Shortest check interval (`inter`, `fastinter`, `downinter`). Every check costs Patroni a
/// request and a PostgreSQL query, and a bare number is milliseconds (`inter = 3` is 3 ms, not
/// 3 s), so a few milliseconds is a mistake; 50 ms still finds a new primary within a blink.
pub(crate) const MIN_CHECK_INTERVAL: Duration = Duration::from_millis(50);
/// `inter` when unset: 1 s (HAProxy: 2 s). A demoted primary's 503 is seen within one `inter`,
/// which bounds a switchover's share of the proxy; a check a second costs Patroni next to
/// nothing, and without `timeout_check` a check may take up to `inter`, which a busy Patroni
/// still meets.
pub(crate) const DEFAULT_INTER: Duration = Duration::from_secs(1);
/// `fastinter` when unset: 250 ms, or `inter` when that is shorter (HAProxy: `inter`). It
/// paces the checks while a server changes state and while a listener has no UP server, so a
/// new primary is UP `rise` × 250 ms after its first 200; `fall` failures in a row still take
/// a primary down, so one slow answer never flaps it.
pub(crate) const DEFAULT_FASTINTER: Duration = Duration::from_millis(250);
/// Shortest timeout: below it a connect, a check's answer or an idle session fails on ordinary
/// scheduling delay, and a bare number meant as seconds (`timeout_connect = 4`) is caught.
const MIN_TIMEOUT: Duration = Duration::from_millis(100);
/// Shortest stats `refresh`: the page reloads itself in whole seconds.
const MIN_REFRESH: Duration = Duration::from_secs(1);

/// Stats connections served at once unless `[stats] maxconn` says otherwise: plenty for a few
/// scrapers and browsers.
const DEFAULT_STATS_MAXCONN: u32 = 64;

/// Highest `[stats] maxconn`: the stats server is for operators and scrapers, and each of its
/// connections takes a file descriptor the proxy's sessions could use.
const MAX_STATS_MAXCONN: u32 = 1024;

/// Where `[runtime]` puts its socket unless `socket` says otherwise: systemd's
/// `RuntimeDirectory=patroxy` makes /run/patroxy.
const DEFAULT_RUNTIME_SOCKET: &str = "/run/patroxy/patroxy.sock";

/// The runtime socket's mode unless `mode` says otherwise: its owner and group may connect.
const DEFAULT_RUNTIME_MODE: u32 = 0o660;

/// Runtime socket connections served at once unless `[runtime] maxconn` says otherwise, and the
/// most it may say: the socket is for a few operators and scripts.
const DEFAULT_RUNTIME_MAXCONN: u32 = 8;
const MAX_RUNTIME_MAXCONN: u32 = 64;

/// The longest unix socket path: `sun_path` holds 108 bytes with the closing NUL.
const MAX_SOCKET_PATH: usize = 107;

/// libpq sends its first message (startup or SSLRequest) as soon as TCP connects, so 10 s
/// never cuts off a real client, and a silent one holds a global permit for no longer.
const DEFAULT_TIMEOUT_STARTUP: Duration = Duration::from_secs(10);

pub(crate) fn validate(raw: &RawConfig, src: &Source) -> Result<Config, Vec<Diagnostic>> {
    let mut v = Validator {
        src,
        diags: Vec::new(),
        binds: Vec::new(),
    };
    let config = v.config(raw);
    if v.diags.is_empty() {
        Ok(config)
    } else {
        v.diags.sort_by_key(|d| (d.line, d.column));
        Err(v.diags)
    }
}

struct Validator<'a> {
    src: &'a Source<'a>,
    diags: Vec<Diagnostic>,
    /// Binds accepted so far, with who owns them, to report the earlier one on a conflict.
    binds: Vec<(SocketAddr, String, Range<usize>)>,
}

impl Validator<'_> {
    fn error(&mut self, span: Range<usize>, message: impl Into<String>) {
        self.diags.push(self.src.diagnostic(span, message));
    }

    fn at(&self, span: &Range<usize>) -> String {
        let (line, column) = self.src.position(span.start);
        format!("{line}:{column}")
    }

    fn config(&mut self, raw: &RawConfig) -> Config {
        let global = self.global(&raw.global, raw.tc.as_ref());
        let defaults = self.defaults(&raw.defaults);
        let servers = self.servers(raw);
        let listeners: Vec<Listener> = raw
            .listener
            .iter()
            .map(|l| self.listener(l, &servers))
            .collect();
        if raw.listener.is_empty() {
            self.error(0..0, "no [[listener]] defined; patroxy needs at least one");
        }
        let mut seen: HashMap<&str, Range<usize>> = HashMap::new();
        for l in &raw.listener {
            if let Some(first) = seen.insert(l.name.get_ref(), l.name.span()) {
                let msg = format!(
                    "listener {:?} is defined twice (first at {})",
                    l.name.get_ref(),
                    self.at(&first)
                );
                self.error(l.name.span(), msg);
            }
        }
        let stats = raw.stats.as_ref().map(|s| Stats {
            bind: self.bind(&s.bind, "[stats]".to_string()),
            refresh: s.refresh.as_ref().map_or(Duration::from_secs(5), |d| {
                self.duration(d, "refresh", MIN_REFRESH)
            }),
            admin: match s.admin.unwrap_or(RawAdminAccess::Local) {
                RawAdminAccess::Off => AdminAccess::Off,
                RawAdminAccess::Local => AdminAccess::Local,
                RawAdminAccess::Any => AdminAccess::Any,
            },
            maxconn: s.maxconn.as_ref().map_or(DEFAULT_STATS_MAXCONN, |m| {
                if !(1..=MAX_STATS_MAXCONN).contains(m.get_ref()) {
                    self.error(
                        m.span(),
                        format!("stats maxconn must be 1..={MAX_STATS_MAXCONN}"),
                    );
                }
                *m.get_ref()
            }),
            admin_token: s
                .admin_auth_file
                .as_ref()
                .and_then(|f| self.admin_token(s, f)),
        });
        let runtime = raw.runtime.as_ref().map(|r| self.runtime(r));
        let (firewall, diags) = allow::firewall(
            &raw.allow,
            raw.xdp.as_ref(),
            &listeners,
            stats.as_ref(),
            self.src,
        );
        self.diags.extend(diags);
        let dcs = raw.dcs.as_ref().map(|d| self.dcs(d));
        Config {
            global,
            defaults,
            listeners,
            stats,
            runtime,
            firewall,
            dcs,
        }
    }

    /// The token of `admin_auth_file`, read now so `check-config` refuses what `run` would.
    fn admin_token(&mut self, stats: &RawStats, file: &Spanned<PathBuf>) -> Option<AdminToken> {
        if matches!(stats.admin, Some(RawAdminAccess::Off)) {
            self.error(
                file.span(),
                "admin_auth_file is set but admin = \"off\" refuses every admin request",
            );
        }
        AdminToken::read(file.get_ref())
            .map_err(|e| self.error(file.span(), e.to_string()))
            .ok()
    }

    fn runtime(&mut self, raw: &RawRuntime) -> Runtime {
        let socket = match &raw.socket {
            None => PathBuf::from(DEFAULT_RUNTIME_SOCKET),
            Some(p) => {
                let path = p.get_ref();
                if !path.is_absolute() || path.file_name().is_none() {
                    self.error(
                        p.span(),
                        format!("runtime socket {path:?} must be an absolute file path"),
                    );
                } else if path.as_os_str().len() > MAX_SOCKET_PATH {
                    self.error(
                        p.span(),
                        format!("runtime socket {path:?} is longer than a unix socket path may be ({MAX_SOCKET_PATH} bytes)"),
                    );
                }
                path.clone()
            }
        };
        let mode = raw.mode.as_ref().map_or(DEFAULT_RUNTIME_MODE, |m| {
            match u32::from_str_radix(m.get_ref(), 8) {
                Ok(mode) if mode <= 0o777 => mode,
                _ => {
                    self.error(
                        m.span(),
                        format!(
                            "runtime mode {:?} must be octal permission bits such as \"0660\"",
                            m.get_ref()
                        ),
                    );
                    DEFAULT_RUNTIME_MODE
                }
            }
        });
        let mut id = |name: &Option<Spanned<String>>, resolve: fn(&str) -> Result<u32, String>| {
            name.as_ref().and_then(|n| {
                resolve(n.get_ref())
                    .map_err(|e| self.error(n.span(), format!("runtime socket: {e}")))
                    .ok()
            })
        };
        let uid = id(&raw.user, owner::user_id);
        let gid = id(&raw.group, owner::group_id);
        Runtime {
            socket,
            mode,
            uid,
            gid,
            maxconn: raw.maxconn.as_ref().map_or(DEFAULT_RUNTIME_MAXCONN, |m| {
                if !(1..=MAX_RUNTIME_MAXCONN).contains(m.get_ref()) {
                    self.error(
                        m.span(),
                        format!("runtime maxconn must be 1..={MAX_RUNTIME_MAXCONN}"),
                    );
                }
                *m.get_ref()
            }),
        }
    }

    fn global(&mut self, raw: &RawGlobal, tc: Option<&RawTc>) -> Global {
        let pin_path = match &raw.pin_path {
            None => PathBuf::from("/sys/fs/bpf/patroxy"),
            Some(p) => {
                if !p.get_ref().is_absolute() {
                    self.error(
                        p.span(),
                        format!("pin_path {:?} must be an absolute path", p.get_ref()),
                    );
                }
                p.get_ref().clone()
            }
        };
        let bpf = match raw.bpf.as_ref().map_or(RawBpf::Auto, |b| *b.get_ref()) {
            RawBpf::Auto => BpfMode::Auto,
            RawBpf::Required => BpfMode::Required,
            RawBpf::Off => BpfMode::Off,
        };
        // Only "required" refuses to start without the maps pinned. "auto" falls back to the
        // userspace path with a log line saying why, which is what it is for (one file may
        // serve hosts with and without bpffs), so there a missing directory is not an error.
        if bpf == BpfMode::Required
            && pin_path.is_absolute()
            && let Some(problem) = pin_parent_problem(&pin_path)
        {
            let span = match (&raw.pin_path, &raw.bpf) {
                (Some(p), _) => p.span(),
                (None, Some(b)) => b.span(),
                (None, None) => 0..0,
            };
            self.error(
                span,
                format!(
                    "pin_path {pin_path:?}: {problem}, and bpf = \"required\" pins the maps there"
                ),
            );
        }
        let bpf_log = raw.bpf_log.as_ref().is_some_and(|b| *b.get_ref());
        if let Some(b) = &raw.bpf_log
            && bpf_log
            && bpf == BpfMode::Off
        {
            self.error(
                b.span(),
                "bpf_log = true needs the eBPF data path, but bpf = \"off\"",
            );
        }
        let datapath = self.datapath(raw, tc, bpf);
        Global {
            datapath,
            maxconn: raw
                .maxconn
                .as_ref()
                .map_or(2000, |m| self.nonzero(m, "global maxconn")),
            bpf,
            pin_path,
            bpf_log,
            bpf_log_rate: raw.bpf_log_rate.as_ref().map_or(100, |r| {
                if !(1..=MAX_BPF_LOG_RATE).contains(r.get_ref()) {
                    self.error(
                        r.span(),
                        format!("bpf_log_rate must be 1..={MAX_BPF_LOG_RATE} lines per second"),
                    );
                }
                *r.get_ref()
            }),
            session_log_rate: raw
                .session_log_rate
                .as_ref()
                .map_or(100, |r| self.nonzero(r, "session_log_rate")),
            cancel_rate: raw
                .cancel_rate
                .as_ref()
                .map_or(DEFAULT_CANCEL_RATE, |r| self.nonzero(r, "cancel_rate")),
            cancel_rate_per_client: raw
                .cancel_rate_per_client
                .as_ref()
                .map_or(DEFAULT_CANCEL_RATE_PER_CLIENT, |r| {
                    self.nonzero(r, "cancel_rate_per_client")
                }),
        }
    }

    fn defaults(&mut self, raw: &RawDefaults) -> Defaults {
        let mut timeout = |d: &Spanned<Dur>, what: &str| self.duration(d, what, MIN_TIMEOUT);
        let timeout_client = timeout(&raw.timeout_client, "timeout_client");
        let timeout_server = timeout(&raw.timeout_server, "timeout_server");
        let timeout_connect = timeout(&raw.timeout_connect, "timeout_connect");
        let timeout_check = raw
            .timeout_check
            .as_ref()
            .map(|d| timeout(d, "timeout_check"));
        let timeout_queue = raw
            .timeout_queue
            .as_ref()
            .map_or(timeout_connect, |d| timeout(d, "timeout_queue"));
        Defaults {
            retries: raw.retries.as_ref().map_or(3, |r| {
                if *r.get_ref() > MAX_RETRIES {
                    self.error(r.span(), format!("retries must be at most {MAX_RETRIES}"));
                }
                *r.get_ref()
            }),
            redispatch: raw.redispatch.unwrap_or(false),
            timeout_client,
            timeout_server,
            timeout_connect,
            timeout_check,
            timeout_queue,
            timeout_startup: raw
                .timeout_startup
                .as_ref()
                .map_or(DEFAULT_TIMEOUT_STARTUP, |d| {
                    self.duration(d, "timeout_startup", MIN_TIMEOUT)
                }),
        }
    }

    /// Every `[[server]]` with `[default_server]` merged in, by name.
    fn servers<'r>(&mut self, raw: &'r RawConfig) -> HashMap<&'r str, ServerSpec> {
        let ds = &raw.default_server;
        let mut interval =
            |d: &Spanned<Dur>, what: &str| self.duration(d, what, MIN_CHECK_INTERVAL);
        let inter = ds
            .inter
            .as_ref()
            .map_or(DEFAULT_INTER, |d| interval(d, "inter"));
        let fastinter = ds
            .fastinter
            .as_ref()
            .map_or(DEFAULT_FASTINTER.min(inter), |d| interval(d, "fastinter"));
        let downinter = ds
            .downinter
            .as_ref()
            .map_or(inter, |d| interval(d, "downinter"));
        let timing = CheckTiming {
            inter,
            fastinter,
            downinter,
            fall: ds.fall.as_ref().map_or(3, |n| self.nonzero(n, "fall")),
            rise: ds.rise.as_ref().map_or(2, |n| self.nonzero(n, "rise")),
        };
        let default_maxconn = ds
            .maxconn
            .as_ref()
            .map(|m| self.nonzero(m, "default_server maxconn"));
        let default_check_port = ds.check_port.as_ref().map(|p| self.port(p));
        let on_marked_down = match ds.on_marked_down.unwrap_or(RawOnMarkedDown::Nothing) {
            RawOnMarkedDown::ShutdownSessions => OnMarkedDown::ShutdownSessions,
            RawOnMarkedDown::Nothing => OnMarkedDown::Nothing,
        };
        let on_marked_up = match ds.on_marked_up.unwrap_or(RawOnMarkedUp::Nothing) {
            RawOnMarkedUp::ShutdownBackupSessions => OnMarkedUp::ShutdownBackupSessions,
            RawOnMarkedUp::Nothing => OnMarkedUp::Nothing,
        };
        let init_state = match ds.init_state.unwrap_or(RawInitState::Down) {
            RawInitState::Down => InitState::Down,
            RawInitState::Up => InitState::Up,
        };

        let mut specs = HashMap::new();
        let mut first_at: HashMap<&str, Range<usize>> = HashMap::new();
        for s in &raw.server {
            let name = s.name.get_ref().as_str();
            self.name(&s.name, "server");
            if let Some(first) = first_at.get(name) {
                let msg = format!(
                    "server {name:?} is defined twice (first at {})",
                    self.at(first)
                );
                self.error(s.name.span(), msg);
                continue;
            }
            first_at.insert(name, s.name.span());
            let address = resolve_address(s.address.get_ref())
                .unwrap_or_else(|e| self.fallback(s.address.span(), e));
            let check_port = match &s.check_port {
                Some(p) => self.port(p),
                None => default_check_port.unwrap_or(address.port()),
            };
            let check_ip = match &s.check_address {
                None => address.ip(),
                Some(h) => resolve_check_host(h.get_ref(), check_port)
                    .unwrap_or_else(|e| self.fallback(h.span(), e).ip()),
            };
            let maxconn = match &s.maxconn {
                Some(m) => Some(self.nonzero(m, "server maxconn")),
                None => default_maxconn,
            };
            let spec = ServerSpec {
                name: name.to_string(),
                address,
                check_addr: SocketAddr::new(check_ip, check_port),
                maxconn,
                timing,
                on_marked_down,
                on_marked_up,
                init_state,
            };
            specs.insert(name, spec);
        }
        specs
    }

    fn listener(&mut self, raw: &RawListener, servers: &HashMap<&str, ServerSpec>) -> Listener {
        let name = raw.name.get_ref();
        self.name(&raw.name, "listener");
        let bind = self.bind(&raw.bind, format!("listener {name:?}"));
        let check = raw.check.as_ref().map(|c| self.check(c));
        let balance = match raw.balance {
            Some(RawBalance::First) => Balance::First,
            Some(RawBalance::RoundRobin) => Balance::RoundRobin,
            Some(RawBalance::LeastConn) => Balance::LeastConn,
            None => match &check {
                Some(c) if WRITE_PATHS.contains(&c.path.split('?').next().unwrap_or("")) => {
                    Balance::First
                }
                _ => Balance::RoundRobin,
            },
        };
        if raw.servers.get_ref().is_empty() {
            self.error(
                raw.servers.span(),
                format!("listener {name:?} has no servers"),
            );
        }
        let mut listed: HashMap<&str, Range<usize>> = HashMap::new();
        let mut specs = Vec::new();
        for s in raw.servers.get_ref() {
            let server = s.get_ref().as_str();
            if let Some(first) = listed.insert(server, s.span()) {
                let msg = format!(
                    "listener {name:?} lists server {server:?} twice (first at {})",
                    self.at(&first)
                );
                self.error(s.span(), msg);
            } else if let Some(spec) = servers.get(server) {
                specs.push(spec.clone());
            } else {
                let msg = format!(
                    "listener {name:?} names server {server:?}, which no [[server]] defines"
                );
                self.error(s.span(), msg);
            }
        }
        Listener {
            name: name.clone(),
            bind,
            balance,
            check,
            servers: specs,
        }
    }

    fn check(&mut self, raw: &RawCheck) -> HealthCheck {
        let path = raw.path.get_ref();
        if !path.starts_with('/') {
            self.error(
                raw.path.span(),
                format!("check path {path:?} must start with '/'"),
            );
        } else if path.contains(|c: char| c.is_whitespace() || c.is_control()) {
            self.error(
                raw.path.span(),
                format!("check path {path:?} must not contain spaces or control characters"),
            );
        }
        let expect_status = match &raw.expect_status {
            None => 200,
            Some(s) => {
                if !(100..=599).contains(s.get_ref()) {
                    self.error(
                        s.span(),
                        format!(
                            "expect_status {} is not an HTTP status (100..=599)",
                            s.get_ref()
                        ),
                    );
                }
                *s.get_ref()
            }
        };
        let tls = raw.tls.as_ref().map(|t| {
            let t = t.get_ref();
            match (&t.client_cert, &t.client_key) {
                (Some(cert), None) => self.error(
                    cert.span(),
                    "tls client_cert is set but client_key is not; set both or neither",
                ),
                (None, Some(key)) => self.error(
                    key.span(),
                    "tls client_key is set but client_cert is not; set both or neither",
                ),
                _ => {}
            }
            self.tls_files(t);
            CheckTls {
                ca_file: t.ca_file.get_ref().clone(),
                client_cert: t.client_cert.as_ref().map(|c| c.get_ref().clone()),
                client_key: t.client_key.as_ref().map(|k| k.get_ref().clone()),
            }
        });
        HealthCheck {
            method: match raw.method.unwrap_or(RawMethod::Get) {
                RawMethod::Get => CheckMethod::Get,
                RawMethod::Head => CheckMethod::Head,
                RawMethod::Options => CheckMethod::Options,
            },
            path: path.clone(),
            expect_status,
            tls,
            authoritative: raw.authoritative.unwrap_or(true),
        }
    }

    /// Reads the TLS files as the checker will, reporting each problem at the setting naming
    /// the file: a check that cannot load them would stop `run` (or fail every check).
    fn tls_files(&mut self, raw: &RawTls) {
        if let Err(e) = tls::ca_certificates(raw.ca_file.get_ref()) {
            self.error(raw.ca_file.span(), e.to_string());
        }
        if let (Some(cert), Some(key)) = (&raw.client_cert, &raw.client_key)
            && let Err(e) = tls::identity(cert.get_ref(), key.get_ref())
        {
            let span = match e.setting() {
                tls::TlsSetting::ClientCert => cert.span(),
                _ => key.span(),
            };
            self.error(span, e.to_string());
        }
    }

    /// Parses a bind and refuses one that overlaps a bind seen before (listeners, then stats).
    fn bind(&mut self, raw: &Spanned<String>, owner: String) -> SocketAddr {
        let addr = match parse_bind(raw.get_ref()) {
            Ok(addr) => addr,
            Err(e) => return self.fallback(raw.span(), e),
        };
        if let Some((_, other, span)) = self.binds.iter().find(|(b, ..)| binds_overlap(*b, addr)) {
            let msg = format!(
                "bind {:?} of {owner} overlaps bind of {other} at {}",
                raw.get_ref(),
                self.at(span)
            );
            self.error(raw.span(), msg);
        }
        self.binds.push((addr, owner, raw.span()));
        addr
    }

    /// Names show up in logs, stats CSV and metric labels: non-empty, no spaces or commas; and
    /// no `/`, which separates listener and server in `patroxy set-state <listener>/<server>`.
    fn name(&mut self, raw: &Spanned<String>, what: &str) {
        let name = raw.get_ref();
        if name.is_empty()
            || name.contains(|c: char| c.is_whitespace() || c.is_control() || c == ',')
        {
            self.error(
                raw.span(),
                format!("{what} name {name:?} must be non-empty without spaces or commas"),
            );
        } else if name.contains('/') {
            self.error(
                raw.span(),
                format!("{what} name {name:?} must not contain `/` (it separates listener/server)"),
            );
        }
    }

    /// A duration no shorter than `min` (the longest was bounded when it was read).
    fn duration(&mut self, raw: &Spanned<Dur>, what: &str, min: Duration) -> Duration {
        let d = raw.get_ref().0;
        if d.is_zero() {
            self.error(raw.span(), format!("{what} must be greater than zero"));
        } else if d < min {
            self.error(
                raw.span(),
                format!(
                    "{what} must be at least {}, not {} (bare numbers are milliseconds)",
                    humantime::format_duration(min),
                    humantime::format_duration(d)
                ),
            );
        }
        d
    }

    fn nonzero(&mut self, raw: &Spanned<u32>, what: &str) -> u32 {
        if *raw.get_ref() == 0 {
            self.error(raw.span(), format!("{what} must be greater than zero"));
        }
        *raw.get_ref()
    }

    fn port(&mut self, raw: &Spanned<u16>) -> u16 {
        if *raw.get_ref() == 0 {
            self.error(raw.span(), "check_port must be 1..=65535");
        }
        *raw.get_ref()
    }

    /// Records an address error and returns a placeholder; the config is discarded anyway.
    fn fallback(&mut self, span: Range<usize>, message: String) -> SocketAddr {
        self.error(span, message);
        SocketAddr::from(([0, 0, 0, 0], 0))
    }
}

/// Why the maps could not be pinned at `pin_path` for lack of its parent directory, if so.
/// Whether that directory is a mounted bpffs is the host's state at start-up (the daemon mounts
/// /sys/fs/bpf itself), so that is left to `run`.
fn pin_parent_problem(pin_path: &std::path::Path) -> Option<String> {
    match pin_path.parent() {
        None => Some("has no parent directory".into()),
        Some(parent) if !parent.exists() => {
            Some(format!("its parent directory {parent:?} does not exist"))
        }
        Some(parent) if !parent.is_dir() => {
            Some(format!("its parent {parent:?} is not a directory"))
        }
        Some(_) => None,
    }
}
