//! The workloads and the /proc counters they read.
//!
//! 1. `pgbench -S` with 1, 8, 64 clients: TPS, average latency, latency added over direct
//!    (per round, against that round's direct run).
//! 2. `pgbench -S -C`: a new connection per transaction, so TPS is the connection rate.
//! 3. Bulk: `COPY bench_bulk TO STDOUT` and `COPY bench_bulk_in FROM STDIN` of the same
//!    text (>= 200 MB by default) through psql: MB/s.
//! 4. Idle sessions: N raw TCP connections that each complete the PostgreSQL startup
//!    (StartupMessage, trust auth, until ReadyForQuery), held open: the proxy's RSS growth
//!    per session, kernel slab growth per session, and proxy CPU seconds.
//! 5. CPU per 1000 transactions of workload 1: the proxy process (utime+stime of its
//!    /proc/PID/stat, all threads), softirq time (the `softirq` column of /proc/stat) and
//!    kworker/ksoftirqd thread time (their /proc/PID/stat), the latter two system-wide, so
//!    the proxy's share is their excess over the direct run of the same round.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use patroxy_tests::postgres::run_with_timeout;

use super::lab::{Lab, Target};
use super::plan::Plan;
use super::results::{Better, Results};

/// Clock ticks per second (USER_HZ) for /proc times.
pub fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// utime+stime in ticks from the text of a /proc/PID/stat file.
fn stat_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) may hold spaces: count fields after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime field 15.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// A process's CPU time (all its threads, user + system) in ticks.
pub fn proc_ticks(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| stat_ticks(&s))
        .unwrap_or(0)
}

/// A process's resident set in KiB (VmRSS).
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// A field of /proc/meminfo in KiB.
fn meminfo_kib(field: &str) -> u64 {
    let info = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    info.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The aggregate `cpu` line of /proc/stat: (busy ticks, softirq ticks).
/// Busy = user+nice+system+irq+softirq+steal (idle and iowait excluded).
fn system_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let line = stat.lines().find(|l| l.starts_with("cpu ")).unwrap_or("");
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let g = |i: usize| v.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal
    (g(0) + g(1) + g(2) + g(5) + g(6) + g(7), g(6))
}

/// CPU ticks of every kworker/ksoftirqd thread, by pid (kworkers come and go: a delta sums
/// per pid, counting a new one from zero).
fn kernel_thread_ticks() -> HashMap<u32, u64> {
    let mut map = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return map;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let comm = stat
            .find('(')
            .and_then(|a| stat.rfind(')').map(|b| &stat[a + 1..b]))
            .unwrap_or("");
        if (comm.starts_with("kworker") || comm.starts_with("ksoftirqd"))
            && let Some(t) = stat_ticks(&stat)
        {
            map.insert(pid, t);
        }
    }
    map
}

/// A snapshot of the CPU counters around one run.
struct Counters {
    proxy: Option<u64>,
    busy: u64,
    softirq: u64,
    kthreads: HashMap<u32, u64>,
}

impl Counters {
    fn take(target: &Target) -> Counters {
        let (busy, softirq) = system_ticks();
        Counters {
            proxy: target.pid.map(proc_ticks),
            busy,
            softirq,
            kthreads: kernel_thread_ticks(),
        }
    }
}

/// CPU spent between two snapshots, in milliseconds.
struct CpuDelta {
    proxy_ms: Option<f64>,
    busy_ms: f64,
    softirq_ms: f64,
    kthreads_ms: f64,
}

fn delta(a: &Counters, b: &Counters) -> CpuDelta {
    let ms = 1000.0 / clk_tck();
    let kt: u64 = b
        .kthreads
        .iter()
        .map(|(pid, t)| t.saturating_sub(a.kthreads.get(pid).copied().unwrap_or(0)))
        .sum();
    CpuDelta {
        proxy_ms: a
            .proxy
            .zip(b.proxy)
            .map(|(x, y)| y.saturating_sub(x) as f64 * ms),
        busy_ms: b.busy.saturating_sub(a.busy) as f64 * ms,
        softirq_ms: b.softirq.saturating_sub(a.softirq) as f64 * ms,
        kthreads_ms: kt as f64 * ms,
    }
}

/// What pgbench printed that the bench uses.
#[derive(Debug, Clone, Copy)]
pub struct PgbenchOut {
    pub tps: f64,
    pub transactions: u64,
    pub latency_ms: f64,
}

