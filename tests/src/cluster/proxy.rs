//! The proxies in front of the cluster, in the root namespace, listening on 127.0.0.1: patroxy
//! with the shipped `patroxy.toml` (see [`patroxy_config`] for what the harness changes in it)
//! and Debian's HAProxy (the seed's settings exactly: inter 3s fall 3 rise 2, timeout check 5s,
//! connect 4s, retries 2, HAProxy's default fastinter = inter; only the binds and logging differ
//! from reference/haproxy.cfg). Their pids are recorded in the state dir so `down` stops them
//! after a crashed run too.

use std::fs::File;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use super::patroni::Node;
use super::{STATE_DIR, err};
use crate::config::{
    AllowConfig, Balance, Bpf, CheckConfig, HaproxyLog, ListenerConfig, Method, PortRef,
    ProxyConfig, ServerConfig, StatsConfig,
};
use crate::ports::wait_for_listen;
use crate::postgres::PgError;

/// Which proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Patroxy,
    /// patroxy with the DCS watch of the cluster's etcd (`[dcs]`).
    PatroxyDcs,
    Haproxy,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Patroxy => "patroxy",
            Kind::PatroxyDcs => "patroxy+dcs",
            Kind::Haproxy => "haproxy",
        }
    }
}

/// HAProxy's side of the comparison: the seed's settings (reference/haproxy.cfg) with the test
/// hosts and the local ports `(write, read, stats)`.
pub fn seed_config(nodes: &[Node], ports: (u16, u16, u16)) -> ProxyConfig {
    let names: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
    let servers = nodes
        .iter()
        .map(|n| {
            let ip = n.ip.parse().expect("a node's ip is an IP address");
            ServerConfig::new(&n.name, SocketAddr::new(ip, 5432))
                .check_port(8008)
                .maxconn(200)
        })
        .collect();
    let check = |path| {
        CheckConfig::new(path)
            .method(Method::Get)
            .expect_status(200)
    };
    ProxyConfig {
        servers,
        ..ProxyConfig::seed()
    }
    .listener(
        ListenerConfig::new("postgres_write", local(ports.0), names.clone())
            .check(check("/primary")),
    )
    .listener(
        ListenerConfig::new("postgres_read", local(ports.1), names)
            .balance(Balance::RoundRobin)
            .check(check("/replica")),
    )
    .stats(StatsConfig::new(local(ports.2)).refresh(Duration::from_secs(5)))
    // The seed's UFW rule (10.100.100.0/24 to 5432, 5433, 7000) for the harness's clients: they
    // connect from this host's loopback. patroxy only; no [xdp], so it is checked, not attached.
    .allow(AllowConfig::new(
        &["127.0.0.0/8"],
        vec![
            PortRef::Port(ports.0),
            PortRef::Port(ports.1),
            PortRef::Port(ports.2),
        ],
    ))
}

/// The repository's `patroxy.toml`, which the cluster's patroxy runs.
pub const SHIPPED_CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../patroxy.toml");

/// What [`patroxy_config`] changes in the shipped file, for reports.
pub const SHIPPED_CONFIG_CHANGES: &str = "the servers' addresses (the test hosts), the binds \
     (127.0.0.1, free ports), the `[[allow]]` rules' sources (127.0.0.0/8: the clients run on \
     this host), `bpf` and `pin_path` (a pin directory of its own)";

/// Where the cluster's clients connect from: the seed's allowed subnet, rewritten like the
/// servers' addresses.
const CLIENTS: &str = "127.0.0.0/8";

/// The shipped file's check settings as written there (`[default_server]` and `timeout_check`),
/// for reports: "inter 1s, fastinter 250ms, ...; timeout_check unset".
pub fn shipped_check_settings() -> String {
    let doc: toml::Table = std::fs::read_to_string(SHIPPED_CONFIG)
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or_default();
    let get = |table: &str, key: &str| {
        doc.get(table)
            .and_then(|t| t.get(key))
            .map_or("unset".to_owned(), |v| match v {
                toml::Value::String(s) => s.clone(),
                other => other.to_string(),
            })
    };
    let timings: Vec<String> = ["inter", "fastinter", "downinter", "rise", "fall"]
        .iter()
        .map(|k| format!("{k} {}", get("default_server", k)))
        .collect();
    format!(
        "{}; timeout_check {}, timeout_connect {}",
        timings.join(", "),
        get("defaults", "timeout_check"),
        get("defaults", "timeout_connect")
    )
}

