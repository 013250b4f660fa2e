//! Upgrades that keep every session: the running daemon starts its successor (`SIGUSR2`) and
//! hands it, over a unix socket pair with SCM_RIGHTS, the pin directories' locks (the data
//! path's and the XDP allowlist's, which stays attached throughout), the listening
//! sockets (the runtime socket's too), the health states, the rest of the running state
//! ([`Carried`]: server ids, operator states, counters, reload status) and then both sockets of
//! every spliced session. A structural reload is such an upgrade, with the new file.
//!
//! The order keeps every connection attempt served: the successor accepts on the same listening
//! sockets (the same kernel objects) before the predecessor stops accepting, and a spliced
//! session's bytes never pass through either process (the verdict program stays attached to
//! SOCKS, whose pins the predecessor leaves in place). Sessions on the userspace fallback path
//! finish in the predecessor, which exits once they end or after `--drain-grace`.
//!
//! - `channel`: the socket pair and its messages.
//! - [`Predecessor`]: the running daemon's side. [`Takeover`]: the successor's side, also
//!   used for what systemd's fd store gives back after a crash ([`crate::fdstore`]).
mod channel;

use std::{
    net::SocketAddr,
    os::{
        fd::{AsFd as _, AsRawFd as _, BorrowedFd, OwnedFd, RawFd},
        unix::process::CommandExt as _,
    },
    path::PathBuf,
    process::{Child, Command},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, bail};
use tokio::{sync::mpsc, time::Instant};
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use channel::{Channel, MAX_FDS, Message, SessionRecord};

use crate::{
    dataplane::{Detached, KillReason, pin_dir::PinDirLock},
    operator_state::CarriedAdmin,
    patroni::CarriedHealth,
    proxy::{CarriedCounters, HandedSession, Proxy},
    reload::ReloadStatus,
    server_ids::ServerIds,
};

/// How long a successor may take to start accepting before the upgrade is abandoned.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How to start a successor: the binary at the path this daemon was started from (after a
/// package upgrade, the new file there), with this daemon's own arguments.
#[derive(Clone, Debug)]
pub struct Relaunch {
    pub binary: PathBuf,
    pub config: PathBuf,
    pub drain_grace: Duration,
}

/// The running state a successor starts from, besides check states and descriptors: the servers'
/// ids, the operator's states, the stats' totals and the reloads so far. An upgrade and a
/// structural reload (an upgrade to the same binary with the new file) carry the same.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Carried {
    /// `None` from a predecessor that numbered servers by position: then ids start afresh.
    pub ids: Option<ServerIds>,
    pub admin: Vec<CarriedAdmin>,
    pub counters: CarriedCounters,
    pub reload: ReloadStatus,
    /// The predecessor's `[xdp]` enabled, interfaces and mode, which a successor must keep:
    /// `None` from a predecessor older than it.
    #[serde(default)]
    pub xdp: Option<CarriedXdp>,
    /// The predecessor's `global.datapath` (with `[tc]` interfaces), which only a restart may
    /// change: `None` from a predecessor older than it.
    #[serde(default)]
    pub datapath: Option<String>,
}

/// The `[xdp]` settings only a restart may change (the attachment is handed over as it is).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CarriedXdp {
    pub enabled: String,
    pub interfaces: Vec<String>,
    pub mode: String,
}

impl CarriedXdp {
    pub fn of(xdp: &crate::config::Xdp) -> Self {
        Self {
            enabled: format!("{:?}", xdp.enabled).to_lowercase(),
            interfaces: xdp.interfaces.clone(),
            mode: format!("{:?}", xdp.mode).to_lowercase(),
        }
    }
}

