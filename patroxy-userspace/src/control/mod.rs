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

pub use server::serve;
pub use socket::{BindError, BoundSocket, bind};

/// What `reload` answers: a summary of what changed, or every error found (the running
/// configuration then stays as it was).
pub type ReloadFuture<'a> = Pin<Box<dyn Future<Output = Result<String, String>> + Send + 'a>>;

/// The daemon's entry points the runtime socket drives beyond what the stats read and the
/// operator's states: handed in at start, so the socket holds nothing else of the daemon.
pub trait ControlHandle: Send + Sync {
    /// Re-reads the configuration file and applies it.
    fn reload(&self) -> ReloadFuture<'_>;
}

/// The handle of a daemon that cannot reload: `reload` says so.
pub struct NoReload;

impl ControlHandle for NoReload {
    fn reload(&self) -> ReloadFuture<'_> {
        Box::pin(async { Err("reload is not available in this build".to_string()) })
    }
}
