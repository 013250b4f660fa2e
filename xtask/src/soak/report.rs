//! The soak's verdict: one row per patroxy, the disruptions, every failure; as Markdown for
//! the terminal and target/soak/report.md.

use std::fmt::Write as _;
use std::time::Duration;

use super::disrupt::Switchovers;
use super::lab::Target;
use super::resources::Usage;
use super::tally::Tally;

/// One patroxy's results.
pub struct Row {
    pub target: Target,
    pub tally: Tally,
    pub base: Usage,
    pub end: Usage,
    pub peak_rss_kib: u64,
    /// Log lines at ERROR level or from a panic.
    pub bad_log_lines: Vec<String>,
    /// Log lines at WARN level (mark-downs, resets): shown, not judged.
    pub warn_lines: usize,
    /// Everything that fails the soak for this patroxy.
    pub problems: Vec<String>,
}

pub struct Report {
    pub date: String,
    pub duration: Duration,
    pub rows: Vec<Row>,
    pub flips: u64,
    pub switchovers: Option<Switchovers>,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.rows.iter().all(|r| r.problems.is_empty())
    }

    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let _ = writeln!(
            md,
            "# Soak report\n\n{} · {:.1} minutes · **{}**\n",
            self.date,
            self.duration.as_secs_f64() / 60.0,
            if self.passed() { "PASS" } else { "FAIL" }
        );
        md.push_str(
            "| patroxy | sessions | transactions | runs ok (flapping) | runs failed: flapping, \
             switchover | errors | \
             bytes checked | mismatches | stats pages | fds | RSS MiB (peak) | SESSIONS/SOCKS | \
             ERROR/panic lines | WARN lines |\n\
             | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | --- | ---: | ---: |\n",
        );
        for r in &self.rows {
            let t = &r.tally;
            let maps = match (r.base.map_entries, r.end.map_entries) {
                (Some(b), Some(e)) => format!("{}/{} → {}/{}", b.0, b.1, e.0, e.1),
                _ => "(fallback)".into(),
            };
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} ({}) | {}, {} | {} | {:.1} MiB | {} | {} ok, {} failed | {} → {} | {:.1} → {:.1} ({:.1}) | {} | {} | {} |",
                r.target.name,
                r.end.total_sessions.saturating_sub(r.base.total_sessions),
                t.transactions,
                t.runs_ok,
                t.flap_runs_ok,
                t.flap_failures,
                t.switchover_failures,
                t.unexpected.len() + t.scrape_errors.len(),
                t.bytes_checked as f64 / 1048576.0,
                t.mismatches,
                t.scrapes_ok,
                t.scrape_errors.len(),
                r.base.fds,
                r.end.fds,
                r.base.rss_kib as f64 / 1024.0,
                r.end.rss_kib as f64 / 1024.0,
                r.peak_rss_kib as f64 / 1024.0,
                maps,
                r.bad_log_lines.len(),
                r.warn_lines,
            );
        }
        let _ = writeln!(
            md,
            "\nDisruptions: the loopback's flapping Patroni flipped {} times (every {} s).",
            self.flips,
            super::disrupt::FLAP_EVERY.as_secs()
        );
        if let Some(s) = &self.switchovers {
            let routed: Vec<String> = s.routed_after.iter().map(|x| format!("{x:.1}")).collect();
            let _ = writeln!(
                md,
                "Switchovers: {} done (cluster healthy again and every patroxy routing to the new \
                 leader after {} s); Patroni's own failures (not judged): {}.",
                s.done,
                if routed.is_empty() {
                    "-".into()
                } else {
                    routed.join(", ")
                },
                if s.patroni_failures.is_empty() {
                    "none".into()
                } else {
                    s.patroni_failures.join("; ")
                }
            );
        }
        let problems: Vec<String> = self
            .rows
            .iter()
            .flat_map(|r| {
                r.problems
                    .iter()
                    .map(move |p| format!("- {}: {p}", r.target.name))
            })
            .collect();
        if !problems.is_empty() {
            let _ = writeln!(md, "\n## Failures\n\n{}", problems.join("\n"));
        }
        md
    }
}