/// What the predecessor hands over first, besides the sessions.
pub struct Handed<'a> {
    pub pin_lock: Option<&'a PinDirLock>,
    /// The XDP allowlist's pin directory's lock, when it is attached.
    pub xdp_lock: Option<&'a PinDirLock>,
    /// (name, listening socket), in the configuration's order.
    pub listeners: Vec<(String, BorrowedFd<'a>)>,
    pub stats: Option<BorrowedFd<'a>>,
    /// The runtime socket's path and listening socket.
    pub runtime: Option<(PathBuf, BorrowedFd<'a>)>,
    pub health: Vec<CarriedHealth>,
    pub carried: Carried,
    /// With `datapath = "tc"`: the raw sockets of the duplicate ACKs, [IPv4, IPv6] (a
    /// successor has no CAP_NET_RAW to open them).
    pub raw_sockets: Option<[Option<BorrowedFd<'a>>; 2]>,
}

/// The running daemon's side, once its successor accepts.
pub struct Predecessor {
    channel: Arc<Channel>,
    successor: Child,
}

impl Predecessor {
    /// Starts the successor and hands it `handed`; returns once it accepts on the listeners.
    pub async fn start(relaunch: &Relaunch, handed: Handed<'_>) -> anyhow::Result<Predecessor> {
        let (ours, theirs) = Channel::pair().context("creating the hand-over socket pair")?;
        let inherited = theirs.as_fd().as_raw_fd();
        let mut cmd = Command::new(&relaunch.binary);
        cmd.arg("run")
            .arg("--config")
            .arg(&relaunch.config)
            .arg("--drain-grace")
            .arg(humantime::format_duration(relaunch.drain_grace).to_string())
            .arg("--takeover-fd")
            .arg(inherited.to_string());
        // SAFETY: only fcntl, async-signal-safe, between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::fcntl(inherited, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut successor = cmd
            .spawn()
            .with_context(|| format!("starting {}", relaunch.binary.display()))?;
        drop(theirs);
        info!(pid = successor.id(), binary = %relaunch.binary.display(), "upgrade: successor started");
        let channel = Arc::new(ours);
        let mut fds: Vec<BorrowedFd<'_>> = handed.pin_lock.map(|l| l.as_fd()).into_iter().collect();
        fds.extend(handed.xdp_lock.map(|l| l.as_fd()));
        fds.extend(handed.listeners.iter().map(|(_, fd)| *fd));
        fds.extend(handed.stats);
        fds.extend(handed.runtime.as_ref().map(|(_, fd)| *fd));
        let raw_sockets = handed.raw_sockets.map(|raw| raw.map(|fd| fd.is_some()));
        fds.extend(handed.raw_sockets.into_iter().flatten().flatten());
        let start = Message::Start {
            pid: std::process::id(),
            pin_lock: handed.pin_lock.is_some(),
            xdp_lock: handed.xdp_lock.is_some(),
            listeners: handed.listeners.iter().map(|(n, _)| n.clone()).collect(),
            stats: handed.stats.is_some(),
            runtime: handed.runtime.as_ref().map(|(path, _)| path.clone()),
            health: handed.health,
            carried: Box::new(handed.carried),
            raw_sockets,
        };
        let answer = match channel.send(&start, &fds) {
            Ok(()) => {
                let channel = channel.clone();
                tokio::time::timeout(
                    START_TIMEOUT,
                    tokio::task::spawn_blocking(move || channel.recv()),
                )
                .await
            }
            Err(e) => Ok(Ok(Err(e))),
        };
        match answer {
            Ok(Ok(Ok((Message::Accepting { pid }, _)))) => {
                info!(pid, "upgrade: the successor accepts");
                Ok(Predecessor { channel, successor })
            }
            Ok(Ok(Ok((Message::Failed { error }, _)))) => {
                // It exits on its own once it has said why.
                let _ = tokio::task::spawn_blocking(move || successor.wait()).await;
                bail!("the successor failed to start: {error}")
            }
            other => {
                let _ = successor.kill();
                let _ = successor.wait();
                match other {
                    Err(_) => bail!("the successor did not accept within {START_TIMEOUT:?}"),
                    Ok(Ok(Err(e))) => bail!("the successor failed to start ({e}); see its log"),
                    _ => bail!("the successor answered out of turn"),
                }
            }
        }
    }

    pub fn successor_pid(&self) -> u32 {
        self.successor.id()
    }

    /// Passes every spliced session to the successor as it comes out of `sessions` (see
    /// [`Proxy::hand_over_sessions`]) until no session task is left in `tracker`; sessions
    /// still running after `grace` (the fallback path's) are reset.
    pub async fn pass_sessions(
        self,
        proxy: &Proxy,
        mut sessions: mpsc::UnboundedReceiver<HandedSession>,
        tracker: &TaskTracker,
        grace: Duration,
    ) {
        tracker.close();
        let deadline = Instant::now() + grace;
        let mut passed = 0usize;
        let mut reset = false;
        loop {
            tokio::select! {
                Some(first) = sessions.recv() => {
                    let mut batch = vec![first];
                    while batch.len() < MAX_FDS / 2 {
                        match sessions.try_recv() {
                            Ok(s) => batch.push(s),
                            Err(_) => break,
                        }
                    }
                    passed += batch.len();
                    self.send_sessions(batch).await;
                }
                () = tracker.wait() => break,
                () = tokio::time::sleep_until(deadline), if !reset => {
                    reset = true;
                    let n = proxy.reset_remaining(KillReason::Shutdown);
                    warn!(sessions = n, "upgrade: drain grace time over; resetting the sessions left here");
                }
            }
        }
        let rest: Vec<HandedSession> = std::iter::from_fn(|| sessions.try_recv().ok()).collect();
        passed += rest.len();
        for batch in rest.chunks(MAX_FDS / 2) {
            self.send_sessions_ref(batch).await;
        }
        let channel = self.channel.clone();
        let _ = tokio::task::spawn_blocking(move || channel.send(&Message::Done, &[])).await;
        info!(
            sessions = passed,
            successor = self.successor.id(),
            "upgrade: sessions handed over; exiting"
        );
    }

    async fn send_sessions(&self, batch: Vec<HandedSession>) {
        self.send_sessions_ref(&batch).await
    }

    async fn send_sessions_ref(&self, batch: &[HandedSession]) {
        let records: Vec<SessionRecord> = batch
            .iter()
            .map(|s| SessionRecord {
                listener: s.listener.clone(),
                server: s.server.clone(),
                client: s.client,
                age_ms: s.age.as_millis() as u64,
                written_before_splice: [
                    s.sockets.baseline.client_written,
                    s.sockets.baseline.backend_written,
                ],
            })
            .collect();
        let fds: Vec<RawFd> = batch
            .iter()
            .flat_map(|s| [s.sockets.client.as_raw_fd(), s.sockets.backend.as_raw_fd()])
            .collect();
        let channel = self.channel.clone();
        let sent = tokio::task::spawn_blocking(move || {
            // SAFETY: the sockets in `batch` stay open until this call returns (awaited below).
            let fds: Vec<BorrowedFd<'_>> = fds
                .iter()
                .map(|&fd| unsafe { BorrowedFd::borrow_raw(fd) })
                .collect();
            channel.send(&Message::Sessions(records), &fds)
        })
        .await;
        if !matches!(sent, Ok(Ok(()))) {
            warn!(
                sessions = batch.len(),
                "upgrade: passing sessions failed; resetting them"
            );
            for s in batch {
                crate::dataplane::reset_both(&s.sockets.client, &s.sockets.backend);
            }
        }
    }
}

/// Where a [`Takeover`] comes from.
enum Source {
    /// A running predecessor, which passes its sessions over this channel once we accept.
    Predecessor { channel: Arc<Channel>, pid: u32 },
    /// The service manager's fd store (after a crash): the sessions came with the listeners.
    FdStore(Vec<HandedSession>),
}

/// The successor's side: what the predecessor (or the fd store) handed over at start.
pub struct Takeover {
    source: Source,
    /// The pin directory's lock, when a predecessor handed it over.
    pub pin_lock: Option<PinDirLock>,
    /// The XDP allowlist's pin directory's lock, when a predecessor had it attached.
    pub xdp_lock: Option<PinDirLock>,
    pub listeners: Vec<(String, std::net::TcpListener)>,
    pub stats: Option<std::net::TcpListener>,
    /// The runtime socket's path and listening socket.
    pub runtime: Option<(PathBuf, std::os::unix::net::UnixListener)>,
    pub health: Vec<CarriedHealth>,
    pub carried: Carried,
    /// The predecessor's raw sockets for the packet-level splice's duplicate ACKs.
    pub raw_sockets: Option<[Option<OwnedFd>; 2]>,
}

impl Takeover {
    /// Reads the predecessor's first message from the inherited `fd`.
    ///
    /// # Safety
    /// `fd` is the descriptor given as `--takeover-fd`, owned by nothing else here.
    pub unsafe fn receive(fd: RawFd) -> anyhow::Result<Takeover> {
        // SAFETY: per the caller; made close-on-exec, since no grandchild should inherit it.
        let channel = unsafe {
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
            Channel::from_inherited(fd)
        };
        let (message, fds) = channel
            .recv()
            .context("reading the predecessor's hand-over")?;
        let Message::Start {
            pid,
            pin_lock,
            xdp_lock,
            listeners,
            stats,
            runtime,
            health,
            carried,
            raw_sockets,
        } = message
        else {
            bail!("the predecessor's first message is not Start");
        };
        let wanted = usize::from(pin_lock)
            + usize::from(xdp_lock)
            + listeners.len()
            + usize::from(stats)
            + usize::from(runtime.is_some())
            + raw_sockets.map_or(0, |raw| raw.iter().filter(|&&r| r).count());
        if fds.len() != wanted {
            bail!(
                "the predecessor passed {} descriptors, not {wanted}",
                fds.len()
            );
        }
        let mut fds = fds.into_iter();
        let pin_lock = pin_lock.then(|| PinDirLock::from_handed_over(fds.next().expect("counted")));
        let xdp_lock = xdp_lock.then(|| PinDirLock::from_handed_over(fds.next().expect("counted")));
        let listeners = listeners
            .into_iter()
            .map(|name| (name, tcp_listener(fds.next().expect("counted"))))
            .collect();
        let stats = stats.then(|| tcp_listener(fds.next().expect("counted")));
        let runtime = runtime.map(|path| {
            (
                path,
                std::os::unix::net::UnixListener::from(fds.next().expect("counted")),
            )
        });
        let raw_sockets =
            raw_sockets.map(|raw| raw.map(|r| r.then(|| fds.next().expect("counted"))));
        info!(predecessor = pid, "upgrade: taking over");
        Ok(Takeover {
            source: Source::Predecessor {
                channel: Arc::new(channel),
                pid,
            },
            pin_lock,
            xdp_lock,
            listeners,
            stats,
            runtime,
            health,
            carried: *carried,
            raw_sockets,
        })
    }

    /// Where to say why this successor cannot start, if a predecessor waits for the answer.
    pub fn failure_report(&self) -> Option<FailureReport> {
        match &self.source {
            Source::Predecessor { channel, .. } => Some(FailureReport(channel.clone())),
            Source::FdStore(_) => None,
        }
    }

    /// What the service manager gave back (`LISTEN_FDS`): its sessions are resumed only if
    /// the pinned maps they are in are still there (see `needs_pinned_maps`).
    pub fn from_fd_store(restored: crate::fdstore::Restored) -> Takeover {
        let sessions = restored
            .sessions
            .into_iter()
            .map(|(listener, server, sockets)| HandedSession {
                listener,
                server,
                client: sockets
                    .client
                    .peer_addr()
                    .unwrap_or_else(|_| ([0, 0, 0, 0], 0).into()),
                age: Duration::ZERO,
                sockets,
            })
            .collect::<Vec<_>>();
        info!(
            listeners = restored.listeners.len(),
            sessions = sessions.len(),
            "restart: the service manager's fd store gave back listeners and sessions"
        );
        Takeover {
            source: Source::FdStore(sessions),
            pin_lock: None,
            xdp_lock: None,
            listeners: restored.listeners,
            stats: restored.stats,
            // Not in the fd store: a stale socket file is replaced at start.
            runtime: None,
            health: restored.health,
            carried: Carried {
                ids: restored.ids,
                ..Carried::default()
            },
            // A process started afresh opens its own.
            raw_sockets: None,
        }
    }

    /// Whether sessions come that live in a predecessor's pinned maps: then those maps are
    /// opened, not replaced, even without a handed-over lock.
    pub fn needs_pinned_maps(&self) -> bool {
        match &self.source {
            Source::Predecessor { .. } => true,
            Source::FdStore(sessions) => !sessions.is_empty(),
        }
    }

    /// The runtime socket handed over, if it is at `path` (the configuration may have moved it).
    pub fn runtime_socket(
        &mut self,
        path: &std::path::Path,
    ) -> Option<std::os::unix::net::UnixListener> {
        match self.runtime.take() {
            Some((handed, listener)) if handed == path => Some(listener),
            Some((handed, _)) => {
                warn!(
                    "upgrade: the runtime socket moved from {} to {}; the old file is left there",
                    handed.display(),
                    path.display()
                );
                None
            }
            None => None,
        }
    }

    /// The listening socket handed over for listener `name` if it is bound to `bind`, else
    /// one bound to `bind` under another name (a renamed listener): a listener the new
    /// configuration rebinds gets a new socket, and the old one closes with the predecessor.
    pub fn listener(&mut self, name: &str, bind: SocketAddr) -> Option<std::net::TcpListener> {
        let bound_to = |l: &std::net::TcpListener| l.local_addr().ok() == Some(bind);
        let i = self
            .listeners
            .iter()
            .position(|(n, l)| n == name && bound_to(l))
            .or_else(|| self.listeners.iter().position(|(_, l)| bound_to(l)));
        match i {
            Some(i) => Some(self.listeners.swap_remove(i).1),
            None => {
                if self.listeners.iter().any(|(n, _)| n == name) {
                    info!("listener {name}: now bound to {bind}");
                }
                None
            }
        }
    }

    /// The stats server's listening socket handed over, if it is bound to `bind`.
    pub fn stats(&mut self, bind: SocketAddr) -> Option<std::net::TcpListener> {
        same_address(self.stats.take()?, bind, "stats")
    }

    /// Tells the predecessor this process accepts, then goes on with every session it passes
    /// until it is done.
    pub async fn adopt_sessions(self, proxy: Arc<Proxy>, tracker: TaskTracker) {
        let (channel, predecessor) = match self.source {
            Source::Predecessor { channel, pid } => (channel, pid),
            Source::FdStore(sessions) => {
                let total = sessions.len();
                let mut resumed = 0usize;
                for handed in sessions {
                    match proxy.adopt(handed, &tracker) {
                        Ok(()) => resumed += 1,
                        Err(e) => warn!("restart: a stored session was reset: {e}"),
                    }
                }
                info!(
                    resumed,
                    of = total,
                    "restart: sessions from the fd store resumed"
                );
                return;
            }
        };
        let accepting = Message::Accepting {
            pid: std::process::id(),
        };
        let channel2 = channel.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || channel2.send(&accepting, &[]))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)))
        {
            warn!("upgrade: telling the predecessor we accept failed: {e}");
            return;
        }
        let mut adopted = 0usize;
        loop {
            let channel = channel.clone();
            let received = tokio::task::spawn_blocking(move || channel.recv()).await;
            let (records, fds) = match received {
                Ok(Ok((Message::Sessions(records), fds))) => (records, fds),
                Ok(Ok((Message::Done, _))) => break,
                Ok(Ok((other, _))) => {
                    warn!("upgrade: unexpected message {other:?}");
                    continue;
                }
                Ok(Err(e)) => {
                    warn!("upgrade: the predecessor's channel closed early: {e}");
                    break;
                }
                Err(e) => {
                    warn!("upgrade: receiving sessions: {e}");
                    break;
                }
            };
            let mut fds = fds.into_iter();
            for record in records {
                let (Some(client), Some(backend)) = (fds.next(), fds.next()) else {
                    warn!("upgrade: a session came without its sockets");
                    break;
                };
                let handed = HandedSession {
                    listener: record.listener,
                    server: record.server,
                    client: record.client,
                    age: Duration::from_millis(record.age_ms),
                    sockets: Detached {
                        client: client.into(),
                        backend: backend.into(),
                        baseline: crate::dataplane::tc::Baseline {
                            client_written: record.written_before_splice[0],
                            backend_written: record.written_before_splice[1],
                        },
                    },
                };
                match proxy.adopt(handed, &tracker) {
                    Ok(()) => adopted += 1,
                    Err(e) => {
                        warn!("upgrade: a session could not be taken over and was reset: {e}")
                    }
                }
            }
        }
        info!(sessions = adopted, predecessor, "upgrade: took over");
        // The predecessor's last sessions are over: those of servers a reload removed too.
        let retired = proxy.backends().forget_retired();
        if !retired.is_empty() {
            info!(backends = ?retired, "removed servers' BACKENDS entries deleted");
        }
    }
}

