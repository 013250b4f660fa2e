//! `patroxy import-haproxy` as an operator runs it: the seed's haproxy.cfg and a variant file
//! converted by the binary, the report on stderr, the exit status, and `check-config` on what
//! it wrote.
use std::{path::Path, process::Command};

use patroxy_tests::process::{patroxy_bin, workspace_root};

/// Runs `import-haproxy FIXTURE -o OUT`; returns the exit code, stderr and the output's path.
fn import(fixture: &str) -> (Option<i32>, String, std::path::PathBuf) {
    let input = workspace_root()
        .join("tests/fixtures/haproxy")
        .join(fixture);
    let dir = std::env::temp_dir().join(format!("patroxy-import-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join(fixture.replace(".cfg", ".toml"));
    let run = Command::new(patroxy_bin())
        .arg("import-haproxy")
        .arg(&input)
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr).into_owned();
    (run.status.code(), stderr, out)
}

fn check_config(file: &Path) {
    let out = Command::new(patroxy_bin())
        .arg("check-config")
        .arg(file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The seed converts with nothing lost (exit 0, no finding on stderr) into a valid file.
#[test]
fn the_seed_converts_cleanly_and_passes_check_config() {
    let (code, stderr, out) = import("seed.cfg");
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("every directive carried over"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    check_config(&out);
    let toml = std::fs::read_to_string(&out).unwrap();
    assert!(
        toml.contains("seed.cfg:24: option httpchk GET /primary"),
        "{toml}"
    );
}

/// A file with losses: exit 1, one stderr line per directive not carried (file:line:), and a
/// result that still passes check-config.
#[test]
fn losses_are_reported_by_line_and_exit_1() {
    let (code, stderr, out) = import("variants.cfg");
    assert_eq!(code, Some(1), "{stderr}");
    for expected in [
        "variants.cfg:5: `daemon`: no meaning for patroxy",
        "variants.cfg:31: `server pg3 ... backup`: unsupported",
        "variants.cfg:43: `agent-check`: unsupported",
        "variants.cfg:45: `server-template pgx 3",
        "variants.cfg:57: `stats auth admin:secret`: unsupported",
    ] {
        assert!(stderr.contains(expected), "{expected:?} in:\n{stderr}");
    }
    assert!(
        stderr.contains("16 directive(s) not carried over exactly"),
        "{stderr}"
    );
    check_config(&out);
}

/// A file HAProxy would refuse: exit 2, its line named, nothing written.
#[test]
fn an_unreadable_file_writes_nothing_and_exits_2() {
    let dir = std::env::temp_dir().join(format!("patroxy-import-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let input = dir.join("bad.cfg");
    std::fs::write(&input, "global\n    log \"/dev/log\n").unwrap();
    let out = dir.join("bad.toml");
    let run = Command::new(patroxy_bin())
        .arg("import-haproxy")
        .arg(&input)
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("bad.cfg:2: unmatched quote"), "{stderr}");
    assert!(!out.exists());
}
