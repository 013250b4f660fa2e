//! Configuration reloads of a running daemon (SIGHUP, `patroxy reload`) in front of a real
//! PostgreSQL under pgbench. Settings change in place; structural changes (listeners and
//! servers added, removed, moved) are applied by a successor process that takes the listeners,
//! sessions, check and operator states, counters and server ids over; an invalid file leaves
//! the daemon on its old configuration. No transaction fails on the servers that stay, their
//! ids never change (stats JSON and BACKENDS), and a removed server's sessions are reset
//! (`on_marked_down` shutdown-sessions).
mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::Path,
    process::{Child, Command, Output, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use common::{Path_, fast_checks, local};
use patroxy_tests::{
    config::{Balance, CheckConfig, ListenerConfig, ProxyConfig, ServerConfig, StatsConfig},
    daemon::{Patroxy, bpftool_dump},
    fake_patroni::{FakePatroni, Reply},
    ports::free_tcp_port,
    postgres::{Postgres, PostgresOptions, run_with_timeout},
    process::patroxy_bin,
    stats_client::{get, get_ok},
};

/// Listener `postgres_write` in front of `pg` as server `pg1`, checked (`/primary`) on `api`;
/// listener `postgres_ops` with two unchecked servers `pgd` and `pgm` (the operator drains and
/// maintains them); the stats server on a free port.
fn config(path: Path_, pin: &Path, pg: SocketAddr, api: SocketAddr) -> ProxyConfig {
    let mut config = fast_checks(path, pin)
        .server(ServerConfig::new("pg1", pg).check_port(api.port()))
        .server(ServerConfig::new("pgd", pg))
        .server(ServerConfig::new("pgm", pg))
        .listener(
            ListenerConfig::new("postgres_write", local(free_tcp_port()), ["pg1"])
                .check(CheckConfig::new("/primary")),
        )
        .listener(ListenerConfig::new(
            "postgres_ops",
            local(free_tcp_port()),
            ["pgd", "pgm"],
        ))
        .stats(StatsConfig::new(local(free_tcp_port())));
    config.global.maxconn = Some(2000);
    config
}

/// What each reload writes over the running file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    NoOp,
    /// Check timing (`inter`, `rise`) and global maxconn: applied in place.
    Timing,
    /// Listener `postgres_extra` (balance first) in front of `pg` as `pgx`.
    ListenerAdded,
    /// `pgy` added to `postgres_extra`, after `pgx`.
    ServerAdded,
    /// `pgy` moved to an address where nothing listens (balance first keeps clients on `pgx`).
    ServerMoved,
    /// `pgx` removed from `postgres_extra`; a session on it is reset.
    ServerRemoved,
    ListenerRemoved,
    Invalid,
    /// A listener added on PostgreSQL's own port: valid, but the successor cannot bind it, so
    /// the daemon runs on with its old configuration.
    SuccessorFails,
}

use Kind::*;

/// Twenty reloads: every kind at least twice (a failing successor once), structural ones in
/// between in-place ones.
const ROUNDS: [Kind; 20] = [
    NoOp,
    Timing,
    ListenerAdded,
    ServerAdded,
    Invalid,
    ServerMoved,
    ServerRemoved,
    ListenerRemoved,
    NoOp,
    Timing,
    ListenerAdded, // by SIGHUP
    Invalid,       // by SIGHUP
    ServerAdded,
    ServerMoved,
    Timing,
    ServerRemoved,
    ListenerRemoved,
    SuccessorFails,
    Invalid,
    Timing,
];

/// How long pgbench runs: the 20 reloads take 6-9 s here (2026-12-03, 2 cores).
const BENCH_SECONDS: u32 = 15;

/// Rounds whose reload is sent as SIGHUP rather than `patroxy reload`.
const BY_SIGHUP: [usize; 2] = [10, 11];

