//! Health-driven routing end to end: a real patroxy whose servers are checked against scriptable
//! fake Patroni REST APIs, with in-process TCP backends standing in for PostgreSQL (and one real
//! PostgreSQL for psql).
#[macro_use]
mod common;

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use common::{Node, Path_, echo_once, fast_checks, local, read_until_closed};
use patroxy_tests::{
    config::{CheckConfig, ListenerConfig, OnMarkedDown, ProxyConfig},
    daemon::{Patroxy, bpftool_dump},
    fake_patroni::Reply,
    ports::free_tcp_port,
};
use tokio::{io::AsyncWriteExt, net::TcpStream};

/// The routing tests' config: [`common::fast_checks`] with a 3 s `timeout_queue` and one
/// listener, `postgres_write` on a free port checking `/primary`, over `nodes` by name.
fn cluster(path: Path_, pin: &std::path::Path, nodes: &[(&str, &Node)]) -> ProxyConfig {
    let names = nodes.iter().map(|(name, _)| *name);
    let listener = ListenerConfig::new("postgres_write", local(free_tcp_port()), names)
        .check(CheckConfig::new("/primary"));
    let mut config = fast_checks(path, pin);
    config.defaults.timeout_queue = Some(Duration::from_secs(3));
    config.servers = nodes.iter().map(|(name, n)| n.server(name)).collect();
    config.listener(listener)
}

/// Which node's backend a new session reaches: each echo backend counts its connections.
async fn session_lands_on(bind: SocketAddr, nodes: &[&Node]) -> Option<usize> {
    let before: Vec<usize> = nodes.iter().map(|n| n.backend.accepted()).collect();
    let mut s = TcpStream::connect(bind).await.ok()?;
    if !echo_once(&mut s, b"where", Duration::from_secs(3)).await {
        return None;
    }
    nodes
        .iter()
        .zip(before)
        .position(|(n, b)| n.backend.accepted() > b)
}

on_both_paths!(
    writes_follow_the_primary,
    queued_writes_follow_the_primary,
    no_up_server_queues_then_serves_or_closes,
    split_brain_routes_to_the_higher_timeline,
    markdown_resets_1000_sessions,
    on_marked_down_none_keeps_sessions,
);

/// `on_marked_down = "none"` (HAProxy's default): a server marked down gets no new sessions,
/// but the open ones keep working, in the kernel too (no fence).
async fn on_marked_down_none_keeps_sessions(path: Path_) {
    let (a, b) = (Node::start().await, Node::start().await);
    a.api.set("/replica", Reply::replica(200, 1));
    b.api.set("/replica", Reply::replica(200, 1));
    let pin = Patroxy::unique_pin_path("mdnone");
    let mut config = cluster(path, &pin, &[("a", &a), ("b", &b)]);
    config.listeners[0].check = Some(CheckConfig::new("/replica"));
    config.default_server.on_marked_down = Some(OnMarkedDown::Nothing);
    let proxy = Patroxy::start("mdnone", &config);
    let bind = config.bind();
    tokio::time::sleep(Duration::from_millis(600)).await;
    // Open sessions until one lands on a.
    let mut on_a = None;
    for _ in 0..6 {
        let before = a.backend.accepted();
        let mut s = TcpStream::connect(bind).await.unwrap();
        assert!(echo_once(&mut s, b"hi", Duration::from_secs(3)).await);
        if a.backend.accepted() > before {
            on_a = Some(s);
            break;
        }
    }
    let mut on_a = on_a.expect("roundrobin reaches a");
    a.api.set("/replica", Reply::replica(503, 1));
    assert!(proxy.wait_for_log("postgres_write/a is DOWN", Duration::from_secs(3)));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        echo_once(&mut on_a, b"still here", Duration::from_secs(2)).await,
        "the session on the down server still works"
    );
    for _ in 0..4 {
        assert_eq!(
            session_lands_on(bind, &[&a, &b]).await,
            Some(1),
            "new sessions avoid a"
        );
    }
    assert!(!proxy.log().contains("resetting its sessions"));
}

