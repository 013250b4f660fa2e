//! What the leader key is allowed to decide on the checker's state, as a pure state kept by the
//! checker (time passed in):
//! - which listeners it governs: the leader listeners, those checking a /primary-like path
//!   (`config::WRITE_PATHS`: /primary, /master, /leader, /read-write, /), whose UP server is
//!   the one primary; replica listeners are left to their checks;
//! - the fast burst: from a leader change until a server of the listener is UP again (at most
//!   [`BURST_LIMIT`]), its checks run every `burst_inter`;
//! - the authoritative up: a `/primary` 200 from the server the leader key names, or on a
//!   timeline newer than the last UP primary's, takes a server UP without waiting for `rise`
//!   (Patroni's DCS and its REST API agree; a promoted primary's REST API may report the old
//!   timeline until its end-of-recovery checkpoint, so the key holder is the usual case).
//!
//! It never takes a server DOWN by itself except the leader the key just left, and nothing at
//! all on a lost connection or a watch error: the checks stay the truth.
use std::time::Duration;

use tokio::time::Instant;

use crate::config::{Config, WRITE_PATHS};
use crate::patroni::{BackendKey, CheckOutcome, Role, checker::HealthSnapshot};

/// The longest a burst lasts when no server of the listener comes UP: Patroni's default ttl
/// (30 s) plus a loop, by when Patroni has elected a new leader if it is going to.
pub const BURST_LIMIT: Duration = Duration::from_secs(35);

#[derive(Clone, Debug)]
pub struct LeaderGate {
    /// Per listener: whether the leader key governs it.
    governed: Vec<bool>,
    /// Per listener: the end of the current burst, if one runs.
    burst_until: Vec<Option<Instant>>,
    /// Per listener: the newest timeline of a server seen UP as primary.
    newest_up_timeline: Vec<Option<u64>>,
    /// The configured server the leader key names now, as the watch last read it.
    key_holder: Option<String>,
    burst_inter: Duration,
}

impl LeaderGate {
    /// The gate of `config`: with no `[dcs]` it governs nothing and changes nothing.
    pub fn new(config: &Config) -> Self {
        let n = config.listeners.len();
        let mut gate = LeaderGate {
            governed: vec![false; n],
            burst_until: vec![None; n],
            newest_up_timeline: vec![None; n],
            key_holder: None,
            burst_inter: Duration::ZERO,
        };
        gate.retune(config);
        gate
    }

    /// Takes a reloaded `config` of the same listeners: a changed check path may make a
    /// listener a leader listener or stop it being one.
    pub fn retune(&mut self, config: &Config) {
        let watched = config.dcs.is_some();
        self.governed = config
            .listeners
            .iter()
            .map(|l| {
                watched
                    && l.check.as_ref().is_some_and(|c| {
                        let path = c.path.split('?').next().unwrap_or_default();
                        WRITE_PATHS.contains(&path)
                    })
            })
            .collect();
        self.burst_inter = config
            .dcs
            .as_ref()
            .map_or(Duration::ZERO, |d| d.burst_inter);
    }

    pub fn governs(&self, listener: usize) -> bool {
        self.governed.get(listener).copied().unwrap_or(false)
    }

    /// The backends of server `server` (by name) in the governed listeners of `snapshot`: the
    /// ones a leader key leaving that server fences.
    pub fn backends_of(&self, snapshot: &HealthSnapshot, server: &str) -> Vec<BackendKey> {
        snapshot
            .listeners
            .iter()
            .enumerate()
            .filter(|(li, _)| self.governs(*li))
            .flat_map(|(_, l)| l.servers.iter().filter(|s| s.name == server).map(|s| s.key))
            .collect()
    }

    /// The server the leader key names now (`None`: no leader, or a member no server is).
    pub fn set_key_holder(&mut self, server: Option<&str>) {
        self.key_holder = server.map(str::to_owned);
    }

    /// Whether `server` of `listener` must stay DOWN whatever its checks say: on a governed
    /// listener, while the (connected) watch reads the key naming another server.
    pub fn holds_down(&self, listener: usize, server: &str) -> bool {
        self.governs(listener) && self.key_holder.as_deref().is_some_and(|h| h != server)
    }

    /// Whether a passed check of `listener` is Patroni's lock without a writable primary yet:
    /// in a switchover Patroni answers 200 on /primary as soon as it holds the leader key, and
    /// its body says `replica` until PostgreSQL has left recovery (the REST API asks it each
    /// time). Writes routed there now would fail read-only, so the server stays DOWN (checked
    /// at the burst's pace) until the body says primary.
    pub fn promoting(&self, listener: usize, outcome: &CheckOutcome) -> bool {
        self.governs(listener) && outcome.status.passed() && outcome.role == Some(Role::Replica)
    }

