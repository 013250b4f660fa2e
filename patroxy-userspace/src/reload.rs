//! Reloading the configuration file while the daemon runs.
//!
//! SIGHUP, the stats server's `POST /admin/reload` (`patroxy reload`, the unit's `ExecReload`)
//! and any other trigger call one entry point, [`Reloader::reload`]. Its requests are served one
//! at a time by a task on the daemon's runtime, which re-reads and validates the file, compares
//! it with the running config (`config::diff`) and applies the difference:
//! - settings in place, to the checker and the proxy;
//! - structural changes (listeners or servers added, removed, moved, rebound) by a successor
//!   process: the daemon's own upgrade to the same binary path with the new file
//!   ([`Restructure`], served by `lifecycle` through `upgrade`). The successor takes the
//!   listeners that stay, the check and operator states, the stats' totals, this status and the
//!   servers' ids over, and goes on with the sessions of the servers that stay; those of removed
//!   servers are handled as a mark-down (`Proxy::retire_servers`). If it fails to start, this
//!   process runs on with its old configuration and reports why.
//!
//! An invalid file, or a change only a restart can make, leaves the running config untouched;
//! every problem is logged (file:line:column for the file's) and returned. The last outcome and
//! the counts are kept in a [`ReloadStatus`] for the stats page, JSON and metrics.
use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::SystemTime,
};

use tokio::sync::{mpsc, oneshot};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};

use crate::{
    config::{self, Config, ConfigError, diff::NeedsRestart},
    fd_limit,
    firewall::{Firewall, FirewallError},
    patroni::{Checker, client::ClientError},
    proxy::Proxy,
    server_ids::IdsExhausted,
};

/// A reload that was applied: one line per changed setting (none for an unchanged file).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReloadSummary {
    pub changes: Vec<String>,
}

