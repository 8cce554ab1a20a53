"""The guardian: takes a supervisor's processes with it when the supervisor dies, even by SIGKILL.

``PR_SET_PDEATHSIG`` alone does not bound how long an orphan lives: the death signal is a SIGTERM that
a process may take long to act on (a writer closing a file waits for its request), it is sent when the
*thread* that forked the child exits rather than the process, and it does not reach the child's own
children. So each supervisor starts one small guardian process (``python -m daq_backend.guardian``,
in a session of its own so a terminal's Ctrl-C does not reach it) connected by a unix socket pair:

* for every child it starts, the supervisor sends the guardian a pidfd of it (``SCM_RIGHTS``), a
  handle that cannot be mistaken for a later process with a recycled PID, and the files the
  detector may leave behind (its rings in ``/dev/shm``, its ipc socket files);
* on a clean stop the supervisor says ``stop`` and the guardian exits without touching anything;
* when the socket reaches end-of-file without ``stop`` (the supervisor process is gone, however it
  died), the guardian sends SIGTERM to every child still running and to its process group (the
  children's children), waits up to ``grace`` seconds for them to exit, SIGKILLs what is left,
  removes the leftover files, marks the status file (``std-daq status`` then says what happened) and
  exits.

Every child is therefore gone within ``grace`` (+ the kernel's reaping) of the supervisor's death;
``grace`` defaults to half of ``messages.FAULT_BOUND``, which leaves a process time to close its files
(an HDF5 file ends with ``end_reason`` "shutdown") and still keeps the promise of the fault bound.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from daq_backend.messages import FAULT_BOUND

#: seconds the children get between SIGTERM and SIGKILL after the supervisor died
DEFAULT_GRACE = FAULT_BOUND / 2
_MAX_MESSAGE = 1 << 16


class Guardian:
    """Supervisor side: starts the guardian process and tells it what to watch (see module doc)."""

    def __init__(self, status_path: str | Path | None = None, grace: float = DEFAULT_GRACE,
                 env: dict[str, str] | None = None) -> None:
        self.status_path = None if status_path is None else str(status_path)
        self.grace = grace
        self.env = env or {}
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def start(self) -> Guardian:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            argv = [sys.executable, "-m", "daq_backend.guardian", str(theirs.fileno()), "--grace",
                    str(self.grace)]
            if self.status_path:
                argv += ["--status-file", self.status_path]
            self._proc = subprocess.Popen(argv, pass_fds=(theirs.fileno(),), start_new_session=True,
                                          stdin=subprocess.DEVNULL, env={**os.environ, **self.env})
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._sock = ours
        return self

    def _send(self, message: dict[str, Any], fds: Iterable[int] = ()) -> None:
        if self._sock is None:
            return
        data = json.dumps(message).encode()
        try:
            socket.send_fds(self._sock, [data], list(fds))
        except OSError:  # the guardian died: the children still have PR_SET_PDEATHSIG
            self._sock.close()
            self._sock = None

    def watch(self, pid: int, name: str) -> None:
        """Take process ``pid`` down with the supervisor (call right after starting it: until the
        supervisor reaps it, the PID cannot belong to another process)."""
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return  # already gone
        try:
            self._send({"op": "watch", "pid": pid, "name": name}, [pidfd])
        finally:
            os.close(pidfd)

    def leftovers(self, paths: Iterable[str | Path]) -> None:
        """Files to remove once every child is gone (rings, ipc socket files)."""
        self._send({"op": "leftovers", "paths": sorted({str(p) for p in paths})})

    def close(self) -> None:
        """The supervisor stopped its children itself: the guardian exits without acting."""
        self._send({"op": "stop"})
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._proc is not None:
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None


# -- the guardian process ------------------------------------------------------------------------


class _Watch:
    """What the guardian process knows: pidfds of live children and the leftover files."""

    def __init__(self, sock: socket.socket, grace: float, status_path: str | None) -> None:
        self.sock = sock
        self.grace = grace
        self.status_path = status_path
        self.children: dict[int, tuple[int, str]] = {}  # pidfd -> (pid, name)
        self.groups: dict[int, str] = {}  # process group (= the child's pid) -> the child's name
        self.paths: list[str] = []

    def serve(self) -> int:
        """Follow the supervisor until it says stop (0) or disappears (take everything down, 0)."""
        while True:
            sock = self.sock.fileno()
            readable, _, _ = select.select([sock, *self.children], [], [])
            for fd in readable:
                if fd == sock:
                    if not self._message():
                        self._take_down()
                        return 0
                    if self.sock.fileno() < 0:  # told to stop
                        return 0
                else:
                    self._forget(fd)

    def _message(self) -> bool:
        """Handle one message; False at end-of-file (the supervisor is gone)."""
        try:
            data, fds, _flags, _addr = socket.recv_fds(self.sock, _MAX_MESSAGE, 8)
        except OSError:
            return False
        if not data:
            for fd in fds:
                os.close(fd)
            return False
        try:
            message = json.loads(data)
        except ValueError:
            message = {}
        op = message.get("op")
        if op == "watch" and fds:
            self.children[fds[0]] = (int(message["pid"]), str(message.get("name", "")))
            self.groups[int(message["pid"])] = str(message.get("name", ""))
            for fd in fds[1:]:
                os.close(fd)
        elif op == "leftovers":
            self.paths = [str(p) for p in message.get("paths", [])]
        elif op == "stop":
            self.sock.close()
        return True

    def _forget(self, pidfd: int) -> None:
        self.children.pop(pidfd, None)
        os.close(pidfd)

    def _signal_all(self, sig: int) -> None:
        for pidfd in list(self.children):
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(pidfd, sig)
        for group in self.groups:  # the children's children (the groups outlive their leaders)
            with contextlib.suppress(OSError):
                os.killpg(group, sig)

    def _take_down(self) -> None:
        started = time.monotonic()
        self._signal_all(signal.SIGTERM)
        deadline = started + self.grace
        while self.children:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            readable, _, _ = select.select(list(self.children), [], [], remaining)
            for pidfd in readable:
                self._forget(pidfd)
        killed = sorted(name for _, name in self.children.values())
        for group, name in sorted(self.groups.items(), key=lambda item: item[1]):
            with contextlib.suppress(OSError):
                os.killpg(group, 0)  # raises when no process of the group is left
                killed.append(f"what {name} started")
        self._signal_all(signal.SIGKILL)
        while self.children:  # a SIGKILLed process exits at once; its pidfd says so
            readable, _, _ = select.select(list(self.children), [], [], 5.0)
            if not readable:
                break
            for pidfd in readable:
                self._forget(pidfd)
        for path in self.paths:
            with contextlib.suppress(OSError):
                os.unlink(path)
            # a ring still being built when its process was killed (``.<name>.<pid>.creating``)
            for building in Path(path).parent.glob(f".{Path(path).name}.*.creating"):
                with contextlib.suppress(OSError):
                    building.unlink()
        self._mark_status(time.monotonic() - started, killed)

    def _mark_status(self, took: float, killed: list[str]) -> None:
        """Say in the supervisor's status file that it died and its processes were stopped."""
        if not self.status_path:
            return
        path = Path(self.status_path)
        try:
            status = json.loads(path.read_text())
        except (OSError, ValueError):
            return
        how = f" (SIGKILLed after {self.grace:g} s: {', '.join(killed)})" if killed else ""
        status["ended"] = (f"the supervisor died; the guardian stopped its processes in {took:.1f} s{how} "
                           "and removed their rings and sockets")
        for service in status.get("services", []):
            if isinstance(service, dict):
                service["alive"] = False
        tmp = path.with_name(path.name + ".guardian.tmp")
        with contextlib.suppress(OSError):
            tmp.write_text(json.dumps(status, indent=1))
            os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    """``python -m daq_backend.guardian FD``: the guardian of the supervisor on the other end of FD."""
    parser = argparse.ArgumentParser(prog="daq_backend.guardian", description=main.__doc__)
    parser.add_argument("fd", type=int, help="this end of the socket pair shared with the supervisor")
    parser.add_argument("--grace", type=float, default=DEFAULT_GRACE)
    parser.add_argument("--status-file", default=None)
    args = parser.parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    sock = socket.socket(fileno=args.fd)
    return _Watch(sock, args.grace, args.status_file).serve()


if __name__ == "__main__":
    sys.exit(main())
