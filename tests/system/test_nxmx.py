"""NeXus NXmx metadata in detector files, checked with nexusformat's NeXus validator (it ships the
NeXus definitions, so it runs offline): files of every detector type pass the base-class validation,
a request with an ``nxmx`` object gives a file that passes the NXmx application definition, also when
written by a real acquisition (``std-daq up`` processes + the built-in UDP simulator + REST)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import requests
from bluesky import RunEngine
from nexusformat.nexus.validate import validate_application, validate_file

from daq_backend import ipc
from daq_backend.config import DetectorConfig, parse_config
from daq_backend.simulator.pattern import expected_image
from daq_backend.supervisor import read_status
from daq_backend.testing import assert_no_leftovers, free_tcp_port, healthy, make_config, wait_for
from daq_backend.writer import layout, nexus
from daq_backend.writer.request import RequestError, parse_write_request
from std_daq_ophyd.documents import uri_path

CLI = (sys.executable, "-m", "daq_backend.cli")
NXMX = {"sample_name": "lysozyme", "instrument_name": "X06SA", "source_name": "Swiss Light Source",
        "incident_wavelength": 1.0, "detector_distance": 0.12, "beam_center_x": 500.5, "beam_center_y": 520.0}


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.levelname}: {record.getMessage().strip()}")


def validate(path: Path, application: bool) -> tuple[int, int, list[str]]:
    """(warnings, errors, their messages) of nexusformat's validator on ``path``: the NXmx
    application definition (read from /entry/definition) or, without, every group's base class."""
    logger = logging.getLogger("NXValidate")
    handler = _Collect()
    logger.addHandler(handler)
    try:
        result = validate_application(str(path)) if application else validate_file(str(path))
    finally:
        logger.removeHandler(handler)
    assert result is not None, f"the validator could not run: {handler.messages}"
    warnings, errors = result
    return warnings, errors, handler.messages


#: NXmx puts NXsource in NXentry, whose base class does not list it: the NeXus definitions disagree
#: with themselves, so a valid NXmx file has this one base-class error
NXMX_SOURCE_CONFLICT = "ERROR: NXsource is an invalid class in NXentry"


def base_class_errors(path: Path) -> list[str]:
    """The base-class validation's errors, less the one every NXmx file has."""
    warnings, errors, messages = validate(path, application=False)
    found = [m for m in messages if m.startswith("ERROR")]
    assert len(found) == errors, messages
    return [m for m in found if m != NXMX_SOURCE_CONFLICT]


def write_file(path: Path, config: DetectorConfig, metadata: dict[str, Any], n_images: int = 3) -> Path:
    with layout.ImageFile.create(path, config, n_images=n_images, metadata=metadata) as f:
        image = np.zeros(config.image_nbytes, np.uint8)
        for i in range(n_images):
            f.append(i + 1, 0, 0, f.encode(image))
    return path


def jungfrau(**fields: Any) -> DetectorConfig:
    base: dict[str, Any] = {"detector_name": "JF", "detector_type": "jungfrau", "n_modules": 2,
                            "bit_depth": 16, "image_pixel_height": 1024, "image_pixel_width": 1024,
                            "start_udp_port": 50000}
    return parse_config({**base, **fields})


def eiger(bit_depth: int = 16) -> DetectorConfig:
    return parse_config({"detector_name": "EG", "detector_type": "eiger", "n_modules": 2,
                         "bit_depth": bit_depth, "image_pixel_height": 512, "image_pixel_width": 514,
                         "start_udp_port": 50000,
                         "module_positions": {"0": [0, 255, 513, 0], "1": [0, 256, 513, 511]}})


def gigafrost(**fields: Any) -> DetectorConfig:
    return parse_config({"detector_name": "GF", "detector_type": "gigafrost", "n_modules": 8, "bit_depth": 16,
                         "image_pixel_height": 2016, "image_pixel_width": 2016, "start_udp_port": 50000,
                         **fields})


