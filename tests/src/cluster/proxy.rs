//! The proxies in front of the cluster, in the root namespace, listening on 127.0.0.1: patroxy
//! (the seed's settings plus `fastinter = "500ms"`) and Debian's HAProxy (the seed's settings
//! exactly: inter 3s fall 3 rise 2, timeout check 5s, connect 4s, retries 2, HAProxy's default
//! fastinter = inter; only the binds and logging differ from reference/haproxy.cfg). Their pids
//! are recorded in the state dir so `down` stops them after a crashed run too.

use std::fs::File;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use super::patroni::Node;
use super::{STATE_DIR, err};
use crate::config::{
    Balance, Bpf, CheckConfig, HaproxyLog, ListenerConfig, Method, ProxyConfig, ServerConfig,
    StatsConfig,
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

/// Both proxies' config for the cluster: the seed's settings (patroxy.toml, reference/haproxy.cfg)
/// with the test hosts and the local ports `(write, read, stats)`.
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
}

/// patroxy's config for the cluster: [`seed_config`] with `fastinter = "500ms"`, data path
/// `bpf` and its maps pinned at `pin_path`.
pub fn patroxy_config(nodes: &[Node], ports: (u16, u16, u16), bpf: Bpf, pin_path: &Path) -> String {
    let mut config = seed_config(nodes, ports).data_path(bpf, pin_path);
    config.default_server.fastinter = Some(Duration::from_millis(500));
    format!(
        "# Written by the patroxy cluster harness: the seed's settings, test hosts, fastinter 500ms.\n{}",
        config.to_toml()
    )
}

/// [`patroxy_config`] plus `[dcs]`: the cluster's etcd, Patroni's scope and namespace, the
/// daemon's default burst.
pub fn patroxy_dcs_config(
    nodes: &[Node],
    ports: (u16, u16, u16),
    bpf: Bpf,
    pin_path: &Path,
) -> String {
    format!(
        "{}\n[dcs]\netcd = [\"http://{}\"]\nnamespace = \"/service\"\nscope = \"{}\"\n",
        patroxy_config(nodes, ports, bpf, pin_path),
        super::etcd::client_addr(),
        super::patroni::SCOPE,
    )
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
    /// Starts patroxy (`bin`) with [`patroxy_config`].
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

    fn start_patroxy_kind(
        kind: Kind,
        bin: &Path,
        nodes: &[Node],
        ports: (u16, u16, u16),
        bpf: &str,
    ) -> Result<Proxy, PgError> {
        let dir = Path::new(STATE_DIR);
        let bpf: Bpf = bpf.parse().map_err(err)?;
        let pin = PathBuf::from(format!("/sys/fs/bpf/patroxy-cluster-{}", ports.0));
        let cfg = dir.join(format!("patroxy-{}.toml", ports.0));
        let text = match kind {
            Kind::PatroxyDcs => patroxy_dcs_config(nodes, ports, bpf, &pin),
            _ => patroxy_config(nodes, ports, bpf, &pin),
        };
        std::fs::write(&cfg, text)?;
        let mut cmd = Command::new(bin);
        cmd.arg("run").arg("--config").arg(&cfg);
        cmd.env("PATROXY_LOG", "info");
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
