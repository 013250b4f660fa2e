//! The packet-level splice (`datapath = "tc"`) over IPv6, and the SYN option stripping kept to
//! patroxy's own connections.
//!
//! Two hosts, each a network namespace joined to this one by a veth pair, each end with an IPv4
//! and an IPv6 address; patroxy runs here with the TC programs on the two host-side veths:
//! - `pxv-cli` 10.219.1.2 / fd00:219:1::2, the client host (its veth here: `pxvc0`, 10.219.1.1 /
//!   fd00:219:1::1, the listeners);
//! - `pxv-srv` 10.219.2.2 / fd00:219:2::2, the server host (its veth here: `pxvs0`, 10.219.2.1 /
//!   fd00:219:2::1).
//!
//! Both namespaces keep the kernel's defaults (timestamps, SACK and window scaling on). Everything
//! is named `pxv*`, removed at the start of each test and when it ends; the tests share the names
//! and run one at a time (`tc_lab::Lab`, shared with `tc_splice` but for the names).
use std::{
    io::{self, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpStream},
    sync::Arc,
    thread,
    time::Duration,
};

use patroxy_tests::{
    backend::pattern,
    config::{
        Bpf, DefaultServer, Defaults, ListenerConfig, OnMarkedDown, ProxyConfig, RuntimeConfig,
        ServerConfig, StatsConfig,
    },
    daemon::{Patroxy, bpftool_dump},
    netns,
    ports::free_tcp_port,
    process::require_root,
};

#[path = "common/tc_busy.rs"]
mod tc_busy;
#[path = "common/tc_lab.rs"]
mod tc_lab;

use tc_busy::{
    a_bulk_upload_that_outran_its_server_is_handed_off,
    abandoned_hand_offs_give_back_what_they_dropped, busy_sessions_are_handed_off,
    upgrades_during_fenced_attempts_lose_nothing,
};
use tc_lab::{
    Ending, HANDED_OFF, Hosts, Lab, Server, Successor, client_field, echo, echo_turns_and_close,
    field, mark_down_resets, sizes, stats_pid, timestamps_negotiated, upgrade, wait_line,
};

const NS_CLIENT: &str = "pxv-cli";
const NS_SERVER: &str = "pxv-srv";
const VETH_CLIENT: &str = "pxvc0";
const VETH_SERVER: &str = "pxvs0";
static HOSTS: Hosts = Hosts {
    ns_client: NS_CLIENT,
    ns_server: NS_SERVER,
    veth_client: VETH_CLIENT,
    peer_client: "pxvc1",
    veth_server: VETH_SERVER,
    peer_server: "pxvs1",
    subnet: 219,
    ipv6: true,
    full_checksums: true,
};
const LISTEN4: Ipv4Addr = Ipv4Addr::new(10, 219, 1, 1);
const LISTEN6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x219, 1, 0, 0, 0, 0, 1);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x219, 1, 0, 0, 0, 0, 2);
const SERVER4: Ipv4Addr = Ipv4Addr::new(10, 219, 2, 2);
const SERVER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x219, 2, 0, 0, 0, 0, 2);

/// patroxy on both veths with one listener per `(listen address, server address)`: listener
/// `l<i>` to server `s<i>`.
fn config(pin: &std::path::Path, routes: &[(IpAddr, SocketAddr)]) -> ProxyConfig {
    let mut config = ProxyConfig::new(Defaults::new(
        Duration::from_secs(30),
        Duration::from_secs(2),
    ))
    .data_path(Bpf::Required, pin)
    .tc_splice(&[VETH_CLIENT, VETH_SERVER]);
    for (i, (listen, server)) in routes.iter().enumerate() {
        let name = format!("s{i}");
        config = config
            .server(ServerConfig::new(name.clone(), *server))
            .listener(ListenerConfig::new(
                format!("l{i}"),
                SocketAddr::new(*listen, free_tcp_port()),
                [name],
            ));
    }
    config
}

/// The dual-stack test server ([::]) in `pxv-srv`.
fn start_server() -> Server {
    Server::start(&HOSTS, Ipv6Addr::UNSPECIFIED.into())
}

impl Server {
    fn addr4(&self) -> SocketAddr {
        SocketAddr::from((SERVER4, self.port))
    }

