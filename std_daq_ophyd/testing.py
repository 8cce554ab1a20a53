"""Helpers for testing Bluesky plans and devices against a real std-daq, shipped with the package (as
``ophyd_async.testing``): ``start_daq`` runs a DAQ of a simulated detector (embedded or RabbitMQ
broker) as threads of this process or as the processes ``std-daq up`` runs; ``make_detector`` points a
``StdDaqDetector`` at it; ``Recorder`` subscribes to a RunEngine and validates every document against
event-model's schema; ``check_run`` and ``assert_pattern`` check a finished scan's documents and
images. For ``StdDaqAsyncDetector``: ``make_async_detector``, the ``fly`` plan (prepare, kickoff,
collect while completing) and ``check_file`` (what Tiled read equals the file and the simulator's
pattern). The DAQ-independent helpers (``wait_for``, ``make_config``, ...) are in ``daq_backend.testing``.
"""

from __future__ import annotations

import uuid
from collections.abc import Generator
from pathlib import Path
from typing import Any, Protocol

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
import h5py
import numpy as np
from bluesky.utils import Msg
from event_model import DocumentNames, schema_validators
from ophyd_async.core import StaticPathProvider, TriggerInfo, UUIDFilenameProvider, init_devices

from daq_backend.config import DetectorConfig
from daq_backend.simulator.pattern import expected_image
from daq_backend.testing import RABBITMQ_URL
from std_daq_ophyd import StdDaqDetector, Timeouts
from std_daq_ophyd.async_devices import AsyncTimeouts, StdDaqAsyncDetector
from std_daq_ophyd.documents import uri_path
from std_daq_ophyd.readback import stream_data
from std_daq_ophyd.sim import EmbeddedDaq, LocalDaq, simulated_config

#: broker URL per transport name: the embedded hub (``None``) and the machine's RabbitMQ
TRANSPORTS = {"embedded": None, "rabbitmq": RABBITMQ_URL}
#: generous: two shared cores, other test suites running alongside
TIMEOUTS = Timeouts(acquisition=120.0, missing=20.0)

Docs = list[tuple[str, dict[str, Any]]]
Daq = EmbeddedDaq | LocalDaq
#: how a DAQ runs: ``threads`` of this process, or ``processes`` as ``std-daq up`` runs them
RUN_AS = ("threads", "processes")


def start_daq(broker_url: str | None = None, run_as: str = "threads", **config: Any) -> Daq:
    """A DAQ of a simulated detector; ``run_as="processes"``: the processes of ``std-daq up``."""
    if run_as == "processes":
        return LocalDaq(simulated_config(**config), broker_url=broker_url).start()
    return EmbeddedDaq(simulated_config(**config), broker_url=broker_url).start()


def make_detector(daq: Daq, data_dir: Path, frames: int = 2, period: float = 0.02,
                  **kwargs: Any) -> StdDaqDetector:
    """A ``StdDaqDetector`` of ``daq`` writing into ``data_dir``: ``frames`` images per trigger every
    ``period`` s, the generous ``TIMEOUTS`` unless given; other keywords go to the detector."""
    det = StdDaqDetector(name=kwargs.pop("name", "det"), url=daq.url, output_dir=str(data_dir),
                         timeouts=kwargs.pop("timeouts", TIMEOUTS), **kwargs)
    det.frames_per_trigger.put(frames)
    det.period.put(period)
    return det


class Recorder:
    """RunEngine subscriber: every document, each validated against event-model's schema on arrival."""

    def __init__(self) -> None:
        self.docs: Docs = []
        self.invalid: list[str] = []

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        """Record one document (invalid ones are recorded too, with the reason in ``invalid``)."""
        try:
            schema_validators[DocumentNames[name]].validate(doc)
        except Exception as exc:
            self.invalid.append(f"{name}: {exc}")
        self.docs.append((name, doc))

    def of(self, name: str) -> list[dict[str, Any]]:
        """The documents of kind ``name`` ("start", "event", ...), in order."""
        return [doc for n, doc in self.docs if n == name]

    def names(self) -> list[str]:
        """The kind of every document, in order."""
        return [n for n, _ in self.docs]


def file_rows(path: str) -> dict[str, np.ndarray]:
    """A detector file's images, image ids, per-image status and file status."""
    with h5py.File(path, "r") as h5:
        return {"data": h5["/entry/data/data"][:], "image_id": h5["/entry/data/image_id"][:],
                "status": h5["/entry/data/status"][:], "file_status": np.array(str(h5.attrs["status"]))}


def assert_pattern(daq: Daq, data: np.ndarray, image_ids: np.ndarray) -> None:
    """Every image equals what the simulator sent for its id."""
    assert len(data) == len(image_ids)
    for image, image_id in zip(data, image_ids, strict=True):
        np.testing.assert_array_equal(image, expected_image(daq.config, int(image_id)),
                                      err_msg=f"image {image_id}")


def unique(prefix: str) -> str:
    """``prefix`` and six random hex digits (a name no other test uses)."""
    return f"{prefix}{uuid.uuid4().hex[:6]}"


