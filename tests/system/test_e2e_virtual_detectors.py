"""End to end with slsDetectorPackage's own virtual Jungfrau and Eiger: REST API -> slsdet -> virtual
detector -> UDP -> our readout -> image ring -> writer -> HDF5, checked against a raw packet capture.

The DAQ is the real ``RestService`` (``--detector-control sls --detector-host <virtual server>
--configure-udp``: the service itself points the detector's UDP stream at our readout's ports) with the
real writer on its embedded broker and our receivers + assembler in threads of this process. The test
talks to it only over HTTP: ``POST /detector/<name>`` (frames, period, exptime), ``GET`` it back,
``POST /write_async``, ``{"cmd": "START"}``, ``GET /requests/<id>``.

What is independent of the code under test: the reference data come from ``tests.capture`` (an
``AF_PACKET`` capture on ``lo`` that sees the datagrams as the kernel delivers them, before any UDP
socket, and imports nothing of ``daq_backend``) and are decoded here with plain numpy: the slsDetector
header offsets are copied from the packet format (framenum u64 @0, packetnum u32 @12, bunchid f64 @16,
row/column u16 @34/36, detector type @46, header version @47), payloads are concatenated in packet
number order, and the Eiger half-module is laid out from the header's own row/column fields (chip gaps
written out by hand below), not from ``daq_backend.detectors``. The capture must see every packet of
every frame exactly once with no kernel drop, so the comparison covers everything the detector sent.
"""

from __future__ import annotations

import contextlib
import json
import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import httpx
import numpy as np
import pytest

from daq_backend.broker import EmbeddedTransport
from daq_backend.config import DetectorConfig
from daq_backend.control.virtual import VirtualDetectorServer
from daq_backend.rest.server import RestOptions, RestService
from daq_backend.testing import InProcessReadout, make_config, wait_for
from daq_backend.writer import layout
from daq_backend.writer.agent import DetectorWriter
from daq_backend.writer.h5_writer import journal_path
from tests.system.capture import LoopbackUdpCapture

pytestmark = pytest.mark.sls

WAIT_S = 120.0  # generous: two shared cores
N_FRAMES = 15
PERIOD = 0.05  # slow enough for a Python capture and in-process readout to keep every packet
EXPTIME = 0.001
ACTIVE = ("RUNNING", "WAITING", "TRANSMITTING")

#: slsDetector packet header (48 bytes), only the fields this test reads, at their byte offsets.
HEADER = np.dtype({
    "names": ["framenum", "packetnum", "bunchid", "row", "column", "det_type", "version"],
    "formats": ["<u8", "<u4", "<f8", "<u2", "<u2", "u1", "u1"],
    "offsets": [0, 12, 16, 34, 36, 46, 47],
    "itemsize": 48,
})  # fmt: skip
SLS_DET_TYPE = {"eiger": 1, "jungfrau": 3}  # slsDetectorDefs::detectorType

EIGER_CHIP = 256  # pixels
EIGER_GAP = 2  # pixels between chips (also between the two ports' boxes)
EIGER_PORT_BOX = 2 * EIGER_CHIP + EIGER_GAP  # 514: what one port covers in the image
#: one virtual Eiger = one half-module sending on two ports, side by side (header column 0 and 1)
EIGER_SIDE_BY_SIDE = {"0": [0, 0, 513, 255], "1": [516, 0, 1029, 255]}


@dataclass(frozen=True)
class Wire:
    """What one UDP port carries per module frame."""

    packets: int
    payload: int
    shape: tuple[int, int]  # rows, columns of the module frame (16-bit pixels)


JUNGFRAU_WIRE = Wire(packets=128, payload=8192, shape=(512, 1024))
EIGER_WIRE = Wire(packets=64, payload=4096, shape=(256, 512))  # 16 bit, 10GbE, per port


