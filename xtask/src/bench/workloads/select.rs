//! Workload 1, `pgbench -S`, and 5, the CPU it costs per 1000 transactions.

use std::time::Duration;

use anyhow::Result;

use crate::bench::lab::Lab;
use crate::bench::pgbench::{self, strings};
use crate::bench::plan::Plan;
use crate::bench::procfs::{Counters, delta};
use crate::bench::results::{Better, Results};

pub const SELECT: &str = "1. select-only (pgbench -S)";
pub const CPU: &str = "5. CPU per 1000 transactions (workload 1)";

/// Per-1000-transaction CPU of one run, in ms.
#[derive(Debug, Clone, Copy)]
struct PerKtx {
    proxy: Option<f64>,
    softirq: f64,
    kthreads: f64,
    busy: f64,
}

/// pgbench arguments of workload 1 with `clients` clients (at most 2 threads: 2 cores).
pub fn pgbench_args(plan: &Plan, clients: u32) -> Vec<String> {
    strings(&[
        "-n",
        "-S",
        "-c",
        &clients.to_string(),
        "-j",
        &clients.min(2).to_string(),
        "-T",
        &plan.duration.to_string(),
    ])
}

/// Workload 1 (and 5: CPU per 1000 transactions).
pub fn run(lab: &Lab, plan: &Plan, res: &mut Results) -> Result<()> {
    println!(
        "bench: workload 1/5 — pgbench -S, {} s per run",
        plan.duration
    );
    for &c in &plan.clients {
        let case = format!("-c {c}");
        let args = pgbench_args(plan, c);
        for round in 1..=plan.rounds {
            let mut direct: Option<(f64, PerKtx)> = None;
            for (i, t) in lab.targets.iter().enumerate() {
                let a = Counters::take(t.pid);
                let out = pgbench::run(lab, t, &args, Duration::from_secs(plan.duration + 120))?;
                let b = Counters::take(t.pid);
                let d = delta(&a, &b);
                let k = 1000.0 / out.transactions.max(1) as f64;
                let cpu = PerKtx {
                    proxy: d.proxy_ms.map(|p| p * k),
                    softirq: d.softirq_ms * k,
                    kthreads: d.kthreads_ms * k,
                    busy: d.busy_ms * k,
                };
                let lat_us = out.latency_ms * 1000.0;
                println!(
                    "  [{case} r{round}] {:<17} {:>8.0} tps {:>8.1} us | ms/1000 tx: proxy {:>6.1} softirq {:>5.1} kworker {:>5.1} busy {:>6.1}",
                    t.name,
                    out.tps,
                    lat_us,
                    cpu.proxy.unwrap_or(0.0),
                    cpu.softirq,
                    cpu.kthreads,
                    cpu.busy,
                );
                res.add(SELECT, &case, "TPS", "tx/s", Better::Higher, i, out.tps);
                res.add(SELECT, &case, "latency avg", "us", Better::Lower, i, lat_us);
                if let Some(p) = cpu.proxy {
                    res.add(
                        CPU,
                        &case,
                        "proxy process (user+sys)",
                        "ms",
                        Better::Lower,
                        i,
                        p,
                    );
                }
                res.add(
                    CPU,
                    &case,
                    "softirq (system-wide)",
                    "ms",
                    Better::Lower,
                    i,
                    cpu.softirq,
                );
                res.add(
                    CPU,
                    &case,
                    "kworker+ksoftirqd (system-wide)",
                    "ms",
                    Better::Lower,
                    i,
                    cpu.kthreads,
                );
                res.add(
                    CPU,
                    &case,
                    "all CPUs busy (system-wide)",
                    "ms",
                    Better::Lower,
                    i,
                    cpu.busy,
                );
                if i == 0 {
                    direct = Some((lat_us, cpu));
                } else if let Some((dlat, dcpu)) = direct {
                    res.add(
                        SELECT,
                        &case,
                        "latency added over direct",
                        "us",
                        Better::Lower,
                        i,
                        lat_us - dlat,
                    );
                    // The proxy's whole cost: its process plus the softirq and kernel-thread
                    // time above this round's direct run.
                    let total = cpu.proxy.unwrap_or(0.0)
                        + (cpu.softirq - dcpu.softirq)
                        + (cpu.kthreads - dcpu.kthreads);
                    res.add(
                        CPU,
                        &case,
                        "proxy incl. softirq+kworker above direct",
                        "ms",
                        Better::Lower,
                        i,
                        total,
                    );
                    res.add(
                        CPU,
                        &case,
                        "all CPUs busy above direct",
                        "ms",
                        Better::Lower,
                        i,
                        cpu.busy - dcpu.busy,
                    );
                }
            }
        }
    }
    Ok(())
}
