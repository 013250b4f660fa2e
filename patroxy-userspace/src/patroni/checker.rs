//! The check tasks: run checks on HAProxy's schedule and publish server states as snapshots.
//!
//! One task per distinct check (node address, method, path, TLS, expected status): listeners that
//! check the same path on the same node share it, and a task starts the next check only after
//! the previous one ended, so Patroni's small request queue never sees two checks of one path at
//! once. Each result feeds the hysteresis of every backend that subscribes to it; then a new
//! immutable [`HealthSnapshot`] is published. Readers hold an `Arc` and never lock.
use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{sync::watch, time::Instant};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, info, warn};

use super::{
    BackendKey,
    client::{CheckClient, CheckOutcome, CheckTimeouts, ClientError, Role},
    dcs::{DcsStatus, LeaderGate},
    health::{ServerHealth, Transition},
    keys,
};
use crate::{
    config::model::{
        CheckMethod, CheckTiming, CheckTls, Config, HealthCheck, InitState, ServerSpec,
    },
    server_ids::ServerIds,
};

/// The state of every backend at one moment. Published whole on every check result.
#[derive(Clone, Debug)]
pub struct HealthSnapshot {
    /// Bumped on every publish, so readers can tell snapshots apart cheaply.
    pub generation: u64,
    pub listeners: Vec<ListenerSnapshot>,
    /// The DCS watch's state; `None` without `[dcs]`.
    pub dcs: Option<DcsStatus>,
}

#[derive(Clone, Debug)]
pub struct ListenerSnapshot {
    pub name: String,
    /// Servers in file order; `servers[i].key.server == i`.
    pub servers: Vec<ServerSnapshot>,
}

#[derive(Clone, Debug)]
pub struct ServerSnapshot {
    pub key: BackendKey,
    /// The BackendId of the BPF maps.
    pub id: u32,
    pub name: String,
    pub health: ServerHealth,
}

impl ServerSnapshot {
    /// UP by its checks.
    pub fn is_up(&self) -> bool {
        self.health.is_up()
    }
}

impl HealthSnapshot {
    /// Every server in its configured initial state (checked servers per `init_state`,
    /// unchecked ones "no check" and UP).
    pub fn initial(config: &Config, now: Instant) -> Self {
        Self::carried_over(config, &ServerIds::fresh(config), &[], now)
    }

    /// Like [`initial`](Self::initial), but a server a predecessor process checked (an
    /// upgrade) starts where it was: UP or DOWN, with its role and timeline, so routing and
    /// fences do not wait for `rise` checks.
    pub fn carried_over(
        config: &Config,
        ids: &ServerIds,
        carried: &[CarriedHealth],
        now: Instant,
    ) -> Self {
        let mut listeners: Vec<ListenerSnapshot> = config
            .listeners
            .iter()
            .map(|l| ListenerSnapshot {
                name: l.name.clone(),
                servers: Vec::with_capacity(l.servers.len()),
            })
            .collect();
        for (key, id) in ids.backends() {
            let l = &config.listeners[key.listener];
            let spec = &l.servers[key.server];
            // A state that answered another question (a reload changed the check) is not kept.
            let previous = carried.iter().find(|c| {
                c.listener == l.name
                    && c.server == spec.name
                    && c.check.as_ref().is_none_or(|q| {
                        l.check.as_ref().map(|check| question(check, spec)).as_ref() == Some(q)
                    })
            });
            let health = match (&l.check, previous) {
                (Some(c), Some(p)) => {
                    let init = if p.up { InitState::Up } else { InitState::Down };
                    let mut h = ServerHealth::new(&spec.timing, init, c.authoritative, now);
                    h.role = p.role.as_deref().map(Role::parse);
                    h.timeline = p.timeline;
                    h
                }
                (Some(c), None) => {
                    ServerHealth::new(&spec.timing, spec.init_state, c.authoritative, now)
                }
                (None, _) => ServerHealth::no_check(now),
            };
            listeners[key.listener].servers.push(ServerSnapshot {
                key,
                id,
                name: spec.name.clone(),
                health,
            });
        }
        HealthSnapshot {
            generation: 0,
            listeners,
            dcs: config.dcs.as_ref().map(|d| DcsStatus {
                endpoints: d.etcd.clone(),
                ..DcsStatus::default()
            }),
        }
    }

    pub fn listener(&self, index: usize) -> &[ServerSnapshot] {
        self.listeners.get(index).map_or(&[], |l| &l.servers)
    }

