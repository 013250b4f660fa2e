//! `cargo xtask bench`: patroxy's two data paths against a direct connection and Debian's
//! HAProxy, side by side on loopback (issue 6). It reports; it never fails on a number.
//!
//! One PostgreSQL (fsync off, trust auth on loopback, max_connections > 2000) and three
//! proxies in front of it, all started here and stopped when the bench ends:
//! - `patroxy-bpf`: `bpf = "required"` (sockmap splice in the kernel),
//! - `patroxy-fallback`: `bpf = "off"` (the userspace path),
//! - `haproxy`: Debian's HAProxy with the seed's settings (global maxconn 2000, mode tcp,
//!   retries 2, timeouts connect 4s / client 30m / server 30m), one server, no health check —
//!   the same listener patroxy gets from its TOML.
//!
//! Every workload runs against the four targets in the order direct, patroxy-bpf,
//! patroxy-fallback, haproxy, repeated for `--rounds` rounds (interleaved, so a drift of the
//! machine hits every target alike); the report takes medians over the rounds.
//!
//! Layout: `mod.rs` (options, processes), `workloads.rs` (the five workloads and the /proc
//! counters), `report.rs` (medians, ratios, `bench/results.md`, the PNG chart).

mod ab;
mod profile;
mod report;
mod results;
mod workloads;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use patroxy_tests::ports::{free_tcp_port, wait_for_listen};
use patroxy_tests::postgres::{Postgres, PostgresOptions};
use patroxy_tests::process::ChildGuard;

use crate::cargo::{build_patroxy, patroxy_path, workspace_root};
use crate::setup;

/// `cargo xtask bench` options. Durations are in seconds.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Smoke run: 1 round, short runs, a small bulk table, 200 idle sessions.
    #[arg(long)]
    pub quick: bool,
    /// Rounds of A B C D per workload (medians are taken over them). Default 3 (1 with --quick).
    #[arg(long)]
    pub rounds: Option<u32>,
    /// Seconds per pgbench -S run (workload 1). Default 6 (3 with --quick).
    #[arg(long)]
    pub duration: Option<u64>,
    /// Seconds per pgbench -S -C run (workload 2). Default 5 (3 with --quick).
    #[arg(long)]
    pub connect_duration: Option<u64>,
    /// Megabytes (10^6 bytes) of COPY text for the bulk workload. Default 210 (20 with --quick).
    #[arg(long)]
    pub bulk_mb: Option<u64>,
    /// Concurrent idle sessions per proxy (at most the seed's global maxconn, 2000).
    /// Default 2000 (200 with --quick).
    #[arg(long)]
    pub idle_sessions: Option<u32>,
    /// Seconds the idle sessions are held open before they are counted and closed.
    #[arg(long, default_value_t = 3)]
    pub idle_hold: u64,
    /// Client counts for workload 1, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
    pub clients: Vec<u32>,
    /// pgbench scale factor (pgbench -i -s).
    #[arg(long, default_value_t = 10)]
    pub scale: u32,
    /// Workloads to run, comma-separated: select, connect, bulk, idle (default: all).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Directory for results.md and ratios.png (default: <workspace>/bench).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Use this patroxy binary instead of setting up and building the release one.
    #[arg(long)]
    pub patroxy_bin: Option<PathBuf>,
    /// Profile instead of benchmarking: pgbench -S (8 and 1 clients) and COPY both ways through
    /// patroxy-bpf and HAProxy under `perf record -a -g` and `perf stat`; writes
    /// bench/profile.md (CPU per transaction by group: kworker, softirq, postgres, pgbench,
    /// proxy).
    #[arg(long)]
    pub profile: bool,
    /// A/B mode: compare patroxy variants (interleaved rounds, direct as the reference) instead
    /// of the four standard targets. Repeat per variant: `NAME=MODE[@BIN][:KEY=VALUE]...`, MODE
    /// `bpf` or `fallback`, BIN a patroxy binary (default: the one built), KEY=VALUE extra
    /// environment; `haproxy` alone adds HAProxy. Prints the table, writes nothing.
    #[arg(long)]
    pub ab: Vec<String>,
}

