//! Child processes owned by a test: killed when the test ends however it ends, with their
//! output kept in a file the test prints when it fails.

use std::fs::File;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// How long a child gets between SIGTERM and SIGKILL unless the test says otherwise.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(5);

static LOG_COUNTER: AtomicU32 = AtomicU32::new(0);

/// A running child process that is stopped (SIGTERM, then SIGKILL after a grace period) when
/// dropped, so a failing assertion never leaves a proxy or server behind for the next test.
///
/// When built by [`ChildGuard::spawn`], the child's stdout and stderr go to one log file; if
/// the guard is dropped while the thread panics (a failed test), the log is printed to stderr.
#[derive(Debug)]
pub struct ChildGuard {
    /// `None` once the child has been reaped.
    child: Option<Child>,
    /// Names the process in messages ("patroxy", "postgres", ...).
    name: String,
    /// Where stdout+stderr went; `None` when stdio was inherited.
    log_path: Option<PathBuf>,
    /// SIGTERM-to-SIGKILL delay used by `stop` and `Drop`.
    grace: Duration,
    /// Exit status once known, so `stop` after an exit still reports it.
    status: Option<ExitStatus>,
}

impl ChildGuard {
    /// Spawns `cmd` with stdin closed and stdout+stderr appended to a fresh log file under
    /// `$TMPDIR/patroxy-test-logs-<uid>/`.
    pub fn spawn(name: &str, cmd: &mut Command) -> io::Result<ChildGuard> {
        // Per user: a directory root created is not writable by a developer's account.
        // SAFETY: geteuid has no preconditions and cannot fail.
        let uid = unsafe { libc::geteuid() };
        let dir = std::env::temp_dir().join(format!("patroxy-test-logs-{uid}"));
        std::fs::create_dir_all(&dir)?;
        let n = LOG_COUNTER.fetch_add(1, Ordering::Relaxed);
        let log_path = dir.join(format!("{name}-{}-{n}.log", std::process::id()));
        let out = File::create(&log_path)?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("spawning {name} ({cmd:?}): {e}")))?;
        Ok(ChildGuard::new(name, child, Some(log_path)))
    }

    /// Spawns `cmd` with the caller's stdio (for the demo, where the user watches the logs).
    pub fn spawn_inherit(name: &str, cmd: &mut Command) -> io::Result<ChildGuard> {
        let child = cmd
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("spawning {name} ({cmd:?}): {e}")))?;
        Ok(ChildGuard::new(name, child, None))
    }

    /// Takes ownership of an already spawned child.
    pub fn from_child(name: &str, child: Child) -> ChildGuard {
        ChildGuard::new(name, child, None)
    }

    fn new(name: &str, child: Child, log_path: Option<PathBuf>) -> ChildGuard {
        ChildGuard {
            child: Some(child),
            name: name.to_owned(),
            log_path,
            grace: DEFAULT_GRACE,
            status: None,
        }
    }

    /// Sets the SIGTERM-to-SIGKILL delay.
    pub fn with_grace(mut self, grace: Duration) -> ChildGuard {
        self.grace = grace;
        self
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// The name given at spawn.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The file holding the child's stdout and stderr, if it was captured.
    pub fn log_path(&self) -> Option<&Path> {
        self.log_path.as_deref()
    }

    /// The captured output so far (empty when stdio was inherited).
    pub fn log(&self) -> String {
        self.log_path
            .as_ref()
            .and_then(|p| std::fs::read(p).ok())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Prints the captured output to stderr, framed with the process name.
    pub fn print_log(&self) {
        if let Some(path) = &self.log_path {
            let mut err = io::stderr().lock();
            let _ = writeln!(err, "----- {} output ({}) -----", self.name, path.display());
            let _ = err.write_all(self.log().as_bytes());
            let _ = writeln!(err, "----- end of {} output -----", self.name);
        }
    }

    /// Sends `signal` (a `libc::SIG*` number) to the child if it still runs.
    pub fn signal(&self, signal: i32) -> io::Result<()> {
        if self.status.is_some() || self.child.is_none() {
            return Ok(());
        }
        // SAFETY: kill(2) with a pid we spawned and have not reaped yet, so it cannot name
        // another process.
        let rc = unsafe { libc::kill(self.id() as libc::pid_t, signal) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// The exit status if the child has exited, without blocking.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        if self.status.is_none()
            && let Some(child) = self.child.as_mut()
        {
            self.status = child.try_wait()?;
        }
        Ok(self.status)
    }

    /// Waits up to `timeout` for the child to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> io::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the child to exit, however long it takes.
    pub fn wait(&mut self) -> io::Result<ExitStatus> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        let child = self.child.as_mut().expect("child present until reaped");
        let status = child.wait()?;
        self.status = Some(status);
        Ok(status)
    }

    /// Stops the child: SIGTERM, then SIGKILL if it is still running after the grace period.
    /// Returns its exit status.
    pub fn stop(&mut self) -> io::Result<ExitStatus> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        self.signal(libc::SIGTERM)?;
        if let Some(status) = self.wait_timeout(self.grace)? {
            return Ok(status);
        }
        let _ = writeln!(
            io::stderr(),
            "{} (pid {}) ignored SIGTERM for {:?}; sending SIGKILL",
            self.name,
            self.id(),
            self.grace
        );
        self.signal(libc::SIGKILL)?;
        self.wait()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.stop();
        if std::thread::panicking() {
            // A failed test: show what the process said, and keep the file for a closer look.
            self.print_log();
        } else if let Some(path) = &self.log_path {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A process's memory from `/proc/<pid>/status`, in KiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Memory {
    /// Resident set size now (`VmRSS`).
    pub rss_kib: u64,
    /// The most it was resident since it started (`VmHWM`): catches a peak between two looks.
    pub peak_kib: u64,
}

/// The memory of process `pid`; `None` once it is gone.
pub fn memory(pid: u32) -> Option<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find_map(|l| l.strip_prefix(name))?;
        line.trim().strip_suffix("kB")?.trim().parse().ok()
    };
    Some(Memory {
        rss_kib: field("VmRSS:")?,
        peak_kib: field("VmHWM:")?,
    })
}

