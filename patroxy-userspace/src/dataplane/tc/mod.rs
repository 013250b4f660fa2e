//! The packet-level splice (`datapath = "tc"`): a session starts on the sockmap path and, at the
//! first moment both directions are idle and acknowledged (or, for a session still busy after
//! 250 ms, behind a short fence), is handed to the TC program (`patroxy-ebpf/src/tc.rs`), which
//! then forwards its packets between the two connections itself. `attach` puts the programs on
//! the configured interfaces, `schedule` says when to try, `handoff` moves a session (`nudge`
//! hurries what its fence dropped), `flow` watches a handed-off session to its end and
//! `repair` has the socket options; `open_flows` reads the pinned flows for the stats and
//! `patroxy sessions`.
mod attach;
mod flow;
mod handoff;
mod nudge;
mod open_flows;
mod repair;
mod schedule;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use aya::{
    Ebpf,
    maps::{HashMap, MapData},
};
pub(super) use flow::{Flow, FlowOutcome};
pub use handoff::Baseline;
pub(super) use handoff::{Attempt, carried_flow, try_hand_off};
pub use open_flows::{OpenFlows, SessionFlows};
use patroxy_common::tc::{FlowEntry, FlowKey, HeldSegment, SYN_TO_LISTENER};
pub(super) use schedule::Schedule;
use tokio::net::{TcpSocket, TcpStream};
use tracing::{debug, info};

use super::loader::{LoadError, open_pinned, take_map};

/// FLOWS under the pin directory.
pub const MAP_FLOWS: &str = "FLOWS";
const MAP_SYN_PORTS: &str = "SYN_PORTS";
const MAP_SYN_SOCKETS: &str = "SYN_SOCKETS";
/// The segments a hand-off's fence dropped first, per direction (sized down when tc is off).
pub const MAP_HELD: &str = "HELD";
/// Pinned while the programs are attached: a successor takes them over.
const PINNED_MAPS: [&str; 4] = [MAP_FLOWS, MAP_HELD, MAP_SYN_SOCKETS, MAP_SYN_PORTS];

/// The programs' maps, as `attach` takes them from the object or `adopt` opens their pins.
struct Maps {
    flows: HashMap<MapData, FlowKey, FlowEntry>,
    syn_sockets: HashMap<MapData, u64, u8>,
    held: HashMap<MapData, FlowKey, HeldSegment>,
    syn_ports: HashMap<MapData, u16, u8>,
}

/// The TC programs attached and their maps.
pub struct TcPath {
    flows: Mutex<HashMap<MapData, FlowKey, FlowEntry>>,
    /// Cookies of the backend sockets connecting now: the egress program strips their SYNs.
    syn_sockets: Mutex<HashMap<MapData, u64, u8>>,
    /// Each configured interface's index and addresses: a leg leaves by the interface that
    /// holds its local address.
    interfaces: Vec<(u32, Vec<IpAddr>)>,
    /// Detached (unpinned and closed) on drop, unless handed over.
    links: Vec<attach::TcLink>,
    /// The maps' pins (FLOWS for bpftool and `patroxy sessions`, all four for a successor);
    /// removed on drop, unless handed over.
    pins: Vec<PathBuf>,
    /// Set once a successor took the programs and maps over (or, in a successor, until it
    /// serves): `drop` leaves the attachment and the pins for it.
    handed_over: AtomicBool,
    /// Raw sockets for the duplicate ACKs and held segments after a fenced hand-off.
    nudger: nudge::Nudger,
    held: Mutex<HashMap<MapData, FlowKey, HeldSegment>>,
    pub counters: TcCounters,
}

/// How sessions fared with the hand-off, for the log and the tests.
#[derive(Debug, Default)]
pub struct TcCounters {
    /// Sessions handed to the TC program.
    pub handed_off: AtomicU64,
    /// Of those, the ones handed off behind a fence.
    pub fenced: AtomicU64,
    /// Attempts given up because a byte moved during the hand-off (retried later).
    pub retried: AtomicU64,
    /// Sessions that stay on the sockmap path: one leg IPv4, the other IPv6.
    pub mixed_family: AtomicU64,
    /// Sessions that stay on the sockmap path: options that do not match (timestamps
    /// negotiated, SACK on one leg only, window scales or MSS differing between the legs), or a
    /// leg's interface is not one the programs are attached to.
    pub mismatched: AtomicU64,
    /// Sessions the TC program carries now (handed off, not yet ended).
    pub carried: AtomicU64,
    /// Senders told by duplicate ACKs, after a fenced hand-off, to retransmit what was dropped.
    pub nudged: AtomicU64,
    /// Segments a fence dropped that the proxy sent on itself after the hand-off.
    pub forwarded: AtomicU64,
    /// Segments a fence dropped that the proxy gave back to its own sockets after an abandoned
    /// attempt.
    pub given_back: AtomicU64,
}

