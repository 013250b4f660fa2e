//! A scriptable fake of Patroni's REST API for tests.
//!
//! Each test sets, per path, what the "node" answers: a status with Patroni's JSON body, a
//! latency, an answer that never comes, a reset, garbage bytes or a huge body. It counts requests
//! per path and records how many were in flight at once, so tests can assert that the checker
//! never stacks checks on Patroni's small request queue. It speaks plain HTTP until told to speak
//! HTTPS ([`FakePatroni::serve_tls`], Patroni's `restapi.certfile`), with or without requiring a
//! client certificate.
//!
//! Plain tokio (tokio-rustls for HTTPS) + a minimal HTTP/1.1 parser, one request per connection
//! (`Connection: close`). patroxy's checker tests use it too (patroxy-tests is a dev-dependency
//! of patroxy).
use std::{
    collections::HashMap,
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};
use tokio_rustls::{
    TlsAcceptor,
    rustls::{self, server::WebPkiClientVerifier},
    server::TlsStream,
};

use crate::pki::CertKey;

/// What the fake does with a request after its latency.
#[derive(Clone, Debug, PartialEq)]
pub enum Behavior {
    /// A normal HTTP answer with the reply's status and body.
    Respond,
    /// Accept, read the request and never answer (a frozen node); the connection stays open
    /// until the client gives up.
    Hang,
    /// Read the request and reset the connection (RST) instead of answering.
    Reset,
    /// Write these bytes instead of HTTP and close.
    Garbage(Vec<u8>),
    /// Status 200 with a body of this many bytes (streamed, never buffered).
    HugeBody(usize),
}

/// The scripted answer for one path.
#[derive(Clone, Debug, PartialEq)]
pub struct Reply {
    pub status: u16,
    pub body: String,
    pub latency: Duration,
    pub behavior: Behavior,
}

impl Reply {
    /// A status with an empty JSON object as body.
    pub fn status(status: u16) -> Self {
        Reply {
            status,
            body: "{}".into(),
            latency: Duration::ZERO,
            behavior: Behavior::Respond,
        }
    }

    /// A status with a body shaped like Patroni's (`role`, `state`, `timeline`, ...).
    pub fn patroni(status: u16, role: &str, timeline: u64) -> Self {
        let body = format!(
            r#"{{"state": "running", "postmaster_start_time": "2024-01-01 00:00:00+00:00", "role": "{role}", "server_version": 160000, "xlog": {{"location": 67108864}}, "timeline": {timeline}, "dcs_last_seen": 1700000000, "database_system_identifier": "7300000000000000000", "patroni": {{"version": "4.1.0", "scope": "demo", "name": "fake"}}}}"#
        );
        Reply {
            body,
            ..Reply::status(status)
        }
    }

    /// What the leader answers on /primary.
    pub fn primary(timeline: u64) -> Self {
        Self::patroni(200, "primary", timeline)
    }

    /// What a replica answers on /primary (503) or on /replica (200).
    pub fn replica(status: u16, timeline: u64) -> Self {
        Self::patroni(status, "replica", timeline)
    }

    pub fn hang() -> Self {
        Reply {
            behavior: Behavior::Hang,
            ..Reply::status(200)
        }
    }

    pub fn reset() -> Self {
        Reply {
            behavior: Behavior::Reset,
            ..Reply::status(200)
        }
    }

    pub fn garbage(bytes: &[u8]) -> Self {
        Reply {
            behavior: Behavior::Garbage(bytes.to_vec()),
            ..Reply::status(200)
        }
    }

    pub fn huge_body(len: usize) -> Self {
        Reply {
            behavior: Behavior::HugeBody(len),
            ..Reply::status(200)
        }
    }

