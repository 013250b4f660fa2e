//! `option httpchk` and `http-check`: the HTTP request of a health check and the answer it
//! expects, as far as patroxy's `[listener.check]` (method, path, one status) can say them.
use super::{At, parser::Directive, report::Report};

/// The check request a backend's `option httpchk` and `http-check send` describe.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HttpCheck {
    /// As written; `None` = HAProxy's default, OPTIONS.
    pub method: Option<String>,
    /// `None` = HAProxy's default, `/`.
    pub uri: Option<String>,
}

/// `option httpchk`, `option httpchk <uri>`, `option httpchk <method> <uri> [<version>]`.
pub fn option_httpchk(d: &Directive, report: &mut Report) -> HttpCheck {
    let args = &d.args()[1..];
    let (method, uri, version) = match args {
        [] => (None, None, None),
        [uri] => (None, Some(uri), None),
        [method, uri] => (Some(method), Some(uri), None),
        [method, uri, version, ..] => (Some(method), Some(uri), Some(version)),
    };
    if let Some(version) = version {
        check_version(d, version, report);
    }
    if args.len() > 3 {
        report.unsupported(
            d.line,
            d.text.clone(),
            "words after the HTTP version: patroxy sends no extra headers",
        );
    }
    HttpCheck {
        method: method.cloned(),
        uri: uri.cloned(),
    }
}

/// `http-check send [meth <m>] [uri <u>] [ver <v>] [hdr <n> <v>]* [body <s>]`: method and URI
/// replace `option httpchk`'s; headers and bodies are reported.
pub fn http_check_send(d: &Directive, report: &mut Report) -> HttpCheck {
    let mut check = HttpCheck::default();
    let words = &d.args()[1..];
    let mut i = 0;
    while i < words.len() {
        let kw = words[i].as_str();
        let value = words.get(i + 1).cloned();
        match (kw, value) {
            ("meth", Some(v)) => check.method = Some(v),
            ("uri", Some(v)) => check.uri = Some(v),
            ("ver", Some(v)) => check_version(d, &v, report),
            ("hdr", Some(name)) => {
                let v = words.get(i + 2).cloned().unwrap_or_default();
                report.unsupported(
                    d.line,
                    format!("hdr {name} {v}"),
                    "patroxy's check sends no extra headers",
                );
                i += 1;
            }
            (_, v) => report.unsupported(
                d.line,
                format!("{kw} {}", v.unwrap_or_default())
                    .trim_end()
                    .to_owned(),
                "patroxy's check sends a method and a path only",
            ),
        }
        i += 2;
    }
    check
}

/// HTTP/1.0 or 1.1: Patroni answers either alike, so the version carries no meaning; anything
/// after it (old configs put headers there, `HTTP/1.1\r\nHost:\ x`) is reported.
fn check_version(d: &Directive, version: &str, report: &mut Report) {
    let (version, rest) = version.split_once("\r\n").unwrap_or((version, ""));
    if !matches!(version, "HTTP/1.0" | "HTTP/1.1") {
        report.approximated(
            d.line,
            version.to_owned(),
            "patroxy's check speaks HTTP/1.1",
        );
    }
    if !rest.is_empty() {
        report.unsupported(
            d.line,
            rest.replace("\r\n", " "),
            "headers after the HTTP version: patroxy's check sends no extra headers",
        );
    }
}

