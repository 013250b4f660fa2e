//! The two-host lab of the packet-level splice tests (`tc_splice`, `tc_splice_v6`): a client and
//! a server network namespace, each joined to this one by a veth pair, the test server in the
//! server's and client connections from the client's. Each test file names its own hosts and
//! subnets ([`Hosts`]), so the two files never share a namespace.
#![allow(dead_code)]

use std::{
    io::{self, Read, Write},
    net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream},
    path::Path,
    sync::{Arc, Mutex, MutexGuard},
    thread,
    time::{Duration, Instant},
};

use patroxy_tests::{
    backend::{Fnv, pattern},
    daemon::Patroxy,
    netns,
    process::patroxy_bin,
};

/// What patroxy logs when it hands a session to the TC program.
pub const HANDED_OFF: &str = "session handed to the TC program";

/// One test at a time owns the hosts: they have fixed names.
static LAB: Mutex<()> = Mutex::new(());

/// The names and addresses of a lab: host `net` 1 is the client, 2 the server; the host-side
/// veth end is `10.<subnet>.<net>.1`, the namespace's `10.<subnet>.<net>.2` (and
/// `fd00:<subnet>:<net>::1`, `::2` with IPv6).
pub struct Hosts {
    pub ns_client: &'static str,
    pub ns_server: &'static str,
    /// The client's veth here and its peer in `ns_client`.
    pub veth_client: &'static str,
    pub peer_client: &'static str,
    /// The server's veth here and its peer in `ns_server`.
    pub veth_server: &'static str,
    pub peer_server: &'static str,
    /// The second byte of the IPv4 subnets (written the same in the IPv6 ones).
    pub subnet: u8,
    /// IPv6 addresses next to the IPv4 ones.
    pub ipv6: bool,
    /// Checksum offload off at the namespaces' ends (see [`full_checksums`]).
    pub full_checksums: bool,
}

impl Hosts {
    /// A client connection from the client host.
    pub fn connect(&'static self, to: SocketAddr) -> TcpStream {
        netns::within(self.ns_client, move || TcpStream::connect(to))
            .expect("enter the client namespace")
            .expect("connect to patroxy")
    }

    fn remove(&self) {
        netns::remove(
            &[self.ns_client, self.ns_server],
            &[self.veth_client, self.veth_server],
        );
    }
}

/// The two hosts, removed when the test ends, however it ends.
pub struct Lab {
    hosts: &'static Hosts,
    _turn: MutexGuard<'static, ()>,
}

impl Lab {
    pub fn new(hosts: &'static Hosts) -> Lab {
        let turn = LAB.lock().unwrap_or_else(|e| e.into_inner());
        hosts.remove();
        netns::add(hosts.ns_client).expect("client namespace");
        netns::add(hosts.ns_server).expect("server namespace");
        let subnet = hosts.subnet;
        for (host, peer, ns, net) in [
            (hosts.veth_client, hosts.peer_client, hosts.ns_client, 1),
            (hosts.veth_server, hosts.peer_server, hosts.ns_server, 2),
        ] {
            netns::veth(
                None,
                host,
                &format!("10.{subnet}.{net}.1/24"),
                ns,
                peer,
                &format!("10.{subnet}.{net}.2/24"),
            )
            .expect("veth");
            if hosts.ipv6 {
                // nodad: usable at once (duplicate address detection would hold them for ~2 s).
                netns::ip(&[
                    "addr",
                    "add",
                    &format!("fd00:{subnet}:{net}::1/64"),
                    "dev",
                    host,
                    "nodad",
                ])
                .expect("host IPv6 address");
                netns::ip(&[
                    "-n",
                    ns,
                    "addr",
                    "add",
                    &format!("fd00:{subnet}:{net}::2/64"),
                    "dev",
                    peer,
                    "nodad",
                ])
                .expect("namespace IPv6 address");
            }
            if hosts.full_checksums {
                full_checksums(ns, peer);
            }
        }
        Lab { hosts, _turn: turn }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.hosts.remove();
    }
}

