//! `patroxy import-haproxy`: a HAProxy configuration written as patroxy's TOML. Every directive
//! is carried over or reported with its line and why (unsupported, no meaning for patroxy, or
//! approximated as what); nothing is dropped silently.
//!
//! # Layout
//! - `parser`: the text -> sections of directives, words unquoted as HAProxy does, lines kept.
//! - `values`: HAProxy's times, numbers, binds and server addresses, rewritten for patroxy.
//! - `server_options`, `checks`: a `server` line's options; `option httpchk` and `http-check`.
//! - `sections`: the sections read into HAProxy's model (proxies with their defaults folded in).
//! - `convert`: HAProxy's model -> patroxy's (listeners, servers once, shared settings).
//! - `emit`: the TOML, each value commented with the line it came from.
//! - `report`: the findings.
//!
//! The written file always has patroxy's config shape ([`crate::config::parse_shape`]); it is
//! then validated as `check-config` would, and any problem found is part of the result.
mod checks;
mod convert;
mod emit;
mod parser;
mod report;
mod sections;
mod server_options;
mod values;

pub use parser::ParseError;
pub use report::{Finding, Loss};

use crate::config::{self, Config, ConfigError};

/// A value and the directive that set it, for the output's comments and the report.
#[derive(Clone, Debug)]
pub(crate) struct At<T> {
    pub value: T,
    pub line: usize,
    /// The directive as written.
    pub text: String,
}

impl<T> At<T> {
    pub fn new(value: T, directive: &parser::Directive) -> At<T> {
        At {
            value,
            line: directive.line,
            text: directive.text.clone(),
        }
    }

    pub fn map<U>(&self, f: impl FnOnce(&T) -> U) -> At<U> {
        At {
            value: f(&self.value),
            line: self.line,
            text: self.text.clone(),
        }
    }
}

/// What an import produced.
#[derive(Debug)]
pub struct Import {
    /// patroxy's TOML.
    pub toml: String,
    /// What was not carried over exactly, in file order.
    pub findings: Vec<Finding>,
    /// The TOML validated as `check-config` does it: its problems if it is not valid (a server
    /// host name that does not resolve here, a CA file missing, a limit patroxy refuses, ...).
    pub validation: Result<Config, ConfigError>,
}

impl Import {
    /// Every directive carried over and the result valid.
    pub fn is_clean(&self) -> bool {
        self.findings.is_empty() && self.validation.is_ok()
    }
}

/// Converts HAProxy configuration `text`; `origin` names it in comments and the report, and
/// `output` names the written file in validation messages.
pub fn import(text: &str, origin: &str, output: &str) -> Result<Import, ParseError> {
    let parsed = parser::parse(text)?;
    let mut report = report::Report::default();
    let haproxy = sections::read(&parsed, &mut report);
    let plan = convert::convert(&haproxy, &mut report);
    let findings = report.into_findings();
    let toml = emit::emit(&plan, &findings, origin);
    let validation = config::parse(&toml, output);
    Ok(Import {
        toml,
        findings,
        validation,
    })
}

#[cfg(test)]
mod tests;
