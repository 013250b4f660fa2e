//! The DCS watch (optional, `[dcs]`): Patroni's leader key in etcd v3, followed so that a
//! failover costs the proxy no more than Patroni's own decision.
//!
//! When the leader key is deleted (released in a switchover, expired after a crash, a cut-off
//! or a frozen leader) or names another member, the server the key named is taken DOWN at once
//! on the leader listeners (see `gate`), which the proxy's mark-down path turns into a fence in
//! BACKENDS and reset sessions (per `on_marked_down`, shutdown-sessions by default): it is
//! demoting or gone, and what it accepts now is lost or refused. Those listeners then check in
//! a fast burst, and the new primary is UP on its first `/primary` 200 with a newer timeline.
//!
//! While the watch reads the key naming another server, a leader listener's other servers stay
//! DOWN whatever their checks say (Patroni lets only the key's holder be the primary; a 200
//! from the old one is a moment of its demotion).
//!
//! The checks stay the truth: a lost connection or a watch error marks nothing down and
//! releases what the watch held down (Patroni's failsafe mode can keep a leader without the
//! DCS); the watch reconnects and re-reads.
//!
//! # Layout
//! - `keys`: Patroni's etcd3 keys and member JSON, the cluster they describe, member -> server.
//! - `gate`: what a leader change may do to the checker's state (pure, kept by the checker).
//! - `watch`: the etcd client task: read, watch from the read's revision, reconnect.
use std::time::SystemTime;

pub mod gate;
pub mod keys;
pub mod watch;

pub use gate::LeaderGate;
pub use watch::spawn_watch;

/// What the stats show of the watch; published with every health snapshot.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DcsStatus {
    /// The etcd endpoints, as configured.
    pub endpoints: Vec<String>,
    /// The key watched: `<namespace>/<scope>/leader`.
    pub leader_key: String,
    /// Whether the last read or watch of etcd succeeded and the watch is running.
    pub connected: bool,
    /// The member the leader key names now (as last read), and the configured server it is.
    pub leader: Option<String>,
    pub leader_server: Option<String>,
    /// Leader key changes seen (deleted, or naming another member).
    pub leader_changes: u64,
    /// The last leader change or connection change, and when.
    pub last_event: Option<(SystemTime, String)>,
    /// Failed connections, reads and watches since start.
    pub errors: u64,
    pub last_error: Option<String>,
}