    pub fn with_latency(mut self, latency: Duration) -> Self {
        self.latency = latency;
        self
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct PathStats {
    requests: u64,
    in_flight: u64,
    max_in_flight: u64,
}

#[derive(Default)]
struct Inner {
    /// Keyed by request target: an exact "path?query" entry wins over a bare "path" one.
    routes: Mutex<HashMap<String, Reply>>,
    /// Keyed by path without the query.
    stats: Mutex<HashMap<String, PathStats>>,
    /// `Some` while the node speaks HTTPS; read at each accept.
    tls: Mutex<Option<TlsAcceptor>>,
}

/// A running fake node. Stops when dropped.
pub struct FakePatroni {
    addr: SocketAddr,
    inner: Arc<Inner>,
    accept: JoinHandle<()>,
}

impl FakePatroni {
    /// Binds 127.0.0.1:0 and serves until dropped or [`FakePatroni::stop`]ped. Paths without a
    /// reply get 503, as Patroni answers for a role the node does not have.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake patroni");
        let addr = listener.local_addr().expect("local addr");
        let inner = Arc::new(Inner::default());
        let serving = inner.clone();
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let tls = serving.tls.lock().unwrap().clone();
                let serving = serving.clone();
                tokio::spawn(async move {
                    match tls {
                        None => serve(stream, serving).await,
                        // A failed handshake is the client's to report.
                        Some(tls) => {
                            if let Ok(stream) = tls.accept(stream).await {
                                serve(stream, serving).await;
                            }
                        }
                    }
                });
            }
        });
        FakePatroni {
            addr,
            inner,
            accept,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sets the answer for `target` ("/primary" or an exact "/replica?lag=16MB").
    pub fn set(&self, target: &str, reply: Reply) {
        self.inner
            .routes
            .lock()
            .unwrap()
            .insert(target.into(), reply);
    }

    /// From the next connection on, speaks HTTPS with `identity`'s certificate; with
    /// `client_ca`, also requires a client certificate that CA signed (Patroni's
    /// `restapi.verify_client: required`).
    pub fn serve_tls(&self, identity: &CertKey, client_ca: Option<&Path>) {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default TLS versions");
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in certificates(ca) {
                    roots.add(cert).expect("a CA certificate rustls accepts");
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .expect("client verifier");
                builder.with_client_cert_verifier(verifier)
            }
        };
        let key = PrivateKeyDer::from_pem_file(&identity.key)
            .unwrap_or_else(|e| panic!("{}: {e}", identity.key.display()));
        let config = builder
            .with_single_cert(certificates(&identity.cert), key)
            .expect("a certificate and key rustls accepts");
        *self.inner.tls.lock().unwrap() = Some(TlsAcceptor::from(Arc::new(config)));
    }

    /// Requests received on `path` (query ignored).
    pub fn requests(&self, path: &str) -> u64 {
        self.stats(path).requests
    }

    /// The most requests on `path` that were in flight at the same time.
    pub fn max_concurrent(&self, path: &str) -> u64 {
        self.stats(path).max_in_flight
    }

    /// Forgets the counters (after a warm-up phase, say).
    pub fn reset_counts(&self) {
        self.inner.stats.lock().unwrap().clear();
    }

    /// Closes the listening socket: new connections are refused (a stopped Patroni).
    pub fn stop(&self) {
        self.accept.abort();
    }

    fn stats(&self, path: &str) -> PathStats {
        let stats = self.inner.stats.lock().unwrap();
        stats.get(path).copied().unwrap_or_default()
    }
}

impl Drop for FakePatroni {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Counts a request in flight until dropped.
struct InFlight<'a> {
    inner: &'a Inner,
    path: String,
}

impl<'a> InFlight<'a> {
    fn new(inner: &'a Inner, path: &str) -> Self {
        let mut stats = inner.stats.lock().unwrap();
        let s = stats.entry(path.to_string()).or_default();
        s.requests += 1;
        s.in_flight += 1;
        s.max_in_flight = s.max_in_flight.max(s.in_flight);
        InFlight {
            inner,
            path: path.to_string(),
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Some(s) = self.inner.stats.lock().unwrap().get_mut(&self.path) {
            s.in_flight -= 1;
        }
    }
}

/// A connection the fake serves: plain TCP or TLS over it.
trait Connection: AsyncRead + AsyncWrite + Unpin + Send {
    fn tcp(&self) -> &TcpStream;
}

impl Connection for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
}

impl Connection for TlsStream<TcpStream> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }
}

async fn serve(mut stream: impl Connection, inner: Arc<Inner>) {
    let Some((method, target)) = read_request(&mut stream).await else {
        return;
    };
    let path = target.split('?').next().unwrap_or("").to_string();
    let reply = {
        let routes = inner.routes.lock().unwrap();
        routes.get(&target).or_else(|| routes.get(&path)).cloned()
    }
    .unwrap_or_else(|| Reply::status(503));
    let _in_flight = InFlight::new(&inner, &path);
    if !reply.latency.is_zero() && closed_within(&mut stream, Some(reply.latency)).await {
        return;
    }
    let _ = match reply.behavior {
        Behavior::Respond => {
            let head = head(reply.status, reply.body.len());
            let body = if method == "HEAD" {
                ""
            } else {
                reply.body.as_str()
            };
            stream.write_all(format!("{head}{body}").as_bytes()).await
        }
        Behavior::Hang => {
            closed_within(&mut stream, None).await;
            return;
        }
        Behavior::Reset => {
            let _ = stream.tcp().set_zero_linger();
            return;
        }
        Behavior::Garbage(bytes) => stream.write_all(&bytes).await,
        Behavior::HugeBody(len) => huge(&mut stream, len).await,
    };
    let _ = stream.shutdown().await;
}

/// Reads the request head; returns (method, target). Request bodies are ignored.
async fn read_request(stream: &mut impl Connection) -> Option<(String, String)> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 || buf.len() > 16 * 1024 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&buf);
    let mut first = text.lines().next()?.split_whitespace();
    Some((first.next()?.to_string(), first.next()?.to_string()))
}

