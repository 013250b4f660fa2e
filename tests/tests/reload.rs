//! Configuration reloads of a running daemon (SIGHUP, `patroxy reload`) in front of a real
//! PostgreSQL under pgbench: settings change in place, a file the running process cannot take
//! (invalid, or a change that needs a restart) leaves it on its old configuration, and no
//! transaction fails either way.
mod common;

use std::{
    net::SocketAddr,
    path::Path,
    process::{Command, Output},
    time::Duration,
};

use common::{Path_, fast_checks, local};
use patroxy_tests::{
    config::{CheckConfig, ListenerConfig, ProxyConfig, ServerConfig, StatsConfig},
    daemon::Patroxy,
    fake_patroni::{FakePatroni, Reply},
    ports::free_tcp_port,
    postgres::{Postgres, PostgresOptions, run_with_timeout},
    process::patroxy_bin,
    stats_client::get_ok,
};

/// One listener `postgres_write` in front of `pg` as server `pg1`, checked (`/primary`) on
/// `api`, with the stats server on a free port.
fn config(path: Path_, pin: &Path, pg: SocketAddr, api: SocketAddr) -> ProxyConfig {
    let mut config = fast_checks(path, pin)
        .server(ServerConfig::new("pg1", pg).check_port(api.port()))
        .listener(
            ListenerConfig::new("postgres_write", local(free_tcp_port()), ["pg1"])
                .check(CheckConfig::new("/primary")),
        )
        .stats(StatsConfig::new(local(free_tcp_port())));
    config.global.maxconn = Some(2000);
    config
}

/// The kinds of reload the test cycles through, each one a file written over the running one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    NoOp,
    /// Check timing (`inter`, `rise`) and global maxconn changed: applied in place.
    Settings,
    ServerAdded,
    ServerRemoved,
    ListenerAdded,
    Invalid,
}

const CYCLE: [Kind; 6] = [
    Kind::NoOp,
    Kind::Settings,
    Kind::ServerAdded,
    Kind::ServerRemoved,
    Kind::ListenerAdded,
    Kind::Invalid,
];

