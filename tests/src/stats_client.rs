//! Reading patroxy's stats server from tests: a tiny HTTP/1.1 GET, HAProxy CSV parsing, and the
//! page rendered in headless Chromium (Debian's `chromium` package).
use std::{
    collections::HashMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

/// `GET path` with `Connection: close`; returns (status, content type, body).
pub fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String, String)> {
    request(addr, "GET", path, &[], "")
}

/// `POST path` with a form body and extra headers; returns (status, content type, body).
pub fn post(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    form: &str,
) -> std::io::Result<(u16, String, String)> {
    let mut all = vec![("Content-Type", "application/x-www-form-urlencoded")];
    all.extend_from_slice(headers);
    request(addr, "POST", path, &all, form)
}

fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> std::io::Result<(u16, String, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{extra}\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("no HTTP head in {text:?}")))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let content_type = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok((status, content_type, body))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// A GET that must answer 200; panics otherwise.
pub fn get_ok(addr: SocketAddr, path: &str) -> String {
    let (status, _, body) = get(addr, path).unwrap_or_else(|e| panic!("GET {path}: {e}"));
    assert_eq!(status, 200, "GET {path}: {body}");
    body
}

/// HAProxy CSV as one map per row, keyed by the header's field names.
pub fn parse_csv(text: &str) -> Vec<HashMap<String, String>> {
    let mut lines = text.lines();
    let header = lines
        .next()
        .and_then(|h| h.strip_prefix("# "))
        .expect("HAProxy CSV starts with '# pxname,...'");
    let names: Vec<&str> = header
        .strip_suffix(',')
        .unwrap_or(header)
        .split(',')
        .collect();
    lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            let values = split_csv_line(l.strip_suffix(',').unwrap_or(l));
            assert_eq!(values.len(), names.len(), "row width: {l}");
            names.iter().map(|n| n.to_string()).zip(values).collect()
        })
        .collect()
}

/// Splits one CSV line, honouring double-quoted fields.
fn split_csv_line(line: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                chars.next();
                out.last_mut().unwrap().push('"');
            }
            ('"', _) => quoted = !quoted,
            (',', false) => out.push(String::new()),
            (c, _) => out.last_mut().unwrap().push(c),
        }
    }
    out
}

/// The row of `pxname`/`svname`.
pub fn row<'a>(
    rows: &'a [HashMap<String, String>],
    pxname: &str,
    svname: &str,
) -> &'a HashMap<String, String> {
    rows.iter()
        .find(|r| r["pxname"] == pxname && r["svname"] == svname)
        .unwrap_or_else(|| panic!("no CSV row {pxname}/{svname} in {rows:?}"))
}

/// Polls `f` until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub const CHROMIUM: &str = "/usr/bin/chromium";

/// Whether headless Chromium can run here (CI installs it with `cargo xtask setup`).
pub fn chromium_available() -> bool {
    Path::new(CHROMIUM).is_file()
}

fn chromium(profile: &Path) -> Command {
    let mut cmd = Command::new(CHROMIUM);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
    ])
    .arg(format!("--user-data-dir={}", profile.display()));
    cmd
}

/// Renders `url` in headless Chromium: writes a screenshot to `png` (at `width`x`height`) and
/// returns the DOM after layout.
pub fn render_page(url: &str, png: &Path, width: u32, height: u32) -> String {
    let profile = std::env::temp_dir().join(format!(
        "patroxy-chromium-{}-{}",
        std::process::id(),
        png.file_stem().and_then(|s| s.to_str()).unwrap_or("page")
    ));
    let shot = chromium(&profile)
        .arg(format!("--screenshot={}", png.display()))
        .arg(format!("--window-size={width},{height}"))
        .arg(url)
        .output()
        .expect("run chromium");
    assert!(
        png.is_file(),
        "chromium wrote no screenshot: {}",
        String::from_utf8_lossy(&shot.stderr)
    );
    let dom = chromium(&profile)
        .arg("--dump-dom")
        .arg(url)
        .output()
        .expect("run chromium --dump-dom");
    let _ = std::fs::remove_dir_all(&profile);
    assert!(
        dom.status.success(),
        "chromium --dump-dom failed: {}",
        String::from_utf8_lossy(&dom.stderr)
    );
    String::from_utf8_lossy(&dom.stdout).into_owned()
}

/// Where tests leave screenshots for a human to look at.
pub fn artifacts_dir() -> PathBuf {
    let dir = std::env::temp_dir().join("patroxy-test-artifacts");
    std::fs::create_dir_all(&dir).expect("create artifacts dir");
    dir
}
