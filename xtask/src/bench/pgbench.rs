//! Running pgbench through a target and reading what it printed.

use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use patroxy_tests::postgres::{parse_pgbench_tps, run_with_timeout};

use super::lab::{Lab, Target};

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
        tps: parse_pgbench_tps(out)?,
        transactions: after("number of transactions actually processed:")?
            .split('/')
            .next()?
            .parse()
            .ok()?,
        latency_ms: after("latency average =")?.parse().ok()?,
    })
}

/// Runs pgbench with `args` through `t` against the `postgres` database.
pub fn run(lab: &Lab, t: &Target, args: &[String], timeout: Duration) -> Result<PgbenchOut> {
    let mut cmd = lab.client("pgbench", t);
    cmd.args([
        "-h",
        &t.host.to_string(),
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

/// `&str`s as the `String`s `run` takes.
pub fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::parse_pgbench;

    #[test]
    fn reads_tps_transactions_and_latency() {
        let out = "transaction type: <builtin: select only>\n\
                   number of clients: 8\n\
                   number of transactions actually processed: 123456\n\
                   number of failed transactions: 0 (0.000%)\n\
                   latency average = 0.389 ms\n\
                   initial connection time = 12.345 ms\n\
                   tps = 20567.123456 (without initial connection time)\n";
        let p = parse_pgbench(out).expect("parsed");
        assert_eq!(p.tps, 20567.123456);
        assert_eq!(p.transactions, 123456);
        assert_eq!(p.latency_ms, 0.389);
        // With -t, pgbench prints "done/planned": the first number counts.
        let limited = out.replace("processed: 123456", "processed: 1000/1000");
        assert_eq!(parse_pgbench(&limited).expect("parsed").transactions, 1000);
        assert!(parse_pgbench("tps = 1.0\n").is_none());
    }
}
