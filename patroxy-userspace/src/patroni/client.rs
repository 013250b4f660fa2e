//! One health check against Patroni's REST API, classified as HAProxy reports it.
//!
//! A check opens a fresh connection every time (no idle pool): a check is a question about the
//! node *now*, and a pooled connection could hide a dead listener or let two checks share one
//! socket. Patroni's REST server has a small request queue, so the checker never runs two checks
//! of one path to one node at once either.
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::Deserialize;
use tokio::time::Instant;

use crate::config::{
    model::{CheckMethod, CheckTls, HealthCheck},
    tls::{self, TlsFileError},
};

/// The most of a body a check reads. Patroni's answers are ~1 KiB; a bigger body is not Patroni
/// and must not make the checker buffer it.
pub const MAX_BODY: usize = 64 * 1024;

/// HAProxy's check status codes (the "check_status" column of its stats).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CheckStatus {
    /// TCP connect succeeded (only for a check that stops at layer 4; kept for the stats).
    L4Ok,
    /// Connect timed out.
    L4Tout,
    /// Connect failed: refused, reset, unreachable, TLS handshake error.
    L4Con,
    /// Layer 7 answer with the expected status.
    L7Ok,
    /// Well-formed HTTP answer with another status (Patroni's "not this role": 503).
    L7Sts,
    /// Malformed or unusable answer: not HTTP, closed early, body too large.
    L7Rsp,
    /// Connected, but no complete answer in time.
    L7Tout,
}

impl CheckStatus {
    pub fn passed(self) -> bool {
        matches!(self, CheckStatus::L4Ok | CheckStatus::L7Ok)
    }

    /// HAProxy's short name, as shown in its stats.
    pub fn as_str(self) -> &'static str {
        match self {
            CheckStatus::L4Ok => "L4OK",
            CheckStatus::L4Tout => "L4TOUT",
            CheckStatus::L4Con => "L4CON",
            CheckStatus::L7Ok => "L7OK",
            CheckStatus::L7Sts => "L7STS",
            CheckStatus::L7Rsp => "L7RSP",
            CheckStatus::L7Tout => "L7TOUT",
        }
    }

    /// HAProxy's long description, used in log lines ("reason: Layer7 wrong status").
    pub fn description(self) -> &'static str {
        match self {
            CheckStatus::L4Ok => "Layer4 check passed",
            CheckStatus::L4Tout => "Layer4 timeout",
            CheckStatus::L4Con => "Layer4 connection problem",
            CheckStatus::L7Ok => "Layer7 check passed",
            CheckStatus::L7Sts => "Layer7 wrong status",
            CheckStatus::L7Rsp => "Layer7 invalid response",
            CheckStatus::L7Tout => "Layer7 timeout",
        }
    }
}

/// The role Patroni reports in its JSON body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// "primary" (Patroni >= 3) or "master" (older releases).
    Primary,
    Replica,
    /// The leader of a standby cluster: the write target when the cluster is a standby.
    StandbyLeader,
    /// Anything else Patroni may say ("demoted", "uninitialized", ...), kept for the stats.
    Other(String),
}

impl Role {
    pub fn parse(s: &str) -> Role {
        match s {
            "primary" | "master" => Role::Primary,
            "replica" => Role::Replica,
            "standby_leader" | "standby-leader" => Role::StandbyLeader,
            other => Role::Other(other.to_string()),
        }
    }

    /// Whether this node leads its cluster, i.e. is where writes go.
    pub fn is_leader(&self) -> bool {
        matches!(self, Role::Primary | Role::StandbyLeader)
    }
}

