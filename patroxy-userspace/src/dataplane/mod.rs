//! The data path: moves bytes between a client and its backend once both are connected.
//!
//! Two implementations with the same semantics (byte-exact, half-close after delivery, RST
//! propagated, idle timeout, kill on demand): `sockmap` splices in the kernel, `fallback` copies in
//! userspace. `DataPlane::select` picks one from the config's `bpf` mode. With `datapath =
//! "tc"`, `tc` hands sockmap sessions on to the packet-level splice once they are quiet.
mod backends;
mod closewatch;
mod fallback;
mod kernel_log;
pub mod loader;
pub mod maps;
pub mod pin_dir;
pub mod sock_diag;
mod sockmap;
pub mod sockopt;
pub mod tc;

use std::{
    fmt,
    sync::{Arc, OnceLock},
    time::Duration,
};

pub use backends::{BackendTable, ForeignWrite};
pub use kernel_log::KernelLog;
pub use loader::KernelMaps;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};

use crate::config::BpfMode;

/// What the proxy knows about a session when it hands it to the data path.
#[derive(Clone, Copy, Debug)]
pub struct SessionMeta {
    pub backend_id: u32,
    pub listener: u16,
    /// No byte either way for this long closes the session (min of timeout client/server).
    pub idle_timeout: Duration,
}

/// How a session ended, in the spirit of HAProxy's termination states.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EndReason {
    /// Both sides closed; the client sent the first FIN.
    ClientClose,
    /// Both sides closed; the server sent the first FIN.
    ServerClose,
    ClientReset,
    ServerReset,
    /// No byte either way for the idle timeout.
    Timeout,
    Killed(KillReason),
    Error(String),
}

impl fmt::Display for EndReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ClientClose => f.write_str("client close"),
            Self::ServerClose => f.write_str("server close"),
            Self::ClientReset => f.write_str("client reset"),
            Self::ServerReset => f.write_str("server reset"),
            Self::Timeout => f.write_str("idle timeout"),
            Self::Killed(k) => write!(f, "{k}"),
            Self::Error(e) => write!(f, "error: {e}"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KillReason {
    /// on-marked-down shutdown-sessions.
    MarkedDown,
    /// on-marked-up shutdown-backup-sessions.
    MarkedUp,
    /// on-marked-down shutdown-sessions, for a server the operator set to MAINT.
    Maintenance,
    /// on-marked-down shutdown-sessions, for a primary on an older timeline than another UP
    /// primary (split brain: what it takes is lost when it rejoins).
    Superseded,
    /// Someone else fenced the backend in BACKENDS (bpftool): the verdict dropped the
    /// sessions' bytes, so their streams cannot go on.
    ForeignFence,
    /// The daemon stops and the drain grace time is over.
    Shutdown,
}

impl fmt::Display for KillReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::MarkedDown => "reset: server marked down",
            Self::MarkedUp => "reset: server marked up",
            Self::Maintenance => "reset: server set to MAINT",
            Self::Superseded => "reset: primary superseded by a newer timeline",
            Self::ForeignFence => "reset: backend fenced outside patroxy",
            Self::Shutdown => "reset: shutdown",
        })
    }
}

/// Ends one session from outside (mark-down, shutdown); the data path resets both sockets.
/// Also asks a spliced session to leave its sockets to a successor process (an upgrade).
#[derive(Clone, Debug, Default)]
pub struct KillSwitch {
    token: CancellationToken,
    reason: Arc<OnceLock<KillReason>>,
    hand_over: CancellationToken,
}

impl KillSwitch {
    pub fn kill(&self, reason: KillReason) {
        let _ = self.reason.set(reason);
        self.token.cancel();
    }

    async fn killed(&self) -> KillReason {
        self.token.cancelled().await;
        *self.reason.get().unwrap_or(&KillReason::Shutdown)
    }

    /// A spliced session stops watching and returns its sockets ([`Outcome::HandedOver`]),
    /// its map entries left in place; a fallback session ignores this and runs to its end.
    pub fn hand_over(&self) {
        self.hand_over.cancel();
    }

