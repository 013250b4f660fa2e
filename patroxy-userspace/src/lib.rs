//! patroxy: PostgreSQL clients in front of a Patroni cluster, with the byte forwarding spliced in
//! the kernel.
//!
//! # Layout
//! State flows one way: `config` is parsed and validated once into typed values; the health
//! checker in `patroni` owns check state and publishes server states; `operator_state` holds
//! the operator's READY/DRAIN/MAINT states, which the proxy folds into the checker's view;
//! `routing` reads that view and picks a backend; `proxy` accepts clients, enforces limits and
//! connects; `dataplane` splices each established pair (sockmap in the kernel, or the userspace
//! fallback) and tears it down; `lifecycle` owns signals and shutdown; `stats` reads all of them
//! (its admin endpoint is the one writer of `operator_state`).
pub mod config;
pub mod dataplane;
pub mod lifecycle;
pub mod operator_state;
pub mod patroni;
pub mod proxy;
pub mod routing;
pub mod stats;
pub mod view;

/// The eBPF object built by build.rs (aya-build) from the patroxy-ebpf crate.
pub const EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/patroxy"));
