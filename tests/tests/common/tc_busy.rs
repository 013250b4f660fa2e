//! Busy sessions (the tc_splice tests, IPv4 and IPv6): sessions that are never quiet, handed off
//! behind the TC program's fence all the same, byte-exact, with what the fence dropped
//! retransmitted fast (duplicate ACKs) or sent on by the proxy (held segments).

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use patroxy_tests::{
    backend::{Fnv, pattern},
    daemon::Patroxy,
    netns,
    stats_client::get_ok,
};

use super::tc_lab::{
    HANDED_OFF, Hosts, STREAM_PERIOD, client_field, echo, field, stream_pattern, wait_line,
};

/// A counter's value in `/metrics`.
pub fn metric(stats: SocketAddr, name: &str) -> u64 {
    get_ok(stats, "/metrics")
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
}

/// A client connection from the client host, with reads that give up after 30 s: a stalled
/// session fails the test rather than hang it.
pub fn connect_failing_stalls(hosts: &'static Hosts, proxy: SocketAddr) -> TcpStream {
    let stream = hosts.connect(proxy);
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream
}

/// One session that is never quiet: echoes of 1-400 B with no pause, each side's next message
/// carrying the ack of the last, until `until`. Returns the bytes sent.
fn ping_pong_until(stream: &TcpStream, i: usize, until: Instant) -> u64 {
    let mut sent = 0;
    let mut seed = 0xb0b_u64 + i as u64;
    let mut got = vec![0u8; 400];
    while Instant::now() < until {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let data = pattern(1 + (seed % 400) as usize, seed);
        (&*stream).write_all(&data).unwrap();
        (&*stream).read_exact(&mut got[..data.len()]).unwrap();
        assert!(got[..data.len()] == data[..], "session {i} after {sent} B");
        sent += data.len() as u64;
    }
    sent
}

/// A first message of a startup packet's size, echoed: more than 64 KiB before the backend
/// connects would put the session on the fallback path.
fn hello(stream: &TcpStream, i: usize) -> u64 {
    let hello = Arc::new(pattern(200, i as u64));
    assert!(
        echo(stream, hello.clone()) == *hello,
        "session {i}: first echo"
    );
    hello.len() as u64
}

/// One session streaming to the server, as a COPY FROM does, until `until`: the server counts
/// and hashes what it received. Returns the bytes sent and received.
fn stream_to_server_until(stream: &TcpStream, i: usize, until: Instant) -> (u64, u64) {
    upload(stream, i, "SINK", until, None)
}

/// How fast [`upload`] sends: `burst` bytes at once, then `per_ms` a millisecond.
struct Pace {
    burst: u64,
    per_ms: u64,
}

/// Sends `command` (a "SINK"), then the stream of [`stream_pattern`]`(i)` until `until`, at
/// `pace` or as fast as it goes, and checks the server's count and hash of it. Returns the
/// bytes sent and received.
fn upload(
    stream: &TcpStream,
    i: usize,
    command: &str,
    until: Instant,
    pace: Option<Pace>,
) -> (u64, u64) {
    let mut sent = hello(stream, i);
    (&*stream).write_all(command.as_bytes()).unwrap();
    let mut ok = [0u8; 2];
    (&*stream).read_exact(&mut ok).unwrap();
    assert_eq!(&ok, b"ok");
    sent += command.len() as u64;
    let data = stream_pattern(i as u64);
    let (mut streamed, mut at, mut hash) = (0u64, 0usize, Fnv::default());
    let start = Instant::now();
    while Instant::now() < until {
        if let Some(Pace { burst, per_ms }) = pace
            && streamed > burst + per_ms * start.elapsed().as_millis() as u64
        {
            thread::sleep(Duration::from_millis(1));
            continue;
        }
        let end = (at + 64 * 1024).min(STREAM_PERIOD);
        (&*stream).write_all(&data[at..end]).unwrap();
        hash.update(&data[at..end]);
        streamed += (end - at) as u64;
        at = end % STREAM_PERIOD;
    }
    stream.shutdown(Shutdown::Write).unwrap();
    let mut answer = String::new();
    (&*stream).read_to_string(&mut answer).unwrap();
    assert_eq!(
        answer,
        format!("{streamed} {:x}", hash.value()),
        "session {i}: what the server received"
    );
    (
        sent + streamed,
        sent - command.len() as u64 + 2 + answer.len() as u64,
    )
}