def resolve_chain(h5: h5py.File, path: str) -> list[str]:
    """Follow depends_on from the field at ``path`` to "."; every link must exist and be a translation."""
    chain = []
    target = path
    while target != ".":
        assert target in h5, f"depends_on points to {target}, which does not exist"
        chain.append(target)
        assert h5[target].attrs["transformation_type"] == "translation"
        target = h5[target].attrs["depends_on"]
        assert len(chain) < 10
    return chain


def test_jungfrau_file_carries_the_detector_fields_and_passes_base_classes(tmp_path: Path) -> None:
    path = write_file(tmp_path / "jf.h5", jungfrau(), {"exptime": 0.002, "period": 0.01})
    with h5py.File(path, "r") as h5:
        det = h5[layout.DETECTOR]
        assert (det["x_pixel_size"][()], det["y_pixel_size"][()]) == (75e-6, 75e-6)
        assert det["x_pixel_size"].attrs["units"] == det["sensor_thickness"].attrs["units"] == "m"
        assert (det["sensor_material"].asstr()[()], det["sensor_thickness"][()]) == ("Si", 320e-6)
        assert det["bit_depth_readout"][()] == 16 and "saturation_value" not in det
        assert (det["count_time"][()], det["frame_time"][()]) == (0.002, 0.01)
        assert det["count_time"].attrs["units"] == "s"
        assert "JUNGFRAU" in det["description"].asstr()[()]
        assert det["data"] == h5[layout.DATA] and det["data"].shape == (3, 1024, 1024)
        assert not det["pixel_mask"][:].any() and not det["pixel_mask_applied"][()]
        assert det["depends_on"].asstr()[()] == "." and "definition" not in h5[layout.ENTRY]
        for m in (0, 1):
            module = det[f"module_{m}"]
            assert module.attrs["NX_class"] == "NXdetector_module"
            assert list(module["data_origin"]) == [512 * m, 0] and list(module["data_size"]) == [512, 1024]
            assert resolve_chain(h5, f"{layout.DETECTOR}/module_{m}/fast_pixel_direction")[-1].endswith(
                "module_offset")
        # module 1's first pixel lies 0.5 px below the image centre (the default beam centre)
        offset = det["module_1/module_offset"]
        np.testing.assert_allclose(offset[()] * offset.attrs["vector"], [511.5 * 75e-6, -0.5 * 75e-6, 0])
        assert h5[layout.ENTRY]["start_time"].asstr()[()] == h5.attrs["start_time"]
        assert h5[layout.DATA_GROUP].attrs["signal"] == "data"
        assert list(h5[layout.DATA_GROUP].attrs["axes"]) == ["image_id", ".", "."]
    warnings, errors, messages = validate(path, application=False)
    assert errors == 0, messages


@pytest.mark.parametrize(("bit_depth", "saturation"), [(8, 255), (16, 4095), (32, None)])
def test_eiger_fields_mask_the_chip_gap(tmp_path: Path, bit_depth: int, saturation: int | None) -> None:
    path = write_file(tmp_path / "eg.h5", eiger(bit_depth), {})
    with h5py.File(path, "r") as h5:
        det = h5[layout.DETECTOR]
        assert det["bit_depth_readout"][()] == bit_depth
        assert (det["saturation_value"][()] if "saturation_value" in det else None) == saturation
        assert "count_time" not in det and "frame_time" not in det
        mask = det["pixel_mask"][:]
        assert mask.dtype == np.uint32 and mask.shape == (512, 514)
        assert np.array_equal(np.flatnonzero(mask.any(axis=0)), [256, 257])  # the 2-pixel chip gap
        assert (mask[:, 256:258] == nexus.MASK_GAP).all()
        assert list(det["module_0/data_origin"]) == [0, 0] and list(det["module_0/data_size"]) == [256, 514]
        assert list(det["module_1/data_origin"]) == [256, 0]
    assert validate(path, application=False)[1] == 0


