//! The HAProxy importer on arbitrary text: `patroxy::import_haproxy::import` must never panic;
//! it either refuses the file with a positioned error (as HAProxy would) or writes a TOML that
//! has patroxy's config shape, and a result that fails validation must also fail it when
//! loaded again (the importer's verdict is the loader's).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(init: without_network(), |data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    match patroxy::import_haproxy::import(&text, "haproxy.cfg", "patroxy.toml") {
        Ok(import) => {
            if let Err(e) = patroxy::config::parse_shape(&import.toml, "patroxy.toml") {
                panic!("the import does not have the config's shape: {e}\n{}", import.toml);
            }
            let reloaded = patroxy::config::parse(&import.toml, "patroxy.toml");
            assert_eq!(reloaded.is_ok(), import.validation.is_ok());
            for finding in &import.findings {
                let lines = text.split('\n').count();
                assert!((1..=lines).contains(&finding.line), "line {} of {lines}", finding.line);
                assert!(!finding.to_string().contains('\n'), "a finding on two lines");
            }
        }
        Err(error) => {
            let lines = text.split('\n').count();
            assert!((1..=lines).contains(&error.line), "line {} of {lines}", error.line);
        }
    }
});

/// Server addresses may be host names, which validation resolves: none of the fuzzer's may
/// become a DNS query. In a network namespace of its own the process has no route anywhere, so
/// a lookup fails at once (as in the config target).
fn without_network() {
    // SAFETY: unshare(2) with namespace flags only; libFuzzer calls this before its own threads.
    let alone = unsafe { libc::unshare(libc::CLONE_NEWNET) } == 0
        || unsafe { libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET) } == 0;
    if !alone {
        eprintln!(
            "import_haproxy fuzz target: cannot enter a network namespace of its own ({}); run \
             as root or where unprivileged user namespaces are allowed",
            std::io::Error::last_os_error()
        );
        std::process::exit(2);
    }
}
