//! `cargo xtask fuzz TARGET|all --seconds N`: the cargo-fuzz targets of fuzz/ (patroxy's
//! untrusted inputs), each run for N seconds; `cargo xtask test` runs every one briefly too.
//!
//! cargo-fuzz is installed when missing (`cargo install cargo-fuzz`), the targets are built
//! once with the nightly toolchain (libFuzzer, AddressSanitizer, debug assertions), then each
//! runs with libFuzzer's `-max_total_time`. Each run reads the committed seeds
//! (fuzz/corpus/TARGET) and the inputs of past crashes (fuzz/regressions/TARGET), and grows a
//! working corpus in fuzz/target/corpus/TARGET that later runs start from. libFuzzer's output
//! goes to fuzz/target/logs/TARGET.log; a crash's input is saved in fuzz/artifacts/TARGET/.

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

use anyhow::{Context as _, Result, bail};

use crate::cargo::workspace_root;
use crate::command::{describe, find_on_path, output, run};
use crate::setup::{self, BuildEnv, cargo_home};

/// The targets of fuzz/Cargo.toml.
pub const TARGETS: &[&str] = &[
    "config",
    "patroni_response",
    "first_bytes",
    "import_haproxy",
];

/// The cargo-fuzz release this was written against.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// One input taking longer than this is reported as a hang (libFuzzer's `-timeout`).
const INPUT_TIMEOUT_SECS: u64 = 30;

#[derive(clap::Args)]
pub struct FuzzArgs {
    /// A target of fuzz/ (config, patroni_response, first_bytes, import_haproxy), or `all` for
    /// each in turn.
    target: String,
    /// How long each target runs.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
}

