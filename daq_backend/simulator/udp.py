"""Batched, zero-copy UDP sending: one ``sendmmsg`` system call for many scatter-gather datagrams.

Why: Python's ``socket.sendto`` costs a system call plus interpreter overhead per datagram, and a
Jungfrau module frame is 128 datagrams. A :class:`MessageTable` holds ``struct mmsghdr``/``iovec``
arrays as numpy arrays: a datagram is up to ``parts`` pieces of memory (header, payload, padding)
whose addresses the caller rewrites with one vectorised assignment per image, so the kernel copies
straight from the caller's buffers and Python copies nothing. ``send(indices)`` sends any sequence
of the table's messages (repeats = duplicates, omissions = drops) in one call. ``sendmmsg`` is
reached through ctypes (the stdlib has no binding); without it (non-Linux) ``sendmsg`` is used.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import socket
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from daq_backend.linux_abi import UIO_MAXIOV, MMsgHdr, MsgHdr, libc_function

log = logging.getLogger(__name__)

MAX_BATCH = UIO_MAXIOV
_RETRY_ERRNOS = {errno.EAGAIN, errno.ENOBUFS, errno.EINTR}
#: seconds a send may keep failing with a transient error before it is reported
STALL_LIMIT = 5.0


class _SockAddrIn(ctypes.Structure):
    _fields_ = [
        ("family", ctypes.c_uint16),
        ("port", ctypes.c_uint16),
        ("addr", ctypes.c_uint8 * 4),
        ("zero", ctypes.c_uint8 * 8),
    ]


def _struct_dtype(struct: type[ctypes.Structure], names: Sequence[str]) -> np.dtype:
    fields = {n: getattr(struct, n) for n in names}
    return np.dtype({
        "names": list(names),
        "formats": [f"<u{fields[n].size}" for n in names],
        "offsets": [fields[n].offset for n in names],
        "itemsize": ctypes.sizeof(struct),
    })


#: numpy views of the C structs (pointer-sized fields as unsigned integers)
MSGHDR_DTYPE = _struct_dtype(MsgHdr, ["name", "namelen", "iov", "iovlen"])
MMSGHDR_DTYPE = np.dtype({"names": ["hdr"], "formats": [MSGHDR_DTYPE], "offsets": [0],
                          "itemsize": ctypes.sizeof(MMsgHdr)})
IOVEC_DTYPE = np.dtype([("base", "<u8"), ("len", "<u8")])
assert IOVEC_DTYPE.itemsize == 2 * ctypes.sizeof(ctypes.c_void_p)


_SENDMMSG = libc_function("sendmmsg", [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int])


def address_of(buf: np.ndarray) -> int:
    """Address of a numpy array's first byte (cheaper than ``arr.ctypes.data``)."""
    return int(buf.__array_interface__["data"][0])


def open_send_socket(sndbuf: int = 16 * 1024 * 1024) -> socket.socket:
    """An IPv4 UDP socket with a large send buffer (``SO_SNDBUFFORCE`` as root, else capped)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    force = getattr(socket, "SO_SNDBUFFORCE", 32)
    try:
        sock.setsockopt(socket.SOL_SOCKET, force, sndbuf)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    log.debug("UDP send buffer: %d bytes", sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF))
    return sock


class MessageTable:
    """``n`` datagrams of up to ``parts`` memory pieces each, with fixed destinations.

    ``iov_base``/``iov_len`` (shape ``(n, parts)``) say where each piece lives; a zero length
    skips a piece. Whoever sets an address must keep that memory alive (see :meth:`keep`)."""

    def __init__(
        self, sock: socket.socket, destinations: Sequence[tuple[str, int]], parts: int,
        use_sendmmsg: bool = True,
    ) -> None:
        n = len(destinations)
        self.sock = sock
        self._fd = sock.fileno()
        self.destinations = list(destinations)
        self._iov = np.zeros((n, parts), dtype=IOVEC_DTYPE)
        self.iov_base = self._iov["base"]
        self.iov_len = self._iov["len"]
        self._names = {
            dst: _SockAddrIn(
                socket.AF_INET, socket.htons(dst[1]),
                (ctypes.c_uint8 * 4)(*socket.inet_aton(socket.gethostbyname(dst[0]))),
            )
            for dst in set(self.destinations)
        }
        self._mmsg = np.zeros(n, dtype=MMSGHDR_DTYPE)
        hdr = self._mmsg["hdr"]
        hdr["name"] = [ctypes.addressof(self._names[d]) for d in self.destinations]
        hdr["namelen"] = ctypes.sizeof(_SockAddrIn)
        hdr["iov"] = address_of(self._iov) + np.arange(n, dtype=np.uint64) * (parts * IOVEC_DTYPE.itemsize)
        hdr["iovlen"] = parts
        # whole rows as bytes: fancy-indexing the structured array would copy only the named fields
        # and leave msg_control/msg_controllen uninitialised
        self._rows = self._mmsg.view(np.uint8).reshape(n, MMSGHDR_DTYPE.itemsize)
        self._keep: dict[Any, object] = {}
        self.use_sendmmsg = use_sendmmsg and _SENDMMSG is not None

    def __len__(self) -> int:
        return len(self.destinations)

    def keep(self, key: Any, obj: object) -> None:
        """Hold a reference to memory that some message points to."""
        self._keep[key] = obj

    def send(self, indices: slice | np.ndarray | Sequence[int] = slice(None)) -> int:
        """Send the messages ``indices`` (a contiguous slice costs no copy); returns how many."""
        if isinstance(indices, slice):
            start, stop, step = indices.indices(len(self))
            if step != 1:
                raise ValueError("MessageTable.send: slices must have step 1")
            batch = self._rows[start:stop]
            order: Sequence[int] | np.ndarray = range(start, stop)
        else:
            order = np.asarray(indices, dtype=np.intp)
            batch = self._rows[order]
        n = len(batch)
        if n == 0:
            return 0
        if not self.use_sendmmsg:
            self._send_slowly(order)
            return n
        assert _SENDMMSG is not None  # use_sendmmsg says it exists
        base = address_of(batch)
        size = MMSGHDR_DTYPE.itemsize
        sent = 0
        stalled_since: float | None = None
        while sent < n:
            r = _SENDMMSG(self._fd, base + sent * size, min(n - sent, MAX_BATCH), 0)
            if r < 0:
                err = ctypes.get_errno()
                stalled_since = _wait_or_raise(err, "sendmmsg", stalled_since)
                continue
            stalled_since = None
            sent += r
        return n

    def _send_slowly(self, indices: Sequence[int] | np.ndarray) -> None:
        for i in indices:
            pieces = [
                (ctypes.c_char * int(length)).from_address(int(base))
                for base, length in zip(self.iov_base[i], self.iov_len[i], strict=True)
                if length
            ]
            stalled_since: float | None = None
            while True:
                try:
                    self.sock.sendmsg(pieces, [], 0, self.destinations[i])
                    break
                except OSError as exc:
                    stalled_since = _wait_or_raise(exc.errno or 0, "sendmsg", stalled_since)


def _wait_or_raise(err: int, call: str, stalled_since: float | None) -> float:
    """Back off briefly on a transiently full queue; give up after :data:`STALL_LIMIT` seconds."""
    now = time.monotonic()
    since = now if stalled_since is None else stalled_since
    if err not in _RETRY_ERRNOS or now - since > STALL_LIMIT:
        raise OSError(err, f"{call}: {errno.errorcode.get(err, err)}")
    time.sleep(0.0001)
    return since
