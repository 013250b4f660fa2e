//! Which server of a listener gets the next client: a pure choice over the published
//! [`View`](crate::view::View) (no I/O, no clock).
//!
//! Writes (`first`) go to exactly one server: the UP server that Patroni reports as leader. Two
//! at once is a split brain; the higher timeline is the newer promotion and wins, and among
//! equals the current pick is kept, so writes never alternate between two primaries. Reads
//! (`roundrobin`, `leastconn`) spread over UP servers, skipping full ones while another has room.
//! A server the operator drains (DRAIN) gets no new client from any algorithm; one in
//! maintenance (MAINT) is DOWN as far as routing is concerned.
use tracing::warn;

use crate::config::model::Balance;
use crate::view::ServerView;

/// A server's current load as the data path sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Load {
    /// Sessions on the server now (callers may add the clients queued on it, to keep queues
    /// even when every server is full).
    pub sessions: u32,
    /// The server's maxconn; `None` = unlimited.
    pub maxconn: Option<u32>,
}

impl Load {
    fn has_room(&self) -> bool {
        self.maxconn.is_none_or(|m| self.sessions < m)
    }

    /// Fullness as a fraction of maxconn, for choosing where to queue.
    fn fullness(&self) -> f64 {
        match self.maxconn {
            Some(m) if m > 0 => f64::from(self.sessions) / f64::from(m),
            Some(_) => f64::INFINITY,
            None => 0.0,
        }
    }
}

/// Gives the load of a server by its index in the listener. Implemented for closures.
pub trait ServerLoad {
    fn load(&self, server: usize) -> Load;
}

impl<F: Fn(usize) -> Load> ServerLoad for F {
    fn load(&self, server: usize) -> Load {
        self(server)
    }
}

/// The routing state of one listener: the round-robin cursor and the current write target.
#[derive(Clone, Debug)]
pub struct Router {
    listener: String,
    balance: Balance,
    /// Where the next round-robin (or leastconn tie-break) scan starts.
    next: usize,
    /// `first`: the current write target, kept while it stays the best choice.
    current: Option<usize>,
    /// True during a split-brain episode, so it is logged once, not per client.
    in_split_brain: bool,
    split_brain_episodes: u64,
}

impl Router {
    pub fn new(listener: &str, balance: Balance) -> Self {
        Router {
            listener: listener.to_string(),
            balance,
            next: 0,
            current: None,
            in_split_brain: false,
            split_brain_episodes: 0,
        }
    }

    /// How many split-brain episodes (two or more UP leaders) `first` has seen, for the stats.
    pub fn split_brain_episodes(&self) -> u64 {
        self.split_brain_episodes
    }

    /// Picks a server index (into `servers`, i.e. `BackendKey::server`) for a new client.
    /// `exclude` lists servers that just failed to connect (redispatch). `None`: no UP server
    /// is eligible and the caller queues the client until `timeout queue`. When every eligible
    /// server is full, the least loaded one is returned for the caller to queue on. `first`
    /// ignores maxconn: writes have one target and queue on it rather than spill elsewhere.
    pub fn pick(
        &mut self,
        servers: &[ServerView],
        load: &impl ServerLoad,
        exclude: &[usize],
    ) -> Option<usize> {
        let eligible: Vec<usize> = (0..servers.len())
            .filter(|&i| servers[i].takes_new_sessions() && !exclude.contains(&i))
            .collect();
        match self.balance {
            Balance::First => self.pick_first(servers, &eligible, exclude),
            Balance::RoundRobin => self.pick_round_robin(&eligible, load),
            Balance::LeastConn => self.pick_least_conn(&eligible, load),
        }
    }

