//! The stats HTTP server (axum): `/` HTML, `/;csv` or `/?format=csv` HAProxy's CSV, `/;json`
//! the snapshot as JSON, `/metrics` Prometheus. HAProxy's spellings keep working too:
//! `/;csv;norefresh`, `/?stats;csv`. `POST /admin/servers/{listener}/{server}` is the admin
//! endpoint (see `admin_endpoint`); `POST /admin/reload`, under the same access rule, reloads the
//! configuration file (`patroxy reload`).
use std::{io, net::SocketAddr, sync::Arc, thread};

use axum::{
    Router,
    extract::{ConnectInfo, Path, State},
    http::{HeaderMap, StatusCode, Uri, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{
    admin_endpoint::{self, Peer},
    collect, connections, csv,
    history::StatsHistory,
    html,
    model::StatsSnapshot,
    prometheus,
};
use crate::{
    config::AdminAccess,
    dataplane::maps::{LiveBytes, OpenSessions},
    operator_state::AdminWriter,
    proxy::StatsSource,
    reload::Reloader,
};

struct Shared {
    source: Arc<dyn StatsSource>,
    /// The one writer of the operator's states, for the admin endpoint.
    admin: Arc<AdminWriter>,
    /// Reloads the configuration, and says how the last reload went.
    reloader: Reloader,
    history: Arc<StatsHistory>,
    started: Instant,
}

/// Binds the stats server's socket. The daemon does this before it accepts any client, so a
/// taken port fails the start-up rather than a proxy already in service.
pub fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    std::net::TcpListener::bind(addr)
}

/// Serves the stats of `source` on `listener` (from [`bind`]), and the admin endpoint through
/// `admin`, on the stats server's own thread (see `connections`) until `stop`. Join the thread
/// to know its connections are closed.
pub fn serve(
    listener: std::net::TcpListener,
    source: Arc<dyn StatsSource>,
    admin: Arc<AdminWriter>,
    reloader: Reloader,
    stop: CancellationToken,
) -> io::Result<thread::JoinHandle<()>> {
    let config = source.config();
    let backends = config.listeners.iter().map(|l| l.servers.len()).sum();
    let maxconn = config.stats.as_ref().map_or(1, |s| s.maxconn as usize);
    let history = Arc::new(StatsHistory::new(backends, config.listeners.len()));
    let follow = history.clone().run(source.clone(), stop.clone());
    let shared = Arc::new(Shared {
        source,
        admin,
        reloader,
        history,
        started: Instant::now(),
    });
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/admin/servers/{listener}/{server}", post(set_state))
        .route("/admin/reload", post(reload))
        .fallback(get(page))
        .with_state(shared);
    connections::spawn(listener, app, maxconn, follow, stop)
}

/// What `/` was asked for.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Format {
    Html { refresh: bool },
    Csv,
    Json,
}

/// Reads HAProxy's `;csv`, `;json`, `;norefresh` options from the path or the query, and
/// `format=csv|json|html` from the query. `None` for paths other than `/`.
pub(crate) fn format(uri: &Uri) -> Option<Format> {
    let mut parts = uri.path().split(';');
    if parts.next() != Some("/") {
        return None;
    }
    let query = uri.query().unwrap_or("");
    let options: Vec<&str> = parts
        .chain(query.split([';', '&']))
        .map(|o| o.strip_prefix("format=").unwrap_or(o))
        .collect();
    Some(if options.contains(&"csv") {
        Format::Csv
    } else if options.contains(&"json") {
        Format::Json
    } else {
        Format::Html {
            refresh: !options.contains(&"norefresh"),
        }
    })
}

async fn page(State(shared): State<Arc<Shared>>, uri: Uri) -> Response {
    let Some(format) = format(&uri) else {
        return (
            StatusCode::NOT_FOUND,
            "not found: try /, /;csv, /;json or /metrics\n",
        )
            .into_response();
    };
    let snap = snapshot(&shared).await;
    let (content_type, body) = match format {
        Format::Html { refresh } => ("text/html; charset=utf-8", html::render(&snap, refresh)),
        Format::Csv => ("text/plain; charset=utf-8", csv::render(&snap)),
        Format::Json => (
            "application/json",
            serde_json::to_string_pretty(&snap).expect("the snapshot serializes"),
        ),
    };
    respond(content_type, body)
}

