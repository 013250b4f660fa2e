//! The operator's administrative state of each server: HAProxy's `set server <backend>/<server>
//! state ready|drain|maint`, taken from the stats server's admin endpoint (`patroxy set-state`).
//!
//! The checker knows nothing of it. This module owns the states and publishes them whole on a
//! watch channel; the proxy folds them into the checker's snapshot ([`crate::view`]) before
//! routing, the data path and the stats see it, so every reader agrees on one combined view:
//! - READY: the server is what its checks say.
//! - DRAIN: load balancing sends it no new session; open ones go on; checks go on ("DRAIN").
//! - MAINT: no new session, checks go on but are ignored ("MAINT" whatever they say), and the
//!   open sessions are handled like a mark-down (`on_marked_down`).
//!
//! Leaving MAINT, a server is again what its checks say *now*: since they kept running, a server
//! whose node was restarted during the maintenance is UP only after `rise` good checks, and one
//! whose checks never failed is UP at once. The states live in memory only: every server is
//! READY after a start (HAProxy without a server-state file behaves the same), and an upgrade or
//! a structural reload hands them to the successor by name ([`CarriedAdmin`]).
use std::{fmt, str::FromStr, sync::Arc};

use tokio::sync::watch;
use tracing::info;

use crate::{config::Config, patroni::BackendKey};

/// What the operator set a server to.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum AdminState {
    #[default]
    Ready,
    Drain,
    Maint,
}

impl AdminState {
    /// The lowercase word the admin endpoint and the JSON use.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ready => "ready",
            Self::Drain => "drain",
            Self::Maint => "maint",
        }
    }
}

/// HAProxy's spelling in logs and stats: READY, DRAIN, MAINT.
impl fmt::Display for AdminState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.as_str().to_ascii_uppercase())
    }
}

/// An admin state word that is not `ready`, `drain` or `maint`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown state {0:?}: expected ready, drain or maint")]
pub struct BadState(pub String);

impl FromStr for AdminState {
    type Err = BadState;

    /// Case-insensitive, as HAProxy's CLI reads it.
    fn from_str(s: &str) -> Result<Self, BadState> {
        match s.to_ascii_lowercase().as_str() {
            "ready" => Ok(Self::Ready),
            "drain" => Ok(Self::Drain),
            "maint" => Ok(Self::Maint),
            _ => Err(BadState(s.to_string())),
        }
    }
}

/// The admin state of every backend, laid out like the health snapshot (listener, then server).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminStates {
    listeners: Vec<Vec<AdminState>>,
}

impl AdminStates {
    /// Every server of `config` READY: the state after a start.
    pub fn ready(config: &Config) -> Self {
        Self {
            listeners: config
                .listeners
                .iter()
                .map(|l| vec![AdminState::Ready; l.servers.len()])
                .collect(),
        }
    }

    pub fn get(&self, key: BackendKey) -> AdminState {
        self.listeners
            .get(key.listener)
            .and_then(|l| l.get(key.server))
            .copied()
            .unwrap_or_default()
    }
}

/// Why a state change was refused: the names do not exist in the configuration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AdminError {
    #[error("no listener named {0:?}")]
    UnknownListener(String),
    #[error("listener {listener:?} has no server named {server:?}")]
    UnknownServer { listener: String, server: String },
}

/// A change that was applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Change {
    pub key: BackendKey,
    pub previous: AdminState,
    pub state: AdminState,
}

impl Change {
    /// The answer to the operator who made it, the same over HTTP and the runtime socket.
    pub fn describe(&self, listener: &str, server: &str) -> String {
        format!(
            "server {server} of listener {listener} set to {} (was {})",
            self.state, self.previous
        )
    }
}

/// The one writer of the admin states.
pub struct AdminWriter {
    config: Arc<Config>,
    tx: watch::Sender<Arc<AdminStates>>,
}

/// A server's operator state as a predecessor process had it, by name.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CarriedAdmin {
    pub listener: String,
    pub server: String,
    pub state: AdminState,
}

impl AdminWriter {
    pub fn new(config: Arc<Config>) -> Self {
        Self::carried_over(config, &[])
    }

    /// Starts where a predecessor was: a server still configured keeps the state the operator
    /// gave it; the others are READY.
    pub fn carried_over(config: Arc<Config>, carried: &[CarriedAdmin]) -> Self {
        let mut states = AdminStates::ready(&config);
        for (li, l) in config.listeners.iter().enumerate() {
            for (si, s) in l.servers.iter().enumerate() {
                if let Some(c) = carried
                    .iter()
                    .find(|c| c.listener == l.name && c.server == s.name)
                {
                    states.listeners[li][si] = c.state;
                }
            }
        }
        let (tx, _) = watch::channel(Arc::new(states));
        Self { config, tx }
    }

    /// What a successor needs to start where the operator left the servers: those not READY.
    pub fn carry(&self) -> Vec<CarriedAdmin> {
        let states = self.tx.borrow();
        let mut carried = Vec::new();
        for (l, ls) in self.config.listeners.iter().zip(&states.listeners) {
            for (s, &state) in l.servers.iter().zip(ls) {
                if state != AdminState::Ready {
                    carried.push(CarriedAdmin {
                        listener: l.name.clone(),
                        server: s.name.clone(),
                        state,
                    });
                }
            }
        }
        carried
    }