def test_gigafrost_needs_its_optics_from_the_config(tmp_path: Path) -> None:
    """The pixel size at the sample and the scintillator depend on the optics: none by default."""
    path = write_file(tmp_path / "gf.h5", gigafrost(), {})
    with h5py.File(path, "r") as h5:
        det = h5[layout.DETECTOR]
        assert "x_pixel_size" not in det and "sensor_material" not in det and "module_0" not in det
        assert (det["bit_depth_readout"][()], det["saturation_value"][()]) == (12, 4095)
    assert validate(path, application=False)[1] == 0
    with pytest.raises(ValueError, match="NXmx needs pixel_size_um, sensor_material, sensor_thickness_um"):
        write_file(tmp_path / "gf_nxmx.h5", gigafrost(), {"nxmx": NXMX})
    assert not (tmp_path / "gf_nxmx.h5").exists()
    config = gigafrost(pixel_size_um=2.75, sensor_material="LuAG:Ce", sensor_thickness_um=20)
    path = write_file(tmp_path / "gf_optics.h5", config, {"nxmx": NXMX})
    with h5py.File(path, "r") as h5:
        det = h5[layout.DETECTOR]
        assert det["x_pixel_size"][()] == pytest.approx(2.75e-6)
        assert det["sensor_material"].asstr()[()] == "LuAG:Ce"
        assert list(det["module_0/data_size"]) == [2016, 2016]
    warnings, errors, messages = validate(path, application=True)
    assert errors == 0, messages


def test_nxmx_request_gives_an_nxmx_file(tmp_path: Path) -> None:
    path = write_file(tmp_path / "mx.h5", jungfrau(), {"exptime": 0.001, "period": 0.002, "nxmx": NXMX},
                      n_images=10)
    with h5py.File(path, "r") as h5:
        entry = h5[layout.ENTRY]
        assert entry["definition"].asstr()[()] == "NXmx"
        assert entry["sample/name"].asstr()[()] == "lysozyme"
        assert entry["source/name"].asstr()[()] == "Swiss Light Source"
        assert h5["/entry/instrument/name"].asstr()[()] == "X06SA"
        beam = h5["/entry/instrument/beam/incident_wavelength"]
        assert (beam[()], beam.attrs["units"]) == (1.0, "angstrom")
        det = h5[layout.DETECTOR]
        assert det["depends_on"].asstr()[()] == nexus.DETECTOR_TRANSLATION
        translation = h5[nexus.DETECTOR_TRANSLATION]
        assert (translation[()], list(translation.attrs["vector"])) == (0.12, [0, 0, 1])
        assert (det["beam_center_x"][()], det["beam_center_y"][()]) == (500.5, 520.0)
        chain = resolve_chain(h5, f"{layout.DETECTOR}/module_0/slow_pixel_direction")
        assert chain[-1] == nexus.DETECTOR_TRANSLATION
        offset = det["module_0/module_offset"]  # pixel (0, 0) relative to the given beam centre
        np.testing.assert_allclose(offset[()] * offset.attrs["vector"], [500.5 * 75e-6, 520 * 75e-6, 0])
        assert entry["end_time_estimated"].asstr()[()] > entry["start_time"].asstr()[()]
    warnings, errors, messages = validate(path, application=True)
    assert errors == 0, messages
    assert base_class_errors(path) == []


def test_validator_finds_a_broken_nxmx_file(tmp_path: Path) -> None:
    """The validator test can fail: without the sample's name the same file is invalid."""
    path = write_file(tmp_path / "mx.h5", jungfrau(), {"nxmx": NXMX})
    with h5py.File(path, "r+") as h5:
        del h5["/entry/sample/name"]
        del h5["/entry/instrument/detector/sensor_thickness"]
    warnings, errors, messages = validate(path, application=True)
    assert errors >= 2, messages
    assert any("/entry/sample/name" in m for m in messages), messages
    assert any("sensor_thickness" in m for m in messages), messages


