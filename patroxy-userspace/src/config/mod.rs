//! Configuration: the TOML file read once at startup (and on reload) into typed values.
//!
//! # Layout
//! - `raw`: the file's shape, serde structs that deny unknown keys and keep value positions.
//! - `duration`, `addr`: how durations, binds and server addresses are written.
//! - `validate`: raw -> `model` in one pass, every default applied and every reference resolved.
//! - `model`: the typed `Config` the rest of the daemon uses.
//! - `tls`: the checks' PEM files, read the same way by validation and by the checker.
//! - `diff`: what a reload of the file changes, and what it cannot change without a restart.
//! - `allow`: the `[[allow]]` rules and `[xdp]`, checked as a set (no overlaps) against the
//!   listeners they name and the host's interfaces.
//! - `admin_token`: the admin endpoint's token file, checked and read at load.
//! - `owner`: the runtime socket's user and group, resolved from names.
//! - `error`: `ConfigError`, whose messages read `file:line:column: problem`.
//!
//! Nothing is bound or loaded before `load` succeeds, so a bad file never half-starts the proxy.
//! Validation also looks at this host where the file names something on it (server host names,
//! TLS files, the pin directory's parent), so `check-config` refuses what `run` would.
mod addr;
pub mod admin_token;
mod allow;
pub mod diff;
mod duration;
mod error;
pub mod model;
mod owner;
mod raw;
pub mod tls;
mod validate;

#[cfg(test)]
mod tests;

use std::path::Path;

pub use error::{ConfigError, Diagnostic};
pub use model::*;

use error::Source;
pub(crate) use validate::WRITE_PATHS;

/// Reads and parses the file at `path`; messages name it as it was given.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Io {
        path: path.to_path_buf(),
        error,
    })?;
    parse(&text, &path.display().to_string())
}

/// Parses and validates configuration `text`; `origin` is the file name used in messages.
pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
    let src = Source { origin, text };
    let raw = read_raw(&src)?;
    validate::validate(&raw, &src).map_err(ConfigError::Invalid)
}

/// Whether `text` has the file's shape (TOML with known keys and values of the right types),
/// without validating what they say: what `import-haproxy` promises of every file it writes.
pub fn parse_shape(text: &str, origin: &str) -> Result<(), ConfigError> {
    read_raw(&Source { origin, text }).map(drop)
}

fn read_raw(src: &Source) -> Result<raw::RawConfig, ConfigError> {
    toml::from_str(src.text).map_err(|e| {
        let span = e.span().unwrap_or(0..0);
        // toml's message can end with a newline and run over lines ("invalid string\nexpected
        // `\"`, `'`"); keep each diagnostic on one line.
        let message: Vec<&str> = e.message().lines().map(str::trim).collect();
        ConfigError::Invalid(vec![src.diagnostic(span, message.join("; "))])
    })
}
