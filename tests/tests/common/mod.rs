//! Shared pieces of the data-path tests: configs and client helpers.
#![allow(dead_code, unused_macros)]

use std::{net::SocketAddr, path::Path, time::Duration};

use patroxy_tests::{daemon::Patroxy, ports::free_tcp_port, process::require_root};
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
    pub fn bpf(self) -> &'static str {
        match self {
            Self::Sockmap => "required",
            Self::Fallback => "off",
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

/// Knobs of a one-listener test config.
pub struct Setup<'a> {
    pub path: Path_,
    pub pin: &'a Path,
    pub bind: SocketAddr,
    pub server: SocketAddr,
    pub global_maxconn: u32,
    pub server_maxconn: Option<u32>,
    pub retries: u32,
    pub timeout_connect: &'a str,
    pub timeout_idle: &'a str,
    pub timeout_queue: Option<&'a str>,
}

impl<'a> Setup<'a> {
    pub fn new(path: Path_, pin: &'a Path, server: SocketAddr) -> Self {
        Setup {
            path,
            pin,
            bind: local(free_tcp_port()),
            server,
            global_maxconn: 2000,
            server_maxconn: None,
            retries: 2,
            timeout_connect: "1s",
            timeout_idle: "30m",
            timeout_queue: None,
        }
    }

    pub fn toml(&self) -> String {
        let maxconn = self
            .server_maxconn
            .map(|m| format!("maxconn = {m}\n"))
            .unwrap_or_default();
        let queue = self
            .timeout_queue
            .map(|q| format!("timeout_queue = \"{q}\"\n"))
            .unwrap_or_default();
        format!(
            r#"
[global]
maxconn = {gmax}
bpf = "{bpf}"
pin_path = "{pin}"

[defaults]
retries = {retries}
timeout_client = "{idle}"
timeout_server = "{idle}"
timeout_connect = "{connect}"
{queue}
[[server]]
name = "db1"
address = "{server}"
{maxconn}
[[listener]]
name = "postgres_write"
bind = "{bind}"
servers = ["db1"]
"#,
            gmax = self.global_maxconn,
            bpf = self.path.bpf(),
            pin = self.pin.display(),
            retries = self.retries,
            idle = self.timeout_idle,
            connect = self.timeout_connect,
            server = self.server,
            bind = self.bind,
        )
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
        "the readiness probe's session never closed:\n{}",
        proxy.log()
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
