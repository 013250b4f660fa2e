//! patroxy's TOML config and HAProxy's equivalent, written from one typed description: the
//! integration tests, the cluster harness and `cargo xtask bench` build a [`ProxyConfig`]
//! instead of typing either file by hand, and the comparisons with HAProxy run both proxies on
//! the same values.
//!
//! Only what is set is written: an unset `Option` leaves the key out, so each proxy applies its
//! own default (as a hand-written file that does not mention the setting would). Tests of config
//! *parsing* keep their TOML literal, since the text is then the point.
//!
//! Durations are written as a whole number of the largest unit that fits ("30m", "4s",
//! "500ms"), a form both proxies read.
//!
//! Layout: `mod.rs` (the description and its builders), `toml.rs` (patroxy's file),
//! `haproxy.rs` (HAProxy's).

mod haproxy;
mod toml;

pub use haproxy::HaproxyLog;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// A whole config: patroxy's tables in file order.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    pub global: Global,
    pub defaults: Defaults,
    pub default_server: DefaultServer,
    pub servers: Vec<ServerConfig>,
    pub listeners: Vec<ListenerConfig>,
    pub stats: Option<StatsConfig>,
    /// patroxy only: the runtime socket (HAProxy's `stats socket` is not written).
    pub runtime: Option<RuntimeConfig>,
    /// patroxy only: `[[allow]]` rules (the seed's UFW rules; HAProxy has no equivalent).
    pub allow: Vec<AllowConfig>,
    /// patroxy only: `[xdp]`, where the allow rules are enforced.
    pub xdp: Option<XdpConfig>,
    /// patroxy only: the DCS watch of Patroni's leader key (HAProxy has none).
    pub dcs: Option<DcsConfig>,
    /// patroxy only: `datapath = "tc"` and `[tc] interfaces`, the packet-level splice.
    pub tc_interfaces: Option<Vec<String>>,
}

/// One `[[allow]]`: sources (CIDRs) and the ports or listener names they may reach.
#[derive(Clone, Debug)]
pub struct AllowConfig {
    pub from: Vec<String>,
    /// Each a port number or a listener name ("stats" for the stats bind), written as such.
    pub to: Vec<PortRef>,
}

#[derive(Clone, Debug)]
pub enum PortRef {
    Port(u16),
    Name(String),
}

impl AllowConfig {
    pub fn new(from: &[&str], to: Vec<PortRef>) -> Self {
        AllowConfig {
            from: from.iter().map(|s| s.to_string()).collect(),
            to,
        }
    }
}

/// `[xdp]`.
#[derive(Clone, Debug)]
pub struct XdpConfig {
    /// "auto" | "required" | "off"
    pub enabled: Option<Bpf>,
    pub interfaces: Vec<String>,
    /// "auto" | "native" | "generic"
    pub mode: Option<String>,
    pub syn_rate: Option<u32>,
    pub syn_burst: Option<u32>,
}

impl XdpConfig {
    pub fn required(interfaces: &[&str]) -> Self {
        XdpConfig {
            enabled: Some(Bpf::Required),
            interfaces: interfaces.iter().map(|s| s.to_string()).collect(),
            mode: None,
            syn_rate: None,
            syn_burst: None,
        }
    }
}

/// patroxy's `[dcs]`.
#[derive(Clone, Debug)]
pub struct DcsConfig {
    pub etcd: Vec<String>,
    pub scope: String,
    pub namespace: Option<String>,
    pub burst_inter: Option<Duration>,
    /// `tls = { ca_file, client_cert, client_key }`.
    pub tls: Option<DcsTls>,
    /// `user` and `password`.
    pub auth: Option<(String, String)>,
}

/// `[dcs] tls`: the CA of etcd's certificate and an optional client identity.
#[derive(Clone, Debug)]
pub struct DcsTls {
    pub ca_file: PathBuf,
    pub client: Option<(PathBuf, PathBuf)>,
}

