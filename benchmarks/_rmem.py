"""Change a machine-wide setting (``net.core.rmem_max``, ...) for a benchmark and always put it back.

Why: the "large socket buffer" half of the benchmark needs a cap far above the distribution default
(and ``_vmmem`` switches off a VM's free page reporting), but a benchmark must not leave a
machine-wide setting changed behind it. :func:`temporarily` restores the original value when its
block ends for any reason: normal end, exception, Ctrl-C (SIGINT), SIGTERM or SIGHUP (turned into
:class:`BenchmarkInterrupted` so the ``finally`` runs). Only SIGKILL can skip that, so the original
value is also written to a small state file for the time it is changed; the next benchmark that
starts finds the file of a dead process and restores the value from it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

log = logging.getLogger(__name__)

RMEM_MAX_PATH = Path("/proc/sys/net/core/rmem_max")
#: Where the original value waits while it is changed (a SIGKILLed benchmark leaves it behind).
STATE_PATH = Path("/tmp/std-daq-bench-rmem_max.json")
#: "2 GiB": the largest value the int-typed sysctl takes.
LARGE_RMEM_MAX = 2**31 - 1
#: The largest receive buffer a socket can get (the kernel caps SO_RCVBUF at INT_MAX / 2, and
#: slsReceiver refuses more).
MAX_SOCKET_RCVBUF = 2**30 - 1
#: What every receiver asks for, the machine's rmem_max permitting: slsReceiver's Jungfrau default.
DEFAULT_SOCKET_RCVBUF = 1000 * 1024 * 1024
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class BenchmarkInterrupted(SystemExit):
    """A termination signal arrived; raised in the main thread so every cleanup block runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum

    def __str__(self) -> str:
        return f"interrupted by {signal.Signals(self.signum).name}"


class RmemMaxError(RuntimeError):
    """A setting could not be read or changed; the message says how to fix it."""


@dataclass(frozen=True)
class Setting:
    """One integer machine setting behind a /proc or /sys file."""

    name: str
    path: Path
    state_path: Path
    low: int
    high: int
    #: what to do when it cannot be changed (appended to the error)
    hint: str = "run the benchmark as root"

    def read(self) -> int:
        try:
            return int(self.path.read_text().split()[0])
        except (OSError, ValueError, IndexError) as exc:
            raise RmemMaxError(f"cannot read {self.path}: {exc}") from None

    def write(self, value: int) -> None:
        if not self.low <= value <= self.high:
            raise RmemMaxError(f"{self.name}: {value} is outside {self.low}..{self.high}")
        try:
            self.path.write_text(f"{value}\n")
        except OSError as exc:
            raise RmemMaxError(
                f"cannot set {self.name}={value} through {self.path} ({exc.strerror}); {self.hint}") from None
        got = self.read()
        if got != value:
            raise RmemMaxError(f"{self.name}: wrote {value}, reads back {got}")


def rmem_max_setting(path: Path = RMEM_MAX_PATH, state_path: Path = STATE_PATH) -> Setting:
    return Setting("net.core.rmem_max", path, state_path, 1, LARGE_RMEM_MAX,
                   "run the benchmark as root, or skip the large-buffer runs with --buffers default")


def read_rmem_max(path: Path = RMEM_MAX_PATH) -> int:
    return rmem_max_setting(path).read()


def write_rmem_max(value: int, path: Path = RMEM_MAX_PATH) -> None:
    rmem_max_setting(path).write(value)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_stale(setting: Setting) -> int | None:
    """Restore the value a killed benchmark left changed; returns it (None when nothing to do)."""
    state_path = setting.state_path
    try:
        state = json.loads(state_path.read_text())
        original, pid = int(state["original"]), int(state["pid"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        log.warning("ignoring unreadable %s", state_path)
        state_path.unlink(missing_ok=True)
        return None
    if pid != os.getpid() and _pid_alive(pid):
        raise RmemMaxError(f"another benchmark (pid {pid}) has {setting.name} changed; wait for it to end")
    log.warning("a benchmark (pid %d) was killed with %s changed: restoring %d", pid, setting.name, original)
    setting.write(original)
    state_path.unlink(missing_ok=True)
    return original


def recover_stale_state(path: Path = RMEM_MAX_PATH, state_path: Path = STATE_PATH) -> int | None:
    return recover_stale(rmem_max_setting(path, state_path))


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """SIGTERM/SIGHUP raise :class:`BenchmarkInterrupted` in the main thread while the block runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: FrameType | None) -> None:
        raise BenchmarkInterrupted(signum)

    previous = {sig: signal.signal(sig, handler) for sig in HANDLED_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def temporarily(setting: Setting, value: int | None) -> Iterator[int]:
    """Within the block ``setting`` is ``value`` (``None``: left as the machine has it).

    Yields the value in force. The original is restored on every way out of the block, and checked.
    """
    recover_stale(setting)
    original = setting.read()
    if value is None or value == original:
        yield original
        return
    with signals_raise():
        setting.state_path.write_text(json.dumps({"original": original, "pid": os.getpid()}))
        try:
            setting.write(value)
            log.info("%s changed %d -> %d (restored when the benchmark ends)", setting.name, original, value)
            yield value
        finally:
            # a second signal during the restore must not skip it
            masked = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (*HANDLED_SIGNALS, signal.SIGINT)} \
                if threading.current_thread() is threading.main_thread() else {}
            try:
                setting.write(original)
                setting.state_path.unlink(missing_ok=True)
                log.info("%s restored to %d", setting.name, original)
            except RmemMaxError as exc:
                log.error("could not restore %s (%s): write %d to %s", setting.name, exc, original,
                          setting.path)
                raise
            finally:
                for sig, old in masked.items():
                    signal.signal(sig, old)


def socket_buffer_cap(value: int | None, path: Path = RMEM_MAX_PATH,
                      state_path: Path = STATE_PATH) -> contextlib.AbstractContextManager[int]:
    """Within the block ``net.core.rmem_max`` is ``value`` (``None``: left as the machine has it)."""
    return temporarily(rmem_max_setting(path, state_path), value)
