//! Loads the verdict program, attaches it to SOCKS and pins the maps for bpftool.
use std::{
    fs,
    path::{Path, PathBuf},
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use aya::{
    Ebpf,
    maps::{HashMap, Map, MapData, SockHash},
    programs::{SkSkb, sk_skb::SkSkbLink},
};
use patroxy_common::{BackendEntry, SessionEntry};
use tracing::{info, warn};

use super::{
    kernel_log::KernelLog,
    maps::{MAP_BACKENDS, MAP_SESSIONS, MAP_SOCKS, PINNED, PROGRAM},
    pin_dir::{self, PinDirLock},
};

/// statfs magic of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("not root and without CAP_BPF/CAP_NET_ADMIN")]
    NotPrivileged,
    #[error("loading the eBPF object failed: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("the eBPF object has no {0}")]
    Missing(&'static str),
    #[error("map {0}: {1}")]
    Map(&'static str, aya::maps::MapError),
    #[error("verdict program: {0} (kernel without sockmap support?)")]
    Program(#[from] aya::programs::ProgramError),
    #[error("creating the close watcher's epoll set: {0}")]
    Epoll(std::io::Error),
    #[error("pin directory {}: {msg}", path.display())]
    Pin { path: PathBuf, msg: String },
    /// Another daemon's, or open to another user: `DataPlane::select` refuses in every mode.
    #[error(transparent)]
    PinDir(#[from] pin_dir::PinDirError),
}

/// The loaded kernel data path. Dropping it detaches the program and removes the pins, unless
/// it was [handed over](KernelMaps::hand_over) to a successor.
pub struct KernelMaps {
    pub socks: Mutex<SockHash<MapData, u64>>,
    pub sessions: Mutex<HashMap<MapData, u64, SessionEntry>>,
    pub backends: Mutex<HashMap<MapData, u32, BackendEntry>>,
    pin_dir: PathBuf,
    /// Held until `drop` has removed the pins, so no second daemon takes the directory meanwhile.
    pin_lock: PinDirLock,
    /// The verdict program's attachment to SOCKS, taken out of `ebpf` so that a hand-over can
    /// leave it in place (the map keeps the program) when this process exits. `None` when the
    /// maps were adopted from a predecessor, which attached it.
    link: Option<SkSkbLink>,
    /// Set once a successor took the maps over: `drop` leaves pins and program as they are.
    handed_over: AtomicBool,
    /// Owns the program for as long as the maps are used; `None` when adopted.
    ebpf: Option<Ebpf>,
}

impl KernelMaps {
    /// Loads and attaches the program; with `log`, also starts printing its debug lines.
    /// Without `with_tc` the packet-level splice's flow and held-segment maps are created with
    /// one entry (their entries are preallocated: some MB of kernel memory no session would use).
    pub fn load(pin_dir: &Path, log: Option<KernelLog>, with_tc: bool) -> Result<Self, LoadError> {
        if !privileged() {
            return Err(LoadError::NotPrivileged);
        }
        let unused: &[&str] = if with_tc {
            &[]
        } else {
            &[super::tc::MAP_FLOWS, super::tc::MAP_HELD]
        };
        let mut ebpf = KernelLog::load_object(log, crate::EBPF_OBJECT, unused)?;
        let pin_lock = prepare_pin_dir(pin_dir)?;
        for name in PINNED {
            let map = ebpf.map(name).ok_or(LoadError::Missing(name))?;
            map.pin(pin_dir.join(name)).map_err(|e| LoadError::Pin {
                path: pin_dir.join(name),
                msg: e.to_string(),
            })?;
        }
        let socks: SockHash<MapData, u64> = take_map(&mut ebpf, MAP_SOCKS)?;
        let sessions: HashMap<MapData, u64, SessionEntry> = take_map(&mut ebpf, MAP_SESSIONS)?;
        let backends: HashMap<MapData, u32, BackendEntry> = take_map(&mut ebpf, MAP_BACKENDS)?;

        let program: &mut SkSkb = ebpf
            .program_mut(PROGRAM)
            .ok_or(LoadError::Missing(PROGRAM))?
            .try_into()?;
        program.load()?;
        let link_id = program.attach(socks.fd())?;
        let link = program.take_link(link_id)?;
        if let Some(log) = log
            && let Err(e) = log.start(&mut ebpf)
        {
            // The data path works without its debug log; say why there are no eBPF lines.
            warn!("eBPF debug log requested but not started: {e}");
        }
        info!(pin_dir = %pin_dir.display(), "sockmap data path loaded; maps pinned");
        Ok(Self {
            socks: Mutex::new(socks),
            sessions: Mutex::new(sessions),
            backends: Mutex::new(backends),
            pin_dir: pin_dir.to_owned(),
            pin_lock,
            link: Some(link),
            handed_over: AtomicBool::new(false),
            ebpf: Some(ebpf),
        })
    }

    /// Opens the maps a predecessor pinned in `pin_dir` (whose lock it handed over as
    /// `pin_lock`), with the verdict program it attached to SOCKS: nothing is loaded, so this
    /// needs no CAP_BPF beyond access to the pins. A map whose key or value size differs from
    /// this build's (a changed layout) is refused: such an upgrade needs a restart.
    pub fn adopt(pin_dir: &Path, pin_lock: PinDirLock) -> Result<Self, LoadError> {
        let maps = Self {
            socks: Mutex::new(open_pinned(pin_dir, MAP_SOCKS)?),
            sessions: Mutex::new(open_pinned(pin_dir, MAP_SESSIONS)?),
            backends: Mutex::new(open_pinned(pin_dir, MAP_BACKENDS)?),
            pin_dir: pin_dir.to_owned(),
            pin_lock,
            link: None,
            handed_over: AtomicBool::new(false),
            ebpf: None,
        };
        info!(pin_dir = %pin_dir.display(), "sockmap data path adopted from the pinned maps");
        Ok(maps)
    }

    /// Attaches the packet-level splice's programs, from the object this process loaded.
    pub(super) fn attach_tc(
        &mut self,
        setup: &super::TcSetup,
    ) -> Result<super::tc::TcPath, LoadError> {
        let ebpf = self
            .ebpf
            .as_mut()
            .ok_or(LoadError::Missing("a loaded object"))?;
        super::tc::TcPath::attach(ebpf, &self.pin_dir, setup.interfaces, &setup.listener_ports)
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// The pin directory's lock, for a successor to hold too before this process lets it go.
    pub fn pin_lock(&self) -> &PinDirLock {
        &self.pin_lock
    }

    /// Whether this process's exit leaves the pins and the program's attachment to SOCKS in
    /// place: set by a successor while it starts on maps it adopted (a failed start must not
    /// remove what its predecessor runs on), cleared once it serves and owns them, set again
    /// once a successor of its own holds them.
    pub fn leave_pins_on_exit(&self, leave: bool) {
        self.handed_over.store(leave, Ordering::SeqCst);
    }
}

impl Drop for KernelMaps {
    fn drop(&mut self) {
        if self.handed_over.load(Ordering::SeqCst) {
            // Dropping the link would detach the program from the successor's sessions.
            std::mem::forget(self.link.take());
            return;
        }
        remove_pins(&self.pin_dir);
        let _ = fs::remove_dir(&self.pin_dir);
    }
}

/// Map `name` of the pin directory `dir`, typed (a key or value size other than this build's
/// is refused).
pub(super) fn open_pinned<T>(dir: &Path, name: &'static str) -> Result<T, LoadError>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    let data = MapData::from_pin(dir.join(name)).map_err(|e| LoadError::Map(name, e))?;
    let map = Map::from_map_data(data).map_err(|e| LoadError::Map(name, e))?;
    T::try_from(map).map_err(|e| LoadError::Map(name, e))
}

/// Map `name` of the loaded object, typed.
pub(super) fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, LoadError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(LoadError::Missing(name))?;
    T::try_from(map).map_err(|e| LoadError::Map(name, e))
}

/// Root, or CAP_BPF + CAP_NET_ADMIN in the effective set (capget avoids a dependency for 2 bits).
pub(crate) fn privileged() -> bool {
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_BPF: u32 = 39;
    let effective = fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0);
    effective & (1 << CAP_BPF) != 0 && effective & (1 << CAP_NET_ADMIN) != 0
}

/// Makes sure `dir` is on a bpffs (mounting /sys/fs/bpf if nothing is mounted there), is this
/// daemon's alone (`pin_dir::claim`, whose lock it returns) and holds no stale pins from a
/// previous run that crashed.
fn prepare_pin_dir(dir: &Path) -> Result<PinDirLock, LoadError> {
    ensure_bpffs_parent(dir)?;
    // Locked first: the pins of a daemon still running are not stale.
    let lock = pin_dir::claim(dir)?;
    let stale = remove_pins(dir);
    if stale > 0 {
        warn!(pin_dir = %dir.display(), stale, "removed stale pins left by an earlier run");
    }
    Ok(lock)
}

/// Makes sure the parent of `dir` is a bpffs, mounting /sys/fs/bpf if nothing is mounted there.
pub(crate) fn ensure_bpffs_parent(dir: &Path) -> Result<(), LoadError> {
    let err = |msg: String| LoadError::Pin {
        path: dir.to_owned(),
        msg,
    };
    let parent = dir
        .parent()
        .ok_or_else(|| err("has no parent directory".into()))?;
    if !parent.exists() {
        return Err(err(format!(
            "its parent directory {} does not exist",
            parent.display()
        )));
    }
    if !is_bpffs(parent) && parent == Path::new("/sys/fs/bpf") {
        mount_bpffs(parent).map_err(|e| err(format!("mounting bpffs on /sys/fs/bpf: {e}")))?;
    }
    if !is_bpffs(parent) {
        return Err(err(format!(
            "{} is not on a bpf filesystem (mount -t bpf bpf {})",
            parent.display(),
            parent.display()
        )));
    }
    Ok(())
}

/// Removes patroxy's pins from `dir`, returning how many there were.
fn remove_pins(dir: &Path) -> usize {
    PINNED
        .iter()
        .filter(|name| fs::remove_file(dir.join(name)).is_ok())
        .count()
}

fn is_bpffs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt as _;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out-pointer.
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC }
}

fn mount_bpffs(target: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    let target = std::ffi::CString::new(target.as_os_str().as_bytes())?;
    // SAFETY: all pointers are valid NUL-terminated strings.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    info!(target = %target.to_string_lossy(), "mounted bpffs");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_parent_is_named_as_missing() {
        let err = prepare_pin_dir(Path::new("/nonexistent/patroxy/maps")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "pin directory /nonexistent/patroxy/maps: its parent directory /nonexistent/patroxy \
             does not exist"
        );
    }
}
