//! `cargo xtask soak --minutes N`: both data paths under churn, long sessions, byte-checked
//! bulk copies and stats scrapes for N minutes while servers flap and the cluster switches
//! over; at the end errors must be 0 and each patroxy's fds, memory, sessions and map entries
//! back to where they were after the warm-up (issue 16). `cargo xtask test` runs a short one.
//!
//! Layout: `lab.rs` (the two setups and their patroxy), `workload.rs` (pgbench and bulk
//! loops), `disrupt.rs` (flapping, switchovers), `scrape.rs` (stats pages parsed),
//! `resources.rs` (fds, RSS, map entries and their tolerances), `tally.rs` (counters, planned
//! disruption windows), `report.rs` (the table). Imports go one way: nothing here uses
//! `mod.rs`.

mod disrupt;
mod lab;
mod report;
mod resources;
mod scrape;
mod tally;
mod workload;

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use patroxy_tests::postgres::{pg_bin_dir, run_checked};

use crate::cargo::{build_patroxy, target_dir};
use crate::setup;
use lab::{ClusterLab, Loopback, Target};
use report::{Report, Row};
use tally::{Disruptions, Tally};
use workload::{Client, Kind, Run};

#[derive(clap::Args)]
pub struct SoakArgs {
    /// How long the traffic runs (the warm-up, cluster start and end checks come on top).
    #[arg(long, default_value_t = 10)]
    pub minutes: u64,
    /// Loopback only: no Patroni cluster, so no switchovers (where namespaces are not allowed).
    #[arg(long)]
    pub no_cluster: bool,
    /// Soak this binary instead of building target/release/patroxy.
    #[arg(long)]
    pub patroxy_bin: Option<PathBuf>,
}

/// Between two scrapes of every page of every patroxy.
const SCRAPE_EVERY: Duration = Duration::from_secs(5);
/// How long the warm-up runs before the baseline is taken.
const WARM_UP: Duration = Duration::from_secs(10);
/// How long sessions and maps may take to empty after the traffic stops.
const SETTLE: Duration = Duration::from_secs(60);

/// `cargo xtask soak`: prints the report, writes target/soak/report.md; Ok(false) on failure.
pub fn soak(args: &SoakArgs) -> Result<bool> {
    if !patroxy_tests::process::is_root() {
        bail!("the soak needs root: the sockmap patroxy loads a BPF program");
    }
    if args.minutes == 0 {
        bail!("--minutes must be at least 1");
    }
    let bin = match &args.patroxy_bin {
        Some(bin) => bin.clone(),
        None => build_patroxy(&setup::setup()?, true)?,
    };
    let client = Client {
        bin_dir: pg_bin_dir().map_err(|e| anyhow!("{e}"))?,
    };
    let work_dir = target_dir().join("soak");
    std::fs::create_dir_all(&work_dir)?;

    println!("soak: loopback: PostgreSQL, two fake Patroni nodes, patroxy sockmap + fallback");
    let loopback = Loopback::start(&bin)?;
    init_pgbench(&client, loopback.pg.port())?;
    let cluster = if args.no_cluster {
        None
    } else {
        println!(
            "soak: cluster: etcd + three Patroni nodes in namespaces, patroxy sockmap + fallback (~30 s)"
        );
        let c = ClusterLab::start(&bin)?;
        c.wait_routed(Duration::from_secs(120))?;
        init_pgbench(&client, c.targets[0].steady_port)?;
        Some(c)
    };
    let targets: Vec<Target> = loopback
        .targets
        .iter()
        .chain(cluster.iter().flat_map(|c| c.targets.iter()))
        .cloned()
        .collect();
    let tallies: Vec<Mutex<Tally>> = targets.iter().map(|_| Mutex::default()).collect();
    let disruptions = Disruptions::default();

    println!("soak: warm-up ({} s), then the baseline", WARM_UP.as_secs());
    let warm_tallies: Vec<Mutex<Tally>> = targets.iter().map(|_| Mutex::default()).collect();
    traffic(
        &targets,
        &client,
        &warm_tallies,
        &disruptions,
        Instant::now() + WARM_UP,
        &work_dir,
        &[Kind::Churn, Kind::Long, Kind::Bulk],
    );
    for (t, tally) in targets.iter().zip(&warm_tallies) {
        let w = tally.lock().expect("tally lock");
        if !w.unexpected.is_empty() {
            bail!(
                "{}: the warm-up failed: {}",
                t.name,
                w.unexpected.join("; ")
            );
        }
    }
    let base: Vec<_> = targets.iter().map(|t| settled(t, None)).collect();

    let minutes = Duration::from_secs(args.minutes * 60);
    println!("soak: traffic for {} min", args.minutes);
    let started = Instant::now();
    let deadline = started + minutes;
    let (flips, switchovers) = std::thread::scope(|s| {
        let flips = s.spawn(|| disrupt::flap(&loopback.flap, deadline));
        let switchovers = cluster
            .as_ref()
            .map(|c| s.spawn(|| disrupt::switchovers(c, &disruptions, started, deadline)));
        s.spawn(|| scrape_until(&targets, &tallies, deadline));
        traffic(
            &targets,
            &client,
            &tallies,
            &disruptions,
            deadline,
            &work_dir,
            &[],
        );
        (
            flips.join().expect("flapper"),
            switchovers.map(|h| h.join().expect("switchovers")),
        )
    });
    let duration = started.elapsed();

    println!("soak: traffic stopped; waiting for sessions and maps to empty");
    let rows = targets
        .iter()
        .zip(tallies)
        .zip(base)
        .map(|((t, tally), base)| {
            let end = settled(t, Some(Instant::now() + SETTLE));
            let tally = tally.into_inner().expect("tally lock");
            row(t, tally, base, end, &work_dir)
        })
        .collect();
    let report = Report {
        date: date(),
        duration,
        rows,
        flips,
        switchovers,
    };
    let md = report.markdown();
    println!("\n{md}");
    let path = work_dir.join("report.md");
    std::fs::write(&path, &md).with_context(|| format!("writing {}", path.display()))?;
    println!("soak: wrote {}", path.display());
    drop(cluster);
    drop(loopback);
    Ok(report.passed())
}