impl DcsConfig {
    /// Patroni's default namespace, the daemon's default burst.
    pub fn new(etcd: impl Into<String>, scope: impl Into<String>) -> Self {
        DcsConfig {
            etcd: vec![etcd.into()],
            scope: scope.into(),
            namespace: None,
            burst_inter: None,
            tls: None,
            auth: None,
        }
    }

    pub fn tls(mut self, tls: DcsTls) -> Self {
        self.tls = Some(tls);
        self
    }

    pub fn auth(mut self, user: &str, password: &str) -> Self {
        self.auth = Some((user.to_owned(), password.to_owned()));
        self
    }
}

/// `[global]`.
#[derive(Clone, Debug, Default)]
pub struct Global {
    pub maxconn: Option<u32>,
    pub bpf: Option<Bpf>,
    pub pin_path: Option<PathBuf>,
    pub bpf_log: Option<bool>,
    pub bpf_log_rate: Option<u32>,
    /// patroxy only: per-client log lines a second.
    pub session_log_rate: Option<u32>,
    /// patroxy only: CancelRequests a second, in total and per client address.
    pub cancel_rate: Option<u32>,
    pub cancel_rate_per_client: Option<u32>,
}

/// `[defaults]`: the three traffic timeouts are required, as in patroxy's file.
#[derive(Clone, Debug)]
pub struct Defaults {
    pub retries: Option<u32>,
    pub timeout_client: Duration,
    pub timeout_server: Duration,
    pub timeout_connect: Duration,
    pub timeout_check: Option<Duration>,
    pub timeout_queue: Option<Duration>,
    /// patroxy only: how long a client may stay silent before its first bytes.
    pub timeout_startup: Option<Duration>,
}

/// `[default_server]` (HAProxy's `default-server` line): check timing every server inherits.
#[derive(Clone, Debug, Default)]
pub struct DefaultServer {
    pub inter: Option<Duration>,
    pub fastinter: Option<Duration>,
    pub downinter: Option<Duration>,
    pub fall: Option<u32>,
    pub rise: Option<u32>,
    pub on_marked_down: Option<OnMarkedDown>,
    pub maxconn: Option<u32>,
}

/// One `[[server]]`.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub name: String,
    pub address: SocketAddr,
    /// The Patroni REST API's port, checked on the server's IP.
    pub check_port: Option<u16>,
    pub maxconn: Option<u32>,
}

/// One `[[listener]]`, naming servers of [`ProxyConfig::servers`].
#[derive(Clone, Debug)]
pub struct ListenerConfig {
    pub name: String,
    pub bind: SocketAddr,
    pub balance: Option<Balance>,
    pub servers: Vec<String>,
    /// `None`: the servers are not checked (always UP).
    pub check: Option<CheckConfig>,
}

/// A listener's `[listener.check]` (HAProxy's `option httpchk`).
#[derive(Clone, Debug)]
pub struct CheckConfig {
    pub method: Option<Method>,
    pub path: String,
    pub expect_status: Option<u16>,
    /// Checks over HTTPS, trusting only this CA: patroxy's `tls = { ca_file }`, HAProxy's
    /// `check-ssl verify required ca-file`.
    pub ca_file: Option<PathBuf>,
}

/// `[stats]`: the stats page (and patroxy's admin endpoint).
#[derive(Clone, Debug)]
pub struct StatsConfig {
    pub bind: SocketAddr,
    pub refresh: Option<Duration>,
    /// patroxy only: HAProxy's config gets no admin line.
    pub admin: Option<AdminAccess>,
    /// patroxy only: the file holding the admin endpoint's token.
    pub admin_auth_file: Option<PathBuf>,
}

/// `[runtime]`: patroxy's runtime socket.
#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    pub socket: PathBuf,
    /// Octal, as the file writes it ("0660").
    pub mode: Option<String>,
    pub user: Option<String>,
    pub group: Option<String>,
    pub maxconn: Option<u32>,
}

