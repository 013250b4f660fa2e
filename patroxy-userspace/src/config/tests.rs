//! The shipped patroxy.toml, the fixture folders, and the defaults/merging rules.
use std::{fs, net::SocketAddr, path::PathBuf, time::Duration};

use super::*;

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixtures(kind: &str) -> Vec<PathBuf> {
    let dir = manifest_dir().join("src/config/fixtures").join(kind);
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no fixtures in {}", dir.display());
    files
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

#[test]
fn shipped_config_matches_the_seed_haproxy_setup() {
    let config = load(&manifest_dir().join("../patroxy.toml")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.global.maxconn, 2000);
    assert_eq!(config.global.bpf, BpfMode::Auto);
    assert_eq!(config.global.pin_path, PathBuf::from("/sys/fs/bpf/patroxy"));
    assert_eq!(
        (config.global.bpf_log, config.global.bpf_log_rate),
        (false, 100)
    );
    assert_eq!(config.global.session_log_rate, 100);
    assert_eq!(
        (
            config.global.cancel_rate,
            config.global.cancel_rate_per_client
        ),
        (200, 20)
    );
    assert_eq!(config.defaults.timeout_startup, secs(10));
    let d = &config.defaults;
    assert_eq!((d.retries, d.redispatch), (2, false));
    assert_eq!(
        (d.timeout_client, d.timeout_server),
        (secs(1800), secs(1800))
    );
    assert_eq!(
        (d.timeout_connect, d.timeout_check, d.timeout_queue),
        (secs(4), None, secs(4))
    );
    let stats = config.stats.as_ref().expect("stats");
    assert_eq!((stats.bind, stats.refresh), (sa("0.0.0.0:7000"), secs(5)));
    assert_eq!(
        stats.admin,
        AdminAccess::Local,
        "only this host may set server states"
    );
    assert_eq!(stats.maxconn, 64);

    let [write, read] = &config.listeners[..] else {
        panic!("two listeners expected")
    };
    assert_eq!(
        (write.name.as_str(), write.bind, write.balance),
        ("postgres_write", sa("0.0.0.0:5432"), Balance::First)
    );
    assert_eq!(
        (read.name.as_str(), read.bind, read.balance),
        ("postgres_read", sa("0.0.0.0:5433"), Balance::RoundRobin)
    );
    let wc = write.check.as_ref().unwrap();
    assert_eq!(
        (
            wc.method,
            wc.path.as_str(),
            wc.expect_status,
            wc.authoritative
        ),
        (CheckMethod::Get, "/primary", 200, true)
    );
    assert_eq!(wc.tls, None);
    assert_eq!(read.check.as_ref().unwrap().path, "/replica");

    for l in &config.listeners {
        let names: Vec<&str> = l.servers.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["pg-sv01", "pg-sv02", "pg-sv03"]);
        for (s, ip) in l.servers.iter().zip(104..) {
            assert_eq!(s.address, sa(&format!("10.100.100.{ip}:5432")));
            assert_eq!(s.check_addr, sa(&format!("10.100.100.{ip}:8008")));
            assert_eq!(s.maxconn, Some(200));
            let timing = CheckTiming {
                inter: secs(1),
                fastinter: Duration::from_millis(250),
                downinter: secs(1),
                fall: 3,
                rise: 2,
            };
            assert_eq!(s.timing, timing);
            assert_eq!(s.on_marked_down, OnMarkedDown::ShutdownSessions);
            assert_eq!(s.on_marked_up, OnMarkedUp::Nothing);
            assert_eq!(s.init_state, InitState::Down);
        }
    }

    // The seed's UFW rule, not enforced until [xdp] names the host's NIC.
    let fw = &config.firewall;
    assert_eq!(
        fw.rules,
        [AllowRule {
            from: vec!["10.100.100.0/24".parse().unwrap()],
            ports: vec![5432, 5433, 7000],
        }]
    );
    assert_eq!(
        (
            fw.xdp.enabled,
            &fw.xdp.interfaces[..],
            fw.xdp.mode,
            fw.xdp.syn_limit
        ),
        (
            XdpEnabled::Off,
            &["eth0".to_string()][..],
            XdpMode::Auto,
            None
        )
    );
}

