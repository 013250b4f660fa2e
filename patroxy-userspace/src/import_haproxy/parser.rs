//! HAProxy's configuration text -> sections of directives, each word unquoted and unescaped as
//! HAProxy's own line parser does it (`parse_line` in its tools.c), each directive keeping its
//! line number for the report.
//!
//! What HAProxy does and this copies: words are separated by spaces and tabs; `#` outside quotes
//! starts a comment; a backslash escapes a space, `#`, a quote or itself, and `\t` `\n` `\r`
//! `\xHH` stand for those bytes (any other backslash is kept as written); single quotes take
//! everything literally; double quotes keep escapes and expand environment variables (`$VAR`,
//! `${VAR}`) when HAProxy starts, which this cannot do, so such a directive is flagged. There is
//! no line continuation: a line ending in a backslash is complete, the backslash one more
//! character of its last word. An unmatched quote makes HAProxy refuse the file, and so this.

/// One configuration line that says something.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Directive {
    /// 1-based line in the file.
    pub line: usize,
    /// The words after unquoting; never empty.
    pub words: Vec<String>,
    /// The line as written, without leading and trailing blanks: what the report quotes.
    pub text: String,
    /// Environment variables in double quotes, left unexpanded (HAProxy expands them at start).
    pub env_vars: Vec<String>,
}

impl Directive {
    pub fn keyword(&self) -> &str {
        &self.words[0]
    }

    /// The word after the keyword at `index` (0 = the first argument).
    pub fn arg(&self, index: usize) -> Option<&str> {
        self.words.get(index + 1).map(String::as_str)
    }

