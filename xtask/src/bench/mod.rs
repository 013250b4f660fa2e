//! `cargo xtask bench`: patroxy's two data paths against a direct connection and Debian's
//! HAProxy, side by side on loopback (issue 6) or, with `--netns`, on a client, a proxy and a
//! server host of their own (issue 15). It reports; it never fails on a number.
//!
//! One PostgreSQL (fsync off, trust auth, max_connections > 2000) and three
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
//! Layout: `mod.rs` (starts PostgreSQL and the proxies with their configs, runs the bench),
//! `plan.rs` (options), `lab.rs` (the targets and the processes behind them), `workloads/`
//! (one file per workload), `pgbench.rs` and `procfs.rs` (what the workloads run and read),
//! `handoffs.rs` (the sessions a `datapath = "tc"` variant handed to the packet-level splice),
//! `results.rs` (samples, medians, ratios), `environment.rs`, `markdown.rs` and `chart.rs`
//! (`bench/results.md`, `bench/ratios.png`), `ab.rs` (`--ab`), `profile.rs` (`--profile`),
//! `xdp.rs` (`--xdp`: the XDP allowlist's cost and drop rate, on namespaces of its own),
//! `topology.rs` (`--netns`: client, proxy and server on hosts of their own, namespaces
//! joined by veths, instead of loopback; every mode but `--xdp` runs on either).
//! Imports go one way: no file here uses `mod.rs`.

mod ab;
mod chart;
mod environment;
mod handoffs;
mod lab;
mod markdown;
mod pgbench;
mod plan;
mod procfs;
mod profile;
mod results;
mod topology;
mod workloads;
mod xdp;

pub use plan::BenchArgs;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use patroxy_tests::config::{
    Bpf, DefaultServer, HaproxyLog, ListenerConfig, ProxyConfig, RuntimeConfig, ServerConfig,
};
use patroxy_tests::ports::free_tcp_port;
use patroxy_tests::postgres::{Postgres, PostgresOptions, run_checked};
use patroxy_tests::process::ChildGuard;

use crate::cargo::{build_patroxy, patroxy_path, workspace_root};
use crate::setup;
use environment::Environment;
use lab::{Lab, Target};
use plan::{Plan, Workload};
use results::Results;
use topology::{Hosts, Namespaces};

fn pin_path(kind: &str) -> PathBuf {
    PathBuf::from(format!(
        "/sys/fs/bpf/patroxy-bench-{kind}-{}",
        std::process::id()
    ))
}

/// Both proxies' config: the seed's globals and defaults, one listener, one server without a
/// health check (so it is always up, and none of the seed's check timing applies) and without
/// a per-server maxconn (the seed's 200 per server would queue the 2000 idle sessions on one
/// server).
fn bench_config(bind: SocketAddr, pg: SocketAddr) -> ProxyConfig {
    ProxyConfig {
        default_server: DefaultServer::default(),
        ..ProxyConfig::seed()
    }
    .server(ServerConfig::new("pg-bench", pg))
    .listener(ListenerConfig::new("postgres_write", bind, ["pg-bench"]))
}

/// patroxy's config for one data path: [`bench_config`] with `bpf` ("required" or "off") and
/// its maps pinned at `pin`; with `tc`, `datapath = "tc"` on those interfaces and a runtime
/// socket at that path (the bench reads the sessions handed off there).
fn patroxy_toml(
    bpf: &str,
    tc: Option<(&[&str], &Path)>,
    pin: &Path,
    bind: SocketAddr,
    pg: SocketAddr,
) -> Result<String> {
    let bpf: Bpf = bpf.parse().map_err(anyhow::Error::msg)?;
    let mut config = bench_config(bind, pg).data_path(bpf, pin);
    if let Some((interfaces, socket)) = tc {
        config = config
            .tc_splice(interfaces)
            .runtime(RuntimeConfig::new(socket));
    }
    Ok(format!(
        "# Written by `cargo xtask bench`.\n{}",
        config.to_toml()
    ))
}

