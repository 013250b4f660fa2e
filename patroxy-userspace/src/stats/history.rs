//! What the stats remember between requests: session rates, check-duration histograms, leader
//! changes, and a floor that keeps the byte counters monotonic.
//!
//! One background task (`run`) samples session totals every second and follows the proxy's
//! view; requests only read. Check durations are observed when a view shows a newer
//! `last_check` than the one before: a reader that skips a view (two checks between two
//! wake-ups) misses one observation, which a histogram of thousands of checks does not mind.
use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        family::{Family, MetricConstructor},
        histogram::{Histogram, exponential_buckets},
    },
};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::{
    proxy::StatsSource,
    view::{ListenerView, View},
};

/// Rates are averaged over this many one-second samples.
const RATE_WINDOW: usize = 10;

/// HAProxy exporter's label names: `proxy` (the listener) and `server`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServerLabels {
    pub proxy: String,
    pub server: String,
}

/// Buckets from 0.5 ms to ~8 s: a healthy Patroni answers in milliseconds, a frozen one at the
/// check timeout (seconds).
#[derive(Clone, Copy, Debug)]
pub struct CheckBuckets;

impl MetricConstructor<Histogram> for CheckBuckets {
    fn new_metric(&self) -> Histogram {
        Histogram::new(exponential_buckets(0.0005, 2.0, 15))
    }
}

pub type CheckDurations = Family<ServerLabels, Histogram, CheckBuckets>;

/// What the stats remember between requests (see the module doc): one per stats server.
pub struct StatsHistory {
    /// The backend ids, in the order of `rates` and `bytes_floor`.
    ids: Vec<u32>,
    rates: Mutex<Rates>,
    /// Seconds per health check, per server (patroxy_server_check_duration_seconds).
    pub check_durations: CheckDurations,
    /// Per listener: leader changes, and the last leader seen (index of the server).
    primary_changes: Vec<AtomicU64>,
    last_leader: Mutex<Vec<Option<usize>>>,
    /// Per backend: the highest (bin, bout) reported. A session's bytes move from SESSIONS to
    /// the closed-session counters in two steps; a request between them would see them in
    /// neither, and a Prometheus counter must never go down.
    bytes_floor: Mutex<Vec<(u64, u64)>>,
    /// Admin requests refused for a missing or wrong token (401).
    pub admin_unauthorized: AtomicU64,
}

impl StatsHistory {
    /// `ids` are the backends' ids (see [`crate::server_ids::ServerIds`]).
    pub fn new(ids: Vec<u32>, listeners: usize) -> Self {
        let backends = ids.len();
        Self {
            ids,
            rates: Mutex::new(Rates::new(backends + listeners)),
            check_durations: CheckDurations::new_with_constructor(CheckBuckets),
            primary_changes: (0..listeners).map(|_| AtomicU64::new(0)).collect(),
            last_leader: Mutex::new(vec![None; listeners]),
            bytes_floor: Mutex::new(vec![(0, 0); backends]),
            admin_unauthorized: AtomicU64::new(0),
        }
    }