@dataclass
class SentFrames:
    """One port's capture, decoded: module frames by frame number, and the header fields seen."""

    frames: dict[int, np.ndarray]
    rows: set[int]
    columns: set[int]
    bunch_ids: set[float]
    det_types: set[int]
    versions: set[int]


def decode_port(payloads: list[bytes], wire: Wire) -> SentFrames:
    """Group a port's datagrams by frame, check each frame is complete (every packet number once, exact
    sizes) and concatenate the payloads in packet order into a ``wire.shape`` uint16 array."""
    assert payloads, "nothing captured on this port"
    assert {len(p) for p in payloads} == {HEADER.itemsize + wire.payload}
    headers = np.frombuffer(b"".join(p[: HEADER.itemsize] for p in payloads), dtype=HEADER)
    by_frame: dict[int, dict[int, bytes]] = {}
    for header, datagram in zip(headers, payloads, strict=True):
        packets = by_frame.setdefault(int(header["framenum"]), {})
        packet = int(header["packetnum"])
        assert packet not in packets, f"frame {header['framenum']} packet {packet} captured twice"
        packets[packet] = datagram[HEADER.itemsize :]
    frames = {}
    for frame, packets in by_frame.items():
        assert sorted(packets) == list(range(wire.packets)), f"frame {frame}: incomplete capture"
        data = b"".join(packets[i] for i in range(wire.packets))
        frames[frame] = np.frombuffer(data, dtype="<u2").reshape(wire.shape)
    return SentFrames(
        frames,
        set(headers["row"].tolist()),
        set(headers["column"].tolist()),
        set(headers["bunchid"].tolist()),
        set(headers["det_type"].tolist()),
        set(headers["version"].tolist()),
    )


def eiger_half_module_image(ports: list[SentFrames], frame: int) -> np.ndarray:
    """The 256 x 1030 image of one Eiger half-module: each port's 256 x 512 block goes to the column
    slot its header names (column c starts at x = c * 516), its two chips separated by a 2-pixel gap;
    gap pixels are 0."""
    image = np.zeros((EIGER_CHIP, 2 * EIGER_PORT_BOX + EIGER_GAP), dtype=np.uint16)
    for port in ports:
        (column,) = port.columns
        x = column * (EIGER_PORT_BOX + EIGER_GAP)
        block = port.frames[frame]
        image[:, x : x + EIGER_CHIP] = block[:, :EIGER_CHIP]
        image[:, x + EIGER_CHIP + EIGER_GAP : x + EIGER_PORT_BOX] = block[:, EIGER_CHIP:]
    return image


# -- the DAQ under test --------------------------------------------------------------------------


@dataclass
class Daq:
    config: DetectorConfig
    http: httpx.Client
    data: Path