/// One session streaming from the server, as a COPY TO does: `bytes` bytes, every one compared
/// with the pattern. Returns the bytes sent and received.
fn stream_from_server(stream: &TcpStream, i: usize, bytes: u64) -> (u64, u64) {
    let mut sent = hello(stream, i);
    let command = format!("SOURCE {bytes} {i}");
    (&*stream).write_all(command.as_bytes()).unwrap();
    sent += command.len() as u64;
    read_source(stream, i, bytes);
    stream.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    (&*stream).read_to_end(&mut rest).unwrap();
    assert_eq!(rest, b"bye", "session {i}");
    (sent, 200 + bytes + 3)
}

/// Reads what "SOURCE <bytes> <i>" sends, comparing every byte with the pattern.
fn read_source(stream: &TcpStream, i: usize, bytes: u64) {
    let data = stream_pattern(i as u64);
    let mut buf = vec![0u8; 256 * 1024];
    let (mut got, mut at) = (0u64, 0usize);
    while got < bytes {
        let n = (&*stream)
            .read(&mut buf[..(bytes - got).min(256 * 1024) as usize])
            .expect("read the stream");
        assert!(n > 0, "session {i}: EOF after {got} of {bytes} bytes");
        for &b in &buf[..n] {
            assert_eq!(b, data[at], "session {i}: byte {got}");
            at = (at + 1) % STREAM_PERIOD;
            got += 1;
        }
    }
}

/// A bulk upload whose client sends twice as fast as its server reads (a COPY FROM into a busy
/// PostgreSQL): the sockmap queues the difference without limit, so when the first fenced
/// attempt comes (250 ms) the proxy's socket toward the server has megabytes left to send,
/// more than the fence's 150 ms drain. The fence waits while it drains and the session is
/// handed off, byte-exact; a fence that lifted after its 150 ms would never catch up, the
/// queue growing faster between attempts than one drains. (A session handed off quietly before
/// its upload filled the queue is not the case: up to six sessions are tried, as a loaded
/// machine's client may not outrun the server: under two busy loops, five IPv6 sessions in a
/// row were handed off quietly.)
pub fn a_bulk_upload_that_outran_its_server_is_handed_off(
    hosts: &'static Hosts,
    proxy: &Patroxy,
    addr: SocketAddr,
) {
    const TRIES: usize = 6;
    for i in 0..TRIES {
        let (handed, closed) = outrunning_upload(hosts, proxy, addr, i);
        assert!(closed.contains("path=\"sockmap+tc\""), "{closed}");
        if handed.contains("mode=Fenced") {
            return;
        }
        eprintln!(
            "session {i} was handed off quietly before its upload outran the server: {handed}"
        );
    }
    panic!("{TRIES} sessions handed off quietly:\n{}", proxy.log());
}

/// One upload for [`a_bulk_upload_that_outran_its_server_is_handed_off`], checked byte for byte
/// and counted in its closing line. Returns its hand-off's log line and its closing line.
fn outrunning_upload(
    hosts: &'static Hosts,
    proxy: &Patroxy,
    addr: SocketAddr,
    i: usize,
) -> (String, String) {
    /// The server reads 64 KiB a millisecond (67 MB/s); the client sends twice that, after a
    /// first megabyte at once that fills the server's window (no quiet moment from then on).
    const SERVER_PACE: u64 = 64 * 1024;
    const CLIENT_PACE: u64 = 2 * SERVER_PACE;
    const BURST: u64 = 1 << 20;
    let stream = connect_failing_stalls(hosts, addr);
    let pace = Pace {
        burst: BURST,
        per_ms: CLIENT_PACE,
    };
    let until = Instant::now() + Duration::from_millis(2500);
    let (sent, _) = upload(
        &stream,
        i,
        &format!("SINK {SERVER_PACE}"),
        until,
        Some(pace),
    );
    let client = client_field(&stream);
    let closed = wait_line(proxy, &client, "session closed").expect("a session closed line");
    assert_eq!(field(&closed, "bytes_in"), Some(sent), "{closed}");
    let log = proxy.log();
    let handed = log
        .lines()
        .find(|l| l.contains(HANDED_OFF) && l.split_whitespace().any(|w| w == client))
        .unwrap_or_else(|| panic!("session {i}: {sent} B sent, never handed off:\n{log}"))
        .to_string();
    let fenced_ms = field(&handed, "fenced_ms").expect("fenced_ms");
    eprintln!("session {i}: {sent} B sent, handed off after a fence of {fenced_ms} ms");
    (handed, closed)
}

