//! What a reload changes: the running `Config` against a newly validated one.
//!
//! Settings are applied in place: timeouts, retries, limits (global and per-server maxconn),
//! check settings and timings, `on_marked_down`/`on_marked_up`, balance, the stats page's
//! `refresh` and `admin` access, and the `[[allow]]` rules and XDP SYN rate (map updates in the
//! kernel). A change to the set of listeners and servers (added, removed, reordered, rebound,
//! moved to another address), to the stats or runtime socket's bind or limits, or to
//! `session_log_rate` or the cancel rates is *structural*: the process's per-server structures
//! are laid out by it, so the reload starts a successor process with the new file (see
//! `reload`). The data path's settings (`bpf`, `pin_path`, `bpf_log*`, `[xdp]`'s `enabled`,
//! `interfaces` and `mode`) and `[dcs]` (the DCS watch) need a restart: the successor takes the
//! pinned maps and programs over as they are; they refuse the whole reload with one line each,
//! and the running config stays as it was.
use std::fmt::Debug;

use super::{
    admin_token::AdminToken,
    model::{AllowRule, Config, Listener, ServerSpec},
};

/// What applying `new` over `old` changes, one line per changed setting.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConfigDiff {
    /// Settings the running process applies in place.
    pub changes: Vec<String>,
    /// Changes only a successor process can apply; empty for an in-place reload.
    pub structural: Vec<String>,
}

impl ConfigDiff {
    /// Every change, one line each: the in-place ones, then the structural ones.
    pub fn lines(&self) -> Vec<String> {
        self.changes
            .iter()
            .chain(&self.structural)
            .cloned()
            .collect()
    }
}

/// One line per change the running process cannot apply (the reload is refused).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.join("\n"))]
pub struct NeedsRestart(pub Vec<String>);

/// Compares `old` and `new`; `Err` lists what a reload cannot apply.
pub fn diff(old: &Config, new: &Config) -> Result<ConfigDiff, NeedsRestart> {
    let mut d = Differ::default();
    let (og, ng) = (&old.global, &new.global);
    d.restart("global.bpf", &og.bpf, &ng.bpf);
    d.restart("global.pin_path", &og.pin_path, &ng.pin_path);
    d.restart("global.bpf_log", &og.bpf_log, &ng.bpf_log);
    d.restart("global.datapath", &og.datapath, &ng.datapath);
    d.restart("global.bpf_log_rate", &og.bpf_log_rate, &ng.bpf_log_rate);
    d.structural(
        "global.session_log_rate",
        &og.session_log_rate,
        &ng.session_log_rate,
    );
    // The cancel limiter is built at start, like the session log's: a successor gets new rates.
    d.structural("global.cancel_rate", &og.cancel_rate, &ng.cancel_rate);
    d.structural(
        "global.cancel_rate_per_client",
        &og.cancel_rate_per_client,
        &ng.cancel_rate_per_client,
    );
    d.change("global.maxconn", &og.maxconn, &ng.maxconn);
    let (od, nd) = (&old.defaults, &new.defaults);
    d.change("defaults.retries", &od.retries, &nd.retries);
    d.change("defaults.redispatch", &od.redispatch, &nd.redispatch);
    d.change(
        "defaults.timeout_client",
        &od.timeout_client,
        &nd.timeout_client,
    );
    d.change(
        "defaults.timeout_server",
        &od.timeout_server,
        &nd.timeout_server,
    );
    d.change(
        "defaults.timeout_connect",
        &od.timeout_connect,
        &nd.timeout_connect,
    );
    d.change(
        "defaults.timeout_check",
        &od.timeout_check,
        &nd.timeout_check,
    );
    d.change(
        "defaults.timeout_queue",
        &od.timeout_queue,
        &nd.timeout_queue,
    );
    d.change(
        "defaults.timeout_startup",
        &od.timeout_startup,
        &nd.timeout_startup,
    );
    d.listeners(&old.listeners, &new.listeners);
    match (&old.stats, &new.stats) {
        (Some(o), Some(n)) => {
            d.structural("stats.bind", &o.bind, &n.bind);
            d.structural("stats.maxconn", &o.maxconn, &n.maxconn);
            d.change("stats.refresh", &o.refresh, &n.refresh);
            d.change("stats.admin", &o.admin, &n.admin);
            d.admin_token(&o.admin_token, &n.admin_token);
        }
        (None, None) => {}
        (o, n) => d.structural("[stats]", &o.is_some(), &n.is_some()),
    }
    d.structural("[runtime]", &old.runtime, &new.runtime);
    let (of, nf) = (&old.firewall, &new.firewall);
    d.restart("xdp.enabled", &of.xdp.enabled, &nf.xdp.enabled);
    d.restart("xdp.interfaces", &of.xdp.interfaces, &nf.xdp.interfaces);
    d.restart("xdp.mode", &of.xdp.mode, &nf.xdp.mode);
    d.change("xdp.syn_rate", &of.xdp.syn_limit, &nf.xdp.syn_limit);
    d.allow_rules(&of.rules, &nf.rules);
    // The watch holds one etcd connection made at start-up; a new one (endpoints, TLS, auth,
    // namespace, scope) is a new start rather than a swap under a running watch.
    d.restart("[dcs]", &old.dcs, &new.dcs);
    if d.restart.is_empty() {
        Ok(ConfigDiff {
            changes: d.changes,
            structural: d.structural,
        })
    } else {
        Err(NeedsRestart(d.restart))
    }
}

