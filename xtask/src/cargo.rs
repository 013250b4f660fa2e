//! Workspace paths and the cargo invocations the commands share.

use std::ffi::OsString;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context as _, Result, bail};

use crate::command;
use crate::setup::{self, BuildEnv};

/// The workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

/// cargo's target directory: `$CARGO_TARGET_DIR` when set, else the workspace's `target/`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                std::env::current_dir()
                    .unwrap_or_else(|_| workspace_root())
                    .join(dir)
            }
        }
        None => workspace_root().join("target"),
    }
}

/// The patroxy binary a build with this profile produces.
pub fn patroxy_path(release: bool) -> PathBuf {
    target_dir()
        .join(if release { "release" } else { "debug" })
        .join("patroxy")
}

/// A cargo command run from the workspace root with setup's environment. `$CARGO` is the
/// cargo that runs this xtask, so the toolchain stays the same.
pub fn cargo(env: &BuildEnv) -> Command {
    let mut cmd =
        Command::new(std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo")));
    cmd.current_dir(workspace_root());
    env.apply(&mut cmd);
    cmd
}

/// `cargo build -p patroxy [--release]`; returns the binary's path.
pub fn build_patroxy(env: &BuildEnv, release: bool) -> Result<PathBuf> {
    build_patroxy_with(env, release, &["-p", "patroxy"])
}

/// `cargo build --release` of everything `cargo test --workspace` builds, patroxy's binary
/// included. Building the same selection as the tests gives the same feature unification
/// (dev-dependencies included), so the test run that follows compiles nothing again; a
/// `-p patroxy` build first would compile tokio, aya, rustls and patroxy (with its eBPF) twice.
pub fn build_workspace_for_tests(env: &BuildEnv) -> Result<PathBuf> {
    build_patroxy_with(
        env,
        true,
        &["--workspace", "--exclude", "patroxy-ebpf", "--all-targets"],
    )
}

fn build_patroxy_with(env: &BuildEnv, release: bool, selection: &[&str]) -> Result<PathBuf> {
    let mut cmd = cargo(env);
    cmd.arg("build").args(selection);
    if release {
        cmd.arg("--release");
    }
    println!("xtask: {}", command::describe(&cmd));
    command::run(&mut cmd).context("building patroxy")?;
    let bin = patroxy_path(release);
    if !bin.is_file() {
        bail!("the build succeeded but {} is missing", bin.display());
    }
    Ok(bin)
}

/// `cargo xtask run -- <args>`: set up, build (release), then become patroxy, so signals and
/// the exit code are patroxy's own.
pub fn run_patroxy(args: &[String]) -> Result<ExitCode> {
    let env = setup::setup()?;
    let bin = build_patroxy(&env, true)?;
    let err = Command::new(&bin).args(args).exec();
    Err(err).with_context(|| format!("executing {}", bin.display()))
}
