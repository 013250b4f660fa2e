//! `patroxy set-state`: a server's READY/DRAIN/MAINT, through the daemon's admin endpoint.
use anyhow::{Context as _, bail};
use patroxy::operator_state::AdminState;

/// Sets `target` (`<listener>/<server>`) to `state` and prints the daemon's answer; a refusal
/// (unknown name, bad state, forbidden) is an error with the daemon's reason.
pub async fn run(url: &str, target: &str, state: AdminState) -> anyhow::Result<()> {
    let Some((listener, server)) = target.split_once('/') else {
        bail!("expected <listener>/<server>, got {target:?}");
    };
    let mut endpoint =
        reqwest::Url::parse(url).with_context(|| format!("{url} is not a valid URL"))?;
    endpoint
        .path_segments_mut()
        .map_err(|()| anyhow::anyhow!("{url} cannot take a path"))?
        .pop_if_empty()
        .extend(["admin", "servers", listener, server]);
    endpoint
        .query_pairs_mut()
        .append_pair("state", state.as_str());
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
