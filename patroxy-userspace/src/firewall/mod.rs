//! The XDP allowlist: patroxy-ebpf's `patroxy-xdp` object attached to the interfaces of
//! `[xdp]`, enforcing the `[[allow]]` rules before any socket sees a packet. Each interface gets
//! the XDP program (`patroxy_xdp`, native or generic) or the same allowlist at tc ingress
//! (`patroxy_tc`), as `[xdp] mode` says; both share the object's maps.
//!
//! # Layout
//! - `entries`: the rules as map entries, and the safe order of a change (pure).
//! - `attach`: one interface's attachment and its mode, a pinned bpf_link a crash leaves behind
//!   and the next start replaces.
//! - `counters`: the per-CPU counters read from the pins, for the stats and bpftool users.
//! - `driver`: an interface's driver and bus, which decide the mode `auto` attaches in.
//!
//! Everything is pinned under `<pin_path>/xdp`, a directory claimed like the data path's
//! (`dataplane::pin_dir`); dropping the [`Firewall`] detaches the program from every interface
//! and removes the pins, unless it was [handed over](Firewall::hand_over) to an upgrade's
//! successor, which [adopts](Firewall::adopt) the pinned links and maps as they are: the
//! interfaces stay filtered throughout.
mod attach;
pub mod counters;
mod driver;
pub mod entries;

use std::{
    fs,
    path::{Path, PathBuf},
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuHashMap, PerCpuValues, lpm_trie::Key,
    },
    programs::{SchedClassifier, Xdp},
    util::nr_cpus,
};
use patroxy_common::xdp::{AllowV4, AllowV6, PORT_BITS, RuleIndex, SynLimit, XdpCounters};
use tracing::{info, warn};

use crate::{
    config::{Firewall as FirewallConfig, SynRate, XdpEnabled},
    dataplane::{loader, pin_dir},
};
use attach::{AttachError, Attachment, Programs};
pub use attach::{AttachMode, attached};
use entries::{Change, Entries};

/// The program in the object: multi-buffer aware (Linux 5.18 or later).
pub const PROGRAM: &str = "patroxy_xdp";
/// The same program without multi-buffer support, for a kernel that refuses `PROGRAM`.
pub const PROGRAM_SINGLE_BUFFER: &str = "patroxy_xdp_single_buffer";
/// The same allowlist at tc ingress.
pub const PROGRAM_TC: &str = "patroxy_tc";
pub const MAP_ALLOW_V4: &str = "ALLOW_V4";
pub const MAP_ALLOW_V6: &str = "ALLOW_V6";
pub const MAP_PROTECTED_PORTS: &str = "PROTECTED_PORTS";
pub const MAP_RULE_COUNTERS: &str = "RULE_COUNTERS";
pub const MAP_PORT_COUNTERS: &str = "PORT_COUNTERS";
pub const MAP_SYN_LIMIT: &str = "SYN_LIMIT";
pub const MAP_SYN_BUCKETS: &str = "SYN_BUCKETS";
/// Every map, all pinned for bpftool.
pub const PINNED: [&str; 7] = [
    MAP_ALLOW_V4,
    MAP_ALLOW_V6,
    MAP_PROTECTED_PORTS,
    MAP_RULE_COUNTERS,
    MAP_PORT_COUNTERS,
    MAP_SYN_LIMIT,
    MAP_SYN_BUCKETS,
];

/// The directory under the pin path that holds the allowlist's pins.
pub fn pin_dir(pin_path: &Path) -> PathBuf {
    pin_path.join("xdp")
}

