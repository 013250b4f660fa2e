//! The pin directory belongs to one daemon and to no other user.
//!
//! Without this, a second daemon on the same `pin_path` removed the running one's pins as stale
//! (and then failed to bind, leaving the first serving without `patroxy sessions`), and pins
//! in a directory another user created (bpffs' root is often mode 1777) could be renamed or
//! deleted by that user. So before the loader removes or creates any pin, [`claim`]:
//! - checks every directory above the pin directory: owned by root or by us, and not writable by
//!   others unless sticky, since whoever may write there can move the pin directory away and
//!   put their own in its place (bpffs' root, root-owned and 1777, passes);
//! - creates the pin directory 0700 whatever the umask, or refuses an existing one another user
//!   owns or that group or others may write to (the operator removes it or fixes its mode);
//! - takes an exclusive flock(2) on the directory itself: bpffs holds no regular files to lock,
//!   but flock works on any inode, bpffs' directories included. The daemon holds it until its
//!   pins are removed; the kernel drops it when the daemon dies, so a crash leaves pins for the
//!   next start to remove, never a lock.
//!
//! Readers (`patroxy sessions`, `patroxy maps`, bpftool) take no lock: they work beside the
//! daemon that holds it.
use std::{
    fs::{self, DirBuilder, File, Metadata, OpenOptions},
    io,
    os::{
        fd::AsRawFd as _,
        unix::fs::{
            DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _,
        },
    },
    path::{Path, PathBuf},
};

/// Mode of a directory patroxy creates: only its owner may add, rename or remove pins.
const DIR_MODE: u32 = 0o700;
/// Write permission for group or others.
const SHARED_WRITE: u32 = 0o022;
/// A directory whose entries only their owner (or the directory's) may rename or remove.
const STICKY: u32 = 0o1000;
/// Opening and locking start again at most this often when the directory is replaced meanwhile.
const ATTEMPTS: usize = 3;

/// The pin directory, locked for as long as this lives.
///
/// A flock belongs to the open file, not to the process: a successor given this descriptor
/// (SCM_RIGHTS) holds the same lock, which stays held until the last of the two closes it.
#[derive(Debug)]
pub struct PinDirLock {
    /// The open directory the flock is on; closing it releases the lock.
    dir: File,
}

impl PinDirLock {
    /// The lock a predecessor handed over: `fd` is its locked directory.
    pub fn from_handed_over(fd: std::os::fd::OwnedFd) -> Self {
        Self { dir: fd.into() }
    }
}

impl std::os::fd::AsFd for PinDirLock {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.dir.as_fd()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PinDirError {
    #[error(
        "pin directory {}: locked by another running patroxy{}: stop it first, or give this one \
         its own pin_path",
        path.display(),
        holder.map(|pid| format!(" (pid {pid})")).unwrap_or_default()
    )]
    InUse { path: PathBuf, holder: Option<u32> },
    #[error(
        "pin directory {}: owned by uid {owner}, not by root or this daemon (uid {euid}), so that \
         user could rename or delete the pins; remove it (it is not patroxy's: look at what is in \
         it first) and let patroxy create it, or choose another pin_path",
        path.display()
    )]
    NotOwned {
        path: PathBuf,
        owner: u32,
        euid: u32,
    },
    #[error(
        "pin directory {}: group or others may write to it (mode {mode:o}), and so rename or \
         delete the pins; chmod 700 it, or remove it and let patroxy create it",
        path.display()
    )]
    SharedWrite { path: PathBuf, mode: u32 },
    #[error(
        "pin directory {}: {} above it {why}, so another user could replace the pin directory; \
         put pin_path under directories only root writes to, or sticky ones like bpffs' root",
        path.display(),
        ancestor.display()
    )]
    UnsafeAncestor {
        path: PathBuf,
        ancestor: PathBuf,
        why: String,
    },
    #[error("pin directory {}: {what}: {source}", path.display())]
    Io {
        path: PathBuf,
        what: &'static str,
        source: io::Error,
    },
}

