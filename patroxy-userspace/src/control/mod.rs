//! The runtime socket, HAProxy's `stats socket` habit: a unix socket on which `patroxy ctl` (or
//! `socat`) sends one command line and reads the answer: `show servers`, `show sessions`,
//! `set state <listener>/<server> ready|drain|maint`, `reload`, `help`.
//!
//! Access control is the socket file's permissions alone (owner, group and mode of
//! `[runtime]`): whoever may connect may run every command, as with HAProxy's `level admin`.
//! Like the stats server it runs on its own thread and runtime, serves at most `[runtime]
//! maxconn` connections at once, and gives each a deadline, so it can neither slow the proxy
//! down nor hold up its exit.
//!
//! # Layout
//! - `protocol`: the request line, parsed (pure), and the help text.
//! - `commands`: what each command does and its answer, in text or JSON.
//! - `socket`: the socket file: created with its permissions, a stale one replaced, removed on
//!   exit.
//! - `server`: its thread, connection cap, timeouts and shutdown.
pub mod commands;
pub mod protocol;
pub mod server;
pub mod socket;

use std::{future::Future, pin::Pin};

use crate::reload::{ReloadStatus, Reloader};

pub use server::serve;
pub use socket::{BindError, BoundSocket, HandOver, adopt, bind};

/// What `reload` answers: a summary of what changed, or every error found (the running
/// configuration then stays as it was).
pub type ReloadFuture<'a> = Pin<Box<dyn Future<Output = Result<String, String>> + Send + 'a>>;

/// The daemon's entry points the runtime socket drives beyond what the stats read and the
/// operator's states: handed in at start, so the socket holds nothing else of the daemon.
pub trait ControlHandle: Send + Sync {
    /// Re-reads the configuration file and applies it.
    fn reload(&self) -> ReloadFuture<'_>;
    /// Reloads so far and the last one's outcome, for `show servers`' snapshot.
    fn reload_status(&self) -> ReloadStatus;
}

/// The daemon's one reload entry point (SIGHUP and `POST /admin/reload` use it too).
impl ControlHandle for Reloader {
    fn reload_status(&self) -> ReloadStatus {
        self.status()
    }

    fn reload(&self) -> ReloadFuture<'_> {
        Box::pin(async move {
            match Reloader::reload(self).await {
                Ok(summary) if summary.changes.is_empty() => {
                    Ok("configuration reloaded: nothing changed".to_string())
                }
                Ok(summary) => Ok(format!(
                    "configuration reloaded:\n{}",
                    summary.changes.join("\n")
                )),
                Err(e) => Err(format!("reload refused, running configuration kept:\n{e}")),
            }
        })
    }
}
