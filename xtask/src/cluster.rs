//! `cargo xtask cluster up|down|status|switchover|kill-primary|partition NODE|heal NODE`: the
//! test cluster of the failover scenarios (etcd + three Patroni/PostgreSQL hosts in network
//! namespaces, tests/src/cluster) with patroxy in front, left running to play with.
//!
//! `up` starts patroxy on 127.0.0.1:5432 (writes), :5433 (reads) and :7000 (stats), and with
//! `--haproxy` Debian's HAProxy with the seed's config on :6432/:6433/:7001 next to it. The
//! other commands attach to the running cluster by its namespace and state directory.

use std::net::{Ipv4Addr, TcpListener};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use clap::Subcommand;
use patroxy_tests::cluster::proxy::Proxy;
use patroxy_tests::cluster::{self, Cluster, netns, patroni};

use crate::cargo::build_patroxy;
use crate::setup;

/// patroxy's ports in front of the cluster: the seed's.
pub const PATROXY_PORTS: (u16, u16, u16) = (5432, 5433, 7000);
/// HAProxy's ports when started next to patroxy.
pub const HAPROXY_PORTS: (u16, u16, u16) = (6432, 6433, 7001);

#[derive(Subcommand)]
pub enum ClusterCmd {
    /// Create the network, start etcd, three Patroni nodes and patroxy (5432/5433/7000).
    Up {
        /// Also start HAProxy with the seed's config on 6432/6433/7001, for comparison.
        #[arg(long)]
        haproxy: bool,
    },
    /// Stop every process and remove the namespaces, bridge and state directory.
    Down,
    /// `patronictl list` and patroxy's stats table.
    Status,
    /// `patronictl switchover --force` from the leader to the next node.
    Switchover,
    /// kill -9 of the leader's Patroni and PostgreSQL (a host crash).
    KillPrimary,
    /// Cut a node off the network (its veth link down). NODE: pg-sv01, pg-sv02 or pg-sv03.
    Partition { node: String },
    /// Undo `partition` and restart a killed node's Patroni.
    Heal { node: String },
}

pub fn run(cmd: ClusterCmd) -> Result<()> {
    match cmd {
        ClusterCmd::Up { haproxy } => up(haproxy),
        ClusterCmd::Down => {
            println!(
                "cluster: stopping proxies, Patroni, PostgreSQL and etcd; removing ptx* namespaces"
            );
            cluster::down();
            println!("cluster: down");
            Ok(())
        }
        ClusterCmd::Status => status(),
        ClusterCmd::Switchover => {
            let c = attach()?;
            let leader = c
                .leader()
                .ok_or_else(|| anyhow!("the cluster has no leader now"))?;
            let candidate = (leader + 1) % c.nodes.len();
            println!(
                "cluster: switchover {} -> {}",
                c.nodes[leader].name, c.nodes[candidate].name
            );
            print!("{}", c.switchover(leader, candidate).map_err(pg)?);
            Ok(())
        }
        ClusterCmd::KillPrimary => {
            let mut c = attach()?;
            let leader = c
                .leader()
                .ok_or_else(|| anyhow!("the cluster has no leader now"))?;
            println!(
                "cluster: kill -9 of {}'s patroni and postgres (bring it back with `cargo xtask \
                 cluster heal {}`)",
                c.nodes[leader].name, c.nodes[leader].name
            );
            c.kill_node(leader);
            Ok(())
        }
        ClusterCmd::Partition { node } => {
            let c = attach()?;
            let i = node_index(&c, &node)?;
            println!(
                "cluster: {node}'s link down ({})",
                netns::host_veth(&c.nodes[i].ns)
            );
            netns::link_down(&c.nodes[i].ns).map_err(pg)
        }
        ClusterCmd::Heal { node } => {
            let mut c = attach()?;
            let i = node_index(&c, &node)?;
            println!("cluster: {node}'s link up");
            netns::link_up(&c.nodes[i].ns).map_err(pg)?;
            if c.nodes[i].patroni_pid().is_none() {
                println!("cluster: starting {node}'s patroni (it was not running)");
                c.start_node(i).map_err(pg)?;
            }
            Ok(())
        }
    }
}

fn up(haproxy: bool) -> Result<()> {
    let env = setup::setup()?;
    let bin = build_patroxy(&env, true)?;
    let running = start(&bin, haproxy)?;
    running.print_instructions();
    running.detach();
    println!("cluster: left running; stop it with `cargo xtask cluster down`");
    Ok(())
}

/// A cluster with its proxies, as the demo and `cluster up` start it.
pub struct Running {
    pub cluster: Cluster,
    pub patroxy: Proxy,
    pub haproxy: Option<Proxy>,
}

