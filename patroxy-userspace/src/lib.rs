//! patroxy: PostgreSQL clients in front of a Patroni cluster, with the byte forwarding spliced in
//! the kernel.
//!
//! # Layout
//! State flows one way, and so do the imports (a module uses only those before it here):
//! - `config`: the file, parsed and validated once into typed values.
//! - `server_ids`: the backend id of each server, kept across reloads and upgrades.
//! - `patroni`: the health checker; it owns check state and publishes a `HealthSnapshot` of
//!   what the checks say, and nothing else.
//! - `operator_state`: the operator's READY/DRAIN/MAINT of each server and their one writer
//!   (`AdminWriter`), which the stats server's admin endpoint drives.
//! - `view`: the checker's snapshot with the operator's states folded in: the one `View` of
//!   the servers that routing, the data path and the stats read.
//! - `routing`: picks a backend from the view, a pure function.
//! - `dataplane`: splices each established pair (sockmap in the kernel, or the userspace
//!   fallback) and tears it down; `dataplane::maps` names the kernel's maps and reads the
//!   pinned ones for the stats and the operator's commands.
//! - `fdstore`: systemd's file descriptor store: listeners, spliced sessions' sockets and the
//!   servers' health states kept there across a crash, and taken back at start.
//! - `firewall`: the XDP allowlist of `[[allow]]`/`[xdp]`, attached before any port is bound;
//!   a reload rewrites its rules in place.
//! - `proxy`: accepts clients, enforces limits and connects; it applies each new view to the
//!   data path (mark-down) before publishing it, and offers the stats a read-only
//!   `StatsSource`.
//! - `fd_limit`: the open-files limit raised to what `maxconn` needs, at start and on reload.
//! - `reload`: the one entry point of a configuration reload (SIGHUP, `patroxy reload`): re-reads
//!   the file and applies what changed to the checker and the proxy, or keeps the running config.
//! - `stats`: reads all of the above and serves the page, CSV, JSON and metrics.
//! - `upgrade`: hands listeners, pinned maps and spliced sessions to a successor process
//!   (`SIGUSR2`, `patroxy upgrade`), and takes them over in that successor.
//! - `control`: the runtime socket `patroxy ctl` speaks to: the stats' reads, the operator's
//!   states and the daemon's reload, behind file permissions.
//! - `privileges`: the capabilities kept after start-up, and dropping the rest on every thread.
//! - `capped_accept`: the accept loop with a connection cap that the stats server and the
//!   runtime socket share.
//! - `lifecycle`: start-up in dependency order, signals, reload, drain, upgrade and shutdown.
//! - `import_haproxy`: a HAProxy configuration rewritten as this crate's TOML (`patroxy
//!   import-haproxy`); it uses `config` only, to check what it writes.
//!
//! The operator's commands (`patroxy status`, `set-state`, `upgrade`, `sessions`, `maps`) are the
//! binary's `cli` module, on top of this library.
pub mod capped_accept;
pub mod config;
pub mod control;
pub mod dataplane;
pub mod fd_limit;
pub mod fdstore;
pub mod firewall;
pub mod import_haproxy;
pub mod lifecycle;
pub mod operator_state;
pub mod patroni;
pub mod privileges;
pub mod proxy;
pub mod reload;
pub mod routing;
pub mod server_ids;
pub mod stats;
pub mod upgrade;
pub mod view;

/// The eBPF object built by build.rs (aya-build) from the patroxy-ebpf crate.
pub const EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/patroxy"));

/// The XDP allowlist's eBPF object (patroxy-ebpf's `patroxy-xdp` binary), loaded on its own so
/// the allowlist works whatever the sockmap data path does.
pub const EBPF_XDP_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/patroxy-xdp"));
