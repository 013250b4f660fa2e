//! The Patroni nodes pg-sv01..03, each in namespace `ptx-pgN` at 10.213.77.1N with PostgreSQL
//! on :5432 and the REST API on :8008, like the seed's hosts.
//!
//! Patroni: PyPI's 4.1.x from a venv at [`VENV`] by default; Debian's 3.0.2 with
//! `PTX_PATRONI=debian` (see [`Flavor`]). [`ensure_installed`] installs the venv, idempotently;
//! `venv_usable` and [`ensure_installed`] say why the venv is made and checked the way it is.
//!
//! Timing: loop_wait 1, retry_timeout 4, ttl 20 on 4.1 (its floor: it raises a lower ttl to 20
//! and `--validate-config` rejects it) and 10 on 3.0.2 (the ttl DESIGN.md's HAProxy numbers
//! were measured with). Patroni requires ttl >= loop_wait + 2 * retry_timeout.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::netns::{SUBNET, ns_addr};
use crate::postgres::{DEFAULT_PASSWORD, PgError, pg_bin_dir, run_with_timeout};

pub const VENV: &str = "/opt/patroxy-patroni";
pub const SCOPE: &str = "patroxy-test";
pub const REPLICATION_PASSWORD: &str = "ChangeMe_Replication";

/// Which Patroni runs the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    /// PyPI's 4.1.x in [`VENV`]: the default.
    Pypi,
    /// Debian's packaged 3.0.2 (`PTX_PATRONI=debian`).
    Debian,
}

impl Flavor {
    /// `PTX_PATRONI=debian` picks Debian's 3.0.2; unset (or `pypi`, `venv`, `4.1`) PyPI's 4.1.
    pub fn from_env() -> Flavor {
        match std::env::var("PTX_PATRONI").as_deref() {
            Ok("debian" | "3.0" | "3.0.2") => Flavor::Debian,
            _ => Flavor::Pypi,
        }
    }

    /// The patroni executable.
    pub fn patroni_bin(self) -> PathBuf {
        match self {
            Flavor::Pypi => Path::new(VENV).join("bin/patroni"),
            Flavor::Debian => PathBuf::from("/usr/bin/patroni"),
        }
    }

    /// Patroni's DCS ttl in seconds: 4.1 refuses less than 20.
    pub fn ttl(self) -> u32 {
        match self {
            Flavor::Pypi => 20,
            Flavor::Debian => 10,
        }
    }

    /// One line for reports: "Patroni 4.1.5 (PyPI, /opt/patroxy-patroni), ttl 20, loop_wait 1,
    /// retry_timeout 4".
    pub fn describe(self) -> String {
        let bin = self.patroni_bin();
        let version = Command::new(&bin)
            .arg("--version")
            .output()
            .ok()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .trim()
                    .replace("patroni", "Patroni")
            })
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| format!("{} (not installed)", bin.display()));
        let origin = match self {
            Flavor::Pypi => format!("PyPI, {VENV}"),
            Flavor::Debian => "Debian's package".to_owned(),
        };
        format!(
            "{version} ({origin}), ttl {}, loop_wait 1, retry_timeout 4",
            self.ttl()
        )
    }
}

/// The patroni executable of [`Flavor::from_env`].
pub fn patroni_bin() -> PathBuf {
    Flavor::from_env().patroni_bin()
}

/// The patronictl next to [`patroni_bin`].
pub fn patronictl_bin() -> PathBuf {
    patroni_bin().with_file_name("patronictl")
}

/// Whether the postgres user can run the venv's Patroni. Checked as that user through an `env`
/// hop: `setpriv` keeps root's capabilities until its own exec, so a check run by it directly
/// (or as root) passes on a venv whose interpreter the postgres user cannot exec, the cause of
/// the bootstrap hang (Patroni's spawned child re-execs the interpreter without them).
fn venv_usable() -> Option<String> {
    let python = Path::new(VENV).join("bin/python3");
    let out = Command::new("setpriv")
        .args([
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
            "--",
        ])
        .arg("env")
        .arg(&python)
        .args(["-c", "import patroni.version as v; print(v.__version__)"])
        .current_dir("/")
        .output()
        .ok()?;
    let version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (out.status.success() && version.starts_with("4.1")).then_some(version)
}

