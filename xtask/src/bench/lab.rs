//! What the workloads run against: the targets, and the processes behind them that a `Lab`
//! stops when it is dropped. `mod.rs` starts it.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::Command;

use patroxy_tests::netns;
use patroxy_tests::postgres::Postgres;
use patroxy_tests::process::ChildGuard;

use super::handoffs::TcControl;
use super::topology::Hosts;

/// One of the four things a workload connects to.
#[derive(Debug, Clone)]
pub struct Target {
    /// "direct", "patroxy-bpf", "patroxy-fallback", "haproxy" (or an A/B variant's name).
    pub name: &'static str,
    /// The address clients connect to (127.0.0.1 on loopback).
    pub host: IpAddr,
    pub port: u16,
    /// The proxy's process id (None for direct).
    pub pid: Option<u32>,
    /// A `datapath = "tc"` patroxy's runtime socket: how many sessions it handed off.
    pub tc: Option<TcControl>,
}

/// Everything the bench started; dropping it stops the proxies and PostgreSQL.
pub struct Lab {
    pub pg: Postgres,
    pub targets: Vec<Target>,
    /// Holds the proxies (stopped on drop); kept after `pg` in drop order is irrelevant:
    /// each guard stops its own child.
    pub(super) _children: Vec<ChildGuard>,
    pub work_dir: PathBuf,
    /// The proxies' BPF pin directories, removed on drop.
    pub(super) pins: Vec<PathBuf>,
    /// Where everything runs; its namespaces, if any, go last, after the processes in them.
    pub hosts: Hosts,
}

impl Drop for Lab {
    fn drop(&mut self) {
        // The proxies first (ChildGuard's drop), then PostgreSQL (its own drop).
        self._children.clear();
        let _ = std::fs::remove_dir_all(&self.work_dir);
        for pin in &self.pins {
            let _ = std::fs::remove_dir_all(pin);
        }
    }
}

impl Lab {
    pub fn target(&self, name: &str) -> Option<&Target> {
        self.targets.iter().find(|t| t.name == name)
    }

    /// A measured client (`pgbench`, `psql`) for `t`, on the client host; its arguments
    /// still need `-h t.host -p t.port`.
    pub fn client(&self, tool: &str, t: &Target) -> Command {
        let mut cmd = self.pg.client(tool, t.port);
        cmd.env("PGHOST", t.host.to_string());
        if let Some(ns) = self.hosts.client_ns() {
            // After the server's namespace that `Postgres::client` enters: the last one wins.
            netns::enter(&mut cmd, ns);
        }
        cmd
    }
}
