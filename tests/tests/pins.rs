//! The pin directory belongs to one daemon and to no other user: a second daemon on the same
//! pin path refuses before touching the first's pins or binding, a directory another user
//! created is refused, and an unprivileged user cannot rename or delete the pins. The sockmap
//! path only (root, bpffs), so every test needs root.
mod common;

use std::{
    os::unix::{fs::MetadataExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
    time::Duration,
};

use common::{Path_, echo_once, local, one_listener};
use patroxy_tests::{
    backend::{Backend, Behaviour},
    config::{Bpf, ProxyConfig},
    daemon::Patroxy,
    ports::{free_tcp_port, is_listening},
    process::{ChildGuard, NOBODY, as_nobody, patroxy_bin, require_root},
};
use tokio::net::TcpStream;

/// The maps patroxy pins, as named under the pin directory.
const PINS: [&str; 4] = ["SOCKS", "SESSIONS", "BACKENDS", "LOG_LIMIT"];

/// Starts `patroxy run` on `toml` and waits for it to exit, which a refused start does at once.
/// Panics, with its log, if it is still running after 10 s.
fn run_expecting_exit(name: &str, config: &ProxyConfig) -> (ExitStatus, String) {
    let config = write_config(name, &config.to_toml());
    let mut cmd = Command::new(patroxy_bin());
    cmd.args(["run", "--config"]).arg(&config);
    let mut child = ChildGuard::spawn(name, &mut cmd).expect("spawn patroxy");
    match child.wait_timeout(Duration::from_secs(10)).unwrap() {
        Some(status) => (status, child.log()),
        None => panic!("{name} is still running; log:\n{}", child.log()),
    }
}

fn write_config(name: &str, toml: &str) -> PathBuf {
    let dir = std::env::temp_dir().join("patroxy-test-configs");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(format!("{name}-{}.toml", std::process::id()));
    std::fs::write(&file, toml).unwrap();
    file
}

/// (inode, owner, mode) of each pin: the same pins, untouched, keep all three.
fn pins_of(dir: &Path) -> Vec<(u64, u32, u32)> {
    PINS.iter()
        .map(|name| {
            let meta = std::fs::metadata(dir.join(name))
                .unwrap_or_else(|e| panic!("pin {name} under {}: {e}", dir.display()));
            (meta.ino(), meta.uid(), meta.mode() & 0o7777)
        })
        .collect()
}

/// Two daemons with one pin_path (and different listeners, so binding cannot be what stops the
/// second): the second exits at once saying who holds the directory, without listening, and
/// the first keeps its pins, its session and `patroxy sessions`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_daemon_on_the_same_pin_path_refuses_and_touches_nothing() {
    if !require_root("a_second_daemon_on_the_same_pin_path_refuses_and_touches_nothing") {
        return;
    }
    let backend = Backend::start(Behaviour::Echo).await;
    let pin = Patroxy::unique_pin_path("twice");
    let config = one_listener(Path_::Sockmap, &pin, backend.addr);
    let first = Patroxy::start("twice1", &config);
    let mut session = TcpStream::connect(config.bind()).await.unwrap();
    assert!(echo_once(&mut session, b"before", Duration::from_secs(5)).await);
    let pins = pins_of(&pin);

    let second_bind = local(free_tcp_port());
    let mut second = config.clone();
    second.listeners[0].bind = second_bind;
    let (status, log) = run_expecting_exit("twice2", &second);
    assert!(!status.success(), "the second daemon must refuse:\n{log}");
    assert!(
        log.contains(&format!(
            "pin directory {}: locked by another running patroxy (pid {})",
            pin.display(),
            first.child.id()
        )),
        "the refusal names the directory and the daemon holding it:\n{log}"
    );
    assert!(!log.contains("stale pins"), "{log}");
    assert!(!is_listening(second_bind), "the second daemon never bound");

    assert_eq!(
        pins_of(&pin),
        pins,
        "the first daemon's pins are the same pins"
    );
    assert!(echo_once(&mut session, b"after", Duration::from_secs(5)).await);
    let out = Command::new(patroxy_bin())
        .args(["sessions", "--pin-path"])
        .arg(&pin)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "patroxy sessions: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("1 open session(s)"), "{text}");
    drop(session);
    drop(first);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !pin.exists(),
        "the first daemon still removes its pins on exit"
    );
}

