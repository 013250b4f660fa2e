//! HAProxy's check hysteresis as a pure state machine: no I/O, time passed in.
//!
//! The health counter runs over 0..=rise+fall-1. A server is UP while the counter is >= rise.
//! A success adds one, and reaching `rise` jumps to the top (fully UP); a failure takes one away,
//! and dropping below `rise` jumps to 0 (fully DOWN). So a DOWN server needs `rise` successes in
//! a row and an UP one `fall` failures in a row: one odd answer never flips a server.
//!
//! patroxy adds authoritative answers: Patroni's own 503 (on /primary: "I am not the primary")
//! is Patroni telling us the truth, not a glitch, so it drops the server at once instead of
//! letting writes reach a demoted primary for `fall * inter`. Only that answer: a 503 that is
//! recognisably Patroni's (see [`CheckOutcome::from_patroni`]). Any other unexpected status (a
//! 500 from a failing handler, a 404 from something else on the port, a 503 from a proxy),
//! timeouts, refusals and garbage count against `fall`, as HAProxy counts them.
use std::{fmt, time::Duration};

use tokio::time::Instant;

use super::client::{CheckOutcome, CheckStatus, Role};
use crate::config::model::{CheckTiming, InitState};

/// Patroni's "not this role" status, the one answer an authoritative check acts on at once.
const NOT_THIS_ROLE: u16 = 503;

/// What the stats show for a server, HAProxy style.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerState {
    Up,
    Down,
    /// UP but failing: `n` more failures (of `m` = fall) before DOWN. Shown "UP n/m".
    GoingDown {
        n: u32,
        m: u32,
    },
    /// DOWN but passing: `n` successes of `m` = rise so far. Shown "DOWN n/m".
    GoingUp {
        n: u32,
        m: u32,
    },
    /// Not checked; always carries traffic.
    NoCheck,
}

impl fmt::Display for ServerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerState::Up => f.write_str("UP"),
            ServerState::Down => f.write_str("DOWN"),
            ServerState::GoingDown { n, m } => write!(f, "UP {n}/{m}"),
            ServerState::GoingUp { n, m } => write!(f, "DOWN {n}/{m}"),
            ServerState::NoCheck => f.write_str("no check"),
        }
    }
}

/// A server crossing the UP/DOWN line, returned by [`ServerHealth::record`] for logging and for
/// the data path (mark-down shuts sessions down).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    WentUp,
    WentDown,
}

/// The last check of a server, for the stats.
#[derive(Clone, Debug, PartialEq)]
pub struct LastCheck {
    pub status: CheckStatus,
    pub code: Option<u16>,
    pub duration: Duration,
    pub at: Instant,
    pub detail: Option<String>,
    /// Whether the answer was recognisably Patroni's own (see [`CheckOutcome::from_patroni`]).
    pub from_patroni: bool,
}

/// Check state of one server (one backend). Cloned into every published snapshot.
#[derive(Clone, Debug, PartialEq)]
pub struct ServerHealth {
    /// The hysteresis counter; meaningless when `checked` is false.
    health: u32,
    rise: u32,
    fall: u32,
    authoritative: bool,
    /// false = "no check": always UP.
    checked: bool,
    pub last_check: Option<LastCheck>,
    /// When the server last crossed the UP/DOWN line (or started).
    pub last_change: Instant,
    /// UP -> DOWN transitions ("chkdown" in HAProxy's stats).
    pub down_transitions: u64,
    /// Failed checks while the server was not fully DOWN ("chkfail": HAProxy does not count
    /// failures of a server already at the bottom).
    pub failed_checks: u64,
    /// From the last GET body that had one.
    pub role: Option<Role>,
    pub state: Option<String>,
    pub timeline: Option<u64>,
    /// DOWN time accumulated before the current DOWN period (see [`ServerHealth::downtime`]).
    downtime_closed: Duration,
}