/// Checksum offload off at a host's end: its packets leave with complete checksums, and what
/// arrives is verified, as between real hosts (veth otherwise passes CHECKSUM_PARTIAL packets
/// and trusts them unchecked, so a wrong incremental update by the program would go unseen).
fn full_checksums(ns: &str, dev: &str) {
    let out = std::process::Command::new("ip")
        .args([
            "netns", "exec", ns, "ethtool", "-K", dev, "tx", "off", "rx", "off",
        ])
        .output()
        .expect("run ethtool");
    assert!(
        out.status.success(),
        "ethtool -K {dev} tx off rx off: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// How the test server ended one connection, and what it negotiated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Served {
    pub peer: SocketAddr,
    pub timestamps: bool,
    pub ending: Ending,
}

/// How the test server ended one connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ending {
    /// Read EOF, answered "bye" and closed.
    Eof,
    /// Read failed with this kind (a reset).
    Error(io::ErrorKind),
    /// Reset it on the client's "RST!".
    ResetSent,
}

/// A server in the server host: echoes what it reads; on "FIN!" answers "ok" and half-closes;
/// on "RST!" closes with RST; on EOF answers "bye" (if it still may) and closes. Two commands
/// make a one-way stream, like a COPY: "SINK" (answered "ok") reads to EOF without echoing and
/// then answers "<bytes> <fnv hash>" ("SINK <bytes>": at most that many a millisecond);
/// "SOURCE <bytes> <seed>" sends that many bytes of [`stream_pattern`] and goes on echoing.
pub struct Server {
    pub port: u16,
    served: Arc<Mutex<Vec<Served>>>,
}

impl Server {
    /// The server on `ip` (port chosen by the kernel); [::] takes both families.
    pub fn start(hosts: &Hosts, ip: IpAddr) -> Server {
        let listener = netns::within(hosts.ns_server, move || TcpListener::bind((ip, 0)))
            .expect("enter the server namespace")
            .expect("bind the test server");
        let port = listener.local_addr().unwrap().port();
        let served = Arc::new(Mutex::new(Vec::new()));
        let s = served.clone();
        thread::spawn(move || {
            while let Ok((stream, peer)) = listener.accept() {
                let s = s.clone();
                thread::spawn(move || {
                    let timestamps = timestamps_negotiated(&stream);
                    let ending = serve(stream);
                    s.lock().unwrap().push(Served {
                        peer: canonical(peer),
                        timestamps,
                        ending,
                    });
                });
            }
        });
        Server { port, served }
    }

    pub fn wait_for(&self, n: usize) -> Vec<Served> {
        self.wait_until(|s| s.len() >= n)
    }