/// Why a reload was refused; the running config is unchanged.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file cannot be read or is invalid: every problem, at file:line:column.
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// The file is valid but changes what the running process cannot.
    #[error("{0}")]
    NeedsRestart(#[from] NeedsRestart),
    /// A check's TLS files could not be loaded.
    #[error("health checks: {0}")]
    Checks(#[from] ClientError),
    #[error("{0}")]
    Ids(#[from] IdsExhausted),
    /// The successor process that was to run the new configuration did not start.
    #[error("the new configuration's process did not start; running on the old one: {0}")]
    Successor(String),
    /// The allowlist's maps refused a write; the entries written before it stay (each one
    /// of the old or the new rules).
    #[error("XDP allowlist: {0}")]
    Firewall(#[from] FirewallError),
    /// Reading the file panicked (a bug): nothing was applied.
    #[error("reading the configuration failed: {0}")]
    Internal(String),
    /// The daemon is stopping and takes no more reloads.
    #[error("the daemon is stopping")]
    Stopped,
}

impl ReloadError {
    /// The message, one problem a line.
    pub fn lines(&self) -> Vec<String> {
        self.to_string().lines().map(str::to_string).collect()
    }
}

/// Reloads so far and the last one's outcome (carried over to a successor process).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReloadStatus {
    /// Reloads attempted, and those refused.
    pub reloads: u64,
    pub failures: u64,
    pub last: Option<LastReload>,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LastReload {
    pub at: SystemTime,
    pub ok: bool,
    /// What changed, or why the reload was refused: one line each.
    pub lines: Vec<String>,
}

type Reply = oneshot::Sender<Result<ReloadSummary, ReloadError>>;

/// A structural reload, for the daemon's life cycle to carry out by starting a successor on the
/// new file (an upgrade to the same binary path).
pub struct Restructure {
    /// The backend ids the new configuration no longer has (removed or moved servers).
    pub retired: Vec<u32>,
    /// This process's reload status with this reload counted as applied, for the successor.
    pub status: ReloadStatus,
    /// The successor's pid once it accepts, or why it did not start.
    pub reply: oneshot::Sender<Result<u32, String>>,
}

/// The handle every trigger reloads through; cheap to clone, usable from any runtime or thread.
#[derive(Clone)]
pub struct Reloader {
    requests: mpsc::Sender<Reply>,
    status: Arc<Mutex<ReloadStatus>>,
}

impl Reloader {
    /// Reloads the file the daemon was started with and waits for the outcome.
    pub async fn reload(&self) -> Result<ReloadSummary, ReloadError> {
        let (reply, outcome) = oneshot::channel();
        self.requests
            .send(reply)
            .await
            .map_err(|_| ReloadError::Stopped)?;
        outcome.await.unwrap_or(Err(ReloadError::Stopped))
    }

    pub fn status(&self) -> ReloadStatus {
        self.status.lock().expect("reload status lock").clone()
    }
}

/// What a reload applies a new file to.
pub struct ReloadTargets {
    pub proxy: Arc<Proxy>,
    pub checker: Checker,
    /// The attached allowlist, whose rules a reload rewrites; `None` when XDP is off or fell back.
    pub firewall: Option<Arc<Firewall>>,
}

/// What a reload changes, owned by the task that serves the requests.
struct Applier {
    path: PathBuf,
    proxy: Arc<Proxy>,
    checker: Checker,
    firewall: Option<Arc<Firewall>>,
    status: Arc<Mutex<ReloadStatus>>,
    restructure: mpsc::Sender<Restructure>,
}

/// Starts the task that serves reloads of `path` (the file the daemon runs) into `targets`
/// until `stop`, counting on from `status` (a predecessor's); structural ones go to
/// `restructure`.
pub fn spawn(
    path: PathBuf,
    targets: ReloadTargets,
    status: ReloadStatus,
    restructure: mpsc::Sender<Restructure>,
    stop: CancellationToken,
    tracker: &TaskTracker,
) -> Reloader {
    let (requests, mut rx) = mpsc::channel::<Reply>(8);
    let status = Arc::new(Mutex::new(status));
    let ReloadTargets {
        proxy,
        checker,
        firewall,
    } = targets;
    let applier = Applier {
        path,
        proxy,
        checker,
        firewall,
        status: status.clone(),
        restructure,
    };
    tracker.spawn(async move {
        loop {
            let reply = tokio::select! {
                r = rx.recv() => match r { Some(r) => r, None => return },
                _ = stop.cancelled() => return,
            };
            let _ = reply.send(applier.reload().await);
        }
    });
    Reloader { requests, status }
}

impl Applier {
    async fn reload(&self) -> Result<ReloadSummary, ReloadError> {
        // systemd (Type=notify) waits for READY=1 after RELOADING=1 with the reload's start.
        let mut reloading = vec![sd_notify::NotifyState::Reloading];
        reloading.extend(sd_notify::NotifyState::monotonic_usec_now().ok());
        let _ = sd_notify::notify(false, &reloading);
        info!("reloading {}", self.path.display());
        let outcome = self.apply().await;
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
        let lines = match &outcome {
            Ok(summary) if summary.changes.is_empty() => {
                info!("configuration reloaded: nothing changed");
                vec![]
            }
            Ok(summary) => {
                for change in &summary.changes {
                    info!("configuration reloaded: {change}");
                }
                summary.changes.clone()
            }
            Err(e) => {
                let lines = e.lines();
                for line in &lines {
                    warn!("reload refused, running configuration kept: {line}");
                }
                lines
            }
        };
        let mut status = self.status.lock().expect("reload status lock");
        *status = counted(&status, outcome.is_ok(), lines);
        outcome
    }

    async fn apply(&self) -> Result<ReloadSummary, ReloadError> {
        // Validation resolves server host names: keep it off the async workers.
        let path = self.path.clone();
        let new = tokio::task::spawn_blocking(move || config::load(&path))
            .await
            .map_err(|e| ReloadError::Internal(e.to_string()))??;
        let new = Arc::new(new);
        let running = self.proxy.config();
        let diff = config::diff::diff(&running, &new)?;
        if !diff.structural.is_empty() {
            return self.restructure(&new, diff.lines()).await;
        }
        if diff.changes.is_empty() {
            return Ok(ReloadSummary::default());
        }
        // The checker first: with the allowlist, the only steps that can fail (a check's TLS
        // files).
        self.checker.reconfigure(&running, &new)?;
        fd_limit::raise(&new);
        if let Some(firewall) = &self.firewall {
            firewall.apply(&new.firewall)?;
        }
        self.proxy.reconfigure(new);
        Ok(ReloadSummary {
            changes: diff.changes,
        })
    }

    /// Has the life cycle start a successor on the file; `changes` are the diff's lines.
    async fn restructure(
        &self,
        new: &Config,
        mut changes: Vec<String>,
    ) -> Result<ReloadSummary, ReloadError> {
        let (_, ids) = self.proxy.server_ids().follow(new)?;
        // What the successor shows as the last reload: this one, applied.
        changes.push("applied by a new process (listeners and sessions handed over)".into());
        let status = counted(
            &self.status.lock().expect("reload status lock"),
            true,
            changes.clone(),
        );
        let (reply, answer) = oneshot::channel();
        let request = Restructure {
            retired: ids.retired.iter().map(|(_, _, id)| *id).collect(),
            status,
            reply,
        };
        self.restructure
            .send(request)
            .await
            .map_err(|_| ReloadError::Stopped)?;
        let pid = answer
            .await
            .map_err(|_| ReloadError::Stopped)?
            .map_err(ReloadError::Successor)?;
        if let Some(last) = changes.last_mut() {
            *last =
                format!("applied by a new process, pid {pid} (listeners and sessions handed over)");
        }
        Ok(ReloadSummary { changes })
    }
}

/// `status` with one more reload, `ok` or not, described by `lines`.
fn counted(status: &ReloadStatus, ok: bool, lines: Vec<String>) -> ReloadStatus {
    ReloadStatus {
        reloads: status.reloads + 1,
        failures: status.failures + u64::from(!ok),
        last: Some(LastReload {
            at: SystemTime::now(),
            ok,
            lines,
        }),
    }
}
