//! What each runtime socket command does, and its answer: the same text `patroxy status`,
//! `sessions` and `set-state` print, or JSON with `--json`.
use std::sync::Arc;

use serde::Serialize;
use serde_json::json;
use tokio::time::Instant;

use super::{
    ControlHandle,
    protocol::{Command, HELP, Request},
};
use crate::{
    dataplane::{maps::OpenSessions, sock_diag, sockopt::monotonic_ns, tc::OpenFlows},
    operator_state::AdminWriter,
    proxy::StatsSource,
    stats::{collect, history::StatsHistory, sessions, text::status_table},
};

/// What the commands read and drive.
pub struct Commands {
    pub source: Arc<dyn StatsSource>,
    /// The one writer of the operator's states, shared with the stats server's admin endpoint.
    pub admin: Arc<AdminWriter>,
    pub handle: Arc<dyn ControlHandle>,
    /// This socket's own session rates and leader changes (see `server::serve`).
    pub history: Arc<StatsHistory>,
    pub started: Instant,
}

impl Commands {
    /// The answer to `request`; `by` names the caller in the log of a state change.
    pub async fn answer(&self, request: Request, by: &str) -> String {
        let json = request.json;
        let result = match request.command {
            Ok(command) => self.run(command, json, by).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(body) => body,
            Err(e) if json => format!("{}\n", json!({ "error": e })),
            Err(e) => format!("error: {e}\n"),
        }
    }

    async fn run(&self, command: Command, json: bool, by: &str) -> Result<String, String> {
        Ok(match command {
            Command::Help => text_or_json(json, HELP.into(), &json!({ "help": HELP })),
            Command::ShowServers => {
                let live = collect::live_bytes(self.source.pin_dir()).await;
                let snap = collect::snapshot(
                    self.source.as_ref(),
                    &self.history,
                    &live,
                    self.started,
                    &self.handle.reload_status(),
                );
                text_or_json(json, status_table(&snap, false), &snap)
            }
            Command::ShowSessions => {
                let rows = self.sessions().await?;
                text_or_json(json, sessions::table(&rows), &rows)
            }
            Command::SetState {
                listener,
                server,
                state,
            } => {
                let change = self
                    .admin
                    .set(&listener, &server, state, by)
                    .map_err(|e| e.to_string())?;
                let value = json!({
                    "listener": listener,
                    "server": server,
                    "state": change.state.as_str(),
                    "previous": change.previous.as_str(),
                });
                text_or_json(
                    json,
                    format!("{}\n", change.describe(&listener, &server)),
                    &value,
                )
            }
            Command::Reload => {
                let summary = self.handle.reload().await?;
                text_or_json(
                    json,
                    format!("{}\n", summary.trim_end()),
                    &json!({ "reloaded": true, "summary": summary }),
                )
            }
        })
    }

    async fn sessions(&self) -> Result<Vec<sessions::SessionRow>, String> {
        let Some(dir) = self.source.pin_dir().map(ToOwned::to_owned) else {
            return Err(format!(
                "show sessions lists the sockmap path's sessions (the kernel's SESSIONS map); \
                 this daemon runs the {} path, whose sessions `show servers` counts",
                self.source.data_path()
            ));
        };
        // One syscall per entry: off the async worker, like the stats server's reads.
        let (open, flows, sockets) = tokio::task::spawn_blocking(move || {
            let open = OpenSessions::read(&dir).map_err(|e| format!("reading SESSIONS: {e}"))?;
            let flows = OpenFlows::read(&dir).map_err(|e| format!("reading FLOWS: {e}"))?;
            let sockets = sock_diag::tcp_sockets()
                .map_err(|e| format!("reading the sockets' addresses (sock_diag): {e}"))?;
            Ok::<_, String>((open, flows, sockets))
        })
        .await
        .map_err(|e| format!("reading SESSIONS: {e}"))??;
        Ok(sessions::rows(
            &open,
            &flows,
            &sockets,
            &sessions::BackendNames::of_ids(self.source.server_ids()),
            monotonic_ns(),
        ))
    }
}

/// `text`, or `value` as pretty JSON when the request asked for JSON.
fn text_or_json<T: Serialize + ?Sized>(json: bool, text: String, value: &T) -> String {
    if !json {
        return text;
    }
    let mut out = serde_json::to_string_pretty(value).expect("answers serialize");
    out.push('\n');
    out
}