async fn writes_follow_the_primary(path: Path_) {
    let (a, b) = (Node::start().await, Node::start().await);
    a.api.set("/primary", Reply::primary(1));
    b.api.set("/primary", Reply::replica(503, 1));
    let pin = Patroxy::unique_pin_path("follow");
    let config = cluster(path, &pin, &[("a", &a), ("b", &b)]);
    let proxy = Patroxy::start("follow", &config);
    let bind = config.bind();
    // Servers start DOWN: the first session waits in the queue until `rise` checks passed.
    assert_eq!(session_lands_on(bind, &[&a, &b]).await, Some(0));
    for _ in 0..5 {
        assert_eq!(
            session_lands_on(bind, &[&a, &b]).await,
            Some(0),
            "writes go to a"
        );
    }
    let mut held = TcpStream::connect(bind).await.unwrap();
    assert!(echo_once(&mut held, b"held", Duration::from_secs(2)).await);

    // Switchover: a answers 503 (authoritative: down at once), b becomes primary.
    let t0 = Instant::now();
    a.api.set("/primary", Reply::replica(503, 2));
    b.api.set("/primary", Reply::primary(2));
    // The session on the demoted primary is reset, not left to write into a replica.
    let r = tokio::time::timeout(Duration::from_secs(5), read_until_closed(&mut held)).await;
    let err = r.expect("held session closed").expect_err("reset");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
    let reset_after = t0.elapsed();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if session_lands_on(bind, &[&a, &b]).await == Some(1) {
            break;
        }
        assert!(Instant::now() < deadline, "writes never moved to b");
    }
    let moved_after = t0.elapsed();
    for _ in 0..5 {
        assert_eq!(
            session_lands_on(bind, &[&a, &b]).await,
            Some(1),
            "writes stay on b"
        );
    }
    assert!(reset_for_the_failover(&proxy.log()), "{}", proxy.log());
    eprintln!(
        "{}: old primary's session reset after {reset_after:?}, new sessions on b after {moved_after:?}",
        path.name()
    );
}

/// A client queued on a full primary (maxconn) when the primary is marked down goes back to
/// choosing, as HAProxy redistributes a down server's queue: it is served by the new primary
/// instead of taking the slot the reset freed on the old one.
async fn queued_writes_follow_the_primary(path: Path_) {
    let (a, b) = (Node::start().await, Node::start().await);
    a.api.set("/primary", Reply::primary(1));
    b.api.set("/primary", Reply::replica(503, 1));
    let pin = Patroxy::unique_pin_path("queuemove");
    let mut config = cluster(path, &pin, &[("a", &a), ("b", &b)]);
    config.defaults.timeout_queue = Some(Duration::from_secs(10));
    config.default_server.maxconn = Some(1);
    let proxy = Patroxy::start("queuemove", &config);
    let bind = config.bind();
    // The harness's readiness probe is a client too: let it end first.
    assert!(proxy.wait_for_log("session closed", Duration::from_secs(10)));
    let a_before = a.backend.accepted();
    let mut held = TcpStream::connect(bind).await.unwrap();
    assert!(echo_once(&mut held, b"held", Duration::from_secs(5)).await);
    assert_eq!(
        a.backend.accepted(),
        a_before + 1,
        "the held session is on a"
    );
    let mut queued = TcpStream::connect(bind).await.unwrap();
    queued.write_all(b"queued").await.unwrap();
    let mut buf = [0u8; 6];
    let early = tokio::time::timeout(
        Duration::from_millis(500),
        tokio::io::AsyncReadExt::read_exact(&mut queued, &mut buf),
    )
    .await;
    assert!(early.is_err(), "a is at maxconn 1: the second client waits");

    a.api.set("/primary", Reply::replica(503, 2));
    b.api.set("/primary", Reply::primary(2));
    let r = tokio::time::timeout(Duration::from_secs(5), read_until_closed(&mut held)).await;
    assert!(
        r.expect("held session closed").is_err(),
        "held session reset"
    );
    tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read_exact(&mut queued, &mut buf),
    )
    .await
    .expect("the queued client is served")
    .expect("by the new primary, not reset on the old one");
    assert_eq!(&buf, b"queued");
    assert_eq!(b.backend.accepted(), 1, "served by b");
    assert_eq!(
        a.backend.accepted(),
        a_before + 1,
        "no second connection to a"
    );
    assert!(reset_for_the_failover(&proxy.log()), "{}", proxy.log());
}

async fn no_up_server_queues_then_serves_or_closes(path: Path_) {
    let a = Node::start().await;
    a.api.set("/primary", Reply::replica(503, 1));
    let pin = Patroxy::unique_pin_path("noup");
    let mut config = cluster(path, &pin, &[("a", &a)]);
    config.defaults.timeout_queue = Some(Duration::from_secs(2));
    let proxy = Patroxy::start("noup", &config);
    let bind = config.bind();
    // No primary: the client is closed when timeout queue expires.
    let t0 = Instant::now();
    let mut s = TcpStream::connect(bind).await.unwrap();
    let _ = s.write_all(b"hello").await;
    let r = tokio::time::timeout(Duration::from_secs(5), read_until_closed(&mut s)).await;
    assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "{r:?}");
    assert!(
        t0.elapsed() >= Duration::from_millis(1950),
        "{:?}",
        t0.elapsed()
    );
    assert!(proxy.wait_for_log("no server is UP", Duration::from_secs(2)));
    // A client queued while the primary appears is served as soon as it is UP.
    let mut s = TcpStream::connect(bind).await.unwrap();
    let _ = s.write_all(b"queued").await;
    a.api.set("/primary", Reply::primary(1));
    let mut buf = [0u8; 6];
    tokio::time::timeout(
        Duration::from_secs(3),
        tokio::io::AsyncReadExt::read_exact(&mut s, &mut buf),
    )
    .await
    .expect("served once a is UP")
    .unwrap();
    assert_eq!(&buf, b"queued");
}