/// A TcpExt counter of `/proc/net/netstat` in namespace `ns`.
pub fn tcp_ext(ns: &str, name: &str) -> u64 {
    let text = netns::within(ns, || {
        std::fs::read_to_string("/proc/thread-self/net/netstat")
    })
    .expect("enter the namespace")
    .expect("read /proc/net/netstat");
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("TcpExt:")).collect();
    let (names, values) = (lines[0], lines[1]);
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == name)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or_else(|| panic!("no TcpExt {name} in {ns}"))
}

/// Bytes a stream from the server carries: about 2.5 s at the source's pace (at most 256 KiB a
/// millisecond), past the first fenced attempts.
const SOURCE_BYTES: u64 = 500_000_000;

/// What one run of busy sessions showed.
struct Busy {
    fenced: usize,
    /// Fenced hand-offs whose fence dropped segments.
    fenced_with_drops: usize,
    abandoned: usize,
    /// TCPTimeouts and fast recoveries (TCPSackRecovery and TCPRenoRecovery) counted by the
    /// client host and the server host during the run.
    timeouts: [u64; 2],
    recoveries: [u64; 2],
}

/// `ping_pong` sessions of echoes with no pause, and `streams` one-way streams (to the server
/// and from it in turn), all for at least 2.5 s (past the first fenced attempt at 250 ms, and
/// two more should it fail): each byte-exact, handed off, its closed line counting every byte.
fn busy_sessions(
    hosts: &'static Hosts,
    proxy: &Patroxy,
    addr: SocketAddr,
    ping_pong: usize,
    streams: usize,
) -> Busy {
    let counters = |name| [hosts.ns_client, hosts.ns_server].map(|ns| tcp_ext(ns, name));
    let abandoned_before = proxy.count_log("hand-off abandoned: the session did not settle");
    // Fast recoveries with SACK and without (a lab host that turns SACK off).
    let recovered = || {
        let [sack, reno] = ["TCPSackRecovery", "TCPRenoRecovery"].map(counters);
        [0, 1].map(|i| sack[i] + reno[i])
    };
    let (timeouts_before, recoveries_before) = (counters("TCPTimeouts"), recovered());
    let until = Instant::now() + Duration::from_millis(2500);
    let sessions: Vec<_> = (0..ping_pong + streams)
        .map(|i| {
            thread::spawn(move || {
                let stream = connect_failing_stalls(hosts, addr);
                let (sent, received) = if i < ping_pong {
                    let sent = ping_pong_until(&stream, i, until);
                    stream.shutdown(Shutdown::Write).unwrap();
                    let mut rest = Vec::new();
                    (&stream).read_to_end(&mut rest).unwrap();
                    assert_eq!(rest, b"bye", "session {i}");
                    (sent, sent + 3)
                } else if i % 2 == 0 {
                    stream_to_server_until(&stream, i, until)
                } else {
                    stream_from_server(&stream, i, SOURCE_BYTES)
                };
                (client_field(&stream), sent, received)
            })
        })
        .collect();
    let results: Vec<(String, u64, u64)> =
        sessions.into_iter().map(|t| t.join().unwrap()).collect();
    let mut stayed = Vec::new();
    for (client, sent, received) in &results {
        let line = wait_line(proxy, client, "session closed").expect("a session closed line");
        assert!(line.contains("session closed: client close"), "{line}");
        assert_eq!(field(&line, "bytes_in"), Some(*sent), "{line}");
        assert_eq!(field(&line, "bytes_out"), Some(*received), "{line}");
        if line.contains("path=\"sockmap\"") {
            stayed.push(client.clone());
        } else {
            assert!(line.contains("path=\"sockmap+tc\""), "{line}");
        }
    }
    // Known, not yet fixed (2026-12-04, a loaded 2-core machine: in 3 of 10 runs of the two
    // busy tests): one session is never handed off within the 2.5 s, because bytes the verdict
    // redirected to one of its sockets stay unsent for hundreds of milliseconds, so no attempt
    // settles. It stays byte-exact on the sockmap (checked above); two are a failure.
    let log = proxy.log();
    assert!(
        stayed.len() <= 1,
        "{stayed:?} were never handed off:\n{log}"
    );
    let (timeouts_after, recoveries_after) = (counters("TCPTimeouts"), recovered());
    let (mut fenced, mut fenced_with_drops) = (0, 0);
    for (client, _, _) in results.iter().filter(|r| !stayed.contains(&r.0)) {
        let line = log
            .lines()
            .find(|l| l.contains(HANDED_OFF) && l.split_whitespace().any(|w| w == client))
            .unwrap_or_else(|| panic!("{client} was never handed off:\n{log}"));
        fenced += usize::from(line.contains("mode=Fenced"));
        fenced_with_drops += usize::from(
            line.contains("mode=Fenced")
                && (line.contains("dropped=[true") || line.contains(", true]")),
        );
    }
    let busy = Busy {
        fenced,
        fenced_with_drops,
        abandoned: proxy.count_log("hand-off abandoned: the session did not settle")
            - abandoned_before,
        timeouts: [0, 1].map(|i| timeouts_after[i] - timeouts_before[i]),
        recoveries: [0, 1].map(|i| recoveries_after[i] - recoveries_before[i]),
    };
    let moved: u64 = results.iter().map(|r| r.1 + r.2).sum();
    eprintln!(
        "{ping_pong} ping-pong and {streams} streaming sessions: {fenced} handed off behind the \
         fence ({fenced_with_drops} of them dropping segments), {} never handed off, {} attempts \
         abandoned, {:.1} MB moved; (client host, server host): retransmission timeouts {:?}, \
         fast retransmits {:?}",
        stayed.len(),
        busy.abandoned,
        moved as f64 / 1e6,
        busy.timeouts,
        busy.recoveries
    );
    busy
}

