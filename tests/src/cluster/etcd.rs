//! The DCS: one Debian etcd-server in namespace `ptx-etcd` (10.213.77.10:2379).

use std::path::Path;
use std::process::Child;

use super::netns::ns_addr;
use super::spawn_in_ns;
use crate::postgres::PgError;

pub const NS: &str = "ptx-etcd";

/// `10.213.77.10:2379`.
pub fn client_addr() -> String {
    format!("{}:2379", ns_addr(NS))
}

/// Starts etcd with its data under `dir` and its output in `dir/etcd.log`.
pub fn start(dir: &Path) -> Result<Child, PgError> {
    let ip = ns_addr(NS);
    let data = dir.join("etcd-data");
    std::fs::create_dir_all(&data)?;
    let args: Vec<String> = vec![
        "--name".into(),
        "ptx-etcd".into(),
        "--data-dir".into(),
        data.display().to_string(),
        "--listen-client-urls".into(),
        format!("http://{ip}:2379"),
        "--advertise-client-urls".into(),
        format!("http://{ip}:2379"),
        "--listen-peer-urls".into(),
        format!("http://{ip}:2380"),
        "--initial-advertise-peer-urls".into(),
        format!("http://{ip}:2380"),
        "--initial-cluster".into(),
        format!("ptx-etcd=http://{ip}:2380"),
        "--initial-cluster-state".into(),
        "new".into(),
        "--log-level".into(),
        "warn".into(),
    ];
    spawn_in_ns(
        NS,
        false,
        Path::new("/usr/bin/etcd"),
        &args,
        dir,
        &dir.join("etcd.log"),
    )
}