fn parse_pgbench(out: &str) -> Option<PgbenchOut> {
    let after = |prefix: &str| -> Option<&str> {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|r| r.split_whitespace().next())
    };
    Some(PgbenchOut {
        tps: patroxy_tests::postgres::parse_pgbench_tps(out)?,
        transactions: after("number of transactions actually processed:")?
            .split('/')
            .next()?
            .parse()
            .ok()?,
        latency_ms: after("latency average =")?.parse().ok()?,
    })
}

pub fn pgbench(lab: &Lab, t: &Target, args: &[String], timeout: Duration) -> Result<PgbenchOut> {
    let mut cmd = lab.pg.client("pgbench", t.port);
    cmd.args([
        "-h",
        "127.0.0.1",
        "-p",
        &t.port.to_string(),
        "-U",
        "postgres",
    ])
    .args(args)
    .arg("postgres");
    let out = run_with_timeout(&mut cmd, timeout).map_err(|e| anyhow!("{e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "pgbench {args:?} through {} failed ({}): {}{stdout}",
            t.name,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse_pgbench(&stdout)
        .ok_or_else(|| anyhow!("pgbench through {}: unexpected output:\n{stdout}", t.name))
}

pub fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// A short pgbench run through every target, unmeasured: connections, caches and the
/// proxies' allocators warm up before the first measured round.
pub fn warm_up(lab: &Lab) -> Result<()> {
    println!("bench: warm-up (pgbench -S -c 8 -T 2 through each target)");
    for t in &lab.targets {
        pgbench(
            lab,
            t,
            &strings(&["-n", "-S", "-c", "8", "-j", "2", "-T", "2"]),
            Duration::from_secs(60),
        )?;
    }
    Ok(())
}

/// Per-1000-transaction CPU of one run, in ms.
#[derive(Debug, Clone, Copy)]
struct PerKtx {
    proxy: Option<f64>,
    softirq: f64,
    kthreads: f64,
    busy: f64,
}

pub const SELECT: &str = "1. select-only (pgbench -S)";
pub const CPU: &str = "5. CPU per 1000 transactions (workload 1)";

/// pgbench arguments of workload 1 with `clients` clients (at most 2 threads: 2 cores).
pub fn select_args(plan: &Plan, clients: u32) -> Vec<String> {
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

/// pgbench arguments of workload 2: a new connection per transaction, 8 clients.
pub fn connect_args(plan: &Plan) -> Vec<String> {
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

/// Workload 1 (and 5: CPU per 1000 transactions).
pub fn select(lab: &Lab, plan: &Plan, res: &mut Results) -> Result<()> {
    println!(
        "bench: workload 1/5 — pgbench -S, {} s per run",
        plan.duration
    );
    for &c in &plan.clients {
        let case = format!("-c {c}");
        let args = select_args(plan, c);
        for round in 1..=plan.rounds {
            let mut direct: Option<(f64, PerKtx)> = None;
            for (i, t) in lab.targets.iter().enumerate() {
                let a = Counters::take(t);
                let out = pgbench(lab, t, &args, Duration::from_secs(plan.duration + 120))?;
                let b = Counters::take(t);
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

pub const CONNECT: &str = "2. connection rate (pgbench -S -C)";

/// Workload 2: a new connection per transaction.
pub fn connect(lab: &Lab, plan: &Plan, res: &mut Results) -> Result<()> {
    println!(
        "bench: workload 2 — pgbench -S -C -c 8 -j 2, {} s per run",
        plan.connect_duration
    );
    let case = "-C -c 8";
    let args = connect_args(plan);
    for round in 1..=plan.rounds {
        for (i, t) in lab.targets.iter().enumerate() {
            let a = Counters::take(t);
            let out = pgbench(
                lab,
                t,
                &args,
                Duration::from_secs(plan.connect_duration + 120),
            )?;
            let b = Counters::take(t);
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
            res.add(
                CONNECT,
                case,
                "connections/s",
                "conn/s",
                Better::Higher,
                i,
                out.tps,
            );
            res.add(
                CONNECT,
                case,
                "connect+query latency avg",
                "us",
                Better::Lower,
                i,
                out.latency_ms * 1000.0,
            );
            if let Some(p) = d.proxy_ms {
                res.add(
                    CONNECT,
                    case,
                    "proxy CPU per 1000 connections",
                    "ms",
                    Better::Lower,
                    i,
                    p * k,
                );
            }
        }
    }
    Ok(())
}

pub const BULK: &str = "3. bulk COPY through psql";

/// Runs psql with `sql`, stdin from `stdin` (or nothing) and stdout to /dev/null; returns
/// the elapsed time and psql's stderr+status on failure.
pub fn psql_timed(
    lab: &Lab,
    t: &Target,
    sql: &str,
    stdin: Option<&std::path::Path>,
) -> Result<Duration> {
    let mut cmd = lab.pg.client("psql", t.port);
    cmd.args([
        "-X",
        "-q",
        "-v",
        "ON_ERROR_STOP=1",
        "-h",
        "127.0.0.1",
        "-p",
        &t.port.to_string(),
    ])
    .args(["-U", "postgres", "-d", "postgres", "-c", sql])
    .stdout(File::create("/dev/null")?)
    .stderr(Stdio::piped());
    if let Some(path) = stdin {
        cmd.stdin(File::open(path)?);
    }
    let start = Instant::now();
    let mut child = cmd.spawn().context("spawning psql")?;
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let status = child.wait()?;
    let elapsed = start.elapsed();
    if !status.success() {
        bail!("psql {sql:?} through {} failed ({status}): {err}", t.name);
    }
    Ok(elapsed)
}

/// Creates `bench_bulk` (about `bytes` of COPY text) and the empty `bench_bulk_in`, and writes
/// the COPY text to a file for COPY FROM STDIN; returns the file.
pub fn prepare_bulk(lab: &Lab, bytes: u64) -> Result<std::path::PathBuf> {
    let direct = &lab.targets[0];
    // One row of COPY text is ~ 7 (id) + 1 + 32 (md5) + 170 + 1 = ~211 bytes.
    let rows = bytes / 211 + 1;
    println!(
        "bench: creating a {rows}-row table (~{} MB of COPY text)",
        bytes / 1_000_000
    );
    lab.pg
        .try_psql(
            direct.port,
            &format!(
                "DROP TABLE IF EXISTS bench_bulk, bench_bulk_in; \
                 CREATE UNLOGGED TABLE bench_bulk AS SELECT g AS id, md5(g::text) || repeat('x', 170) AS pad \
                 FROM generate_series(1, {rows}) g; \
                 CREATE UNLOGGED TABLE bench_bulk_in (LIKE bench_bulk);"
            ),
        )
        .map_err(|e| anyhow!("creating the bulk table: {e}"))?;
    lab.pg
        .try_psql(direct.port, "VACUUM ANALYZE bench_bulk")
        .map_err(|e| anyhow!("vacuuming the bulk table: {e}"))?;
    let file = lab.work_dir.join("bulk.copy");
    let mut cmd = lab.pg.client("psql", direct.port);
    cmd.args([
        "-X",
        "-q",
        "-h",
        "127.0.0.1",
        "-p",
        &direct.port.to_string(),
    ])
    .args(["-c", "COPY bench_bulk TO STDOUT"])
    .stdout(File::create(&file)?);
    let status = cmd.status()?;
    if !status.success() {
        bail!("writing {}: psql {status}", file.display());
    }
    Ok(file)
}

/// Drops what `prepare_bulk` created.
pub fn drop_bulk(lab: &Lab, file: &std::path::Path) -> Result<()> {
    let _ = std::fs::remove_file(file);
    lab.pg
        .try_psql(
            lab.targets[0].port,
            "DROP TABLE IF EXISTS bench_bulk, bench_bulk_in",
        )
        .map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

/// Workload 3: COPY TO STDOUT and COPY FROM STDIN of the same text.
pub fn bulk(lab: &Lab, plan: &Plan, res: &mut Results) -> Result<()> {
    let direct = &lab.targets[0];
    println!("bench: workload 3 — bulk COPY");
    let file = prepare_bulk(lab, plan.bulk_bytes)?;
    let bytes = std::fs::metadata(&file)?.len();
    let mb = bytes as f64 / 1e6;
    println!("bench: bulk file {} ({mb:.1} MB)", file.display());
    let case_out = format!("COPY TO STDOUT {mb:.0} MB");
    let case_in = format!("COPY FROM STDIN {mb:.0} MB");
    for round in 1..=plan.rounds {
        for (i, t) in lab.targets.iter().enumerate() {
            let a = Counters::take(t);
            let out = psql_timed(lab, t, "COPY bench_bulk TO STDOUT", None)?;
            let b = Counters::take(t);
            let d_out = delta(&a, &b);
            lab.pg
                .try_psql(direct.port, "TRUNCATE bench_bulk_in")
                .map_err(|e| anyhow!("{e}"))?;
            let a = Counters::take(t);
            let inn = psql_timed(lab, t, "COPY bench_bulk_in FROM STDIN", Some(&file))?;
            let b = Counters::take(t);
            let d_in = delta(&a, &b);
            let (r_out, r_in) = (mb / out.as_secs_f64(), mb / inn.as_secs_f64());
            println!(
                "  [bulk r{round}] {:<17} out {:>7.1} MB/s  in {:>7.1} MB/s | proxy CPU ms/100MB out {:>6.1} in {:>6.1}",
                t.name,
                r_out,
                r_in,
                d_out.proxy_ms.unwrap_or(0.0) * 100.0 / mb,
                d_in.proxy_ms.unwrap_or(0.0) * 100.0 / mb,
            );
            res.add(
                BULK,
                &case_out,
                "throughput",
                "MB/s",
                Better::Higher,
                i,
                r_out,
            );
            res.add(
                BULK,
                &case_in,
                "throughput",
                "MB/s",
                Better::Higher,
                i,
                r_in,
            );
            if let (Some(po), Some(pi)) = (d_out.proxy_ms, d_in.proxy_ms) {
                res.add(
                    BULK,
                    &case_out,
                    "proxy CPU per 100 MB",
                    "ms",
                    Better::Lower,
                    i,
                    po * 100.0 / mb,
                );
                res.add(
                    BULK,
                    &case_in,
                    "proxy CPU per 100 MB",
                    "ms",
                    Better::Lower,
                    i,
                    pi * 100.0 / mb,
                );
            }
        }
    }
    drop_bulk(lab, &file)
}

pub const IDLE: &str = "4. idle sessions";

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
fn open_session(port: u16) -> Result<TcpStream> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
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

/// Opens `n` sessions through `port` with 4 threads.
pub fn open_sessions(port: u16, n: u32) -> (Vec<TcpStream>, u32, Option<String>) {
    let threads = 4;
    let handles: Vec<_> = (0..threads)
        .map(|k| {
            let count = n / threads + u32::from(k < n % threads);
            std::thread::spawn(move || {
                let mut ok = Vec::new();
                let mut failed = 0;
                let mut first_err = None;
                for _ in 0..count {
                    match open_session(port) {
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
pub fn idle(lab: &Lab, plan: &Plan, res: &mut Results) -> Result<()> {
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
            let a = Counters::take(t);
            let start = Instant::now();
            let (sessions, failed, err) = open_sessions(t.port, n);
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
            let b = Counters::take(t);
            let d = delta(&a, &b);
            let slab_per = (slab1 as f64 - slab0 as f64) / open.max(1.0);
            println!(
                "  [idle r{round}] {:<17} {} open ({failed} failed) in {open_s:.1} s | RSS {} -> {} KiB ({:.2} KiB/session from {base}) | slab {:+.2} KiB/session | proxy CPU {:.2} s",
                t.name,
                sessions_len(open),
                rss0,
                rss1,
                (rss1 as f64 - base as f64) / open.max(1.0),
                slab_per,
                d.proxy_ms.unwrap_or(0.0) / 1000.0
            );
            if let Some(e) = err {
                eprintln!("    first failure through {}: {e}", t.name);
            }
            res.add(IDLE, &case, "sessions opened", "", Better::Higher, i, open);
            res.add(
                IDLE,
                &case,
                "time to open all",
                "s",
                Better::Lower,
                i,
                open_s,
            );
            res.add(
                IDLE,
                &case,
                "kernel slab growth per session (system-wide)",
                "KiB",
                Better::Lower,
                i,
                slab_per,
            );
            if t.pid.is_some() {
                res.add(
                    IDLE,
                    &case,
                    "proxy RSS with sessions open",
                    "MiB",
                    Better::Lower,
                    i,
                    rss1 as f64 / 1024.0,
                );
                res.add(
                    IDLE,
                    &case,
                    "proxy RSS growth per session",
                    "KiB",
                    Better::Lower,
                    i,
                    (rss1 as f64 - base as f64) / open.max(1.0),
                );
                res.add(
                    IDLE,
                    &case,
                    "proxy CPU (open, hold, close)",
                    "s",
                    Better::Lower,
                    i,
                    d.proxy_ms.unwrap_or(0.0) / 1000.0,
                );
            }
        }
    }
    Ok(())
}

fn sessions_len(open: f64) -> u64 {
    open as u64
}
