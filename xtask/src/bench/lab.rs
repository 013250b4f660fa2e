//! What the workloads run against: the targets, and the processes behind them that a `Lab`
//! stops when it is dropped. `mod.rs` starts it.

use std::path::PathBuf;

use patroxy_tests::postgres::Postgres;
use patroxy_tests::process::ChildGuard;

/// One of the four things a workload connects to.
#[derive(Debug, Clone)]
pub struct Target {
    /// "direct", "patroxy-bpf", "patroxy-fallback", "haproxy" (or an A/B variant's name).
    pub name: &'static str,
    /// Port on 127.0.0.1.
    pub port: u16,
    /// The proxy's process id (None for direct).
    pub pid: Option<u32>,
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
}
