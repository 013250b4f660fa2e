//! The configuration exactly as written in the TOML file. Every struct denies unknown fields so a
//! typo ("maxcon") is an error rather than a silently ignored setting, and values that validation
//! may reject are `Spanned` so its errors can point at them. Defaults are not applied here: an
//! absent key stays `None` and `validate` decides what it means.
use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

use super::duration::Dur;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    #[serde(default)]
    pub global: RawGlobal,
    /// Required: its three traffic timeouts have no safe default (HAProxy warns when they are
    /// missing and then waits forever).
    pub defaults: RawDefaults,
    #[serde(default)]
    pub default_server: RawDefaultServer,
    #[serde(default)]
    pub server: Vec<RawServer>,
    #[serde(default)]
    pub listener: Vec<RawListener>,
    pub stats: Option<RawStats>,
    pub runtime: Option<RawRuntime>,
    /// The XDP allowlist's rules, in file order.
    #[serde(default)]
    pub allow: Vec<RawAllow>,
    pub xdp: Option<RawXdp>,
    /// The packet-level splice's interfaces (`datapath = "tc"`).
    pub tc: Option<RawTc>,
    pub dcs: Option<RawDcs>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawGlobal {
    pub maxconn: Option<Spanned<u32>>,
    pub bpf: Option<Spanned<RawBpf>>,
    pub pin_path: Option<Spanned<PathBuf>>,
    pub bpf_log: Option<Spanned<bool>>,
    pub bpf_log_rate: Option<Spanned<u32>>,
    pub datapath: Option<Spanned<RawDatapath>>,
    pub session_log_rate: Option<Spanned<u32>>,
    pub cancel_rate: Option<Spanned<u32>>,
    pub cancel_rate_per_client: Option<Spanned<u32>>,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(crate) enum RawDatapath {
    Sockets,
    Tc,
}

/// `[tc]`: where the packet-level splice's programs attach.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTc {
    pub interfaces: Spanned<Vec<Spanned<String>>>,
}

#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum RawBpf {
    Auto,
    Required,
    Off,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDefaults {
    pub retries: Option<Spanned<u32>>,
    pub redispatch: Option<bool>,
    pub timeout_client: Spanned<Dur>,
    pub timeout_server: Spanned<Dur>,
    pub timeout_connect: Spanned<Dur>,
    pub timeout_check: Option<Spanned<Dur>>,
    pub timeout_queue: Option<Spanned<Dur>>,
    pub timeout_startup: Option<Spanned<Dur>>,
}

/// HAProxy's `default-server` line: check timing and per-server settings every server inherits.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDefaultServer {
    pub inter: Option<Spanned<Dur>>,
    pub fastinter: Option<Spanned<Dur>>,
    pub downinter: Option<Spanned<Dur>>,
    pub fall: Option<Spanned<u32>>,
    pub rise: Option<Spanned<u32>>,
    pub on_marked_down: Option<RawOnMarkedDown>,
    pub on_marked_up: Option<RawOnMarkedUp>,
    pub check_port: Option<Spanned<u16>>,
    pub maxconn: Option<Spanned<u32>>,
    pub init_state: Option<RawInitState>,
}

#[derive(Clone, Copy, Debug, Deserialize)]
pub(crate) enum RawOnMarkedDown {
    #[serde(rename = "shutdown-sessions")]
    ShutdownSessions,
    #[serde(rename = "none")]
    Nothing,
}

#[derive(Clone, Copy, Debug, Deserialize)]
pub(crate) enum RawOnMarkedUp {
    #[serde(rename = "shutdown-backup-sessions")]
    ShutdownBackupSessions,
    #[serde(rename = "none")]
    Nothing,
}

#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum RawInitState {
    Down,
    Up,
}

/// A cluster member, defined once and referenced by name from listeners.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawServer {
    pub name: Spanned<String>,
    pub address: Spanned<String>,
    pub check_port: Option<Spanned<u16>>,
    pub maxconn: Option<Spanned<u32>>,
    pub check_address: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawListener {
    pub name: Spanned<String>,
    pub bind: Spanned<String>,
    pub balance: Option<RawBalance>,
    pub servers: Spanned<Vec<Spanned<String>>>,
    pub check: Option<RawCheck>,
}

#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum RawBalance {
    First,
    RoundRobin,
    LeastConn,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCheck {
    pub method: Option<RawMethod>,
    pub path: Spanned<String>,
    pub expect_status: Option<Spanned<u16>>,
    pub authoritative: Option<bool>,
    pub tls: Option<Spanned<RawTls>>,
}

/// An HTTP method, matched case-insensitively as HAProxy's `option httpchk` does.
#[derive(Clone, Copy, Debug)]
pub(crate) enum RawMethod {
    Get,
    Head,
    Options,
}

impl<'de> Deserialize<'de> for RawMethod {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        match s.to_ascii_uppercase().as_str() {
            "GET" => Ok(RawMethod::Get),
            "HEAD" => Ok(RawMethod::Head),
            "OPTIONS" => Ok(RawMethod::Options),
            _ => Err(serde::de::Error::custom(format!(
                "unknown check method `{s}`, expected one of `GET`, `HEAD`, `OPTIONS`"
            ))),
        }
    }
}

/// Presence of this table switches the check to https.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTls {
    pub ca_file: Spanned<PathBuf>,
    pub client_cert: Option<Spanned<PathBuf>>,
    pub client_key: Option<Spanned<PathBuf>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawStats {
    pub bind: Spanned<String>,
    pub refresh: Option<Spanned<Dur>>,
    pub admin: Option<RawAdminAccess>,
    pub maxconn: Option<Spanned<u32>>,
    pub admin_auth_file: Option<Spanned<PathBuf>>,
}

#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum RawAdminAccess {
    Off,
    Local,
    Any,
}

/// `[runtime]`: every key has a default, so the bare header enables the socket.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRuntime {
    pub socket: Option<Spanned<PathBuf>>,
    /// Octal digits, as chmod takes them: "0660", "660".
    pub mode: Option<Spanned<String>>,
    pub user: Option<Spanned<String>>,
    pub group: Option<Spanned<String>>,
    pub maxconn: Option<Spanned<u32>>,
}

/// `[[allow]]`: sources that may reach some of patroxy's ports (UFW's `allow from ... to any
/// port ...`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAllow {
    /// IPv4 and IPv6 networks in CIDR notation ("10.100.100.0/24", "fd14::/64"); a bare address
    /// is a host.
    pub from: Spanned<Vec<Spanned<String>>>,
    /// Ports, or names of listeners ("postgres_write") and "stats" for their bind's port.
    pub to: Spanned<Vec<Spanned<RawPortRef>>>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum RawPortRef {
    Port(u16),
    Name(String),
}

/// `[xdp]`: where and how the allowlist is enforced.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawXdp {
    pub enabled: Option<Spanned<RawBpf>>,
    pub interfaces: Option<Spanned<Vec<Spanned<String>>>>,
    pub mode: Option<RawXdpMode>,
    pub syn_rate: Option<Spanned<u32>>,
    pub syn_burst: Option<Spanned<u32>>,
}

#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum RawXdpMode {
    Auto,
    Native,
    Generic,
    Tc,
}

/// `[dcs]`: Patroni's etcd v3, watched for leader changes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDcs {
    pub etcd: Spanned<Vec<Spanned<String>>>,
    pub namespace: Option<Spanned<String>>,
    pub scope: Spanned<String>,
    pub tls: Option<Spanned<RawTls>>,
    pub user: Option<Spanned<String>>,
    pub password: Option<Spanned<String>>,
    pub burst_inter: Option<Spanned<Dur>>,
}
