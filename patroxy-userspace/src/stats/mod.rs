//! Observability: the stats page (HTML), HAProxy's CSV, JSON, Prometheus metrics, and the table
//! `patroxy status` prints. Stats only read the daemon's state, through
//! [`StatsSource`](crate::proxy::StatsSource), with one exception: the admin endpoint, which
//! sets servers' READY/DRAIN/MAINT states with the
//! [`AdminWriter`](crate::operator_state::AdminWriter) it is handed.
//!
//! # Layout
//! - `model`: [`StatsSnapshot`], plain serializable data every renderer takes.
//! - `collect`: builds a snapshot from the proxy (its view of the servers, backend table,
//!   counters) and the bytes of open sockmap sessions (`dataplane::maps::OpenSessions`).
//! - `history`: what is remembered between requests: session rates, check-duration histograms,
//!   leader changes, monotonic byte counters.
//! - `html`, `csv`, `prometheus`, `text`: the renderers, pure functions of a snapshot (`text`
//!   is the terminal table of `patroxy status`; the operator's commands themselves are the
//!   binary's `cli` module).
//! - `server`: the axum HTTP server's routes, bound before the proxy accepts clients.
//! - `connections`: its own thread and runtime, connection cap, timeouts and shutdown: what
//!   keeps it from taking file descriptors or time from the proxy.
//! - `sessions`: the open sockmap sessions as rows, a table or JSON (`patroxy sessions`, the
//!   runtime socket's `show sessions`).
//! - `admin_endpoint`: `POST /admin/servers/{listener}/{server}` and who may call it.
pub mod admin_endpoint;
pub mod collect;
pub mod connections;
pub mod csv;
pub mod history;
pub mod html;
pub mod model;
pub mod prometheus;
pub mod server;
pub mod sessions;
pub mod text;

pub use model::StatsSnapshot;
pub use server::{bind, serve};
