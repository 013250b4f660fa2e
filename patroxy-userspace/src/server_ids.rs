//! The backend ids the BPF maps (BACKENDS, SESSIONS' `backend`), the stats and the logs use
//! for each server of each listener, kept for as long as that server is configured.
//!
//! A fresh start numbers the servers in file order from 1 (0 stays free, so a zeroed map value
//! never names a real backend). A structural reload or an upgrade hands the table to the
//! successor process, which [`follows`](ServerIds::follow) its new configuration: a server that
//! stays, (listener name, server name) at the same traffic address, keeps its id; a removed one
//! is retired; an added one gets the next id, never one used before in this lineage of
//! processes. A server moved to another address is a removal and an addition: its open sessions
//! still talk to the old address, and the kernel's entry for them must say so.
//!
//! BACKENDS is a hash map of `MAX_BACKENDS` entries keyed by id, so ids may grow past that; the
//! id space itself (u32) ends after 4 billion additions, and a reload that would need more is
//! refused (a restart numbers from 1 again).
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::config::Config;

/// A backend: a server of a listener. The same Patroni node listed in two listeners is two
/// backends (they carry different traffic and may be in different states). Positions in one
/// configuration: the ids the maps, stats and logs use are [`ServerIds`]'.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendKey {
    /// Index into `Config::listeners`.
    pub listener: usize,
    /// Index into that listener's `servers`, in file order.
    pub server: usize,
}

/// The ids of one configuration's servers, laid out as its listeners and servers are.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerIds {
    listeners: Vec<ListenerIds>,
    /// The next id to give out: above every id ever given in this lineage.
    next: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct ListenerIds {
    name: String,
    servers: Vec<ServerId>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct ServerId {
    name: String,
    address: SocketAddr,
    id: u32,
}

/// What following a new configuration did to the ids: (listener, server, id) each.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdChanges {
    pub retired: Vec<(String, String, u32)>,
    pub added: Vec<(String, String, u32)>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("no backend id left to give out (4 billion used since the last restart): restart patroxy")]
pub struct IdsExhausted;

impl ServerIds {
    /// A fresh start: servers numbered in file order, listeners then servers, from 1.
    pub fn fresh(config: &Config) -> Self {
        let empty = ServerIds {
            listeners: Vec::new(),
            next: 1,
        };
        empty
            .follow(config)
            .expect("a fresh table has every id left")
            .0
    }

    /// The table for `config` as a successor of this one sees it (see the module doc).
    pub fn follow(&self, config: &Config) -> Result<(ServerIds, IdChanges), IdsExhausted> {
        let mut next = self.next;
        let mut changes = IdChanges::default();
        let mut listeners = Vec::with_capacity(config.listeners.len());
        for l in &config.listeners {
            let mut servers = Vec::with_capacity(l.servers.len());
            for s in &l.servers {
                let kept = self
                    .find(&l.name, &s.name)
                    .filter(|old| old.address == s.address);
                let id = match kept {
                    Some(old) => old.id,
                    None => {
                        let id = next;
                        next = next.checked_add(1).ok_or(IdsExhausted)?;
                        changes.added.push((l.name.clone(), s.name.clone(), id));
                        id
                    }
                };
                servers.push(ServerId {
                    name: s.name.clone(),
                    address: s.address,
                    id,
                });
            }
            listeners.push(ListenerIds {
                name: l.name.clone(),
                servers,
            });
        }
        let table = ServerIds { listeners, next };
        for l in &self.listeners {
            for s in &l.servers {
                if table.id_of(&l.name, &s.name) != Some(s.id) {
                    changes.retired.push((l.name.clone(), s.name.clone(), s.id));
                }
            }
        }
        Ok((table, changes))
    }

    fn find(&self, listener: &str, server: &str) -> Option<&ServerId> {
        self.listeners
            .iter()
            .find(|l| l.name == listener)?
            .servers
            .iter()
            .find(|s| s.name == server)
    }

    /// The id of server `server` of listener `listener`, by name: the one lookup for whoever
    /// identifies servers by name (the operator's commands, a process taking sessions over).
    pub fn id_of(&self, listener: &str, server: &str) -> Option<u32> {
        self.find(listener, server).map(|s| s.id)
    }

    /// The id of the backend at `key` (positions in the configuration this table was made for).
    pub fn id(&self, key: BackendKey) -> Option<u32> {
        Some(
            self.listeners
                .get(key.listener)?
                .servers
                .get(key.server)?
                .id,
        )
    }

