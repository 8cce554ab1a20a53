"""``StdDaqAsyncDetector`` against the DAQ as ``std-daq up`` runs it (separate processes: receiver,
assembler, writer, REST API with the built-in UDP simulator as the detector): ``bp.count``, step
scans and fly scans yield documents that pass event-model's schema validation, and Tiled reads the
images back through those documents, pixel for pixel what the simulator sent. The same for the
ophyd v1 ``StdDaqDetector`` on the same DAQ. Checked with ophyd-async's testing helpers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import uuid
from collections import defaultdict
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.plans as bp
import bluesky.preprocessors as bpp
import h5py
import pytest
import tiled.catalog
import tiled.client
import tiled.server.app
from bluesky import RunEngine
from bluesky.callbacks.tiled_writer import TiledWriter
from bluesky.run_engine import call_in_bluesky_event_loop
from bluesky.utils import Msg
from ophyd.sim import SynAxis
from ophyd_async.core import (
    DetectorTrigger,
    TriggerInfo,
    init_devices,
    observe_value,
)
from ophyd_async.sim import SimMotor
from ophyd_async.testing import StatusWatcher, assert_configuration, assert_emitted, assert_value

from daq_backend import ipc
from daq_backend.config import DetectorConfig
from daq_backend.ram_buffer import SHM_DIR
from daq_backend.supervisor import read_status
from daq_backend.testing import free_tcp_port, healthy, make_config, pid_alive, wait_for
from std_daq_ophyd import StdDaqClient
from std_daq_ophyd.async_devices import (
    DEADTIME_S,
    AcquisitionStepError,
)
from std_daq_ophyd.documents import uri_path
from std_daq_ophyd.testing import (
    EXPOSURE_TIMEOUT,
    EXPTIME,
    PERIOD,
    TIMEOUTS,
    Recorder,
    check_file,
    check_run,
    fly,
    make_async_detector,
    make_detector,
)

CLI = (sys.executable, "-m", "daq_backend.cli")
@dataclass
class UpDaq:
    """A DAQ started by ``std-daq up``: what the v1 test helpers need (url, detector_name, config)."""

    url: str
    config: DetectorConfig
    process: subprocess.Popen[bytes]

    @property
    def detector_name(self) -> str:
        return self.config.detector_name


@pytest.fixture(scope="module")
def up_daq() -> Iterator[UpDaq]:
    """``std-daq up`` of a one-module Jungfrau with the simulator as detector, on the embedded broker,
    in its own ipc directory and shared-memory prefix; stopped with Ctrl-C at the end."""
    ipc_dir = tempfile.mkdtemp(prefix="eoa", dir="/tmp")
    prefix = f"eoa{uuid.uuid4().hex[:6]}-"
    config = make_config("jungfrau", frame_ring_slots=64, image_ring_slots=64)
    config_path = Path(ipc_dir) / "detector.json"
    config_path.write_text(json.dumps(config.to_json_dict()))
    port = free_tcp_port()
    env = {k: v for k, v in os.environ.items() if k not in ("BROKER_URL", "BROKER_HOST")}
    env.update(STD_DAQ_IPC_DIR=ipc_dir, STD_DAQ_SHM_PREFIX=prefix)
    process = subprocess.Popen([*CLI, "up", str(config_path), "--rest-port", str(port),
                                "--status-interval", "0.2"], env=env)
    url = f"http://127.0.0.1:{port}"
    pids: list[int] = []
    try:
        status_path = os.path.join(ipc_dir, os.path.basename(ipc.status_file(config.detector_name)))

        def services_up() -> list[int] | None:
            assert process.poll() is None, "std-daq up ended"
            if not os.path.exists(status_path):
                return None
            services = read_status(status_path)["services"]
            names = {"receiver-0", "assembler", "h5-writer", "writer-agent", "rest"}
            if {s["name"] for s in services} >= names and all(s["alive"] for s in services):
                return [s["pid"] for s in services]
            return None

        pids = wait_for(services_up, "the processes of std-daq up", 180)
        wait_for(lambda: healthy(url), "the REST API of std-daq up", 180)
        yield UpDaq(url, config, process)
    finally:
        process.send_signal(signal.SIGINT)
        code = process.wait(120)
        assert code == 0, f"std-daq up exited with {code}"
        assert not any(pid_alive(p) for p in pids)
        assert sorted(p.name for p in SHM_DIR.glob(f"{prefix}*")) == []
        leftovers = [p.name for p in Path(ipc_dir).iterdir() if config.detector_name in p.name]
        assert leftovers == []
        for p in Path(ipc_dir).iterdir():
            p.unlink()
        os.rmdir(ipc_dir)



@pytest.fixture
def tiled_client(tmp_path: Path, data_dir: Path) -> Iterator[Any]:
    catalog = tiled.catalog.in_memory(
        writable_storage={"filesystem": str(tmp_path / "tiled"), "sql": f"duckdb:///{tmp_path}/catalog.db"},
        readable_storage=[str(data_dir)],
    )
    with tiled.client.Context.from_app(tiled.server.app.build_app(catalog)) as context:
        yield tiled.client.from_context(context)


def emitted(recorder: Recorder) -> dict[str, list[dict[str, Any]]]:
    """Documents by name in order of first appearance (what ``assert_emitted`` takes)."""
    docs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for name, doc in recorder.docs:
        docs[name].append(doc)
    return docs


def test_count_yields_valid_documents_and_tiled_reads_exact_images(up_daq: UpDaq, data_dir: Path,
                                                                     RE: RunEngine, recorder: Recorder,
                                                                     tiled_client: Any) -> None:
    det = make_async_detector(up_daq, data_dir)
    RE.subscribe(TiledWriter(tiled_client))
    RE(bp.count([det], 3))
    docs = emitted(recorder)
    assert_emitted(docs, start=1, descriptor=1, stream_resource=2, stream_datum=6, event=3, stop=1)
    descriptor, = docs["descriptor"]
    h, w = up_daq.config.image_shape
    image_key, status_key = descriptor["data_keys"]["det"], descriptor["data_keys"]["det-status"]
    assert (image_key["shape"], image_key["dtype_numpy"]) == ([1, h, w], "<u2")
    assert image_key["external"] == status_key["external"] == "STREAM:"
    assert (status_key["shape"], status_key["dtype_numpy"]) == ([1], "|u1")
    resource = next(r for r in docs["stream_resource"] if r["data_key"] == "det")
    assert resource["parameters"] == {"dataset": "/entry/data/data", "chunk_shape": (1, h, w)}
    indices = [d["indices"] for d in docs["stream_datum"]]
    assert indices[::2] == indices[1::2] == [{"start": i, "stop": i + 1} for i in range(3)]
    config = descriptor["configuration"]["det"]["data"]
    assert config["det-driver-detector_type"] == "jungfrau"
    assert config["det-driver-timing_mode"] == "AUTO_TIMING"
    primary = tiled_client[docs["start"][0]["uid"]]["primary"]
    check_file(up_daq, recorder, primary["det"].read(), primary["det-status"].read(), 3)


def test_step_scan_with_several_images_per_point(up_daq: UpDaq, data_dir: Path, RE: RunEngine,
                                                  recorder: Recorder, tiled_client: Any) -> None:
    """A step scan prepared for 3 images per point: each event references 3 rows of one file."""
    det = make_async_detector(up_daq, data_dir)
    with init_devices():
        motor = SimMotor(instant=True)
    info = TriggerInfo(collections_per_event=3, livetime=EXPTIME, deadtime=PERIOD - EXPTIME,
                       exposure_timeout=EXPOSURE_TIMEOUT)

    @bpp.stage_decorator([det, motor])
    @bpp.run_decorator()
    def plan() -> Generator[Msg, Any, None]:
        yield from bps.prepare(det, info, wait=True)
        for position in (0.0, 0.5, 1.0, 1.5):
            yield from bps.mv(motor, position)
            yield from bps.trigger_and_read([det, motor])

    RE.subscribe(TiledWriter(tiled_client))
    RE(plan())
    docs = emitted(recorder)
    assert_emitted(docs, start=1, descriptor=1, stream_resource=2, stream_datum=8, event=4, stop=1)
    assert [e["data"]["motor"] for e in docs["event"]] == [0.0, 0.5, 1.0, 1.5]
    assert docs["descriptor"][0]["data_keys"]["det"]["shape"][0] == 3
    settings = StdDaqClient(up_daq.url).detector_settings(up_daq.detector_name)
    assert (settings.frames, settings.triggers, settings.exptime) == (3, 1, EXPTIME)
    assert settings.period == pytest.approx(PERIOD)
    primary = tiled_client[docs["start"][0]["uid"]]["primary"]
    check_file(up_daq, recorder, primary["det"].read(), primary["det-status"].read(), 12)


def test_bp_scan_keeps_the_detectors_settings(up_daq: UpDaq, data_dir: Path, RE: RunEngine,
                                              recorder: Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    """With OPHYD_ASYNC_PRESERVE_DETECTOR_STATE=YES a plain ``bp.scan`` takes the detector's settings
    as they are (here 2 images per point) through the trigger logic's ``default_trigger_info``."""
    monkeypatch.setenv("OPHYD_ASYNC_PRESERVE_DETECTOR_STATE", "YES")
    client = StdDaqClient(up_daq.url)
    client.configure_detector(up_daq.detector_name, {"timing": "AUTO_TIMING", "frames": 2, "triggers": 1,
                                                     "exptime": EXPTIME, "period": PERIOD})
    det = make_async_detector(up_daq, data_dir)
    RE(bp.scan([det], SynAxis(name="motor"), -1, 1, 3))
    docs = emitted(recorder)
    assert_emitted(docs, start=1, descriptor=1, stream_resource=2, stream_datum=6, event=3, stop=1)
    assert docs["descriptor"][0]["data_keys"]["det"]["shape"][0] == 2
    assert client.detector_settings(up_daq.detector_name).period == pytest.approx(PERIOD)
    with h5py.File(uri_path(docs["stream_resource"][0]["uri"]), "r") as h5:
        assert h5["/entry/data/data"].shape[0] == 6


