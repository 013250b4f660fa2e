//! `cargo xtask bench --profile`: where the CPU goes, by group, for direct, patroxy-bpf, HAProxy
//! (issue 6) and, on the namespace topology, patroxy-tc (issue 17).
//!
//! Each case (pgbench -S with 8 and 1 clients, -S -C with 8, COPY TO STDOUT, COPY FROM STDIN) runs once per
//! target under `perf record -a -g` (cpu-clock at `FREQ` Hz, every CPU) and `perf stat -a`
//! (context switches, workqueue items executed, wakeups). `perf script` callchains are then
//! classified per sample: a kworker running `sk_psock_backlog` (the sockmap's egress send), any
//! other kworker, softirq (whatever task it interrupted), postgres, pgbench/psql, the proxy
//! process, idle, other. The report gives CPU per 1000 transactions (or per 100 MB) per group,
//! the inclusive share of a few kernel functions, and the top leaf symbols of the big groups.
//! Everything is system-wide: the machine must be otherwise quiet for the numbers to mean much.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};

use super::lab::{Lab, Target};
use super::pgbench;
use super::plan::Plan;
use super::workloads::bulk::{self, psql_timed};
use super::workloads::select;
use patroxy_tests::process::ChildGuard;

/// Sampling frequency of `perf record` (per CPU).
const FREQ: u32 = 999;

/// Kernel functions whose inclusive share (samples with the function anywhere in the chain)
/// the report lists, with what they stand for.
const MARKERS: &[(&str, &str)] = &[
    (
        "sk_psock_verdict_data_ready",
        "sockmap receive: read_skb + verdict + queue to peer (softirq)",
    ),
    (
        "bpf_prog_",
        "the BPF programs (verdict; TC with patroxy-tc)",
    ),
    (
        "patroxy_tc_ingress",
        "… of which the TC program (patroxy-tc)",
    ),
    (
        "skb_do_redirect",
        "TC redirect to the other leg (patroxy-tc)",
    ),
    (
        "sk_psock_backlog",
        "sockmap egress: backlog work item (kworker)",
    ),
    ("__skb_send_sock", "… of which skb_send_sock → tcp send"),
    ("tcp_sendmsg_locked", "TCP send path (all senders)"),
    ("tcp_v4_rcv", "TCP receive path"),
    (
        "ip_forward",
        "IP forwarding (`--netns`: direct's path through the proxy host)",
    ),
    ("veth_xmit", "veth transmit (`--netns`)"),
    ("__schedule", "context switches"),
    ("try_to_wake_up", "wakeups"),
    ("do_epoll_wait", "epoll_wait"),
];

/// What a case measures per: transactions or megabytes.
#[derive(Clone, Copy)]
enum Per {
    /// CPU per 1000 transactions.
    KiloTx(u64),
    /// CPU per 100 MB.
    HundredMb(f64),
}

impl Per {
    fn scale(self) -> f64 {
        match self {
            Per::KiloTx(tx) => 1000.0 / tx.max(1) as f64,
            Per::HundredMb(mb) => 100.0 / mb.max(1e-9),
        }
    }
    fn unit(self) -> &'static str {
        match self {
            Per::KiloTx(_) => "ms CPU / 1000 tx",
            Per::HundredMb(_) => "ms CPU / 100 MB",
        }
    }
}

/// One profiled run.
struct Profile {
    case: String,
    target: &'static str,
    per: Per,
    /// What the workload reported (tps, MB/s).
    outcome: String,
    /// Samples per group.
    groups: HashMap<String, u64>,
    /// Samples per marker (inclusive).
    markers: HashMap<&'static str, u64>,
    /// Leaf symbols per group.
    leaves: HashMap<String, HashMap<String, u64>>,
    /// perf stat counters (name -> count).
    stat: Vec<(String, f64)>,
}

