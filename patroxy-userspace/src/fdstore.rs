//! Sessions that survive a crash under systemd: the listeners and both sockets of every
//! spliced session are kept in the service manager's file descriptor store (`FDSTORE=1` with
//! an `FDNAME`, `FDSTOREREMOVE=1` when the session ends; the unit sets
//! `FileDescriptorStoreMax=`), and a daemon started with them (`LISTEN_FDS`,
//! `LISTEN_FDNAMES`) reuses the listeners and goes on with the sessions, whose bytes the
//! verdict program forwarded all along from the pinned SOCKS map.
//!
//! Everything a session needs is in its two names, so no state file is kept:
//! `s.<client socket cookie>.<c|b>.<listener name, hex>.<server name, hex>`; listeners are
//! `l.<listener name, hex>`, the stats listener `stats`; a memfd `health` holds the
//! servers' last states and one named `ids` their backend ids. Names are hex because systemd
//! allows only printable ASCII without `:` in them, at most 255 characters.
use std::{
    collections::HashMap,
    io::{self, Read as _, Seek as _, Write as _},
    os::{
        fd::{AsFd, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd, RawFd},
        unix::net::UnixDatagram,
    },
};

use tracing::{debug, warn};

use crate::{
    dataplane::{Detached, sockopt},
    patroni::CarriedHealth,
    server_ids::ServerIds,
};

/// systemd's limit on an FDNAME.
const MAX_NAME: usize = 255;

/// The service manager's notification socket, when there is one (`NOTIFY_SOCKET`).
pub struct FdStore {
    socket: UnixDatagram,
}

impl FdStore {
    /// `None` when not run by a service manager that listens.
    pub fn from_env() -> Option<FdStore> {
        let path = std::env::var_os("NOTIFY_SOCKET")?;
        let socket = UnixDatagram::unbound().ok()?;
        let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
        let connected = match bytes.strip_prefix(b"@") {
            Some(abstract_name) => {
                use std::os::linux::net::SocketAddrExt as _;
                std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)
                    .and_then(|addr| socket.connect_addr(&addr))
            }
            None => socket.connect(&path),
        };
        connected.ok()?;
        Some(FdStore { socket })
    }

    pub fn store_listener(&self, name: &str, listener: BorrowedFd<'_>) {
        self.store(&format!("l.{}", hex(name)), listener);
    }

    pub fn store_stats(&self, listener: BorrowedFd<'_>) {
        self.store("stats", listener);
    }

    /// Replaces the stored health states (a memfd named `health`), which a daemon restarted
    /// after a crash starts from, as an upgrade's successor does: without them its servers
    /// would start as `init_state` says, and a DOWN one's resumed sessions be fenced.
    pub fn store_health(&self, health: &[CarriedHealth]) {
        self.store_json("health", c"patroxy-health", &health);
    }

    /// Replaces the stored server ids (a memfd named `ids`): a daemon restarted after a crash
    /// goes on from them, as an upgrade's successor does, so resumed sessions, whose kernel
    /// entries name their backend by id, keep meaning the same servers after a structural
    /// reload renumbered them.
    pub fn store_ids(&self, ids: &ServerIds) {
        self.store_json("ids", c"patroxy-ids", ids);
    }

    /// Replaces the entry `name` with a memfd holding `value` as JSON.
    fn store_json(&self, name: &str, memfd_name: &std::ffi::CStr, value: &impl serde::Serialize) {
        let stored = serde_json::to_vec(value)
            .map_err(io::Error::other)
            .and_then(|json| {
                // SAFETY: a plain syscall with a valid C string; the fd is owned below.
                let fd = unsafe { libc::memfd_create(memfd_name.as_ptr(), libc::MFD_CLOEXEC) };
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                // SAFETY: a fresh descriptor nobody else owns.
                let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
                file.write_all(&json)?;
                Ok(file)
            });
        match stored {
            Ok(file) => {
                let _ = self
                    .socket
                    .send(format!("FDSTOREREMOVE=1\nFDNAME={name}\n").as_bytes());
                self.store(name, file.as_fd());
            }
            Err(e) => warn!("{name} not kept in the fd store: {e}"),
        }
    }

    /// Stores a session's sockets; the returned names go to [`FdStore::remove`] at its end.
    pub fn store_session(
        &self,
        listener: &str,
        server: &str,
        client: BorrowedFd<'_>,
        backend: BorrowedFd<'_>,
    ) -> Option<SessionNames> {
        let names = SessionNames::of(listener, server, client)?;
        self.store(&names.client, client);
        self.store(&names.backend, backend);
        Some(names)
    }

    pub fn remove(&self, names: &SessionNames) {
        for name in [&names.client, &names.backend] {
            let message = format!("FDSTOREREMOVE=1\nFDNAME={name}\n");
            if let Err(e) = self.socket.send(message.as_bytes()) {
                debug!("FDSTOREREMOVE {name}: {e}");
            }
        }
    }

    fn store(&self, name: &str, fd: BorrowedFd<'_>) {
        if name.len() > MAX_NAME {
            warn!(
                name,
                "not kept in the fd store: the name is longer than systemd allows"
            );
            return;
        }
        let message = format!("FDSTORE=1\nFDNAME={name}\n");
        if let Err(e) = send_with_fds(self.socket.as_fd(), message.as_bytes(), &[fd]) {
            warn!(name, "FDSTORE failed: {e}");
        }
    }
}

/// The fd store names of one session's two sockets.
#[derive(Clone, Debug)]
pub struct SessionNames {
    client: String,
    backend: String,
}

