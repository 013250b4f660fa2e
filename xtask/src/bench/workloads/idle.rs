//! Workload 4: idle sessions, each a raw TCP connection that completes the PostgreSQL startup
//! (StartupMessage, trust auth, until ReadyForQuery) and is held open.

use std::collections::HashMap;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};

use patroxy_tests::netns;

use crate::bench::lab::{Lab, Target};
use crate::bench::plan::Plan;
use crate::bench::procfs::{Counters, delta, meminfo_kib, rss_kib};
use crate::bench::results::{Metric, Results};

// Workload 4's section of results.md and its metrics; the `pub` one is read by the goals and
// the chart too.
const SECTION: &str = "4. idle sessions";
const OPENED: Metric = Metric::higher(SECTION, "sessions opened", "");
const TIME_TO_OPEN: Metric = Metric::lower(SECTION, "time to open all", "s");
const SLAB_PER_SESSION: Metric = Metric::lower(
    SECTION,
    "kernel slab growth per session (system-wide)",
    "KiB",
);
const PROXY_RSS: Metric = Metric::lower(SECTION, "proxy RSS with sessions open", "MiB");
pub const RSS_PER_SESSION: Metric = Metric::lower(SECTION, "proxy RSS growth per session", "KiB");
const PROXY_CPU: Metric = Metric::lower(SECTION, "proxy CPU (open, hold, close)", "s");

/// The StartupMessage of protocol 3.0 for user and database `postgres`.
fn startup_message() -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&196608u32.to_be_bytes());
    for s in [
        "user",
        "postgres",
        "database",
        "postgres",
        "application_name",
        "bench-idle",
    ] {
        body.extend_from_slice(s.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut msg = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    msg.extend_from_slice(&body);
    msg
}

/// Connects, sends the StartupMessage and reads until ReadyForQuery (trust auth).
fn open_session(addr: SocketAddr) -> Result<TcpStream> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    s.write_all(&startup_message())?;
    loop {
        let mut head = [0u8; 5];
        s.read_exact(&mut head)?;
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let mut body = vec![0u8; len.saturating_sub(4)];
        s.read_exact(&mut body)?;
        match head[0] {
            b'Z' => return Ok(s),
            b'E' => bail!("server error: {}", String::from_utf8_lossy(&body)),
            _ => {}
        }
    }
}

/// Opens `n` sessions through `t` from the client host: (the sessions, how many failed, the
/// first failure).
pub fn open_sessions(lab: &Lab, t: &Target, n: u32) -> (Vec<TcpStream>, u32, Option<String>) {
    let addr = SocketAddr::new(t.host, t.port);
    match lab.hosts.client_ns() {
        None => open_sessions_from_here(addr, n),
        // The threads it starts inherit the namespace of the thread that starts them.
        Some(ns) => netns::within(ns, move || open_sessions_from_here(addr, n))
            .unwrap_or_else(|e| (Vec::new(), n, Some(format!("entering {ns}: {e}")))),
    }
}

/// Opens `n` sessions to `addr` with 4 threads.
fn open_sessions_from_here(addr: SocketAddr, n: u32) -> (Vec<TcpStream>, u32, Option<String>) {
    let threads = 4;
    let handles: Vec<_> = (0..threads)
        .map(|k| {
            let count = n / threads + u32::from(k < n % threads);
            std::thread::spawn(move || {
                let mut ok = Vec::new();
                let mut failed = 0;
                let mut first_err = None;
                for _ in 0..count {
                    match open_session(addr) {
                        Ok(s) => ok.push(s),
                        Err(e) => {
                            failed += 1;
                            first_err.get_or_insert(e.to_string());
                        }
                    }
                }
                (ok, failed, first_err)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut failed = 0;
    let mut err = None;
    for h in handles {
        let (ok, f, e) = h.join().expect("session thread");
        all.extend(ok);
        failed += f;
        if err.is_none() {
            err = e;
        }
    }
    (all, failed, err)
}

/// Waits until PostgreSQL has no client backends but the counting psql.
pub fn wait_backends_gone(lab: &Lab) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n: u64 = lab
            .pg
            .try_psql(
                lab.targets[0].port,
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'",
            )
            .map_err(|e| anyhow!("{e}"))?
            .trim()
            .parse()
            .unwrap_or(u64::MAX);
        if n <= 1 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{n} PostgreSQL client backends still there after 60 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Workload 4: N concurrent idle sessions through each target.
pub fn run(lab: &Lab, plan: &Plan, res: &mut Results) -> Result<()> {
    let n = plan.idle_sessions;
    println!(
        "bench: workload 4 — {n} idle sessions (StartupMessage + ReadyForQuery), held {} s",
        plan.idle_hold.as_secs()
    );
    let case = format!("{n} sessions");
    // RSS growth is counted from before the first round: an allocator keeps what a previous
    // round freed, so a later round's own growth would understate the cost.
    let mut baseline: HashMap<usize, u64> = HashMap::new();
    for round in 1..=plan.rounds {
        for (i, t) in lab.targets.iter().enumerate() {
            wait_backends_gone(lab)?;
            std::thread::sleep(Duration::from_millis(500));
            let rss0 = t.pid.map(rss_kib).unwrap_or(0);
            let base = *baseline.entry(i).or_insert(rss0);
            let slab0 = meminfo_kib("Slab");
            let a = Counters::take(t.pid);
            let start = Instant::now();
            let (sessions, failed, err) = open_sessions(lab, t, n);
            let open_s = start.elapsed().as_secs_f64();
            std::thread::sleep(Duration::from_secs(1));
            let rss1 = t.pid.map(rss_kib).unwrap_or(0);
            let slab1 = meminfo_kib("Slab");
            std::thread::sleep(plan.idle_hold);
            let open = sessions.len() as f64;
            for mut s in sessions {
                // Terminate ('X'), then close.
                let _ = s.write_all(&[b'X', 0, 0, 0, 4]);
            }
            wait_backends_gone(lab)?;
            let b = Counters::take(t.pid);
            let d = delta(&a, &b);
            let slab_per = (slab1 as f64 - slab0 as f64) / open.max(1.0);
            println!(
                "  [idle r{round}] {:<17} {} open ({failed} failed) in {open_s:.1} s | RSS {} -> {} KiB ({:.2} KiB/session from {base}) | slab {:+.2} KiB/session | proxy CPU {:.2} s",
                t.name,
                open as u64,
                rss0,
                rss1,
                (rss1 as f64 - base as f64) / open.max(1.0),
                slab_per,
                d.proxy_ms.unwrap_or(0.0) / 1000.0
            );
            if let Some(e) = err {
                eprintln!("    first failure through {}: {e}", t.name);
            }
            res.add(&case, OPENED, i, open);
            res.add(&case, TIME_TO_OPEN, i, open_s);
            res.add(&case, SLAB_PER_SESSION, i, slab_per);
            if t.pid.is_some() {
                res.add(&case, PROXY_RSS, i, rss1 as f64 / 1024.0);
                res.add(
                    &case,
                    RSS_PER_SESSION,
                    i,
                    (rss1 as f64 - base as f64) / open.max(1.0),
                );
                res.add(&case, PROXY_CPU, i, d.proxy_ms.unwrap_or(0.0) / 1000.0);
            }
        }
    }
    Ok(())
}