/// Makes `dir` this daemon's alone (see the module docs); its parent exists and is on bpffs.
pub fn claim(dir: &Path) -> Result<PinDirLock, PinDirError> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    check_ancestors(dir, euid)?;
    for _ in 0..ATTEMPTS {
        let file = open_or_create(dir)?;
        let meta = file.metadata().map_err(io_err(dir, "reading its owner"))?;
        check_own(dir, &meta, euid)?;
        lock(dir, &file, &meta)?;
        // A daemon that stops removes the directory before it lets go of the lock: if that
        // happened between our open and our lock, we hold a directory no longer at `dir`.
        if fs::symlink_metadata(dir).is_ok_and(|now| same_inode(&now, &meta)) {
            return Ok(PinDirLock { dir: file });
        }
    }
    Err(PinDirError::Io {
        path: dir.to_owned(),
        what: "locking it",
        source: io::Error::other("it was replaced each time it was locked"),
    })
}

fn check_ancestors(dir: &Path, euid: u32) -> Result<(), PinDirError> {
    for ancestor in dir
        .ancestors()
        .skip(1)
        .filter(|a| !a.as_os_str().is_empty())
    {
        let meta = fs::metadata(ancestor).map_err(io_err(dir, "reading a parent directory"))?;
        let mode = meta.mode() & 0o7777;
        let why = if !trusted_owner(meta.uid(), euid) {
            format!("is owned by uid {}", meta.uid())
        } else if mode & SHARED_WRITE != 0 && mode & STICKY == 0 {
            format!("may be written by group or others and is not sticky (mode {mode:o})")
        } else {
            continue;
        };
        return Err(PinDirError::UnsafeAncestor {
            path: dir.to_owned(),
            ancestor: ancestor.to_owned(),
            why,
        });
    }
    Ok(())
}

/// Opens `dir`, creating it with [`DIR_MODE`] first if it does not exist. A symbolic link is
/// refused (O_NOFOLLOW): its target is not where the operator looks for the pins.
fn open_or_create(dir: &Path) -> Result<File, PinDirError> {
    let created = match DirBuilder::new().mode(DIR_MODE).create(dir) {
        Ok(()) => true,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
        Err(e) => return Err(io_err(dir, "creating it")(e)),
    };
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(dir)
        .map_err(io_err(
            dir,
            "opening it (it must be a directory, not a link)",
        ))?;
    if created {
        // The umask only takes bits away; set exactly DIR_MODE so the owner keeps write access.
        file.set_permissions(fs::Permissions::from_mode(DIR_MODE))
            .map_err(io_err(dir, "setting its mode"))?;
    }
    Ok(file)
}

fn check_own(dir: &Path, meta: &Metadata, euid: u32) -> Result<(), PinDirError> {
    let mode = meta.mode() & 0o7777;
    if !trusted_owner(meta.uid(), euid) {
        Err(PinDirError::NotOwned {
            path: dir.to_owned(),
            owner: meta.uid(),
            euid,
        })
    } else if mode & SHARED_WRITE != 0 {
        Err(PinDirError::SharedWrite {
            path: dir.to_owned(),
            mode,
        })
    } else {
        Ok(())
    }
}

/// Root owns the system's directories; our own uid is the daemon itself (CAP_BPF, not root).
fn trusted_owner(uid: u32, euid: u32) -> bool {
    uid == 0 || uid == euid
}

fn lock(dir: &Path, file: &File, meta: &Metadata) -> Result<(), PinDirError> {
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Err(PinDirError::InUse {
            path: dir.to_owned(),
            holder: lock_holder(meta),
        })
    } else {
        Err(io_err(dir, "locking it")(e))
    }
}

