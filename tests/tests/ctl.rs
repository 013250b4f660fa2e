//! The runtime socket (`[runtime]`, `patroxy ctl`) and the admin endpoint's token
//! (`[stats] admin_auth_file`) end to end: a real patroxy in front of two fake Patroni nodes
//! (echo backends for PostgreSQL).
#[macro_use]
mod common;

use std::{
    net::SocketAddr,
    os::unix::{fs::PermissionsExt as _, net::UnixListener},
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use common::{Node, Path_, echo_once, fast_checks, local, read_until_closed};
use patroxy_tests::{
    config::{
        AdminAccess, Balance, CheckConfig, ListenerConfig, ProxyConfig, RuntimeConfig, StatsConfig,
    },
    daemon::Patroxy,
    fake_patroni::Reply,
    ports::free_tcp_port,
    process::{is_root, patroxy_bin},
    stats_client::{get, parse_csv, post, row, wait_for},
};
use tokio::net::TcpStream;

/// A directory of this test's own, for its socket and token files (root's, mode 0755).
fn test_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("patroxy-ctl-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// A token file with `mode`.
fn token_file(dir: &Path, token: &str, mode: u32) -> PathBuf {
    let path = dir.join("admin.token");
    std::fs::write(&path, format!("{token}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path
}

const TOKEN: &str = "6f1c0ffee2b94e0a8d3a5b7c9e1f2a3b";

/// Two nodes answering 200 on /replica behind a roundrobin read listener (ids 1, 2), with a
/// stats server; `adjust` adds the runtime socket or the token.
struct Setup {
    nodes: [Node; 2],
    daemon: Patroxy,
    config: ProxyConfig,
    read: SocketAddr,
    stats: SocketAddr,
}

impl Setup {
    async fn start(path: Path_, name: &str, adjust: impl FnOnce(&mut ProxyConfig)) -> Setup {
        let nodes = [Node::start().await, Node::start().await];
        for n in &nodes {
            n.api.set("/replica", Reply::replica(200, 1));
        }
        let pin = Patroxy::unique_pin_path(name);
        let (read, stats) = (local(free_tcp_port()), local(free_tcp_port()));
        let mut config = fast_checks(path, &pin)
            .server(nodes[0].server("a"))
            .server(nodes[1].server("b"))
            .listener(
                ListenerConfig::new("postgres_read", read, ["a", "b"])
                    .balance(Balance::RoundRobin)
                    .check(CheckConfig::new("/replica")),
            )
            .stats(StatsConfig::new(stats).admin(AdminAccess::Local));
        config.defaults.timeout_queue = Some(Duration::from_millis(800));
        adjust(&mut config);
        let daemon = Patroxy::start(name, &config);
        let setup = Setup {
            nodes,
            daemon,
            config,
            read,
            stats,
        };
        setup.wait_status("a", "UP");
        setup.wait_status("b", "UP");
        setup
    }

    fn socket(&self) -> PathBuf {
        self.config.runtime.as_ref().unwrap().socket.clone()
    }

    fn status(&self, server: &str) -> String {
        get(self.stats, "/;csv")
            .map(|r| row(&parse_csv(&r.2), "postgres_read", server)["status"].clone())
            .unwrap_or_default()
    }

    fn wait_status(&self, server: &str, want: &str) {
        let seen = wait_for(Duration::from_secs(5), || {
            (self.status(server) == want).then_some(())
        });
        assert!(
            seen.is_some(),
            "postgres_read/{server} never {want} (now {}):\n{}",
            self.status(server),
            self.daemon.log()
        );
    }

    /// `patroxy ctl --socket <socket> <words>`.
    fn ctl(&self, words: &[&str]) -> Output {
        Command::new(patroxy_bin())
            .arg("ctl")
            .arg("--socket")
            .arg(self.socket())
            .args(words)
            .output()
            .unwrap()
    }

    /// An open session on node `node` (roundrobin alternates).
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
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Succeeded, with its stdout.
fn ok(out: Output) -> String {
    assert!(out.status.success(), "failed: {}", stderr(&out));
    stdout(&out)
}

/// Failed with exit 1, with its stderr.
fn failed(out: Output) -> String {
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    stderr(&out)
}

on_both_paths!(every_command_over_the_runtime_socket);

/// help, show servers, show sessions, set state (MAINT resets the server's sessions like a
/// mark-down), reload and a bad command, in text and JSON.
async fn every_command_over_the_runtime_socket(path: Path_) {
    let dir = test_dir(&format!("commands-{}", path.name()));
    let c = Setup::start(path, "ctl-commands", |config| {
        config.runtime = Some(RuntimeConfig::new(dir.join("patroxy.sock")));
    })
    .await;
    let mode = std::fs::metadata(c.socket()).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o660, "the default mode");

    let help = ok(c.ctl(&["help"]));
    for command in ["show servers", "show sessions", "set state", "reload"] {
        assert!(help.contains(command), "{help}");
    }

    let servers = ok(c.ctl(&["show", "servers"]));
    assert!(servers.contains("postgres_read  bind "), "{servers}");
    for server in ["a ", "b "] {
        let line = servers.lines().find(|l| l.starts_with(server));
        assert!(line.is_some_and(|l| l.contains(" UP ")), "{servers}");
    }
    let json: serde_json::Value =
        serde_json::from_str(&ok(c.ctl(&["show", "servers", "--json"]))).unwrap();
    assert_eq!(json["listeners"][0]["servers"][1]["name"], "b");
    assert_eq!(json["listeners"][0]["servers"][1]["status"], "UP");

    let mut held = c.session_on(1).await;
    match path {
        Path_::Sockmap => {
            let sessions = ok(c.ctl(&["show", "sessions"]));
            assert!(
                sessions
                    .lines()
                    .any(|l| l.contains("postgres_read") && l.contains("b (#2)")),
                "{sessions}"
            );
            let json: serde_json::Value =
                serde_json::from_str(&ok(c.ctl(&["show", "sessions", "--json"]))).unwrap();
            let rows = json.as_array().unwrap();
            assert!(
                rows.iter()
                    .any(|r| r["server"] == "b" && r["backend_id"] == 2),
                "{json}"
            );
            // Each session names its client and the proxy's address toward the server.
            let client = held.local_addr().unwrap().to_string();
            assert!(
                rows.iter()
                    .any(|r| r["client_addr"] == client && r["proxy_addr"].is_string()),
                "{json}"
            );
        }
        Path_::Fallback => {
            let e = failed(c.ctl(&["show", "sessions"]));
            assert!(e.contains("this daemon runs the fallback path"), "{e}");
        }
    }

    let answer = ok(c.ctl(&["set", "state", "postgres_read/b", "maint"]));
    assert_eq!(
        answer,
        "server b of listener postgres_read set to MAINT (was READY)\n"
    );
    let r = tokio::time::timeout(Duration::from_secs(5), read_until_closed(&mut held)).await;
    let err = r.expect("held session closed").expect_err("reset");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
    c.wait_status("b", "MAINT");
    let log = c.daemon.log();
    assert!(
        log.contains("set to MAINT by uid 0 (pid ") && log.contains("on the runtime socket"),
        "{log}"
    );
    let json: serde_json::Value = serde_json::from_str(&ok(c.ctl(&[
        "set",
        "server",
        "postgres_read/b",
        "state",
        "ready",
        "--json",
    ])))
    .unwrap();
    assert_eq!(json["state"], "ready");
    assert_eq!(json["previous"], "maint");
    c.wait_status("b", "UP");

    // `reload` is the daemon's one reload (as SIGHUP): the file is unchanged, so is the config.
    let answer = ok(c.ctl(&["reload"]));
    assert!(
        answer.contains("configuration reloaded: nothing changed"),
        "{answer}"
    );
    let json: serde_json::Value = serde_json::from_str(&ok(c.ctl(&["reload", "--json"]))).unwrap();
    assert_eq!(json["reloaded"], true, "{json}");
    // `patroxy reload --config` goes through the config's runtime socket.
    let out = Command::new(patroxy_bin())
        .args(["reload", "--config"])
        .arg(&c.daemon.config_path)
        .output()
        .unwrap();
    assert!(ok(out).contains("nothing changed"));
    let e = failed(c.ctl(&["show", "stat"]));
    assert!(
        e.contains("unknown command \"show stat\"; try `help`"),
        "{e}"
    );
    let e = failed(c.ctl(&["set", "state", "postgres_read/nope", "drain"]));
    assert!(e.contains("has no server named \"nope\""), "{e}");

    // The socket from --config, and `set-state` preferring the socket when there is one.
    let out = Command::new(patroxy_bin())
        .args(["ctl", "--config"])
        .arg(&c.daemon.config_path)
        .arg("help")
        .output()
        .unwrap();
    assert!(ok(out).contains("show servers"));
    let out = Command::new(patroxy_bin())
        .args(["set-state", "--config"])
        .arg(&c.daemon.config_path)
        .args(["postgres_read/a", "drain"])
        .output()
        .unwrap();
    assert_eq!(
        ok(out),
        "server a of listener postgres_read set to DRAIN (was READY)\n"
    );
    c.wait_status("a", "DRAIN");
    assert!(c.daemon.log().contains("set to DRAIN by uid 0"));
}

/// Access is the socket file's permissions: a user who is neither its owner nor in its group
/// cannot connect; with mode 0666 anyone can.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unprivileged_user_cannot_connect() {
    if !is_root() {
        eprintln!("SKIP an_unprivileged_user_cannot_connect: needs root to switch users");
        return;
    }
    let dir = test_dir("nobody");
    let c = Setup::start(Path_::Fallback, "ctl-nobody", |config| {
        config.runtime = Some(RuntimeConfig::new(dir.join("patroxy.sock")));
    })
    .await;
    let as_nobody = || {
        Command::new("setpriv")
            .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
            .arg(patroxy_bin())
            .arg("ctl")
            .arg("--socket")
            .arg(c.socket())
            .args(["set", "state", "postgres_read/a", "maint"])
            .output()
            .unwrap()
    };
    let e = failed(as_nobody());
    assert!(e.contains("Permission denied"), "{e}");
    assert_eq!(c.status("a"), "UP", "nothing changed");
    std::fs::set_permissions(c.socket(), std::fs::Permissions::from_mode(0o666)).unwrap();
    ok(as_nobody());
    c.wait_status("a", "MAINT");
    assert!(c.daemon.log().contains("set to MAINT by uid 65534"));
}

/// A stale socket (nobody listening) is replaced at start, a live one makes a second daemon
/// refuse to start, and the socket is removed on exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_socket_file_is_replaced_only_when_stale_and_removed_on_exit() {
    let dir = test_dir("lifecycle");
    let socket = dir.join("patroxy.sock");
    drop(UnixListener::bind(&socket).unwrap());
    assert!(socket.exists(), "a stale socket, as a crash leaves it");
    let c = Setup::start(Path_::Fallback, "ctl-lifecycle", |config| {
        config.runtime = Some(RuntimeConfig::new(&socket));
    })
    .await;
    assert!(ok(c.ctl(&["help"])).contains("show servers"));
    assert!(c.daemon.log().contains("replacing a stale runtime socket"));

    // A second daemon with the same socket (and ports of its own) refuses to start.
    let mut second = c.config.clone();
    second.global.pin_path = Some(Patroxy::unique_pin_path("ctl-second"));
    second.listeners[0].bind = local(free_tcp_port());
    second.stats.as_mut().unwrap().bind = local(free_tcp_port());
    let file = dir.join("second.toml");
    std::fs::write(&file, second.to_toml()).unwrap();
    let out = Command::new(patroxy_bin())
        .arg("run")
        .arg("--config")
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("another process listens on it"),
        "{}",
        stderr(&out)
    );
    assert!(
        ok(c.ctl(&["help"])).contains("show servers"),
        "still served"
    );

    drop(c);
    assert!(!socket.exists(), "removed on exit");
}

/// With `[stats] admin_auth_file`, admin POSTs need its token: none or a wrong one is a 401
/// (counted in the metrics), the right one works; `patroxy set-state` sends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admin_posts_need_the_token() {
    let dir = test_dir("token");
    let token = token_file(&dir, TOKEN, 0o600);
    let c = Setup::start(Path_::Fallback, "ctl-token", |config| {
        let stats = config.stats.take().unwrap();
        config.stats = Some(stats.admin_auth_file(&token));
    })
    .await;
    let call = |headers: &[(&str, &str)]| {
        let (status, _, body) = post(
            c.stats,
            "/admin/servers/postgres_read/a",
            headers,
            "state=drain",
        )
        .unwrap();
        (status, body)
    };
    let (status, body) = call(&[]);
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("[stats] admin_auth_file"), "{body}");
    let (status, body) = call(&[("Authorization", "Bearer not-the-token-at-all-0000")]);
    assert_eq!(
        (status, body.as_str()),
        (401, "unauthorized: wrong token\n")
    );
    assert_eq!(c.status("a"), "UP", "nothing changed");
    let bearer = format!("Bearer {TOKEN}");
    let (status, body) = call(&[("Authorization", bearer.as_str())]);
    assert_eq!(status, 200, "{body}");
    c.wait_status("a", "DRAIN");
    let metrics = get(c.stats, "/metrics").unwrap().2;
    assert!(
        metrics.contains("patroxy_admin_unauthorized_requests_total 2"),
        "{metrics}"
    );
    // Read-only pages stay open.
    assert_eq!(get(c.stats, "/;json").unwrap().0, 200);

    let set_state = |args: &[&str]| {
        Command::new(patroxy_bin())
            .arg("set-state")
            .args(args)
            .output()
            .unwrap()
    };
    let url = format!("http://{}", c.stats);
    let e = failed(set_state(&["--url", &url, "postgres_read/a", "ready"]));
    assert!(e.contains("401 Unauthorized: unauthorized"), "{e}");
    let token_arg = token.to_string_lossy();
    let out = set_state(&[
        "--url",
        &url,
        "--token-file",
        &token_arg,
        "postgres_read/a",
        "ready",
    ]);
    assert_eq!(
        ok(out),
        "server a of listener postgres_read set to READY (was DRAIN)\n"
    );
    // No runtime socket in the config: the stats server, with the config's token.
    let config = c.daemon.config_path.to_string_lossy();
    let out = set_state(&["--config", &config, "postgres_read/b", "maint"]);
    assert_eq!(
        ok(out),
        "server b of listener postgres_read set to MAINT (was READY)\n"
    );
    c.wait_status("b", "MAINT");
}

/// `check-config` refuses a token file other users may read, and takes it once it is 0600.
#[test]
fn check_config_refuses_a_world_readable_token_file() {
    let dir = test_dir("check");
    let token = token_file(&dir, TOKEN, 0o644);
    let config = fast_checks(Path_::Fallback, &dir.join("pins"))
        .server(patroxy_tests::config::ServerConfig::new("a", local(6000)))
        .listener(ListenerConfig::new("l", local(5000), ["a"]))
        .stats(StatsConfig::new(local(7000)).admin_auth_file(&token));
    let file = dir.join("patroxy.toml");
    std::fs::write(&file, config.to_toml()).unwrap();
    let check = || {
        Command::new(patroxy_bin())
            .arg("check-config")
            .arg(&file)
            .output()
            .unwrap()
    };
    let out = check();
    assert_eq!(out.status.code(), Some(64), "{}", stdout(&out));
    assert!(
        stderr(&out).contains("is open to other users (mode 0644)"),
        "{}",
        stderr(&out)
    );
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = check();
    assert!(out.status.success(), "{}", stderr(&out));
}
