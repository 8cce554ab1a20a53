"""Agent and h5 writer as separate processes (the seed's layout): a SIGKILLed writer leaves a valid
file that the next writer recovers; the ``writer_agent_main`` / ``h5_writer_main`` entry points."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np

from daq_backend.broker import Action
from daq_backend.config import DetectorConfig
from daq_backend.testing import wait_for
from daq_backend.testing.writer import Harness, expected_pixels
from daq_backend.writer import layout
from daq_backend.writer.agent import WriterAgent
from daq_backend.writer.h5_writer import journal_path
from daq_backend.writer.layout import open_image_file, written_rows

_MAIN = "import sys; from daq_backend.writer.{module} import {main}; sys.exit({main}(sys.argv[1:]))"


def _config_file(tmp_path: Path, config: DetectorConfig) -> Path:
    path = tmp_path / "detector.json"
    path.write_text(json.dumps(config.to_json_dict()))
    return path


def _spawn(module: str, main: str, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", _MAIN.format(module=module, main=main), *args])


def _stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
    if proc.poll() is None:
        os.kill(proc.pid, sig)
    return proc.wait(60)


def test_sigkill_of_the_h5_writer_process_mid_run(harness: Harness) -> None:
    h = harness
    config_file = _config_file(h.tmp_path, h.config)
    agent = WriterAgent(h.config, h.transport, tag=h.tag, writer_timeout=2.0).start()
    writer = _spawn("h5_writer", "h5_writer_main", str(config_file), "--log_level", "WARNING")
    try:
        h.assembler.start(rate_hz=100)
        path = h.tmp_path / "crash.h5"
        rid = h.request(output_file=str(path), n_images=100_000, compression="bitshuffle-lz4")
        wait_for(lambda: any(p["n_written"] >= 10 for p in h.progress(rid)), "10 images written")
        _stop(writer, signal.SIGKILL)
        action, message = h.final(rid)
        assert action is Action.FAIL
        # nobody restarts this writer: the agent ends the request itself with the file's counts
        assert message.startswith("writer died: the h5 writer died after ")
        assert f"{path} was not recovered yet (status writing)" in message

        with open_image_file(path) as h5:  # valid while its writer is dead: SWMR read opens it
            assert h5.attrs["status"] == "writing"
            n = written_rows(h5)
            assert n >= 10
            ids = h5[layout.IMAGE_ID][:n]
            assert list(ids) == list(range(int(ids[0]), int(ids[0]) + n))
            for i in range(n):
                np.testing.assert_array_equal(h5[layout.DATA][i], expected_pixels(h.config, int(ids[i])))
        assert journal_path(h.config.detector_name).exists()

        writer = _spawn("h5_writer", "h5_writer_main", str(config_file), "--log_level", "WARNING")
        wait_for(lambda: not journal_path(h.config.detector_name).exists(), "the new writer's recovery")
        with h5py.File(path, "r") as h5:  # recovered: a plain reader opens it
            assert (h5.attrs["status"], h5.attrs["n_written"]) == ("interrupted", n)
            assert h5[layout.DATA].shape[0] == n

        after = h.tmp_path / "after.h5"
        action, result = h.final(h.request(output_file=str(after), n_images=20))
        assert action is Action.SUCCESS, result
        with h5py.File(after, "r") as h5:
            assert h5.attrs["status"] == "completed" and h5[layout.DATA].shape[0] == 20
        assert _stop(writer) == 0  # SIGTERM: a clean exit
    finally:
        agent.stop()
        _stop(writer)


def test_writer_agent_main_with_its_h5_writer(harness: Harness) -> None:
    h = harness
    config_file = _config_file(h.tmp_path, h.config)
    url = h.broker_url
    agent = _spawn("agent", "writer_agent_main", str(config_file), "--broker-url", url, "--with-h5-writer",
                   "--service_name", "writer_agent", "--log_level", "WARNING")
    try:
        h.assembler.start(rate_hz=100)
        path = h.tmp_path / "main.h5"
        sent: list[str] = []
        wait_for(lambda: _request_reaches(h, str(path), sent), "the agent process to serve")
        action, result = h.final(sent[0])
        assert action is Action.SUCCESS, result
        with h5py.File(path, "r") as h5:
            assert h5.attrs["status"] == "completed" and h5[layout.DATA].shape[0] == 5
    finally:
        assert _stop(agent) == 0


def _request_reaches(h: Harness, output_file: str, sent: list[str]) -> bool:
    """Send the request once a service is bound (the client refuses requests nobody listens for)."""
    try:
        sent.append(h.request(output_file=output_file, n_images=5))
    except ConnectionError:
        return False
    return True
