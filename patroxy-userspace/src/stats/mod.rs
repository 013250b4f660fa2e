//! Observability: the stats page (HTML), HAProxy's CSV, JSON, Prometheus metrics and the
//! operator's CLI commands. Stats only read the daemon's state, with one exception: the admin
//! endpoint, which sets servers' READY/DRAIN/MAINT states in [`crate::operator_state`].
//!
//! # Layout
//! - `model`: [`StatsSnapshot`], plain serializable data every renderer takes.
//! - `collect`: builds a snapshot from the proxy (health snapshot, backend table, counters) and
//!   the kernel's SESSIONS map (bytes of open sockmap sessions).
//! - `history`: what is remembered between requests: session rates, check-duration histograms,
//!   leader changes, monotonic byte counters.
//! - `html`, `csv`, `prometheus`: the renderers, pure functions of a snapshot.
//! - `server`: the axum HTTP server.
//! - `admin_endpoint`: `POST /admin/servers/{listener}/{server}` and who may call it.
//! - `cli`: `patroxy status`, `patroxy sessions`, `patroxy maps`, `patroxy set-state`.
pub mod admin_endpoint;
pub mod cli;
pub mod collect;
pub mod csv;
pub mod history;
pub mod html;
pub mod model;
pub mod prometheus;
pub mod server;

pub use model::StatsSnapshot;
pub use server::{bind, serve};
