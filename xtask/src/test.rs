//! `cargo xtask test`: set up, build patroxy (release), run the workspace's tests with
//! PATROXY_BIN pointing at it, run every fuzz target and a short soak when the whole suite runs,
//! and close with a one-line summary (each fuzz target and the soak count as one test).

use std::io::{self, BufRead as _, BufReader, IsTerminal as _, Read, Write};
use std::os::unix::process::CommandExt as _;
use std::process::{ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};

use crate::cargo::{build_patroxy, build_workspace_for_tests, cargo};
use crate::command;
use crate::fuzz::{self, Fuzzer};
use crate::setup::{self, BuildEnv};
use crate::soak::{self, SoakArgs};

/// Two cores: more test threads only make the timing-sensitive proxy tests flaky.
const TEST_THREADS: &str = "--test-threads=2";

/// `cargo xtask test [--timeout SECS] [--fuzz-seconds N] [--soak-minutes N] [-- <cargo test
/// args> [-- <test binary args>]]`. Fuzzing and the soak run only with no arguments after `--`
/// (the whole suite).
pub fn test(
    args: &[String],
    timeout: Duration,
    fuzz_seconds: u64,
    soak_minutes: u64,
) -> Result<ExitCode> {
    let started = Instant::now();
    let env = setup::setup()?;
    fmt_check(&env);

    let (cargo_args, test_args) = match args.iter().position(|a| a == "--") {
        Some(i) => (&args[..i], &args[i + 1..]),
        None => (args, &[][..]),
    };
    let whole_workspace = !cargo_args
        .iter()
        .any(|a| a == "-p" || a.starts_with("--package"));
    let bin = if whole_workspace {
        build_workspace_for_tests(&env)?
    } else {
        build_patroxy(&env, true)?
    };
    let mut cmd = cargo(&env);
    cmd.args(["test", "--release", "--no-fail-fast"]);
    if whole_workspace {
        // The eBPF crate only builds for bpfel-unknown-none (build.rs of patroxy builds it).
        cmd.args(["--workspace", "--exclude", "patroxy-ebpf"]);
    }
    if io::stderr().is_terminal() {
        cmd.arg("--color=always");
    }
    cmd.args(cargo_args).arg("--");
    if !test_args.iter().any(|a| a.starts_with("--test-threads")) {
        cmd.arg(TEST_THREADS);
    }
    if io::stdout().is_terminal() {
        cmd.arg("--color=always");
    }
    cmd.args(test_args).env("PATROXY_BIN", &bin);
    println!(
        "xtask: PATROXY_BIN={} {}",
        bin.display(),
        command::describe(&cmd)
    );

    // cargo and the test binaries get their own process group, so a hung run can be
    // stopped as a whole (the timeout) and Ctrl-C still ends with a summary.
    let summary = Arc::new(Mutex::new(Summary::default()));
    let mut child = cmd
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    let group = child.id() as libc::pid_t;
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let interrupted = interrupted.clone();
        ctrlc::set_handler(move || {
            interrupted.store(true, Ordering::SeqCst);
            signal_group(group, libc::SIGINT);
        })
        .context("installing the Ctrl-C handler")?;
    }
    let out = tee(
        child.stdout.take().expect("piped"),
        io::stdout(),
        summary.clone(),
    );
    let err = tee(
        child.stderr.take().expect("piped"),
        io::stderr(),
        summary.clone(),
    );
    let deadline = Instant::now() + timeout;
    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child.try_wait().context("waiting for cargo test")? {
            break status;
        }
        if !timed_out && Instant::now() >= deadline {
            timed_out = true;
            eprintln!(
                "xtask: cargo test is still running after {} s: stopping it",
                timeout.as_secs()
            );
            signal_group(group, libc::SIGTERM);
            std::thread::sleep(Duration::from_secs(5));
            signal_group(group, libc::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = out.join();
    let _ = err.join();

    let whole_suite = args.is_empty() && !timed_out && !interrupted.load(Ordering::SeqCst);
    let mut fuzzed = if whole_suite && fuzz_seconds > 0 {
        fuzz_every_target(&env, fuzz_seconds)
    } else {
        Vec::new()
    };
    if whole_suite && soak_minutes > 0 {
        fuzzed.push(short_soak(bin.clone(), soak_minutes));
    }

    let s = summary.lock().expect("summary lock");
    println!();
    println!(
        "xtask test finished in {:.0} s ({status})",
        started.elapsed().as_secs_f64()
    );
    for line in &s.skips {
        println!("  {line}");
    }
    for name in &s.failures {
        println!("  FAILED {name}");
    }
    for name in &s.running {
        println!("  UNFINISHED {name} (ran for over 60 s)");
    }
    for line in &s.errors {
        println!("  {line}");
    }
    for (line, _) in &fuzzed {
        println!("  {line}");
    }
    if timed_out {
        println!(
            "  stopped after the {} s timeout (`cargo xtask test --timeout SECS`)",
            timeout.as_secs()
        );
    } else if interrupted.load(Ordering::SeqCst) {
        println!("  interrupted");
    }
    // A test binary that was killed never prints its "test result" line: count its failures
    // and its hung tests from the per-test lines instead.
    let failed = s.failed.max(s.failures.len() as u64) + s.running.len() as u64;
    if !status.success() && failed == 0 && !timed_out {
        println!("  cargo test failed outside the tests (see the errors above)");
    }
    let skipped = s.skips.len() as u64 + s.ignored;
    let passed = s
        .passed
        .max(s.ok_lines)
        .saturating_sub(s.skips.len() as u64);
    let fuzz_failed = fuzzed.iter().filter(|(_, ok)| !ok).count() as u64;
    let failed = failed + fuzz_failed;
    let passed = passed + (fuzzed.len() as u64 - fuzz_failed);
    println!("summary: {passed} passed, {failed} failed, {skipped} skipped");
    Ok(if status.success() && !timed_out && fuzz_failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `cargo xtask soak --minutes N` on the binary just tested: one summary line and whether it
/// passed.
fn short_soak(bin: std::path::PathBuf, minutes: u64) -> (String, bool) {
    println!();
    println!("xtask: soak for {minutes} min (`--soak-minutes 0` skips)");
    let args = SoakArgs {
        minutes,
        no_cluster: false,
        patroxy_bin: Some(bin),
    };
    match soak::soak(&args) {
        Ok(true) => (
            format!("soak {minutes} min: passed (target/soak/report.md)"),
            true,
        ),
        Ok(false) => (
            format!("soak {minutes} min: FAILED (target/soak/report.md)"),
            false,
        ),
        Err(e) => (format!("soak {minutes} min: FAILED to run: {e:#}"), false),
    }
}

/// Builds the fuzz targets and runs each for `seconds`: one summary line per target (or one for
/// a build that failed) and whether it passed.
fn fuzz_every_target(env: &BuildEnv, seconds: u64) -> Vec<(String, bool)> {
    println!();
    println!("xtask: fuzzing each target for {seconds} s (`--fuzz-seconds 0` skips)");
    let fuzzer = match Fuzzer::prepare(env) {
        Ok(f) => f,
        Err(e) => return vec![(format!("fuzz: the targets did not build: {e:#}"), false)],
    };
    fuzz::TARGETS
        .iter()
        .map(|&target| match fuzzer.run(target, seconds, false) {
            Ok(run) => {
                println!("xtask: {}", run.line());
                (run.line(), run.ok)
            }
            Err(e) => (format!("fuzz {target}: FAILED to run: {e:#}"), false),
        })
        .collect()
}

/// Sends `signal` to every process in the group led by `group`.
fn signal_group(group: libc::pid_t, signal: i32) {
    // SAFETY: kill(2) on our child's process group (a negative pid names the group).
    unsafe {
        libc::kill(-group, signal);
    }
}

/// Formatting is reported, never fatal: a test run should not fail on whitespace.
fn fmt_check(env: &BuildEnv) {
    let mut cmd = cargo(env);
    cmd.args(["fmt", "--all", "--", "--check"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    match cmd.status() {
        Ok(s) if s.success() => {}
        Ok(_) => eprintln!(
            "xtask: warning: `cargo fmt --all -- --check` found unformatted code (run `cargo fmt --all`)"
        ),
        Err(e) => eprintln!("xtask: warning: could not run cargo fmt: {e}"),
    }
}

/// What the closing summary needs from cargo test's output.
#[derive(Debug, Default)]
struct Summary {
    passed: u64,
    failed: u64,
    ignored: u64,
    /// "SKIP <test>: <why>" lines printed by tests that could not run here.
    skips: Vec<String>,
    /// Names of failed tests.
    failures: Vec<String>,
    /// Tests libtest reported as running for over 60 s that have not finished yet.
    running: Vec<String>,
    /// "test X ... ok" lines: a killed test binary never prints its totals.
    ok_lines: u64,
    /// Compile errors and test binaries that failed.
    errors: Vec<String>,
}

impl Summary {
    fn line(&mut self, raw: &str) {
        let line = strip_ansi(raw);
        let line = line.trim_end();
        if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split(';') {
                let mut words = part
                    .split_whitespace()
                    .skip_while(|w| w.parse::<u64>().is_err());
                let (Some(n), Some(what)) = (words.next(), words.next()) else {
                    continue;
                };
                let n: u64 = n.parse().unwrap_or(0);
                match what {
                    "passed" => self.passed += n,
                    "failed" => self.failed += n,
                    "ignored" => self.ignored += n,
                    _ => {}
                }
            }
        } else if let Some(name) = line
            .strip_prefix("test ")
            .and_then(|l| l.strip_suffix(" has been running for over 60 seconds"))
        {
            self.running.push(name.to_owned());
        } else if let Some((name, result)) = line
            .strip_prefix("test ")
            .and_then(|l| l.rsplit_once(" ... "))
        {
            self.running.retain(|r| r != name);
            match result {
                "FAILED" => self.failures.push(name.to_owned()),
                "ok" => self.ok_lines += 1,
                _ => {}
            }
        } else if line.starts_with("SKIP ") {
            self.skips.push(line.to_owned());
        } else if line.starts_with("error: could not compile")
            || line.starts_with("error: test failed")
            || line.starts_with("error: failed to run")
        {
            self.errors.push(line.to_owned());
        }
    }
}

/// Copies `from` to `to` line by line while feeding the summary.
fn tee<R, W>(from: R, mut to: W, summary: Arc<Mutex<Summary>>) -> std::thread::JoinHandle<()>
where
    R: Read + Send + 'static,
    W: Write + Send + 'static,
{
    std::thread::spawn(move || {
        let mut reader = BufReader::new(from);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let _ = to.write_all(&buf);
                    let _ = to.flush();
                    summary
                        .lock()
                        .expect("summary lock")
                        .line(&String::from_utf8_lossy(&buf));
                }
            }
        }
    })
}

/// Removes ANSI escape sequences (colors) so lines can be matched.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters final-byte (0x40..=0x7e)
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{Summary, strip_ansi};

    #[test]
    fn summary_counts_results_skips_and_failures() {
        let mut s = Summary::default();
        for line in [
            "test result: ok. 7 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 6.91s",
            "test proxy::fin ... FAILED",
            "test proxy::slow has been running for over 60 seconds",
            "test proxy::hung has been running for over 60 seconds",
            "test proxy::slow ... ok",
            "\u{1b}[31mtest result: FAILED\u{1b}[0m. 3 passed; 1 failed; 0 ignored; 0 measured",
            "SKIP sockmap_splices: needs root (CAP_BPF/CAP_NET_ADMIN); run as root, as CI does",
            "error: could not compile `patroxy` (lib) due to 1 previous error",
        ] {
            s.line(line);
        }
        assert_eq!((s.passed, s.failed, s.ignored), (10, 1, 1));
        assert_eq!(s.ok_lines, 1);
        assert_eq!(s.failures, ["proxy::fin"]);
        assert_eq!(s.running, ["proxy::hung"]);
        assert_eq!(s.skips.len(), 1);
        assert_eq!(s.errors.len(), 1);
    }

    #[test]
    fn strips_colors() {
        assert_eq!(strip_ansi("\u{1b}[1m\u{1b}[32mok\u{1b}[0m"), "ok");
    }
}
