//! The daemon's life: start-up in dependency order, readiness, signals, drain, exit.
use std::{
    os::fd::{AsFd as _, BorrowedFd, OwnedFd},
    path::PathBuf,
    sync::Arc,
};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::info;

use crate::{
    config::{BpfMode, Config},
    control,
    dataplane::{BackendTable, DataPlane, KernelLog, loader::LoadError, pin_dir},
    fd_limit,
    fdstore::FdStore,
    firewall::Firewall,
    operator_state::AdminWriter,
    patroni, privileges,
    proxy::{self, Proxy},
    reload::{self, Reloader},
    server_ids::ServerIds,
    stats,
    upgrade::{Carried, CarriedXdp, Handed, Predecessor, Relaunch, Takeover},
};

/// Runs the daemon until SIGTERM/SIGINT, then drains for at most `relaunch.drain_grace`; or,
/// on SIGUSR2 or a structural reload, until a successor (started as `relaunch` says) took its
/// listeners and sessions over. With `takeover`, this process is such a successor. SIGHUP (and
/// `patroxy reload`) reads `relaunch.config` again.
pub async fn run(
    config: Config,
    relaunch: Relaunch,
    takeover: Option<Takeover>,
) -> anyhow::Result<()> {
    // A successor that cannot start says why to the predecessor waiting for it.
    let report = takeover.as_ref().and_then(Takeover::failure_report);
    let result = run_daemon(config, relaunch, takeover).await;
    if let (Err(e), Some(report)) = (&result, report) {
        report.send(&format!("{e:#}"));
    }
    result
}