impl ServerHealth {
    pub fn new(timing: &CheckTiming, init: InitState, authoritative: bool, now: Instant) -> Self {
        // Config validation guarantees rise, fall >= 1; clamp anyway so the counter math holds.
        let (rise, fall) = (timing.rise.max(1), timing.fall.max(1));
        ServerHealth {
            health: match init {
                InitState::Down => 0,
                InitState::Up => rise + fall - 1,
            },
            rise,
            fall,
            authoritative,
            checked: true,
            last_check: None,
            last_change: now,
            down_transitions: 0,
            failed_checks: 0,
            role: None,
            state: None,
            timeline: None,
            downtime_closed: Duration::ZERO,
        }
    }

    /// Takes a reloaded `rise`/`fall` and `authoritative` without a new wait: an UP server stays
    /// UP with as many failures left as before (at most the new `fall` - 1), a DOWN one stays
    /// DOWN with the successes it already had (at most the new `rise` - 1).
    pub fn retune(&mut self, timing: &CheckTiming, authoritative: bool) {
        let (rise, fall) = (timing.rise.max(1), timing.fall.max(1));
        self.health = if self.health >= self.rise {
            rise + (self.health - self.rise).min(fall - 1)
        } else {
            self.health.min(rise - 1)
        };
        (self.rise, self.fall, self.authoritative) = (rise, fall, authoritative);
    }

    /// A server of a listener without a check: always UP.
    pub fn no_check(now: Instant) -> Self {
        let mut h = Self::new(
            &CheckTiming {
                inter: Duration::ZERO,
                fastinter: Duration::ZERO,
                downinter: Duration::ZERO,
                rise: 1,
                fall: 1,
            },
            InitState::Up,
            false,
            now,
        );
        h.checked = false;
        h
    }

    fn max(&self) -> u32 {
        self.rise + self.fall - 1
    }

    /// Whether the server carries new traffic.
    pub fn is_up(&self) -> bool {
        !self.checked || self.health >= self.rise
    }

    pub fn is_checked(&self) -> bool {
        self.checked
    }

    /// Fully UP or fully DOWN (or not checked): not in the middle of a transition.
    pub fn is_stable(&self) -> bool {
        !self.checked || self.health == 0 || self.health == self.max()
    }

    pub fn server_state(&self) -> ServerState {
        if !self.checked {
            ServerState::NoCheck
        } else if self.health == self.max() {
            ServerState::Up
        } else if self.health >= self.rise {
            ServerState::GoingDown {
                n: self.health - self.rise + 1,
                m: self.fall,
            }
        } else if self.health == 0 {
            ServerState::Down
        } else {
            ServerState::GoingUp {
                n: self.health,
                m: self.rise,
            }
        }
    }

    /// The delay before this server's next check, HAProxy's srv_getinter: `inter` when fully
    /// UP, `downinter` when fully DOWN, `fastinter` in between. `group_changing` is true while
    /// another server of the same listener is changing state: then patroxy checks at
    /// `fastinter` so that a new primary is found within one fast interval.
    pub fn next_interval(&self, timing: &CheckTiming, group_changing: bool) -> Duration {
        if !self.is_stable() || group_changing {
            timing.fastinter
        } else if self.health == 0 {
            timing.downinter
        } else {
            timing.inter
        }
    }

    /// Fully DOWN on Patroni's own "not this role" (503) while the JSON of that answer says it
    /// runs as a replica (state `running`, or `streaming` on Patroni 4): on a listener that asks
    /// for the leader this is a healthy standby, not a failure. Only the stats use it (STANDBY);
    /// routing treats it as the DOWN it is.
    pub fn is_healthy_replica(&self) -> bool {
        let not_this_role = self.last_check.as_ref().is_some_and(|l| {
            l.status == CheckStatus::L7Sts && l.code == Some(NOT_THIS_ROLE) && l.from_patroni
        });
        self.server_state() == ServerState::Down
            && not_this_role
            && self.role == Some(Role::Replica)
            && matches!(self.state.as_deref(), Some("running" | "streaming"))
    }

    /// Total time spent DOWN up to `now`.
    pub fn downtime(&self, now: Instant) -> Duration {
        if self.is_up() {
            self.downtime_closed
        } else {
            self.downtime_closed + now.saturating_duration_since(self.last_change)
        }
    }

