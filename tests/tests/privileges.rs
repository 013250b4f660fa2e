//! Least privilege: once started, the daemon holds no capability it does not need afterwards,
//! on any of its threads, whether it ran as root or as a service user given CAP_BPF and
//! CAP_NET_ADMIN the way systemd's AmbientCapabilities does; it still splices; and a user other
//! than the daemon's cannot open its pinned maps, while root's `patroxy sessions` can.
mod common;

use std::{
    collections::BTreeMap,
    net::TcpListener,
    os::unix::{
        fs::{MetadataExt as _, PermissionsExt as _},
        process::CommandExt as _,
    },
    path::Path,
    process::Command,
    time::Duration,
};

use common::{Path_, echo_once, local, one_listener};
use patroxy_tests::{
    backend::{Backend, Behaviour},
    daemon::Patroxy,
    process::{NOBODY, as_nobody, patroxy_bin, require_root},
};
use tokio::net::TcpStream;

/// Bit of CAP_NET_ADMIN and CAP_BPF in the capability sets.
const CAP_NET_ADMIN: u32 = 12;
const CAP_BPF: u32 = 39;
const CAP_NET_BIND_SERVICE: u64 = 1 << 10;
/// What the daemon logs once it has dropped them.
const DROPPED: &str = "dropped every capability not needed after start-up";

/// The capability sets (CapInh, CapPrm, CapEff, CapBnd, CapAmb) of every thread of `pid`.
fn thread_caps(pid: u32) -> BTreeMap<String, BTreeMap<String, u64>> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|task| {
            let task = task.unwrap();
            let status = std::fs::read_to_string(task.path().join("status")).unwrap();
            let sets = status
                .lines()
                .filter_map(|l| l.split_once(":\t"))
                .filter(|(k, _)| k.starts_with("Cap"))
                .map(|(k, v)| (k.to_owned(), u64::from_str_radix(v.trim(), 16).unwrap()))
                .collect();
            (task.file_name().to_string_lossy().into_owned(), sets)
        })
        .collect()
}

/// Asserts that every thread of `proxy` has effective = permitted = `kept` and nothing
/// inheritable or ambient; with `bounding`, the bounding set is `kept` too.
fn assert_caps(proxy: &Patroxy, kept: u64, bounding: Option<u64>) {
    assert!(
        proxy.wait_for_log(DROPPED, Duration::from_secs(10)),
        "{}",
        proxy.log()
    );
    let threads = thread_caps(proxy.child.id());
    assert!(
        threads.len() > 1,
        "tokio's workers are threads: {threads:?}"
    );
    for (tid, sets) in &threads {
        assert_eq!(sets["CapEff"], kept, "thread {tid}: {sets:?}");
        assert_eq!(sets["CapPrm"], kept, "thread {tid}: {sets:?}");
        assert_eq!(sets["CapInh"], 0, "thread {tid}: {sets:?}");
        assert_eq!(sets["CapAmb"], 0, "thread {tid}: {sets:?}");
        if let Some(bounding) = bounding {
            assert_eq!(sets["CapBnd"], bounding, "thread {tid}: {sets:?}");
        }
    }
}

/// `patroxy sessions` of `pin`, as root.
fn sessions(pin: &Path) -> String {
    let out = Command::new(patroxy_bin())
        .args(["sessions", "--pin-path"])
        .arg(pin)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "patroxy sessions: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// Starts the daemon as `nobody` with CAP_BPF and CAP_NET_ADMIN in its ambient set, as
/// systemd's `User=` and `AmbientCapabilities=` do.
fn as_service_user(cmd: &mut Command) {
    // SAFETY: only async-signal-safe system calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let check = |rc: libc::c_long| {
                if rc < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(())
                }
            };
            // The permitted set survives setuid with KEEPCAPS; then the two capabilities are
            // made effective, inheritable and ambient, so they survive the exec.
            check(libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0).into())?;
            check(libc::setgroups(0, std::ptr::null()).into())?;
            check(libc::setgid(NOBODY).into())?;
            check(libc::setuid(NOBODY).into())?;
            let header: [u32; 2] = [0x2008_0522, 0];
            let (low, high) = (1u32 << CAP_NET_ADMIN, 1u32 << (CAP_BPF - 32));
            let data: [u32; 6] = [low, low, low, high, high, high];
            check(libc::syscall(
                libc::SYS_capset,
                header.as_ptr(),
                data.as_ptr(),
            ))?;
            for cap in [CAP_NET_ADMIN, CAP_BPF] {
                check(
                    libc::prctl(
                        libc::PR_CAP_AMBIENT,
                        libc::PR_CAP_AMBIENT_RAISE,
                        cap as libc::c_ulong,
                        0,
                        0,
                    )
                    .into(),
                )?;
            }
            Ok(())
        })
    };
}

