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
//! program keeps timestamps out of the proxied connections by itself and moves SACK blocks with
//! the ack. Everything is named `pxs*`, removed at the start of each test and when it ends; the
//! tests share the names and run one at a time (`tc_lab::Lab`, shared with `tc_splice_v6` but
//! for the names).
use std::{
    io::{self, Read, Write},
    net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream},
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use patroxy_tests::{
    backend::pattern,
    config::{
        Bpf, DefaultServer, Defaults, ListenerConfig, OnMarkedDown, ProxyConfig, RuntimeConfig,
        ServerConfig, StatsConfig,
    },
    daemon::Patroxy,
    netns,
    ports::free_tcp_port,
    postgres::{Postgres, PostgresOptions},
    process::{patroxy_bin, require_root},
    stats_client::get_ok,
};

#[path = "common/tc_busy.rs"]
mod tc_busy;
#[path = "common/tc_lab.rs"]
mod tc_lab;

use tc_busy::{
    abandoned_hand_offs_give_back_what_they_dropped, busy_sessions_are_handed_off,
    connect_failing_stalls, tcp_ext, upgrades_during_fenced_attempts_lose_nothing,
};
use tc_lab::{
    Ending, HANDED_OFF, Hosts, Lab, Server, Successor, echo, echo_turns_and_close, field,
    mark_down_resets, sack_negotiated, sizes, stats_pid, timestamps_negotiated, upgrade, wait_line,
};

const NS_CLIENT: &str = "pxs-cli";
const NS_SERVER: &str = "pxs-srv";
const VETH_CLIENT: &str = "pxsc0";
const VETH_SERVER: &str = "pxss0";
static HOSTS: Hosts = Hosts {
    ns_client: NS_CLIENT,
    ns_server: NS_SERVER,
    veth_client: VETH_CLIENT,
    peer_client: "pxsc1",
    veth_server: VETH_SERVER,
    peer_server: "pxss1",
    subnet: 218,
    ipv6: false,
    full_checksums: false,
};
const LISTEN: Ipv4Addr = Ipv4Addr::new(10, 218, 1, 1);
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 218, 2, 2);

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

/// What most tests start from: the lab, its echo server and a patroxy splicing to it (fields
/// dropped in this order: patroxy, then the server, then the hosts).
struct Echoing {
    proxy: Patroxy,
    addr: SocketAddr,
    pin: std::path::PathBuf,
    /// The stats page, on loopback.
    stats: SocketAddr,
    server: Server,
    _lab: Lab,
}

fn echoing(name: &str) -> Echoing {
    let lab = Lab::new(&HOSTS);
    let server = Server::start(&HOSTS, SERVER.into());
    let pin = Patroxy::unique_pin_path(name);
    let stats = SocketAddr::from((Ipv4Addr::LOCALHOST, free_tcp_port()));
    let config = config(&pin, server.port).stats(StatsConfig::new(stats));
    Echoing {
        proxy: Patroxy::start(name, &config),
        addr: config.bind(),
        pin,
        stats,
        server,
        _lab: lab,
    }
}

/// A client connection from `pxs-cli` to the listener.
fn connect(proxy: SocketAddr) -> TcpStream {
    HOSTS.connect(proxy)
}

fn local_port(stream: &TcpStream) -> u16 {
    stream.local_addr().unwrap().port()
}

/// The log's `client=` value of the client on `port`.
fn client_on(port: u16) -> String {
    format!("client={}:{port}", Ipv4Addr::new(10, 218, 1, 2))
}

/// Waits for the hand-off line of the client on `port`.
fn wait_handed_off(proxy: &Patroxy, port: u16) -> bool {
    wait_line(proxy, &client_on(port), HANDED_OFF).is_some()
}

/// The "session closed" line of the client on `port`, once written.
fn closed_line(proxy: &Patroxy, port: u16) -> Option<String> {
    wait_line(proxy, &client_on(port), "session closed")
}

/// `sessions` concurrent sessions of a 200-byte turn (a startup packet's size) and `turns`
/// echoes of 1 B..`max_size` each, with quiet moments between them; every byte echoed exactly,
/// every session handed off, its log line counting the session's bytes, and FLOWS empty after.
fn byte_exact_sessions(
    proxy: &Patroxy,
    addr: SocketAddr,
    sessions: usize,
    turns: usize,
    max_size: usize,
) {
    let started = Instant::now();
    let threads: Vec<_> = (0..sessions)
        .map(|i| {
            thread::spawn(move || {
                let stream = connect_failing_stalls(&HOSTS, addr);
                // A PostgreSQL client's first message is small (a startup packet); more than
                // 64 KiB before the backend connects would put the session on the fallback path.
                let sizes = sizes(turns, 0x9e37 + i as u64, 23)
                    .into_iter()
                    .map(|n| n.min(max_size));
                let sent = echo_turns_and_close(&stream, i, turns, sizes);
                (local_port(&stream), sent)
            })
        })
        .collect();
    let results: Vec<(u16, u64)> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    eprintln!(
        "{sessions} sessions of {turns} turns up to {max_size} B echoed in {:?}",
        started.elapsed()
    );
    for &(port, sent) in &results {
        let line = closed_line(proxy, port).expect("a session closed line");
        assert!(line.contains("session closed: client close"), "{line}");
        assert!(line.contains("path=\"sockmap+tc\""), "{line}");
        assert_eq!(field(&line, "bytes_in"), Some(sent), "{line}");
        assert_eq!(field(&line, "bytes_out"), Some(sent + 3), "{line}");
    }
    // Each hand-off was logged before its session closed. One read of the log for all.
    let log = proxy.log();
    for (port, _) in results {
        let client = format!("client={}:{port}", Ipv4Addr::new(10, 218, 1, 2));
        assert!(
            log.lines()
                .any(|l| l.contains(HANDED_OFF) && l.contains(&client)),
            "client port {port} was never handed off:\n{log}"
        );
    }
}

