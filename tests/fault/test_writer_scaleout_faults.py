"""``kill -9`` of one of several h5 writers mid-request (``n_writers`` 2, through ``std-daq up`` on
RabbitMQ with the simulator on loopback): the request ends within ``FAULT_BOUND`` as failed
("writer died: h5 writer 1 (part ...) ..."), the master says how many leading rows are complete
(``n_written``, equal to REST's and the broker's), the other part is closed as interrupted, the
killed writer's part is recovered by its restarted process (``layout.recover_file``) and opens for a
plain reader, the accounting balances, and the next write over both writers works."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import requests

from daq_backend.broker.protocol import Action
from daq_backend.messages import FAULT_BOUND, EndReason
from daq_backend.testing import wait_for
from daq_backend.testing.up import (
    Broker,
    Detector,
    assert_agree,
    assert_rows,
    final_everywhere,
    kill_service,
    leading,
    part_paths,
    report,
    scaled_daq,
    submit,
)
from daq_backend.writer import layout, master

N_IMAGES = 500
KILL_AT = 200
N_WRITERS = 2


def test_kill_9_of_one_of_two_writers_ends_the_request_with_the_leading_rows(ipc_env: str,
                                                                             tmp_path: Path) -> None:
    with scaled_daq(ipc_env, tmp_path, N_WRITERS) as daq, Detector(daq.config), \
            Broker(daq.config.detector_name) as broker:
        request_id, output = submit(daq, "run.h5", N_IMAGES)
        wait_for(lambda: output.exists() and leading(output) >= KILL_AT, f"{KILL_AT} rows written", 180)
        old = daq.services()["h5-writer-1"]["pid"]
        killed = kill_service(daq, "h5-writer-1")
        rest, (action, message), took = final_everywhere(daq, broker, request_id, killed)
        wait_for(lambda: (s := daq.services()["h5-writer-1"])["alive"] and s["pid"] != old,
                 "h5-writer-1 restarted", 60)
        answer = requests.post(f"{daq.url}/write_sync", json={
            "output_file": str(daq.output / "after.h5"), "n_images": 20, "timeout": 60}, timeout=300)
    assert rest["state"] == "failed" and rest["message"].startswith(EndReason.WRITER_DIED.value), rest
    assert "h5 writer 1" in rest["message"] and "run_part1.h5" in rest["message"], rest
    assert action is Action.FAIL and message.startswith(EndReason.WRITER_DIED.value)
    dead_part, live_part = part_paths(output, N_WRITERS)[1], part_paths(output, N_WRITERS)[0]
    for part in (dead_part, live_part):  # both closed or recovered: a plain reader opens them
        with h5py.File(part, "r") as h5:
            assert h5.attrs["status"] == layout.FILE_INTERRUPTED
            assert h5.attrs["end_reason"].startswith(EndReason.WRITER_DIED.value)
            assert h5[layout.DATA].shape[0] == layout.written_rows(h5) == int(h5.attrs["n_written"])
    counts = master.master_accounting(output)
    with h5py.File(output, "r") as h5:
        assert h5.attrs["status"] == layout.FILE_INTERRUPTED
        assert "h5 writer 1" in h5.attrs["end_reason"] and "run_part1.h5" in h5.attrs["end_reason"]
        assert int(h5.attrs["n_written"]) == counts["n_written"] >= KILL_AT
        ids = assert_rows(daq.config, h5, counts["n_written"])  # leading rows: in order, pixel-exact
    assert counts["n_written"] == master.leading_rows(master.part_rows(output))
    assert_agree(rest, counts, N_IMAGES)
    assert answer.status_code == 200 and answer.json()["response"]["state"] == "completed", answer.text
    with h5py.File(daq.output / "after.h5", "r") as h5:
        assert (h5.attrs["status"], h5.attrs["n_written"]) == ("completed", 20)
        assert_rows(daq.config, h5, 20)
    report("kill -9 of h5 writer 1 of 2", leading_rows=counts["n_written"], first_id=int(ids[0]),
           part_rows=master.part_rows(output), final=rest["state"],
           seconds_from_kill_to_final=round(took, 1), bound_s=FAULT_BOUND)
    np.testing.assert_array_equal(np.diff(ids), 1)


def test_kill_9_of_the_writer_agent_over_two_writers_ends_every_part_and_the_master(ipc_env: str,
                                                                                   tmp_path: Path) -> None:
    """The restarted agent finds the request in its journal: it stops every part (``interrupted``,
    "writer agent died: ...") and finishes the master with the leading rows, which REST reports."""
    with scaled_daq(ipc_env, tmp_path, N_WRITERS) as daq, Detector(daq.config), \
            Broker(daq.config.detector_name) as broker:
        request_id, output = submit(daq, "run.h5", N_IMAGES)
        wait_for(lambda: output.exists() and leading(output) >= KILL_AT, f"{KILL_AT} rows written", 180)
        killed = kill_service(daq, "writer-agent")
        rest, (action, message), took = final_everywhere(daq, broker, request_id, killed)
    assert rest["state"] == "failed" and rest["message"].startswith(EndReason.AGENT_DIED.value), rest
    assert action is Action.FAIL and message.startswith(EndReason.AGENT_DIED.value)
    for part in part_paths(output, N_WRITERS):
        with h5py.File(part, "r") as h5:
            assert h5.attrs["status"] == layout.FILE_INTERRUPTED
            assert h5.attrs["end_reason"].startswith(EndReason.AGENT_DIED.value)
    counts = master.master_accounting(output)
    with h5py.File(output, "r") as h5:
        assert h5.attrs["status"] == layout.FILE_INTERRUPTED
        assert h5.attrs["end_reason"].startswith(EndReason.AGENT_DIED.value)
        assert int(h5.attrs["n_written"]) == counts["n_written"] >= KILL_AT
        assert_rows(daq.config, h5, counts["n_written"])
    assert_agree(rest, counts, N_IMAGES)
    report("kill -9 of the writer agent, 2 writers", leading_rows=counts["n_written"],
           part_rows=master.part_rows(output), final=rest["state"], seconds_from_kill_to_final=round(took, 1))
