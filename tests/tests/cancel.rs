//! CancelRequests through patroxy, against two real PostgreSQL servers behind a round-robin
//! listener (the seed's settings, servers unchecked so both are UP at once): every cancel
//! reaches its query on both data paths, a wrong key changes nothing, a flood of cancels with
//! garbage pids and keys is rate limited and opens no session on any server; Debian's HAProxy
//! with the same settings is measured as the baseline (balanced like any connection, a cancel
//! reaches the other server about half of the time).
//!
//! One test runs both paths and the baseline in turn on the same two servers, to keep the
//! runtime to a few seconds per part.
mod common;

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use common::{Path_, local};
use patroxy_tests::{
    config::{Balance, HaproxyLog, ListenerConfig, ProxyConfig, ServerConfig, StatsConfig},
    daemon::Patroxy,
    pg_wire::{Outcome, Session, cancel_packet, send_cancel},
    ports::{free_tcp_port, wait_for_listen},
    postgres::{Postgres, PostgresOptions, run_checked},
    process::{ChildGuard, patroxy_bin, require_root, workspace_root},
    stats_client::get_ok,
};

/// Cancels per data path: every one must land.
const CANCELS: usize = 50;
/// The query each cancel interrupts: long enough that a cancel which missed is plain.
const QUERY: &str = "SELECT pg_sleep(5)";
/// How soon after the cancel the query must end with 57014.
const WITHIN: Duration = Duration::from_secs(1);
/// Garbage cancels in the flood.
const FLOOD: usize = 400;
/// patroxy's default `cancel_rate_per_client` (bursts of twice that).
const PER_CLIENT_RATE: f64 = 20.0;

const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// A loopback address with no session: its cancels go to every UP server.
const OTHER_CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

fn start_servers() -> [Postgres; 2] {
    let options = || {
        PostgresOptions::default()
            .trust()
            .conf("log_connections = on")
    };
    [Postgres::start(options()), Postgres::start(options())]
}

/// The seed's settings with one round-robin listener over both servers (unchecked: UP).
fn seed_config(servers: &[Postgres; 2]) -> ProxyConfig {
    ProxyConfig::seed()
        .server(ServerConfig::new("pg1", servers[0].addr()).maxconn(200))
        .server(ServerConfig::new("pg2", servers[1].addr()).maxconn(200))
        .listener(
            ListenerConfig::new("postgres_read", local(free_tcp_port()), ["pg1", "pg2"])
                .balance(Balance::RoundRobin),
        )
}

/// One query cancelled through `proxy`, the cancel sent from `from`: whether it ended with
/// SQLSTATE 57014 within [`WITHIN`] of the cancel.
fn cancel_lands(proxy: SocketAddr, from: IpAddr) -> bool {
    let mut session = Session::connect(proxy).expect("a session through the proxy");
    session.send_query(QUERY).unwrap();
    // Past the backend's start of the query: a cancel while it is idle is ignored.
    thread::sleep(Duration::from_millis(100));
    let sent = Instant::now();
    send_cancel(
        from,
        proxy,
        &cancel_packet(session.pid, session.key),
        WITHIN,
    )
    .unwrap();
    let outcome = session.finish(WITHIN);
    matches!(outcome, Ok(Outcome::Error(ref code)) if code == "57014") && sent.elapsed() < WITHIN
}

/// How many of `n` cancels landed, in `threads` threads at once (each cancel from `from(i)`).
fn cancels_landed(proxy: SocketAddr, n: usize, threads: usize, from: fn(usize) -> IpAddr) -> usize {
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            thread::spawn(move || {
                (t..n)
                    .step_by(threads)
                    .filter(|&i| cancel_lands(proxy, from(i)))
                    .count()
            })
        })
        .collect();
    workers.into_iter().map(|w| w.join().unwrap()).sum()
}

/// Client backends on `pg`, seen directly (not through the proxy).
fn client_backends(pg: &Postgres) -> u32 {
    pg.psql(
        pg.port(),
        "SELECT count(*) FROM pg_stat_activity \
         WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
    )
    .parse()
    .unwrap()
}

/// Connections the server accepted so far (cancels included), by its log_connections lines.
fn connections_received(pg: &Postgres) -> usize {
    pg.log().matches("connection received").count()
}

/// The listener's cancel counters from the stats JSON.
fn cancel_counters(stats: SocketAddr) -> serde_json::Value {
    let snap: serde_json::Value = serde_json::from_str(&get_ok(stats, "/;json")).unwrap();
    snap["listeners"][0]["frontend"]["cancels"].clone()
}

