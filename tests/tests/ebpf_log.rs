//! The verdict program's debug log (aya-log, `bpf_log`): its lines reach patroxy's stderr when
//! it is on, nothing is logged (or even counted) by default, `PATROXY_BPF_LOG` overrides the
//! file, and the in-kernel token bucket bounds how many lines a busy session can print. The
//! sockmap path only, so every test needs root.
mod common;

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use common::{Path_, echo_once, one_listener, wait_probe_closed};
use patroxy_tests::{
    backend::{Backend, Behaviour},
    config::ProxyConfig,
    daemon::{Patroxy, bpftool_dump},
    process::require_root,
};
use tokio::net::TcpStream;

/// How an eBPF line starts in patroxy's log: tracing's fmt output of target `patroxy::ebpf`.
const EBPF: &str = " patroxy::ebpf: ";

/// The one-listener test config on the sockmap path, with `bpf_log` on at `rate` lines per
/// second per CPU.
fn log_config(pin: &Path, backend: SocketAddr, log_rate: Option<u32>) -> ProxyConfig {
    let mut config = one_listener(Path_::Sockmap, pin, backend);
    if let Some(rate) = log_rate {
        config.global.bpf_log = Some(true);
        config.global.bpf_log_rate = Some(rate);
    }
    config
}

/// Cookies of the open session's (client, backend) sockets, from the pinned SESSIONS map.
fn session_cookies(proxy: &Patroxy) -> (u64, u64) {
    let sessions = bpftool_dump(&proxy.pin_path, "SESSIONS");
    let client = sessions
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["value"]["side"] == 0)
        .unwrap_or_else(|| panic!("no client socket in SESSIONS: {sessions}"));
    (
        client["key"].as_u64().unwrap(),
        client["value"]["peer"].as_u64().unwrap(),
    )
}

/// (printed, suppressed, CPUs that ran the verdict program) over the per-CPU token buckets in
/// LOG_LIMIT.
fn log_limit(proxy: &Patroxy) -> (u64, u64, u64) {
    let dump = bpftool_dump(&proxy.pin_path, "LOG_LIMIT");
    let values = dump[0]["values"]
        .as_array()
        .unwrap_or_else(|| panic!("LOG_LIMIT is per CPU: {dump}"));
    let field = |v: &serde_json::Value, name: &str| v["value"][name].as_u64().unwrap();
    let sum = |name: &str| -> u64 { values.iter().map(|v| field(v, name)).sum() };
    // A CPU whose bucket was never used has both counters at 0 (a used one printed its
    // first line from a full bucket).
    let used = values
        .iter()
        .filter(|v| field(v, "printed") + field(v, "suppressed") > 0)
        .count();
    (sum("printed"), sum("suppressed"), used as u64)
}