    pub fn server(&self, key: BackendKey) -> Option<&ServerSnapshot> {
        self.listener(key.listener).get(key.server)
    }

    /// True while a server of the listener is between UP and DOWN, or while none of its
    /// checked servers is UP (clients wait in the queue for the new primary Patroni is about to
    /// promote): then the whole listener is checked at `fastinter`, so the server clients are
    /// waiting for is found within one fast interval instead of `downinter`.
    fn listener_changing(&self, listener: usize) -> bool {
        let servers = self.listener(listener);
        servers.iter().any(|s| !s.health.is_stable()) || servers.iter().all(|s| !s.health.is_up())
    }
}

/// A server's check state as a predecessor process saw it, by name (see
/// [`HealthSnapshot::carried_over`]).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CarriedHealth {
    pub listener: String,
    pub server: String,
    pub up: bool,
    /// As Patroni said it ("primary", "replica", ...).
    pub role: Option<String>,
    pub timeline: Option<u64>,
    /// The question the state answers (check address, method, path, expected status, TLS);
    /// absent from older predecessors and the fd store's states.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<String>,
}

/// What a server's check asks, as [`CarriedHealth::check`] records it.
fn question(check: &HealthCheck, spec: &ServerSpec) -> String {
    format!(
        "{} {:?} {} {} {:?}",
        spec.check_addr, check.method, check.path, check.expect_status, check.tls
    )
}

impl HealthSnapshot {
    /// What a successor needs to start where this snapshot (of `config`) is.
    pub fn carry(&self, config: &Config) -> Vec<CarriedHealth> {
        self.listeners
            .iter()
            .enumerate()
            .flat_map(|(li, l)| {
                l.servers.iter().map(move |s| CarriedHealth {
                    check: config.listeners.get(li).and_then(|lc| {
                        Some(question(lc.check.as_ref()?, lc.servers.get(s.key.server)?))
                    }),
                    listener: l.name.clone(),
                    server: s.name.clone(),
                    up: s.health.is_up(),
                    role: s.health.role.as_ref().map(|r| match r {
                        Role::Primary => "primary".to_owned(),
                        Role::Replica => "replica".to_owned(),
                        Role::StandbyLeader => "standby_leader".to_owned(),
                        Role::Other(o) => o.clone(),
                    }),
                    timeline: s.health.timeline,
                })
            })
            .collect()
    }
}

/// One shared check and the backends it feeds.
struct Job {
    client: CheckClient,
    subscribers: Vec<BackendKey>,
    /// Delay before the first check, so that checks of many servers do not fire together.
    offset: Duration,
}

struct Shared {
    /// The working copy; cloned into an `Arc` for every publish.
    state: Mutex<HealthSnapshot>,
    /// Per listener, per server; a reload replaces them (locked after `state` when both are).
    timings: Mutex<Vec<Vec<CheckTiming>>>,
    /// What the DCS watch may decide (locked after `state` and `timings`).
    gate: Mutex<LeaderGate>,
    tx: watch::Sender<Arc<HealthSnapshot>>,
}

/// The running checker: its snapshots, and a reload's new check settings.
pub struct Checker {
    shared: Arc<Shared>,
    /// Stops the current check tasks; a reload cancels it and starts new ones.
    jobs: Mutex<CancellationToken>,
    /// The daemon's stop, whose child every generation of check tasks is.
    stop: CancellationToken,
    tracker: TaskTracker,
}

/// Starts one task per distinct check on `tracker`; they stop when `cancel` fires. The checker's
/// receiver holds the initial snapshot at once and a new one after every check result.
pub fn spawn_checker(
    config: &Config,
    cancel: CancellationToken,
    tracker: &TaskTracker,
) -> Result<Checker, ClientError> {
    spawn_checker_from(config, &ServerIds::fresh(config), &[], cancel, tracker)
}

