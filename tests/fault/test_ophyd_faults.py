"""The ophyd device when a process of the pipeline dies mid-acquisition (the processes of ``std-daq
up``, the built-in simulator): the trigger's Status fails within the fault bound, saying what
happened, and agrees with REST and the file; the next acquisition works."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import pytest
import requests

from daq_backend.messages import FAULT_BOUND, EndReason
from daq_backend.testing import wait_for
from daq_backend.writer import layout
from std_daq_ophyd.sim import LocalDaq
from std_daq_ophyd.testing import make_detector, start_daq

FRAMES = 3000  # 15 s of images at 200 Hz: the kill comes long before the end
PERIOD = 0.005


@pytest.fixture(scope="module")
def daq(ipc_dir: str) -> Iterator[LocalDaq]:
    local = start_daq(run_as="processes")
    assert isinstance(local, LocalDaq)
    try:
        yield local
    finally:
        local.stop()


def service_pid(daq: LocalDaq, name: str) -> int:
    service = next(s for s in daq.supervisor.status()["services"] if s["name"] == name)
    assert service["alive"], service
    return int(service["pid"])


def rest(daq: LocalDaq, request_id: str) -> dict[str, Any]:
    return dict(requests.get(f"{daq.url}/requests/{request_id}", timeout=30).json())


@pytest.mark.parametrize(("process", "reason"), [("h5-writer", EndReason.WRITER_DIED),
                                                  ("writer-agent", EndReason.AGENT_DIED)])
def test_a_trigger_fails_within_the_bound_when_a_writer_process_dies(
        daq: LocalDaq, data_dir: Path, process: str, reason: EndReason) -> None:
    det = make_detector(daq, data_dir, frames=FRAMES, period=PERIOD, name=f"det_{process.replace('-', '_')}")
    det.stage()
    try:
        status = det.trigger()
        request_id = det.writer.request_id.get()
        wait_for(lambda: rest(daq, request_id).get("n_written", 0) >= 50, "50 images written", 120)
        pid = service_pid(daq, process)
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        try:
            status.wait(timeout=FAULT_BOUND)
        except Exception as exc:  # the Status's own failure, or WaitTimeoutError when it is late
            failure: BaseException = exc
        else:
            pytest.fail("the trigger succeeded although its writer process was killed")
        took = time.monotonic() - killed
        assert status.done and not status.success, f"the Status is not done {took:.1f} s after the kill"
        assert reason.value in str(failure), failure
        # REST says the same, and the file (closed or recovered) holds what REST counts
        record = wait_for(lambda: (r := rest(daq, request_id))["state"] == "failed" and r, "REST final",
                          FAULT_BOUND)
        assert record["message"].startswith(reason.value), record
        path = det.writer.file_name.get()

        def closed() -> dict[str, Any] | None:
            with layout.open_image_file(path) as h5:
                attrs = dict(h5.attrs)
                return attrs if attrs["status"] != layout.FILE_WRITING else None

        attrs = wait_for(closed, "the file closed or recovered", FAULT_BOUND)
        assert attrs["status"] == layout.FILE_INTERRUPTED
        assert str(attrs["end_reason"]).startswith(reason.value)
        with h5py.File(path, "r") as h5:
            assert int(h5.attrs["n_written"]) == record["n_written"] == h5[layout.DATA].shape[0]
        print(f"\n[ophyd, kill -9 {process}] Status failed after {took:.1f} s: {failure}; "
              f"{record['n_written']} rows in the file and in REST")
    finally:
        det.unstage()
    # the device and the DAQ serve the next acquisition
    def restarted() -> bool:
        service = next(x for x in daq.supervisor.status()["services"] if x["name"] == process)
        return bool(service["alive"] and service["counters"])

    wait_for(restarted, f"{process} restarted", 120)
    det.frames_per_trigger.put(5)
    det.stage()
    try:
        det.trigger().wait(timeout=120)
    finally:
        det.unstage()
