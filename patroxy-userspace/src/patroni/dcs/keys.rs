//! Patroni's etcd3 keys, read: `<namespace>/<scope>/leader` holds the leader's member name,
//! `<namespace>/<scope>/members/<name>` a JSON object with the member's `conn_url` and
//! `api_url`. Pure: parsing, the cluster as the keys describe it, and which configured server
//! a member is.
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
};

use serde::Deserialize;

use crate::config::ServerSpec;

/// The keys of one Patroni cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterKeys {
    /// `<namespace>/<scope>/`, the prefix the watch reads and follows.
    prefix: String,
}

/// What a key under the prefix is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind<'a> {
    Leader,
    Member(&'a str),
    /// Patroni's other keys (config, status, history, failover, sync, ...).
    Other,
}

impl ClusterKeys {
    /// `namespace` as validated: a leading `/`, no trailing one.
    pub fn new(namespace: &str, scope: &str) -> Self {
        ClusterKeys {
            prefix: format!("{namespace}/{scope}/"),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn leader(&self) -> String {
        format!("{}leader", self.prefix)
    }

    pub fn kind<'a>(&self, key: &'a str) -> KeyKind<'a> {
        match key.strip_prefix(&self.prefix) {
            Some("leader") => KeyKind::Leader,
            Some(rest) => match rest.strip_prefix("members/") {
                Some(name) if !name.is_empty() && !name.contains('/') => KeyKind::Member(name),
                _ => KeyKind::Other,
            },
            None => KeyKind::Other,
        }
    }
}

/// A member key's value: where the member's PostgreSQL and REST API listen.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct Member {
    pub conn_url: Option<String>,
    pub api_url: Option<String>,
}

impl Member {
    /// A member key's JSON; `None` for anything else (the watch then matches the member by name).
    pub fn parse(value: &[u8]) -> Option<Member> {
        serde_json::from_slice(value).ok()
    }
}

/// A leader key that moved: deleted (`to` None), or naming another member.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaderChange {
    pub from: Option<String>,
    pub to: Option<String>,
}

/// The cluster as its keys say: the leader, and every member seen so far. A member whose key
/// expired is kept: its last URLs still say which server the old leader was.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterView {
    pub leader: Option<String>,
    pub members: BTreeMap<String, Member>,
}

impl ClusterView {
    /// A put of `key`; returns the leader change it makes, if any. Patroni rewrites its leader
    /// key on every loop with the same value: that is no change.
    pub fn put(&mut self, keys: &ClusterKeys, key: &str, value: &[u8]) -> Option<LeaderChange> {
        match keys.kind(key) {
            KeyKind::Leader => {
                let name = String::from_utf8_lossy(value).trim().to_owned();
                self.set_leader((!name.is_empty()).then_some(name))
            }
            KeyKind::Member(name) => {
                if let Some(member) = Member::parse(value) {
                    self.members.insert(name.to_owned(), member);
                }
                None
            }
            KeyKind::Other => None,
        }
    }

    /// A delete (or expiry) of `key`.
    pub fn delete(&mut self, keys: &ClusterKeys, key: &str) -> Option<LeaderChange> {
        match keys.kind(key) {
            KeyKind::Leader => self.set_leader(None),
            _ => None,
        }
    }

    /// Takes a fresh read of the whole prefix (after a reconnect or a compaction): the leader
    /// it names now, compared with the one known before.
    pub fn reread(
        &mut self,
        keys: &ClusterKeys,
        kvs: &[(String, Vec<u8>)],
    ) -> Option<LeaderChange> {
        let mut read = ClusterView::default();
        for (key, value) in kvs {
            read.put(keys, key, value);
        }
        self.members.extend(read.members);
        self.set_leader(read.leader)
    }

    fn set_leader(&mut self, leader: Option<String>) -> Option<LeaderChange> {
        if self.leader == leader {
            return None;
        }
        let from = std::mem::replace(&mut self.leader, leader.clone());
        Some(LeaderChange { from, to: leader })
    }

    /// The configured server (its name) that member `name` is: the one whose check address is
    /// the member's `api_url` host and port, else whose address is its `conn_url` host and
    /// port, else the one named like the member. Hosts must be IP addresses to match by
    /// address (Patroni writes what its `connect_address` settings say).
    pub fn server_of<'s>(&self, name: &str, servers: &'s [ServerSpec]) -> Option<&'s str> {
        let member = self.members.get(name);
        let api = member.and_then(|m| url_addr(m.api_url.as_deref()?, 8008));
        let conn = member.and_then(|m| url_addr(m.conn_url.as_deref()?, 5432));
        servers
            .iter()
            .find(|s| api == Some(s.check_addr))
            .or_else(|| servers.iter().find(|s| conn == Some(s.address)))
            .or_else(|| servers.iter().find(|s| s.name == name))
            .map(|s| s.name.as_str())
    }
}

