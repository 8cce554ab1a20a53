"""Write requests over the embedded broker: the request flow, start_id, kill, timeout, back-to-back
requests and every bad input (each a clear request_fail; the service keeps serving)."""

from __future__ import annotations

import json
import threading
import uuid
from pathlib import Path
from typing import Any

import h5py
import hdf5plugin
import numpy as np
import pytest
import zmq

from daq_backend import ipc
from daq_backend.broker import REQUEST_EXCHANGE, Action, Message
from daq_backend.testing import wait_for
from daq_backend.testing.writer import Harness, expected_pixels
from daq_backend.writer import layout
from daq_backend.writer.agent import WriterAgent
from daq_backend.writer.layout import ImageFile, open_image_file


def check_file(
    h: Harness, path: Path, n: int, status: str = "completed", consecutive: bool = True
) -> list[int]:
    """Pixel-exact check of every row against the producer; returns the image ids."""
    with h5py.File(path, "r") as h5:
        assert h5.attrs["status"] == status
        assert h5.attrs["n_written"] == n == h5[layout.N_WRITTEN][()]
        ids = [int(i) for i in h5[layout.IMAGE_ID]]
        assert len(ids) == n and h5[layout.DATA].shape[0] == n
        if consecutive and ids:
            assert ids == list(range(ids[0], ids[0] + n))
        for i, image_id in enumerate(ids):
            np.testing.assert_array_equal(h5[layout.DATA][i], expected_pixels(h.config, image_id))
            status_code, missing = h.assembler.status_of(image_id)
            assert (h5[layout.STATUS][i], h5[layout.N_MISSING_PACKETS][i]) == (status_code, missing)
        return ids


def test_a_request_writes_the_next_images_with_progress(harness: Harness) -> None:
    h = harness
    h.start_writer()
    h.assembler.start(rate_hz=100)
    path = h.tmp_path / "run.h5"
    rid = h.request(output_file=str(path), n_images=60, metadata={"sample": "Si", "scan": 3})
    action, result = h.final(rid)
    assert action is Action.SUCCESS, result
    assert result["output_file"] == str(path) and result["status"] == "completed"
    assert (result["n_written"], result["n_images"], result["n_missing_images"]) == (60, 60, 0)
    assert result["n_incomplete_images"] == sum(1 for s in check_file(h, path, 60) if s % 10 == 0)
    assert result["init_timestamp"] <= result["end_timestamp"]
    progress = h.progress(rid)
    assert progress[-1] == {"n_written": 60, "n_images": 60, "output_file": str(path), "n_missing_images": 0,
                            "n_incomplete_images": result["n_incomplete_images"]}
    written = [p["n_written"] for p in progress]
    assert written == sorted(written) and len(progress) >= 2
    actions = [s.action for s in h.statuses if s.request_id == rid]
    assert actions[0] is Action.START and actions[-1] is Action.SUCCESS
    with h5py.File(path, "r") as h5:
        assert (h5["entry"].attrs["sample"], h5["entry"].attrs["scan"]) == ("Si", 3)
        assert h5["entry/instrument/detector"].attrs["detector_name"] == h.config.detector_name


def test_bitshuffle_lz4_round_trip(harness: Harness) -> None:
    h = harness
    h.start_writer()
    h.assembler.start(rate_hz=100)
    path = h.tmp_path / "lz4.h5"
    action, result = h.final(h.request(output_file=str(path), n_images=20, compression="bitshuffle-lz4"))
    assert action is Action.SUCCESS, result
    check_file(h, path, 20)
    with h5py.File(path, "r") as h5:
        data = h5[layout.DATA]
        assert data.id.get_create_plist().get_filter(0)[0] == hdf5plugin.BSHUF_ID
        assert data.id.get_storage_size() < 20 * h.config.image_nbytes / 2