def test_fly_scan_collects_every_image(up_daq: UpDaq, data_dir: Path, RE: RunEngine, recorder: Recorder,
                                       tiled_client: Any) -> None:
    det = make_async_detector(up_daq, data_dir)
    info = TriggerInfo(number_of_events=6, collections_per_event=2, livetime=EXPTIME,
                       deadtime=PERIOD - EXPTIME, exposure_timeout=EXPOSURE_TIMEOUT)
    RE.subscribe(TiledWriter(tiled_client))
    RE(fly(det, info))
    docs = emitted(recorder)
    n_datums = len(docs["stream_datum"])
    assert n_datums >= 2 and n_datums % 2 == 0
    assert_emitted(docs, start=1, descriptor=1, stream_resource=2, stream_datum=n_datums, stop=1)
    indices = sorted((d["indices"]["start"], d["indices"]["stop"]) for d in docs["stream_datum"])
    covered = {i for start, stop in indices for i in range(start, stop)}
    assert covered == set(range(6))
    assert docs["descriptor"][0]["data_keys"]["det"]["shape"] == [2, *up_daq.config.image_shape]
    assert docs["stop"][0]["num_events"] == {"primary": 6}
    primary = tiled_client[docs["start"][0]["uid"]]["primary"]
    check_file(up_daq, recorder, primary["det"].read(), primary["det-status"].read(), 12)


