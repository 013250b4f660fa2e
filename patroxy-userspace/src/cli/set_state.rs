//! `patroxy set-state`: a server's READY/DRAIN/MAINT, through the daemon's runtime socket when
//! its config has one (file permissions decide, no token needed), else through the stats
//! server's admin endpoint (with the token of `[stats] admin_auth_file`, when set).
use std::path::{Path, PathBuf};

use anyhow::bail;
use patroxy::{config::AdminToken, operator_state::AdminState};

use super::ctl;

/// How the request reaches the daemon.
pub enum Via {
    Socket(PathBuf),
    Http { url: String, token: Option<String> },
}

impl Via {
    /// `--socket`, else `--url` (with `--token-file`), else the config: its runtime socket, or
    /// its stats server with its admin token.
    pub fn choose(
        socket: Option<PathBuf>,
        url: Option<String>,
        token_file: Option<PathBuf>,
        config: &Path,
    ) -> anyhow::Result<Via> {
        let token = |file: Option<PathBuf>| -> anyhow::Result<Option<String>> {
            file.map(|f| AdminToken::read(&f).map(|t| t.secret().to_string()))
                .transpose()
                .map_err(anyhow::Error::from)
        };
        if let Some(socket) = socket {
            return Ok(Via::Socket(socket));
        }
        if let Some(url) = url {
            return Ok(Via::Http {
                url,
                token: token(token_file)?,
            });
        }
        let loaded = patroxy::config::load(config)?;
        if let Some(runtime) = &loaded.runtime {
            return Ok(Via::Socket(runtime.socket.clone()));
        }
        let configured = loaded
            .stats
            .as_ref()
            .and_then(|s| s.admin_token.as_ref())
            .map(|t| t.secret().to_string());
        Ok(Via::Http {
            url: super::url_from_config(&loaded)?,
            token: token(token_file)?.or(configured),
        })
    }
}

/// Sets `target` (`<listener>/<server>`) to `state` and prints the daemon's answer; a refusal
/// (unknown name, bad state, forbidden) is an error with the daemon's reason.
pub async fn run(via: Via, target: &str, state: AdminState) -> anyhow::Result<()> {
    let Some((listener, server)) = target.split_once('/') else {
        bail!("expected <listener>/<server>, got {target:?}");
    };
    match via {
        Via::Socket(socket) => {
            let line = format!("set state {listener}/{server} {}", state.as_str());
            let answer = tokio::task::spawn_blocking(move || ctl::send(&socket, &line)).await??;
            if let Some(error) = ctl::error_of(&answer) {
                bail!("{error}");
            }
            print!("{answer}");
            Ok(())
        }
        Via::Http { url, token } => http(&url, token.as_deref(), listener, server, state).await,
    }
}

async fn http(
    url: &str,
    token: Option<&str>,
    listener: &str,
    server: &str,
    state: AdminState,
) -> anyhow::Result<()> {
    super::admin_post(
        url,
        &["admin", "servers", listener, server],
        Some(("state", state.as_str())),
        token,
    )
    .await
}