/// The settings one run uses, with the defaults and --quick applied.
#[derive(Debug, Clone)]
pub struct Plan {
    pub quick: bool,
    pub rounds: u32,
    pub duration: u64,
    pub connect_duration: u64,
    pub bulk_bytes: u64,
    pub idle_sessions: u32,
    pub idle_hold: Duration,
    pub clients: Vec<u32>,
    pub scale: u32,
    pub workloads: Vec<Workload>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    Select,
    Connect,
    Bulk,
    Idle,
}

impl Workload {
    const ALL: [Workload; 4] = [
        Workload::Select,
        Workload::Connect,
        Workload::Bulk,
        Workload::Idle,
    ];
    fn parse(s: &str) -> Result<Workload> {
        Ok(match s.trim() {
            "select" | "1" | "5" => Workload::Select,
            "connect" | "2" => Workload::Connect,
            "bulk" | "copy" | "3" => Workload::Bulk,
            "idle" | "4" => Workload::Idle,
            other => bail!("unknown workload {other:?} (select, connect, bulk, idle)"),
        })
    }
}

impl Plan {
    fn from_args(a: &BenchArgs) -> Result<Plan> {
        let q = a.quick;
        let workloads = if a.only.is_empty() {
            Workload::ALL.to_vec()
        } else {
            a.only
                .iter()
                .map(|s| Workload::parse(s))
                .collect::<Result<_>>()?
        };
        let idle_sessions = a.idle_sessions.unwrap_or(if q { 200 } else { 2000 });
        if idle_sessions > 2000 {
            bail!("--idle-sessions {idle_sessions}: the proxies' global maxconn is 2000");
        }
        Ok(Plan {
            quick: q,
            rounds: a.rounds.unwrap_or(if q { 1 } else { 3 }).max(1),
            duration: a.duration.unwrap_or(if q { 3 } else { 6 }).max(1),
            connect_duration: a.connect_duration.unwrap_or(if q { 3 } else { 5 }).max(1),
            bulk_bytes: a.bulk_mb.unwrap_or(if q { 20 } else { 210 }).max(1) * 1_000_000,
            idle_sessions,
            idle_hold: Duration::from_secs(a.idle_hold),
            clients: a.clients.clone(),
            scale: a.scale.max(1),
            workloads,
        })
    }
}

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
    _children: Vec<ChildGuard>,
    pub work_dir: PathBuf,
    /// The proxies' BPF pin directories, removed on drop.
    pins: Vec<PathBuf>,
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

fn pin_path(kind: &str) -> PathBuf {
    PathBuf::from(format!(
        "/sys/fs/bpf/patroxy-bench-{kind}-{}",
        std::process::id()
    ))
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// patroxy's config for one data path: the seed's globals and defaults, one listener, one
/// server without a health check (so it is always up) and without a per-server maxconn
/// (the seed's 200 per server would queue the 2000 idle sessions on one server).
fn patroxy_toml(bpf: &str, pin: &Path, bind: u16, pg_port: u16) -> String {
    format!(
        r#"# Written by `cargo xtask bench`.
[global]
maxconn = 2000
bpf = "{bpf}"
pin_path = "{pin}"

[defaults]
retries = 2
timeout_client = "30m"
timeout_server = "30m"
timeout_connect = "4s"
timeout_check = "5s"

[[server]]
name = "pg-bench"
address = "127.0.0.1:{pg_port}"

[[listener]]
name = "postgres_write"
bind = "127.0.0.1:{bind}"
servers = ["pg-bench"]
"#,
        pin = pin.display()
    )
}

/// HAProxy's config: the seed's global/defaults, one TCP listener with the one server
/// (no `check`, no per-server maxconn, like patroxy's), no logging, no stats page.
fn haproxy_cfg(bind: u16, pg_port: u16) -> String {
    format!(
        r#"# Written by `cargo xtask bench`: the seed's settings (reference/haproxy.cfg), one server.
global
    maxconn 2000

defaults
    mode tcp
    retries 2
    timeout client 30m
    timeout connect 4s
    timeout server 30m
    timeout check 5s

listen postgres_write
    bind 127.0.0.1:{bind}
    server pg-bench 127.0.0.1:{pg_port}
"#
    )
}

/// Raises this process's open-file limit to its hard limit: the idle workload holds 2000
/// client sockets here, and the children (PostgreSQL, HAProxy) inherit the limit.
fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// One patroxy process the bench starts.
#[derive(Debug, Clone)]
pub struct Variant {
    pub name: &'static str,
    pub bin: PathBuf,
    /// patroxy's `bpf` setting: "required" (sockmap) or "off" (fallback).
    pub bpf: &'static str,
    /// Extra environment for this process.
    pub env: Vec<(String, String)>,
}

impl Variant {
    /// Parses `NAME=MODE[@BIN][:KEY=VALUE]...` (see `BenchArgs::ab`).
    fn parse(spec: &str, default_bin: &Path) -> Result<Variant> {
        let (name, rest) = spec
            .split_once('=')
            .with_context(|| format!("--ab {spec:?}: expected NAME=MODE[@BIN][:KEY=VALUE]..."))?;
        let mut parts = rest.split(':');
        let head = parts.next().unwrap_or("");
        let (mode, bin) = match head.split_once('@') {
            Some((m, b)) => (m, PathBuf::from(b)),
            None => (head, default_bin.to_path_buf()),
        };
        let bpf = match mode {
            "bpf" => "required",
            "fallback" => "off",
            other => bail!("--ab {spec:?}: mode {other:?} is not bpf or fallback"),
        };
        let env = parts
            .map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .with_context(|| format!("--ab {spec:?}: {kv:?} is not KEY=VALUE"))
            })
            .collect::<Result<_>>()?;
        Ok(Variant {
            name: Box::leak(name.to_owned().into_boxed_str()),
            bin,
            bpf,
            env,
        })
    }

    fn standard(bin: &Path) -> Vec<Variant> {
        [("patroxy-bpf", "required"), ("patroxy-fallback", "off")]
            .into_iter()
            .map(|(name, bpf)| Variant {
                name,
                bin: bin.to_path_buf(),
                bpf,
                env: Vec::new(),
            })
            .collect()
    }
}