impl TcCounters {
    pub fn snapshot(&self) -> [u64; 4] {
        [
            self.handed_off.load(Ordering::Relaxed),
            self.retried.load(Ordering::Relaxed),
            self.mixed_family.load(Ordering::Relaxed),
            self.mismatched.load(Ordering::Relaxed),
        ]
    }
}

impl TcPath {
    /// Attaches both programs of `ebpf` to every interface in `interfaces` (tcx, links pinned
    /// under `pin_dir` and replacing what a crashed run left there) and tells them which
    /// arriving SYNs to strip: those to `listener_ports` (the leaving ones are registered per
    /// socket by [`TcPath::connect`]).
    pub fn attach(
        ebpf: &mut Ebpf,
        pin_dir: &Path,
        interfaces: &[String],
        listener_ports: &[u16],
    ) -> Result<Self, LoadError> {
        let pins = PINNED_MAPS.map(|name| pin_dir.join(name)).to_vec();
        for (name, pin) in PINNED_MAPS.iter().zip(&pins) {
            let _ = std::fs::remove_file(pin);
            ebpf.map(name)
                .ok_or(LoadError::Missing(name))?
                .pin(pin)
                .map_err(|e| LoadError::Pin {
                    path: pin.clone(),
                    msg: e.to_string(),
                })?;
        }
        let maps = Maps {
            flows: take_map(ebpf, MAP_FLOWS)?,
            syn_sockets: take_map(ebpf, MAP_SYN_SOCKETS)?,
            held: take_map(ebpf, MAP_HELD)?,
            syn_ports: take_map(ebpf, MAP_SYN_PORTS)?,
        };
        let links = attach::attach_all(ebpf, pin_dir, interfaces)?;
        info!("packet-level splice attached (datapath = \"tc\")");
        Self::new(
            maps,
            links,
            pins,
            interfaces,
            listener_ports,
            nudge::Nudger::open(),
        )
    }

    /// Takes over what a predecessor (an upgrade, a structural reload) or a crashed run left
    /// in `pin_dir`: the programs stay attached to `interfaces` and the flows they carry go on.
    /// Needs no capability beyond access to the pins; `raw_sockets` are the predecessor's, for
    /// the duplicate ACKs (a process started afresh, after a crash, opens its own).
    pub fn adopt(
        pin_dir: &Path,
        interfaces: &[String],
        listener_ports: &[u16],
        raw_sockets: Option<[Option<std::os::fd::OwnedFd>; 2]>,
    ) -> Result<Self, LoadError> {
        let maps = Maps {
            flows: open_pinned(pin_dir, MAP_FLOWS)?,
            held: open_pinned(pin_dir, MAP_HELD)?,
            syn_sockets: open_pinned(pin_dir, MAP_SYN_SOCKETS)?,
            syn_ports: open_pinned(pin_dir, MAP_SYN_PORTS)?,
        };
        let pins = PINNED_MAPS.map(|name| pin_dir.join(name)).to_vec();
        let links = attach::adopt_all(pin_dir, interfaces)?;
        let nudger = match raw_sockets {
            Some(handed) => nudge::Nudger::from_handed(handed),
            None => nudge::Nudger::open(),
        };
        let tc = Self::new(maps, links, pins, interfaces, listener_ports, nudger)?;
        // Until this process serves: a failed start leaves its predecessor's attachment alone.
        tc.leave_pins_on_exit(true);
        info!("packet-level splice taken over attached (datapath = \"tc\")");
        Ok(tc)
    }

    fn new(
        mut maps: Maps,
        links: Vec<attach::TcLink>,
        pins: Vec<PathBuf>,
        interfaces: &[String],
        listener_ports: &[u16],
        nudger: nudge::Nudger,
    ) -> Result<Self, LoadError> {
        // A successor's listeners may differ: ports no listener has any more stop being
        // stripped, new ones start.
        let stale: Vec<u16> = maps
            .syn_ports
            .keys()
            .flatten()
            .filter(|p| !listener_ports.contains(p))
            .collect();
        for port in stale {
            let _ = maps.syn_ports.remove(&port);
        }
        for port in listener_ports {
            maps.syn_ports
                .insert(port, SYN_TO_LISTENER, 0)
                .map_err(|e| LoadError::Map(MAP_SYN_PORTS, e))?;
        }
        let interfaces = interfaces
            .iter()
            .map(|name| (attach::ifindex(name).unwrap_or(0), addresses(name)))
            .collect();
        info!(?interfaces, "packet-level splice's interfaces");
        Ok(Self {
            flows: Mutex::new(maps.flows),
            syn_sockets: Mutex::new(maps.syn_sockets),
            interfaces,
            links,
            pins,
            handed_over: AtomicBool::new(false),
            nudger,
            held: Mutex::new(maps.held),
            counters: TcCounters::default(),
        })
    }

