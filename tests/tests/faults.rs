//! The fault matrix's rows about backends, clients and the daemon itself (README, "Fault
//! matrix"; the Patroni API rows are api_faults.rs's, and rows that other files already cover
//! name their test there): a backend that never reads, a silent client, clients flooding past
//! `maxconn`, no bpffs under `pin_path`, SIGKILL and restart under pgbench.
#[macro_use]
mod common;

use std::time::{Duration, Instant};

use common::{Path_, echo_once, one_listener, read_until_closed, wait_probe_closed};
use patroxy_tests::{
    backend::{Backend, Behaviour, Ending},
    daemon::{Patroxy, bpftool_dump},
    process::{memory, reset_peak_memory},
};
use tokio::{io::AsyncWriteExt, net::TcpStream};

on_both_paths!(
    backend_not_reading_keeps_memory_bounded,
    client_silent_is_closed_at_timeout_client,
    clients_flooding_past_maxconn_wait_their_turn,
);

/// How much a client tries to send to a backend that never reads.
const FLOOD: usize = 1 << 30;
/// The most the daemon's resident memory may grow meanwhile.
const GROWTH_LIMIT_KIB: u64 = 64 << 10;

/// A client writes 1 GiB to a backend that accepts and never reads: the daemon's memory stays
/// bounded on both paths. On the fallback path the client is blocked once the buffers on the
/// way are full (TCP flow control through the splice pipe). On the sockmap path it is not: the
/// kernel takes every byte off the client socket and queues it for the backend socket, outside
/// TCP's memory accounting (README, "Fault matrix"); the test measures how much.
async fn backend_not_reading_keeps_memory_bounded(path: Path_) {
    let backend = Backend::start(Behaviour::Stall).await;
    let pin = Patroxy::unique_pin_path("stall");
    let config = one_listener(path, &pin, backend.addr);
    let proxy = Patroxy::start("stall", &config);
    // The readiness probe's session stays open too: its FIN waits, unread, at the backend.
    let before = Connected::now(&proxy, &backend, path).await;
    let pid = proxy.child.id();
    reset_peak_memory(pid).expect("reset the daemon's peak RSS");
    let start = memory(pid).expect("the daemon's memory");
    let mut client = TcpStream::connect(config.bind()).await.unwrap();
    before.wait_for_one_more(&proxy, &backend, path).await;

    let chunk = vec![0x5a_u8; 1 << 20];
    let mut sent = 0;
    while sent < FLOOD {
        // Blocked for 3 s: the buffers between client and backend are full.
        match tokio::time::timeout(Duration::from_secs(3), client.write_all(&chunk)).await {
            Ok(Ok(())) => sent += chunk.len(),
            Ok(Err(e)) => panic!("the session failed after {sent} bytes: {e}"),
            Err(_) => break,
        }
    }
    let end = memory(pid).expect("the daemon is still running");
    let grown_kib = end.peak_kib.saturating_sub(start.rss_kib);
    eprintln!(
        "MEASURED {}: a client sent {} MiB to a backend that never reads before it was blocked \
         or gave up; the daemon's peak RSS grew by {grown_kib} KiB",
        path.name(),
        sent >> 20,
    );
    assert!(
        grown_kib < GROWTH_LIMIT_KIB,
        "peak RSS grew by {grown_kib} KiB: {start:?} -> {end:?}"
    );
    match path {
        Path_::Fallback => assert!(
            sent < FLOOD,
            "all of {FLOOD} bytes were taken off the client"
        ),
        Path_::Sockmap => {
            // What the verdict moved from client sockets to their backend sockets' queues; the
            // backend's own buffers hold a few MiB of it at most (tcp_rmem, tcp_wmem).
            let redirected: u64 = bpftool_dump(&pin, "SESSIONS")
                .as_array()
                .expect("SESSIONS entries")
                .iter()
                .filter(|e| e["value"]["side"] == 0)
                .map(|e| e["value"]["bytes_rx"].as_u64().unwrap_or(0))
                .sum();
            eprintln!(
                "MEASURED sockmap: the verdict queued {} MiB for the backend socket",
                redirected >> 20
            );
        }
    }
}

/// Sessions the daemon has connected to a backend and, on the sockmap path, spliced.
struct Connected {
    backend: usize,
    spliced: usize,
}