/// `cargo xtask fuzz`: set up, build the targets, run the chosen ones; fails if any crashed.
pub fn fuzz(args: &FuzzArgs) -> Result<ExitCode> {
    let targets: Vec<&str> = match args.target.as_str() {
        "all" => TARGETS.to_vec(),
        t if TARGETS.contains(&t) => vec![t],
        t => bail!(
            "no fuzz target `{t}`: choose one of {}, or all",
            TARGETS.join(", ")
        ),
    };
    let env = setup::setup()?;
    let fuzzer = Fuzzer::prepare(&env)?;
    let mut failed = false;
    for target in targets {
        let run = fuzzer.run(target, args.seconds, true)?;
        println!("{}", run.line());
        failed |= !run.ok;
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// What one target's run did.
#[derive(Debug)]
pub struct FuzzRun {
    pub target: String,
    /// Inputs executed (libFuzzer's count), when its output said.
    pub execs: Option<u64>,
    pub seconds: u64,
    /// Exited cleanly: no crash, leak, hang or out-of-memory.
    pub ok: bool,
    /// The input that failed, as libFuzzer saved it.
    pub artifact: Option<PathBuf>,
    pub log: PathBuf,
}

impl FuzzRun {
    /// The run in one line, as the fuzz and test commands print it.
    pub fn line(&self) -> String {
        let execs = self
            .execs
            .map_or_else(|| "? execs".to_owned(), |n| format!("{n} execs"));
        if self.ok {
            return format!("fuzz {}: {execs} in {} s, ok", self.target, self.seconds);
        }
        let input = self.artifact.as_ref().map_or_else(
            || format!("see {}", self.log.display()),
            |a| format!("input saved as {}", a.display()),
        );
        format!("fuzz {}: FAILED after {execs}: {input}", self.target)
    }
}

/// The fuzz crate, built and ready to run.
pub struct Fuzzer<'a> {
    dir: PathBuf,
    toolchain: &'static str,
    /// RUSTC_BOOTSTRAP when the toolchain is stable.
    toolchain_env: Vec<(&'static str, &'static str)>,
    /// setup's environment (bpf-linker on PATH for patroxy's build.rs).
    setup_env: &'a BuildEnv,
}

impl<'a> Fuzzer<'a> {
    /// Installs cargo-fuzz if missing and builds every target (timed: the first build compiles
    /// patroxy's whole dependency tree with the fuzzing instrumentation).
    pub fn prepare(setup_env: &'a BuildEnv) -> Result<Fuzzer<'a>> {
        ensure_cargo_fuzz(setup_env)?;
        let (toolchain, toolchain_env) = toolchain()?;
        let fuzzer = Fuzzer {
            dir: workspace_root().join("fuzz"),
            toolchain,
            toolchain_env,
            setup_env,
        };
        let mut cmd = fuzzer.cargo_fuzz("build");
        println!("xtask: {}", describe(&cmd));
        let started = Instant::now();
        run(&mut cmd).context("building the fuzz targets")?;
        println!(
            "xtask: fuzz targets built in {:.0} s",
            started.elapsed().as_secs_f64()
        );
        Ok(fuzzer)
    }

    /// Runs `target` for `seconds`; `echo` shows libFuzzer's output as it comes (it always goes
    /// to the target's log too).
    pub fn run(&self, target: &str, seconds: u64, echo: bool) -> Result<FuzzRun> {
        let work = self.dir.join("target/corpus").join(target);
        let logs = self.dir.join("target/logs");
        for dir in [&work, &logs] {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let log_path = logs.join(format!("{target}.log"));
        let mut log = std::fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;

        let mut cmd = self.cargo_fuzz("run");
        cmd.arg(target).arg(&work);
        // libFuzzer writes new inputs to the first corpus directory only: the committed
        // seeds and regressions are read, never added to.
        for dir in ["corpus", "regressions"] {
            let d = self.dir.join(dir).join(target);
            if d.is_dir() {
                cmd.arg(d);
            }
        }
        cmd.arg("--").args([
            format!("-max_total_time={seconds}"),
            format!("-timeout={INPUT_TIMEOUT_SECS}"),
        ]);
        println!("xtask: {} (log: {})", describe(&cmd), log_path.display());

        // libFuzzer and cargo-fuzz report on stderr, which is read here; stdout carries nothing
        // of theirs.
        let stdout = if echo {
            Stdio::inherit()
        } else {
            Stdio::from(log.try_clone()?)
        };
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {}", describe(&cmd)))?;
        let stderr = BufReader::new(child.stderr.take().expect("piped"));
        let mut stats = LibFuzzerStats::default();
        for line in stderr.split(b'\n') {
            let line = String::from_utf8_lossy(&line?).into_owned();
            stats.line(&line);
            writeln!(log, "{line}")?;
            if echo {
                eprintln!("{line}");
            }
        }
        let status = child.wait().context("waiting for cargo fuzz")?;
        if !status.success() && !echo {
            // The crash report is the end of the log.
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            for line in &lines[lines.len().saturating_sub(40)..] {
                eprintln!("  {line}");
            }
        }
        Ok(FuzzRun {
            target: target.to_owned(),
            execs: stats.execs,
            seconds,
            ok: status.success(),
            artifact: stats.artifact,
            log: log_path,
        })
    }

    /// `cargo fuzz SUBCOMMAND` in fuzz/, with the chosen toolchain: release, with debug
    /// assertions (overflow checks), AddressSanitizer (cargo-fuzz's default).
    fn cargo_fuzz(&self, subcommand: &str) -> Command {
        let mut cmd = Command::new("rustup");
        cmd.args(["run", self.toolchain, "cargo", "fuzz", subcommand])
            .arg("--debug-assertions")
            .current_dir(&self.dir);
        self.setup_env.apply(&mut cmd);
        cmd.envs(self.toolchain_env.iter().copied());
        cmd
    }
}

/// Nightly when installed; else stable with RUSTC_BOOTSTRAP (sanitizers and libFuzzer's
/// instrumentation are -Z flags), as setup does for the eBPF build.
fn toolchain() -> Result<(&'static str, Vec<(&'static str, &'static str)>)> {
    let list = output(Command::new("rustup").args(["toolchain", "list"]))
        .context("listing rustup toolchains (is rustup installed?)")?;
    if list.lines().any(|l| l.starts_with("nightly")) {
        return Ok(("nightly", Vec::new()));
    }
    println!("xtask: no nightly toolchain: fuzzing with stable and RUSTC_BOOTSTRAP=1");
    Ok(("stable", vec![("RUSTC_BOOTSTRAP", "1")]))
}

/// cargo-fuzz from crates.io (built from source, a minute or so), unless it is there already.
fn ensure_cargo_fuzz(env: &BuildEnv) -> Result<()> {
    if find_on_path("cargo-fuzz").is_some() || cargo_home().join("bin/cargo-fuzz").is_file() {
        return Ok(());
    }
    println!("xtask: installing cargo-fuzz {CARGO_FUZZ_VERSION} (cargo install, a minute or so)");
    let mut cmd = crate::cargo::cargo(env);
    cmd.args([
        "install",
        "cargo-fuzz",
        "--locked",
        "--version",
        CARGO_FUZZ_VERSION,
    ])
    // A target dir set for the workspace must not collect cargo-fuzz's build.
    .env_remove("CARGO_TARGET_DIR");
    run(&mut cmd).context("installing cargo-fuzz")
}

/// What libFuzzer's output says about a run.
#[derive(Debug, Default)]
struct LibFuzzerStats {
    execs: Option<u64>,
    artifact: Option<PathBuf>,
}

impl LibFuzzerStats {
    fn line(&mut self, line: &str) {
        // Status lines: "#123456\tpulse  cov: ..." and, at the end, "#123456\tDONE ...";
        // not a sanitizer's stack frames ("    #0 0x55d0... in ...").
        let status = line.strip_prefix('#').and_then(|l| {
            let mut words = l.split_whitespace();
            let n = words.next()?.parse().ok()?;
            words.next().filter(|w| !w.starts_with("0x")).map(|_| n)
        });
        let done = line
            .strip_prefix("Done ")
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok());
        if let Some(n) = status.or(done) {
            self.execs = Some(n);
        } else if let Some((_, path)) = line.split_once("Test unit written to ") {
            self.artifact = Some(Path::new(path.trim()).to_path_buf());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_execs_and_the_crash_input_from_libfuzzer() {
        let mut s = LibFuzzerStats::default();
        for line in [
            "INFO: Seed: 1234",
            "#2\tINITED cov: 10 ft: 11 corp: 1/1b exec/s: 0 rss: 30Mb",
            "#8192\tpulse  cov: 1540 ft: 5349 corp: 402/49Kb lim: 4096 exec/s: 4096 rss: 446Mb",
            "#0 0x55d0c0ffee in __sanitizer_print_stack_trace",
        ] {
            s.line(line);
        }
        assert_eq!(s.execs, Some(8192));
        s.line("#1966208\tDONE   cov: 1540 ft: 5349 corp: 402/49Kb exec/s: 65540 rss: 446Mb");
        s.line("Done 1966208 runs in 31 second(s)");
        assert_eq!(s.execs, Some(1_966_208));
        assert_eq!(s.artifact, None);
        s.line(
            "artifact_prefix='/w/fuzz/artifacts/config/'; Test unit written to \
             /w/fuzz/artifacts/config/crash-da39a3ee",
        );
        assert_eq!(
            s.artifact.as_deref(),
            Some(Path::new("/w/fuzz/artifacts/config/crash-da39a3ee"))
        );
    }

    #[test]
    fn a_failed_run_says_where_its_input_is() {
        let run = FuzzRun {
            target: "config".into(),
            execs: Some(42),
            seconds: 20,
            ok: false,
            artifact: Some("fuzz/artifacts/config/crash-1".into()),
            log: "fuzz/target/logs/config.log".into(),
        };
        assert_eq!(
            run.line(),
            "fuzz config: FAILED after 42 execs: input saved as fuzz/artifacts/config/crash-1"
        );
        let ok = FuzzRun {
            ok: true,
            artifact: None,
            ..run
        };
        assert_eq!(ok.line(), "fuzz config: 42 execs in 20 s, ok");
    }
}