async fn run_daemon(
    config: Config,
    relaunch: Relaunch,
    mut takeover: Option<Takeover>,
) -> anyhow::Result<()> {
    // Before anything else: SIGHUP's default action would end the daemon.
    let mut signals = Signals::new()?;
    let grace = relaunch.drain_grace;
    let config = Arc::new(config);
    fd_limit::raise(&config);
    let log = KernelLog::from_config(&config.global)?;
    let dataplane = Arc::new(select_data_path(&config, takeover.as_mut(), log)?);
    if takeover.is_some() {
        dataplane.leave_pins_on_exit(true);
    }
    // Attached (or taken over attached) before any port is bound, so no client reaches one the
    // rules protect unfiltered.
    let firewall = start_firewall(&config, takeover.as_mut())?.map(Arc::new);
    // Until this process serves, a failed start leaves its predecessor's pins as they are.
    let pins_owned = || {
        dataplane.leave_pins_on_exit(false);
        if let Some(firewall) = &firewall {
            firewall.leave_pins_on_exit(false);
        }
    };
    let stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    let carried = takeover
        .as_mut()
        .map(|t| std::mem::take(&mut t.carried))
        .unwrap_or_default();
    let ids = server_ids(&config, carried.ids.as_ref())?;
    let health = takeover.as_ref().map_or(&[][..], |t| &t.health[..]);
    let checks = patroni::spawn_checker_from(&config, &ids, health, stop.clone(), &tracker)?;
    patroni::dcs::spawn_watch(&config, checks.leader_events(), stop.clone(), &tracker)?;
    let listeners = config
        .listeners
        .iter()
        .map(|l| {
            match takeover.as_mut().and_then(|t| t.listener(&l.name, l.bind)) {
                Some(handed) => handed
                    .set_nonblocking(true)
                    .and_then(|()| tokio::net::TcpListener::from_std(handed)),
                None => proxy::bind(l.bind, config.global.maxconn),
            }
            .with_context(|| format!("listener {}: binding {}", l.name, l.bind))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    // Bound before any client is accepted: a taken stats port fails the start-up.
    let stats_listener = match (
        &config.stats,
        takeover
            .as_mut()
            .zip(config.stats.as_ref())
            .and_then(|(t, s)| t.stats(s.bind)),
    ) {
        (Some(_), Some(handed)) => Some(handed),
        (Some(s), None) => {
            Some(stats::bind(s.bind).with_context(|| format!("stats: binding {}", s.bind))?)
        }
        (None, _) => None,
    };
    let runtime_socket = match &config.runtime {
        Some(r) => Some(
            match takeover.as_mut().and_then(|t| t.runtime_socket(&r.socket)) {
                Some(handed) => control::adopt(r, handed),
                None => control::bind(r),
            }
            .context("runtime socket")?,
        ),
        None => None,
    };
    // Written once every socket is bound: a successor that cannot bind one exits having left
    // its predecessor's BACKENDS as it was.
    let backends = Arc::new(BackendTable::new(
        dataplane.kernel().cloned(),
        ids.backends().map(|(key, id)| {
            let address = config.listeners[key.listener].servers[key.server].address;
            (id, key.listener as u16, address)
        }),
    ));
    // Kept to hand over: the accept loop, the stats server and the runtime socket's thread own
    // the originals.
    let handed_fds = HandedFds::of(
        &config,
        &listeners,
        stats_listener.as_ref(),
        runtime_socket.as_ref(),
    )?;
    let fd_store = FdStore::from_env();
    if let Some(store) = &fd_store {
        store.store_ids(&ids);
        for (name, fd) in handed_fds.listeners(&config) {
            store.store_listener(&name, fd);
        }
        if let Some(stats) = &handed_fds.stats {
            store.store_stats(stats.as_fd());
        }
    }
    // Loaded, pinned and bound: from here on only a rebind below 1024 may need a capability.
    // A successor (which starts with none) only opens pinned maps and takes descriptors over.
    let binds = config
        .listeners
        .iter()
        .map(|l| l.bind)
        .chain(config.stats.as_ref().map(|s| s.bind));
    let mut needed = privileges::needed_after_start(binds, privileges::unprivileged_port_start());
    let mut passed_on = caps::CapsHashSet::new();
    if dataplane.tc().is_some() {
        // Every hand-off to the packet-level splice puts both sockets in TCP_REPAIR, in a
        // successor too (an upgrade or structural reload takes the flows over).
        needed.insert(caps::Capability::CAP_NET_ADMIN);
        passed_on.insert(caps::Capability::CAP_NET_ADMIN);
        info!("datapath = \"tc\" keeps CAP_NET_ADMIN for TCP_REPAIR, and passes it to a successor");
    }
    let kept = privileges::drop_all_but(&needed, &passed_on).context("dropping capabilities")?;
    info!(
        kept = %privileges::names(&kept),
        "dropped every capability not needed after start-up"
    );

    // The one writer of the operator's states, held to the end of `run`: the proxy stops
    // following the checks once no writer is left.
    let admin = Arc::new(AdminWriter::carried_over(config.clone(), &carried.admin));
    let proxy = Proxy::new(
        config.clone(),
        ids,
        dataplane.clone(),
        backends,
        checks.subscribe(),
        admin.subscribe(),
    );
    proxy.carry_on_counters(&carried.counters);
    if let Some(store) = fd_store {
        proxy.keep_sessions_in(store);
    }
    tracker.spawn(proxy.clone().follow_health(stop.clone()));
    // What an upgrade carries over; the reloader owns the checker.
    let health = checks.subscribe();
    let (restructure, mut restructures) = tokio::sync::mpsc::channel(1);
    let reloader = reload::spawn(
        relaunch.config.clone(),
        reload::ReloadTargets {
            proxy: proxy.clone(),
            checker: checks,
            firewall: firewall.clone(),
        },
        carried.reload,
        restructure,
        stop.clone(),
        &tracker,
    );
    let stats_thread = match stats_listener {
        Some(listener) => Some(
            stats::serve(
                listener,
                proxy.clone(),
                admin.clone(),
                reloader.clone(),
                stop.clone(),
            )
            .context("stats: starting its thread")?,
        ),
        None => None,
    };
    let runtime_hand_over = runtime_socket.as_ref().map(control::BoundSocket::hand_over);
    let control_thread = match runtime_socket {
        Some(socket) => Some(
            control::serve(
                socket,
                proxy.clone(),
                admin.clone(),
                Arc::new(reloader.clone()),
                stop.clone(),
            )
            .context("runtime socket: starting its thread")?,
        ),
        None => None,
    };
    proxy.serve(listeners, stop.clone(), &tracker);
    if let Some(takeover) = takeover {
        tracker.spawn(takeover.adopt_sessions(proxy.clone(), tracker.clone()));
    }
    pins_owned();
    info!(
        data_path = dataplane.name(),
        listeners = ?proxy.listen_addresses(),
        "patroxy ready"
    );
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);

    let (predecessor, kept_here) = loop {
        // An upgrade, or a structural reload (an upgrade whose reply goes to the reload).
        let restructure = tokio::select! {
            signal = signals.next(&reloader) => match signal {
                Signal::Stop => break (None, Default::default()),
                Signal::Upgrade => None,
            },
            Some(request) = restructures.recv() => Some(request),
        };
        let reload_status = match &restructure {
            Some(r) => r.status.clone(),
            None => reloader.status(),
        };
        let handed = Handed {
            pin_lock: dataplane.kernel().map(|k| k.pin_lock()),
            xdp_lock: firewall.as_deref().map(Firewall::pin_lock),
            listeners: handed_fds.listeners(&config),
            stats: handed_fds.stats.as_ref().map(|f| f.as_fd()),
            runtime: handed_fds.runtime(),
            health: health.borrow().carry(&config),
            carried: Carried {
                ids: Some(proxy.server_ids().clone()),
                admin: admin.carry(),
                counters: proxy.carry_counters(),
                reload: reload_status,
                xdp: Some(CarriedXdp::of(&config.firewall.xdp)),
                datapath: Some(carried_datapath(&config)),
            },
            raw_sockets: dataplane.tc().map(|tc| tc.raw_sockets()),
        };
        // The successor writes BACKENDS from its start: nothing here may overwrite it.
        proxy.backends().write_kernel(false);
        match Predecessor::start(&relaunch, handed).await {
            Ok(p) => {
                let _ =
                    sd_notify::notify(false, &[sd_notify::NotifyState::MainPid(p.successor_pid())]);
                let kept_here = match restructure {
                    Some(r) => {
                        let kept_here = proxy.retire_servers(&r.retired);
                        let _ = r.reply.send(Ok(p.successor_pid()));
                        kept_here
                    }
                    None => Default::default(),
                };
                break (Some(p), kept_here);
            }
            Err(e) => {
                let ids = proxy.server_ids();
                proxy.backends().take_back(|id| ids.given(id));
                match restructure {
                    Some(r) => {
                        let _ = r.reply.send(Err(format!("{e:#}")));
                    }
                    None => tracing::error!("upgrade failed, running on: {e:#}"),
                }
            }
        }
    };
    match predecessor {
        Some(predecessor) => {
            info!("upgrade: no new clients here; handing the spliced sessions over");
            // The successor listens on the runtime socket's file: it must stay at our exit.
            if let Some(hand_over) = &runtime_hand_over {
                hand_over.done();
            }
            stop.cancel();
            dataplane.leave_pins_on_exit(true);
            if let Some(firewall) = &firewall {
                firewall.hand_over();
            }
            let (to_successor, sessions) = tokio::sync::mpsc::unbounded_channel();
            proxy.hand_over_sessions(to_successor, kept_here);
            predecessor
                .pass_sessions(&proxy, sessions, &tracker, grace)
                .await;
        }
        None => {
            info!("stopping: no new clients; draining sessions for up to {grace:?}");
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
            stop.cancel();
            proxy.drain(&tracker, grace).await;
        }
    }
    if let Some(thread) = stats_thread {
        // Returns within a second: the stats server cuts its connections after a short grace.
        if tokio::task::spawn_blocking(move || thread.join())
            .await
            .is_ok_and(|joined| joined.is_err())
        {
            tracing::warn!("the stats server's thread panicked");
        }
    }
    if let Some(thread) = control_thread
        && tokio::task::spawn_blocking(move || thread.join())
            .await
            .is_ok_and(|joined| joined.is_err())
    {
        tracing::warn!("the runtime socket's thread panicked");
    }
    // Last: the ports stay filtered while the sessions drain.
    drop(firewall);
    info!("stopped");
    Ok(())
}

/// The servers' ids: a fresh start numbers them in file order; a successor goes on from its
/// predecessor's table, so servers that stay keep theirs.
fn server_ids(config: &Config, predecessor: Option<&ServerIds>) -> anyhow::Result<ServerIds> {
    let Some(predecessor) = predecessor else {
        return Ok(ServerIds::fresh(config));
    };
    let (ids, changes) = predecessor.follow(config)?;
    for (listener, server, id) in &changes.retired {
        info!(%listener, %server, backend = id, "server removed: its id is retired");
    }
    for (listener, server, id) in &changes.added {
        info!(%listener, %server, backend = id, "server added: new id");
    }
    Ok(ids)
}

/// The XDP allowlist: a predecessor's, taken over attached as it is (with the new rules), else
/// attached as `[xdp]` says. A successor refuses a file whose `[xdp]` enabled, interfaces or
/// mode differ from its predecessor's: changing them needs a restart.
fn start_firewall(
    config: &Config,
    takeover: Option<&mut Takeover>,
) -> anyhow::Result<Option<Firewall>> {
    let pin_path = &config.global.pin_path;
    if let Some(takeover) = takeover {
        let now = CarriedXdp::of(&config.firewall.xdp);
        if let Some(was) = takeover.carried.xdp.as_ref().filter(|was| **was != now) {
            anyhow::bail!(
                "[xdp] enabled, interfaces or mode changed (running: {was:?}; new: {now:?}): \
                 that needs a restart, not an upgrade or reload"
            );
        }
        if let Some(lock) = takeover.xdp_lock.take() {
            return Firewall::adopt(&config.firewall, pin_path, lock)
                .map(Some)
                .context("taking over the XDP allowlist");
        }
    }
    Firewall::start(&config.firewall, pin_path)
        .context("XDP allowlist (xdp enabled = \"required\")")
}

/// The data path: a predecessor's pinned maps when sessions come that live in them (an upgrade,
/// or the fd store after a crash), else loaded as the config says.
fn select_data_path(
    config: &Config,
    takeover: Option<&mut Takeover>,
    log: Option<KernelLog>,
) -> anyhow::Result<DataPlane> {
    let pin_path = &config.global.pin_path;
    let Some(takeover) =
        takeover.filter(|t| config.global.bpf != BpfMode::Off && t.needs_pinned_maps())
    else {
        return Ok(DataPlane::select(
            config.global.bpf,
            pin_path,
            log,
            tc_setup(config),
        )?);
    };
    if log.is_some() {
        tracing::warn!("the eBPF debug log is not available in a taken-over data path");
    }
    let datapath = carried_datapath(config);
    if let Some(was) = takeover
        .carried
        .datapath
        .as_ref()
        .filter(|was| **was != datapath)
    {
        anyhow::bail!(
            "global.datapath changed (running: {was}; new: {datapath}): that needs a restart, \
             not an upgrade or reload"
        );
    }
    let raw_sockets = takeover.raw_sockets.take();
    match takeover.pin_lock.take() {
        Some(lock) => DataPlane::adopt(pin_path, lock, tc_setup(config), raw_sockets)
            .context("taking over the pinned maps"),
        // After a crash nobody holds the lock; the pins the dead daemon left hold the sessions.
        None => {
            let adopted = pin_dir::claim(pin_path)
                .map_err(LoadError::from)
                .and_then(|lock| DataPlane::adopt(pin_path, lock, tc_setup(config), raw_sockets));
            match adopted {
                Ok(dataplane) => Ok(dataplane),
                Err(e) => {
                    tracing::warn!(
                        "the stored sessions' maps cannot be opened ({e}); loading afresh, the sessions will be reset"
                    );
                    Ok(DataPlane::select(
                        config.global.bpf,
                        pin_path,
                        None,
                        tc_setup(config),
                    )?)
                }
            }
        }
    }
}

/// `global.datapath` (with `[tc] interfaces`) as an upgrade carries it: only a restart may
/// change it.
fn carried_datapath(config: &Config) -> String {
    format!("{:?}", config.global.datapath)
}

/// The TC programs' part of the config, when `datapath = "tc"`.
fn tc_setup(config: &Config) -> Option<crate::dataplane::TcSetup<'_>> {
    let crate::config::Datapath::Tc { interfaces } = &config.global.datapath else {
        return None;
    };
    let mut listener_ports: Vec<u16> = config.listeners.iter().map(|l| l.bind.port()).collect();
    listener_ports.sort_unstable();
    listener_ports.dedup();
    Some(crate::dataplane::TcSetup {
        interfaces,
        listener_ports,
    })
}

