//! The XDP allowlist (`[[allow]]`, `[xdp]`) in front of a real PostgreSQL.
//!
//! Three client hosts, each a network namespace joined to this host by a veth pair; patroxy
//! runs here with the program attached to the three host-side veths, so it sees every packet a
//! client sends before this host's stack does. `mode = "auto"` attaches the tc program there
//! (a veth); the reload test runs the XDP program in native mode, the generic crash test in
//! generic mode, so both program types are covered:
//! - `pxd-a` 10.214.1.2, fd14:0:0:1::2: allowed to the listener and the stats port;
//! - `pxd-b` 10.214.3.2: allowed to the listener only (its own rule, so its counters are its);
//! - `pxd-d` 10.214.2.2, fd14:0:0:2::2: allowed nothing.
//!
//! Everything is named `pxd*` and removed at the start of each test and when it ends, so a
//! crashed run leaves nothing the next one trips on. The tests share the namespaces and run one
//! at a time (`LAB`).
use std::{
    fs::File,
    io,
    net::{IpAddr, SocketAddr, TcpStream},
    os::fd::AsRawFd as _,
    path::Path,
    process::{Child, Command, Output, Stdio},
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use patroxy_tests::{
    config::{
        AllowConfig, Bpf, Defaults, ListenerConfig, PortRef, ProxyConfig, ServerConfig,
        StatsConfig, XdpConfig,
    },
    daemon::Patroxy,
    ports::free_tcp_port,
    postgres::{Postgres, PostgresOptions, run_with_timeout},
    process::{patroxy_bin, require_root},
    stats_client::get_ok,
};

static LAB: Mutex<()> = Mutex::new(());

/// A client host: its namespace, the host-side veth XDP is attached to, and the addresses of
/// both ends.
struct Host {
    ns: &'static str,
    veth: &'static str,
    client4: &'static str,
    host4: &'static str,
    v6: Option<(&'static str, &'static str)>,
}

const A: Host = Host {
    ns: "pxd-a",
    veth: "pxdva",
    client4: "10.214.1.2",
    host4: "10.214.1.1",
    v6: Some(("fd14:0:0:1::2", "fd14:0:0:1::1")),
};
const B: Host = Host {
    ns: "pxd-b",
    veth: "pxdvb",
    client4: "10.214.3.2",
    host4: "10.214.3.1",
    v6: None,
};
const D: Host = Host {
    ns: "pxd-d",
    veth: "pxdvd",
    client4: "10.214.2.2",
    host4: "10.214.2.1",
    v6: Some(("fd14:0:0:2::2", "fd14:0:0:2::1")),
};
const HOSTS: [&Host; 3] = [&A, &B, &D];

/// How long a connect waits before the test calls it unanswered: the namespaces are one hop
/// away, so an answer takes well under a millisecond.
const NO_ANSWER: Duration = Duration::from_millis(1500);

fn ip(args: &[&str]) {
    let out =
        run_with_timeout(Command::new("ip").args(args), Duration::from_secs(10)).expect("ip ran");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The namespaces and veths, removed again on drop.
struct Lab {
    _serial: MutexGuard<'static, ()>,
}

impl Lab {
    fn up() -> Lab {
        let serial = LAB.lock().unwrap_or_else(|e| e.into_inner());
        down();
        for h in HOSTS {
            ip(&["netns", "add", h.ns]);
            ip(&[
                "link", "add", h.veth, "type", "veth", "peer", "name", "eth0", "netns", h.ns,
            ]);
            ip(&["addr", "add", &format!("{}/24", h.host4), "dev", h.veth]);
            ip(&["link", "set", h.veth, "up"]);
            ip(&[
                "-n",
                h.ns,
                "addr",
                "add",
                &format!("{}/24", h.client4),
                "dev",
                "eth0",
            ]);
            if let Some((client, host)) = h.v6 {
                ip(&[
                    "-6",
                    "addr",
                    "add",
                    &format!("{host}/64"),
                    "dev",
                    h.veth,
                    "nodad",
                ]);
                let addr = format!("{client}/64");
                ip(&[
                    "-n", h.ns, "-6", "addr", "add", &addr, "dev", "eth0", "nodad",
                ]);
            }
            ip(&["-n", h.ns, "link", "set", "eth0", "up"]);
            ip(&["-n", h.ns, "link", "set", "lo", "up"]);
        }
        Lab { _serial: serial }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        down();
    }
}

/// Removes every `pxd*` namespace and veth (deleting a namespace deletes its veth pair).
fn down() {
    for h in HOSTS {
        let _ = Command::new("ip").args(["netns", "del", h.ns]).output();
        if Path::new(&format!("/sys/class/net/{}", h.veth)).exists() {
            let _ = Command::new("ip").args(["link", "del", h.veth]).output();
        }
    }
}

/// Runs `f` on a thread inside namespace `ns` (setns changes only the calling thread's).
fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = File::open(format!("/run/netns/{ns}")).expect("namespace exists");
            // SAFETY: a valid namespace fd; only this thread moves.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {ns}: {}", io::Error::last_os_error());
            f()
        })
        .join()
        .expect("namespace thread")
    })
}

