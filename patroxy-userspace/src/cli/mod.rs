//! The operator's commands, one file each: `status` and `set-state` talk to the running daemon
//! through its stats server, `sessions` and `maps` read its pinned maps; `import-haproxy`
//! converts a HAProxy configuration.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
};

use anyhow::bail;
use patroxy::config::Config;

pub mod import_haproxy;
pub mod maps;
pub mod sessions;
pub mod set_state;
pub mod status;

/// The daemon's stats URL: `--url`, or the `[stats]` bind of the config file.
pub fn stats_url(url: Option<String>, config: &Path) -> anyhow::Result<String> {
    match url {
        Some(url) => Ok(url),
        None => url_from_config(&patroxy::config::load(config)?),
    }
}

/// The stats URL of the daemon configured in `config`: its `[stats]` bind, with an unspecified
/// address (`*`, 0.0.0.0, ::) replaced by loopback.
fn url_from_config(config: &Config) -> anyhow::Result<String> {
    let Some(stats) = &config.stats else {
        bail!("the configuration has no [stats] section; pass --url");
    };
    let mut addr: SocketAddr = stats.bind;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        });
    }
    Ok(format!("http://{addr}"))
}