    /// Applies one check result; returns the transition if the server crossed the UP/DOWN line.
    pub fn record(&mut self, outcome: &CheckOutcome, at: Instant) -> Option<Transition> {
        self.last_check = Some(LastCheck {
            status: outcome.status,
            code: outcome.code,
            duration: outcome.duration,
            at,
            detail: outcome.detail.clone(),
            from_patroni: outcome.from_patroni,
        });
        if outcome.role.is_some() {
            self.role = outcome.role.clone();
            self.state = outcome.state.clone();
        }
        if outcome.timeline.is_some() {
            self.timeline = outcome.timeline;
        }
        if !self.checked {
            return None;
        }
        let was_up = self.is_up();
        if outcome.status.passed() {
            if self.health < self.max() {
                self.health += 1;
                if self.health >= self.rise {
                    self.health = self.max();
                }
            }
        } else if self.health > 0 {
            self.failed_checks += 1;
            self.health -= 1;
            if self.health < self.rise || (self.authoritative && says_not_this_role(outcome)) {
                self.health = 0;
            }
        }
        match (was_up, self.is_up()) {
            (true, false) => {
                self.down_transitions += 1;
                self.last_change = at;
                Some(Transition::WentDown)
            }
            (false, true) => {
                self.downtime_closed += at.saturating_duration_since(self.last_change);
                self.last_change = at;
                Some(Transition::WentUp)
            }
            _ => None,
        }
    }
}

/// What the DCS watch may decide without waiting for the hysteresis (see `patroni::dcs`).
impl ServerHealth {
    /// Takes the server fully DOWN now: its leader key moved to another member (or expired),
    /// so it is demoting or gone. Its checks may bring it back after `rise` successes.
    pub fn mark_down_now(&mut self, at: Instant) -> Option<Transition> {
        if !self.checked || self.health == 0 {
            return None;
        }
        let was_up = self.is_up();
        self.health = 0;
        was_up.then(|| {
            self.down_transitions += 1;
            self.last_change = at;
            Transition::WentDown
        })
    }

    /// Applies a check result to a server the leader key does not name while it names another:
    /// as [`ServerHealth::record`], except that a DOWN server stays DOWN (at most `rise` - 1
    /// successes): Patroni lets only the key's holder be the primary, so a /primary 200 from
    /// another node is a moment of its demotion, not a reason to take writes back.
    pub fn record_held_down(&mut self, outcome: &CheckOutcome, at: Instant) -> Option<Transition> {
        if !self.checked || self.is_up() {
            return self.record(outcome, at);
        }
        let (closed, changed) = (self.downtime_closed, self.last_change);
        let transition = self.record(outcome, at);
        if self.is_up() {
            self.health = self.rise - 1;
            (self.downtime_closed, self.last_change) = (closed, changed);
            return None;
        }
        transition
    }

    /// Takes the server fully UP now: an authoritative up, the mirror of the authoritative
    /// 503 (its check just said primary on a timeline newer than the last UP primary's).
    pub fn mark_up_now(&mut self, at: Instant) -> Option<Transition> {
        if !self.checked || self.is_up() {
            return None;
        }
        self.health = self.max();
        self.downtime_closed += at.saturating_duration_since(self.last_change);
        self.last_change = at;
        Some(Transition::WentUp)
    }
}

