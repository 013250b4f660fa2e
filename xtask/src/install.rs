//! `cargo xtask install`: the release binary, the systemd unit, the `patroxy` system user and a
//! default config, each step said as it is done.
//!
//! `--root DESTDIR` installs the files under another directory (a package build, the tests):
//! then no user is created and the service manager is not told, since neither belongs to
//! DESTDIR's system. An existing config is never overwritten.

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result};

use crate::cargo::{self, workspace_root};
use crate::command;
use crate::setup;

/// The service's user and group: the unit's `User=`/`Group=`.
const USER: &str = "patroxy";
/// Where the unit goes, under the root.
const UNIT_DIR: &str = "etc/systemd/system";
/// The config the unit reads, under the root.
const CONFIG: &str = "etc/patroxy/patroxy.toml";
/// The unit's binary path, rewritten when `--prefix` differs.
const UNIT_BINARY: &str = "/usr/local/bin/patroxy";

#[derive(clap::Args)]
pub struct InstallArgs {
    /// Install under this directory instead of / (DESTDIR): files only, no user, no systemctl.
    #[arg(long, default_value = "/")]
    pub root: PathBuf,
    /// The binary goes to PREFIX/bin (the unit is rewritten to match).
    #[arg(long, default_value = "/usr/local")]
    pub prefix: PathBuf,
}

/// Builds the release binary, then installs it and the rest.
pub fn install(args: &InstallArgs) -> Result<()> {
    let env = setup::setup()?;
    let binary = cargo::build_patroxy(&env, true)?;
    let system = args.root == Path::new("/");
    if system {
        create_user()?;
    }
    install_files(&binary, &args.root, &args.prefix)?;
    if system {
        tell_systemd()?;
    } else {
        println!(
            "install: files only under {}: no user created, systemd not told",
            args.root.display()
        );
    }
    Ok(())
}

/// Copies the binary, the unit (pointing at that binary) and, unless one exists, the config.
pub fn install_files(binary: &Path, root: &Path, prefix: &Path) -> Result<()> {
    let bin_path = prefix.join("bin/patroxy");
    let installed_bin = under(root, &bin_path);
    copy(binary, &installed_bin, 0o755)?;

    let unit = fs::read_to_string(workspace_root().join("dist/patroxy.service"))
        .context("reading dist/patroxy.service")?;
    let unit = unit.replace(UNIT_BINARY, &bin_path.to_string_lossy());
    let unit_path = root.join(UNIT_DIR).join("patroxy.service");
    write(&unit_path, &unit, 0o644)?;

    let config = root.join(CONFIG);
    if config.exists() {
        println!("install: {} exists: kept as it is", config.display());
    } else {
        copy(&workspace_root().join("patroxy.toml"), &config, 0o644)?;
    }
    Ok(())
}

/// `root` + `path`, `path` being absolute.
fn under(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

fn copy(from: &Path, to: &Path, mode: u32) -> Result<()> {
    create_parent(to)?;
    // Copied to a temporary name and renamed: a running binary is replaced, not rewritten.
    let partial = to.with_extension("partial");
    fs::copy(from, &partial)
        .with_context(|| format!("copying {} to {}", from.display(), partial.display()))?;
    fs::set_permissions(&partial, fs::Permissions::from_mode(mode))?;
    fs::rename(&partial, to).with_context(|| format!("renaming to {}", to.display()))?;
    println!("install: {} -> {} ({mode:o})", from.display(), to.display());
    Ok(())
}

fn write(to: &Path, contents: &str, mode: u32) -> Result<()> {
    create_parent(to)?;
    fs::write(to, contents).with_context(|| format!("writing {}", to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))?;
    println!("install: wrote {} ({mode:o})", to.display());
    Ok(())
}

fn create_parent(path: &Path) -> Result<()> {
    let dir = path.parent().expect("installed files have a directory");
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
}

/// The system user the unit runs as, created once: no home, no login shell.
fn create_user() -> Result<()> {
    if Command::new("id")
        .args(["-u", USER])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        println!("install: user {USER} exists");
        return Ok(());
    }
    let mut useradd = Command::new("useradd");
    useradd.args([
        "--system",
        "--user-group",
        "--no-create-home",
        "--home-dir",
        "/nonexistent",
        "--shell",
        "/usr/sbin/nologin",
        "--comment",
        "patroxy PostgreSQL proxy",
        USER,
    ]);
    println!("install: {}", command::describe(&useradd));
    command::run(&mut useradd)
}

/// Reloads systemd's units when systemd is PID 1; otherwise says what is left to do.
fn tell_systemd() -> Result<()> {
    if !Path::new("/run/systemd/system").is_dir() {
        println!(
            "install: PID 1 is not systemd here: the unit is in place for a system that runs it"
        );
        return Ok(());
    }
    let mut reload = Command::new("systemctl");
    reload.arg("daemon-reload");
    println!("install: {}", command::describe(&reload));
    command::run(&mut reload)?;
    println!("install: start it with: systemctl enable --now patroxy");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory under the temp dir, removed when dropped.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("xtask-install-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn installs_binary_unit_and_config_under_destdir() {
        let scratch = Scratch::new("files");
        let binary = scratch.0.join("built-patroxy");
        fs::write(&binary, b"\x7fELF not really").unwrap();
        let root = scratch.0.join("root");
        install_files(&binary, &root, Path::new("/opt/patroxy")).unwrap();

        let installed = root.join("opt/patroxy/bin/patroxy");
        assert_eq!(fs::read(&installed).unwrap(), b"\x7fELF not really");
        assert_eq!(mode(&installed), 0o755);
        let unit = fs::read_to_string(root.join("etc/systemd/system/patroxy.service")).unwrap();
        assert!(
            unit.contains("ExecStart=/opt/patroxy/bin/patroxy run"),
            "{unit}"
        );
        assert!(
            !unit.contains(UNIT_BINARY),
            "every binary path follows --prefix"
        );
        assert!(unit.contains("User=patroxy"), "{unit}");
        let config = root.join(CONFIG);
        assert_eq!(
            fs::read_to_string(&config).unwrap(),
            fs::read_to_string(workspace_root().join("patroxy.toml")).unwrap()
        );
        assert_eq!(mode(&config), 0o644);
    }

    #[test]
    fn an_existing_config_is_never_overwritten() {
        let scratch = Scratch::new("config");
        let binary = scratch.0.join("built-patroxy");
        fs::write(&binary, b"bin").unwrap();
        let root = scratch.0.join("root");
        let config = root.join(CONFIG);
        fs::create_dir_all(config.parent().unwrap()).unwrap();
        fs::write(&config, "# the operator's own\n").unwrap();
        install_files(&binary, &root, Path::new("/usr/local")).unwrap();
        install_files(&binary, &root, Path::new("/usr/local")).unwrap();
        assert_eq!(
            fs::read_to_string(&config).unwrap(),
            "# the operator's own\n"
        );
        let unit = fs::read_to_string(root.join("etc/systemd/system/patroxy.service")).unwrap();
        assert!(unit.contains("ExecStart=/usr/local/bin/patroxy run"));
    }
}
