"""The newest lines every supervised process wrote to stderr, kept for ``std-daq status --json`` and the
dashboard.

The supervisor gives each command-line child a pipe as its stderr. A reader thread per process copies
every line to the supervisor's own stderr (so the terminal or journal shows what it showed before)
and keeps the newest lines, each with the time it was read and the log level found in it, in a
bounded deque (:class:`LogTail`). Nothing runs in the child: writing a line to a pipe costs it what
writing to a terminal did. The supervisor's own records about a detector (restarts, exits) are kept
the same way through :class:`TailHandler`.

The level of a line is the first logging level name in its first characters (every process logs
``time name LEVEL message``); the lines of a Python traceback take the level ERROR, other text
(``print`` output) has no level (``""``).
"""

from __future__ import annotations

import collections
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import IO, Any

#: Level names a line can carry, lowest first.
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_ALIASES = {"WARN": "WARNING", "FATAL": "CRITICAL"}
_ERRORS = ("ERROR", "CRITICAL")
#: Lines between the parts of a chained traceback.
_CHAINED = ("During handling of the above exception", "The above exception was the direct cause")
_LEVEL_RE = re.compile(r"\b(DEBUG|INFO|WARNING|WARN|ERROR|CRITICAL|FATAL)\b")
#: How far into a line the level is looked for (past the timestamp and the logger name).
_LEVEL_SCAN = 120
#: Lines kept per process, and the longest line kept (the rest is cut, marked with "…").
DEFAULT_MAXLEN = 200
MAX_CHARS = 400
#: Longest piece read at once; a longer line is kept as several.
_READ_CHUNK = 65536


@dataclass(frozen=True)
class LogLine:
    """One line: when it was read (unix time), its level (one of ``LEVELS`` or ``""``), its text."""

    time: float
    level: str
    text: str

    def to_json(self) -> list[Any]:
        """``[time, level, text]``: compact, for the status file."""
        return [round(self.time, 3), self.level, self.text]


class LogTail:
    """The newest ``maxlen`` lines of one service (across its restarts) and how many warnings and
    errors it logged in total. Thread-safe: a reader thread adds, the status writer reads."""

    def __init__(self, maxlen: int = DEFAULT_MAXLEN, echo_fd: int | None = 2) -> None:
        self._lines: collections.deque[LogLine] = collections.deque(maxlen=maxlen)
        self._lock = threading.Lock()
        self.echo_fd = echo_fd
        self.warnings = 0
        self.errors = 0
        self._in_traceback = False
        self._last_level = ""

    # -- adding ---------------------------------------------------------------------------------
    def add(self, text: str, level: str | None = None, when: float | None = None) -> LogLine:
        """Keep one line (its level found in the text unless given); returns what was kept."""
        text = text.rstrip("\r\n")
        with self._lock:
            found, continued = (level, False) if level is not None else self._classify(text)
            if len(text) > MAX_CHARS:
                text = text[: MAX_CHARS - 1] + "…"
            line = LogLine(time.time() if when is None else when, found, text)
            self._lines.append(line)
            if not continued:
                if found == "WARNING":
                    self.warnings += 1
                elif found in _ERRORS:
                    self.errors += 1
            self._last_level = found
        return line

    def _classify(self, text: str) -> tuple[str, bool]:
        """(level, whether the line continues the previous record, e.g. its traceback)."""
        after_error = self._last_level in _ERRORS
        if not text.strip():
            return self._last_level, True
        if text.startswith("Traceback (most recent call last)"):
            self._in_traceback = True
            return "ERROR", after_error
        if self._in_traceback:
            if not text[:1].isspace() and not text.startswith(_CHAINED):
                self._in_traceback = False  # the exception line ends the traceback
            return "ERROR", True
        match = _LEVEL_RE.search(text, 0, _LEVEL_SCAN)
        if match:
            name = match.group(1)
            return _ALIASES.get(name, name), False
        if text[:1].isspace() and after_error:
            return self._last_level, True
        return "", False

    def follow(self, pipe: IO[bytes], name: str) -> threading.Thread:
        """Read ``pipe`` (a child's stderr) line by line in a daemon thread until EOF, echoing each
        line to ``echo_fd``; the thread closes the pipe at the end."""
        thread = threading.Thread(target=self._read, args=(pipe,), name=f"log-{name}", daemon=True)
        thread.start()
        return thread

    def _read(self, pipe: IO[bytes]) -> None:
        try:
            for raw in iter(lambda: pipe.readline(_READ_CHUNK), b""):
                self._echo(raw)
                self.add(raw.decode("utf-8", "replace"))
        except (OSError, ValueError):  # the pipe was closed under us: the child is gone
            pass
        finally:
            try:
                pipe.close()
            except OSError:
                pass

    def _echo(self, raw: bytes) -> None:
        if self.echo_fd is None:
            return
        view = memoryview(raw)
        try:
            while view:
                view = view[os.write(self.echo_fd, view):]
        except OSError:  # our stderr is gone (closed terminal): keep collecting, stop echoing
            self.echo_fd = None

    # -- reading --------------------------------------------------------------------------------
    def lines(self, n: int | None = None) -> list[LogLine]:
        """The newest ``n`` lines (all kept lines if None), oldest first."""
        with self._lock:
            kept = list(self._lines)
        return kept if n is None else kept[-n:] if n > 0 else []

    def summary(self, n: int) -> dict[str, Any]:
        """``{"warnings", "errors", "lines": [[time, level, text], ...]}`` with the newest ``n`` lines."""
        with self._lock:
            warnings, errors = self.warnings, self.errors
        return {"warnings": warnings, "errors": errors, "lines": [line.to_json() for line in self.lines(n)]}


class TailHandler(logging.Handler):
    """A logging handler that keeps records (formatted ``LEVEL message``) in a :class:`LogTail`;
    ``accept`` picks the records that belong (e.g. those about one detector)."""

    def __init__(self, tail: LogTail, accept: Any = None, level: int = logging.INFO) -> None:
        super().__init__(level)
        self.tail = tail
        self.accept = accept

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if self.accept is not None and not self.accept(record, message):
                return
            level = _ALIASES.get(record.levelname, record.levelname)
            self.tail.add(f"{level} {message}", level if level in LEVELS else "", record.created)
        except Exception:
            self.handleError(record)


def parse_lines(items: Any) -> list[LogLine]:
    """Lines as the status file holds them (``[time, level, text]``), malformed entries skipped."""
    lines = []
    for item in items if isinstance(items, list) else []:
        if (
            isinstance(item, list | tuple)
            and len(item) == 3
            and isinstance(item[0], int | float)
            and isinstance(item[1], str)
            and isinstance(item[2], str)
        ):
            lines.append(LogLine(float(item[0]), item[1], item[2]))
    return lines