/// patroxy's config for the cluster: the shipped `patroxy.toml` with only
/// [`SHIPPED_CONFIG_CHANGES`] changed, so the scenarios and failover-bench measure what an
/// operator gets out of the box. Its servers and listeners must be the test cluster's
/// (pg-sv01..03; postgres_write, postgres_read).
pub fn patroxy_config(
    nodes: &[Node],
    ports: (u16, u16, u16),
    bpf: Bpf,
    pin_path: &Path,
) -> Result<String, PgError> {
    use toml::{Table, Value};
    let text = std::fs::read_to_string(SHIPPED_CONFIG)
        .map_err(|e| err(format!("reading {SHIPPED_CONFIG}: {e}")))?;
    let mut doc: Table = text
        .parse()
        .map_err(|e| err(format!("{SHIPPED_CONFIG}: {e}")))?;
    let bad = |what: &str| err(format!("{SHIPPED_CONFIG}: {what}"));
    let table = |doc: &mut Table, key: &str| -> Result<Table, PgError> {
        match doc.remove(key) {
            Some(Value::Table(t)) => Ok(t),
            None => Ok(Table::new()),
            Some(_) => Err(bad(&format!("[{key}] is not a table"))),
        }
    };
    let mut global = table(&mut doc, "global")?;
    global.insert("bpf".into(), bpf.name().into());
    global.insert("pin_path".into(), pin_path.display().to_string().into());
    doc.insert("global".into(), global.into());
    let mut stats = table(&mut doc, "stats")?;
    stats.insert("bind".into(), local(ports.2).to_string().into());
    doc.insert("stats".into(), stats.into());
    let each =
        |doc: &mut Table, key: &str, f: &mut dyn FnMut(&mut Table) -> Result<(), PgError>| {
            let Some(Value::Array(list)) = doc.get_mut(key) else {
                return Err(bad(&format!("no [[{key}]]")));
            };
            list.iter_mut().try_for_each(|v| {
                v.as_table_mut()
                    .ok_or_else(|| bad(&format!("a [[{key}]] is not a table")))
                    .and_then(&mut *f)
            })
        };
    each(&mut doc, "server", &mut |server| {
        let name = server
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let node = nodes
            .iter()
            .find(|n| n.name == name)
            .ok_or_else(|| bad(&format!("server {name:?} is not a test host")))?;
        server.insert("address".into(), node.pg_addr().to_string().into());
        Ok(())
    })?;
    each(&mut doc, "listener", &mut |listener| {
        let port = match listener.get("name").and_then(Value::as_str) {
            Some("postgres_write") => ports.0,
            Some("postgres_read") => ports.1,
            other => return Err(bad(&format!("listener {other:?} has no test port"))),
        };
        listener.insert("bind".into(), local(port).to_string().into());
        Ok(())
    })?;
    if doc.contains_key("allow") {
        each(&mut doc, "allow", &mut |rule| {
            rule.insert("from".into(), Value::Array(vec![CLIENTS.into()]));
            Ok(())
        })?;
    }
    let body = toml::to_string(&doc).map_err(|e| err(format!("writing the config: {e}")))?;
    Ok(format!(
        "# Written by the patroxy cluster harness: {SHIPPED_CONFIG} with these changed: \
         {SHIPPED_CONFIG_CHANGES}.\n{body}"
    ))
}

/// [`patroxy_config`] plus `[dcs]`: the cluster's etcd, Patroni's scope and namespace, the
/// daemon's default burst.
pub fn patroxy_dcs_config(
    nodes: &[Node],
    ports: (u16, u16, u16),
    bpf: Bpf,
    pin_path: &Path,
) -> Result<String, PgError> {
    Ok(format!(
        "{}\n[dcs]\netcd = [\"http://{}\"]\nnamespace = \"/service\"\nscope = \"{}\"\n",
        patroxy_config(nodes, ports, bpf, pin_path)?,
        super::etcd::client_addr(),
        super::patroni::SCOPE,
    ))
}