/// `scheme://host:port/...` as a socket address, `default_port` when the URL has none.
fn url_addr(url: &str, default_port: u16) -> Option<SocketAddr> {
    let url = reqwest::Url::parse(url).ok()?;
    let host = url.host_str()?;
    let ip: IpAddr = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()?;
    Some(SocketAddr::new(ip, url.port().unwrap_or(default_port)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::patroni::test_config::{server, timing};

    fn keys() -> ClusterKeys {
        ClusterKeys::new("/service", "demo")
    }

    const MEMBER_A: &[u8] = br#"{"conn_url":"postgres://10.0.0.1:5432/postgres","api_url":"http://10.0.0.1:8008/patroni","state":"running","role":"primary","version":"4.1.0"}"#;

    #[test]
    fn keys_are_told_apart() {
        let k = keys();
        assert_eq!(k.leader(), "/service/demo/leader");
        assert_eq!(k.kind("/service/demo/leader"), KeyKind::Leader);
        assert_eq!(k.kind("/service/demo/members/pg1"), KeyKind::Member("pg1"));
        assert_eq!(k.kind("/service/demo/members/"), KeyKind::Other);
        assert_eq!(k.kind("/service/demo/config"), KeyKind::Other);
        assert_eq!(k.kind("/service/demo2/leader"), KeyKind::Other);
        assert_eq!(k.kind("/service/other/leader"), KeyKind::Other);
    }

    #[test]
    fn member_json_gives_its_urls_and_garbage_gives_none() {
        let m = Member::parse(MEMBER_A).unwrap();
        assert_eq!(
            m.conn_url.as_deref(),
            Some("postgres://10.0.0.1:5432/postgres")
        );
        assert_eq!(m.api_url.as_deref(), Some("http://10.0.0.1:8008/patroni"));
        assert_eq!(Member::parse(b"not json"), None);
        assert_eq!(Member::parse(b"{}"), Some(Member::default()));
    }

    #[test]
    fn the_leader_key_changes_only_when_its_value_does() {
        let k = keys();
        let mut v = ClusterView::default();
        let change = |from: Option<&str>, to: Option<&str>| {
            Some(LeaderChange {
                from: from.map(Into::into),
                to: to.map(Into::into),
            })
        };
        assert_eq!(
            v.put(&k, "/service/demo/leader", b"pg1"),
            change(None, Some("pg1"))
        );
        // Patroni's loop rewrites the key with the same value.
        assert_eq!(v.put(&k, "/service/demo/leader", b"pg1"), None);
        assert_eq!(v.put(&k, "/service/demo/members/pg2", MEMBER_A), None);
        assert_eq!(
            v.put(&k, "/service/demo/leader", b"pg2"),
            change(Some("pg1"), Some("pg2"))
        );
        assert_eq!(v.delete(&k, "/service/demo/members/pg2"), None);
        assert!(
            v.members.contains_key("pg2"),
            "an expired member's URLs are kept"
        );
        assert_eq!(
            v.delete(&k, "/service/demo/leader"),
            change(Some("pg2"), None)
        );
        assert_eq!(v.delete(&k, "/service/demo/leader"), None);
        // A re-read after a reconnect finds what changed meanwhile, and only that.
        let kvs = vec![("/service/demo/leader".to_owned(), b"pg3".to_vec())];
        assert_eq!(v.reread(&k, &kvs), change(None, Some("pg3")));
        assert_eq!(v.reread(&k, &kvs), None);
        assert_eq!(v.reread(&k, &[]), change(Some("pg3"), None));
    }

    #[test]
    fn members_map_to_servers_by_api_url_then_conn_url_then_name() {
        let t = timing(100, 50, 100, 2, 3);
        let mut a = server("a", "10.0.0.1:8008".parse().unwrap(), t);
        a.address = "10.0.0.1:5432".parse().unwrap();
        let mut b = server("b", "10.0.0.2:9008".parse().unwrap(), t);
        b.address = "10.0.0.2:5433".parse().unwrap();
        let c = server("pg3", "10.0.0.3:8008".parse().unwrap(), t);
        let servers = [a, b, c];
        let mut v = ClusterView::default();
        let k = keys();
        v.put(&k, "/service/demo/members/pg1", MEMBER_A);
        // Its api_url names another port than b's check: the conn_url decides.
        v.put(
            &k,
            "/service/demo/members/pg2",
            br#"{"conn_url":"postgres://10.0.0.2:5433/postgres","api_url":"http://10.0.0.2:8008/patroni"}"#,
        );
        // A host name cannot be compared with an address: the member's name decides.
        v.put(
            &k,
            "/service/demo/members/pg3",
            br#"{"conn_url":"postgres://db3:5432/postgres","api_url":"http://db3:8008/patroni"}"#,
        );
        assert_eq!(v.server_of("pg1", &servers), Some("a"));
        assert_eq!(v.server_of("pg2", &servers), Some("b"));
        assert_eq!(v.server_of("pg3", &servers), Some("pg3"));
        assert_eq!(v.server_of("pg4", &servers), None);
    }
}
