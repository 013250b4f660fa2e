//! The config loader on arbitrary text: `patroxy::config::parse` must never panic, and what it
//! returns must keep its documented promises (errors positioned inside the file and never
//! empty; a config that validated has listeners, each with distinct servers).
#![no_main]

use std::collections::HashSet;

use libfuzzer_sys::fuzz_target;

const ORIGIN: &str = "fuzz.toml";

fuzz_target!(init: without_network(), |data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    match patroxy::config::parse(&text, ORIGIN) {
        Ok(config) => {
            assert!(!config.listeners.is_empty(), "validated without a listener");
            let mut listener_names = HashSet::new();
            for listener in &config.listeners {
                assert!(listener_names.insert(&listener.name), "listener named twice");
                assert!(!listener.servers.is_empty(), "{}: no server", listener.name);
                let mut server_names = HashSet::new();
                for server in &listener.servers {
                    assert!(server_names.insert(&server.name), "server twice in a listener");
                }
            }
        }
        Err(error) => {
            let diagnostics = error.diagnostics();
            assert!(!diagnostics.is_empty(), "an error without a diagnostic");
            let lines = text.split('\n').count();
            for d in diagnostics {
                assert_eq!(d.origin, ORIGIN);
                assert!((1..=lines).contains(&d.line), "line {} of {lines}", d.line);
                assert!(d.column >= 1, "column {}", d.column);
                assert!(!d.message.contains('\n'), "a diagnostic on two lines: {d}");
            }
            let _ = error.to_string();
        }
    }
});

/// Server addresses may be host names, which the loader resolves: the fuzzer writes plenty,
/// and none of them may become a DNS query. In a network namespace of its own the process has
/// no route anywhere (not even loopback), so a lookup fails at once; /etc/hosts still answers.
fn without_network() {
    // SAFETY: unshare(2) with namespace flags only; libFuzzer calls this before its own threads.
    let alone = unsafe { libc::unshare(libc::CLONE_NEWNET) } == 0
        || unsafe { libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET) } == 0;
    if !alone {
        eprintln!(
            "config fuzz target: cannot enter a network namespace of its own ({}); run as root \
             or where unprivileged user namespaces are allowed, so that host names the fuzzer \
             writes are never looked up in DNS",
            std::io::Error::last_os_error()
        );
        std::process::exit(2);
    }
}