/// HAProxy's config: [`bench_config`], no logging, no stats page.
fn haproxy_cfg(bind: SocketAddr, pg: SocketAddr) -> String {
    format!(
        "# Written by `cargo xtask bench`: the seed's settings (reference/haproxy.cfg), one server.\n{}",
        bench_config(bind, pg).to_haproxy_cfg(HaproxyLog::Off)
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
    /// `datapath = "tc"` on the proxy host's two interfaces (`--netns` only).
    pub tc: bool,
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
        let (bpf, tc) = match mode {
            "bpf" => ("required", false),
            "fallback" => ("off", false),
            "tc" => ("required", true),
            other => bail!("--ab {spec:?}: mode {other:?} is not bpf, fallback or tc"),
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
            tc,
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
                tc: false,
                env: Vec::new(),
            })
            .collect()
    }

    /// `datapath = "tc"`, profiled beside the standard two on the namespace topology.
    fn packet_splice(bin: &Path) -> Variant {
        Variant {
            name: "patroxy-tc",
            bin: bin.to_path_buf(),
            bpf: "required",
            tc: true,
            env: Vec::new(),
        }
    }
}

fn start_lab(variants: &[Variant], haproxy: bool, netns: bool) -> Result<Lab> {
    let work_dir = std::env::temp_dir().join(format!("patroxy-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work_dir)?;
    let hosts = if netns {
        println!("bench: creating the namespaces pxb-cli, pxb-prx, pxb-srv (10.215.1-2.0/24)");
        Hosts::Namespaces(Namespaces::up().context("creating the bench's namespaces")?)
    } else {
        Hosts::Loopback
    };

    println!("bench: starting PostgreSQL (fsync off, trust auth, max_connections 2100)");
    let mut options = PostgresOptions::default()
        .trust()
        .max_connections(2100)
        .conf("shared_buffers = 512MB")
        .conf("max_wal_size = 4GB")
        .conf("checkpoint_timeout = 30min");
    if let Some((ns, addr, clients)) = hosts.server_ns() {
        options = options.in_netns(ns, addr, clients);
    }
    let pg =
        Postgres::try_start(options).map_err(|e| anyhow::anyhow!("starting PostgreSQL: {e}"))?;
    Ok(Lab {
        targets: vec![Target {
            name: "direct",
            host: hosts.server(),
            port: pg.port(),
            pid: None,
            tc: None,
        }],
        pg,
        _children: Vec::new(),
        work_dir,
        pins: Vec::new(),
        hosts,
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
    /// PostgreSQL's address as the proxies reach it.
    fn pg_addr(&self) -> SocketAddr {
        SocketAddr::new(self.hosts.server(), self.pg.port())
    }

    /// Starts `cmd` on the proxy host and waits until it listens on `bind`.
    fn spawn_proxy(
        &mut self,
        name: &'static str,
        cmd: &mut Command,
        bind: SocketAddr,
    ) -> Result<()> {
        if let Some(ns) = self.hosts.proxy_ns() {
            patroxy_tests::netns::enter(cmd, ns);
        }
        let mut child = ChildGuard::spawn(name, cmd)?;
        if !self.hosts.wait_for_proxy(bind, Duration::from_secs(15))? {
            let status = child.try_wait().ok().flatten();
            bail!(
                "{name} did not listen on {bind} (exit {status:?}); log:\n{}",
                child.log()
            );
        }
        self.targets.push(Target {
            name,
            host: bind.ip(),
            port: bind.port(),
            pid: Some(child.id()),
            tc: None,
        });
        self._children.push(child);
        Ok(())
    }

    fn spawn_patroxy(&mut self, v: &Variant) -> Result<()> {
        let name = v.name;
        let bind = SocketAddr::new(self.hosts.proxy(), free_tcp_port());
        let pin = pin_path(name);
        let _ = std::fs::remove_dir_all(&pin);
        self.pins.push(pin.clone());
        let cfg = self.work_dir.join(format!("{name}.toml"));
        let tc = match (v.tc, self.hosts.proxy_interfaces()) {
            (false, _) => None,
            (true, Some(interfaces)) => Some(interfaces),
            (true, None) => bail!("{name}: the tc data path is measured with --netns only"),
        };
        let socket = self.work_dir.join(format!("{name}.sock"));
        std::fs::write(
            &cfg,
            patroxy_toml(
                v.bpf,
                tc.as_ref().map(|i| (&i[..], socket.as_path())),
                &pin,
                bind,
                self.pg_addr(),
            )?,
        )?;
        let mut cmd = Command::new(&v.bin);
        cmd.arg("run")
            .arg("--config")
            .arg(&cfg)
            .arg("--drain-grace")
            .arg("1s")
            // Per-session logging would be part of what is measured; warnings only.
            .env("PATROXY_LOG", "warn")
            .envs(v.env.iter().map(|(k, val)| (k, val)));
        self.spawn_proxy(name, &mut cmd, bind)?;
        if tc.is_some()
            && let Some(target) = self.targets.last_mut()
        {
            target.tc = Some(handoffs::TcControl {
                bin: v.bin.clone(),
                socket,
            });
        }
        Ok(())
    }

    fn spawn_haproxy(&mut self) -> Result<()> {
        let haproxy = crate::command::find_on_path("haproxy")
            .context("haproxy is not installed (apt-get install haproxy; `cargo xtask setup`)")?;
        let bind = SocketAddr::new(self.hosts.proxy(), free_tcp_port());
        let cfg = self.work_dir.join("haproxy.cfg");
        std::fs::write(&cfg, haproxy_cfg(bind, self.pg_addr()))?;
        let mut cmd = Command::new(haproxy);
        cmd.arg("-db").arg("-f").arg(&cfg);
        self.spawn_proxy("haproxy", &mut cmd, bind)
    }

    fn check_targets(&self) -> Result<()> {
        for t in &self.targets {
            let mut psql = self.client("psql", t);
            psql.args([
                "-X",
                "-At",
                "-h",
                &t.host.to_string(),
                "-p",
                &t.port.to_string(),
            ])
            .args(["-U", "postgres", "-d", "postgres", "-c", "select 1"]);
            let out = run_checked(&mut psql, Duration::from_secs(60))
                .map_err(|e| anyhow::anyhow!("psql through {}: {e}", t.name))?;
            let out = String::from_utf8_lossy(&out.stdout);
            if out.trim() != "1" {
                bail!("psql through {} returned {out:?}", t.name);
            }
            println!(
                "bench: {:<17} {:<21} {}",
                t.name,
                SocketAddr::new(t.host, t.port),
                t.pid.map(|p| format!("pid {p}")).unwrap_or_default()
            );
        }
        Ok(())
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
    if args.xdp {
        let plan = xdp::XdpPlan {
            rounds: args.rounds.unwrap_or(5),
            select_secs: args.duration.unwrap_or(8),
            flood_secs: 5,
            clients: 8,
            scale: args.scale,
        };
        return xdp::run(&bin, &out_dir, &plan).map(drop);
    }
    println!("bench: plan {plan:?}");

    if !args.ab.is_empty() {
        let variants = args
            .ab
            .iter()
            .filter(|s| s.as_str() != "haproxy")
            .map(|s| Variant::parse(s, &bin))
            .collect::<Result<Vec<_>>>()?;
        let lab = start_lab(
            &variants,
            args.ab.iter().any(|s| s == "haproxy"),
            plan.netns,
        )?;
        lab.pg.pgbench_init(lab.pg.port(), plan.scale);
        workloads::warm_up(&lab)?;
        return ab::run(&lab, &plan);
    }
    let mut variants = Variant::standard(&bin);
    if args.profile && plan.netns {
        variants.push(Variant::packet_splice(&bin));
    }
    let lab = start_lab(&variants, true, plan.netns)?;
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
    let mut results = Results::new();
    let env = Environment::collect(&lab, &bin);
    workloads::warm_up(&lab)?;
    for w in &plan.workloads {
        match w {
            Workload::Select => workloads::select::run(&lab, &plan, &mut results)?,
            Workload::Connect => workloads::connect::run(&lab, &plan, &mut results)?,
            Workload::Bulk => workloads::bulk::run(&lab, &plan, &mut results)?,
            Workload::Idle => workloads::idle::run(&lab, &plan, &mut results)?,
        }
    }
    let elapsed = started.elapsed();
    drop(lab);

    let md = markdown::render(&results, &plan, &env, elapsed);
    println!("\n{md}");
    let md_path = out_dir.join(plan.file_name("results", "md"));
    std::fs::write(&md_path, &md).with_context(|| format!("writing {}", md_path.display()))?;
    println!("bench: wrote {}", md_path.display());
    let png = out_dir.join(plan.file_name("ratios", "png"));
    match chart::draw(&results, &png) {
        Ok(()) => println!("bench: wrote {}", png.display()),
        Err(e) => eprintln!("bench: no chart ({e:#})"),
    }
    Ok(())
}