    /// The connections served so far, once `done` says so (or after 10 s).
    pub fn wait_until(&self, done: impl Fn(&[Served]) -> bool) -> Vec<Served> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let served = self.served.lock().unwrap().clone();
            if done(&served) || Instant::now() >= deadline {
                return served;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// How the connections served so far ended.
    pub fn endings(&self) -> Vec<Ending> {
        self.wait_until(|_| true)
            .into_iter()
            .map(|s| s.ending)
            .collect()
    }

    /// How the first `n` connections ended, once they have (or after 10 s).
    pub fn wait_for_endings(&self, n: usize) -> Vec<Ending> {
        self.wait_for(n).into_iter().map(|s| s.ending).collect()
    }
}

/// An IPv4 peer of a dual-stack server arrives as ::ffff:a.b.c.d.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
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
            b"SINK" => {
                let _ = stream.write_all(b"ok");
                return sink(stream, None);
            }
            command if command.starts_with(b"SINK ") => {
                let pace = String::from_utf8_lossy(&command[5..]).parse().unwrap();
                let _ = stream.write_all(b"ok");
                return sink(stream, Some(pace));
            }
            command if command.starts_with(b"SOURCE ") => {
                let command = String::from_utf8_lossy(command).into_owned();
                let mut args = command
                    .split(' ')
                    .skip(1)
                    .map(|a| a.parse::<u64>().unwrap());
                let (bytes, seed) = (args.next().unwrap(), args.next().unwrap());
                if let Err(e) = source(&mut stream, bytes, seed) {
                    return Ending::Error(e.kind());
                }
                continue;
            }
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

/// The period of the one-way streams' bytes: 1 MiB + 7, so that a byte lost or repeated
/// shifts everything after it out of line.
pub const STREAM_PERIOD: usize = (1 << 20) + 7;

/// The bytes a one-way stream repeats.
pub fn stream_pattern(seed: u64) -> Vec<u8> {
    pattern(STREAM_PERIOD, seed)
}

/// "SINK": reads to EOF, then answers how many bytes came and their hash. "SINK <bytes>" reads
/// that many bytes a millisecond at most, like a server slower than its client.
fn sink(mut stream: TcpStream, bytes_per_ms: Option<u64>) -> Ending {
    let mut buf = vec![0u8; 256 * 1024];
    let (mut bytes, mut hash) = (0u64, Fnv::default());
    let start = Instant::now();
    loop {
        let room = match bytes_per_ms {
            Some(pace) => {
                let allowed = pace * (start.elapsed().as_millis() as u64 + 1);
                if allowed <= bytes {
                    thread::sleep(Duration::from_millis(1));
                    continue;
                }
                ((allowed - bytes) as usize).min(buf.len())
            }
            None => buf.len(),
        };
        match stream.read(&mut buf[..room]) {
            Ok(0) => break,
            Ok(n) => {
                bytes += n as u64;
                hash.update(&buf[..n]);
            }
            Err(e) => return Ending::Error(e.kind()),
        }
    }
    let _ = stream.write_all(format!("{bytes} {:x}", hash.value()).as_bytes());
    Ending::Eof
}

/// "SOURCE": `bytes` bytes of [`stream_pattern`]`(seed)`, 256 KiB a millisecond at most (a
/// PostgreSQL COPY TO's pace, not memory's: the sockmap queues without limit what a faster
/// sender sends).
fn source(stream: &mut TcpStream, bytes: u64, seed: u64) -> io::Result<()> {
    let data = stream_pattern(seed);
    let (mut sent, mut at) = (0u64, 0usize);
    while sent < bytes {
        let end = (at + 256 * 1024)
            .min(STREAM_PERIOD)
            .min(at + (bytes - sent) as usize);
        stream.write_all(&data[at..end])?;
        sent += (end - at) as u64;
        at = end % STREAM_PERIOD;
        thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// Whether the connection negotiated TCP timestamps (TCP_INFO's `tcpi_options` bit 0).
pub fn timestamps_negotiated(stream: &TcpStream) -> bool {
    tcpi_options(stream) & 1 != 0
}

/// Whether the connection negotiated SACK (TCP_INFO's `tcpi_options` bit 1).
pub fn sack_negotiated(stream: &TcpStream) -> bool {
    tcpi_options(stream) & 2 != 0
}

fn tcpi_options(stream: &TcpStream) -> u8 {
    use std::os::fd::AsRawFd as _;
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: a tcp_info-sized out value with its size.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "TCP_INFO");
    info.tcpi_options
}

/// Sends `data` and reads back as many bytes, writing on a thread of its own (a large echo
/// would otherwise fill both directions' buffers).
pub fn echo(stream: &TcpStream, data: Arc<Vec<u8>>) -> Vec<u8> {
    let mut writer = stream.try_clone().unwrap();
    let sent = data.clone();
    let w = thread::spawn(move || writer.write_all(&sent));
    let mut got = vec![0u8; data.len()];
    (&*stream).read_exact(&mut got).expect("read the echo");
    w.join().unwrap().expect("send");
    got
}

/// The log's `client=` value for `stream`'s end.
pub fn client_field(stream: &TcpStream) -> String {
    format!("client={}", canonical(stream.local_addr().unwrap()))
}

/// Waits (5 s at most) for a log line with `what` about `client` (a `client=` word).
pub fn wait_line(proxy: &Patroxy, client: &str, what: &str) -> Option<String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Some(line) = proxy
            .log()
            .lines()
            .find(|l| l.contains(what) && l.split_whitespace().any(|w| w == client))
        {
            return Some(line.to_string());
        }
        thread::sleep(Duration::from_millis(10));
    }
    None
}

/// A session through `listener` whose first turn (a startup packet's size) was echoed and
/// which was handed off.
pub fn handed_off_session(
    hosts: &'static Hosts,
    proxy: &Patroxy,
    listener: SocketAddr,
) -> TcpStream {
    let stream = hosts.connect(listener);
    let hello = Arc::new(pattern(200, 7));
    assert_eq!(echo(&stream, hello.clone()), *hello);
    assert!(
        wait_line(proxy, &client_field(&stream), HANDED_OFF).is_some(),
        "never handed off:\n{}",
        proxy.log()
    );
    stream
}