    async fn handing_over(&self) {
        self.hand_over.cancelled().await
    }
}

/// What a session run by the data path came to.
pub enum Outcome {
    Ended(SessionEnd),
    /// Still spliced in the kernel, its entries in SOCKS and SESSIONS, for a successor.
    HandedOver(Detached),
}

/// A spliced session's two sockets, out of this process's watch (see [`KillSwitch::hand_over`]).
pub struct Detached {
    pub client: std::net::TcpStream,
    pub backend: std::net::TcpStream,
    /// What this process wrote to each socket before the splice (nothing, for a PostgreSQL
    /// session): the packet-level hand-off's checks count from it.
    pub baseline: tc::Baseline,
}

/// Totals of a finished session. Both counts are payload bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionEnd {
    pub reason: EndReason,
    pub bytes_from_client: u64,
    pub bytes_from_server: u64,
    /// The session was handed to the packet-level splice (`datapath = "tc"`) before it ended.
    pub handed_off_to_tc: bool,
}

/// The data path chosen at start-up.
pub enum DataPlane {
    Sockmap {
        /// The packet-level splice sessions are handed to, with `datapath = "tc"`. Declared
        /// first so it is dropped first: its pins go before `maps` removes the pin directory.
        tc: Option<Arc<tc::TcPath>>,
        maps: Arc<KernelMaps>,
        /// Tells spliced sessions about FIN/RST without waking them per message.
        closes: Arc<closewatch::CloseWatcher>,
    },
    Fallback,
}

#[derive(Debug, thiserror::Error)]
pub enum SelectError {
    #[error("bpf = \"required\" but the sockmap data path is unavailable: {0}")]
    RequiredButUnavailable(loader::LoadError),
    /// Falling back would leave the operator's problem (two daemons on one pin path, a pin
    /// directory open to another user) in a log line while the daemon runs.
    #[error(transparent)]
    PinDir(pin_dir::PinDirError),
    /// `datapath = "tc"` is opt-in: when it cannot attach, the daemon says so rather than run
    /// on another path than the operator chose.
    #[error("datapath = \"tc\": {0}")]
    Tc(loader::LoadError),
}

/// What the TC programs need from the config (`datapath = "tc"`).
pub struct TcSetup<'a> {
    pub interfaces: &'a [String],
    /// The listeners' ports: SYNs to them lose their timestamp and SACK options (the proxy's
    /// own SYNs to the servers lose them per socket, `TcPath::connect`).
    pub listener_ports: Vec<u16>,
}

impl DataPlane {
    /// Loads the sockmap path unless `mode` says off; `auto` falls back with one log line why,
    /// except from a pin directory `pin_dir::claim` refuses. `log` turns on the verdict
    /// program's debug lines.
    pub fn select(
        mode: BpfMode,
        pin_dir: &std::path::Path,
        log: Option<KernelLog>,
        tc: Option<TcSetup>,
    ) -> Result<Self, SelectError> {
        if mode == BpfMode::Off {
            return Ok(Self::Fallback);
        }
        let loaded = KernelMaps::load(pin_dir, log, tc.is_some()).and_then(|maps| {
            let closes = closewatch::CloseWatcher::new().map_err(loader::LoadError::Epoll)?;
            Ok((maps, closes))
        });
        match loaded {
            Ok((mut maps, closes)) => {
                let tc = match tc {
                    Some(setup) => Some(Arc::new(maps.attach_tc(&setup).map_err(SelectError::Tc)?)),
                    None => None,
                };
                Ok(Self::Sockmap {
                    maps: Arc::new(maps),
                    closes,
                    tc,
                })
            }
            Err(loader::LoadError::PinDir(e)) => Err(SelectError::PinDir(e)),
            Err(e) if tc.is_some() => Err(SelectError::Tc(e)),
            Err(e) if mode == BpfMode::Required => Err(SelectError::RequiredButUnavailable(e)),
            Err(e) => {
                warn!("sockmap data path unavailable ({e}); using the userspace fallback");
                Ok(Self::Fallback)
            }
        }
    }