/// Two servers pass the leader check (split brain): writes go to the higher timeline only, and
/// the sessions already on the older primary are reset (what they write would be lost when it
/// rejoins), though its own checks still pass.
async fn split_brain_routes_to_the_higher_timeline(path: Path_) {
    let (a, b) = (Node::start().await, Node::start().await);
    a.api.set("/primary", Reply::primary(3));
    b.api.set("/primary", Reply::replica(503, 3));
    let pin = Patroxy::unique_pin_path("split");
    let config = cluster(path, &pin, &[("a", &a), ("b", &b)]);
    let proxy = Patroxy::start("split", &config);
    let bind = config.bind();
    let mut held = TcpStream::connect(bind).await.unwrap();
    assert!(echo_once(&mut held, b"held", Duration::from_secs(5)).await);
    assert_eq!(session_lands_on(bind, &[&a, &b]).await, Some(0));

    // b is promoted (timeline 4) while a, cut off from the DCS, still claims the lock.
    b.api.set("/primary", Reply::primary(4));
    assert!(proxy.wait_for_log("postgres_write/b is UP", Duration::from_secs(5)));
    let r = tokio::time::timeout(Duration::from_secs(5), read_until_closed(&mut held)).await;
    assert!(
        r.expect("held session closed").is_err(),
        "the session on the older primary is reset"
    );
    for _ in 0..8 {
        assert_eq!(session_lands_on(bind, &[&a, &b]).await, Some(1));
    }
    let log = proxy.log();
    assert!(
        log.contains("reset: primary superseded by a newer timeline"),
        "{log}"
    );
    assert!(!log.contains("postgres_write/a is DOWN"), "a's checks pass");
    assert_eq!(
        proxy.count_log("servers pass the leader check"),
        1,
        "warned once:\n{log}"
    );
}

async fn markdown_resets_1000_sessions(path: Path_) {
    const SESSIONS: usize = 1000;
    let a = Node::start().await;
    a.api.set("/primary", Reply::primary(1));
    let pin = Patroxy::unique_pin_path("md1000");
    let config = cluster(path, &pin, &[("a", &a)]);
    let proxy = Patroxy::start("md1000", &config);
    let bind = config.bind();
    let mut clients = Vec::with_capacity(SESSIONS);
    for i in 0..SESSIONS {
        let mut s = TcpStream::connect(bind).await.unwrap();
        assert!(
            echo_once(&mut s, b"up", Duration::from_secs(5)).await,
            "session {i}"
        );
        clients.push(s);
    }
    let flipped = Instant::now();
    a.api.set("/primary", Reply::replica(503, 2));
    let waits: Vec<_> = clients
        .into_iter()
        .map(|mut s| {
            tokio::spawn(async move {
                let r =
                    tokio::time::timeout(Duration::from_secs(10), read_until_closed(&mut s)).await;
                (
                    std::time::SystemTime::now(),
                    r.map(|r| r.map_err(|e| e.kind())),
                )
            })
        })
        .collect();
    let mut last = std::time::SystemTime::UNIX_EPOCH;
    for w in waits {
        let (at, r) = w.await.unwrap();
        assert!(
            matches!(r, Ok(Err(std::io::ErrorKind::ConnectionReset))),
            "every session is reset: {r:?}"
        );
        last = last.max(at);
    }
    assert!(
        proxy.wait_for_log("sessions=1000", Duration::from_secs(2)),
        "{}",
        proxy.log()
    );
    let marked = log_time(&proxy.log(), "is DOWN").expect("mark-down logged");
    let markdown_to_last_reset = last.duration_since(marked).unwrap_or_default();
    eprintln!(
        "MEASURED {}: {SESSIONS} sessions: mark-down to last client reset {:?}; \
         503 served to last reset {:?}",
        path.name(),
        markdown_to_last_reset,
        flipped.elapsed()
    );
    assert!(markdown_to_last_reset < Duration::from_secs(5));
}