#[test]
fn quiet_sessions_are_handed_off_and_stay_byte_exact() {
    if !require_root("quiet_sessions_are_handed_off_and_stay_byte_exact") {
        return;
    }
    let Echoing {
        proxy,
        addr,
        pin,
        server,
        _lab,
        ..
    } = echoing("tc-exact");
    const SESSIONS: usize = 200;
    byte_exact_sessions(&proxy, addr, SESSIONS, 3, 8 << 20);
    assert_eq!(server.wait_for_endings(SESSIONS).len(), SESSIONS);
    assert!(server.endings().iter().all(|e| *e == Ending::Eof));
    // The flows are gone with their sessions.
    let flows = patroxy_tests::daemon::bpftool_dump(&pin, "FLOWS");
    assert_eq!(flows.as_array().map(Vec::len), Some(0), "{flows}");
}

/// The programs let other owners' programs on the same interfaces see every packet they do not
/// take (tcx's TCX_NEXT, not TC_ACT_OK, which ends the chain): a second patroxy attached after
/// the first strips its own listener's SYNs and hands its sessions off too. Before, the first
/// program's TC_ACT_OK ended the chain, the second's SYNs kept their timestamps and its
/// sessions stayed on the sockmap (found by a bench with two tc variants side by side).
#[test]
fn programs_attached_after_patroxys_still_see_the_packets() {
    if !require_root("programs_attached_after_patroxys_still_see_the_packets") {
        return;
    }
    let Echoing {
        proxy: first,
        addr: first_addr,
        server,
        _lab,
        ..
    } = echoing("tc-first");
    let pin = Patroxy::unique_pin_path("tc-second");
    let config = config(&pin, server.port);
    let second = Patroxy::start("tc-second", &config);
    for (proxy, addr) in [(&first, first_addr), (&second, config.bind())] {
        let stream = connect_failing_stalls(&HOSTS, addr);
        let hello = pattern(200, 7);
        assert!(echo(&stream, Arc::new(hello.clone())) == hello);
        assert!(
            wait_handed_off(proxy, local_port(&stream)),
            "the session through {addr} was never handed off:\n{}",
            proxy.log()
        );
    }
}

/// Runs `program` with `args` in namespace `ns`, `stdin` on its standard input.
fn run_in(ns: &str, program: &str, args: &[&str], stdin: &str) {
    let mut cmd = std::process::Command::new(program);
    netns::enter(&mut cmd, ns)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("{program}: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?} in {ns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Host `ns` (its veth `dev`) loses 1 % of the TCP segments it sends and of those it receives,
/// and holds back 3 % of those it sends in a slow HTB class, so later ones overtake them. This
/// kernel has no netem (CONFIG_NET_SCH_NETEM is off): nftables' random numbers drop and pick
/// (`meta priority` names the HTB class). SYNs are spared, so connecting costs no 1 s timeout.
fn impair(ns: &str, dev: &str) {
    run_in(
        ns,
        "nft",
        &["-f", "-"],
        "table inet pxs_impair {
           chain out {
             type filter hook output priority 0;
             tcp flags & syn == 0 numgen random mod 100 < 1 counter drop
             tcp flags & syn == 0 numgen random mod 100 < 3 counter meta priority set 1:20
           }
           chain in {
             type filter hook input priority 0;
             tcp flags & syn == 0 numgen random mod 100 < 1 counter drop
           }
         }",
    );
    run_in(
        ns,
        "tc",
        &["-batch", "-"],
        &format!(
            "qdisc add dev {dev} root handle 1: htb default 10\n\
         class add dev {dev} parent 1: classid 1:10 htb rate 10gbit\n\
         class add dev {dev} parent 1: classid 1:20 htb rate 100mbit\n"
        ),
    );
}

/// The packets [`impair`] dropped and held back in namespace `ns` (its rules' counters).
fn impaired(ns: &str) -> (u64, u64) {
    let mut cmd = std::process::Command::new("nft");
    let out = netns::enter(&mut cmd, ns)
        .args(["list", "table", "inet", "pxs_impair"])
        .output()
        .expect("run nft");
    let text = String::from_utf8_lossy(&out.stdout);
    let packets = |l: &str| {
        let at = l.find("counter packets ")? + "counter packets ".len();
        l[at..].split_whitespace().next()?.parse::<u64>().ok()
    };
    let sum = |pick: &dyn Fn(&str) -> bool| {
        text.lines()
            .filter(|l| pick(l))
            .filter_map(packets)
            .sum::<u64>()
    };
    (
        sum(&|l| l.contains("drop")),
        sum(&|l| l.contains("priority set")),
    )
}

#[test]
fn sessions_stay_byte_exact_with_loss_and_reordering() {
    if !require_root("sessions_stay_byte_exact_with_loss_and_reordering") {
        return;
    }
    let _lab = Lab::new(&HOSTS);
    // Lost segments are sent again and held-back ones arrive late: retransmissions,
    // out-of-order segments and the SACK blocks that report them cross the program both ways.
    // A SACK block the program did not move with the ack lands outside its sender's window,
    // which discards it and counts it (TCPSACKDiscard).
    let sack = |ns| ["TCPSackRecovery", "TCPSACKDiscard"].map(|name| tcp_ext(ns, name));
    let before = [NS_CLIENT, NS_SERVER].map(sack);
    impair(NS_CLIENT, "pxsc1");
    impair(NS_SERVER, "pxss1");
    let server = Server::start(&HOSTS, SERVER.into());
    let pin = Patroxy::unique_pin_path("tc-netem");
    let config = config(&pin, server.port);
    let proxy = Patroxy::start("tc-netem", &config);
    const SESSIONS: usize = 60;
    byte_exact_sessions(&proxy, config.bind(), SESSIONS, 3, 8 << 20);
    assert_eq!(server.wait_for_endings(SESSIONS).len(), SESSIONS);
    assert!(server.endings().iter().all(|e| *e == Ending::Eof));
    let after = [NS_CLIENT, NS_SERVER].map(sack);
    for (i, ns) in [NS_CLIENT, NS_SERVER].into_iter().enumerate() {
        let (dropped, held_back) = impaired(ns);
        let [recoveries, discarded] = [0, 1].map(|c| after[i][c] - before[i][c]);
        eprintln!(
            "{ns}: {dropped} packets dropped, {held_back} held back; SACK recoveries \
             {recoveries}, SACK blocks discarded {discarded}"
        );
        assert!(
            dropped > 0 && held_back > 0,
            "{ns}: the impairment did nothing"
        );
        assert_eq!(
            discarded, 0,
            "{ns}: SACK blocks outside the sender's window: the program did not move them"
        );
    }
    assert!(
        after[0][0] + after[1][0] > before[0][0] + before[1][0],
        "no sender recovered with SACK: was it negotiated?"
    );
}

/// A session that has been handed off: its startup turn echoed, the hand-off logged.
fn handed_off_session(proxy: &Patroxy, addr: SocketAddr) -> TcpStream {
    tc_lab::handed_off_session(&HOSTS, proxy, addr)
}

#[test]
fn fin_and_rst_each_way_end_a_spliced_session() {
    if !require_root("fin_and_rst_each_way_end_a_spliced_session") {
        return;
    }
    let Echoing {
        proxy,
        addr,
        server,
        _lab,
        ..
    } = echoing("tc-ends");
    let after = Arc::new(pattern(100_000, 9));

    // The client half-closes first; the server's last words still arrive.
    let s = handed_off_session(&proxy, addr);
    assert!(
        !timestamps_negotiated(&s),
        "the listener's SYN-ACK carried timestamps: the program did not strip them"
    );
    assert!(
        sack_negotiated(&s),
        "no SACK on the client's leg: the program stripped SACK-permitted"
    );
    assert_eq!(echo(&s, after.clone()), *after);
    s.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    (&s).read_to_end(&mut rest).unwrap();
    assert_eq!(rest, b"bye");
    let line = closed_line(&proxy, local_port(&s)).expect("closed line");
    assert!(line.contains("session closed: client close"), "{line}");
    assert_eq!(field(&line, "bytes_in"), Some(100_200), "{line}");
    assert_eq!(server.wait_for_endings(1), [Ending::Eof]);

    // The server half-closes first; the client may still send.
    let s = handed_off_session(&proxy, addr);
    (&s).write_all(b"FIN!").unwrap();
    let mut rest = Vec::new();
    (&s).read_to_end(&mut rest).unwrap();
    assert_eq!(rest, b"ok");
    (&s).write_all(b"late bytes").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let line = closed_line(&proxy, local_port(&s)).expect("closed line");
    assert!(line.contains("session closed: server close"), "{line}");
    assert_eq!(field(&line, "bytes_in"), Some(200 + 4 + 10), "{line}");
    assert_eq!(server.wait_for_endings(2)[1], Ending::Eof);

    // The client resets: the server hears it.
    let s = handed_off_session(&proxy, addr);
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    let port = local_port(&s);
    drop(s);
    let line = closed_line(&proxy, port).expect("closed line");
    assert!(line.contains("session closed: client reset"), "{line}");
    assert_eq!(
        server.wait_for_endings(3)[2],
        Ending::Error(io::ErrorKind::ConnectionReset)
    );

    // The server resets: the client hears it.
    let s = handed_off_session(&proxy, addr);
    (&s).write_all(b"RST!").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 16];
    let err = (&s).read(&mut buf).expect_err("a reset");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    let line = closed_line(&proxy, local_port(&s)).expect("closed line");
    assert!(line.contains("session closed: server reset"), "{line}");
    assert_eq!(server.wait_for_endings(4)[3], Ending::ResetSent);
}

