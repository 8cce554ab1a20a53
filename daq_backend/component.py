"""The lifecycle every long-running part of a DAQ process shares, and the loop that runs one as a process.

A component acquires its resources (sockets, rings) when it is constructed, ``run()`` does its work
until ``stop()`` is called (from a signal handler or another thread), and ``close()`` releases what
it holds, once. Tests and in-process pipelines call ``start()`` to run it in a daemon thread; a process
entry point hands it to :func:`run_service`, which maps SIGTERM/SIGINT to ``stop()`` and always
closes it. Data-path modules depend on this module, never on the supervisor.
"""

from __future__ import annotations

import abc
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, Protocol, TypeVar

log = logging.getLogger(__name__)

#: Environment variable the supervisor sets so a child reports (and logs) under its service name.
SERVICE_NAME_ENV = "STD_DAQ_SERVICE_NAME"
#: Exit code of a process that cannot start (sysexits' EX_CONFIG): the supervisor does not restart it.
EXIT_CANNOT_START = 78
#: Environment variable naming the file a child writes its reason for ``EXIT_CANNOT_START`` to.
FAILURE_FILE_ENV = "STD_DAQ_FAILURE_FILE"

T = TypeVar("T")


class Runnable(Protocol):
    """What :func:`run_service` needs: anything with the component lifecycle."""

    def run(self) -> None: ...
    def stop(self) -> None: ...
    def close(self) -> None: ...


class Component(abc.ABC):
    """Base of a component: ``run`` until ``stop``, ``close`` once; ``start`` runs it in a thread.

    Subclasses implement :meth:`run` (loop while ``not self.stopping``) and :meth:`release` (free the
    resources; called exactly once by ``close``). Used as a context manager it is stopped, joined and
    closed on exit."""

    #: name of the thread ``start()`` creates
    thread_name = "component"

    def __init__(self) -> None:
        self._stop_event = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None

    @abc.abstractmethod
    def run(self) -> None:
        """Do the work until :meth:`stop` is called; called in the process' main thread or by ``start``."""

    @abc.abstractmethod
    def release(self) -> None:
        """Free sockets, mappings and files; called once by :meth:`close`, after ``run`` returned."""

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop` was called."""
        return self._stop_event.is_set()

    def stop(self) -> None:
        """Ask ``run`` to return (safe from signal handlers and other threads)."""
        self._stop_event.set()

    def wait_stopped(self, timeout: float | None) -> bool:
        """Sleep until :meth:`stop` is called or ``timeout`` s passed; True if stopped."""
        return self._stop_event.wait(timeout)

    def start(self) -> threading.Thread:
        """Run in a daemon thread (tests, in-process pipelines); returns the thread."""
        self._thread = threading.Thread(target=self.run, name=self.thread_name, daemon=True)
        self._thread.start()
        return self._thread

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread ``start`` made; True if it ended (or there was none)."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def close(self) -> None:
        """Release the resources (once; later calls do nothing)."""
        if self._closed:
            return
        self._closed = True
        self.release()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Component:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.join(30.0)
        self.close()


def service_name(default: str) -> str:
    """The name this process reports under: the supervisor's choice, else ``default``."""
    return os.environ.get(SERVICE_NAME_ENV, default)


def run_service(component: Runnable) -> int:
    """Run ``component.run()`` in this (main) thread until SIGTERM/SIGINT, then ``close()`` it.

    The thin ``main()`` of every process uses this, so all of them stop the same way."""

    name = os.environ.get(SERVICE_NAME_ENV, type(component).__name__)

    def _stop(signum: int, _frame: object) -> None:
        log.info("%s: signal %d, stopping", name, signum)
        component.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        component.run()
    finally:
        component.close()
    return 0


def exit_cannot_start(reason: str) -> NoReturn:
    """End this process with ``EXIT_CANNOT_START``: log ``reason`` and hand it to the supervisor
    (the file ``FAILURE_FILE_ENV`` names), which reports the service failed instead of restarting it."""
    name = os.environ.get(SERVICE_NAME_ENV, "std-daq")
    log.error("%s cannot start: %s", name, reason)
    path = os.environ.get(FAILURE_FILE_ENV)
    if path:
        try:
            Path(path).write_text(reason)
        except OSError as exc:
            log.error("%s: cannot write %s: %s", name, path, exc)
    sys.exit(EXIT_CANNOT_START)


def build_component(factory: Callable[[], T]) -> T:
    """``factory()`` (a process' component, built before ``run_service``), or ``exit_cannot_start``
    when it fails for a reason a restart cannot cure: the config does not load, a socket cannot be
    bound, a ring cannot be created."""
    from daq_backend.config import ConfigError

    try:
        return factory()
    except (ConfigError, OSError, RuntimeError) as exc:
        exit_cannot_start(str(exc))
