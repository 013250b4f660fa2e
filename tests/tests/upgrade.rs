//! Restarts that keep every session. Upgrades (`patroxy upgrade`, SIGUSR2): the daemon hands
//! its listeners and spliced sessions to a successor started from the same binary; long
//! sessions streaming through ten upgrades stay byte-exact, and a client connecting in a loop
//! meanwhile is never refused. A crash under systemd: the fd store (a stand-in for systemd's
//! side) gives a restarted daemon its listeners and sessions back. Real processes on loopback.
#[macro_use]
mod common;

use std::{
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use common::{Path_, local, one_listener};
use patroxy_tests::{
    backend::{Backend, Behaviour, Fnv, pattern},
    config::{ListenerConfig, OnMarkedDown, ProxyConfig, RuntimeConfig, ServerConfig, StatsConfig},
    daemon::Patroxy,
    ports::{free_tcp_port, wait_for_listen},
    postgres::{Postgres, PostgresOptions},
    process::patroxy_bin,
    service_manager::ServiceManager,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const UPGRADES: usize = 10;

/// The daemon that runs at the end of the test is a successor, not the test's child: stopped
/// by pid (read from its stats page) when the test ends, however it ends.
struct Successor(String);

impl Drop for Successor {
    fn drop(&mut self) {
        if let Some(pid) = stats_pid(&self.0) {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while std::path::Path::new(&format!("/proc/{pid}")).exists()
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn stats_pid(url: &str) -> Option<u32> {
    let addr = url.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    use std::io::{Read as _, Write as _};
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET /;json HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    let json = &body[body.find("\r\n\r\n")? + 4..];
    serde_json::from_str::<serde_json::Value>(json).ok()?["pid"]
        .as_u64()
        .map(|p| p as u32)
}

/// A session streaming `chunk`-sized pattern writes through the proxy to an echo backend and
/// checking every byte it gets back, until `stop`; returns the bytes echoed.
async fn stream_session(
    proxy: std::net::SocketAddr,
    seed: u64,
    stop: Arc<AtomicBool>,
) -> Result<u64, String> {
    let stream = TcpStream::connect(proxy)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut rd, mut wr) = stream.into_split();
    let data = pattern(1 << 20, seed);
    let writer = {
        let data = data.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut sent = 0u64;
            let mut at = 0;
            while !stop.load(Ordering::Relaxed) {
                let chunk = &data[at..at + 16 * 1024];
                wr.write_all(chunk)
                    .await
                    .map_err(|e| format!("write: {e}"))?;
                sent += chunk.len() as u64;
                at = (at + 16 * 1024) % data.len();
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            wr.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
            Ok::<u64, String>(sent)
        })
    };
    let mut got = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = rd.read(&mut buf).await.map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            break;
        }
        for (i, b) in buf[..n].iter().enumerate() {
            let expected = data[((got + i as u64) % data.len() as u64) as usize];
            if *b != expected {
                return Err(format!("byte {} differs", got + i as u64));
            }
        }
        got += n as u64;
    }
    let sent = writer.await.map_err(|e| e.to_string())??;
    if sent != got {
        return Err(format!("sent {sent} bytes, got {got} back"));
    }
    Ok(got)
}

/// One short session: connect, echo 5 bytes, close. Returns how long it took.
async fn short_session(proxy: std::net::SocketAddr) -> Result<Duration, String> {
    let start = Instant::now();
    let mut s = TcpStream::connect(proxy)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    s.write_all(b"hello")
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut got = [0u8; 5];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut got))
        .await
        .map_err(|_| "no echo within 10s".to_string())?
        .map_err(|e| format!("read: {e}"))?;
    if &got != b"hello" {
        return Err("wrong echo".into());
    }
    Ok(start.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_upgrades_keep_sessions_and_refuse_no_client() {
    if !Path_::Sockmap.available("ten_upgrades_keep_sessions_and_refuse_no_client") {
        return;
    }
    let backend = Backend::start(Behaviour::Echo).await;
    let pin = Patroxy::unique_pin_path("upgrade");
    let stats_bind = local(free_tcp_port());
    let config: ProxyConfig =
        one_listener(Path_::Sockmap, &pin, backend.addr).stats(StatsConfig::new(stats_bind));
    let first = Patroxy::start("patroxy-upgrade", &config);
    let url = format!("http://{stats_bind}");
    let _successor = Successor(url.clone());
    let proxy = config.bind();

    let stop = Arc::new(AtomicBool::new(false));
    let streams: Vec<_> = (0..8)
        .map(|i| tokio::spawn(stream_session(proxy, i, stop.clone())))
        .collect();
    let shorts = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let (mut took, mut failed) = (Vec::new(), Vec::new());
            while !stop.load(Ordering::Relaxed) {
                match short_session(proxy).await {
                    Ok(t) => took.push(t),
                    Err(e) => failed.push(e),
                }
            }
            (took, failed)
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut pids = vec![stats_pid(&url).expect("the first daemon's pid")];
    let mut longest_upgrade = Duration::ZERO;
    for i in 0..UPGRADES {
        let started = Instant::now();
        let out = tokio::task::spawn_blocking({
            let url = url.clone();
            move || {
                Command::new(patroxy_bin())
                    .args(["upgrade", "--url", &url, "--timeout", "20s"])
                    .output()
                    .unwrap()
            }
        })
        .await
        .unwrap();
        assert!(
            out.status.success(),
            "upgrade {i}: {}{}\nfirst daemon's log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            first.log()
        );
        longest_upgrade = longest_upgrade.max(started.elapsed());
        pids.push(stats_pid(&url).expect("the successor's pid"));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for (i, s) in streams.into_iter().enumerate() {
        let got = tokio::time::timeout(Duration::from_secs(30), s)
            .await
            .expect("stream ends")
            .unwrap();
        total += got.unwrap_or_else(|e| panic!("stream {i}: {e}\nlog:\n{}", first.log()));
    }
    let (mut took, failed) = shorts.await.unwrap();
    took.sort();
    let ok = took.len();
    let distinct: std::collections::HashSet<_> = pids.iter().collect();
    // The gap a client sees: connect-to-echo times of the short sessions, which ran
    // back to back through all the upgrades.
    eprintln!(
        "{UPGRADES} upgrades (pids {pids:?}): 8 streams echoed {total} bytes byte-exact; \
         {ok} short sessions (connect + echo) median {:?}, p99 {:?}, slowest {:?}; longest \
         `patroxy upgrade` {longest_upgrade:?}",
        took.get(ok / 2),
        took.get(ok * 99 / 100),
        took.last()
    );
    assert_eq!(distinct.len(), UPGRADES + 1, "each upgrade a new process");
    // The successors write to the first daemon's log file (they inherit its stderr).
    let log = first.log();
    let taken_over: Vec<u64> = log
        .lines()
        .filter(|l| l.contains("upgrade: took over"))
        .filter_map(|l| l.split("sessions=").nth(1)?.split(' ').next()?.parse().ok())
        .collect();
    assert_eq!(taken_over.len(), UPGRADES, "log:\n{log}");
    assert!(
        taken_over.iter().all(|&n| n >= 8),
        "each successor took the 8 streams over: {taken_over:?}"
    );
    assert!(!log.contains("on the fallback path"), "log:\n{log}");
    assert!(
        longest_upgrade < Duration::from_secs(5),
        "the old process is gone well within its grace"
    );
    assert!(failed.is_empty(), "short sessions failed: {failed:?}");
    assert!(ok > 0);
}

/// Echoes `msg` on `stream` and checks it comes back within 5 s.
async fn echo(stream: &mut TcpStream, msg: &[u8]) -> Result<(), String> {
    stream
        .write_all(msg)
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut got = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut got))
        .await
        .map_err(|_| "no echo within 5s".to_string())?
        .map_err(|e| format!("read: {e}"))?;
    if got != msg {
        return Err("echo differs".into());
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_with_the_fd_store_keeps_established_sessions() {
    if !Path_::Sockmap.available("sigkill_with_the_fd_store_keeps_established_sessions") {
        return;
    }
    let backend = Backend::start(Behaviour::Echo).await;
    let pin = Patroxy::unique_pin_path("fdstore");
    let config = one_listener(Path_::Sockmap, &pin, backend.addr);
    let config_path =
        std::env::temp_dir().join(format!("patroxy-fdstore-{}.toml", std::process::id()));
    std::fs::write(&config_path, config.to_toml()).unwrap();
    let manager = ServiceManager::start("fdstore");
    let mut first = manager.launch("patroxy-fdstore-1", &config_path);
    assert!(
        wait_for_listen(config.bind(), Duration::from_secs(10)),
        "log:\n{}",
        first.log()
    );
    let mut sessions = Vec::new();
    for i in 0..4u8 {
        let mut s = TcpStream::connect(config.bind()).await.unwrap();
        echo(&mut s, &[i; 1000]).await.unwrap();
        sessions.push(s);
    }
    let session_names = |names: &[String]| names.iter().filter(|n| n.starts_with("s.")).count();
    assert!(
        manager.wait_for(Duration::from_secs(5), |n| session_names(n) == 8
            && n.iter().any(|n| n.starts_with("l."))),
        "stored: {:?}\nlog:\n{}",
        manager.names(),
        first.log()
    );

    first.signal(libc::SIGKILL).unwrap();
    first.wait().unwrap();
    // No daemon at all now: the verdict program, attached to the pinned SOCKS map, forwards.
    for (i, s) in sessions.iter_mut().enumerate() {
        echo(s, &[0x40 + i as u8; 5000])
            .await
            .unwrap_or_else(|e| panic!("session {i} with no daemon: {e}"));
    }

    let second = manager.launch("patroxy-fdstore-2", &config_path);
    let _second = second;
    let log = || _second.log();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !log().contains("sessions from the fd store resumed") && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        log().contains("resumed=4 of=4"),
        "the restarted daemon did not resume 4 sessions:\n{}",
        log()
    );
    for (i, s) in sessions.iter_mut().enumerate() {
        echo(s, &[0x50 + i as u8; 100_000])
            .await
            .unwrap_or_else(|e| panic!("session {i} after the restart: {e}\n{}", log()));
    }
    // The restarted daemon watches them: a client's FIN reaches the backend, whose FIN comes
    // back, and their sockets leave the fd store.
    for (i, mut s) in sessions.into_iter().enumerate() {
        s.shutdown().await.unwrap();
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
            .await
            .unwrap_or_else(|_| panic!("session {i}: no FIN back\n{}", log()))
            .unwrap();
        assert!(rest.is_empty());
    }
    assert!(
        manager.wait_for(Duration::from_secs(5), |n| session_names(n) == 0),
        "still stored: {:?}",
        manager.names()
    );
    let mut fresh = TcpStream::connect(config.bind()).await.unwrap();
    echo(&mut fresh, b"new client on the restored listener")
        .await
        .unwrap();
    let _ = std::fs::remove_file(&config_path);
}

/// A crash after a structural reload: the restarted daemon goes on from the ids the reload's
/// successor stored, not from a fresh numbering, so a resumed session's kernel entry (which
/// names its backend by id) still means its server, and `patroxy sessions --config` names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_a_structural_reload_keeps_the_server_ids() {
    if !Path_::Sockmap.available("a_crash_after_a_structural_reload_keeps_the_server_ids") {
        return;
    }
    let (backend_a, backend_b) = (
        Backend::start(Behaviour::Echo).await,
        Backend::start(Behaviour::Echo).await,
    );
    let pin = Patroxy::unique_pin_path("fdstore-ids");
    let stats = local(free_tcp_port());
    let (write, read) = (local(free_tcp_port()), local(free_tcp_port()));
    let base = one_listener(Path_::Sockmap, &pin, backend_a.addr).stats(StatsConfig::new(stats));
    // "a" (id 1) behind the write listener, "b" (id 2) behind the read listener.
    let mut both = base
        .clone()
        .server(ServerConfig::new("b", backend_b.addr))
        .listener(ListenerConfig::new("postgres_read", read, ["b"]));
    both.listeners[0].bind = write;
    let mut only_read = both.clone();
    only_read.listeners.remove(0);
    only_read.servers.retain(|s| s.name == "b");
    let config_path =
        std::env::temp_dir().join(format!("patroxy-fdstore-ids-{}.toml", std::process::id()));
    std::fs::write(&config_path, both.to_toml()).unwrap();
    let manager = ServiceManager::start("fdstore-ids");
    let first = manager.launch("patroxy-fdstore-ids-1", &config_path);
    assert!(
        wait_for_listen(read, Duration::from_secs(10)),
        "log:\n{}",
        first.log()
    );
    let url = format!("http://{stats}");
    let first_pid = stats_pid(&url).expect("the first daemon's pid");

    // Removing the write listener is structural: a successor takes over, "b" keeps id 2.
    std::fs::write(&config_path, only_read.to_toml()).unwrap();
    let reload = Command::new(patroxy_bin())
        .args(["reload", "--config"])
        .arg(&config_path)
        .output()
        .unwrap();
    assert!(
        reload.status.success(),
        "reload: {}{}\nlog:\n{}",
        String::from_utf8_lossy(&reload.stdout),
        String::from_utf8_lossy(&reload.stderr),
        first.log()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let successor = loop {
        match stats_pid(&url) {
            Some(pid) if pid != first_pid => break pid,
            _ if Instant::now() > deadline => panic!("no successor\n{}", first.log()),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let mut session = TcpStream::connect(read).await.unwrap();
    echo(&mut session, b"to b, id 2").await.unwrap();
    let session_names = |names: &[String]| names.iter().filter(|n| n.starts_with("s.")).count();
    assert!(
        manager.wait_for(Duration::from_secs(5), |n| session_names(n) == 2
            && n.iter().any(|n| n == "ids")),
        "stored: {:?}\nlog:\n{}",
        manager.names(),
        first.log()
    );

    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(successor as libc::pid_t, libc::SIGKILL) };
    while std::path::Path::new(&format!("/proc/{successor}")).exists() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let restarted = manager.launch("patroxy-fdstore-ids-2", &config_path);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !restarted
        .log()
        .contains("sessions from the fd store resumed")
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        restarted.log().contains("resumed=1 of=1"),
        "{}",
        restarted.log()
    );
    echo(&mut session, b"still to b").await.unwrap();
    let listed = Command::new(patroxy_bin())
        .args(["sessions", "--json", "--pin-path"])
        .arg(&pin)
        .arg("--config")
        .arg(&config_path)
        .output()
        .unwrap();
    let rows: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}{}",
            String::from_utf8_lossy(&listed.stdout),
            String::from_utf8_lossy(&listed.stderr)
        )
    });
    assert_eq!(rows.as_array().map(Vec::len), Some(1), "{rows}");
    assert_eq!(
        rows[0]["backend_id"],
        2,
        "the resumed session's id: {rows}\n{}",
        restarted.log()
    );
    assert_eq!(rows[0]["server"], "b", "{rows}\n{}", restarted.log());
    drop(restarted);
    let _ = std::fs::remove_file(&config_path);
}

