//! A real Patroni cluster on this machine: etcd and three Patroni/PostgreSQL hosts, each in a
//! network namespace the harness creates (see [`netns`]), for the failover scenarios, the
//! demo and `cargo xtask cluster`.
//!
//! Everything lives under [`STATE_DIR`] and in the `ptx*` namespaces/links, so [`down`]
//! removes a crashed run's leftovers by name. A [`Cluster`] value tears everything down when
//! dropped unless [`Cluster::detach`] was called (`cargo xtask cluster up` leaves it running).

pub mod etcd;
pub mod netns;
pub mod patroni;
pub mod proxy;
pub mod scenario;
pub mod timeline;
pub mod writer;

use std::fs::File;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::postgres::{PgError, run_with_timeout};
pub use patroni::{Member, Node};

/// Where configs, data directories and logs of the cluster live.
pub const STATE_DIR: &str = "/tmp/patroxy-cluster";

fn err(msg: impl Into<String>) -> PgError {
    PgError::from(std::io::Error::other(msg.into()))
}

/// Starts `program args` inside namespace `ns` (as the `postgres` user when `as_postgres`),
/// in its own process group, in the working directory `cwd`, with stdout+stderr appended to
/// `log`. The postgres user must be able to enter `cwd`: Patroni starts PostgreSQL through a
/// spawned Python child that changes to it, and hangs for good if that fails.
pub(crate) fn spawn_in_ns(
    ns: &str,
    as_postgres: bool,
    program: &Path,
    args: &[String],
    cwd: &Path,
    log: &Path,
) -> Result<Child, PgError> {
    let out = File::options().create(true).append(true).open(log)?;
    let mut cmd = Command::new("ip");
    cmd.current_dir(cwd);
    cmd.args(["netns", "exec", ns]);
    if as_postgres {
        // setpriv execs (no extra process), so the pid is the program's own.
        cmd.args([
            "setpriv",
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
            "--",
        ]);
        cmd.env("HOME", "/var/lib/postgresql")
            .env("USER", "postgres");
    }
    cmd.arg(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out.try_clone()?))
        .stderr(Stdio::from(out))
        .process_group(0);
    cmd.spawn()
        .map_err(|e| err(format!("spawning {} in {ns}: {e}", program.display())))
}

/// Removes every process, namespace, link and file of the harness, also a crashed run's.
pub fn down() {
    proxy::kill_recorded(Path::new(STATE_DIR));
    netns::down();
    // PTX_KEEP_STATE=1 keeps configs and logs of a failed run for a look.
    if Path::new(STATE_DIR).exists() && std::env::var_os("PTX_KEEP_STATE").is_none() {
        let _ = std::fs::remove_dir_all(STATE_DIR);
    }
}

/// The running cluster.
pub struct Cluster {
    pub dir: PathBuf,
    pub nodes: Vec<Node>,
    children: Vec<Child>,
    detached: bool,
}