#[derive(Default)]
struct Differ {
    changes: Vec<String>,
    structural: Vec<String>,
    restart: Vec<String>,
}

impl Differ {
    fn change<T: PartialEq + Debug>(&mut self, what: &str, old: &T, new: &T) {
        if old != new {
            self.changes.push(format!("{what}: {old:?} -> {new:?}"));
        }
    }

    /// The token is read at load, so a rotated token (same file, new contents) is a change
    /// too; the line names the file, never the token.
    fn admin_token(&mut self, old: &Option<AdminToken>, new: &Option<AdminToken>) {
        if old == new {
            return;
        }
        let path = |t: &Option<AdminToken>| t.as_ref().map(|t| t.path().to_owned());
        let (old_path, new_path) = (path(old), path(new));
        self.changes.push(match (&old_path, &new_path) {
            (Some(p), Some(q)) if p == q => {
                format!("stats.admin_auth_file: {} holds a new token", p.display())
            }
            _ => format!("stats.admin_auth_file: {old_path:?} -> {new_path:?}"),
        });
    }

    fn structural<T: PartialEq + Debug>(&mut self, what: &str, old: &T, new: &T) {
        if old != new {
            self.structural.push(format!("{what}: {old:?} -> {new:?}"));
        }
    }

    fn restart<T: PartialEq + Debug>(&mut self, what: &str, old: &T, new: &T) {
        if old != new {
            self.restart
                .push(format!("{what}: {old:?} -> {new:?} needs a restart"));
        }
    }

    /// The allow rules are map entries in the kernel, rewritten in place: one line per rule
    /// that changed, was added or removed.
    fn allow_rules(&mut self, old: &[AllowRule], new: &[AllowRule]) {
        for i in 0..old.len().max(new.len()) {
            let (o, n) = (old.get(i), new.get(i));
            if o != n {
                let show = |r: Option<&AllowRule>| {
                    r.map_or("none".to_string(), |r| {
                        let from: Vec<String> = r.from.iter().map(ToString::to_string).collect();
                        format!("from {} to {:?}", from.join(","), r.ports)
                    })
                };
                self.changes
                    .push(format!("allow rule {i}: {} -> {}", show(o), show(n)));
            }
        }
    }

    /// Listeners and servers by name: one added, removed or reordered is structural; those
    /// in both are compared setting by setting.
    fn listeners(&mut self, old: &[Listener], new: &[Listener]) {
        self.membership(
            "listener",
            "",
            &old.iter()
                .map(|l| (l.name.as_str(), l.bind))
                .collect::<Vec<_>>(),
            &new.iter()
                .map(|l| (l.name.as_str(), l.bind))
                .collect::<Vec<_>>(),
        );
        for o in old {
            let Some(n) = new.iter().find(|n| n.name == o.name) else {
                continue;
            };
            let at = format!("listener {}", o.name);
            self.structural(&format!("{at}: bind"), &o.bind, &n.bind);
            self.change(&format!("{at}: balance"), &o.balance, &n.balance);
            self.change(&format!("{at}: check"), &o.check, &n.check);
            self.servers(&at, &o.servers, &n.servers);
        }
    }

