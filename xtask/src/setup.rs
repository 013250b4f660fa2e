//! `cargo xtask setup`: installs what is missing, says what it installs, and is quiet (one
//! "ok" line) about what is already there. Run first by build, run, test and demo.
//!
//! The recipe is the verified one in the project's TOOLCHAIN notes: rust-src for the nightly
//! that builds the eBPF crate (or stable with RUSTC_BOOTSTRAP when there is no nightly), and
//! bpf-linker built against that toolchain's own libLLVM.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, bail};
use patroxy_tests::process::is_root;

use crate::command::{describe, find_on_path, output, run};

/// Debian packages the tests and the demo use; later issues add theirs here.
pub const DEBIAN_PACKAGES: &[&str] = &[
    "postgresql",
    "postgresql-contrib",
    "bpftool",
    "haproxy",
    "iproute2",
    "procps",
    // Debian's Patroni 3.0.2 (`PTX_PATRONI=debian`) and the interpreter of PyPI's 4.1 venv.
    "patroni",
    "python3-venv",
    "etcd-server",
    "etcd-client",
    "chromium",
    // The bench's chart labels (read at run time by plotters' pure-Rust text renderer).
    "fonts-dejavu-core",
    // perf, for profiling the data path.
    "linux-perf",
    // The TLS checks' test certificates (tests/src/pki.rs).
    "openssl",
    // The XDP test's and bench's SYN floods (tests/tests/xdp.rs, cargo xtask bench --xdp).
    "hping3",
    // The bench's nftables side of the XDP drop-rate comparison.
    "nftables",
    // The IPv6 packet-level splice tests turn checksum offload off on their veths
    // (tests/tests/common/tc_lab.rs), so that every rewritten checksum is verified.
    "ethtool",
    // protoc, for the etcd client's build script (etcd-client compiles etcd's protos).
    "protobuf-compiler",
];

/// The bpf-linker release the recipe was verified with.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Where patroxy pins its maps; bpffs is not mounted on a fresh machine.
const BPFFS: &str = "/sys/fs/bpf";

/// Environment the builds that follow setup need (which toolchain builds the eBPF crate,
/// where bpf-linker is).
#[derive(Debug, Default)]
pub struct BuildEnv {
    vars: Vec<(String, OsString)>,
}

impl BuildEnv {
    /// Adds this environment to a cargo invocation.
    pub fn apply(&self, cmd: &mut Command) {
        for (k, v) in &self.vars {
            cmd.env(k, v);
        }
    }
}

/// Runs every setup step; fails only when a build prerequisite cannot be installed.
pub fn setup() -> Result<BuildEnv> {
    let mut env = BuildEnv::default();
    let mut ok = Vec::new();
    let mut warnings = Vec::new();
    let root = is_root();

    let toolchain = ebpf_toolchain(&mut env)?;
    ensure_rust_src(&toolchain, &mut ok)?;
    ensure_bpf_linker(&toolchain, &mut env, &mut ok)?;
    ensure_debian_packages(root, &mut ok, &mut warnings)?;
    ensure_bpffs(root, &mut ok, &mut warnings)?;
    ensure_patroni_venv(root, &mut ok, &mut warnings);

    println!("setup: ok: {}", ok.join(", "));
    for w in &warnings {
        eprintln!("setup: warning: {w}");
    }
    Ok(env)
}

/// The toolchain that builds the eBPF crate: `$PATROXY_EBPF_TOOLCHAIN` if the user chose
/// one, else nightly, else stable with RUSTC_BOOTSTRAP (the verified fallback).
fn ebpf_toolchain(env: &mut BuildEnv) -> Result<String> {
    if let Ok(chosen) = std::env::var("PATROXY_EBPF_TOOLCHAIN") {
        return Ok(chosen);
    }
    let list = output(Command::new("rustup").args(["toolchain", "list"]))
        .context("listing rustup toolchains (is rustup installed?)")?;
    if list.lines().any(|l| l.starts_with("nightly")) {
        return Ok("nightly".to_owned());
    }
    println!(
        "setup: no nightly toolchain: building the eBPF crate with stable and RUSTC_BOOTSTRAP=1"
    );
    env.vars
        .push(("PATROXY_EBPF_TOOLCHAIN".into(), "stable".into()));
    env.vars.push(("RUSTC_BOOTSTRAP".into(), "1".into()));
    Ok("stable".to_owned())
}

