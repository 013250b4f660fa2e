//! `cargo xtask bench --ab ...`: patroxy variants side by side (a binary before and after a
//! change, or one binary with different environment), interleaved per round with the direct
//! connection as the reference. Prints a table of medians; writes nothing.

use std::time::Duration;

use anyhow::{Result, anyhow};

use super::handoffs;
use super::lab::{Lab, Target};
use super::pgbench::{self, PgbenchOut};
use super::plan::{Plan, Workload};
use super::procfs::{clk_tck, proc_ticks, rss_kib};
use super::results::median;
use super::workloads::bulk::{self, psql_timed};
use super::workloads::connect;
use super::workloads::idle::{open_sessions, wait_backends_gone};
use super::workloads::select;

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
                            if let Some(ms) = cpu {
                                t.add(&format!("-c {c} proxy ms/1000tx"), false, i, ms);
                            }
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
                        if let Some(ms) = cpu {
                            t.add("-C proxy ms/1000conn", false, i, ms);
                        }
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
                        std::thread::sleep(plan.idle_hold);
                        let rss1 = rss_kib(pid);
                        drop(socks);
                        wait_backends_gone(lab)?;
                        let per = (rss1 as f64 - base as f64) / open.max(1) as f64;
                        t.add("idle RSS KiB/session", false, i, per);
                        println!(
                            "  [r{round}] {:<20} idle: {open} open, RSS {rss0} -> {rss1} KiB",
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
    println!("| metric | {} | ratios ÷ {} |", names.join(" | "), names[1]);
    println!("|---|{}---|", "--:|".repeat(names.len()));
    for m in &t.metrics {
        let med: Vec<Option<f64>> = m.samples.iter().map(|s| median(s)).collect();
        let base = med.get(1).copied().flatten();
        let ratios: Vec<String> = med
            .iter()
            .skip(2)
            .map(|v| match (v, base) {
                (Some(v), Some(b)) if b.abs() > 1e-9 => format!("{:.3}", v / b),
                _ => "—".into(),
            })
            .collect();
        println!(
            "| {} {} | {} | {} |",
            m.name,
            if m.higher_is_better { "↑" } else { "↓" },
            med.iter()
                .map(|v| v.map_or("—".into(), |v| format!("{v:.1}")))
                .collect::<Vec<_>>()
                .join(" | "),
            ratios.join(", ")
        );
    }
    Ok(())
}

/// Runs pgbench through `target`; with it the proxy's CPU per 1000 transactions in ms (None
/// for direct).
fn pgbench_with_cpu(
    lab: &Lab,
    target: &Target,
    args: &[String],
    timeout: Duration,
) -> Result<(PgbenchOut, Option<f64>)> {
    let before = target.pid.map(proc_ticks);
    let out = pgbench::run(lab, target, args, timeout)?;
    let after = target.pid.map(proc_ticks);
    let ms = before.zip(after).map(|(a, b)| {
        (b - a) as f64 * 1000.0 / clk_tck() * 1000.0 / out.transactions.max(1) as f64
    });
    Ok((out, ms))
}
