//! `bench/results.md`: the goals of issue 6 and every measured row, medians and ratios.

use std::time::Duration;

use super::environment::Environment;
use super::plan::Plan;
use super::results::{BPF, Better, DIRECT, FALLBACK, HAPROXY, Metric, Results, ratio};
use super::workloads::{bulk, connect, idle, select};

fn fmt(v: Option<f64>) -> String {
    match v {
        None => "—".to_owned(),
        Some(v) if v.abs() >= 1000.0 => format!("{v:.0}"),
        Some(v) if v.abs() >= 100.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.2}"),
    }
}

fn fmt_ratio(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.2}"))
        .unwrap_or_else(|| "—".to_owned())
}

/// One goal of issue 6 and whether this run met it.
struct Goal {
    text: String,
    value: Option<f64>,
    target: f64,
    at_least: bool,
}

impl Goal {
    fn at_least(text: &str, value: Option<f64>, target: f64) -> Goal {
        Goal {
            text: text.to_owned(),
            value,
            target,
            at_least: true,
        }
    }

    fn at_most(text: &str, value: Option<f64>, target: f64) -> Goal {
        Goal {
            at_least: false,
            ..Goal::at_least(text, value, target)
        }
    }

    /// "yes", "**no**", or "—" when this run did not measure it.
    fn met(&self) -> &'static str {
        match self.value {
            None => "—",
            Some(v)
                if (self.at_least && v >= self.target) || (!self.at_least && v <= self.target) =>
            {
                "yes"
            }
            Some(_) => "**no**",
        }
    }
}

/// One metric's median for one case through target `a` ÷ through target `b`.
fn median_ratio(r: &Results, metric: Metric, case: &str, a: usize, b: usize) -> Option<f64> {
    let row = r.find(metric, case);
    ratio(row.and_then(|x| x.median(a)), row.and_then(|x| x.median(b)))
}

fn goals(r: &Results) -> Vec<Goal> {
    let m = |metric, case: &str, t| r.find(metric, case).and_then(|row| row.median(t));
    let vs = |metric, case: &str, a, b| median_ratio(r, metric, case, a, b);
    let mut g = vec![
        Goal::at_least(
            "patroxy-bpf TPS at 8 clients ÷ direct ≥ 0.95",
            vs(select::TPS, "-c 8", BPF, DIRECT),
            0.95,
        ),
        Goal::at_least(
            "patroxy-bpf TPS at 8 clients ÷ HAProxy ≥ 1.25",
            vs(select::TPS, "-c 8", BPF, HAPROXY),
            1.25,
        ),
        Goal::at_most(
            "patroxy-bpf added latency at 1 client ÷ HAProxy's ≤ 0.33",
            vs(select::LATENCY_ADDED, "-c 1", BPF, HAPROXY),
            1.0 / 3.0,
        ),
        Goal::at_least(
            "patroxy-bpf connection rate ÷ direct ≥ 0.97",
            vs(connect::CONNECTIONS, "", BPF, DIRECT),
            0.97,
        ),
        Goal::at_least(
            "patroxy-bpf COPY TO STDOUT ÷ direct ≥ 0.95",
            vs(bulk::THROUGHPUT, "COPY TO", BPF, DIRECT),
            0.95,
        ),
        Goal::at_least(
            "patroxy-bpf COPY FROM STDIN ÷ direct ≥ 0.95",
            vs(bulk::THROUGHPUT, "COPY FROM", BPF, DIRECT),
            0.95,
        ),
        Goal::at_most(
            "patroxy-bpf RSS growth per idle session ≤ 4 KiB",
            m(idle::RSS_PER_SESSION, "", BPF),
            4.0,
        ),
    ];
    for (case, clients) in [
        ("-c 1", "1 client"),
        ("-c 8", "8 clients"),
        ("-c 64", "64 clients"),
    ] {
        if r.find(select::PROXY_PROCESS, case).is_none() {
            continue;
        }
        g.push(Goal::at_most(
            &format!("patroxy-bpf CPU/tx incl. softirq+kworker ÷ HAProxy's ≤ 0.2 ({clients})"),
            vs(select::PROXY_TOTAL, case, BPF, HAPROXY),
            0.2,
        ));
    }
    g.push(Goal::at_least(
        "patroxy-fallback TPS at 8 clients ÷ HAProxy ≥ 1.0 (\"at least match HAProxy\")",
        vs(select::TPS, "-c 8", FALLBACK, HAPROXY),
        1.0,
    ));
    g
}

