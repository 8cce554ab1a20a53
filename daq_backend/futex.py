"""Wait for a 32-bit word in shared memory to change, and wake those who wait: Linux ``futex(2)``.

A producer that publishes into a shared-memory ring bumps a word after each commit; a consumer in
another process sleeps in the kernel until the word differs from the value it last saw. This is the
cheapest wake-up between processes there is (one system call on each side, and the producer makes
it only when somebody sleeps: see :class:`SharedWord`), far below a message over a ZMQ socket, whose
I/O threads add two more thread wake-ups per message.

The futex word must live in a ``MAP_SHARED`` mapping (the kernel keys shared futexes by the page, so
processes that map the same file at different addresses meet on the same word). Memory ordering: on
x86-64 (total store order) stores become visible in program order, which the rings rely on; other
architectures would need barriers around the plain stores numpy makes.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
import time

_SYS_FUTEX = {"x86_64": 202, "aarch64": 98}.get(platform.machine())
#: futex_waitv(2) (Linux >= 5.16): one sleep on several words; the same number on every architecture
_SYS_FUTEX_WAITV = 449 if _SYS_FUTEX is not None else None
_FUTEX_WAIT = 0
_FUTEX_WAKE = 1
_FUTEX2_SIZE_U32 = 0x02
_CLOCK_MONOTONIC = 1
#: most words one futex_waitv call takes (the kernel's FUTEX_WAITV_MAX)
WAITV_MAX = 128
_INT_MAX = 2**31 - 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Waiter(ctypes.Structure):
    """``struct futex_waitv``."""

    _fields_ = [("val", ctypes.c_uint64), ("uaddr", ctypes.c_uint64), ("flags", ctypes.c_uint32),
                ("reserved", ctypes.c_uint32)]


def _syscall() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    if _SYS_FUTEX is None:
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).syscall
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_long
    return fn


_syscall_fn = _syscall()


def available() -> bool:
    """True where futex(2) can be called (Linux on x86-64 or aarch64)."""
    return _syscall_fn is not None


class SharedWord:
    """A 32-bit counter at ``offset`` of a shared mapping that consumers can sleep on.

    ``bump()`` (producer) increments the counter and wakes every sleeper; ``wait(seen, timeout)``
    (consumer) sleeps until the counter differs from ``seen`` or ``timeout`` seconds passed.
    ``bump`` always makes the wake system call (1-2 us through ctypes, a tenth of one ZMQ message):
    a shared "somebody sleeps" flag cannot be kept exact by several consumers without atomic
    operations, and a missed wake-up would cost a consumer its whole timeout.
    Without futex(2) ``wait`` degrades to a yield, so callers always re-check their condition.

    The 4 bytes at ``offset`` belong to this object; ``offset`` must be 4-aligned."""

    def __init__(self, mm: mmap.mmap, offset: int) -> None:
        if offset % 4:
            raise ValueError(f"futex word offset {offset} is not 4-byte aligned")
        self._word = ctypes.c_uint32.from_buffer(mm, offset)
        self._address = ctypes.c_void_p(ctypes.addressof(self._word))

    @property
    def value(self) -> int:
        return int(self._word.value)

    def bump(self) -> None:
        """Increment the counter (wrapping at 2**32) and wake every sleeper."""
        self._word.value = (self._word.value + 1) & 0xFFFFFFFF
        if _syscall_fn is not None:
            _syscall_fn(_SYS_FUTEX, self._address, _FUTEX_WAKE, _INT_MAX, None, None, 0)

    def wake(self) -> None:
        """Wake every sleeper without changing the counter (e.g. to make a consumer re-check)."""
        if _syscall_fn is not None:
            _syscall_fn(_SYS_FUTEX, self._address, _FUTEX_WAKE, _INT_MAX, None, None, 0)

    def wait(self, seen: int, timeout: float) -> bool:
        """Sleep until the counter is not ``seen`` (True) or ``timeout`` s passed (False).

        Spurious returns are possible (signals, a wake without a change): callers loop on their own
        condition. A ``bump`` between the caller's read and the sleep is never missed: the kernel
        compares the word with ``seen`` atomically before it sleeps."""
        if self._word.value != seen:
            return True
        if timeout <= 0:
            return False
        if _syscall_fn is None:
            os.sched_yield()
            return self._word.value != seen
        ts = _Timespec(int(timeout), int((timeout % 1.0) * 1e9))
        result = _syscall_fn(_SYS_FUTEX, self._address, _FUTEX_WAIT, ctypes.c_uint32(seen), ctypes.byref(ts),
                             None, 0)
        if result == -1:
            err = ctypes.get_errno()
            if err not in (errno.EAGAIN, errno.ETIMEDOUT, errno.EINTR):
                raise OSError(err, f"futex wait: {os.strerror(err)}")
        return self._word.value != seen

    def release(self) -> None:
        """Drop the ctypes views so the mapping can be closed."""
        del self._word, self._address


#: None until the first :func:`wait_any` found out whether the kernel has futex_waitv(2)
_waitv_works: bool | None = None


def wait_any(words: list[SharedWord], seen: list[int], timeout: float) -> bool:
    """Sleep until any of ``words`` differs from its ``seen`` value (True) or ``timeout`` s passed.

    One ``futex_waitv(2)`` system call for all of them (at most :data:`WAITV_MAX`), so a consumer of
    several rings sleeps once per wake-up whichever ring the producer commits to. Like
    :meth:`SharedWord.wait` it may return early (callers re-check their condition); a bump between
    the caller's read of ``seen`` and the sleep is never missed. Kernels before 5.16 lack the call:
    then it sleeps on the first word only, for at most 10 ms at a time, so the others are looked at
    that often (a poll, but only there)."""
    global _waitv_works
    if len(words) != len(seen):
        raise ValueError("wait_any: one seen value per word")
    if any(w.value != s for w, s in zip(words, seen, strict=True)):
        return True
    if timeout <= 0 or not words:
        return False
    if len(words) == 1:
        return words[0].wait(seen[0], timeout)
    if _syscall_fn is None or _waitv_works is False or len(words) > WAITV_MAX:
        words[0].wait(seen[0], min(timeout, 0.01))
        return any(w.value != s for w, s in zip(words, seen, strict=True))
    waiters = (_Waiter * len(words))()
    for waiter, word, value in zip(waiters, words, seen, strict=True):
        waiter.val = value
        waiter.uaddr = ctypes.addressof(word._word)
        waiter.flags = _FUTEX2_SIZE_U32
    deadline = time.clock_gettime(time.CLOCK_MONOTONIC) + timeout
    ts = _Timespec(int(deadline), int((deadline % 1.0) * 1e9))
    result = _syscall_fn(_SYS_FUTEX_WAITV, waiters, ctypes.c_uint(len(words)), ctypes.c_uint(0),
                         ctypes.byref(ts), ctypes.c_int(_CLOCK_MONOTONIC))
    if result == -1:
        err = ctypes.get_errno()
        if err == errno.ENOSYS:
            _waitv_works = False
            return wait_any(words, seen, timeout)
        if err not in (errno.EAGAIN, errno.ETIMEDOUT, errno.EINTR):
            raise OSError(err, f"futex_waitv: {os.strerror(err)}")
    _waitv_works = True
    return any(w.value != s for w, s in zip(words, seen, strict=True))


def private_word() -> SharedWord:
    """A word in an anonymous shared mapping of this process: for waking one of its own threads out
    of :func:`wait_any` (a thread that watches something else bumps it)."""
    return SharedWord(mmap.mmap(-1, mmap.PAGESIZE), 0)