#[test]
fn allow_rules_resolve_names_and_xdp_takes_its_settings() {
    let config = load(&manifest_dir().join("src/config/fixtures/valid/allow_and_xdp.toml"))
        .unwrap_or_else(|e| panic!("{e}"));
    let fw = &config.firewall;
    let from: Vec<String> = fw.rules[0].from.iter().map(ToString::to_string).collect();
    assert_eq!(from, ["10.100.100.0/24", "192.0.2.7/32", "fd14::/64"]);
    assert_eq!(fw.rules[0].ports, [5432, 7000]);
    assert_eq!(fw.rules[1].ports, [5433]);
    assert_eq!(fw.protected_ports(), [5432, 5433, 7000]);
    assert_eq!(
        (fw.xdp.enabled, &fw.xdp.interfaces[..], fw.xdp.mode),
        (XdpEnabled::Auto, &["lo".to_string()][..], XdpMode::Generic)
    );
    assert_eq!(
        fw.xdp.syn_limit,
        Some(SynRate {
            rate: 200,
            burst: 400
        })
    );
}

#[test]
fn xdp_mode_tc_is_the_tc_program() {
    let config = load(&manifest_dir().join("src/config/fixtures/valid/xdp_tc.toml"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.firewall.xdp.mode, XdpMode::Tc);
}

#[test]
fn an_allow_rule_change_reloads_in_place_and_an_interface_change_needs_a_restart() {
    let path = manifest_dir().join("src/config/fixtures/valid/allow_and_xdp.toml");
    let old = load(&path).unwrap();
    let mut new = old.clone();
    new.firewall.rules[1]
        .from
        .push("10.214.0.0/16".parse().unwrap());
    let d = diff::diff(&old, &new).unwrap();
    assert_eq!(
        d.changes,
        [
            "allow rule 1: from 10.100.100.0/24 to [5433] -> from 10.100.100.0/24,10.214.0.0/16 to [5433]"
        ]
    );
    new.firewall.xdp.interfaces.push("eth0".into());
    let err = diff::diff(&old, &new).unwrap_err();
    assert!(err.to_string().contains("xdp.interfaces"), "{err}");
}

#[test]
fn valid_fixtures_load() {
    for path in fixtures("valid") {
        if let Err(e) = load(&path) {
            panic!("{} should load:\n{e}", path.display());
        }
    }
}

/// Each invalid fixture starts with `# expect: <substring>` and `# at: L:C`.
#[test]
fn invalid_fixtures_fail_where_and_how_they_say() {
    let mut failures = Vec::new();
    for path in fixtures("invalid") {
        let text = fs::read_to_string(&path).unwrap();
        let mut lines = text.lines();
        let expect = lines.next().and_then(|l| l.strip_prefix("# expect: "));
        let at = lines.next().and_then(|l| l.strip_prefix("# at: "));
        let (Some(expect), Some(at)) = (expect, at) else {
            panic!(
                "{}: first lines must be `# expect: ...` and `# at: L:C`",
                path.display()
            );
        };
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        match parse(&text, &name) {
            Ok(_) => failures.push(format!("{name}: loaded, expected an error")),
            Err(e) => {
                let msg = e.to_string();
                if !msg.contains(expect) || !msg.contains(&format!("{name}:{at}: ")) {
                    failures.push(format!("{name}: want `{expect}` at {at}, got:\n  {msg}"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn everything_fixture_values() {
    let config = load(&manifest_dir().join("src/config/fixtures/valid/everything.toml")).unwrap();
    assert_eq!(config.global.bpf, BpfMode::Required);
    assert_eq!(
        (config.global.bpf_log, config.global.bpf_log_rate),
        (true, 50)
    );
    assert_eq!(config.defaults.timeout_server, secs(5400));
    assert_eq!(config.defaults.timeout_queue, secs(1));
    let leader = &config.listeners[0];
    // No balance given; /leader is a write-side path.
    assert_eq!(leader.balance, Balance::First);
    let check = leader.check.as_ref().unwrap();
    assert_eq!(
        (check.method, check.authoritative),
        (CheckMethod::Head, false)
    );
    let tls = check.tls.as_ref().unwrap();
    assert_eq!(
        tls.client_key,
        Some(PathBuf::from("src/config/fixtures/tls/client-key.pem"))
    );
    let [v4, v6, named] = &leader.servers[..] else {
        panic!()
    };
    assert_eq!(
        (v4.maxconn, v4.check_addr),
        (Some(50), sa("192.0.2.10:8008"))
    );
    assert_eq!(
        (v6.maxconn, v6.check_addr),
        (Some(100), sa("[2001:db8::11]:8443"))
    );
    assert_eq!(named.check_addr, sa("127.0.0.1:8008"));
    assert_eq!(named.address.port(), 5432);
    let t = v4.timing;
    assert_eq!(
        (t.inter, t.fastinter, t.downinter, t.fall, t.rise),
        (secs(1), Duration::from_millis(500), secs(10), 2, 1)
    );
    assert_eq!(
        (v4.on_marked_up, v4.init_state),
        (OnMarkedUp::ShutdownBackupSessions, InitState::Up)
    );
    let replicas = &config.listeners[1];
    assert_eq!(replicas.balance, Balance::LeastConn);
    assert_eq!(replicas.check.as_ref().unwrap().path, "/replica?lag=16MB");
    assert_eq!(config.listeners[2].check, None);
    let stats = config.stats.as_ref().unwrap();
    assert_eq!((stats.refresh, stats.admin), (secs(5), AdminAccess::Any));
    assert_eq!(stats.maxconn, 8);
    assert_eq!(stats.admin_token, None);
    let runtime = config.runtime.as_ref().unwrap();
    assert_eq!(
        (
            runtime.socket.as_path(),
            runtime.mode,
            runtime.uid,
            runtime.gid,
            runtime.maxconn
        ),
        (
            std::path::Path::new("/run/patroxy-test/patroxy.sock"),
            0o600,
            Some(0),
            Some(0),
            4
        )
    );
}

#[test]
fn a_bare_runtime_section_takes_the_defaults() {
    let config =
        load(&manifest_dir().join("src/config/fixtures/valid/runtime_defaults.toml")).unwrap();
    let runtime = config.runtime.unwrap();
    assert_eq!(runtime.socket, PathBuf::from("/run/patroxy/patroxy.sock"));
    assert_eq!(
        (runtime.mode, runtime.uid, runtime.gid),
        (0o660, None, None)
    );
    assert_eq!(runtime.maxconn, 8);
}

#[test]
fn defaults_follow_haproxy_but_check_faster() {
    let config = load(&manifest_dir().join("src/config/fixtures/valid/minimal.toml")).unwrap();
    assert_eq!(config.global.maxconn, 2000);
    assert_eq!(config.global.bpf, BpfMode::Auto);
    assert_eq!(
        (config.global.bpf_log, config.global.bpf_log_rate),
        (false, 100)
    );
    assert_eq!(
        (config.defaults.retries, config.defaults.timeout_check),
        (3, None)
    );
    assert_eq!(config.stats, None);
    let l = &config.listeners[0];
    // No check: servers are always up and reads spread.
    assert_eq!((l.balance, &l.check), (Balance::RoundRobin, &None));
    let s = &l.servers[0];
    // check_port defaults to the traffic port, like HAProxy.
    assert_eq!((s.check_addr, s.maxconn), (sa("127.0.0.1:5432"), None));
    let t = s.timing;
    assert_eq!(
        (t.inter, t.fastinter, t.downinter, t.fall, t.rise),
        (secs(1), Duration::from_millis(250), secs(1), 3, 2),
        "patroxy's defaults: inter 1s (HAProxy: 2s), fastinter 250ms (HAProxy: inter)"
    );
    assert_eq!(
        (s.on_marked_down, s.init_state),
        (OnMarkedDown::Nothing, InitState::Down)
    );
}

#[test]
fn fastinter_defaults_to_inter_when_inter_is_shorter() {
    let minimal =
        std::fs::read_to_string(manifest_dir().join("src/config/fixtures/valid/minimal.toml"))
            .unwrap();
    let timing = |default_server: &str| {
        let text = format!("{minimal}\n[default_server]\n{default_server}\n");
        parse(&text, "test.toml")
            .unwrap_or_else(|e| panic!("{e}"))
            .listeners[0]
            .servers[0]
            .timing
    };
    let t = timing("inter = \"100ms\"");
    assert_eq!(
        (t.inter, t.fastinter, t.downinter),
        (
            Duration::from_millis(100),
            Duration::from_millis(100),
            Duration::from_millis(100)
        ),
        "a fast interval slower than inter would slow the transitions down"
    );
    let t = timing("inter = \"3s\"");
    assert_eq!(
        (t.inter, t.fastinter, t.downinter),
        (secs(3), Duration::from_millis(250), secs(3))
    );
    let t = timing("inter = \"3s\"\nfastinter = \"1s\"\ndowninter = \"5s\"");
    assert_eq!((t.fastinter, t.downinter), (secs(1), secs(5)));
}

#[test]
fn role_based_balance_defaults() {
    let text =
        fs::read_to_string(manifest_dir().join("src/config/fixtures/valid/minimal.toml")).unwrap();
    for (path, want) in [
        ("/primary", Balance::First),
        ("/master", Balance::First),
        ("/read-write?x=1", Balance::First),
        ("/", Balance::First),
        ("/replica", Balance::RoundRobin),
        ("/read-only", Balance::RoundRobin),
        ("/primaryish", Balance::RoundRobin),
    ] {
        let config = parse(
            &format!("{text}[listener.check]\npath = {path:?}\n"),
            "t.toml",
        )
        .unwrap();
        assert_eq!(config.listeners[0].balance, want, "{path}");
    }
}

#[test]
fn dcs_section_takes_patronis_namespace_and_hides_the_password() {
    let path = manifest_dir().join("src/config/fixtures/valid/dcs.toml");
    let config = load(&path).unwrap_or_else(|e| panic!("{e}"));
    let dcs = config.dcs.as_ref().expect("[dcs]");
    assert_eq!(dcs.etcd, ["http://127.0.0.1:2379", "http://[::1]:2379"]);
    assert_eq!(
        (dcs.namespace.as_str(), dcs.scope.as_str()),
        ("/service", "demo"),
        "a trailing '/' of the namespace is dropped"
    );
    assert_eq!(dcs.burst_inter, Duration::from_millis(100));
    let auth = dcs.auth.as_ref().expect("auth");
    assert_eq!(
        (auth.user.as_str(), auth.password.as_str()),
        ("patroxy", "secret")
    );
    assert!(!format!("{config:?}").contains("secret"));
    let minimal = load(&manifest_dir().join("src/config/fixtures/valid/minimal.toml")).unwrap();
    assert_eq!(minimal.dcs, None, "no [dcs], no watch");
}

#[test]
fn all_problems_are_reported_in_file_order() {
    let text =
        fs::read_to_string(manifest_dir().join("src/config/fixtures/valid/minimal.toml")).unwrap();
    let text = text
        .replace("\"4s\"", "0")
        .replace("[\"pg1\"]", "[\"pg1\", \"nope\"]");
    let err = parse(&format!("[global]\nmaxconn = 0\n{text}"), "t.toml").unwrap_err();
    let lines: Vec<(usize, usize)> = err
        .diagnostics()
        .iter()
        .map(|d| (d.line, d.column))
        .collect();
    assert_eq!(lines, [(2, 11), (7, 19), (16, 19)], "{err}");
    assert_eq!(err.to_string().lines().count(), 3);
}

#[test]
fn io_errors_name_the_path() {
    let err = load(std::path::Path::new("/nonexistent/patroxy.toml")).unwrap_err();
    assert!(matches!(err, ConfigError::Io { .. }));
    assert!(
        err.to_string().starts_with("/nonexistent/patroxy.toml: "),
        "{err}"
    );
}
