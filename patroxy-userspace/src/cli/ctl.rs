//! `patroxy ctl`: one command line to the daemon's runtime socket, its answer printed.
use std::{
    io::{Read as _, Write as _},
    net::Shutdown,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};

/// Longer than the daemon's own deadline per connection (30 s), so the daemon ends it first.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(35);

/// The runtime socket: `--socket`, or the `[runtime]` socket of the config file.
pub fn socket_path(socket: Option<PathBuf>, config: &Path) -> anyhow::Result<PathBuf> {
    if let Some(socket) = socket {
        return Ok(socket);
    }
    match patroxy::config::load(config)?.runtime {
        Some(runtime) => Ok(runtime.socket),
        None => bail!(
            "{} has no [runtime] section; pass --socket",
            config.display()
        ),
    }
}

/// Sends `words` as one command and prints the answer; an error answer is an error (exit 1).
pub fn run(socket: &Path, words: &[String]) -> anyhow::Result<()> {
    let answer = send(socket, &words.join(" "))?;
    if let Some(error) = error_of(&answer) {
        bail!("{error}");
    }
    print!("{answer}");
    Ok(())
}

/// The daemon's answer to `line`.
pub fn send(socket: &Path, line: &str) -> anyhow::Result<String> {
    let mut stream = UnixStream::connect(socket).with_context(|| {
        format!(
            "connecting to the runtime socket {} (is patroxy running with [runtime]? may this user open it?)",
            socket.display()
        )
    })?;
    stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
    stream.write_all(format!("{line}\n").as_bytes())?;
    stream.shutdown(Shutdown::Write)?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .with_context(|| format!("reading the answer from {}", socket.display()))?;
    Ok(answer)
}

/// The message of an error answer: a text line `error: ...`, or JSON `{"error": ...}`.
pub fn error_of(answer: &str) -> Option<String> {
    if let Some(message) = answer.strip_prefix("error: ") {
        return Some(message.trim_end().to_string());
    }
    let value: serde_json::Value = serde_json::from_str(answer).ok()?;
    value.get("error")?.as_str().map(String::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_answers_are_recognised_in_both_formats() {
        assert_eq!(
            error_of("error: no listener named \"x\"\n").as_deref(),
            Some("no listener named \"x\"")
        );
        assert_eq!(
            error_of("{\"error\":\"reload is not available\"}\n").as_deref(),
            Some("reload is not available")
        );
        assert_eq!(
            error_of("server b of listener r set to MAINT (was READY)\n"),
            None
        );
        assert_eq!(error_of("{\n  \"listeners\": []\n}\n"), None);
    }
}