/// The result of one check.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckOutcome {
    pub status: CheckStatus,
    /// The HTTP status code, when an HTTP answer arrived.
    pub code: Option<u16>,
    pub duration: Duration,
    /// From a GET's JSON body; `None` for HEAD/OPTIONS or a body without it.
    pub role: Option<Role>,
    pub state: Option<String>,
    pub timeline: Option<u64>,
    /// A short error text for the log and stats ("connection refused", "body too large").
    pub detail: Option<String>,
    /// Whether the answer is recognisably Patroni's own, which an authoritative check needs
    /// before it trusts a 503: on GET, a JSON body carrying Patroni's `state` and `role`; on
    /// HEAD and OPTIONS any complete HTTP answer, since Patroni sends those a bare status line
    /// (no headers, no body) and the status is all there is to judge.
    pub from_patroni: bool,
}

impl CheckOutcome {
    fn failed(status: CheckStatus, duration: Duration, detail: impl Into<String>) -> Self {
        CheckOutcome {
            status,
            code: None,
            duration,
            role: None,
            state: None,
            timeline: None,
            detail: Some(detail.into()),
            from_patroni: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    TlsFile(#[from] TlsFileError),
    #[error("building the check HTTP client: {0}")]
    Build(#[from] reqwest::Error),
}

/// The time budget of one check, from HAProxy's rules: with `timeout check` set, connecting may
/// take min(timeout connect, inter) and `timeout check` is the extra time for the answer;
/// without it, `inter` bounds the whole check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckTimeouts {
    pub connect: Duration,
    pub total: Duration,
    /// Per-read idle limit after connecting (`timeout check`), when set.
    pub read: Option<Duration>,
}

impl CheckTimeouts {
    pub fn new(
        inter: Duration,
        timeout_connect: Duration,
        timeout_check: Option<Duration>,
    ) -> Self {
        match timeout_check {
            Some(check) => {
                let connect = timeout_connect.min(inter);
                CheckTimeouts {
                    connect,
                    total: connect + check,
                    read: Some(check),
                }
            }
            None => CheckTimeouts {
                connect: inter,
                total: inter,
                read: None,
            },
        }
    }
}

/// A reusable checker for one (address, method, path, TLS) check.
#[derive(Clone, Debug)]
pub struct CheckClient {
    http: reqwest::Client,
    url: String,
    method: Method,
    expect: u16,
    total: Duration,
}

/// Patroni's status JSON. Every GET on a health endpoint carries `state` and `role`, also when
/// PostgreSQL is down (then little else), so their presence is what tells Patroni's answer from
/// anything else listening on the port.
#[derive(Deserialize)]
struct PatroniBody {
    role: Option<String>,
    state: Option<String>,
    timeline: Option<u64>,
}

impl CheckClient {
    /// The URL checked.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn new(
        addr: std::net::SocketAddr,
        check: &HealthCheck,
        timeouts: CheckTimeouts,
    ) -> Result<Self, ClientError> {
        let mut b = reqwest::Client::builder()
            // One connection per check, never shared or reused (see the module docs).
            .pool_max_idle_per_host(0)
            .http1_only()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(timeouts.connect);
        if let Some(read) = timeouts.read {
            b = b.read_timeout(read);
        }
        let scheme = match &check.tls {
            Some(tls) => {
                b = with_tls(b, tls)?;
                "https"
            }
            None => "http",
        };
        let path = if check.path.starts_with('/') {
            check.path.clone()
        } else {
            format!("/{}", check.path)
        };
        Ok(CheckClient {
            http: b.build()?,
            url: format!("{scheme}://{addr}{path}"),
            method: match check.method {
                CheckMethod::Get => Method::GET,
                CheckMethod::Head => Method::HEAD,
                CheckMethod::Options => Method::OPTIONS,
            },
            expect: check.expect_status,
            total: timeouts.total,
        })
    }

    /// Runs one check. Never fails: every failure is a classified [`CheckOutcome`].
    pub async fn check(&self) -> CheckOutcome {
        let start = Instant::now();
        let run = self.run(start);
        tokio::select! {
            // Biased: when reqwest's own connect timeout fires at the same instant as the
            // overall one, its more precise L4 classification wins.
            biased;
            outcome = run => outcome,
            _ = tokio::time::sleep(self.total) => {
                CheckOutcome::failed(CheckStatus::L7Tout, start.elapsed(), "no answer in time")
            }
        }
    }

    async fn run(&self, start: Instant) -> CheckOutcome {
        let mut resp = match self
            .http
            .request(self.method.clone(), &self.url)
            .send()
            .await
        {
            Ok(r) => r,
            Err(e) => return classify_error(&e, start.elapsed()),
        };
        let code = resp.status().as_u16();
        let mut outcome = CheckOutcome {
            status: if code == self.expect {
                CheckStatus::L7Ok
            } else {
                CheckStatus::L7Sts
            },
            code: Some(code),
            duration: Duration::ZERO,
            role: None,
            state: None,
            timeline: None,
            detail: None,
            // HEAD and OPTIONS: Patroni's answer is the status line alone (see the field's doc).
            from_patroni: self.method != Method::GET,
        };
        if self.method == Method::GET && resp.status() != StatusCode::NO_CONTENT {
            let mut body = Vec::new();
            loop {
                match resp.chunk().await {
                    Ok(Some(chunk)) if body.len() + chunk.len() > MAX_BODY => {
                        let mut o = CheckOutcome::failed(
                            CheckStatus::L7Rsp,
                            start.elapsed(),
                            format!("body larger than {MAX_BODY} bytes"),
                        );
                        o.code = Some(code);
                        return o;
                    }
                    Ok(Some(chunk)) => body.extend_from_slice(&chunk),
                    Ok(None) => break,
                    Err(e) => {
                        let mut o = classify_error(&e, start.elapsed());
                        o.code = Some(code);
                        return o;
                    }
                }
            }
            // A body that is not Patroni's JSON leaves the role unknown; the status still
            // decides the check, as in HAProxy.
            if let Ok(p) = serde_json::from_slice::<PatroniBody>(&body) {
                outcome.from_patroni = p.role.is_some() && p.state.is_some();
                outcome.role = p.role.as_deref().map(Role::parse);
                outcome.state = p.state;
                outcome.timeline = p.timeline;
            }
            if !outcome.from_patroni && outcome.status == CheckStatus::L7Sts {
                // Says in the log and stats why this status counts toward `fall` only.
                outcome.detail = Some("not Patroni's status JSON".into());
            }
        }
        outcome.duration = start.elapsed();
        outcome
    }
}

/// Trusts only `ca_file`; presents the client certificate when one is set (validation makes
/// sure client_cert and client_key come together).
fn with_tls(
    b: reqwest::ClientBuilder,
    tls: &CheckTls,
) -> Result<reqwest::ClientBuilder, ClientError> {
    let mut b = b.tls_built_in_root_certs(false);
    for cert in tls::ca_certificates(&tls.ca_file)? {
        b = b.add_root_certificate(cert);
    }
    if let (Some(cert), Some(key)) = (&tls.client_cert, &tls.client_key) {
        b = b.identity(tls::identity(cert, key)?);
    }
    Ok(b)
}

fn classify_error(e: &reqwest::Error, duration: Duration) -> CheckOutcome {
    let status = if e.is_connect() {
        if e.is_timeout() {
            CheckStatus::L4Tout
        } else {
            CheckStatus::L4Con
        }
    } else if e.is_timeout() {
        CheckStatus::L7Tout
    } else {
        // Not HTTP, connection closed before a full answer, bad chunking...
        CheckStatus::L7Rsp
    };
    CheckOutcome::failed(status, duration, root_cause(e))
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut last = e;
    while let Some(s) = last.source() {
        last = s;
    }
    last.to_string()
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    use super::*;

    #[test]
    fn timeouts_follow_haproxy() {
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        // timeout check set: connect = min(connect, inter), read = timeout check.
        let t = CheckTimeouts::new(s(3), s(4), Some(s(2)));
        assert_eq!((t.connect, t.read, t.total), (s(3), Some(s(2)), s(5)));
        let t = CheckTimeouts::new(s(3), ms(500), Some(s(2)));
        assert_eq!((t.connect, t.total), (ms(500), ms(2500)));
        // unset: inter bounds everything.
        let t = CheckTimeouts::new(s(3), ms(500), None);
        assert_eq!((t.connect, t.read, t.total), (s(3), None, s(3)));
    }

    /// A node whose REST API writes `answer` to every request, then closes.
    async fn node_answering(answer: String) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let answer = answer.clone();
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut chunk = [0u8; 1024];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let _ = stream.write_all(answer.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        addr
    }

    /// An answer the way Patroni's REST API writes one to a GET: HTTP/1.0, no length, the
    /// body ending with the connection.
    fn get_answer(status: &str, body: &str) -> String {
        format!(
            "HTTP/1.0 {status}\r\nServer: BaseHTTP/0.6 Python/3.11\r\n\
             Content-Type: application/json\r\n\r\n{body}"
        )
    }

    async fn check_once(addr: SocketAddr, method: CheckMethod) -> CheckOutcome {
        let mut check = crate::patroni::test_config::check("/primary", true);
        check.method = method;
        let timeouts = CheckTimeouts::new(Duration::from_secs(2), Duration::from_secs(1), None);
        let client = CheckClient::new(addr, &check, timeouts).unwrap();
        client.check().await
    }

    #[tokio::test]
    async fn an_answer_is_patronis_when_its_body_is_patronis_status() {
        let replica = r#"{"state": "running", "role": "replica", "timeline": 3, "patroni": {"version": "3.0.2", "scope": "demo"}}"#;
        let primary = r#"{"state": "running", "role": "primary", "timeline": 3}"#;
        // PostgreSQL down: Patroni still says who it is, and little else.
        let stopped = r#"{"state": "stopped", "role": "replica"}"#;
        for (answer, from_patroni) in [
            (get_answer("503 Service Unavailable", replica), true),
            (get_answer("200 OK", primary), true),
            (get_answer("503 Service Unavailable", stopped), true),
            (get_answer("503 Service Unavailable", "{}"), false),
            (
                get_answer("503 Service Unavailable", "<html>busy</html>"),
                false,
            ),
            (
                get_answer("500 Internal Server Error", "<html>oops</html>"),
                false,
            ),
            (get_answer("404 Not Found", ""), false),
        ] {
            let o = check_once(node_answering(answer.clone()).await, CheckMethod::Get).await;
            assert_eq!(o.from_patroni, from_patroni, "{answer}");
            if !from_patroni {
                assert_eq!(o.status, CheckStatus::L7Sts, "{answer}");
                assert_eq!(o.detail.as_deref(), Some("not Patroni's status JSON"));
            }
        }
    }

    #[tokio::test]
    async fn head_and_options_answers_are_judged_by_status_alone() {
        // Patroni's whole answer to HEAD and OPTIONS: a status line, no headers, no body.
        let node = node_answering("HTTP/1.0 503 Service Unavailable\r\n\r\n".into()).await;
        for method in [CheckMethod::Head, CheckMethod::Options] {
            let o = check_once(node, method).await;
            assert_eq!(
                (o.status, o.code, o.from_patroni),
                (CheckStatus::L7Sts, Some(503), true),
                "{method:?}"
            );
        }
        // No answer at all is nobody's.
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = closed.local_addr().unwrap();
        drop(closed);
        let o = check_once(addr, CheckMethod::Head).await;
        assert_eq!((o.status, o.from_patroni), (CheckStatus::L4Con, false));
    }

    #[test]
    fn roles_include_legacy_master() {
        assert_eq!(Role::parse("master"), Role::Primary);
        assert_eq!(Role::parse("primary"), Role::Primary);
        assert!(Role::parse("standby_leader").is_leader());
        assert!(!Role::parse("replica").is_leader());
        assert_eq!(Role::parse("demoted"), Role::Other("demoted".into()));
    }
}
