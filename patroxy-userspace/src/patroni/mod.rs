//! Health checking of Patroni nodes with HAProxy's semantics.
//!
//! # Layout
//! - `client`: one HTTP(S) check against Patroni's REST API, classified the way HAProxy reports it
//!   (L4OK, L7STS, ...), with the role and timeline read from the JSON body.
//! - `health`: the pure hysteresis state machine (rise/fall counter, status strings, intervals).
//! - `checker`: the tokio tasks that run checks on schedule and publish a [`HealthSnapshot`].
//! - `dcs`: the optional watch of Patroni's leader key in etcd, which fences a leader the key
//!   left and speeds up finding the new one; the checker applies what it reports.
//!
//! The checker owns all check state; everyone else reads the published snapshot, which is
//! immutable, so readers never lock and never see half an update.
use crate::config::model::Config;

pub mod checker;
pub mod client;
pub mod dcs;
pub mod health;

pub use checker::{Checker, HealthSnapshot, LeaderEvents, ServerSnapshot, spawn_checker};
pub use client::{CheckOutcome, CheckStatus, Role};
pub use health::{ServerHealth, ServerState};

/// A backend: a server of a listener. The same Patroni node listed in two listeners is two
/// backends (they carry different traffic and may be in different states).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendKey {
    /// Index into `Config::listeners`.
    pub listener: usize,
    /// Index into that listener's `servers`, in file order.
    pub server: usize,
}

/// The BackendId used in the BPF maps: 1 + the running index over listeners in order, servers in
/// order. 0 stays free so a zeroed map value never names a real backend. `None` if the key does
/// not exist in `config`.
pub fn backend_id(config: &Config, key: BackendKey) -> Option<u32> {
    let listener = config.listeners.get(key.listener)?;
    if key.server >= listener.servers.len() {
        return None;
    }
    let before: usize = config.listeners[..key.listener]
        .iter()
        .map(|l| l.servers.len())
        .sum();
    u32::try_from(1 + before + key.server).ok()
}

/// The BackendId of server `server` of listener `listener`, by name: the one lookup from a
/// server's identity to the id the BPF maps (BACKENDS, SESSIONS), stats and logs use, for
/// whoever identifies servers by name (the operator's commands, a process taking over
/// sessions). Stable across reloads: a reload keeps every listener and server where it was
/// (`config::diff` refuses one that would not).
pub fn id_of(config: &Config, listener: &str, server: &str) -> Option<u32> {
    let li = config.listeners.iter().position(|l| l.name == listener)?;
    let si = config.listeners[li]
        .servers
        .iter()
        .position(|s| s.name == server)?;
    backend_id(
        config,
        BackendKey {
            listener: li,
            server: si,
        },
    )
}

/// Every backend of `config` with its BackendId, in id order.
pub fn backends(config: &Config) -> impl Iterator<Item = (BackendKey, u32)> + '_ {
    config
        .listeners
        .iter()
        .enumerate()
        .flat_map(|(li, l)| {
            (0..l.servers.len()).map(move |si| BackendKey {
                listener: li,
                server: si,
            })
        })
        .zip(1u32..)
}

#[cfg(test)]
pub(crate) mod test_config {
    //! Config values built directly (the TOML parser is another module's concern).
    use crate::config::model::*;
    use std::{net::SocketAddr, time::Duration};

    pub fn timing(inter_ms: u64, fast_ms: u64, down_ms: u64, rise: u32, fall: u32) -> CheckTiming {
        CheckTiming {
            inter: Duration::from_millis(inter_ms),
            fastinter: Duration::from_millis(fast_ms),
            downinter: Duration::from_millis(down_ms),
            rise,
            fall,
        }
    }

    pub fn server(name: &str, check_addr: SocketAddr, timing: CheckTiming) -> ServerSpec {
        ServerSpec {
            name: name.into(),
            address: "127.0.0.1:5432".parse().unwrap(),
            check_addr,
            maxconn: None,
            timing,
            on_marked_down: OnMarkedDown::ShutdownSessions,
            on_marked_up: OnMarkedUp::Nothing,
            init_state: InitState::Down,
        }
    }

    pub fn check(path: &str, authoritative: bool) -> HealthCheck {
        HealthCheck {
            method: CheckMethod::Get,
            path: path.into(),
            expect_status: 200,
            tls: None,
            authoritative,
        }
    }

    pub fn listener(name: &str, check: Option<HealthCheck>, servers: Vec<ServerSpec>) -> Listener {
        Listener {
            name: name.into(),
            bind: "127.0.0.1:0".parse().unwrap(),
            balance: Balance::First,
            check,
            servers,
        }
    }

    pub fn config(listeners: Vec<Listener>, timeout_check: Option<Duration>) -> Config {
        Config {
            global: Global {
                maxconn: 100,
                bpf: BpfMode::Off,
                pin_path: "/sys/fs/bpf/patroxy".into(),
                bpf_log: false,
                bpf_log_rate: 100,
                session_log_rate: 100,
            },
            defaults: Defaults {
                retries: 3,
                redispatch: true,
                timeout_client: Duration::from_secs(30),
                timeout_server: Duration::from_secs(30),
                timeout_connect: Duration::from_secs(1),
                timeout_check,
                timeout_queue: Duration::from_secs(1),
                timeout_startup: Duration::from_secs(10),
            },
            listeners,
            stats: None,
            runtime: None,
            dcs: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_config::*;
    use super::*;

    #[test]
    fn backend_ids_run_over_listeners_then_servers() {
        let a: std::net::SocketAddr = "127.0.0.1:8008".parse().unwrap();
        let t = timing(100, 50, 100, 2, 3);
        let cfg = config(
            vec![
                listener("w", None, vec![server("a", a, t), server("b", a, t)]),
                listener("r", None, vec![server("a", a, t), server("b", a, t)]),
            ],
            None,
        );
        let key = |listener, server| BackendKey { listener, server };
        assert_eq!(backend_id(&cfg, key(0, 0)), Some(1));
        assert_eq!(backend_id(&cfg, key(0, 1)), Some(2));
        assert_eq!(backend_id(&cfg, key(1, 0)), Some(3));
        assert_eq!(backend_id(&cfg, key(1, 1)), Some(4));
        assert_eq!(backend_id(&cfg, key(1, 2)), None);
        assert_eq!(backend_id(&cfg, key(2, 0)), None);
        assert_eq!(id_of(&cfg, "r", "b"), Some(4));
        assert_eq!(id_of(&cfg, "w", "a"), Some(1));
        assert_eq!(id_of(&cfg, "r", "c"), None);
        assert_eq!(id_of(&cfg, "x", "a"), None);
        let all: Vec<_> = backends(&cfg).collect();
        assert_eq!(all.len(), 4);
        for (k, id) in all {
            assert_eq!(backend_id(&cfg, k), Some(id));
        }
    }
}