/// `global.bpf`: which data path patroxy runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bpf {
    Auto,
    Required,
    Off,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Balance {
    First,
    RoundRobin,
    LeastConn,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnMarkedDown {
    ShutdownSessions,
    /// HAProxy's default: the open sessions stay.
    Nothing,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Options,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdminAccess {
    Off,
    Local,
    Any,
}

impl ProxyConfig {
    /// `defaults` and nothing else: no global settings, servers or listeners.
    pub fn new(defaults: Defaults) -> Self {
        ProxyConfig {
            global: Global::default(),
            defaults,
            default_server: DefaultServer::default(),
            servers: Vec::new(),
            listeners: Vec::new(),
            stats: None,
            runtime: None,
            allow: Vec::new(),
            xdp: None,
            dcs: None,
            tc_interfaces: None,
        }
    }

    /// The seed's settings (reference/haproxy.cfg, the shipped patroxy.toml): global maxconn
    /// 2000, [`Defaults::seed`] and [`DefaultServer::seed`]; no servers or listeners.
    pub fn seed() -> Self {
        ProxyConfig {
            global: Global {
                maxconn: Some(2000),
                ..Global::default()
            },
            default_server: DefaultServer::seed(),
            ..ProxyConfig::new(Defaults::seed())
        }
    }

    /// Sets patroxy's data path and where it pins its maps.
    pub fn data_path(mut self, bpf: Bpf, pin_path: impl Into<PathBuf>) -> Self {
        self.global.bpf = Some(bpf);
        self.global.pin_path = Some(pin_path.into());
        self
    }

    pub fn dcs(mut self, dcs: DcsConfig) -> Self {
        self.dcs = Some(dcs);
        self
    }

    pub fn default_server(mut self, default_server: DefaultServer) -> Self {
        self.default_server = default_server;
        self
    }

    pub fn server(mut self, server: ServerConfig) -> Self {
        self.servers.push(server);
        self
    }

    pub fn listener(mut self, listener: ListenerConfig) -> Self {
        self.listeners.push(listener);
        self
    }

    pub fn stats(mut self, stats: StatsConfig) -> Self {
        self.stats = Some(stats);
        self
    }

    pub fn runtime(mut self, runtime: RuntimeConfig) -> Self {
        self.runtime = Some(runtime);
        self
    }

    pub fn allow(mut self, rule: AllowConfig) -> Self {
        self.allow.push(rule);
        self
    }

    /// `datapath = "tc"` on `interfaces`.
    pub fn tc_splice(mut self, interfaces: &[&str]) -> Self {
        self.tc_interfaces = Some(interfaces.iter().map(|i| i.to_string()).collect());
        self
    }

    pub fn xdp(mut self, xdp: XdpConfig) -> Self {
        self.xdp = Some(xdp);
        self
    }

    /// The first listener's bind: the address of a one-listener config.
    pub fn bind(&self) -> SocketAddr {
        self.listeners
            .first()
            .expect("a config with a listener")
            .bind
    }

    /// Every address the proxy listens on: the listeners' binds, then the stats bind.
    pub fn listen_addrs(&self) -> Vec<SocketAddr> {
        let listeners = self.listeners.iter().map(|l| l.bind);
        listeners.chain(self.stats.iter().map(|s| s.bind)).collect()
    }
}

impl Defaults {
    /// The required timeouts: `idle` for both client and server (equal, as TCP mode wants).
    pub fn new(idle: Duration, connect: Duration) -> Self {
        Defaults {
            retries: None,
            timeout_client: idle,
            timeout_server: idle,
            timeout_connect: connect,
            timeout_check: None,
            timeout_queue: None,
            timeout_startup: None,
        }
    }

    /// The seed's: retries 2, timeouts client and server 30m, connect 4s, check 5s.
    pub fn seed() -> Self {
        Defaults::new(Duration::from_secs(30 * 60), Duration::from_secs(4))
            .retries(2)
            .timeout_check(Duration::from_secs(5))
    }

    pub fn retries(mut self, retries: u32) -> Self {
        self.retries = Some(retries);
        self
    }

    pub fn timeout_check(mut self, timeout: Duration) -> Self {
        self.timeout_check = Some(timeout);
        self
    }

    pub fn timeout_queue(mut self, timeout: Duration) -> Self {
        self.timeout_queue = Some(timeout);
        self
    }
}

impl DefaultServer {
    /// The seed's: inter 3s, fall 3, rise 2, on-marked-down shutdown-sessions.
    pub fn seed() -> Self {
        DefaultServer {
            inter: Some(Duration::from_secs(3)),
            fall: Some(3),
            rise: Some(2),
            on_marked_down: Some(OnMarkedDown::ShutdownSessions),
            ..DefaultServer::default()
        }
    }
}

impl ServerConfig {
    pub fn new(name: impl Into<String>, address: SocketAddr) -> Self {
        ServerConfig {
            name: name.into(),
            address,
            check_port: None,
            maxconn: None,
        }
    }

    pub fn check_port(mut self, port: u16) -> Self {
        self.check_port = Some(port);
        self
    }

    pub fn maxconn(mut self, maxconn: u32) -> Self {
        self.maxconn = Some(maxconn);
        self
    }
}

impl ListenerConfig {
    pub fn new<S: Into<String>>(
        name: impl Into<String>,
        bind: SocketAddr,
        servers: impl IntoIterator<Item = S>,
    ) -> Self {
        ListenerConfig {
            name: name.into(),
            bind,
            balance: None,
            servers: servers.into_iter().map(Into::into).collect(),
            check: None,
        }
    }

    pub fn balance(mut self, balance: Balance) -> Self {
        self.balance = Some(balance);
        self
    }

    pub fn check(mut self, check: CheckConfig) -> Self {
        self.check = Some(check);
        self
    }
}

impl CheckConfig {
    /// A check of `path` with the proxy's default method and expected status.
    pub fn new(path: impl Into<String>) -> Self {
        CheckConfig {
            method: None,
            path: path.into(),
            expect_status: None,
            ca_file: None,
        }
    }

    pub fn method(mut self, method: Method) -> Self {
        self.method = Some(method);
        self
    }

    pub fn expect_status(mut self, status: u16) -> Self {
        self.expect_status = Some(status);
        self
    }

    pub fn tls(mut self, ca_file: impl Into<PathBuf>) -> Self {
        self.ca_file = Some(ca_file.into());
        self
    }
}

impl StatsConfig {
    pub fn new(bind: SocketAddr) -> Self {
        StatsConfig {
            bind,
            refresh: None,
            admin: None,
            admin_auth_file: None,
        }
    }

    pub fn refresh(mut self, refresh: Duration) -> Self {
        self.refresh = Some(refresh);
        self
    }

    pub fn admin(mut self, admin: AdminAccess) -> Self {
        self.admin = Some(admin);
        self
    }

    pub fn admin_auth_file(mut self, file: impl Into<PathBuf>) -> Self {
        self.admin_auth_file = Some(file.into());
        self
    }
}

impl RuntimeConfig {
    /// A socket at `socket` with patroxy's defaults for the rest.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        RuntimeConfig {
            socket: socket.into(),
            mode: None,
            user: None,
            group: None,
            maxconn: None,
        }
    }

    pub fn mode(mut self, mode: impl Into<String>) -> Self {
        self.mode = Some(mode.into());
        self
    }

    pub fn owner(mut self, user: impl Into<String>, group: impl Into<String>) -> Self {
        self.user = Some(user.into());
        self.group = Some(group.into());
        self
    }

    pub fn maxconn(mut self, maxconn: u32) -> Self {
        self.maxconn = Some(maxconn);
        self
    }
}

