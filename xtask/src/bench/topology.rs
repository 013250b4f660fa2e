//! Where the bench's processes run: all on this host's loopback, or (`--netns`, issue 15) on
//! three hosts of their own, network namespaces joined by two veth pairs:
//!
//! ```text
//!  pxb-cli                 pxb-prx (routes)                    pxb-srv
//!  pgbench, psql  pxbc0 -- pxbp0  patroxy, HAProxy  pxbp1 -- pxbs0  PostgreSQL
//!  10.215.1.2       10.215.1.1                10.215.2.1        10.215.2.2
//! ```
//!
//! The proxy host forwards (ip_forward), so "direct" goes client -> proxy host as a router ->
//! server: the same wires and hops as a proxied session, whose second TCP leg starts on the
//! proxy host. The clients' CPU, the proxy's and the server's are still one machine's.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use patroxy_tests::netns;
use patroxy_tests::ports::wait_for_listen;

const CLIENT_NS: &str = "pxb-cli";
const PROXY_NS: &str = "pxb-prx";
const SERVER_NS: &str = "pxb-srv";
const NAMESPACES: [&str; 3] = [CLIENT_NS, PROXY_NS, SERVER_NS];
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 215, 1, 2);
const PROXY_FRONT: Ipv4Addr = Ipv4Addr::new(10, 215, 1, 1);
const PROXY_BACK: Ipv4Addr = Ipv4Addr::new(10, 215, 2, 1);
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 215, 2, 2);
/// Whom the server lets in: the client host (direct) and the proxy host (proxied).
const SERVER_CLIENTS: &str = "10.215.0.0/16";

/// The namespace topology, removed on drop (leftovers of a crashed run are removed first).
#[derive(Debug)]
pub struct Namespaces(());

impl Namespaces {
    pub fn up() -> io::Result<Namespaces> {
        netns::remove(&NAMESPACES, &[]);
        let net = Namespaces(());
        for ns in NAMESPACES {
            netns::add(ns)?;
        }
        let cidr = |a: Ipv4Addr| format!("{a}/24");
        netns::veth(
            Some(CLIENT_NS),
            "pxbc0",
            &cidr(CLIENT),
            PROXY_NS,
            "pxbp0",
            &cidr(PROXY_FRONT),
        )?;
        netns::veth(
            Some(PROXY_NS),
            "pxbp1",
            &cidr(PROXY_BACK),
            SERVER_NS,
            "pxbs0",
            &cidr(SERVER),
        )?;
        netns::ip(&[
            "-n",
            CLIENT_NS,
            "route",
            "add",
            "default",
            "via",
            &PROXY_FRONT.to_string(),
        ])?;
        netns::ip(&[
            "-n",
            SERVER_NS,
            "route",
            "add",
            "default",
            "via",
            &PROXY_BACK.to_string(),
        ])?;
        netns::sysctl(PROXY_NS, "net.ipv4.ip_forward", "1")?;
        Ok(net)
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        netns::remove(&NAMESPACES, &[]);
    }
}

/// Where the bench runs: the addresses and namespaces every part of it uses.
#[derive(Debug)]
pub enum Hosts {
    Loopback,
    Namespaces(Namespaces),
}

impl Hosts {
    /// PostgreSQL's address as the client host and the proxies reach it.
    pub fn server(&self) -> IpAddr {
        match self {
            Hosts::Loopback => Ipv4Addr::LOCALHOST.into(),
            Hosts::Namespaces(_) => SERVER.into(),
        }
    }

    /// The address a proxy listens on, as the client host reaches it.
    pub fn proxy(&self) -> IpAddr {
        match self {
            Hosts::Loopback => Ipv4Addr::LOCALHOST.into(),
            Hosts::Namespaces(_) => PROXY_FRONT.into(),
        }
    }

    /// The server host's namespace, its address there and whom it lets in.
    pub fn server_ns(&self) -> Option<(&'static str, Ipv4Addr, &'static str)> {
        match self {
            Hosts::Loopback => None,
            Hosts::Namespaces(_) => Some((SERVER_NS, SERVER, SERVER_CLIENTS)),
        }
    }

    /// The proxy host's two interfaces (toward the client, toward the server).
    pub fn proxy_interfaces(&self) -> Option<[&'static str; 2]> {
        match self {
            Hosts::Loopback => None,
            Hosts::Namespaces(_) => Some(["pxbp0", "pxbp1"]),
        }
    }

    pub fn proxy_ns(&self) -> Option<&'static str> {
        match self {
            Hosts::Loopback => None,
            Hosts::Namespaces(_) => Some(PROXY_NS),
        }
    }

    pub fn client_ns(&self) -> Option<&'static str> {
        match self {
            Hosts::Loopback => None,
            Hosts::Namespaces(_) => Some(CLIENT_NS),
        }
    }

    /// Whether something listens on `addr` on the proxy host, waiting up to `timeout`.
    pub fn wait_for_proxy(&self, addr: SocketAddr, timeout: Duration) -> io::Result<bool> {
        match self.proxy_ns() {
            None => Ok(wait_for_listen(addr, timeout)),
            Some(ns) => netns::within(ns, move || wait_for_listen(addr, timeout)),
        }
    }

    /// One line for the report's setup.
    pub fn describe(&self) -> &'static str {
        match self {
            Hosts::Loopback => {
                "everything on loopback on the same machine (pgbench, psql, PostgreSQL and the proxy share \
                 the CPUs and one TCP stack). PostgreSQL 127.0.0.1"
            }
            Hosts::Namespaces(_) => {
                "three network namespaces on the same machine (they share its CPUs), joined by two veth \
                 pairs: client host `pxb-cli` 10.215.1.2 (pgbench, psql) — proxy host `pxb-prx` \
                 10.215.1.1 / 10.215.2.1 (patroxy, HAProxy; forwards, so direct goes through it as a \
                 router) — server host `pxb-srv` 10.215.2.2 (PostgreSQL)"
            }
        }
    }
}
