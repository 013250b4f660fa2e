//! The stats server can never take down the data path nor hold up shutdown: a flood of stalled
//! stats clients under a low fd limit leaves pgbench through the proxy without a failed
//! transaction and its server UP, a half-sent request is closed after the header-read timeout,
//! and SIGTERM does not wait for a stalled stats client.
use std::{
    net::SocketAddr,
    os::unix::process::CommandExt as _,
    time::{Duration, Instant},
};

use patroxy_tests::{
    backend::{Backend, Behaviour},
    config::{
        Bpf, CheckConfig, DefaultServer, Defaults, ListenerConfig, ProxyConfig, ServerConfig,
        StatsConfig,
    },
    daemon::Patroxy,
    fake_patroni::{FakePatroni, Reply},
    ports::free_tcp_port,
    postgres::{Postgres, PostgresOptions, run_with_timeout},
    stats_client::{get, get_ok, parse_csv, row, wait_for},
};
use tokio::{io::AsyncReadExt, io::AsyncWriteExt, net::TcpStream, time::timeout};

/// The daemon's fd limit in the flood test: the proxy's maxconn (100, two fds a session) and
/// the stats server's default cap (64) fit, 1000 stats clients do not.
const FD_LIMIT: u64 = 512;
/// Stats connections the flood opens.
const FLOOD: usize = 1000;
/// How long pgbench runs through the proxy while the flood lasts, and with how many clients.
const PGBENCH_SECONDS: u64 = 8;
const PGBENCH_CLIENTS: usize = 4;
/// A fallback session's fds: its two sockets and a splice pipe (two fds) each way.
const FDS_PER_SESSION: usize = 6;
/// Half a request: a request line and no end of headers.
const HALF_REQUEST: &[u8] = b"GET / HTTP/1.1\r\n";

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

struct Proxied {
    _patroni: FakePatroni,
    daemon: Patroxy,
    bind: SocketAddr,
    stats: SocketAddr,
}