/// Waits `limit` (forever if `None`); true if the client closed the connection first.
async fn closed_within(stream: &mut impl Connection, limit: Option<Duration>) -> bool {
    let closed = async {
        let mut b = [0u8; 512];
        loop {
            match stream.read(&mut b).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    match limit {
        Some(d) => tokio::time::timeout(d, closed).await.is_ok(),
        None => {
            closed.await;
            true
        }
    }
}

fn head(status: u16, len: usize) -> String {
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    };
    format!(
        "HTTP/1.1 {status} {reason}\r\nServer: BaseHTTP/0.6 Python/3.11\r\n\
         Content-Type: application/json\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
    )
}

async fn huge(stream: &mut impl Connection, len: usize) -> std::io::Result<()> {
    stream.write_all(head(200, len).as_bytes()).await?;
    let chunk = vec![b'x'; 16 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(chunk.len());
        stream.write_all(&chunk[..n]).await?;
        left -= n;
    }
    Ok(())
}

/// The certificates of a PEM file.
fn certificates(file: &Path) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(file)
        .and_then(|certs| certs.collect())
        .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(addr: SocketAddr, target: &str) -> Vec<u8> {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {target} HTTP/1.1\r\nHost: x\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn scripted_answers_and_counts() {
        let fake = FakePatroni::start().await;
        fake.set("/primary", Reply::primary(3));
        fake.set("/replica?lag=1MB", Reply::replica(200, 3));
        let answer = String::from_utf8(get(fake.addr(), "/primary").await).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(answer.contains(r#""role": "primary""#) && answer.contains(r#""timeline": 3"#));
        // Unknown path: 503; exact query match wins over the bare path.
        let answer = get(fake.addr(), "/replica").await;
        assert!(answer.starts_with(b"HTTP/1.1 503 "));
        let answer = get(fake.addr(), "/replica?lag=1MB").await;
        assert!(answer.starts_with(b"HTTP/1.1 200 "));
        assert_eq!(
            (fake.requests("/primary"), fake.requests("/replica")),
            (1, 2)
        );
        assert_eq!(fake.max_concurrent("/primary"), 1);

        fake.set("/garbage", Reply::garbage(b"\x00\x01 not http"));
        assert_eq!(get(fake.addr(), "/garbage").await, b"\x00\x01 not http");
        fake.set("/huge", Reply::huge_body(1 << 20));
        assert!(get(fake.addr(), "/huge").await.len() > 1 << 20);
    }

    #[tokio::test]
    async fn hang_counts_concurrency_until_the_client_leaves() {
        let fake = FakePatroni::start().await;
        fake.set("/primary", Reply::hang());
        let mut conns = Vec::new();
        for _ in 0..2 {
            let mut s = TcpStream::connect(fake.addr()).await.unwrap();
            s.write_all(b"GET /primary HTTP/1.1\r\n\r\n").await.unwrap();
            conns.push(s);
        }
        let mut buf = [0u8; 8];
        let hung = tokio::time::timeout(Duration::from_millis(200), conns[0].read(&mut buf));
        assert!(hung.await.is_err(), "a hanging reply must not answer");
        assert_eq!(fake.max_concurrent("/primary"), 2);
        drop(conns);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(fake.stats("/primary").in_flight, 0);
    }

    #[tokio::test]
    async fn reset_answers_with_rst() {
        let fake = FakePatroni::start().await;
        fake.set("/primary", Reply::reset());
        let mut s = TcpStream::connect(fake.addr()).await.unwrap();
        s.write_all(b"GET /primary HTTP/1.1\r\n\r\n").await.unwrap();
        let mut out = Vec::new();
        let err = s.read_to_end(&mut out).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
    }

    #[tokio::test]
    async fn serves_https_to_a_client_trusting_its_ca() {
        use tokio_rustls::{TlsConnector, rustls::pki_types::ServerName};
        let ca = crate::pki::TestCa::new("fake");
        let fake = FakePatroni::start().await;
        fake.set("/primary", Reply::primary(1));
        fake.serve_tls(&ca.server_cert(fake.addr().ip()), None);
        let mut roots = rustls::RootCertStore::empty();
        roots.add_parsable_certificates(certificates(&ca.cert));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tcp = TcpStream::connect(fake.addr()).await.unwrap();
        let name = ServerName::IpAddress(fake.addr().ip().into());
        let mut s = TlsConnector::from(Arc::new(client))
            .connect(name, tcp)
            .await
            .expect("handshake with the CA's server certificate");
        s.write_all(b"GET /primary HTTP/1.1\r\n\r\n").await.unwrap();
        let mut out = Vec::new();
        // The fake closes without close_notify; what arrived before is the answer.
        let _ = s.read_to_end(&mut out).await;
        assert!(out.starts_with(b"HTTP/1.1 200 OK\r\n"));
    }

    #[tokio::test]
    async fn stop_refuses_connections() {
        let fake = FakePatroni::start().await;
        fake.stop();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(TcpStream::connect(fake.addr()).await.is_err());
    }
}