impl Connected {
    /// The count once the readiness probe's session is connected (and spliced).
    async fn now(proxy: &Patroxy, backend: &Backend, path: Path_) -> Connected {
        let none = Connected {
            backend: 0,
            spliced: 0,
        };
        none.wait_for_one_more(proxy, backend, path).await
    }

    /// Waits until one more session is connected and, on the sockmap path, spliced (a session
    /// that sends more than 64 KiB before that is served on the fallback path); returns the
    /// new count.
    async fn wait_for_one_more(&self, proxy: &Patroxy, backend: &Backend, path: Path_) -> Self {
        let deadline = Instant::now() + Duration::from_secs(10);
        while backend.accepted() <= self.backend {
            assert!(Instant::now() < deadline, "the backend was never connected");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut spliced = 0;
        if path == Path_::Sockmap {
            // Two entries per session: its client and backend sockets.
            loop {
                spliced = bpftool_dump(&proxy.pin_path, "SESSIONS")
                    .as_array()
                    .map_or(0, Vec::len)
                    / 2;
                if spliced > self.spliced {
                    break;
                }
                assert!(Instant::now() < deadline, "the session was never spliced");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Connected {
            backend: backend.accepted(),
            spliced,
        }
    }
}

/// A client that connects and never sends a byte holds its backend connection until
/// `timeout client`, then both are closed.
async fn client_silent_is_closed_at_timeout_client(path: Path_) {
    let backend = Backend::start(Behaviour::Echo).await;
    let pin = Patroxy::unique_pin_path("silent");
    let mut config = one_listener(path, &pin, backend.addr);
    config.defaults.timeout_client = Duration::from_millis(700);
    config.defaults.timeout_server = Duration::from_millis(700);
    let proxy = Patroxy::start("silent", &config);
    wait_probe_closed(&proxy);
    let t0 = Instant::now();
    let mut client = TcpStream::connect(config.bind()).await.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(10), read_until_closed(&mut client)).await;
    let waited = t0.elapsed();
    assert!(
        matches!(r, Ok(Ok(0)) | Ok(Err(_))),
        "closed without data: {r:?}"
    );
    assert!(
        waited >= Duration::from_millis(650) && waited < Duration::from_secs(5),
        "closed after {waited:?}"
    );
    assert!(proxy.wait_for_log_count("idle timeout", 1, Duration::from_secs(3)));
    // The backend connection ends too, having carried nothing.
    let ended = |e: &[Ending]| e.len() >= 2;
    let endings = backend.wait_for(ended, Duration::from_secs(3)).await;
    assert!(
        matches!(
            endings.last(),
            Some(Ending::Eof { bytes: 0, .. } | Ending::Reset { bytes: 0 })
        ),
        "{endings:?}"
    );
}

/// Ten times `maxconn` clients at once: at most `maxconn` sessions run at a time, the others
/// wait in the listen backlog (none refused) and each is served when a place frees.
async fn clients_flooding_past_maxconn_wait_their_turn(path: Path_) {
    const MAXCONN: usize = 20;
    const CLIENTS: usize = 10 * MAXCONN;
    let backend = Backend::start(Behaviour::Echo).await;
    let pin = Patroxy::unique_pin_path("flood");
    let mut config = one_listener(path, &pin, backend.addr);
    config.global.maxconn = Some(MAXCONN as u32);
    let proxy = Patroxy::start("flood", &config);
    wait_probe_closed(&proxy);
    let bind = config.bind();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            tokio::spawn(async move {
                let mut s = TcpStream::connect(bind).await.expect("connect");
                let msg = format!("client {i}");
                assert!(
                    echo_once(&mut s, msg.as_bytes(), Duration::from_secs(60)).await,
                    "client {i} was not served"
                );
                // Held a moment, so that the places are all taken while the others wait.
                tokio::time::sleep(Duration::from_millis(50)).await;
                s.shutdown().await.expect("half-close");
            })
        })
        .collect();
    for c in clients {
        tokio::time::timeout(Duration::from_secs(90), c)
            .await
            .expect("every client is served in time")
            .expect("client task");
    }
    let most = backend.max_concurrent();
    eprintln!(
        "MEASURED {}: {CLIENTS} clients at once, maxconn {MAXCONN}: at most {most} sessions at once",
        path.name()
    );
    assert!(most <= MAXCONN, "{most} backend connections at once");
    assert!(
        proxy.wait_for_log_count("session closed", CLIENTS + 1, Duration::from_secs(10)),
        "every session closed"
    );
    assert_eq!(proxy.count_log("closing client"), 0, "nobody was refused");
}