/// Whether the old primary's sessions were reset: by its mark-down (its 503), or a moment
/// earlier as superseded, when the new primary's higher timeline rose first.
fn reset_for_the_failover(log: &str) -> bool {
    log.contains("reset: server marked down")
        || log.contains("reset: primary superseded by a newer timeline")
}

/// Wall-clock time of the first log line containing `needle` (tracing's RFC 3339 prefix).
fn log_time(log: &str, needle: &str) -> Option<std::time::SystemTime> {
    log.lines()
        .find(|l| l.contains(needle))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|t| humantime::parse_rfc3339(t).ok())
}

/// A fence the daemon did not set (an operator's `bpftool map update` on BACKENDS): the verdict
/// drops the session's bytes at once, and the daemon notices within its once-a-second audit,
/// puts its own entry back, says `set-state ... maint` is the tool, and resets the backend's
/// sessions (the dropped bytes are lost), so the client is not left hanging and no socket is
/// left in CLOSE-WAIT.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fence_set_outside_the_daemon_resets_its_sessions_and_is_undone() {
    if !Path_::Sockmap.available("a_fence_set_outside_the_daemon_resets_its_sessions_and_is_undone")
    {
        return;
    }
    let a = Node::start().await;
    a.api.set("/primary", Reply::primary(1));
    let pin = Patroxy::unique_pin_path("fence");
    let config = cluster(Path_::Sockmap, &pin, &[("a", &a)]);
    let proxy = Patroxy::start("fence", &config);
    let bind = config.bind();
    // The harness's readiness probe is a session too: let it end before counting sessions.
    assert!(proxy.wait_for_log("session closed", Duration::from_secs(10)));
    let mut s = TcpStream::connect(bind).await.unwrap();
    assert!(echo_once(&mut s, b"before", Duration::from_secs(5)).await);

    let backends = bpftool_dump(&pin, "BACKENDS");
    let entry = &backends[0]["value"];
    assert_eq!(entry["fenced"], 0, "{backends}");
    assert_eq!(entry["state"], 1, "UP: {backends}");
    assert_eq!(entry["role"], 1, "primary: {backends}");
    assert_eq!(entry["sessions"], 1, "{backends}");
    let mut value = Vec::new();
    value.extend_from_slice(&(entry["addr_v4"].as_u64().unwrap() as u32).to_ne_bytes());
    value.extend_from_slice(&(entry["port"].as_u64().unwrap() as u16).to_ne_bytes());
    value.extend_from_slice(&(entry["listener"].as_u64().unwrap() as u16).to_ne_bytes());
    value.extend_from_slice(&[1, 1, 1, 0]); // state UP, role primary, fenced, pad
    value.extend_from_slice(&1u32.to_ne_bytes());
    let hex: Vec<String> = value.iter().map(|b| format!("0x{b:02x}")).collect();
    let key: Vec<String> = 1u32
        .to_ne_bytes()
        .iter()
        .map(|b| format!("0x{b:02x}"))
        .collect();
    let out = std::process::Command::new("bpftool")
        .args(["map", "update", "pinned"])
        .arg(pin.join("BACKENDS"))
        .arg("key")
        .args(&key)
        .arg("value")
        .args(&hex)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fenced = Instant::now();

    // The verdict drops what the client sends now; the daemon then resets the session.
    s.write_all(b"after").await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(5), read_until_closed(&mut s))
        .await
        .expect("the client still hangs 5 s after the fence");
    assert_eq!(
        ended.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset),
        "the session was reset"
    );
    eprintln!("reset {:?} after the fence", fenced.elapsed());
    assert!(
        proxy.wait_for_log("fenced outside patroxy", Duration::from_secs(2)),
        "{}",
        proxy.log()
    );
    assert!(proxy.log().contains("set-state"), "{}", proxy.log());
    let restored = bpftool_dump(&pin, "BACKENDS");
    assert_eq!(restored[0]["value"]["fenced"], 0, "{restored}");
    assert_eq!(restored[0]["value"]["state"], 1, "{restored}");
    let close_wait = std::process::Command::new("ss")
        .args(["-Htn", "state", "close-wait"])
        .output()
        .unwrap();
    let close_wait = String::from_utf8_lossy(&close_wait.stdout);
    let ports = [bind.port(), a.backend.addr.port()].map(|p| format!(":{p}"));
    assert!(
        !close_wait
            .split_whitespace()
            .any(|addr| ports.iter().any(|p| addr.ends_with(p.as_str()))),
        "sockets of the session left in CLOSE-WAIT:\n{close_wait}"
    );
    // And the backend serves new sessions again.
    let mut again = TcpStream::connect(bind).await.unwrap();
    assert!(echo_once(&mut again, b"again", Duration::from_secs(5)).await);
}
