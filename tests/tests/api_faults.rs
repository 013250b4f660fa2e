//! The fault matrix's Patroni API rows (README, "Fault matrix"): a node whose REST API is slow,
//! hangs, resets, answers garbage, 500, 404, a 10 MB body or fails TLS. Only Patroni's own 503
//! marks a server DOWN at once; every other failure counts toward `fall`, like a timeout, and
//! the server comes back after `rise` good checks once the API answers again.
//!
//! The checks do not depend on the data path, so these run on the fallback path only (the
//! mark-down on both paths is routing.rs's).
mod common;

use std::{net::IpAddr, time::Duration};

use common::{Node, Path_, echo_once, fast_checks, local};
use patroxy_tests::{
    config::{CheckConfig, ListenerConfig},
    daemon::Patroxy,
    fake_patroni::Reply,
    pki::TestCa,
    ports::free_tcp_port,
    process::{memory, reset_peak_memory},
};
use tokio::net::TcpStream;

/// The server every test checks: `a` of listener `postgres_write`.
const SERVER: &str = "postgres_write/a";

/// A daemon in front of one node whose API answers `/primary` as the primary, its server UP.
struct OneNode {
    node: Node,
    proxy: Patroxy,
    bind: std::net::SocketAddr,
}

impl OneNode {
    /// Starts the daemon with [`fast_checks`] (rise 2, fall 3) checking `check`, and waits
    /// until the server is UP.
    async fn start(name: &str, node: Node, check: CheckConfig) -> OneNode {
        node.api.set("/primary", Reply::primary(1));
        let pin = Patroxy::unique_pin_path(name);
        let bind = local(free_tcp_port());
        let config = fast_checks(Path_::Fallback, &pin)
            .server(node.server("a"))
            .listener(ListenerConfig::new("postgres_write", bind, ["a"]).check(check));
        let proxy = Patroxy::start(name, &config);
        let one = OneNode { node, proxy, bind };
        one.wait_up(1);
        one
    }

    /// Waits for the server's `n`th UP.
    fn wait_up(&self, n: usize) {
        let up = format!("Server {SERVER} is UP");
        assert!(
            self.proxy
                .wait_for_log_count(&up, n, Duration::from_secs(20)),
            "{SERVER} never came UP (time {n}):\n{}",
            self.proxy.log()
        );
    }

    /// The log lines about the server's checks and state, in order.
    fn server_lines(&self) -> Vec<String> {
        self.proxy
            .log()
            .lines()
            .filter(|l| l.contains(SERVER))
            .map(str::to_owned)
            .collect()
    }

    /// Waits until the server is DOWN after a fault set once `before` of its lines were logged,
    /// and asserts that it took `fall` (3) failed checks, each failing with `reason`. Returns
    /// the DOWN line.
    fn down_after_fall(&self, before: usize, reason: &str) -> String {
        let down = format!("Server {SERVER} is DOWN");
        assert!(
            self.proxy
                .wait_for_log_count(&down, 1, Duration::from_secs(20)),
            "{SERVER} never went DOWN:\n{}",
            self.proxy.log()
        );
        let lines = self.server_lines()[before..].to_vec();
        let shown = lines.join("\n");
        assert_eq!(lines.len(), 3, "two failed checks, then DOWN:\n{shown}");
        assert!(lines[0].contains("failed") && lines[0].ends_with("status: UP 2/3"));
        assert!(lines[1].contains("failed") && lines[1].ends_with("status: UP 1/3"));
        assert!(lines[2].contains(&down), "{shown}");
        for line in &lines {
            assert!(line.contains(reason), "not {reason:?}:\n{shown}");
        }
        eprintln!("OBSERVED {}", lines[2]);
        lines[2].clone()
    }
}