/// What the daemon's signals ask of `run` (SIGHUP's reload is done on the way).
enum Signal {
    /// SIGTERM or SIGINT.
    Stop,
    /// SIGUSR2: start a successor and hand over.
    Upgrade,
}

/// The daemon's signal handlers: SIGTERM and SIGINT stop it, SIGHUP reloads the configuration,
/// SIGUSR2 upgrades it.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    usr2: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
            usr2: signal(SignalKind::user_defined2())?,
        })
    }

    /// Reloads on every SIGHUP (the reload logs its outcome) until a signal that `run` acts on.
    async fn next(&mut self, reloader: &Reloader) -> Signal {
        loop {
            tokio::select! {
                _ = self.term.recv() => { info!("SIGTERM received"); return Signal::Stop }
                _ = self.int.recv() => { info!("SIGINT received"); return Signal::Stop }
                _ = self.usr2.recv() => {
                    info!("SIGUSR2 received: upgrading");
                    return Signal::Upgrade;
                }
                _ = self.hup.recv() => {
                    info!("SIGHUP received: reloading the configuration");
                    // Not awaited here: a structural reload needs `run`'s loop to go on.
                    let reloader = reloader.clone();
                    tokio::spawn(async move { reloader.reload().await });
                }
            }
        }
    }
}

