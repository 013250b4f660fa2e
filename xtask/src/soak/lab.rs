//! The patroxy processes the soak runs against, and what stands behind them:
//! - loopback: one PostgreSQL, two fake Patroni nodes (one steady, one flapping between 200 and
//!   503) and two patroxy (sockmap, userspace fallback), each with a listener per fake node;
//! - cluster: the namespaced Patroni cluster (tests/src/cluster) with two patroxy (sockmap,
//!   fallback) in front of it, switched over by `disrupt.rs`.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use patroxy_tests::cluster::Cluster;
use patroxy_tests::cluster::proxy::Proxy;
use patroxy_tests::config::{
    Bpf, CheckConfig, ListenerConfig, Method, ProxyConfig, ServerConfig, StatsConfig,
};
use patroxy_tests::fake_patroni::{FakePatroni, Reply};
use patroxy_tests::ports::{free_tcp_port, wait_for_listen};
use patroxy_tests::postgres::{Postgres, PostgresOptions};
use patroxy_tests::process::ChildGuard;

/// One patroxy under soak.
#[derive(Debug, Clone)]
pub struct Target {
    /// "loopback-bpf", "loopback-fallback", "cluster-bpf", "cluster-fallback".
    pub name: String,
    /// The sockmap path (maps to check), or the userspace fallback.
    pub sockmap: bool,
    pub pid: u32,
    /// The listener whose server stays up: every error there fails the soak.
    pub steady_port: u16,
    /// The loopback listener whose server flaps: its failures are expected.
    pub flap_port: Option<u16>,
    /// In front of the switched-over cluster: failures during a switchover are expected.
    pub switched_over: bool,
    pub stats: SocketAddr,
    /// The listener names the stats pages must show.
    pub listeners: Vec<String>,
    /// Servers it health-checks (each may hold a connection to a Patroni API).
    pub checked_servers: u64,
    pub pin: PathBuf,
    pub log: PathBuf,
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// Everything the loopback setup started; dropping it stops it.
pub struct Loopback {
    pub pg: Postgres,
    pub steady: FakePatroni,
    pub flap: FakePatroni,
    pub targets: Vec<Target>,
    children: Vec<ChildGuard>,
    dir: PathBuf,
    /// Hosts the fake Patroni nodes' tasks.
    _runtime: tokio::runtime::Runtime,
}

impl Drop for Loopback {
    fn drop(&mut self) {
        self.children.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
        for t in &self.targets {
            let _ = std::fs::remove_dir_all(&t.pin);
        }
    }
}

/// The leader's answer on /primary, and a replica's (what the flapping node alternates).
pub fn primary_reply(up: bool) -> Reply {
    if up {
        Reply::primary(1)
    } else {
        Reply::replica(503, 1)
    }
}

impl Loopback {
    pub fn start(bin: &Path) -> Result<Loopback> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let (steady, flap) = runtime.block_on(async {
            let steady = FakePatroni::start().await;
            let flap = FakePatroni::start().await;
            (steady, flap)
        });
        steady.set("/primary", primary_reply(true));
        flap.set("/primary", primary_reply(true));
        let pg = Postgres::try_start(PostgresOptions::default())
            .map_err(|e| anyhow!("starting PostgreSQL: {e}"))?;
        let dir = std::env::temp_dir().join(format!("patroxy-soak-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let mut lab = Loopback {
            pg,
            steady,
            flap,
            targets: Vec::new(),
            children: Vec::new(),
            dir,
            _runtime: runtime,
        };
        for (name, bpf, sockmap) in [
            ("loopback-bpf", Bpf::Required, true),
            ("loopback-fallback", Bpf::Off, false),
        ] {
            lab.spawn(bin, name, bpf, sockmap)?;
        }
        Ok(lab)
    }

    /// Both listeners go to the same PostgreSQL; only their health checks differ.
    fn config(&self, bpf: Bpf, pin: &Path, ports: [u16; 3]) -> ProxyConfig {
        let check = || {
            CheckConfig::new("/primary")
                .method(Method::Get)
                .expect_status(200)
        };
        let mut config = ProxyConfig::seed()
            .server(
                ServerConfig::new("pg-steady", self.pg.addr())
                    .check_port(self.steady.addr().port()),
            )
            .server(
                ServerConfig::new("pg-flap", self.pg.addr()).check_port(self.flap.addr().port()),
            )
            .listener(
                ListenerConfig::new("soak_steady", local(ports[0]), ["pg-steady"]).check(check()),
            )
            .listener(ListenerConfig::new("soak_flap", local(ports[1]), ["pg-flap"]).check(check()))
            .stats(StatsConfig::new(local(ports[2])))
            .data_path(bpf, pin);
        // The cluster harness's setting: a flap is seen within a second.
        config.default_server.fastinter = Some(Duration::from_millis(500));
        config
    }