/// Sessions that are never quiet are handed off all the same, behind the program's fence, and
/// stay byte-exact; the sockmap-only hand-off never finds such a session quiet.
///
/// One-way streams: what a fence dropped is retransmitted at once, the hand-off's duplicate
/// ACKs starting a fast retransmit (the lab loses nothing else, so nothing else starts one).
/// Ping-pong: a sender with fewer than four segments in flight cannot fast-retransmit (three
/// duplicates need three segments beyond the lost one); the proxy sends the dropped message on
/// itself (the program kept a copy), so its sender does not wait for its timeout: without
/// that, every such hand-off costs one timeout. (A stream's drops on the IPv6 lab, whose
/// veths segment what they send, are held segment by segment, appended: what the proxy sends
/// on from them is checked byte for byte with the rest of the stream.)
///
/// `sack`: whether the lab's hosts negotiate SACK. With it the senders learn of the loss from
/// SACK and their probes, and get no duplicate ACKs; without it, each sender whose segments a
/// fence dropped gets them.
pub fn busy_sessions_are_handed_off(
    hosts: &'static Hosts,
    proxy: &Patroxy,
    addr: SocketAddr,
    stats: SocketAddr,
    sack: bool,
) {
    let streams = busy_sessions(hosts, proxy, addr, 0, 4);
    if streams.fenced_with_drops > 0 {
        assert!(
            streams.recoveries.iter().sum::<u64>() > 0,
            "no sender retransmitted fast what a fence dropped:\n{}",
            proxy.log()
        );
    }
    let ping_pong = busy_sessions(hosts, proxy, addr, 8, 0);
    assert!(
        ping_pong.fenced > 0,
        "no ping-pong session needed the fence:\n{}",
        proxy.log()
    );
    // The stats count what the log says: fenced hand-offs, senders nudged (at least one per
    // hand-off that dropped), held segments sent on (at least one per ping-pong hand-off that
    // dropped a message).
    let fenced = (streams.fenced + ping_pong.fenced) as u64;
    assert_eq!(
        metric(stats, "patroxy_tc_sessions_handed_off_fenced_total"),
        fenced
    );
    let forwarded = metric(stats, "patroxy_tc_fence_segments_forwarded_total");
    assert!(
        forwarded >= ping_pong.fenced_with_drops as u64,
        "{forwarded} held segments sent on after {} ping-pong hand-offs that dropped one",
        ping_pong.fenced_with_drops
    );
    let nudged = metric(stats, "patroxy_tc_fence_senders_nudged_total");
    if sack {
        assert_eq!(nudged, 0, "duplicate ACKs sent to SACK senders");
    } else {
        assert!(nudged >= (streams.fenced_with_drops + ping_pong.fenced_with_drops) as u64);
    }
    // An abandoned attempt's drops wait for the timeout (the sockets take them back, one
    // sender each way); so may one whose fence outlasted a sender's 200 ms on a loaded
    // machine, but not most.
    if ping_pong.fenced_with_drops >= 4 {
        let timeouts: u64 = ping_pong.timeouts.iter().sum();
        let unexplained = timeouts.saturating_sub(2 * ping_pong.abandoned as u64);
        assert!(
            unexplained * 2 < ping_pong.fenced_with_drops as u64,
            "{timeouts} timeouts ({} attempts abandoned) after {} hand-offs that dropped a \
             message:\n{}",
            ping_pong.abandoned,
            ping_pong.fenced_with_drops,
            proxy.log()
        );
    }
}