fn through_patroxy(path: Path_, servers: &[Postgres; 2]) {
    let name = path.name();
    let stats = local(free_tcp_port());
    let pin = Patroxy::unique_pin_path("cancel");
    let config = seed_config(servers)
        .data_path(path.bpf(), &pin)
        .stats(StatsConfig::new(stats));
    let proxy = Patroxy::start("cancel", &config);
    let bind = config.bind();

    // Half the cancels from the sessions' own address (sent to the server holding it), half
    // from another (sent to every UP server).
    let landed = cancels_landed(bind, CANCELS, 1, |i| {
        if i % 2 == 0 { CLIENT } else { OTHER_CLIENT }
    });
    eprintln!("MEASURED {name}: {landed} of {CANCELS} cancels through patroxy landed");
    assert_eq!(
        landed,
        CANCELS,
        "{name}: every cancel lands\n{}",
        proxy.log()
    );
    let counters = cancel_counters(stats);
    assert_eq!(counters["received"], CANCELS, "{counters}");
    assert_eq!(counters["delivered"], CANCELS, "{counters}");
    assert!(
        proxy.log().contains("cancel request passed on"),
        "{}",
        proxy.log()
    );

    // psql's own cancel (libpq's PQcancel on SIGINT).
    let mut psql = servers[0].client("psql", bind.port());
    psql.args(["-X", "-c", "SELECT pg_sleep(30)"]);
    let mut psql = ChildGuard::spawn("psql-cancel", &mut psql).unwrap();
    thread::sleep(Duration::from_millis(700));
    psql.signal(libc::SIGINT).unwrap();
    let status = psql.wait_timeout(Duration::from_secs(3)).unwrap();
    assert!(
        status.is_some()
            && psql
                .log()
                .contains("canceling statement due to user request"),
        "{name}: psql's Ctrl-C cancels its query: {status:?}\n{}",
        psql.log()
    );

    // A wrong key: the query runs to its end.
    let mut session = Session::connect(bind).unwrap();
    session.send_query("SELECT pg_sleep(0.5)").unwrap();
    thread::sleep(Duration::from_millis(100));
    let wrong = cancel_packet(session.pid, session.key ^ 1);
    assert!(send_cancel(CLIENT, bind, &wrong, WITHIN).unwrap());
    assert_eq!(
        session.finish(Duration::from_secs(3)).unwrap(),
        Outcome::Done,
        "{name}: a cancel with a wrong key cancels nothing"
    );
    drop(session);

    // A flood of cancels with garbage pids and keys, from one address, many at once.
    let before: Vec<usize> = servers.iter().map(connections_received).collect();
    let received_before = cancel_counters(stats)["received"].as_u64().unwrap();
    let started = Instant::now();
    let senders: Vec<_> = (0..8u32)
        .map(|t| {
            thread::spawn(move || {
                let mut x = 0x9e37_79b9u32.wrapping_mul(t + 1);
                for _ in 0..FLOOD / 8 {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    let _ = send_cancel(CLIENT, bind, &cancel_packet(x, x.rotate_left(7)), WITHIN);
                }
            })
        })
        .collect();
    senders.into_iter().for_each(|s| s.join().unwrap());
    let took = started.elapsed().as_secs_f64();
    thread::sleep(Duration::from_millis(300));
    let reached: usize = servers
        .iter()
        .zip(&before)
        .map(|(pg, b)| connections_received(pg) - b)
        .sum();
    let counters = cancel_counters(stats);
    eprintln!(
        "MEASURED {name}: a flood of {FLOOD} garbage cancels in {took:.2}s: {reached} server \
         connections, counters {counters}"
    );
    let received = counters["received"].as_u64().unwrap() - received_before;
    assert_eq!(received, FLOOD as u64, "{counters}");
    let sum = ["delivered", "dropped", "failed"]
        .map(|k| counters[k].as_u64().unwrap())
        .iter()
        .sum::<u64>();
    assert_eq!(sum, counters["received"].as_u64().unwrap(), "{counters}");
    // Each cancel the limit lets through goes to at most both servers.
    let allowed = 2.0 * (2.0 * PER_CLIENT_RATE + PER_CLIENT_RATE * took.ceil()) + 2.0;
    assert!(
        (reached as f64) <= allowed && counters["dropped"].as_u64().unwrap() > 0,
        "{name}: the flood is rate limited: {reached} connections reached the servers (at most \
         {allowed}): {counters}"
    );
    for pg in servers {
        assert_eq!(
            client_backends(pg),
            0,
            "{name}: no session left or opened by the flood"
        );
    }
    attribution(path, servers, &proxy, &pin, bind);
    drop(proxy);
}

