//! Operator admin states end to end, HAProxy's `set server <backend>/<server> state
//! ready|drain|maint`: a real patroxy in front of two fake Patroni nodes (echo backends for
//! PostgreSQL), driven through `patroxy set-state` and the stats server's admin endpoint.
#[macro_use]
mod common;

use std::{net::SocketAddr, process::Command, time::Duration};

use common::{Node, Path_, echo_once, fast_checks, local, read_until_closed};
use patroxy_tests::{
    config::{AdminAccess, Balance, CheckConfig, ListenerConfig, OnMarkedDown, StatsConfig},
    daemon::{Patroxy, bpftool_dump},
    fake_patroni::Reply,
    ports::free_tcp_port,
    process::patroxy_bin,
    stats_client::{get, parse_csv, post, row, wait_for},
};
use tokio::{io::AsyncWriteExt, net::TcpStream};

/// A node that answers 200 on /replica and `primary` on /primary.
async fn node(primary: bool) -> Node {
    let node = Node::start().await;
    node.api.set("/replica", Reply::replica(200, 1));
    node.api.set(
        "/primary",
        if primary {
            Reply::primary(1)
        } else {
            Reply::replica(503, 1)
        },
    );
    node
}

/// A daemon with a roundrobin read listener (ids 1, 2) and a `first` write listener (ids 3, 4)
/// over nodes a and b, with a stats server.
struct Setup {
    nodes: [Node; 2],
    daemon: Patroxy,
    read: SocketAddr,
    write: SocketAddr,
    stats: SocketAddr,
}

impl Setup {
    async fn start(path: Path_, name: &str, admin: AdminAccess) -> Setup {
        let on_marked_down = OnMarkedDown::ShutdownSessions;
        Self::start_with(
            path,
            name,
            admin,
            on_marked_down,
            Duration::from_millis(800),
        )
        .await
    }

    async fn start_with(
        path: Path_,
        name: &str,
        admin: AdminAccess,
        on_marked_down: OnMarkedDown,
        timeout_queue: Duration,
    ) -> Setup {
        let nodes = [node(true).await, node(false).await];
        let pin = Patroxy::unique_pin_path(name);
        let (read, write, stats) = (
            local(free_tcp_port()),
            local(free_tcp_port()),
            local(free_tcp_port()),
        );
        let mut config = fast_checks(path, &pin)
            .server(nodes[0].server("a"))
            .server(nodes[1].server("b"))
            .listener(
                ListenerConfig::new("postgres_read", read, ["a", "b"])
                    .balance(Balance::RoundRobin)
                    .check(CheckConfig::new("/replica")),
            )
            .listener(
                ListenerConfig::new("postgres_write", write, ["a", "b"])
                    .check(CheckConfig::new("/primary")),
            )
            .stats(StatsConfig::new(stats).admin(admin));
        config.defaults.timeout_queue = Some(timeout_queue);
        config.default_server.on_marked_down = Some(on_marked_down);
        let daemon = Patroxy::start(name, &config);
        Setup {
            nodes,
            daemon,
            read,
            write,
            stats,
        }
    }

    fn status(&self, listener: &str, server: &str) -> String {
        get(self.stats, "/;csv")
            .map(|r| row(&parse_csv(&r.2), listener, server)["status"].clone())
            .unwrap_or_default()
    }

    /// Waits until the CSV shows `want` for `listener`/`server`.
    fn wait_status(&self, listener: &str, server: &str, want: &str) {
        let seen = wait_for(Duration::from_secs(5), || {
            (self.status(listener, server) == want).then_some(())
        });
        assert!(
            seen.is_some(),
            "{listener}/{server} never {want} (now {}):\n{}",
            self.status(listener, server),
            self.daemon.log()
        );
    }

    /// Which node a new session on `bind` reaches (each echo backend counts its connections).
    async fn lands_on(&self, bind: SocketAddr) -> Option<usize> {
        let before: Vec<usize> = self.nodes.iter().map(|n| n.backend.accepted()).collect();
        let mut s = TcpStream::connect(bind).await.ok()?;
        if !echo_once(&mut s, b"where", Duration::from_secs(3)).await {
            return None;
        }
        self.nodes
            .iter()
            .zip(before)
            .position(|(n, b)| n.backend.accepted() > b)
    }

    /// An open session on `node` of the read listener.
    async fn session_on(&self, node: usize) -> TcpStream {
        for _ in 0..8 {
            let before = self.nodes[node].backend.accepted();
            let mut s = TcpStream::connect(self.read).await.unwrap();
            assert!(echo_once(&mut s, b"hi", Duration::from_secs(3)).await);
            if self.nodes[node].backend.accepted() > before {
                return s;
            }
        }
        panic!("roundrobin never reached node {node}");
    }

    fn set_state(&self, target: &str, state: &str) -> std::process::Output {
        Command::new(patroxy_bin())
            .args(["set-state", "--url", &format!("http://{}", self.stats)])
            .args([target, state])
            .output()
            .unwrap()
    }