    fn addr6(&self) -> SocketAddr {
        SocketAddr::from((SERVER6, self.port))
    }
}

/// A client connection from `pxv-cli`.
fn connect(to: SocketAddr) -> TcpStream {
    HOSTS.connect(to)
}

#[test]
fn only_patroxys_own_syns_to_a_server_port_lose_their_options() {
    if !require_root("only_patroxys_own_syns_to_a_server_port_lose_their_options") {
        return;
    }
    let _lab = Lab::new(&HOSTS);
    let server = start_server();
    let pin = Patroxy::unique_pin_path("tcv-syn");
    let config = config(&pin, &[(LISTEN4.into(), server.addr4())]);
    let proxy = Patroxy::start("tcv-syn", &config);
    let served_before = server.wait_for(0).len();

    let proxied = connect(config.bind());
    let hello = Arc::new(pattern(200, 1));
    assert_eq!(echo(&proxied, hello.clone()), *hello);
    assert!(
        !timestamps_negotiated(&proxied),
        "the listener's SYN-ACK carried timestamps"
    );
    // Both legs without the options: the session is handed off.
    assert!(
        wait_line(&proxy, &client_field(&proxied), HANDED_OFF).is_some(),
        "{}",
        proxy.log()
    );
    // Another client on the proxy's host, to the same server port, through the same veth.
    let direct = TcpStream::connect(server.addr4()).expect("connect to the server directly");
    assert_eq!(echo(&direct, hello.clone()), *hello);
    assert!(
        timestamps_negotiated(&direct),
        "a local client that is not patroxy lost its timestamps to the egress program"
    );
    let direct_port = direct.local_addr().unwrap().port();
    drop(direct);
    proxied.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    (&proxied).read_to_end(&mut rest).unwrap();
    assert_eq!(rest, b"bye");

    let served = server.wait_until(|s| {
        s.len() >= served_before + 2 && s.iter().any(|s| s.peer.port() == direct_port)
    });
    let (ours, theirs): (Vec<_>, Vec<_>) = served[served_before..]
        .iter()
        .partition(|s| s.peer.port() != direct_port);
    assert_eq!(theirs.len(), 1, "{served:?}");
    assert!(theirs[0].timestamps, "{served:?}");
    assert!(
        ours.iter().all(|s| !s.timestamps),
        "patroxy's backend connection negotiated timestamps: {served:?}"
    );
}

/// A session through `listener` whose first turn was echoed and which was handed off.
fn handed_off_session(proxy: &Patroxy, listener: SocketAddr) -> TcpStream {
    tc_lab::handed_off_session(&HOSTS, proxy, listener)
}

/// The words of an IPv6 address as FLOWS holds them (bpftool prints each u32 as a number).
fn flow_words(ip: Ipv6Addr) -> Vec<u64> {
    ip.octets()
        .chunks(4)
        .map(|w| u64::from(u32::from_ne_bytes([w[0], w[1], w[2], w[3]])))
        .collect()
}

/// Stops patroxy with SIGTERM and returns the hand-off counters its TC path logs on the way out.
fn stop_and_count(proxy: &Patroxy) -> String {
    // SAFETY: kill(2) on the daemon this test started.
    unsafe { libc::kill(proxy.child.id() as i32, libc::SIGTERM) };
    assert!(
        proxy.wait_for_log("packet-level splice detached", Duration::from_secs(10)),
        "{}",
        proxy.log()
    );
    proxy
        .log()
        .lines()
        .find(|l| l.contains("packet-level splice detached"))
        .unwrap()
        .to_string()
}