/// A pin directory another user made is theirs to empty: refused in both sockmap modes (a
/// fallback would hide it), and left as it was.
#[test]
fn a_pin_directory_another_user_created_is_refused() {
    if !require_root("a_pin_directory_another_user_created_is_refused") {
        return;
    }
    let pin = Patroxy::unique_pin_path("foreign");
    let planted = pin.join("planted");
    std::fs::create_dir(&pin).unwrap();
    let _cleanup = RemoveOnDrop(&pin);
    std::fs::create_dir(&planted).unwrap();
    std::os::unix::fs::chown(&pin, Some(NOBODY), Some(NOBODY)).unwrap();
    let required = one_listener(Path_::Sockmap, &pin, local(free_tcp_port()));
    let mut auto = required.clone();
    auto.global.bpf = Some(Bpf::Auto);
    for (mode, config) in [("required", &required), ("auto", &auto)] {
        let (status, log) = run_expecting_exit(&format!("foreign-{mode}"), config);
        assert!(!status.success(), "bpf = {mode} must refuse:\n{log}");
        assert!(
            log.contains(&format!(
                "pin directory {}: owned by uid {NOBODY}, not by root or this daemon (uid 0)",
                pin.display()
            )),
            "bpf = {mode}: the refusal says who owns it:\n{log}"
        );
        assert!(
            !is_listening(config.bind()),
            "bpf = {mode}: refused before binding"
        );
    }
    assert!(planted.is_dir(), "the directory is left as it was");
    assert!(!pin.join("SESSIONS").exists(), "nothing was pinned into it");
}

/// Removes a directory the test made, and what is in it, however the test ends.
struct RemoveOnDrop<'a>(&'a Path);

impl Drop for RemoveOnDrop<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(self.0);
    }
}

/// The directory patroxy creates is 0700 whatever the umask it was started with (0 here, as a
/// careless supervisor may leave it), its pins 0600, and `nobody` can neither rename nor delete
/// a pin nor move the directory away (its parent, bpffs' root, is sticky).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_user_cannot_rename_or_delete_the_pins() {
    if !require_root("another_user_cannot_rename_or_delete_the_pins") {
        return;
    }
    let backend = Backend::start(Behaviour::Echo).await;
    let pin = Patroxy::unique_pin_path("nobody");
    let config = one_listener(Path_::Sockmap, &pin, backend.addr);
    let _proxy = Patroxy::start_with("nobody", &config, |cmd| {
        // SAFETY: umask(2) is async-signal-safe and cannot fail.
        unsafe {
            cmd.pre_exec(|| {
                libc::umask(0);
                Ok(())
            })
        };
    });
    let pins = pins_of(&pin);
    let sessions = pin.join("SESSIONS");
    let s = sessions.to_str().unwrap();
    let p = pin.to_str().unwrap();
    let moved = format!("{p}-moved");
    for attempt in [
        vec!["mv", s, &format!("{p}/renamed")],
        vec!["rm", "-f", s],
        vec!["mv", p, &moved],
        vec!["rm", "-rf", p],
    ] {
        let out = as_nobody(&attempt);
        assert!(
            !out.status.success(),
            "nobody ran {attempt:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(pins_of(&pin), pins, "every pin is where it was");
    assert!(!Path::new(&moved).exists());
    let dir = std::fs::metadata(&pin).unwrap();
    assert_eq!(
        (dir.uid(), dir.mode() & 0o7777),
        (0, 0o700),
        "pin directory"
    );
    assert!(
        pins.iter().all(|&(_, uid, mode)| uid == 0 && mode == 0o600),
        "pins are root's, 0600: {pins:?}"
    );
}
