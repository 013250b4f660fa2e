//! The daemon's life: start-up in dependency order, readiness, signals, drain, exit.
use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::info;

use crate::{
    config::Config,
    control,
    dataplane::{BackendTable, DataPlane, KernelLog},
    operator_state::AdminWriter,
    patroni, privileges,
    proxy::{self, Proxy},
    reload::{self, Reloader},
    stats,
};

/// Runs the daemon until SIGTERM/SIGINT, then drains for at most `grace`. `config` was read from
/// `path`, which SIGHUP and `patroxy reload` read again.
pub async fn run(config: Config, path: PathBuf, grace: Duration) -> anyhow::Result<()> {
    // Before anything else: SIGHUP's default action would end the daemon.
    let signals = Signals::new()?;
    let config = Arc::new(config);
    raise_fd_limit(&config);
    let dataplane = Arc::new(DataPlane::select(
        config.global.bpf,
        &config.global.pin_path,
        KernelLog::from_config(&config.global)?,
    )?);
    let stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    let checks = patroni::spawn_checker(&config, stop.clone(), &tracker)?;
    patroni::dcs::spawn_watch(&config, checks.leader_events(), stop.clone(), &tracker)?;
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
            proxy::bind(l.bind, config.global.maxconn)
                .with_context(|| format!("listener {}: binding {}", l.name, l.bind))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    // Bound before any client is accepted: a taken stats port fails the start-up.
    let stats_listener = match &config.stats {
        Some(s) => Some(stats::bind(s.bind).with_context(|| format!("stats: binding {}", s.bind))?),
        None => None,
    };
    let runtime_socket = match &config.runtime {
        Some(r) => Some(control::bind(r).context("runtime socket")?),
        None => None,
    };
    // Loaded, pinned and bound: from here on only a rebind below 1024 may need a capability.
    let binds = config
        .listeners
        .iter()
        .map(|l| l.bind)
        .chain(config.stats.as_ref().map(|s| s.bind));
    let needed = privileges::needed_after_start(binds, privileges::unprivileged_port_start());
    let kept = privileges::drop_all_but(&needed).context("dropping capabilities")?;
    info!(
        kept = %privileges::names(&kept),
        "dropped every capability not needed after start-up"
    );

    // The one writer of the operator's states, held to the end of `run`: the proxy stops
    // following the checks once no writer is left.
    let admin = Arc::new(AdminWriter::new(config.clone()));
    let proxy = Proxy::new(
        config.clone(),
        dataplane.clone(),
        backends,
        checks.subscribe(),
        admin.subscribe(),
    );
    tracker.spawn(proxy.clone().follow_health(stop.clone()));
    let reloader = reload::spawn(path, proxy.clone(), checks, stop.clone(), &tracker);
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
    info!(
        data_path = dataplane.name(),
        listeners = ?proxy.listen_addresses(),
        "patroxy ready"
    );
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);

    signals.serve_until_stop(&reloader).await;
    info!("stopping: no new clients; draining sessions for up to {grace:?}");
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    stop.cancel();
    proxy.drain(&tracker, grace).await;
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
    info!("stopped");
    Ok(())
}

/// The daemon's signal handlers: SIGTERM and SIGINT stop it, SIGHUP reloads the configuration.
struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl Signals {
    fn new() -> std::io::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// Reloads on every SIGHUP (the reload logs its outcome) until SIGTERM or SIGINT.
    async fn serve_until_stop(mut self, reloader: &Reloader) {
        loop {
            let stop = tokio::select! {
                _ = self.term.recv() => "SIGTERM",
                _ = self.int.recv() => "SIGINT",
                _ = self.hup.recv() => {
                    info!("SIGHUP received: reloading the configuration");
                    let _ = reloader.reload().await;
                    continue;
                }
            };
            info!("{stop} received");
            return;
        }
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
    let runtime = config
        .runtime
        .as_ref()
        .map_or(0, |r| u64::from(r.maxconn) + 1);
    let wanted = u64::from(config.global.maxconn) * 2 + checks + stats + runtime + BASE_FDS;
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