/// [`spawn_checker`] with the servers' `ids`, starting from the states a predecessor `carried`
/// over.
pub fn spawn_checker_from(
    config: &Config,
    ids: &ServerIds,
    carried: &[CarriedHealth],
    cancel: CancellationToken,
    tracker: &TaskTracker,
) -> Result<Checker, ClientError> {
    let initial = HealthSnapshot::carried_over(config, ids, carried, Instant::now());
    let (tx, _) = watch::channel(Arc::new(initial.clone()));
    let checker = Checker {
        shared: Arc::new(Shared {
            state: Mutex::new(initial),
            timings: Mutex::new(timings(config)),
            gate: Mutex::new(LeaderGate::new(config)),
            tx,
        }),
        jobs: Mutex::new(cancel.child_token()),
        stop: cancel,
        tracker: tracker.clone(),
    };
    let jobs = jobs(config)?;
    checker.spawn(jobs, checker.jobs.lock().unwrap().clone());
    Ok(checker)
}

impl Checker {
    /// A receiver that holds the current snapshot at once and sees every new one.
    pub fn subscribe(&self) -> watch::Receiver<Arc<HealthSnapshot>> {
        self.shared.tx.subscribe()
    }

    /// Takes a reloaded `config` of the same listeners and servers as `running` (see
    /// `config::diff`), and restarts the checks on its settings. A server whose check asks the
    /// same question (same check address, method, path, expected status and TLS) keeps its
    /// check state, retuned to the new `rise`/`fall`; one whose check changed starts over per
    /// `init_state`, since its state answered another question; one whose listener lost its
    /// check becomes "no check".
    pub fn reconfigure(&self, running: &Config, config: &Config) -> Result<(), ClientError> {
        let jobs = jobs(config)?;
        let cancel = self.stop.child_token();
        std::mem::replace(&mut *self.jobs.lock().unwrap(), cancel.clone()).cancel();
        self.shared.retune(running, config, Instant::now());
        self.spawn(jobs, cancel);
        Ok(())
    }

    /// What the DCS watch reports to: its leader changes and its state.
    pub fn leader_events(&self) -> LeaderEvents {
        LeaderEvents {
            shared: self.shared.clone(),
        }
    }

    fn spawn(&self, jobs: Vec<Job>, cancel: CancellationToken) {
        for job in jobs {
            let (shared, cancel) = (self.shared.clone(), cancel.clone());
            self.tracker.spawn(async move {
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = run(job, &shared) => {}
                }
            });
        }
    }
}

fn timings(config: &Config) -> Vec<Vec<CheckTiming>> {
    config
        .listeners
        .iter()
        .map(|l| l.servers.iter().map(|s| s.timing).collect())
        .collect()
}

type JobKey = (
    std::net::SocketAddr,
    CheckMethod,
    String,
    Option<CheckTls>,
    u16,
);

/// Groups the checked backends by distinct check.
fn jobs(config: &Config) -> Result<Vec<Job>, ClientError> {
    let mut groups: Vec<(JobKey, Vec<BackendKey>, Duration)> = Vec::new();
    for key in keys(config) {
        let l = &config.listeners[key.listener];
        let Some(check) = &l.check else { continue };
        let spec = &l.servers[key.server];
        let jk = (
            spec.check_addr,
            check.method,
            check.path.clone(),
            check.tls.clone(),
            check.expect_status,
        );
        match groups.iter_mut().find(|g| g.0 == jk) {
            Some(g) => {
                g.1.push(key);
                g.2 = g.2.min(spec.timing.inter);
            }
            None => groups.push((jk, vec![key], spec.timing.inter)),
        }
    }
    let n = groups.len() as u32;
    let d = &config.defaults;
    groups
        .into_iter()
        .enumerate()
        .map(|(i, (jk, subscribers, inter))| {
            let first = subscribers[0];
            let check = config.listeners[first.listener]
                .check
                .as_ref()
                .expect("checked");
            let timeouts = CheckTimeouts::new(inter, d.timeout_connect, d.timeout_check);
            Ok(Job {
                client: CheckClient::new(jk.0, check, timeouts)?,
                subscribers,
                // Evenly spread over one interval: deterministic, and no two start together.
                offset: inter * i as u32 / n.max(1),
            })
        })
        .collect()
}

