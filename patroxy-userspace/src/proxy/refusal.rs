//! A client patroxy cannot serve: why ([`Refusal`]), and the PostgreSQL error it gets instead
//! of a bare close.
//!
//! HAProxy in TCP mode just closes the connection, which psql reports as "server closed the
//! connection unexpectedly". patroxy speaks just enough of the protocol's start to say why:
//! it declines SSL/GSS encryption requests ('N'), reads the startup packet, answers with an
//! ErrorResponse (severity FATAL, an SQLSTATE, a message naming the listener) and closes.
//! Anything that is not a PostgreSQL start (or takes too long) is simply closed.

use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::timeout;

/// How long a refused client gets to send its startup packet.
const STARTUP_WAIT: Duration = Duration::from_secs(2);
/// A startup packet is a few hundred bytes; PostgreSQL itself refuses more than 10000.
const MAX_STARTUP_LEN: u32 = 10_000;
const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;
const PROTOCOL_3: u32 = 3 << 16;

/// SQLSTATEs of the refusals, as PostgreSQL itself would use them.
mod sqlstate {
    /// cannot_connect_now: no server can take the session (none UP); retry later.
    pub const CANNOT_CONNECT_NOW: &str = "57P03";
    /// too_many_connections: every server is at its maxconn.
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    /// connection_failure: connecting to the chosen server failed.
    pub const CONNECTION_FAILURE: &str = "08006";
}

/// Why a client was closed before reaching a server (HAProxy's termination flags in words).
#[derive(Debug)]
pub(super) enum Refusal {
    /// `timeout queue` expired with no UP server or no free slot.
    QueueTimeout { up_servers: bool },
    /// Every connection attempt failed.
    ConnectFailed { attempts: u32, last: std::io::Error },
}

impl Refusal {
    /// The SQLSTATE the client is told (see [`sqlstate`]).
    pub(super) fn sqlstate(&self) -> &'static str {
        match self {
            Self::QueueTimeout { up_servers: false } => sqlstate::CANNOT_CONNECT_NOW,
            Self::QueueTimeout { up_servers: true } => sqlstate::TOO_MANY_CONNECTIONS,
            Self::ConnectFailed { .. } => sqlstate::CONNECTION_FAILURE,
        }
    }

    /// The reason in words, for the log line and the client's message.
    pub(super) fn describe(&self) -> String {
        match self {
            Self::QueueTimeout { up_servers: false } => {
                "timeout queue expired: no server is UP".into()
            }
            Self::QueueTimeout { up_servers: true } => {
                "timeout queue expired: servers are at maxconn".into()
            }
            Self::ConnectFailed { attempts, last } => {
                format!("connect failed after {attempts} attempt(s): {last}")
            }
        }
    }
}

/// Answers a PostgreSQL client's start with a FATAL error, then closes. Returns whether the
/// error was delivered (false: not a PostgreSQL start, or the client went away).
pub async fn refuse(mut client: TcpStream, sqlstate: &str, message: &str) -> bool {
    let delivered = timeout(STARTUP_WAIT, async {
        if !read_startup(&mut client).await? {
            return Ok::<_, std::io::Error>(false);
        }
        client.write_all(&error_response(sqlstate, message)).await?;
        client.shutdown().await?;
        Ok(true)
    })
    .await;
    matches!(delivered, Ok(Ok(true)))
}

/// Reads up to and including the startup packet, declining encryption requests on the way.
/// `Ok(false)` if the client does not speak PostgreSQL protocol 3.
async fn read_startup(client: &mut TcpStream) -> std::io::Result<bool> {
    // libpq may ask for GSS encryption, then SSL, then start: at most two requests first.
    for _ in 0..3 {
        let len = client.read_u32().await?;
        if !(8..=MAX_STARTUP_LEN).contains(&len) {
            return Ok(false);
        }
        let code = client.read_u32().await?;
        match (len, code) {
            (8, SSL_REQUEST | GSSENC_REQUEST) => client.write_all(b"N").await?,
            (9..=MAX_STARTUP_LEN, PROTOCOL_3) => {
                // Drain the parameters: unread bytes at close would turn our FIN into a RST
                // and could destroy the error before the client reads it.
                let mut rest = vec![0; len as usize - 8];
                client.read_exact(&mut rest).await?;
                return Ok(true);
            }
            _ => return Ok(false),
        }
    }
    Ok(false)
}

