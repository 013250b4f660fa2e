//! A patroxy daemon started by a test from a [`ProxyConfig`], stopped when dropped.
use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use crate::{
    config::ProxyConfig,
    ports::wait_for_listen,
    process::{ChildGuard, patroxy_bin},
};

static COUNTER: AtomicU32 = AtomicU32::new(0);

pub struct Patroxy {
    pub child: ChildGuard,
    pub config_path: PathBuf,
    /// bpffs directory of this daemon's pinned maps (unique per test).
    pub pin_path: PathBuf,
    /// What it listens on (its listeners', then the stats server's), as the readiness probe
    /// reached them.
    pub listen: Vec<std::net::SocketAddr>,
}

impl Patroxy {
    /// A pin directory no other test uses.
    pub fn unique_pin_path(test: &str) -> PathBuf {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        PathBuf::from(format!(
            "/sys/fs/bpf/patroxy-test-{test}-{}-{n}",
            std::process::id()
        ))
    }

    /// Writes `config` to a file, starts `patroxy run` on it and waits until every address it
    /// listens on (its listeners', then the stats server's) accepts connections.
    ///
    /// That readiness probe is a bare TCP connect, closed at once: the daemon serves it as a
    /// client like any other (a server slot and a global permit while it lasts, then a "session
    /// closed" line, or a refusal line if no server takes it within `timeout queue`).
    pub fn start(name: &str, config: &ProxyConfig) -> Patroxy {
        Self::start_with(name, config, |_| {})
    }

    /// Like `start`, letting the caller adjust the command (environment, user).
    pub fn start_with(
        name: &str,
        config: &ProxyConfig,
        adjust: impl FnOnce(&mut Command),
    ) -> Patroxy {
        Self::spawn(name, config, Duration::from_secs(1), adjust)
    }

    /// Like `start`, with `--drain-grace` (`start` gives 1 s: tests end quickly).
    pub fn start_with_drain_grace(name: &str, config: &ProxyConfig, grace: Duration) -> Patroxy {
        Self::spawn(name, config, grace, |_| {})
    }

    fn spawn(
        name: &str,
        config: &ProxyConfig,
        drain_grace: Duration,
        adjust: impl FnOnce(&mut Command),
    ) -> Patroxy {
        let pin_path = config
            .global
            .pin_path
            .clone()
            .expect("a test config sets its pin path (ProxyConfig::data_path)");
        let dir = std::env::temp_dir().join("patroxy-test-configs");
        std::fs::create_dir_all(&dir).unwrap();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let config_path = dir.join(format!("{name}-{}-{n}.toml", std::process::id()));
        std::fs::write(&config_path, config.to_toml()).unwrap();
        let mut cmd = Command::new(patroxy_bin());
        cmd.arg("run")
            .arg("--config")
            .arg(&config_path)
            .arg("--drain-grace")
            .arg(format!("{}ms", drain_grace.as_millis()))
            // PATROXY_TEST_LOG replaces the filter when debugging a test (e.g. with
            // `patroxy::dataplane::tc::handoff=trace`).
            .env(
                "PATROXY_LOG",
                std::env::var("PATROXY_TEST_LOG").unwrap_or_else(|_| "info,patroxy=debug".into()),
            );
        adjust(&mut cmd);
        let mut child = ChildGuard::spawn(name, &mut cmd).expect("spawn patroxy");
        for addr in config.listen_addrs() {
            if !wait_for_listen(addr, Duration::from_secs(10)) {
                let status = child.try_wait().ok().flatten();
                panic!(
                    "patroxy did not listen on {addr} (exit: {status:?}); log:\n{}",
                    child.log()
                );
            }
        }
        Patroxy {
            child,
            config_path,
            pin_path,
            listen: config.listen_addrs(),
        }
    }

    /// What `ss` shows of the TCP sockets on this daemon's listening ports, with their
    /// processes: for a failure that may be another process's (a probe that reached a
    /// listener of someone else's, a connection left in a backlog).
    pub fn sockets_report(&self) -> String {
        let ports: Vec<String> = self
            .listen
            .iter()
            .map(|a| format!("sport = :{p} or dport = :{p}", p = a.port()))
            .collect();
        let filter = format!("( {} )", ports.join(" or "));
        match Command::new("ss").args(["-tanpei", &filter]).output() {
            Ok(out) => format!(
                "daemon pid {}; ss -tanpei '{filter}':\n{}",
                self.child.id(),
                String::from_utf8_lossy(&out.stdout)
            ),
            Err(e) => format!("ss failed: {e}"),
        }
    }

    pub fn log(&self) -> String {
        self.child.log()
    }

    /// Waits until the log contains `needle`; false on timeout.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if self.log().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Counts log lines containing `needle`.
    pub fn count_log(&self, needle: &str) -> usize {
        self.log().lines().filter(|l| l.contains(needle)).count()
    }

    /// Waits until at least `n` log lines contain `needle`; false on timeout.
    ///
    /// To wait for a new line, count first (`count_log`) and wait for one more: `wait_for_log`
    /// also matches an earlier line, such as the one `start`'s readiness probe leaves (the
    /// probe is a bare connect, and so a client session of its own).
    pub fn wait_for_log_count(&self, needle: &str, n: usize, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if self.count_log(needle) >= n {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// `bpftool -j map dump pinned <pin_path>/<map>` parsed as JSON: an array of the typed
/// `{"key": .., "value": {..}}` entries (bpftool's "formatted" form, from the maps' BTF).
pub fn bpftool_dump(pin_path: &Path, map: &str) -> serde_json::Value {
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(pin_path.join(map))
        .output()
        .expect("run bpftool (apt-get install bpftool; cargo xtask test installs it)");
    // bpftool -j reports its errors as JSON on stdout.
    assert!(
        out.status.success(),
        "bpftool failed: {}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    let raw: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    let entries = raw.as_array().expect("bpftool dumps an array");
    serde_json::Value::Array(
        entries
            .iter()
            .map(|e| {
                e.get("formatted")
                    .cloned()
                    .unwrap_or_else(|| panic!("no BTF-typed entry in {e}"))
            })
            .collect(),
    )
}
