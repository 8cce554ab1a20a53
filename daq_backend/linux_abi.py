"""The C structures and libc entry points of Linux' batched datagram calls, defined once.

``sendmmsg(2)`` (the simulator) and ``recvmmsg(2)`` (the receivers) have no stdlib binding; both are
reached through ctypes with these ``struct iovec`` / ``msghdr`` / ``mmsghdr`` layouts."""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence
from typing import Any

#: Linux UIO_MAXIOV: most messages one sendmmsg/recvmmsg call accepts
UIO_MAXIOV = 1024


class IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class MsgHdr(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_void_p),
        ("namelen", ctypes.c_uint32),
        ("iov", ctypes.c_void_p),
        ("iovlen", ctypes.c_size_t),
        ("control", ctypes.c_void_p),
        ("controllen", ctypes.c_size_t),
        ("flags", ctypes.c_int),
    ]


class MMsgHdr(ctypes.Structure):
    _fields_ = [("hdr", MsgHdr), ("len", ctypes.c_uint)]


def libc_function(
    name: str, argtypes: Sequence[Any], restype: Any = ctypes.c_int
) -> Callable[..., int] | None:
    """``name`` from the C library with errno kept for ``ctypes.get_errno``; None where it is missing."""
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = list(argtypes)
    fn.restype = restype
    return fn
