//! HAProxy's ways of writing times, numbers and addresses, read and rewritten as patroxy's
//! config writes them. Each reader returns why a value cannot be carried over, for the report.
use std::{
    net::{IpAddr, Ipv6Addr},
    time::Duration,
};

/// The longest time patroxy accepts (and HAProxy: 2^31-1 ms).
pub const MAX_TIME: Duration = Duration::from_millis(i32::MAX as u64);

/// A time as patroxy's TOML writes it, with its value for comparisons.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Time {
    pub value: Duration,
    /// A TOML value: `"30m"` as written in haproxy.cfg, or a bare integer of milliseconds.
    pub toml: String,
}

/// HAProxy's time format: digits and an optional unit (`us`, `ms`, `s`, `m`, `h`, `d`), bare
/// numbers being milliseconds. patroxy reads the same units (humantime) and bare milliseconds.
pub fn time(s: &str) -> Result<Time, String> {
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = s.split_at(digits);
    let bad = || format!("`{s}` is not a HAProxy time (a number and us, ms, s, m, h or d)");
    let n: u64 = number.parse().map_err(|_| bad())?;
    let per_unit = match unit {
        "" | "ms" => Duration::from_millis(1),
        "us" => Duration::from_micros(1),
        "s" => Duration::from_secs(1),
        "m" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        "d" => Duration::from_secs(86_400),
        _ => return Err(bad()),
    };
    let value = u32::try_from(n)
        .ok()
        .and_then(|n| per_unit.checked_mul(n))
        .filter(|d| *d <= MAX_TIME)
        .ok_or_else(|| {
            format!("`{s}` is longer than 2^31-1 ms, the most HAProxy and patroxy take")
        })?;
    let toml = if unit.is_empty() {
        n.to_string()
    } else {
        format!("\"{n}{unit}\"")
    };
    Ok(Time { value, toml })
}

/// A whole number of type `T` (maxconn, rise, ports, ...).
pub fn number<T: std::str::FromStr>(s: &str, what: &str) -> Result<T, String> {
    s.parse()
        .map_err(|_| format!("`{s}` is not a valid {what}"))
}

/// The binds of one `bind` argument, as patroxy writes them: `*:5000` and `:5000` (every IPv4
/// address), `IP:port`, `[IPv6]:port`, `ipv4@`/`ipv6@`/`tcp@`/`tcp4@`/`tcp6@` prefixes, and a
/// comma-separated list of those. HAProxy's `ipv6@:5000` and `:::5000` are every IPv6 address.
pub fn binds(s: &str) -> Result<Vec<String>, String> {
    s.split(',').map(bind).collect()
}