    fn pick_first(
        &mut self,
        servers: &[ServerView],
        eligible: &[usize],
        exclude: &[usize],
    ) -> Option<usize> {
        let is_leader = |i: &usize| {
            servers[*i]
                .health
                .role
                .as_ref()
                .is_some_and(|r| r.is_leader())
        };
        let up_leaders: Vec<usize> = (0..servers.len())
            .filter(|i| servers[*i].is_up() && is_leader(i))
            .collect();
        self.note_split_brain(servers, &up_leaders);
        if up_leaders.is_empty() {
            // No role information (HEAD checks, no check): HAProxy's first UP in file order.
            self.current = eligible.first().copied();
            return self.current;
        }
        // A leader is known: only leaders take writes, even when the leader is excluded or
        // drained (then the caller retries or queues rather than write to a replica). A drained
        // leader still counts for the newest timeline: writes queue rather than go to an older
        // primary.
        let timeline = |i: usize| servers[i].health.timeline;
        let leaders: Vec<usize> = up_leaders
            .into_iter()
            .filter(|i| !exclude.contains(i))
            .collect();
        let best = leaders.iter().map(|&i| timeline(i)).max()?;
        let top: Vec<usize> = leaders
            .into_iter()
            .filter(|&i| timeline(i) == best && eligible.contains(&i))
            .collect();
        if top.is_empty() {
            return None;
        }
        let pick = match self.current {
            Some(c) if top.contains(&c) => c,
            _ => top[0],
        };
        self.current = Some(pick);
        Some(pick)
    }

    fn note_split_brain(&mut self, servers: &[ServerView], up_leaders: &[usize]) {
        if up_leaders.len() < 2 {
            self.in_split_brain = false;
            return;
        }
        if !self.in_split_brain {
            self.in_split_brain = true;
            self.split_brain_episodes += 1;
            let who: Vec<String> = up_leaders
                .iter()
                .map(|&i| {
                    let tl = servers[i]
                        .health
                        .timeline
                        .map_or("?".into(), |t| t.to_string());
                    format!("{} (timeline {tl})", servers[i].name)
                })
                .collect();
            warn!(
                "proxy {}: split brain, {} servers pass the leader check: {}; writes go to the \
                 highest timeline only",
                self.listener,
                up_leaders.len(),
                who.join(", ")
            );
        }
    }

    fn pick_round_robin(&mut self, eligible: &[usize], load: &impl ServerLoad) -> Option<usize> {
        let pick = self
            .in_cursor_order(eligible)
            .find(|&i| load.load(i).has_room())
            .or_else(|| least_full(eligible, load))?;
        self.next = pick + 1;
        Some(pick)
    }

    fn pick_least_conn(&mut self, eligible: &[usize], load: &impl ServerLoad) -> Option<usize> {
        // Scanning from the cursor and keeping only strictly smaller loads spreads ties
        // round-robin, as HAProxy's leastconn does.
        let pick = self
            .in_cursor_order(eligible)
            .filter(|&i| load.load(i).has_room())
            .fold(None, |best: Option<usize>, i| match best {
                Some(b) if load.load(b).sessions <= load.load(i).sessions => Some(b),
                _ => Some(i),
            })
            .or_else(|| least_full(eligible, load))?;
        self.next = pick + 1;
        Some(pick)
    }

    /// The eligible servers in order starting at the cursor, wrapping around.
    fn in_cursor_order<'a>(&self, eligible: &'a [usize]) -> impl Iterator<Item = usize> + 'a {
        let start = eligible.iter().position(|&i| i >= self.next).unwrap_or(0);
        eligible[start..].iter().chain(&eligible[..start]).copied()
    }
}

/// The UP leaders on an older timeline than another UP leader: a split brain's losing side.
/// Patroni promoted the newer one, so what is written on an older one is lost when it rejoins;
/// [`Router::pick`] sends it no writes, and the data path fences and resets its sessions as on
/// a mark-down. Leaders without a known timeline are never superseded.
pub fn superseded_leaders(servers: &[ServerView]) -> Vec<usize> {
    let leader_timeline = |s: &ServerView| {
        let leads = s.is_up() && s.health.role.as_ref().is_some_and(|r| r.is_leader());
        leads.then_some(s.health.timeline).flatten()
    };
    let Some(newest) = servers.iter().filter_map(leader_timeline).max() else {
        return Vec::new();
    };
    (0..servers.len())
        .filter(|&i| leader_timeline(&servers[i]).is_some_and(|t| t < newest))
        .collect()
}

