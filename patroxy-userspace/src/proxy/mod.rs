//! Accepting clients, choosing and connecting a backend under HAProxy's limits, and handing the
//! established pair to the data path; CancelRequests are passed on apart (`cancel`).
mod cancel;
mod cancel_limit;
mod choose;
pub mod counters;
mod foreign_writes;
mod handover;
mod listener;
mod log_limit;
mod mark_down;
mod reconfigure;
mod refusal;
mod registry;
mod retire;
mod session;
mod slots;
mod stats_source;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, OnceLock, RwLock},
    time::Duration,
};

pub use handover::{AdoptError, CarriedCounters, HandedSession};
pub use listener::bind;
/// For the `first_bytes` fuzz target (fuzz/), which feeds a refused client's first bytes to it.
#[cfg(fuzzing)]
pub use refusal::refuse;
pub use registry::SessionRegistry;
pub use stats_source::StatsSource;
use tokio::{
    net::TcpListener,
    sync::{Semaphore, mpsc, watch},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    config::Config,
    dataplane::{BackendTable, DataPlane, KillReason},
    fdstore::FdStore,
    operator_state::AdminStates,
    patroni::HealthSnapshot,
    routing::Router,
    server_ids::ServerIds,
    view::View,
};
use cancel::RecentServers;
use cancel_limit::CancelLimit;
use counters::{BackendCounters, ListenerCounters};
use log_limit::LogLimit;
use slots::ServerSlots;

/// Everything a session task needs, shared by all listeners.
pub struct Proxy {
    /// The running configuration; a reload swaps it ([`Proxy::reconfigure`]). A session reads
    /// it once when it starts and keeps those timeouts.
    config: RwLock<Arc<Config>>,
    /// The servers' backend ids; the listeners and servers stay while this process runs (a
    /// structural reload starts a successor), so they do too.
    ids: ServerIds,
    dataplane: Arc<DataPlane>,
    backends: Arc<BackendTable>,
    sessions: SessionRegistry,
    /// The checker's snapshot with the operator's admin states folded in, once applied to the
    /// data path (BACKENDS written, fences lifted or set): routing and stats read this, never
    /// the checker's raw output, so no session is spliced to a server whose fence is still up.
    view: watch::Receiver<Arc<View>>,
    applied: watch::Sender<Arc<View>>,
    /// The checker's raw output, read only by `follow_health`.
    checks: watch::Receiver<Arc<HealthSnapshot>>,
    /// The operator's READY/DRAIN/MAINT states (set through the stats server's admin
    /// endpoint), as `follow_health` last folded them in.
    admin_states: watch::Receiver<Arc<AdminStates>>,
    /// Per listener: its round-robin cursor and current write target.
    routers: Vec<Mutex<Router>>,
    /// Per backend (index = the id's position in `ids`) and per listener, for the stats.
    backend_counters: Vec<BackendCounters>,
    listener_counters: Vec<ListenerCounters>,
    /// Global maxconn: the accept loop takes a permit before accepting.
    global: Arc<Semaphore>,
    /// Per-backend maxconn (index = the id's position in `ids`).
    slots: Vec<ServerSlots>,
    /// The rate limit of the lines logged per client (session ends, refusals).
    log_limit: LogLimit,
    /// The same rate, separately, for the debug lines per client (when debug is on).
    debug_log_limit: LogLimit,
    /// The rate limits of CancelRequests, per client address and in total.
    cancel_limit: CancelLimit,
    /// Per listener: the servers its last sessions went to, for cancels after a failover.
    recent_servers: Vec<RecentServers>,
    /// Where handed-over sessions go once an upgrade started (`hand_over_sessions`).
    successor: Mutex<Option<mpsc::UnboundedSender<HandedSession>>>,
    /// systemd's fd store, which keeps spliced sessions' sockets across a crash.
    fd_store: OnceLock<FdStore>,
}

