//! The hand-over channel: a unix SOCK_SEQPACKET socket pair (message boundaries kept), each
//! message a JSON [`Message`] with the descriptors it names passed along (SCM_RIGHTS).
use std::{
    io,
    mem::size_of,
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd, RawFd},
};

use serde::{Deserialize, Serialize};

use super::Carried;
use crate::fdstore::send_with_fds;
use crate::patroni::CarriedHealth;

/// At most this many descriptors go in one message (the kernel's SCM_MAX_FD is 253).
pub const MAX_FDS: usize = 200;
/// Room for the largest message: `MAX_FDS / 2` session records.
const MAX_PAYLOAD: usize = 256 * 1024;

#[derive(Debug, Serialize, Deserialize)]
pub enum Message {
    /// Predecessor to successor, first. Descriptors, in order: the pin directory's lock (if
    /// `pin_lock`), the XDP allowlist's pin directory's lock (if `xdp_lock`), the listening sockets named in `listeners`, the stats listener (if `stats`),
    /// the runtime socket (if `runtime`, its path), the raw sockets (those `raw_sockets` says).
    Start {
        pid: u32,
        pin_lock: bool,
        /// Absent from a predecessor older than the hand-over of the XDP allowlist.
        #[serde(default)]
        xdp_lock: bool,
        listeners: Vec<String>,
        stats: bool,
        #[serde(default)]
        runtime: Option<std::path::PathBuf>,
        health: Vec<CarriedHealth>,
        /// The rest of the running state (absent from a predecessor older than it).
        #[serde(default)]
        carried: Box<Carried>,
        /// With `datapath = "tc"`, which of the raw sockets for the duplicate ACKs [IPv4, IPv6]
        /// follow, after the runtime socket.
        #[serde(default)]
        raw_sockets: Option<[bool; 2]>,
    },
    /// Successor to predecessor: it accepts on the listeners; the predecessor may stop.
    Accepting { pid: u32 },
    /// Successor to predecessor, instead of `Accepting`: why it cannot start (it exits).
    Failed { error: String },
    /// Spliced sessions; two descriptors each, client then backend.
    Sessions(Vec<SessionRecord>),
    /// No more sessions come.
    Done,
}

/// What travels with a spliced session's two sockets.
#[derive(Debug, Serialize, Deserialize)]
pub struct SessionRecord {
    pub listener: String,
    pub server: String,
    pub client: SocketAddr,
    /// Milliseconds since the client was accepted.
    pub age_ms: u64,
    /// Bytes the predecessor wrote to [client, backend] before the splice (absent from a
    /// predecessor older than it: nothing, as for every PostgreSQL session).
    #[serde(default)]
    pub written_before_splice: [u64; 2],
}

/// One end of the pair. Blocking: callers run it on a blocking thread.
pub struct Channel(OwnedFd);

impl Channel {
    /// The two ends, close-on-exec both (the successor's end is made inheritable by the
    /// spawn, in the child only).
    pub fn pair() -> io::Result<(Channel, Channel)> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: valid out-array of two descriptors.
        let rc = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: two fresh descriptors nobody else owns.
        Ok(unsafe {
            (
                Channel(OwnedFd::from_raw_fd(fds[0])),
                Channel(OwnedFd::from_raw_fd(fds[1])),
            )
        })
    }

    /// The end a predecessor passed as `--takeover-fd`.
    ///
    /// # Safety
    /// `fd` is an open descriptor this process owns and nothing else uses.
    pub unsafe fn from_inherited(fd: RawFd) -> Channel {
        // SAFETY: per the caller.
        Channel(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    pub fn send(&self, message: &Message, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let payload = serde_json::to_vec(message).map_err(io::Error::other)?;
        send_with_fds(self.0.as_fd(), &payload, fds)
    }

    /// The next message and its descriptors; `UnexpectedEof` once the other end is closed.
    pub fn recv(&self) -> io::Result<(Message, Vec<OwnedFd>)> {
        let mut payload = vec![0u8; MAX_PAYLOAD];
        let mut iov = libc::iovec {
            iov_base: payload.as_mut_ptr() as *mut _,
            iov_len: payload.len(),
        };
        let mut control = vec![0u8; cmsg_space(MAX_FDS + 53)];
        // SAFETY: zeroed msghdr is valid; pointers below outlive the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr() as *mut _;
        msg.msg_controllen = control.len() as _;
        let n = loop {
            // SAFETY: valid socket and message; received descriptors are close-on-exec.
            let n = unsafe { libc::recvmsg(self.0.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
            if n >= 0 {
                break n as usize;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        };
        let mut fds = Vec::new();
        // SAFETY: walking the control messages the kernel wrote into `control`.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                    let len = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                    let data = libc::CMSG_DATA(cmsg) as *const RawFd;
                    for i in 0..len / size_of::<RawFd>() {
                        fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                    }
                }
                cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
            }
        }
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
            return Err(io::Error::other("hand-over message truncated"));
        }
        let message = serde_json::from_slice(&payload[..n]).map_err(io::Error::other)?;
        Ok((message, fds))
    }
}

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

fn cmsg_space(fds: usize) -> usize {
    // SAFETY: pure arithmetic.
    unsafe { libc::CMSG_SPACE((fds.max(1) * size_of::<RawFd>()) as u32) as usize }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_start_from_a_predecessor_without_the_xdp_hand_over_carries_no_xdp_lock() {
        let older = r#"{"Start":{"pid":7,"pin_lock":true,"listeners":["pg"],"stats":false,
            "health":[],"carried":{"ids":null,"admin":[],"counters":{"backends":[],"listeners":[]},
            "reload":{}}}}"#;
        let reload = serde_json::to_value(crate::reload::ReloadStatus::default()).unwrap();
        let older = older.replace(r#""reload":{}"#, &format!("\"reload\":{reload}"));
        let Message::Start {
            xdp_lock, carried, ..
        } = serde_json::from_str(&older).expect("an older Start parses")
        else {
            panic!("not Start");
        };
        assert!(!xdp_lock);
        assert_eq!(carried.xdp, None);
    }
}