def test_start_id_takes_images_from_the_ring_then_live(harness: Harness) -> None:
    h = harness
    h.start_writer()
    for image_id in range(1, 41):  # before the request: only the ring has them
        h.assembler.emit(image_id)
    h.assembler.next_id = 41
    path = h.tmp_path / "from-ring.h5"
    rid = h.request(output_file=str(path), n_images=50, start_id=11)
    wait_for(path.exists, "the file")  # the ring images are on their way: now new ones may come
    h.assembler.start(rate_hz=50)
    action, result = h.final(rid)
    assert action is Action.SUCCESS, result
    assert check_file(h, path, 50) == list(range(11, 61))


def test_start_id_in_the_future_waits_for_that_image(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = harness
    h.start_writer()
    h.assembler.start(rate_hz=100)
    wait_for(lambda: h.assembler.next_id > 5, "the producer")
    start = h.assembler.next_id + 30
    create = ImageFile.create

    def slow_create(*args: Any, **kwargs: Any) -> ImageFile:
        # images arrive while the agent waits for the file to exist: none may be lost
        until = max(start, h.assembler.next_id) + 3
        wait_for(lambda: h.assembler.next_id > until, "images during the file creation")
        return create(*args, **kwargs)

    monkeypatch.setattr(ImageFile, "create", slow_create)
    path = h.tmp_path / "future.h5"
    action, result = h.final(h.request(output_file=str(path), n_images=10, start_id=start))
    assert action is Action.SUCCESS, result
    assert check_file(h, path, 10) == list(range(start, start + 10))


def test_start_id_already_overwritten_fails_before_creating_a_file(harness: Harness) -> None:
    h = harness
    h.start_writer()
    for image_id in range(1, 3 * h.config.image_ring_slots):
        h.assembler.emit(image_id)
    path = h.tmp_path / "gone.h5"
    action, message = h.final(h.request(output_file=str(path), n_images=5, start_id=2))
    assert action is Action.FAIL
    assert message.startswith("start_id: image 2 is no longer in the image ring (it holds ids 128..191)")
    assert not path.exists()


def test_kill_mid_run_closes_a_valid_file_and_reports_interrupted(harness: Harness) -> None:
    h = harness
    h.start_writer()
    h.assembler.start(rate_hz=100)
    path = h.tmp_path / "killed.h5"
    rid = h.request(output_file=str(path), n_images=100_000)
    wait_for(lambda: any(p["n_written"] >= 10 for p in h.progress(rid)), "10 images written")
    h.client.kill(rid)
    action, message = h.final(rid)
    assert action is Action.FAIL
    assert message.startswith("Interrupted: killed after ")
    n = int(message.split("killed after ")[1].split(" of ")[0])
    assert n >= 10 and message.endswith(f"of 100000 images; file {path} is valid")
    check_file(h, path, n, status="interrupted")
    with h5py.File(path, "r") as h5:
        assert h5.attrs["end_reason"] == "killed by request"
    assert h.progress(rid)[-1]["n_written"] == n


def test_a_request_while_one_runs_is_refused_busy_never_queued(harness: Harness) -> None:
    """One file at a time: a second request is refused at once, naming the running one (it never waits
    in the queue to run later); once the first has ended the next request runs."""
    h = harness
    h.start_writer()
    h.assembler.start(rate_hz=200)
    first, second = h.tmp_path / "first.h5", h.tmp_path / "second.h5"
    rid1 = h.request(output_file=str(first), n_images=100)
    rid2 = h.request(output_file=str(second), n_images=30, compression="bitshuffle-lz4")
    action2, message2 = h.final(rid2)
    assert action2 is Action.FAIL
    assert message2.startswith(f"busy: writer_agent is running request {rid1} (writing {first}); "
                               "this request was not queued"), message2
    assert [a for a, _ in h.wait(rid2)["services"]["writer_agent"]] == [Action.FAIL]  # never started
    action1, result1 = h.final(rid1)
    assert action1 is Action.SUCCESS and result1["output_file"] == str(first), result1
    assert not second.exists()
    rid3 = h.request(output_file=str(second), n_images=30, compression="bitshuffle-lz4")
    action3, result3 = h.final(rid3)
    assert action3 is Action.SUCCESS and result3["output_file"] == str(second), result3
    ids1, ids3 = check_file(h, first, 100), check_file(h, second, 30)
    assert ids3[0] > ids1[-1]


def test_timeout_ends_a_request_without_images(harness: Harness) -> None:
    h = harness
    h.start_writer()
    path = h.tmp_path / "idle.h5"
    h.assembler.produce(1)  # nobody asked for it yet
    action, message = h.final(h.request(output_file=str(path), n_images=10, timeout=0.5))
    assert action is Action.FAIL
    assert message == f"Interrupted: no image arrived for 0.5 s after 0 of 10 images; file {path} is valid"
    with h5py.File(path, "r") as h5:
        assert (h5.attrs["status"], h5.attrs["n_written"]) == ("interrupted", 0)
        assert h5.attrs["end_reason"] == "no image arrived for 0.5 s after 0 of 10"


def test_bad_inputs_fail_clearly_and_the_service_keeps_serving(harness: Harness) -> None:
    h = harness
    h.start_writer(output_roots=[h.tmp_path])
    h.assembler.start(rate_hz=200)
    good = h.tmp_path / "good.h5"
    action, result = h.final(h.request(output_file=str(good), n_images=10))
    assert action is Action.SUCCESS, result
    afile = h.tmp_path / "afile"
    afile.write_text("x")
    x = str(h.tmp_path / "x.h5")
    bad_requests: list[tuple[dict[str, object], str]] = [
        ({"n_images": 3}, "invalid write request: output_file: missing (required)"),
        ({"output_file": x}, "n_images: missing (required)"),
        ({"output_file": x, "n_images": "3"}, "n_images: Input should be a valid integer"),
        ({"output_file": x, "n_images": 0}, "n_images: Input should be greater than or equal to 1"),
        ({"output_file": x, "n_images": -2}, "n_images: Input should be greater than or equal to 1"),
        ({"output_file": x, "n_images": 3, "metadata": "x"}, "metadata: Input should be a valid dictionary"),
        ({"output_file": x, "n_images": 2**64},
         "n_images: Input should be less than or equal to 1000000000000"),
        ({"output_file": str(h.tmp_path / ("n" * 300 + ".h5")), "n_images": 3},
         "name may have at most 255 bytes"),
        ({"output_file": str(afile), "n_images": 3, "overwrite": True},
         f"cannot replace {afile}: overwrite replaces only an HDF5 file this DAQ wrote, and it is not an "
         "HDF5 file"),
        ({"output_file": str(h.tmp_path / "nope" / "x.h5"), "n_images": 3}, "does not exist"),
        ({"output_file": str(afile / "x.h5"), "n_images": 3}, "is not a folder"),
        ({"output_file": str(good), "n_images": 3},
         f"file {good} already exists (set overwrite: true to replace it)"),
        ({"output_file": "/tmp/outside.h5", "n_images": 3},
         f"/tmp/outside.h5 is outside the folders this DAQ writes to ({h.tmp_path}); "),
        ({"output_file": "../outside.h5", "n_images": 3}, "is outside the folders this DAQ writes to"),
    ]
    for body, text in bad_requests:
        action, message = h.final(h.request(**body))
        assert action is Action.FAIL and text in message, (body, message)
    # Malformed JSON straight on the request exchange.
    rid = str(uuid.uuid4())
    h.transport.publish(Message(REQUEST_EXCHANGE, h.tag, b"{not json", rid), mandatory=True)
    action, message = h.final(rid)
    assert action is Action.FAIL and "not valid JSON" in message
    rid = str(uuid.uuid4())
    deep = b"[" * 100_000 + b"]" * 100_000
    h.transport.publish(Message(REQUEST_EXCHANGE, h.tag, deep, rid), mandatory=True)
    action, message = h.final(rid)
    assert action is Action.FAIL and "nested too deeply" in message
    # A kill for an id nobody knows.
    unknown = str(uuid.uuid4())
    h.client.kill(unknown)
    action, message = h.final(unknown)
    assert action is Action.FAIL and message == f"Unknown request id {unknown}: nothing to kill"
    # Nothing already written was lost, and the service still serves.
    check_file(h, good, 10)
    after = h.tmp_path / "after.h5"
    action, result = h.final(h.request(output_file=str(after), n_images=5))
    assert action is Action.SUCCESS, result
    check_file(h, after, 5)
    # a relative name goes into the first output root
    action, result = h.final(h.request(output_file="rel.h5", n_images=2))
    assert action is Action.SUCCESS and result["output_file"] == str(h.tmp_path / "rel.h5"), result
    assert afile.read_text() == "x"
    assert sorted(p.name for p in h.tmp_path.iterdir()) == ["afile", "after.h5", "good.h5", "rel.h5"]


def test_unwritable_folder_over_the_broker(harness: Harness) -> None:
    h = harness
    h.start_writer(output_roots=[Path("/sys/kernel")])  # a root the kernel refuses files in, even to root
    action, message = h.final(h.request(output_file="/sys/kernel/x.h5", n_images=1))
    assert action is Action.FAIL
    assert message == ("invalid write request: output_file: folder /sys/kernel is not writable "
                       "(Permission denied)")
    action, message = h.final(h.request(output_file=str(h.tmp_path / "x.h5"), n_images=1))
    assert action is Action.FAIL  # outside its only root
    assert message == (f"invalid write request: output_file: {h.tmp_path}/x.h5 is outside the folders this "
                       "DAQ writes to (/sys/kernel); write inside one of them (a relative name goes into "
                       "/sys/kernel), or start the DAQ with --output-root FOLDER (repeatable) to allow "
                       "another folder")


def test_without_an_h5_writer_the_request_fails_clearly(harness: Harness) -> None:
    h = harness
    agent = WriterAgent(h.config, h.transport, tag=h.tag, writer_timeout=0.5).start()
    try:
        action, message = h.final(h.request(output_file=str(h.tmp_path / "a.h5"), n_images=1))
    finally:
        agent.stop()
    assert action is Action.FAIL
    assert message.startswith(f"the h5 writer of {h.config.detector_name} is not running")
    assert not (h.tmp_path / "a.h5").exists()


def test_a_stopped_service_closes_the_running_file(harness: Harness) -> None:
    h = harness
    writer = h.start_writer()
    h.assembler.start(rate_hz=100)
    path = h.tmp_path / "stopped.h5"
    rid = h.request(output_file=str(path), n_images=100_000)
    wait_for(lambda: any(p["n_written"] >= 3 for p in h.progress(rid)), "3 images written")
    writer.stop()
    h.writer = None
    action, message = h.final(rid)
    # nobody killed the request: it ends as shut down, in the answer and in the file
    assert action is Action.FAIL
    assert message.startswith("Interrupted: shutdown: the writer agent was stopped after")
    with open_image_file(path) as h5:
        assert h5.attrs["status"] == "interrupted" and h5.attrs["n_written"] >= 3
        assert h5.attrs["end_reason"].startswith("shutdown: ")


def test_a_writer_that_never_answers_fails_the_request(harness: Harness) -> None:
    """Heartbeats but no answer to START (a lost message): the request fails instead of hanging."""
    h = harness
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    pub.bind(ipc.writer_status_address(h.config.detector_name))
    pull = ctx.socket(zmq.PULL)
    pull.connect(ipc.writer_agent_address(h.config.detector_name))
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(0.1):
            pub.send(json.dumps({"event": "alive"}).encode())

    beating = threading.Thread(target=heartbeat)
    beating.start()
    agent = WriterAgent(h.config, h.transport, tag=h.tag, writer_timeout=1.0).start()
    try:
        action, message = h.final(h.request(output_file=str(h.tmp_path / "a.h5"), n_images=1))
        assert pull.poll(0)  # the START did reach the (mute) writer
    finally:
        agent.stop()
        stop.set()
        beating.join()
        pub.close()
        pull.close()
        ipc.unlink_ipc(ipc.writer_status_address(h.config.detector_name))
    assert action is Action.FAIL
    assert message == (f"the h5 writer did not answer about {h.tmp_path / 'a.h5'} for 1 s "
                       "(waiting for started or finished)")
