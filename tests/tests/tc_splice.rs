//! The packet-level splice (`datapath = "tc"`): sessions handed from the sockmap path to the TC
//! program once quiet, then forwarded by it alone.
//!
//! Two hosts, each a network namespace joined to this one by a veth pair; patroxy runs here, with
//! the TC programs on the two host-side veths, so every packet between client and server crosses
//! it as it would cross a proxy host:
//! - `pxs-cli` 10.218.1.2, the client host (its veth here: `pxsc0`, 10.218.1.1, the listener);
//! - `pxs-srv` 10.218.2.2, the server host (its veth here: `pxss0`, 10.218.2.1).
//!
//! Both namespaces keep the kernel's defaults (timestamps, SACK and window scaling on); the
//! program keeps timestamps and SACK out of the proxied connections by itself. Everything is
//! named `pxs*`, removed at the start of each test and when it ends; the tests share the
//! names and run one at a time (`LAB`).
use std::{
    io::{self, Read, Write},
    net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{Arc, Mutex, MutexGuard},
    thread,
    time::{Duration, Instant},
};

use patroxy_tests::{
    backend::{Fnv, pattern},
    config::{Bpf, Defaults, ListenerConfig, ProxyConfig, ServerConfig},
    daemon::Patroxy,
    netns,
    ports::free_tcp_port,
    process::require_root,
};

static LAB: Mutex<()> = Mutex::new(());

const NS_CLIENT: &str = "pxs-cli";
const NS_SERVER: &str = "pxs-srv";
const VETH_CLIENT: &str = "pxsc0";
const VETH_SERVER: &str = "pxss0";
const LISTEN: Ipv4Addr = Ipv4Addr::new(10, 218, 1, 1);
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 218, 2, 2);
const HANDED_OFF: &str = "session handed to the TC program";

/// The two hosts, removed when the test ends, however it ends.
struct Lab {
    _turn: MutexGuard<'static, ()>,
}

impl Lab {
    fn new() -> Lab {
        let turn = LAB.lock().unwrap_or_else(|e| e.into_inner());
        remove();
        netns::add(NS_CLIENT).expect("client namespace");
        netns::add(NS_SERVER).expect("server namespace");
        netns::veth(
            None,
            VETH_CLIENT,
            "10.218.1.1/24",
            NS_CLIENT,
            "pxsc1",
            "10.218.1.2/24",
        )
        .expect("client veth");
        netns::veth(
            None,
            VETH_SERVER,
            "10.218.2.1/24",
            NS_SERVER,
            "pxss1",
            "10.218.2.2/24",
        )
        .expect("server veth");
        Lab { _turn: turn }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        remove();
    }
}

fn remove() {
    netns::remove(&[NS_CLIENT, NS_SERVER], &[VETH_CLIENT, VETH_SERVER]);
}

fn config(pin: &std::path::Path, server_port: u16) -> ProxyConfig {
    ProxyConfig::new(Defaults::new(
        Duration::from_secs(30),
        Duration::from_secs(2),
    ))
    .data_path(Bpf::Required, pin)
    .tc_splice(&[VETH_CLIENT, VETH_SERVER])
    .server(ServerConfig::new(
        "pg",
        SocketAddr::from((SERVER, server_port)),
    ))
    .listener(ListenerConfig::new(
        "l",
        SocketAddr::from((LISTEN, free_tcp_port())),
        ["pg"],
    ))
}

/// How the test server ended one connection.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Ending {
    /// Read EOF, answered "bye" and closed.
    Eof,
    /// Read failed with this kind (a reset).
    Error(io::ErrorKind),
    /// Reset it on the client's "RST!".
    ResetSent,
}

/// A server in `pxs-srv`: echoes what it reads; on "FIN!" answers "ok" and half-closes; on
/// "RST!" closes with RST; on EOF answers "bye" (if it still may) and closes.
struct Server {
    port: u16,
    endings: Arc<Mutex<Vec<Ending>>>,
}

impl Server {
    fn start() -> Server {
        let listener = netns::within(NS_SERVER, || TcpListener::bind((SERVER, 0)))
            .expect("enter the server namespace")
            .expect("bind the test server");
        let port = listener.local_addr().unwrap().port();
        let endings = Arc::new(Mutex::new(Vec::new()));
        let e = endings.clone();
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let e = e.clone();
                thread::spawn(move || {
                    let ending = serve(stream);
                    e.lock().unwrap().push(ending);
                });
            }
        });
        Server { port, endings }
    }

    fn endings(&self) -> Vec<Ending> {
        self.endings.lock().unwrap().clone()
    }

    fn wait_for_endings(&self, n: usize) -> Vec<Ending> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.endings().len() < n && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        self.endings()
    }
}

fn serve(mut stream: TcpStream) -> Ending {
    let mut buf = vec![0u8; 256 * 1024];
    let mut write_closed = false;
    loop {
        let n = match stream.read(&mut buf) {
            Ok(n) => n,
            Err(e) => return Ending::Error(e.kind()),
        };
        if n == 0 {
            if !write_closed {
                let _ = stream.write_all(b"bye");
            }
            return Ending::Eof;
        }
        let reply = match &buf[..n] {
            b"FIN!" => {
                let _ = stream.write_all(b"ok");
                let _ = stream.shutdown(Shutdown::Write);
                write_closed = true;
                continue;
            }
            b"RST!" => {
                socket2::SockRef::from(&stream)
                    .set_linger(Some(Duration::ZERO))
                    .unwrap();
                return Ending::ResetSent;
            }
            data => data,
        };
        if write_closed {
            continue;
        }
        if let Err(e) = stream.write_all(reply) {
            return Ending::Error(e.kind());
        }
    }
}

