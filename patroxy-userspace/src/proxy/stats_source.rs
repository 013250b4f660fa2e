//! What the stats read of the proxy, and nothing they could steer it with.
use std::{path::Path, sync::Arc};

use patroxy_common::BackendEntry;
use tokio::sync::watch;

use super::{
    Proxy,
    counters::{BackendCounters, ListenerCounters},
};
use crate::{config::Config, dataplane::tc::TcCounters, server_ids::ServerIds, view::View};

/// The proxy as the stats server sees it. [`Proxy`] implements it; the stats hold nothing else
/// of the proxy (the operator-state writer of their admin endpoint is handed to them apart).
pub trait StatsSource: Send + Sync {
    /// The running configuration (a reload swaps it).
    fn config(&self) -> Arc<Config>;
    /// The view routing reads, as applied to the data path; the receiver sees every change.
    fn view(&self) -> watch::Receiver<Arc<View>>;
    /// The servers' backend ids, which the counters, BACKENDS and SESSIONS are keyed by.
    fn server_ids(&self) -> &ServerIds;
    fn backend_counters(&self, id: u32) -> &BackendCounters;
    fn listener_counters(&self, listener: usize) -> &ListenerCounters;
    /// Backend `id`'s BACKENDS entry: its open sessions and whether the kernel fences it.
    fn backend_entry(&self, id: u32) -> BackendEntry;
    /// "sockmap", "sockmap+tc" or "fallback".
    fn data_path(&self) -> &'static str;
    /// The packet-level splice's counters, with `datapath = "tc"`.
    fn tc_counters(&self) -> Option<&TcCounters>;
    /// Where the kernel's maps are pinned, on the sockmap data path: the bytes of open sessions
    /// are read there.
    fn pin_dir(&self) -> Option<&Path>;
}

impl StatsSource for Proxy {
    fn config(&self) -> Arc<Config> {
        Proxy::config(self)
    }

    fn view(&self) -> watch::Receiver<Arc<View>> {
        self.view.clone()
    }

    fn server_ids(&self) -> &ServerIds {
        &self.ids
    }

    fn backend_counters(&self, id: u32) -> &BackendCounters {
        self.counters(id)
    }

    fn listener_counters(&self, listener: usize) -> &ListenerCounters {
        &self.listener_counters[listener]
    }

    fn backend_entry(&self, id: u32) -> BackendEntry {
        self.backends.get(id).unwrap_or_default()
    }

    fn data_path(&self) -> &'static str {
        self.dataplane.name()
    }

    fn tc_counters(&self) -> Option<&TcCounters> {
        self.dataplane.tc().map(|tc| &tc.counters)
    }

    fn pin_dir(&self) -> Option<&Path> {
        self.dataplane.kernel().map(|k| k.pin_dir())
    }
}