/// `patroxy ARGS`'s standard output as JSON, asserting it succeeded.
fn patroxy_json(args: &[&std::ffi::OsStr]) -> serde_json::Value {
    let out = std::process::Command::new(patroxy_bin())
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "patroxy {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn a_handed_off_session_shows_in_the_stats_and_sessions_with_its_path_and_bytes() {
    if !require_root("a_handed_off_session_shows_in_the_stats_and_sessions_with_its_path_and_bytes")
    {
        return;
    }
    let _lab = Lab::new(&HOSTS);
    let server = Server::start(&HOSTS, SERVER.into());
    let pin = Patroxy::unique_pin_path("tc-stats");
    let socket = std::env::temp_dir().join(format!("pxs-stats-{}.sock", std::process::id()));
    let stats = SocketAddr::from((Ipv4Addr::LOCALHOST, free_tcp_port()));
    let config = config(&pin, server.port)
        .stats(StatsConfig::new(stats))
        .runtime(RuntimeConfig::new(&socket));
    let proxy = Patroxy::start("tc-stats", &config);
    let s = handed_off_session(&proxy, config.bind());
    let client = s.local_addr().unwrap().to_string();
    // Bytes after the hand-off are the TC program's to count.
    let after = Arc::new(pattern(100_000, 5));
    assert!(echo(&s, after.clone()) == *after);
    let total = 100_200;
    let row_of = |rows: serde_json::Value| {
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| r["client_addr"] == client)
            .cloned()
            .unwrap_or_else(|| panic!("no row for {client}: {rows}"))
    };
    // The runtime socket's `show sessions` and `patroxy sessions` read the same rows.
    let by_ctl = row_of(patroxy_json(&[
        "ctl".as_ref(),
        "--socket".as_ref(),
        socket.as_os_str(),
        "show".as_ref(),
        "sessions".as_ref(),
        "--json".as_ref(),
    ]));
    let by_cli = row_of(patroxy_json(&[
        "sessions".as_ref(),
        "--json".as_ref(),
        "--pin-path".as_ref(),
        pin.as_os_str(),
    ]));
    for row in [&by_ctl, &by_cli] {
        assert_eq!(row["path"], "sockmap+tc", "{row}");
        assert_eq!(row["bytes_in"], total, "{row}");
        assert_eq!(row["bytes_out"], total, "{row}");
        // Last activity from the program: the echo just now, not the hand-off.
        assert!(row["idle_secs"].as_f64().unwrap() < 1.0, "{row}");
    }
    let json: serde_json::Value = serde_json::from_str(&get_ok(stats, "/;json")).unwrap();
    assert_eq!(json["data_path"], "sockmap+tc");
    assert_eq!(json["tc"]["handed_off"], 1, "{json}");
    assert_eq!(json["tc"]["carried"], 1, "{json}");
    let pg = &json["listeners"][0]["servers"][0];
    assert_eq!(pg["scur"], 1, "{pg}");
    assert_eq!(pg["bin"], total, "{pg}");
    assert_eq!(pg["bout"], total, "{pg}");
    let metrics = get_ok(stats, "/metrics");
    for line in [
        "patroxy_tc_sessions_handed_off_total 1",
        "patroxy_tc_sessions_carried 1",
        &format!("patroxy_server_bytes_in_total{{proxy=\"l\",server=\"pg\"}} {total}"),
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    }
    let page = get_ok(stats, "/");
    assert!(
        page.contains("packet-level splice <b>1</b> now, <b>1</b> handed off"),
        "{page}"
    );
    s.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    (&s).read_to_end(&mut rest).unwrap();
    assert_eq!(rest, b"bye");
    closed_line(&proxy, local_port(&s)).expect("closed line");
    let json: serde_json::Value = serde_json::from_str(&get_ok(stats, "/;json")).unwrap();
    assert_eq!(json["tc"]["carried"], 0, "{json}");
    let pg = &json["listeners"][0]["servers"][0];
    assert_eq!(pg["bin"], total, "{pg}");
    assert_eq!(pg["bout"], total + 3, "{pg}");
}