#[test]
fn ipv6_sessions_are_handed_off_byte_exact_and_end_by_fin_and_rst() {
    if !require_root("ipv6_sessions_are_handed_off_byte_exact_and_end_by_fin_and_rst") {
        return;
    }
    let _lab = Lab::new(&HOSTS);
    let server = start_server();
    let pin = Patroxy::unique_pin_path("tcv-exact");
    // l0: IPv6 to IPv6; l1: an IPv6 client to an IPv4 server.
    let config = config(
        &pin,
        &[
            (LISTEN6.into(), server.addr6()),
            (LISTEN6.into(), server.addr4()),
        ],
    );
    let proxy = Patroxy::start("tcv-exact", &config);
    let (v6, mixed) = (config.listeners[0].bind, config.listeners[1].bind);

    // Concurrent sessions up to 4 MiB a turn, each handed off, byte-exact before and after.
    const SESSIONS: usize = 12;
    const TURNS: usize = 3;
    let sessions: Vec<_> = (0..SESSIONS)
        .map(|i| {
            thread::spawn(move || {
                let stream = connect(v6);
                let sizes = sizes(TURNS, 0x6e37 + i as u64, 22).into_iter();
                let sent = echo_turns_and_close(&stream, i, TURNS, sizes);
                (client_field(&stream), sent)
            })
        })
        .collect();
    for session in sessions {
        let (client, sent) = session.join().unwrap();
        assert!(
            wait_line(&proxy, &client, HANDED_OFF).is_some(),
            "{client} was never handed off:\n{}",
            proxy.log()
        );
        let line = wait_line(&proxy, &client, "session closed").expect("a session closed line");
        assert!(line.contains("session closed: client close"), "{line}");
        assert!(line.contains("path=\"sockmap+tc\""), "{line}");
        assert_eq!(field(&line, "bytes_in"), Some(sent), "{line}");
        assert_eq!(field(&line, "bytes_out"), Some(sent + 3), "{line}");
    }

    // A live session's two flows carry IPv6 addresses: the client's, the server's.
    let s = handed_off_session(&proxy, v6);
    let flows = bpftool_dump(&pin, "FLOWS");
    let flows = flows.as_array().expect("FLOWS entries");
    assert_eq!(flows.len(), 2, "{flows:?}");
    let saddrs: Vec<Vec<u64>> = flows
        .iter()
        .map(|f| {
            f["key"]["saddr"]
                .as_array()
                .expect("an address array")
                .iter()
                .map(|w| w.as_u64().unwrap())
                .collect()
        })
        .collect();
    assert!(saddrs.contains(&flow_words(CLIENT6)), "{flows:?}");
    assert!(saddrs.contains(&flow_words(SERVER6)), "{flows:?}");

    // The client half-closes first; the server's last words still arrive.
    let after = Arc::new(pattern(100_000, 9));
    assert_eq!(echo(&s, after.clone()), *after);
    s.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    (&s).read_to_end(&mut rest).unwrap();
    assert_eq!(rest, b"bye");
    let line = wait_line(&proxy, &client_field(&s), "session closed").expect("closed line");
    assert!(line.contains("session closed: client close"), "{line}");
    assert_eq!(field(&line, "bytes_in"), Some(100_200), "{line}");
    let mut served = SESSIONS + 1;
    assert_eq!(server.wait_for(served)[served - 1].ending, Ending::Eof);

    // The server half-closes first; the client may still send.
    let s = handed_off_session(&proxy, v6);
    (&s).write_all(b"FIN!").unwrap();
    let mut rest = Vec::new();
    (&s).read_to_end(&mut rest).unwrap();
    assert_eq!(rest, b"ok");
    (&s).write_all(b"late bytes").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let line = wait_line(&proxy, &client_field(&s), "session closed").expect("closed line");
    assert!(line.contains("session closed: server close"), "{line}");
    assert_eq!(field(&line, "bytes_in"), Some(200 + 4 + 10), "{line}");
    served += 1;
    assert_eq!(server.wait_for(served)[served - 1].ending, Ending::Eof);

    // The client resets: the server hears it.
    let s = handed_off_session(&proxy, v6);
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    let client = client_field(&s);
    drop(s);
    let line = wait_line(&proxy, &client, "session closed").expect("closed line");
    assert!(line.contains("session closed: client reset"), "{line}");
    served += 1;
    assert_eq!(
        server.wait_for(served)[served - 1].ending,
        Ending::Error(io::ErrorKind::ConnectionReset)
    );

    // The server resets: the client hears it.
    let s = handed_off_session(&proxy, v6);
    (&s).write_all(b"RST!").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 16];
    let err = (&s).read(&mut buf).expect_err("a reset");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    let line = wait_line(&proxy, &client_field(&s), "session closed").expect("closed line");
    assert!(line.contains("session closed: server reset"), "{line}");
    served += 1;
    assert_eq!(
        server.wait_for(served)[served - 1].ending,
        Ending::ResetSent
    );
    assert!(
        server.wait_for(served).iter().all(|s| !s.timestamps),
        "a backend leg negotiated timestamps"
    );

    // An IPv6 client to an IPv4 server: byte-exact on the sockmap, never handed off, counted.
    let s = connect(mixed);
    let mut sent = 0;
    for (turn, size) in [200usize, 300_000, 5000].into_iter().enumerate() {
        let data = Arc::new(pattern(size, turn as u64));
        assert!(
            echo(&s, data.clone()) == *data,
            "mixed session, turn {turn}"
        );
        sent += size as u64;
        thread::sleep(Duration::from_millis(100));
    }
    s.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    (&s).read_to_end(&mut rest).unwrap();
    assert_eq!(rest, b"bye");
    let client = client_field(&s);
    let line = wait_line(&proxy, &client, "session closed").expect("closed line");
    assert!(line.contains("path=\"sockmap\""), "{line}");
    assert_eq!(field(&line, "bytes_in"), Some(sent), "{line}");
    let log = proxy.log();
    assert!(
        log.lines()
            .any(|l| l.contains("an IPv4 leg and an IPv6 leg") && l.contains(&client)),
        "{log}"
    );
    assert!(wait_line(&proxy, &client, HANDED_OFF).is_none(), "{log}");
    let counts = stop_and_count(&proxy);
    assert_eq!(field(&counts, "mixed_family"), Some(1), "{counts}");
    assert_eq!(
        field(&counts, "handed_off"),
        Some(SESSIONS as u64 + 4),
        "{counts}"
    );
}

