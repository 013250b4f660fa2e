//! Errors of the configuration module. Every problem in a file is reported as
//! `file:line:column: message` so an operator can jump to the offending value; I/O errors name
//! the path, since "No such file or directory" alone does not say which file.
use std::{fmt, ops::Range, path::PathBuf};

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read. The I/O error is part of the message (not a `source`) so a
    /// plain `{}` print already says everything.
    #[error("{}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    /// The file was read but is not a valid configuration: one diagnostic per problem found, in
    /// file order, never empty.
    #[error("{}", render(.0))]
    Invalid(Vec<Diagnostic>),
}

impl ConfigError {
    /// The positioned problems (empty for an I/O error); for tools that want them one by one.
    pub fn diagnostics(&self) -> &[Diagnostic] {
        match self {
            ConfigError::Io { .. } => &[],
            ConfigError::Invalid(diags) => diags,
        }
    }
}

/// One problem at one place in a configuration file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    /// The file name given to `parse` (or the path given to `load`).
    pub origin: String,
    /// 1-based line of the offending value.
    pub line: usize,
    /// 1-based column, counted in characters (not bytes) so it matches what editors show.
    pub column: usize,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.origin, self.line, self.column, self.message
        )
    }
}

fn render(diags: &[Diagnostic]) -> String {
    diags
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// The text being parsed, kept to turn the byte offsets serde/toml give into line:column.
pub(crate) struct Source<'a> {
    pub origin: &'a str,
    pub text: &'a str,
}

impl Source<'_> {
    /// 1-based line and character column of a byte offset (clamped to the text).
    pub fn position(&self, offset: usize) -> (usize, usize) {
        let mut offset = offset.min(self.text.len());
        while !self.text.is_char_boundary(offset) {
            offset -= 1;
        }
        let before = &self.text[..offset];
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let line = before.matches('\n').count() + 1;
        (line, before[line_start..].chars().count() + 1)
    }

    pub fn diagnostic(&self, span: Range<usize>, message: impl Into<String>) -> Diagnostic {
        let (line, column) = self.position(span.start);
        Diagnostic {
            origin: self.origin.to_string(),
            line,
            column,
            message: escape_controls(message.into()),
        }
    }
}

/// Messages quote the file's values, which may hold line breaks (`bind = "a\nb"`): written as
/// escapes, each diagnostic stays one line of `file:line:column: problem`.
fn escape_controls(message: String) -> String {
    if !message.contains(char::is_control) {
        return message;
    }
    message
        .chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based_and_count_characters() {
        let src = Source {
            origin: "x.toml",
            text: "a = 1\nné = \"é\"\n",
        };
        assert_eq!(src.position(0), (1, 1));
        assert_eq!(src.position(4), (1, 5));
        assert_eq!(src.position(6), (2, 1));
        // "né = " is 6 bytes but 5 characters.
        assert_eq!(src.position(12), (2, 6));
        assert_eq!(src.position(10_000), (3, 1));
    }

    /// Found by the `config` fuzz target: toml's message for a bad string spans two lines.
    #[test]
    fn a_toml_syntax_error_is_one_line() {
        let text = "[[listener]]\nname = :w\"\n";
        let err = crate::config::parse(text, "x.toml").unwrap_err();
        assert_eq!(err.diagnostics().len(), 1);
        let rendered = err.to_string();
        assert!(!rendered.contains('\n'), "{rendered}");
        assert!(
            rendered.starts_with("x.toml:2:8: invalid string; expected "),
            "{rendered}"
        );
    }

    #[test]
    fn values_quoted_in_a_message_keep_it_one_line() {
        let src = Source {
            origin: "x.toml",
            text: "",
        };
        let d = src.diagnostic(0..0, "bad bind `a\nb\r\tc`: expected `*:port`");
        assert_eq!(d.message, "bad bind `a\\nb\\r\\tc`: expected `*:port`");
    }

    #[test]
    fn io_error_names_the_path() {
        let err = ConfigError::Io {
            path: "/etc/patroxy.toml".into(),
            error: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        assert!(err.to_string().starts_with("/etc/patroxy.toml: "), "{err}");
    }
}