/// Installs PyPI's Patroni 4.1.x into [`VENV`] unless the postgres user can already run it
/// there. Idempotent; needs root, python3-venv and access to PyPI. The venv is made by Debian's
/// `/usr/bin/python3` (not the first python3 on PATH, which may be pyenv's under root's home,
/// out of the postgres user's reach); one it cannot use is made again. Returns a one-line
/// status saying what it did.
pub fn ensure_installed() -> Result<String, PgError> {
    if let Some(v) = venv_usable() {
        return Ok(format!("Patroni {v} ({VENV})"));
    }
    let step = |cmd: &mut Command| -> Result<(), PgError> {
        let out = run_with_timeout(cmd, Duration::from_secs(600))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(PgError::from(std::io::Error::other(format!(
                "{cmd:?} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))))
        }
    };
    let remade = Path::new(VENV).exists();
    if remade {
        // Made by another interpreter, or half installed: start over.
        std::fs::remove_dir_all(VENV)?;
    }
    step(Command::new("/usr/bin/python3").args(["-m", "venv", VENV]))?;
    step(Command::new(Path::new(VENV).join("bin/pip")).args([
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "patroni[etcd3,psycopg2-binary]==4.1.*",
    ]))?;
    let v = venv_usable().ok_or_else(|| {
        PgError::from(std::io::Error::other(format!(
            "the postgres user cannot run Patroni from {VENV} after installing it"
        )))
    })?;
    Ok(format!(
        "{} Patroni {v} from PyPI into {VENV} (made with /usr/bin/python3)",
        if remade { "reinstalled" } else { "installed" }
    ))
}

/// One member of the cluster.
#[derive(Clone, Debug)]
pub struct Node {
    /// 1..=3.
    pub index: u8,
    /// `pg-sv0N`.
    pub name: String,
    /// `ptx-pgN`.
    pub ns: String,
    /// `10.213.77.1N`.
    pub ip: String,
    /// `<state dir>/pg-sv0N`: config, data dir, socket, log.
    pub dir: PathBuf,
}

impl Node {
    pub fn new(index: u8, state_dir: &Path) -> Node {
        let ns = format!("ptx-pg{index}");
        let name = format!("pg-sv0{index}");
        Node {
            index,
            ip: ns_addr(&ns),
            dir: state_dir.join(&name),
            name,
            ns,
        }
    }

    pub fn pg_addr(&self) -> SocketAddr {
        format!("{}:5432", self.ip).parse().unwrap()
    }

    pub fn api_addr(&self) -> SocketAddr {
        format!("{}:8008", self.ip).parse().unwrap()
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("patroni.yml")
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("patroni.log")
    }

    /// The postmaster's pid from its pid file, if PostgreSQL runs.
    pub fn postmaster_pid(&self) -> Option<i32> {
        let s = std::fs::read_to_string(self.data_dir().join("postmaster.pid")).ok()?;
        let pid: i32 = s.lines().next()?.trim().parse().ok()?;
        Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
    }

    /// The pid of this node's patroni process (found among its namespace's processes).
    pub fn patroni_pid(&self) -> Option<i32> {
        super::netns::pids(&self.ns).into_iter().find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| {
                    let c = String::from_utf8_lossy(&c);
                    c.contains("bin/patroni\0") && !c.contains("patronictl")
                })
                .unwrap_or(false)
        })
    }

    /// The Patroni YAML of this node.
    pub fn config(&self) -> Result<String, PgError> {
        let bin_dir = pg_bin_dir()?;
        let ip = &self.ip;
        let dir = self.dir.display();
        let name = &self.name;
        let etcd = super::etcd::client_addr();
        Ok(format!(
            r#"# Written by the patroxy cluster harness (tests/src/cluster/patroni.rs).
scope: {SCOPE}
namespace: /service/
name: {name}
log:
  level: INFO
restapi:
  listen: {ip}:8008
  connect_address: {ip}:8008
etcd3:
  host: {etcd}
bootstrap:
  dcs:
    ttl: {ttl}
    loop_wait: 1
    retry_timeout: 4
    maximum_lag_on_failover: 1048576
    postgresql:
      use_pg_rewind: true
      use_slots: true
      parameters:
        wal_level: replica
        hot_standby: "on"
        wal_log_hints: "on"
        max_connections: 300
        max_wal_senders: 10
        max_replication_slots: 10
  initdb:
    - encoding: UTF8
    - locale: C
postgresql:
  listen: {ip}:5432
  connect_address: {ip}:5432
  data_dir: {dir}/data
  bin_dir: {bin_dir}
  pgpass: {dir}/pgpass
  use_unix_socket: true
  remove_data_directory_on_rewind_failure: true
  remove_data_directory_on_diverged_timelines: true
  authentication:
    superuser:
      username: postgres
      password: {DEFAULT_PASSWORD}
    replication:
      username: replicator
      password: {REPLICATION_PASSWORD}
    rewind:
      username: postgres
      password: {DEFAULT_PASSWORD}
  parameters:
    unix_socket_directories: '{dir}'
    fsync: "off"
    synchronous_commit: "off"
  pg_hba:
    - local all all trust
    - host all all 127.0.0.1/32 scram-sha-256
    - host all all {SUBNET}.0/24 scram-sha-256
    - host replication replicator {SUBNET}.0/24 scram-sha-256
    - host replication replicator 127.0.0.1/32 scram-sha-256
tags:
  nofailover: false
  noloadbalance: false
  clonefrom: false
  nosync: false
"#,
            bin_dir = bin_dir.display(),
            ttl = Flavor::from_env().ttl(),
        ))
    }
}

/// `GET http://addr/path` with a timeout: (status, body). Only to the harness's hosts.
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad HTTP answer: {text:.80}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// A member as `GET /cluster` lists it.
#[derive(Clone, Debug)]
pub struct Member {
    pub name: String,
    pub role: String,
    pub state: String,
    pub host: String,
}

/// `GET /cluster` from the first node that answers.
pub fn members(nodes: &[Node]) -> Option<Vec<Member>> {
    for n in nodes {
        if let Ok((200, body)) = http_get(n.api_addr(), "/cluster", Duration::from_millis(800)) {
            let v: serde_json::Value = serde_json::from_str(&body).ok()?;
            let list = v.get("members")?.as_array()?;
            return Some(
                list.iter()
                    .map(|m| Member {
                        name: m["name"].as_str().unwrap_or_default().to_owned(),
                        role: m["role"].as_str().unwrap_or_default().to_owned(),
                        state: m["state"].as_str().unwrap_or_default().to_owned(),
                        host: m["host"].as_str().unwrap_or_default().to_owned(),
                    })
                    .collect(),
            );
        }
    }
    None
}

/// Writes a patronictl config (DCS address only) under `dir` and returns its path.
pub fn ctl_config(dir: &Path) -> Result<PathBuf, PgError> {
    let path = dir.join("patronictl.yml");
    std::fs::write(
        &path,
        format!(
            "scope: {SCOPE}\nnamespace: /service/\netcd3:\n  host: {}\n",
            super::etcd::client_addr()
        ),
    )?;
    Ok(path)
}