/// Whether `outcome` is Patroni itself answering "not this role".
fn says_not_this_role(outcome: &CheckOutcome) -> bool {
    outcome.status == CheckStatus::L7Sts
        && outcome.code == Some(NOT_THIS_ROLE)
        && outcome.from_patroni
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing(rise: u32, fall: u32) -> CheckTiming {
        CheckTiming {
            inter: Duration::from_millis(2000),
            fastinter: Duration::from_millis(500),
            downinter: Duration::from_millis(5000),
            rise,
            fall,
        }
    }

    /// A check ending in `status`; an L7STS is Patroni's own 503.
    fn outcome(status: CheckStatus) -> CheckOutcome {
        CheckOutcome {
            status,
            code: match status {
                CheckStatus::L7Ok => Some(200),
                CheckStatus::L7Sts => Some(503),
                _ => None,
            },
            duration: Duration::from_millis(2),
            role: None,
            state: None,
            timeline: None,
            detail: None,
            from_patroni: matches!(status, CheckStatus::L7Ok | CheckStatus::L7Sts),
        }
    }

    /// An HTTP answer with an unexpected status: `from_patroni` as the client decided it.
    fn wrong_status(code: u16, from_patroni: bool) -> CheckOutcome {
        CheckOutcome {
            code: Some(code),
            from_patroni,
            ..outcome(CheckStatus::L7Sts)
        }
    }

    /// Feeds `outcomes` one second apart; returns the states shown after each and the transitions.
    fn run_outcomes(
        h: &mut ServerHealth,
        outcomes: &[CheckOutcome],
    ) -> (Vec<String>, Vec<Transition>) {
        let now = Instant::now();
        let mut states = Vec::new();
        let mut transitions = Vec::new();
        for (i, o) in outcomes.iter().enumerate() {
            transitions.extend(h.record(o, now + Duration::from_secs(i as u64)));
            states.push(h.server_state().to_string());
        }
        (states, transitions)
    }

    /// Feeds `statuses` and returns the states shown after each, plus the transitions seen.
    fn run(h: &mut ServerHealth, statuses: &[CheckStatus]) -> (Vec<String>, Vec<Transition>) {
        let outcomes: Vec<CheckOutcome> = statuses.iter().map(|s| outcome(*s)).collect();
        run_outcomes(h, &outcomes)
    }

    use CheckStatus::{L4Con, L4Tout, L7Ok, L7Rsp, L7Sts, L7Tout};

    #[test]
    fn init_down_needs_rise_successes() {
        let mut h = ServerHealth::new(&timing(2, 3), InitState::Down, true, Instant::now());
        assert_eq!(h.server_state(), ServerState::Down);
        assert!(!h.is_up());
        let (states, tr) = run(&mut h, &[L7Ok, L7Ok]);
        assert_eq!(states, ["DOWN 1/2", "UP"]);
        assert_eq!(tr, [Transition::WentUp]);
        assert!(h.is_up());
    }

    #[test]
    fn retune_keeps_up_and_down_without_a_new_rise_wait() {
        let mut up = ServerHealth::new(&timing(2, 3), InitState::Down, true, Instant::now());
        run(&mut up, &[L7Ok, L7Ok, L4Tout]);
        assert_eq!(up.server_state().to_string(), "UP 2/3");
        up.retune(&timing(5, 5), true);
        assert_eq!(up.server_state().to_string(), "UP 2/5");
        up.retune(&timing(1, 1), true);
        assert_eq!(up.server_state(), ServerState::Up);
        let mut down = ServerHealth::new(&timing(3, 3), InitState::Down, true, Instant::now());
        run(&mut down, &[L7Ok, L7Ok]);
        down.retune(&timing(2, 3), true);
        assert_eq!(down.server_state().to_string(), "DOWN 1/2");
        let (states, _) = run(&mut down, &[L7Ok]);
        assert_eq!(states, ["UP"]);
    }

    #[test]
    fn a_failure_while_going_up_starts_over() {
        let mut h = ServerHealth::new(&timing(3, 3), InitState::Down, false, Instant::now());
        let (states, tr) = run(&mut h, &[L7Ok, L7Ok, L4Tout, L7Ok, L7Ok, L7Ok]);
        // 2 -> failure -> 1 (< rise, so 0): HAProxy resets a rising server to the bottom.
        assert_eq!(
            states,
            ["DOWN 1/3", "DOWN 2/3", "DOWN", "DOWN 1/3", "DOWN 2/3", "UP"]
        );
        assert_eq!(tr, [Transition::WentUp]);
    }

    #[test]
    fn up_goes_down_after_fall_failures() {
        let mut h = ServerHealth::new(&timing(2, 3), InitState::Up, false, Instant::now());
        assert_eq!(h.server_state(), ServerState::Up);
        let (states, tr) = run(&mut h, &[L7Sts, L7Sts, L7Sts]);
        assert_eq!(states, ["UP 2/3", "UP 1/3", "DOWN"]);
        assert_eq!(tr, [Transition::WentDown]);
        assert_eq!((h.down_transitions, h.failed_checks), (1, 3));
        // Failures at the bottom are not counted (HAProxy's chkfail).
        run(&mut h, &[L7Sts, L4Con]);
        assert_eq!(h.failed_checks, 3);
    }

    #[test]
    fn one_success_while_going_down_restores_full_up() {
        let mut h = ServerHealth::new(&timing(2, 3), InitState::Up, true, Instant::now());
        let (states, tr) = run(&mut h, &[L4Tout, L4Tout, L7Ok, L4Tout]);
        assert_eq!(states, ["UP 2/3", "UP 1/3", "UP", "UP 2/3"]);
        assert!(tr.is_empty());
    }

    #[test]
    fn authoritative_status_drops_at_once() {
        let mut h = ServerHealth::new(&timing(2, 3), InitState::Up, true, Instant::now());
        let (states, tr) = run(&mut h, &[L7Sts]);
        assert_eq!(states, ["DOWN"]);
        assert_eq!(tr, [Transition::WentDown]);
        // Also while rising: a 503 is the truth, not a glitch.
        let (states, _) = run(&mut h, &[L7Ok, L7Sts]);
        assert_eq!(states, ["DOWN 1/2", "DOWN"]);
    }

    #[test]
    fn authoritative_still_counts_other_failures_against_fall() {
        for failure in [L4Tout, L4Con, L7Rsp, L7Tout] {
            let mut h = ServerHealth::new(&timing(2, 3), InitState::Up, true, Instant::now());
            let (states, tr) = run(&mut h, &[failure, failure, failure]);
            assert_eq!(states, ["UP 2/3", "UP 1/3", "DOWN"], "{failure:?}");
            assert_eq!(tr, [Transition::WentDown]);
        }
    }

    #[test]
    fn only_patronis_503_is_authoritative() {
        for other in [
            wrong_status(500, true),
            wrong_status(404, true),
            wrong_status(502, true),
            // A 503 whose body is not Patroni's JSON: a proxy or another service on the port.
            wrong_status(503, false),
        ] {
            let what = format!("{:?} from_patroni={}", other.code, other.from_patroni);
            let mut h = ServerHealth::new(&timing(2, 3), InitState::Up, true, Instant::now());
            let (states, tr) = run_outcomes(&mut h, &[other.clone(), other.clone()]);
            assert_eq!(states, ["UP 2/3", "UP 1/3"], "{what}");
            assert!(tr.is_empty(), "{what}");
            let (states, tr) = run_outcomes(&mut h, &[other]);
            assert_eq!(states, ["DOWN"], "{what}");
            assert_eq!(tr, [Transition::WentDown], "{what}");
            assert_eq!(h.failed_checks, 3, "{what}");
        }
        let mut h = ServerHealth::new(&timing(2, 3), InitState::Up, true, Instant::now());
        let (states, _) = run_outcomes(&mut h, &[wrong_status(503, true)]);
        assert_eq!(states, ["DOWN"]);
    }

    #[test]
    fn rise_one_fall_one() {
        let mut h = ServerHealth::new(&timing(1, 1), InitState::Down, false, Instant::now());
        let (states, tr) = run(&mut h, &[L7Ok, L7Sts, L7Ok]);
        assert_eq!(states, ["UP", "DOWN", "UP"]);
        assert_eq!(tr.len(), 3);
    }

    #[test]
    fn intervals_inter_fastinter_downinter() {
        let t = timing(2, 3);
        let now = Instant::now();
        let mut h = ServerHealth::new(&t, InitState::Down, false, now);
        assert_eq!(h.next_interval(&t, false), t.downinter);
        assert_eq!(h.next_interval(&t, true), t.fastinter);
        h.record(&outcome(L7Ok), now);
        assert_eq!(h.next_interval(&t, false), t.fastinter); // DOWN 1/2
        h.record(&outcome(L7Ok), now);
        assert_eq!(h.next_interval(&t, false), t.inter); // UP
        assert_eq!(h.next_interval(&t, true), t.fastinter); // a peer is changing
        h.record(&outcome(L4Tout), now);
        assert_eq!(h.next_interval(&t, false), t.fastinter); // UP 2/3
        h.record(&outcome(L4Tout), now);
        h.record(&outcome(L4Tout), now);
        assert_eq!(h.next_interval(&t, false), t.downinter); // DOWN
    }

    #[test]
    fn no_check_is_always_up() {
        let mut h = ServerHealth::no_check(Instant::now());
        let (states, tr) = run(&mut h, &[L4Con]);
        assert_eq!(states, ["no check"]);
        assert!(tr.is_empty() && h.is_up() && h.is_stable());
    }

    #[test]
    fn keeps_role_timeline_and_downtime() {
        let t = timing(1, 1);
        let start = Instant::now();
        let mut h = ServerHealth::new(&t, InitState::Down, true, start);
        let mut ok = outcome(L7Ok);
        ok.role = Some(Role::Primary);
        ok.timeline = Some(7);
        h.record(&ok, start + Duration::from_secs(3));
        assert_eq!((h.role.clone(), h.timeline), (Some(Role::Primary), Some(7)));
        assert_eq!(
            h.downtime(start + Duration::from_secs(10)),
            Duration::from_secs(3)
        );
        // A HEAD-style answer without a body keeps what we knew.
        h.record(&outcome(L7Sts), start + Duration::from_secs(10));
        assert_eq!(h.role, Some(Role::Primary));
        assert_eq!(
            h.downtime(start + Duration::from_secs(12)),
            Duration::from_secs(5)
        );
        assert_eq!(h.last_change, start + Duration::from_secs(10));
        assert_eq!(h.last_check.as_ref().unwrap().code, Some(503));
    }

    #[test]
    fn a_running_replica_saying_not_the_leader_is_a_healthy_replica() {
        let t = timing(2, 3);
        let now = Instant::now();
        let replica = |state: &str| CheckOutcome {
            role: Some(Role::Replica),
            state: Some(state.into()),
            timeline: Some(3),
            ..outcome(L7Sts)
        };
        let healthy_after = |outcomes: &[CheckOutcome]| {
            let mut h = ServerHealth::new(&t, InitState::Down, true, now);
            run_outcomes(&mut h, outcomes);
            h.is_healthy_replica()
        };
        assert!(healthy_after(&[replica("streaming")]), "Patroni 4");
        assert!(healthy_after(&[replica("running")]), "Patroni 3");
        assert!(healthy_after(&[outcome(L4Tout), replica("running")]));
        for state in ["starting", "stopped", "crashed", "restarting"] {
            assert!(!healthy_after(&[replica(state)]), "{state}");
        }
        let demoted = CheckOutcome {
            role: Some(Role::Other("demoted".into())),
            ..replica("running")
        };
        assert!(!healthy_after(&[demoted]));
        let not_patroni = CheckOutcome {
            from_patroni: false,
            ..replica("running")
        };
        assert!(!healthy_after(&[not_patroni]), "a 503 from something else");
        let other_status = CheckOutcome {
            code: Some(500),
            ..replica("running")
        };
        assert!(!healthy_after(&[other_status]));
        // What came after the replica's answer decides.
        assert!(!healthy_after(&[replica("running"), outcome(L4Tout)]));
        assert!(
            !healthy_after(&[replica("running"), outcome(L7Ok)]),
            "DOWN 1/2"
        );
        // An UP server losing its role goes DOWN at once (authoritative) and is then a replica.
        let mut h = ServerHealth::new(&t, InitState::Up, true, now);
        assert!(!h.is_healthy_replica(), "UP");
        h.record(&replica("streaming"), now);
        assert!(h.is_healthy_replica());
        // Not authoritative: UP 2/3 while failing, a replica only once fully DOWN.
        let mut h = ServerHealth::new(&t, InitState::Up, false, now);
        let (states, _) = run_outcomes(&mut h, &[replica("running"), replica("running")]);
        assert_eq!(states, ["UP 2/3", "UP 1/3"]);
        assert!(!h.is_healthy_replica());
        h.record(&replica("running"), now);
        assert!(h.is_healthy_replica());
    }
}