impl Bpf {
    /// The value as patroxy's config writes it.
    pub fn name(self) -> &'static str {
        match self {
            Bpf::Auto => "auto",
            Bpf::Required => "required",
            Bpf::Off => "off",
        }
    }
}

impl FromStr for Bpf {
    type Err = String;

    fn from_str(s: &str) -> Result<Bpf, String> {
        [Bpf::Auto, Bpf::Required, Bpf::Off]
            .into_iter()
            .find(|b| b.name() == s)
            .ok_or_else(|| format!("bpf {s:?}: expected auto, required or off"))
    }
}

impl Balance {
    /// The same word in both proxies' configs.
    fn name(self) -> &'static str {
        match self {
            Balance::First => "first",
            Balance::RoundRobin => "roundrobin",
            Balance::LeastConn => "leastconn",
        }
    }
}

impl OnMarkedDown {
    fn name(self) -> &'static str {
        match self {
            OnMarkedDown::ShutdownSessions => "shutdown-sessions",
            OnMarkedDown::Nothing => "none",
        }
    }
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Options => "OPTIONS",
        }
    }
}

impl AdminAccess {
    fn name(self) -> &'static str {
        match self {
            AdminAccess::Off => "off",
            AdminAccess::Local => "local",
            AdminAccess::Any => "any",
        }
    }
}

