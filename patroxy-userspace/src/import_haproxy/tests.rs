//! The importer end to end: HAProxy text in, patroxy's validated `Config` out.
use std::{path::PathBuf, time::Duration};

use super::*;
use crate::config::{AdminAccess, Balance, CheckMethod, OnMarkedDown};

fn fixture(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/haproxy")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The seed's haproxy.cfg converts with nothing lost into what the shipped patroxy.toml says,
/// but for the stats page's admin access: HAProxy's has no `stats admin`, so nobody may change
/// server states there ("off"), where the shipped file lets this host's users ("local"); and
/// for the check timings: the seed's `inter 3s` and `timeout check 5s` (with patroxy's default
/// fastinter), where the shipped file has patroxy's defaults.
#[test]
fn the_seed_converts_without_loss_into_the_shipped_config() {
    let import = import(&fixture("seed.cfg"), "haproxy.cfg", "patroxy.toml").unwrap();
    assert!(
        import.findings.is_empty(),
        "{:#?}\n{}",
        import.findings,
        import.toml
    );
    let imported = import
        .validation
        .as_ref()
        .unwrap_or_else(|e| panic!("{e}\n{}", import.toml));
    assert!(import.is_clean());
    let shipped = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../patroxy.toml");
    let mut expected = config::load(&shipped).unwrap();
    expected.stats.as_mut().unwrap().admin = config::AdminAccess::Off;
    expected.defaults.timeout_check = Some(Duration::from_secs(5));
    for server in expected.listeners.iter_mut().flat_map(|l| &mut l.servers) {
        server.timing.inter = Duration::from_secs(3);
        server.timing.downinter = Duration::from_secs(3);
        assert_eq!(server.timing.fastinter, Duration::from_millis(250));
    }
    assert_eq!(*imported, expected);
    assert!(
        import
            .toml
            .contains("maxconn = 2000  # haproxy.cfg:2: maxconn 2000"),
        "{}",
        import.toml
    );
}

/// The findings as `line: text` strings, to look for one by line and words.
fn lost(import: &Import) -> Vec<String> {
    import.findings.iter().map(ToString::to_string).collect()
}

fn assert_lost(import: &Import, line: usize, words: &str) {
    let lost = lost(import);
    assert!(
        lost.iter()
            .any(|l| l.starts_with(&format!("{line}: ")) && l.contains(words)),
        "no finding at line {line} with {words:?} in:\n{}",
        lost.join("\n")
    );
}

fn valid(import: &Import) -> &Config {
    import
        .validation
        .as_ref()
        .unwrap_or_else(|e| panic!("{e}\n{}", import.toml))
}

#[test]
fn frontends_route_to_their_backends_and_every_loss_is_reported() {
    let import = import(&fixture("variants.cfg"), "variants.cfg", "out.toml").unwrap();
    let config = valid(&import);
    assert!(!import.is_clean());
    let listeners: Vec<(&str, String)> = config
        .listeners
        .iter()
        .map(|l| (l.name.as_str(), l.bind.to_string()))
        .collect();
    assert_eq!(
        listeners,
        [
            ("writes", "0.0.0.0:5000".into()),
            ("writes_2", "[::1]:5000".into()),
            ("reads", "127.0.0.1:5001".into()),
        ]
    );
    let writes = &config.listeners[0];
    let names: Vec<&str> = writes.servers.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["pg1", "pg2"], "the backup server is left out");
    assert_eq!(writes.servers[0].check_addr.to_string(), "127.0.0.1:18008");
    let check = writes.check.as_ref().unwrap();
    assert_eq!(
        (check.method, check.path.as_str()),
        (CheckMethod::Options, "/primary")
    );
    let reads = &config.listeners[2];
    assert_eq!(reads.balance, Balance::LeastConn);
    let check = reads.check.as_ref().unwrap();
    assert_eq!(
        (check.method, check.path.as_str()),
        (CheckMethod::Get, "/replica?lag=16MB")
    );
    assert_eq!(check.expect_status, 200);
    let timing = writes.servers[0].timing;
    assert_eq!(
        (
            timing.inter,
            timing.fastinter,
            timing.downinter,
            timing.rise,
            timing.fall
        ),
        (secs(2), Duration::from_millis(500), secs(5), 3, 2)
    );
    assert_eq!(
        writes.servers[0].on_marked_down,
        OnMarkedDown::ShutdownSessions
    );
    let d = &config.defaults;
    assert_eq!(
        (d.retries, d.redispatch, d.timeout_client),
        (3, true, secs(3600))
    );
    assert_eq!(config.global.maxconn, 4000);
    let stats = config.stats.as_ref().unwrap();
    assert_eq!((stats.refresh, stats.admin), (secs(10), AdminAccess::Local));

    for (line, words) in [
        (5, "`daemon`: no meaning for patroxy"),
        (6, "unsupported: HAProxy's runtime socket"),
        (12, "`option dontlognull`: no meaning"),
        (23, "a listener of its own, `writes_2`"),
        (31, "backup"),
        (34, "`ssl`: unsupported: TLS termination"),
        (34, "`crt /etc/ssl/db.pem`"),
        (35, "conditional routing"),
        (43, "`weight 10`: unsupported"),
        (43, "`agent-check`: unsupported"),
        (43, "`agent-port 5555`"),
        (44, "`weight 20`"),
        (45, "server-template"),
        (47, "no bound frontend or listen routes to it"),
        (48, "its servers are not carried"),
        (57, "no authentication"),
    ] {
        assert_lost(&import, line, words);
    }
    let lines: Vec<usize> = import.findings.iter().map(|f| f.line).collect();
    assert!(!lines.contains(&13), "retries is carried: {lines:?}");
    assert!(
        import.toml.contains("# Not carried over exactly:"),
        "{}",
        import.toml
    );
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn convert(cfg: &str) -> Import {
    import(cfg, "haproxy.cfg", "out.toml").unwrap()
}

const DEFAULTS: &str =
    "defaults\n    timeout client 30m\n    timeout server 30m\n    timeout connect 4s\n";

#[test]
fn option_httpchk_alone_is_options_slash_and_bodies_are_not_matched() {
    let import = convert(&format!(
        "{DEFAULTS}listen db\n    bind 127.0.0.1:15000\n    option httpchk\n    http-check expect string running\n    server a 127.0.0.1:15432 check port 18008\n"
    ));
    let check = valid(&import).listeners[0].check.clone().unwrap();
    assert_eq!(
        (check.method, check.path.as_str(), check.expect_status),
        (CheckMethod::Options, "/", 200)
    );
    assert_lost(&import, 8, "approximated: expect_status = 200");
}

#[test]
fn per_backend_settings_patroxy_keeps_once_are_chosen_by_majority_and_reported() {
    let import = convert(&format!(
        "{DEFAULTS}listen a\n    bind 127.0.0.1:15000\n    timeout server 10m\n    server s1 127.0.0.1:15432 inter 1s\n\
         listen b\n    bind 127.0.0.1:15001\n    server s2 127.0.0.2:15432 inter 3s\n\
         listen c\n    bind 127.0.0.1:15002\n    server s3 127.0.0.3:15432 inter 3s check\n"
    ));
    let config = valid(&import);
    assert_eq!(config.defaults.timeout_server, secs(1800));
    assert_lost(&import, 7, "timeout_server = \"30m\" (not \"10m\")");
    // Only checked servers' timing counts: s3's.
    assert_eq!(config.listeners[2].servers[0].timing.inter, secs(3));
    assert!(
        import.findings.iter().all(|f| f.line != 8),
        "{:?}",
        lost(&import)
    );
}

#[test]
fn missing_timeouts_are_written_as_the_longest_and_reported() {
    let import = convert("listen a\n    bind 127.0.0.1:15000\n    server s1 127.0.0.1:15432\n");
    let config = valid(&import);
    assert_eq!(
        config.defaults.timeout_client,
        Duration::from_millis(i32::MAX as u64)
    );
    assert_lost(&import, 1, "`timeout client`: approximated: not set");
    assert!(config.listeners[0].check.is_none(), "no `check`: always UP");
}

#[test]
fn a_server_name_used_for_two_addresses_is_renamed() {
    let import = convert(&format!(
        "{DEFAULTS}listen a\n    bind 127.0.0.1:15000\n    server db 127.0.0.1:15432\n\
         listen b\n    bind 127.0.0.1:15001\n    server db 127.0.0.2:15432\n"
    ));
    let config = valid(&import);
    assert_eq!(config.listeners[1].servers[0].name, "b_db");
    assert_lost(&import, 10, "written as server `b_db`");
}

#[test]
fn tcp_checks_mode_http_and_https_checks() {
    let ca = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/config/fixtures/tls/ca.pem");
    let import = convert(&format!(
        "{DEFAULTS}listen tcpcheck\n    bind 127.0.0.1:15000\n    mode http\n    server a 127.0.0.1:15432 check\n\
         listen https\n    bind 127.0.0.1:15001\n    option httpchk GET /primary\n    \
         server b 127.0.0.2:15432 check check-ssl verify required ca-file {}\n",
        ca.display()
    ));
    let config = valid(&import);
    assert!(config.listeners[0].check.is_none());
    assert_lost(&import, 7, "patroxy forwards TCP");
    assert_lost(&import, 8, "a TCP check");
    let tls = config.listeners[1]
        .check
        .as_ref()
        .unwrap()
        .tls
        .as_ref()
        .unwrap();
    assert_eq!(tls.ca_file, ca);
}

#[test]
fn a_file_haproxy_would_refuse_is_an_error_with_its_line() {
    let error = import("global\n    maxconn 1\n    log \"/dev/log\n", "x", "y").unwrap_err();
    assert_eq!(error.line, 3);
}

#[test]
fn whatever_is_written_has_the_config_shape() {
    for cfg in [
        "",
        "frontend\n",
        "listen x\n  bind *:99999\n",
        "backend b\n  server a b\n",
    ] {
        let import = convert(cfg);
        config::parse_shape(&import.toml, "out.toml").unwrap_or_else(|e| panic!("{cfg:?}: {e}"));
        assert!(
            import.validation.is_err(),
            "{cfg:?}: no listener, no valid config"
        );
    }
}
