//! The servers as routing, the data path and the stats see them: the checker's snapshot with
//! the operator's states folded in.
//!
//! The checker publishes what the checks say ([`HealthSnapshot`]) and knows nothing of the
//! operator; the operator's READY/DRAIN/MAINT states live in [`crate::operator_state`]. The
//! proxy folds the two into one [`View`] whenever either changes, applies it to the data path
//! and then publishes it, so routing, the data path and the stats agree on every server.
use crate::{
    operator_state::{AdminState, AdminStates},
    patroni::{BackendKey, HealthSnapshot, ServerHealth, dcs::DcsStatus, health::Transition},
};

/// Every backend at one moment, laid out like the checker's snapshot (listener, then server).
#[derive(Clone, Debug)]
pub struct View {
    pub listeners: Vec<ListenerView>,
    /// The DCS watch's state, as the checker last published it; `None` without `[dcs]`.
    pub dcs: Option<DcsStatus>,
}

#[derive(Clone, Debug)]
pub struct ListenerView {
    pub name: String,
    /// Servers in file order; `servers[i].key.server == i`.
    pub servers: Vec<ServerView>,
}

/// One backend: what its checks say and what the operator set it to.
#[derive(Clone, Debug)]
pub struct ServerView {
    pub key: BackendKey,
    /// The BackendId of the BPF maps.
    pub id: u32,
    pub name: String,
    pub health: ServerHealth,
    pub admin: AdminState,
}

impl ServerView {
    /// UP by its checks and not in maintenance: MAINT counts as DOWN for routing, the mark-down
    /// of sessions and the fence.
    pub fn is_up(&self) -> bool {
        self.health.is_up() && self.admin != AdminState::Maint
    }

    /// Whether load balancing may send it a new session: UP and not draining.
    pub fn takes_new_sessions(&self) -> bool {
        self.is_up() && self.admin == AdminState::Ready
    }
}

impl View {
    /// The checker's `health` with each server's state from `admin`.
    pub fn fold(health: &HealthSnapshot, admin: &AdminStates) -> Self {
        let listeners = health
            .listeners
            .iter()
            .map(|l| ListenerView {
                name: l.name.clone(),
                servers: l
                    .servers
                    .iter()
                    .map(|s| ServerView {
                        key: s.key,
                        id: s.id,
                        name: s.name.clone(),
                        health: s.health.clone(),
                        admin: admin.get(s.key),
                    })
                    .collect(),
            })
            .collect();
        Self {
            listeners,
            dcs: health.dcs.clone(),
        }
    }

    pub fn listener(&self, index: usize) -> &[ServerView] {
        self.listeners.get(index).map_or(&[], |l| &l.servers)
    }

    pub fn server(&self, key: BackendKey) -> Option<&ServerView> {
        self.listener(key.listener).get(key.server)
    }

    /// UP/DOWN crossings between `prev` and `self`, for a reader that may have skipped views:
    /// a server that went down and came back up in between reports both, so the data path
    /// still shuts down the sessions it had before the mark-down. Entering MAINT is going
    /// down, leaving it going up (if the checks say UP).
    pub fn changes_since(&self, prev: &View) -> Vec<(BackendKey, Transition)> {
        let mut out = Vec::new();
        for s in self.listeners.iter().flat_map(|l| &l.servers) {
            let Some(p) = prev.server(s.key) else {
                continue;
            };
            let went_down =
                s.health.down_transitions > p.health.down_transitions || (p.is_up() && !s.is_up());
            if went_down {
                out.push((s.key, Transition::WentDown));
            }
            if s.is_up() && (went_down || !p.is_up()) {
                out.push((s.key, Transition::WentUp));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Duration};

    use tokio::time::Instant;

    use super::*;
    use crate::{
        config::Config,
        operator_state::{AdminWriter, tests::two_listeners},
        patroni::{CheckOutcome, CheckStatus, test_config::*},
    };

    const K00: BackendKey = BackendKey {
        listener: 0,
        server: 0,
    };

    /// One checked server that goes UP after one good check.
    fn one_checked_server() -> Config {
        let servers = vec![server(
            "pg1",
            "127.0.0.1:8008".parse().unwrap(),
            timing(100, 30, 30, 1, 1),
        )];
        config(
            vec![listener("w", Some(check("/primary", true)), servers)],
            None,
        )
    }

    fn outcome(status: CheckStatus) -> CheckOutcome {
        CheckOutcome {
            status,
            code: Some(200),
            duration: Duration::ZERO,
            role: None,
            state: None,
            timeline: None,
            detail: None,
            from_patroni: true,
        }
    }

    #[test]
    fn fold_sets_each_servers_state_and_keeps_the_checks() {
        let config = two_listeners();
        let health = HealthSnapshot::initial(&config, Instant::now());
        let admin = AdminWriter::new(config.clone());
        admin.set("w", "b", AdminState::Drain, "test").unwrap();
        let view = View::fold(&health, &admin.subscribe().borrow());
        let states: Vec<AdminState> = view
            .listeners
            .iter()
            .flat_map(|l| l.servers.iter().map(|s| s.admin))
            .collect();
        assert_eq!(
            states,
            [AdminState::Ready, AdminState::Drain, AdminState::Ready]
        );
        for (v, h) in view.listeners.iter().zip(&health.listeners) {
            for (vs, hs) in v.servers.iter().zip(&h.servers) {
                assert_eq!(vs.health, hs.health);
            }
        }
    }

    #[test]
    fn changes_since_reports_skipped_flaps() {
        let cfg = one_checked_server();
        let ready = AdminStates::ready(&cfg);
        let now = Instant::now();
        let mut health = HealthSnapshot::initial(&cfg, now);
        let prev = View::fold(&health, &ready);
        let ok = outcome(CheckStatus::L7Ok);
        health.listeners[0].servers[0].health.record(&ok, now);
        let cur = View::fold(&health, &ready);
        assert_eq!(cur.changes_since(&prev), [(K00, Transition::WentUp)]);
        let up = cur;
        let h = &mut health.listeners[0].servers[0].health;
        h.record(&outcome(CheckStatus::L7Sts), now);
        h.record(&ok, now);
        let cur = View::fold(&health, &ready);
        // DOWN and back UP between two views: both are reported.
        assert_eq!(
            cur.changes_since(&up),
            [(K00, Transition::WentDown), (K00, Transition::WentUp)]
        );
        assert!(cur.changes_since(&cur).is_empty());
    }

    #[test]
    fn maint_goes_down_and_ready_comes_back_up_while_drain_stays_up() {
        let cfg = Arc::new(one_checked_server());
        let now = Instant::now();
        let mut health = HealthSnapshot::initial(&cfg, now);
        health.listeners[0].servers[0]
            .health
            .record(&outcome(CheckStatus::L7Ok), now);
        let admin = AdminWriter::new(cfg.clone());
        let view = || View::fold(&health, &admin.subscribe().borrow());
        let up = view();
        admin.set("w", "pg1", AdminState::Drain, "test").unwrap();
        let drained = view();
        assert!(drained.changes_since(&up).is_empty());
        assert!(drained.listener(0)[0].is_up() && !drained.listener(0)[0].takes_new_sessions());
        admin.set("w", "pg1", AdminState::Maint, "test").unwrap();
        let maint = view();
        assert_eq!(maint.changes_since(&drained), [(K00, Transition::WentDown)]);
        assert!(!maint.listener(0)[0].is_up());
        admin.set("w", "pg1", AdminState::Ready, "test").unwrap();
        assert_eq!(view().changes_since(&maint), [(K00, Transition::WentUp)]);
    }
}