    /// Every backend with its id, listeners then servers in file order.
    pub fn backends(&self) -> impl Iterator<Item = (BackendKey, u32)> + '_ {
        self.listeners.iter().enumerate().flat_map(|(li, l)| {
            l.servers.iter().enumerate().map(move |(si, s)| {
                (
                    BackendKey {
                        listener: li,
                        server: si,
                    },
                    s.id,
                )
            })
        })
    }

    /// Where backend `id` is in [`backends`](Self::backends)' order: the index of the
    /// per-backend counters and queues.
    pub fn position(&self, id: u32) -> Option<usize> {
        self.backends().position(|(_, i)| i == id)
    }

    /// (listener name, server name) of backend `id`.
    pub fn names(&self, id: u32) -> Option<(&str, &str)> {
        self.listeners.iter().find_map(|l| {
            l.servers
                .iter()
                .find(|s| s.id == id)
                .map(|s| (l.name.as_str(), s.name.as_str()))
        })
    }

    /// Whether `id` was given out in this lineage (to a server here or a retired one).
    pub fn given(&self, id: u32) -> bool {
        id != 0 && id < self.next
    }

    pub fn len(&self) -> usize {
        self.listeners.iter().map(|l| l.servers.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::patroni::test_config::*;

    fn two_listeners() -> Config {
        let a = "127.0.0.1:8008".parse().unwrap();
        let t = timing(100, 50, 100, 2, 3);
        config(
            vec![
                listener("w", None, vec![server("a", a, t), server("b", a, t)]),
                listener("r", None, vec![server("a", a, t), server("b", a, t)]),
            ],
            None,
        )
    }

    #[test]
    fn a_fresh_start_numbers_listeners_then_servers_from_one() {
        let ids = ServerIds::fresh(&two_listeners());
        let key = |listener, server| BackendKey { listener, server };
        assert_eq!(ids.id(key(0, 0)), Some(1));
        assert_eq!(ids.id(key(0, 1)), Some(2));
        assert_eq!(ids.id(key(1, 0)), Some(3));
        assert_eq!(ids.id(key(1, 1)), Some(4));
        assert_eq!(ids.id(key(1, 2)), None);
        assert_eq!(ids.id(key(2, 0)), None);
        assert_eq!(ids.id_of("r", "b"), Some(4));
        assert_eq!(ids.id_of("r", "c"), None);
        assert_eq!(ids.names(3), Some(("r", "a")));
        assert_eq!(ids.position(3), Some(2));
        assert_eq!(ids.backends().count(), 4);
    }

    #[test]
    fn servers_that_stay_keep_their_ids_and_new_ones_are_never_reused() {
        let old = two_listeners();
        let ids = ServerIds::fresh(&old);
        // w/a removed, w/c added, r/b moved, a listener x added, the order changed.
        let mut new = old.clone();
        new.listeners[0].servers.remove(0);
        let mut c = new.listeners[0].servers[0].clone();
        c.name = "c".into();
        new.listeners[0].servers.push(c);
        new.listeners[1].servers[1].address = "127.0.0.2:5432".parse().unwrap();
        let mut x = new.listeners[1].clone();
        x.name = "x".into();
        x.servers.truncate(1);
        new.listeners.insert(0, x);
        let (next, changes) = ids.follow(&new).unwrap();
        assert_eq!(next.id_of("w", "b"), Some(2));
        assert_eq!(next.id_of("r", "a"), Some(3));
        assert_eq!(next.id_of("x", "a"), Some(5));
        assert_eq!(next.id_of("w", "c"), Some(6));
        assert_eq!(next.id_of("r", "b"), Some(7));
        assert_eq!(
            changes.retired,
            [("w".into(), "a".into(), 1), ("r".into(), "b".into(), 4)]
        );
        assert_eq!(changes.added.len(), 3);
        // Removing and adding w/a again gives it a new id, not 1.
        let (without, _) = next.follow(&new).unwrap();
        let (again, _) = without.follow(&old).unwrap();
        assert_eq!(again.id_of("w", "a"), Some(8));
        // The same file keeps every id.
        assert_eq!(
            again.follow(&old).unwrap(),
            (again.clone(), IdChanges::default())
        );
    }

    #[test]
    fn the_id_space_ending_refuses_the_reload() {
        let config = two_listeners();
        let mut ids = ServerIds::fresh(&config);
        ids.next = u32::MAX - 1;
        let mut new = config.clone();
        new.listeners[0].servers[0].name = "c".into();
        assert_eq!(ids.follow(&new).map(|_| ()), Ok(()));
        new.listeners[0].servers[1].name = "d".into();
        assert_eq!(ids.follow(&new), Err(IdsExhausted));
    }
}
