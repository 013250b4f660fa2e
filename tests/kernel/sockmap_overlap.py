#!/usr/bin/env python3
"""Minimal reproducer: a sockmap stream verdict re-forwards bytes TCP already delivered.

tcp_read_skb() (net/ipv4/tcp.c), which feeds sk_skb stream-verdict programs, hands the verdict
every skb of the receive queue whole and tcp_eat_skb() then advances copied_seq by skb->len. An
skb whose first bytes lie before copied_seq is therefore forwarded from its start: those bytes
reach the peer a second time. Two ways such an skb gets there, one per mode:

  overlap  A retransmitted segment that overlaps data already received (seq < rcv_nxt <
           end_seq; what a sender does after a retransmission timeout whose segment spans acked
           and new bytes). tcp_data_queue() queues it untrimmed ("Partial packet" branch); recv()
           skips the old part by copied_seq, tcp_read_skb() does not. Forged here on loopback
           with a raw socket, into a session already spliced.
  read     The process reads part of an skb (copied_seq inside it), then adds the socket to the
           sockmap: the part already read is forwarded again.

Needs root (bpf, raw sockets). Python 3 standard library only: the verdict program is seven
instructions loaded with bpf(2). Prints what the backend received and exits 1 if any byte came
twice (the kernel bug), 0 if the stream is exact, 2 if something else happened (then the
reproducer, not the kernel, needs a look). Each mode first runs unspliced as a control: recv()
must return the stream exactly. Linux 6.18.44: exits 1 in both modes.
"""
import ctypes
import os
import select
import socket
import struct
import sys
import time

libc = ctypes.CDLL(None, use_errno=True)
SYS_BPF = 321  # x86_64
BPF_MAP_CREATE, BPF_MAP_UPDATE_ELEM, BPF_PROG_LOAD, BPF_PROG_ATTACH = 0, 2, 5, 8
BPF_MAP_TYPE_SOCKMAP = 15
BPF_PROG_TYPE_SK_SKB = 14
BPF_SK_SKB_STREAM_VERDICT = 5
BPF_FUNC_sk_redirect_map = 52


def bpf(cmd, attr):
    buf = ctypes.create_string_buffer(bytes(attr), 128)
    r = libc.syscall(SYS_BPF, cmd, buf, 128)
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"bpf({cmd}): {os.strerror(e)}")
    return r


def insn(code, dst=0, src=0, off=0, imm=0):
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def splice_setup():
    """A SOCKMAP of two slots and a verdict that redirects every skb to slot 1's egress."""
    m = bpf(BPF_MAP_CREATE, struct.pack("<IIIII", BPF_MAP_TYPE_SOCKMAP, 4, 4, 2, 0))
    prog = b"".join([
        insn(0x18, dst=2, src=1, imm=m), insn(0),  # r2 = map (ld_imm64, BPF_PSEUDO_MAP_FD)
        insn(0xB7, dst=3, imm=1),                 # r3 = key 1
        insn(0xB7, dst=4, imm=0),                 # r4 = flags 0: the peer's egress
        insn(0x85, imm=BPF_FUNC_sk_redirect_map),  # r0 = bpf_sk_redirect_map(skb, map, 1, 0)
        insn(0x95),                               # return r0
    ])
    insns = ctypes.create_string_buffer(prog, len(prog))
    lic = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(65536)
    attr = struct.pack("<IIQQIIQ", BPF_PROG_TYPE_SK_SKB, len(prog) // 8,
                       ctypes.addressof(insns), ctypes.addressof(lic),
                       1, len(log), ctypes.addressof(log))
    try:
        p = bpf(BPF_PROG_LOAD, attr)
    except OSError:
        print(log.value.decode(errors="replace"), file=sys.stderr)
        raise
    bpf(BPF_PROG_ATTACH, struct.pack("<IIII", m, p, BPF_SK_SKB_STREAM_VERDICT, 0))
    return m


def sockmap_insert(m, slot, sock):
    key = ctypes.c_uint32(slot)
    val = ctypes.c_uint32(sock.fileno())
    bpf(BPF_MAP_UPDATE_ELEM, struct.pack("<IIQQQ", m, 0, ctypes.addressof(key),
                                         ctypes.addressof(val), 0))


def pair(listener):
    a = socket.create_connection(listener.getsockname())
    b, _ = listener.accept()
    for s in (a, b):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return a, b


def read_for(sock, seconds):
    sock.setblocking(False)
    got = b""
    end = time.time() + seconds
    while time.time() < end:
        if select.select([sock], [], [], 0.05)[0]:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            got += chunk
    return got


