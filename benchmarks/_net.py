"""What the kernel says about a UDP socket: bound or not, receive buffer, queue, drops.

Why from the kernel: each receiver reports its socket buffer its own way (``slsReceiver``'s
``rx_realudpsocksize``, our receiver's log line); ``ss`` shows the same number (``rb``, the kernel's
``sk_rcvbuf`` including its bookkeeping overhead) and the packets the kernel dropped on that socket
because the buffer was full (``d``) for every receiver alike, the drain included.
"""

from __future__ import annotations

import random
import re
import socket
import subprocess
from dataclasses import dataclass

_SKMEM = re.compile(r"skmem:\((?P<body>[^)]*)\)")


@dataclass(frozen=True)
class UdpSocketStats:
    recv_q: int
    rcvbuf: int
    drops: int


def parse_ss(output: str) -> UdpSocketStats | None:
    """The first socket of ``ss -H -uamn`` output (state line, then an ``skmem:(...)`` line)."""
    lines = [ln for ln in output.splitlines() if ln.strip()]
    for i, line in enumerate(lines):
        fields = line.split()
        if len(fields) < 3 or not fields[1].isdigit():
            continue
        match = _SKMEM.search(" ".join(lines[i: i + 2]))
        if match is None:
            continue
        values = {}
        for item in match.group("body").split(","):
            key = item.rstrip("0123456789")
            number = item[len(key):]
            if number:
                values[key] = int(number)
        return UdpSocketStats(int(fields[1]), values.get("rb", 0), values.get("d", 0))
    return None


def udp_socket_stats(port: int) -> UdpSocketStats | None:
    """Stats of the UDP socket bound to ``port`` (None: nothing bound, or ``ss`` is missing)."""
    try:
        out = subprocess.run(["ss", "-H", "-uamn", f"sport = :{port}"], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_ss(out)


def bound_udp_ports(table: str = "/proc/net/udp") -> set[int]:
    """Local ports of every IPv4 UDP socket (read passively: probing with bind() could steal a port
    from a receiver that is just starting)."""
    ports: set[int] = set()
    try:
        with open(table) as f:
            next(f, None)
            for line in f:
                fields = line.split()
                if len(fields) > 1 and ":" in fields[1]:
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    except OSError:
        pass
    return ports


def _bind_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_udp_base(n: int, rng: random.Random | None = None) -> int:
    """A port p with p..p+n-1 free UDP ports right now (outside the virtual servers' TCP range)."""
    rng = rng or random.Random()
    for _ in range(500):
        base = rng.randrange(40000, 60000 - n)
        if all(_bind_free(p) for p in range(base, base + n)):
            return base
    raise RuntimeError(f"no {n} consecutive free UDP ports found")


def free_udp_port() -> int:
    """A UDP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def udp_drops(port: int) -> int:
    """Datagrams the kernel dropped on the 127.0.0.1:``port`` socket (last column of /proc/net/udp)."""
    want = f"0100007F:{port:04X}"
    with open("/proc/net/udp") as f:
        for line in f.read().splitlines()[1:]:
            fields = line.split()
            if fields[1] == want:
                return int(fields[-1])
    return 0