    /// A receiver that holds the current states at once and sees every change.
    pub fn subscribe(&self) -> watch::Receiver<Arc<AdminStates>> {
        self.tx.subscribe()
    }

    /// Sets server `server` of listener `listener` to `state` and logs who (`by`) did it.
    /// Setting the state a server is already in is not an error (HAProxy's CLI accepts it too).
    pub fn set(
        &self,
        listener: &str,
        server: &str,
        state: AdminState,
        by: impl fmt::Display,
    ) -> Result<Change, AdminError> {
        let key = self.find(listener, server)?;
        let mut previous = AdminState::Ready;
        // Setting the current state again wakes nobody.
        self.tx.send_if_modified(|states| {
            previous = states.listeners[key.listener][key.server];
            if previous == state {
                return false;
            }
            Arc::make_mut(states).listeners[key.listener][key.server] = state;
            true
        });
        info!("server {server} of listener {listener} set to {state} by {by} (was {previous})");
        Ok(Change {
            key,
            previous,
            state,
        })
    }

    fn find(&self, listener: &str, server: &str) -> Result<BackendKey, AdminError> {
        let (li, l) = self
            .config
            .listeners
            .iter()
            .enumerate()
            .find(|(_, l)| l.name == listener)
            .ok_or_else(|| AdminError::UnknownListener(listener.to_string()))?;
        let si = l
            .servers
            .iter()
            .position(|s| s.name == server)
            .ok_or_else(|| AdminError::UnknownServer {
                listener: listener.to_string(),
                server: server.to_string(),
            })?;
        Ok(BackendKey {
            listener: li,
            server: si,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::patroni::test_config::*;

    /// Listener "w" with servers "a" and "b", listener "r" with a server "b" of its own.
    pub(crate) fn two_listeners() -> Arc<Config> {
        let a: SocketAddr = "127.0.0.1:8008".parse().unwrap();
        let t = timing(100, 50, 100, 2, 3);
        Arc::new(config(
            vec![
                listener("w", None, vec![server("a", a, t), server("b", a, t)]),
                listener("r", None, vec![server("b", a, t)]),
            ],
            None,
        ))
    }

    #[test]
    fn states_parse_like_haproxy_and_print_upper_case() {
        assert_eq!("ready".parse(), Ok(AdminState::Ready));
        assert_eq!("DRAIN".parse(), Ok(AdminState::Drain));
        assert_eq!("Maint".parse(), Ok(AdminState::Maint));
        assert_eq!(
            "up".parse::<AdminState>(),
            Err(BadState("up".into())),
            "HAProxy has no `up` admin state"
        );
        assert_eq!(AdminState::Maint.to_string(), "MAINT");
        assert_eq!(AdminState::Drain.as_str(), "drain");
    }

    #[test]
    fn set_publishes_and_reports_the_previous_state() {
        let admin = AdminWriter::new(two_listeners());
        let mut rx = admin.subscribe();
        let key = BackendKey {
            listener: 1,
            server: 0,
        };
        assert_eq!(rx.borrow().get(key), AdminState::Ready);
        let change = admin.set("r", "b", AdminState::Maint, "test").unwrap();
        assert_eq!(
            change,
            Change {
                key,
                previous: AdminState::Ready,
                state: AdminState::Maint
            }
        );
        assert!(rx.has_changed().unwrap());
        let states = rx.borrow_and_update().clone();
        assert_eq!(states.get(key), AdminState::Maint);
        // The same server name in another listener is another backend.
        assert_eq!(
            states.get(BackendKey {
                listener: 0,
                server: 1
            }),
            AdminState::Ready
        );
        let again = admin.set("r", "b", AdminState::Ready, "test").unwrap();
        assert_eq!(again.previous, AdminState::Maint);
        assert_eq!(rx.borrow().get(key), AdminState::Ready);
    }

    #[test]
    fn unknown_names_are_refused_and_change_nothing() {
        let admin = AdminWriter::new(two_listeners());
        let rx = admin.subscribe();
        assert_eq!(
            admin.set("x", "a", AdminState::Maint, "test"),
            Err(AdminError::UnknownListener("x".into()))
        );
        assert_eq!(
            admin.set("r", "a", AdminState::Maint, "test"),
            Err(AdminError::UnknownServer {
                listener: "r".into(),
                server: "a".into()
            })
        );
        assert!(!rx.has_changed().unwrap());
    }

    #[test]
    fn a_successor_keeps_the_states_of_servers_still_configured() {
        let admin = AdminWriter::new(two_listeners());
        admin.set("w", "b", AdminState::Drain, "test").unwrap();
        admin.set("r", "b", AdminState::Maint, "test").unwrap();
        let carried = admin.carry();
        assert_eq!(carried.len(), 2);
        // Listener "r" is gone in the successor's configuration.
        let mut config = (*two_listeners()).clone();
        config.listeners.truncate(1);
        let successor = AdminWriter::carried_over(Arc::new(config), &carried);
        let states = successor.subscribe().borrow().clone();
        let key = |listener, server| BackendKey { listener, server };
        assert_eq!(states.get(key(0, 0)), AdminState::Ready);
        assert_eq!(states.get(key(0, 1)), AdminState::Drain);
        assert_eq!(successor.carry().len(), 1);
    }
}