def test_calibrated_jungfrau_mask_and_gaps(tmp_path: Path) -> None:
    """Gaps between chips are gap pixels (bit 0), the calibration's bad pixels bit 1 (and NaN: applied)."""
    mask = np.zeros((512, 1024), np.int32)
    mask[3, 4] = 1 << 3
    with h5py.File(tmp_path / "p.h5", "w") as f:
        f["gains"] = np.ones((4, 512, 1024), np.float32)
        f["pixel_mask"] = mask
    with h5py.File(tmp_path / "g.h5", "w") as f:
        f["gains"] = np.ones((4, 512, 1024), np.float32)
    config = jungfrau(n_modules=1, image_pixel_height=514, image_pixel_width=1030, gap_pixels=True,
                      gain_file=str(tmp_path / "g.h5"), pedestal_file=str(tmp_path / "p.h5"))
    path = write_file(tmp_path / "jf.h5", config, {"nxmx": NXMX})
    with h5py.File(path, "r") as h5:
        det = h5[layout.DETECTOR]
        pixel_mask = det["pixel_mask"][:]
        assert pixel_mask[3, 4] == nexus.MASK_BAD
        assert (pixel_mask[256:258] == nexus.MASK_GAP).all()
        assert (pixel_mask[:, [256, 257, 514, 515, 772, 773]] == nexus.MASK_GAP).all()
        assert np.count_nonzero(pixel_mask) == 514 * 1030 - 512 * 1024 + 1
        assert det["pixel_mask_applied"][()]
        assert h5[layout.DATA].attrs["units"] == "keV"
        assert list(det["module_0/data_size"]) == [514, 1030]
    assert validate(path, application=True)[1] == 0


@pytest.mark.parametrize(("metadata", "message"), [
    ({"nxmx": {**NXMX, "incident_wavelength": None}}, "metadata: nxmx.incident_wavelength: "),
    ({"nxmx": {k: v for k, v in NXMX.items() if k != "sample_name"}}, "metadata: nxmx.sample_name: missing"),
    ({"nxmx": {**NXMX, "wavelength": 1.0}}, "metadata: nxmx.wavelength: unknown field"),
    ({"nxmx": {**NXMX, "detector_distance": -1}}, "metadata: nxmx.detector_distance: "),
    ({"nxmx": "MX"}, "metadata: nxmx: expected an object"),
    ({"exptime": "1 ms"}, "metadata: exptime: must be a number of seconds > 0"),
    ({"period": -0.1}, "metadata: period: must be a number of seconds >= 0"),
])
def test_bad_nxmx_metadata_is_refused_naming_the_field(tmp_path: Path, metadata: dict[str, Any],
                                                       message: str) -> None:
    with pytest.raises(RequestError, match=message):
        parse_write_request({"output_file": str(tmp_path / "x.h5"), "n_images": 1, "metadata": metadata})


@pytest.fixture
def daq_up(ipc_env: str, tmp_path: Path) -> Iterator[tuple[str, DetectorConfig, dict[str, str]]]:
    """``std-daq up`` (receiver, assembler, h5 writer, writer agent, REST as separate processes) and the
    simulator."""
    config = make_config("jungfrau", frame_ring_slots=64, image_ring_slots=64)
    path = tmp_path / "detector.json"
    path.write_text(json.dumps(config.to_json_dict()))
    port = free_tcp_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, STD_DAQ_IPC_DIR=ipc_env)
    up = subprocess.Popen([*CLI, "up", str(path), "--rest-port", str(port), "--status-interval", "0.2"],
                          env=env)
    sender: subprocess.Popen[bytes] | None = None
    try:
        status_path = ipc.status_file(config.detector_name)

        def services_up() -> bool:
            if not os.path.exists(status_path):
                return False
            services = read_status(status_path)["services"]
            return len(services) == 5 and all(s["alive"] for s in services)

        wait_for(services_up, "receiver, assembler, h5 writer, writer agent and rest alive", 120)
        wait_for(lambda: healthy(url), "REST API healthy", 120)
        sender = subprocess.Popen([*CLI, "simulate", str(path), "--rate", "40", "--n-images", "1000000",
                                   "--no-progress"], env=env, stdout=subprocess.DEVNULL)
        yield url, config, env
    finally:
        if sender is not None:
            sender.kill()
            sender.wait(30)
        up.send_signal(signal.SIGINT)
        assert up.wait(60) == 0
    assert_no_leftovers(config, ipc_env)