def csum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def capture_segment(sniffer, sport, dport):
    """The next TCP segment with payload from sport to dport on lo: (seq, ack, window, options)."""
    end = time.time() + 2
    while time.time() < end:
        if not select.select([sniffer], [], [], 0.1)[0]:
            continue
        frame = sniffer.recv(1 << 17)
        ip = frame[14:]
        if len(ip) < 40 or ip[9] != socket.IPPROTO_TCP:
            continue
        ihl = (ip[0] & 0x0F) * 4
        tcp = ip[ihl:]
        sp, dp, seq, ack, off_flags, win = struct.unpack("!HHIIHH", tcp[:16])
        doff = (off_flags >> 12) * 4
        if (sp, dp) == (sport, dport) and len(tcp) > doff:
            return seq, ack, win, tcp[20:doff], tcp[doff:]
    raise RuntimeError("no segment captured")


def forge(sport, dport, seq, ack, win, options, payload):
    """An IPv4 TCP segment 127.0.0.1:sport -> 127.0.0.1:dport, ACK|PSH, valid checksums."""
    doff = (20 + len(options)) // 4
    tcp = struct.pack("!HHIIHHHH", sport, dport, seq, ack, (doff << 12) | 0x18, win, 0, 0)
    tcp += options + payload
    lo = socket.inet_aton("127.0.0.1")
    pseudo = lo + lo + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", csum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64,
                     socket.IPPROTO_TCP, 0, lo, lo)
    ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
    return ip + tcp


def send_overlap(client, proxy_in, first, more):
    """Sends `first`, then forges a retransmission of its last 100 bytes carrying `more`; returns
    the bytes sent twice."""
    sniffer = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    sniffer.bind(("lo", 0))
    sport, dport = client.getsockname()[1], proxy_in.getsockname()[1]
    client.sendall(first)
    seq, ack, win, opts, _ = capture_segment(sniffer, sport, dport)
    time.sleep(0.2)
    overlap = 100
    seg = forge(sport, dport, (seq + len(first) - overlap) & 0xFFFFFFFF, ack, win, opts,
                first[-overlap:] + more)
    socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW).sendto(seg, ("127.0.0.1", 0))
    return first[-overlap:]


def run(mode, spliced):
    """What the backend (or, unspliced, the proxy's client socket) received, what it should
    have, and what it gets when the bytes before copied_seq are forwarded again."""
    front = socket.create_server(("127.0.0.1", 0))
    back = socket.create_server(("127.0.0.1", 0))
    client, proxy_in = pair(front)      # client -> proxy
    proxy_out, backend = pair(back)     # proxy -> backend
    first = bytes((i * 7 + 3) % 251 for i in range(1000))
    more = bytes((i * 13 + 5) % 241 for i in range(200))
    m = splice_setup() if spliced else None
    if mode == "read":
        client.sendall(first)
        time.sleep(0.2)
        head = proxy_in.recv(100)       # copied_seq now 100 bytes into the skb
        expected, twice = first[len(head):], first
        if spliced:
            sockmap_insert(m, 1, proxy_out)
            sockmap_insert(m, 0, proxy_in)
            proxy_in.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)  # wake the verdict
    else:
        if spliced:
            sockmap_insert(m, 1, proxy_out)
            sockmap_insert(m, 0, proxy_in)
        overlap = send_overlap(client, proxy_in, first, more)
        expected, twice = first + more, first + overlap + more
    return read_for(backend if spliced else proxy_in, 1.0), expected, twice


def main():
    mode = sys.argv[1] if len(sys.argv) > 1 else "overlap"
    if mode not in ("overlap", "read"):
        sys.exit("usage: sockmap_overlap.py [overlap|read]")
    verdict = 0
    for spliced in (False, True):
        got, expected, twice = run(mode, spliced)
        who = "spliced (sockmap verdict -> backend)" if spliced else "plain TCP, recv()"
        if got == expected:
            print(f"{mode}, {who}: {len(got)} bytes, exact")
        elif spliced and got == twice:
            print(f"{mode}, {who}: {len(got)} bytes for {len(expected)}: the "
                  f"{len(twice) - len(expected)} bytes before copied_seq forwarded twice")
            verdict = 1
        else:
            print(f"{mode}, {who}: {len(got)} bytes for {len(expected)}: unexpected stream")
            return 2
    return verdict


if __name__ == "__main__":
    sys.exit(main())