def check_run(recorder: Recorder, daq: Daq, n_events: int, frames: int) -> dict[str, np.ndarray]:
    """The document stream of a successful step scan of ``det``; returns the file's rows."""
    assert recorder.invalid == []
    start, = recorder.of("start")
    stop, = recorder.of("stop")
    assert stop["exit_status"] == "success", stop
    descriptor, = recorder.of("descriptor")
    h, w = daq.config.image_shape
    assert descriptor["data_keys"]["det_image"] == {
        "source": f"std-daq:{daq.url}/detector/{daq.detector_name}", "dtype": "array",
        "shape": [frames, h, w], "dtype_numpy": "<u2", "external": "STREAM:", "object_name": "det"}
    assert descriptor["data_keys"]["det_image_status"]["shape"] == [frames]
    config = descriptor["configuration"]["det"]["data"]
    assert {k: config[f"det_{k}"] for k in ("frames_per_trigger", "timing", "bit_depth")} == {
        "frames_per_trigger": frames, "timing": "AUTO_TIMING", "bit_depth": 16}
    resources = recorder.of("stream_resource")
    assert [r["data_key"] for r in resources] == ["det_image", "det_image_status"]
    path = uri_path(resources[0]["uri"])
    assert config["det_writer_file_name"] == path
    for r in resources:
        assert r["mimetype"] == "application/x-hdf5" and r["run_start"] == start["uid"]
        assert r["uri"] == f"file://localhost{path}"
    assert resources[0]["parameters"] == {"dataset": "/entry/data/data", "chunk_shape": [1, h, w]}
    events = recorder.of("event")
    assert [e["seq_num"] for e in events] == list(range(1, n_events + 1))
    for event in events:
        assert "det_image" not in event["data"] and "det_image" not in event["filled"]
        assert event["data"]["det_n_bad_images"] == 0
    datums = recorder.of("stream_datum")
    assert len(datums) == 2 * n_events
    for i, event in enumerate(events):
        pair = datums[2 * i: 2 * i + 2]
        assert {d["stream_resource"] for d in pair} == {r["uid"] for r in resources}
        for d in pair:
            assert d["indices"] == {"start": i, "stop": i + 1}
            assert d["seq_nums"] == {"start": event["seq_num"], "stop": event["seq_num"] + 1}
            assert d["descriptor"] == descriptor["uid"]
    # the documents alone locate the data: it is the file's content and the simulator's pattern
    images = stream_data(recorder.docs, "det_image")
    status = stream_data(recorder.docs, "det_image_status")
    assert images.shape == (n_events, frames, h, w) and status.shape == (n_events, frames)
    rows = file_rows(path)
    assert str(rows["file_status"]) == "completed"
    np.testing.assert_array_equal(images.reshape(rows["data"].shape), rows["data"])
    assert not status.any() and not rows["status"].any()
    ids = rows["image_id"]
    np.testing.assert_array_equal(ids, np.arange(ids[0], ids[0] + n_events * frames))
    assert_pattern(daq, rows["data"], ids)
    return rows


class DaqLike(Protocol):
    """What the ophyd-async helpers need of a DAQ: its REST URL and its detector's config."""

    @property
    def url(self) -> str:
        """The DAQ's REST URL."""
        ...

    @property
    def config(self) -> DetectorConfig:
        """The detector's config."""
        ...


#: generous bounds: other test suites share the machine
ASYNC_TIMEOUTS = AsyncTimeouts(open_file=120.0, idle=120.0, missing=30.0, disarm=60.0, close_file=120.0)
#: image period of the ophyd-async scans (50 Hz: quick, and easy on two shared cores)
PERIOD = 0.02
#: exposure time of the ophyd-async scans
EXPTIME = 0.001
#: how long an exposure may take on a loaded machine
EXPOSURE_TIMEOUT = 120.0


def make_async_detector(daq: DaqLike, data_dir: Path, name: str = "det") -> StdDaqAsyncDetector:
    """A ``StdDaqAsyncDetector`` of ``daq`` writing into ``data_dir`` with the generous
    ``ASYNC_TIMEOUTS``."""
    with init_devices():
        det = StdDaqAsyncDetector(daq.url, StaticPathProvider(UUIDFilenameProvider(), data_dir),
                                  timeouts=ASYNC_TIMEOUTS, name=name)
    return det


def check_file(daq: DaqLike, recorder: Recorder, images: np.ndarray, status: np.ndarray, n_rows: int) -> Path:
    """The arrays Tiled read equal the file, row for row, and the file is what the simulator sent."""
    assert recorder.invalid == []
    stop, = recorder.of("stop")
    assert stop["exit_status"] == "success", stop
    resources = recorder.of("stream_resource")
    assert {r["data_key"] for r in resources} == {"det", "det-status"}
    path = Path(uri_path(resources[0]["uri"]))
    with h5py.File(path, "r") as h5:
        assert h5.attrs["status"] == "completed"
        data, ids, file_status = (h5["/entry/data/data"][:], h5["/entry/data/image_id"][:],
                                  h5["/entry/data/status"][:])
    assert data.shape == (n_rows, *daq.config.image_shape)
    np.testing.assert_array_equal(images, data)
    np.testing.assert_array_equal(status, file_status)
    assert not file_status.any()
    np.testing.assert_array_equal(ids, np.arange(ids[0], ids[0] + n_rows))
    for image, image_id in zip(data, ids, strict=True):
        np.testing.assert_array_equal(image, expected_image(daq.config, int(image_id)), err_msg=str(image_id))
    return path


def fly(det: StdDaqAsyncDetector, info: TriggerInfo) -> Generator[Msg, Any, None]:
    """prepare / kickoff / collect while completing, as ophyd-async fly scans do."""

    @bpp.stage_decorator([det])
    @bpp.run_decorator()
    def inner() -> Generator[Msg, Any, None]:
        yield from bps.prepare(det, info, wait=True)
        yield from bps.declare_stream(det, name="primary", collect=True)
        yield from bps.kickoff(det, wait=True)
        yield from bps.collect_while_completing(flyers=[det], dets=[det], flush_period=0.5,
                                                stream_name="primary")

    return (yield from inner())
