//! `cargo xtask bench --ab ...`: patroxy variants side by side (a binary before and after a
//! change, or one binary with different environment), interleaved per round with the direct
//! connection as the reference. Prints a table of medians; writes nothing.

use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};

use super::handoffs;
use super::lab::{Lab, Target};
use super::pgbench::{self, PgbenchOut};
use super::plan::{Plan, Workload};
use super::procfs::{Counters, clk_tck, delta, proc_ticks, rss_kib};
use super::results::median;
use super::workloads::bulk::{self, psql_timed};
use super::workloads::connect;
use super::workloads::idle::{open_sessions, wait_backends_gone};
use super::workloads::select::{self, PerKtx};

/// Samples of one metric: per target, one value per round.
struct Metric {
    name: String,
    higher_is_better: bool,
    samples: Vec<Vec<f64>>,
}

struct Table {
    targets: usize,
    metrics: Vec<Metric>,
}

impl Table {
    fn add(&mut self, name: &str, higher_is_better: bool, target: usize, v: f64) {
        let i = match self.metrics.iter().position(|m| m.name == name) {
            Some(i) => i,
            None => {
                self.metrics.push(Metric {
                    name: name.to_owned(),
                    higher_is_better,
                    samples: vec![Vec::new(); self.targets],
                });
                self.metrics.len() - 1
            }
        };
        self.metrics[i].samples[target].push(v);
    }

    /// A pgbench run's CPU per 1000 `unit`s: the proxy process's, every CPU's, and every CPU's
    /// above the direct run of the same round (target 0, which runs first in each round).
    fn add_cpu(&mut self, case: &str, unit: &str, i: usize, cpu: PerKtx) {
        if let Some(ms) = cpu.proxy {
            self.add(&format!("{case} proxy ms/1000{unit}"), false, i, ms);
        }
        let all = format!("{case} all CPUs ms/1000{unit}");
        self.add(&all, false, i, cpu.busy);
        if i > 0
            && let Some(direct) = self.last_sample(&all, 0)
        {
            let above = format!("{case} all CPUs above direct ms/1000{unit}");
            self.add(&above, false, i, cpu.busy - direct);
        }
    }

    /// The latest sample of metric `name` for target `i`.
    fn last_sample(&self, name: &str, i: usize) -> Option<f64> {
        let m = self.metrics.iter().find(|m| m.name == name)?;
        m.samples[i].last().copied()
    }

    /// The share of `workload`'s sessions the target handed to the packet-level splice, in
    /// percent (tc variants only), and a line for the round.
    fn add_share(
        &mut self,
        workload: &str,
        i: usize,
        round: u32,
        target: &Target,
        share: Option<(u64, u64)>,
    ) {
        let Some((sessions, handed_off)) = share else {
            return;
        };
        println!(
            "  [r{round}] {:<20} {workload}: {handed_off} of {sessions} sessions handed to tc",
            target.name
        );
        if sessions > 0 {
            let pct = handed_off as f64 * 100.0 / sessions as f64;
            self.add(&format!("{workload} handed to tc %"), true, i, pct);
        }
    }
}