/// As root (the tests' and a developer's way): no capability is left on any thread, not even
/// in the bounding set, so a program it executes gains none back; it splices, and root's
/// `patroxy sessions` reads the pins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn as_root_every_thread_drops_every_capability() {
    if !require_root("as_root_every_thread_drops_every_capability") {
        return;
    }
    let backend = Backend::start(Behaviour::Echo).await;
    let pin = Patroxy::unique_pin_path("caps-root");
    let config = one_listener(Path_::Sockmap, &pin, backend.addr);
    let proxy = Patroxy::start("caps-root", &config);
    assert_caps(&proxy, 0, Some(0));
    assert!(
        proxy.log().contains(&format!("kept=none {DROPPED}"))
            || proxy.log().contains(&format!("{DROPPED} kept=none")),
        "one line lists what is kept:\n{}",
        proxy.log()
    );
    let mut session = TcpStream::connect(config.bind()).await.unwrap();
    assert!(echo_once(&mut session, b"spliced", Duration::from_secs(5)).await);
    assert!(sessions(&pin).contains("1 open session(s)"));
}

/// As the service user with the unit's two ambient capabilities: those are gone after
/// start-up; the pins are that user's, 0600, and root's `patroxy sessions` still reads them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn as_a_service_user_the_ambient_capabilities_are_dropped_after_start_up() {
    if !require_root("as_a_service_user_the_ambient_capabilities_are_dropped_after_start_up") {
        return;
    }
    let backend = Backend::start(Behaviour::Echo).await;
    let pin = Patroxy::unique_pin_path("caps-user");
    let config = one_listener(Path_::Sockmap, &pin, backend.addr);
    let proxy = Patroxy::start_with("caps-user", &config, as_service_user);
    assert_caps(&proxy, 0, None);
    let dir = std::fs::metadata(&pin).unwrap();
    assert_eq!((dir.uid(), dir.mode() & 0o7777), (NOBODY, 0o700));
    let pinned = std::fs::metadata(pin.join("SESSIONS")).unwrap();
    assert_eq!((pinned.uid(), pinned.mode() & 0o7777), (NOBODY, 0o600));
    let mut session = TcpStream::connect(config.bind()).await.unwrap();
    assert!(echo_once(&mut session, b"spliced", Duration::from_secs(5)).await);
    assert!(sessions(&pin).contains("1 open session(s)"));
}

/// A listener below 1024 keeps CAP_NET_BIND_SERVICE (a reload may bind it again), and only it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_below_1024_keeps_net_bind_service_alone() {
    if !require_root("a_port_below_1024_keeps_net_bind_service_alone") {
        return;
    }
    let backend = Backend::start(Behaviour::Echo).await;
    let port = (900..1024)
        .rev()
        .find(|&p| TcpListener::bind(local(p)).is_ok())
        .expect("a free port below 1024");
    let pin = Patroxy::unique_pin_path("caps-low");
    let mut config = one_listener(Path_::Fallback, &pin, backend.addr);
    config.listeners[0].bind = local(port);
    let proxy = Patroxy::start("caps-low", &config);
    assert_caps(&proxy, CAP_NET_BIND_SERVICE, Some(CAP_NET_BIND_SERVICE));
    assert!(
        proxy.log().contains("kept=CAP_NET_BIND_SERVICE"),
        "{}",
        proxy.log()
    );
}

/// `nobody` can open no pinned map, with bpftool or with BPF_OBJ_GET (`patroxy sessions`):
/// the directory keeps it out, and the pins' own mode (0600) too when the directory lets it
/// pass; root's `patroxy sessions` works beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unprivileged_user_cannot_open_a_pinned_map() {
    if !require_root("an_unprivileged_user_cannot_open_a_pinned_map") {
        return;
    }
    let backend = Backend::start(Behaviour::Echo).await;
    let pin = Patroxy::unique_pin_path("caps-open");
    let config = one_listener(Path_::Sockmap, &pin, backend.addr);
    let _proxy = Patroxy::start("caps-open", &config);
    let mut session = TcpStream::connect(config.bind()).await.unwrap();
    assert!(echo_once(&mut session, b"x", Duration::from_secs(5)).await);
    let p = pin.to_str().unwrap().to_owned();
    let attempts = |why: &str| {
        for map in ["SESSIONS", "BACKENDS", "SOCKS"] {
            let path = format!("{p}/{map}");
            for command in [
                vec!["bpftool", "map", "show", "pinned", &path],
                vec![
                    patroxy_bin().to_str().unwrap(),
                    "sessions",
                    "--pin-path",
                    &p,
                ],
            ] {
                let out = as_nobody(&command);
                let stderr = String::from_utf8_lossy(&out.stderr);
                assert!(!out.status.success(), "{why}: nobody ran {command:?}");
                assert!(
                    stderr.contains("Permission denied") || stderr.contains("not permitted"),
                    "{why}: {command:?} fails for want of permission: {stderr}"
                );
            }
        }
    };
    attempts("directory 0700");
    // Let nobody through the directory: the pins' own mode still refuses BPF_OBJ_GET.
    std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(0o711)).unwrap();
    attempts("directory 0711, pins 0600");
    std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(0o700)).unwrap();
    assert!(sessions(&pin).contains("1 open session(s)"));
}