/// A successor's way to tell its predecessor why it did not start, so the predecessor (and a
/// structural reload's caller) can say so.
pub struct FailureReport(Arc<Channel>);

impl FailureReport {
    pub fn send(self, error: &str) {
        let failed = Message::Failed {
            error: error.to_owned(),
        };
        if let Err(e) = self.0.send(&failed, &[]) {
            warn!("upgrade: telling the predecessor why this process did not start failed: {e}");
        }
    }
}

fn same_address(
    handed: std::net::TcpListener,
    bind: SocketAddr,
    what: &str,
) -> Option<std::net::TcpListener> {
    match handed.local_addr() {
        Ok(at) if at == bind => Some(handed),
        at => {
            info!(
                "{what}: now bound to {bind}, no longer to {}",
                at.map_or_else(|e| e.to_string(), |a| a.to_string())
            );
            None
        }
    }
}

fn tcp_listener(fd: OwnedFd) -> std::net::TcpListener {
    std::net::TcpListener::from(fd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Xdp, XdpEnabled, XdpMode};

    #[test]
    fn the_restart_only_xdp_settings_are_compared_and_the_syn_limit_is_not() {
        let xdp = Xdp {
            enabled: XdpEnabled::Required,
            interfaces: vec!["eth0".into()],
            mode: XdpMode::Auto,
            syn_limit: None,
        };
        let carried = CarriedXdp::of(&xdp);
        assert_eq!(carried.enabled, "required");
        let mut limited = xdp.clone();
        limited.syn_limit = Some(crate::config::SynRate {
            rate: 10,
            burst: 20,
        });
        assert_eq!(CarriedXdp::of(&limited), carried);
        let mut moved = xdp.clone();
        moved.interfaces.push("eth1".into());
        assert_ne!(CarriedXdp::of(&moved), carried);
        let mut generic = xdp;
        generic.mode = XdpMode::Generic;
        assert_ne!(CarriedXdp::of(&generic), carried);
    }
}
