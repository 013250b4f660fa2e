//! The fault matrix's rows about backends, clients and the daemon itself (README, "Fault
//! matrix"; the Patroni API rows are api_faults.rs's, and rows that other files already cover
//! name their test there): a backend that never reads, a silent client, clients flooding past
//! `maxconn`, no bpffs under `pin_path`, SIGKILL and restart under pgbench.
#[macro_use]
mod common;

use std::{
    collections::HashMap,
    process::Command,
    time::{Duration, Instant},
};

use common::{Path_, echo_once, one_listener, read_until_closed, wait_probe_closed};
use patroxy_tests::{
    backend::{Backend, Behaviour},
    config::Bpf,
    daemon::{Patroxy, bpftool_dump},
    postgres::{Postgres, PostgresOptions, run_with_timeout},
    process::{ChildGuard, memory, patroxy_bin, reset_peak_memory},
};
use tokio::{io::AsyncWriteExt, net::TcpStream};

on_both_paths!(
    backend_not_reading_keeps_memory_bounded,
    client_silent_is_closed_at_timeout_startup,
    client_closing_at_once_makes_no_backend_connection,
    clients_flooding_past_maxconn_wait_their_turn,
);

/// How much a client tries to send to a backend that never reads.
const FLOOD: usize = 1 << 30;
/// The most the daemon's resident memory may grow meanwhile.
const GROWTH_LIMIT_KIB: u64 = 64 << 10;