/// Connects from `host` to `to`: `Ok` when it was accepted, else the error (TimedOut = no
/// answer at all, ConnectionRefused = a RST).
fn connect_from(host: &Host, to: SocketAddr) -> io::Result<()> {
    in_ns(host.ns, || {
        TcpStream::connect_timeout(&to, NO_ANSWER).map(drop)
    })
}

fn assert_no_answer(host: &Host, to: SocketAddr) {
    let err = connect_from(host, to).expect_err("the connect must not be answered");
    assert_eq!(
        err.kind(),
        io::ErrorKind::TimedOut,
        "{} -> {to}: {err} (a refusal means the SYN got through)",
        host.ns
    );
}

fn v4(addr: &str, port: u16) -> SocketAddr {
    SocketAddr::new(addr.parse::<IpAddr>().unwrap(), port)
}

/// A PostgreSQL client tool run inside `host`'s namespace against `addr`:`port`.
fn client(pg: &Postgres, host: &Host, tool: &str, addr: &str, port: u16) -> Command {
    let template = pg.client(tool, port);
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", host.ns])
        .arg(template.get_program())
        .args(["-h", addr, "-p", &port.to_string(), "-U", "postgres"])
        .stdin(Stdio::null());
    for (k, v) in template.get_envs() {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    cmd
}

fn psql(pg: &Postgres, host: &Host, addr: &str, port: u16, sql: &str) -> Output {
    let mut cmd = client(pg, host, "psql", addr, port);
    cmd.args(["-X", "-At", "-d", "postgres", "-c", sql]);
    run_with_timeout(&mut cmd, Duration::from_secs(20)).expect("psql ran")
}

fn assert_psql(pg: &Postgres, host: &Host, addr: &str, port: u16) {
    let out = psql(pg, host, addr, port, "SELECT 40 + 2");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "42",
        "psql from {} to {addr}:{port}: {}",
        host.ns,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// pgbench -S from `host`, started now; `finish_pgbench` checks it.
fn spawn_pgbench(pg: &Postgres, host: &Host, port: u16, secs: u32) -> Child {
    let mut cmd = client(pg, host, "pgbench", host.host4, port);
    cmd.args([
        "-S",
        "-n",
        "-c",
        "4",
        "-j",
        "2",
        "-T",
        &secs.to_string(),
        "postgres",
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    cmd.spawn().expect("spawn pgbench")
}

/// Waits for pgbench and asserts it ran transactions and none failed.
fn finish_pgbench(child: Child) -> u64 {
    let out = child.wait_with_output().expect("pgbench ran");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "pgbench failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let number = |prefix: &str| -> u64 {
        stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {prefix:?} in pgbench's output:\n{stdout}"))
    };
    assert_eq!(number("number of failed transactions:"), 0, "{stdout}");
    let done = number("number of transactions actually processed:");
    assert!(done > 0, "{stdout}");
    done
}

/// One listener `postgres_write` on every address of this host in front of `pg`, the stats
/// server beside it, and the allowlist on the three veths: A to both, B to the listener (its own
/// rule), D nothing.
fn config(pin: &Path, pg: &Postgres, bpf: Bpf) -> ProxyConfig {
    let any = |port| SocketAddr::new("::".parse().unwrap(), port);
    ProxyConfig::new(Defaults::new(
        Duration::from_secs(60),
        Duration::from_secs(2),
    ))
    .data_path(bpf, pin)
    .server(ServerConfig::new("pg1", pg.addr()))
    .listener(ListenerConfig::new(
        "postgres_write",
        any(free_tcp_port()),
        ["pg1"],
    ))
    .stats(StatsConfig::new(any(free_tcp_port())))
    .allow(AllowConfig::new(
        &["10.214.1.0/24", "fd14:0:0:1::/64"],
        vec![
            PortRef::Name("postgres_write".into()),
            PortRef::Name("stats".into()),
        ],
    ))
    .allow(AllowConfig::new(
        &["10.214.3.0/24"],
        vec![PortRef::Name("postgres_write".into())],
    ))
    .xdp(XdpConfig::required(&[A.veth, B.veth, D.veth]))
}

fn ports(config: &ProxyConfig) -> (u16, u16) {
    let stats = config.stats.as_ref().expect("stats").bind.port();
    (config.bind().port(), stats)
}

fn stats_json(stats: u16) -> serde_json::Value {
    let local = SocketAddr::from(([127, 0, 0, 1], stats));
    serde_json::from_str(&get_ok(local, "/;json")).expect("stats JSON")
}

/// A protected port's counter `what` (passed, denied, syn_limited) from the stats JSON.
fn port_counter(json: &serde_json::Value, port: u16, what: &str) -> u64 {
    json["xdp"]["ports"]
        .as_array()
        .unwrap_or_else(|| panic!("no xdp.ports in {json}"))
        .iter()
        .find(|p| p["port"] == port)
        .unwrap_or_else(|| panic!("port {port} not in {json}"))[what]
        .as_u64()
        .unwrap()
}

fn rule_counter(json: &serde_json::Value, rule: usize, what: &str) -> u64 {
    json["xdp"]["rules"][rule][what]
        .as_u64()
        .unwrap_or_else(|| panic!("no xdp.rules[{rule}].{what} in {json}"))
}

fn accepted(json: &serde_json::Value) -> u64 {
    json["listeners"][0]["frontend"]["stot"].as_u64().unwrap()
}

/// The id of the XDP program attached to `veth`, if any.
fn attached_program(veth: &str) -> Option<u64> {
    let out = Command::new("ip")
        .args(["-j", "link", "show", "dev", veth])
        .output()
        .expect("ip link ran");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j JSON");
    json[0]["xdp"]["prog"]["id"].as_u64()
}

/// The programs tcx runs at `veth`'s ingress, in order: (id, name).
fn tc_programs(veth: &str) -> Vec<(u64, String)> {
    use aya::programs::{SchedClassifier, TcAttachType};
    let (_, programs) = SchedClassifier::query_tcx(veth, TcAttachType::Ingress).expect("tcx query");
    programs
        .iter()
        .map(|p| (u64::from(p.id()), p.name_as_str().unwrap_or("").to_string()))
        .collect()
}

/// The id of the allowlist's program on `veth`, XDP or tc, if either is attached.
fn allowlist_program(veth: &str) -> Option<u64> {
    attached_program(veth).or_else(|| tc_programs(veth).first().map(|(id, _)| *id))
}

/// How the program is attached to `veth` (`ip link`'s `xdp.mode`): 1 native, 2 generic.
fn attached_mode(veth: &str) -> Option<u64> {
    let out = Command::new("ip")
        .args(["-j", "link", "show", "dev", veth])
        .output()
        .expect("ip link ran");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j JSON");
    json[0]["xdp"]["mode"].as_u64()
}

/// `XDP_ATTACHED_DRV` and `XDP_ATTACHED_SKB` from linux/if_link.h.
const XDP_ATTACHED_NATIVE: u64 = 1;
const XDP_ATTACHED_GENERIC: u64 = 2;

fn start_pg() -> Postgres {
    let pg = Postgres::start(PostgresOptions::default());
    pg.pgbench_init(pg.port(), 1);
    pg
}

fn remove_pin_path(pin: &Path) {
    let _ = std::fs::remove_dir(pin);
}

#[test]
fn allowed_sources_pass_and_the_rest_get_no_answer() {
    if !require_root("allowed_sources_pass_and_the_rest_get_no_answer") {
        return;
    }
    let _lab = Lab::up();
    let pg = start_pg();
    let pin = Patroxy::unique_pin_path("xdp-allow");
    let config = config(&pin, &pg, Bpf::Required);
    let (port, stats) = ports(&config);
    let proxy = Patroxy::start("xdp-allow", &config);
    assert!(
        proxy.log().contains("XDP allowlist attached"),
        "{}",
        proxy.log()
    );
    for h in HOSTS {
        // `mode = "auto"` takes tc on a veth, whose XDP modes copy every TCP packet.
        assert_eq!(attached_program(h.veth), None, "XDP on {}", h.veth);
        let tc = tc_programs(h.veth);
        assert!(
            matches!(&tc[..], [(_, name)] if name == "patroxy_tc"),
            "{}: {tc:?}",
            h.veth
        );
    }
    assert_eq!(
        proxy.count_log("XDP allowlist attached in tc mode (a virtual device"),
        HOSTS.len(),
        "{}",
        proxy.log()
    );
    let attached = &stats_json(stats)["xdp"]["attached"];
    for h in HOSTS {
        let mode = attached
            .as_array()
            .and_then(|a| a.iter().find(|x| x["interface"] == h.veth))
            .map(|x| x["mode"].clone());
        assert_eq!(mode, Some("tc".into()), "{}: {attached}", h.veth);
    }

    // The allowed host: psql over IPv4 and IPv6, and pgbench.
    assert_psql(&pg, &A, A.host4, port);
    let (_, a6) = A.v6.unwrap();
    assert_psql(&pg, &A, a6, port);
    finish_pgbench(spawn_pgbench(&pg, &A, port, 2));

    // The denied host: its SYNs are dropped, over IPv4 and IPv6, and never reach the listener.
    let before = stats_json(stats);
    assert_no_answer(&D, v4(D.host4, port));
    let (_, d6) = D.v6.unwrap();
    assert_no_answer(&D, SocketAddr::new(d6.parse().unwrap(), port));
    let after = stats_json(stats);
    assert_eq!(
        accepted(&after),
        accepted(&before),
        "the listener accepted a denied client"
    );
    let denied = port_counter(&after, port, "denied") - port_counter(&before, port, "denied");
    assert!(denied >= 2, "denied SYNs counted: {denied}");
    // A port no rule names is not filtered: the denied host's SYN there is answered (by a RST,
    // nothing listens on it).
    let err = connect_from(&D, v4(D.host4, free_tcp_port())).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");

    // The stats port obeys its own rule: A may read it, B (allowed to the listener) may not.
    let page = in_ns(A.ns, || get_ok(v4(A.host4, stats), "/;json"));
    assert!(page.contains("\"xdp\""), "{page}");
    assert_no_answer(&B, v4(B.host4, stats));
    connect_from(&B, v4(B.host4, port)).expect("B reaches the listener");

    // Counted per rule, typed for bpftool.
    let json = stats_json(stats);
    assert!(rule_counter(&json, 0, "passed") > 0);
    assert!(rule_counter(&json, 1, "passed") > 0, "B's connect");
    let metrics = get_ok(SocketAddr::from(([127, 0, 0, 1], stats)), "/metrics");
    let denied_line =
        format!("patroxy_xdp_port_packets_total{{port=\"{port}\",verdict=\"denied\"}}");
    assert!(metrics.contains(&denied_line), "{metrics}");
    let attached_line = format!(
        "patroxy_xdp_attached{{interface=\"{}\",mode=\"tc\"}} 1",
        A.veth
    );
    assert!(metrics.contains(&attached_line), "{metrics}");
    let dump = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(pin.join("xdp/PORT_COUNTERS"))
        .output()
        .expect("bpftool ran");
    let dump = String::from_utf8_lossy(&dump.stdout);
    assert!(
        dump.contains("\"denied\"") && dump.contains("\"syn_limited\""),
        "bpftool shows the counters' fields: {dump}"
    );

    // A clean stop detaches the program and removes the pins.
    drop(proxy);
    for h in HOSTS {
        assert_eq!(allowlist_program(h.veth), None, "left on {}", h.veth);
    }
    assert!(!pin.join("xdp").exists(), "pins left behind");
    remove_pin_path(&pin);
}

#[test]
fn a_reload_allows_a_denied_host_without_cutting_the_allowed_one() {
    if !require_root("a_reload_allows_a_denied_host_without_cutting_the_allowed_one") {
        return;
    }
    let _lab = Lab::up();
    let pg = start_pg();
    let pin = Patroxy::unique_pin_path("xdp-reload");
    let mut config = config(&pin, &pg, Bpf::Off);
    // Native mode here (`auto` takes tc on a veth): the XDP program as a physical NIC runs it.
    config.xdp.as_mut().expect("xdp").mode = Some("native".into());
    let (port, stats) = ports(&config);
    let proxy = Patroxy::start("xdp-reload", &config);
    for h in HOSTS {
        assert_eq!(
            attached_mode(h.veth),
            Some(XDP_ATTACHED_NATIVE),
            "{}",
            h.veth
        );
    }
    assert_no_answer(&D, v4(D.host4, port));

    // A's session and pgbench run across the reload.
    let mut session = client(&pg, &A, "psql", A.host4, port);
    session
        .args([
            "-X",
            "-At",
            "-d",
            "postgres",
            "-c",
            "SELECT pg_sleep(3)",
            "-c",
            "SELECT 7",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let session = session.spawn().expect("spawn psql");
    let bench = spawn_pgbench(&pg, &A, port, 4);
    std::thread::sleep(Duration::from_millis(500));

    config.allow[0].from.push("10.214.2.0/24".into());
    std::fs::write(&proxy.config_path, config.to_toml()).unwrap();
    let out = run_with_timeout(
        Command::new(patroxy_bin())
            .args(["reload", "--config"])
            .arg(&proxy.config_path),
        Duration::from_secs(20),
    )
    .expect("patroxy reload ran");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("allow rule 0"), "{said}");

    assert_psql(&pg, &D, D.host4, port);
    let session = session.wait_with_output().expect("psql ran");
    assert!(
        session.status.success() && String::from_utf8_lossy(&session.stdout).ends_with("7\n"),
        "A's session: {}",
        String::from_utf8_lossy(&session.stderr)
    );
    finish_pgbench(bench);
    // Still attached, never replaced: the rules changed in the maps.
    assert!(attached_program(A.veth).is_some());
    let json = stats_json(stats);
    assert!(rule_counter(&json, 0, "passed") > 0);
    drop(proxy);
    remove_pin_path(&pin);
}

#[test]
fn a_syn_flood_is_held_to_its_rate_while_another_host_works() {
    if !require_root("a_syn_flood_is_held_to_its_rate_while_another_host_works") {
        return;
    }
    let hping = Command::new("hping3").arg("--version").output();
    assert!(
        hping.is_ok(),
        "hping3 is missing: apt-get install hping3 (cargo xtask setup installs it)"
    );
    let _lab = Lab::up();
    let pg = start_pg();
    let pin = Patroxy::unique_pin_path("xdp-flood");
    let mut config = config(&pin, &pg, Bpf::Off);
    let (rate, burst) = (100_u64, 50_u64);
    if let Some(x) = config.xdp.as_mut() {
        x.syn_rate = Some(rate as u32);
        x.syn_burst = Some(burst as u32);
    }
    let (port, stats) = ports(&config);
    let proxy = Patroxy::start("xdp-flood", &config);

    let bench = spawn_pgbench(&pg, &A, port, 4);
    std::thread::sleep(Duration::from_millis(300));
    let before = stats_json(stats);
    let started = Instant::now();
    // As fast as hping3 goes, for 2 s: SYNs from B's address to the listener.
    let flood = Command::new("ip")
        .args(["netns", "exec", B.ns, "timeout", "-s", "INT", "2"])
        .args([
            "hping3",
            "--flood",
            "-q",
            "-S",
            "-p",
            &port.to_string(),
            B.host4,
        ])
        .output()
        .expect("hping3 ran");
    let secs = started.elapsed().as_secs_f64();
    let after = stats_json(stats);
    let transactions = finish_pgbench(bench);

    let limited = rule_counter(&after, 1, "syn_limited") - rule_counter(&before, 1, "syn_limited");
    let passed = rule_counter(&after, 1, "passed") - rule_counter(&before, 1, "passed");
    // Each SYN that passes is answered and B's kernel, which did not send it, resets it: two
    // packets per SYN let through.
    let allowed_syns = rate as f64 * secs + burst as f64;
    assert!(
        (passed as f64) <= 2.0 * allowed_syns + 20.0,
        "{passed} packets of B passed in {secs:.1}s; the rate allows {allowed_syns:.0} SYNs"
    );
    assert!(
        limited > 10 * passed,
        "the flood was not held back: {limited} SYNs dropped, {passed} passed ({})",
        String::from_utf8_lossy(&flood.stderr)
    );
    assert_eq!(
        port_counter(&after, port, "syn_limited") - port_counter(&before, port, "syn_limited"),
        limited
    );
    assert_eq!(
        rule_counter(&after, 0, "syn_limited"),
        0,
        "A was never limited"
    );
    eprintln!(
        "SYN flood: {limited} SYNs dropped and {passed} packets of B passed in {secs:.1}s \
         (rate {rate}/s, burst {burst}); A's pgbench: {transactions} transactions, 0 failed"
    );
    drop(proxy);
    remove_pin_path(&pin);
}

#[test]
fn a_crash_leaves_the_program_attached_and_the_next_start_replaces_it() {
    if !require_root("a_crash_leaves_the_program_attached_and_the_next_start_replaces_it") {
        return;
    }
    // `auto`: the tc program's tcx link.
    crash_and_restart(
        None,
        |veth| tc_programs(veth).first().map(|(id, _)| *id),
        None,
    );
}

#[test]
fn a_crash_in_generic_mode_leaves_the_xdp_program_and_the_next_start_replaces_it() {
    if !require_root(
        "a_crash_in_generic_mode_leaves_the_xdp_program_and_the_next_start_replaces_it",
    ) {
        return;
    }
    // After the second crash, a start in tc mode: the XDP link left behind goes.
    crash_and_restart(
        Some("generic"),
        |veth| {
            assert_eq!(attached_mode(veth), Some(XDP_ATTACHED_GENERIC), "{veth}");
            attached_program(veth)
        },
        Some("tc"),
    );
}

/// Starts patroxy in `mode`, kills it, checks that the allowlist stayed attached (`program`:
/// the id of what `mode` attaches to a veth) and enforcing, and that the next start replaces
/// it; then, killed again, that a start in the tc mode `switch_to` names replaces it with the
/// tc program (and is killed in turn), and that a start with XDP off detaches what is left.
fn crash_and_restart(
    mode: Option<&str>,
    program: impl Fn(&str) -> Option<u64>,
    switch_to: Option<&str>,
) {
    let _lab = Lab::up();
    let pg = start_pg();
    let pin = Patroxy::unique_pin_path("xdp-crash");
    let mut config = config(&pin, &pg, Bpf::Off);
    config.xdp.as_mut().expect("xdp").mode = mode.map(Into::into);
    let (port, _) = ports(&config);
    let mut first = Patroxy::start("xdp-crash", &config);
    let before = program(A.veth).expect("attached");
    first.child.signal(libc::SIGKILL).unwrap();
    first.child.wait().unwrap();
    drop(first);

    // Still attached, still enforcing, with no daemon.
    assert_eq!(program(A.veth), Some(before));
    assert_no_answer(&D, v4(D.host4, port));

    let second = Patroxy::start("xdp-crash", &config);
    assert!(
        second
            .log()
            .contains("replaced the allowlist a previous run left attached"),
        "{}",
        second.log()
    );
    let after = program(A.veth).expect("attached");
    assert_ne!(after, before, "the new program replaced the old one");
    assert_psql(&pg, &A, A.host4, port);
    assert_no_answer(&D, v4(D.host4, port));

    // Crashed again, then started with XDP off: what was left is detached, not kept.
    let mut second = second;
    second.child.signal(libc::SIGKILL).unwrap();
    second.child.wait().unwrap();
    drop(second);
    assert!(program(A.veth).is_some());
    if let Some(tc) = switch_to {
        let mut switched = config.clone();
        switched.xdp.as_mut().unwrap().mode = Some(tc.into());
        let mut switched = Patroxy::start("xdp-crash", &switched);
        assert!(
            switched.log().contains("and the mode changed"),
            "{}",
            switched.log()
        );
        for h in HOSTS {
            assert_eq!(attached_program(h.veth), None, "XDP left on {}", h.veth);
            assert_eq!(tc_programs(h.veth).len(), 1, "tc on {}", h.veth);
        }
        assert_psql(&pg, &A, A.host4, port);
        assert_no_answer(&D, v4(D.host4, port));
        switched.child.signal(libc::SIGKILL).unwrap();
        switched.child.wait().unwrap();
    }
    let mut off = config.clone();
    off.xdp.as_mut().unwrap().enabled = Some(Bpf::Off);
    let third = Patroxy::start("xdp-crash", &off);
    for h in HOSTS {
        assert_eq!(allowlist_program(h.veth), None, "left on {}", h.veth);
    }
    assert!(
        third
            .log()
            .contains("detached the allowlist a previous run left attached"),
        "{}",
        third.log()
    );
    drop(third);
    remove_pin_path(&pin);
}

/// A packet the tc program lets through goes on to the next program in the interface's tcx
/// chain (TC_ACT_UNSPEC), not straight to the stack: a second daemon, attached in front of the
/// first (`first` in the chain) and protecting other ports, must not let D through to the
/// first one's port, which only the first daemon's program drops.
#[test]
fn the_tc_program_leaves_other_packets_to_the_next_program_in_the_chain() {
    if !require_root("the_tc_program_leaves_other_packets_to_the_next_program_in_the_chain") {
        return;
    }
    let _lab = Lab::up();
    let pg = start_pg();
    let (pin1, pin2) = (
        Patroxy::unique_pin_path("xdp-chain-1"),
        Patroxy::unique_pin_path("xdp-chain-2"),
    );
    let (config1, config2) = (config(&pin1, &pg, Bpf::Off), config(&pin2, &pg, Bpf::Off));
    let ((port1, _), (port2, _)) = (ports(&config1), ports(&config2));
    let first = Patroxy::start("xdp-chain-1", &config1);
    let second = Patroxy::start("xdp-chain-2", &config2);
    let chain = tc_programs(A.veth);
    // Loaded later, so a higher id: the second daemon's program runs first.
    assert!(
        matches!(&chain[..], [(newer, _), (older, _)] if newer > older),
        "{chain:?}"
    );
    assert_no_answer(&D, v4(D.host4, port1));
    assert_no_answer(&D, v4(D.host4, port2));
    connect_from(&A, v4(A.host4, port1)).expect("A reaches the first daemon");
    connect_from(&A, v4(A.host4, port2)).expect("A reaches the second daemon");
    drop(second);
    assert_eq!(
        tc_programs(A.veth).len(),
        1,
        "the second daemon's link is gone"
    );
    assert_no_answer(&D, v4(D.host4, port1));
    drop(first);
    assert!(tc_programs(A.veth).is_empty());
    remove_pin_path(&pin1);
    remove_pin_path(&pin2);
}

/// The pid of the daemon whose stats server answers on `stats`, if one does.
fn daemon_pid(stats: u16) -> Option<u32> {
    use std::io::{Read as _, Write as _};
    let mut s = TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], stats))).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET /;json HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    let json = &body[body.find("\r\n\r\n")? + 4..];
    serde_json::from_str::<serde_json::Value>(json).ok()?["pid"]
        .as_u64()
        .map(|p| p as u32)
}