/// `d` as both proxies read it: a whole number of the largest unit that fits ("30m", "4s",
/// "500ms"). Both count in milliseconds, so a finer duration is a mistake in the test.
pub fn duration(d: Duration) -> String {
    let ms = d.as_millis();
    assert_eq!(
        Duration::from_millis(ms as u64),
        d,
        "the proxies' durations are whole milliseconds"
    );
    [(3_600_000, "h"), (60_000, "m"), (1_000, "s")]
        .into_iter()
        .find(|(unit, _)| ms > 0 && ms.is_multiple_of(*unit))
        .map_or_else(
            || format!("{ms}ms"),
            |(unit, u)| format!("{}{u}", ms / unit),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn local(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    /// Two checked servers, a read and a write listener, a stats page: the cluster harness's
    /// shape.
    pub(super) fn two_listeners() -> ProxyConfig {
        let mut config = ProxyConfig::seed()
            .data_path(Bpf::Auto, "/sys/fs/bpf/t")
            .server(
                ServerConfig::new("a", "10.0.0.1:5432".parse().unwrap())
                    .check_port(8008)
                    .maxconn(200),
            )
            .server(ServerConfig::new("b", "10.0.0.2:5432".parse().unwrap()).check_port(8008))
            .listener(
                ListenerConfig::new("write", local(5000), ["a", "b"]).check(
                    CheckConfig::new("/primary")
                        .method(Method::Get)
                        .expect_status(200),
                ),
            )
            .listener(
                ListenerConfig::new("read", local(5001), ["a", "b"])
                    .balance(Balance::RoundRobin)
                    .check(CheckConfig::new("/replica")),
            )
            .stats(
                StatsConfig::new(local(7000))
                    .refresh(Duration::from_secs(5))
                    .admin(AdminAccess::Local),
            );
        config.default_server.fastinter = Some(Duration::from_millis(500));
        config
    }

    #[test]
    fn durations_take_the_largest_exact_unit() {
        let d = |ms| duration(Duration::from_millis(ms));
        assert_eq!(d(1_800_000), "30m");
        assert_eq!(d(7_200_000), "2h");
        assert_eq!(d(5_400_000), "90m");
        assert_eq!(d(4_000), "4s");
        assert_eq!(d(1_500), "1500ms");
        assert_eq!(d(500), "500ms");
        assert_eq!(d(0), "0ms");
    }

    #[test]
    #[should_panic(expected = "whole milliseconds")]
    fn sub_millisecond_durations_are_refused() {
        duration(Duration::from_micros(1500));
    }

    #[test]
    fn listen_addrs_are_the_listeners_then_stats() {
        assert_eq!(
            two_listeners().listen_addrs(),
            [local(5000), local(5001), local(7000)]
        );
        assert_eq!(two_listeners().bind(), local(5000));
    }

    #[test]
    fn bpf_parses_its_names() {
        assert_eq!("required".parse(), Ok(Bpf::Required));
        assert!("sockmap".parse::<Bpf>().is_err());
    }
}
