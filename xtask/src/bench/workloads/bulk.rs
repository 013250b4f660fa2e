//! Workload 3: `COPY bench_bulk TO STDOUT` and `COPY bench_bulk_in FROM STDIN` of the same text
//! through psql.

use std::fs::File;
use std::io::Read as _;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};

use crate::bench::lab::{Lab, Target};
use crate::bench::plan::Plan;
use crate::bench::procfs::{Counters, delta};
use crate::bench::results::{Metric, Results};

// Workload 3's section of results.md and its metrics; the `pub` one is read by the goals and
// the chart too.
const SECTION: &str = "3. bulk COPY through psql";
pub const THROUGHPUT: Metric = Metric::higher(SECTION, "throughput", "MB/s");
const PROXY_CPU_PER_100MB: Metric = Metric::lower(SECTION, "proxy CPU per 100 MB", "ms");

/// Runs psql with `sql`, stdin from `stdin` (or nothing) and stdout to /dev/null; returns
/// the elapsed time and psql's stderr+status on failure.
pub fn psql_timed(
    lab: &Lab,
    t: &Target,
    sql: &str,
    stdin: Option<&std::path::Path>,
) -> Result<Duration> {
    let mut cmd = lab.client("psql", t);
    cmd.args([
        "-X",
        "-q",
        "-v",
        "ON_ERROR_STOP=1",
        "-h",
        &t.host.to_string(),
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
pub fn prepare(lab: &Lab, bytes: u64) -> Result<std::path::PathBuf> {
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

/// Drops what `prepare` created.
pub fn drop_table(lab: &Lab, file: &std::path::Path) -> Result<()> {
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
pub fn run(lab: &Lab, plan: &Plan, res: &mut Results) -> Result<()> {
    let direct = &lab.targets[0];
    println!("bench: workload 3 — bulk COPY");
    let file = prepare(lab, plan.bulk_bytes)?;
    let bytes = std::fs::metadata(&file)?.len();
    let mb = bytes as f64 / 1e6;
    println!("bench: bulk file {} ({mb:.1} MB)", file.display());
    let case_out = format!("COPY TO STDOUT {mb:.0} MB");
    let case_in = format!("COPY FROM STDIN {mb:.0} MB");
    for round in 1..=plan.rounds {
        for (i, t) in lab.targets.iter().enumerate() {
            let a = Counters::take(t.pid);
            let out = psql_timed(lab, t, "COPY bench_bulk TO STDOUT", None)?;
            let b = Counters::take(t.pid);
            let d_out = delta(&a, &b);
            lab.pg
                .try_psql(direct.port, "TRUNCATE bench_bulk_in")
                .map_err(|e| anyhow!("{e}"))?;
            let a = Counters::take(t.pid);
            let inn = psql_timed(lab, t, "COPY bench_bulk_in FROM STDIN", Some(&file))?;
            let b = Counters::take(t.pid);
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
            res.add(&case_out, THROUGHPUT, i, r_out);
            res.add(&case_in, THROUGHPUT, i, r_in);
            if let (Some(po), Some(pi)) = (d_out.proxy_ms, d_in.proxy_ms) {
                res.add(&case_out, PROXY_CPU_PER_100MB, i, po * 100.0 / mb);
                res.add(&case_in, PROXY_CPU_PER_100MB, i, pi * 100.0 / mb);
            }
        }
    }
    drop_table(lab, &file)
}
