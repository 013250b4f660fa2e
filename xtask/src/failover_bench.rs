//! `cargo xtask failover-bench`: scenarios 2-4 of the cluster issue (switchover, kill -9 of the
//! primary, primary cut off) through patroxy, patroxy with the DCS watch (`[dcs]` on the
//! cluster's etcd) and Debian's HAProxy with the seed's config, side by side on one cluster in
//! one run, under the continuous writer. Prints the table and writes bench/failover.md.
//!
//! A benchmark, not a test: it reports and does not fail on a number.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow};
use patroxy_tests::cluster::patroni;
use patroxy_tests::cluster::proxy::{Proxy, SHIPPED_CONFIG_CHANGES, shipped_check_settings};
use patroxy_tests::cluster::scenario::{self, Event, Outcome};
use patroxy_tests::cluster::writer::ErrorKind;
use patroxy_tests::cluster::{Cluster, writer};
use patroxy_tests::ports::free_tcp_port;

use crate::cargo::{build_patroxy, workspace_root};
use crate::setup;

#[derive(clap::Args)]
pub struct FailoverArgs {
    /// Rounds of the three scenarios through the three proxies (the table shows every run).
    #[arg(long, default_value_t = 1)]
    rounds: u32,
    /// Only these events (switchover, kill, partition; default all): to iterate on one.
    #[arg(long, value_delimiter = ',')]
    events: Vec<String>,
    /// Only these proxies (patroxy, patroxy+dcs, haproxy; default all).
    #[arg(long, value_delimiter = ',')]
    proxies: Vec<String>,
    /// Print each run's timeline: the harness's reference points, the writer's errors and
    /// first writes, the proxy's and Patroni's log lines (with PTX_PATROXY_LOG=
    /// "info,patroxy::patroni=debug,patroxy::proxy=debug" patroxy logs each check and routing).
    #[arg(long)]
    timeline: bool,
}

impl FailoverArgs {
    fn events(&self) -> Result<Vec<Event>> {
        let all = [Event::Switchover, Event::Kill, Event::Partition];
        if self.events.is_empty() {
            return Ok(all.to_vec());
        }
        self.events
            .iter()
            .map(|name| {
                all.into_iter()
                    .find(|e| e.short_name() == name)
                    .ok_or_else(|| anyhow!("unknown event {name:?} (switchover, kill, partition)"))
            })
            .collect()
    }

    fn runs(&self, kind: &str) -> bool {
        self.proxies.is_empty() || self.proxies.iter().any(|p| p == kind)
    }
}

pub fn failover_bench(args: &FailoverArgs) -> Result<()> {
    let events = args.events()?;
    if let Some(p) = args
        .proxies
        .iter()
        .find(|p| !["patroxy", "patroxy+dcs", "haproxy"].contains(&p.as_str()))
    {
        return Err(anyhow!(
            "unknown proxy {p:?} (patroxy, patroxy+dcs, haproxy)"
        ));
    }
    let env = setup::setup()?;
    let bin = build_patroxy(&env, true)?;
    let t0 = Instant::now();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("failover-bench: bringing the cluster up (etcd + 3 Patroni nodes in namespaces)");
    let mut cluster = Cluster::up().map_err(|e| anyhow!("bringing the cluster up: {e}"))?;
    let ports = || (free_tcp_port(), free_tcp_port(), free_tcp_port());
    let patroxy = Proxy::start_patroxy(&bin, &cluster.nodes, ports(), "auto")
        .map_err(|e| anyhow!("starting patroxy: {e}"))?;
    let patroxy_dcs = Proxy::start_patroxy_dcs(&bin, &cluster.nodes, ports(), "auto")
        .map_err(|e| anyhow!("starting patroxy with the DCS watch: {e}"))?;
    let haproxy = Proxy::start_haproxy(&cluster.nodes, ports())
        .map_err(|e| anyhow!("starting HAProxy: {e}"))?;
    let leader = cluster
        .wait_healthy(Duration::from_secs(90))
        .map_err(|e| anyhow!("{e}"))?;
    for p in [&patroxy, &patroxy_dcs, &haproxy] {
        scenario::wait_routed(
            p.write_port,
            &cluster.nodes[leader].ip,
            Duration::from_secs(30),
        )
        .map_err(|e| anyhow!("{}: {e}", p.kind.name()))?;
    }
    writer::prepare(patroxy.write_port).map_err(|e| anyhow!("creating the writer's table: {e}"))?;

    let mut outcomes = Vec::new();
    for round in 1..=args.rounds {
        for &event in &events {
            // Rotate which proxy goes first so none always meets a freshly healed node.
            let mut order: [&Proxy; 3] = [&patroxy, &patroxy_dcs, &haproxy];
            order.rotate_left((round as usize - 1) % 3);
            for proxy in order.into_iter().filter(|p| args.runs(p.kind.name())) {
                println!(
                    "failover-bench: round {round}: {} through {}",
                    event.name(),
                    proxy.kind.name()
                );
                let o = scenario::failover(&mut cluster, proxy, event)
                    .map_err(|e| anyhow!("{} through {}: {e}", event.name(), proxy.kind.name()))?;
                println!("  {}", o.summary());
                if args.timeline {
                    println!("{}", o.timeline);
                }
                outcomes.push(o);
            }
        }
    }
    drop(patroxy);
    drop(patroxy_dcs);
    drop(haproxy);
    cluster.down();

    let report = render(&outcomes, t0.elapsed(), load.trim());
    println!("\n{report}");
    let path = workspace_root().join("bench/failover.md");
    std::fs::create_dir_all(path.parent().unwrap())?;
    std::fs::write(&path, &report).with_context(|| format!("writing {}", path.display()))?;
    println!("failover-bench: wrote {}", path.display());
    Ok(())
}

