//! The shipped files an operator installs: the systemd unit and the example config.
use std::process::Command;

use patroxy_tests::process::{patroxy_bin, workspace_root};

/// `systemd-analyze verify` accepts the unit (PID 1 here is not systemd, so the unit cannot be
/// started; verify checks its syntax and directives), with ExecStart pointed at the real binary.
#[test]
fn systemd_unit_verifies() {
    let unit = std::fs::read_to_string(workspace_root().join("dist/patroxy.service")).unwrap();
    let bin = patroxy_bin();
    let dir = std::env::temp_dir().join(format!("patroxy-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = workspace_root().join("patroxy.toml");
    let unit = unit
        .replace("/usr/local/bin/patroxy", bin.to_str().unwrap())
        .replace("/etc/patroxy/patroxy.toml", config.to_str().unwrap());
    assert!(
        unit.contains("Type=notify"),
        "readiness comes from sd_notify"
    );
    let path = dir.join("patroxy.service");
    std::fs::write(&path, unit).unwrap();
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
    std::fs::remove_dir_all(&dir).unwrap();
}