impl SessionNames {
    /// The names of the session whose client socket is `client`.
    pub fn of(listener: &str, server: &str, client: BorrowedFd<'_>) -> Option<SessionNames> {
        let cookie = sockopt::cookie(&client).ok()?;
        let tail = format!("{}.{}", hex(listener), hex(server));
        Some(SessionNames {
            client: format!("s.{cookie}.c.{tail}"),
            backend: format!("s.{cookie}.b.{tail}"),
        })
    }
}

/// What the service manager passed this process at start.
#[derive(Default)]
pub struct Restored {
    pub listeners: Vec<(String, std::net::TcpListener)>,
    pub stats: Option<std::net::TcpListener>,
    /// (listener, server, sockets).
    pub sessions: Vec<(String, String, Detached)>,
    /// The servers' states when the stored health was last written.
    pub health: Vec<CarriedHealth>,
    /// The server ids of the process that stored them.
    pub ids: Option<ServerIds>,
}

impl Restored {
    /// Takes `LISTEN_FDS`/`LISTEN_FDNAMES` if they are for this process (`LISTEN_PID`), and
    /// unsets them so no child inherits them; descriptors with unknown names are closed.
    pub fn from_env() -> io::Result<Option<Restored>> {
        let pid_matches = std::env::var("LISTEN_PID")
            .ok()
            .and_then(|p| p.parse::<u32>().ok())
            == Some(std::process::id());
        let count: usize = match std::env::var("LISTEN_FDS")
            .ok()
            .and_then(|n| n.parse().ok())
        {
            Some(n) if pid_matches => n,
            _ => return Ok(None),
        };
        let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
        // SAFETY: single-threaded at this point (before the runtime starts).
        unsafe {
            std::env::remove_var("LISTEN_PID");
            std::env::remove_var("LISTEN_FDS");
            std::env::remove_var("LISTEN_FDNAMES");
        }
        let names: Vec<&str> = names.split(':').collect();
        let mut restored = Restored::default();
        let mut halves: HashMap<String, (Option<OwnedFd>, Option<OwnedFd>, String, String)> =
            HashMap::new();
        for i in 0..count {
            // SAFETY: sd_listen_fds(3): descriptors 3.. are passed to this process alone.
            let fd = unsafe { OwnedFd::from_raw_fd(3 + i as i32) };
            // SAFETY: marking our own descriptor close-on-exec.
            unsafe { libc::fcntl(3 + i as i32, libc::F_SETFD, libc::FD_CLOEXEC) };
            let name = names.get(i).copied().unwrap_or("");
            let parts: Vec<&str> = name.split('.').collect();
            match parts[..] {
                ["stats"] => restored.stats = Some(fd.into()),
                ["health"] => restored.health = read_json(fd).unwrap_or_else(|e| {
                    warn!("the stored health states are unreadable ({e}); servers start per init_state");
                    Vec::new()
                }),
                ["ids"] => restored.ids = read_json(fd).map_err(|e| {
                    warn!("the stored server ids are unreadable ({e}); servers are numbered afresh");
                }).ok(),
                ["l", listener] => {
                    if let Some(listener) = unhex(listener) {
                        restored.listeners.push((listener, fd.into()));
                    }
                }
                ["s", cookie, side, listener, server] => {
                    let (Some(listener), Some(server)) = (unhex(listener), unhex(server)) else {
                        continue;
                    };
                    let entry = halves
                        .entry(cookie.to_owned())
                        .or_insert((None, None, listener, server));
                    match side {
                        "c" => entry.0 = Some(fd),
                        _ => entry.1 = Some(fd),
                    }
                }
                _ => debug!(name, "closing an fd store entry that is not patroxy's"),
            }
        }
        for (_, (client, backend, listener, server)) in halves {
            if let (Some(client), Some(backend)) = (client, backend) {
                restored.sessions.push((
                    listener,
                    server,
                    Detached {
                        client: client.into(),
                        backend: backend.into(),
                        // Not stored: nothing, for every session patroxy splices.
                        baseline: Default::default(),
                    },
                ));
            }
        }
        Ok(Some(restored))
    }
}

/// Sends `payload` with `fds` attached (SCM_RIGHTS) on a unix socket, in one message.
pub(crate) fn send_with_fds(
    socket: BorrowedFd<'_>,
    payload: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr() as *mut _,
        iov_len: payload.len(),
    };
    let mut control = vec![0u8; scm_space(raw.len())];
    // SAFETY: zeroed msghdr is valid; pointers below outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !raw.is_empty() {
        msg.msg_control = control.as_mut_ptr() as *mut _;
        msg.msg_controllen = control.len() as _;
        // SAFETY: the control buffer holds one header with room for `raw`.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len =
                libc::CMSG_LEN((raw.len() * std::mem::size_of::<RawFd>()) as u32) as _;
            std::ptr::copy_nonoverlapping(
                raw.as_ptr(),
                libc::CMSG_DATA(cmsg) as *mut RawFd,
                raw.len(),
            );
        }
    }
    // SAFETY: valid socket and message.
    let n = unsafe { libc::sendmsg(socket.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn scm_space(fds: usize) -> usize {
    // SAFETY: pure arithmetic.
    unsafe { libc::CMSG_SPACE((fds.max(1) * std::mem::size_of::<RawFd>()) as u32) as usize }
}

fn read_json<T: serde::de::DeserializeOwned>(fd: OwnedFd) -> io::Result<T> {
    let mut file = std::fs::File::from(fd);
    file.rewind()?;
    let mut json = Vec::new();
    file.read_to_end(&mut json)?;
    serde_json::from_slice(&json).map_err(io::Error::other)
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<String> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let bytes = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    String::from_utf8(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_hex() {
        for name in ["postgres_write", "pg-sv01", "ünïcode and spaces", ""] {
            assert_eq!(unhex(&hex(name)).as_deref(), Some(name));
        }
        assert_eq!(unhex("zz"), None);
        assert_eq!(unhex("abc"), None);
    }
}
