//! `patroxy reload`: the running daemon re-reads its configuration file, through its runtime
//! socket when the config has one, else its admin endpoint (`POST /admin/reload`, with the
//! admin token when set); the unit's `ExecReload`.
use anyhow::bail;

use super::{ctl, set_state::Via};

/// Asks the daemon to reload and prints what changed; a refused reload (invalid file, a change
/// that needs a restart, forbidden) is an error carrying every reason the daemon gave.
pub async fn run(via: Via) -> anyhow::Result<()> {
    match via {
        Via::Socket(socket) => {
            let answer =
                tokio::task::spawn_blocking(move || ctl::send(&socket, "reload")).await??;
            if let Some(error) = ctl::error_of(&answer) {
                bail!("{error}");
            }
            print!("{answer}");
            Ok(())
        }
        Via::Http { url, token } => http(&url, token.as_deref()).await,
    }
}

async fn http(url: &str, token: Option<&str>) -> anyhow::Result<()> {
    super::admin_post(url, &["admin", "reload"], None, token).await
}
