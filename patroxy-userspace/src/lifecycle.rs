//! The daemon's life: start-up in dependency order, readiness, signals, drain, exit.
use std::{
    os::fd::{AsFd as _, BorrowedFd, OwnedFd},
    sync::Arc,
};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::info;

use crate::{
    config::{BpfMode, Config},
    dataplane::{BackendTable, DataPlane, KernelLog, loader::LoadError, pin_dir},
    fdstore::FdStore,
    operator_state::AdminWriter,
    patroni,
    proxy::{self, Proxy},
    stats,
    upgrade::{Handed, Predecessor, Relaunch, Takeover},
};

/// Runs the daemon until SIGTERM/SIGINT, then drains for at most `relaunch.drain_grace`; or,
/// on SIGUSR2, until a successor (started as `relaunch` says) took its listeners and sessions
/// over. With `takeover`, this process is such a successor.
pub async fn run(
    config: Config,
    relaunch: Relaunch,
    mut takeover: Option<Takeover>,
) -> anyhow::Result<()> {
    let grace = relaunch.drain_grace;
    let config = Arc::new(config);
    raise_fd_limit(&config);
    let log = KernelLog::from_config(&config.global)?;
    let dataplane = Arc::new(select_data_path(&config, takeover.as_mut(), log)?);
    let stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    let carried = takeover.as_ref().map_or(&[][..], |t| &t.health[..]);
    let checks = patroni::spawn_checker_from(&config, carried, stop.clone(), &tracker)?;
    let backends = Arc::new(BackendTable::new(
        dataplane.kernel().cloned(),
        config
            .listeners
            .iter()
            .enumerate()
            .flat_map(|(i, l)| l.servers.iter().map(move |s| (i as u16, s.address))),
    ));
    let listeners = config
        .listeners
        .iter()
        .map(|l| {
            match takeover.as_mut().and_then(|t| t.listener(&l.name)) {
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
        takeover.as_mut().and_then(|t| t.stats.take()),
    ) {
        (Some(_), Some(handed)) => Some(handed),
        (Some(s), None) => {
            Some(stats::bind(s.bind).with_context(|| format!("stats: binding {}", s.bind))?)
        }
        (None, _) => None,
    };
    // Kept to hand over: the accept loop and the stats server own the originals.
    let handed_fds = HandedFds::of(&config, &listeners, stats_listener.as_ref())?;
    let fd_store = FdStore::from_env();
    if let Some(store) = &fd_store {
        for (name, fd) in handed_fds.listeners(&config) {
            store.store_listener(&name, fd);
        }
        if let Some(stats) = &handed_fds.stats {
            store.store_stats(stats.as_fd());
        }
    }

    // The one writer of the operator's states, held to the end of `run`: the proxy stops
    // following the checks once no writer is left.
    let admin = Arc::new(AdminWriter::new(config.clone()));
    let proxy = Proxy::new(
        config.clone(),
        dataplane.clone(),
        backends,
        checks.clone(),
        admin.subscribe(),
    );
    if let Some(store) = fd_store {
        proxy.keep_sessions_in(store);
    }
    tracker.spawn(proxy.clone().follow_health(stop.clone()));
    let stats_thread = match stats_listener {
        Some(listener) => Some(
            stats::serve(listener, proxy.clone(), admin.clone(), stop.clone())
                .context("stats: starting its thread")?,
        ),
        None => None,
    };
    proxy.serve(listeners, stop.clone(), &tracker);
    if let Some(takeover) = takeover {
        tracker.spawn(takeover.adopt_sessions(proxy.clone(), tracker.clone()));
    }
    info!(
        data_path = dataplane.name(),
        listeners = ?proxy.listen_addresses(),
        "patroxy ready"
    );
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);

    let predecessor = loop {
        match wait_for_signal().await? {
            Signal::Stop => break None,
            Signal::Upgrade => {
                let handed = Handed {
                    pin_lock: dataplane.kernel().map(|k| k.pin_lock()),
                    listeners: handed_fds.listeners(&config),
                    stats: handed_fds.stats.as_ref().map(|f| f.as_fd()),
                    health: checks.borrow().carry(),
                };
                // The successor writes BACKENDS from its start: nothing here may overwrite it.
                proxy.backends().write_kernel(false);
                match Predecessor::start(&relaunch, handed).await {
                    Ok(p) => break Some(p),
                    Err(e) => {
                        proxy.backends().write_kernel(true);
                        tracing::error!("upgrade failed, running on: {e:#}");
                    }
                }
            }
        }
    };
    match predecessor {
        Some(predecessor) => {
            let _ = sd_notify::notify(
                false,
                &[sd_notify::NotifyState::MainPid(predecessor.successor_pid())],
            );
            info!("upgrade: no new clients here; handing the spliced sessions over");
            stop.cancel();
            if let Some(kernel) = dataplane.kernel() {
                kernel.hand_over();
            }
            let (to_successor, sessions) = tokio::sync::mpsc::unbounded_channel();
            proxy.hand_over_sessions(to_successor);
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
    info!("stopped");
    Ok(())
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
        return Ok(DataPlane::select(config.global.bpf, pin_path, log)?);
    };
    if log.is_some() {
        tracing::warn!("the eBPF debug log is not available in a taken-over data path");
    }
    match takeover.pin_lock.take() {
        Some(lock) => DataPlane::adopt(pin_path, lock).context("taking over the pinned maps"),
        // After a crash nobody holds the lock; the pins the dead daemon left hold the sessions.
        None => {
            let adopted = pin_dir::claim(pin_path)
                .map_err(LoadError::from)
                .and_then(|lock| DataPlane::adopt(pin_path, lock));
            match adopted {
                Ok(dataplane) => Ok(dataplane),
                Err(e) => {
                    tracing::warn!(
                        "the stored sessions' maps cannot be opened ({e}); loading afresh, the sessions will be reset"
                    );
                    Ok(DataPlane::select(config.global.bpf, pin_path, None)?)
                }
            }
        }
    }
}

enum Signal {
    /// SIGTERM or SIGINT.
    Stop,
    /// SIGUSR2: start a successor and hand over.
    Upgrade,
}

async fn wait_for_signal() -> anyhow::Result<Signal> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut usr2 = signal(SignalKind::user_defined2())?;
    Ok(tokio::select! {
        _ = term.recv() => { info!("SIGTERM received"); Signal::Stop }
        _ = int.recv() => { info!("SIGINT received"); Signal::Stop }
        _ = usr2.recv() => { info!("SIGUSR2 received: upgrading"); Signal::Upgrade }
    })
}

/// Duplicates of the listening sockets, for a successor.
struct HandedFds {
    listeners: Vec<OwnedFd>,
    stats: Option<OwnedFd>,
}

impl HandedFds {
    fn of(
        config: &Config,
        listeners: &[tokio::net::TcpListener],
        stats: Option<&std::net::TcpListener>,
    ) -> anyhow::Result<Self> {
        debug_assert_eq!(config.listeners.len(), listeners.len());
        Ok(Self {
            listeners: listeners
                .iter()
                .map(|l| l.as_fd().try_clone_to_owned())
                .collect::<Result<_, _>>()?,
            stats: stats.map(|s| s.as_fd().try_clone_to_owned()).transpose()?,
        })
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

/// File descriptors the daemon needs besides its sessions, health checks and stats connections:
/// listeners, maps and programs, the SESSIONS reader, the runtime, logs.
const BASE_FDS: u64 = 256;

/// Each session holds two sockets, each health check and stats connection one: like HAProxy,
/// raise the soft fd
/// limit to fit them (up to the hard limit, which only an administrator can raise) and say so
/// if it cannot. The stats server never holds more than its `maxconn` plus its listener, so it
/// cannot take the proxy's share.
fn raise_fd_limit(config: &Config) {
    let stats = config
        .stats
        .as_ref()
        .map_or(0, |s| u64::from(s.maxconn) + 1);
    // At most one check connection per server (the checker shares one per node).
    let checks: u64 = config
        .listeners
        .iter()
        .map(|l| l.servers.len() as u64)
        .sum();
    let wanted = u64::from(config.global.maxconn) * 2 + checks + stats + BASE_FDS;
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return;
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: valid rlimit; only the soft limit changes.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    }
    if lim.rlim_cur < wanted {
        tracing::warn!(
            limit = lim.rlim_cur,
            wanted,
            "the open-files limit is below what maxconn and [stats] maxconn need (2 per session, 1 per stats connection); raise LimitNOFILE"
        );
    }
}