    /// The sockmap path from the maps and program a predecessor pinned and attached (an
    /// upgrade): nothing is loaded. Refused, whatever the mode, if the maps do not match this
    /// build; the predecessor then keeps running.
    ///
    /// With `tc`, the packet-level splice's programs are taken over attached as well, with the
    /// flows they carry (`raw_sockets`: the predecessor's, for the duplicate ACKs).
    pub fn adopt(
        pin_dir: &std::path::Path,
        lock: pin_dir::PinDirLock,
        tc: Option<TcSetup>,
        raw_sockets: Option<[Option<std::os::fd::OwnedFd>; 2]>,
    ) -> Result<Self, loader::LoadError> {
        let maps = KernelMaps::adopt(pin_dir, lock)?;
        let tc = match tc {
            Some(setup) => Some(Arc::new(tc::TcPath::adopt(
                pin_dir,
                setup.interfaces,
                &setup.listener_ports,
                raw_sockets,
            )?)),
            None => None,
        };
        let closes = closewatch::CloseWatcher::new().map_err(loader::LoadError::Epoll)?;
        Ok(Self::Sockmap {
            maps: Arc::new(maps),
            closes,
            tc,
        })
    }

    /// Whether this process's exit leaves the pins and attachments in place: set in a
    /// successor while it starts on what it adopted (a failed start must not remove what its
    /// predecessor runs on), cleared once it serves and owns them, set again once it hands
    /// them to a successor of its own.
    pub fn leave_pins_on_exit(&self, leave: bool) {
        if let Some(kernel) = self.kernel() {
            kernel.leave_pins_on_exit(leave);
        }
        if let Some(tc) = self.tc() {
            tc.leave_pins_on_exit(leave);
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::Sockmap { tc: Some(_), .. } => "sockmap+tc",
            Self::Sockmap { .. } => "sockmap",
            Self::Fallback => "fallback",
        }
    }

    /// The path one session took, for its closing log line: with `datapath = "tc"` only the
    /// sessions that were handed off say "sockmap+tc".
    pub fn session_path(&self, end: &SessionEnd) -> &'static str {
        match self {
            Self::Sockmap { .. } if end.handed_off_to_tc => "sockmap+tc",
            Self::Sockmap { .. } => "sockmap",
            Self::Fallback => "fallback",
        }
    }

    /// Connects to a backend; with `datapath = "tc"` so that the connection may be spliced.
    pub async fn connect(&self, addr: std::net::SocketAddr) -> std::io::Result<TcpStream> {
        match self.tc() {
            Some(tc) => tc.connect(addr).await,
            None => TcpStream::connect(addr).await,
        }
    }

    /// The packet-level splice, when `datapath = "tc"` attached it.
    pub fn tc(&self) -> Option<&Arc<tc::TcPath>> {
        match self {
            Self::Sockmap { tc, .. } => tc.as_ref(),
            Self::Fallback => None,
        }
    }

    pub fn kernel(&self) -> Option<&Arc<KernelMaps>> {
        match self {
            Self::Sockmap { maps, .. } => Some(maps),
            Self::Fallback => None,
        }
    }

    /// Runs one established session to its end, or until it is handed over.
    pub async fn run(
        &self,
        client: TcpStream,
        backend: TcpStream,
        meta: SessionMeta,
        kill: &KillSwitch,
    ) -> Outcome {
        let _ = client.set_nodelay(true);
        let _ = backend.set_nodelay(true);
        let ended = match self {
            Self::Sockmap { .. } if too_much_queued(&client) => {
                debug!(
                    "client sent more than {SPLICE_QUEUE_LIMIT} bytes before its backend connected; serving it on the fallback path"
                );
                fallback::run(client, backend, meta, kill).await
            }
            Self::Sockmap { maps, closes, tc } => {
                match sockmap::Spliced::insert(maps, tc.clone(), &client, &backend, meta) {
                    Ok(spliced) => return spliced.run(client, backend, closes, kill).await,
                    Err(e) => {
                        // EOPNOTSUPP: a socket no longer established (the client already closed);
                        // the fallback path still serves whatever it sent.
                        if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
                            error!(
                                "sockmap insert failed ({e}); serving the session on the fallback path"
                            );
                        }
                        fallback::run(client, backend, meta, kill).await
                    }
                }
            }
            Self::Fallback => fallback::run(client, backend, meta, kill).await,
        };
        Outcome::Ended(ended)
    }

    /// Goes on with a session a predecessor spliced (its sockets still in SOCKS and SESSIONS)
    /// until it ends or is handed over again. `None` on the fallback path, which has no
    /// spliced sessions to resume.
    pub async fn resume(
        &self,
        detached: Detached,
        meta: SessionMeta,
        kill: &KillSwitch,
    ) -> Option<Outcome> {
        let Self::Sockmap { maps, closes, tc } = self else {
            return None;
        };
        let Detached {
            client,
            backend,
            baseline,
        } = detached;
        Some(
            match sockmap::Spliced::resume(maps, tc.clone(), &client, &backend, meta, baseline) {
                Ok(spliced) => spliced.watch_resumed(client, backend, closes, kill).await,
                Err(e) => {
                    reset_both(&client, &backend);
                    Outcome::Ended(SessionEnd {
                        reason: EndReason::Error(format!("resuming: {e}")),
                        bytes_from_client: 0,
                        bytes_from_server: 0,
                        handed_off_to_tc: false,
                    })
                }
            },
        )
    }
}