/// A client connection from `pxs-cli` to the listener.
fn connect(proxy: SocketAddr) -> TcpStream {
    netns::within(NS_CLIENT, move || TcpStream::connect(proxy))
        .expect("enter the client namespace")
        .expect("connect to patroxy")
}

/// Sends `data` and reads back as many bytes, writing on a thread of its own (a large echo
/// would otherwise fill both directions' buffers).
fn echo(stream: &TcpStream, data: Arc<Vec<u8>>) -> Vec<u8> {
    let mut writer = stream.try_clone().unwrap();
    let sent = data.clone();
    let w = thread::spawn(move || writer.write_all(&sent));
    let mut got = vec![0u8; data.len()];
    (&*stream).read_exact(&mut got).expect("read the echo");
    w.join().unwrap().expect("send");
    got
}

fn local_port(stream: &TcpStream) -> u16 {
    stream.local_addr().unwrap().port()
}

/// Waits for the hand-off line of the client on `port`.
fn wait_handed_off(proxy: &Patroxy, port: u16) -> bool {
    let needle = format!("client={}:{port}", Ipv4Addr::new(10, 218, 1, 2));
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if proxy
            .log()
            .lines()
            .any(|l| l.contains(HANDED_OFF) && l.contains(&needle))
        {
            return true;
        }
        thread::sleep(Duration::from_millis(10));
    }
    false
}

/// The "session closed" line of the client on `port`, once written.
fn closed_line(proxy: &Patroxy, port: u16) -> Option<String> {
    let needle = format!("client={}:{port}", Ipv4Addr::new(10, 218, 1, 2));
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Some(line) = proxy
            .log()
            .lines()
            .find(|l| l.contains("session closed") && l.contains(&needle))
        {
            return Some(line.to_string());
        }
        thread::sleep(Duration::from_millis(20));
    }
    None
}

fn field(line: &str, name: &str) -> Option<u64> {
    let at = line.find(&format!("{name}="))? + name.len() + 1;
    line[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// Sizes from 1 byte to 8 MiB, log-uniform.
fn sizes(n: usize, mut seed: u64) -> Vec<usize> {
    (0..n)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let exp = (seed % 2300) as f64 / 100.0;
            (2f64.powf(exp) as usize).clamp(1, 8 << 20)
        })
        .collect()
}

#[test]
fn quiet_sessions_are_handed_off_and_stay_byte_exact() {
    if !require_root("quiet_sessions_are_handed_off_and_stay_byte_exact") {
        return;
    }
    let _lab = Lab::new();
    let server = Server::start();
    let pin = Patroxy::unique_pin_path("tc-exact");
    let config = config(&pin, server.port);
    let proxy = Patroxy::start("tc-exact", &config);
    let addr = config.bind();
    const SESSIONS: usize = 30;
    const TURNS: usize = 3;
    let sessions: Vec<_> = (0..SESSIONS)
        .map(|i| {
            thread::spawn(move || {
                let stream = connect(addr);
                let mut sent = 0u64;
                // A PostgreSQL client's first message is small (a startup packet); more than
                // 64 KiB before the backend connects would put the session on the fallback path.
                let turns = std::iter::once(200).chain(sizes(TURNS, 0x9e37 + i as u64));
                for (turn, size) in turns.enumerate() {
                    let data = Arc::new(pattern(size, (i * TURNS + turn) as u64));
                    let got = echo(&stream, data.clone());
                    assert_eq!(got.len(), data.len(), "session {i} turn {turn}: length");
                    assert!(
                        Fnv::of(&got) == Fnv::of(&data),
                        "session {i} turn {turn}: bytes differ"
                    );
                    sent += size as u64;
                    // A quiet moment: the session is handed off here (the first attempt
                    // comes 1 ms after the splice, then every 50 ms at most).
                    thread::sleep(Duration::from_millis(150));
                }
                stream.shutdown(Shutdown::Write).unwrap();
                let mut rest = Vec::new();
                (&stream).read_to_end(&mut rest).unwrap();
                assert_eq!(rest, b"bye", "session {i}: the server's last words");
                (local_port(&stream), sent)
            })
        })
        .collect();
    let results: Vec<(u16, u64)> = sessions.into_iter().map(|t| t.join().unwrap()).collect();
    for (port, sent) in results {
        assert!(
            wait_handed_off(&proxy, port),
            "client port {port} was never handed off:\n{}",
            proxy.log()
        );
        let line = closed_line(&proxy, port).expect("a session closed line");
        assert!(line.contains("session closed: client close"), "{line}");
        assert_eq!(field(&line, "bytes_in"), Some(sent), "{line}");
        assert_eq!(field(&line, "bytes_out"), Some(sent + 3), "{line}");
    }
    assert_eq!(server.wait_for_endings(SESSIONS).len(), SESSIONS);
    assert!(server.endings().iter().all(|e| *e == Ending::Eof));
    // The flows are gone with their sessions.
    let flows = patroxy_tests::daemon::bpftool_dump(&pin, "FLOWS");
    assert_eq!(flows.as_array().map(Vec::len), Some(0), "{flows}");
}