    /// Whether this process's exit leaves the programs attached and the maps pinned: set once
    /// a successor holds them (and in a successor until it serves).
    pub fn leave_pins_on_exit(&self, leave: bool) {
        self.handed_over.store(leave, Ordering::SeqCst);
    }

    /// The raw sockets of the duplicate ACKs, [IPv4, IPv6], for a successor.
    pub fn raw_sockets(&self) -> [Option<std::os::fd::BorrowedFd<'_>>; 2] {
        self.nudger.sockets()
    }

    /// Connects a backend socket whose SYN the egress program strips of timestamps and SACK:
    /// its cookie is in SYN_SOCKETS while it connects (retransmitted SYNs included). Matching
    /// the socket rather than the server's port leaves other local clients of that port alone;
    /// a cookie rather than SO_MARK leaves routing and netfilter, which may act on marks, alone.
    pub async fn connect(&self, addr: SocketAddr) -> std::io::Result<TcpStream> {
        let socket = match addr {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        let _connecting = Connecting::register(self, super::sockopt::cookie(&socket)?);
        socket.connect(addr).await
    }

    /// The FLOWS entries of both directions of a session (absent ones as `None`).
    fn flow_entries(&self, keys: &[FlowKey; 2]) -> [Option<FlowEntry>; 2] {
        let flows = self.flows.lock().expect("flows lock");
        keys.map(|k| flows.get(&k, 0).ok())
    }

    /// The configured interface that holds `addr`.
    fn interface_of(&self, addr: IpAddr) -> Option<u32> {
        self.interfaces
            .iter()
            .find(|(_, addrs)| addrs.contains(&addr))
            .map(|(index, _)| *index)
    }
}

/// A backend socket's cookie in SYN_SOCKETS, removed when the connect ends (or is cancelled).
struct Connecting<'a> {
    tc: &'a TcPath,
    cookie: Option<u64>,
}

impl<'a> Connecting<'a> {
    fn register(tc: &'a TcPath, cookie: u64) -> Self {
        let mut sockets = tc.syn_sockets.lock().expect("syn sockets lock");
        let cookie = match sockets.insert(cookie, 0, 0) {
            Ok(()) => Some(cookie),
            Err(e) => {
                // The SYN keeps its options; the session will stay on the sockmap (counted).
                debug!("registering a backend connect in {MAP_SYN_SOCKETS}: {e}");
                None
            }
        };
        Self { tc, cookie }
    }
}

impl Drop for Connecting<'_> {
    fn drop(&mut self) {
        if let Some(cookie) = self.cookie {
            let _ = self
                .tc
                .syn_sockets
                .lock()
                .expect("syn sockets lock")
                .remove(&cookie);
        }
    }
}

impl Drop for TcPath {
    fn drop(&mut self) {
        let [handed_off, retried, mixed_family, mismatched] = self.counters.snapshot();
        let nudged = self.counters.nudged.load(Ordering::Relaxed);
        let forwarded = self.counters.forwarded.load(Ordering::Relaxed);
        let given_back = self.counters.given_back.load(Ordering::Relaxed);
        // A target of its own, so a run at `warn` can still ask for this line
        // (PATROXY_LOG=warn,patroxy_tc=info: the bench does).
        info!(
            target: "patroxy_tc",
            handed_off,
            retried,
            mixed_family,
            mismatched,
            nudged,
            forwarded,
            given_back,
            "packet-level splice detached; sessions handed off, hand-offs retried, sessions left on sockmap (IPv4 and IPv6 legs, options), senders told to retransmit what a fence dropped, dropped segments sent on by the proxy, dropped segments given back to its sockets after an abandoned attempt"
        );
        if self.handed_over.load(Ordering::SeqCst) {
            self.links.iter_mut().for_each(attach::TcLink::keep_pinned);
            return;
        }
        for pin in &self.pins {
            let _ = std::fs::remove_file(pin);
        }
    }
}

/// The IPv4 and IPv6 addresses of interface `name` (getifaddrs).
fn addresses(name: &str) -> Vec<IpAddr> {
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
                && std::ffi::CStr::from_ptr(ifa.ifa_name).to_bytes() == name.as_bytes()
            {
                match i32::from((*ifa.ifa_addr).sa_family) {
                    libc::AF_INET => {
                        let sin = &*ifa.ifa_addr.cast::<libc::sockaddr_in>();
                        out.push(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)).into());
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*ifa.ifa_addr.cast::<libc::sockaddr_in6>();
                        out.push(Ipv6Addr::from(sin6.sin6_addr.s6_addr).into());
                    }
                    _ => {}
                }
            }
            cur = ifa.ifa_next;
        }
        libc::freeifaddrs(list);
    }
    out
}