fn start_lab(variants: &[Variant], haproxy: bool) -> Result<Lab> {
    let work_dir = std::env::temp_dir().join(format!("patroxy-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work_dir)?;

    println!("bench: starting PostgreSQL (fsync off, trust on loopback, max_connections 2100)");
    let pg = Postgres::try_start(
        PostgresOptions::default()
            .trust()
            .max_connections(2100)
            .conf("shared_buffers = 512MB")
            .conf("max_wal_size = 4GB")
            .conf("checkpoint_timeout = 30min"),
    )
    .map_err(|e| anyhow::anyhow!("starting PostgreSQL: {e}"))?;
    Ok(Lab {
        targets: vec![Target {
            name: "direct",
            port: pg.port(),
            pid: None,
        }],
        pg,
        _children: Vec::new(),
        work_dir,
        pins: Vec::new(),
    })
    .and_then(|mut lab| {
        for v in variants {
            lab.spawn_patroxy(v)?;
        }
        if haproxy {
            lab.spawn_haproxy()?;
        }
        lab.check_targets()?;
        Ok(lab)
    })
}

impl Lab {
    fn spawn_patroxy(&mut self, v: &Variant) -> Result<()> {
        let name = v.name;
        let port = free_tcp_port();
        let pin = pin_path(name);
        let _ = std::fs::remove_dir_all(&pin);
        self.pins.push(pin.clone());
        let cfg = self.work_dir.join(format!("{name}.toml"));
        std::fs::write(&cfg, patroxy_toml(v.bpf, &pin, port, self.pg.port()))?;
        let mut cmd = Command::new(&v.bin);
        cmd.arg("run")
            .arg("--config")
            .arg(&cfg)
            .arg("--drain-grace")
            .arg("1s")
            // Per-session logging would be part of what is measured; warnings only.
            .env("PATROXY_LOG", "warn")
            .envs(v.env.iter().map(|(k, val)| (k, val)));
        let mut child = ChildGuard::spawn(name, &mut cmd)?;
        if !wait_for_listen(local(port), Duration::from_secs(15)) {
            let status = child.try_wait().ok().flatten();
            bail!(
                "{name} did not listen on 127.0.0.1:{port} (exit {status:?}); log:\n{}",
                child.log()
            );
        }
        self.targets.push(Target {
            name,
            port,
            pid: Some(child.id()),
        });
        self._children.push(child);
        Ok(())
    }

    fn spawn_haproxy(&mut self) -> Result<()> {
        let haproxy = crate::command::find_on_path("haproxy")
            .context("haproxy is not installed (apt-get install haproxy; `cargo xtask setup`)")?;
        let port = free_tcp_port();
        let cfg = self.work_dir.join("haproxy.cfg");
        std::fs::write(&cfg, haproxy_cfg(port, self.pg.port()))?;
        let mut cmd = Command::new(haproxy);
        cmd.arg("-db").arg("-f").arg(&cfg);
        let mut child = ChildGuard::spawn("haproxy", &mut cmd)?;
        if !wait_for_listen(local(port), Duration::from_secs(15)) {
            let status = child.try_wait().ok().flatten();
            bail!(
                "haproxy did not listen on 127.0.0.1:{port} (exit {status:?}); log:\n{}",
                child.log()
            );
        }
        self.targets.push(Target {
            name: "haproxy",
            port,
            pid: Some(child.id()),
        });
        self._children.push(child);
        Ok(())
    }

    fn check_targets(&self) -> Result<()> {
        for t in &self.targets {
            let out = self
                .pg
                .try_psql(t.port, "select 1")
                .map_err(|e| anyhow::anyhow!("psql through {}: {e}", t.name))?;
            if out != "1" {
                bail!("psql through {} returned {out:?}", t.name);
            }
            println!(
                "bench: {:<17} 127.0.0.1:{:<5} {}",
                t.name,
                t.port,
                t.pid.map(|p| format!("pid {p}")).unwrap_or_default()
            );
        }
        Ok(())
    }

    pub fn target(&self, name: &str) -> Option<&Target> {
        self.targets.iter().find(|t| t.name == name)
    }
}

/// `cargo xtask bench`.
pub fn bench(args: &BenchArgs) -> Result<()> {
    let plan = Plan::from_args(args)?;
    if !patroxy_tests::process::is_root() {
        bail!("the bench needs root: patroxy-bpf loads a BPF program (bpf = \"required\")");
    }
    raise_nofile();
    let bin = match &args.patroxy_bin {
        Some(bin) => bin.clone(),
        None => {
            let env = setup::setup()?;
            build_patroxy(&env, true)?
        }
    };
    if !bin.is_file() {
        bail!(
            "{} does not exist (expected release build at {})",
            bin.display(),
            patroxy_path(true).display()
        );
    }
    let out_dir = args
        .out
        .clone()
        .unwrap_or_else(|| workspace_root().join("bench"));
    std::fs::create_dir_all(&out_dir)?;
    println!("bench: plan {plan:?}");

    if !args.ab.is_empty() {
        let variants = args
            .ab
            .iter()
            .filter(|s| s.as_str() != "haproxy")
            .map(|s| Variant::parse(s, &bin))
            .collect::<Result<Vec<_>>>()?;
        let lab = start_lab(&variants, args.ab.iter().any(|s| s == "haproxy"))?;
        lab.pg.pgbench_init(lab.pg.port(), plan.scale);
        workloads::warm_up(&lab)?;
        return ab::run(&lab, &plan);
    }
    let lab = start_lab(&Variant::standard(&bin), true)?;
    println!(
        "bench: pgbench -i -s {} on port {}",
        plan.scale,
        lab.pg.port()
    );
    lab.pg.pgbench_init(lab.pg.port(), plan.scale);
    if args.profile {
        workloads::warm_up(&lab)?;
        return profile::run(&lab, &plan, &out_dir);
    }

    let started = std::time::Instant::now();
    let mut results = results::Results::new();
    let env = report::Environment::collect(&lab, &bin);
    workloads::warm_up(&lab)?;
    for w in &plan.workloads {
        match w {
            Workload::Select => workloads::select(&lab, &plan, &mut results)?,
            Workload::Connect => workloads::connect(&lab, &plan, &mut results)?,
            Workload::Bulk => workloads::bulk(&lab, &plan, &mut results)?,
            Workload::Idle => workloads::idle(&lab, &plan, &mut results)?,
        }
    }
    let elapsed = started.elapsed();
    drop(lab);

    let md = report::markdown(&results, &plan, &env, elapsed);
    println!("\n{md}");
    let md_path = out_dir.join("results.md");
    std::fs::write(&md_path, &md).with_context(|| format!("writing {}", md_path.display()))?;
    println!("bench: wrote {}", md_path.display());
    let png = out_dir.join("ratios.png");
    match report::chart(&results, &png) {
        Ok(()) => println!("bench: wrote {}", png.display()),
        Err(e) => eprintln!("bench: no chart ({e:#})"),
    }
    Ok(())
}