    pub fn args(&self) -> &[String] {
        &self.words[1..]
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SectionKind {
    Global,
    Defaults,
    Frontend,
    Backend,
    Listen,
    /// userlist, peers, resolvers, mailers, cache, ...: nothing patroxy has.
    Other(String),
}

impl SectionKind {
    fn of(keyword: &str) -> Option<SectionKind> {
        Some(match keyword {
            "global" => SectionKind::Global,
            "defaults" => SectionKind::Defaults,
            "frontend" => SectionKind::Frontend,
            "backend" => SectionKind::Backend,
            "listen" => SectionKind::Listen,
            "userlist" | "peers" | "resolvers" | "mailers" | "program" | "http-errors" | "ring"
            | "cache" | "log-forward" | "fcgi-app" | "crt-store" | "traces" | "acme"
            | "dynamic-update" => SectionKind::Other(keyword.to_owned()),
            _ => return None,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Section {
    pub kind: SectionKind,
    /// The header line (`listen postgres_write`, `defaults`, ...).
    pub header: Directive,
    pub directives: Vec<Directive>,
}

impl Section {
    /// The name after the keyword, if the header has one.
    pub fn name(&self) -> Option<&str> {
        self.header.arg(0)
    }
}

/// The file as sections, plus what HAProxy would not place in one.
#[derive(Debug, Default)]
pub struct Parsed {
    pub sections: Vec<Section>,
    /// Directives before the first section header (HAProxy refuses them) and conditional-block
    /// lines (`.if`, `.else`, `.diag`, ...), which need HAProxy's runtime to evaluate.
    pub stray: Vec<Directive>,
}

/// The file cannot be read as HAProxy reads it (HAProxy refuses it too).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct ParseError {
    pub line: usize,
    pub message: String,
}

pub fn parse(text: &str) -> Result<Parsed, ParseError> {
    let mut parsed = Parsed::default();
    for (index, raw) in text.split('\n').enumerate() {
        let line = index + 1;
        let raw = raw.strip_suffix('\r').unwrap_or(raw);
        let Some(directive) = tokenize(raw, line)? else {
            continue;
        };
        if let Some(kind) = SectionKind::of(directive.keyword()) {
            parsed.sections.push(Section {
                kind,
                header: directive,
                directives: Vec::new(),
            });
        } else if directive.keyword().starts_with('.') {
            parsed.stray.push(directive);
        } else if let Some(section) = parsed.sections.last_mut() {
            section.directives.push(directive);
        } else {
            parsed.stray.push(directive);
        }
    }
    Ok(parsed)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Quote {
    None,
    Single,
    Double,
}

/// One line's words, or `None` for a blank or comment line.
fn tokenize(raw: &str, line: usize) -> Result<Option<Directive>, ParseError> {
    let error = |message: String| ParseError { line, message };
    let mut words: Vec<String> = Vec::new();
    let mut env_vars = Vec::new();
    let mut word = String::new();
    // A word may be empty (`""`), so whether one is open is tracked apart from its text.
    let mut open = false;
    let mut quote = Quote::None;
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Quote::Single, '\'') | (Quote::Double, '"') => quote = Quote::None,
            (Quote::Single, c) => word.push(c),
            (Quote::None, ' ' | '\t') => {
                if open {
                    words.push(std::mem::take(&mut word));
                    open = false;
                }
            }
            (Quote::None, '#') => break,
            (Quote::None, '\'') => (quote, open) = (Quote::Single, true),
            (Quote::None, '"') => (quote, open) = (Quote::Double, true),
            (_, '\\') => {
                open = true;
                match chars.peek().copied() {
                    Some(e @ (' ' | '\\' | '#' | '\'' | '"')) => {
                        chars.next();
                        word.push(e);
                    }
                    Some('$') if quote == Quote::Double => {
                        chars.next();
                        word.push('$');
                    }
                    Some(e @ ('t' | 'n' | 'r')) => {
                        chars.next();
                        word.push(match e {
                            't' => '\t',
                            'n' => '\n',
                            _ => '\r',
                        });
                    }
                    Some('x') => {
                        chars.next();
                        let hex: String = (0..2).filter_map(|_| chars.next()).collect();
                        let byte = (hex.len() == 2)
                            .then(|| u8::from_str_radix(&hex, 16).ok())
                            .flatten()
                            .ok_or_else(|| {
                                error(format!("invalid hexadecimal escape `\\x{hex}`"))
                            })?;
                        word.push(char::from(byte));
                    }
                    // Anything else (a trailing backslash included) stays as written.
                    _ => word.push('\\'),
                }
            }
            (Quote::Double, '$') => {
                let name = env_var_name(&mut chars);
                if name.is_empty() {
                    word.push('$');
                } else {
                    word.push_str(&format!("${{{name}}}"));
                    env_vars.push(name);
                }
            }
            (_, c) => {
                open = true;
                word.push(c);
            }
        }
    }
    if quote != Quote::None {
        return Err(error(
            "unmatched quote (HAProxy refuses this line too)".into(),
        ));
    }
    if open {
        words.push(word);
    }
    if words.is_empty() {
        return Ok(None);
    }
    Ok(Some(Directive {
        line,
        words,
        text: raw.trim().to_owned(),
        env_vars,
    }))
}

/// The name of `$NAME` or `${NAME}` after the `$` (letters, digits, `_`), consumed.
fn env_var_name(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) -> String {
    let braced = chars.peek() == Some(&'{');
    if braced {
        chars.next();
    }
    let mut name = String::new();
    while let Some(&c) = chars.peek() {
        if c.is_ascii_alphanumeric() || c == '_' {
            name.push(c);
            chars.next();
        } else {
            break;
        }
    }
    if braced && chars.peek() == Some(&'}') {
        chars.next();
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(line: &str) -> Vec<String> {
        tokenize(line, 1)
            .unwrap()
            .map(|d| d.words)
            .unwrap_or_default()
    }

    #[test]
    fn words_comments_and_blank_lines() {
        assert_eq!(words("  bind *:5000   # the writes"), ["bind", "*:5000"]);
        assert_eq!(
            words("\tserver\tpg1 10.0.0.1:5432"),
            ["server", "pg1", "10.0.0.1:5432"]
        );
        assert!(words("   # only a comment").is_empty());
        assert!(words("").is_empty());
    }

    #[test]
    fn quotes_and_escapes_as_haproxy_reads_them() {
        assert_eq!(
            words(r#"option httpchk "GET /x y""#),
            ["option", "httpchk", "GET /x y"]
        );
        assert_eq!(words(r"a 'b # c' d\ e \#f"), ["a", "b # c", "d e", "#f"]);
        assert_eq!(
            words(r#"a "it\"s" 'lit\eral' \x41"#),
            ["a", r#"it"s"#, r"lit\eral", "A"]
        );
        assert_eq!(words(r#"a "" b"#), ["a", "", "b"]);
        assert_eq!(words(r"a \q"), ["a", r"\q"]);
        assert_eq!(words(r#"x "ab"'cd'ef"#), ["x", "abcdef"]);
    }

    #[test]
    fn environment_variables_are_flagged_not_expanded() {
        let d = tokenize(r#"bind "${ADDR}:5000" '$LIT'"#, 3)
            .unwrap()
            .unwrap();
        assert_eq!(d.words, ["bind", "${ADDR}:5000", "$LIT"]);
        assert_eq!(d.env_vars, ["ADDR"]);
    }

    #[test]
    fn unmatched_quotes_and_bad_hex_are_errors_with_the_line() {
        assert_eq!(tokenize("bind \"*:5000", 7).unwrap_err().line, 7);
        assert!(tokenize(r"a \xZZ", 1).is_err());
        assert!(tokenize(r"a \x4", 1).is_err());
    }

    #[test]
    fn a_trailing_backslash_does_not_continue_the_line() {
        let parsed = parse("listen x\n    bind *:5000 \\\n    balance first\n").unwrap();
        let d = &parsed.sections[0].directives;
        assert_eq!(d[0].words, ["bind", "*:5000", "\\"]);
        assert_eq!((d[1].line, d[1].keyword()), (3, "balance"));
    }

    #[test]
    fn sections_keep_line_numbers_and_strays_are_kept_apart() {
        let text = "maxconn 1\nglobal\n  maxconn 2\r\n\ndefaults\n.if defined(X)\n  mode tcp\n.endif\nuserlist u\n  user a\n";
        let parsed = parse(text).unwrap();
        let kinds: Vec<_> = parsed.sections.iter().map(|s| s.kind.clone()).collect();
        assert_eq!(
            kinds,
            [
                SectionKind::Global,
                SectionKind::Defaults,
                SectionKind::Other("userlist".into())
            ]
        );
        assert_eq!(parsed.sections[0].directives[0].words, ["maxconn", "2"]);
        assert_eq!(parsed.sections[1].directives[0].line, 7);
        let strays: Vec<usize> = parsed.stray.iter().map(|d| d.line).collect();
        assert_eq!(strays, [1, 6, 8]);
    }
}