/// `config` (TOML) with `fall` set in `[default_server]` and the write listener's check not
/// authoritative (the read listener's stays so: a promoted replica leaves it at once).
fn with_slow_checks(config: &str, fall: u32) -> Result<String, PgError> {
    let mut doc: toml::Table = config
        .parse()
        .map_err(|e| err(format!("the harness's config: {e}")))?;
    let defaults = doc
        .entry("default_server")
        .or_insert_with(|| toml::Table::new().into());
    let toml::Value::Table(defaults) = defaults else {
        return Err(err("[default_server] is not a table"));
    };
    defaults.insert("fall".into(), i64::from(fall).into());
    let Some(toml::Value::Array(listeners)) = doc.get_mut("listener") else {
        return Err(err("no [[listener]]"));
    };
    let check = listeners
        .iter_mut()
        .filter_map(toml::Value::as_table_mut)
        .find(|l| l.get("name").and_then(toml::Value::as_str) == Some("postgres_write"))
        .and_then(|l| l.get_mut("check"))
        .and_then(toml::Value::as_table_mut)
        .ok_or_else(|| err("no [listener.check] for postgres_write"))?;
    check.insert("authoritative".into(), false.into());
    toml::to_string(&doc).map_err(|e| err(format!("writing the config: {e}")))
}

