//! The runtime socket's file: created with its owner, group and mode before anyone can connect,
//! a stale one (left by a crash: nothing listens on it) replaced, a live one refused, and
//! removed on exit unless another process has put its own there since.
use std::{
    fs, io,
    os::unix::{
        fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _},
        net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use tracing::{info, warn};

use crate::config::Runtime;

/// Why the runtime socket could not be created.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("{0:?}: another process listens on it (a patroxy already running?)")]
    InUse(PathBuf),
    #[error("{0:?} exists and is not a socket; remove it or choose another [runtime] socket")]
    NotASocket(PathBuf),
    #[error("{what} {path:?}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

/// The bound socket; dropping it removes the file if it is still this one.
pub struct BoundSocket {
    pub listener: UnixListener,
    path: PathBuf,
    /// The file's device and inode, to recognise it at exit.
    id: (u64, u64),
    /// Set once an upgrade's successor listens on this same socket: the file is its now.
    handed_over: Arc<AtomicBool>,
}

/// Tells a [`BoundSocket`] that a successor took it over, so that its file stays at exit.
#[derive(Clone)]
pub struct HandOver(Arc<AtomicBool>);

impl HandOver {
    pub fn done(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

impl BoundSocket {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What tells this socket, once moved to its thread, that a successor listens on it.
    pub fn hand_over(&self) -> HandOver {
        HandOver(self.handed_over.clone())
    }
}

impl Drop for BoundSocket {
    fn drop(&mut self) {
        if self.handed_over.load(Ordering::SeqCst) {
            return;
        }
        match fs::symlink_metadata(&self.path) {
            Ok(m) if (m.dev(), m.ino()) == self.id => {
                if let Err(e) = fs::remove_file(&self.path) {
                    warn!("runtime socket {}: not removed: {e}", self.path.display());
                }
            }
            // Replaced by another process (a newer daemon): its socket stays.
            _ => {}
        }
    }
}

/// Creates the socket of `runtime`. It is bound under a temporary name, given its mode and
/// owner, then renamed into place, so no one ever connects to it with other permissions.
pub fn bind(runtime: &Runtime) -> Result<BoundSocket, BindError> {
    let path = &runtime.socket;
    let io = |what, path: &Path| {
        let path = path.to_owned();
        move |source| BindError::Io { what, path, source }
    };
    let dir = path.parent().unwrap_or(Path::new("/"));
    if !dir.exists() {
        // systemd's RuntimeDirectory= makes it; elsewhere the daemon does, open to traverse
        // (the socket's own mode decides who may connect).
        fs::create_dir_all(dir).map_err(io("creating the directory of", dir))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755))
            .map_err(io("setting the mode of", dir))?;
    }
    refuse_live(path)?;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let temporary = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let _ = fs::remove_file(&temporary);
    let listener = UnixListener::bind(&temporary).map_err(io("binding", &temporary))?;
    let placed = (|| {
        fs::set_permissions(&temporary, fs::Permissions::from_mode(runtime.mode))
            .map_err(io("setting the mode of", &temporary))?;
        if runtime.uid.is_some() || runtime.gid.is_some() {
            std::os::unix::fs::lchown(&temporary, runtime.uid, runtime.gid)
                .map_err(io("changing the owner of", &temporary))?;
        }
        fs::rename(&temporary, path).map_err(io("moving the socket to", path))
    })();
    if let Err(e) = placed {
        let _ = fs::remove_file(&temporary);
        return Err(e);
    }
    let meta = fs::symlink_metadata(path).map_err(io("reading", path))?;
    info!(
        path = %path.display(),
        mode = format!("{:04o}", runtime.mode),
        uid = meta.uid(),
        gid = meta.gid(),
        "runtime socket listening"
    );
    Ok(BoundSocket {
        listener,
        path: path.clone(),
        id: (meta.dev(), meta.ino()),
        handed_over: Arc::default(),
    })
}

/// The socket of `runtime` as an upgrade's predecessor handed it over, `listener` listening on
/// the file already in place: nothing is bound, moved or re-owned (the successor may lack the
/// capability to), so clients never find the path missing.
pub fn adopt(runtime: &Runtime, listener: UnixListener) -> Result<BoundSocket, BindError> {
    let path = &runtime.socket;
    let meta = fs::symlink_metadata(path).map_err(|source| BindError::Io {
        what: "reading",
        path: path.clone(),
        source,
    })?;
    info!(path = %path.display(), "runtime socket taken over");
    Ok(BoundSocket {
        listener,
        path: path.clone(),
        id: (meta.dev(), meta.ino()),
        handed_over: Arc::default(),
    })
}

/// Refuses `path` when something other than a stale socket is there.
fn refuse_live(path: &Path) -> Result<(), BindError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(BindError::Io {
                what: "reading",
                path: path.to_owned(),
                source,
            });
        }
    };
    if !meta.file_type().is_socket() {
        return Err(BindError::NotASocket(path.to_owned()));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(BindError::InUse(path.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            info!(path = %path.display(), "replacing a stale runtime socket (nothing listens on it)");
            Ok(())
        }
        Err(source) => Err(BindError::Io {
            what: "probing",
            path: path.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime(dir: &Path) -> Runtime {
        Runtime {
            socket: dir.join("sub/patroxy.sock"),
            mode: 0o640,
            uid: None,
            gid: None,
            maxconn: 2,
        }
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("patroxy-ctl-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn created_with_its_mode_replaces_a_stale_one_and_is_removed_on_drop() {
        let dir = temp_dir("bind");
        let rt = runtime(&dir);
        let bound = bind(&rt).unwrap();
        let mode = fs::metadata(&rt.socket).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o640);
        // A second daemon on the same path is refused while the first listens.
        assert!(matches!(bind(&rt), Err(BindError::InUse(_))));
        drop(bound);
        assert!(!rt.socket.exists(), "removed on drop");
        // A crash leaves the file with nobody listening: the next start replaces it.
        drop(UnixListener::bind(&rt.socket).unwrap());
        assert!(rt.socket.exists());
        drop(bind(&rt).unwrap());
        assert!(!rt.socket.exists(), "removed on drop");
    }

    #[test]
    fn a_file_that_is_not_a_socket_is_left_alone() {
        let dir = temp_dir("file");
        let rt = runtime(&dir);
        fs::create_dir_all(rt.socket.parent().unwrap()).unwrap();
        fs::write(&rt.socket, "data").unwrap();
        assert!(matches!(bind(&rt), Err(BindError::NotASocket(_))));
        assert_eq!(fs::read_to_string(&rt.socket).unwrap(), "data");
    }

    #[test]
    fn a_socket_replaced_by_another_process_is_not_removed() {
        let dir = temp_dir("replaced");
        let rt = runtime(&dir);
        let bound = bind(&rt).unwrap();
        fs::remove_file(&rt.socket).unwrap();
        let newer = UnixListener::bind(&rt.socket).unwrap();
        drop(bound);
        assert!(rt.socket.exists(), "the newer socket stays");
        drop(newer);
    }
}