pub fn run(lab: &Lab, plan: &Plan) -> Result<()> {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut t = Table {
        targets: lab.targets.len(),
        metrics: Vec::new(),
    };
    let bulk = if plan.workloads.contains(&Workload::Bulk) {
        let f = bulk::prepare(lab, plan.bulk_bytes)?;
        let mb = std::fs::metadata(&f)?.len() as f64 / 1e6;
        Some((f, mb))
    } else {
        None
    };
    let mut rss_base = std::collections::HashMap::new();
    for round in 1..=plan.rounds {
        for w in &plan.workloads {
            for (i, target) in lab.targets.iter().enumerate() {
                match w {
                    Workload::Select => {
                        for &c in &plan.clients {
                            let args = select::pgbench_args(plan, c);
                            let timeout = Duration::from_secs(plan.duration + 120);
                            let ((out, cpu), share) =
                                handoffs::measure(target.tc.as_ref(), || {
                                    pgbench_with_cpu(lab, target, &args, timeout)
                                })?;
                            t.add_share(&format!("-c {c}"), i, round, target, share);
                            t.add(&format!("-c {c} TPS"), true, i, out.tps);
                            t.add(
                                &format!("-c {c} latency us"),
                                false,
                                i,
                                out.latency_ms * 1000.0,
                            );
                            t.add_cpu(&format!("-c {c}"), "tx", i, cpu);
                            println!(
                                "  [r{round}] {:<20} -c {c}: {:>7.0} tps {:>7.1} us",
                                target.name,
                                out.tps,
                                out.latency_ms * 1000.0
                            );
                        }
                    }
                    Workload::Connect => {
                        let args = connect::pgbench_args(plan);
                        let timeout = Duration::from_secs(plan.connect_duration + 120);
                        let ((out, cpu), share) = handoffs::measure(target.tc.as_ref(), || {
                            pgbench_with_cpu(lab, target, &args, timeout)
                        })?;
                        t.add_share("-C", i, round, target, share);
                        t.add("-C conn/s", true, i, out.tps);
                        t.add_cpu("-C", "conn", i, cpu);
                        println!(
                            "  [r{round}] {:<20} -C: {:>7.1} conn/s",
                            target.name, out.tps
                        );
                    }
                    Workload::Bulk => {
                        let Some((file, mb)) = &bulk else { continue };
                        let (out, share) = handoffs::measure(target.tc.as_ref(), || {
                            psql_timed(lab, target, "COPY bench_bulk TO STDOUT", None)
                        })?;
                        t.add_share("COPY TO", i, round, target, share);
                        lab.pg
                            .try_psql(lab.targets[0].port, "TRUNCATE bench_bulk_in")
                            .map_err(|e| anyhow!("{e}"))?;
                        let (inn, share) = handoffs::measure(target.tc.as_ref(), || {
                            psql_timed(lab, target, "COPY bench_bulk_in FROM STDIN", Some(file))
                        })?;
                        t.add_share("COPY FROM", i, round, target, share);
                        let (o, n) = (mb / out.as_secs_f64(), mb / inn.as_secs_f64());
                        t.add("COPY TO MB/s", true, i, o);
                        t.add("COPY FROM MB/s", true, i, n);
                        println!(
                            "  [r{round}] {:<20} COPY out {o:>6.1} in {n:>6.1} MB/s",
                            target.name
                        );
                    }
                    Workload::Idle => {
                        let Some(pid) = target.pid else { continue };
                        let rss0 = rss_kib(pid);
                        // Growth from the first round's RSS (allocators keep freed memory).
                        let base = *rss_base.entry(i).or_insert(rss0);
                        let (socks, _, _) = open_sessions(lab, target, plan.idle_sessions);
                        let open = socks.len();
                        // The hand-offs and their first reads happen in the first second; the
                        // proxy's CPU is counted over the idle hold after it.
                        std::thread::sleep(Duration::from_secs(1));
                        let (ticks0, held) = (proc_ticks(pid), Instant::now());
                        std::thread::sleep(plan.idle_hold);
                        let idle_cpu = (proc_ticks(pid) - ticks0) as f64 * 1000.0
                            / clk_tck()
                            / held.elapsed().as_secs_f64();
                        t.add("idle proxy CPU ms/s", false, i, idle_cpu);
                        let rss1 = rss_kib(pid);
                        drop(socks);
                        wait_backends_gone(lab)?;
                        let per = (rss1 as f64 - base as f64) / open.max(1) as f64;
                        t.add("idle RSS KiB/session", false, i, per);
                        println!(
                            "  [r{round}] {:<20} idle: {open} open, RSS {rss0} -> {rss1} KiB, \
                             proxy CPU {idle_cpu:.1} ms/s",
                            target.name
                        );
                    }
                }
            }
        }
    }
    if let Some((f, _)) = &bulk {
        bulk::drop_table(lab, f)?;
    }
    println!(
        "\nA/B: {} round(s), medians; load average at the start {}",
        plan.rounds,
        load.trim()
    );
    let names: Vec<&str> = lab.targets.iter().map(|t| t.name).collect();
    // Ratios to the first variant, and to HAProxy when it ran (the issues' goals against it).
    let haproxy = names.iter().position(|n| *n == "haproxy");
    let mut header = format!("| metric | {} | ratios ÷ {} |", names.join(" | "), names[1]);
    if haproxy.is_some() {
        header.push_str(" ratios ÷ haproxy |");
    }
    println!("{header}");
    println!(
        "|---|{}---|{}",
        "--:|".repeat(names.len()),
        if haproxy.is_some() { "---|" } else { "" }
    );
    for m in &t.metrics {
        let med: Vec<Option<f64>> = m.samples.iter().map(|s| median(s)).collect();
        let ratios_to = |base: usize, from: usize| -> String {
            med.iter()
                .enumerate()
                .skip(from)
                .filter(|&(i, _)| i != base)
                .map(|(_, v)| match (v, med[base]) {
                    (Some(v), Some(b)) if b.abs() > 1e-9 => format!("{:.3}", v / b),
                    _ => "—".into(),
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut row = format!(
            "| {} {} | {} | {} |",
            m.name,
            if m.higher_is_better { "↑" } else { "↓" },
            med.iter()
                .map(|v| v.map_or("—".into(), |v| format!("{v:.1}")))
                .collect::<Vec<_>>()
                .join(" | "),
            ratios_to(1, 2)
        );
        if let Some(h) = haproxy {
            row.push_str(&format!(" {} |", ratios_to(h, 1)));
        }
        println!("{row}");
    }
    Ok(())
}

/// Runs pgbench through `target`; with it the CPU per 1000 transactions: the proxy's (None
/// for direct) and every CPU's.
fn pgbench_with_cpu(
    lab: &Lab,
    target: &Target,
    args: &[String],
    timeout: Duration,
) -> Result<(PgbenchOut, PerKtx)> {
    let before = Counters::take(target.pid);
    let out = pgbench::run(lab, target, args, timeout)?;
    let cpu = PerKtx::of(
        &delta(&before, &Counters::take(target.pid)),
        out.transactions,
    );
    Ok((out, cpu))
}