/// `-Z build-std=core` needs the standard library's source for the eBPF toolchain.
fn ensure_rust_src(toolchain: &str, ok: &mut Vec<String>) -> Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        toolchain,
        "--installed",
    ]))?;
    if installed.lines().any(|l| l.trim().starts_with("rust-src")) {
        ok.push(format!("rust-src ({toolchain})"));
        return Ok(());
    }
    println!("setup: installing rust-src for the {toolchain} toolchain");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", toolchain]))
}

/// bpf-linker links the eBPF crate; there is no prebuilt one reachable, so it is built from
/// crates.io against the toolchain's own libLLVM (the LLVM that emits the bitcode it links).
fn ensure_bpf_linker(toolchain: &str, env: &mut BuildEnv, ok: &mut Vec<String>) -> Result<()> {
    let cargo_bin = cargo_home().join("bin");
    let on_path = find_on_path("bpf-linker");
    if on_path.is_none() || !path_contains(&cargo_bin) {
        // Builds after setup must find bpf-linker (and cargo-installed tools) in ~/.cargo/bin.
        let mut paths = vec![cargo_bin.clone()];
        paths.extend(std::env::split_paths(
            &std::env::var_os("PATH").unwrap_or_default(),
        ));
        env.vars.push(("PATH".into(), std::env::join_paths(paths)?));
    }
    if on_path.is_some() || cargo_bin.join("bpf-linker").is_file() {
        ok.push("bpf-linker".to_owned());
        return Ok(());
    }

    let version = output(Command::new("rustup").args(["run", toolchain, "rustc", "-vV"]))?;
    let major = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .with_context(|| format!("no LLVM version in `rustc +{toolchain} -vV`:\n{version}"))?
        .to_owned();
    let sysroot =
        output(Command::new("rustup").args(["run", toolchain, "rustc", "--print", "sysroot"]))?;
    let lib_dir = Path::new(sysroot.trim()).join("lib");
    let llvm_lib = std::fs::read_dir(&lib_dir)
        .with_context(|| format!("reading {}", lib_dir.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with("libLLVM-") && n.ends_with(".so"))
        .min()
        .with_context(|| format!("no libLLVM-*.so in {}", lib_dir.display()))?;
    let llvm_lib = llvm_lib.trim_start_matches("lib").trim_end_matches(".so");

    println!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against {toolchain}'s LLVM {major} \
         (about 70 s)"
    );
    let lib = lib_dir.display();
    let mut cmd = Command::new("rustup");
    cmd.args(["run", toolchain, "cargo", "install", "bpf-linker"])
        .args([
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
            "--no-default-features",
        ])
        .arg("--features")
        .arg(format!("llvm-{major},no-llvm-linking"))
        .env(
            "RUSTFLAGS",
            format!("-L {lib} -l dylib={llvm_lib} -C link-arg=-Wl,-rpath,{lib}"),
        )
        // A target dir set for the workspace must not collect bpf-linker's build.
        .env_remove("CARGO_TARGET_DIR");
    if toolchain != "nightly" {
        cmd.env("RUSTC_BOOTSTRAP", "1");
    }
    run(&mut cmd).context("building bpf-linker")?;
    println!("setup: installed bpf-linker into {}", cargo_bin.display());
    Ok(())
}

/// PyPI's Patroni 4.1, the test cluster's and the demo's default, in its venv (see
/// `patroxy_tests::cluster::patroni::ensure_installed`). A failure is a warning: only the
/// cluster's commands need it, and they say so again.
fn ensure_patroni_venv(root: bool, ok: &mut Vec<String>, warnings: &mut Vec<String>) {
    use patroxy_tests::cluster::patroni::{VENV, ensure_installed};
    if !root {
        warnings.push(format!(
            "PyPI's Patroni 4.1 in {VENV} is installed as root (the test cluster and the demo \
             use it; PTX_PATRONI=debian uses Debian's 3.0.2 instead)"
        ));
        return;
    }
    if !Path::new(VENV).join("bin/patroni").is_file() {
        println!(
            "setup: installing Patroni 4.1 from PyPI into {VENV} (a venv of /usr/bin/python3)"
        );
    }
    match ensure_installed() {
        Ok(status) => ok.push(status),
        Err(e) => warnings.push(format!("installing Patroni 4.1 into {VENV}: {e}")),
    }
}

