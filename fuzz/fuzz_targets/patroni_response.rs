//! Patroni's answer to a health check, all of it untrusted: the status line, the headers and
//! the JSON body. A loopback "Patroni" writes the fuzzer's bytes as its answer and closes; the
//! real `CheckClient` (reqwest/hyper, the body limit, the JSON reading, HAProxy's
//! classification) checks against it, and its outcome must be consistent with what was asked.
//!
//! Input: one control byte, then the answer's bytes. The control byte's bits 0-1 choose the
//! method (GET, HEAD, OPTIONS), bit 2 the expected status (200 or 503), bits 3-4 whether the
//! body is padded with JSON whitespace to just under or just over the 64 KiB a check reads
//! (the fuzzer's inputs are a few KiB, too short to reach that limit by themselves).
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use patroxy::patroni::client::{CheckClient, CheckTimeouts, MAX_BODY};
use patroxy::patroni::{CheckOutcome, CheckStatus};
use patroxy_fuzz::Loopback;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

/// Far longer than a loopback answer takes: reaching it means the client waited on a
/// connection that had already said everything and closed.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

const METHODS: [&str; 3] = ["GET", "HEAD", "OPTIONS"];
const EXPECTED: [u16; 2] = [200, 503];

struct Harness {
    /// Its listener is the loopback "Patroni".
    loopback: Loopback,
    /// Indexed by method, then expected status.
    clients: Vec<Vec<CheckClient>>,
}

static HARNESS: OnceLock<Harness> = OnceLock::new();

fuzz_target!(init: init(), |data: &[u8]| {
    let Some((&control, answer)) = data.split_first() else {
        return;
    };
    let method = usize::from(control & 0b11) % METHODS.len();
    let expect = usize::from(control >> 2 & 1);
    let answer = padded(answer, control >> 3 & 0b11);
    let h = HARNESS.get().expect("initialised");
    let outcome = h.loopback.runtime.block_on(async {
        let check = h.clients[method][expect].check();
        tokio::pin!(check);
        tokio::select! {
            outcome = &mut check => outcome,
            () = answer_once(&h.loopback.listener, &answer) => check.await,
        }
    });
    assert_consistent(&outcome, METHODS[method], EXPECTED[expect]);
});

/// What any answer must lead to: a verdict the status code explains, and Patroni's fields read
/// only from a GET's body.
fn assert_consistent(o: &CheckOutcome, method: &str, expect: u16) {
    assert!(
        !matches!(o.status, CheckStatus::L7Tout | CheckStatus::L4Tout),
        "a timeout, yet the answer was complete and the connection closed: {o:?}"
    );
    match o.status {
        CheckStatus::L7Ok => assert_eq!(o.code, Some(expect), "{o:?}"),
        CheckStatus::L7Sts => assert!(o.code.is_some_and(|c| c != expect), "{o:?}"),
        _ => {}
    }
    if let Some(code) = o.code {
        assert!((100..=999).contains(&code), "{o:?}");
    }
    if method != "GET" {
        assert!(
            o.role.is_none() && o.state.is_none() && o.timeline.is_none(),
            "{method} has no body to read, yet: {o:?}"
        );
    }
}

/// Accepts the check's connection, reads its request, answers with `answer` and closes.
async fn answer_once(listener: &TcpListener, answer: &[u8]) {
    let Ok((mut stream, _)) = listener.accept().await else {
        return;
    };
    // The whole request, so that closing does not reset the connection over unread bytes.
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    let _ = stream.write_all(answer).await;
    let _ = stream.shutdown().await;
}

/// `answer` with the body (after the first blank line) lengthened by JSON whitespace: `pad` 2
/// makes it just under [`MAX_BODY`] for a short body, 3 always over it.
fn padded(answer: &[u8], pad: u8) -> Vec<u8> {
    let extra = match pad {
        2 => MAX_BODY - 1024,
        3 => MAX_BODY + 1,
        _ => 0,
    };
    let Some(end) = answer.windows(4).position(|w| w == b"\r\n\r\n") else {
        return answer.to_vec();
    };
    let (head, body) = answer.split_at(end + 4);
    let mut out = Vec::with_capacity(answer.len() + extra);
    out.extend_from_slice(head);
    out.resize(head.len() + extra, b' ');
    out.extend_from_slice(body);
    out
}

fn init() {
    let loopback = Loopback::start();
    let addr = loopback.listener.local_addr().expect("its address");
    // The checks as the config loader builds them, one listener per method and status.
    let mut toml = String::from(
        "[defaults]\ntimeout_client = \"1m\"\ntimeout_server = \"1m\"\ntimeout_connect = \"1s\"\n\
         [[server]]\nname = \"patroni\"\naddress = \"127.0.0.1:5432\"\n",
    );
    // Never bound: the harness only builds check clients. Distinct ports, since validation
    // refuses port 0 and duplicate binds.
    let mut port = 15400;
    for method in METHODS {
        for expect in EXPECTED {
            port += 1;
            toml.push_str(&format!(
                "[[listener]]\nname = \"{method}{expect}\"\nbind = \"127.0.0.1:{port}\"\n\
                 servers = [\"patroni\"]\n\
                 check = {{ method = \"{method}\", path = \"/primary\", expect_status = {expect} }}\n"
            ));
        }
    }
    let config = patroxy::config::parse(&toml, "fuzz.toml").expect("the harness's config");
    let timeouts = CheckTimeouts::new(CHECK_TIMEOUT, CHECK_TIMEOUT, None);
    let entered = loopback.runtime.enter();
    let clients = config
        .listeners
        .chunks(EXPECTED.len())
        .map(|per_method| {
            per_method
                .iter()
                .map(|l| {
                    let check = l.check.as_ref().expect("each listener has a check");
                    CheckClient::new(addr, check, timeouts).expect("check client")
                })
                .collect()
        })
        .collect();
    drop(entered);
    let _ = HARNESS.set(Harness { loopback, clients });
}