/// The file for `kind` from the `running` config; the text, and the line of the mistake
/// (`Invalid`).
fn file_for(
    kind: Kind,
    running: &ProxyConfig,
    round: usize,
    pg: SocketAddr,
) -> (ProxyConfig, String, usize) {
    let mut c = running.clone();
    let extra = |c: &mut ProxyConfig| {
        c.listeners
            .iter_mut()
            .find(|l| l.name == "postgres_extra")
            .expect("postgres_extra is there")
            .servers
            .clone()
    };
    let set_extra = |c: &mut ProxyConfig, servers: Vec<String>| {
        c.listeners
            .iter_mut()
            .find(|l| l.name == "postgres_extra")
            .unwrap()
            .servers = servers;
    };
    match kind {
        NoOp => {}
        Timing => {
            // Alternates, so that each one changes something.
            let odd = c.default_server.inter != Some(Duration::from_millis(300));
            c.default_server.inter = Some(Duration::from_millis(if odd { 300 } else { 250 }));
            c.default_server.rise = Some(if odd { 3 } else { 4 });
            c.global.maxconn = Some(if round == 19 { 1000 } else { 1500 });
        }
        ListenerAdded => {
            c.servers.retain(|s| s.name != "pgx" && s.name != "pgy");
            c.servers.push(ServerConfig::new("pgx", pg));
            c.listeners.push(
                ListenerConfig::new("postgres_extra", local(free_tcp_port()), ["pgx"])
                    .balance(Balance::First),
            );
        }
        ServerAdded => {
            c.servers.push(ServerConfig::new("pgy", pg));
            let mut servers = extra(&mut c);
            servers.push("pgy".into());
            set_extra(&mut c, servers);
        }
        ServerMoved => {
            let pgy = c.servers.iter_mut().find(|s| s.name == "pgy").unwrap();
            pgy.address = local(free_tcp_port());
        }
        ServerRemoved => set_extra(&mut c, vec!["pgy".into()]),
        ListenerRemoved => {
            c.listeners.retain(|l| l.name != "postgres_extra");
            c.servers.retain(|s| s.name != "pgx" && s.name != "pgy");
        }
        SuccessorFails => {
            c.listeners
                .push(ListenerConfig::new("postgres_taken", pg, ["pg1"]));
        }
        Invalid => {
            let text = c
                .to_toml()
                .replacen("[global]\n", "[global]\nmaxconns = 10\n", 1);
            let line = text
                .lines()
                .position(|l| l.starts_with("maxconns"))
                .expect("the mistake is in the file")
                + 1;
            return (c, text, line);
        }
    }
    (c.clone(), c.to_toml(), 0)
}

fn structural(kind: Kind) -> bool {
    matches!(
        kind,
        ListenerAdded | ServerAdded | ServerMoved | ServerRemoved | ListenerRemoved
    )
}

/// A reload the daemon refuses, keeping its configuration.
fn refused_kind(kind: Kind) -> bool {
    matches!(kind, Invalid | SuccessorFails)
}

fn patroxy(args: &[&str]) -> Output {
    run_with_timeout(
        Command::new(patroxy_bin()).args(args),
        Duration::from_secs(20),
    )
    .expect("patroxy ran")
}

fn stats_json(stats: SocketAddr) -> serde_json::Value {
    serde_json::from_str(&get_ok(stats, "/;json")).expect("stats JSON")
}

/// The pid of the process that answers on the stats socket, `None` if the request failed.
fn answering_pid(stats: SocketAddr) -> Option<u64> {
    let (status, _, body) = get(stats, "/;json").ok()?;
    let json: serde_json::Value = serde_json::from_str(&body).ok().filter(|_| status == 200)?;
    json["pid"].as_u64()
}

/// pg1's sessions so far (stot).
fn pg1_total(json: &serde_json::Value) -> u64 {
    json["listeners"][0]["servers"][0]["stot"]
        .as_u64()
        .expect("pg1's stot")
}

/// Every server in the stats JSON: (listener, server) -> (id, status, admin).
fn servers(json: &serde_json::Value) -> BTreeMap<(String, String), (u64, String, String)> {
    let mut all = BTreeMap::new();
    for l in json["listeners"].as_array().unwrap() {
        for s in l["servers"].as_array().unwrap() {
            all.insert(
                (
                    l["name"].as_str().unwrap().into(),
                    s["name"].as_str().unwrap().into(),
                ),
                (
                    s["id"].as_u64().unwrap(),
                    s["status"].as_str().unwrap().into(),
                    s["admin"].as_str().unwrap().into(),
                ),
            );
        }
    }
    all
}

/// The daemon that runs at the end is a successor, not the test's child: stopped by the pid
/// its stats page shows, however the test ends.
struct LastDaemon(SocketAddr);

