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

pub use checker::{
    CarriedHealth, Checker, HealthSnapshot, LeaderEvents, ServerSnapshot, spawn_checker,
    spawn_checker_from,
};
pub use client::{CheckOutcome, CheckStatus, Role};
pub use health::{ServerHealth, ServerState};

pub use crate::server_ids::BackendKey;

/// Every backend of `config`, listeners then servers in file order.
pub fn keys(config: &Config) -> impl Iterator<Item = BackendKey> + '_ {
    config
        .listeners
        .iter()
        .enumerate()
        .flat_map(|(listener, l)| {
            (0..l.servers.len()).map(move |server| BackendKey { listener, server })
        })
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
                datapath: crate::config::Datapath::Sockets,
                session_log_rate: 100,
                cancel_rate: 200,
                cancel_rate_per_client: 20,
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
            firewall: Default::default(),
            dcs: None,
        }
    }
}
