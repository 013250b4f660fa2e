//! Shared pieces of the integration tests: the data paths, configs, fake cluster nodes and
//! client helpers.
#![allow(dead_code, unused_macros)]

use std::{net::SocketAddr, path::Path, time::Duration};

use patroxy_tests::{
    backend::{Backend, Behaviour},
    config::{
        Bpf, DefaultServer, Defaults, ListenerConfig, OnMarkedDown, ProxyConfig, ServerConfig,
    },
    daemon::Patroxy,
    fake_patroni::FakePatroni,
    ports::free_tcp_port,
    process::require_root,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// The two data paths every data-path test runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path_ {
    Sockmap,
    Fallback,
}

impl Path_ {
    pub fn bpf(self) -> Bpf {
        match self {
            Self::Sockmap => Bpf::Required,
            Self::Fallback => Bpf::Off,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::Sockmap => "sockmap",
            Self::Fallback => "fallback",
        }
    }
    /// Whether this test can run here; the sockmap path needs root (and says so otherwise).
    pub fn available(self, test: &str) -> bool {
        self == Self::Fallback || require_root(test)
    }
}

pub fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// The data-path tests' config: one listener, `postgres_write` on a free port, in front of one
/// unchecked (so always UP) server `db1` at `server`; global maxconn 2000, 2 retries, idle
/// timeouts 30m, connect 1s.
pub fn one_listener(path: Path_, pin: &Path, server: SocketAddr) -> ProxyConfig {
    let defaults = Defaults::new(Duration::from_secs(30 * 60), Duration::from_secs(1)).retries(2);
    let mut config = ProxyConfig::new(defaults)
        .data_path(path.bpf(), pin)
        .server(ServerConfig::new("db1", server))
        .listener(ListenerConfig::new(
            "postgres_write",
            local(free_tcp_port()),
            ["db1"],
        ));
    config.global.maxconn = Some(2000);
    config
}

/// The config of tests in front of fake Patroni nodes, with quick checks: every 200 ms (50 ms
/// while a server's state is changing), a 500 ms check timeout, rise 2, fall 3, and a server's
/// sessions shut down when it is marked down; one retry, connect 1s, idle timeouts 30m. No
/// servers or listeners yet.
pub fn fast_checks(path: Path_, pin: &Path) -> ProxyConfig {
    let defaults = Defaults::new(Duration::from_secs(30 * 60), Duration::from_secs(1))
        .retries(1)
        .timeout_check(Duration::from_millis(500));
    ProxyConfig::new(defaults)
        .data_path(path.bpf(), pin)
        .default_server(DefaultServer {
            inter: Some(Duration::from_millis(200)),
            fastinter: Some(Duration::from_millis(50)),
            downinter: Some(Duration::from_millis(200)),
            rise: Some(2),
            fall: Some(3),
            on_marked_down: Some(OnMarkedDown::ShutdownSessions),
            ..DefaultServer::default()
        })
}

/// One node of a fake cluster: a traffic backend (echo, counting its connections) and its
/// fake Patroni API.
pub struct Node {
    pub backend: Backend,
    pub api: FakePatroni,
}

impl Node {
    pub async fn start() -> Node {
        Node {
            backend: Backend::start(Behaviour::Echo).await,
            api: FakePatroni::start().await,
        }
    }

    /// The node as a `[[server]]` named `name`: traffic to its backend, checks to its API.
    pub fn server(&self, name: &str) -> ServerConfig {
        ServerConfig::new(name, self.backend.addr).check_port(self.api.addr().port())
    }
}

/// How [`send_all_then_read`] starts a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// The first byte goes alone and its echo is awaited before the rest, as a PostgreSQL
    /// client waits for the answer to its startup packet: the bulk crosses a spliced session
    /// (the sockmap daemon serves a session on its fallback path when more than 64 KiB arrived
    /// before its backend connected).
    EchoFirst,
    /// Everything at once, whether or not the proxy has connected the backend yet.
    AllAtOnce,
}

/// Sends `data` on a connected `stream`, half-closes, and returns everything received until
/// EOF (from an echo backend).
pub async fn send_all_then_read(
    stream: TcpStream,
    data: &[u8],
    start: Start,
) -> std::io::Result<Vec<u8>> {
    let (mut r, mut w) = stream.into_split();
    let mut received = Vec::new();
    let split = match start {
        Start::EchoFirst => data.len().min(1),
        Start::AllAtOnce => 0,
    };
    if split > 0 {
        w.write_all(&data[..split]).await?;
        received.resize(split, 0);
        r.read_exact(&mut received).await?;
    }
    let data = data[split..].to_vec();
    let writer = tokio::spawn(async move {
        w.write_all(&data).await?;
        w.shutdown().await?;
        Ok::<_, std::io::Error>(w)
    });
    r.read_to_end(&mut received).await?;
    let _w = writer.await.expect("writer task")?;
    Ok(received)
}

/// Connects and checks that a small message is echoed within `within`.
pub async fn echo_once(stream: &mut TcpStream, msg: &[u8], within: Duration) -> bool {
    if stream.write_all(msg).await.is_err() {
        return false;
    }
    let mut buf = vec![0u8; msg.len()];
    matches!(
        tokio::time::timeout(within, stream.read_exact(&mut buf)).await,
        Ok(Ok(_)) if buf == msg
    )
}

/// Waits until the session of `Patroxy::start`'s readiness probe has ended (the only earlier
/// session of a one-listener config whose server is always UP), so that a test counting
/// server slots or global permits starts with none taken.
pub fn wait_probe_closed(proxy: &Patroxy) {
    assert!(
        proxy.wait_for_log_count("session closed", 1, Duration::from_secs(10)),
        "the readiness probe's session never closed:\n{}\n{}",
        proxy.log(),
        proxy.sockets_report()
    );
}

/// Reads until EOF or error, returning how it ended and after how long.
pub async fn read_until_closed(stream: &mut TcpStream) -> std::io::Result<usize> {
    let mut buf = [0u8; 4096];
    let mut total = 0;
    loop {
        match stream.read(&mut buf).await {
            Ok(0) => return Ok(total),
            Ok(n) => total += n,
            Err(e) => return Err(e),
        }
    }
}

/// Generates one #[tokio::test] per data path for a scenario `async fn name(path: Path_)`.
macro_rules! on_both_paths {
    ($($scenario:ident),* $(,)?) => {
        mod sockmap {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $scenario() {
                    let path = super::Path_::Sockmap;
                    if path.available(concat!("sockmap::", stringify!($scenario))) {
                        super::$scenario(path).await;
                    }
                }
            )*
        }
        mod fallback {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $scenario() {
                    super::$scenario(super::Path_::Fallback).await;
                }
            )*
        }
    };
}