    fn spawn(&mut self, bin: &Path, name: &str, bpf: Bpf, sockmap: bool) -> Result<()> {
        let ports = [free_tcp_port(), free_tcp_port(), free_tcp_port()];
        let pin = PathBuf::from(format!(
            "/sys/fs/bpf/patroxy-soak-{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&pin);
        let config = self.config(bpf, &pin, ports);
        let path = self.dir.join(format!("{name}.toml"));
        std::fs::write(&path, config.to_toml())?;
        let mut cmd = Command::new(bin);
        cmd.arg("run")
            .arg("--config")
            .arg(&path)
            .arg("--drain-grace")
            .arg("1s")
            .env("PATROXY_LOG", "info");
        let mut child = ChildGuard::spawn(name, &mut cmd)?;
        for addr in config.listen_addrs() {
            if !wait_for_listen(addr, Duration::from_secs(15)) {
                let status = child.try_wait().ok().flatten();
                bail!(
                    "{name} did not listen on {addr} (exit {status:?}); log:\n{}",
                    child.log()
                );
            }
        }
        self.targets.push(Target {
            name: name.to_owned(),
            sockmap,
            pid: child.id(),
            steady_port: ports[0],
            flap_port: Some(ports[1]),
            switched_over: false,
            stats: local(ports[2]),
            listeners: vec!["soak_steady".into(), "soak_flap".into()],
            checked_servers: 2,
            pin,
            log: child
                .log_path()
                .expect("spawn captures the log")
                .to_path_buf(),
        });
        self.children.push(child);
        Ok(())
    }
}

/// The namespaced cluster and its two patroxy; dropping it stops the proxies, then the cluster.
pub struct ClusterLab {
    pub proxies: Vec<Proxy>,
    pub cluster: Cluster,
    pub targets: Vec<Target>,
}

impl ClusterLab {
    pub fn start(bin: &Path) -> Result<ClusterLab> {
        let cluster = Cluster::up().map_err(|e| anyhow!("bringing the cluster up: {e}"))?;
        let mut lab = ClusterLab {
            proxies: Vec::new(),
            cluster,
            targets: Vec::new(),
        };
        for (name, bpf, sockmap) in [
            ("cluster-bpf", "required", true),
            ("cluster-fallback", "off", false),
        ] {
            let ports = (free_tcp_port(), free_tcp_port(), free_tcp_port());
            let proxy = Proxy::start_patroxy(bin, &lab.cluster.nodes, ports, bpf)
                .map_err(|e| anyhow!("starting {name}: {e}"))?;
            lab.targets.push(Target {
                name: name.to_owned(),
                sockmap,
                pid: proxy.pid(),
                steady_port: ports.0,
                flap_port: None,
                switched_over: true,
                stats: local(ports.2),
                listeners: vec!["postgres_write".into(), "postgres_read".into()],
                checked_servers: lab.cluster.nodes.len() as u64,
                pin: PathBuf::from(format!("/sys/fs/bpf/patroxy-cluster-{}", ports.0)),
                log: proxy.log_path.clone(),
            });
            lab.proxies.push(proxy);
        }
        Ok(lab)
    }

    /// Waits until every patroxy's write port routes to the leader.
    pub fn wait_routed(&self, timeout: Duration) -> Result<usize> {
        let leader = self
            .cluster
            .wait_healthy(timeout)
            .map_err(|e| anyhow!("{e}"))?;
        for t in &self.targets {
            patroxy_tests::cluster::scenario::wait_routed(
                t.steady_port,
                &self.cluster.nodes[leader].ip,
                timeout,
            )
            .map_err(|e| anyhow!("{}: {e}", t.name))?;
        }
        Ok(leader)
    }
}

impl Drop for ClusterLab {
    fn drop(&mut self) {
        for p in &mut self.proxies {
            p.stop();
        }
    }
}
