//! The shipped files an operator installs: the systemd unit and the example config.
use std::process::Command;

use patroxy_tests::process::{patroxy_bin, workspace_root};

/// dist/patroxy.service with ExecStart pointed at the real binary and config, written to a
/// directory of its own (`name`), which the caller removes.
fn unit_for_this_build(name: &str) -> std::path::PathBuf {
    let unit = std::fs::read_to_string(workspace_root().join("dist/patroxy.service")).unwrap();
    let bin = patroxy_bin();
    let dir = std::env::temp_dir().join(format!("patroxy-unit-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = workspace_root().join("patroxy.toml");
    let unit = unit
        .replace("/usr/local/bin/patroxy", bin.to_str().unwrap())
        .replace("/etc/patroxy/patroxy.toml", config.to_str().unwrap());
    let path = dir.join("patroxy.service");
    std::fs::write(&path, unit).unwrap();
    path
}

/// `systemd-analyze verify` accepts the unit (PID 1 here is not systemd, so the unit cannot be
/// started; verify checks its syntax and directives), with ExecStart pointed at the real binary.
#[test]
fn systemd_unit_verifies() {
    let path = unit_for_this_build("verify");
    let unit = std::fs::read_to_string(&path).unwrap();
    assert!(
        unit.contains("Type=notify"),
        "readiness comes from sd_notify"
    );
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .expect("systemd-analyze (package systemd) is installed");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Warnings about this machine's missing PID-1 systemd are fine; unit errors are not.
    let unit_errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("patroxy.service"))
        .collect();
    assert!(unit_errors.is_empty(), "{stderr}");
    std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
}

/// The highest exposure `systemd-analyze security` may rate the unit: its "OK" band ends
/// below 5.0 ("MEDIUM" from there on).
const MAX_EXPOSURE: f64 = 4.9;

/// The unit runs as its own user with CAP_BPF and CAP_NET_ADMIN alone (no CAP_SYS_ADMIN), and
/// `systemd-analyze security --offline=true` rates it "OK" or better.
#[test]
fn systemd_unit_is_least_privilege_and_rated_ok() {
    let path = unit_for_this_build("security");
    let unit = std::fs::read_to_string(&path).unwrap();
    for line in [
        "User=patroxy",
        "Group=patroxy",
        "AmbientCapabilities=CAP_BPF CAP_NET_ADMIN\n",
        "CapabilityBoundingSet=CAP_BPF CAP_NET_ADMIN\n",
        "NoNewPrivileges=yes",
    ] {
        assert!(unit.contains(line), "the unit has {line:?}:\n{unit}");
    }
    assert!(
        unit.lines()
            .filter(|l| !l.starts_with('#'))
            .all(|l| !l.contains("CAP_SYS_ADMIN")),
        "{unit}"
    );
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&path)
        .output()
        .expect("systemd-analyze (package systemd) is installed");
    let stdout = String::from_utf8_lossy(&out.stdout);
    // "→ Overall exposure level for patroxy.service: 1.7 OK 🙂"
    let overall = stdout
        .lines()
        .find_map(|l| l.split_once("Overall exposure level for patroxy.service: "))
        .map(|(_, rating)| rating.to_owned())
        .unwrap_or_else(|| {
            panic!(
                "no overall rating in:\n{stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let mut words = overall.split_whitespace();
    let exposure: f64 = words.next().unwrap().parse().unwrap();
    let level = words.next().unwrap();
    assert!(
        exposure <= MAX_EXPOSURE && ["OK", "SAFE", "PERFECT"].contains(&level),
        "exposure {overall}:\n{stdout}"
    );
    std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
}
