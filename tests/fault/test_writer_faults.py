"""Processes of the write path die, and the disk fills up, during a write: through the processes
``std-daq up`` runs (receivers, assembler, h5 writer, writer agent, REST) on RabbitMQ, with real UDP
from the built-in simulator on loopback.

* ``kill -9`` of the assembler: the image ring is re-created by the restarted assembler and the
  writer follows it; the file holds the images of the old ring, then those of the new one (pixel
  for pixel), and only the outage is missing (a jump of the image ids), no row is lost;
* ``kill -9`` of the receiver: the restarted receiver's new frame ring is followed; only the outage
  is missing (one jump of the ids), the write completes;
* ``kill -9`` of the REST API: the write goes on; the restarted API (same port) finds the request's
  statuses in its status queue and answers its final state;
* ``kill -9`` of the h5 writer and of the writer agent: the request reaches its final state in REST,
  the broker status and ``/writer/status`` within ``FAULT_BOUND``, REST's ``n_written`` equals the
  recovered file's complete rows, its ``end_reason`` names the process that died, a ``write_sync``
  caller gets the final answer, and the next write works;
* a full disk (a small tmpfs mounted by the test): the file opens, holds every image flushed before
  the error and says ``failed: no space left on device`` like REST and the broker; nothing half made
  is left, also when the disk is full before the file is created; the request carries a warning
  from its start.

Every test checks the accounting (``ImageAccounting.balanced``) of file and REST.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import requests

from daq_backend.broker.protocol import Action
from daq_backend.messages import FAULT_BOUND, EndReason
from daq_backend.testing import healthy, wait_for
from daq_backend.testing.up import (
    FINAL,
    Broker,
    Daq,
    Detector,
    assert_balanced,
    assert_pixels,
    file_state,
    final_everywhere,
    kill_service,
    next_write_works,
    report,
    rows,
    running_daq,
    submit,
)
from daq_backend.writer import layout

N_IMAGES = 500  # the measured scenarios: kill -9 at about 200 of 500
KILL_AT = 200
RATE = 100.0


@pytest.fixture
def daq(ipc_env: str, tmp_path: Path) -> Iterator[Daq]:
    output = tmp_path / "data"
    output.mkdir()
    with running_daq(ipc_env, tmp_path, output) as d:
        yield d


# -- a process dies ---------------------------------------------------------------------------------


def write_through_a_restart(daq: Daq, service: str, name: str
                            ) -> tuple[dict[str, Any], Any, dict[str, int], np.ndarray, float, Path]:
    """A write of ``N_IMAGES`` during which ``service`` is killed at ``KILL_AT`` rows and restarted by
    the supervisor; the write must still complete (REST and broker). Returns REST's final status, the
    broker's final message, the file's counts and image ids, the seconds from the kill to the final
    state, and the file."""
    with Detector(daq.config), Broker(daq.config.detector_name) as broker:
        request_id, path = submit(daq, name, N_IMAGES)
        wait_for(lambda: rows(path) >= KILL_AT, f"{KILL_AT} images written", 180)
        old = daq.services()[service]["pid"]
        killed = kill_service(daq, service)
        wait_for(lambda: (s := daq.services()[service])["alive"] and s["pid"] != old, f"{service} restarted",
                 60)
        rest, (action, message), _ = final_everywhere(daq, broker, request_id, time.monotonic(), 180)
        took = time.monotonic() - killed
    attrs, counts, ids = file_state(path)
    assert rest["state"] == "completed" and action is Action.SUCCESS, (rest, message)
    assert attrs["status"] == "completed" and counts["n_written"] == N_IMAGES
    assert np.all(np.diff(ids) >= 1)  # increasing
    return rest, message, counts, ids, took, path


def test_kill_9_of_the_assembler_mid_write_the_writer_follows_the_new_ring(daq: Daq) -> None:
    rest, message, counts, ids, took, path = write_through_a_restart(daq, "assembler", "assembler.h5")
    steps = np.diff(ids)
    with h5py.File(path, "r") as h5:
        status = h5[layout.STATUS][:]
        missing = h5[layout.N_MISSING_PACKETS][:]
    # The outage, and only the outage, is missing or flagged: ids that never became images (one jump
    # of the ids), and the frames the receivers stored while no assembler ran, which the restarted
    # assembler gets announced all at once but whose slots were overwritten meanwhile: rows flagged
    # missing packets, or lost when that burst laps the new image ring before the writer reads it.
    # Both are zero pixels and counted. Before and after the outage every row is good, pixel for pixel.
    flagged = np.flatnonzero(status != 0)
    jumps = np.flatnonzero(steps > 1)
    assert len(jumps) <= 1, f"ids jump at rows {jumps}: only the outage is missing"
    outage = sorted({*flagged.tolist(), *(jumps + 1).tolist()})
    first, last = (outage[0], outage[-1]) if outage else (KILL_AT, KILL_AT - 1)
    assert outage == list(range(first, last + 1)), f"the outage is one stretch of rows, not {outage}"
    assert first >= KILL_AT  # nothing written before the kill is touched
    incomplete = flagged[status[flagged] == 1]
    assert np.all(np.isin(status[flagged], (1, layout.STATUS_LOST))) and np.all(missing[incomplete] > 0)
    good_after = int(np.count_nonzero(status[last + 1:] == 0))
    assert good_after > 0 and good_after == N_IMAGES - last - 1  # the restarted assembler's images
    with h5py.File(path, "r") as h5:
        for row in flagged[:: max(1, len(flagged) // 5)]:
            assert not np.any(h5[layout.DATA][row])  # zero-filled, never stale
    assert_pixels(daq.config, path, [0, first - 1, *range(last + 1, N_IMAGES, 25), N_IMAGES - 1])
    assert message["n_written"] == N_IMAGES and message["n_missing_images"] == counts["n_lost"]
    assert message["n_incomplete_images"] == counts["n_incomplete"] == len(incomplete)
    assert_balanced(rest, counts, N_IMAGES)
    report("kill -9 assembler", rows_written=counts["n_written"], rows_lost_in_outage=counts["n_lost"],
           rows_flagged_in_outage=len(incomplete),
           ids_skipped_by_outage=int(steps[jumps[0]]) - 1 if len(jumps) else 0,
           good_rows_from_restarted_assembler=good_after, final=rest["state"],
           seconds_from_kill_to_final=round(took, 1))


class SyncCaller:
    """A client waiting on ``write_sync`` (in a thread) while a process dies."""

    def __init__(self, daq: Daq, path: Path, n_images: int) -> None:
        self.answer: dict[str, Any] = {}
        body = {"output_file": str(path), "n_images": n_images, "timeout": 60}

        def call() -> None:
            answer = requests.post(f"{daq.url}/write_sync", json=body, timeout=300)
            self.answer.update(code=answer.status_code, body=answer.json(), at=time.monotonic())

        self.thread = threading.Thread(target=call, daemon=True)
        self.thread.start()

    def wait(self, since: float) -> dict[str, Any]:
        """The answer, which came within ``FAULT_BOUND`` of ``since``: HTTP 200 and a final state."""
        self.thread.join(max(1.0, since + FAULT_BOUND - time.monotonic()))
        assert not self.thread.is_alive() and self.answer["at"] - since <= FAULT_BOUND, self.answer
        assert self.answer["code"] == 200, self.answer
        return self.answer


def test_kill_9_of_the_receiver_mid_write_only_the_outage_is_missing(daq: Daq) -> None:
    """The restarted receiver re-creates its frame ring, the assembler follows it, and the write goes
    on to its ``n_images``: images of the outage never became images (one jump of the ids), a frame
    cut by the kill is flagged; before and after, every row is as sent."""
    rest, _, counts, ids, took, path = write_through_a_restart(daq, "receiver-0", "receiver.h5")
    steps = np.diff(ids)
    assert len(np.flatnonzero(steps > 1)) <= 1, "the ids jump once: the outage"
    with h5py.File(path, "r") as h5:
        status = h5[layout.STATUS][:]
    flagged = np.flatnonzero(status != 0)
    assert len(flagged) <= 2 and all(row >= KILL_AT for row in flagged), flagged  # the frames cut by the kill
    good = [row for row in (0, KILL_AT - 1, N_IMAGES - 1) if row not in flagged]
    assert_pixels(daq.config, path, good)
    assert_balanced(rest, counts, N_IMAGES)
    report("kill -9 receiver", rows_in_file=counts["n_written"], ids_skipped=int(np.sum(steps - 1)),
           rows_flagged=len(flagged), final=rest["state"], seconds_from_kill_to_final=round(took, 1))


def test_kill_9_of_the_rest_api_mid_write_the_request_goes_on(daq: Daq) -> None:
    """The write does not depend on the REST process: it completes while the API restarts, and the
    restarted API learns the request from its next status on the broker."""
    with Detector(daq.config), Broker(daq.config.detector_name) as broker:
        request_id, path = submit(daq, "rest.h5", N_IMAGES)
        wait_for(lambda: rows(path) >= KILL_AT, f"{KILL_AT} images written", 180)
        old = daq.services()["rest"]["pid"]
        kill_service(daq, "rest")
        wait_for(lambda: (s := daq.services()["rest"])["alive"] and s["pid"] != old and healthy(daq.url),
                 "the REST API restarted", 60)

        def known_and_final() -> dict[str, Any] | None:
            answer = requests.get(f"{daq.url}/requests/{request_id}", timeout=30)
            return answer.json() if answer.status_code == 200 and answer.json()["state"] in FINAL else None

        rest = wait_for(known_and_final, "the restarted API's final state of the request", 180)
        action, message = broker.final(request_id, timeout=60)
        next_write_works(daq)
    attrs, counts, ids = file_state(path)
    assert rest["state"] == "completed" and action is Action.SUCCESS, (rest, message)
    assert attrs["status"] == "completed" and counts["n_good"] == N_IMAGES and np.all(np.diff(ids) == 1)
    assert_balanced(rest, counts, N_IMAGES)


def test_kill_9_of_the_h5_writer_mid_write_ends_the_request_within_the_bound(daq: Daq) -> None:
    with Detector(daq.config), Broker(daq.config.detector_name) as broker:
        path = daq.output / "writer.h5"
        caller = SyncCaller(daq, path, N_IMAGES)
        wait_for(lambda: rows(path) >= KILL_AT, f"{KILL_AT} images written", 180)
        request_id = wait_for(lambda: broker.seen and broker.seen[0], "the request's status", 30)
        killed = kill_service(daq, "h5-writer")
        rest, (action, message), took = final_everywhere(daq, broker, request_id, killed)
        sync = caller.wait(killed)
        next_write_works(daq)
    assert sync["body"]["response"]["state"] == "failed", sync
    assert rest["state"] == "failed" and rest["message"].startswith(EndReason.WRITER_DIED.value), rest
    assert action is Action.FAIL and message.startswith(EndReason.WRITER_DIED.value)
    attrs, counts, ids = file_state(path)  # recovered by the restarted writer
    assert attrs["status"] == layout.FILE_INTERRUPTED
    assert attrs["end_reason"].startswith(EndReason.WRITER_DIED.value)
    assert counts["n_written"] >= KILL_AT and np.all(np.diff(ids) == 1)
    assert "recovered as interrupted" in rest["message"]
    assert_pixels(daq.config, path, [0, counts["n_written"] - 1])
    assert_balanced(rest, counts, N_IMAGES)
    report("kill -9 h5 writer", rows_in_file=counts["n_written"], rest_n_written=rest["n_written"],
           not_written=N_IMAGES - counts["n_written"], final=rest["state"],
           seconds_from_kill_to_final=round(took, 1), write_sync_answer=sync["code"],
           write_sync_seconds=round(sync["at"] - killed, 1))


def test_kill_9_of_the_writer_agent_mid_write_ends_the_request_within_the_bound(daq: Daq) -> None:
    with Detector(daq.config), Broker(daq.config.detector_name) as broker:
        path = daq.output / "agent.h5"
        caller = SyncCaller(daq, path, N_IMAGES)
        wait_for(lambda: rows(path) >= KILL_AT, f"{KILL_AT} images written", 180)
        request_id = wait_for(lambda: broker.seen and broker.seen[0], "the request's status", 30)
        killed = kill_service(daq, "writer-agent")
        rest, (action, message), took = final_everywhere(daq, broker, request_id, killed)
        sync = caller.wait(killed)
        next_write_works(daq)
    assert sync["body"]["response"]["state"] == "failed", sync
    assert rest["state"] == "failed" and rest["message"].startswith(EndReason.AGENT_DIED.value), rest
    assert action is Action.FAIL and message.startswith(EndReason.AGENT_DIED.value)
    attrs, counts, ids = file_state(path)  # closed by the h5 writer on the new agent's STOP
    assert attrs["status"] == layout.FILE_INTERRUPTED
    assert attrs["end_reason"].startswith(EndReason.AGENT_DIED.value)
    assert counts["n_written"] >= KILL_AT and np.all(np.diff(ids) == 1)
    assert_pixels(daq.config, path, [0, counts["n_written"] - 1])
    assert_balanced(rest, counts, N_IMAGES)
    report("kill -9 writer agent", rows_in_file=counts["n_written"], rest_n_written=rest["n_written"],
           not_written=N_IMAGES - counts["n_written"], final=rest["state"],
           seconds_from_kill_to_final=round(took, 1), write_sync_answer=sync["code"],
           write_sync_seconds=round(sync["at"] - killed, 1))


# -- the disk fills up ------------------------------------------------------------------------------


@contextlib.contextmanager
def small_tmpfs(size: str = "20m") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted for the test (needs root), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.fail("the disk-full tests mount a tmpfs: run them as root (CI does)")
    folder = Path(tempfile.mkdtemp(prefix="sdq-full-", dir="/tmp"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)
        folder.rmdir()


@pytest.fixture
def full_daq(ipc_env: str, tmp_path: Path) -> Iterator[Daq]:
    with small_tmpfs() as disk, running_daq(ipc_env, tmp_path, disk) as d:
        yield d


def leftovers(folder: Path, *keep: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


def test_disk_full_mid_write_keeps_every_flushed_image_in_an_openable_file(full_daq: Daq) -> None:
    daq = full_daq
    n_images = 100  # 100 MiB into 20 MiB
    with Detector(daq.config), Broker(daq.config.detector_name) as broker:
        request_id, path = submit(daq, "full.h5", n_images)
        warned = wait_for(lambda: daq.rest(request_id).get("warning"), "the free-space warning", 60)
        assert "MiB free" in warned and "no space left on device" in warned
        action, message = broker.final(request_id, timeout=180)
        rest, _, _ = final_everywhere(daq, broker, request_id, time.monotonic())
    attrs, counts, ids = file_state(path)
    assert attrs["status"] == layout.FILE_NO_SPACE == "failed: no space left on device"
    assert attrs["end_reason"].startswith(EndReason.NO_SPACE.value)
    assert 0 < counts["n_written"] < n_images and counts["n_good"] == counts["n_written"]
    assert np.all(np.diff(ids) == 1)
    assert_pixels(daq.config, path, list(range(counts["n_written"])))
    assert rest["state"] == "failed" and "no space left on device" in rest["message"], rest
    assert action is Action.FAIL and "no space left on device" in message
    assert_balanced(rest, counts, n_images)
    assert leftovers(daq.output) == ["full.h5"]  # no .creating, no reserve
    report("disk full mid-write", tmpfs="20 MiB", image_mib=daq.config.image_nbytes / 2**20,
           rows_kept=counts["n_written"], of=n_images, final=rest["state"], file_status=attrs["status"])


def test_disk_full_at_creation_leaves_nothing_half_made(full_daq: Daq) -> None:
    daq = full_daq
    filler = daq.output / "filler"
    with open(filler, "wb") as f:  # fill the disk
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()
    with Detector(daq.config), Broker(daq.config.detector_name) as broker:
        path = daq.output / "nothing.h5"
        answer = requests.post(f"{daq.url}/write_sync", json={"output_file": str(path), "n_images": 10,
                                                              "timeout": 60}, timeout=300)
        assert answer.status_code == 200, answer.text
        response = answer.json()["response"]
        assert response["state"] == "failed" and "no space left on device" in response["message"], response
        action, message = broker.final(answer.json()["request_id"], timeout=60)
        assert action is Action.FAIL and "no space left on device" in message
        assert leftovers(daq.output) == ["filler"]  # no 0-byte .creating, no reserve, no file
        filler.unlink()
        next_write_works(daq, n_images=5)  # the disk has room again
    report("disk full at creation", answer=response["message"][:120])