    /// BACKENDS' (state, fenced) of backend `id` (sockmap path).
    fn kernel_state(&self, id: u64) -> (u64, u64) {
        let dump = bpftool_dump(&self.daemon.pin_path, "BACKENDS");
        let e = dump
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["key"] == id)
            .unwrap_or_else(|| panic!("no backend {id} in {dump}"));
        let v = &e["value"];
        (v["state"].as_u64().unwrap(), v["fenced"].as_u64().unwrap())
    }
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

on_both_paths!(
    drain_maint_ready_on_a_read_listener,
    maint_on_the_primary_queues_writes,
    maint_with_on_marked_down_none_keeps_sessions,
);

/// With `on_marked_down = "none"` MAINT is a mark-down that keeps the open sessions (no fence,
/// no reset), as HAProxy does; new sessions still avoid the server.
async fn maint_with_on_marked_down_none_keeps_sessions(path: Path_) {
    let c = Setup::start_with(
        path,
        "admin-none",
        AdminAccess::Local,
        OnMarkedDown::Nothing,
        Duration::from_millis(800),
    )
    .await;
    c.wait_status("postgres_read", "a", "UP");
    c.wait_status("postgres_read", "b", "UP");
    let mut held = c.session_on(1).await;
    let out = c.set_state("postgres_read/b", "maint");
    assert!(out.status.success(), "{}", stderr(&out));
    c.wait_status("postgres_read", "b", "MAINT");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        echo_once(&mut held, b"kept", Duration::from_secs(2)).await,
        "the session on the server in MAINT still works"
    );
    for _ in 0..4 {
        assert_eq!(c.lands_on(c.read).await, Some(0), "new sessions avoid b");
    }
    if path == Path_::Sockmap {
        assert_eq!(c.kernel_state(2), (2, 0), "BACKENDS: MAINT, not fenced");
    }
    assert!(!c.daemon.log().contains("resetting its sessions"));
}

/// DRAIN: no new sessions, the open one goes on. MAINT: its session is reset and nothing is
/// routed to it although its check still answers 200. READY: back in the rotation.
async fn drain_maint_ready_on_a_read_listener(path: Path_) {
    let c = Setup::start(path, "admin-read", AdminAccess::Local).await;
    c.wait_status("postgres_read", "a", "UP");
    c.wait_status("postgres_read", "b", "UP");
    let mut held = c.session_on(1).await;

    let out = c.set_state("postgres_read/b", "drain");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "server b of listener postgres_read set to DRAIN (was READY)\n"
    );
    c.wait_status("postgres_read", "b", "DRAIN");
    for _ in 0..6 {
        assert_eq!(c.lands_on(c.read).await, Some(0), "new sessions avoid b");
    }
    assert!(
        echo_once(&mut held, b"draining", Duration::from_secs(2)).await,
        "the open session on the drained server goes on"
    );
    if path == Path_::Sockmap {
        assert_eq!(c.kernel_state(2), (3, 0), "BACKENDS: DRAIN, not fenced");
    }

    let (status, _, body) = post(
        c.stats,
        "/admin/servers/postgres_read/b",
        &[],
        "state=maint",
    )
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let r = tokio::time::timeout(Duration::from_secs(5), read_until_closed(&mut held)).await;
    let err = r.expect("held session closed").expect_err("reset");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
    c.wait_status("postgres_read", "b", "MAINT");
    let rows = parse_csv(&get(c.stats, "/;csv").unwrap().2);
    let b = row(&rows, "postgres_read", "b");
    assert_eq!(
        (b["check_status"].as_str(), b["check_code"].as_str()),
        ("L7OK", "200"),
        "checks go on and pass; MAINT wins"
    );
    assert_eq!(row(&rows, "postgres_read", "BACKEND")["act"], "1");
    for _ in 0..6 {
        assert_eq!(c.lands_on(c.read).await, Some(0), "nothing goes to MAINT");
    }
    if path == Path_::Sockmap {
        assert_eq!(c.kernel_state(2), (2, 1), "BACKENDS: MAINT, fenced");
    }
    let metrics = get(c.stats, "/metrics").unwrap().2;
    assert!(
        metrics.contains(
            "patroxy_server_status{proxy=\"postgres_read\",server=\"b\",state=\"MAINT\"} 1"
        ),
        "{metrics}"
    );
    let json: serde_json::Value = serde_json::from_str(&get(c.stats, "/;json").unwrap().2).unwrap();
    assert_eq!(json["listeners"][0]["servers"][1]["admin"], "maint");
    let log = c.daemon.log();
    assert!(
        log.contains("server b of listener postgres_read set to MAINT by 127.0.0.1"),
        "{log}"
    );
    assert!(log.contains("reset: server set to MAINT"), "{log}");

    let out = c.set_state("postgres_read/b", "ready");
    assert!(out.status.success(), "{}", stderr(&out));
    // Its checks never failed: it is UP again at once and back in the rotation.
    c.wait_status("postgres_read", "b", "UP");
    let mut on_b = 0;
    for _ in 0..6 {
        if c.lands_on(c.read).await == Some(1) {
            on_b += 1;
        }
    }
    assert!(on_b >= 2, "b takes sessions again ({on_b} of 6)");
    if path == Path_::Sockmap {
        assert_eq!(c.kernel_state(2), (1, 0), "BACKENDS: UP, fence lifted");
    }
    // The write listener's b is another backend: untouched by all this.
    assert_eq!(c.status("postgres_write", "b"), "DOWN");
}