def test_file_of_a_real_acquisition_passes_the_nxmx_validator(
        daq_up: tuple[str, DetectorConfig, dict[str, str]], tmp_path: Path) -> None:
    url, config, _ = daq_up
    output = tmp_path / "mx.h5"
    metadata = {"exptime": 0.001, "period": 0.025, "nxmx": NXMX}
    answer = requests.post(f"{url}/write_sync", json={"output_file": str(output), "n_images": 6,
                                                      "metadata": metadata}, timeout=180)
    assert answer.status_code == 200, answer.text
    assert answer.json()["response"]["state"] == "completed"
    with h5py.File(output, "r") as h5:
        assert h5.attrs["status"] == "completed" and h5.attrs["n_written"] == 6
        det = h5[layout.DETECTOR]
        assert (det["count_time"][()], det["frame_time"][()]) == (0.001, 0.025)
        ids = h5[layout.IMAGE_ID][:]
        for row, image_id in enumerate(ids):
            np.testing.assert_array_equal(det["data"][row], expected_image(config, int(image_id)))
    warnings, errors, messages = validate(output, application=True)
    assert errors == 0, messages
    assert base_class_errors(output) == []
    bad = {"output_file": str(tmp_path / "bad.h5"), "n_images": 1, "metadata": {"nxmx": {"sample_name": "x"}}}
    refused = requests.post(f"{url}/write_sync", json=bad, timeout=60)
    assert refused.status_code in (400, 422), refused.text
    assert "nxmx.instrument_name" in refused.text and not (tmp_path / "bad.h5").exists()


def test_v1_device_with_nxmx_metadata_writes_an_nxmx_file(tmp_path: Path) -> None:
    """``StdDaqDetector(nxmx=...)`` against the processes of ``std-daq up``: a ``bp.count`` gives an
    NXmx file that passes the validator, with every image as sent; without a required field, staging
    fails naming it."""
    import bluesky.plans as bp

    from std_daq_ophyd.testing import Recorder, check_run, make_detector, start_daq

    ipc_dir = tempfile.mkdtemp(prefix="sdx", dir="/tmp")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STD_DAQ_IPC_DIR", ipc_dir)
        daq = start_daq(run_as="processes")
        try:
            recorder = Recorder()
            engine = RunEngine({}, call_returns_result=False)
            engine.subscribe(recorder)
            det = make_detector(daq, tmp_path, frames=2, nxmx=NXMX)
            engine(bp.count([det], 2))
            check_run(recorder, daq, n_events=2, frames=2)
            path = uri_path(recorder.of("stream_resource")[0]["uri"])
            with h5py.File(path, "r") as h5:
                assert h5[layout.ENTRY]["definition"].asstr()[()] == "NXmx"
                assert h5[layout.ENTRY]["sample/name"].asstr()[()] == "lysozyme"
            warnings, errors, messages = validate(path, application=True)
            assert errors == 0, messages

            bad = make_detector(daq, tmp_path, frames=1, name="bad", nxmx={"sample_name": "x"})
            with pytest.raises(Exception, match="nxmx.instrument_name"):
                bad.stage()
        finally:
            daq.stop()
            shutil.rmtree(ipc_dir, ignore_errors=True)
