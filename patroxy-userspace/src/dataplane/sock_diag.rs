//! The addresses of the host's TCP sockets by socket cookie, from the kernel's sock_diag
//! (NETLINK_SOCK_DIAG, what `ss` reads). SESSIONS keys sessions by cookie and holds no
//! address; this names each session's client (the client socket's peer) and the proxy's own
//! address toward the server (the backend socket's local end), which is what PostgreSQL shows
//! as `pg_stat_activity.client_addr`/`client_port`. No privilege needed.
use std::{
    collections::HashMap,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

/// `SOCK_DIAG_BY_FAMILY` (linux/sock_diag.h).
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// Every TCP state: sessions being closed are still sessions.
const ALL_STATES: u32 = u32::MAX;
const NLMSG_HDR_LEN: usize = 16;
/// `struct inet_diag_req_v2`: family, protocol, ext, pad, states, then the 48-byte sockid.
const REQ_LEN: usize = 56;
/// `struct inet_diag_msg` up to and including its sockid: family, state, timer, retrans, sockid.
const MSG_MIN_LEN: usize = 4 + 48;

/// A socket's two ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketEnds {
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

/// Every TCP socket of this network namespace (IPv4 and IPv6), by cookie.
pub fn tcp_sockets() -> io::Result<HashMap<u64, SocketEnds>> {
    let mut out = HashMap::new();
    for family in [libc::AF_INET, libc::AF_INET6] {
        dump(family as u8, &mut out)?;
    }
    Ok(out)
}

fn dump(family: u8, out: &mut HashMap<u64, SocketEnds>) -> io::Result<()> {
    // SAFETY: plain socket(2); the result is checked and owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let request = request(family);
    // SAFETY: the buffer is valid for its length; the kernel is the destination by default.
    let sent = unsafe { libc::send(fd.as_raw_fd(), request.as_ptr().cast(), request.len(), 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: the buffer is valid for writes of its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if parse(&buf[..n as usize], out)? {
            return Ok(());
        }
    }
}

/// A dump request of every TCP socket of `family`.
fn request(family: u8) -> Vec<u8> {
    let mut msg = Vec::with_capacity(NLMSG_HDR_LEN + REQ_LEN);
    msg.extend(((NLMSG_HDR_LEN + REQ_LEN) as u32).to_ne_bytes());
    msg.extend(SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    msg.extend(((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
    msg.extend(1u32.to_ne_bytes()); // sequence
    msg.extend(0u32.to_ne_bytes()); // port id: the kernel
    msg.extend([family, libc::IPPROTO_TCP as u8, 0, 0]);
    msg.extend(ALL_STATES.to_ne_bytes());
    msg.resize(NLMSG_HDR_LEN + REQ_LEN, 0);
    msg
}

/// Adds the sockets of one datagram of the dump to `out`; true once the dump is done.
fn parse(mut buf: &[u8], out: &mut HashMap<u64, SocketEnds>) -> io::Result<bool> {
    while buf.len() >= NLMSG_HDR_LEN {
        let len = u32::from_ne_bytes(buf[0..4].try_into().expect("4 bytes")) as usize;
        let kind = u16::from_ne_bytes(buf[4..6].try_into().expect("2 bytes"));
        if len < NLMSG_HDR_LEN || len > buf.len() {
            return Err(io::Error::other("sock_diag: truncated message"));
        }
        let body = &buf[NLMSG_HDR_LEN..len];
        match kind {
            k if k == libc::NLMSG_DONE as u16 => return Ok(true),
            k if k == libc::NLMSG_ERROR as u16 => {
                let errno = i32::from_ne_bytes(body[0..4].try_into().expect("4 bytes"));
                return Err(io::Error::from_raw_os_error(-errno));
            }
            SOCK_DIAG_BY_FAMILY if body.len() >= MSG_MIN_LEN => {
                let (cookie, ends) = socket(body);
                out.insert(cookie, ends);
            }
            _ => {}
        }
        // Messages are 4-byte aligned.
        buf = &buf[((len + 3) & !3).min(buf.len())..];
    }
    Ok(false)
}

/// The cookie and ends of one `inet_diag_msg`.
fn socket(msg: &[u8]) -> (u64, SocketEnds) {
    let family = msg[0];
    let id = &msg[4..];
    let port = |at: usize| u16::from_be_bytes([id[at], id[at + 1]]);
    let ip = |at: usize| -> IpAddr {
        if family == libc::AF_INET as u8 {
            Ipv4Addr::from(<[u8; 4]>::try_from(&id[at..at + 4]).expect("4 bytes")).into()
        } else {
            Ipv6Addr::from(<[u8; 16]>::try_from(&id[at..at + 16]).expect("16 bytes")).into()
        }
    };
    let half = |at: usize| u64::from(u32::from_ne_bytes(id[at..at + 4].try_into().expect("4")));
    let cookie = half(40) | half(44) << 32;
    let ends = SocketEnds {
        local: SocketAddr::new(ip(4), port(0)),
        remote: SocketAddr::new(ip(20), port(2)),
    };
    (cookie, ends)
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, TcpStream};

    use super::*;
    use crate::dataplane::sockopt::cookie;

    #[test]
    fn finds_both_ends_of_a_connection_by_cookie() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let sockets = tcp_sockets().unwrap();
        let c = sockets[&cookie(&client).unwrap()];
        assert_eq!(c.local, client.local_addr().unwrap());
        assert_eq!(c.remote, listener.local_addr().unwrap());
        let s = sockets[&cookie(&server).unwrap()];
        assert_eq!((s.local, s.remote), (c.remote, c.local));
    }

    #[test]
    fn ipv6_sockets_too() {
        let Ok(listener) = TcpListener::bind("[::1]:0") else {
            eprintln!("SKIPPED ipv6_sockets_too: no IPv6 loopback here");
            return;
        };
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let sockets = tcp_sockets().unwrap();
        assert_eq!(
            sockets[&cookie(&client).unwrap()].local,
            client.local_addr().unwrap()
        );
    }
}