/// Above this many bytes waiting in the client's receive queue at splice time, the session goes
/// to the fallback path. PostgreSQL clients send a startup or SSL request packet (< 1 KiB) and
/// wait, so real sessions never come near this. The cause is the kernel's (Linux 6.18, found
/// 2026-12-03, README "Data path"): `tcp_read_skb` hands the verdict each queued skb whole and
/// `tcp_eat_skb` moves `copied_seq` by its length, so an skb that starts before `copied_seq` (a
/// segment overlapping bytes already received, which TCP queues untrimmed) has its old
/// bytes forwarded a second time. It showed only for clients that streamed into a full receive
/// window before the splice: without this limit, in 5 of 215 loaded runs of
/// `client_streams_before_backend_listens`, one session's verdict was handed 40–256 KiB of its
/// client's stream twice. Such duplicates can also end in the reset seen earlier: the
/// backend's send counter reaches the client's receive counter early, the FIN goes out with
/// bytes still queued and the psock fails with EPIPE. `tests/kernel/sockmap_overlap.py`
/// reproduces the kernel's part without patroxy.
const SPLICE_QUEUE_LIMIT: usize = 64 * 1024;

fn too_much_queued(client: &TcpStream) -> bool {
    sockopt::queued_bytes(client).is_ok_and(|n| n > SPLICE_QUEUE_LIMIT)
}

/// Which end of a session a socket is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Client,
    Server,
}

impl Side {
    fn peer(self) -> Side {
        match self {
            Self::Client => Self::Server,
            Self::Server => Self::Client,
        }
    }
    fn reset_reason(self) -> EndReason {
        match self {
            Self::Client => EndReason::ClientReset,
            Self::Server => EndReason::ServerReset,
        }
    }
    fn close_reason(self) -> EndReason {
        match self {
            Self::Client => EndReason::ClientClose,
            Self::Server => EndReason::ServerClose,
        }
    }
}

/// Closes both sockets with RST (SO_LINGER 0), as HAProxy's shutdown-sessions does.
pub fn reset_both(client: impl std::os::fd::AsFd, backend: impl std::os::fd::AsFd) {
    let _ = sockopt::arm_reset(&client);
    let _ = sockopt::arm_reset(&backend);
}
