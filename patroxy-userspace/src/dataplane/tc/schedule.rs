//! When a session's next hand-off attempt is due, and which kind it is.
//!
//! Quiet attempts come often and cost nothing: 1 ms after the splice, then backing off to every
//! 50 ms while the session is busy (a quiet moment is seldom missed by more than the current
//! pause). A session with no quiet moment for [`FENCE_AFTER`] gets a fenced attempt, which
//! pauses its senders (for a few milliseconds if the fence settles at once, longer if it
//! waits for a drain); a fenced attempt that fails (a peer that does not take its bytes, say)
//! waits twice as long for the next one, up to [`MAX_FENCED_PAUSE`].
use tokio::time::{Duration, Instant};

use super::handoff::Mode;

const FIRST_HAND_OFF: Duration = Duration::from_millis(1);
const MAX_QUIET_PAUSE: Duration = Duration::from_millis(50);
/// A session busy this long after the splice is handed off behind the fence: a short session
/// ends before it pays the pause, a long one gains more than it. 50 ms was tried (2026-12-05):
/// a COPY TO gained up to 15 % (less time on the sockmap path), but a COPY FROM lost about as
/// much (140 against 160-175 MB/s in the same runs, `cargo xtask bench --netns --only bulk`),
/// its fences shorter (12-114 ms) but none holding a copy of the client's first dropped
/// segment, so the client waited for its retransmission timeout; why none was held is not
/// known.
pub const FENCE_AFTER: Duration = Duration::from_millis(250);
const MAX_FENCED_PAUSE: Duration = Duration::from_secs(8);

#[derive(Debug)]
pub struct Schedule {
    next: Instant,
    quiet_pause: Duration,
    fenced_at: Instant,
    fenced_pause: Duration,
}

impl Schedule {
    pub fn new(now: Instant) -> Self {
        Self {
            next: now + FIRST_HAND_OFF,
            quiet_pause: FIRST_HAND_OFF,
            fenced_at: now + FENCE_AFTER,
            fenced_pause: FENCE_AFTER,
        }
    }

    /// When the next attempt is due.
    pub fn due(&self) -> Instant {
        self.next
    }

    /// The kind of the attempt due at `now`.
    pub fn mode(&self, now: Instant) -> Mode {
        if now >= self.fenced_at {
            Mode::Fenced
        } else {
            Mode::Quiet
        }
    }

    /// The attempt of `mode` made at `now` did not hand the session off.
    pub fn failed(&mut self, mode: Mode, now: Instant) {
        if mode == Mode::Fenced {
            self.fenced_pause = (self.fenced_pause * 2).min(MAX_FENCED_PAUSE);
            self.fenced_at = now + self.fenced_pause;
        }
        self.quiet_pause = (self.quiet_pause * 2).min(MAX_QUIET_PAUSE);
        self.next = (now + self.quiet_pause).min(self.fenced_at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn quiet_attempts_back_off_then_a_fenced_one_and_its_pause_doubles() {
        let start = Instant::now();
        let mut s = Schedule::new(start);
        let mut quiet = 0;
        while s.mode(s.due()) == Mode::Quiet {
            quiet += 1;
            let at = s.due();
            s.failed(Mode::Quiet, at);
            assert!(s.due() - at <= MAX_QUIET_PAUSE, "pause {:?}", s.due() - at);
        }
        assert_eq!(s.due(), start + FENCE_AFTER, "first fenced attempt");
        // 1, 2, 4, ..., 32 ms, then every 50 ms up to 250 ms.
        assert_eq!(quiet, 9);
        let at = s.due();
        s.failed(Mode::Fenced, at);
        assert_eq!(
            s.mode(s.due()),
            Mode::Quiet,
            "quiet attempts go on meanwhile"
        );
        let mut next_fenced = s.due();
        while s.mode(next_fenced) == Mode::Quiet {
            s.failed(Mode::Quiet, next_fenced);
            next_fenced = s.due();
        }
        assert_eq!(next_fenced - at, FENCE_AFTER * 2);
        for _ in 0..10 {
            let at = s.due();
            s.failed(s.mode(at), at);
        }
        assert!(s.fenced_pause <= MAX_FENCED_PAUSE);
    }
}