def test_external_edge_triggers_arm_at_prepare(up_daq: UpDaq, data_dir: Path, RE: RunEngine,
                                               recorder: Recorder) -> None:
    """EXTERNAL_EDGE is TRIGGER_EXPOSURE with one frame per trigger, armed at ``prepare``; the
    simulator times its triggers itself, at the detector's period."""
    det = make_async_detector(up_daq, data_dir)
    client = StdDaqClient(up_daq.url)
    client.configure_detector(up_daq.detector_name, {"period": PERIOD})
    info = TriggerInfo(trigger=DetectorTrigger.EXTERNAL_EDGE, number_of_events=4, livetime=EXPTIME,
                       exposure_timeout=EXPOSURE_TIMEOUT)
    RE(fly(det, info))
    assert recorder.invalid == []
    settings = client.detector_settings(up_daq.detector_name)
    assert (str(settings.timing).removeprefix("timingMode."), settings.frames, settings.triggers) == (
        "TRIGGER_EXPOSURE", 1, 4)
    call_in_bluesky_event_loop(assert_value(det.driver.timing_mode, "TRIGGER_EXPOSURE"))
    assert recorder.of("stop")[0]["num_events"] == {"primary": 4}
    with h5py.File(uri_path(recorder.of("stream_resource")[0]["uri"]), "r") as h5:
        assert h5.attrs["status"] == "completed" and h5["/entry/data/data"].shape[0] == 4