pub fn run(lab: &Lab, plan: &Plan, out_dir: &Path) -> Result<()> {
    let perf =
        crate::command::find_on_path("perf").context("perf is not installed (linux-perf)")?;
    let dir = lab.work_dir.join("perf");
    std::fs::create_dir_all(&dir)?;
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let started = Instant::now();
    // patroxy-tc runs only on the namespace topology (`--netns`).
    let targets: Vec<&Target> = ["direct", "patroxy-bpf", "patroxy-tc", "haproxy"]
        .iter()
        .filter_map(|n| lab.target(n))
        .collect();
    let bulk_file = bulk::prepare(lab, plan.bulk_bytes)?;
    let bulk_mb = std::fs::metadata(&bulk_file)?.len() as f64 / 1e6;
    let mut profiles = Vec::new();
    for (clients, connect) in [(8u32, false), (1, false), (8, true)] {
        let case = if connect {
            format!("pgbench -S -C -c {clients}")
        } else {
            format!("pgbench -S -c {clients}")
        };
        for t in &targets {
            let mut args = select::pgbench_args(plan, clients);
            if connect {
                args.push("-C".into());
            }
            let timeout = Duration::from_secs(plan.duration + 120);
            let (out, rec) = under_perf(&perf, &dir, || pgbench::run(lab, t, &args, timeout))?;
            let outcome = format!("{:.0} tps, {:.1} us", out.tps, out.latency_ms * 1000.0);
            println!("  [{case}] {:<12} {outcome}", t.name);
            profiles.push(rec.analyse(&perf, &case, t, Per::KiloTx(out.transactions), outcome)?);
        }
    }
    for (case, sql, stdin) in [
        ("COPY TO STDOUT", "COPY bench_bulk TO STDOUT", None),
        (
            "COPY FROM STDIN",
            "COPY bench_bulk_in FROM STDIN",
            Some(bulk_file.as_path()),
        ),
    ] {
        for t in &targets {
            lab.pg
                .try_psql(lab.targets[0].port, "TRUNCATE bench_bulk_in")
                .map_err(|e| anyhow!("{e}"))?;
            let (elapsed, rec) = under_perf(&perf, &dir, || psql_timed(lab, t, sql, stdin))?;
            let outcome = format!("{:.1} MB/s", bulk_mb / elapsed.as_secs_f64());
            println!("  [{case}] {:<12} {outcome}", t.name);
            profiles.push(rec.analyse(&perf, case, t, Per::HundredMb(bulk_mb), outcome)?);
        }
    }
    bulk::drop_table(lab, &bulk_file)?;
    let mut md = markdown(
        &profiles,
        load.trim(),
        lab.hosts.describe(),
        started.elapsed(),
    );
    let path = out_dir.join(plan.file_name("profile", "md"));
    // The hand-written reading of the numbers survives a re-run.
    if let Ok(old) = std::fs::read_to_string(&path)
        && let Some(at) = old.find("\n## Analysis")
    {
        md.push_str(&old[at..]);
    }
    std::fs::write(&path, &md).with_context(|| format!("writing {}", path.display()))?;
    println!("\n{md}\nbench: wrote {}", path.display());
    Ok(())
}

/// The files of one `perf record` + `perf stat` run.
struct Recording {
    data: PathBuf,
    stat: PathBuf,
    seconds: f64,
}

/// Runs `work` while `perf record -a -g` and `perf stat -a` watch every CPU.
fn under_perf<T>(
    perf: &Path,
    dir: &Path,
    work: impl FnOnce() -> Result<T>,
) -> Result<(T, Recording)> {
    let n = std::fs::read_dir(dir)?.count();
    let data = dir.join(format!("{n}.data"));
    let stat = dir.join(format!("{n}.stat"));
    let mut record = Command::new(perf);
    record
        .args(["record", "-a", "-g", "-q", "-F", &FREQ.to_string(), "-o"])
        .arg(&data)
        .stdout(Stdio::null());
    let mut stat_cmd = Command::new(perf);
    stat_cmd
        .args([
            "stat",
            "-a",
            "-x",
            ",",
            "-e",
            "cpu-clock,context-switches,workqueue:workqueue_execute_start,sched:sched_wakeup",
            "-o",
        ])
        .arg(&stat)
        .stdout(Stdio::null());
    let rec = ChildGuard::spawn("perf-record", &mut record)?;
    let st = ChildGuard::spawn("perf-stat", &mut stat_cmd)?;
    // perf needs a moment to open its events on every CPU.
    std::thread::sleep(Duration::from_millis(700));
    let start = Instant::now();
    let out = work();
    let seconds = start.elapsed().as_secs_f64();
    for (mut child, what) in [(st, "perf stat"), (rec, "perf record")] {
        child.signal(libc::SIGINT)?;
        match child.wait_timeout(Duration::from_secs(60))? {
            Some(_) => {}
            None => bail!("{what} did not stop after SIGINT"),
        }
    }
    Ok((
        out?,
        Recording {
            data,
            stat,
            seconds,
        },
    ))
}