/// Every workload thread of every patroxy until `deadline` (`only`: these kinds, if given).
fn traffic(
    targets: &[Target],
    client: &Client,
    tallies: &[Mutex<Tally>],
    disruptions: &Disruptions,
    deadline: Instant,
    work_dir: &std::path::Path,
    only: &[Kind],
) {
    std::thread::scope(|s| {
        for (target, tally) in targets.iter().zip(tallies) {
            for kind in Kind::for_target(target) {
                if !only.is_empty() && !only.contains(&kind) {
                    continue;
                }
                let run = Run {
                    target,
                    client,
                    tally,
                    disruptions,
                    deadline,
                    work_dir,
                };
                s.spawn(move || run.run(kind));
            }
        }
    });
}

fn scrape_until(targets: &[Target], tallies: &[Mutex<Tally>], deadline: Instant) {
    while Instant::now() + SCRAPE_EVERY < deadline {
        std::thread::sleep(SCRAPE_EVERY);
        for (t, tally) in targets.iter().zip(tallies) {
            for path in scrape::PAGES {
                let result = scrape::page(t, path);
                let mut tally = tally.lock().expect("tally lock");
                match result {
                    Ok(()) => tally.scrapes_ok += 1,
                    Err(e) => Tally::note(
                        &mut tally.scrape_errors,
                        format!("{} {path}: {e:#}", t.name),
                    ),
                }
            }
        }
    }
}

/// The usage once no session is open and the maps are empty, or at `until` (None: 30 s).
fn settled(t: &Target, until: Option<Instant>) -> resources::Usage {
    let until = until.unwrap_or_else(|| Instant::now() + Duration::from_secs(30));
    loop {
        let u = resources::usage(t);
        let empty = u.open_sessions == 0 && u.map_entries.is_none_or(|(s, k)| s == 0 && k == 0);
        if empty || Instant::now() >= until {
            return u;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// One patroxy's verdict. Its log is kept as target/soak/NAME.log (the harness deletes its own
/// copy when the process is stopped).
fn row(
    t: &Target,
    tally: Tally,
    base: resources::Usage,
    end: resources::Usage,
    work_dir: &std::path::Path,
) -> Row {
    let log = std::fs::read(&t.log)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let _ = std::fs::write(work_dir.join(format!("{}.log", t.name)), &log);
    let warn_lines = log.lines().filter(|l| l.contains(" WARN ")).count();
    let bad_log_lines: Vec<String> = log
        .lines()
        .filter(|l| l.contains(" ERROR ") || l.contains("panicked"))
        .map(str::to_owned)
        .collect();
    let mut problems = Vec::new();
    if patroxy_tests::process::memory(t.pid).is_none() {
        problems.push("the process is gone".to_owned());
    }
    problems.extend(tally.unexpected.iter().take(10).cloned());
    if tally.unexpected.len() > 10 {
        problems.push(format!(
            "... {} unexpected errors in all",
            tally.unexpected.len()
        ));
    }
    problems.extend(tally.scrape_errors.iter().take(10).cloned());
    if tally.bytes_checked == 0 {
        problems.push("no bulk transfer completed".to_owned());
    }
    if t.flap_port.is_some() && tally.flap_runs_ok == 0 {
        problems.push("no run through the flapping server succeeded".to_owned());
    }
    problems.extend(resources::within(&base, &end, t.checked_servers));
    problems.extend(bad_log_lines.iter().take(10).map(|l| format!("log: {l}")));
    Row {
        target: t.clone(),
        peak_rss_kib: patroxy_tests::process::memory(t.pid).map_or(0, |m| m.peak_kib),
        tally,
        base,
        end,
        bad_log_lines,
        warn_lines,
        problems,
    }
}

/// `pgbench -i -s 1`: the accounts table the select-only script reads.
fn init_pgbench(client: &Client, port: u16) -> Result<()> {
    let mut cmd = client.cmd("pgbench", port);
    cmd.args(["-i", "-q", "-s", "1"]);
    run_checked(&mut cmd, Duration::from_secs(120))
        .map_err(|e| anyhow!("pgbench -i on port {port}: {e}"))?;
    Ok(())
}

fn date() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}
