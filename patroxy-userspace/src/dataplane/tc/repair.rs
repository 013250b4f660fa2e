//! TCP_REPAIR and the other socket options of the hand-off, in one place. TCP_REPAIR needs
//! CAP_NET_ADMIN, which is why `datapath = "tc"` keeps it after start-up (privileges.rs).
use std::{
    io,
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd},
};

use socket2::{Domain, SockRef, Socket, Type};

/// include/uapi/linux/tcp.h
const TCP_REPAIR_ON: libc::c_int = 1;
/// Leaves repair mode without the window probe `TCP_REPAIR_OFF` sends.
const TCP_REPAIR_OFF_NO_WP: libc::c_int = -1;
const TCP_RECV_QUEUE: libc::c_int = 1;
const TCP_SEND_QUEUE: libc::c_int = 2;
/// `tcpi_options` bits.
const TCPI_OPT_TIMESTAMPS: u8 = 1;
const TCPI_OPT_SACK: u8 = 2;

fn setsockopt_int(
    fd: &impl AsFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: an int option with its size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_fd().as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn getsockopt_u32(fd: &impl AsFd, level: libc::c_int, name: libc::c_int) -> io::Result<u32> {
    let mut value: u32 = 0;
    let mut len = std::mem::size_of::<u32>() as libc::socklen_t;
    // SAFETY: a 4-byte out value with its size.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_fd().as_raw_fd(),
            level,
            name,
            (&raw mut value).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// The options a leg negotiated that decide whether two legs can be spliced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Negotiated {
    pub timestamps: bool,
    pub sack: bool,
    /// The scale this socket applies to the peer's windows (the peer's announced scale).
    pub snd_wscale: u8,
    /// The scale this socket announced for its own windows.
    pub rcv_wscale: u8,
    pub mss: u32,
    pub state: u8,
}

pub(super) fn negotiated(fd: &impl AsFd) -> io::Result<Negotiated> {
    let info = crate::dataplane::sockopt::tcp_info(fd)?;
    Ok(Negotiated {
        timestamps: info.tcpi_options & TCPI_OPT_TIMESTAMPS != 0,
        sack: info.tcpi_options & TCPI_OPT_SACK != 0,
        // A 4-bit field each: tcpi_snd_wscale in the low nibble (little-endian bitfields).
        snd_wscale: info.tcpi_snd_rcv_wscale & 0x0f,
        rcv_wscale: info.tcpi_snd_rcv_wscale >> 4,
        mss: getsockopt_u32(fd, libc::IPPROTO_TCP, libc::TCP_MAXSEG)?,
        state: info.tcpi_state,
    })
}

/// Bytes written to the socket and not yet acknowledged by its peer (SIOCOUTQ).
pub(super) fn unacked_bytes(fd: &impl AsFd) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (TIOCOUTQ) writes one int.
    let rc = unsafe { libc::ioctl(fd.as_fd().as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n.max(0) as usize)
}

pub(super) fn enter(fd: &impl AsFd) -> io::Result<()> {
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR, TCP_REPAIR_ON)
}

/// Back to a normal socket, nothing sent.
pub(super) fn leave(fd: &impl AsFd) -> io::Result<()> {
    setsockopt_int(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_REPAIR,
        TCP_REPAIR_OFF_NO_WP,
    )
}

/// (next sequence number to send, next expected to receive) of a socket in repair mode. The
/// receive queue is selected last and stays so: with the send queue selected, the socket
/// would "send" without transmitting whatever it queues (the caller makes sure nothing is
/// unsent when it selects it).
pub(super) fn sequences(fd: &impl AsFd) -> io::Result<(u32, u32)> {
    let read = |queue| {
        setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR_QUEUE, queue)?;
        getsockopt_u32(fd, libc::IPPROTO_TCP, libc::TCP_QUEUE_SEQ)
    };
    Ok((read(TCP_SEND_QUEUE)?, read(TCP_RECV_QUEUE)?))
}

/// The window a socket in repair mode last advertised, as its peer reads the header field
/// (scaled by `rcv_wscale`, the scale the socket announced).
pub(super) fn advertised_window(fd: &impl AsFd, rcv_wscale: u8) -> io::Result<u16> {
    /// include/uapi/linux/tcp.h: struct tcp_repair_window.
    #[repr(C)]
    #[derive(Default)]
    struct RepairWindow {
        snd_wl1: u32,
        snd_wnd: u32,
        max_window: u32,
        rcv_wnd: u32,
        rcv_wup: u32,
    }
    const TCP_REPAIR_WINDOW: libc::c_int = 29;
    let mut w = RepairWindow::default();
    let mut len = std::mem::size_of::<RepairWindow>() as libc::socklen_t;
    // SAFETY: the struct the kernel fills, with its size.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_fd().as_raw_fd(),
            libc::IPPROTO_TCP,
            TCP_REPAIR_WINDOW,
            (&raw mut w).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((w.rcv_wnd >> rcv_wscale).min(u32::from(u16::MAX)) as u16)
}

/// Keepalive off: a repair-mode socket must send nothing of its own while the TC program
/// carries its connection.
pub(super) fn quiet(fd: &impl AsFd) -> io::Result<()> {
    SockRef::from(fd).set_keepalive(false)
}

/// Resets the peer of a connection whose socket was closed in repair mode: a socket rebuilt in
/// repair mode on the same 4-tuple with the sequence numbers the peer expects now (`snd_nxt`,
/// tracked by the TC program; `rcv_nxt`), then closed with linger 0, sends the RST the peer
/// accepts (RFC 5961 wants the exact next sequence number).
pub(super) fn reset_peer(
    local: SocketAddr,
    peer: SocketAddr,
    snd_nxt: u32,
    rcv_nxt: u32,
) -> io::Result<()> {
    let socket = Socket::new(Domain::for_address(local), Type::STREAM, None)?;
    enter(&socket)?;
    // SK_FORCE_REUSE in repair mode lets it take the local port (the flow's own socket is gone).
    socket.bind(&local.into())?;
    let set_seq = |queue, seq: u32| {
        setsockopt_int(&socket, libc::IPPROTO_TCP, libc::TCP_REPAIR_QUEUE, queue)?;
        setsockopt_int(
            &socket,
            libc::IPPROTO_TCP,
            libc::TCP_QUEUE_SEQ,
            seq as libc::c_int,
        )
    };
    set_seq(TCP_SEND_QUEUE, snd_nxt)?;
    set_seq(TCP_RECV_QUEUE, rcv_nxt)?;
    // In repair mode connect() sends no SYN: the socket is established at once.
    socket.connect(&peer.into())?;
    leave(&socket)?;
    socket.set_linger(Some(std::time::Duration::ZERO))?;
    drop(socket);
    Ok(())
}
