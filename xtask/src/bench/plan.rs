//! `cargo xtask bench`'s options, and the plan they make with the defaults and --quick.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, bail};

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
    /// patroxy-bpf, HAProxy and (with --netns) patroxy-tc under `perf record -a -g` and
    /// `perf stat`; writes
    /// bench/profile.md (CPU per transaction by group: kworker, softirq, postgres, pgbench,
    /// proxy).
    #[arg(long)]
    pub profile: bool,
    /// A/B mode: compare patroxy variants (interleaved rounds, direct as the reference) instead
    /// of the four standard targets. Repeat per variant: `NAME=MODE[@BIN][:KEY=VALUE]...`, MODE
    /// `bpf`, `fallback` or `tc` (`datapath = "tc"`, with --netns), BIN a patroxy binary (default: the one built), KEY=VALUE extra
    /// environment; `haproxy` alone adds HAProxy. Prints the table, writes nothing. A `tc`
    /// variant also reports the share of each workload's sessions it handed off.
    #[arg(long)]
    pub ab: Vec<String>,
    /// The XDP allowlist instead: pgbench -S through patroxy from clients whose veths carry
    /// the tc program, the XDP program in generic mode, in native mode, and none (`--rounds`
    /// in rotating order, `--duration` s each; tps and CPU per transaction), and a SYN flood
    /// from a denied source dropped by XDP, by tc and by an nftables rule of the same meaning
    /// on one core. Writes bench/xdp.md.
    #[arg(long, conflicts_with_all = ["ab", "profile"])]
    pub xdp: bool,
    /// Run on three hosts instead of loopback: client (pgbench, psql), proxy (patroxy,
    /// HAProxy; it routes, so direct passes it too) and server (PostgreSQL), network namespaces
    /// joined by two veth pairs (pxb-cli, pxb-prx, pxb-srv; 10.215.1-2.0/24), created here and
    /// removed at the end. Applies to the default run, --ab and --profile; the reports are
    /// written as results-netns.md, ratios-netns.png, profile-netns.md.
    #[arg(long, conflicts_with = "xdp")]
    pub netns: bool,
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
    /// On the namespace topology (`--netns`) rather than loopback.
    pub netns: bool,
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
    pub fn from_args(a: &BenchArgs) -> Result<Plan> {
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
            netns: a.netns,
        })
    }

    /// A report's file name: `stem.ext`, or `stem-netns.ext` on the namespace topology (so
    /// one run does not overwrite the other's report).
    pub fn file_name(&self, stem: &str, ext: &str) -> String {
        if self.netns {
            format!("{stem}-netns.{ext}")
        } else {
            format!("{stem}.{ext}")
        }
    }
}