/// A session that cannot settle (its client reads nothing of a stream from the server, so the
/// proxy's socket toward it keeps unsent bytes) has every fenced attempt abandoned. The client's
/// messages that a fence dropped are given back to the proxy's own socket when the fence lifts,
/// so the client does not wait for its retransmission timeout (200 ms, more than the 150 ms
/// fence) to have them acknowledged, and every byte still arrives, in order.
pub fn abandoned_hand_offs_give_back_what_they_dropped(
    hosts: &'static Hosts,
    proxy: &Patroxy,
    addr: SocketAddr,
    stats: SocketAddr,
) {
    /// More than the client's receive buffer, the proxy's send buffer toward it and what the
    /// sockmap queues between them: the stream cannot finish before the client reads.
    const SOURCE: u64 = 64_000_000;
    let timeouts_before = tcp_ext(hosts.ns_client, "TCPTimeouts");
    let stream = connect_failing_stalls(hosts, addr);
    stream.set_nodelay(true).unwrap();
    let mut sent = hello(&stream, 0);
    let command = format!("SOURCE {SOURCE} 0");
    (&stream).write_all(command.as_bytes()).unwrap();
    sent += command.len() as u64;
    // The server reads a command whole: the messages follow once the stream has begun.
    stream.peek(&mut [0u8]).unwrap();
    // The fenced attempts come 250 ms after the splice, then 500 ms and 1 s after each failure
    // (150 ms each): 2.2 s of small messages meet two of them. One every 100 ms, as queries
    // come: too few for the proxy's socket to send back the three duplicate ACKs of a fast
    // retransmit before the client's timeout, had the fence not given them back.
    let mut messages = Vec::new();
    let until = Instant::now() + Duration::from_millis(2200);
    let mut i = 0u64;
    while Instant::now() < until {
        let message = pattern(40 + (i % 60) as usize, 0x91f7 + i);
        (&stream).write_all(&message).unwrap();
        messages.extend_from_slice(&message);
        i += 1;
        thread::sleep(Duration::from_millis(100));
    }
    let timeouts = tcp_ext(hosts.ns_client, "TCPTimeouts") - timeouts_before;
    let log = proxy.log();
    let given_back_by_client = log
        .lines()
        .filter(|l| l.contains("hand-off abandoned: the session did not settle"))
        .filter_map(|l| {
            l.split("given_back=[")
                .nth(1)?
                .split(',')
                .next()?
                .parse()
                .ok()
        })
        .filter(|&bytes: &u64| bytes > 0)
        .count();
    eprintln!(
        "{i} messages while the client read nothing: {given_back_by_client} abandoned attempts \
         gave messages back, {timeouts} retransmission timeouts on the client host"
    );
    assert!(
        given_back_by_client > 0,
        "no abandoned attempt gave back a client's message:\n{log}"
    );
    assert!(metric(stats, "patroxy_tc_fence_segments_given_back_total") > 0);
    // Without the give-back, each of those attempts costs the client one timeout at least.
    assert!(
        (timeouts as usize) < given_back_by_client,
        "{timeouts} retransmission timeouts on the client host after {given_back_by_client} \
         abandoned attempts gave a message back:\n{log}"
    );
    // Every byte, in order: the stream, then the server's echo of the messages (it reads them
    // once the stream is written).
    read_source(&stream, 0, SOURCE);
    let mut echoed = vec![0u8; messages.len()];
    (&stream).read_exact(&mut echoed).unwrap();
    assert!(echoed == messages, "the messages' echo differs");
    stream.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    (&stream).read_to_end(&mut rest).unwrap();
    assert_eq!(rest, b"bye");
    let line = wait_line(proxy, &client_field(&stream), "session closed").expect("closed line");
    assert_eq!(
        field(&line, "bytes_in"),
        Some(sent + messages.len() as u64),
        "{line}"
    );
}