impl Cluster {
    /// Removes leftovers, creates the network, starts etcd and the three nodes, and waits
    /// until there is a leader and two streaming replicas.
    pub fn up() -> Result<Cluster, PgError> {
        down();
        if patroni::Flavor::from_env() == patroni::Flavor::Pypi {
            patroni::ensure_installed()?;
        }
        let dir = PathBuf::from(STATE_DIR);
        std::fs::create_dir_all(&dir)?;
        // The postgres user must traverse it to reach its node directories.
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        let mut cluster = Cluster {
            nodes: (1..=3).map(|i| Node::new(i, &dir)).collect(),
            dir,
            children: Vec::new(),
            detached: false,
        };
        netns::up()?;
        cluster.children.push(etcd::start(&cluster.dir)?);
        cluster.wait_etcd(Duration::from_secs(20))?;
        for i in 0..3 {
            let node = cluster.nodes[i].clone();
            std::fs::create_dir_all(&node.dir)?;
            std::fs::write(node.config_path(), node.config()?)?;
            Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&node.dir)
                .status()?;
            std::fs::set_permissions(
                &node.dir,
                std::os::unix::fs::PermissionsExt::from_mode(0o700),
            )?;
            cluster.start_node(i)?;
            if i == 0 {
                // The first node bootstraps; the others clone from it.
                cluster.wait_leader(Duration::from_secs(60))?;
            }
        }
        cluster.wait_healthy(Duration::from_secs(90))?;
        Ok(cluster)
    }

    /// Attaches to a cluster started by another process (`cargo xtask cluster ...`).
    pub fn attach() -> Result<Cluster, PgError> {
        if !netns::exists() {
            return Err(err("no cluster is running (run `cargo xtask cluster up`)"));
        }
        let dir = PathBuf::from(STATE_DIR);
        Ok(Cluster {
            nodes: (1..=3).map(|i| Node::new(i, &dir)).collect(),
            dir,
            children: Vec::new(),
            detached: true,
        })
    }

    /// Leaves everything running when this value is dropped.
    pub fn detach(mut self) {
        self.detached = true;
    }

    /// Stops everything and removes the network and files.
    pub fn down(mut self) {
        self.teardown();
    }

    fn teardown(&mut self) {
        down();
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.children.clear();
    }

    fn wait_etcd(&self, timeout: Duration) -> Result<(), PgError> {
        let addr = etcd::client_addr().parse().unwrap();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok((200, _)) = patroni::http_get(addr, "/health", Duration::from_millis(500)) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Err(err(format!(
            "etcd did not become healthy:\n{}",
            self.file_tail("etcd.log")
        )))
    }

    fn file_tail(&self, rel: &str) -> String {
        let s = std::fs::read_to_string(self.dir.join(rel)).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// The last lines of a node's Patroni log.
    pub fn node_log_tail(&self, i: usize) -> String {
        self.file_tail(&format!("{}/patroni.log", self.nodes[i].name))
    }

    /// Starts (or restarts) node `i`'s Patroni, which starts its PostgreSQL.
    pub fn start_node(&mut self, i: usize) -> Result<(), PgError> {
        let node = &self.nodes[i];
        let child = spawn_in_ns(
            &node.ns,
            true,
            &patroni::patroni_bin(),
            &[node.config_path().display().to_string()],
            &node.dir,
            &node.log_path(),
        )?;
        self.children.push(child);
        Ok(())
    }

    /// Reaps children that exited (no zombies across a long test).
    fn reap(&mut self) {
        self.children
            .retain_mut(|c| !matches!(c.try_wait(), Ok(Some(_))));
    }

    /// A host crash: SIGKILL to every process in node `i`'s namespace (patroni and
    /// PostgreSQL), until none is left (at most 10 s).
    pub fn kill_node(&mut self, i: usize) {
        let ns = self.nodes[i].ns.clone();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            self.reap();
            let pids = netns::pids(&ns);
            if pids.is_empty() || Instant::now() >= deadline {
                break;
            }
            for pid in pids {
                // SAFETY: kill(2) on a process inside a namespace the harness created.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops node `i` cleanly (SIGTERM to patroni, which stops PostgreSQL).
    pub fn stop_node(&mut self, i: usize) -> Result<(), PgError> {
        if let Some(pid) = self.nodes[i].patroni_pid() {
            // SAFETY: kill(2) on the patroni process the harness started.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.nodes[i].patroni_pid().is_none() && self.nodes[i].postmaster_pid().is_none() {
                self.reap();
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.kill_node(i);
        Ok(())
    }

    /// SIGSTOP (`freeze`) or SIGCONT the patroni process of node `i`, PostgreSQL untouched.
    pub fn signal_patroni(&self, i: usize, sig: i32) -> Result<(), PgError> {
        let pid = self.nodes[i]
            .patroni_pid()
            .ok_or_else(|| err(format!("{}: patroni not running", self.nodes[i].name)))?;
        // SAFETY: kill(2) on the patroni process the harness started.
        unsafe { libc::kill(pid, sig) };
        Ok(())
    }

    pub fn members(&self) -> Option<Vec<Member>> {
        patroni::members(&self.nodes)
    }

    /// The index of the node holding the leader lock, per `GET /cluster`.
    pub fn leader(&self) -> Option<usize> {
        let m = self.members()?;
        let name = m.iter().find(|m| m.role == "leader")?.name.clone();
        self.nodes.iter().position(|n| n.name == name)
    }

    /// Waits for a running leader; returns its index.
    pub fn wait_leader(&self, timeout: Duration) -> Result<usize, PgError> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(i) = self.leader() {
                // /primary answers 200 only once the leader is running.
                if let Ok((200, _)) = patroni::http_get(
                    self.nodes[i].api_addr(),
                    "/primary",
                    Duration::from_millis(800),
                ) {
                    return Ok(i);
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Err(err(format!(
            "no leader within {timeout:?}; pg-sv01 log:\n{}",
            self.node_log_tail(0)
        )))
    }

    /// Waits until all three members run: one leader answering /primary and two replicas
    /// answering 200 on /replica. Returns the leader's index.
    pub fn wait_healthy(&self, timeout: Duration) -> Result<usize, PgError> {
        self.wait_members_healthy(&[0, 1, 2], timeout)
    }

    /// Like [`Cluster::wait_healthy`] for a subset of the nodes (the others may be down).
    pub fn wait_members_healthy(
        &self,
        which: &[usize],
        timeout: Duration,
    ) -> Result<usize, PgError> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut leader = None;
            let mut replicas = 0;
            for &i in which {
                let api = self.nodes[i].api_addr();
                let t = Duration::from_millis(800);
                // Patroni may answer from a cached role while its PostgreSQL is unusable (3.0.2
                // after a partition heals), so a member counts only if it also answers SQL; a
                // replica only once it streams from the leader (a healed old primary answers
                // SQL for a while before Patroni stops it to rewind).
                if let Ok((200, _)) = patroni::http_get(api, "/primary", t) {
                    if self.answers_sql(i) {
                        leader = Some(i);
                    }
                } else if let Ok((200, _)) = patroni::http_get(api, "/replica", t)
                    && self.streams(i)
                {
                    replicas += 1;
                }
            }
            if let Some(l) = leader
                && replicas == which.len() - 1
            {
                return Ok(l);
            }
            if Instant::now() >= deadline {
                let logs: String = which
                    .iter()
                    .map(|&i| format!("--- {}:\n{}\n", self.nodes[i].name, self.node_log_tail(i)))
                    .collect();
                return Err(err(format!(
                    "cluster not healthy within {timeout:?} (leader {leader:?}, {replicas} \
                     replicas; members {:?})\n{logs}",
                    self.members()
                )));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Whether node `i`'s PostgreSQL answers `SELECT 1` on its own address.
    pub fn answers_sql(&self, i: usize) -> bool {
        writer::connect_host(&self.nodes[i].ip, 5432)
            .and_then(|mut c| writer::query_row(&mut c, "SELECT 1"))
            .is_ok()
    }

    /// Whether node `i`'s PostgreSQL answers SQL and its WAL receiver streams.
    pub fn streams(&self, i: usize) -> bool {
        writer::connect_host(&self.nodes[i].ip, 5432)
            .and_then(|mut c| writer::query_row(&mut c, "SELECT status FROM pg_stat_wal_receiver"))
            .is_ok_and(|row| row.first().is_some_and(|s| s == "streaming"))
    }

    /// Brings the cluster back to a leader and two streaming replicas after a scenario, as an
    /// operator would: waits [`SETTLE`] for Patroni to heal it, then rebuilds each replica
    /// that still does not stream from the leader (twice at most) and waits again. Debian's
    /// Patroni 3.0.2 leaves a healed old primary with a stale postmaster over a removed data
    /// directory, or (seen once in CI) a replica asking the leader for WAL past the leader's
    /// own; patroxy is not involved. Patroni 4.1 rewinds and rejoins such nodes by itself (no
    /// rebuild in the link-down runs of 2026-12-03); the rebuild stays for 3.0.2 and as a
    /// safety net. Returns the leader's index.
    pub fn restore(&mut self) -> Result<usize, PgError> {
        const SETTLE: Duration = Duration::from_secs(45);
        const ATTEMPTS: usize = 2;
        if let Ok(leader) = self.wait_healthy(SETTLE) {
            return Ok(leader);
        }
        for attempt in 1..=ATTEMPTS {
            let leader = self.wait_leader(Duration::from_secs(60))?;
            for i in (0..self.nodes.len()).filter(|&i| i != leader) {
                if !self.streams(i) {
                    eprintln!(
                        "{} does not stream from the leader {}; rebuilding it (attempt \
                         {attempt}); members {:?}",
                        self.nodes[i].name,
                        self.nodes[leader].name,
                        self.members()
                    );
                    self.rebuild_node(i)?;
                }
            }
            match self.wait_healthy(Duration::from_secs(90)) {
                Ok(leader) => return Ok(leader),
                Err(e) if attempt == ATTEMPTS => return Err(e),
                Err(_) => {}
            }
        }
        unreachable!("the last attempt returns")
    }

    /// Rebuilds replica `i` from scratch, as an operator would a host Patroni left confused:
    /// every process in its namespace killed, its data directory removed, Patroni started
    /// again (it clones a fresh replica from the leader).
    pub fn rebuild_node(&mut self, i: usize) -> Result<(), PgError> {
        self.kill_node(i);
        let data = self.nodes[i].data_dir();
        if data.exists() {
            std::fs::remove_dir_all(&data)?;
        }
        self.start_node(i)
    }

    /// `patronictl switchover --leader <current> --candidate <node> --force`.
    pub fn switchover(&self, leader: usize, candidate: usize) -> Result<String, PgError> {
        let ctl = patroni::ctl_config(&self.dir)?;
        let mut cmd = Command::new(patroni::patronictl_bin());
        cmd.arg("-c")
            .arg(&ctl)
            .args(["switchover", "--leader", &self.nodes[leader].name])
            .args(["--candidate", &self.nodes[candidate].name, "--force"])
            .arg(patroni::SCOPE);
        let out = run_with_timeout(&mut cmd, Duration::from_secs(60))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() {
            return Err(err(format!("patronictl switchover failed: {text}")));
        }
        Ok(text)
    }

    /// `patronictl list` output.
    pub fn list(&self) -> Result<String, PgError> {
        let ctl = patroni::ctl_config(&self.dir)?;
        let mut cmd = Command::new(patroni::patronictl_bin());
        cmd.arg("-c").arg(&ctl).arg("list");
        let out = run_with_timeout(&mut cmd, Duration::from_secs(30))?;
        Ok(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for i in 0..self.nodes.len() {
                eprintln!(
                    "--- {} patroni log tail:\n{}",
                    self.nodes[i].name,
                    self.node_log_tail(i)
                );
            }
        }
        if !self.detached {
            self.teardown();
        }
    }
}
