//! Least privilege: once the programs are loaded, the maps pinned and the sockets bound, the
//! daemon keeps only the capabilities later work needs and drops the rest for good.
//!
//! What needs what was measured on Linux 6.18 (README, "Privileges"): loading the verdict
//! program, creating the sockhash and attaching to it need CAP_BPF + CAP_NET_ADMIN; everything
//! after start-up goes through file descriptors already held (SOCKS, SESSIONS and BACKENDS
//! updates, aya-log's ring buffer, epoll) or needs no capability at all (SO_LINGER 0 resets,
//! the soft fd limit, opening pins the daemon's own uid owns). The one exception is binding a
//! port below `net.ipv4.ip_unprivileged_port_start` again (a reload may rebind a listener), so
//! CAP_NET_BIND_SERVICE stays when the configuration binds such a port, and only then.
//!
//! Capabilities belong to each thread, not to the process, and tokio's worker threads exist
//! before start-up ends: dropping them on the calling thread alone would leave every worker
//! (and every thread a worker later creates) with all of them. So [`drop_all_but`] applies the
//! same sets on every thread, as glibc does for setuid(2) and libcap's psx for capabilities: it
//! signals each other thread, whose handler makes the same async-signal-safe system calls, and
//! then reads every thread's sets back.
use std::{
    collections::HashSet,
    fs, io,
    net::SocketAddr,
    sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use caps::{CapSet, Capability, CapsHashSet};

/// Where the kernel says from which port on binding needs no capability.
const UNPRIVILEGED_PORT_START: &str = "/proc/sys/net/ipv4/ip_unprivileged_port_start";
/// The kernel's default for it.
const DEFAULT_UNPRIVILEGED_PORT_START: u16 = 1024;
/// How long the other threads get to answer one round of signals.
const ROUND_TIMEOUT: Duration = Duration::from_millis(500);
/// Rounds of signals; a thread created meanwhile by one not yet dropped shows up in the next.
const ROUNDS: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("reading this thread's capabilities: {0}")]
    Read(caps::errors::CapsError),
    #[error("dropping capabilities on this thread: {0}")]
    Drop(io::Error),
    #[error("installing the signal handler that drops capabilities on the other threads: {0}")]
    Handler(io::Error),
    #[error("listing this process's threads: {0}")]
    Threads(io::Error),
    #[error("threads {0:?} still hold capabilities this daemon dropped")]
    Stragglers(Vec<i32>),
}

/// The capabilities the daemon needs after start-up for `binds` (listeners and stats), on a
/// host where binding needs none from `unprivileged_port_start` on.
pub fn needed_after_start(
    binds: impl IntoIterator<Item = SocketAddr>,
    unprivileged_port_start: u16,
) -> CapsHashSet {
    let mut needed = HashSet::new();
    if binds
        .into_iter()
        .any(|b| b.port() < unprivileged_port_start)
    {
        needed.insert(Capability::CAP_NET_BIND_SERVICE);
    }
    needed
}

/// `net.ipv4.ip_unprivileged_port_start` of this host (1024 if unreadable).
pub fn unprivileged_port_start() -> u16 {
    fs::read_to_string(UNPRIVILEGED_PORT_START)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(DEFAULT_UNPRIVILEGED_PORT_START)
}

