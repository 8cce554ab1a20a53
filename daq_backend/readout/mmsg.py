"""Batched UDP receive: one ``recvmmsg(2)`` system call fills up to ``vlen`` datagram buffers.

Why: ``socket.recv_into`` costs a system call plus interpreter overhead per datagram, and a Jungfrau
module frame is 128 datagrams. :class:`RecvBatch` preallocates the ``struct mmsghdr``/``iovec`` arrays
once, each iovec pointing at one row of a contiguous numpy staging buffer, so a call costs one ctypes
call and creates no Python objects per datagram; the received lengths are a numpy view of the
``msg_len`` fields. ``recvmmsg`` is reached through ctypes (the stdlib has no binding); where libc
lacks it (non-Linux) :func:`available` is False and callers receive one datagram at a time.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket

import numpy as np

from daq_backend.linux_abi import UIO_MAXIOV, IoVec, MMsgHdr, libc_function

MAX_VLEN = UIO_MAXIOV
#: staging rows start on cache-line boundaries, so header fields are aligned for numpy
ROW_ALIGN = 64
MSG_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0x40)
_EMPTY = {errno.EAGAIN, errno.EWOULDBLOCK}


_RECVMMSG = libc_function(
    "recvmmsg", [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p]
)


def available() -> bool:
    """Whether this platform's libc has ``recvmmsg`` (Linux glibc/musl do)."""
    return _RECVMMSG is not None


class RecvBatch:
    """``vlen`` receive buffers of ``max_size`` bytes: row *i* of :attr:`buffer` is message *i*.

    After ``n = recv(fd)`` datagram *i* < *n* is ``buffer[i, :lengths[i]]``. A datagram longer than
    ``max_size`` is truncated to ``max_size`` bytes (as ``recv_into`` would), so pass one byte more
    than the longest valid datagram to recognise oversize ones by their length."""

    def __init__(self, vlen: int, max_size: int) -> None:
        if not available():
            raise OSError(errno.ENOSYS, "recvmmsg is not available on this platform")
        if not 1 <= vlen <= MAX_VLEN:
            raise ValueError(f"vlen must lie in 1..{MAX_VLEN}, got {vlen}")
        if max_size < 1:
            raise ValueError(f"max_size must be positive, got {max_size}")
        self.vlen = vlen
        self.max_size = max_size
        stride = -(-max_size // ROW_ALIGN) * ROW_ALIGN
        raw = np.zeros(vlen * stride + ROW_ALIGN, dtype=np.uint8)
        skip = -raw.ctypes.data % ROW_ALIGN
        #: staging memory: one row per message (only the first ``max_size`` bytes are received into)
        self.buffer = raw[skip : skip + vlen * stride].reshape(vlen, stride)
        self._iov = (IoVec * vlen)()
        self._msgs = (MMsgHdr * vlen)()
        base = self.buffer.ctypes.data
        for i in range(vlen):
            self._iov[i].base = base + i * stride
            self._iov[i].len = max_size
            self._msgs[i].hdr.iov = ctypes.addressof(self._iov[i])
            self._msgs[i].hdr.iovlen = 1
        self._addr = ctypes.addressof(self._msgs)
        #: bytes received per message (``msg_len``), valid for the first ``n`` after ``recv``
        self.lengths = np.ndarray(
            (vlen,), dtype=np.uint32, buffer=memoryview(self._msgs), offset=MMsgHdr.len.offset,
            strides=(ctypes.sizeof(MMsgHdr),),
        )

    def recv(self, fd: int) -> int:
        """Receive what the socket holds, up to ``vlen`` datagrams, without blocking.

        Returns how many (0 when the socket is empty); retries EINTR; any other error is raised as
        ``OSError`` (the error is consumed, as with ``recv_into``: the next call receives again)."""
        while True:
            n = _RECVMMSG(fd, self._addr, self.vlen, MSG_DONTWAIT, None)  # type: ignore[misc]
            if n >= 0:
                return n
            err = ctypes.get_errno()
            if err in _EMPTY:
                return 0
            if err != errno.EINTR:
                raise OSError(err, f"recvmmsg: {os.strerror(err)}")