/// A client writes 1 GiB to a backend that stops reading after its first bytes (a stuck
/// server): the daemon's memory stays bounded on both paths. On the fallback path the client is
/// blocked once the buffers on the way are full (TCP flow control through the splice pipe). On
/// the sockmap path it is not: the kernel takes every byte off the client socket and queues it
/// for the backend socket, outside TCP's memory accounting (README, "Fault matrix"); the test
/// measures how much.
async fn backend_not_reading_keeps_memory_bounded(path: Path_) {
    let backend = Backend::start(Behaviour::Stall).await;
    let pin = Patroxy::unique_pin_path("stall");
    let config = one_listener(path, &pin, backend.addr);
    let proxy = Patroxy::start("stall", &config);
    wait_probe_closed(&proxy);
    let pid = proxy.child.id();
    reset_peak_memory(pid).expect("reset the daemon's peak RSS");
    let start = memory(pid).expect("the daemon's memory");
    let accepted = backend.accepted();
    let mut client = TcpStream::connect(config.bind()).await.unwrap();
    // A PostgreSQL client speaks first; patroxy connects the backend once it has.
    client.write_all(b"hello").await.unwrap();
    wait_until_connected(&proxy, &backend, accepted, path).await;

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

/// Waits until the daemon connected the session just opened (`backend` had accepted `before`
/// connections until then) and, on the sockmap path, spliced it: a session that sends more than
/// 64 KiB before that is served on the fallback path.
async fn wait_until_connected(proxy: &Patroxy, backend: &Backend, before: usize, path: Path_) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while backend.accepted() <= before {
        assert!(Instant::now() < deadline, "the backend was never connected");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Two entries, its client and backend sockets.
    while path == Path_::Sockmap
        && bpftool_dump(&proxy.pin_path, "SESSIONS")
            .as_array()
            .map_or(0, Vec::len)
            < 2
    {
        assert!(Instant::now() < deadline, "the session was never spliced");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A client that connects and never sends a byte is closed at `timeout_startup`, without a
/// backend connection ever being made for it.
async fn client_silent_is_closed_at_timeout_startup(path: Path_) {
    let backend = Backend::start(Behaviour::Echo).await;
    let pin = Patroxy::unique_pin_path("silent");
    let mut config = one_listener(path, &pin, backend.addr);
    config.defaults.timeout_startup = Some(Duration::from_millis(700));
    let proxy = Patroxy::start("silent", &config);
    wait_probe_closed(&proxy);
    let accepted = backend.accepted();
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
    assert!(proxy.wait_for_log(
        "sent nothing within timeout startup",
        Duration::from_secs(3)
    ));
    assert_eq!(
        backend.accepted(),
        accepted,
        "no backend connection for a silent client"
    );
}

/// Clients that connect and close before sending a byte (port probes, a load balancer's TCP
/// check of the proxy): each ends at once, with no backend connection and no server slot.
async fn client_closing_at_once_makes_no_backend_connection(path: Path_) {
    const CLIENTS: usize = 20;
    let backend = Backend::start(Behaviour::Echo).await;
    let pin = Patroxy::unique_pin_path("closer");
    let config = one_listener(path, &pin, backend.addr);
    let proxy = Patroxy::start("closer", &config);
    wait_probe_closed(&proxy);
    let accepted = backend.accepted();
    let closed = proxy.count_log("session closed");
    for _ in 0..CLIENTS {
        drop(TcpStream::connect(config.bind()).await.unwrap());
    }
    assert!(
        proxy.wait_for_log_count("session closed", closed + CLIENTS, Duration::from_secs(10)),
        "{}",
        proxy.log()
    );
    // A talker after them: its backend connection is the only new one.
    let mut talker = TcpStream::connect(config.bind()).await.unwrap();
    assert!(echo_once(&mut talker, b"hello", Duration::from_secs(5)).await);
    assert_eq!(
        backend.accepted(),
        accepted + 1,
        "backend connections made for clients that closed at once"
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

/// `pin_path` on a filesystem that is not bpffs (a temporary directory, as when bpffs is not
/// mounted where the file says): `auto` falls back with one line saying why and serves,
/// `required` refuses to start, saying why. /sys/fs/bpf itself is left alone: other tests use it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pin_path_not_on_bpffs() {
    if !Path_::Sockmap.available("pin_path_not_on_bpffs") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("patroxy-test-nobpffs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pin = dir.join("patroxy");
    let backend = Backend::start(Behaviour::Echo).await;
    let mut config = one_listener(Path_::Sockmap, &pin, backend.addr);
    let why = format!(
        "pin directory {}: {} is not on a bpf filesystem",
        pin.display(),
        dir.display()
    );

    let file = dir.join("required.toml");
    std::fs::write(&file, config.to_toml()).unwrap();
    let mut run = Command::new(patroxy_bin());
    run.args(["run", "--config"]).arg(&file);
    let out = run_with_timeout(&mut run, Duration::from_secs(20)).expect("run exits");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "required must refuse: {stderr}");
    assert!(
        stderr.contains("bpf = \"required\" but the sockmap data path is unavailable")
            && stderr.contains(&why),
        "{stderr}"
    );

    config.global.bpf = Some(Bpf::Auto);
    let proxy = Patroxy::start("nobpffs", &config);
    let fallback = format!("sockmap data path unavailable ({why}");
    assert!(
        proxy.wait_for_log("using the userspace fallback", Duration::from_secs(5)),
        "{}",
        proxy.log()
    );
    assert_eq!(proxy.count_log(&fallback), 1, "{}", proxy.log());
    let mut s = TcpStream::connect(config.bind()).await.unwrap();
    assert!(echo_once(&mut s, b"served", Duration::from_secs(3)).await);
    drop(s);
    assert!(proxy.wait_for_log("path=\"fallback\"", Duration::from_secs(5)));
    assert!(!pin.exists(), "nothing is pinned outside bpffs");
    drop(proxy);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sigkill_and_restart_under_load_on_sockmap() {
    if Path_::Sockmap.available("sigkill_and_restart_under_load_on_sockmap") {
        sigkill_and_restart_under_load(Path_::Sockmap);
    }
}

#[test]
fn sigkill_and_restart_under_load_on_fallback() {
    sigkill_and_restart_under_load(Path_::Fallback);
}

/// pgbench runs through the daemon when it is killed with SIGKILL: its clients lose their
/// sessions at once (they do not hang), the pins of the sockmap path stay behind, and a restart
/// on the same config replaces them and serves pgbench again without a failed transaction.
fn sigkill_and_restart_under_load(path: Path_) {
    let pg = Postgres::start(PostgresOptions::default());
    pg.pgbench_init(pg.port(), 1);
    let pin = Patroxy::unique_pin_path("sigkill");
    let config = one_listener(path, &pin, pg.addr());
    let port = config.bind().port();
    let mut first = Patroxy::start("sigkill1", &config);
    let maps_before = pinned_map_ids(path, &pin);

    let mut pgbench = pg.client("pgbench", port);
    pgbench
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
        .args(["-S", "-c", "4", "-j", "2", "-T", "120", "postgres"]);
    let mut load = ChildGuard::spawn("pgbench-load", &mut pgbench).expect("spawn pgbench");
    let deadline = Instant::now() + Duration::from_secs(30);
    let active = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgbench'";
    while pg.psql(pg.port(), active) != "4" {
        assert!(
            Instant::now() < deadline,
            "pgbench never had its 4 sessions through patroxy:\n{}",
            load.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    first.child.signal(libc::SIGKILL).unwrap();
    first.child.wait().unwrap();
    let ended = load.wait_timeout(Duration::from_secs(10)).unwrap();
    let status = ended.unwrap_or_else(|| {
        panic!(
            "pgbench still runs 10 s after the daemon died:\n{}",
            load.log()
        )
    });
    assert!(!status.success(), "pgbench saw its sessions end");
    if path == Path_::Sockmap {
        assert!(
            pin.join("SESSIONS").exists(),
            "a killed daemon leaves its pins"
        );
    }

    let second = Patroxy::start("sigkill2", &config);
    if path == Path_::Sockmap {
        assert!(second.wait_for_log("removed stale pins", Duration::from_secs(5)));
        let maps_after = pinned_map_ids(path, &pin);
        for (map, before) in &maps_before {
            let after = maps_after[map];
            assert_ne!(*before, after, "{map} was replaced by the new daemon's");
        }
    }
    let tps = pg
        .try_pgbench(port, &["-S", "-c", "4", "-j", "2", "-T", "3"])
        .unwrap_or_else(|e| panic!("pgbench after the restart: {e}\n{}", second.log()));
    eprintln!(
        "MEASURED {}: pgbench -S -c 4 after SIGKILL and restart: {tps:.0} TPS",
        path.name()
    );
    assert!(tps > 0.0);
}

/// The kernel ids of the maps pinned under `pin` (none on the fallback path), by name.
fn pinned_map_ids(path: Path_, pin: &std::path::Path) -> HashMap<&'static str, u64> {
    if path == Path_::Fallback {
        return HashMap::new();
    }
    ["SOCKS", "SESSIONS", "BACKENDS"]
        .into_iter()
        .map(|map| {
            let out = Command::new("bpftool")
                .args(["-j", "map", "show", "pinned"])
                .arg(pin.join(map))
                .output()
                .expect("run bpftool");
            assert!(out.status.success(), "bpftool map show {map}");
            let shown: serde_json::Value =
                serde_json::from_slice(&out.stdout).expect("bpftool JSON");
            (map, shown["id"].as_u64().expect("a map id"))
        })
        .collect()
}
