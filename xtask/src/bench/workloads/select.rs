//! Workload 1, `pgbench -S`, and 5, the CPU it costs per 1000 transactions.

use std::time::Duration;

use anyhow::Result;

use crate::bench::lab::Lab;
use crate::bench::pgbench::{self, strings};
use crate::bench::plan::Plan;
use crate::bench::procfs::{Counters, CpuDelta, delta};
use crate::bench::results::{Metric, Results};

// Workload 1's section of results.md and its metrics; the `pub` ones are read by the goals
// and the chart too.
const SECTION: &str = "1. select-only (pgbench -S)";
pub const TPS: Metric = Metric::higher(SECTION, "TPS", "tx/s");
pub const LATENCY: Metric = Metric::lower(SECTION, "latency avg", "us");
pub const LATENCY_ADDED: Metric = Metric::lower(SECTION, "latency added over direct", "us");

// Workload 5 (the CPU of workload 1's runs) has its own section.
const CPU_SECTION: &str = "5. CPU per 1000 transactions (workload 1)";
pub const PROXY_PROCESS: Metric = Metric::lower(CPU_SECTION, "proxy process (user+sys)", "ms");
const SOFTIRQ: Metric = Metric::lower(CPU_SECTION, "softirq (system-wide)", "ms");
const KTHREADS: Metric = Metric::lower(CPU_SECTION, "kworker+ksoftirqd (system-wide)", "ms");
const BUSY: Metric = Metric::lower(CPU_SECTION, "all CPUs busy (system-wide)", "ms");
pub const PROXY_TOTAL: Metric = Metric::lower(
    CPU_SECTION,
    "proxy incl. softirq+kworker above direct",
    "ms",
);
const BUSY_ADDED: Metric = Metric::lower(CPU_SECTION, "all CPUs busy above direct", "ms");

/// Per-1000-transaction CPU of one run, in ms (also what `--ab` reports).
#[derive(Debug, Clone, Copy)]
pub struct PerKtx {
    /// The proxy process (user + system); None for direct.
    pub proxy: Option<f64>,
    pub softirq: f64,
    pub kthreads: f64,
    /// Every CPU's busy time (user, system, softirq, irq...), system-wide.
    pub busy: f64,
}

impl PerKtx {
    /// The CPU `d` of a run that processed `transactions`, per 1000 of them.
    pub fn of(d: &CpuDelta, transactions: u64) -> PerKtx {
        let k = 1000.0 / transactions.max(1) as f64;
        PerKtx {
            proxy: d.proxy_ms.map(|p| p * k),
            softirq: d.softirq_ms * k,
            kthreads: d.kthreads_ms * k,
            busy: d.busy_ms * k,
        }
    }
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
                let cpu = PerKtx::of(&delta(&a, &b), out.transactions);
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
                res.add(&case, TPS, i, out.tps);
                res.add(&case, LATENCY, i, lat_us);
                if let Some(p) = cpu.proxy {
                    res.add(&case, PROXY_PROCESS, i, p);
                }
                res.add(&case, SOFTIRQ, i, cpu.softirq);
                res.add(&case, KTHREADS, i, cpu.kthreads);
                res.add(&case, BUSY, i, cpu.busy);
                if i == 0 {
                    direct = Some((lat_us, cpu));
                } else if let Some((dlat, dcpu)) = direct {
                    res.add(&case, LATENCY_ADDED, i, lat_us - dlat);
                    // The proxy's whole cost: its process plus the softirq and kernel-thread
                    // time above this round's direct run.
                    let total = cpu.proxy.unwrap_or(0.0)
                        + (cpu.softirq - dcpu.softirq)
                        + (cpu.kthreads - dcpu.kthreads);
                    res.add(&case, PROXY_TOTAL, i, total);
                    res.add(&case, BUSY_ADDED, i, cpu.busy - dcpu.busy);
                }
            }
        }
    }
    Ok(())
}