/// The goals of issue 17 (a packet-level splice), which are measured on the namespace
/// topology: what the sockmap path reaches today is the baseline for it.
fn splice_goals(r: &Results) -> Vec<Goal> {
    let vs = |metric, case: &str, a, b| median_ratio(r, metric, case, a, b);
    vec![
        Goal::at_least(
            "pgbench -S TPS at 8 clients ÷ direct ≥ 0.95",
            vs(select::TPS, "-c 8", BPF, DIRECT),
            0.95,
        ),
        Goal::at_most(
            "round trip (latency avg) at 1 client ÷ direct ≤ 1.1",
            vs(select::LATENCY, "-c 1", BPF, DIRECT),
            1.1,
        ),
        Goal::at_least(
            "COPY TO STDOUT ÷ direct ≥ 0.9",
            vs(bulk::THROUGHPUT, "COPY TO", BPF, DIRECT),
            0.9,
        ),
        Goal::at_least(
            "COPY FROM STDIN ÷ direct ≥ 0.9",
            vs(bulk::THROUGHPUT, "COPY FROM", BPF, DIRECT),
            0.9,
        ),
        Goal::at_most(
            "CPU/tx incl. softirq+kworker at 8 clients ÷ HAProxy's ≤ 0.2",
            vs(select::PROXY_TOTAL, "-c 8", BPF, HAPROXY),
            0.2,
        ),
    ]
}

fn goal_table(s: &mut String, title: &str, goals: &[Goal]) {
    s.push_str(&format!(
        "## {title}\n\n| goal | this run | met |\n|---|---|---|\n"
    ));
    for g in goals {
        s.push_str(&format!(
            "| {} | {} | {} |\n",
            g.text,
            fmt_ratio(g.value),
            g.met()
        ));
    }
    s.push('\n');
}

