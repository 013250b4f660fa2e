//! The etcd v3 task: reads `<namespace>/<scope>/` whole, then watches it from the read's
//! revision, and reports every leader change to the checker. Any error (etcd unreachable, the
//! stream cut, a compacted revision, a cancelled watch) only marks the watch disconnected:
//! after a back-off it connects again and re-reads, so a change made meanwhile is still seen.
use std::{path::PathBuf, sync::Arc, time::Duration, time::SystemTime};

use etcd_client::{
    Certificate, Client, ConnectOptions, EventType, GetOptions, Identity, TlsOptions, WatchOptions,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};

use super::keys::{ClusterKeys, ClusterView, LeaderChange};
use crate::{
    config::{Config, Dcs, ServerSpec},
    patroni::LeaderEvents,
};

/// A connection attempt or a read that takes longer has failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// HTTP/2 pings on the watch's connection: a cut-off etcd is noticed within ~4 s even when no
/// key changes.
const KEEPALIVE: Duration = Duration::from_secs(2);
/// Reconnect back-off: doubles from the first to the last after each failure in a row.
const BACKOFF_FIRST: Duration = Duration::from_millis(200);
const BACKOFF_LAST: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("dcs tls: cannot read {path:?}: {source}")]
    TlsFile {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Why one connection of the watch ended.
#[derive(Debug, thiserror::Error)]
enum SessionEnd {
    /// With its sources: etcd-client's "transport error" alone does not say that the
    /// certificate was refused or etcd unreachable.
    #[error("{}", with_sources(.0))]
    Etcd(#[from] etcd_client::Error),
    #[error("etcd did not answer within {REQUEST_TIMEOUT:?}")]
    Timeout,
    #[error("the watch stream ended")]
    StreamEnded,
    #[error("the watch was cancelled ({0}); re-reading")]
    Cancelled(String),
    #[error("revision compacted up to {0}; re-reading")]
    Compacted(i64),
}

struct Watch {
    endpoints: Vec<String>,
    options: ConnectOptions,
    keys: ClusterKeys,
    /// Every configured server once, to tell which one a member is.
    servers: Vec<ServerSpec>,
    events: LeaderEvents,
}

/// Starts the watch of `config`'s `[dcs]` (nothing without one) on `tracker`, until `stop`.
pub fn spawn_watch(
    config: &Config,
    events: LeaderEvents,
    stop: CancellationToken,
    tracker: &TaskTracker,
) -> Result<(), WatchError> {
    let Some(dcs) = &config.dcs else {
        return Ok(());
    };
    let mut servers: Vec<ServerSpec> = Vec::new();
    for s in config.listeners.iter().flat_map(|l| &l.servers) {
        if !servers.iter().any(|k| k.name == s.name) {
            servers.push(s.clone());
        }
    }
    let keys = ClusterKeys::new(&dcs.namespace, &dcs.scope);
    events.update_status(|s| s.leader_key = keys.leader());
    let watch = Arc::new(Watch {
        endpoints: dcs.etcd.clone(),
        options: connect_options(dcs)?,
        keys,
        servers,
        events,
    });
    tracker.spawn(async move {
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = watch.run() => {}
        }
    });
    Ok(())
}

fn connect_options(dcs: &Dcs) -> Result<ConnectOptions, WatchError> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(REQUEST_TIMEOUT)
        .with_keep_alive(KEEPALIVE, KEEPALIVE)
        .with_keep_alive_while_idle(true);
    if let Some(auth) = &dcs.auth {
        options = options.with_user(auth.user.clone(), auth.password.clone());
    }
    if let Some(tls) = &dcs.tls {
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|source| WatchError::TlsFile {
                path: path.clone(),
                source,
            })
        };
        let mut t = TlsOptions::new().ca_certificate(Certificate::from_pem(read(&tls.ca_file)?));
        if let (Some(cert), Some(key)) = (&tls.client_cert, &tls.client_key) {
            t = t.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        options = options.with_tls(t);
    }
    Ok(options)
}

impl Watch {
    async fn run(&self) {
        let mut view = ClusterView::default();
        let mut first_read = true;
        let mut backoff = BACKOFF_FIRST;
        loop {
            let end = self.session(&mut view, &mut first_read).await;
            let connected_before = self.disconnected(&end);
            if connected_before {
                backoff = BACKOFF_FIRST;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_LAST);
        }
    }

    /// One connection: read, then follow, until something ends it.
    async fn session(&self, view: &mut ClusterView, first_read: &mut bool) -> SessionEnd {
        match self.follow(view, first_read).await {
            Ok(never) => match never {},
            Err(end) => end,
        }
    }