    /// Samples every second and follows the proxy's view until `stop`.
    pub async fn run(self: Arc<Self>, source: Arc<dyn StatsSource>, stop: CancellationToken) {
        let mut view = source.view();
        let mut prev = view.borrow_and_update().clone();
        // Checks that completed before this task started are in the first view only.
        self.observe_health(None, &prev);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => self.sample(source.as_ref(), Instant::now()),
                changed = view.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let next = view.borrow_and_update().clone();
                    self.observe_health(Some(&prev), &next);
                    prev = next;
                }
            }
        }
    }

    fn sample(&self, source: &dyn StatsSource, now: Instant) {
        let totals = self
            .ids
            .iter()
            .map(|&id| source.backend_counters(id).total_sessions.load(Relaxed))
            .chain(
                (0..source.config().listeners.len())
                    .map(|l| source.listener_counters(l).accepted.load(Relaxed)),
            )
            .collect();
        self.rates.lock().expect("rates lock").record(now, totals);
    }

    /// (rate, rate_max) of backend `id`.
    pub fn backend_rate(&self, id: u32) -> (u64, u64) {
        match self.position(id) {
            Some(index) => self.rates.lock().expect("rates lock").get(index),
            None => (0, 0),
        }
    }

    fn position(&self, id: u32) -> Option<usize> {
        self.ids.iter().position(|&i| i == id)
    }

    /// (rate, rate_max) of listener `index`.
    pub fn listener_rate(&self, index: usize) -> (u64, u64) {
        self.rates
            .lock()
            .expect("rates lock")
            .get(self.ids.len() + index)
    }

    pub fn primary_changes(&self, listener: usize) -> u64 {
        self.primary_changes
            .get(listener)
            .map_or(0, |c| c.load(Relaxed))
    }

    /// `(bin, bout)` of backend `id`, never below what was reported before.
    pub fn monotonic_bytes(&self, id: u32, bin: u64, bout: u64) -> (u64, u64) {
        let mut floor = self.bytes_floor.lock().expect("floor lock");
        let Some(f) = self.position(id).and_then(|i| floor.get_mut(i)) else {
            return (bin, bout);
        };
        *f = (f.0.max(bin), f.1.max(bout));
        *f
    }

    /// Records the checks `next` shows that `prev` did not (all of them when there is no `prev`:
    /// the first view), and leader changes.
    pub fn observe_health(&self, prev: Option<&View>, next: &View) {
        let mut last_leader = self.last_leader.lock().expect("leader lock");
        for (li, l) in next.listeners.iter().enumerate() {
            for s in &l.servers {
                let Some(check) = &s.health.last_check else {
                    continue;
                };
                let before = prev
                    .and_then(|p| p.server(s.key))
                    .and_then(|p| p.health.last_check.as_ref());
                if before.is_none_or(|b| b.at != check.at) {
                    self.check_durations
                        .get_or_create(&ServerLabels {
                            proxy: l.name.clone(),
                            server: s.name.clone(),
                        })
                        .observe(check.duration.as_secs_f64());
                }
            }
            let Some(leader) = leader(l) else { continue };
            let Some(slot) = last_leader.get_mut(li) else {
                continue;
            };
            if slot.is_some_and(|old| old != leader) {
                self.primary_changes[li].fetch_add(1, Relaxed);
            }
            *slot = Some(leader);
        }
    }
}

/// The UP server that Patroni says leads the cluster. A gap without a leader (A fails, then B is
/// promoted) is one change, not two.
fn leader(l: &ListenerView) -> Option<usize> {
    l.servers.iter().position(|s| {
        s.health.is_checked() && s.is_up() && s.health.role.as_ref().is_some_and(|r| r.is_leader())
    })
}

/// Totals sampled once a second; rates are deltas over the window.
struct Rates {
    samples: VecDeque<(Instant, Vec<u64>)>,
    max: Vec<u64>,
}

impl Rates {
    fn new(n: usize) -> Self {
        Self {
            samples: VecDeque::with_capacity(RATE_WINDOW + 1),
            max: vec![0; n],
        }
    }

    fn record(&mut self, now: Instant, totals: Vec<u64>) {
        if let Some((at, last)) = self.samples.back() {
            let secs = now.saturating_duration_since(*at).as_secs_f64();
            if secs > 0.0 {
                for (i, (t, l)) in totals.iter().zip(last).enumerate() {
                    let r = (t.saturating_sub(*l) as f64 / secs).round() as u64;
                    self.max[i] = self.max[i].max(r);
                }
            }
        }
        self.samples.push_back((now, totals));
        while self.samples.len() > RATE_WINDOW + 1 {
            self.samples.pop_front();
        }
    }

    fn get(&self, i: usize) -> (u64, u64) {
        let max = self.max.get(i).copied().unwrap_or(0);
        let (Some((t0, first)), Some((t1, last))) = (self.samples.front(), self.samples.back())
        else {
            return (0, max);
        };
        let secs = t1.saturating_duration_since(*t0).as_secs_f64();
        if secs <= 0.0 {
            return (0, max);
        }
        let delta =
            (last.get(i).copied().unwrap_or(0)).saturating_sub(first.get(i).copied().unwrap_or(0));
        ((delta as f64 / secs).round() as u64, max)
    }
}

#[cfg(test)]
mod tests {
    use patroxy_common::BackendEntry;
    use tokio::sync::watch;

    use super::*;
    use crate::server_ids::ServerIds;
    use crate::{
        config::Config,
        operator_state::AdminStates,
        patroni::{CheckOutcome, CheckStatus, HealthSnapshot, test_config::*},
        proxy::counters::{BackendCounters, ListenerCounters},
    };

