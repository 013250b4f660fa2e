//! The workloads, one file each; the counters they read are in `bench/procfs.rs`.
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

pub mod bulk;
pub mod connect;
pub mod idle;
pub mod select;

use std::time::Duration;

use anyhow::Result;

use crate::bench::lab::Lab;
use crate::bench::pgbench::{self, strings};

/// A short pgbench run through every target, unmeasured: connections, caches and the
/// proxies' allocators warm up before the first measured round.
pub fn warm_up(lab: &Lab) -> Result<()> {
    println!("bench: warm-up (pgbench -S -c 8 -T 2 through each target)");
    for t in &lab.targets {
        pgbench::run(
            lab,
            t,
            &strings(&["-n", "-S", "-c", "8", "-j", "2", "-T", "2"]),
            Duration::from_secs(60),
        )?;
    }
    Ok(())
}
