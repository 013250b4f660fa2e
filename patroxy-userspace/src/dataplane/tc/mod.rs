//! The packet-level splice (`datapath = "tc"`): a session starts on the sockmap path and, at the
//! first moment both directions are idle and acknowledged, is handed to the TC program
//! (`patroxy-ebpf/src/tc.rs`), which then forwards its packets between the two connections
//! itself. `attach` puts the programs on the configured interfaces, `handoff` moves a session,
//! `flow` watches a handed-off session to its end and `repair` has the socket options;
//! `open_flows` reads the pinned flows for the stats and `patroxy sessions`.
mod attach;
mod flow;
mod handoff;
mod open_flows;
mod repair;

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use aya::{
    Ebpf,
    maps::{HashMap, MapData},
};
pub(super) use flow::Flow;
pub(super) use handoff::{Attempt, Baseline, try_hand_off};
pub use open_flows::{OpenFlows, SessionFlows};
use patroxy_common::tc::{FlowEntry, FlowKey, SYN_TO_BACKEND, SYN_TO_LISTENER};
use tracing::info;

use super::loader::LoadError;

/// FLOWS under the pin directory.
pub const MAP_FLOWS: &str = "FLOWS";
const MAP_SYN_PORTS: &str = "SYN_PORTS";

/// The TC programs attached and their maps.
pub struct TcPath {
    flows: Mutex<HashMap<MapData, FlowKey, FlowEntry>>,
    /// Each configured interface's index and IPv4 addresses: a leg leaves by the interface that
    /// holds its local address.
    interfaces: Vec<(u32, Vec<Ipv4Addr>)>,
    /// Detached (unpinned and closed) on drop.
    _links: Vec<attach::TcLink>,
    /// FLOWS' pin, for bpftool; removed on drop.
    flows_pin: PathBuf,
    pub counters: TcCounters,
}

/// How sessions fared with the hand-off, for the log and the tests.
#[derive(Debug, Default)]
pub struct TcCounters {
    /// Sessions handed to the TC program.
    pub handed_off: AtomicU64,
    /// Attempts given up because a byte moved during the hand-off (retried later).
    pub retried: AtomicU64,
    /// Sessions that stay on the sockmap path: IPv6.
    pub ipv6: AtomicU64,
    /// Sessions that stay on the sockmap path: options that do not match (timestamps or SACK
    /// negotiated, window scales or MSS differing between the legs), or a leg's interface is
    /// not one the programs are attached to.
    pub mismatched: AtomicU64,
    /// Sessions the TC program carries now (handed off, not yet ended).
    pub carried: AtomicU64,
}

impl TcCounters {
    pub fn snapshot(&self) -> [u64; 4] {
        [
            self.handed_off.load(Ordering::Relaxed),
            self.retried.load(Ordering::Relaxed),
            self.ipv6.load(Ordering::Relaxed),
            self.mismatched.load(Ordering::Relaxed),
        ]
    }
}

impl TcPath {
    /// Attaches both programs of `ebpf` to every interface in `interfaces` (tcx, links pinned
    /// under `pin_dir` and replacing what a crashed run left there) and tells them which SYNs
    /// to strip: to `listener_ports` arriving, to `backend_ports` leaving.
    pub fn attach(
        ebpf: &mut Ebpf,
        pin_dir: &Path,
        interfaces: &[String],
        listener_ports: &[u16],
        backend_ports: &[u16],
    ) -> Result<Self, LoadError> {
        let flows_pin = pin_dir.join(MAP_FLOWS);
        let _ = std::fs::remove_file(&flows_pin);
        ebpf.map(MAP_FLOWS)
            .ok_or(LoadError::Missing(MAP_FLOWS))?
            .pin(&flows_pin)
            .map_err(|e| LoadError::Pin {
                path: flows_pin.clone(),
                msg: e.to_string(),
            })?;
        let flows: HashMap<MapData, FlowKey, FlowEntry> = take(ebpf, MAP_FLOWS)?;
        let mut syn_ports: HashMap<MapData, u16, u8> = take(ebpf, MAP_SYN_PORTS)?;
        for (ports, kind) in [
            (listener_ports, SYN_TO_LISTENER),
            (backend_ports, SYN_TO_BACKEND),
        ] {
            for port in ports {
                syn_ports
                    .insert(port, kind, 0)
                    .map_err(|e| LoadError::Map(MAP_SYN_PORTS, e))?;
            }
        }
        let links = attach::attach_all(ebpf, pin_dir, interfaces)?;
        let interfaces = interfaces
            .iter()
            .map(|name| (attach::ifindex(name).unwrap_or(0), ipv4_addresses(name)))
            .collect();
        info!(
            ?interfaces,
            "packet-level splice attached (datapath = \"tc\")"
        );
        Ok(Self {
            flows: Mutex::new(flows),
            interfaces,
            _links: links,
            flows_pin,
            counters: TcCounters::default(),
        })
    }

    /// The configured interface that holds `addr`.
    fn interface_of(&self, addr: Ipv4Addr) -> Option<u32> {
        self.interfaces
            .iter()
            .find(|(_, addrs)| addrs.contains(&addr))
            .map(|(index, _)| *index)
    }
}

impl Drop for TcPath {
    fn drop(&mut self) {
        let [handed_off, retried, ipv6, mismatched] = self.counters.snapshot();
        // A target of its own, so a run at `warn` can still ask for this line
        // (PATROXY_LOG=warn,patroxy_tc=info: the bench does).
        info!(
            target: "patroxy_tc",
            handed_off,
            retried,
            ipv6,
            mismatched,
            "packet-level splice detached; sessions handed off, hand-offs retried, sessions left on sockmap (IPv6, options)"
        );
        let _ = std::fs::remove_file(&self.flows_pin);
    }
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, LoadError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(LoadError::Missing(name))?;
    T::try_from(map).map_err(|e| LoadError::Map(name, e))
}

/// The IPv4 addresses of interface `name` (getifaddrs).
fn ipv4_addresses(name: &str) -> Vec<Ipv4Addr> {
    let mut out = Vec::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list`, freed below; each entry's pointers are valid until then.
    unsafe {
        if libc::getifaddrs(&mut list) != 0 {
            return out;
        }
        let mut cur = list;
        while !cur.is_null() {
            let ifa = &*cur;
            if !ifa.ifa_addr.is_null()
                && i32::from((*ifa.ifa_addr).sa_family) == libc::AF_INET
                && std::ffi::CStr::from_ptr(ifa.ifa_name).to_bytes() == name.as_bytes()
            {
                let sin = &*ifa.ifa_addr.cast::<libc::sockaddr_in>();
                out.push(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
            }
            cur = ifa.ifa_next;
        }
        libc::freeifaddrs(list);
    }
    out
}
