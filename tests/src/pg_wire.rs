//! A minimal PostgreSQL wire client for tests that need what psql hides: a session's
//! BackendKeyData (pid and secret key), a query's SQLSTATE, and CancelRequests sent by hand.
//! Trust authentication only ([`PostgresOptions::trust`](crate::postgres::PostgresOptions)).
use std::{
    io::{self, Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    time::Duration,
};

/// CancelRequest's code (PostgreSQL's `CANCEL_REQUEST_CODE`).
pub const CANCEL_REQUEST_CODE: u32 = 80_877_102;

/// One session, started and ready for a query.
pub struct Session {
    stream: TcpStream,
    /// From BackendKeyData: the backend's pid and the key a CancelRequest must carry.
    pub pid: u32,
    pub key: u32,
}

/// How a query ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// CommandComplete, then ReadyForQuery.
    Done,
    /// ErrorResponse with this SQLSTATE.
    Error(String),
}

impl Session {
    /// Connects to `addr` as `postgres` (trust) and reads up to ReadyForQuery.
    pub fn connect(addr: SocketAddr) -> io::Result<Session> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.set_nodelay(true)?;
        let params = b"user\0postgres\0database\0postgres\0\0";
        let mut startup = ((params.len() + 8) as u32).to_be_bytes().to_vec();
        startup.extend(196_608u32.to_be_bytes());
        startup.extend(params);
        stream.write_all(&startup)?;
        let (mut pid, mut key) = (0, 0);
        loop {
            let (tag, body) = read_message(&mut stream)?;
            match tag {
                b'K' => {
                    pid = u32::from_be_bytes(body[0..4].try_into().expect("4 bytes"));
                    key = u32::from_be_bytes(body[4..8].try_into().expect("4 bytes"));
                }
                b'Z' => break,
                b'E' => {
                    return Err(io::Error::other(format!(
                        "startup failed: {:?}",
                        fields(&body)
                    )));
                }
                b'R' if body[..4] != [0, 0, 0, 0] => {
                    return Err(io::Error::other(
                        "the server asked for a password (trust only)",
                    ));
                }
                _ => {}
            }
        }
        Ok(Session { stream, pid, key })
    }

    /// Sends `sql` as a simple query without waiting for its end ([`Session::finish`]).
    pub fn send_query(&mut self, sql: &str) -> io::Result<()> {
        let mut msg = vec![b'Q'];
        msg.extend(((sql.len() + 5) as u32).to_be_bytes());
        msg.extend(sql.as_bytes());
        msg.push(0);
        self.stream.write_all(&msg)
    }

    /// Reads the query's messages up to ReadyForQuery, waiting at most `within` for it.
    pub fn finish(&mut self, within: Duration) -> io::Result<Outcome> {
        self.stream.set_read_timeout(Some(within))?;
        let mut outcome = Outcome::Done;
        loop {
            let (tag, body) = read_message(&mut self.stream)?;
            match tag {
                b'E' => {
                    let code = fields(&body)
                        .into_iter()
                        .find(|(t, _)| *t == b'C')
                        .map(|(_, v)| v)
                        .unwrap_or_default();
                    outcome = Outcome::Error(code);
                }
                b'Z' => return Ok(outcome),
                _ => {}
            }
        }
    }

    /// The address of this session's own socket (what the proxy sees as its client).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.stream.local_addr()
    }
}

/// A CancelRequest for backend `pid` with secret `key`.
pub fn cancel_packet(pid: u32, key: u32) -> [u8; 16] {
    let mut p = [0u8; 16];
    p[0..4].copy_from_slice(&16u32.to_be_bytes());
    p[4..8].copy_from_slice(&CANCEL_REQUEST_CODE.to_be_bytes());
    p[8..12].copy_from_slice(&pid.to_be_bytes());
    p[12..16].copy_from_slice(&key.to_be_bytes());
    p
}

/// Sends `packet` on a new connection from `from` (any port) to `addr` and waits for the far
/// end to close, as libpq's `PQcancel` does. Returns whether it closed within `within`.
pub fn send_cancel(
    from: IpAddr,
    addr: SocketAddr,
    packet: &[u8],
    within: Duration,
) -> io::Result<bool> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    socket.bind(&SocketAddr::new(from, 0).into())?;
    socket.connect_timeout(&addr.into(), Duration::from_secs(5))?;
    let mut s: TcpStream = socket.into();
    s.write_all(packet)?;
    s.set_read_timeout(Some(within))?;
    let mut rest = Vec::new();
    match s.read_to_end(&mut rest) {
        Ok(_) => Ok(true),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            Ok(false)
        }
        // A reset is a close too.
        Err(_) => Ok(true),
    }
}

fn read_message(stream: &mut TcpStream) -> io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 5];
    stream.read_exact(&mut head)?;
    let len = u32::from_be_bytes(head[1..5].try_into().expect("4 bytes")) as usize;
    let mut body = vec![0u8; len.saturating_sub(4)];
    stream.read_exact(&mut body)?;
    Ok((head[0], body))
}

/// The fields of an ErrorResponse or NoticeResponse body: (type, value).
fn fields(body: &[u8]) -> Vec<(u8, String)> {
    body.split(|&b| b == 0)
        .filter(|f| !f.is_empty())
        .map(|f| (f[0], String::from_utf8_lossy(&f[1..]).into_owned()))
        .collect()
}
