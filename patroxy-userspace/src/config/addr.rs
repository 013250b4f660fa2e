//! Socket addresses as the config writes them. Binds are literal (`*:5432`, `127.0.0.1:5432`,
//! `[::]:5433`) because a listener must not depend on DNS; server addresses may be host names,
//! resolved once at load so a typo fails at startup instead of at the first client.
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};

/// `*:port` (all IPv4 addresses, like HAProxy's `bind *:port`), `IP:port` or `[IPv6]:port`.
/// Port 0 is refused: the kernel would pick a random port that no client knows (and the logs
/// and stats would show 0).
pub(crate) fn parse_bind(s: &str) -> Result<SocketAddr, String> {
    let parsed = match s.strip_prefix("*:") {
        Some(port) => port
            .parse::<u16>()
            .ok()
            .map(|p| (Ipv4Addr::UNSPECIFIED, p).into()),
        None => s.parse::<SocketAddr>().ok(),
    };
    let addr = parsed
        .ok_or_else(|| format!("bad bind `{s}`: expected `*:port`, `IP:port` or `[IPv6]:port`"))?;
    if addr.port() == 0 {
        return Err(format!(
            "bad bind `{s}`: port 0 would listen on a random port; give the port clients use"
        ));
    }
    Ok(addr)
}

/// Whether two binds would fight for the same port: same address, or a wildcard covering the
/// other. `[::]` also covers IPv4 (Linux's default `bindv6only=0`); `0.0.0.0` covers only IPv4.
pub(crate) fn binds_overlap(a: SocketAddr, b: SocketAddr) -> bool {
    if a.port() != b.port() {
        return false;
    }
    let covers = |wild: IpAddr, other: IpAddr| {
        wild.is_unspecified() && (wild.is_ipv6() || wild.is_ipv4() == other.is_ipv4())
    };
    a.ip() == b.ip() || covers(a.ip(), b.ip()) || covers(b.ip(), a.ip())
}

/// `IP:port`, `[IPv6]:port` or `host:port`; a host name takes its first resolved address.
pub(crate) fn resolve_address(s: &str) -> Result<SocketAddr, String> {
    let addr = match s.parse::<SocketAddr>() {
        Ok(addr) => addr,
        Err(_) => {
            let bad =
                || format!("bad address `{s}`: expected `IP:port`, `[IPv6]:port` or `host:port`");
            let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
            let port = port.parse::<u16>().map_err(|_| bad())?;
            if host.is_empty()
                || host.contains([':', '[', ']'])
                || host.contains(char::is_whitespace)
            {
                return Err(bad());
            }
            resolve_host(host, port)?
        }
    };
    if addr.port() == 0 {
        return Err(format!("bad address `{s}`: port 0 cannot be connected to"));
    }
    Ok(addr)
}

/// An IP literal or a host name (no port) for a server's REST API.
pub(crate) fn resolve_check_host(s: &str, port: u16) -> Result<IpAddr, String> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(ip);
    }
    if s.parse::<SocketAddr>().is_ok() || s.is_empty() || s.contains([':', '[', ']', ' ']) {
        return Err(format!(
            "bad check_address `{s}`: expected an IP or host name without port (set check_port)"
        ));
    }
    resolve_host(s, port).map(|a| a.ip())
}

fn resolve_host(host: &str, port: u16) -> Result<SocketAddr, String> {
    match (host, port).to_socket_addrs() {
        Ok(mut addrs) => addrs
            .next()
            .ok_or_else(|| format!("host `{host}` resolves to no address")),
        Err(e) => Err(format!("host `{host}` does not resolve: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn binds() {
        assert_eq!(parse_bind("*:5432"), Ok(sa("0.0.0.0:5432")));
        assert_eq!(parse_bind("127.0.0.1:5432"), Ok(sa("127.0.0.1:5432")));
        assert_eq!(parse_bind("[::]:5433"), Ok(sa("[::]:5433")));
        for bad in [
            "5432",
            "*",
            "*:",
            "*:99999",
            "localhost:5432",
            ":5432",
            "1.2.3.4",
            "127.0.0.1:0",
            "*:0",
            "[::]:0",
        ] {
            assert!(parse_bind(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn overlap_rules() {
        assert!(binds_overlap(sa("0.0.0.0:1"), sa("0.0.0.0:1")));
        assert!(binds_overlap(sa("0.0.0.0:1"), sa("127.0.0.1:1")));
        assert!(binds_overlap(sa("10.0.0.1:1"), sa("[::]:1")));
        assert!(binds_overlap(sa("[::]:1"), sa("0.0.0.0:1")));
        assert!(!binds_overlap(sa("0.0.0.0:1"), sa("[::1]:1")));
        assert!(!binds_overlap(sa("127.0.0.1:1"), sa("127.0.0.2:1")));
        assert!(!binds_overlap(sa("0.0.0.0:1"), sa("0.0.0.0:2")));
    }

    #[test]
    fn addresses() {
        assert_eq!(resolve_address("10.0.0.1:5432"), Ok(sa("10.0.0.1:5432")));
        assert_eq!(resolve_address("[fd00::1]:5432"), Ok(sa("[fd00::1]:5432")));
        assert_eq!(
            resolve_address("localhost:5432").map(|a| a.port()),
            Ok(5432)
        );
        for bad in ["10.0.0.1", "10.0.0.1:0", ":5432", "fd00::1:5432x", "a b:1"] {
            assert!(resolve_address(bad).is_err(), "{bad}");
        }
        assert!(
            resolve_address("nonexistent.invalid:5432")
                .unwrap_err()
                .contains("resolve")
        );
    }

    #[test]
    fn check_hosts() {
        assert_eq!(
            resolve_check_host("10.0.0.5", 8008),
            Ok("10.0.0.5".parse().unwrap())
        );
        assert!(resolve_check_host("localhost", 8008).is_ok());
        assert!(resolve_check_host("10.0.0.5:8008", 8008).is_err());
    }
}