    /// A leader change: every governed listener checks every `burst_inter` until one of its
    /// servers is UP again.
    pub fn start_burst(&mut self, now: Instant) {
        for (li, until) in self.burst_until.iter_mut().enumerate() {
            if self.governed[li] {
                *until = Some(now + BURST_LIMIT);
            }
        }
    }

    /// The burst's check interval for `listener`, while one runs.
    pub fn burst_interval(&self, listener: usize, now: Instant) -> Option<Duration> {
        let until = self.burst_until.get(listener).copied().flatten()?;
        (now < until).then_some(self.burst_inter)
    }

    /// Whether a check of DOWN server `server` of `listener` that ended in `outcome` takes it
    /// UP at once, on a governed listener: a passed check of the server the leader key names,
    /// or Patroni's primary on a timeline newer than the last UP primary's (a primary Patroni
    /// just promoted). Any other server, such as an old leader on the old timeline whose key
    /// is gone, still needs `rise`.
    pub fn confirms_up(&self, listener: usize, server: &str, outcome: &CheckOutcome) -> bool {
        let newer_timeline = match (
            outcome.timeline,
            self.newest_up_timeline.get(listener).copied().flatten(),
        ) {
            (Some(timeline), Some(newest)) => timeline > newest,
            _ => false,
        };
        // A passed check of a /primary-like path is Patroni's own "I am the primary" (one
        // whose body still says replica is held down by `promoting` before it gets here).
        let key_holder = self.key_holder.as_deref() == Some(server);
        self.governs(listener)
            && outcome.status.passed()
            && (key_holder || (outcome.role == Some(Role::Primary) && newer_timeline))
    }

