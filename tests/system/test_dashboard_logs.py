"""Log collection for the dashboard: the supervisor keeps the newest stderr lines of every child (and
its own messages) in the status file, with levels and warning/error counts, and still echoes them."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import pytest

from daq_backend import ipc
from daq_backend.logtail import MAX_CHARS, LogTail, TailHandler, parse_lines
from daq_backend.supervisor import ServiceSpec, Supervisor, read_status
from daq_backend.testing import make_config, wait_for

LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


def test_levels_tracebacks_and_counts() -> None:
    tail = LogTail(maxlen=50, echo_fd=None)
    tail.add("2026-01-01 10:00:00,000 daq.receiver INFO module 0: UDP 127.0.0.1:5000\n")
    tail.add("2026-01-01 10:00:01,000 daq.h5 WARNING h5 writer: row 3 of /x.h5 is lost")
    tail.add("2026-01-01 10:00:02,000 daq.h5 ERROR h5 writer: writing /x.h5 failed")
    tail.add("Traceback (most recent call last):")  # log.exception's traceback: the same error
    tail.add('  File "x.py", line 1, in <module>')
    tail.add("OSError: [Errno 28] No space left on device")
    tail.add("INFO:     127.0.0.1:4242 - \"GET /stats HTTP/1.1\" 200 OK")  # uvicorn's format
    tail.add("plain print output")
    tail.add("Traceback (most recent call last):")  # an uncaught exception: a new error
    tail.add('  File "y.py", line 2, in main')
    tail.add("ValueError: bad")
    levels = [line.level for line in tail.lines()]
    assert levels == ["INFO", "WARNING", "ERROR", "ERROR", "ERROR", "ERROR", "INFO", "", "ERROR", "ERROR",
                      "ERROR"]
    assert (tail.warnings, tail.errors) == (1, 2)
    summary = tail.summary(2)
    assert summary["warnings"] == 1 and summary["errors"] == 2
    assert [text for _, _, text in summary["lines"]] == ['  File "y.py", line 2, in main', "ValueError: bad"]
    assert [line.text for line in parse_lines(summary["lines"])] == [line[2] for line in summary["lines"]]
    assert parse_lines([[1.0, "INFO"], "junk", [1.0, "INFO", "ok"]]) == [parse_lines([[1, "INFO", "ok"]])[0]]


def test_the_tail_is_bounded_and_long_lines_are_cut() -> None:
    tail = LogTail(maxlen=3, echo_fd=None)
    for i in range(10):
        tail.add(f"WARNING line {i}")
    assert [line.text for line in tail.lines()] == ["WARNING line 7", "WARNING line 8", "WARNING line 9"]
    assert tail.warnings == 10
    long = tail.add("x" * (MAX_CHARS * 3))
    assert len(long.text) == MAX_CHARS and long.text.endswith("…")
    assert tail.lines(0) == [] and len(tail.lines(2)) == 2


def test_a_pipe_is_followed_to_eof_and_echoed(tmp_path: Path) -> None:
    echo = tmp_path / "echo.txt"
    fd = os.open(echo, os.O_WRONLY | os.O_CREAT)
    read_end, write_end = os.pipe()
    tail = LogTail(echo_fd=fd)
    try:
        reader = tail.follow(os.fdopen(read_end, "rb"), "test")
        with os.fdopen(write_end, "wb") as pipe:
            pipe.write(b"one INFO first\ntwo ERROR second\n\xff broken utf-8\n")
        reader.join(30)
        assert not reader.is_alive()
    finally:
        os.close(fd)
    texts = [line.text for line in tail.lines()]
    assert texts == ["one INFO first", "two ERROR second", "\ufffd broken utf-8"]
    assert echo.read_bytes() == b"one INFO first\ntwo ERROR second\n\xff broken utf-8\n"


def test_tail_handler_keeps_only_accepted_records() -> None:
    tail = LogTail(echo_fd=None)
    logger = logging.getLogger(f"test.tail.{time.monotonic_ns()}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    handler = TailHandler(tail, lambda _r, text: text.startswith("det: "))
    logger.addHandler(handler)
    logger.debug("det: below the handler's level")
    logger.warning("det: %s exited with %d", "receiver-0", -9)
    logger.error("other: not about this detector")
    logger.removeHandler(handler)
    assert [(line.level, line.text) for line in tail.lines()] == [
        ("WARNING", "WARNING det: receiver-0 exited with -9")]


CHILD = (
    "import logging, sys; "
    f"logging.basicConfig(level='INFO', format={LOG_FORMAT!r}); "
    "log = logging.getLogger('child'); "
    "log.info('child started'); log.warning('first warning'); "
    "print('printed to stderr', file=sys.stderr, flush=True); "
    "import time; time.sleep(3600)"
)
CRASHER = "import sys; sys.stderr.write('about to crash\\n'); raise RuntimeError('boom ' + sys.argv[1])"


def test_supervisor_status_file_carries_each_childs_lines_across_restarts(
    ipc_env: str, capfd: pytest.CaptureFixture[str]
) -> None:
    config = make_config("jungfrau")
    supervisor = Supervisor(config, readout=False, status_interval=0.1, backoff_initial=0.1, extra_services=[
        ServiceSpec("talker", argv=(sys.executable, "-c", CHILD)),
        ServiceSpec("crasher", argv=(sys.executable, "-c", CRASHER, "now")),
    ])
    supervisor.start()
    try:
        path = ipc.status_file(config.detector_name)

        def logs() -> dict | None:
            supervisor.poll_once()
            status = read_status(path)
            got = status.get("logs", {})

            def texts(service: str) -> list[str]:
                return [t for _, _, t in got.get(service, {}).get("lines", [])]

            crashes = [t for t in texts("crasher") if t.startswith("RuntimeError")]
            talker = texts("talker")
            restarted = any("restarting crasher" in t for t in texts("supervisor"))
            if len(crashes) >= 2 and "printed to stderr" in talker and restarted:
                return got
            return None

        got = wait_for(logs, "both children's lines and a restart in the status file", 120)
    finally:
        supervisor.shutdown()
    talker = got["talker"]
    assert [(level, text.split(" ", 4)[-1]) for _, level, text in talker["lines"][:2]] == [
        ("INFO", "child started"), ("WARNING", "first warning")]
    assert talker["lines"][2][1:] == ["", "printed to stderr"]
    assert talker["warnings"] == 1 and talker["errors"] == 0
    crasher = got["crasher"]
    assert crasher["errors"] >= 2  # one per crash, the traceback counted once
    assert any(text == "RuntimeError: boom now" and level == "ERROR" for _, level, text in crasher["lines"])
    supervisor_lines = [text for _, _, text in got["supervisor"]["lines"]]
    assert any("crasher exited with 1" in t for t in supervisor_lines)
    assert got["supervisor"]["errors"] >= 1 and got["supervisor"]["warnings"] >= 1
    # the children's stderr still reaches the supervisor's stderr, line by line
    assert "printed to stderr" in capfd.readouterr().err