/// Duplicates of the listening sockets, for a successor.
struct HandedFds {
    listeners: Vec<OwnedFd>,
    stats: Option<OwnedFd>,
    /// The runtime socket's path and listening socket.
    runtime: Option<(PathBuf, OwnedFd)>,
}

impl HandedFds {
    fn of(
        config: &Config,
        listeners: &[tokio::net::TcpListener],
        stats: Option<&std::net::TcpListener>,
        runtime: Option<&control::BoundSocket>,
    ) -> anyhow::Result<Self> {
        debug_assert_eq!(config.listeners.len(), listeners.len());
        Ok(Self {
            listeners: listeners
                .iter()
                .map(|l| l.as_fd().try_clone_to_owned())
                .collect::<Result<_, _>>()?,
            stats: stats.map(|s| s.as_fd().try_clone_to_owned()).transpose()?,
            runtime: runtime
                .map(|r| {
                    r.listener
                        .as_fd()
                        .try_clone_to_owned()
                        .map(|fd| (r.path().to_owned(), fd))
                })
                .transpose()?,
        })
    }

    fn runtime(&self) -> Option<(PathBuf, BorrowedFd<'_>)> {
        self.runtime
            .as_ref()
            .map(|(path, fd)| (path.clone(), fd.as_fd()))
    }

    fn listeners(&self, config: &Config) -> Vec<(String, BorrowedFd<'_>)> {
        config
            .listeners
            .iter()
            .zip(&self.listeners)
            .map(|(l, fd)| (l.name.clone(), fd.as_fd()))
            .collect()
    }
}
