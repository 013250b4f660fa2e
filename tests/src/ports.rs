//! Free loopback ports for test servers. Tests never use fixed ports: two suites (or a
//! developer's demo) running at once must not collide.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// A TCP port on 127.0.0.1 that was free a moment ago: bound to port 0, read back, released.
///
/// Another process may take it before the caller binds it; callers that start a server on
/// it retry with a fresh port when the bind fails (as [`crate::postgres::Postgres`] does).
pub fn free_tcp_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .expect("binding 127.0.0.1:0 to find a free port");
    listener
        .local_addr()
        .expect("local_addr of a bound listener")
        .port()
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