impl Recording {
    fn analyse(
        &self,
        perf: &Path,
        case: &str,
        target: &Target,
        per: Per,
        outcome: String,
    ) -> Result<Profile> {
        let script = Command::new(perf)
            .args(["script", "-F", "comm,pid,ip,sym", "-i"])
            .arg(&self.data)
            .stderr(Stdio::null())
            .output()
            .context("perf script")?;
        let text = String::from_utf8_lossy(&script.stdout);
        let mut p = Profile {
            case: case.to_owned(),
            target: target.name,
            per,
            outcome,
            groups: HashMap::new(),
            markers: HashMap::new(),
            leaves: HashMap::new(),
            stat: read_stat(&self.stat, self.seconds),
        };
        for sample in text.split("\n\n") {
            let mut lines = sample.lines().filter(|l| !l.trim().is_empty());
            let Some(head) = lines.next() else { continue };
            let mut words = head.split_whitespace().rev();
            let pid: u32 = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
            let comm: Vec<&str> = words.collect();
            let comm = comm.into_iter().rev().collect::<Vec<_>>().join(" ");
            let frames: Vec<(u64, &str)> = lines
                .filter_map(|l| {
                    let mut it = l.split_whitespace();
                    let ip = u64::from_str_radix(it.next()?, 16).ok()?;
                    let sym = it.next().unwrap_or("[unknown]");
                    Some((ip, sym.split('+').next().unwrap_or(sym)))
                })
                .collect();
            let group = classify(&comm, pid, target.pid, &frames);
            *p.groups.entry(group.clone()).or_default() += 1;
            for (m, _) in MARKERS {
                // A BPF program's symbol is bpf_prog_<tag>_<name>.
                if frames
                    .iter()
                    .any(|(_, s)| s.starts_with(m) || s.ends_with(m))
                {
                    *p.markers.entry(m).or_default() += 1;
                }
            }
            if let Some((_, leaf)) = frames.first() {
                *p.leaves
                    .entry(group)
                    .or_default()
                    .entry((*leaf).to_owned())
                    .or_default() += 1;
            }
        }
        let _ = std::fs::remove_file(&self.data);
        Ok(p)
    }
}

const KERNEL_SPACE: u64 = 0xffff_8000_0000_0000;

fn classify(comm: &str, pid: u32, proxy: Option<u32>, frames: &[(u64, &str)]) -> String {
    let has = |name: &str| frames.iter().any(|(_, s)| *s == name);
    if comm.starts_with("swapper") && !has("handle_softirqs") {
        return "idle".into();
    }
    if comm.starts_with("kworker") {
        return if has("sk_psock_backlog") {
            "kworker: sk_psock_backlog".into()
        } else {
            "kworker: other".into()
        };
    }
    if has("handle_softirqs") || has("__do_softirq") || has("net_rx_action") {
        return "softirq (in any task)".into();
    }
    let who = if Some(pid) == proxy {
        "proxy"
    } else if comm.starts_with("postgres") {
        "postgres"
    } else if comm.starts_with("pgbench") || comm.starts_with("psql") {
        "client (pgbench/psql)"
    } else {
        return "other".into();
    };
    let kernel = frames.first().is_some_and(|(ip, _)| *ip >= KERNEL_SPACE);
    format!("{who} ({})", if kernel { "kernel" } else { "user" })
}

/// perf stat -x, output: `value,unit,event,...`; returns per-second rates' totals.
fn read_stat(path: &Path, _seconds: f64) -> Vec<(String, f64)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            let v: f64 = f.first()?.parse().ok()?;
            Some((f.get(2)?.to_string(), v))
        })
        .collect()
}

const GROUP_ORDER: &[&str] = &[
    "kworker: sk_psock_backlog",
    "kworker: other",
    "softirq (in any task)",
    "proxy (user)",
    "proxy (kernel)",
    "postgres (user)",
    "postgres (kernel)",
    "client (pgbench/psql) (user)",
    "client (pgbench/psql) (kernel)",
    "other",
];