/// Whether `pid` is gone (or a zombie its new parent has not reaped yet).
fn exited(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with('Z')))
        .unwrap_or(true)
}

fn wait_exited(pid: u32, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !exited(pid) {
        assert!(Instant::now() < deadline, "pid {pid} still runs");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Stops whichever daemon answers on the stats port when the test ends: an upgrade's successor
/// is not the test's child.
struct StopLast(u16);

impl Drop for StopLast {
    fn drop(&mut self) {
        if let Some(pid) = daemon_pid(self.0) {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while !exited(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// An upgrade (`patroxy upgrade`) and then a structural reload hand the attached allowlist to
/// a successor (which runs without capabilities): the same program stays attached throughout,
/// D never gets an answer, A's session and pgbench run across both and A's new connects
/// succeed; the successor's new rules are in force and the counters go on. A SIGUSR2 with a
/// changed `[xdp]` is refused and the daemon runs on; the last daemon's stop detaches.
#[test]
fn upgrades_and_structural_reloads_keep_the_allowlist_attached() {
    if !require_root("upgrades_and_structural_reloads_keep_the_allowlist_attached") {
        return;
    }
    let _lab = Lab::up();
    let pg = start_pg();
    let pin = Patroxy::unique_pin_path("xdp-handover");
    let mut config = config(&pin, &pg, Bpf::Required);
    let (port, stats) = ports(&config);
    let mut first = Patroxy::start("xdp-handover", &config);
    let _stop_last = StopLast(stats);
    let program = allowlist_program(A.veth).expect("attached");
    let attached_throughout = || {
        for h in HOSTS {
            assert_eq!(allowlist_program(h.veth), Some(program), "on {}", h.veth);
        }
    };

    // Interfaces changed: the successor refuses, the daemon runs on as it was.
    let mut narrowed = config.clone();
    narrowed.xdp.as_mut().unwrap().interfaces.pop();
    std::fs::write(&first.config_path, narrowed.to_toml()).unwrap();
    first.child.signal(libc::SIGUSR2).unwrap();
    assert!(
        first.wait_for_log("upgrade failed, running on", Duration::from_secs(20)),
        "{}",
        first.log()
    );
    assert!(first.log().contains("needs a restart"), "{}", first.log());
    std::fs::write(&first.config_path, config.to_toml()).unwrap();
    attached_throughout();
    assert_eq!(daemon_pid(stats), Some(first.child.id()));
    assert_no_answer(&D, v4(D.host4, port));
    assert_psql(&pg, &A, A.host4, port);

    // A structural reload whose successor adopts the allowlist, writes rules that allow D, then
    // cannot bind its new listener (PostgreSQL's port): the rules D is denied by are back.
    let mut failing = config.clone();
    failing.allow[0].from.push("10.214.2.0/24".into());
    failing
        .listeners
        .push(ListenerConfig::new("postgres_taken", pg.addr(), ["pg1"]));
    std::fs::write(&first.config_path, failing.to_toml()).unwrap();
    let out = run_with_timeout(
        Command::new(patroxy_bin())
            .args(["reload", "--config"])
            .arg(&first.config_path),
        Duration::from_secs(30),
    )
    .expect("patroxy reload ran");
    assert!(!out.status.success(), "the successor could not bind");
    assert!(
        first
            .log()
            .contains("the running daemon's rules written back"),
        "{}",
        first.log()
    );
    std::fs::write(&first.config_path, config.to_toml()).unwrap();
    attached_throughout();
    assert_no_answer(&D, v4(D.host4, port));
    assert_psql(&pg, &A, A.host4, port);

    // A's session and pgbench run across the upgrade and the reload.
    let mut session = client(&pg, &A, "psql", A.host4, port);
    session
        .args(["-X", "-At", "-d", "postgres"])
        .args(["-c", "SELECT pg_sleep(5)", "-c", "SELECT 7"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let session = session.spawn().expect("spawn psql");
    let bench = spawn_pgbench(&pg, &A, port, 6);
    std::thread::sleep(Duration::from_millis(500));

    let before = stats_json(stats);
    let out = run_with_timeout(
        Command::new(patroxy_bin()).args([
            "upgrade",
            "--url",
            &format!("http://127.0.0.1:{stats}"),
            "--timeout",
            "20s",
        ]),
        Duration::from_secs(30),
    )
    .expect("patroxy upgrade ran");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    first.child.wait().unwrap();
    assert!(
        first.log().contains("XDP allowlist taken over"),
        "{}",
        first.log()
    );
    // The old process is gone; its program and links are not.
    attached_throughout();
    assert!(pin.join(format!("xdp/tc_{}", A.veth)).exists());
    assert_no_answer(&D, v4(D.host4, port));
    assert_psql(&pg, &A, A.host4, port);
    let upgraded = stats_json(stats);
    for what in ["passed", "denied"] {
        assert!(
            port_counter(&upgraded, port, what) > port_counter(&before, port, what),
            "{what} did not move across the upgrade"
        );
    }

    // A structural reload (a new listener) whose rules allow A to it too.
    let upgraded_pid = daemon_pid(stats).expect("the successor answers");
    let read_port = free_tcp_port();
    config.listeners.push(ListenerConfig::new(
        "postgres_read",
        SocketAddr::new("::".parse().unwrap(), read_port),
        ["pg1"],
    ));
    config.allow[0]
        .to
        .push(PortRef::Name("postgres_read".into()));
    std::fs::write(&first.config_path, config.to_toml()).unwrap();
    let out = run_with_timeout(
        Command::new(patroxy_bin())
            .args(["reload", "--config"])
            .arg(&first.config_path),
        Duration::from_secs(30),
    )
    .expect("patroxy reload ran");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    wait_exited(upgraded_pid, Duration::from_secs(20));
    attached_throughout();
    assert_psql(&pg, &A, A.host4, read_port);
    assert_psql(&pg, &A, A.host4, port);
    assert_no_answer(&D, v4(D.host4, read_port));
    assert_no_answer(&D, v4(D.host4, port));
    let reloaded = stats_json(stats);
    for what in ["passed", "denied"] {
        assert!(
            port_counter(&reloaded, port, what) > port_counter(&upgraded, port, what),
            "{what} did not move across the reload"
        );
    }
    assert!(port_counter(&reloaded, read_port, "passed") > 0);

    let session = session.wait_with_output().expect("psql ran");
    assert!(
        session.status.success() && String::from_utf8_lossy(&session.stdout).ends_with("7\n"),
        "A's session: {}",
        String::from_utf8_lossy(&session.stderr)
    );
    finish_pgbench(bench);

    // The last daemon's stop detaches everywhere and removes the pins.
    let last = daemon_pid(stats).expect("the reload's successor answers");
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(last as libc::pid_t, libc::SIGTERM) };
    wait_exited(last, Duration::from_secs(20));
    for h in HOSTS {
        assert_eq!(allowlist_program(h.veth), None, "left on {}", h.veth);
    }
    assert!(!pin.join("xdp").exists(), "pins left behind");
    drop(first);
    remove_pin_path(&pin);
}

/// The cluster harness (and so the demo) rewrites the shipped file's rule for its own clients; patroxy's
/// `check-config` takes what it writes.
#[test]
fn the_cluster_harness_config_carries_a_valid_allow_rule() {
    use patroxy_tests::cluster::{patroni::Node, proxy::patroxy_config};
    let nodes: Vec<Node> = (1..=3)
        .map(|i| Node {
            index: i,
            name: format!("pg-sv0{i}"),
            ns: format!("ptx-pg{i}"),
            ip: format!("10.213.77.1{i}"),
            dir: std::env::temp_dir(),
        })
        .collect();
    let text = patroxy_config(
        &nodes,
        (5432, 5433, 7000),
        Bpf::Off,
        Path::new("/sys/fs/bpf/x"),
    )
    .unwrap();
    assert!(
        text.contains("[[allow]]\nfrom = [\"127.0.0.0/8\"]\n"),
        "{text}"
    );
    let file = std::env::temp_dir().join(format!("xdp-harness-{}.toml", std::process::id()));
    std::fs::write(&file, &text).unwrap();
    let out = Command::new(patroxy_bin())
        .arg("check-config")
        .arg(&file)
        .output()
        .expect("patroxy check-config ran");
    let _ = std::fs::remove_file(&file);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Where XDP cannot attach (native mode on loopback, whose driver has none): `auto` says so in
/// one line and serves without it, `required` refuses to start; neither leaves a pin behind.
#[test]
fn auto_falls_back_and_required_refuses_where_xdp_cannot_attach() {
    if !require_root("auto_falls_back_and_required_refuses_where_xdp_cannot_attach") {
        return;
    }
    let pin = Patroxy::unique_pin_path("xdp-unavailable");
    let mut config = ProxyConfig::new(Defaults::new(
        Duration::from_secs(60),
        Duration::from_secs(2),
    ))
    .data_path(Bpf::Off, &pin)
    .server(ServerConfig::new(
        "pg1",
        SocketAddr::from(([127, 0, 0, 1], free_tcp_port())),
    ))
    .listener(ListenerConfig::new(
        "postgres_write",
        SocketAddr::from(([127, 0, 0, 1], free_tcp_port())),
        ["pg1"],
    ))
    .allow(AllowConfig::new(
        &["127.0.0.0/8"],
        vec![PortRef::Name("postgres_write".into())],
    ))
    .xdp(XdpConfig {
        enabled: Some(Bpf::Auto),
        interfaces: vec!["lo".into()],
        mode: Some("native".into()),
        syn_rate: None,
        syn_burst: None,
    });
    let proxy = Patroxy::start("xdp-auto", &config);
    assert_eq!(
        proxy.count_log("XDP allowlist not attached"),
        1,
        "{}",
        proxy.log()
    );
    assert!(proxy.log().contains("native mode"), "{}", proxy.log());
    assert!(
        !pin.join("xdp").exists() && !pin.exists(),
        "pins left by the fallback"
    );
    drop(proxy);

    config.xdp.as_mut().unwrap().enabled = Some(Bpf::Required);
    let file = std::env::temp_dir().join(format!("xdp-required-{}.toml", std::process::id()));
    std::fs::write(&file, config.to_toml()).unwrap();
    let out = run_with_timeout(
        Command::new(patroxy_bin())
            .args(["run", "--config"])
            .arg(&file),
        Duration::from_secs(20),
    )
    .expect("patroxy ran");
    let _ = std::fs::remove_file(&file);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started without XDP: {stderr}");
    assert!(
        stderr.contains("XDP allowlist (xdp enabled = \"required\")") && stderr.contains("lo"),
        "{stderr}"
    );
    assert!(!pin.exists(), "pins left by the refusal");
}