#[test]
fn mark_down_resets_both_ends_of_spliced_ipv6_sessions() {
    if !require_root("mark_down_resets_both_ends_of_spliced_ipv6_sessions") {
        return;
    }
    let _lab = Lab::new(&HOSTS);
    let server = start_server();
    let pin = Patroxy::unique_pin_path("tcv-markdown");
    let socket = std::env::temp_dir().join(format!("pxv-ctl-{}.sock", std::process::id()));
    let config = config(&pin, &[(LISTEN6.into(), server.addr6())])
        .default_server(DefaultServer {
            on_marked_down: Some(OnMarkedDown::ShutdownSessions),
            ..DefaultServer::default()
        })
        .runtime(RuntimeConfig::new(&socket));
    let proxy = Patroxy::start("tcv-markdown", &config);
    const SESSIONS: usize = 10;
    let sessions: Vec<TcpStream> = (0..SESSIONS)
        .map(|_| handed_off_session(&proxy, config.bind()))
        .collect();
    let last = mark_down_resets(sessions, &socket, "l0/s0");
    eprintln!("IPv6 mark-down: last client reset {last:?} after the state change");
    assert!(last < Duration::from_secs(2), "{last:?}");
    let served = server.wait_for(SESSIONS);
    assert_eq!(served.len(), SESSIONS);
    assert!(
        served
            .iter()
            .all(|s| s.ending == Ending::Error(io::ErrorKind::ConnectionReset)),
        "{served:?}"
    );
    assert!(
        proxy.wait_for_log_count(
            "session closed: reset: server set to MAINT",
            SESSIONS,
            Duration::from_secs(5)
        ),
        "{}",
        proxy.log()
    );
}

/// IPv6 sessions that are never quiet are handed off behind the fence, byte-exact: the
/// duplicate ACKs and the held segments the proxy sends on are IPv6 packets here (`tc_busy`).
#[test]
fn busy_ipv6_sessions_are_handed_off_behind_the_fence_byte_exact() {
    if !require_root("busy_ipv6_sessions_are_handed_off_behind_the_fence_byte_exact") {
        return;
    }
    let _lab = Lab::new(&HOSTS);
    let server = start_server();
    let pin = Patroxy::unique_pin_path("tcv-busy");
    let stats = SocketAddr::from((Ipv4Addr::LOCALHOST, free_tcp_port()));
    let config = config(&pin, &[(LISTEN6.into(), server.addr6())]).stats(StatsConfig::new(stats));
    let proxy = Patroxy::start("tcv-busy", &config);
    busy_sessions_are_handed_off(&HOSTS, &proxy, config.bind(), stats, true);
}