/// An ErrorResponse message: 'E', its length, then S/V/C/M fields and a terminating zero.
fn error_response(sqlstate: &str, message: &str) -> Vec<u8> {
    let mut fields = Vec::new();
    for (tag, value) in [
        (b'S', "FATAL"),
        (b'V', "FATAL"),
        (b'C', sqlstate),
        (b'M', message),
    ] {
        fields.push(tag);
        // A NUL would end the field early; messages are ours, but be safe.
        fields.extend(value.bytes().filter(|&b| b != 0));
        fields.push(0);
    }
    fields.push(0);
    let mut msg = Vec::with_capacity(fields.len() + 5);
    msg.push(b'E');
    msg.extend(((fields.len() + 4) as u32).to_be_bytes());
    msg.extend(fields);
    msg
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        (client, server)
    }

    fn startup_packet() -> Vec<u8> {
        let params = b"user\0postgres\0database\0postgres\0\0";
        let mut p = ((params.len() + 8) as u32).to_be_bytes().to_vec();
        p.extend(PROTOCOL_3.to_be_bytes());
        p.extend(params);
        p
    }

    /// The fields of an ErrorResponse read from `client` after optional 'N' answers.
    async fn read_error(client: &mut TcpStream, expect_n: usize) -> Vec<(u8, String)> {
        let mut all = Vec::new();
        client.read_to_end(&mut all).await.unwrap();
        assert!(all[..expect_n].iter().all(|&b| b == b'N'), "{all:?}");
        let msg = &all[expect_n..];
        assert_eq!(msg[0], b'E');
        let len = u32::from_be_bytes(msg[1..5].try_into().unwrap()) as usize;
        assert_eq!(len + 1, msg.len(), "length field covers the message");
        msg[5..msg.len() - 1]
            .split(|&b| b == 0)
            .filter(|f| !f.is_empty())
            .map(|f| (f[0], String::from_utf8_lossy(&f[1..]).into_owned()))
            .collect()
    }

    #[tokio::test]
    async fn declines_ssl_then_answers_startup_with_fatal_error() {
        let (mut client, server) = pair().await;
        let task = tokio::spawn(refuse(
            server,
            "57P03",
            "patroxy: no server for postgres_write",
        ));
        let mut ssl = 8u32.to_be_bytes().to_vec();
        ssl.extend(SSL_REQUEST.to_be_bytes());
        client.write_all(&ssl).await.unwrap();
        let mut n = [0u8; 1];
        client.read_exact(&mut n).await.unwrap();
        assert_eq!(&n, b"N");
        client.write_all(&startup_packet()).await.unwrap();
        let fields = read_error(&mut client, 0).await;
        assert_eq!(
            fields,
            vec![
                (b'S', "FATAL".into()),
                (b'V', "FATAL".into()),
                (b'C', "57P03".into()),
                (b'M', "patroxy: no server for postgres_write".into()),
            ]
        );
        assert!(task.await.unwrap(), "reported as delivered");
    }

    #[tokio::test]
    async fn plain_startup_gets_the_error_too() {
        let (mut client, server) = pair().await;
        client.write_all(&startup_packet()).await.unwrap();
        assert!(refuse(server, "53300", "full").await);
        let fields = read_error(&mut client, 0).await;
        assert_eq!(fields[2], (b'C', "53300".into()));
    }

    #[tokio::test]
    async fn non_postgres_traffic_is_just_closed() {
        let (mut client, server) = pair().await;
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        assert!(!refuse(server, "57P03", "x").await);
        let mut rest = Vec::new();
        // Closed without a byte of PostgreSQL protocol (a reset is fine too: we left data).
        let _ = client.read_to_end(&mut rest).await;
        assert!(rest.is_empty(), "{rest:?}");
    }

    #[tokio::test]
    async fn oversized_startup_is_closed() {
        let (mut client, server) = pair().await;
        let mut p = (MAX_STARTUP_LEN + 1).to_be_bytes().to_vec();
        p.extend(PROTOCOL_3.to_be_bytes());
        client.write_all(&p).await.unwrap();
        assert!(!refuse(server, "57P03", "x").await);
    }
}
