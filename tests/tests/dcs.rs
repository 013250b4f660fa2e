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
        CheckConfig, DcsConfig, DefaultServer, Defaults, ListenerConfig, OnMarkedDown, ProxyConfig,
    },
    daemon::Patroxy,
    fake_patroni::Reply,
    ports::free_tcp_port,
    process::ChildGuard,
};
use tokio::{io::AsyncWriteExt, net::TcpStream};

const SCOPE: &str = "dcs-test";

/// A one-member etcd on loopback ports of its own, its data in a fresh directory.
struct Etcd {
    child: Option<ChildGuard>,
    client_url: String,
    peer_url: String,
    dir: PathBuf,
}

impl Etcd {
    fn start(name: &str) -> Etcd {
        let dir = std::env::temp_dir().join(format!("patroxy-dcs-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut etcd = Etcd {
            child: None,
            client_url: format!("http://127.0.0.1:{}", free_tcp_port()),
            peer_url: format!("http://127.0.0.1:{}", free_tcp_port()),
            dir,
        };
        etcd.run();
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
            .arg(format!("dcs={}", self.peer_url));
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
}

impl Watched {
    async fn start(name: &str) -> Watched {
        let (pg1, pg2) = (Node::start().await, Node::start().await);
        pg1.api.set("/primary", Reply::primary(4));
        pg2.api.set("/primary", Reply::replica(503, 4));
        let etcd = Etcd::start(name);
        etcd.member("pg1", &pg1);
        etcd.member("pg2", &pg2);
        etcd.put("leader", "pg1");
        let bind = local(free_tcp_port());
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
            .dcs(DcsConfig::new(etcd.client_url.clone(), SCOPE));
        let proxy = Patroxy::start(name, &config);
        let w = Watched {
            etcd,
            pg1,
            pg2,
            proxy,
            bind,
        };
        w.wait_log("dcs: connected; leader key names pg1 (server pg1)", 1, 10);
        w.wait_log("Server postgres_write/pg1 is UP", 1, 20);
        w
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

    // Patroni promoted pg2 (timeline 5) and moved the key. pg1's API still answers 200 on the
    // old timeline, so nothing but the key says pg1 is no longer the leader.
    w.pg2.api.set("/primary", Reply::primary(5));
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
    w.wait_log("Server postgres_write/pg2 is UP", 1, 1);
    let up_in = moved.elapsed();
    assert!(
        up_in < Duration::from_millis(900),
        "pg2 UP {up_in:?} after the key moved: not the burst and the authoritative up \
         (rise 3 at 1 s would take 2 s or more)"
    );
    assert!(w.proxy.log().contains("UP without waiting for rise"));
    eprintln!("OBSERVED fenced {fenced_in:?}, new primary UP {up_in:?} after the key moved");

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
