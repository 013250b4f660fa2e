//! The validated configuration: typed values with every default applied and every reference
//! resolved. Nothing here is optional that the daemon needs; the raw TOML shape lives in `raw.rs`.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

pub use super::admin_token::AdminToken;

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub global: Global,
    pub defaults: Defaults,
    pub listeners: Vec<Listener>,
    /// The stats/admin HTTP server; `None` when the file has no `[stats]` section.
    pub stats: Option<Stats>,
    /// The runtime socket of `patroxy ctl`; `None` when the file has no `[runtime]` section.
    pub runtime: Option<Runtime>,
    /// The XDP allowlist: `[[allow]]` rules and `[xdp]`.
    pub firewall: Firewall,
    /// Patroni's DCS, watched for leader changes; `None` when the file has no `[dcs]` section
    /// (then the checks alone decide, as without the watch).
    pub dcs: Option<Dcs>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Global {
    /// HAProxy's global maxconn: at the limit the proxy stops accepting; the backlog holds the rest.
    pub maxconn: u32,
    /// Whether the in-kernel sockmap data path is used.
    pub bpf: BpfMode,
    /// Directory under bpffs where the maps are pinned (default /sys/fs/bpf/patroxy).
    pub pin_path: PathBuf,
    /// Debug lines from the verdict program (aya-log, target `patroxy::ebpf`); off by default,
    /// and then the program pays nothing for them. `PATROXY_BPF_LOG` overrides it for one run.
    pub bpf_log: bool,
    /// Most verdict lines printed per second per CPU; the kernel counts the rest.
    pub bpf_log_rate: u32,
    /// Most lines per second about single clients (a session's end, a refusal), with bursts
    /// of twice that; the rest are counted and summed up every 10 s.
    pub session_log_rate: u32,
    /// Most CancelRequests per second passed on to the servers, all clients together; bursts
    /// of twice that. Each one opens a connection (a fork) on every server it goes to.
    pub cancel_rate: u32,
    /// Most CancelRequests per second from one client address, bursts of twice that.
    pub cancel_rate_per_client: u32,
    /// Who forwards an established session's bytes.
    pub datapath: Datapath,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Datapath {
    /// The proxy's two sockets: sockmap or the userspace fallback, as `bpf` says.
    Sockets,
    /// Sessions start on the sockets and are handed to the TC program at the first moment both
    /// directions are idle (opt-in; IPv4 only so far).
    Tc {
        /// The interfaces the TC programs attach to (`[tc] interfaces`): never any other.
        interfaces: Vec<String>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BpfMode {
    /// Use sockmap when possible, otherwise fall back with one log line saying why.
    Auto,
    /// Refuse to start without sockmap.
    Required,
    /// Always use the userspace fallback path.
    Off,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Defaults {
    /// New connection attempts after a failed connect.
    pub retries: u32,
    /// `option redispatch`: the last retry may go to another server.
    pub redispatch: bool,
    pub timeout_client: Duration,
    pub timeout_server: Duration,
    pub timeout_connect: Duration,
    /// Extra read timeout of a health check; `None` means `inter` bounds the whole check.
    pub timeout_check: Option<Duration>,
    /// How long a session waits for a server slot; defaults to `timeout_connect`.
    pub timeout_queue: Duration,
    /// How long a new client may stay silent before it is closed: PostgreSQL clients speak
    /// first, and patroxy takes no server slot before they do (HAProxy has no such timeout).
    pub timeout_startup: Duration,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Listener {
    pub name: String,
    pub bind: SocketAddr,
    pub balance: Balance,
    /// The health check of this listener's servers; `None` = servers are not checked and always
    /// carry traffic (HAProxy's "no check").
    pub check: Option<HealthCheck>,
    /// The servers of this listener with `default_server` merged in, in file order.
    pub servers: Vec<ServerSpec>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Balance {
    /// The first UP server in file order (for writes: there is one primary); with several
    /// primaries (split brain) the one with the highest timeline.
    First,
    RoundRobin,
    LeastConn,
}

#[derive(Clone, Debug, PartialEq)]
pub struct HealthCheck {
    pub method: CheckMethod,
    /// Path and query sent to Patroni, e.g. "/primary" or "/replica?lag=16MB".
    pub path: String,
    pub expect_status: u16,
    pub tls: Option<CheckTls>,
    /// Patroni's own "not this role" answer (its 503) marks a server down at once (patroxy
    /// extension); other failed checks count toward `fall`.
    pub authoritative: bool,
}

impl HealthCheck {
    /// Whether a 200 means "this is the leader" (`/primary`, `/master`, `/leader`,
    /// `/read-write`, `/`): every other member answers 503 there, however healthy.
    pub fn asks_for_the_leader(&self) -> bool {
        let path = self.path.split('?').next().unwrap_or_default();
        super::WRITE_PATHS.contains(&path)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CheckMethod {
    Get,
    Head,
    Options,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CheckTls {
    pub ca_file: PathBuf,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ServerSpec {
    pub name: String,
    /// Where client traffic goes (PostgreSQL, 5432).
    pub address: SocketAddr,
    /// Where the health check goes (Patroni's REST API, 8008).
    pub check_addr: SocketAddr,
    /// Sessions past this wait in the server's queue; `None` = unlimited.
    pub maxconn: Option<u32>,
    pub timing: CheckTiming,
    pub on_marked_down: OnMarkedDown,
    pub on_marked_up: OnMarkedUp,
    pub init_state: InitState,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckTiming {
    pub inter: Duration,
    pub fastinter: Duration,
    pub downinter: Duration,
    pub fall: u32,
    pub rise: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnMarkedDown {
    ShutdownSessions,
    Nothing,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnMarkedUp {
    ShutdownBackupSessions,
    Nothing,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InitState {
    /// patroxy's default: a server carries traffic only after `rise` good checks.
    Down,
    /// HAProxy's behaviour: servers start UP (one failed check takes them to "UP 2/3").
    Up,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Stats {
    pub bind: SocketAddr,
    pub refresh: Duration,
    /// Who may change servers' admin state (READY/DRAIN/MAINT) through the stats server.
    pub admin: AdminAccess,
    /// Stats connections served at once; more wait in the kernel's backlog, holding none of the
    /// daemon's file descriptors, so the stats port can never starve the proxy.
    pub maxconn: u32,
    /// The token an admin request must present (`Authorization: Bearer ...`), read from
    /// `admin_auth_file` at load; `None` = the peer's address alone decides (`admin`).
    pub admin_token: Option<AdminToken>,
}

/// HAProxy's `stats admin if <cond>`: which peers may use the admin endpoint at all (a token,
/// when configured, is asked of them on top).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdminAccess {
    /// Nobody: the admin endpoint answers 403.
    Off,
    /// Clients on this host only (loopback, or the address they connected to): the default.
    Local,
    /// Any client that reaches the stats bind (a trusted management network only).
    Any,
}

/// The runtime socket (HAProxy's `stats socket`): a unix socket `patroxy ctl` speaks to. Who may
/// connect is decided by the file's owner, group and mode alone.
#[derive(Clone, Debug, PartialEq)]
pub struct Runtime {
    pub socket: PathBuf,
    /// Permission bits of the socket file (0660 by default: owner and group may connect).
    pub mode: u32,
    /// Owner and group the socket is given, resolved from names at load; `None` = the daemon's.
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// Connections served at once; more wait in the kernel's backlog.
    pub maxconn: u32,
}

/// The `[[allow]]` rules and where XDP enforces them. The default has no rules and XDP off.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Firewall {
    /// In file order; a rule's index is its position (the kernel's counters are per index).
    pub rules: Vec<AllowRule>,
    pub xdp: Xdp,
}

impl Firewall {
    /// The ports some rule names, in ascending order: XDP drops packets to these from sources no
    /// rule allows.
    pub fn protected_ports(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self.rules.iter().flat_map(|r| r.ports.clone()).collect();
        ports.sort_unstable();
        ports.dedup();
        ports
    }
}

/// Sources `from` may reach `ports`. Rules never overlap (validation refuses it), so each
/// (source, port) is allowed by at most one rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllowRule {
    pub from: Vec<ipnet::IpNet>,
    /// Sorted, without duplicates.
    pub ports: Vec<u16>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Xdp {
    /// As `bpf`: `Auto` enforces the rules when XDP can attach and says why not otherwise,
    /// `Required` refuses to start without it, `Off` (the default) attaches nothing.
    pub enabled: XdpEnabled,
    /// Interfaces the program is attached to: the ones clients come in on.
    pub interfaces: Vec<String>,
    pub mode: XdpMode,
    /// SYNs per second per source; `None` (the default) = no limit.
    pub syn_limit: Option<SynRate>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum XdpEnabled {
    Auto,
    Required,
    #[default]
    Off,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum XdpMode {
    /// Per interface, said once in the log: native on a NIC whose driver runs XDP, tc on a
    /// virtual device (veth, loopback: their XDP modes copy every TCP packet), generic only
    /// where neither attaches.
    #[default]
    Auto,
    /// XDP in the driver, before the socket buffer is built.
    Native,
    /// XDP in the kernel's stack, on a copy of each socket buffer: slower, same verdicts.
    Generic,
    /// The same allowlist at tc ingress (tcx, Linux 6.6), on the socket buffer as it is.
    Tc,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SynRate {
    /// SYNs per second a source (IPv4 address, IPv6 /64) may send to protected ports.
    pub rate: u32,
    /// SYNs it may send at once after a quiet spell.
    pub burst: u32,
}

/// `[dcs]`: the etcd v3 cluster Patroni keeps its leader key in. The watch only speeds up
/// what the checks would find: a leader key that moves fences the old leader at once, and the
/// new one is UP on its first `/primary` 200 with a newer timeline.
#[derive(Clone, Debug, PartialEq)]
pub struct Dcs {
    /// etcd endpoints as written: all `http://host:port`, or all `https://` with `tls`.
    pub etcd: Vec<String>,
    /// Patroni's `namespace`, with a leading `/` and no trailing one ("/service").
    pub namespace: String,
    /// Patroni's `scope` (the cluster's name).
    pub scope: String,
    /// The CA that signs etcd's certificate and an optional client identity.
    pub tls: Option<CheckTls>,
    pub auth: Option<DcsAuth>,
    /// How often the leader listeners' checks run from a leader change until a server of the
    /// listener is UP again.
    pub burst_inter: Duration,
}

/// etcd's user and password; the password is kept out of `Debug` output (and so out of logs
/// and reload messages).
#[derive(Clone, PartialEq)]
pub struct DcsAuth {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for DcsAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DcsAuth")
            .field("user", &self.user)
            .field("password", &"<hidden>")
            .finish()
    }
}