    #[test]
    fn rates_average_the_window_and_keep_the_peak() {
        let mut r = Rates::new(1);
        let t0 = Instant::now();
        assert_eq!(r.get(0), (0, 0));
        r.record(t0, vec![0]);
        r.record(t0 + Duration::from_secs(1), vec![10]);
        r.record(t0 + Duration::from_secs(2), vec![12]);
        assert_eq!(r.get(0), (6, 10));
        for s in 3..30 {
            r.record(t0 + Duration::from_secs(s), vec![12]);
        }
        assert_eq!(r.get(0), (0, 10), "old sessions leave the window");
    }

    /// The proxy as the history task reads it: a view with one server checked once, no traffic.
    struct CheckedOnce {
        ids: ServerIds,
        config: Arc<Config>,
        view: watch::Sender<Arc<View>>,
        backend: BackendCounters,
        listener: ListenerCounters,
    }

    impl CheckedOnce {
        fn new() -> Self {
            let config = config(
                vec![listener(
                    "w",
                    Some(check("/primary", true)),
                    vec![server(
                        "pg1",
                        "127.0.0.1:8008".parse().unwrap(),
                        timing(100, 30, 30, 1, 1),
                    )],
                )],
                None,
            );
            let now = Instant::now();
            let mut health = HealthSnapshot::initial(&config, now);
            let outcome = CheckOutcome {
                status: CheckStatus::L7Ok,
                code: Some(200),
                duration: Duration::from_millis(3),
                role: None,
                state: None,
                timeline: None,
                detail: None,
                from_patroni: true,
            };
            health.listeners[0].servers[0].health.record(&outcome, now);
            let view = View::fold(&health, &AdminStates::ready(&config));
            Self {
                ids: ServerIds::fresh(&config),
                config: Arc::new(config),
                view: watch::Sender::new(Arc::new(view)),
                backend: BackendCounters::default(),
                listener: ListenerCounters::default(),
            }
        }
    }

    impl StatsSource for CheckedOnce {
        fn config(&self) -> Arc<Config> {
            self.config.clone()
        }
        fn view(&self) -> watch::Receiver<Arc<View>> {
            self.view.subscribe()
        }
        fn server_ids(&self) -> &ServerIds {
            &self.ids
        }
        fn backend_counters(&self, _: u32) -> &BackendCounters {
            &self.backend
        }
        fn listener_counters(&self, _: usize) -> &ListenerCounters {
            &self.listener
        }
        fn backend_entry(&self, _: u32) -> BackendEntry {
            BackendEntry::default()
        }
        fn data_path(&self) -> &'static str {
            "fallback"
        }
        fn tc_counters(&self) -> Option<&crate::dataplane::tc::TcCounters> {
            None
        }
        fn pin_dir(&self) -> Option<&std::path::Path> {
            None
        }
    }

    fn checks_observed(history: &StatsHistory) -> u64 {
        let labels = ServerLabels {
            proxy: "w".into(),
            server: "pg1".into(),
        };
        history
            .check_durations
            .get(&labels)
            .map_or(0, |h| h.count())
    }

    #[tokio::test(start_paused = true)]
    async fn a_check_done_before_the_history_starts_is_observed() {
        let source = Arc::new(CheckedOnce::new());
        let history = Arc::new(StatsHistory::new(vec![1], 1));
        let stop = CancellationToken::new();
        stop.cancel();
        history.clone().run(source, stop).await;
        assert_eq!(checks_observed(&history), 1);
    }

    #[test]
    fn a_check_is_observed_once() {
        let source = CheckedOnce::new();
        let view = source.view.borrow().clone();
        let history = StatsHistory::new(vec![1], 1);
        history.observe_health(None, &view);
        history.observe_health(Some(&view), &view);
        assert_eq!(checks_observed(&history), 1);
    }

    #[test]
    fn bytes_never_go_down() {
        let t = StatsHistory::new(vec![1, 2], 1);
        assert_eq!(t.monotonic_bytes(1, 100, 50), (100, 50));
        assert_eq!(t.monotonic_bytes(1, 60, 70), (100, 70));
        assert_eq!(t.monotonic_bytes(2, 1, 1), (1, 1));
    }
}