/// An abandoned attempt gives what its fence dropped back to the proxy's own socket in IPv6
/// packets too (`tc_busy`).
#[test]
fn abandoned_ipv6_hand_offs_give_back_what_their_fence_dropped() {
    if !require_root("abandoned_ipv6_hand_offs_give_back_what_their_fence_dropped") {
        return;
    }
    let _lab = Lab::new(&HOSTS);
    let server = start_server();
    let pin = Patroxy::unique_pin_path("tcv-give-back");
    let stats = SocketAddr::from((Ipv4Addr::LOCALHOST, free_tcp_port()));
    let config = config(&pin, &[(LISTEN6.into(), server.addr6())]).stats(StatsConfig::new(stats));
    let proxy = Patroxy::start("tcv-give-back", &config);
    abandoned_hand_offs_give_back_what_they_dropped(&HOSTS, &proxy, config.bind(), stats);
}

/// An IPv6 bulk upload whose client outran its server is handed off once the fence has let the
/// sockmap's queue drain (`tc_busy`).
#[test]
fn an_ipv6_bulk_upload_that_outran_its_server_is_handed_off() {
    if !require_root("an_ipv6_bulk_upload_that_outran_its_server_is_handed_off") {
        return;
    }
    let _lab = Lab::new(&HOSTS);
    let server = start_server();
    let pin = Patroxy::unique_pin_path("tcv-outran");
    let config = config(&pin, &[(LISTEN6.into(), server.addr6())]);
    let proxy = Patroxy::start("tcv-outran", &config);
    a_bulk_upload_that_outran_its_server_is_handed_off(&HOSTS, &proxy, config.bind());
}

/// Upgrades while IPv6 sessions that never settle are behind their fences: the successor takes
/// the programs and the IPv6 flows over too (`tc_busy`).
#[test]
fn upgrades_during_ipv6_fenced_attempts_lose_nothing() {
    if !require_root("upgrades_during_ipv6_fenced_attempts_lose_nothing") {
        return;
    }
    let _lab = Lab::new(&HOSTS);
    let server = start_server();
    let pin = Patroxy::unique_pin_path("tcv-upgrade");
    let stats = SocketAddr::from((Ipv4Addr::LOCALHOST, free_tcp_port()));
    let config = config(&pin, &[(LISTEN6.into(), server.addr6())]).stats(StatsConfig::new(stats));
    let proxy = Patroxy::start("tcv-upgrade", &config);
    let _successor = Successor(stats);
    let mut pid = stats_pid(stats).expect("the daemon's pid");
    upgrades_during_fenced_attempts_lose_nothing(&HOSTS, &proxy, config.bind(), || {
        pid = upgrade(&proxy, stats, pid);
    });
}

/// The ones' complement sum of `data` (big-endian 16-bit words), folded.
fn ones_sum(data: &[u8], mut sum: u32) -> u32 {
    for pair in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum
}

/// A bare IPv4 ACK from `from` to `to`, checksums right, in a frame padded to Ethernet's 60-byte
/// minimum as a NIC pads it.
fn padded_ack(from: SocketAddr, to: SocketAddr, seq: u32, ack: u32, macs: [[u8; 6]; 2]) -> Vec<u8> {
    let (IpAddr::V4(src), IpAddr::V4(dst)) = (from.ip(), to.ip()) else {
        panic!("IPv4 addresses");
    };
    let mut ip = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0];
    ip.extend(src.octets());
    ip.extend(dst.octets());
    let csum = !(ones_sum(&ip, 0) as u16);
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    let mut tcp = Vec::new();
    tcp.extend(from.port().to_be_bytes());
    tcp.extend(to.port().to_be_bytes());
    tcp.extend(seq.to_be_bytes());
    tcp.extend(ack.to_be_bytes());
    tcp.extend([5 << 4, 0x10, 0x01, 0x00, 0, 0, 0, 0]);
    let mut pseudo = Vec::new();
    pseudo.extend(src.octets());
    pseudo.extend(dst.octets());
    pseudo.extend([0, 6, 0, 20]);
    let csum = !(ones_sum(&tcp, ones_sum(&pseudo, 0)) as u16);
    tcp[16..18].copy_from_slice(&csum.to_be_bytes());
    let mut frame = Vec::new();
    frame.extend(macs[1]);
    frame.extend(macs[0]);
    frame.extend([0x08, 0x00]);
    frame.extend(ip);
    frame.extend(tcp);
    frame.resize(60, 0);
    frame
}