/// Session `session`'s echoes on `stream`: a 200-byte turn (a startup packet's size), then one
/// of each of `sizes`, each byte-exact, with a quiet moment after each; then the client
/// half-closes and hears the server's last words. Returns the bytes it sent.
pub fn echo_turns_and_close(
    stream: &TcpStream,
    session: usize,
    turns: usize,
    sizes: impl Iterator<Item = usize>,
) -> u64 {
    let i = session;
    let mut sent = 0u64;
    for (turn, size) in std::iter::once(200).chain(sizes).enumerate() {
        let data = Arc::new(pattern(size, (i * turns + turn) as u64));
        let got = echo(stream, data.clone());
        assert_eq!(got.len(), data.len(), "session {i} turn {turn}: length");
        assert!(
            Fnv::of(&got) == Fnv::of(&data),
            "session {i} turn {turn}: bytes differ"
        );
        sent += size as u64;
        // A quiet moment: the session is handed off here (the first attempt comes 1 ms after
        // the splice, then every 50 ms at most).
        thread::sleep(Duration::from_millis(150));
    }
    stream.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    (&*stream).read_to_end(&mut rest).unwrap();
    assert_eq!(rest, b"bye", "session {i}: the server's last words");
    sent
}

/// Marks `server` (`listener/server`) down through the runtime `socket` while every one of the
/// handed-off `sessions` waits to read, each first moved on by 30 kB each way (the resets must
/// carry the sequence numbers of after the hand-off); asserts each client was reset and returns
/// how long after the state change the last reset came.
pub fn mark_down_resets(sessions: Vec<TcpStream>, socket: &Path, server: &str) -> Duration {
    for s in &sessions {
        let data = Arc::new(pattern(30_000, 3));
        assert!(echo(s, data.clone()) == *data);
    }
    let readers: Vec<_> = sessions
        .into_iter()
        .map(|s| {
            thread::spawn(move || {
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut buf = [0u8; 16];
                let result = (&s).read(&mut buf);
                (Instant::now(), result.map_err(|e| e.kind()))
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(100));
    let down = Instant::now();
    let out = std::process::Command::new(patroxy_bin())
        .arg("ctl")
        .arg("--socket")
        .arg(socket)
        .args(["set", "state", server, "maint"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut last = Duration::ZERO;
    for r in readers {
        let (at, result) = r.join().unwrap();
        assert_eq!(result, Err(io::ErrorKind::ConnectionReset));
        last = last.max(at - down);
    }
    last
}

/// The number after ` name=` in a log line.
pub fn field(line: &str, name: &str) -> Option<u64> {
    let at = line.find(&format!(" {name}="))? + name.len() + 2;
    line[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// Sizes from 1 byte to 2^`max_log2` bytes, log-uniform.
pub fn sizes(n: usize, mut seed: u64, max_log2: u32) -> Vec<usize> {
    (0..n)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let exp = (seed % (u64::from(max_log2) * 100)) as f64 / 100.0;
            (2f64.powf(exp) as usize).clamp(1, 1 << max_log2)
        })
        .collect()
}

/// The daemon running at the end of an upgrade test is a successor, not the test's child:
/// stopped by the pid its stats page gives (SIGTERM), however the test ends.
pub struct Successor(pub SocketAddr);

impl Drop for Successor {
    fn drop(&mut self) {
        if let Some(pid) = stats_pid(self.0) {
            // SAFETY: kill(2) on the daemon this test upgraded to.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while std::path::Path::new(&format!("/proc/{pid}")).exists()
                && Instant::now() < deadline
            {
                thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Whether process `pid` runs (the first daemon, this test's child, stays a zombie).
pub fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'))
    })
}

/// Runs `patroxy upgrade` against the daemon `pid` answering at `stats`; returns its
/// successor's pid once `pid` has exited, which it does only when it has passed every session
/// on (within its 1 s drain grace, else it resets them).
pub fn upgrade(proxy: &Patroxy, stats: SocketAddr, pid: u32) -> u32 {
    let url = format!("http://{stats}");
    let out = std::process::Command::new(patroxy_bin())
        .args(["upgrade", "--url", &url, "--timeout", "20s"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "patroxy upgrade: {}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        proxy.log()
    );
    let next = stats_pid(stats).expect("the successor's pid");
    assert_ne!(next, pid, "the same process answers after the upgrade");
    let deadline = Instant::now() + Duration::from_secs(5);
    while running(pid) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    assert!(!running(pid), "the predecessor still runs\n{}", proxy.log());
    next
}

/// The pid of the daemon answering on the stats page at `stats`.
pub fn stats_pid(stats: SocketAddr) -> Option<u32> {
    let (status, _, body) = patroxy_tests::stats_client::get(stats, "/;json").ok()?;
    if status != 200 {
        return None;
    }
    let json: serde_json::Value = serde_json::from_str(&body).ok()?;
    json["pid"].as_u64().map(|p| p as u32)
}