/// When every eligible server is full: the one with the lowest fullness, to queue on.
fn least_full(eligible: &[usize], load: &impl ServerLoad) -> Option<usize> {
    eligible
        .iter()
        .copied()
        .min_by(|&a, &b| load.load(a).fullness().total_cmp(&load.load(b).fullness()))
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, time::Duration};

    use tokio::time::Instant;

    use super::*;
    use crate::config::model::{CheckTiming, InitState};
    use crate::operator_state::AdminState;
    use crate::patroni::{BackendKey, Role, ServerHealth};

    fn srv(i: usize, up: bool, role: Option<Role>, timeline: Option<u64>) -> ServerView {
        let t = Duration::from_secs(1);
        let timing = CheckTiming {
            inter: t,
            fastinter: t,
            downinter: t,
            rise: 1,
            fall: 1,
        };
        let init = if up { InitState::Up } else { InitState::Down };
        let mut health = ServerHealth::new(&timing, init, true, Instant::now());
        health.role = role;
        health.timeline = timeline;
        ServerView {
            key: BackendKey {
                listener: 0,
                server: i,
            },
            id: i as u32 + 1,
            name: format!("pg{i}"),
            health,
            admin: AdminState::Ready,
        }
    }

    fn primary(i: usize, tl: u64) -> ServerView {
        srv(i, true, Some(Role::Primary), Some(tl))
    }

    fn replica(i: usize, up: bool) -> ServerView {
        srv(i, up, Some(Role::Replica), Some(1))
    }

    fn idle(_: usize) -> Load {
        Load::default()
    }

    fn picks(
        r: &mut Router,
        servers: &[ServerView],
        load: &impl ServerLoad,
        n: usize,
    ) -> HashMap<usize, usize> {
        let mut count = HashMap::new();
        for _ in 0..n {
            *count
                .entry(r.pick(servers, load, &[]).expect("a pick"))
                .or_default() += 1;
        }
        count
    }

    #[test]
    fn first_routes_to_the_single_primary_and_never_round_robins() {
        let mut r = Router::new("w", Balance::First);
        // A replica that is (wrongly) UP does not take writes away from the primary.
        let servers = [replica(0, true), primary(1, 3), replica(2, false)];
        assert_eq!(picks(&mut r, &servers, &idle, 50), HashMap::from([(1, 50)]));
        assert_eq!(r.split_brain_episodes(), 0);
    }

    #[test]
    fn split_brain_goes_to_the_higher_timeline_and_warns_once() {
        let mut r = Router::new("w", Balance::First);
        let servers = [primary(0, 5), primary(1, 6), primary(2, 4)];
        assert_eq!(picks(&mut r, &servers, &idle, 20), HashMap::from([(1, 20)]));
        assert_eq!(r.split_brain_episodes(), 1);
        // Episode over (one leader), then a new one.
        let healed = [replica(0, false), primary(1, 6), replica(2, false)];
        assert_eq!(r.pick(&healed, &idle, &[]), Some(1));
        assert_eq!(r.pick(&servers, &idle, &[]), Some(1));
        assert_eq!(r.split_brain_episodes(), 2);
    }

    #[test]
    fn superseded_leaders_are_the_up_leaders_on_older_timelines() {
        let servers = [
            primary(0, 5),
            primary(1, 6),
            primary(2, 4),
            replica(3, true),
        ];
        assert_eq!(superseded_leaders(&servers), vec![0, 2]);
        // Equal timelines, unknown timelines, DOWN leaders and replicas supersede nobody.
        assert!(superseded_leaders(&[primary(0, 6), primary(1, 6)]).is_empty());
        let unknown = srv(1, true, Some(Role::Primary), None);
        assert!(superseded_leaders(&[primary(0, 5), unknown]).is_empty());
        let down = srv(1, false, Some(Role::Primary), Some(7));
        assert!(superseded_leaders(&[primary(0, 5), down]).is_empty());
        assert!(superseded_leaders(&[primary(0, 5), replica(1, true)]).is_empty());
    }

    #[test]
    fn first_is_sticky_among_equal_timelines_but_a_newer_timeline_wins() {
        let mut r = Router::new("w", Balance::First);
        assert_eq!(
            r.pick(&[replica(0, false), primary(1, 7)], &idle, &[]),
            Some(1)
        );
        // Both claim timeline 7: keep writing where we were, not where file order says.
        let both = [primary(0, 7), primary(1, 7)];
        assert_eq!(picks(&mut r, &both, &idle, 10), HashMap::from([(1, 10)]));
        // The current pick goes DOWN: move, and stay moved when it comes back.
        assert_eq!(
            r.pick(&[primary(0, 7), srv(1, false, None, None)], &idle, &[]),
            Some(0)
        );
        assert_eq!(r.pick(&both, &idle, &[]), Some(0));
        // A promotion (higher timeline) is the newer primary even against a sticky pick.
        assert_eq!(r.pick(&[primary(0, 7), primary(1, 8)], &idle, &[]), Some(1));
    }

    #[test]
    fn first_without_role_info_is_the_first_up_in_file_order() {
        let mut r = Router::new("w", Balance::First);
        let servers = [
            srv(0, false, None, None),
            srv(1, true, None, None),
            srv(2, true, None, None),
        ];
        assert_eq!(picks(&mut r, &servers, &idle, 10), HashMap::from([(1, 10)]));
        assert_eq!(r.pick(&servers, &idle, &[1]), Some(2));
    }

    #[test]
    fn first_ignores_maxconn_and_honours_exclude() {
        let mut r = Router::new("w", Balance::First);
        let full = |_| Load {
            sessions: 10,
            maxconn: Some(10),
        };
        let servers = [primary(0, 2), replica(1, true)];
        assert_eq!(
            r.pick(&servers, &full, &[]),
            Some(0),
            "writes queue on the primary"
        );
        // The primary failed to connect: a replica must still never take writes.
        assert_eq!(r.pick(&servers, &idle, &[0]), None);
        // With two leaders, redispatch may go to the other one.
        assert_eq!(
            r.pick(&[primary(0, 2), primary(1, 2)], &idle, &[0]),
            Some(1)
        );
    }

    #[test]
    fn roundrobin_spreads_evenly_over_up_servers() {
        let mut r = Router::new("r", Balance::RoundRobin);
        let servers = [replica(0, true), replica(1, true), replica(2, true)];
        assert_eq!(
            picks(&mut r, &servers, &idle, 300),
            HashMap::from([(0, 100), (1, 100), (2, 100)])
        );
        let one_down = [replica(0, true), replica(1, false), replica(2, true)];
        assert_eq!(
            picks(&mut r, &one_down, &idle, 100),
            HashMap::from([(0, 50), (2, 50)])
        );
        let seq: Vec<_> = (0..4)
            .map(|_| r.pick(&servers, &idle, &[]).unwrap())
            .collect();
        assert_eq!(seq, [0, 1, 2, 0]);
    }

    #[test]
    fn roundrobin_skips_full_servers_then_queues_on_the_least_full() {
        let mut r = Router::new("r", Balance::RoundRobin);
        let servers = [replica(0, true), replica(1, true), replica(2, true)];
        let load = |i| Load {
            sessions: [10, 3, 8][i],
            maxconn: Some([10, 10, 8][i]),
        };
        assert_eq!(picks(&mut r, &servers, &load, 10), HashMap::from([(1, 10)]));
        let all_full = |i| Load {
            sessions: [12, 10, 8][i],
            maxconn: Some([10, 5, 8][i]),
        };
        assert_eq!(
            r.pick(&servers, &all_full, &[]),
            Some(2),
            "8/8 is the least full"
        );
    }

    #[test]
    fn leastconn_picks_the_fewest_sessions_and_rotates_ties() {
        let mut r = Router::new("r", Balance::LeastConn);
        let servers = [replica(0, true), replica(1, true), replica(2, true)];
        let load = |i| Load {
            sessions: [5, 2, 2][i],
            maxconn: None,
        };
        assert_eq!(
            picks(&mut r, &servers, &load, 10),
            HashMap::from([(1, 5), (2, 5)])
        );
        let capped = |i| Load {
            sessions: [5, 2, 4][i],
            maxconn: Some([10, 2, 10][i]),
        };
        assert_eq!(r.pick(&servers, &capped, &[]), Some(2), "1 is full");
        assert_eq!(r.pick(&servers, &capped, &[2]), Some(0));
        assert_eq!(
            r.pick(&servers, &capped, &[0, 2]),
            Some(1),
            "only a full one left: queue"
        );
    }

    fn with(mut s: ServerView, admin: AdminState) -> ServerView {
        s.admin = admin;
        s
    }

    #[test]
    fn drain_and_maint_take_no_new_sessions_in_any_balance() {
        for balance in [Balance::RoundRobin, Balance::LeastConn] {
            let mut r = Router::new("r", balance);
            let servers = [
                with(replica(0, true), AdminState::Drain),
                replica(1, true),
                with(replica(2, true), AdminState::Maint),
            ];
            assert_eq!(
                picks(&mut r, &servers, &idle, 20),
                HashMap::from([(1, 20)]),
                "{balance:?}"
            );
            let all_out = [
                with(replica(0, true), AdminState::Drain),
                with(replica(1, true), AdminState::Maint),
            ];
            assert_eq!(r.pick(&all_out, &idle, &[]), None, "{balance:?}: queue");
            // READY again: back in the rotation.
            let back = [replica(0, true), replica(1, true)];
            assert_eq!(
                picks(&mut r, &back, &idle, 20),
                HashMap::from([(0, 10), (1, 10)])
            );
        }
    }

    #[test]
    fn first_with_the_primary_drained_or_in_maint_queues_writes() {
        let mut r = Router::new("w", Balance::First);
        // The replicas of a /primary listener are DOWN: nobody takes writes, clients queue.
        for admin in [AdminState::Drain, AdminState::Maint] {
            let servers = [with(primary(0, 3), admin), replica(1, false)];
            assert_eq!(r.pick(&servers, &idle, &[]), None, "{admin:?}");
        }
        // A drained primary is still the known leader: even a replica wrongly UP gets no
        // writes. MAINT is DOWN for routing, exactly as a primary whose checks fail.
        let servers = [with(primary(0, 3), AdminState::Drain), replica(1, true)];
        assert_eq!(r.pick(&servers, &idle, &[]), None);
        let servers = [with(primary(0, 3), AdminState::Maint), replica(1, true)];
        let down = [
            srv(0, false, Some(Role::Primary), Some(3)),
            replica(1, true),
        ];
        assert_eq!(r.pick(&servers, &idle, &[]), r.pick(&down, &idle, &[]));
        assert_eq!(
            r.pick(&[primary(0, 3), replica(1, true)], &idle, &[]),
            Some(0)
        );
        // Without role information: the next UP server in file order, as HAProxy's `first`.
        let no_roles = [
            with(srv(0, true, None, None), AdminState::Maint),
            srv(1, true, None, None),
        ];
        assert_eq!(r.pick(&no_roles, &idle, &[]), Some(1));
    }

    #[test]
    fn a_drained_newer_primary_is_not_replaced_by_an_older_timeline() {
        let mut r = Router::new("w", Balance::First);
        let servers = [primary(0, 4), with(primary(1, 5), AdminState::Drain)];
        assert_eq!(r.pick(&servers, &idle, &[]), None);
        assert_eq!(r.split_brain_episodes(), 1, "still two leaders");
        // In MAINT it is DOWN for routing: the remaining primary takes writes.
        let servers = [primary(0, 4), with(primary(1, 5), AdminState::Maint)];
        assert_eq!(r.pick(&servers, &idle, &[]), Some(0));
    }

    #[test]
    fn exclude_and_no_up_server() {
        let mut r = Router::new("r", Balance::RoundRobin);
        let servers = [replica(0, true), replica(1, true), replica(2, false)];
        for _ in 0..5 {
            assert_eq!(r.pick(&servers, &idle, &[0]), Some(1));
        }
        assert_eq!(r.pick(&servers, &idle, &[0, 1]), None);
        let none_up = [replica(0, false), replica(1, false)];
        for balance in [Balance::First, Balance::RoundRobin, Balance::LeastConn] {
            assert_eq!(Router::new("x", balance).pick(&none_up, &idle, &[]), None);
        }
    }
}
