//! Network namespaces and veth pairs for harnesses that build a small network of their own
//! (the bench's namespace topology and its XDP bench): create them, run a command or a thread
//! inside one, remove them by name (quiet about what is already gone, so a start can clean
//! up after a crashed run).
//!
//! Only the network namespace is entered (setns with CLONE_NEWNET), unlike `ip netns exec`,
//! which also remounts /sys: a patroxy started this way still sees the host's /sys/fs/bpf,
//! where it pins its maps, and its pid is the child's own.

use std::ffi::CString;
use std::io;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::postgres::run_with_timeout;

/// Runs `ip` with `args`; its stderr is the error.
pub fn ip(args: &[&str]) -> io::Result<()> {
    let out = run_with_timeout(Command::new("ip").args(args), Duration::from_secs(20))
        .map_err(|e| io::Error::other(format!("ip {}: {e}", args.join(" "))))?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Creates namespace `ns` with its loopback up.
pub fn add(ns: &str) -> io::Result<()> {
    ip(&["netns", "add", ns])?;
    ip(&["-n", ns, "link", "set", "lo", "up"])
}

/// A veth pair: `a` in namespace `a_ns` (None: this host's) and `b` in `b_ns`, each with its
/// address (`10.0.0.1/24` form) and up.
pub fn veth(
    a_ns: Option<&str>,
    a: &str,
    a_addr: &str,
    b_ns: &str,
    b: &str,
    b_addr: &str,
) -> io::Result<()> {
    let mut add = vec![
        "link", "add", a, "type", "veth", "peer", "name", b, "netns", b_ns,
    ];
    if let Some(ns) = a_ns {
        add.splice(0..0, ["-n", ns]);
    }
    ip(&add)?;
    for (ns, dev, addr) in [(a_ns, a, a_addr), (Some(b_ns), b, b_addr)] {
        let mut prefix = Vec::new();
        if let Some(ns) = ns {
            prefix.extend(["-n", ns]);
        }
        ip(&[&prefix[..], &["addr", "add", addr, "dev", dev]].concat())?;
        ip(&[&prefix[..], &["link", "set", dev, "up"]].concat())?;
    }
    Ok(())
}

/// Sets a sysctl inside namespace `ns` (`net.*` sysctls are per namespace).
pub fn sysctl(ns: &str, key: &str, value: &str) -> io::Result<()> {
    ip(&[
        "netns",
        "exec",
        ns,
        "sysctl",
        "-qw",
        &format!("{key}={value}"),
    ])
}

/// Makes `cmd` run inside namespace `ns` (its network only).
pub fn enter<'a>(cmd: &'a mut Command, ns: &str) -> &'a mut Command {
    let path = CString::new(format!("/run/netns/{ns}")).expect("no NUL in a namespace name");
    // SAFETY: the closure only calls open, setns and close (async-signal-safe) on a path
    // allocated before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let rc = libc::setns(fd, libc::CLONE_NEWNET);
            libc::close(fd);
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// Runs `f` on a thread of its own inside namespace `ns` (setns changes only the calling
/// thread's namespace, so the caller's stays as it was).
pub fn within<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> io::Result<T> {
    let file = std::fs::File::open(format!("/run/netns/{ns}"))?;
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd as _;
        // SAFETY: setns on an open namespace file, for this thread only.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(f())
    })
    .join()
    .map_err(|_| io::Error::other("thread inside the namespace panicked"))?
}

/// Kills every process left inside namespace `ns` (SIGKILL): a crashed run's leftovers.
pub fn kill_all(ns: &str) {
    let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() else {
        return;
    };
    for pid in String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
    {
        // SAFETY: kill(2) on a process inside a namespace the harness created.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// Removes namespaces (with the processes and veths in them) and host-side links, by name;
/// quiet about what does not exist.
pub fn remove(namespaces: &[&str], host_links: &[&str]) {
    for ns in namespaces {
        if Path::new(&format!("/run/netns/{ns}")).exists() {
            kill_all(ns);
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
    for link in host_links {
        if Path::new(&format!("/sys/class/net/{link}")).exists() {
            let _ = Command::new("ip").args(["link", "del", link]).output();
        }
    }
}