/// The whole report as Markdown.
pub fn render(r: &Results, plan: &Plan, env: &Environment, elapsed: Duration) -> String {
    let mut s = String::new();
    s.push_str("# patroxy benchmark: direct vs patroxy (sockmap, fallback) vs HAProxy\n\n");
    s.push_str("Written by `cargo xtask bench`");
    if plan.quick {
        s.push_str(" --quick (a smoke run: one round, short runs — not for comparison)");
    }
    s.push_str(".\n\n");
    s.push_str(&format!(
        "- date: {}\n- machine: {}, {}\n- kernel: {}\n- {}\n- {}\n- patroxy: {}\n\
         - load average at the start (1/5/15 min): {} (anything else running skews every number)\n",
        env.date, env.cpu, env.memory, env.kernel, env.postgres, env.haproxy, env.patroxy, env.load
    ));
    s.push_str(&format!(
        "- plan: {} round(s) of direct, patroxy-bpf, patroxy-fallback, haproxy interleaved per workload; \
         pgbench -S runs of {} s (clients {:?}), -C runs of {} s, pgbench scale {}, {} idle sessions held {} s; \
         total {:.0} s\n",
        plan.rounds,
        plan.duration,
        plan.clients,
        plan.connect_duration,
        plan.scale,
        plan.idle_sessions,
        plan.idle_hold.as_secs(),
        elapsed.as_secs_f64()
    ));
    s.push_str(&format!(
        "- setup: {}. PostgreSQL fsync off, trust auth (so connection setup measures the proxy, not SCRAM), \
         shared_buffers 512MB, max_connections 2100. Proxies: global maxconn 2000, retries 2, timeouts \
         connect 4s / client 30m / server 30m, one server without health check and without per-server maxconn; \
         patroxy logs at `warn`, HAProxy logs nothing.\n",
        env.hosts
    ));
    s.push_str(
        "- each cell is the median over the rounds; ratios are of medians. \"÷ direct\" and \"÷ haproxy\" \
         compare a proxy with the direct connection and with HAProxy.\n\n",
    );

    goal_table(&mut s, "Goals (issue 6)", &goals(r));
    if plan.netns {
        goal_table(
            &mut s,
            "Goals of issue 17 (packet-level splice), patroxy-bpf today",
            &splice_goals(r),
        );
    }

    // Sections in the order they were first measured, each with its rows in order.
    let mut sections: Vec<&str> = Vec::new();
    for row in &r.rows {
        if !sections.contains(&row.metric.section) {
            sections.push(row.metric.section);
        }
    }
    let ordered = sections
        .iter()
        .flat_map(|sec| r.rows.iter().filter(move |row| row.metric.section == *sec));
    let mut section = "";
    for row in ordered {
        if row.metric.section != section {
            section = row.metric.section;
            s.push_str(&format!("\n## {section}\n\n"));
            s.push_str(
                "| case | metric | unit | direct | patroxy-bpf | patroxy-fallback | haproxy \
                 | bpf ÷ direct | fallback ÷ direct | haproxy ÷ direct | bpf ÷ haproxy | fallback ÷ haproxy |\n",
            );
            s.push_str("|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n");
        }
        let med: Vec<Option<f64>> = (0..4).map(|t| row.median(t)).collect();
        let unit = row.metric.unit;
        let arrow = match row.metric.better {
            Better::Higher => "↑",
            Better::Lower => "↓",
        };
        s.push_str(&format!(
            "| {} | {} {arrow} | {unit} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            row.case,
            row.metric.name,
            fmt(med[0]),
            fmt(med[1]),
            fmt(med[2]),
            fmt(med[3]),
            fmt_ratio(ratio(med[1], med[0])),
            fmt_ratio(ratio(med[2], med[0])),
            fmt_ratio(ratio(med[3], med[0])),
            fmt_ratio(ratio(med[1], med[3])),
            fmt_ratio(ratio(med[2], med[3])),
        ));
    }
    s.push_str(&format!(
        "\n↑ higher is better, ↓ lower is better. Per-round samples are printed on the console while \
         the bench runs.\n\nChart: `{}` (top: throughput ÷ direct; bottom: cost ÷ HAProxy's).\n",
        plan.file_name("ratios", "png")
    ));
    s
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::render;
    use crate::bench::environment::Environment;
    use crate::bench::plan::{Plan, Workload};
    use crate::bench::results::{BPF, DIRECT, HAPROXY, Results};
    use crate::bench::workloads::select;

    fn plan(netns: bool) -> Plan {
        Plan {
            quick: false,
            rounds: 1,
            duration: 1,
            connect_duration: 1,
            bulk_bytes: 1,
            idle_sessions: 1,
            idle_hold: Duration::ZERO,
            clients: vec![1, 8],
            scale: 1,
            workloads: vec![Workload::Select],
            netns,
        }
    }

    fn env(hosts: &'static str) -> Environment {
        let s = String::new;
        Environment {
            date: s(),
            kernel: s(),
            cpu: s(),
            memory: s(),
            postgres: s(),
            haproxy: s(),
            patroxy: s(),
            load: s(),
            hosts,
        }
    }

    #[test]
    fn the_namespace_report_names_its_topology_and_the_splice_goals() {
        let mut r = Results::new();
        r.add("-c 8", select::TPS, DIRECT, 1000.0);
        r.add("-c 8", select::TPS, BPF, 960.0);
        r.add("-c 8", select::TPS, HAPROXY, 800.0);
        r.add("-c 1", select::LATENCY, DIRECT, 100.0);
        r.add("-c 1", select::LATENCY, BPF, 150.0);

        let md = render(&r, &plan(true), &env("three namespaces"), Duration::ZERO);
        assert!(md.contains("- setup: three namespaces."), "{md}");
        assert!(md.contains("Goals of issue 17"), "{md}");
        assert!(
            md.contains("| pgbench -S TPS at 8 clients ÷ direct ≥ 0.95 | 0.96 | yes |"),
            "{md}"
        );
        assert!(
            md.contains("| round trip (latency avg) at 1 client ÷ direct ≤ 1.1 | 1.50 | **no** |"),
            "{md}"
        );
        // Every ratio to direct and to HAProxy: bpf ÷ direct 0.96, bpf ÷ haproxy 1.20.
        assert!(md.contains("| 0.96 |") && md.contains("| 1.20 |"), "{md}");
        assert!(md.contains("`ratios-netns.png`"), "{md}");

        let md = render(&r, &plan(false), &env("loopback"), Duration::ZERO);
        assert!(!md.contains("issue 17"), "{md}");
        assert!(md.contains("`ratios.png`"), "{md}");
    }
}