#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error("not root and without CAP_BPF/CAP_NET_ADMIN")]
    NotPrivileged,
    #[error("loading the XDP object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("the XDP object has no {0}")]
    Missing(&'static str),
    #[error("map {0}: {1}")]
    Map(&'static str, MapError),
    #[error("loading the allowlist's programs: {0}")]
    Program(#[from] aya::programs::ProgramError),
    #[error(transparent)]
    Attach(#[from] AttachError),
    #[error(transparent)]
    PinPath(#[from] loader::LoadError),
    #[error(transparent)]
    PinDir(#[from] pin_dir::PinDirError),
    #[error("pin directory {}: {msg}", path.display())]
    Pin { path: PathBuf, msg: String },
    #[error("counting CPUs: {0}")]
    Cpus(String),
    #[error(
        "the running daemon's XDP allowlist has no link pinned for interface {0} \
         (the interfaces changed?)"
    )]
    NoLink(String),
}

/// The maps userspace writes, with the entries they hold.
struct RuleMaps {
    allow_v4: LpmTrie<MapData, AllowV4, RuleIndex>,
    allow_v6: LpmTrie<MapData, AllowV6, RuleIndex>,
    protected: HashMap<MapData, u16, u8>,
    port_counters: PerCpuHashMap<MapData, u16, XdpCounters>,
    syn_limit: Array<MapData, SynLimit>,
    /// What the maps hold now.
    current: Entries,
}

/// What a successor found in the maps it adopted: written back if it fails to start, since its
/// predecessor runs on.
struct Predecessor {
    entries: Entries,
    syn_limit: SynLimit,
}

/// The attached allowlist. Dropping it detaches the program and removes the pins, unless a
/// successor holds them ([`Firewall::hand_over`], [`Firewall::leave_pins_on_exit`]).
pub struct Firewall {
    maps: Mutex<RuleMaps>,
    /// Dropped before the pins are removed: each detaches its interface.
    attachments: Vec<Attachment>,
    dir: PathBuf,
    /// Held until `drop` is done with the pins; handed to an upgrade's successor.
    pin_lock: pin_dir::PinDirLock,
    /// Set once a successor took the allowlist over (or, in a successor, until it serves):
    /// `drop` leaves the links and pins as they are.
    handed_over: AtomicBool,
    /// In a successor until it serves: the adopted maps' entries before it wrote its own.
    predecessor: Mutex<Option<Predecessor>>,
    /// Owns the program while this process attaches it; `None` when adopted (the pinned
    /// links hold the predecessor's program).
    _ebpf: Option<Ebpf>,
}

impl Firewall {
    /// Attaches the allowlist as `[xdp]` says: `None` when it is off, or in `auto` when XDP is
    /// unavailable (said in one line); an error only in `required`.
    pub fn start(config: &FirewallConfig, pin_path: &Path) -> Result<Option<Self>, FirewallError> {
        match config.xdp.enabled {
            XdpEnabled::Off => {
                detach_leftovers(pin_path);
                Ok(None)
            }
            XdpEnabled::Required => Self::load(config, pin_path).map(Some),
            XdpEnabled::Auto => match Self::load(config, pin_path) {
                Ok(f) => Ok(Some(f)),
                Err(e) => {
                    warn!(
                        "XDP allowlist not attached, the [[allow]] rules are NOT enforced \
                         (xdp enabled = \"auto\"; \"required\" refuses to start instead): {e}"
                    );
                    Ok(None)
                }
            },
        }
    }

    fn load(config: &FirewallConfig, pin_path: &Path) -> Result<Self, FirewallError> {
        if !loader::privileged() {
            return Err(FirewallError::NotPrivileged);
        }
        let dir = pin_dir(pin_path);
        let pin_lock = prepare_dir(pin_path, &dir)?;
        attach::detach_stale(&dir, &config.xdp.interfaces);
        Self::load_in(config, dir.clone(), pin_lock).inspect_err(|_| {
            // Attachments made so far were dropped (detached); the map pins go too, and the
            // directories when nothing else is in them.
            remove_pins(&dir);
            let _ = fs::remove_dir(&dir);
            let _ = fs::remove_dir(pin_path);
        })
    }

    fn load_in(
        config: &FirewallConfig,
        dir: PathBuf,
        pin_lock: pin_dir::PinDirLock,
    ) -> Result<Self, FirewallError> {
        let mut ebpf = EbpfLoader::new().load(crate::EBPF_XDP_OBJECT)?;
        for name in PINNED {
            let map = ebpf.map(name).ok_or(FirewallError::Missing(name))?;
            map.pin(dir.join(name)).map_err(|e| FirewallError::Pin {
                path: dir.join(name),
                msg: e.to_string(),
            })?;
        }
        let mut maps = RuleMaps {
            allow_v4: take_map(&mut ebpf, MAP_ALLOW_V4)?,
            allow_v6: take_map(&mut ebpf, MAP_ALLOW_V6)?,
            protected: take_map(&mut ebpf, MAP_PROTECTED_PORTS)?,
            port_counters: take_map(&mut ebpf, MAP_PORT_COUNTERS)?,
            syn_limit: take_map(&mut ebpf, MAP_SYN_LIMIT)?,
            current: Entries::default(),
        };
        // The rules are in the maps before the program sees a packet.
        maps.apply(config)?;
        let mut programs = load_programs(&mut ebpf)?;
        let mut attachments = Vec::new();
        for iface in &config.xdp.interfaces {
            // On an error the attachments so far are dropped, which detaches them.
            attachments.push(attach::attach(&mut programs, &dir, iface, config.xdp.mode)?);
        }
        info!(
            interfaces = ?config.xdp.interfaces,
            modes = ?attachments.iter().map(|a| a.mode.name()).collect::<Vec<_>>(),
            rules = config.rules.len(),
            ports = ?config.protected_ports(),
            pin_dir = %dir.display(),
            "XDP allowlist attached"
        );
        Ok(Self {
            maps: Mutex::new(maps),
            attachments,
            dir,
            pin_lock,
            handed_over: AtomicBool::new(false),
            predecessor: Mutex::new(None),
            _ebpf: Some(ebpf),
        })
    }

    /// Takes over the allowlist a predecessor attached (its pin directory's lock handed over as
    /// `pin_lock`): opens the pinned links and maps, nothing loaded or attached, so no CAP_BPF
    /// is needed beyond access to the pins; then rewrites the rules and the SYN limit as
    /// `config` says, in place. Until [`Firewall::leave_pins_on_exit`]`(false)`, dropping it
    /// leaves everything attached and puts the predecessor's entries back.
    pub fn adopt(
        config: &FirewallConfig,
        pin_path: &Path,
        pin_lock: pin_dir::PinDirLock,
    ) -> Result<Self, FirewallError> {
        let dir = pin_dir(pin_path);
        let mut maps = RuleMaps {
            allow_v4: open_pinned(&dir, MAP_ALLOW_V4)?,
            allow_v6: open_pinned(&dir, MAP_ALLOW_V6)?,
            protected: open_pinned(&dir, MAP_PROTECTED_PORTS)?,
            port_counters: open_pinned(&dir, MAP_PORT_COUNTERS)?,
            syn_limit: open_pinned(&dir, MAP_SYN_LIMIT)?,
            current: Entries::default(),
        };
        maps.current = maps.read_entries()?;
        let predecessor = Predecessor {
            entries: maps.current.clone(),
            syn_limit: maps
                .syn_limit
                .get(&0, 0)
                .map_err(|e| FirewallError::Map(MAP_SYN_LIMIT, e))?,
        };
        let mut attachments = Vec::new();
        for iface in &config.xdp.interfaces {
            match attach::adopt(&dir, iface) {
                Some(a) => attachments.push(a),
                None => {
                    attachments.into_iter().for_each(Attachment::leave_attached);
                    return Err(FirewallError::NoLink(iface.clone()));
                }
            }
        }
        let firewall = Self {
            maps: Mutex::new(maps),
            attachments,
            dir,
            pin_lock,
            handed_over: AtomicBool::new(true),
            predecessor: Mutex::new(Some(predecessor)),
            _ebpf: None,
        };
        // On an error `firewall` drops here, writing the predecessor's entries back.
        firewall.apply(config)?;
        info!(
            interfaces = ?config.xdp.interfaces,
            rules = config.rules.len(),
            ports = ?config.protected_ports(),
            pin_dir = %firewall.dir.display(),
            "XDP allowlist taken over from the running daemon (still attached)"
        );
        Ok(firewall)
    }

    /// The pin directory's lock, for a successor to hold too before this process lets it go.
    pub fn pin_lock(&self) -> &pin_dir::PinDirLock {
        &self.pin_lock
    }

    /// A successor holds the allowlist now: this process's exit must leave it attached.
    pub fn hand_over(&self) {
        self.handed_over.store(true, Ordering::SeqCst);
    }

    /// Whether this process's exit leaves the allowlist attached and pinned: set in a successor
    /// while it starts (a failed start must leave what its predecessor runs on), cleared once
    /// it serves and owns it.
    pub fn leave_pins_on_exit(&self, leave: bool) {
        if !leave {
            self.predecessor
                .lock()
                .expect("firewall predecessor lock")
                .take();
        }
        self.handed_over.store(leave, Ordering::SeqCst);
    }

    /// Rewrites the rules and the SYN limit in place (a reload): no detach, and no moment where
    /// a source both rule sets allow is dropped (`entries`).
    pub fn apply(&self, config: &FirewallConfig) -> Result<(), FirewallError> {
        self.maps.lock().expect("firewall maps lock").apply(config)
    }

    pub fn pin_dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Firewall {
    fn drop(&mut self) {
        if self.handed_over.load(Ordering::SeqCst) {
            for attachment in self.attachments.drain(..) {
                attachment.leave_attached();
            }
            let predecessor = self.predecessor.get_mut().expect("lock").take();
            if let Some(Predecessor { entries, syn_limit }) = predecessor {
                let maps = self.maps.get_mut().expect("firewall maps lock");
                match maps.write_entries(entries, syn_limit) {
                    Ok(()) => info!("XDP allowlist: the running daemon's rules written back"),
                    Err(e) => warn!("XDP allowlist: writing the running daemon's rules back: {e}"),
                }
            }
            return;
        }
        let detached: Vec<String> = self
            .attachments
            .drain(..)
            .map(|a| a.iface.clone())
            .collect();
        remove_pins(&self.dir);
        let _ = fs::remove_dir(&self.dir);
        // The pin path itself, when this created it (no data path pinned there); a data
        // path's pins keep it, and the data path removes it after them.
        if let Some(pin_path) = self.dir.parent() {
            let _ = fs::remove_dir(pin_path);
        }
        info!(interfaces = ?detached, "XDP allowlist detached");
    }
}

impl RuleMaps {
    fn apply(&mut self, config: &FirewallConfig) -> Result<(), FirewallError> {
        let limit = config
            .xdp
            .syn_limit
            .map_or(SynLimit::default(), |SynRate { rate, burst }| SynLimit {
                rate: rate.into(),
                burst: burst.into(),
            });
        self.write_entries(Entries::of(&config.rules), limit)
    }

    fn write_entries(&mut self, new: Entries, limit: SynLimit) -> Result<(), FirewallError> {
        for change in self.current.changes_to(&new) {
            self.write(change)?;
        }
        self.current = new;
        self.syn_limit
            .set(0, limit, 0)
            .map_err(|e| FirewallError::Map(MAP_SYN_LIMIT, e))
    }

    /// The entries the maps hold, as a predecessor wrote them.
    fn read_entries(&self) -> Result<Entries, FirewallError> {
        let mut entries = Entries::default();
        for item in self.allow_v4.iter() {
            let (key, rule) = item.map_err(|e| FirewallError::Map(MAP_ALLOW_V4, e))?;
            let AllowV4 { port, addr } = key.data();
            let prefix = (key.prefix_len() - PORT_BITS) as u8;
            let net = ipnet::Ipv4Net::new(addr.into(), prefix).expect("the kernel's prefix");
            entries.v4.insert((port, net), rule);
        }
        for item in self.allow_v6.iter() {
            let (key, rule) = item.map_err(|e| FirewallError::Map(MAP_ALLOW_V6, e))?;
            let AllowV6 { port, addr } = key.data();
            let prefix = (key.prefix_len() - PORT_BITS) as u8;
            let net = ipnet::Ipv6Net::new(addr.into(), prefix).expect("the kernel's prefix");
            entries.v6.insert((port, net), rule);
        }
        for port in self.protected.keys() {
            entries
                .ports
                .insert(port.map_err(|e| FirewallError::Map(MAP_PROTECTED_PORTS, e))?);
        }
        Ok(entries)
    }

    fn write(&mut self, change: Change) -> Result<(), FirewallError> {
        let err = |name| move |e| FirewallError::Map(name, e);
        match change {
            Change::AllowV4(port, net, rule) => self
                .allow_v4
                .insert(&v4_key(port, net), rule, 0)
                .map_err(err(MAP_ALLOW_V4)),
            Change::AllowV6(port, net, rule) => self
                .allow_v6
                .insert(&v6_key(port, net), rule, 0)
                .map_err(err(MAP_ALLOW_V6)),
            Change::RemoveV4(port, net) => self
                .allow_v4
                .remove(&v4_key(port, net))
                .map_err(err(MAP_ALLOW_V4)),
            Change::RemoveV6(port, net) => self
                .allow_v6
                .remove(&v6_key(port, net))
                .map_err(err(MAP_ALLOW_V6)),
            Change::Protect(port) => {
                let cpus =
                    nr_cpus().map_err(|(what, e)| FirewallError::Cpus(format!("{what}: {e}")))?;
                let zero = PerCpuValues::try_from(vec![XdpCounters::default(); cpus])
                    .map_err(|e| FirewallError::Cpus(e.to_string()))?;
                self.port_counters
                    .insert(port, zero, 0)
                    .map_err(err(MAP_PORT_COUNTERS))?;
                self.protected
                    .insert(port, 1, 0)
                    .map_err(err(MAP_PROTECTED_PORTS))
            }
            Change::Unprotect(port) => {
                self.protected
                    .remove(&port)
                    .map_err(err(MAP_PROTECTED_PORTS))?;
                self.port_counters
                    .remove(&port)
                    .map_err(err(MAP_PORT_COUNTERS))
            }
        }
    }
}

fn v4_key(port: u16, net: ipnet::Ipv4Net) -> Key<AllowV4> {
    Key::new(
        PORT_BITS + u32::from(net.prefix_len()),
        AllowV4 {
            port,
            addr: net.network().octets(),
        },
    )
}

fn v6_key(port: u16, net: ipnet::Ipv6Net) -> Key<AllowV6> {
    Key::new(
        PORT_BITS + u32::from(net.prefix_len()),
        AllowV6 {
            port,
            addr: net.network().octets(),
        },
    )
}

/// A map a predecessor pinned in `dir`.
fn open_pinned<T>(dir: &Path, name: &'static str) -> Result<T, FirewallError>
where
    T: TryFrom<Map, Error = MapError>,
{
    let data = MapData::from_pin(dir.join(name)).map_err(|e| FirewallError::Map(name, e))?;
    let map = Map::from_map_data(data).map_err(|e| FirewallError::Map(name, e))?;
    T::try_from(map).map_err(|e| FirewallError::Map(name, e))
}

/// Loads the XDP and the tc program, both whatever the mode: `auto` may fall back from one to
/// the other per interface, and a kernel that refuses either says so before anything is
/// attached. The XDP one is `PROGRAM`, or where the kernel refuses it (before 5.18: no
/// multi-buffer XDP) `PROGRAM_SINGLE_BUFFER`, said once.
fn load_programs(ebpf: &mut Ebpf) -> Result<Programs<'_>, FirewallError> {
    let tc: &mut SchedClassifier = ebpf
        .program_mut(PROGRAM_TC)
        .ok_or(FirewallError::Missing(PROGRAM_TC))?
        .try_into()?;
    tc.load()?;
    let multi_buffer = program(ebpf, PROGRAM)?.load();
    let xdp_name = match multi_buffer {
        Ok(()) => PROGRAM,
        Err(e) => {
            warn!(
                "the multi-buffer XDP program was refused ({e}); loading the single-buffer one \
                 (native mode then needs an MTU that fits a page)"
            );
            program(ebpf, PROGRAM_SINGLE_BUFFER)?.load()?;
            PROGRAM_SINGLE_BUFFER
        }
    };
    let (mut xdp, mut tc) = (None, None);
    for (name, program) in ebpf.programs_mut() {
        if name == xdp_name {
            xdp = Some(program.try_into()?);
        } else if name == PROGRAM_TC {
            tc = Some(program.try_into()?);
        }
    }
    Ok(Programs {
        xdp: xdp.ok_or(FirewallError::Missing(PROGRAM))?,
        tc: tc.ok_or(FirewallError::Missing(PROGRAM_TC))?,
    })
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp, FirewallError> {
    Ok(ebpf
        .program_mut(name)
        .ok_or(FirewallError::Missing(name))?
        .try_into()?)
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, FirewallError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(FirewallError::Missing(name))?;
    T::try_from(map).map_err(|e| FirewallError::Map(name, e))
}

/// Makes `<pin_path>/xdp` this daemon's (creating the pin path 0700 when the data path has
/// not) and removes the map pins a crashed run left. Its link pins stay: `attach` replaces them.
fn prepare_dir(pin_path: &Path, dir: &Path) -> Result<pin_dir::PinDirLock, FirewallError> {
    loader::ensure_bpffs_parent(pin_path)?;
    if !pin_path.exists() {
        use std::os::unix::fs::DirBuilderExt as _;
        fs::DirBuilder::new()
            .mode(0o700)
            .create(pin_path)
            .map_err(|e| FirewallError::Pin {
                path: pin_path.to_owned(),
                msg: e.to_string(),
            })?;
    }
    let lock = pin_dir::claim(dir)?;
    let stale = remove_pins(dir);
    if stale > 0 {
        warn!(pin_dir = %dir.display(), stale, "removed stale XDP map pins left by an earlier run");
    }
    Ok(lock)
}

/// With XDP off: what a crashed run with it on left attached is detached, unless a running
/// daemon holds the directory.
fn detach_leftovers(pin_path: &Path) {
    let dir = pin_dir(pin_path);
    if !dir.exists() {
        return;
    }
    if let Ok(_lock) = pin_dir::claim(&dir) {
        attach::detach_stale(&dir, &[]);
        remove_pins(&dir);
        let _ = fs::remove_dir(&dir);
    }
}

fn remove_pins(dir: &Path) -> usize {
    PINNED
        .iter()
        .filter(|name| fs::remove_file(dir.join(name)).is_ok())
        .count()
}
