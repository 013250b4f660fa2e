//! `patroxy import-haproxy FILE [-o OUT]`: a HAProxy configuration written as patroxy's TOML,
//! with what could not be carried over reported on stderr, one line per directive.
use std::{path::Path, process::ExitCode};

use patroxy::import_haproxy::import;

/// Every directive carried over and the result passes `check-config`.
const EXIT_CLEAN: u8 = 0;
/// Written, but with losses (each reported) or a result that fails `check-config`.
const EXIT_LOSSES: u8 = 1;
/// Nothing written: the file could not be read or written, or HAProxy would refuse it too.
const EXIT_FAILED: u8 = 2;

pub fn run(file: &Path, out: Option<&Path>) -> ExitCode {
    let origin = file.display().to_string();
    let text = match std::fs::read(file) {
        // HAProxy reads bytes; a stray non-UTF-8 byte (a Latin-1 comment) must not stop the import.
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) => return failed(format_args!("{origin}: {e}")),
    };
    let output_name = out.map_or_else(|| "<stdout>".to_owned(), |o| o.display().to_string());
    let import = match import(&text, &origin, &output_name) {
        Ok(import) => import,
        Err(e) => return failed(format_args!("{origin}:{}: {}", e.line, e.message)),
    };
    match out {
        Some(path) => {
            if let Err(e) = std::fs::write(path, &import.toml) {
                return failed(format_args!("{}: {e}", path.display()));
            }
        }
        None => print!("{}", import.toml),
    }
    for finding in &import.findings {
        eprintln!("{origin}:{finding}");
    }
    if let Err(e) = &import.validation {
        eprintln!("patroxy import-haproxy: the result does not pass check-config:\n{e}");
    }
    let losses = import.findings.len();
    if import.is_clean() {
        eprintln!("patroxy import-haproxy: {origin}: every directive carried over");
        ExitCode::from(EXIT_CLEAN)
    } else {
        eprintln!(
            "patroxy import-haproxy: {origin}: {losses} directive(s) not carried over exactly{}",
            if import.validation.is_err() {
                ", and the result is not valid"
            } else {
                ""
            }
        );
        ExitCode::from(EXIT_LOSSES)
    }
}

fn failed(message: std::fmt::Arguments) -> ExitCode {
    eprintln!("patroxy import-haproxy: {message}");
    ExitCode::from(EXIT_FAILED)
}