async fn run(job: Job, shared: &Shared) {
    let mut changes = shared.tx.subscribe();
    // The first check waits for its offset, unless a leader change starts a burst meanwhile
    // (a new leader's first check must not wait up to an interval for its turn).
    let first = Instant::now() + job.offset;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(first) => break,
            r = changes.changed() => match r {
                Err(_) => return,
                Ok(()) if shared.in_burst(&job.subscribers) => break,
                Ok(()) => {}
            },
        }
    }
    loop {
        let outcome = job.client.check().await;
        let ended = Instant::now();
        // Each check's answer, for a failover's timeline (which check saw the new leader when).
        debug!(
            "check {}: {}, code {:?}, role {:?}, timeline {:?}, {}ms",
            job.client.url(),
            outcome.status.description(),
            outcome.code,
            outcome.role,
            outcome.timeline,
            outcome.duration.as_millis()
        );
        shared.apply(&job.subscribers, &outcome, ended);
        changes.borrow_and_update();
        // The next check comes `interval` after this one ended; any published change (a peer of
        // the listener starting to change state) may shorten it, so recompute on each.
        loop {
            let deadline = ended + shared.next_interval(&job.subscribers);
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => break,
                r = changes.changed() => if r.is_err() { return },
            }
        }
    }
}

impl Shared {
    fn apply(&self, subscribers: &[BackendKey], outcome: &CheckOutcome, at: Instant) {
        let mut state = self.state.lock().unwrap();
        let mut gate = self.gate.lock().unwrap();
        for &key in subscribers {
            let name = state.listeners[key.listener].name.clone();
            let server = &mut state.listeners[key.listener].servers[key.server];
            let before = server.health.server_state();
            let held = gate.holds_down(key.listener, &server.name)
                || gate.promoting(key.listener, outcome);
            let mut transition = if held {
                server.health.record_held_down(outcome, at)
            } else {
                server.health.record(outcome, at)
            };
            // The key holder's (or a newer timeline's) first check saying primary takes it UP;
            // when its checks held down while it promoted already made up `rise`, the same
            // check ends that by the hysteresis.
            let confirmed = !held && gate.confirms_up(key.listener, &server.name, outcome);
            if confirmed && transition.is_none() && !server.health.is_up() {
                transition = server.health.mark_up_now(at);
            }
            if confirmed && transition == Some(Transition::WentUp) {
                info!(
                    "Server {name}/{} passed its check as Patroni's leader or on a newer \
                     timeline (role {:?}, timeline {:?}): UP without waiting for rise",
                    server.name, outcome.role, outcome.timeline
                );
            }
            let after = server.health.server_state();
            let server_name = server.name.clone();
            if before != after {
                let up = state
                    .listener(key.listener)
                    .iter()
                    .filter(|s| s.is_up())
                    .count();
                log_change(
                    &name,
                    &server_name,
                    transition,
                    &after.to_string(),
                    outcome,
                    up,
                );
            }
        }
        gate.observe(&state);
        state.generation += 1;
        self.tx.send_replace(Arc::new(state.clone()));
    }

    /// Retunes every server's hysteresis from `running` to `config` (same layout) and
    /// publishes the result.
    fn retune(&self, running: &Config, config: &Config, now: Instant) {
        let mut state = self.state.lock().unwrap();
        for key in keys(config) {
            let l = &config.listeners[key.listener];
            let spec = &l.servers[key.server];
            let was = &running.listeners[key.listener];
            let same_question =
                was.check == l.check && was.servers[key.server].check_addr == spec.check_addr;
            let Some(server) = state
                .listeners
                .get_mut(key.listener)
                .and_then(|sl| sl.servers.get_mut(key.server))
            else {
                continue;
            };
            let health = &mut server.health;
            match (&l.check, health.is_checked()) {
                (Some(c), true) if same_question => health.retune(&spec.timing, c.authoritative),
                (Some(c), _) => {
                    *health = ServerHealth::new(&spec.timing, spec.init_state, c.authoritative, now)
                }
                (None, true) => *health = ServerHealth::no_check(now),
                (None, false) => {}
            }
        }
        *self.timings.lock().unwrap() = timings(config);
        self.gate.lock().unwrap().retune(config);
        state.generation += 1;
        self.tx.send_replace(Arc::new(state.clone()));
    }

    /// Whether a leader change has one of the listeners this check feeds in a fast burst.
    fn in_burst(&self, subscribers: &[BackendKey]) -> bool {
        let gate = self.gate.lock().unwrap();
        let now = Instant::now();
        subscribers
            .iter()
            .any(|k| gate.burst_interval(k.listener, now).is_some())
    }

