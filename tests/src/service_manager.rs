//! A small stand-in for systemd's side of the file descriptor store, since PID 1 here is not
//! systemd: a `NOTIFY_SOCKET` that keeps the descriptors a daemon sends with `FDSTORE=1` under
//! their `FDNAME`, drops them on `FDSTOREREMOVE=1`, and starts the daemon again with them as
//! `LISTEN_FDS`/`LISTEN_FDNAMES`/`LISTEN_PID`, descriptors from 3, as systemd does after a
//! crash with `Restart=on-failure`.
use std::{
    io,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
        unix::{net::UnixDatagram, process::CommandExt as _},
    },
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, Mutex},
    time::Duration,
};

use crate::process::{ChildGuard, patroxy_bin};

pub struct ServiceManager {
    socket_path: PathBuf,
    /// (FDNAME, descriptor), in the order stored.
    store: Arc<Mutex<Vec<(String, OwnedFd)>>>,
}

impl ServiceManager {
    /// Listens on a fresh NOTIFY_SOCKET under the temp dir.
    pub fn start(test: &str) -> ServiceManager {
        let socket_path =
            std::env::temp_dir().join(format!("patroxy-notify-{test}-{}", std::process::id()));
        let _ = std::fs::remove_file(&socket_path);
        let socket = UnixDatagram::bind(&socket_path).expect("bind NOTIFY_SOCKET");
        let store = Arc::new(Mutex::new(Vec::new()));
        let kept = store.clone();
        std::thread::spawn(move || {
            while let Ok((text, fds)) = recv(&socket) {
                apply(&kept, &text, fds);
            }
        });
        ServiceManager { socket_path, store }
    }

    /// The names stored now, in order.
    pub fn names(&self) -> Vec<String> {
        self.store
            .lock()
            .unwrap()
            .iter()
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Waits until `pred` holds for the stored names; false on timeout.
    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&[String]) -> bool) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if pred(&self.names()) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Starts `patroxy run --config <config>` with NOTIFY_SOCKET set and the stored
    /// descriptors passed as systemd passes them.
    pub fn launch(&self, name: &str, config: &Path) -> ChildGuard {
        let store = self.store.lock().unwrap();
        let names: Vec<&str> = store.iter().map(|(n, _)| n.as_str()).collect();
        let fds: Vec<RawFd> = store.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
        let mut cmd = Command::new("/bin/sh");
        // LISTEN_PID must be the daemon's pid: the shell's, which `exec` keeps.
        cmd.arg("-c")
            .arg(r#"LISTEN_PID=$$ exec "$0" "$@""#)
            .arg(patroxy_bin())
            .args(["run", "--drain-grace", "1s", "--config"])
            .arg(config)
            .env("NOTIFY_SOCKET", &self.socket_path)
            .env("PATROXY_LOG", "info,patroxy=debug");
        if !fds.is_empty() {
            cmd.env("LISTEN_FDS", fds.len().to_string())
                .env("LISTEN_FDNAMES", names.join(":"));
        }
        // SAFETY: only fcntl and dup2, async-signal-safe, between fork and exec. Each fd is
        // first moved above the target range so no dup2 overwrites one still to be moved.
        // Allocated here: the child may not allocate between fork and exec.
        let mut high: Vec<RawFd> = vec![-1; fds.len()];
        unsafe {
            cmd.pre_exec(move || {
                for (i, &fd) in fds.iter().enumerate() {
                    high[i] = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 1000);
                }
                for (i, &fd) in high.iter().enumerate() {
                    if fd < 0 || libc::dup2(fd, 3 + i as RawFd) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        drop(store);
        ChildGuard::spawn(name, &mut cmd).expect("spawn patroxy")
    }
}

impl Drop for ServiceManager {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.socket_path);
    }
}

fn apply(store: &Mutex<Vec<(String, OwnedFd)>>, text: &str, fds: Vec<OwnedFd>) {
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key).map(str::to_owned))
    };
    let name = field("FDNAME=").unwrap_or_else(|| "stored".into());
    let mut store = store.lock().unwrap();
    if field("FDSTORE=").as_deref() == Some("1") {
        store.extend(fds.into_iter().map(|fd| (name.clone(), fd)));
    } else if field("FDSTOREREMOVE=").as_deref() == Some("1") {
        store.retain(|(n, _)| *n != name);
    }
}

/// One notification: its text and the descriptors that came with it.
fn recv(socket: &UnixDatagram) -> io::Result<(String, Vec<OwnedFd>)> {
    let mut payload = vec![0u8; 4096];
    let mut iov = libc::iovec {
        iov_base: payload.as_mut_ptr() as *mut _,
        iov_len: payload.len(),
    };
    let mut control = vec![0u8; 4096];
    // SAFETY: zeroed msghdr is valid; the buffers outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut _;
    msg.msg_controllen = control.len() as _;
    // SAFETY: valid socket and message.
    let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: walking the control messages the kernel wrote.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let len = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let data = libc::CMSG_DATA(cmsg) as *const RawFd;
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok((
        String::from_utf8_lossy(&payload[..n as usize]).into_owned(),
        fds,
    ))
}
