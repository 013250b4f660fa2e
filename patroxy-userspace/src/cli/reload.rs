//! `patroxy reload`: the running daemon re-reads its configuration file, through its admin
//! endpoint (`POST /admin/reload`, the unit's `ExecReload`).
use anyhow::{Context as _, bail};

/// Asks the daemon at `url` to reload and prints what changed; a refused reload (invalid file,
/// a change that needs a restart, forbidden) is an error carrying every reason the daemon gave.
pub async fn run(url: &str) -> anyhow::Result<()> {
    let mut endpoint =
        reqwest::Url::parse(url).with_context(|| format!("{url} is not a valid URL"))?;
    endpoint
        .path_segments_mut()
        .map_err(|()| anyhow::anyhow!("{url} cannot take a path"))?
        .pop_if_empty()
        .extend(["admin", "reload"]);
    let response = reqwest::Client::new()
        .post(endpoint.clone())
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