    /// One structural line per item (name, address) added or removed, and one if the order of
    /// those in both changed.
    fn membership(
        &mut self,
        what: &str,
        at: &str,
        old: &[(&str, std::net::SocketAddr)],
        new: &[(&str, std::net::SocketAddr)],
    ) {
        let has = |items: &[(&str, _)], name: &str| items.iter().any(|(n, _)| *n == name);
        for (name, addr) in new.iter().filter(|(n, _)| !has(old, n)) {
            self.structural
                .push(format!("{at}{what} {name} added ({addr})"));
        }
        for (name, addr) in old.iter().filter(|(n, _)| !has(new, n)) {
            self.structural
                .push(format!("{at}{what} {name} removed ({addr})"));
        }
        let order = |a: &[(&str, std::net::SocketAddr)], b: &[(&str, _)]| {
            a.iter()
                .filter(|(n, _)| has(b, n))
                .map(|(n, _)| n.to_string())
                .collect::<Vec<_>>()
        };
        self.structural(
            &format!("{at}{what} order"),
            &order(old, new),
            &order(new, old),
        );
    }

    fn servers(&mut self, at: &str, old: &[ServerSpec], new: &[ServerSpec]) {
        self.membership(
            "server",
            &format!("{at}: "),
            &old.iter()
                .map(|s| (s.name.as_str(), s.address))
                .collect::<Vec<_>>(),
            &new.iter()
                .map(|s| (s.name.as_str(), s.address))
                .collect::<Vec<_>>(),
        );
        for o in old {
            let Some(n) = new.iter().find(|n| n.name == o.name) else {
                continue;
            };
            let at = format!("{at}: server {}", o.name);
            // A new backend id: its sessions talk to the old address (see `server_ids`).
            self.structural(&format!("{at}: address"), &o.address, &n.address);
            self.change(
                &format!("{at}: check address"),
                &o.check_addr,
                &n.check_addr,
            );
            self.change(&format!("{at}: maxconn"), &o.maxconn, &n.maxconn);
            self.change(&format!("{at}: timing"), &o.timing, &n.timing);
            self.change(
                &format!("{at}: on_marked_down"),
                &o.on_marked_down,
                &n.on_marked_down,
            );
            self.change(
                &format!("{at}: on_marked_up"),
                &o.on_marked_up,
                &n.on_marked_up,
            );
            // Only a new start uses init_state: a running server keeps its check state.
            self.change(&format!("{at}: init_state"), &o.init_state, &n.init_state);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{
        config::model::{AdminAccess, Stats},
        patroni::test_config::*,
    };

    fn two_servers() -> Config {
        let a = "127.0.0.1:8008".parse().unwrap();
        let t = timing(2000, 1000, 2000, 2, 3);
        config(
            vec![listener(
                "w",
                Some(check("/primary", true)),
                vec![server("a", a, t), server("b", a, t)],
            )],
            None,
        )
    }

    #[test]
    fn the_same_file_changes_nothing() {
        assert_eq!(
            diff(&two_servers(), &two_servers()),
            Ok(ConfigDiff::default())
        );
    }

    #[test]
    fn settings_are_applied_with_one_line_each() {
        let old = two_servers();
        let mut new = old.clone();
        new.global.maxconn = 200;
        new.defaults.timeout_connect = Duration::from_secs(2);
        new.listeners[0].servers[1].timing.inter = Duration::from_millis(500);
        new.listeners[0].servers[0].maxconn = Some(5);
        assert_eq!(
            diff(&old, &new).unwrap().changes,
            [
                "global.maxconn: 100 -> 200",
                "defaults.timeout_connect: 1s -> 2s",
                "listener w: server a: maxconn: None -> Some(5)",
                "listener w: server b: timing: CheckTiming { inter: 2s, fastinter: 1s, \
                 downinter: 2s, fall: 3, rise: 2 } -> CheckTiming { inter: 500ms, \
                 fastinter: 1s, downinter: 2s, fall: 3, rise: 2 }",
            ]
        );
    }

    #[test]
    fn a_new_or_rotated_admin_token_is_applied_and_never_printed() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("patroxy-diff-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let token = |name: &str, secret: &str| {
            let path = dir.join(name);
            std::fs::write(&path, secret).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            Some(AdminToken::read(&path).unwrap())
        };
        let with = |admin_token| {
            let mut c = two_servers();
            c.stats = Some(Stats {
                bind: "127.0.0.1:7000".parse().unwrap(),
                refresh: Duration::from_secs(5),
                admin: AdminAccess::Local,
                maxconn: 16,
                admin_token,
            });
            c
        };
        let first = with(token("a", "first-secret-token-0001"));
        let rotated = with(token("a", "second-secret-token-002"));
        let moved = with(token("b", "second-secret-token-002"));
        let changes = |old: &Config, new: &Config| diff(old, new).unwrap().changes;
        let a = dir.join("a").display().to_string();
        assert_eq!(
            changes(&first, &rotated),
            [format!("stats.admin_auth_file: {a} holds a new token")]
        );
        let moved_lines = changes(&rotated, &moved);
        assert_eq!(moved_lines.len(), 1, "{moved_lines:?}");
        assert!(moved_lines[0].contains("/a\") -> Some(") && moved_lines[0].ends_with("/b\")"));
        let dropped = changes(&moved, &with(None));
        assert!(!dropped.join(" ").contains("secret"), "{dropped:?}");
        assert_eq!(dropped.len(), 1, "{dropped:?}");
        assert_eq!(diff(&moved, &moved.clone()), Ok(ConfigDiff::default()));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn servers_and_listeners_added_removed_or_moved_are_structural() {
        let old = two_servers();
        let structural = |new: &Config| {
            let d = diff(&old, new).unwrap();
            assert!(d.changes.is_empty(), "{:?}", d.changes);
            d.structural
        };
        let mut added = old.clone();
        let c = added.listeners[0].servers[0].clone();
        added.listeners[0].servers.push(ServerSpec {
            name: "c".into(),
            ..c
        });
        assert_eq!(
            structural(&added),
            ["listener w: server c added (127.0.0.1:5432)"]
        );
        let mut removed = old.clone();
        removed.listeners[0].servers.remove(0);
        assert_eq!(
            structural(&removed),
            ["listener w: server a removed (127.0.0.1:5432)"]
        );
        let mut moved = old.clone();
        moved.listeners[0].servers[1].address = "127.0.0.2:5432".parse().unwrap();
        assert_eq!(
            structural(&moved),
            ["listener w: server b: address: 127.0.0.1:5432 -> 127.0.0.2:5432"]
        );
        let mut reordered = old.clone();
        reordered.listeners[0].servers.reverse();
        assert_eq!(
            structural(&reordered),
            [r#"listener w: server order: ["a", "b"] -> ["b", "a"]"#]
        );
        let mut listener_added = old.clone();
        let mut r = listener_added.listeners[0].clone();
        r.name = "r".into();
        r.bind = "127.0.0.1:6000".parse().unwrap();
        listener_added.listeners.push(r);
        assert_eq!(
            structural(&listener_added),
            ["listener r added (127.0.0.1:6000)"]
        );
        assert_eq!(
            diff(&listener_added, &old).unwrap().structural,
            ["listener r removed (127.0.0.1:6000)"]
        );
        let mut rebound = old.clone();
        rebound.listeners[0].bind = "127.0.0.1:6001".parse().unwrap();
        assert_eq!(
            structural(&rebound),
            ["listener w: bind: 127.0.0.1:0 -> 127.0.0.1:6001"]
        );
    }

    #[test]
    fn the_data_path_needs_a_restart() {
        let old = two_servers();
        let mut data_path = old.clone();
        data_path.global.bpf = crate::config::BpfMode::Required;
        data_path.listeners[0].servers.remove(0);
        assert_eq!(
            diff(&old, &data_path).unwrap_err().0,
            ["global.bpf: Off -> Required needs a restart"]
        );
    }
}