/// The pid holding a flock on `meta`'s inode, from /proc/locks, only to name it in the refusal.
/// Its lines read `1: FLOCK  ADVISORY  WRITE <pid> <major>:<minor>:<inode> 0 EOF` (device
/// numbers in hex); a waiter's line has `->` after the number and is skipped.
fn lock_holder(meta: &Metadata) -> Option<u32> {
    let inode = format!(
        "{:02x}:{:02x}:{}",
        libc::major(meta.dev()),
        libc::minor(meta.dev()),
        meta.ino()
    );
    fs::read_to_string("/proc/locks")
        .ok()?
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            match fields[..] {
                [_, "FLOCK", _, _, pid, id, ..] if id == inode => pid.parse().ok(),
                _ => None,
            }
        })
}

fn same_inode(a: &Metadata, b: &Metadata) -> bool {
    a.dev() == b.dev() && a.ino() == b.ino()
}

fn io_err(dir: &Path, what: &'static str) -> impl FnOnce(io::Error) -> PinDirError {
    let path = dir.to_owned();
    move |source| PinDirError::Io { path, what, source }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    /// A fresh 0755 directory under the temp dir (root's and sticky, as bpffs' root), removed
    /// with what is in it when dropped. The rules are the same on any filesystem, so these
    /// tests need no bpffs.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new() -> Self {
            static N: AtomicU32 = AtomicU32::new(0);
            let dir = std::env::temp_dir().join(format!(
                "patroxy-pin-dir-test-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            fs::create_dir(&dir).unwrap();
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
            Self(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().mode() & 0o7777
    }

    #[test]
    fn creates_the_directory_0700_and_one_daemon_holds_it() {
        let scratch = Scratch::new();
        let dir = scratch.0.join("pins");
        let held = claim(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        let second = claim(&dir).unwrap_err();
        assert_eq!(
            second.to_string(),
            format!(
                "pin directory {}: locked by another running patroxy (pid {}): stop it first, or \
                 give this one its own pin_path",
                dir.display(),
                std::process::id()
            )
        );
        drop(held);
        claim(&dir).expect("free again once the holder is gone");
    }

    #[test]
    fn an_existing_directory_of_ours_is_taken_as_it_is() {
        let scratch = Scratch::new();
        let dir = scratch.0.join("pins");
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        claim(&dir).unwrap();
        assert_eq!(
            mode(&dir),
            0o755,
            "only a directory patroxy creates gets its mode"
        );
    }

    #[test]
    fn a_directory_others_may_write_to_is_refused() {
        let scratch = Scratch::new();
        let dir = scratch.0.join("pins");
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o1777)).unwrap();
        let err = claim(&dir).unwrap_err();
        assert!(
            matches!(err, PinDirError::SharedWrite { mode: 0o1777, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("chmod 700 it"), "{err}");
    }

    #[test]
    fn a_parent_others_may_write_to_must_be_sticky() {
        let scratch = Scratch::new();
        let parent = &scratch.0;
        let dir = parent.join("pins");
        fs::set_permissions(parent, fs::Permissions::from_mode(0o777)).unwrap();
        let err = claim(&dir).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "pin directory {}: {} above it may be written by group or others and is not \
                 sticky (mode 777), so another user could replace the pin directory; put \
                 pin_path under directories only root writes to, or sticky ones like bpffs' root",
                dir.display(),
                parent.display()
            )
        );
        assert!(!dir.exists(), "refused before creating anything");
        fs::set_permissions(parent, fs::Permissions::from_mode(0o1777)).unwrap();
        claim(&dir).unwrap();
    }

    #[test]
    fn a_symbolic_link_is_refused() {
        let scratch = Scratch::new();
        let target = scratch.0.join("elsewhere");
        fs::create_dir(&target).unwrap();
        let link = scratch.0.join("pins");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let err = claim(&link).unwrap_err();
        assert!(
            matches!(&err, PinDirError::Io { what, .. } if what.contains("not a link")),
            "{err}"
        );
    }
}