#[test]
fn a_client_with_another_window_scale_stays_on_the_sockmap() {
    if !require_root("a_client_with_another_window_scale_stays_on_the_sockmap") {
        return;
    }
    let Echoing {
        proxy,
        addr,
        server: _server,
        _lab,
        ..
    } = echoing("tc-wscale");
    // A small receive buffer set before connecting: the client announces a smaller window
    // scale than the proxy's socket toward the server, so the windows could not be passed on.
    let stream = netns::within(NS_CLIENT, move || {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        socket.set_recv_buffer_size(16 * 1024)?;
        socket.connect(&addr.into())?;
        io::Result::Ok(TcpStream::from(socket))
    })
    .expect("enter the client namespace")
    .expect("connect");
    let mut sent = 0;
    for (turn, size) in [200usize, 3 << 20, 5000].into_iter().enumerate() {
        let data = Arc::new(pattern(size, turn as u64));
        assert!(echo(&stream, data.clone()) == *data, "turn {turn}");
        sent += size as u64;
        thread::sleep(Duration::from_millis(100));
    }
    stream.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    (&stream).read_to_end(&mut rest).unwrap();
    assert_eq!(rest, b"bye");
    let port = local_port(&stream);
    let line = closed_line(&proxy, port).expect("closed line");
    assert_eq!(field(&line, "bytes_in"), Some(sent), "{line}");
    // Its closing line names the path it took: the sockmap alone.
    assert!(line.contains("path=\"sockmap\""), "{line}");
    let log = proxy.log();
    assert!(
        log.contains("session not joinable at the packet level"),
        "{log}"
    );
    assert!(!log.contains(HANDED_OFF), "{log}");
}