/// Installs the Debian packages that are missing (as root); reports them otherwise.
fn ensure_debian_packages(
    root: bool,
    ok: &mut Vec<String>,
    warnings: &mut Vec<String>,
) -> Result<()> {
    if find_on_path("dpkg-query").is_none() {
        warnings.push(format!(
            "not a Debian system (no dpkg-query): install these yourself: {}",
            DEBIAN_PACKAGES.join(" ")
        ));
        return Ok(());
    }
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|p| !deb_installed(p))
        .collect();
    if missing.is_empty() {
        ok.push(format!("{} Debian packages", DEBIAN_PACKAGES.len()));
        return Ok(());
    }
    let list = missing.join(" ");
    if !root {
        warnings.push(format!(
            "missing Debian packages: {list}; installing them needs root \
             (run `cargo xtask setup` as root, or `apt-get install -y {list}` as root)"
        ));
        return Ok(());
    }
    let log = std::env::temp_dir().join("patroxy-setup-apt.log");
    println!(
        "setup: installing Debian packages: {list} (apt-get's output: {})",
        log.display()
    );
    let _guard = NoServiceStarts::install();
    run_logged(Command::new("apt-get").arg("update"), &log)?;
    run_logged(
        Command::new("apt-get")
            .args(["install", "-y"])
            .args(&missing),
        &log,
    )?;
    let still: Vec<&str> = missing
        .iter()
        .copied()
        .filter(|p| !deb_installed(p))
        .collect();
    if !still.is_empty() {
        bail!(
            "apt-get install finished but these are still not installed: {}",
            still.join(" ")
        );
    }
    Ok(())
}

/// Runs a non-interactive apt-get with its (long) output appended to `log`; on failure the
/// tail of the log is shown.
fn run_logged(cmd: &mut Command, log: &Path) -> Result<()> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    cmd.env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file);
    let status = cmd
        .status()
        .with_context(|| format!("running {}", describe(cmd)))?;
    if !status.success() {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(30).collect();
        for line in tail.iter().rev() {
            eprintln!("  {line}");
        }
        bail!(
            "{} failed ({status}); full output in {}",
            describe(cmd),
            log.display()
        );
    }
    Ok(())
}

fn deb_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "install ok installed")
        .unwrap_or(false)
}

/// Keeps packages from starting their services while they install (the standard Debian
/// policy-rc.d mechanism): a packaged PostgreSQL cluster on 5432 or an etcd on 2379 would take
/// ports the demo and tests use. Installed only if the machine has no policy of its own, and
/// removed afterwards.
struct NoServiceStarts(Option<PathBuf>);

impl NoServiceStarts {
    fn install() -> NoServiceStarts {
        let path = Path::new("/usr/sbin/policy-rc.d");
        if path.exists() {
            return NoServiceStarts(None);
        }
        let script =
            "#!/bin/sh\n# Written by `cargo xtask setup` while it installs packages.\nexit 101\n";
        let written = std::fs::write(path, script).and_then(|()| {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        });
        NoServiceStarts(written.ok().map(|()| path.to_path_buf()))
    }
}

impl Drop for NoServiceStarts {
    fn drop(&mut self) {
        if let Some(path) = &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Mounts bpffs at /sys/fs/bpf so patroxy can pin its maps.
fn ensure_bpffs(root: bool, ok: &mut Vec<String>, warnings: &mut Vec<String>) -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    let mounted = mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let (_, target, fstype) = (f.next(), f.next(), f.next());
        target == Some(BPFFS) && fstype == Some("bpf")
    });
    if mounted {
        ok.push(format!("bpffs at {BPFFS}"));
        return Ok(());
    }
    if !root {
        warnings.push(format!(
            "bpffs is not mounted at {BPFFS}; mounting it needs root (`mount -t bpf bpf {BPFFS}`)"
        ));
        return Ok(());
    }
    println!("setup: mounting bpffs at {BPFFS}");
    std::fs::create_dir_all(BPFFS).ok();
    run(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))
}

/// Where cargo installs tools (`cargo install` puts them in its bin/).
pub fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".cargo"))
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
}

fn path_contains(dir: &Path) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d == dir))
        .unwrap_or(false)
}