def test_device_api_with_ophyd_async_helpers(up_daq: UpDaq, data_dir: Path, RE: RunEngine) -> None:
    """stage / prepare / trigger driven directly: watcher updates up to the target, signals and
    configuration as the DAQ reports them, the deadtime of a Jungfrau, unstage finishing the file."""
    det = make_async_detector(up_daq, data_dir)

    async def run() -> tuple[list[Any], dict[str, Any]]:
        triggers, deadtime = await det.get_trigger_deadtime()
        assert triggers == {DetectorTrigger.INTERNAL, DetectorTrigger.EXTERNAL_EDGE,
                            DetectorTrigger.EXTERNAL_LEVEL}
        assert deadtime == DEADTIME_S["jungfrau"] == 20e-6
        await det.stage()
        await det.prepare(TriggerInfo(collections_per_event=4, livetime=EXPTIME, deadtime=PERIOD - EXPTIME,
                                      exposure_timeout=EXPOSURE_TIMEOUT))
        await assert_configuration(det, {
            "det-driver-detector_type": {"value": "jungfrau"},
            "det-driver-detector_name": {"value": up_daq.detector_name},
            "det-driver-bit_depth": {"value": 16},
            "det-driver-exposure_time": {"value": EXPTIME},
            "det-driver-acquire_period": {"value": PERIOD},
            "det-driver-timing_mode": {"value": "AUTO_TIMING"},
        })
        status = det.trigger()
        watcher = StatusWatcher(status)
        await status
        await assert_value(det.writer.images_written, 4)
        await assert_value(det.writer.request_state, "running")
        assert await det.get_index() == 1
        docs = [doc async for doc in det.collect_asset_docs()]
        path = await det.writer.file_path.get_value()
        await det.unstage()
        await assert_value(det.writer.request_state, "completed")
        return [c.kwargs for c in watcher.mock.call_args_list], {"docs": docs, "path": path}

    updates, out = call_in_bluesky_event_loop(run())
    assert updates[-1]["current"] == updates[-1]["target"] == 4
    assert updates[-1]["initial"] == 0 and updates[-1]["name"] == "det"
    assert [name for name, _ in out["docs"]] == ["stream_resource", "stream_resource", "stream_datum",
                                                 "stream_datum"]
    with h5py.File(out["path"], "r") as h5:
        assert h5.attrs["status"] == "completed" and h5["/entry/data/data"].shape[0] == 4


def test_a_timing_mode_the_detector_type_lacks_is_refused_at_prepare(up_daq: UpDaq, data_dir: Path,
                                                                     RE: RunEngine) -> None:
    det = make_async_detector(up_daq, data_dir)

    async def run() -> None:
        await det.stage()
        try:
            await det.prepare(TriggerInfo(trigger=DetectorTrigger.EXTERNAL_LEVEL, number_of_events=2))
        finally:
            await det.unstage()

    with pytest.raises(AcquisitionStepError, match="configure: .*GATED not supported by jungfrau") as info:
        call_in_bluesky_event_loop(run())
    assert info.value.step == "configure"


def test_a_killed_write_request_fails_the_trigger_at_once(up_daq: UpDaq, data_dir: Path, RE: RunEngine,
                                                           recorder: Recorder) -> None:
    """The writer's file ends while the trigger waits (here: killed over REST): the trigger fails with
    the writer's reason, naming the step, long before its exposure timeout of 600 s."""
    det = make_async_detector(up_daq, data_dir)
    client = StdDaqClient(up_daq.url)

    async def run() -> str:
        await det.stage()
        try:
            await det.prepare(TriggerInfo(collections_per_event=400, livetime=EXPTIME,
                                          deadtime=0.05 - EXPTIME, exposure_timeout=600.0))
            status = det.trigger()
            request_id = await det.writer.request_id.get_value()
            async for count in observe_value(det.writer.images_written, timeout=EXPOSURE_TIMEOUT):
                if count >= 3:
                    break
            await asyncio.to_thread(client.stop_request, request_id)
            ended = r"collect: the writer ended .*\(interrupted\) after \d+ images: Interrupted: killed"
            with pytest.raises(AcquisitionStepError, match=ended) as info:
                await status
            assert info.value.step == "collect"
            return request_id
        finally:
            await det.unstage()

    request_id = call_in_bluesky_event_loop(run())
    final = client.request_status(request_id)
    assert final.state == "interrupted"
    assert client.detector_status(up_daq.detector_name) == "IDLE"
    with h5py.File(str(final.output_file), "r") as h5:
        assert h5.attrs["status"] == "interrupted" and 3 <= h5["/entry/data/data"].shape[0] < 400
    RE(bp.count([det], 2))  # the next run on the same device does not see the old failure
    assert recorder.invalid == [] and recorder.of("stop")[0]["exit_status"] == "success"


def test_the_v1_device_on_the_same_daq(up_daq: UpDaq, tmp_path: Path, RE: RunEngine,
                                       recorder: Recorder) -> None:
    """The ophyd v1 ``StdDaqDetector`` (unchanged behaviour) against the same ``std-daq up``."""
    data = tmp_path / "v1"
    data.mkdir()
    det = make_detector(up_daq, data, frames=2, period=PERIOD, timeouts=TIMEOUTS)  # type: ignore[arg-type]
    RE(bp.count([det], 3))
    check_run(recorder, up_daq, n_events=3, frames=2)  # type: ignore[arg-type]