/// Keeps of `needed` what this thread has, and drops every other capability from the
/// effective, permitted, inheritable and ambient sets of every thread (and from the bounding
/// set where CAP_SETPCAP allows, so that a program this daemon executes as root gains none
/// back). Of the kept ones, `passed_on` stay inheritable and ambient: a successor this daemon
/// starts (an upgrade) has them too, as a user other than root. Returns the capabilities kept.
pub fn drop_all_but(
    needed: &CapsHashSet,
    passed_on: &CapsHashSet,
) -> Result<CapsHashSet, PrivilegeError> {
    let permitted = caps::read(None, CapSet::Permitted).map_err(PrivilegeError::Read)?;
    let effective = caps::read(None, CapSet::Effective).map_err(PrivilegeError::Read)?;
    let kept: CapsHashSet = needed.intersection(&permitted).copied().collect();
    TARGET.store(mask(&kept), Ordering::SeqCst);
    PASSED_ON.store(mask(&kept) & mask(passed_on), Ordering::SeqCst);
    LAST_CAP.store(last_cap(), Ordering::SeqCst);
    DROP_BOUNDING.store(
        effective.contains(&Capability::CAP_SETPCAP),
        Ordering::SeqCst,
    );
    install_handler()?;
    if !apply_target() {
        return Err(PrivilegeError::Drop(io::Error::last_os_error()));
    }
    drop_on_other_threads()?;
    Ok(kept)
}

/// Names of `caps`, sorted, for the log line ("none" if empty).
pub fn names(caps: &CapsHashSet) -> String {
    let mut names: Vec<String> = caps.iter().map(ToString::to_string).collect();
    names.sort();
    if names.is_empty() {
        "none".to_owned()
    } else {
        names.join(" ")
    }
}

/// The sets every thread ends with: effective = permitted = this mask, the others empty.
static TARGET: AtomicU64 = AtomicU64::new(0);
/// Of those, the ones also inheritable and ambient (see [`drop_all_but`]).
static PASSED_ON: AtomicU64 = AtomicU64::new(0);
/// The highest capability this kernel knows, for the bounding set.
static LAST_CAP: AtomicU64 = AtomicU64::new(0);
/// Whether the bounding set is dropped too (needs CAP_SETPCAP, which root has).
static DROP_BOUNDING: AtomicBool = AtomicBool::new(false);
/// How many times a thread's handler ran.
static HANDLED: AtomicUsize = AtomicUsize::new(0);

fn mask(caps: &CapsHashSet) -> u64 {
    caps.iter().fold(0, |m, c| m | c.bitmask())
}

fn last_cap() -> u64 {
    caps::runtime::thread_all_supported()
        .iter()
        .map(|c| u64::from(c.index()))
        .max()
        .unwrap_or(0)
}

/// The signal the other threads are asked with: glibc keeps the realtime signals below
/// SIGRTMIN for itself (setxid, cancellation); nothing else in the daemon uses this one.
fn signal() -> libc::c_int {
    libc::SIGRTMIN()
}

fn install_handler() -> Result<(), PrivilegeError> {
    // SAFETY: a zeroed sigaction with a handler that only makes system calls and touches
    // atomics, which is async-signal-safe.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(signal(), &action, std::ptr::null_mut()) != 0 {
            return Err(PrivilegeError::Handler(io::Error::last_os_error()));
        }
    }
    Ok(())
}

extern "C" fn on_signal(_: libc::c_int) {
    // errno belongs to the interrupted code; capset may change it.
    // SAFETY: __errno_location returns this thread's errno.
    let errno = unsafe { *libc::__errno_location() };
    // A thread whose capset failed is still behind, and the next round sees it.
    apply_target();
    HANDLED.fetch_add(1, Ordering::SeqCst);
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
}