async fn set_state(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Path((listener, server)): Path<(String, String)>,
    headers: HeaderMap,
    uri: Uri,
    body: String,
) -> Response {
    let access = shared
        .source
        .config()
        .stats
        .as_ref()
        .map_or(AdminAccess::Off, |s| s.admin);
    let header = |name| headers.get(name).and_then(|v| v.to_str().ok());
    let request = admin_endpoint::Request {
        peer,
        origin: header(header::ORIGIN),
        host: header(header::HOST),
        listener: &listener,
        server: &server,
        query: uri.query(),
        body: &body,
    };
    let (status, text) = admin_endpoint::set_state(access, &shared.admin, &request);
    if status != StatusCode::OK {
        info!(peer = %peer.remote, status = status.as_u16(), "admin request refused: {}", text.trim_end());
    }
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        text,
    )
        .into_response()
}

/// Reloads the configuration: 200 with what changed, 400 with every reason it was refused (the
/// running configuration is kept), 403 for a peer the admin rule refuses.
async fn reload(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
) -> Response {
    let access = shared
        .source
        .config()
        .stats
        .as_ref()
        .map_or(AdminAccess::Off, |s| s.admin);
    let header = |name| headers.get(name).and_then(|v| v.to_str().ok());
    let (status, text) = match admin_endpoint::forbidden_caller(
        access,
        peer,
        header(header::ORIGIN),
        header(header::HOST),
    ) {
        Some(why) => (StatusCode::FORBIDDEN, format!("forbidden: {why}\n")),
        None => {
            info!(peer = %peer.remote, "reload requested over the admin endpoint");
            match shared.reloader.reload().await {
                Ok(summary) if summary.changes.is_empty() => (
                    StatusCode::OK,
                    "configuration reloaded: nothing changed\n".into(),
                ),
                Ok(summary) => (
                    StatusCode::OK,
                    format!("configuration reloaded:\n{}\n", summary.changes.join("\n")),
                ),
                Err(e) => (
                    StatusCode::BAD_REQUEST,
                    format!("reload refused, running configuration kept:\n{e}\n"),
                ),
            }
        }
    };
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        text,
    )
        .into_response()
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    let snap = snapshot(&shared).await;
    let body = prometheus::render(&snap, &shared.history.check_durations);
    respond(prometheus::CONTENT_TYPE, body)
}

fn respond(content_type: &'static str, body: String) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

async fn snapshot(shared: &Shared) -> StatsSnapshot {
    let live = match shared.source.pin_dir() {
        Some(dir) => {
            let dir = dir.to_owned();
            // Walking SESSIONS is one syscall per entry: keep it off the async workers.
            let read = move || OpenSessions::read(&dir).map(|s| s.bytes_per_backend());
            match tokio::task::spawn_blocking(read).await {
                Ok(Ok(live)) => live,
                Ok(Err(e)) => {
                    warn!("stats: reading SESSIONS failed ({e}); bytes of open sessions missing");
                    LiveBytes::new()
                }
                Err(e) => {
                    warn!("stats: SESSIONS reader panicked: {e}");
                    LiveBytes::new()
                }
            }
        }
        None => LiveBytes::new(),
    };
    collect::snapshot(
        shared.source.as_ref(),
        &shared.history,
        &live,
        shared.started,
        &shared.reloader.status(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(uri: &str) -> Option<Format> {
        format(&uri.parse().unwrap())
    }

    #[test]
    fn haproxy_spellings() {
        assert_eq!(f("/"), Some(Format::Html { refresh: true }));
        assert_eq!(f("/;norefresh"), Some(Format::Html { refresh: false }));
        assert_eq!(f("/;csv"), Some(Format::Csv));
        assert_eq!(f("/;csv;norefresh"), Some(Format::Csv));
        assert_eq!(f("/?format=csv"), Some(Format::Csv));
        assert_eq!(f("/?stats;csv"), Some(Format::Csv));
        assert_eq!(f("/;json"), Some(Format::Json));
        assert_eq!(f("/?format=json"), Some(Format::Json));
        assert_eq!(f("/favicon.ico"), None);
    }
}
