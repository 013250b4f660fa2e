//! What the workloads and scrapers count for one patroxy, and the planned disruptions a failed
//! run is checked against.

use std::sync::Mutex;
use std::time::Instant;

/// Counters of one patroxy, shared by its workload threads.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    /// pgbench transactions completed (each `-C` one is a session opened and closed).
    pub transactions: u64,
    /// Workload runs that completed cleanly.
    pub runs_ok: u64,
    /// Of those, runs through the flapping server's listener: some must succeed, or the
    /// server was never taken back after it recovered.
    pub flap_runs_ok: u64,
    /// Failed runs through the flapping server: sessions reset or refused on purpose.
    pub flap_failures: u64,
    /// Failed runs that overlapped a switchover of the cluster: planned too.
    pub switchover_failures: u64,
    /// Failed runs on sessions to servers that stayed up: each one fails the soak.
    pub unexpected: Vec<String>,
    /// Bytes sent through the proxy and read back, compared byte for byte.
    pub bytes_checked: u64,
    /// Bulk transfers whose bytes came back different: each one fails the soak.
    pub mismatches: u64,
    /// Stats pages fetched and parsed (HTML, CSV, JSON, /metrics each count one).
    pub scrapes_ok: u64,
    /// Stats pages that failed to answer or to parse: each one fails the soak.
    pub scrape_errors: Vec<String>,
}

impl Tally {
    /// Keeps the first few messages of a kind: the count says how many there were.
    pub fn note(list: &mut Vec<String>, msg: String) {
        eprintln!("soak: {msg}");
        list.push(msg);
    }
}

/// Time windows in which sessions may be reset on purpose (a switchover until patroxy routes
/// to the new leader, plus a margin).
#[derive(Default)]
pub struct Disruptions {
    windows: Mutex<Vec<(Instant, Option<Instant>)>>,
}

impl Disruptions {
    /// Opens a window now; returns its index for [`Disruptions::end`].
    pub fn begin(&self) -> usize {
        let mut w = self.windows.lock().expect("windows lock");
        w.push((Instant::now(), None));
        w.len() - 1
    }

    pub fn end(&self, index: usize) {
        self.windows.lock().expect("windows lock")[index].1 = Some(Instant::now());
    }

    /// Whether `[from, to]` met a window (an open window counts as lasting).
    pub fn overlaps(&self, from: Instant, to: Instant) -> bool {
        self.windows
            .lock()
            .expect("windows lock")
            .iter()
            .any(|&(start, end)| start <= to && end.is_none_or(|e| e >= from))
    }
}
