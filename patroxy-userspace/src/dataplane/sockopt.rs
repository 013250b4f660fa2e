//! The socket options and kernel queries the data path needs, in one place.
use std::{
    io,
    os::fd::{AsFd, AsRawFd},
    time::Duration,
};

use socket2::SockRef;

/// The kernel's socket cookie: the key of the socket in SOCKS and SESSIONS.
pub fn cookie(stream: &impl AsFd) -> io::Result<u64> {
    SockRef::from(stream).cookie()
}

/// Byte counters of one TCP socket, read from TCP_INFO.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpCounters {
    /// In-order bytes received (RFC 4898 HCThruOctetsReceived); a received FIN counts as one.
    pub bytes_received: u64,
    /// Payload bytes the peer acknowledged (excludes retransmissions).
    pub bytes_acked: u64,
    /// Payload bytes handed to TCP for sending: sent once (retransmissions excluded) or still
    /// queued. Bytes the verdict redirected count here once they left the sockmap's queue.
    pub bytes_written: u64,
    /// Of `bytes_written`, the bytes still waiting in the send queue, never sent.
    pub not_sent: u64,
    /// The TCP state (libc::TCP_ESTABLISHED, ...).
    pub state: u8,
}

/// The socket's TCP_INFO.
pub fn tcp_info(stream: &impl AsFd) -> io::Result<libc::tcp_info> {
    // SAFETY: tcp_info is plain old data; all zeroes is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` is a properly sized, writable tcp_info and `len` its size.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_fd().as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info)
}

pub fn tcp_counters(stream: &impl AsFd) -> io::Result<TcpCounters> {
    let info = tcp_info(stream)?;
    Ok(TcpCounters {
        bytes_received: info.tcpi_bytes_received,
        bytes_acked: info.tcpi_bytes_acked,
        bytes_written: (info.tcpi_bytes_sent - info.tcpi_bytes_retrans)
            + u64::from(info.tcpi_notsent_bytes),
        not_sent: u64::from(info.tcpi_notsent_bytes),
        state: info.tcpi_state,
    })
}

/// Wakes a socket that was just inserted into the sockmap so the verdict program sees bytes that
/// arrived before the insertion (setting SO_RCVLOWAT calls the socket's data_ready).
pub fn kick(stream: &impl AsFd) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: plain setsockopt with an int option.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&raw const one).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Arms SO_LINGER {1, 0}: the close that follows sends RST instead of FIN.
pub fn arm_reset(stream: &impl AsFd) -> io::Result<()> {
    SockRef::from(stream).set_linger(Some(Duration::ZERO))
}

/// Half-closes our sending side (FIN to the peer) after the bytes already queued.
pub fn shutdown_write(stream: &impl AsFd) -> io::Result<()> {
    SockRef::from(stream).shutdown(std::net::Shutdown::Write)
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Bytes waiting in the socket's receive queue (FIONREAD/SIOCINQ).
pub fn queued_bytes(stream: &impl AsFd) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    let rc = unsafe { libc::ioctl(stream.as_fd().as_raw_fd(), libc::FIONREAD, &mut n) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n.max(0) as usize)
}

/// SO_MEMINFO (rmem_alloc, rcvbuf, wmem_alloc, sndbuf, fwd_alloc, wmem_queued, optmem,
/// backlog, drops): for tracing.
pub fn meminfo(stream: &impl AsFd) -> io::Result<[u32; 9]> {
    let mut info = [0u32; 9];
    let mut len = std::mem::size_of_val(&info) as libc::socklen_t;
    // SAFETY: an array of u32 the kernel fills, with its size.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MEMINFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info)
}