/// MAINT on the primary of a `first` listener is a DOWN primary: writes queue, and are closed
/// at `timeout queue` or served once it is READY (and UP) again.
async fn maint_on_the_primary_queues_writes(path: Path_) {
    // The queued write below waits while `patroxy set-state` is forked and run: room for that
    // on a loaded machine.
    let c = Setup::start_with(
        path,
        "admin-write",
        AdminAccess::Local,
        OnMarkedDown::ShutdownSessions,
        Duration::from_secs(3),
    )
    .await;
    c.wait_status("postgres_write", "a", "UP");
    assert_eq!(c.lands_on(c.write).await, Some(0));
    let out = c.set_state("postgres_write/a", "maint");
    assert!(out.status.success(), "{}", stderr(&out));
    c.wait_status("postgres_write", "a", "MAINT");

    // Count this client's refusal line only.
    let refused = c.daemon.count_log("no server is UP");
    let mut s = TcpStream::connect(c.write).await.unwrap();
    let _ = s.write_all(b"hello").await;
    let r = tokio::time::timeout(Duration::from_secs(10), read_until_closed(&mut s)).await;
    assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "{r:?}");
    assert!(
        c.daemon
            .wait_for_log_count("no server is UP", refused + 1, Duration::from_secs(2)),
        "{}",
        c.daemon.log()
    );
    // The read listener's a is another backend: still serving.
    assert_eq!(c.status("postgres_read", "a"), "UP");

    // A write queued while the operator puts the primary back is served.
    let mut s = TcpStream::connect(c.write).await.unwrap();
    let _ = s.write_all(b"queued").await;
    let out = c.set_state("postgres_write/a", "READY");
    assert!(out.status.success(), "{}", stderr(&out));
    let mut buf = [0u8; 6];
    tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read_exact(&mut s, &mut buf),
    )
    .await
    .expect("served once a is READY")
    .unwrap();
    assert_eq!(&buf, b"queued");
}

/// Unknown names, bad states, other origins and a disabled admin endpoint are refused with
/// HAProxy-like reasons, over HTTP and through `patroxy set-state` (non-zero exit).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admin_endpoint_refuses_bad_requests() {
    let c = Setup::start(Path_::Fallback, "admin-bad", AdminAccess::Local).await;
    // Servers start DOWN and rise after their checks.
    c.wait_status("postgres_read", "a", "UP");
    let out = c.set_state("postgres_read/nope", "maint");
    assert!(!out.status.success());
    assert!(
        stderr(&out)
            .contains("404 Not Found: listener \"postgres_read\" has no server named \"nope\""),
        "{}",
        stderr(&out)
    );
    let out = c.set_state("reads/a", "maint");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no listener named \"reads\""),
        "{}",
        stderr(&out)
    );
    let out = c.set_state("postgres_read-a", "maint");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("<listener>/<server>"),
        "{}",
        stderr(&out)
    );
    let out = c.set_state("postgres_read/a", "up");
    assert!(!out.status.success(), "the CLI refuses an unknown state");

    let call = |path: &str, headers: &[(&str, &str)], form: &str| {
        let (status, _, body) = post(c.stats, path, headers, form).unwrap();
        (status, body)
    };
    let (status, body) = call("/admin/servers/postgres_read/a?state=up", &[], "");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("unknown state \"up\""), "{body}");
    assert_eq!(call("/admin/servers/postgres_read/a", &[], "").0, 400);
    assert_eq!(call("/admin/servers/nope/a", &[], "state=drain").0, 404);
    let (status, body) = call(
        "/admin/servers/postgres_read/a",
        &[("Origin", "http://evil.example")],
        "state=maint",
    );
    assert_eq!(status, 403, "{body}");
    assert_eq!(
        get(c.stats, "/admin/servers/postgres_read/a").unwrap().0,
        405
    );
    assert_eq!(c.status("postgres_read", "a"), "UP", "nothing changed");

    let off = Setup::start(Path_::Fallback, "admin-off", AdminAccess::Off).await;
    let out = off.set_state("postgres_read/a", "maint");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("403 Forbidden: forbidden: the admin endpoint is off"),
        "{}",
        stderr(&out)
    );
    assert!(off.daemon.log().contains("admin request refused"));
}