/// Breaks the API with `fault` and asserts the server goes DOWN after `fall` checks failed with
/// `reason`, then UP again after `rise` once the API answers as the primary again. Returns the
/// DOWN line.
async fn counts_toward_fall(name: &str, fault: Reply, reason: &str) -> String {
    let one = OneNode::start(name, Node::start().await, CheckConfig::new("/primary")).await;
    let before = one.server_lines().len();
    one.node.api.set("/primary", fault);
    let down = one.down_after_fall(before, reason);
    one.node.api.set("/primary", Reply::primary(1));
    one.wait_up(2);
    down
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_slow_but_within_timeout_check_keeps_the_server_up() {
    // 300 ms per answer: more than `inter` (200 ms), less than `timeout check` (500 ms).
    let one = OneNode::start("apislow", Node::start().await, CheckConfig::new("/primary")).await;
    let before = one.server_lines().len();
    one.node.api.reset_counts();
    one.node.api.set(
        "/primary",
        Reply::primary(1).with_latency(Duration::from_millis(300)),
    );
    let mut session = TcpStream::connect(one.bind).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while one.node.api.requests("/primary") < 8 {
        assert!(tokio::time::Instant::now() < deadline, "checks stopped");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let lines = one.server_lines()[before..].join("\n");
    assert!(lines.is_empty(), "no check failed:\n{lines}");
    assert_eq!(
        one.node.api.max_concurrent("/primary"),
        1,
        "slow checks are never stacked"
    );
    assert!(echo_once(&mut session, b"still up", Duration::from_secs(3)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_hanging_counts_toward_fall() {
    counts_toward_fall("apihang", Reply::hang(), "reason: Layer7 timeout").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_resetting_counts_toward_fall() {
    counts_toward_fall("apirst", Reply::reset(), "reason: Layer7 invalid response").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_garbage_counts_toward_fall() {
    let garbage = Reply::garbage(b"\x15\x03\x01\x00\x02\x02\x28 not HTTP\r\n\r\n");
    counts_toward_fall("apigarbage", garbage, "reason: Layer7 invalid response").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_500_counts_toward_fall() {
    let reason = "reason: Layer7 wrong status, code: 500, info: \"not Patroni's status JSON\"";
    counts_toward_fall("api500", Reply::status(500), reason).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_404_counts_toward_fall() {
    let reason = "reason: Layer7 wrong status, code: 404, info: \"not Patroni's status JSON\"";
    counts_toward_fall("api404", Reply::status(404), reason).await;
}

/// The checker reads at most 64 KiB of a body: a 10 MB one fails the check without the daemon
/// ever holding it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_10mb_body_counts_toward_fall_in_bounded_memory() {
    let one = OneNode::start("apihuge", Node::start().await, CheckConfig::new("/primary")).await;
    let pid = one.proxy.child.id();
    reset_peak_memory(pid).expect("reset the daemon's peak RSS");
    let start = memory(pid).expect("the daemon's memory");
    let before = one.server_lines().len();
    one.node.api.set("/primary", Reply::huge_body(10 << 20));
    one.down_after_fall(
        before,
        "reason: Layer7 invalid response, code: 200, info: \"body larger than 65536 bytes\"",
    );
    let end = memory(pid).expect("the daemon's memory");
    let grown_kib = end.peak_kib.saturating_sub(start.rss_kib);
    eprintln!("MEASURED three 10 MB bodies: peak RSS {grown_kib} KiB above the RSS before");
    assert!(
        grown_kib < 4 << 10,
        "peak RSS grew by {grown_kib} KiB: {start:?} -> {end:?}"
    );
    one.node.api.set("/primary", Reply::primary(1));
    one.wait_up(2);
}

/// A node checked over HTTPS, trusting `ca` only; its API presents a certificate `ca` signed.
async fn tls_node(name: &str, ca: &TestCa) -> OneNode {
    let node = Node::start().await;
    node.api.serve_tls(&ca.server_cert(localhost()), None);
    OneNode::start(name, node, CheckConfig::new("/primary").tls(&ca.cert)).await
}

fn localhost() -> IpAddr {
    IpAddr::from([127, 0, 0, 1])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_tls_certificate_from_another_ca_counts_toward_fall() {
    let (ca, other) = (TestCa::new("trusted"), TestCa::new("other"));
    let one = tls_node("tlsca", &ca).await;
    let before = one.server_lines().len();
    one.node
        .api
        .serve_tls(&other.server_cert(localhost()), None);
    let reason =
        "reason: Layer4 connection problem, info: \"invalid peer certificate: UnknownIssuer\"";
    one.down_after_fall(before, reason);
    one.node.api.serve_tls(&ca.server_cert(localhost()), None);
    one.wait_up(2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_tls_requiring_a_client_certificate_counts_toward_fall() {
    let ca = TestCa::new("trusted");
    let one = tls_node("tlsclient", &ca).await;
    let before = one.server_lines().len();
    // Patroni's `verify_client: required`; the check presents no certificate.
    let identity = ca.server_cert(localhost());
    one.node.api.serve_tls(&identity, Some(ca.cert.as_path()));
    // TLS 1.3: the server's alert arrives after the client's side of the handshake, with the
    // answer.
    let reason =
        "reason: Layer7 invalid response, info: \"received fatal alert: CertificateRequired\"";
    one.down_after_fall(before, reason);
    one.node.api.serve_tls(&identity, None);
    one.wait_up(2);
}
