//! What a reload changes: the running `Config` against a newly validated one.
//!
//! A reload applies settings in place: timeouts, retries, limits (global and per-server
//! maxconn), check settings and timings, `on_marked_down`/`on_marked_up`, balance, and the
//! stats page's `refresh` and `admin` access. The set of listeners and servers (names, order,
//! binds, traffic addresses) keeps its shape, so every backend keeps its id, its check state,
//! its operator state and its sessions. `[dcs]` (the DCS watch) needs a restart to change.
//! Changes the running process cannot take refuse the whole
//! reload with one line each, and the running config stays as it was.
use std::fmt::Debug;

use super::model::{Config, Listener, ServerSpec};

/// What applying `new` over `old` changes, one line per changed setting.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConfigDiff {
    pub changes: Vec<String>,
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
    d.restart("global.bpf_log_rate", &og.bpf_log_rate, &ng.bpf_log_rate);
    d.restart(
        "global.session_log_rate",
        &og.session_log_rate,
        &ng.session_log_rate,
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
            d.restart("stats.bind", &o.bind, &n.bind);
            d.restart("stats.maxconn", &o.maxconn, &n.maxconn);
            d.change("stats.refresh", &o.refresh, &n.refresh);
            d.change("stats.admin", &o.admin, &n.admin);
        }
        (None, None) => {}
        (o, n) => d.restart("[stats]", &o.is_some(), &n.is_some()),
    }
    // The watch holds one etcd connection made at start-up; a new one (endpoints, TLS, auth,
    // namespace, scope) is a new start rather than a swap under a running watch.
    d.restart("[dcs]", &old.dcs, &new.dcs);
    if d.restart.is_empty() {
        Ok(ConfigDiff { changes: d.changes })
    } else {
        Err(NeedsRestart(d.restart))
    }
}

#[derive(Default)]
struct Differ {
    changes: Vec<String>,
    restart: Vec<String>,
}

impl Differ {
    fn change<T: PartialEq + Debug>(&mut self, what: &str, old: &T, new: &T) {
        if old != new {
            self.changes.push(format!("{what}: {old:?} -> {new:?}"));
        }
    }

    fn restart<T: PartialEq + Debug>(&mut self, what: &str, old: &T, new: &T) {
        if old != new {
            self.restart
                .push(format!("{what}: {old:?} -> {new:?} needs a restart"));
        }
    }

    /// Listeners and servers must keep their names, order, binds and addresses: the proxy's
    /// listening sockets, the backends' ids and their sessions are laid out by them.
    fn listeners(&mut self, old: &[Listener], new: &[Listener]) {
        let names = |ls: &[Listener]| ls.iter().map(|l| l.name.clone()).collect::<Vec<_>>();
        if names(old) != names(new) {
            self.restart("listeners", &names(old), &names(new));
            return;
        }
        for (o, n) in old.iter().zip(new) {
            let at = format!("listener {}", o.name);
            self.restart(&format!("{at}: bind"), &o.bind, &n.bind);
            self.change(&format!("{at}: balance"), &o.balance, &n.balance);
            self.change(&format!("{at}: check"), &o.check, &n.check);
            self.servers(&at, &o.servers, &n.servers);
        }
    }

    fn servers(&mut self, at: &str, old: &[ServerSpec], new: &[ServerSpec]) {
        let names = |ss: &[ServerSpec]| ss.iter().map(|s| s.name.clone()).collect::<Vec<_>>();
        if names(old) != names(new) {
            self.restart(&format!("{at}: servers"), &names(old), &names(new));
            return;
        }
        for (o, n) in old.iter().zip(new) {
            let at = format!("{at}: server {}", o.name);
            self.restart(&format!("{at}: address"), &o.address, &n.address);
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
    use crate::patroni::test_config::*;

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
    fn servers_and_listeners_added_removed_or_moved_need_a_restart() {
        let old = two_servers();
        let mut added = old.clone();
        let c = added.listeners[0].servers[0].clone();
        added.listeners[0].servers.push(ServerSpec {
            name: "c".into(),
            ..c
        });
        assert_eq!(
            diff(&old, &added).unwrap_err().0,
            [r#"listener w: servers: ["a", "b"] -> ["a", "b", "c"] needs a restart"#]
        );
        let mut moved = old.clone();
        moved.listeners[0].servers[1].address = "127.0.0.2:5432".parse().unwrap();
        assert_eq!(
            diff(&old, &moved).unwrap_err().0,
            ["listener w: server b: address: 127.0.0.1:5432 -> 127.0.0.2:5432 needs a restart"]
        );
        let mut listener_added = old.clone();
        let mut r = listener_added.listeners[0].clone();
        r.name = "r".into();
        listener_added.listeners.push(r);
        assert_eq!(
            diff(&old, &listener_added).unwrap_err().0,
            [r#"listeners: ["w"] -> ["w", "r"] needs a restart"#]
        );
        let mut data_path = old.clone();
        data_path.global.bpf = crate::config::BpfMode::Required;
        assert_eq!(
            diff(&old, &data_path).unwrap_err().0,
            ["global.bpf: Off -> Required needs a restart"]
        );
    }
}
