"""An independent witness of what a detector put on the wire: a raw packet capture on the loopback.

``LoopbackUdpCapture`` reads every frame the kernel passes through ``lo`` with an ``AF_PACKET`` socket,
the way tcpdump does, and keeps the UDP payloads sent to chosen destination ports. It shares no code
with the readout (no ``daq_backend`` import): it sees the datagrams before any UDP socket does, so what
it records is what the detector sent, whatever our receivers make of it.

Loopback shows each packet twice, once leaving (``PACKET_OUTGOING``) and once arriving
(``PACKET_HOST``); only arriving copies are kept. A classic BPF filter drops everything else in the
kernel (other test sessions may stream over ``lo`` at the same time), and the Python side re-checks
every field itself. ``PACKET_STATISTICS`` tells whether the kernel dropped anything for lack of buffer.
"""

from __future__ import annotations

import ctypes
import socket
import struct
import threading
from collections.abc import Iterable

ETH_P_ALL = 0x0003
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
SO_ATTACH_FILTER = getattr(socket, "SO_ATTACH_FILTER", 26)
SOL_PACKET = getattr(socket, "SOL_PACKET", 263)
PACKET_STATISTICS = 6
PACKET_HOST = getattr(socket, "PACKET_HOST", 0)

ETH_HEADER = 14  # lo carries a (zeroed) Ethernet header
ETHERTYPE_IPV4 = 0x0800
IPPROTO_UDP = 17

# classic BPF opcodes (linux/filter.h)
_LD_W_ABS, _LD_H_ABS, _LD_B_ABS, _LD_H_IND = 0x20, 0x28, 0x30, 0x48
_LDX_B_MSH = 0xB1
_JEQ_K, _JGE_K, _JGT_K = 0x15, 0x35, 0x25
_RET_K = 0x06
_SKF_AD_PKTTYPE = (-0x1000 + 4) & 0xFFFFFFFF  # SKF_AD_OFF + SKF_AD_PKTTYPE


def _udp_port_filter(first: int, last: int) -> list[tuple[int, int, int, int]]:
    """Accept incoming IPv4/UDP frames whose destination port is in ``first..last``, drop the rest."""
    drop = 11
    program = [
        (_LD_W_ABS, 0, 0, _SKF_AD_PKTTYPE),  # 0: packet type
        (_JEQ_K, 0, drop - 2, PACKET_HOST),  # 1
        (_LD_H_ABS, 0, 0, 12),  # 2: ethertype
        (_JEQ_K, 0, drop - 4, ETHERTYPE_IPV4),  # 3
        (_LD_B_ABS, 0, 0, ETH_HEADER + 9),  # 4: IP protocol
        (_JEQ_K, 0, drop - 6, IPPROTO_UDP),  # 5
        (_LDX_B_MSH, 0, 0, ETH_HEADER),  # 6: X = IP header length
        (_LD_H_IND, 0, 0, ETH_HEADER + 2),  # 7: UDP destination port
        (_JGE_K, 0, drop - 9, first),  # 8
        (_JGT_K, drop - 10, 0, last),  # 9
        (_RET_K, 0, 0, 0x40000),  # 10: accept the whole frame
        (_RET_K, 0, 0, 0),  # 11: drop
    ]
    assert len(program) == drop + 1
    return program


def _attach_filter(sock: socket.socket, program: list[tuple[int, int, int, int]]) -> None:
    code = b"".join(struct.pack("HBBI", *insn) for insn in program)
    buf = ctypes.create_string_buffer(code, len(code))
    fprog = struct.pack("HL", len(program), ctypes.addressof(buf))  # struct sock_fprog (native)
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def parse_udp(frame: bytes, ports: frozenset[int]) -> tuple[int, bytes] | None:
    """(destination port, UDP payload) of an unfragmented IPv4/UDP frame to one of ``ports``."""
    if len(frame) < ETH_HEADER + 28 or int.from_bytes(frame[12:14], "big") != ETHERTYPE_IPV4:
        return None
    ip = frame[ETH_HEADER:]
    ihl = (ip[0] & 0x0F) * 4
    if ip[0] >> 4 != 4 or ip[9] != IPPROTO_UDP or int.from_bytes(ip[6:8], "big") & 0x3FFF:
        return None  # not IPv4/UDP, or a fragment (loopback's 64 KiB MTU never fragments these)
    total = int.from_bytes(ip[2:4], "big")
    udp = ip[ihl:total]
    dport = int.from_bytes(udp[2:4], "big")
    length = int.from_bytes(udp[4:6], "big")
    if dport not in ports or length != len(udp):
        return None
    return dport, bytes(udp[8:length])


class LoopbackUdpCapture:
    """Records ``(destination port, payload)`` of every UDP datagram arriving on ``lo`` for ``ports``.

    Start it before the sender and stop it when every expected datagram is in (``wait_count``).
    """

    def __init__(self, ports: Iterable[int], rcvbuf: int = 512 << 20) -> None:
        self.ports = frozenset(ports)
        self.datagrams: list[tuple[int, bytes]] = []
        self.kernel_drops = 0
        self.kernel_packets = 0
        self._count = {p: 0 for p in self.ports}
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)  # root: beyond rmem_max
            _attach_filter(self.sock, _udp_port_filter(min(self.ports), max(self.ports)))
            self.sock.bind(("lo", 0))
            self.sock.settimeout(0.1)
            self._read_statistics()  # start the kernel counters from zero
        except BaseException:
            self.sock.close()
            raise
        self.rcvbuf = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        self._thread = threading.Thread(target=self._run, name="lo-capture", daemon=True)
        self._thread.start()

    def _read_statistics(self) -> None:
        """Add the kernel's counters (struct tpacket_stats; reading resets them)."""
        packets, drops = struct.unpack("II", self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
        self.kernel_packets += packets
        self.kernel_drops += drops

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                frame, address = self.sock.recvfrom(1 << 17)
            except TimeoutError:
                continue
            except OSError:
                return
            if address[2] != PACKET_HOST:  # (ifname, proto, pkttype, hatype, addr)
                continue
            parsed = parse_udp(frame, self.ports)
            if parsed is None:
                continue
            with self._cond:
                self.datagrams.append(parsed)
                self._count[parsed[0]] += 1
                self._cond.notify_all()

    def count(self, port: int) -> int:
        with self._cond:
            return self._count[port]

    def wait_count(self, expected: dict[int, int], timeout: float) -> bool:
        """Wait until at least ``expected[port]`` datagrams arrived on every port; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: all(self._count[p] >= n for p, n in expected.items()), timeout)

    def close(self) -> None:
        """Stop the thread; afterwards ``kernel_drops`` is final."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(10)
        try:
            self._read_statistics()
        finally:
            self.sock.close()

    def __enter__(self) -> LoopbackUdpCapture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
