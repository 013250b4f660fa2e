//! Accepting clients, choosing and connecting a backend under HAProxy's limits, and handing the
//! established pair to the data path.
mod choose;
pub mod counters;
mod listener;
mod markdown;
mod refusal;
mod registry;
mod session;
mod slots;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

pub use listener::bind;
/// For the `first_bytes` fuzz target (fuzz/), which feeds a refused client's first bytes to it.
#[cfg(fuzzing)]
pub use refusal::refuse;
pub use registry::SessionRegistry;
use tokio::{
    net::TcpListener,
    sync::{Semaphore, watch},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    admin::{Admin, AdminStates, overlay},
    config::Config,
    dataplane::{BackendTable, DataPlane, KillReason},
    patroni::HealthSnapshot,
    routing::Router,
};
use counters::{BackendCounters, ListenerCounters};
use slots::ServerSlots;

/// Everything a session task needs, shared by all listeners.
pub struct Proxy {
    pub config: Arc<Config>,
    pub dataplane: Arc<DataPlane>,
    pub backends: Arc<BackendTable>,
    pub sessions: SessionRegistry,
    /// The checker's view of every server with the operator's admin states folded in, once
    /// applied to the data path (BACKENDS written, fences lifted or set): routing and stats read
    /// this, never the checker's raw output, so no session is spliced to a server whose fence is
    /// still up.
    pub health: watch::Receiver<Arc<HealthSnapshot>>,
    applied: watch::Sender<Arc<HealthSnapshot>>,
    /// The checker's raw output, read only by `follow_health`.
    checks: watch::Receiver<Arc<HealthSnapshot>>,
    /// The operator's READY/DRAIN/MAINT states: set through the stats server's admin endpoint.
    pub admin: Admin,
    /// The admin states as `follow_health` last folded them in.
    admin_states: watch::Receiver<Arc<AdminStates>>,
    /// Per listener: its round-robin cursor and current write target.
    routers: Vec<Mutex<Router>>,
    /// Per backend (index = backend id - 1) and per listener, for the stats.
    backend_counters: Vec<BackendCounters>,
    pub listener_counters: Vec<ListenerCounters>,
    /// Global maxconn: accept loops take a permit before accepting.
    global: Arc<Semaphore>,
    /// Per-backend maxconn (index = backend id - 1).
    slots: Vec<ServerSlots>,
}

impl Proxy {
    pub fn new(
        config: Arc<Config>,
        dataplane: Arc<DataPlane>,
        backends: Arc<BackendTable>,
        checks: watch::Receiver<Arc<HealthSnapshot>>,
    ) -> Arc<Self> {
        let admin = Admin::new(config.clone());
        let admin_states = admin.subscribe();
        let initial = Arc::new(overlay(&checks.borrow(), &admin_states.borrow()));
        let (applied, health) = watch::channel(initial);
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
            health,
            applied,
            checks,
            admin,
            admin_states,
            routers,
            backend_counters,
            listener_counters,
            global: Arc::new(Semaphore::new(config.global.maxconn as usize)),
            config,
            dataplane,
            backends,
            sessions: SessionRegistry::default(),
            slots,
        });
        // BACKENDS starts as what routing sees first: one writer, `write_states`.
        let initial = proxy.health.borrow().clone();
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
        for (index, listener) in listeners.into_iter().enumerate() {
            tracker.spawn(
                self.clone()
                    .accept_loop(index, listener, stop.clone(), tracker.clone()),
            );
        }
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

    /// The backend id (BPF map key) of server `server` of listener `listener`.
    pub fn backend_id(&self, listener: usize, server: usize) -> u32 {
        crate::patroni::backend_id(
            &self.config,
            crate::patroni::BackendKey { listener, server },
        )
        .expect("listener and server indexes come from the config")
    }

    pub fn counters(&self, backend_id: u32) -> &BackendCounters {
        &self.backend_counters[backend_id as usize - 1]
    }

    fn slots(&self, backend_id: u32) -> &ServerSlots {
        &self.slots[backend_id as usize - 1]
    }

    pub fn listen_addresses(&self) -> Vec<SocketAddr> {
        self.config.listeners.iter().map(|l| l.bind).collect()
    }
}