#[test]
fn mark_down_resets_both_ends_of_spliced_sessions() {
    if !require_root("mark_down_resets_both_ends_of_spliced_sessions") {
        return;
    }
    let _lab = Lab::new(&HOSTS);
    let server = Server::start(&HOSTS, SERVER.into());
    let pin = Patroxy::unique_pin_path("tc-markdown");
    let socket = std::env::temp_dir().join(format!("pxs-ctl-{}.sock", std::process::id()));
    let mut config = config(&pin, server.port)
        .default_server(DefaultServer {
            on_marked_down: Some(OnMarkedDown::ShutdownSessions),
            ..DefaultServer::default()
        })
        .runtime(RuntimeConfig::new(&socket));
    // One client host: every session's closing line counts against its address's rate.
    config.global.session_log_rate = Some(10_000);
    let proxy = Patroxy::start("tc-markdown", &config);
    let addr = config.bind();
    const SESSIONS: usize = 1000;
    let hello = Arc::new(pattern(200, 7));
    let sessions: Vec<TcpStream> = (0..SESSIONS)
        .map(|_| {
            let s = connect(addr);
            assert!(echo(&s, hello.clone()) == *hello);
            s
        })
        .collect();
    assert!(
        proxy.wait_for_log_count(HANDED_OFF, SESSIONS, Duration::from_secs(20)),
        "{} of {SESSIONS} handed off:\n{}",
        proxy.count_log(HANDED_OFF),
        proxy.log()
    );
    let last = mark_down_resets(sessions, &socket, "l/pg");
    eprintln!("mark-down: last client reset {last:?} after the state change");
    assert!(last < Duration::from_secs(2), "{last:?}");
    let endings = server.wait_for_endings(SESSIONS);
    assert_eq!(endings.len(), SESSIONS);
    assert!(
        endings
            .iter()
            .all(|e| *e == Ending::Error(io::ErrorKind::ConnectionReset)),
        "{endings:?}"
    );
    // The resets go out before each session writes its line.
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

#[test]
fn psql_through_the_packet_level_splice() {
    if !require_root("psql_through_the_packet_level_splice") {
        return;
    }
    let _lab = Lab::new(&HOSTS);
    let pg = Postgres::start(PostgresOptions::default().trust().in_netns(
        NS_SERVER,
        SERVER,
        "10.218.2.0/24",
    ));
    let pin = Patroxy::unique_pin_path("tc-psql");
    let config = config(&pin, pg.port());
    let proxy = Patroxy::start("tc-psql", &config);
    let mut psql = pg.client("psql", config.bind().port());
    // pg.client enters the server's namespace; the client runs in the client's.
    netns::enter(&mut psql, NS_CLIENT).args([
        "-X",
        "-At",
        "-h",
        &LISTEN.to_string(),
        "-c",
        "SELECT pg_sleep(0.3)",
        "-c",
        "SELECT sum(length(repeat('x', g))) FROM generate_series(1, 2000) g",
        "-c",
        "SELECT inet_client_addr()",
    ]);
    let out = psql.output().expect("run psql");
    assert!(
        out.status.success(),
        "psql: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        proxy.log()
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "\n2001000\n10.218.2.1".trim_start()
    );
    assert_eq!(proxy.count_log(HANDED_OFF), 1, "{}", proxy.log());
    assert!(proxy.wait_for_log("session closed: client close", Duration::from_secs(5)));
}

#[test]
fn pgbench_and_copy_through_the_packet_level_splice() {
    if !require_root("pgbench_and_copy_through_the_packet_level_splice") {
        return;
    }
    let _lab = Lab::new(&HOSTS);
    let pg = Postgres::start(PostgresOptions::default().trust().in_netns(
        NS_SERVER,
        SERVER,
        "10.218.2.0/24",
    ));
    let pin = Patroxy::unique_pin_path("tc-pgbench");
    let config = config(&pin, pg.port());
    let proxy = Patroxy::start("tc-pgbench", &config);
    let port = config.bind().port();
    let in_client_ns = |tool: &str, args: &[&str]| {
        let mut cmd = pg.client(tool, port);
        netns::enter(&mut cmd, NS_CLIENT)
            .args(["-h", &LISTEN.to_string()])
            .args(args);
        let out = cmd.output().expect("run a PostgreSQL client");
        assert!(
            out.status.success(),
            "{tool} {args:?}: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            proxy.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };

    // COPY FROM and TO in one session handed off during the pause before them: 100,000 rows
    // (about 7 MB) each way through the TC program, compared row for row.
    let dir = std::env::temp_dir().join(format!("pxs-copy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (source, back) = (dir.join("in.csv"), dir.join("out.csv"));
    let rows: String = (0..100_000)
        .map(|i| format!("{i},{}\n", "x".repeat(i % 97 + 1)))
        .collect();
    std::fs::write(&source, &rows).unwrap();
    let out = in_client_ns(
        "psql",
        &[
            "-X",
            "-At",
            "-c",
            "CREATE TABLE copied (i int, s text)",
            "-c",
            "SELECT pg_sleep(0.3)",
            "-c",
            &format!("\\copy copied FROM '{}' (FORMAT csv)", source.display()),
            "-c",
            "SELECT count(*), sum(i), sum(length(s)) FROM copied",
            "-c",
            // In the order written: a heap table may place rows elsewhere.
            &format!(
                "\\copy (SELECT * FROM copied ORDER BY i) TO '{}' (FORMAT csv)",
                back.display()
            ),
        ],
    );
    let total_len: usize = (0..100_000).map(|i| i % 97 + 1).sum();
    assert!(
        out.contains(&format!("100000|4999950000|{total_len}")),
        "{out}"
    );
    assert!(
        std::fs::read(&back).unwrap() == rows.as_bytes(),
        "COPY TO differs"
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(proxy.count_log(HANDED_OFF), 1, "{}", proxy.log());

    // pgbench's own COPY (its initialization), then 4 clients at 10 transactions a second
    // each: pauses longer than the delayed ACK (40 ms) of each answer let every session be
    // handed off (at 100 a second, 2 of 4 were in one run: the answer stays unacknowledged
    // until the next query comes, so the session is seldom quiet). pgbench's first, short
    // connection (it reads the scale) may be handed off too.
    in_client_ns("pgbench", &["-i", "-q", "-s", "1"]);
    let before = proxy.count_log(HANDED_OFF);
    let out = in_client_ns(
        "pgbench",
        &["-S", "-c", "4", "-j", "2", "-T", "1", "-R", "40"],
    );
    let bench_handed_off = proxy.count_log(HANDED_OFF) - before;
    assert!(out.contains("number of failed transactions: 0"), "{out}");
    assert!(
        (4..=5).contains(&bench_handed_off),
        "{bench_handed_off} sessions handed off\n{out}\n{}",
        proxy.log()
    );
    // At full speed a pgbench session is seldom quiet: correct results, however many were
    // handed off.
    let before = proxy.count_log(HANDED_OFF);
    let out = in_client_ns("pgbench", &["-S", "-c", "4", "-j", "2", "-T", "1"]);
    assert!(out.contains("number of failed transactions: 0"), "{out}");
    eprintln!(
        "pgbench -S at full speed: {} of 4 sessions handed off",
        proxy.count_log(HANDED_OFF) - before
    );
    let accounts = in_client_ns(
        "psql",
        &["-X", "-At", "-c", "SELECT count(*) FROM pgbench_accounts"],
    );
    assert_eq!(accounts.trim(), "100000");
}

#[test]
fn maxconn_is_held_until_a_handed_off_flow_ends() {
    if !require_root("maxconn_is_held_until_a_handed_off_flow_ends") {
        return;
    }
    let _lab = Lab::new(&HOSTS);
    let server = Server::start(&HOSTS, SERVER.into());
    let pin = Patroxy::unique_pin_path("tc-maxconn");
    let mut config = config(&pin, server.port);
    config.servers[0].maxconn = Some(1);
    config.defaults.timeout_queue = Some(Duration::from_secs(10));
    let proxy = Patroxy::start("tc-maxconn", &config);
    let addr = config.bind();
    let first = handed_off_session(&proxy, addr);
    // The server's one slot is the handed-off session's: the next client waits in the queue.
    let second = connect(addr);
    let hello = pattern(200, 11);
    (&second).write_all(&hello).unwrap();
    second
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut got = vec![0u8; hello.len()];
    let err = (&second)
        .read_exact(&mut got)
        .expect_err("served while the slot was held");
    assert!(
        matches!(
            err.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ),
        "{err}"
    );
    // The flow ends: the slot is free, and the queued client is served.
    first.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    (&first).read_to_end(&mut rest).unwrap();
    assert_eq!(rest, b"bye");
    second
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    (&second)
        .read_exact(&mut got)
        .expect("served once the flow ended");
    assert!(got == hello);
    assert!(
        wait_handed_off(&proxy, local_port(&second)),
        "{}",
        proxy.log()
    );
}

/// `n` sessions of `turns` echoes each, short messages with pauses of 0-2 ms, then a close:
/// the hand-off is tried (every 1-50 ms, fenced after 250 ms) while bytes are on their way in
/// either direction, so many attempts are abandoned before one takes. Each thread returns its
/// client port and the bytes it sent, every echo checked.
fn raced_sessions(addr: SocketAddr, n: usize, turns: u64) -> Vec<thread::JoinHandle<(u16, u64)>> {
    (0..n)
        .map(|i| {
            thread::spawn(move || {
                let stream = connect(addr);
                let mut seed = 0x5eed_u64 + i as u64;
                let mut sent = 0;
                for turn in 0..turns {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    let data = Arc::new(pattern(1 + (seed % 3000) as usize, seed));
                    assert!(
                        echo(&stream, data.clone()) == *data,
                        "session {i} turn {turn}"
                    );
                    sent += data.len() as u64;
                    thread::sleep(Duration::from_micros(seed % 2000));
                }
                stream.shutdown(Shutdown::Write).unwrap();
                let mut rest = Vec::new();
                (&stream).read_to_end(&mut rest).unwrap();
                assert_eq!(rest, b"bye", "session {i}");
                (local_port(&stream), sent)
            })
        })
        .collect()
}

/// Joins [`raced_sessions`] and checks each one's closing line counts every byte; returns how
/// many were handed off.
fn raced_sessions_ended(proxy: &Patroxy, sessions: Vec<thread::JoinHandle<(u16, u64)>>) -> usize {
    let results: Vec<(u16, u64)> = sessions.into_iter().map(|t| t.join().unwrap()).collect();
    let mut handed = 0;
    for (port, sent) in results {
        let line = closed_line(proxy, port).expect("a session closed line");
        assert_eq!(field(&line, "bytes_in"), Some(sent), "{line}");
        assert_eq!(field(&line, "bytes_out"), Some(sent + 3), "{line}");
        handed += usize::from(wait_handed_off(proxy, port));
    }
    handed
}

#[test]
fn hand_offs_raced_by_traffic_both_ways_lose_and_duplicate_nothing() {
    if !require_root("hand_offs_raced_by_traffic_both_ways_lose_and_duplicate_nothing") {
        return;
    }
    let Echoing {
        proxy,
        addr,
        server: _server,
        _lab,
        ..
    } = echoing("tc-race");
    const SESSIONS: usize = 16;
    let handed = raced_sessions_ended(&proxy, raced_sessions(addr, SESSIONS, 150));
    eprintln!(
        "raced hand-offs: {handed} of {SESSIONS} sessions handed off, {} attempts abandoned",
        proxy.count_log("hand-off abandoned")
    );
    assert!(handed > 0, "no session was handed off:\n{}", proxy.log());
}

/// Sessions that are never quiet are handed off all the same, behind the program's fence, and
/// stay byte-exact (`tc_busy`).
#[test]
fn busy_sessions_are_handed_off_behind_the_fence_byte_exact() {
    if require_root("busy_sessions_are_handed_off_behind_the_fence_byte_exact") {
        busy_sessions_between_hosts("tc-busy", true);
    }
}

/// The same between hosts with SACK off (`net.ipv4.tcp_sack = 0` in both namespaces): the
/// legs negotiate none, and the senders whose segments a fence dropped get the duplicate ACKs
/// of a NewReno fast retransmit.
#[test]
fn busy_sessions_without_sack_are_handed_off_byte_exact() {
    if require_root("busy_sessions_without_sack_are_handed_off_byte_exact") {
        busy_sessions_between_hosts("tc-busy-nosack", false);
    }
}

/// The busy sessions of `tc_busy` between hosts with SACK on (their default) or off.
fn busy_sessions_between_hosts(name: &str, sack: bool) {
    let Echoing {
        proxy,
        addr,
        stats,
        server: _server,
        _lab,
        ..
    } = echoing(name);
    if !sack {
        for ns in [NS_CLIENT, NS_SERVER] {
            netns::sysctl(ns, "net.ipv4.tcp_sack", "0").expect("turn SACK off");
        }
    }
    let probe = handed_off_session(&proxy, addr);
    assert_eq!(sack_negotiated(&probe), sack, "SACK on the client's leg");
    drop(probe);
    busy_sessions_are_handed_off(&HOSTS, &proxy, addr, stats, sack);
}

/// What an abandoned attempt's fence dropped goes back to the proxy's own socket (`tc_busy`).
#[test]
fn abandoned_hand_offs_give_back_what_their_fence_dropped() {
    if !require_root("abandoned_hand_offs_give_back_what_their_fence_dropped") {
        return;
    }
    let Echoing {
        proxy,
        addr,
        stats,
        server: _server,
        _lab,
        ..
    } = echoing("tc-give-back");
    abandoned_hand_offs_give_back_what_they_dropped(&HOSTS, &proxy, addr, stats);
}

/// A bulk upload whose client outran its server is handed off once the fence has let the
/// sockmap's queue drain (`tc_busy`).
#[test]
fn a_bulk_upload_that_outran_its_server_is_handed_off() {
    if !require_root("a_bulk_upload_that_outran_its_server_is_handed_off") {
        return;
    }
    let Echoing {
        proxy,
        addr,
        server: _server,
        _lab,
        ..
    } = echoing("tc-outran");
    tc_busy::a_bulk_upload_that_outran_its_server_is_handed_off(&HOSTS, &proxy, addr);
}

#[test]
fn an_idle_spliced_session_times_out_with_a_reset_of_both_ends() {
    if !require_root("an_idle_spliced_session_times_out_with_a_reset_of_both_ends") {
        return;
    }
    let _lab = Lab::new(&HOSTS);
    let server = Server::start(&HOSTS, SERVER.into());
    let pin = Patroxy::unique_pin_path("tc-idle");
    let mut config = config(&pin, server.port);
    config.defaults.timeout_client = Duration::from_secs(1);
    config.defaults.timeout_server = Duration::from_secs(1);
    let proxy = Patroxy::start("tc-idle", &config);
    let s = handed_off_session(&proxy, config.bind());
    let since = Instant::now();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 16];
    let err = (&s).read(&mut buf).expect_err("a reset");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    let waited = since.elapsed();
    assert!(
        waited >= Duration::from_millis(800) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    let line = closed_line(&proxy, local_port(&s)).expect("closed line");
    assert!(line.contains("session closed: idle timeout"), "{line}");
    assert_eq!(
        server.wait_for_endings(1),
        [Ending::Error(io::ErrorKind::ConnectionReset)]
    );
}

/// How many loaded BPF programs are named `name` (bpftool 7.1 lists tcx links only by type
/// number, so the programs are counted: a detached program whose loader is gone is unloaded).
fn programs_named(name: &str) -> usize {
    let out = std::process::Command::new("bpftool")
        .args(["prog", "show"])
        .output()
        .expect("run bpftool");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&format!("name {name} ")))
        .count()
}

#[test]
fn a_crashed_runs_tc_links_are_detached_at_the_next_start_and_on_exit() {
    if !require_root("a_crashed_runs_tc_links_are_detached_at_the_next_start_and_on_exit") {
        return;
    }
    let _lab = Lab::new(&HOSTS);
    let server = Server::start(&HOSTS, SERVER.into());
    let pin = Patroxy::unique_pin_path("tc-crash");
    let config = config(&pin, server.port);
    let crashed = Patroxy::start("tc-crash", &config);
    // Two interfaces, one attachment each.
    assert_eq!(programs_named("patroxy_tc_ingress"), 1);
    // SAFETY: kill(2) on the daemon this test started.
    unsafe { libc::kill(crashed.child.id() as i32, libc::SIGKILL) };
    thread::sleep(Duration::from_millis(300));
    assert!(
        pin.join(format!("tc_ingress_{VETH_CLIENT}")).exists(),
        "the crash left the pinned link"
    );
    drop(crashed);
    let proxy = Patroxy::start("tc-crash-again", &config);
    assert!(
        proxy.wait_for_log(
            "detached the TC program a previous run left attached",
            Duration::from_secs(2)
        ),
        "{}",
        proxy.log()
    );
    assert_eq!(
        programs_named("patroxy_tc_ingress"),
        1,
        "the new run's ingress program alone"
    );
    let s = handed_off_session(&proxy, config.bind());
    s.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    (&s).read_to_end(&mut rest).unwrap();
    assert_eq!(rest, b"bye");
    drop(proxy);
    thread::sleep(Duration::from_millis(200));
    assert_eq!(
        programs_named("patroxy_tc_ingress"),
        0,
        "still attached after exit"
    );
    assert_eq!(
        programs_named("patroxy_tc_egress"),
        0,
        "still attached after exit"
    );
    assert!(!pin.exists(), "the pin directory outlived the daemon");
}

#[test]
fn upgrades_take_the_programs_and_the_flows_they_carry_over() {
    if !require_root("upgrades_take_the_programs_and_the_flows_they_carry_over") {
        return;
    }
    let Echoing {
        proxy,
        addr,
        stats,
        server,
        _lab,
        ..
    } = echoing("tc-upgrade");
    let successor = Successor(stats);
    let data = Arc::new(pattern(300_000, 5));
    let mut flows = Vec::new();
    let mut pid = stats_pid(stats).expect("the daemon's pid");
    for round in 0..2 {
        let s = handed_off_session(&proxy, addr);
        assert_eq!(echo(&s, data.clone()), *data, "round {round}");
        flows.push(s);
        pid = upgrade(&proxy, stats, pid);
        // Every flow goes on through the successor, byte-exact, still the program's.
        for s in &flows {
            assert_eq!(echo(s, data.clone()), *data, "round {round}");
        }
        let json: serde_json::Value = serde_json::from_str(&get_ok(stats, "/;json")).unwrap();
        assert_eq!(json["data_path"], "sockmap+tc", "{json}");
        assert_eq!(
            json["tc"]["carried"],
            flows.len(),
            "round {round}: the successor carries the flows it took over\n{json}\n{}",
            proxy.log()
        );
        assert_eq!(
            programs_named("patroxy_tc_ingress"),
            1,
            "round {round}: the attachment taken over, not doubled"
        );
    }
    // The successor hands new sessions off too: its predecessor passed CAP_NET_ADMIN on (for
    // TCP_REPAIR) as ambient, which a successor running as a service user needs as well.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let net_admin = format!("{:016x}", 1u64 << 12);
    for set in ["CapEff", "CapInh", "CapAmb"] {
        assert!(
            status.lines().any(|l| l == format!("{set}:\t{net_admin}")),
            "{set} of the successor is not CAP_NET_ADMIN alone:\n{status}"
        );
    }
    let s = handed_off_session(&proxy, addr);
    assert_eq!(echo(&s, data.clone()), *data);
    flows.push(s);

    // A flow taken over twice ends in its last process: a client close with every byte counted
    // (the startup turn and three echoes), then a client reset.
    let first = flows.remove(0);
    first.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    (&first).read_to_end(&mut rest).unwrap();
    assert_eq!(rest, b"bye");
    let line = closed_line(&proxy, local_port(&first)).expect("closed line");
    assert!(
        line.contains("session closed (taken over): client close"),
        "{line}"
    );
    assert!(line.contains("path=\"sockmap+tc\""), "{line}");
    assert_eq!(field(&line, "bytes_in"), Some(200 + 3 * 300_000), "{line}");
    let second = flows.remove(0);
    socket2::SockRef::from(&second)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    let port = local_port(&second);
    drop(second);
    let line = closed_line(&proxy, port).expect("closed line");
    assert!(line.contains("client reset"), "{line}");
    let endings = server.wait_for_endings(2);
    assert_eq!(endings[0], Ending::Eof, "{endings:?}");
    assert_eq!(
        endings[1],
        Ending::Error(io::ErrorKind::ConnectionReset),
        "{endings:?}"
    );
    // The last successor owns the attachment: its exit detaches the programs.
    drop(successor);
    thread::sleep(Duration::from_millis(200));
    assert_eq!(
        programs_named("patroxy_tc_ingress"),
        0,
        "still attached after the successor's exit\n{}",
        proxy.log()
    );
}

/// Upgrades while hand-offs are raced by traffic: a session is passed on between two attempts,
/// never in the middle of one (whose fence would stay, dropping the session's data for good, or
/// whose sockets would stay out of the sockmap in repair mode), and flows handed off in one
/// process go on in the next.
#[test]
fn upgrades_during_raced_hand_offs_lose_and_duplicate_nothing() {
    if !require_root("upgrades_during_raced_hand_offs_lose_and_duplicate_nothing") {
        return;
    }
    let Echoing {
        proxy,
        addr,
        stats,
        server: _server,
        _lab,
        ..
    } = echoing("tc-race-upgrade");
    let _successor = Successor(stats);
    const SESSIONS: usize = 12;
    let sessions = raced_sessions(addr, SESSIONS, 400);
    let mut pid = stats_pid(stats).expect("the daemon's pid");
    for _ in 0..4 {
        thread::sleep(Duration::from_millis(300));
        pid = upgrade(&proxy, stats, pid);
    }
    let handed = raced_sessions_ended(&proxy, sessions);
    let taken_over = proxy.count_log("session closed (taken over)");
    eprintln!(
        "raced hand-offs across 4 upgrades: {handed} of {SESSIONS} sessions handed off, {} \
         attempts abandoned, {taken_over} closed in a successor",
        proxy.count_log("hand-off abandoned")
    );
    assert!(handed > 0, "no session was handed off:\n{}", proxy.log());
    assert_eq!(taken_over, SESSIONS, "{}", proxy.log());
}

/// Upgrades while sessions that never settle are behind their fences (`tc_busy`).
#[test]
fn upgrades_during_fenced_attempts_lose_nothing_and_leave_no_fence() {
    if !require_root("upgrades_during_fenced_attempts_lose_nothing_and_leave_no_fence") {
        return;
    }
    let Echoing {
        proxy,
        addr,
        stats,
        server: _server,
        _lab,
        ..
    } = echoing("tc-fence-upgrade");
    let _successor = Successor(stats);
    let mut pid = stats_pid(stats).expect("the daemon's pid");
    upgrades_during_fenced_attempts_lose_nothing(&HOSTS, &proxy, addr, || {
        pid = upgrade(&proxy, stats, pid);
    });
}

/// Waits (5 s at most) for a line of `log` with `what` about the client of `stream`.
fn line_in(log: impl Fn() -> String, stream: &TcpStream, what: &str) -> Option<String> {
    let client = client_on(local_port(stream));
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Some(line) = log()
            .lines()
            .find(|l| l.contains(what) && l.split_whitespace().any(|w| w == client))
        {
            return Some(line.to_owned());
        }
        thread::sleep(Duration::from_millis(20));
    }
    None
}

/// A crash under systemd (SIGKILL, the fd store keeping the sessions' sockets): the program
/// goes on forwarding the handed-off flows with no daemon at all, and the restarted daemon
/// takes the pinned attachment and the flows over (the upgrade's path) and ends them.
#[test]
fn a_restart_after_a_crash_takes_the_handed_off_flows_over() {
    if !require_root("a_restart_after_a_crash_takes_the_handed_off_flows_over") {
        return;
    }
    let _lab = Lab::new(&HOSTS);
    let server = Server::start(&HOSTS, SERVER.into());
    let pin = Patroxy::unique_pin_path("tc-fdstore");
    let config = config(&pin, server.port);
    let config_path =
        std::env::temp_dir().join(format!("patroxy-tc-fdstore-{}.toml", std::process::id()));
    std::fs::write(&config_path, config.to_toml()).unwrap();
    let manager = patroxy_tests::service_manager::ServiceManager::start("tc-fdstore");
    let mut first = manager.launch("patroxy-tc-fdstore-1", &config_path);
    assert!(
        patroxy_tests::ports::wait_for_listen(config.bind(), Duration::from_secs(10)),
        "{}",
        first.log()
    );
    let data = Arc::new(pattern(200_000, 11));
    let sessions: Vec<TcpStream> = (0..2)
        .map(|_| {
            // A startup packet's size first: the splice takes no more than 64 KiB queued.
            let s = connect(config.bind());
            let hello = Arc::new(pattern(200, 7));
            assert_eq!(echo(&s, hello.clone()), *hello);
            assert!(
                line_in(|| first.log(), &s, HANDED_OFF).is_some(),
                "never handed off:\n{}",
                first.log()
            );
            assert_eq!(echo(&s, data.clone()), *data);
            s
        })
        .collect();
    let stored = |names: &[String]| names.iter().filter(|n| n.starts_with("s.")).count();
    assert!(
        manager.wait_for(Duration::from_secs(5), |n| stored(n) == 4),
        "stored: {:?}",
        manager.names()
    );
    first.signal(libc::SIGKILL).unwrap();
    first.wait().unwrap();
    // No daemon: the TC program forwards the flows on its own.
    for s in &sessions {
        assert_eq!(echo(s, data.clone()), *data, "with no daemon");
    }
    let second = manager.launch("patroxy-tc-fdstore-2", &config_path);
    let log = || second.log();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !log().contains("sessions from the fd store resumed") && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    assert!(log().contains("resumed=2 of=2"), "{}", log());
    assert!(
        log().contains("packet-level splice taken over attached"),
        "{}",
        log()
    );
    assert_eq!(programs_named("patroxy_tc_ingress"), 1, "{}", log());
    for s in &sessions {
        assert_eq!(echo(s, data.clone()), *data, "after the restart");
    }
    // The restarted daemon watches them to their end, every byte counted: the startup turn on
    // the sockmap, three echoes in the flow.
    for s in &sessions {
        s.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        (&*s).read_to_end(&mut rest).unwrap();
        assert_eq!(rest, b"bye");
        let line = line_in(log, s, "session closed").expect("closed line");
        assert!(line.contains("(taken over): client close"), "{line}");
        assert!(line.contains("path=\"sockmap+tc\""), "{line}");
        assert_eq!(field(&line, "bytes_in"), Some(200 + 3 * 200_000), "{line}");
    }
    assert!(
        manager.wait_for(Duration::from_secs(5), |n| stored(n) == 0),
        "still stored: {:?}",
        manager.names()
    );
    drop(second);
    let _ = std::fs::remove_file(&config_path);
}