/// Runs `patroxy upgrade` against the stats server at `url`; panics with its output on failure.
fn upgrade(url: &str) -> Duration {
    let started = Instant::now();
    let out = Command::new(patroxy_bin())
        .args(["upgrade", "--url", url, "--timeout", "20s"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "patroxy upgrade: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    started.elapsed()
}

/// `COPY (...) TO STDOUT` of about 220 MB through `port`, into a file; returns its FNV hash
/// and length.
fn copy_out(pg: &Postgres, port: u16, file: &std::path::Path) -> (u64, u64) {
    let out = std::fs::File::create(file).unwrap();
    let status = pg
        .client("psql", port)
        .args(["-X", "-q", "-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-U", "postgres", "-d", "postgres", "-c"])
        .arg("COPY (SELECT g, md5(g::text) FROM generate_series(1, 5000000) g) TO STDOUT")
        .stdout(out)
        .status()
        .unwrap();
    assert!(status.success(), "COPY through port {port}");
    let data = std::fs::read(file).unwrap();
    let _ = std::fs::remove_file(file);
    (Fnv::of(&data), data.len() as u64)
}

#[test]
fn ten_upgrades_under_pgbench_and_a_200mb_copy() {
    if !Path_::Sockmap.available("ten_upgrades_under_pgbench_and_a_200mb_copy") {
        return;
    }
    let pg = Postgres::start(PostgresOptions::default().max_connections(50));
    let pin = Patroxy::unique_pin_path("upgrade-pg");
    let stats_bind = local(free_tcp_port());
    let config = one_listener(Path_::Sockmap, &pin, pg.addr()).stats(StatsConfig::new(stats_bind));
    let first = Patroxy::start("patroxy-upgrade-pg", &config);
    let url = format!("http://{stats_bind}");
    let _successor = Successor(url.clone());
    let port = config.bind().port();
    pg.pgbench_init(pg.port(), 1);
    let tmp = std::env::temp_dir();
    let direct = copy_out(
        &pg,
        pg.port(),
        &tmp.join(format!("copy-direct-{}", std::process::id())),
    );

    let (steady, reconnecting, copied, upgrades) = std::thread::scope(|s| {
        let steady = s.spawn(|| pg.try_pgbench(port, &["-c", "8", "-j", "2", "-T", "15"]));
        let reconnecting =
            s.spawn(|| pg.try_pgbench(port, &["-C", "-S", "-c", "4", "-j", "2", "-T", "15"]));
        let copied = s.spawn(|| {
            copy_out(
                &pg,
                port,
                &tmp.join(format!("copy-proxied-{}", std::process::id())),
            )
        });
        std::thread::sleep(Duration::from_millis(500));
        let upgrades: Vec<Duration> = (0..UPGRADES)
            .map(|_| {
                let took = upgrade(&url);
                std::thread::sleep(Duration::from_millis(700));
                took
            })
            .collect();
        (
            steady.join().unwrap(),
            reconnecting.join().unwrap(),
            copied.join().unwrap(),
            upgrades,
        )
    });
    let log = first.log();
    let steady = steady.unwrap_or_else(|e| panic!("pgbench -c 8: {e}\nlog:\n{log}"));
    let reconnecting = reconnecting.unwrap_or_else(|e| panic!("pgbench -C -c 4: {e}\nlog:\n{log}"));
    eprintln!(
        "{UPGRADES} upgrades under pgbench: -c 8 {steady:.0} TPS, -C -S -c 4 {reconnecting:.0} TPS, \
         0 failed (pgbench exits non-zero otherwise); COPY {} bytes; upgrades took {upgrades:?}",
        copied.1
    );
    assert_eq!(
        copied, direct,
        "the COPY through the upgrades is byte-exact"
    );
    assert_eq!(
        log.matches("upgrade: took over").count(),
        UPGRADES,
        "log:\n{log}"
    );
}

/// The successor takes the runtime socket over (its file stays after the old daemon exits)
/// and the reload machinery: `patroxy ctl reload` and SIGHUP reach the successor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_keep_the_runtime_socket_and_reload() {
    if !Path_::Sockmap.available("upgrades_keep_the_runtime_socket_and_reload") {
        return;
    }
    let backend = Backend::start(Behaviour::Echo).await;
    let pin = Patroxy::unique_pin_path("upgrade-ctl");
    let stats_bind = local(free_tcp_port());
    let dir = std::env::temp_dir().join(format!("patroxy-upgrade-ctl-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("patroxy.sock");
    let mut config: ProxyConfig =
        one_listener(Path_::Sockmap, &pin, backend.addr).stats(StatsConfig::new(stats_bind));
    config.runtime = Some(RuntimeConfig::new(&socket));
    let first = Patroxy::start("patroxy-upgrade-ctl", &config);
    let url = format!("http://{stats_bind}");
    let _successor = Successor(url.clone());
    let ctl = |args: &[&str]| {
        let out = Command::new(patroxy_bin())
            .arg("ctl")
            .arg("--socket")
            .arg(&socket)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ctl {args:?}: {}\nlog:\n{}",
            String::from_utf8_lossy(&out.stderr),
            first.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    ctl(&["show", "servers"]);
    for _ in 0..2 {
        let old = stats_pid(&url).expect("the daemon's pid");
        upgrade(&url);
        let new = stats_pid(&url).expect("the successor's pid");
        assert_ne!(old, new);
        // `patroxy upgrade` returns once the old daemon is gone: the file is the successor's.
        assert!(socket.exists(), "log:\n{}", first.log());
        ctl(&["show", "servers"]);
        assert!(ctl(&["reload"]).contains("nothing changed"));
        let hup = Command::new("kill")
            .args(["-HUP", &new.to_string()])
            .status()
            .unwrap();
        assert!(hup.success());
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while first.log().matches("SIGHUP received").count() < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        first.log().matches("SIGHUP received").count(),
        2,
        "log:\n{}",
        first.log()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A structural reload that removes a server whose `on_marked_down` is "none" (HAProxy's
/// default): its session is not reset. It runs on in the old process, which exits as soon as
/// that session ends, long before its drain grace; the sessions of the server that stays go
/// to the successor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_servers_sessions_run_on_in_the_old_process_with_on_marked_down_none() {
    if !Path_::Sockmap.available("a_removed_servers_sessions_run_on_in_the_old_process") {
        return;
    }
    const GRACE: Duration = Duration::from_secs(60);
    let (backend_a, backend_b) = (
        Backend::start(Behaviour::Echo).await,
        Backend::start(Behaviour::Echo).await,
    );
    let pin = Patroxy::unique_pin_path("removed-none");
    let stats = local(free_tcp_port());
    let read = local(free_tcp_port());
    let mut both = one_listener(Path_::Sockmap, &pin, backend_a.addr)
        .stats(StatsConfig::new(stats))
        .server(ServerConfig::new("b", backend_b.addr))
        .listener(ListenerConfig::new("postgres_read", read, ["b"]));
    both.default_server.on_marked_down = Some(OnMarkedDown::Nothing);
    let write = both.bind();
    let mut without_b = both.clone();
    without_b.listeners.retain(|l| l.name != "postgres_read");
    without_b.servers.retain(|s| s.name != "b");

    let mut proxy = Patroxy::start_with_drain_grace("removed-none", &both, GRACE);
    let url = format!("http://{stats}");
    let old_pid = stats_pid(&url).expect("the daemon's pid");
    let mut on_a = TcpStream::connect(write).await.unwrap();
    echo(&mut on_a, b"to a").await.unwrap();
    let mut on_b = TcpStream::connect(read).await.unwrap();
    echo(&mut on_b, b"to b").await.unwrap();

    std::fs::write(&proxy.config_path, without_b.to_toml()).unwrap();
    let reload = Command::new(patroxy_bin())
        .args(["reload", "--config"])
        .arg(&proxy.config_path)
        .output()
        .unwrap();
    assert!(
        reload.status.success() && String::from_utf8_lossy(&reload.stdout).contains("new process"),
        "reload: {}{}\nlog:\n{}",
        String::from_utf8_lossy(&reload.stdout),
        String::from_utf8_lossy(&reload.stderr),
        proxy.log()
    );
    let _successor = Successor(url.clone());
    let deadline = Instant::now() + Duration::from_secs(10);
    while stats_pid(&url) == Some(old_pid) {
        assert!(Instant::now() < deadline, "no successor\n{}", proxy.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Both sessions still carry bytes: a's in the successor, b's in the old process, which
    // stays for it.
    for round in 0..3 {
        echo(&mut on_a, b"still a").await.unwrap();
        echo(&mut on_b, b"still b").await.unwrap_or_else(|e| {
            panic!(
                "round {round}: b's session after the reload: {e}\n{}",
                proxy.log()
            )
        });
        assert!(
            proxy.child.try_wait().unwrap().is_none(),
            "the old process left while b's session runs\n{}",
            proxy.log()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(
        !proxy.log().contains("resetting its sessions"),
        "nothing was reset\n{}",
        proxy.log()
    );

    // b's session ends: the old process exits, well within its grace.
    drop(on_b);
    let exited = proxy.child.wait_timeout(Duration::from_secs(10)).unwrap();
    assert!(
        exited.is_some(),
        "the old process still runs after its last session ended\n{}",
        proxy.log()
    );
    echo(&mut on_a, b"a after the old process left")
        .await
        .unwrap();
}