fn markdown(profiles: &[Profile], load: &str, hosts: &str, elapsed: Duration) -> String {
    let ms_per_sample = 1000.0 / FREQ as f64;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# patroxy profile: where the CPU goes (direct, patroxy-bpf, patroxy-tc with --netns, HAProxy)\n\n\
         Written by `cargo xtask bench --profile` ({:.0} s). `perf record -a -g -F {FREQ}` \
         (cpu-clock, every CPU) and `perf stat -a` around each run; samples classified by \
         callchain. Load average at the start: {load}. Everything else running on the machine \
         lands in `other` and inflates `softirq`/`kworker: other` only if it does networking.\n\n\
         Where: {hosts}.\n",
        elapsed.as_secs_f64()
    );
    let mut cases: Vec<&str> = Vec::new();
    for p in profiles {
        if !cases.contains(&p.case.as_str()) {
            cases.push(&p.case);
        }
    }
    for case in cases {
        let runs: Vec<&Profile> = profiles.iter().filter(|p| p.case == case).collect();
        let unit = runs[0].per.unit();
        let _ = writeln!(s, "## {case}\n");
        let _ = writeln!(
            s,
            "| {unit} | {} |",
            runs.iter()
                .map(|p| p.target)
                .collect::<Vec<_>>()
                .join(" | ")
        );
        let _ = writeln!(s, "|---|{}", "--:|".repeat(runs.len()));
        let _ = writeln!(
            s,
            "| outcome | {} |",
            runs.iter()
                .map(|p| p.outcome.as_str())
                .collect::<Vec<_>>()
                .join(" | ")
        );
        let row = |s: &mut String, label: &str, f: &dyn Fn(&Profile) -> f64| {
            let _ = writeln!(
                s,
                "| {label} | {} |",
                runs.iter()
                    .map(|p| format!("{:.1}", f(p)))
                    .collect::<Vec<_>>()
                    .join(" | ")
            );
        };
        for g in GROUP_ORDER {
            row(&mut s, g, &|p| {
                p.groups.get(*g).copied().unwrap_or(0) as f64 * ms_per_sample * p.per.scale()
            });
        }
        row(&mut s, "**busy (all but idle)**", &|p| {
            p.groups
                .iter()
                .filter(|(g, _)| g.as_str() != "idle")
                .map(|(_, n)| *n)
                .sum::<u64>() as f64
                * ms_per_sample
                * p.per.scale()
        });
        let _ = writeln!(s, "| *inclusive, same unit:* |{}", " |".repeat(runs.len()));
        for (m, what) in MARKERS {
            row(&mut s, &format!("`{m}` — {what}"), &|p| {
                p.markers.get(m).copied().unwrap_or(0) as f64 * ms_per_sample * p.per.scale()
            });
        }
        let per_unit = match runs[0].per {
            Per::KiloTx(_) => "per transaction",
            Per::HundredMb(_) => "per MB",
        };
        let _ = writeln!(s, "| *perf stat, {per_unit}:* |{}", " |".repeat(runs.len()));
        for (event, label) in [
            ("context-switches", "context switches"),
            ("workqueue:workqueue_execute_start", "work items executed"),
            ("sched:sched_wakeup", "wakeups"),
        ] {
            let _ = writeln!(
                s,
                "| {label} | {} |",
                runs.iter()
                    .map(|p| {
                        let v = p
                            .stat
                            .iter()
                            .find(|(e, _)| e == event)
                            .map_or(f64::NAN, |(_, v)| *v);
                        let per = match p.per {
                            Per::KiloTx(tx) => v / tx.max(1) as f64,
                            Per::HundredMb(mb) => v / mb,
                        };
                        format!("{per:.2}")
                    })
                    .collect::<Vec<_>>()
                    .join(" | ")
            );
        }
        let _ = writeln!(s);
        for p in &runs {
            if p.target == "direct" {
                continue;
            }
            let _ = writeln!(s, "Top leaf symbols through {} ({case}):\n", p.target);
            for g in [
                "kworker: sk_psock_backlog",
                "softirq (in any task)",
                "proxy (kernel)",
                "proxy (user)",
            ] {
                let Some(leaves) = p.leaves.get(g) else {
                    continue;
                };
                let total: u64 = leaves.values().sum();
                let mut v: Vec<(&String, &u64)> = leaves.iter().collect();
                v.sort_by(|a, b| b.1.cmp(a.1));
                let top = v
                    .iter()
                    .take(6)
                    .map(|(sym, n)| format!("`{sym}` {:.0}%", **n as f64 * 100.0 / total as f64))
                    .collect::<Vec<_>>()
                    .join(", ");
                let _ = writeln!(s, "- {g} ({total} samples): {top}");
            }
            let _ = writeln!(s);
        }
    }
    s
}