/// `http-check expect [options] [!] <match> <pattern>`: the status patroxy expects, if the
/// expectation can be said as one status code.
pub fn http_check_expect(d: &Directive, report: &mut Report) -> Option<At<u16>> {
    let mut words = d.args()[1..].iter().map(String::as_str).peekable();
    while let Some(&kw) = words.peek() {
        match kw {
            "min-recv" | "comment" | "ok-status" | "error-status" | "tout-status"
            | "on-success" | "on-error" | "status-code" => {
                words.next();
                let v = words.next().unwrap_or_default();
                report.no_meaning(
                    d.line,
                    format!("{kw} {v}"),
                    "patroxy reports checks its own way",
                );
            }
            _ => break,
        }
    }
    let negated = words.peek() == Some(&"!");
    if negated {
        words.next();
    }
    let kind = words.next().unwrap_or_default();
    let pattern = words.next().unwrap_or_default();
    let shown = format!("{}{kind} {pattern}", if negated { "! " } else { "" });
    if negated {
        report.unsupported(
            d.line,
            shown,
            "patroxy expects one status; it cannot negate a match",
        );
        return None;
    }
    let code = |s: &str| s.parse::<u16>().ok().filter(|c| (100..=599).contains(c));
    match kind {
        "status" => {
            let first = pattern.split([',', '-']).next().unwrap_or_default();
            let Some(status) = code(first) else {
                report.unsupported(d.line, shown, format!("`{pattern}` is not a status code"));
                return None;
            };
            if first != pattern {
                report.approximated(
                    d.line,
                    shown,
                    format!("expect_status = {status}: patroxy expects one status code"),
                );
            }
            Some(At::new(status, d))
        }
        "rstatus" => {
            let bare = pattern.trim_start_matches('^').trim_end_matches('$');
            if let Some(status) = code(bare).filter(|_| bare.len() == 3) {
                return Some(At::new(status, d));
            }
            report.approximated(
                d.line,
                shown,
                "expect_status = 200: patroxy expects one status code, not a pattern",
            );
            None
        }
        "string" | "rstring" => {
            report.approximated(
                d.line,
                shown,
                "expect_status = 200: patroxy matches the status, not the body (on GET it reads \
                 Patroni's role and timeline from the JSON)",
            );
            None
        }
        _ => {
            report.unsupported(d.line, shown, "patroxy expects a status code only");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::import_haproxy::parser::parse;

    fn directive(line: &str) -> Directive {
        parse(&format!("backend b\n{line}\n")).unwrap().sections[0].directives[0].clone()
    }

    fn lost(report: Report) -> Vec<String> {
        report
            .into_findings()
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn httpchk_forms() {
        let mut r = Report::default();
        let c = |s: &str, r: &mut Report| option_httpchk(&directive(s), r);
        assert_eq!(c("option httpchk", &mut r), HttpCheck::default());
        assert_eq!(
            c("option httpchk /primary", &mut r).uri.as_deref(),
            Some("/primary")
        );
        let get = c("option httpchk GET /replica?lag=1MB", &mut r);
        assert_eq!(
            (get.method.as_deref(), get.uri.as_deref()),
            (Some("GET"), Some("/replica?lag=1MB"))
        );
        let options = c("option httpchk OPTIONS / HTTP/1.1", &mut r);
        assert_eq!(options.method.as_deref(), Some("OPTIONS"));
        assert!(lost(r).is_empty());
        let mut r = Report::default();
        c(r"option httpchk GET / HTTP/1.1\r\nHost:\ db", &mut r);
        assert!(lost(r)[0].contains("Host: db"));
    }

    #[test]
    fn send_replaces_method_and_uri_and_reports_headers() {
        let mut r = Report::default();
        let s = http_check_send(
            &directive("http-check send meth HEAD uri /leader ver HTTP/1.1 hdr Host db"),
            &mut r,
        );
        assert_eq!(
            (s.method.as_deref(), s.uri.as_deref()),
            (Some("HEAD"), Some("/leader"))
        );
        let lost = lost(r);
        assert_eq!(lost.len(), 1, "{lost:?}");
        assert!(lost[0].contains("`hdr Host db`: unsupported"));
    }

    #[test]
    fn expectations() {
        let expect = |s: &str| {
            let mut r = Report::default();
            let status = http_check_expect(&directive(s), &mut r).map(|a| a.value);
            (status, lost(r))
        };
        assert_eq!(expect("http-check expect status 200"), (Some(200), vec![]));
        assert_eq!(
            expect("http-check expect rstatus ^200$"),
            (Some(200), vec![])
        );
        let (status, lost) = expect("http-check expect status 200-299");
        assert_eq!(status, Some(200));
        assert!(lost[0].contains("approximated"));
        let (status, lost) = expect("http-check expect rstatus (2|3)[0-9][0-9]");
        assert_eq!(status, None);
        assert!(lost[0].contains("approximated: expect_status = 200"));
        let (status, lost) = expect("http-check expect string \"role\":\"master\"");
        assert_eq!(status, None);
        assert!(lost[0].contains("not the body"));
        let (status, lost) = expect("http-check expect ! status 503");
        assert_eq!(status, None);
        assert!(lost[0].contains("unsupported"));
    }
}