/// The config for `kind` from the `running` one, and the line of the mistake (`Invalid`).
fn file_for(
    kind: Kind,
    running: &ProxyConfig,
    round: usize,
    api: SocketAddr,
) -> (ProxyConfig, String, usize) {
    let mut c = running.clone();
    match kind {
        Kind::NoOp => {}
        Kind::Settings => {
            // Alternates, so that each one changes something.
            let odd = (round / CYCLE.len()) % 2 == 1;
            c.default_server.inter = Some(Duration::from_millis(if odd { 300 } else { 250 }));
            c.default_server.rise = Some(if odd { 3 } else { 4 });
            c.global.maxconn = Some(if odd { 1000 } else { 1500 });
        }
        Kind::ServerAdded => {
            c.servers
                .push(ServerConfig::new("pg2", local(free_tcp_port())).check_port(api.port()));
            c.listeners[0].servers.push("pg2".into());
        }
        Kind::ServerRemoved => {
            // pg1 is the only server: moving the listener to a new one removes pg1.
            c.servers[0].name = "pg9".into();
            c.listeners[0].servers = vec!["pg9".into()];
        }
        Kind::ListenerAdded => {
            c.listeners.push(ListenerConfig::new(
                "postgres_read",
                local(free_tcp_port()),
                ["pg1"],
            ));
        }
        Kind::Invalid => {
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

fn patroxy_reload(config_path: &Path) -> Output {
    run_with_timeout(
        Command::new(patroxy_bin())
            .arg("reload")
            .arg("--config")
            .arg(config_path),
        Duration::from_secs(20),
    )
    .expect("patroxy reload ran")
}

fn stats_json(stats: SocketAddr) -> serde_json::Value {
    serde_json::from_str(&get_ok(stats, "/;json")).expect("stats JSON")
}

/// The first server's (id, status) in the stats JSON.
fn pg1(json: &serde_json::Value) -> (u64, String) {
    let s = &json["listeners"][0]["servers"][0];
    (
        s["id"].as_u64().unwrap(),
        s["status"].as_str().unwrap().into(),
    )
}

fn reloads_under_pgbench(path: Path_) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = rt.block_on(FakePatroni::start());
    api.set("/primary", Reply::primary(1));
    let pg = Postgres::start(PostgresOptions::default().max_connections(50));
    let pin = Patroxy::unique_pin_path("reload");
    let base = config(path, &pin, pg.addr(), api.addr());
    let stats = base.stats.as_ref().unwrap().bind;
    let proxy = Patroxy::start("reload", &base);
    let up = std::time::Instant::now();
    while pg1(&stats_json(stats)).1 != "UP" {
        assert!(up.elapsed() < Duration::from_secs(5), "pg1 never came UP");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (id, _) = pg1(&stats_json(stats));
    pg.pgbench_init(pg.port(), 1);

    let port = base.bind().port();
    let mut bench = pg.client("pgbench", port);
    bench.args(["-c", "8", "-j", "2", "-T", "14", "-h", "127.0.0.1", "-p"]);
    bench
        .arg(port.to_string())
        .args(["-U", "postgres", "postgres"]);
    let bench = std::thread::spawn(move || run_with_timeout(&mut bench, Duration::from_secs(60)));
    std::thread::sleep(Duration::from_secs(1));

    let mut refused = 0;
    let mut running = base.clone();
    for round in 0..20 {
        let kind = CYCLE[round % CYCLE.len()];
        let (next, text, bad_line) = file_for(kind, &running, round, api.addr());
        std::fs::write(&proxy.config_path, text).unwrap();
        let applied = matches!(kind, Kind::NoOp | Kind::Settings);
        let at = format!("{}:{bad_line}:", proxy.config_path.display());
        if round == 11 {
            // SIGHUP (an invalid file), as `kill -HUP` would send it: the log says why.
            assert_eq!(kind, Kind::Invalid);
            let before = proxy.count_log("reload refused");
            proxy.child.signal(libc::SIGHUP).unwrap();
            assert!(
                proxy.wait_for_log_count("reload refused", before + 1, Duration::from_secs(5)),
                "{kind:?} by SIGHUP: {}",
                proxy.log()
            );
            let log = proxy.log();
            assert!(log.contains("SIGHUP received: reloading the configuration"));
            assert!(log.contains(&at), "the log names {at}: {log}");
        } else {
            let out = patroxy_reload(&proxy.config_path);
            let stdout = String::from_utf8_lossy(&out.stdout);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.success(), applied, "{kind:?}: {stdout}{stderr}");
            match kind {
                Kind::Invalid => {
                    assert!(stderr.contains(&at), "{kind:?} names {at}: {stderr}");
                    assert!(stderr.contains("maxconns"), "{stderr}");
                }
                Kind::ServerAdded | Kind::ServerRemoved | Kind::ListenerAdded => {
                    assert!(stderr.contains("needs a restart"), "{kind:?}: {stderr}");
                }
                Kind::NoOp | Kind::Settings => {
                    assert!(stdout.starts_with("configuration reloaded"), "{stdout}");
                }
            }
        }
        if applied {
            running = next;
        } else {
            refused += 1;
        }
        // The check state is kept: UP right after a reload, whatever its new `rise`; and the
        // server keeps its id.
        assert_eq!(pg1(&stats_json(stats)), (id, "UP".into()), "after {kind:?}");
        std::thread::sleep(Duration::from_millis(400));
    }

    let out = bench.join().unwrap().expect("pgbench through patroxy");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "pgbench: {stdout}");
    assert!(
        stdout.contains("number of failed transactions: 0 "),
        "no transaction failed: {stdout}"
    );
    let tx = stdout
        .lines()
        .find(|l| l.starts_with("number of transactions actually processed"))
        .unwrap_or_default();
    eprintln!(
        "MEASURED {}: 20 reloads ({refused} refused) under pgbench -c 8 -T 14: {tx}, 0 failed",
        path.name()
    );

    let json = stats_json(stats);
    assert_eq!(json["reload"]["reloads"], 20);
    assert_eq!(json["reload"]["failures"], refused);
    // The last file (round 19, `Settings`) was applied.
    assert_eq!(json["global_maxconn"], 1000);
    assert_eq!(json["reload"]["last_ok"], true);
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
