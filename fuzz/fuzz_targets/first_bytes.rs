//! A client's first bytes, as patroxy reads them when it refuses the client (no server UP, all
//! full, connect failed): it declines SSLRequest and GSSENCRequest with 'N', reads the startup
//! packet and answers with a FATAL ErrorResponse; anything else it just closes. (An accepted
//! client's bytes are not parsed at all: they are spliced to the server.)
//!
//! The fuzzer's bytes are sent over a loopback connection to the real `refuse`, the client
//! closes its sending side, and what comes back must be what PostgreSQL's protocol rules,
//! written out below from its documentation, say for those bytes. A CancelRequest is not a
//! start, so it is closed like any other stranger.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use patroxy_fuzz::Loopback;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;
const PROTOCOL_3_0: u32 = 196_608;
/// PostgreSQL's own limit on a startup packet (MAX_STARTUP_PACKET_LENGTH).
const MAX_STARTUP_LEN: u32 = 10_000;
/// libpq asks for GSS encryption, then SSL, then starts.
const MOST_STARTS: usize = 3;

const SQLSTATE: &str = "57P03";
const MESSAGE: &str = "patroxy: fuzz: timeout queue expired: no server is UP";

static HARNESS: OnceLock<Loopback> = OnceLock::new();

fuzz_target!(init: init(), |data: &[u8]| {
    let h = HARNESS.get().expect("initialised");
    let addr = h.listener.local_addr().expect("listener address");
    let (delivered, answer) = h.runtime.block_on(async {
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), h.listener.accept());
        let (mut client, (server, _)) = (client.expect("connect"), accepted.expect("accept"));
        let talk = async {
            // Errors are the server closing early, which the answer then shows.
            let _ = client.write_all(data).await;
            let _ = client.shutdown().await;
            let mut answer = Vec::new();
            client.read_to_end(&mut answer).await.map(|_| answer)
        };
        tokio::join!(patroxy::proxy::refuse(server, SQLSTATE, MESSAGE), talk)
    });

    let expected = Expected::of(data);
    assert_eq!(delivered, expected.answered, "delivered, for {expected:?}");
    // A reset (patroxy closed with the client's bytes unread) may destroy what was sent.
    let Ok(answer) = answer else { return };
    let (declines, rest) = answer.split_at(answer.iter().take_while(|&&b| b == b'N').count());
    assert_eq!(declines.len(), expected.declined, "'N' answers for {expected:?}");
    if expected.answered {
        assert_error_response(rest);
    } else {
        assert!(rest.is_empty(), "closed without an answer, yet sent {rest:?}");
    }
});

/// What PostgreSQL's rules say for a client that sends `data` and closes: encryption requests
/// declined, and whether a complete protocol 3 startup packet followed them.
#[derive(Debug, PartialEq)]
struct Expected {
    declined: usize,
    answered: bool,
}

impl Expected {
    fn of(data: &[u8]) -> Expected {
        let mut declined = 0;
        let mut at = 0;
        for _ in 0..MOST_STARTS {
            let word = |i: usize| {
                data.get(at + i..at + i + 4)
                    .map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")))
            };
            let (Some(len), Some(code)) = (word(0), word(4)) else {
                break;
            };
            match (len, code) {
                (8, SSL_REQUEST | GSSENC_REQUEST) => {
                    declined += 1;
                    at += 8;
                }
                (9..=MAX_STARTUP_LEN, PROTOCOL_3_0) => {
                    let answered = data.len() >= at + len as usize;
                    return Expected { declined, answered };
                }
                _ => break,
            }
        }
        Expected {
            declined,
            answered: false,
        }
    }
}

/// `msg` is exactly one ErrorResponse: 'E', a length covering the rest, FATAL with our SQLSTATE
/// and message.
fn assert_error_response(msg: &[u8]) {
    assert_eq!(msg.first(), Some(&b'E'), "{msg:?}");
    let len = u32::from_be_bytes(msg[1..5].try_into().expect("4 bytes")) as usize;
    assert_eq!(len + 1, msg.len(), "length field of {msg:?}");
    assert_eq!(msg.last(), Some(&0), "terminator of {msg:?}");
    let fields: Vec<(u8, &[u8])> = msg[5..msg.len() - 1]
        .split(|&b| b == 0)
        .filter(|f| !f.is_empty())
        .map(|f| (f[0], &f[1..]))
        .collect();
    let expected: [(u8, &[u8]); 4] = [
        (b'S', b"FATAL"),
        (b'V', b"FATAL"),
        (b'C', SQLSTATE.as_bytes()),
        (b'M', MESSAGE.as_bytes()),
    ];
    assert_eq!(fields, expected, "fields of {msg:?}");
}

fn init() {
    let _ = HARNESS.set(Loopback::start());
}