impl Proxy {
    /// `checks` is the checker's output, `admin_states` the operator's states
    /// ([`AdminWriter::subscribe`](crate::operator_state::AdminWriter::subscribe)).
    pub fn new(
        config: Arc<Config>,
        ids: ServerIds,
        dataplane: Arc<DataPlane>,
        backends: Arc<BackendTable>,
        checks: watch::Receiver<Arc<HealthSnapshot>>,
        admin_states: watch::Receiver<Arc<AdminStates>>,
    ) -> Arc<Self> {
        let initial = Arc::new(View::fold(&checks.borrow(), &admin_states.borrow()));
        let (applied, view) = watch::channel(initial);
        let slots = config
            .listeners
            .iter()
            .flat_map(|l| l.servers.iter())
            .map(|s| ServerSlots::new(s.maxconn))
            .collect();
        let routers = config
            .listeners
            .iter()
            .map(|l| Mutex::new(Router::new(&l.name, l.balance)))
            .collect();
        let backend_counters = (0..config.listeners.iter().map(|l| l.servers.len()).sum())
            .map(|_| BackendCounters::default())
            .collect();
        let listener_counters = config
            .listeners
            .iter()
            .map(|_| ListenerCounters::default())
            .collect();
        let proxy = Arc::new(Self {
            view,
            applied,
            checks,
            admin_states,
            routers,
            backend_counters,
            listener_counters,
            global: Arc::new(Semaphore::new(config.global.maxconn as usize)),
            log_limit: LogLimit::new("session log lines", config.global.session_log_rate),
            debug_log_limit: LogLimit::new("debug lines", config.global.session_log_rate),
            cancel_limit: CancelLimit::new(
                config.global.cancel_rate,
                config.global.cancel_rate_per_client,
            ),
            recent_servers: config
                .listeners
                .iter()
                .map(|_| RecentServers::default())
                .collect(),
            config: RwLock::new(config),
            ids,
            dataplane,
            backends,
            sessions: SessionRegistry::default(),
            slots,
            successor: Mutex::new(None),
            fd_store: OnceLock::new(),
        });
        // BACKENDS starts as what routing sees first: one writer, `write_states`.
        let initial = proxy.view.borrow().clone();
        proxy.write_states(&initial);
        proxy
    }

    /// Accepts on every listener until `stop` is cancelled; session tasks go to `tracker`.
    pub fn serve(
        self: &Arc<Self>,
        listeners: Vec<TcpListener>,
        stop: CancellationToken,
        tracker: &TaskTracker,
    ) {
        tracker.spawn(
            self.clone()
                .accept_loop(listeners, stop.clone(), tracker.clone()),
        );
        tracker.spawn(self.clone().undo_foreign_writes(stop.clone()));
        let proxy = self.clone();
        let debug_stop = stop.clone();
        tracker.spawn(async move { proxy.log_limit.report(stop).await });
        let proxy = self.clone();
        tracker.spawn(async move { proxy.debug_log_limit.report(debug_stop).await });
    }

    /// Waits up to `grace` for open sessions to end, then resets the rest.
    pub async fn drain(&self, tracker: &TaskTracker, grace: Duration) {
        tracker.close();
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            let n = self.sessions.kill_all(KillReason::Shutdown);
            tracing::warn!(
                sessions = n,
                "drain grace time over; resetting the remaining sessions"
            );
            tracker.wait().await;
        }
    }

    /// The running configuration.
    pub fn config(&self) -> Arc<Config> {
        self.config.read().expect("config lock").clone()
    }

    /// The backend id (BPF map key) of server `server` of listener `listener`.
    /// Whether one debug line per client may be written now: debug is on and its own budget
    /// (`debug_log_limit`) has a token. At info, no token is spent.
    fn debug_line_allowed(&self) -> bool {
        tracing::enabled!(tracing::Level::DEBUG) && self.debug_log_limit.allow()
    }

    fn backend_id(&self, listener: usize, server: usize) -> u32 {
        self.ids
            .id(crate::patroni::BackendKey { listener, server })
            .expect("listener and server indexes come from the config")
    }

    /// Resets every session of backend `id` for `reason` and counts them as the mark-down
    /// resets the stats show; returns how many.
    fn reset_backend(&self, id: u32, reason: KillReason) -> usize {
        let n = self.sessions.kill_backend(id, reason);
        self.counters(id)
            .markdown_resets
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        n
    }

    /// The servers' backend ids.
    pub fn server_ids(&self) -> &ServerIds {
        &self.ids
    }

    fn position(&self, backend_id: u32) -> usize {
        self.ids
            .position(backend_id)
            .expect("backend ids come from the id table")
    }

    fn counters(&self, backend_id: u32) -> &BackendCounters {
        &self.backend_counters[self.position(backend_id)]
    }

    fn slots(&self, backend_id: u32) -> &ServerSlots {
        &self.slots[self.position(backend_id)]
    }

    pub fn listen_addresses(&self) -> Vec<SocketAddr> {
        self.config().listeners.iter().map(|l| l.bind).collect()
    }
}
