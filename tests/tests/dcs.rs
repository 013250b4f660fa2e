//! The DCS watch against a real etcd (Debian's etcd-server) on loopback, with fake Patroni
//! APIs: the leader key moving fences the old leader's sessions at once and the new primary is
//! UP on its first 200 with a newer timeline, without `rise`; etcd going away marks nothing
//! down, and the watch follows the key again once etcd is back. Checks are slow here (1-2 s,
//! rise 3) so that anything within a few hundred milliseconds is the watch's doing.
//!
//! The fallback data path only: the mark-down on both paths is routing.rs's.
mod common;

use std::{
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use common::{Node, Path_, local, read_until_closed};
use patroxy_tests::{
    config::{
        CheckConfig, DcsConfig, DcsTls, DefaultServer, Defaults, ListenerConfig, OnMarkedDown,
        ProxyConfig, StatsConfig,
    },
    daemon::Patroxy,
    fake_patroni::Reply,
    pki::TestCa,
    ports::free_tcp_port,
    process::ChildGuard,
    stats_client::get_ok,
};
use tokio::{io::AsyncWriteExt, net::TcpStream};

const SCOPE: &str = "dcs-test";

/// How etcd's clients must prove who they are.
enum Security {
    /// Plain http, no auth.
    Open,
    /// https, and a client certificate signed by the test CA (`--client-cert-auth`).
    ClientCerts,
    /// Users and passwords (`etcdctl auth enable`): patroxy's user may read the scope's keys.
    Passwords,
}

/// patroxy's etcd user with `Security::Passwords`, and its password.
const PATROXY_USER: (&str, &str) = ("patroxy", "watch-secret");

/// A one-member etcd on loopback ports of its own, its data in a fresh directory.
struct Etcd {
    child: Option<ChildGuard>,
    client_url: String,
    peer_url: String,
    dir: PathBuf,
    /// etcd's own TLS flags (none when open).
    serve_args: Vec<String>,
    /// What etcdctl needs to get in (CA and client certificate, or the root user).
    ctl_args: Vec<String>,
    /// The CA of `Security::ClientCerts`, kept while etcd uses its files.
    ca: Option<TestCa>,
}

impl Etcd {
    fn start(name: &str) -> Etcd {
        Etcd::start_secured(name, Security::Open)
    }

    fn start_secured(name: &str, security: Security) -> Etcd {
        let dir = std::env::temp_dir().join(format!("patroxy-dcs-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let scheme = match security {
            Security::ClientCerts => "https",
            _ => "http",
        };
        let mut etcd = Etcd {
            child: None,
            client_url: format!("{scheme}://127.0.0.1:{}", free_tcp_port()),
            peer_url: format!("http://127.0.0.1:{}", free_tcp_port()),
            dir,
            serve_args: Vec::new(),
            ctl_args: Vec::new(),
            ca: None,
        };
        if let Security::ClientCerts = security {
            let ca = TestCa::new(name);
            let server = ca.server_cert("127.0.0.1".parse().unwrap());
            let client = ca.client_cert("etcdctl");
            let path = |p: &std::path::Path| p.to_string_lossy().into_owned();
            etcd.serve_args = vec![
                "--cert-file".into(),
                path(&server.cert),
                "--key-file".into(),
                path(&server.key),
                "--client-cert-auth".into(),
                "--trusted-ca-file".into(),
                path(&ca.cert),
            ];
            etcd.ctl_args = vec![
                "--cacert".into(),
                path(&ca.cert),
                "--cert".into(),
                path(&client.cert),
                "--key".into(),
                path(&client.key),
            ];
            etcd.ca = Some(ca);
        }
        etcd.run();
        if let Security::Passwords = security {
            let prefix = format!("/service/{SCOPE}/");
            let (user, password) = PATROXY_USER;
            for args in [
                vec!["user", "add", "root:root-secret", "--interactive=false"],
                vec!["role", "add", "patroni-reader"],
                vec![
                    "role",
                    "grant-permission",
                    "patroni-reader",
                    "--prefix=true",
                    "read",
                    &prefix,
                ],
                vec![
                    "user",
                    "add",
                    &format!("{user}:{password}"),
                    "--interactive=false",
                ],
                vec!["user", "grant-role", user, "patroni-reader"],
                vec!["auth", "enable"],
            ] {
                assert!(etcd.ctl(&args), "etcdctl {args:?}");
            }
            etcd.ctl_args = vec!["--user".into(), "root:root-secret".into()];
            assert!(
                etcd.ctl(&["get", "--prefix", &prefix]),
                "etcdctl as root after auth enable"
            );
        }
        etcd
    }

    /// Starts (or restarts, on the same data) the etcd process and waits until it answers.
    fn run(&mut self) {
        let mut cmd = Command::new("etcd");
        cmd.arg("--name")
            .arg("dcs")
            .arg("--data-dir")
            .arg(&self.dir)
            .arg("--listen-client-urls")
            .arg(&self.client_url)
            .arg("--advertise-client-urls")
            .arg(&self.client_url)
            .arg("--listen-peer-urls")
            .arg(&self.peer_url)
            .arg("--initial-advertise-peer-urls")
            .arg(&self.peer_url)
            .arg("--initial-cluster")
            .arg(format!("dcs={}", self.peer_url))
            .args(&self.serve_args);
        self.child = Some(ChildGuard::spawn("etcd", &mut cmd).expect("etcd (etcd-server) runs"));
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.ctl(&["endpoint", "health"]) {
            assert!(
                Instant::now() < deadline,
                "etcd did not become healthy:\n{}",
                self.child.as_ref().unwrap().log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.stop();
        }
    }

    fn ctl(&self, args: &[&str]) -> bool {
        Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(&self.client_url)
            .args(&self.ctl_args)
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success())
    }

    fn put(&self, key: &str, value: &str) {
        let key = format!("/service/{SCOPE}/{key}");
        assert!(self.ctl(&["put", &key, value]), "etcdctl put {key}");
    }

    /// Writes `name`'s member key as Patroni does, naming `node`'s API and PostgreSQL.
    fn member(&self, name: &str, node: &Node) {
        let json = format!(
            r#"{{"conn_url":"postgres://{}/postgres","api_url":"http://{}/patroni","state":"running","role":"replica"}}"#,
            node.backend.addr,
            node.api.addr()
        );
        self.put(&format!("members/{name}"), &json);
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// pg1 the primary on timeline 4 and the leader key's holder, pg2 a replica; patroxy watching
/// the key, checking every 2 s (1 s while the listener changes) with rise 3.
struct Watched {
    etcd: Etcd,
    pg1: Node,
    pg2: Node,
    proxy: Patroxy,
    bind: std::net::SocketAddr,
    stats: std::net::SocketAddr,
}

impl Watched {
    async fn start(name: &str) -> Watched {
        let w = Watched::start_on(Etcd::start(name), name, |dcs, _| dcs).await;
        w.wait_connected();
        w
    }

    /// Like [`Watched::start`] on `etcd`, with `[dcs]` as `dcs` makes it; waits for pg1 UP by
    /// its checks, not for the watch.
    async fn start_on(
        etcd: Etcd,
        name: &str,
        dcs: impl FnOnce(DcsConfig, &Etcd) -> DcsConfig,
    ) -> Watched {
        let (pg1, pg2) = (Node::start().await, Node::start().await);
        pg1.api.set("/primary", Reply::primary(4));
        pg2.api.set("/primary", Reply::replica(503, 4));
        etcd.member("pg1", &pg1);
        etcd.member("pg2", &pg2);
        etcd.put("leader", "pg1");
        let (bind, stats) = (local(free_tcp_port()), local(free_tcp_port()));
        let defaults = Defaults::new(Duration::from_secs(60), Duration::from_secs(1))
            .retries(1)
            .timeout_check(Duration::from_millis(500));
        let config = ProxyConfig::new(defaults)
            .data_path(Path_::Fallback.bpf(), Patroxy::unique_pin_path(name))
            .default_server(DefaultServer {
                inter: Some(Duration::from_secs(2)),
                fastinter: Some(Duration::from_secs(1)),
                downinter: Some(Duration::from_secs(2)),
                rise: Some(3),
                fall: Some(3),
                on_marked_down: Some(OnMarkedDown::ShutdownSessions),
                ..DefaultServer::default()
            })
            .server(pg1.server("pg1"))
            .server(pg2.server("pg2"))
            .listener(
                ListenerConfig::new("postgres_write", bind, ["pg1", "pg2"])
                    .check(CheckConfig::new("/primary")),
            )
            .stats(StatsConfig::new(stats))
            .dcs(dcs(DcsConfig::new(etcd.client_url.clone(), SCOPE), &etcd));
        let proxy = Patroxy::start(name, &config);
        let w = Watched {
            etcd,
            pg1,
            pg2,
            proxy,
            bind,
            stats,
        };
        w.wait_log("Server postgres_write/pg1 is UP", 1, 20);
        w
    }

    fn wait_connected(&self) {
        self.wait_log("dcs: connected; leader key names pg1 (server pg1)", 1, 10);
    }

    /// The key moves to pg2 (promoted, timeline 5): pg1 is fenced by the key and pg2 UP
    /// without `rise`, which only the watch does within a second here.
    fn follows_a_leader_change(&self) {
        self.pg2.api.set("/primary", Reply::primary(5));
        self.etcd.put("leader", "pg2");
        self.wait_log(
            "Server postgres_write/pg1 is DOWN, reason: its Patroni leader key moved",
            1,
            1,
        );
        self.wait_log("UP without waiting for rise", 1, 1);
    }

    /// The DCS state of the stats JSON.
    fn dcs_stats(&self) -> serde_json::Value {
        let json: serde_json::Value =
            serde_json::from_str(&get_ok(self.stats, "/;json")).expect("the stats JSON");
        json["dcs"].clone()
    }

    /// The watch cannot get in: it says why in the log and the stats JSON, and marks nothing
    /// down (pg1 stays UP by its checks while the watch keeps trying).
    fn refused_and_harmless(&self, why: &str) {
        self.wait_log("dcs: ", 1, 10);
        let line = self
            .proxy
            .log()
            .lines()
            .find(|l| l.contains("dcs: "))
            .map(str::to_owned)
            .unwrap_or_default();
        assert!(
            line.to_lowercase().contains(why),
            "the watch's error does not say {why:?}: {line}"
        );
        // A few reconnect attempts and checks later.
        std::thread::sleep(Duration::from_secs(2));
        let dcs = self.dcs_stats();
        assert_eq!(dcs["connected"], false, "{dcs}");
        assert!(dcs["errors"].as_u64().unwrap_or(0) >= 2, "{dcs}");
        let last = dcs["last_error"]
            .as_str()
            .unwrap_or_default()
            .to_lowercase();
        assert!(
            last.contains(why),
            "stats JSON last_error {last:?} lacks {why:?}"
        );
        assert_eq!(self.proxy.count_log("is DOWN"), 0, "{}", self.proxy.log());
        assert!(!self.proxy.log().contains("dcs: connected"));
        eprintln!("OBSERVED the watch's error: {last}");
    }

    fn wait_log(&self, needle: &str, n: usize, secs: u64) {
        assert!(
            self.proxy
                .wait_for_log_count(needle, n, Duration::from_secs(secs)),
            "never logged {needle:?} ({n} times):\n{}",
            self.proxy.log()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_leader_key_resets_the_old_leaders_sessions_and_ups_the_new_one_without_rise() {
    let w = Watched::start("dcs-moved").await;
    let mut session = TcpStream::connect(w.bind).await.unwrap();
    assert!(common::echo_once(&mut session, b"hello", Duration::from_secs(2)).await);
    assert_eq!(w.pg1.backend.accepted(), 1);

    // Patroni moved the key to pg2, which answers 200 on /primary at once but is still in
    // recovery (its body says replica). pg1's API still answers 200 on the old timeline, so
    // nothing but the key says pg1 is no longer the leader.
    w.pg2.api.set("/primary", Reply::replica(200, 4));
    let moved = Instant::now();
    w.etcd.put("leader", "pg2");

    let closed = tokio::time::timeout(Duration::from_secs(1), read_until_closed(&mut session))
        .await
        .expect("pg1's session reset within 1 s of the key moving (checks are 2 s apart)");
    assert!(closed.is_err() || closed.unwrap() == 0);
    let fenced_in = moved.elapsed();
    w.wait_log(
        "Server postgres_write/pg1 is DOWN, reason: its Patroni leader key moved",
        1,
        1,
    );
    // Several burst checks later, pg2 is still DOWN: writes there would fail read-only.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        w.proxy.count_log("Server postgres_write/pg2 is UP"),
        0,
        "pg2 UP while its PostgreSQL was in recovery:\n{}",
        w.proxy.log()
    );
    // Promoted (timeline 5): UP on the next burst check.
    w.pg2.api.set("/primary", Reply::primary(5));
    let promoted = Instant::now();
    w.wait_log("Server postgres_write/pg2 is UP", 1, 1);
    let up_in = promoted.elapsed();
    assert!(
        up_in < Duration::from_millis(900),
        "pg2 UP {up_in:?} after its promotion: not the burst and the authoritative up \
         (rise 3 at 1 s would take 2 s or more)"
    );
    // Once at start (pg1, the key holder), once now: the first check saying primary.
    w.wait_log("UP without waiting for rise", 2, 1);
    eprintln!(
        "OBSERVED fenced {fenced_in:?} after the key moved, new primary UP {up_in:?} after \
         its promotion"
    );

    // New sessions reach pg2 only.
    let mut next = TcpStream::connect(w.bind).await.unwrap();
    assert!(common::echo_once(&mut next, b"again", Duration::from_secs(2)).await);
    assert_eq!((w.pg1.backend.accepted(), w.pg2.backend.accepted()), (1, 1));
    let _ = next.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_etcd_marks_nothing_down_and_the_watch_resumes() {
    let mut w = Watched::start("dcs-lost").await;
    let mut session = TcpStream::connect(w.bind).await.unwrap();
    assert!(common::echo_once(&mut session, b"hello", Duration::from_secs(2)).await);

    w.etcd.stop();
    w.wait_log("dcs: ", 2, 10);
    // A few reconnect attempts and checks later, nothing went DOWN and the session lives.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(w.proxy.count_log("is DOWN"), 0, "{}", w.proxy.log());
    assert!(common::echo_once(&mut session, b"still", Duration::from_secs(2)).await);

    // Back: the watch connects again, re-reads, and follows the key.
    w.etcd.run();
    w.wait_log("dcs: connected", 2, 15);
    w.pg2.api.set("/primary", Reply::primary(5));
    w.etcd.put("leader", "pg2");
    w.wait_log("Server postgres_write/pg2 is UP", 1, 2);
    w.wait_log(
        "Server postgres_write/pg1 is DOWN, reason: its Patroni leader key moved",
        1,
        1,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watch_follows_the_key_through_tls_with_a_client_certificate() {
    let name = "dcs-tls";
    let etcd = Etcd::start_secured(name, Security::ClientCerts);
    let w = Watched::start_on(etcd, name, |dcs, etcd| {
        let ca = etcd.ca.as_ref().expect("a TLS etcd has its CA");
        let client = ca.client_cert("patroxy");
        dcs.tls(DcsTls {
            ca_file: ca.cert.clone(),
            client: Some((client.cert, client.key)),
        })
    })
    .await;
    w.wait_connected();
    assert_eq!(w.dcs_stats()["connected"], true);
    w.follows_a_leader_change();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_for_etcd_is_said_and_marks_nothing_down() {
    let name = "dcs-tls-wrong-ca";
    let etcd = Etcd::start_secured(name, Security::ClientCerts);
    let other = TestCa::new("not etcd's");
    let w = Watched::start_on(etcd, name, |dcs, etcd| {
        let client = etcd.ca.as_ref().unwrap().client_cert("patroxy");
        dcs.tls(DcsTls {
            ca_file: other.cert.clone(),
            client: Some((client.cert, client.key)),
        })
    })
    .await;
    w.refused_and_harmless("certificate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watch_follows_the_key_as_an_etcd_user() {
    let name = "dcs-auth";
    let etcd = Etcd::start_secured(name, Security::Passwords);
    let w = Watched::start_on(etcd, name, |dcs, _| {
        let (user, password) = PATROXY_USER;
        dcs.auth(user, password)
    })
    .await;
    w.wait_connected();
    w.follows_a_leader_change();
    assert!(
        !w.proxy.log().contains(PATROXY_USER.1),
        "the password is in the log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_etcd_password_is_said_and_marks_nothing_down() {
    let name = "dcs-auth-wrong";
    let etcd = Etcd::start_secured(name, Security::Passwords);
    let w = Watched::start_on(etcd, name, |dcs, _| {
        dcs.auth(PATROXY_USER.0, "not-the-password")
    })
    .await;
    w.refused_and_harmless("authentication failed");
}