@contextlib.contextmanager
def daq_for(
    config: DetectorConfig, server: VirtualDetectorServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> Iterator[Daq]:
    """Readout (threads), the real ``RestService`` driving ``server`` through slsdet, and the writer."""
    config_path = tmp_path / "detector.json"
    config_path.write_text(json.dumps(config.to_json_dict()))
    data = tmp_path / "data"
    data.mkdir()
    hub = f"e2e-{uuid.uuid4().hex[:10]}"
    options = RestOptions(
        config_path=config_path, port=0, broker_url=f"embedded://{hub}", detector_control="sls",
        detector_hosts=[server.hostname], sls_shm_id=server.shm_id, configure_udp=True, output_roots=[data],
    )  # fmt: skip
    with contextlib.ExitStack() as stack:
        readout = stack.enter_context(InProcessReadout(config))
        assert readout.receivers  # listening on config.udp_port(m) before the detector is pointed there
        with caplog.at_level(logging.WARNING, logger="daq_backend.rest.server"):
            service = stack.enter_context(RestService(options))
        refused = [r.getMessage() for r in caplog.records if "could not point the detector" in r.getMessage()]
        assert refused == [], refused
        writer_transport = EmbeddedTransport(hub)
        stack.callback(writer_transport.close)
        stack.enter_context(DetectorWriter(config, writer_transport))
        stack.callback(journal_path(config.detector_name).unlink, missing_ok=True)
        http = stack.enter_context(httpx.Client(base_url=service.url, timeout=WAIT_S))
        yield Daq(config, http, data)


def wait_request(http: httpx.Client, request_id: str, *states: str) -> dict[str, Any]:
    answer: dict[str, Any] = {}

    def reached() -> bool:
        nonlocal answer
        answer = http.get(f"/requests/{request_id}").json()
        return answer.get("state") in states

    wait_for(reached, f"request {request_id} to reach {states} (last: {answer})", WAIT_S)
    return answer


def wait_writing(http: httpx.Client, request_id: str) -> None:
    """The writer takes images for the request ("the next n images") once it reported progress."""

    def ready() -> bool:
        answer = http.get(f"/requests/{request_id}").json()
        return "request_progress" in answer.get("services", {}).values() or answer.get("n_written", 0) > 0

    wait_for(ready, f"request {request_id} to take images", WAIT_S)


def acquire(
    daq: Daq,
    settings: dict[str, Any],
    start: tuple[str, dict[str, Any]],
    capture: LoopbackUdpCapture,
    expected_datagrams: dict[int, int],
) -> Path:
    """Configure, request a file, START, and wait for the file and for the capture; returns the file."""
    http, name = daq.http, daq.config.detector_name
    r = http.post(f"/detector/{name}", json={"config": settings})
    assert r.status_code == 200 and r.json() == {"response": "request_success"}, r.text
    back = http.get(f"/detector/{name}").json()
    assert back["frames"] == N_FRAMES
    assert back["period"] == pytest.approx(PERIOD) and back["exptime"] == pytest.approx(EXPTIME)
    for key in set(settings) - {"frames", "period", "exptime"}:
        assert back[key] == settings[key], (key, back)

    output = daq.data / "run.h5"
    r = http.post("/write_async", json={"n_images": N_FRAMES, "output_file": str(output)})
    assert r.status_code == 200, r.text
    request_id = r.json()["request_id"]
    wait_writing(http, request_id)
    path, body = start
    r = http.post(path, json=body)
    assert r.status_code == 200 and r.json() == {"response": "request_success"}, r.text

    done = wait_request(http, request_id, "completed", "failed", "interrupted")
    assert done["state"] == "completed", done
    assert done["n_written"] == N_FRAMES
    wait_for(lambda: http.post(f"/detector/{name}", json={"cmd": "STATUS"}).json()["status"] not in ACTIVE,
             "the detector to finish", WAIT_S)  # fmt: skip
    assert capture.wait_count(expected_datagrams, WAIT_S), (
        f"capture incomplete: { {p: capture.count(p) for p in expected_datagrams} } of {expected_datagrams}"
    )
    capture.close()
    assert capture.kernel_drops == 0
    assert len(capture.datagrams) == sum(expected_datagrams.values())  # nothing more than expected either
    return output


def read_file(path: Path, config: DetectorConfig) -> tuple[list[int], np.ndarray]:
    """(image ids, images) of a completed file whose every row is good."""
    with h5py.File(path, "r") as h5:
        assert h5.attrs["status"] == layout.FILE_COMPLETED
        assert h5.attrs["n_written"] == N_FRAMES
        ids = [int(i) for i in h5[layout.IMAGE_ID][:]]
        assert len(ids) == N_FRAMES
        assert (h5[layout.STATUS][:] == 0).all()
        assert (h5[layout.N_MISSING_PACKETS][:] == 0).all()
        images = h5[layout.DATA][:]
    assert images.shape == (N_FRAMES, *config.image_shape) and images.dtype == np.uint16
    return ids, images


def port_payloads(capture: LoopbackUdpCapture, port: int) -> list[bytes]:
    return [payload for dport, payload in capture.datagrams if dport == port]


# -- tests ---------------------------------------------------------------------------------------


def test_virtual_jungfrau_frames_reach_hdf5_as_sent(
    virtual_jungfrau: VirtualDetectorServer, ipc_env: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config("jungfrau", n_modules=1)
    port = config.udp_port(0)
    with daq_for(config, virtual_jungfrau, tmp_path, caplog) as daq, LoopbackUdpCapture([port]) as capture:
        output = acquire(
            daq, {"frames": N_FRAMES, "period": PERIOD, "exptime": EXPTIME},
            ("/detector", {"det_name": config.detector_name, "cmd": "START"}),
            capture, {port: N_FRAMES * JUNGFRAU_WIRE.packets},
        )  # fmt: skip

    sent = decode_port(port_payloads(capture, port), JUNGFRAU_WIRE)
    assert sent.det_types == {SLS_DET_TYPE["jungfrau"]} and sent.versions == {2}
    assert sent.bunch_ids == {0.0}  # no pulse id: image_id_source "auto" takes the frame number
    assert (sent.rows, sent.columns) == ({0}, {0})
    numbers = sorted(sent.frames)
    assert numbers == list(range(numbers[0], numbers[0] + N_FRAMES))
    assert all(len(np.unique(f)) > 1 for f in sent.frames.values())  # not a trivial (constant) image

    ids, images = read_file(output, config)
    assert ids == numbers
    for row, image_id in enumerate(ids):
        np.testing.assert_array_equal(images[row], sent.frames[image_id], err_msg=f"image {image_id}")


def test_virtual_eiger_frames_reach_hdf5_as_sent(
    virtual_eiger: VirtualDetectorServer, ipc_env: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # One virtual Eiger server is one half-module: two 10GbE ports, each 256 x 512 pixels (two chips),
    # side by side (its headers say row 0, column 0 and 1) -> two UDP "modules" of a 256 x 1030 image.
    width = 2 * EIGER_PORT_BOX + EIGER_GAP
    config = make_config(
        "eiger",
        n_modules=2,
        bit_depth=16,
        image_pixel_height=EIGER_CHIP,
        image_pixel_width=width,
        module_positions=EIGER_SIDE_BY_SIDE,
    )
    ports = [config.udp_port(0), config.udp_port(1)]
    assert ports[1] == ports[0] + 1  # slsdet sends a module's second port to start port + 1
    with daq_for(config, virtual_eiger, tmp_path, caplog) as daq, LoopbackUdpCapture(ports) as capture:
        output = acquire(
            daq, {"frames": N_FRAMES, "period": PERIOD, "exptime": EXPTIME, "dr": 16, "tengiga": True},
            (f"/detector/{config.detector_name}", {"cmd": "START"}),
            capture, {p: N_FRAMES * EIGER_WIRE.packets for p in ports},
        )  # fmt: skip

    sent = [decode_port(port_payloads(capture, p), EIGER_WIRE) for p in ports]
    for module, port in enumerate(sent):
        assert port.det_types == {SLS_DET_TYPE["eiger"]} and port.versions == {2}
        assert (port.rows, port.columns) == ({0}, {module})
        # Both ports send the same pixel values, so the pixels cannot tell a left/right swap: pin our
        # module_positions to the place the detector's headers give each port.
        x0, y0, x1, y1 = config.module_positions[module]
        assert (min(x0, x1), min(y0, y1)) == (module * (EIGER_PORT_BOX + EIGER_GAP), 0)
    numbers = sorted(sent[0].frames)
    assert sorted(sent[1].frames) == numbers
    assert numbers == list(range(numbers[0], numbers[0] + N_FRAMES))

    ids, images = read_file(output, config)
    assert ids == numbers
    for row, image_id in enumerate(ids):
        expected = eiger_half_module_image(sent, image_id)
        assert len(np.unique(expected)) > 2  # more than data and gap zeros
        np.testing.assert_array_equal(images[row], expected, err_msg=f"image {image_id}")
