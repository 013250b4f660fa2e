//! Debian's HAProxy with the seed's config (reference/haproxy.cfg), pointed at the test hosts
//! and listening on the given ports on 127.0.0.1 in the root namespace. Timing settings are
//! the seed's exactly (inter 3s fall 3 rise 2, timeout check 5s, connect 4s, retries 2,
//! HAProxy's default fastinter = inter); only the binds and logging (stderr instead of
//! /dev/log, so the harness keeps it) differ.

use super::patroni::Node;

/// The seed's haproxy.cfg with the test hosts' addresses and local ports.
pub fn config(nodes: &[Node], write_port: u16, read_port: u16, stats_port: u16) -> String {
    let servers: String = nodes
        .iter()
        .map(|n| {
            format!(
                "    server {} {}:5432 maxconn 200 check port 8008\n",
                n.name, n.ip
            )
        })
        .collect();
    format!(
        r#"# Written by the patroxy cluster harness from the seed's haproxy.cfg.
global
    maxconn 2000
    log stderr format raw local0

defaults
    log global
    mode tcp
    retries 2
    timeout client 30m
    timeout connect 4s
    timeout server 30m
    timeout check 5s

listen stats
    mode http
    bind 127.0.0.1:{stats_port}
    stats enable
    stats uri /
    stats refresh 5s

# Writes -> whichever node answers 200 on /primary (the leader)
listen postgres_write
    bind 127.0.0.1:{write_port}
    option httpchk GET /primary
    http-check expect status 200
    default-server inter 3s fall 3 rise 2 on-marked-down shutdown-sessions
{servers}
# Reads -> any node that answers 200 on /replica (the replicas)
listen postgres_read
    bind 127.0.0.1:{read_port}
    option httpchk GET /replica
    http-check expect status 200
    balance roundrobin
    default-server inter 3s fall 3 rise 2 on-marked-down shutdown-sessions
{servers}"#
    )
}
