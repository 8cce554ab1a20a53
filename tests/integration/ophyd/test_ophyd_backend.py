"""What the devices need from the backend's REST API, checked at the API itself: an open-ended write
*finished* (file completed) versus *killed* (file interrupted), and bad images counted while the file
is written."""

from __future__ import annotations

from pathlib import Path

import h5py

from daq_backend.messages import OPEN_ENDED
from daq_backend.testing import wait_for
from std_daq_ophyd.client import StdDaqClient
from std_daq_ophyd.sim import EmbeddedDaq


def acquire(client: StdDaqClient, daq: EmbeddedDaq, path: Path, n: int) -> str:
    """An open-ended write request with ``n`` images in it; returns its id."""
    request_id = client.write_async({"output_file": str(path), "n_images": OPEN_ENDED})
    wait_for(lambda: "request_progress" in client.request_status(request_id).services.values(),
             "the writer to follow the images")
    client.configure_detector(daq.detector_name, {"frames": n, "triggers": 1, "period": 0.02})
    client.detector_command(daq.detector_name, "START")
    wait_for(lambda: client.request_status(request_id).n_written >= n, f"{n} images written")
    return request_id


def test_finish_completes_an_open_ended_file(daq: EmbeddedDaq, data_dir: Path) -> None:
    client = StdDaqClient(daq.url)
    path = data_dir / "finished.h5"
    request_id = acquire(client, daq, path, 3)
    answer = client.stop_request(request_id, finish=True)
    assert (answer.state, answer.n_written, answer.n_images) == ("completed", 3, 3)
    with h5py.File(path, "r") as h5:
        attrs = h5.attrs
        assert (attrs["status"], int(attrs["n_written"]), int(attrs["n_images"])) == ("completed", 3, 3)
        assert attrs["end_reason"] == "finished on request after 3 images"


def test_kill_interrupts_an_open_ended_file(daq: EmbeddedDaq, data_dir: Path) -> None:
    client = StdDaqClient(daq.url)
    path = data_dir / "killed.h5"
    request_id = acquire(client, daq, path, 2)
    answer = client.stop_request(request_id)
    assert answer.state == "interrupted" and str(answer.message).startswith("Interrupted: killed after 2")
    with h5py.File(path, "r") as h5:
        assert (h5.attrs["status"], int(h5.attrs["n_written"])) == ("interrupted", 2)


def test_bad_images_are_counted_while_writing(daq: EmbeddedDaq, data_dir: Path) -> None:
    client = StdDaqClient(daq.url)
    victim = daq.control.next_image_id + 1
    daq.control.faults = {"drop_packets": [(victim, 0, 7)]}
    try:
        request_id = acquire(client, daq, data_dir / "bad.h5", 3)
    finally:
        daq.control.faults = {}
    running = wait_for(lambda: (s := client.request_status(request_id)).n_incomplete_images and s,
                       "the incomplete image to be reported")
    counts = (running.state, running.n_missing_images, running.n_incomplete_images)
    assert counts == ("running", 0, 1)
    final = client.stop_request(request_id, finish=True)
    assert (final.state, final.n_incomplete_images) == ("completed", 1)