/// A live session's addresses: in the session log line (both paths), and on the sockmap path in
/// `patroxy sessions --json`, joined to the server's pg_stat_activity by dist/patroxy-clients.sql.
fn attribution(
    path: Path_,
    servers: &[Postgres; 2],
    proxy: &Patroxy,
    pin: &std::path::Path,
    bind: SocketAddr,
) {
    let mut session = Session::connect(bind).unwrap();
    let client = session.local_addr().unwrap();
    session.send_query("SELECT 1").unwrap();
    assert_eq!(session.finish(WITHIN).unwrap(), Outcome::Done);
    if path == Path_::Sockmap {
        let out = Command::new(patroxy_bin())
            .args(["sessions", "--json", "--pin-path"])
            .arg(pin)
            .arg("--config")
            .arg(&proxy.config_path)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let sessions = String::from_utf8(out.stdout).unwrap();
        let table = Command::new(patroxy_bin())
            .args(["sessions", "--pin-path"])
            .arg(pin)
            .arg("--config")
            .arg(&proxy.config_path)
            .output()
            .unwrap();
        let table = String::from_utf8_lossy(&table.stdout);
        assert!(table.contains(&client.to_string()), "{table}");
        eprintln!("ATTRIBUTION patroxy sessions:\n{table}{sessions}");
        let rows: serde_json::Value = serde_json::from_str(&sessions).unwrap();
        let row = rows
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["client_addr"] == client.to_string())
            .unwrap_or_else(|| panic!("the session of {client} in {sessions}"));
        assert!(row["proxy_addr"].is_string(), "{row}");
        let sql = workspace_root().join("dist/patroxy-clients.sql");
        let joined: Vec<String> = servers
            .iter()
            .map(|pg| {
                let mut psql = pg.client("psql", pg.port());
                psql.args(["-X", "-v", "ON_ERROR_STOP=1", "-v"])
                    .arg(format!("sessions={sessions}"))
                    .arg("-f")
                    .arg(&sql);
                let out = run_checked(&mut psql, Duration::from_secs(20)).unwrap();
                String::from_utf8(out.stdout).unwrap()
            })
            .collect();
        eprintln!(
            "ATTRIBUTION (dist/patroxy-clients.sql on each server):\n{}",
            joined.join("\n")
        );
        let (pid, client_text) = (session.pid.to_string(), client.to_string());
        let names_client = |l: &str| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            cells.len() > 2 && cells[0] == pid && cells[1] == client_text
        };
        assert!(
            joined.iter().any(|out| out.lines().any(names_client)),
            "the query names {client} as the client of backend {}:\n{}",
            session.pid,
            joined.join("\n")
        );
    }
    drop(session);
    // The session's closing line (not the debug line that routed it) names both addresses.
    let needle = format!("client={client}");
    let closed_line = || {
        proxy
            .log()
            .lines()
            .find(|l| l.contains("session closed") && l.contains(&needle))
            .map(str::to_owned)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while closed_line().is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let line = closed_line().unwrap_or_else(|| panic!("no session closed line\n{}", proxy.log()));
    assert!(line.contains(" local=127.0.0.1:"), "{line}");
}

fn through_haproxy(servers: &[Postgres; 2]) {
    let config = seed_config(servers);
    let dir = std::env::temp_dir().join("patroxy-test-configs");
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join(format!("haproxy-cancel-{}.cfg", std::process::id()));
    std::fs::write(&cfg, config.to_haproxy_cfg(HaproxyLog::Stderr)).unwrap();
    let mut cmd = Command::new("/usr/sbin/haproxy");
    cmd.arg("-db").arg("-f").arg(&cfg);
    let haproxy = ChildGuard::spawn("haproxy-cancel", &mut cmd).unwrap();
    let bind = config.bind();
    assert!(
        wait_for_listen(bind, Duration::from_secs(10)),
        "HAProxy did not start:\n{}",
        haproxy.log()
    );
    // Ten at a time: a missed cancel costs a second.
    let landed = cancels_landed(bind, CANCELS, 10, |_| CLIENT);
    eprintln!(
        "MEASURED haproxy (baseline, seed settings, roundrobin over 2 servers): {landed} of \
         {CANCELS} cancels landed ({:.0}%)",
        100.0 * landed as f64 / CANCELS as f64
    );
}

#[test]
fn every_cancel_lands_on_both_paths_and_haproxy_is_measured() {
    let servers = start_servers();
    if require_root("every_cancel_lands_on_both_paths_and_haproxy_is_measured (sockmap part)") {
        through_patroxy(Path_::Sockmap, &servers);
    }
    through_patroxy(Path_::Fallback, &servers);
    through_haproxy(&servers);
}