/// One checked primary (traffic to `server`) behind one listener, on the fallback data path,
/// with `--drain-grace 1s`.
async fn start(name: &str, fd_limit: Option<u64>, server: SocketAddr) -> Proxied {
    let patroni = FakePatroni::start().await;
    patroni.set("/primary", Reply::primary(3));
    let pin = Patroxy::unique_pin_path(name);
    let bind = local(free_tcp_port());
    let stats = local(free_tcp_port());
    let defaults = Defaults::new(Duration::from_secs(30 * 60), Duration::from_secs(1))
        .timeout_check(Duration::from_secs(2));
    let mut config = ProxyConfig::new(defaults)
        .data_path(Bpf::Off, &pin)
        .default_server(DefaultServer {
            inter: Some(Duration::from_millis(200)),
            rise: Some(1),
            fall: Some(3),
            ..DefaultServer::default()
        })
        .server(ServerConfig::new("db1", server).check_port(patroni.addr().port()))
        .listener(
            ListenerConfig::new("postgres_write", bind, ["db1"])
                .check(CheckConfig::new("/primary")),
        )
        .stats(StatsConfig::new(stats));
    config.global.maxconn = Some(100);
    let daemon = Patroxy::start_with(name, &config, |cmd| {
        if let Some(limit) = fd_limit {
            // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let lim = libc::rlimit {
                        rlim_cur: limit,
                        rlim_max: limit,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
    });
    let up = wait_for(Duration::from_secs(10), || {
        let rows = parse_csv(&get(stats, "/;csv").ok()?.2);
        (row(&rows, "postgres_write", "db1")["status"] == "UP").then_some(())
    });
    assert!(up.is_some(), "db1 never came UP:\n{}", daemon.log());
    Proxied {
        _patroni: patroni,
        daemon,
        bind,
        stats,
    }
}

/// A stats client that sent half a request and stalls.
async fn stalled_client(stats: SocketAddr) -> Option<TcpStream> {
    let mut s = timeout(Duration::from_secs(2), TcpStream::connect(stats))
        .await
        .ok()?
        .ok()?;
    s.write_all(HALF_REQUEST).await.ok()?;
    Some(s)
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// What a pgbench run reported: its exit status and its transaction counts.
#[derive(Debug)]
struct PgbenchRun {
    success: bool,
    processed: Option<u64>,
    failed: Option<u64>,
    output: String,
}

/// pgbench's TPC-B-like script through the proxy at `port` for [`PGBENCH_SECONDS`], a new
/// connection per transaction (`-C`): every transaction is also an accept and a backend
/// connect under the flood.
fn pgbench_through(pg: &Postgres, port: u16) -> PgbenchRun {
    let mut cmd = pg.client("pgbench", port);
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
        .args(["-C", "-j", "2", "-c", &PGBENCH_CLIENTS.to_string()])
        .args(["-T", &PGBENCH_SECONDS.to_string()])
        .arg("postgres");
    let out =
        run_with_timeout(&mut cmd, Duration::from_secs(PGBENCH_SECONDS + 60)).expect("pgbench ran");
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // "number of transactions actually processed: 1234", "number of failed transactions: 0 (0.000%)"
    let count = |label: &str| {
        output.lines().find_map(|l| {
            l.trim()
                .strip_prefix(label)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
    };
    PgbenchRun {
        success: out.status.success(),
        processed: count("number of transactions actually processed:"),
        failed: count("number of failed transactions:"),
        output,
    }
}

fn raise_own_fd_limit() {
    let lim = libc::rlimit {
        rlim_cur: 20_000,
        rlim_max: 20_000,
    };
    // SAFETY: a valid rlimit for this test process; root may raise the hard limit.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_stalled_stats_clients_leaves_the_proxy_serving() {
    raise_own_fd_limit();
    let pg = std::sync::Arc::new(Postgres::start(PostgresOptions::default()));
    pg.pgbench_init(pg.port(), 1);
    let mut p = start("stats-flood", Some(FD_LIMIT), pg.addr()).await;
    let pid = p.daemon.child.id();
    let base_fds = open_fds(pid);

    let stats = p.stats;
    let flood = tokio::spawn(async move {
        let tries = (0..FLOOD).map(|_| tokio::spawn(stalled_client(stats)));
        let mut held = Vec::new();
        for t in tries {
            if let Ok(Some(s)) = t.await {
                held.push(s);
            }
        }
        held
    });
    let bench = {
        let (pg, port) = (pg.clone(), p.bind.port());
        tokio::task::spawn_blocking(move || pgbench_through(&pg, port))
    };
    let mut max_fds = 0;
    while !bench.is_finished() {
        max_fds = max_fds.max(open_fds(pid));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let run = bench.await.unwrap();
    let held = flood.await.unwrap();
    max_fds = max_fds.max(open_fds(pid));
    let log = p.daemon.log();
    eprintln!(
        "MEASURED: pgbench -C -c {PGBENCH_CLIENTS} for {PGBENCH_SECONDS} s through the proxy while {} stalled \
         stats clients connected: {:?} transactions, {:?} failed; daemon fds at most {max_fds} \
         (base {base_fds})",
        held.len(),
        run.processed,
        run.failed
    );
    assert!(run.success, "pgbench failed:\n{}\n{log}", run.output);
    assert_eq!(run.failed, Some(0), "{}", run.output);
    assert!(run.processed.is_some_and(|n| n > 0), "{}", run.output);
    assert!(!log.contains("Too many open files"), "fds ran out:\n{log}");
    assert!(!log.contains("is DOWN"), "db1 was marked DOWN:\n{log}");
    // The stats server holds at most its cap (64) of the flood. pgbench's sessions come on
    // top: with -C a client's next session is accepted while its last one may still be
    // closing, so up to two per client; and a few for the checks.
    let sessions = 2 * PGBENCH_CLIENTS * FDS_PER_SESSION;
    assert!(
        max_fds <= base_fds + 64 + sessions + 8,
        "the daemon held {max_fds} fds (base {base_fds}) with {} stats clients connected",
        held.len()
    );
    drop(held);
    // The slots come back once the flood is gone.
    let answered = wait_for(Duration::from_secs(10), || get(stats, "/;csv").ok());
    assert!(answered.is_some(), "stats did not answer after the flood");
    let rows = parse_csv(&get_ok(stats, "/;csv"));
    // UP, or UP with a check failed on a loaded machine ("UP 2/3": going down, not down; the
    // log says it never went DOWN, above).
    let status = &row(&rows, "postgres_write", "db1")["status"];
    assert!(status.starts_with("UP"), "db1: {status}");
    p.daemon.child.stop().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_sent_request_is_closed_after_the_header_timeout() {
    let backend = Backend::start(Behaviour::Echo).await;
    let p = start("stats-header-timeout", None, backend.addr).await;
    let mut s = stalled_client(p.stats).await.expect("connect to stats");
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    // The server closes it (EOF, or a reset) within its 5 s header-read timeout; an error 408
    // before the close is fine too.
    let closed = timeout(Duration::from_secs(8), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "a half-sent request was still open after {:?}",
        started.elapsed()
    );
    drop(p);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_does_not_wait_for_a_stalled_stats_client() {
    let backend = Backend::start(Behaviour::Echo).await;
    let mut p = start("stats-shutdown", None, backend.addr).await;
    let _stalled = stalled_client(p.stats).await.expect("connect to stats");
    let started = Instant::now();
    p.daemon.child.signal(libc::SIGTERM).unwrap();
    // --drain-grace 1s, plus 2 s.
    let exited = p.daemon.child.wait_timeout(Duration::from_secs(3)).unwrap();
    assert!(
        exited.is_some(),
        "still running {:?} after SIGTERM with a stalled stats client:\n{}",
        started.elapsed(),
        p.daemon.log()
    );
}
