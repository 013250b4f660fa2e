//! Workload 2, `pgbench -S -C`: a new connection per transaction.

use std::time::Duration;

use anyhow::Result;

use crate::bench::lab::Lab;
use crate::bench::pgbench::{self, strings};
use crate::bench::plan::Plan;
use crate::bench::procfs::{Counters, delta};
use crate::bench::results::{Metric, Results};

// Workload 2's section of results.md and its metrics; the `pub` one is read by the goals and
// the chart too.
const SECTION: &str = "2. connection rate (pgbench -S -C)";
pub const CONNECTIONS: Metric = Metric::higher(SECTION, "connections/s", "conn/s");
const LATENCY: Metric = Metric::lower(SECTION, "connect+query latency avg", "us");
const PROXY_CPU_PER_1000: Metric = Metric::lower(SECTION, "proxy CPU per 1000 connections", "ms");

/// pgbench arguments of workload 2: a new connection per transaction, 8 clients.
pub fn pgbench_args(plan: &Plan) -> Vec<String> {
    strings(&[
        "-n",
        "-S",
        "-C",
        "-c",
        "8",
        "-j",
        "2",
        "-T",
        &plan.connect_duration.to_string(),
    ])
}

/// Workload 2: a new connection per transaction.
pub fn run(lab: &Lab, plan: &Plan, res: &mut Results) -> Result<()> {
    println!(
        "bench: workload 2 — pgbench -S -C -c 8 -j 2, {} s per run",
        plan.connect_duration
    );
    let case = "-C -c 8";
    let args = pgbench_args(plan);
    for round in 1..=plan.rounds {
        for (i, t) in lab.targets.iter().enumerate() {
            let a = Counters::take(t.pid);
            let out = pgbench::run(
                lab,
                t,
                &args,
                Duration::from_secs(plan.connect_duration + 120),
            )?;
            let b = Counters::take(t.pid);
            let d = delta(&a, &b);
            let k = 1000.0 / out.transactions.max(1) as f64;
            println!(
                "  [{case} r{round}] {:<17} {:>8.0} conn/s {:>8.1} us | ms/1000 conn: proxy {:>6.1} busy {:>6.1}",
                t.name,
                out.tps,
                out.latency_ms * 1000.0,
                d.proxy_ms.unwrap_or(0.0) * k,
                d.busy_ms * k
            );
            res.add(case, CONNECTIONS, i, out.tps);
            res.add(case, LATENCY, i, out.latency_ms * 1000.0);
            if let Some(p) = d.proxy_ms {
                res.add(case, PROXY_CPU_PER_1000, i, p * k);
            }
        }
    }
    Ok(())
}