/// The MAC address of `dev` on this host.
fn mac(dev: &str) -> [u8; 6] {
    let text = std::fs::read_to_string(format!("/sys/class/net/{dev}/address"))
        .expect("read the MAC address");
    let bytes: Vec<u8> = text
        .trim()
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect();
    bytes.try_into().expect("a 6-byte MAC address")
}

/// Sends one raw Ethernet frame out of `dev` in namespace `ns`.
fn send_frame(ns: &str, dev: &'static str, frame: Vec<u8>) {
    netns::within(ns, move || {
        let name = std::ffi::CString::new(dev).unwrap();
        // SAFETY: plain socket calls with a sockaddr_ll of the right size.
        unsafe {
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            assert!(fd >= 0, "AF_PACKET socket: {}", io::Error::last_os_error());
            let mut to: libc::sockaddr_ll = std::mem::zeroed();
            to.sll_family = libc::AF_PACKET as u16;
            to.sll_ifindex = libc::if_nametoindex(name.as_ptr()) as i32;
            to.sll_halen = 6;
            to.sll_addr[..6].copy_from_slice(&frame[..6]);
            let sent = libc::sendto(
                fd,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const to).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            libc::close(fd);
            assert_eq!(sent, frame.len() as isize, "{}", io::Error::last_os_error());
        }
    })
    .expect("enter the namespace");
}

/// The client->server flow's entry (`side` 0) as bpftool shows it.
fn to_server_flow(pin: &std::path::Path) -> serde_json::Value {
    let flows = bpftool_dump(pin, "FLOWS");
    flows
        .as_array()
        .and_then(|f| f.iter().find(|f| f["value"]["side"] == 0))
        .map(|f| f["value"].clone())
        .unwrap_or_else(|| panic!("no client->server flow: {flows}"))
}

/// What the client expects next: the server->client flow's `next_seq` (already in the client's
/// sequence space).
fn seq_expected_by_client(pin: &std::path::Path) -> u32 {
    let flows = bpftool_dump(pin, "FLOWS");
    flows
        .as_array()
        .and_then(|f| f.iter().find(|f| f["value"]["side"] == 1))
        .and_then(|f| f["value"]["next_seq"].as_u64())
        .unwrap_or_else(|| panic!("no server->client flow: {flows}")) as u32
}

#[test]
fn a_padded_bare_ack_counts_no_payload() {
    if !require_root("a_padded_bare_ack_counts_no_payload") {
        return;
    }
    let _lab = Lab::new(&HOSTS);
    let server = start_server();
    let pin = Patroxy::unique_pin_path("tcv-pad");
    let config = config(&pin, &[(LISTEN4.into(), server.addr4())]);
    let proxy = Patroxy::start("tcv-pad", &config);
    let s = handed_off_session(&proxy, config.bind());
    let before = to_server_flow(&pin);
    let as_u32 = |v: &serde_json::Value| v.as_u64().expect("a number") as u32;
    // The client's own sequence numbers: what it sends next, what it expects next.
    let seq = as_u32(&before["next_seq"]).wrapping_sub(as_u32(&before["seq_delta"]));
    let ack = seq_expected_by_client(&pin);
    let frame = padded_ack(
        s.local_addr().unwrap(),
        config.bind(),
        seq,
        ack,
        // Any source address will do: the frame is judged by its IP and TCP headers.
        [[0x02, 0, 0, 0x02, 0x19, 0x01], mac(VETH_CLIENT)],
    );
    send_frame(NS_CLIENT, "pxvc1", frame);
    thread::sleep(Duration::from_millis(100));
    let after = to_server_flow(&pin);
    assert_ne!(
        after["last_ns"], before["last_ns"],
        "the program never saw the ACK"
    );
    assert_eq!(after["next_seq"], before["next_seq"], "{before} -> {after}");
    assert_eq!(after["bytes"], before["bytes"], "{before} -> {after}");
    // The session goes on, byte-exact.
    let data = Arc::new(pattern(50_000, 5));
    assert!(echo(&s, data.clone()) == *data);
}
