//! The test hosts' network: one bridge in the root namespace and one network namespace per
//! host, joined to the bridge by a veth pair. Everything is named with the `ptx` prefix so a
//! `down` after a crashed run finds and removes it by name.
//!
//! Addresses (one private /24 the harness owns; nothing is ever sent outside it):
//! bridge `ptxbr0` 10.213.77.1/24 (patroxy and HAProxy connect from here), `ptx-etcd`
//! 10.213.77.10, `ptx-pg1..3` 10.213.77.11..13.

use std::process::Command;
use std::time::Duration;

use crate::postgres::{PgError, run_with_timeout};

pub const SUBNET: &str = "10.213.77";
pub const BRIDGE: &str = "ptxbr0";
pub const BRIDGE_ADDR: &str = "10.213.77.1";
/// Every namespace the harness creates, in creation order.
pub const NAMESPACES: [&str; 4] = ["ptx-etcd", "ptx-pg1", "ptx-pg2", "ptx-pg3"];

/// The address of a namespace's host (`ptx-etcd` -> .10, `ptx-pgN` -> .1N).
pub fn ns_addr(ns: &str) -> String {
    match ns {
        "ptx-etcd" => format!("{SUBNET}.10"),
        _ => {
            let n: u8 = ns.trim_start_matches("ptx-pg").parse().expect("ptx-pgN");
            format!("{SUBNET}.{}", 10 + n)
        }
    }
}

/// The root-side veth of a namespace (15 characters at most): `vptx-etcd`, `vptx-pg1`.
pub fn host_veth(ns: &str) -> String {
    format!("v{ns}")
}

fn run(args: &[&str]) -> Result<String, PgError> {
    let mut cmd = Command::new(args[0]);
    cmd.args(&args[1..]);
    let out = run_with_timeout(&mut cmd, Duration::from_secs(20))?;
    if !out.status.success() {
        return Err(PgError::from(std::io::Error::other(format!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run_quiet(args: &[&str]) {
    let _ = run(args);
}

/// Creates the bridge, the namespaces and the veth pairs (after removing leftovers).
pub fn up() -> Result<(), PgError> {
    down();
    run(&["ip", "link", "add", BRIDGE, "type", "bridge"])?;
    run(&[
        "ip",
        "addr",
        "add",
        &format!("{BRIDGE_ADDR}/24"),
        "dev",
        BRIDGE,
    ])?;
    run(&["ip", "link", "set", BRIDGE, "up"])?;
    for ns in NAMESPACES {
        let veth = host_veth(ns);
        run(&["ip", "netns", "add", ns])?;
        run(&[
            "ip", "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", ns,
        ])?;
        run(&["ip", "link", "set", &veth, "master", BRIDGE])?;
        run(&["ip", "link", "set", &veth, "up"])?;
        let addr = format!("{}/24", ns_addr(ns));
        run(&["ip", "-n", ns, "addr", "add", &addr, "dev", "eth0"])?;
        run(&["ip", "-n", ns, "link", "set", "eth0", "up"])?;
        run(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
    }
    Ok(())
}

/// Whether the harness's network exists.
pub fn exists() -> bool {
    std::path::Path::new(&format!("/sys/class/net/{BRIDGE}")).exists()
}

/// Pids of every process inside a namespace (`ip netns pids`).
pub fn pids(ns: &str) -> Vec<i32> {
    run(&["ip", "netns", "pids", ns])
        .map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Kills every process in the harness's namespaces (SIGTERM, then SIGKILL after `grace`).
pub fn kill_all(grace: Duration) {
    let all = || {
        NAMESPACES
            .iter()
            .flat_map(|ns| pids(ns))
            .collect::<Vec<_>>()
    };
    let first = all();
    if first.is_empty() {
        return;
    }
    for &pid in &first {
        // SAFETY: kill(2) on a process inside a namespace this harness created.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let deadline = std::time::Instant::now() + grace;
    while std::time::Instant::now() < deadline && !all().is_empty() {
        std::thread::sleep(Duration::from_millis(100));
    }
    for pid in all() {
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < deadline && !all().is_empty() {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Removes every process, namespace, veth and the bridge the harness creates, by name;
/// quiet about what is already gone (also cleans up after a crashed run).
pub fn down() {
    kill_all(Duration::from_secs(5));
    for ns in NAMESPACES {
        if std::path::Path::new(&format!("/run/netns/{ns}")).exists() {
            run_quiet(&["ip", "netns", "del", ns]);
        }
        if std::path::Path::new(&format!("/sys/class/net/{}", host_veth(ns))).exists() {
            run_quiet(&["ip", "link", "del", &host_veth(ns)]);
        }
    }
    if exists() {
        run_quiet(&["ip", "link", "del", BRIDGE]);
    }
}

/// Cuts a host off: its root-side veth goes down (packets to and from it are dropped).
pub fn link_down(ns: &str) -> Result<(), PgError> {
    run(&["ip", "link", "set", &host_veth(ns), "down"]).map(|_| ())
}

/// Reconnects a host cut off by [`link_down`].
pub fn link_up(ns: &str) -> Result<(), PgError> {
    run(&["ip", "link", "set", &host_veth(ns), "up"]).map(|_| ())
}