    async fn follow(
        &self,
        view: &mut ClusterView,
        first_read: &mut bool,
    ) -> Result<std::convert::Infallible, SessionEnd> {
        let prefix = self.keys.prefix().to_owned();
        let mut client =
            timeout(Client::connect(&self.endpoints, Some(self.options.clone()))).await?;
        let read =
            timeout(client.get(prefix.clone(), Some(GetOptions::new().with_prefix()))).await?;
        let revision = read.header().map_or(0, |h| h.revision());
        let kvs: Vec<(String, Vec<u8>)> = read
            .kvs()
            .iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(kv.key()).into_owned(),
                    kv.value().to_vec(),
                )
            })
            .collect();
        let change = view.reread(&self.keys, &kvs);
        let mut stream = timeout(
            client.watch(
                prefix,
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(revision + 1),
                ),
            ),
        )
        .await?;
        self.connected(view);
        match change {
            Some(change) if !*first_read => self.leader_moved(&change, view),
            _ => {}
        }
        *first_read = false;
        loop {
            let msg = stream.message().await?.ok_or(SessionEnd::StreamEnded)?;
            if msg.compact_revision() > 0 {
                return Err(SessionEnd::Compacted(msg.compact_revision()));
            }
            if msg.canceled() {
                return Err(SessionEnd::Cancelled(msg.cancel_reason().to_owned()));
            }
            for event in msg.events() {
                let Some(kv) = event.kv() else { continue };
                let key = String::from_utf8_lossy(kv.key());
                let change = match event.event_type() {
                    EventType::Put => view.put(&self.keys, &key, kv.value()),
                    EventType::Delete => view.delete(&self.keys, &key),
                };
                if let Some(change) = change {
                    self.leader_moved(&change, view);
                }
            }
        }
    }

    /// Reports a leader change: the server the key left is fenced on the leader listeners.
    fn leader_moved(&self, change: &LeaderChange, view: &ClusterView) {
        let server = |member: &Option<String>| {
            member
                .as_deref()
                .and_then(|m| view.server_of(m, &self.servers))
                .map(str::to_owned)
        };
        let (old, new) = (server(&change.from), server(&change.to));
        let what = format!(
            "leader key {}: {} -> {}",
            self.keys.leader(),
            describe(&change.from, &old),
            describe(&change.to, &new),
        );
        info!("dcs: {what}");
        self.events
            .leader_moved(old.as_deref(), new.as_deref(), |s| {
                s.leader = change.to.clone();
                s.leader_server = new.clone();
                s.leader_changes += 1;
                s.last_event = Some((SystemTime::now(), what));
            });
    }

    fn connected(&self, view: &ClusterView) {
        let leader_server = view
            .leader
            .as_deref()
            .and_then(|m| view.server_of(m, &self.servers))
            .map(str::to_owned);
        let what = format!(
            "connected; leader key names {}",
            describe(&view.leader, &leader_server)
        );
        info!(endpoints = ?self.endpoints, "dcs: {what}");
        self.events.leader_read(leader_server.as_deref(), |s| {
            s.connected = true;
            s.leader = view.leader.clone();
            s.leader_server = leader_server.clone();
            s.last_event = Some((SystemTime::now(), what));
        });
    }

    /// Records the end of a connection; returns whether it had been connected.
    fn disconnected(&self, end: &SessionEnd) -> bool {
        let mut was = false;
        warn!(endpoints = ?self.endpoints, "dcs: {end}; servers keep their check states, reconnecting");
        self.events.leader_read(None, |s| {
            was = s.connected;
            s.connected = false;
            s.errors += 1;
            s.last_error = Some(end.to_string());
            if was {
                s.last_event = Some((SystemTime::now(), format!("disconnected: {end}")));
            }
        });
        was
    }
}

/// `e`'s text followed by each source's that it does not already contain.
fn with_sources(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        source = s.source();
    }
    text
}

fn describe(member: &Option<String>, server: &Option<String>) -> String {
    match (member, server) {
        (None, _) => "no leader".to_owned(),
        (Some(m), Some(s)) => format!("{m} (server {s})"),
        (Some(m), None) => format!("{m} (no configured server)"),
    }
}

async fn timeout<T>(
    f: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, SessionEnd> {
    Ok(tokio::time::timeout(REQUEST_TIMEOUT, f)
        .await
        .map_err(|_| SessionEnd::Timeout)??)
}