/// Sessions that cannot settle (each client reads nothing of a 16 MB stream from the server
/// while it sends a small message every 100 ms) have a fenced attempt every 0.25-1 s, each
/// holding its fence up to 150 ms; `upgrade` runs meanwhile, each time (four) landing while
/// some of them is behind its fence. The session must be passed on between attempts, never
/// in the middle of one, and go on in the successor: every byte of the stream and of the
/// messages' echo arrives, in order, and the closing line counts them.
pub fn upgrades_during_fenced_attempts_lose_nothing(
    hosts: &'static Hosts,
    proxy: &Patroxy,
    addr: SocketAddr,
    mut upgrade: impl FnMut(),
) {
    const SESSIONS: usize = 6;
    const SOURCE: u64 = 16_000_000;
    let clients: Vec<_> = (0..SESSIONS)
        .map(|i| {
            let stream = connect_failing_stalls(hosts, addr);
            stream.set_nodelay(true).unwrap();
            let mut sent = hello(&stream, i);
            let command = format!("SOURCE {SOURCE} {i}");
            (&stream).write_all(command.as_bytes()).unwrap();
            sent += command.len() as u64;
            stream.peek(&mut [0u8]).unwrap();
            // Their attempts fall at different moments.
            thread::sleep(Duration::from_millis(40));
            (stream, sent)
        })
        .collect();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = clients
        .iter()
        .enumerate()
        .map(|(i, (stream, _))| {
            let stream = stream.try_clone().unwrap();
            let done = done.clone();
            thread::spawn(move || {
                let mut messages = Vec::new();
                let mut n = 0u64;
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    let message = pattern(40 + (n % 60) as usize, (i as u64) << 32 | n);
                    (&stream).write_all(&message).unwrap();
                    messages.extend_from_slice(&message);
                    n += 1;
                    thread::sleep(Duration::from_millis(100));
                }
                messages
            })
        })
        .collect();
    for _ in 0..4 {
        thread::sleep(Duration::from_millis(250));
        upgrade();
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let abandoned = proxy.count_log("hand-off abandoned");
    for (i, ((stream, sent), writer)) in clients.into_iter().zip(writers).enumerate() {
        let messages = writer.join().unwrap();
        read_source(&stream, i, SOURCE);
        let mut echoed = vec![0u8; messages.len()];
        (&stream).read_exact(&mut echoed).unwrap();
        assert!(
            echoed == messages,
            "session {i}: the messages' echo differs"
        );
        stream.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        (&stream).read_to_end(&mut rest).unwrap();
        assert_eq!(rest, b"bye", "session {i}");
        let line = wait_line(proxy, &client_field(&stream), "session closed").expect("closed line");
        assert!(line.contains("(taken over)"), "session {i}: {line}");
        assert_eq!(
            field(&line, "bytes_in"),
            Some(sent + messages.len() as u64),
            "session {i}: {line}"
        );
    }
    eprintln!(
        "{SESSIONS} unsettled sessions across 4 upgrades: {abandoned} fenced attempts abandoned"
    );
    assert!(
        abandoned >= SESSIONS,
        "too few fenced attempts for the upgrades to meet ({abandoned}):\n{}",
        proxy.log()
    );
}
