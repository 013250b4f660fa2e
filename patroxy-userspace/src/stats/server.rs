//! The stats HTTP server (axum): `/` HTML, `/;csv` or `/?format=csv` HAProxy's CSV, `/;json`
//! the snapshot as JSON, `/metrics` Prometheus. HAProxy's spellings keep working too:
//! `/;csv;norefresh`, `/?stats;csv`. `POST /admin/servers/{listener}/{server}` is the admin
//! endpoint (see `admin_endpoint`); `POST /admin/reload`, under the same access rule, reloads the
//! configuration file (`patroxy reload`).
use std::{
    io,
    net::SocketAddr,
    sync::{Arc, atomic::Ordering::Relaxed},
    thread,
};

use axum::{
    Router,
    extract::{ConnectInfo, Path, State},
    http::{HeaderMap, StatusCode, Uri, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::{
    admin_endpoint::{self, Peer},
    collect, connections, csv,
    history::StatsHistory,
    html,
    model::StatsSnapshot,
    prometheus,
};
use crate::{
    config::{AdminAccess, AdminToken, Config},
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
    let ids = source.server_ids().backends().map(|(_, id)| id).collect();
    let maxconn = config.stats.as_ref().map_or(1, |s| s.maxconn as usize);
    let history = Arc::new(StatsHistory::new(ids, config.listeners.len()));
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
    let config = shared.source.config();
    let (access, token) = admin_rule(&config);
    let request = admin_endpoint::Request {
        listener: &listener,
        server: &server,
        query: uri.query(),
        body: &body,
        ..admin_caller(peer, &headers)
    };
    let (status, text) = admin_endpoint::set_state(access, token, &shared.admin, &request);
    if status != StatusCode::OK {
        info!(peer = %peer.remote, status = status.as_u16(), "admin request refused: {}", text.trim_end());
    }
    admin_response(&shared, status, text)
}

/// Reloads the configuration: 200 with what changed, 400 with every reason it was refused (the
/// running configuration is kept), 403/401 for a caller the admin rule or token refuses.
async fn reload(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
) -> Response {
    let config = shared.source.config();
    let (access, token) = admin_rule(&config);
    let request = admin_caller(peer, &headers);
    let (status, text) = match admin_endpoint::refused_reload(access, token, &request) {
        Some(refusal) => refusal,
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
    admin_response(&shared, status, text)
}

/// Who may use the admin endpoint: `[stats] admin` and, when set, its token.
fn admin_rule(config: &Config) -> (AdminAccess, Option<&AdminToken>) {
    let stats = config.stats.as_ref();
    (
        stats.map_or(AdminAccess::Off, |s| s.admin),
        stats.and_then(|s| s.admin_token.as_ref()),
    )
}

/// The caller of an admin request as the access rules see it (no server named yet).
fn admin_caller(peer: Peer, headers: &HeaderMap) -> admin_endpoint::Request<'_> {
    let header = |name| headers.get(name).and_then(|v| v.to_str().ok());
    admin_endpoint::Request {
        peer,
        origin: header(header::ORIGIN),
        host: header(header::HOST),
        authorization: header(header::AUTHORIZATION),
        listener: "",
        server: "",
        query: None,
        body: "",
    }
}

/// A plain-text admin answer; a 401 is counted and says which scheme to use.
fn admin_response(shared: &Shared, status: StatusCode, text: String) -> Response {
    let mut response = (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        text,
    )
        .into_response();
    if status == StatusCode::UNAUTHORIZED {
        shared.history.admin_unauthorized.fetch_add(1, Relaxed);
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer realm=\"patroxy admin\""),
        );
    }
    response
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
    let live = collect::live_bytes(shared.source.pin_dir()).await;
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