impl Drop for LastDaemon {
    fn drop(&mut self) {
        let Some(pid) = std::panic::catch_unwind(|| stats_json(self.0)["pid"].as_u64())
            .ok()
            .flatten()
        else {
            return;
        };
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// New connections to `port` in a loop until `stop`, each answered by PostgreSQL (an
/// SSLRequest, which it answers with one byte): the longest wait and the failures.
fn probe_connections(port: u16, stop: Arc<AtomicBool>) -> (Duration, Vec<String>, u64) {
    let (mut longest, mut failures, mut n) = (Duration::ZERO, Vec::new(), 0);
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let answer = (|| -> std::io::Result<u8> {
            let mut s = TcpStream::connect(local(port))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])?;
            let mut b = [0u8; 1];
            s.read_exact(&mut b)?;
            Ok(b[0])
        })();
        match answer {
            Ok(b'N') | Ok(b'S') => longest = longest.max(started.elapsed()),
            Ok(other) => failures.push(format!("answered {other:#x}")),
            Err(e) => failures.push(e.to_string()),
        }
        n += 1;
        std::thread::sleep(Duration::from_millis(5));
    }
    (longest, failures, n)
}

/// A psql session through `port` that sleeps for a minute unless its server goes.
fn long_session(pg: &Postgres, port: u16) -> Child {
    pg.client("psql", port)
        .args(["-X", "-h", "127.0.0.1", "-p"])
        .arg(port.to_string())
        .args([
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-c",
            "SELECT pg_sleep(60)",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("psql starts")
}

fn reloads_under_pgbench(path: Path_) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = rt.block_on(FakePatroni::start());
    api.set("/primary", Reply::primary(1));
    let pg = Postgres::start(PostgresOptions::default().max_connections(60));
    let pin = Patroxy::unique_pin_path("reload");
    let base = config(path, &pin, pg.addr(), api.addr());
    let stats = base.stats.as_ref().unwrap().bind;
    let stats_url = format!("http://{stats}");
    let proxy = Patroxy::start("reload", &base);
    let _last = LastDaemon(stats);
    let up = Instant::now();
    while servers(&stats_json(stats))[&("postgres_write".into(), "pg1".into())].1 != "UP" {
        assert!(up.elapsed() < Duration::from_secs(5), "pg1 never came UP");
        std::thread::sleep(Duration::from_millis(50));
    }
    for (target, state) in [("postgres_ops/pgd", "drain"), ("postgres_ops/pgm", "maint")] {
        let out = patroxy(&["set-state", "--url", &stats_url, target, state]);
        assert!(out.status.success(), "{out:?}");
    }
    pg.pgbench_init(pg.port(), 1);

    let port = base.bind().port();
    let mut bench = pg.client("pgbench", port);
    // The fallback path's sessions stay in the process that accepted them (until they end or
    // the drain grace, 1 s here, is over): there pgbench reconnects for every transaction.
    if path == Path_::Fallback {
        bench.arg("-C");
    }
    let seconds = BENCH_SECONDS.to_string();
    bench.args([
        "-c",
        "8",
        "-j",
        "2",
        "-T",
        &seconds,
        "-h",
        "127.0.0.1",
        "-p",
    ]);
    bench
        .arg(port.to_string())
        .args(["-U", "postgres", "postgres"]);
    let bench = std::thread::spawn(move || run_with_timeout(&mut bench, Duration::from_secs(90)));
    let stop_probe = Arc::new(AtomicBool::new(false));
    let probe = {
        let stop = stop_probe.clone();
        std::thread::spawn(move || probe_connections(port, stop))
    };
    std::thread::sleep(Duration::from_secs(1));

    // Every id ever seen, with the (listener, server, address) it was given to.
    let mut given: BTreeMap<u64, (String, String, SocketAddr)> = BTreeMap::new();
    let mut refused = 0;
    let mut structural_reloads = 0;
    let mut running = base.clone();
    let mut before = servers(&stats_json(stats));
    let mut total = pg1_total(&stats_json(stats));
    let started = Instant::now();
    for (round, kind) in ROUNDS.into_iter().enumerate() {
        let (next, text, bad_line) = file_for(kind, &running, round, pg.addr());
        std::fs::write(&proxy.config_path, text).unwrap();
        let pid = stats_json(stats)["pid"].as_u64().unwrap();
        // A session on the server this reload removes.
        let mut doomed = (kind == ServerRemoved).then(|| {
            let extra = running
                .listeners
                .iter()
                .find(|l| l.name == "postgres_extra")
                .unwrap();
            let child = long_session(&pg, extra.bind.port());
            std::thread::sleep(Duration::from_millis(300));
            child
        });
        let at = format!("{}:{bad_line}:", proxy.config_path.display());
        if BY_SIGHUP.contains(&round) {
            let needle = if kind == Invalid {
                "reload refused"
            } else {
                "configuration reloaded"
            };
            let count = proxy.count_log(needle);
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGHUP) };
            assert!(
                proxy.wait_for_log_count(needle, count + 1, Duration::from_secs(10)),
                "{kind:?} by SIGHUP: {}",
                proxy.log()
            );
            if kind == Invalid {
                assert!(proxy.log().contains(&at), "the log names {at}");
            }
        } else {
            let out = patroxy(&["reload", "--config", proxy.config_path.to_str().unwrap()]);
            let stdout = String::from_utf8_lossy(&out.stdout);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(
                out.status.success(),
                !refused_kind(kind),
                "{kind:?}: {stdout}{stderr}"
            );
            if kind == Invalid {
                assert!(stderr.contains(&at), "{kind:?} names {at}: {stderr}");
                assert!(stderr.contains("maxconns"), "{stderr}");
            } else if kind == SuccessorFails {
                // The successor's own reason reaches `patroxy reload`.
                assert!(
                    stderr.contains("did not start; running on the old one")
                        && stderr.contains("listener postgres_taken: binding"),
                    "{stderr}"
                );
            } else {
                assert!(stdout.starts_with("configuration reloaded"), "{stdout}");
                assert_eq!(
                    stdout.contains("applied by a new process"),
                    structural(kind),
                    "{kind:?}: {stdout}"
                );
            }
        }
        if refused_kind(kind) {
            refused += 1;
        } else {
            running = next;
        }
        if structural(kind) {
            structural_reloads += 1;
            // The successor answers on the same stats socket once the old process is gone. A
            // request the old process took as it handed the socket over can be cut (CI,
            // 2026-12-05: "Broken pipe"): it is asked again, as a scraper would.
            let deadline = Instant::now() + Duration::from_secs(10);
            while answering_pid(stats).is_none_or(|p| p == pid) {
                assert!(
                    Instant::now() < deadline,
                    "round {round} {kind:?}: the old process still answers\n{}",
                    proxy.log()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            while alive(pid) {
                assert!(
                    Instant::now() < deadline,
                    "the old process {pid} is still there"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        } else {
            assert_eq!(stats_json(stats)["pid"].as_u64(), Some(pid), "{kind:?}");
        }
        if let Some(child) = doomed.as_mut() {
            let out = wait_child(child, Duration::from_secs(5))
                .unwrap_or_else(|| panic!("the removed server's session still runs"));
            assert!(!out.0.success(), "the session was reset: {}", out.1);
            let log = proxy.log();
            assert!(
                log.lines().any(|l| l
                    .contains("resetting its sessions (on_marked_down shutdown-sessions)")
                    && l.contains("server=pgx")
                    && l.contains("sessions=1")),
                "the reload reset pgx's session: {log}"
            );
        }

        let json = stats_json(stats);
        let after = servers(&json);
        // The totals go on in a successor: they never go back.
        let now_total = pg1_total(&json);
        assert!(
            now_total >= total,
            "pg1 stot {total} -> {now_total}, round {round} {kind:?}"
        );
        total = now_total;
        let highest_given = given.keys().max().copied().unwrap_or(0);
        let expected: BTreeSet<(String, String)> = running
            .listeners
            .iter()
            .flat_map(|l| l.servers.iter().map(|s| (l.name.clone(), s.clone())))
            .collect();
        assert_eq!(
            after.keys().cloned().collect::<BTreeSet<_>>(),
            expected,
            "round {round} {kind:?}"
        );
        for (key, (id, status, admin)) in &after {
            let address = running
                .servers
                .iter()
                .find(|s| s.name == key.1)
                .unwrap()
                .address;
            let identity = (key.0.clone(), key.1.clone(), address);
            match given.get(id) {
                Some(owner) => assert_eq!(owner, &identity, "id {id} reused, round {round}"),
                None => {
                    // A new id is above every one given before: never reused.
                    assert!(*id > highest_given, "{key:?} got id {id}, round {round}");
                    given.insert(*id, identity);
                }
            }
            // A server that stays keeps its id, its check state (UP, with no rise wait
            // although `rise` changed) and its operator state.
            if let Some((was_id, was_status, was_admin)) = before.get(key)
                && before_address(&given, *was_id) == Some(address)
            {
                assert_eq!(was_id, id, "{key:?} round {round} {kind:?}");
                assert_eq!(was_admin, admin, "{key:?} round {round} {kind:?}");
                if key.1 == "pg1" {
                    assert_eq!((was_status.as_str(), status.as_str()), ("UP", "UP"));
                }
            }
        }
        assert_eq!(after[&("postgres_ops".into(), "pgd".into())].2, "drain");
        assert_eq!(after[&("postgres_ops".into(), "pgm".into())].2, "maint");
        if path == Path_::Sockmap {
            // BACKENDS holds the servers' ids, no more once the old process is gone.
            let ids: BTreeSet<u64> = after.values().map(|v| v.0).collect();
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let keys: BTreeSet<u64> = bpftool_dump(&pin, "BACKENDS")
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|e| e["key"].as_u64().unwrap())
                    .collect();
                if keys == ids {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "round {round} {kind:?}: BACKENDS keys {keys:?}, servers' ids {ids:?}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        before = after;
        std::thread::sleep(Duration::from_millis(200));
    }
    let reloading = started.elapsed();
    let ended_early = bench.is_finished();
    let out = bench.join().unwrap().expect("pgbench through patroxy");
    assert!(
        !ended_early,
        "pgbench ended before the 20 reloads did ({reloading:?}): {out:?}"
    );
    stop_probe.store(true, Ordering::Relaxed);
    let (longest, failures, probes) = probe.join().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "pgbench: {stdout}");
    assert!(
        stdout.contains("number of failed transactions: 0 "),
        "no transaction failed: {stdout}"
    );
    assert!(failures.is_empty(), "new connections failed: {failures:?}");
    let tx = stdout
        .lines()
        .find(|l| l.starts_with("number of transactions actually processed"))
        .unwrap_or_default();
    eprintln!(
        "MEASURED {}: 20 reloads ({structural_reloads} structural, {refused} refused) in \
         {reloading:.1?} under pgbench -c 8 -T {BENCH_SECONDS}{}: {tx}, 0 failed; {probes} new connections \
         meanwhile, none failed, the longest answered in {longest:.1?}",
        path.name(),
        if path == Path_::Fallback { " -C" } else { "" },
    );

    let json = stats_json(stats);
    assert_eq!(json["reload"]["reloads"], 20);
    assert_eq!(json["reload"]["failures"], refused);
    // The last file (round 19, `Timing`) was applied.
    assert_eq!(json["global_maxconn"], 1000);
    assert_eq!(json["reload"]["last_ok"], true);
    // pgbench's 8 sessions (every transaction's with -C) counted once, across the successors.
    assert_eq!(json["listeners"][0]["name"], "postgres_write");
    assert!(pg1_total(&json) >= 8, "{}", json["listeners"][0]);
    let metrics = get_ok(stats, "/metrics");
    for line in [
        "patroxy_config_reloads_total 20".to_string(),
        format!("patroxy_config_reload_failures_total {refused}"),
        "patroxy_config_last_reload_successful 1".into(),
        "patroxy_config_last_reload_timestamp_seconds ".into(),
    ] {
        assert!(metrics.contains(&line), "{line} in\n{metrics}");
    }
    assert!(
        proxy
            .log()
            .contains("configuration reloaded: global.maxconn: 1500 -> 1000")
    );
    // Still serving, on its last applied configuration.
    assert_eq!(pg.psql(port, "SELECT 1"), "1");
}

/// Whether process `pid` runs (a zombie does not: the first daemon is the test's child, which
/// nobody reaps before the end).
fn alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let state = stat.rsplit_once(')')?.1.trim_start().chars().next()?;
            Some(state != 'Z')
        })
        .unwrap_or(false)
}

/// The address the id was given for.
fn before_address(
    given: &BTreeMap<u64, (String, String, SocketAddr)>,
    id: u64,
) -> Option<SocketAddr> {
    given.get(&id).map(|g| g.2)
}

/// The child's exit status and stderr once it exits, or `None` after `timeout`.
fn wait_child(child: &mut Child, timeout: Duration) -> Option<(std::process::ExitStatus, String)> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut stderr = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut stderr);
            }
            return Some((status, stderr));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn reloads_under_pgbench_through_sockmap() {
    if Path_::Sockmap.available("reloads_under_pgbench_through_sockmap") {
        reloads_under_pgbench(Path_::Sockmap);
    }
}

#[test]
fn reloads_under_pgbench_through_fallback() {
    reloads_under_pgbench(Path_::Fallback);
}