/// Brings the cluster up and starts patroxy (and HAProxy) in front of it.
pub fn start(bin: &std::path::Path, with_haproxy: bool) -> Result<Running> {
    let ports = std::iter::once(PATROXY_PORTS).chain(with_haproxy.then_some(HAPROXY_PORTS));
    for (w, r, s) in ports {
        for port in [w, r, s] {
            ensure_free(port)?;
        }
    }
    println!(
        "cluster: creating bridge {} ({}.0/24) and namespaces {:?}; starting etcd and three \
         Patroni nodes (~30 s): {}{}",
        netns::BRIDGE,
        netns::SUBNET,
        netns::NAMESPACES,
        patroni::Flavor::from_env().describe(),
        match patroni::Flavor::from_env() {
            patroni::Flavor::Pypi => " (PTX_PATRONI=debian for Debian's 3.0.2)",
            patroni::Flavor::Debian => "",
        }
    );
    let cluster = Cluster::up().map_err(|e| anyhow!("bringing the cluster up: {e}"))?;
    println!("cluster: up\n{}", cluster.list().map_err(pg)?);
    println!(
        "cluster: starting patroxy on 127.0.0.1:{}/{}/{}",
        PATROXY_PORTS.0, PATROXY_PORTS.1, PATROXY_PORTS.2
    );
    let patroxy = Proxy::start_patroxy(bin, &cluster.nodes, PATROXY_PORTS, "auto")
        .map_err(|e| anyhow!("starting patroxy: {e}"))?;
    let haproxy = if with_haproxy {
        println!(
            "cluster: starting HAProxy on 127.0.0.1:{}/{}/{}",
            HAPROXY_PORTS.0, HAPROXY_PORTS.1, HAPROXY_PORTS.2
        );
        Some(
            Proxy::start_haproxy(&cluster.nodes, HAPROXY_PORTS)
                .map_err(|e| anyhow!("starting HAProxy: {e}"))?,
        )
    } else {
        None
    };
    Ok(Running {
        cluster,
        patroxy,
        haproxy,
    })
}

/// The ports must be free; say who holds one if not (often a Debian cluster on 5432).
fn ensure_free(port: u16) -> Result<()> {
    if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
        return Ok(());
    }
    let who = Command::new("ss")
        .args(["-Hltnp", &format!("sport = :{port}")])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    bail!(
        "127.0.0.1:{port} is already in use{}; the demo needs ports 5432, 5433 and 7000 (a \
         packaged PostgreSQL cluster? see `pg_lsclusters`; a cluster left by `cargo xtask \
         cluster up`? run `cargo xtask cluster down`)",
        if who.is_empty() {
            String::new()
        } else {
            format!(" ({who})")
        }
    )
}

impl Running {
    /// The seed's "Start and verify" commands, pointed at the local proxy.
    pub fn print_instructions(&self) {
        let q = "SELECT inet_server_addr() AS server, pg_is_in_recovery();";
        let pw = patroxy_tests::postgres::DEFAULT_PASSWORD;
        println!();
        println!("  # Writes go to the primary (in_recovery = f):");
        println!(
            "  PGPASSWORD={pw} psql -h 127.0.0.1 -p {} -U postgres -c \"{q}\"",
            self.patroxy.write_port
        );
        println!("  # Reads go to a replica (in_recovery = t):");
        println!(
            "  PGPASSWORD={pw} psql -h 127.0.0.1 -p {} -U postgres -c \"{q}\"",
            self.patroxy.read_port
        );
        println!(
            "  # Stats page: http://127.0.0.1:{}/  (CSV: /;csv, Prometheus: /metrics)",
            self.patroxy.stats_port
        );
        if let Some(h) = &self.haproxy {
            println!(
                "  # HAProxy (seed config) for comparison: ports {}/{}, stats http://127.0.0.1:{}/",
                h.write_port, h.read_port, h.stats_port
            );
        }
        println!(
            "  # Play: cargo xtask cluster status | switchover | kill-primary | partition pg-sv01 | heal pg-sv01"
        );
        println!(
            "  # Logs: {}/ (patroxy-5432.log, pg-sv0N/patroni.log)",
            cluster::STATE_DIR
        );
        println!();
    }

    /// Leaves everything running after this process exits.
    pub fn detach(self) {
        self.patroxy.detach();
        if let Some(h) = self.haproxy {
            h.detach();
        }
        self.cluster.detach();
    }
}

fn status() -> Result<()> {
    let c = attach()?;
    print!("{}", c.list().map_err(pg)?);
    let bin = crate::cargo::target_dir().join("release/patroxy");
    let url = format!("http://127.0.0.1:{}", PATROXY_PORTS.2);
    if bin.is_file() {
        let ok = Command::new(&bin)
            .args(["status", "--url", &url])
            .status()
            .context("running patroxy status")?
            .success();
        if !ok {
            println!("(patroxy's stats at {url} did not answer: is it running?)");
        }
    }
    Ok(())
}

fn attach() -> Result<Cluster> {
    Cluster::attach().map_err(|e| anyhow!("{e}"))
}

fn node_index(c: &Cluster, name: &str) -> Result<usize> {
    match c.nodes.iter().position(|n| n.name == name) {
        Some(i) => Ok(i),
        None => bail!(
            "no node {name:?}; the nodes are {}",
            c.nodes
                .iter()
                .map(|n| n.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn pg(e: patroxy_tests::postgres::PgError) -> anyhow::Error {
    anyhow!("{e}")
}

/// Waits for patroxy's write port to route to the leader (it may still be rising).
pub fn wait_routed(running: &Running, timeout: Duration) -> Result<usize> {
    let leader = running
        .cluster
        .wait_healthy(timeout)
        .map_err(|e| anyhow!("{e}"))?;
    patroxy_tests::cluster::scenario::wait_routed(
        running.patroxy.write_port,
        &running.cluster.nodes[leader].ip,
        timeout,
    )
    .map_err(|e| anyhow!("{e}"))?;
    Ok(leader)
}