    /// The shortest next interval among the backends a check feeds.
    fn next_interval(&self, subscribers: &[BackendKey]) -> Duration {
        let state = self.state.lock().unwrap();
        let timings = self.timings.lock().unwrap();
        let gate = self.gate.lock().unwrap();
        let now = Instant::now();
        subscribers
            .iter()
            .filter_map(|&k| Some((k, timings.get(k.listener)?.get(k.server)?)))
            .map(|(k, timing)| {
                let changing = state.listener_changing(k.listener);
                let interval = state.listeners[k.listener].servers[k.server]
                    .health
                    .next_interval(timing, changing);
                gate.burst_interval(k.listener, now)
                    .map_or(interval, |burst| interval.min(burst))
            })
            .min()
            .unwrap_or(Duration::from_secs(2))
    }
}

/// The checker as the DCS watch sees it: leader changes to act on, and the watch's state to
/// publish. Holds no check task; cloned into the watch's task.
#[derive(Clone)]
pub struct LeaderEvents {
    shared: Arc<Shared>,
}

impl LeaderEvents {
    /// The leader key left server `old` for server `new` (`None`: no leader, or a member no
    /// server is): `old`'s backends on the leader listeners go DOWN now, those listeners start
    /// a fast burst, and `new` is the key holder. `update` records the change in the watch's
    /// state; all is published at once.
    pub fn leader_moved(
        &self,
        old: Option<&str>,
        new: Option<&str>,
        update: impl FnOnce(&mut DcsStatus),
    ) {
        let now = Instant::now();
        let mut state = self.shared.state.lock().unwrap();
        let mut gate = self.shared.gate.lock().unwrap();
        gate.set_key_holder(new);
        let fenced = old.map_or_else(Vec::new, |name| gate.backends_of(&state, name));
        for key in fenced {
            let listener = state.listeners[key.listener].name.clone();
            let server = &mut state.listeners[key.listener].servers[key.server];
            if server.health.mark_down_now(now).is_some() {
                let up = state
                    .listener(key.listener)
                    .iter()
                    .filter(|s| s.is_up())
                    .count();
                warn!(
                    "Server {listener}/{} is DOWN, reason: its Patroni leader key moved. \
                     {up} active servers left.",
                    state.listeners[key.listener].servers[key.server].name
                );
            }
        }
        gate.start_burst(now);
        gate.observe(&state);
        if let Some(status) = state.dcs.as_mut() {
            update(status);
        }
        state.generation += 1;
        self.shared.tx.send_replace(Arc::new(state.clone()));
    }

    /// The leader key as a (re)connected watch first reads it: the key holder, nothing fenced;
    /// `None` when the watch lost etcd, which releases every server it held down.
    pub fn leader_read(&self, holder: Option<&str>, update: impl FnOnce(&mut DcsStatus)) {
        self.shared.gate.lock().unwrap().set_key_holder(holder);
        self.update_status(update);
    }

    /// Records a change of the watch's own state (connected, an error): never a server's.
    pub fn update_status(&self, update: impl FnOnce(&mut DcsStatus)) {
        let mut state = self.shared.state.lock().unwrap();
        let Some(status) = state.dcs.as_mut() else {
            return;
        };
        let before = status.clone();
        update(status);
        if *status != before {
            state.generation += 1;
            self.shared.tx.send_replace(Arc::new(state.clone()));
        }
    }
}

/// Logs like HAProxy: "Server postgres_write/pg-sv01 is DOWN, reason: Layer7 wrong status,
/// code: 503, check duration: 2ms. 0 active servers left."
fn log_change(
    listener: &str,
    server: &str,
    transition: Option<Transition>,
    shown: &str,
    o: &CheckOutcome,
    up_left: usize,
) {
    let code = o.code.map_or(String::new(), |c| format!(", code: {c}"));
    let detail = o
        .detail
        .as_ref()
        .map_or(String::new(), |d| format!(", info: \"{d}\""));
    let why = format!(
        "reason: {}{code}{detail}, check duration: {}ms",
        o.status.description(),
        o.duration.as_millis()
    );
    match transition {
        Some(Transition::WentDown) => {
            warn!("Server {listener}/{server} is DOWN, {why}. {up_left} active servers left.");
            if up_left == 0 {
                warn!("proxy {listener} has no server available!");
            }
        }
        Some(Transition::WentUp) => {
            info!("Server {listener}/{server} is UP, {why}. {up_left} active servers online.")
        }
        None if o.status.passed() => {
            info!("Health check for server {listener}/{server} succeeded, {why}, status: {shown}")
        }
        None => info!("Health check for server {listener}/{server} failed, {why}, status: {shown}"),
    }
}

#[cfg(test)]
#[path = "checker_tests.rs"]
mod tests;