/// The first line `program args` prints (empty if it fails).
fn command_line(program: &str, args: &[&str]) -> String {
    crate::command::first_line(std::process::Command::new(program).args(args))
}

fn render(outcomes: &[Outcome], took: Duration, load: &str) -> String {
    let mut s = String::from(
        "# Failover through patroxy, patroxy with the DCS watch and HAProxy, side by side\n\n",
    );
    let _ = writeln!(s, "Written by `cargo xtask failover-bench`.\n");
    let _ = writeln!(
        s,
        "- date: {}",
        command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"])
    );
    let _ = writeln!(s, "- kernel: {}", command_line("uname", &["-srm"]));
    let _ = writeln!(
        s,
        "- cluster: etcd + 3 × {} / PostgreSQL 15 in network namespaces; proxies in the root \
         namespace",
        patroni::Flavor::from_env().describe()
    );
    let _ = writeln!(
        s,
        "- HAProxy: Debian's, the seed's haproxy.cfg (inter 3s fall 3 rise 2, timeout check 5s, \
         connect 4s, retries 2, on-marked-down shutdown-sessions)"
    );
    let _ = writeln!(
        s,
        "- patroxy: the shipped patroxy.toml ({}), with only {} changed; a 503 from Patroni \
         marks a server DOWN at once (authoritative), servers start DOWN, a listener with no UP server (or a server changing state) is checked at \
         fastinter; clients wait up to `timeout queue` for a server instead of being refused \
         at once",
        shipped_check_settings(),
        SHIPPED_CONFIG_CHANGES
    );
    let _ = writeln!(
        s,
        "- patroxy+dcs: patroxy's settings plus `[dcs]` on the cluster's etcd (burst_inter \
         50ms): the leader key leaving the old primary fences it and resets its sessions, the \
         write listener checks every 50 ms until a server is UP, and the key's holder (or a \
         primary on a newer timeline) is UP on its first passed check whose body says primary \
         (a 200 saying replica is Patroni's lock before the promotion: held DOWN)"
    );
    let _ = writeln!(
        s,
        "- proxy share past promotion: from the harness's first /primary 200 on the new leader \
         whose body says role primary (Patroni's REST API asks PostgreSQL each time: it takes \
         writes; its first 200 comes with the leader key, before the promotion), polled \
         directly every 20 ms (also while `patronictl switchover` runs), to the first write \
         through the proxy that succeeded on it; writes on the old primary after its key \
         moved: writes sent after patroxy+dcs logged the leader key change that the old \
         primary took"
    );
    let _ = writeln!(
        s,
        "- writer: one INSERT every 20 ms through the write port, reconnecting after an error; \
         outage = the longest gap between two successful writes"
    );
    let _ = writeln!(
        s,
        "- \"read-only after DOWN\": writes failing with `cannot execute INSERT in a read-only \
         transaction` after the proxy marked the old primary DOWN (HAProxy: when the harness saw \
         its log line); idle sessions: 3 opened on the old primary before the event, counted \
         if still open after it"
    );
    let _ = writeln!(s, "- haproxy: {}", command_line("haproxy", &["-v"]));
    let _ = writeln!(s, "- load average at the start: {load}");
    let _ = writeln!(s, "- run took {:.0} s\n", took.as_secs_f64());
    s += &scenario::table(outcomes);
    s += "\n## Medians, each proxy ÷ HAProxy (goal: switchover outage ratio ≤ 0.5, proxy \
          share ≤ 100 ms)\n\n\
          `past Patroni` = write outage minus Patroni's own time to a new primary answering \
          /primary; `proxy share` = from that first 200 (whose body says role primary) to the first \
          write through the proxy on the new primary: the part of the outage a proxy controls.\n\n\
          | scenario | proxy | outage | ratio to HAProxy | past Patroni | proxy share | \
          read-only errors |\n|---|---|--:|--:|--:|--:|--:|\n";
    for event in [Event::Switchover, Event::Kill, Event::Partition] {
        let median = |kind: &str, f: &dyn Fn(&Outcome) -> Option<f64>| {
            let mut v: Vec<f64> = outcomes
                .iter()
                .filter(|o| o.event == event && o.proxy.name() == kind)
                .filter_map(f)
                .collect();
            v.sort_by(f64::total_cmp);
            v.get(v.len() / 2).copied()
        };
        let outage = |o: &Outcome| Some(o.outage().as_secs_f64());
        let past = |o: &Outcome| o.outage_past_patroni();
        let share = |o: &Outcome| o.proxy_share();
        let Some(h) = median("haproxy", &outage) else {
            continue;
        };
        for kind in ["patroxy", "patroxy+dcs", "haproxy"] {
            let Some(p) = median(kind, &outage) else {
                continue;
            };
            let read_only: usize = outcomes
                .iter()
                .filter(|o| o.event == event && o.proxy.name() == kind)
                .map(|o| o.report.count(ErrorKind::ReadOnly))
                .sum();
            let fmt = |v: Option<f64>| v.map_or("?".into(), |v| format!("{v:.2} s"));
            let _ = writeln!(
                s,
                "| {} | {kind} | {p:.2} s | {:.2} | {} | {} | {read_only} |",
                event.name(),
                p / h,
                fmt(median(kind, &past)),
                median(kind, &share).map_or("?".into(), |v| format!("{:.0} ms", v * 1000.0)),
            );
        }
    }
    s
}