fn bind(s: &str) -> Result<String, String> {
    let (family, rest) = family_prefix(s)?;
    let (host, port) = split_port(rest).ok_or_else(|| format!("bind `{s}` has no port"))?;
    let port = match parse_port(port) {
        Some(p) => p,
        None if port.contains('-') => {
            return Err(format!(
                "bind `{s}`: a port range; a patroxy listener binds one port"
            ));
        }
        None => return Err(format!("bind `{s}`: `{port}` is not a port")),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let ip: IpAddr = match (host, family) {
        ("" | "*", Family::V6) => Ipv6Addr::UNSPECIFIED.into(),
        ("" | "*", _) => return Ok(format!("*:{port}")),
        (h, _) => h.parse().map_err(|_| {
            format!("bind `{s}`: `{h}` is not an IP address (patroxy binds are literal)")
        })?,
    };
    Ok(match ip {
        IpAddr::V4(ip) => format!("{ip}:{port}"),
        IpAddr::V6(ip) => format!("[{ip}]:{port}"),
    })
}

/// A server's address as patroxy writes it: `IP:port`, `[IPv6]:port` or `host:port`.
pub fn server_address(s: &str) -> Result<String, String> {
    let (_, rest) = family_prefix(s)?;
    let (host, port) = split_port(rest)
        .filter(|(h, _)| !h.is_empty())
        .ok_or_else(|| {
            format!("server address `{s}` has no port (HAProxy then uses the client's destination port; patroxy needs one)")
        })?;
    let port = match parse_port(port) {
        Some(p) => p,
        None => {
            return Err(format!(
                "server address `{s}`: `{port}` is not a port (offsets and ranges are not supported)"
            ));
        }
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Ok(match host.parse::<IpAddr>() {
        Ok(IpAddr::V6(ip)) => format!("[{ip}]:{port}"),
        _ => format!("{host}:{port}"),
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    Any,
    V4,
    V6,
}

fn family_prefix(s: &str) -> Result<(Family, &str), String> {
    let Some((prefix, rest)) = s.split_once('@') else {
        return Ok(if s.starts_with('/') {
            return Err(format!(
                "`{s}` is a unix socket; patroxy listens and connects over TCP"
            ));
        } else {
            (Family::Any, s)
        });
    };
    match prefix {
        "ipv4" | "tcp4" => Ok((Family::V4, rest)),
        "ipv6" | "tcp6" => Ok((Family::V6, rest)),
        "tcp" => Ok((Family::Any, rest)),
        _ => Err(format!(
            "`{s}`: `{prefix}@` addresses are not supported (patroxy uses TCP over IPv4 and IPv6)"
        )),
    }
}

/// A port written as plain digits, 1..=65535 (Rust's parser would also take `+1`, an offset to
/// HAProxy).
fn parse_port(s: &str) -> Option<u16> {
    s.bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| s.parse().ok())
        .flatten()
        .filter(|p| *p > 0)
}

/// `host:port` split at the last colon, as HAProxy does (so `:::5000` is `::` and 5000).
fn split_port(s: &str) -> Option<(&str, &str)> {
    let (host, port) = s.rsplit_once(':')?;
    Some((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_keep_their_unit() {
        let t = time("30m").unwrap();
        assert_eq!(
            (t.value, t.toml.as_str()),
            (Duration::from_secs(1800), "\"30m\"")
        );
        let t = time("1500").unwrap();
        assert_eq!(
            (t.value, t.toml.as_str()),
            (Duration::from_millis(1500), "1500")
        );
        assert_eq!(time("250us").unwrap().value, Duration::from_micros(250));
        assert_eq!(time("2d").unwrap().value, Duration::from_secs(172_800));
        for bad in ["", "s", "3x", "-1", "1.5s", "25d", "99999999999999999999"] {
            assert!(time(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bind_forms() {
        let b = |s| binds(s).map_err(|e| e.to_string());
        assert_eq!(b("*:5000"), Ok(vec!["*:5000".into()]));
        assert_eq!(b(":5000"), Ok(vec!["*:5000".into()]));
        assert_eq!(b("0.0.0.0:5000"), Ok(vec!["0.0.0.0:5000".into()]));
        assert_eq!(b("ipv4@10.0.0.1:5000"), Ok(vec!["10.0.0.1:5000".into()]));
        assert_eq!(b("ipv6@:5000"), Ok(vec!["[::]:5000".into()]));
        assert_eq!(b(":::5000"), Ok(vec!["[::]:5000".into()]));
        assert_eq!(b("[::1]:5000"), Ok(vec!["[::1]:5000".into()]));
        assert_eq!(
            b("127.0.0.1:5000,127.0.0.2:5000"),
            Ok(vec!["127.0.0.1:5000".into(), "127.0.0.2:5000".into()])
        );
        for bad in [
            "5000",
            "*:5000-5005",
            "unix@/run/x",
            "/run/x.sock",
            "db.example:5000",
            "*:0",
        ] {
            assert!(binds(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn server_addresses() {
        assert_eq!(server_address("10.0.0.1:5432"), Ok("10.0.0.1:5432".into()));
        assert_eq!(
            server_address("pg1.example:5432"),
            Ok("pg1.example:5432".into())
        );
        assert_eq!(
            server_address("ipv6@fd00::1:5432"),
            Ok("[fd00::1]:5432".into())
        );
        assert_eq!(
            server_address("[fd00::1]:5432"),
            Ok("[fd00::1]:5432".into())
        );
        for bad in ["10.0.0.1", "10.0.0.1:+1", ":5432", "unix@/x"] {
            assert!(server_address(bad).is_err(), "{bad}");
        }
    }
}
