//! Free loopback ports for test servers. Tests never use fixed ports: two suites (or a
//! developer's demo) running at once must not collide.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Where [`free_tcp_port`] picks: below the kernel's ephemeral range (`ip_local_port_range`,
/// 32768-60999 by default), which `connect` and `bind(0)` draw from. A port picked there was
/// once taken, between the pick and the bind, by another test's outgoing connection (the daemon
/// then failed with "Address already in use" and the readiness probe reached the other process).
const PICK_RANGE: std::ops::Range<u32> = 20000..32768;

/// The next candidate of this process: each is handed out once, so two tests of one binary
/// never get the same port; a start from the pid keeps binaries run one after another apart.
static NEXT_PICK: AtomicU32 = AtomicU32::new(0);

/// A TCP port on 127.0.0.1 that is free now and that this process has not handed out before.
///
/// Nothing on this machine takes a port of [`PICK_RANGE`] unasked, but another program may
/// bind one explicitly before the caller does; callers that start a server on it retry with a
/// fresh port when the bind fails (as [`crate::postgres::Postgres`] does).
pub fn free_tcp_port() -> u16 {
    let span = PICK_RANGE.end - PICK_RANGE.start;
    let _ = NEXT_PICK.compare_exchange(
        0,
        std::process::id().wrapping_mul(7919) % span + 1,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..span {
        let n = NEXT_PICK.fetch_add(1, Ordering::Relaxed);
        let port = (PICK_RANGE.start + n % span) as u16;
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return port;
        }
    }
    panic!("no free TCP port on 127.0.0.1 in {PICK_RANGE:?}")
}

/// Whether something accepts TCP connections on `addr` right now.
pub fn is_listening(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// Polls `addr` until it accepts a TCP connection or `timeout` passes; returns whether it did.
pub fn wait_for_listen(addr: SocketAddr, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if is_listening(addr) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_are_distinct_and_outside_the_ephemeral_range() {
        let picks: Vec<u16> = (0..50).map(|_| free_tcp_port()).collect();
        let mut distinct = picks.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), picks.len(), "{picks:?}");
        assert!(
            picks.iter().all(|p| PICK_RANGE.contains(&u32::from(*p))),
            "{picks:?}"
        );
    }
}