/// Splices one echo session, sends `n` bytes in one write and returns the session's cookies.
async fn echo_session(proxy: &Patroxy, bind: SocketAddr, n: usize) -> (TcpStream, (u64, u64)) {
    // The readiness probe's session must be out of SESSIONS (and done logging).
    wait_probe_closed(proxy);
    let mut s = TcpStream::connect(bind).await.unwrap();
    s.set_nodelay(true).unwrap();
    // The first echo means both sockets are in SOCKS and SESSIONS.
    assert!(echo_once(&mut s, b"hello", Duration::from_secs(3)).await);
    let cookies = session_cookies(proxy);
    assert!(echo_once(&mut s, &vec![b'x'; n], Duration::from_secs(3)).await);
    (s, cookies)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redirects_are_logged_with_their_byte_counts() {
    if !require_root("redirects_are_logged_with_their_byte_counts") {
        return;
    }
    let backend = Backend::start(Behaviour::Echo).await;
    let pin = Patroxy::unique_pin_path("bpflog");
    let config = log_config(&pin, backend.addr, Some(1000));
    let proxy = Patroxy::start("bpflog", &config);
    let (s, (client, server)) = echo_session(&proxy, config.bind(), 1234).await;
    for line in [
        format!("{EBPF}redirect 1234 bytes from cookie {client} to {server}"),
        format!("{EBPF}redirect 1234 bytes from cookie {server} to {client}"),
    ] {
        assert!(
            proxy.wait_for_log(&line, Duration::from_secs(3)),
            "no `{line}` in:\n{}",
            proxy.log()
        );
    }
    drop(s);
    let fin = format!("{EBPF}drop bare FIN skb on cookie {client}");
    assert!(
        proxy.wait_for_log(&fin, Duration::from_secs(3)),
        "no `{fin}`"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nothing_is_logged_by_default() {
    if !require_root("nothing_is_logged_by_default") {
        return;
    }
    let backend = Backend::start(Behaviour::Echo).await;
    let pin = Patroxy::unique_pin_path("bpflogoff");
    let config = log_config(&pin, backend.addr, None);
    let proxy = Patroxy::start("bpflogoff", &config);
    let (s, _) = echo_session(&proxy, config.bind(), 1234).await;
    // The readiness probe's session logged its "session closed" line too: wait for this one's.
    let closed = proxy.count_log("session closed");
    drop(s);
    assert!(proxy.wait_for_log_count("session closed", closed + 1, Duration::from_secs(5)));
    // Give a (wrongly) running logger time to print what the FINs would have produced.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = proxy.log();
    assert_eq!(proxy.count_log(EBPF), 0, "eBPF lines while off:\n{log}");
    assert!(!log.contains("eBPF debug log on"), "{log}");
    // Off, the limiter never ran either: the verifier removed the logging code.
    let (printed, suppressed, _) = log_limit(&proxy);
    assert_eq!((printed, suppressed), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn env_var_overrides_the_file_both_ways() {
    if !require_root("env_var_overrides_the_file_both_ways") {
        return;
    }
    let backend = Backend::start(Behaviour::Echo).await;
    for (file, env, want_lines) in [(None, "1", true), (Some(100), "off", false)] {
        let pin = Patroxy::unique_pin_path("bpflogenv");
        let config = log_config(&pin, backend.addr, file);
        let proxy = Patroxy::start_with("bpflogenv", &config, |cmd| {
            cmd.env("PATROXY_BPF_LOG", env);
        });
        let (s, (client, server)) = echo_session(&proxy, config.bind(), 777).await;
        drop(s);
        let line = format!("{EBPF}redirect 777 bytes from cookie {client} to {server}");
        assert_eq!(
            proxy.wait_for_log(&line, Duration::from_secs(if want_lines { 3 } else { 1 })),
            want_lines,
            "PATROXY_BPF_LOG={env}, bpf_log in the file: {}; log:\n{}",
            file.is_some(),
            proxy.log()
        );
        if !want_lines {
            assert_eq!(proxy.count_log(EBPF), 0);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rate_limit_bounds_printed_lines() {
    if !require_root("rate_limit_bounds_printed_lines") {
        return;
    }
    const MESSAGES: usize = 5000;
    const RATE: u64 = 10;
    let backend = Backend::start(Behaviour::Echo).await;
    let pin = Patroxy::unique_pin_path("bpflograte");
    let config = log_config(&pin, backend.addr, Some(RATE as u32));
    // Before the start: every line counted below (the readiness probe's too) comes after.
    let t0 = Instant::now();
    let proxy = Patroxy::start("bpflograte", &config);
    wait_probe_closed(&proxy);
    let t_echo = Instant::now();
    let mut s = TcpStream::connect(config.bind()).await.unwrap();
    s.set_nodelay(true).unwrap();
    // One small message at a time, each echoed before the next: a separate skb (and verdict
    // run) per message each way.
    for i in 0..MESSAGES {
        let msg = format!("msg{i:06}");
        assert!(
            echo_once(&mut s, msg.as_bytes(), Duration::from_secs(3)).await,
            "message {i} not echoed"
        );
    }
    let echoed = t_echo.elapsed().as_secs_f64();
    // The readiness probe's session logged its "session closed" line too: wait for this one's.
    let closed = proxy.count_log("session closed");
    drop(s);
    assert!(
        proxy.wait_for_log_count("session closed", closed + 1, Duration::from_secs(10)),
        "the session never closed:\n{}",
        proxy.log()
    );
    // Every line the kernel let through reaches the log (the ring buffer is far from full), a
    // moment after the kernel counted it: wait until the count and the log agree, and stay so
    // over two reads in a row.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut previous = None;
    let (printed, suppressed, cpus, lines) = loop {
        let (printed, suppressed, cpus) = log_limit(&proxy);
        let now = (printed, suppressed, cpus, proxy.count_log(EBPF) as u64);
        if (printed == now.3 && previous == Some(now)) || Instant::now() > deadline {
            break now;
        }
        previous = Some(now);
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let elapsed = t0.elapsed().as_secs_f64();
    // Per CPU that ran the program: a full bucket (one second's worth) at the start, then RATE
    // per second.
    let bound = (cpus as f64 * RATE as f64 * (1.0 + elapsed)).ceil() as u64;
    eprintln!(
        "{MESSAGES} messages in {echoed:.2}s on {cpus} CPUs: {lines} lines printed, \
         {suppressed} counted, bound {bound}"
    );
    assert_eq!(
        lines, printed,
        "every line the kernel allowed is in the log"
    );
    assert!(lines >= RATE, "the first burst is printed: {lines}");
    assert!(lines <= bound, "{lines} lines > bound {bound}");
    // The bucket, not the traffic, set the number of lines: at least 3 in 4 verdict runs were
    // only counted. (The bound above grows with the time the messages took, a fixed share of
    // MESSAGES would not hold on a slow machine: 2 CPUs reach a quarter of the runs only if
    // the 5000 echoes take over 2 minutes.)
    assert!(
        printed * 4 < printed + suppressed,
        "{printed} lines printed of {} verdict runs",
        printed + suppressed
    );
    // Each message was a verdict run each way; all but the printed ones were counted.
    assert!(
        printed + suppressed >= 2 * MESSAGES as u64,
        "{printed} + {suppressed}"
    );
}
