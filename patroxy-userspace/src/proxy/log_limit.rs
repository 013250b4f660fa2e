//! A token bucket for the lines logged once per client (a session's end, a refusal): a flood of
//! clients would otherwise write a line each (500 connections, 500 lines; a soak, megabytes).
//! Past the rate, lines are counted instead, and a summary every [`REPORT_EVERY`] says how
//! many were dropped. The counters and the stats see every client either way.
//!
//! The debug lines per client (accepted, routed, each connect retry) have a bucket of their own:
//! sharing one would let them spend the tokens of the session-end lines an operator relies on.
use std::sync::{
    Mutex,
    atomic::{AtomicU64, Ordering::Relaxed},
};

use tokio::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// How often suppressed lines are summed up in one line (when there were any).
pub const REPORT_EVERY: Duration = Duration::from_secs(10);

pub struct LogLimit {
    /// What the lines are, for the summary ("session log lines").
    what: &'static str,
    /// Lines per second in the long run; the bucket holds twice that, for a burst.
    per_second: u32,
    bucket: Mutex<Bucket>,
    suppressed: AtomicU64,
}

struct Bucket {
    tokens: f64,
    refilled: Instant,
}

impl LogLimit {
    pub fn new(what: &'static str, per_second: u32) -> Self {
        Self {
            what,
            per_second,
            bucket: Mutex::new(Bucket {
                tokens: Self::burst(per_second),
                refilled: Instant::now(),
            }),
            suppressed: AtomicU64::new(0),
        }
    }

    fn burst(per_second: u32) -> f64 {
        2.0 * f64::from(per_second)
    }

    /// Whether one more line may be written now; if not, it is counted as suppressed.
    pub fn allow(&self) -> bool {
        let now = Instant::now();
        let mut bucket = self.bucket.lock().expect("log limit lock");
        let refill = (now - bucket.refilled).as_secs_f64() * f64::from(self.per_second);
        bucket.tokens = (bucket.tokens + refill).min(Self::burst(self.per_second));
        bucket.refilled = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            self.suppressed.fetch_add(1, Relaxed);
            false
        }
    }

    /// Lines suppressed since the last call.
    fn take_suppressed(&self) -> u64 {
        self.suppressed.swap(0, Relaxed)
    }

    /// Until `stop`: every [`REPORT_EVERY`], one line with how many lines were suppressed.
    pub async fn report(&self, stop: CancellationToken) {
        let mut tick = tokio::time::interval_at(Instant::now() + REPORT_EVERY, REPORT_EVERY);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.cancelled() => break,
            }
            self.report_once();
        }
        // The last period's count, so a drain does not lose it.
        self.report_once();
    }

    fn report_once(&self) {
        let n = self.take_suppressed();
        if n > 0 {
            warn!(
                suppressed = n,
                "{n} {} suppressed in the last {}s (over session_log_rate = {}/s)",
                self.what,
                REPORT_EVERY.as_secs(),
                self.per_second
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_twice_the_rate_then_the_rate() {
        let limit = LogLimit::new("test lines", 100);
        let allowed = (0..500).filter(|_| limit.allow()).count();
        assert_eq!(allowed, 200, "the burst");
        assert_eq!(limit.take_suppressed(), 300);
        tokio::time::advance(Duration::from_millis(500)).await;
        let allowed = (0..500).filter(|_| limit.allow()).count();
        assert_eq!(allowed, 50, "half a second's worth");
        tokio::time::advance(Duration::from_secs(60)).await;
        let allowed = (0..500).filter(|_| limit.allow()).count();
        assert_eq!(allowed, 200, "refilled to the burst, not beyond");
    }

    #[tokio::test(start_paused = true)]
    async fn counts_restart_after_each_report() {
        let limit = LogLimit::new("test lines", 1);
        (0..5).for_each(|_| {
            limit.allow();
        });
        assert_eq!(limit.take_suppressed(), 3);
        assert_eq!(limit.take_suppressed(), 0);
    }
}