/// HAProxy's config for the cluster: [`seed_config`] exactly (HAProxy's default fastinter is
/// inter), logging to stderr instead of /dev/log so the harness keeps its log.
pub fn haproxy_config(nodes: &[Node], ports: (u16, u16, u16)) -> String {
    format!(
        "# Written by the patroxy cluster harness from the seed's haproxy.cfg.\n{}",
        seed_config(nodes, ports).to_haproxy_cfg(HaproxyLog::Stderr)
    )
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A proxy process in the root namespace, stopped when dropped (unless detached).
pub struct Proxy {
    pub kind: Kind,
    pub write_port: u16,
    pub read_port: u16,
    pub stats_port: u16,
    pub log_path: PathBuf,
    child: Option<Child>,
    pid_file: PathBuf,
    detached: bool,
}

impl Proxy {
    /// Starts patroxy (`bin`) with [`patroxy_config`]: the shipped `patroxy.toml`.
    pub fn start_patroxy(
        bin: &Path,
        nodes: &[Node],
        ports: (u16, u16, u16),
        bpf: &str,
    ) -> Result<Proxy, PgError> {
        Self::start_patroxy_kind(Kind::Patroxy, bin, nodes, ports, bpf)
    }

    /// Starts patroxy (`bin`) with [`patroxy_dcs_config`]: watching the cluster's etcd.
    pub fn start_patroxy_dcs(
        bin: &Path,
        nodes: &[Node],
        ports: (u16, u16, u16),
        bpf: &str,
    ) -> Result<Proxy, PgError> {
        Self::start_patroxy_kind(Kind::PatroxyDcs, bin, nodes, ports, bpf)
    }

    /// Like [`Proxy::start_patroxy_dcs`] with write checks that cannot fence a leader in time:
    /// `fall` in `[default_server]` and Patroni's 503 not authoritative on the write listener.
    /// Only the watch fences then: a frozen leader's hung checks, or a demoting one's 503s,
    /// count slowly against `fall`.
    pub fn start_patroxy_dcs_key_only(
        bin: &Path,
        nodes: &[Node],
        ports: (u16, u16, u16),
        bpf: &str,
        fall: u32,
    ) -> Result<Proxy, PgError> {
        Self::start_patroxy_kind_with(Kind::PatroxyDcs, bin, nodes, ports, bpf, Some(fall))
    }

    fn start_patroxy_kind(
        kind: Kind,
        bin: &Path,
        nodes: &[Node],
        ports: (u16, u16, u16),
        bpf: &str,
    ) -> Result<Proxy, PgError> {
        Self::start_patroxy_kind_with(kind, bin, nodes, ports, bpf, None)
    }

    fn start_patroxy_kind_with(
        kind: Kind,
        bin: &Path,
        nodes: &[Node],
        ports: (u16, u16, u16),
        bpf: &str,
        fall: Option<u32>,
    ) -> Result<Proxy, PgError> {
        let dir = Path::new(STATE_DIR);
        let bpf: Bpf = bpf.parse().map_err(err)?;
        let pin = PathBuf::from(format!("/sys/fs/bpf/patroxy-cluster-{}", ports.0));
        let cfg = dir.join(format!("patroxy-{}.toml", ports.0));
        let text = match kind {
            Kind::PatroxyDcs => patroxy_dcs_config(nodes, ports, bpf, &pin)?,
            _ => patroxy_config(nodes, ports, bpf, &pin)?,
        };
        let text = match fall {
            Some(fall) => with_slow_checks(&text, fall)?,
            None => text,
        };
        std::fs::write(&cfg, text)?;
        let mut cmd = Command::new(bin);
        cmd.arg("run").arg("--config").arg(&cfg);
        // PTX_PATROXY_LOG (e.g. "info,patroxy::patroni=debug") for a failover's timeline.
        let log = std::env::var("PTX_PATROXY_LOG").unwrap_or_else(|_| "info".to_owned());
        cmd.env("PATROXY_LOG", log);
        Self::spawn(kind, cmd, ports)
    }

    /// Starts Debian's HAProxy (foreground) with [`haproxy_config`].
    pub fn start_haproxy(nodes: &[Node], ports: (u16, u16, u16)) -> Result<Proxy, PgError> {
        let dir = Path::new(STATE_DIR);
        let cfg = dir.join(format!("haproxy-{}.cfg", ports.0));
        std::fs::write(&cfg, haproxy_config(nodes, ports))?;
        let mut cmd = Command::new("/usr/sbin/haproxy");
        cmd.arg("-db").arg("-f").arg(&cfg);
        Self::spawn(Kind::Haproxy, cmd, ports)
    }

    fn spawn(kind: Kind, mut cmd: Command, ports: (u16, u16, u16)) -> Result<Proxy, PgError> {
        let dir = Path::new(STATE_DIR);
        let log_path = dir.join(format!("{}-{}.log", kind.name(), ports.0));
        let out = File::create(&log_path)?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out.try_clone()?))
            .stderr(Stdio::from(out))
            .process_group(0);
        let child = cmd
            .spawn()
            .map_err(|e| err(format!("spawning {}: {e}", kind.name())))?;
        let pid_file = dir.join(format!("{}-{}.pid", kind.name(), ports.0));
        std::fs::write(&pid_file, child.id().to_string())?;
        let mut proxy = Proxy {
            kind,
            write_port: ports.0,
            read_port: ports.1,
            stats_port: ports.2,
            log_path,
            child: Some(child),
            pid_file,
            detached: false,
        };
        for port in [ports.0, ports.1, ports.2] {
            if !wait_for_listen(
                SocketAddr::from(([127, 0, 0, 1], port)),
                Duration::from_secs(15),
            ) {
                let log = proxy.log();
                proxy.stop();
                return Err(err(format!(
                    "{} did not listen on {port}:\n{log}",
                    kind.name()
                )));
            }
        }
        Ok(proxy)
    }

    /// The exit status if the process has exited (it is then reaped).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn log(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Leaves the process running when dropped (`cargo xtask cluster up`).
    pub fn detach(mut self) {
        self.detached = true;
    }

    /// SIGTERM, then SIGKILL after 5 s.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own child, not yet reaped.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::fs::remove_file(&self.pid_file);
        }
    }

    /// When this proxy logged a line containing `needle` after `since` (patroxy's RFC 3339
    /// timestamps; for HAProxy, which logs none on stderr, the time the watcher saw it is
    /// used by the caller instead). `None` if no such line.
    pub fn logged_at(&self, needle: &str, since: SystemTime) -> Option<SystemTime> {
        self.log()
            .lines()
            .filter(|l| l.contains(needle))
            .find_map(|l| {
                let ts = l.split_whitespace().next()?;
                let t = humantime::parse_rfc3339_weak(ts.trim_end_matches('Z')).ok()?;
                (t >= since).then_some(t)
            })
    }

    /// Waits until the log has a line containing `needle` written after `since`.
    pub fn wait_logged(
        &self,
        needle: &str,
        since: SystemTime,
        timeout: Duration,
    ) -> Option<SystemTime> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(t) = self.logged_at(needle, since) {
                return Some(t);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!(
                "--- {} log tail:\n{}",
                self.kind.name(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        if !self.detached {
            self.stop();
        }
    }
}

/// Stops proxies recorded in `dir/*.pid` by an earlier (possibly crashed) run, checking the
/// pid still names a patroxy or haproxy process first.
pub fn kill_recorded(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().is_none_or(|x| x != "pid") {
            continue;
        }
        let Some(pid) = std::fs::read_to_string(&path)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        if cmdline.contains("patroxy") || cmdline.contains("haproxy") {
            // SAFETY: kill(2) on a proxy this harness started and recorded.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && Path::new(&format!("/proc/{pid}")).exists() {
                std::thread::sleep(Duration::from_millis(50));
            }
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = std::fs::remove_file(&path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cluster_runs_the_shipped_config_with_only_hosts_binds_and_pins_changed() {
        let dir = Path::new("/nonexistent");
        let nodes: Vec<Node> = (1..=3).map(|i| Node::new(i, dir)).collect();
        let pin = Path::new("/sys/fs/bpf/patroxy-cluster-test");
        let text = patroxy_config(&nodes, (6001, 6002, 6003), Bpf::Required, pin).unwrap();
        assert!(
            text.starts_with("# Written by the patroxy cluster harness"),
            "{text}"
        );
        let ours: toml::Table = text.parse().unwrap();
        let shipped: toml::Table = std::fs::read_to_string(SHIPPED_CONFIG)
            .unwrap()
            .parse()
            .unwrap();
        let listeners = ours["listener"].as_array().unwrap();
        let binds: Vec<&str> = listeners
            .iter()
            .map(|l| l["bind"].as_str().unwrap())
            .collect();
        assert_eq!(binds, ["127.0.0.1:6001", "127.0.0.1:6002"]);
        let servers = ours["server"].as_array().unwrap();
        let addresses: Vec<&str> = servers
            .iter()
            .map(|s| s["address"].as_str().unwrap())
            .collect();
        assert_eq!(
            addresses,
            [
                "10.213.77.11:5432",
                "10.213.77.12:5432",
                "10.213.77.13:5432"
            ]
        );
        assert_eq!(ours["stats"]["bind"].as_str(), Some("127.0.0.1:6003"));
        assert_eq!(ours["global"]["bpf"].as_str(), Some("required"));
        assert_eq!(
            ours["global"]["pin_path"].as_str(),
            Some("/sys/fs/bpf/patroxy-cluster-test")
        );
        // Everything else is the shipped file's: put back what was changed and compare.
        let mut back = ours.clone();
        for key in ["bpf", "pin_path"] {
            back["global"].as_table_mut().unwrap()[key] = shipped["global"][key].clone();
        }
        back["stats"]["bind"] = shipped["stats"]["bind"].clone();
        for (i, l) in back["listener"]
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .enumerate()
        {
            l["bind"] = shipped["listener"][i]["bind"].clone();
        }
        for (i, rule) in back["allow"].as_array_mut().unwrap().iter_mut().enumerate() {
            assert_eq!(rule["from"].as_array().unwrap(), &[CLIENTS.into()]);
            rule["from"] = shipped["allow"][i]["from"].clone();
        }
        for (i, s) in back["server"]
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .enumerate()
        {
            s["address"] = shipped["server"][i]["address"].clone();
        }
        assert_eq!(back, shipped);
        assert!(shipped_check_settings().starts_with("inter 1s, fastinter 250ms"));
    }
}