    /// Learns from a published snapshot: the newest timeline of an UP primary per listener,
    /// and the end of a burst once a server of the listener is UP.
    pub fn observe(&mut self, snapshot: &HealthSnapshot) {
        for (li, l) in snapshot.listeners.iter().enumerate() {
            let up_primaries = l
                .servers
                .iter()
                .filter(|s| s.is_up() && s.health.role == Some(Role::Primary));
            for tl in up_primaries.filter_map(|s| s.health.timeline) {
                let newest = &mut self.newest_up_timeline[li];
                *newest = Some(newest.map_or(tl, |n| n.max(tl)));
            }
            if l.servers.iter().any(|s| s.is_up() && s.health.is_checked()) {
                self.burst_until[li] = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        config::{Dcs, model::CheckTiming},
        patroni::{CheckStatus, test_config::*},
    };

    fn dcs() -> Dcs {
        Dcs {
            etcd: vec!["http://127.0.0.1:2379".into()],
            namespace: "/service".into(),
            scope: "demo".into(),
            tls: None,
            auth: None,
            burst_inter: Duration::from_millis(50),
        }
    }

    fn cluster(with_dcs: bool) -> Config {
        let a = "127.0.0.1:8008".parse().unwrap();
        let t: CheckTiming = timing(3000, 1000, 3000, 2, 3);
        let servers = || vec![server("pg1", a, t), server("pg2", a, t)];
        let mut c = config(
            vec![
                listener("w", Some(check("/primary", true)), servers()),
                listener("r", Some(check("/replica?lag=16MB", true)), servers()),
                listener("any", None, servers()),
            ],
            None,
        );
        c.dcs = with_dcs.then(dcs);
        c
    }

    fn primary(timeline: u64) -> CheckOutcome {
        CheckOutcome {
            status: CheckStatus::L7Ok,
            code: Some(200),
            duration: Duration::from_millis(1),
            role: Some(Role::Primary),
            state: Some("running".into()),
            timeline: Some(timeline),
            detail: None,
            from_patroni: true,
        }
    }

    /// `snapshot` with server `server` of listener 0 UP as primary on `timeline`.
    fn with_up_primary(config: &Config, server: usize, timeline: u64) -> HealthSnapshot {
        let now = Instant::now();
        let mut snap = HealthSnapshot::initial(config, now);
        let h = &mut snap.listeners[0].servers[server].health;
        h.mark_up_now(now);
        h.record(&primary(timeline), now);
        snap
    }

    #[test]
    fn only_leader_listeners_are_governed_and_only_with_dcs() {
        let gate = LeaderGate::new(&cluster(true));
        assert_eq!(
            [gate.governs(0), gate.governs(1), gate.governs(2)],
            [true, false, false]
        );
        let gate = LeaderGate::new(&cluster(false));
        assert!(!gate.governs(0));
    }

    #[test]
    fn the_old_leader_is_fenced_on_leader_listeners_only() {
        let config = cluster(true);
        let gate = LeaderGate::new(&config);
        let snap = HealthSnapshot::initial(&config, Instant::now());
        assert_eq!(
            gate.backends_of(&snap, "pg2"),
            [BackendKey {
                listener: 0,
                server: 1
            }]
        );
        assert!(gate.backends_of(&snap, "pg9").is_empty());
        let unwatched = LeaderGate::new(&cluster(false));
        assert!(unwatched.backends_of(&snap, "pg2").is_empty());
    }

    #[test]
    fn a_newer_timeline_confirms_a_primary_at_once_an_equal_one_does_not() {
        let config = cluster(true);
        let mut gate = LeaderGate::new(&config);
        // Nothing is known before a primary was UP: rise applies.
        assert!(!gate.confirms_up(0, "pg2", &primary(9)));
        gate.observe(&with_up_primary(&config, 0, 5));
        assert!(gate.confirms_up(0, "pg2", &primary(6)));
        assert!(!gate.confirms_up(0, "pg2", &primary(5)));
        assert!(!gate.confirms_up(0, "pg2", &primary(4)));
        let failed = CheckOutcome {
            status: CheckStatus::L7Sts,
            code: Some(503),
            ..primary(6)
        };
        assert!(!gate.confirms_up(0, "pg2", &failed));
        let replica = CheckOutcome {
            role: Some(Role::Replica),
            ..primary(6)
        };
        assert!(!gate.confirms_up(0, "pg2", &replica));
        // Not a leader listener.
        assert!(!gate.confirms_up(1, "pg2", &primary(6)));
        // The key holder is confirmed on the old timeline too (Patroni reports the new one
        // only after the end-of-recovery checkpoint); another server is not.
        gate.set_key_holder(Some("pg2"));
        assert!(gate.confirms_up(0, "pg2", &primary(5)));
        assert!(!gate.confirms_up(0, "pg1", &primary(5)));
        assert!(!gate.confirms_up(0, "pg2", &failed));
        assert!(!gate.confirms_up(1, "pg2", &primary(5)));
        // While the key names pg2, pg1 stays DOWN; with no leader, or no watch, nobody is held.
        assert!(gate.holds_down(0, "pg1") && !gate.holds_down(0, "pg2"));
        assert!(!gate.holds_down(1, "pg1"), "replica listeners are not held");
        gate.set_key_holder(None);
        assert!(!gate.holds_down(0, "pg1"));
        // The key holder's 200 while its PostgreSQL is still in recovery: held, not confirmed.
        let locked_not_promoted = CheckOutcome {
            role: Some(Role::Replica),
            ..primary(5)
        };
        assert!(gate.promoting(0, &locked_not_promoted));
        assert!(!gate.promoting(0, &primary(5)));
        assert!(!gate.promoting(0, &failed));
        assert!(
            !gate.promoting(1, &locked_not_promoted),
            "replica listeners"
        );
        // Without [dcs], the hysteresis alone decides.
        let mut unwatched = LeaderGate::new(&cluster(false));
        unwatched.observe(&with_up_primary(&config, 0, 5));
        unwatched.set_key_holder(Some("pg2"));
        assert!(!unwatched.confirms_up(0, "pg2", &primary(6)));
        assert!(!unwatched.promoting(0, &locked_not_promoted));
    }

    #[test]
    fn a_burst_runs_from_a_leader_change_until_a_server_is_up_or_the_limit() {
        let config = cluster(true);
        let mut gate = LeaderGate::new(&config);
        let now = Instant::now();
        assert_eq!(gate.burst_interval(0, now), None);
        gate.start_burst(now);
        assert_eq!(gate.burst_interval(0, now), Some(Duration::from_millis(50)));
        assert_eq!(
            gate.burst_interval(1, now),
            None,
            "replica listeners keep their pace"
        );
        assert_eq!(gate.burst_interval(0, now + BURST_LIMIT), None);
        // All DOWN: the burst goes on.
        gate.observe(&HealthSnapshot::initial(&config, now));
        assert!(gate.burst_interval(0, now).is_some());
        gate.observe(&with_up_primary(&config, 1, 6));
        assert_eq!(gate.burst_interval(0, now), None);
    }
}