/// Sets this thread's capabilities to [`TARGET`]: only system calls, so a signal handler may
/// run it. The bounding set goes first, while CAP_SETPCAP is still effective.
fn apply_target() -> bool {
    let target = TARGET.load(Ordering::SeqCst);
    if DROP_BOUNDING.load(Ordering::SeqCst) {
        for cap in 0..=LAST_CAP.load(Ordering::SeqCst) {
            if target & (1 << cap) == 0 {
                // SAFETY: prctl with integer arguments. A cap already gone is no error.
                unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
            }
        }
    }
    // SAFETY: prctl with integer arguments; fails only on kernels without ambient sets.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    let header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let passed_on = PASSED_ON.load(Ordering::SeqCst);
    let (low, high) = (target as u32, (target >> 32) as u32);
    let data = [
        CapData {
            effective: low,
            permitted: low,
            inheritable: passed_on as u32,
        },
        CapData {
            effective: high,
            permitted: high,
            inheritable: (passed_on >> 32) as u32,
        },
    ];
    // SAFETY: a version 3 header and the two data words that version reads.
    if unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) } != 0 {
        return false;
    }
    // Ambient only now: a capability must be permitted and inheritable to be raised.
    (0..64u64)
        .filter(|cap| passed_on & (1 << cap) != 0)
        // SAFETY: prctl with integer arguments.
        .all(|cap| unsafe {
            libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_RAISE, cap, 0, 0) == 0
        })
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Signals every other thread not yet at the target until none is left.
fn drop_on_other_threads() -> Result<(), PrivilegeError> {
    // SAFETY: no preconditions.
    let (pid, me) = unsafe { (libc::getpid(), libc::gettid()) };
    let mut behind = threads_behind(me)?;
    for _ in 0..ROUNDS {
        if behind.is_empty() {
            return Ok(());
        }
        let before = HANDLED.load(Ordering::SeqCst);
        let mut asked = 0;
        for &tid in &behind {
            // SAFETY: tgkill with integer arguments; a thread that just exited gives ESRCH.
            if unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, signal()) } == 0 {
                asked += 1;
            }
        }
        let deadline = Instant::now() + ROUND_TIMEOUT;
        while HANDLED.load(Ordering::SeqCst) - before < asked && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        behind = threads_behind(me)?;
    }
    if behind.is_empty() {
        Ok(())
    } else {
        Err(PrivilegeError::Stragglers(behind))
    }
}

/// The threads other than `me` whose sets are not yet the target.
fn threads_behind(me: i32) -> Result<Vec<i32>, PrivilegeError> {
    let target = TARGET.load(Ordering::SeqCst);
    let mut behind = Vec::new();
    for entry in fs::read_dir("/proc/self/task").map_err(PrivilegeError::Threads)? {
        let Some(tid) = entry
            .map_err(PrivilegeError::Threads)?
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if tid != me && !at_target(tid, target) {
            behind.push(tid);
        }
    }
    Ok(behind)
}

fn at_target(tid: i32, target: u64) -> bool {
    let read = |set| caps::read(Some(tid), set).map(|c| mask(&c));
    // A thread that has exited meanwhile cannot be read: nothing left to drop there.
    match (
        read(CapSet::Effective),
        read(CapSet::Permitted),
        read(CapSet::Inheritable),
    ) {
        (Ok(e), Ok(p), Ok(i)) => {
            e == target && p == target && i == PASSED_ON.load(Ordering::SeqCst)
        }
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binds(ports: &[u16]) -> Vec<SocketAddr> {
        ports
            .iter()
            .map(|p| SocketAddr::from(([127, 0, 0, 1], *p)))
            .collect()
    }

    #[test]
    fn net_bind_service_is_kept_only_for_a_port_below_the_unprivileged_start() {
        assert!(needed_after_start(binds(&[5432, 5433, 7000]), 1024).is_empty());
        assert_eq!(
            needed_after_start(binds(&[5432, 443]), 1024),
            HashSet::from([Capability::CAP_NET_BIND_SERVICE])
        );
        assert!(
            needed_after_start(binds(&[443]), 0).is_empty(),
            "a host that lets anyone bind any port"
        );
        assert!(needed_after_start(binds(&[]), 1024).is_empty());
    }

    #[test]
    fn names_are_sorted_and_none_when_empty() {
        assert_eq!(names(&HashSet::new()), "none");
        assert_eq!(
            names(&HashSet::from([
                Capability::CAP_NET_BIND_SERVICE,
                Capability::CAP_BPF
            ])),
            "CAP_BPF CAP_NET_BIND_SERVICE"
        );
    }
}
