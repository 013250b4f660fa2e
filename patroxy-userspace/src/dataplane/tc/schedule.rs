//! When a session's next hand-off attempt is due, and which kind it is.
//!
//! Quiet attempts come often and cost nothing: 1 ms after the splice, then backing off to every
//! 50 ms while the session is busy (a quiet moment is seldom missed by more than the current
//! pause). A session with no quiet moment for [`FENCE_AFTER`] gets a fenced attempt, which
//! pauses its senders for a few milliseconds; a fenced attempt that fails (a peer that does
//! not take its bytes, say) waits twice as long for the next one, up to [`MAX_FENCED_PAUSE`].
use tokio::time::{Duration, Instant};

use super::handoff::Mode;

const FIRST_HAND_OFF: Duration = Duration::from_millis(1);
const MAX_QUIET_PAUSE: Duration = Duration::from_millis(50);
/// A session busy this long after the splice is handed off behind the fence. The fence costs
/// its senders a few milliseconds (what it dropped is sent on from HELD or recovered by SACK),
/// and the sockmap path runs a bulk transfer at about two thirds of the packet-level splice's
/// speed: a COPY of 200 MB gains about 15 % from 250 ms to 50 ms (README, Measured). Until
/// 2026-12-05 it was 250 ms, when a fenced bulk sender could wait for its timeout.
pub const FENCE_AFTER: Duration = Duration::from_millis(50);
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
        // At 1, 3, 7, 15 and 31 ms (pauses of 1, 2, 4, 8 and 16 ms), then the fenced one.
        assert_eq!(quiet, 5);
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
