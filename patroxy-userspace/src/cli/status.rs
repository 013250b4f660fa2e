//! `patroxy status`: the stats table of the running daemon, from its stats page's JSON.
use std::io::IsTerminal as _;

use anyhow::Context as _;
use patroxy::stats::{StatsSnapshot, text::status_table};

/// Fetches `<url>/;json` and prints one table per listener.
pub async fn run(url: &str) -> anyhow::Result<()> {
    let url = format!("{}/;json", url.trim_end_matches('/'));
    let snap: StatsSnapshot = reqwest::get(&url)
        .await
        .and_then(|r| r.error_for_status())
        .with_context(|| format!("fetching {url} (is patroxy running with [stats]?)"))?
        .json()
        .await
        .with_context(|| format!("reading {url}"))?;
    print!("{}", status_table(&snap, std::io::stdout().is_terminal()));
    Ok(())
}