/// Resets the `VmHWM` of process `pid` to its RSS now (`/proc/<pid>/clear_refs`), so that a
/// later [`memory`] shows the peak of what happened in between, not of the process's start.
pub fn reset_peak_memory(pid: u32) -> io::Result<()> {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5")
}

/// The patroxy binary the integration tests run: `$PATROXY_BIN`, else the workspace's
/// `target/release/patroxy`, else `target/debug/patroxy`.
pub fn patroxy_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("PATROXY_BIN") {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "PATROXY_BIN={} does not exist; build it with `cargo xtask test`",
            path.display()
        );
        return path;
    }
    let target = workspace_root().join("target");
    for profile in ["release", "debug"] {
        let path = target.join(profile).join("patroxy");
        if path.is_file() {
            return path;
        }
    }
    panic!(
        "no patroxy binary in {} (release or debug) and PATROXY_BIN is unset; build it with \
         `cargo xtask test`",
        target.display()
    );
}

/// The cargo workspace's root directory (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests crate lives inside the workspace")
        .to_path_buf()
}

/// Whether this process runs as root (effective uid 0).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Gate for tests that need root (CAP_BPF, CAP_NET_ADMIN, network namespaces).
///
/// Returns true when running as root. Otherwise prints a SKIP line and returns false, so the
/// test can `return` early, except under CI (`CI` set), where the BPF tests must run and a
/// missing privilege is a failure.
pub fn require_root(test_name: &str) -> bool {
    if is_root() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test_name}: needs root (CAP_BPF/CAP_NET_ADMIN), and CI must run it as root");
    }
    // Written to the stderr handle rather than with eprintln! so libtest's output capture
    // does not hide it: the skip should be visible in a passing run.
    let _ = writeln!(
        io::stderr(),
        "SKIP {test_name}: needs root (CAP_BPF/CAP_NET_ADMIN); run as root, as CI does"
    );
    false
}

/// uid and gid of `nobody`, the unprivileged other user of the permission tests.
pub const NOBODY: u32 = 65534;

/// `command` run as `nobody`, without any capability.
pub fn as_nobody(command: &[&str]) -> std::process::Output {
    Command::new("setpriv")
        .args([
            &format!("--reuid={NOBODY}"),
            &format!("--regid={NOBODY}"),
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .args(command)
        .output()
        .expect("run setpriv")
}
