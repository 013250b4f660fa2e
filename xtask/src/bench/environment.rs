//! Where and on what the bench ran, for the head of `bench/results.md`.

use std::path::Path;
use std::process::Command;

use super::lab::Lab;
use crate::command::first_line;

/// Where and on what the bench ran.
#[derive(Debug, Clone)]
pub struct Environment {
    pub date: String,
    pub kernel: String,
    pub cpu: String,
    pub memory: String,
    pub postgres: String,
    pub haproxy: String,
    pub patroxy: String,
    /// /proc/loadavg when the bench started: other work on the machine skews every number.
    pub load: String,
    /// Where the clients, the proxies and PostgreSQL ran.
    pub hosts: &'static str,
}

impl Environment {
    pub fn collect(lab: &Lab, patroxy_bin: &Path) -> Environment {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name")?.split(':').nth(1))
            .unwrap_or("?")
            .trim()
            .to_owned();
        // SAFETY: sysconf has no preconditions.
        let ncpu = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
        let mem = std::fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map(|k| format!("{:.1} GiB", k as f64 / 1048576.0))
            .unwrap_or_default();
        let root = crate::cargo::workspace_root();
        let rev = first_line(Command::new("git").arg("-C").arg(&root).args([
            "rev-parse",
            "--short",
            "HEAD",
        ]));
        let dirty = !first_line(
            Command::new("git")
                .arg("-C")
                .arg(&root)
                .args(["status", "--porcelain"]),
        )
        .is_empty();
        Environment {
            hosts: lab.hosts.describe(),
            load: std::fs::read_to_string("/proc/loadavg")
                .unwrap_or_default()
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
            date: first_line(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"])),
            kernel: first_line(Command::new("uname").args(["-srm"])),
            cpu: format!("{model}, {ncpu} CPUs"),
            memory: mem,
            postgres: first_line(Command::new(lab.pg.bin_dir().join("postgres")).arg("--version")),
            haproxy: first_line(Command::new("haproxy").arg("-v")),
            patroxy: format!(
                "{} ({}{})",
                patroxy_bin.display(),
                if rev.is_empty() { "?" } else { &rev },
                if dirty { ", uncommitted changes" } else { "" }
            ),
        }
    }
}
