//! What the fuzz targets that talk over loopback share (`first_bytes`, `patroni_response`):
//! the process set up as patroxy's own binary would be, a runtime to drive patroxy's async
//! code, and a listener for the target's side of the connection.
use tokio::net::TcpListener;
use tokio::runtime::Runtime;

/// A current-thread runtime and a listener bound on 127.0.0.1 (an ephemeral port), built once
/// in a target's `init`: one runtime and port for all of the target's runs.
pub struct Loopback {
    pub runtime: Runtime,
    pub listener: TcpListener,
}

impl Loopback {
    pub fn start() -> Loopback {
        // patroxy's binary ignores SIGPIPE (Rust's runtime does); libFuzzer's main does not.
        // SAFETY: setting a signal's disposition to SIG_IGN before any thread uses it.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let listener = runtime
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("binding the loopback listener");
        Loopback { runtime, listener }
    }
}
