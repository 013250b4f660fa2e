//! What the import could not carry over, one finding per directive (or per option of a
//! `server` or `bind` line), each with its line and why. Nothing is dropped without one.
use std::fmt;

/// Why a directive was not carried over as it was.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Loss {
    /// patroxy has no such feature; the directive's effect is gone.
    Unsupported(String),
    /// The directive has no meaning for patroxy (HAProxy process management, HTTP-only
    /// settings, ...); nothing changes for the traffic.
    NoMeaning(String),
    /// Carried over, but not exactly: the text says as what.
    Approximated(String),
}

impl Loss {
    fn label(&self) -> (&'static str, &str) {
        match self {
            Loss::Unsupported(why) => ("unsupported", why),
            Loss::NoMeaning(why) => ("no meaning for patroxy", why),
            Loss::Approximated(why) => ("approximated", why),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// 1-based line in the HAProxy file.
    pub line: usize,
    /// The directive, or the part of it concerned (`weight 10` of a `server` line).
    pub directive: String,
    pub loss: Loss,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (label, why) = self.loss.label();
        write!(
            f,
            "{}: `{}`: {label}: {}",
            self.line,
            one_line(&self.directive),
            one_line(why)
        )
    }
}

/// Collects findings while the conversion runs.
#[derive(Debug, Default)]
pub struct Report {
    findings: Vec<Finding>,
}

impl Report {
    pub fn add(&mut self, line: usize, directive: impl Into<String>, loss: Loss) {
        self.findings.push(Finding {
            line,
            directive: directive.into(),
            loss,
        });
    }

    pub fn unsupported(
        &mut self,
        line: usize,
        directive: impl Into<String>,
        why: impl Into<String>,
    ) {
        self.add(line, directive, Loss::Unsupported(why.into()));
    }

    pub fn no_meaning(
        &mut self,
        line: usize,
        directive: impl Into<String>,
        why: impl Into<String>,
    ) {
        self.add(line, directive, Loss::NoMeaning(why.into()));
    }

    pub fn approximated(
        &mut self,
        line: usize,
        directive: impl Into<String>,
        why: impl Into<String>,
    ) {
        self.add(line, directive, Loss::Approximated(why.into()));
    }

    /// The findings in file order (a line's own order kept).
    pub fn into_findings(mut self) -> Vec<Finding> {
        self.findings.sort_by_key(|f| f.line);
        self.findings
    }
}

/// Text safe inside a TOML comment (which allows no control character but tab) and on one
/// report line: control characters are written as escapes.
pub fn one_line(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let escaped: Vec<char> = if c.is_control() && c != '\t' {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            escaped
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn findings_read_line_directive_kind_and_reason() {
        let mut r = Report::default();
        r.unsupported(9, "weight 10", "patroxy balances servers equally");
        r.no_meaning(2, "daemon", "systemd runs patroxy");
        let f = r.into_findings();
        assert_eq!(
            f[0].to_string(),
            "2: `daemon`: no meaning for patroxy: systemd runs patroxy"
        );
        assert_eq!(
            f[1].to_string(),
            "9: `weight 10`: unsupported: patroxy balances servers equally"
        );
    }

    #[test]
    fn a_finding_is_one_line_whatever_its_words_decoded_to() {
        // Found by the import_haproxy fuzz target: a quoted word's "\n" became a newline.
        let finding = Finding {
            line: 3,
            directive: "mode \"a\nb\"".into(),
            loss: Loss::Unsupported("value \"x\ny\"".into()),
        };
        let text = finding.to_string();
        assert!(!text.contains('\n'), "{text}");
        assert!(text.contains("a\\nb") && text.contains("x\\ny"), "{text}");
    }

    #[test]
    fn one_line_escapes_control_characters() {
        assert_eq!(one_line("a\nb\u{7f}\tc"), "a\\nb\\u{7f}\tc");
    }
}
