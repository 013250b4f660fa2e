//! The operator's commands, one file each: `status`, `reload` and `upgrade` talk to the running
//! daemon through its stats server, `ctl` through its runtime socket, `set-state` through either
//! (the socket when the config has one), `sessions` and `maps` read its pinned maps;
//! `import-haproxy` converts a HAProxy configuration.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
};

use anyhow::{Context as _, bail};
use patroxy::config::Config;

pub mod ctl;
pub mod import_haproxy;
pub mod maps;
pub mod reload;
pub mod sessions;
pub mod set_state;
pub mod status;
pub mod upgrade;

/// Posts to the admin endpoint `segments` under `url` (with the admin token when given) and
/// prints the daemon's answer; a refusal is an error carrying it.
pub async fn admin_post(
    url: &str,
    segments: &[&str],
    query: Option<(&str, &str)>,
    token: Option<&str>,
) -> anyhow::Result<()> {
    let mut endpoint =
        reqwest::Url::parse(url).with_context(|| format!("{url} is not a valid URL"))?;
    endpoint
        .path_segments_mut()
        .map_err(|()| anyhow::anyhow!("{url} cannot take a path"))?
        .pop_if_empty()
        .extend(segments);
    if let Some((key, value)) = query {
        endpoint.query_pairs_mut().append_pair(key, value);
    }
    let mut request = reqwest::Client::new().post(endpoint.clone());
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request
        .send()
        .await
        .with_context(|| format!("posting to {endpoint} (is patroxy running with [stats]?)"))?;
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    if !status.is_success() {
        bail!("{status}: {}", text.trim_end());
    }
    print!("{text}");
    Ok(())
}

/// The daemon's stats URL: `--url`, or the `[stats]` bind of the config file.
pub fn stats_url(url: Option<String>, config: &Path) -> anyhow::Result<String> {
    match url {
        Some(url) => Ok(url),
        None => url_from_config(&patroxy::config::load(config)?),
    }
}

/// The stats URL from the `[stats] bind` of a file that parses as TOML but does not validate.
pub fn stats_url_of_invalid(path: &Path) -> Option<String> {
    let table: toml::Table = std::fs::read_to_string(path).ok()?.parse().ok()?;
    let bind = table.get("stats")?.get("bind")?.as_str()?;
    let addr = match bind.strip_prefix("*:") {
        Some(port) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, port.parse().ok()?)),
        None => bind.parse().ok()?,
    };
    Some(url_of(addr))
}

/// The stats URL of the daemon configured in `config`: its `[stats]` bind, with an unspecified
/// address (`*`, 0.0.0.0, ::) replaced by loopback.
pub fn url_from_config(config: &Config) -> anyhow::Result<String> {
    let Some(stats) = &config.stats else {
        bail!("the configuration has no [stats] section; pass --url");
    };
    Ok(url_of(stats.bind))
}

fn url_of(mut addr: SocketAddr) -> String {
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        });
    }
    format!("http://{addr}")
}
