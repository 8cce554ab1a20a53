"""Packet layouts, header encode/parse, assembly geometry and Jungfrau conversion (reference §2, §4)."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from daq_backend.config import ConfigError, DetectorConfig, load_config, parse_config
from daq_backend.detectors import (
    EigerLayout,
    GfGeometry,
    GigaFrostLayout,
    JungfrauLayout,
    layout_for,
    pack_12bit,
    unpack_12bit,
)
from daq_backend.detectors.jungfrau import convert
from daq_backend.formats import GF_HEADER_DTYPE, SLS_HEADER_DTYPE
from daq_backend.simulator.pattern import expected_image, module_datagrams, module_frame_bytes

CONFIGS = sorted((Path(__file__).resolve().parents[3] / "configs").glob("*.json"))
IDS = (1, 2, 999, 2**32 - 1)


def cfg(**fields: Any) -> DetectorConfig:
    base: dict[str, Any] = {"detector_name": "T", "start_udp_port": 50000, "bit_depth": 16}
    return parse_config({**base, **fields})


def jf(n_modules: int = 1, **fields: Any) -> DetectorConfig:
    return cfg(
        detector_type="jungfrau",
        n_modules=n_modules,
        image_pixel_height=512 * n_modules,
        image_pixel_width=1024,
        **fields,
    )


def gf(height: int, width: int) -> DetectorConfig:
    return cfg(detector_type="gigafrost", n_modules=8, image_pixel_height=height, image_pixel_width=width)


EIGER_HALVES = {"0": [0, 0, 513, 255], "1": [0, 513, 513, 258]}


def eiger(bit_depth: int) -> DetectorConfig:
    return cfg(
        detector_type="eiger",
        n_modules=2,
        bit_depth=bit_depth,
        image_pixel_height=514,
        image_pixel_width=514,
        module_positions=EIGER_HALVES,
    )


# -- headers ---------------------------------------------------------------------------------------


def test_example_configs_exist_and_use_distinct_ports() -> None:
    names = {p.name for p in CONFIGS}
    assert {
        "jungfrau_1m.json",
        "jungfrau_4m.json",
        "eiger_500k_16.json",
        "eiger_500k_32.json",
        "eiger_0_5m.json",
        "gigafrost_2016.json",
        "gigafrost_128x480.json",
    } <= names
    used: set[int] = set()
    for path in CONFIGS:
        c = load_config(path)
        ports = set(range(c.start_udp_port, c.start_udp_port + c.n_modules))
        assert ports.isdisjoint(used), path.name
        assert 50000 <= min(ports) and max(ports) <= 60000
        used |= ports


def test_sls_header_roundtrip_jungfrau() -> None:
    layout = layout_for(jf(image_id_source="pulse_id"))
    headers = layout.encode_headers(0, frame_number=123456789012, pulse_id=987654321, daq_rec=0xABCD)
    assert headers.dtype == SLS_HEADER_DTYPE and len(headers) == 128
    raw = headers[17].tobytes()
    assert len(raw) == 48
    # field offsets of reference §2.1, read independently of the numpy dtype
    framenum, packetnum, bunchid = struct.unpack_from("<Q4xId", raw)
    module_id, debug = struct.unpack_from("<H", raw, 32)[0], struct.unpack_from("<I", raw, 40)[0]
    assert (framenum, packetnum, bunchid, module_id, debug) == (123456789012, 17, 987654321.0, 0, 0xABCD)
    assert raw[46] == 3 and raw[47] == 2  # detectortype JUNGFRAU, headerVersion 2
    datagram = raw + bytes(8192)
    info = layout.parse(datagram)
    assert info is not None
    assert (info.frame_number, info.packet_index, info.pulse_id, info.daq_rec) == (
        123456789012,
        17,
        987654321,
        0xABCD,
    )
    assert layout.image_id(info) == 987654321


def test_sls_header_roundtrip_eiger() -> None:
    layout = layout_for(load_config(next(p for p in CONFIGS if p.name == "eiger_0_5m.json")))
    headers = layout.encode_headers(3, frame_number=42)
    raw = headers[63].tobytes()
    assert struct.unpack_from("<QII", raw) == (42, 0, 63)
    assert raw[46] == 1 and raw[47] == 2  # detector_type 1 (EIGER), header_version 2
    info = layout.parse(raw + bytes(4096))
    assert info is not None
    assert (info.frame_number, info.packet_index, info.row, info.column) == (42, 63, 1, 1)
    assert layout.image_id(info) == 42
    assert [layout.grid_position(m) for m in range(4)] == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_gigafrost_header_bits() -> None:
    layout = layout_for(gf(2016, 2016))
    headers = layout.encode_headers(
        5, frame_number=77, scan_id=9, do_not_store=True, image_timing=(3 << 40) | 5
    )
    assert headers.dtype == GF_HEADER_DTYPE
    raw = headers[2].tobytes()
    assert len(raw) == 32
    assert raw[0] == 0xCB
    assert raw[1] == 1008 // 12  # quadrant row length in 12-pixel blocks
    # quadrant rows 1008 = 0x3F0: low 8 bits 0xF0, SWAP bit set for the western quadrant NW
    assert raw[2] == 0xF1
    # NW=2 in bits 7-6, link 1 in bit 5, corr_mode 5 in bits 4-2, quadrant-row bits 9-8 = 3
    assert raw[3] == (2 << 6) | (1 << 5) | (5 << 2) | 3
    assert struct.unpack_from("<IIHH", raw, 4) == (9, 77, 0x8000, 2 * 4)
    info = layout.parse(raw + bytes(6048))
    assert info is not None
    assert (info.frame_number, info.packet_index, info.scan_id, info.do_not_store) == (77, 2, 9, True)
    assert (info.quadrant, info.link, info.image_timing) == (2, 1, (3 << 40) | 5)
    assert layout.image_id(info) == 77
    east = layout.encode_headers(2, frame_number=1)[0].tobytes()
    assert east[2] == 0xF0 and east[3] >> 6 == 1 and (east[3] >> 5) & 1 == 0  # SE: no SWAP bit, link 0


def test_jungfrau_image_id_sources() -> None:
    for source, with_pulse, without_pulse in (("auto", 500, 7), ("pulse_id", 500, 0), ("frame_index", 7, 7)):
        layout = layout_for(jf(image_id_source=source))
        for pulse, expected in ((500, with_pulse), (0, without_pulse)):
            info = layout.parse(layout.encode_headers(0, 7, pulse)[0].tobytes() + bytes(8192))
            assert info is not None and layout.image_id(info) == expected, (source, pulse)


@pytest.mark.parametrize("config", [jf(), eiger(32), gf(2016, 2016)], ids=["jf", "eiger", "gf"])
def test_parse_rejects_invalid_datagrams(config: DetectorConfig) -> None:
    layout = layout_for(config)
    good = module_datagrams(config, 0, 5)
    assert all(layout.parse(d) is not None for d in good)
    assert layout.parse(good[0][:-1]) is None
    assert layout.parse(good[0] + b"\0") is None
    assert layout.parse(b"") is None
    assert layout.parse(b"\xa5" * 17) is None
    bad = bytearray(good[0])
    if config.detector_type.value == "gigafrost":
        bad[0] = 0xCA  # protocol id
        assert layout.parse(bytes(bad)) is None
        bad = bytearray(good[0])
        bad[14:16] = (3).to_bytes(2, "little")  # starting row not a packet boundary
        assert layout.parse(bytes(bad)) is None
        bad[14:16] = (504).to_bytes(2, "little")  # beyond the module
        assert layout.parse(bytes(bad)) is None
    else:
        bad[12:16] = layout.packets_per_frame.to_bytes(4, "little")
        assert layout.parse(bytes(bad)) is None
    with pytest.raises(IndexError):
        layout.packet_slice(layout.packets_per_frame)
    with pytest.raises(IndexError):
        layout.datagram_size(-1)


def test_jungfrau_parse_rejects_nan_bunchid() -> None:
    layout = layout_for(jf())
    raw = bytearray(module_datagrams(jf(), 0, 3)[0])
    raw[16:24] = struct.pack("<d", float("nan"))
    assert layout.parse(bytes(raw)) is None
    raw[16:24] = struct.pack("<d", -1.0)
    assert layout.parse(bytes(raw)) is None


def test_packet_sizes() -> None:
    j = layout_for(jf())
    assert (j.header_size, j.max_datagram, j.packets_per_frame, j.frame_nbytes) == (48, 8240, 128, 1048576)
    assert j.packet_slice(127) == (127 * 8192, 8192) and j.datagram_size(5) == 8240
    for bit_depth, packets in ((8, 32), (16, 64), (32, 128)):
        e = layout_for(eiger(bit_depth))
        assert (e.max_datagram, e.packets_per_frame, e.frame_nbytes) == (
            4144,
            packets,
            256 * 512 * bit_depth // 8,
        )
    g = layout_for(gf(2016, 2016))
    assert (g.header_size, g.max_datagram) == (32, 32 + 6048)


# -- GigaFRoST geometry ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "height,width,module,rows,packet_bytes,packets,last_bytes,frame_bytes",
    [
        (2016, 2016, (1008, 504), 4, 6048, 126, 6048, 762_048),
        (280, 528, (264, 70), 18, 7128, 4, 6336, 27_720),
        (128, 480, (240, 32), 20, 7200, 2, 4320, 11_520),
    ],
)
def test_gigafrost_worked_values(
    height: int,
    width: int,
    module: tuple[int, int],
    rows: int,
    packet_bytes: int,
    packets: int,
    last_bytes: int,
    frame_bytes: int,
) -> None:
    g = GfGeometry.for_image(height, width)
    assert (g.module_width, g.module_height) == module
    assert (g.rows_per_packet, g.packet_bytes, g.packets_per_frame) == (rows, packet_bytes, packets)
    assert (g.last_packet_bytes, g.frame_bytes) == (last_bytes, frame_bytes)
    layout = layout_for(gf(height, width))
    assert layout.packets_per_frame == packets and layout.frame_nbytes == frame_bytes
    assert layout.datagram_size(0) == 32 + packet_bytes
    assert layout.datagram_size(packets - 1) == 32 + last_bytes
    assert layout.packet_slice(packets - 1) == ((packets - 1) * packet_bytes, last_bytes)


def test_gigafrost_padding_for_odd_rows() -> None:
    # 840 wide: module rows of 420 px (not a multiple of 48), 9 rows per packet; 92 high: 9, 9, 5 rows
    config = gf(92, 840)
    layout = layout_for(config)
    g = layout.geometry
    assert (g.rows_per_packet, g.packets_per_frame, g.last_packet_rows) == (9, 3, 5)
    assert layout.datagram_size(0) == 32 + 420 * 9 * 3 // 2 + 36
    assert layout.datagram_size(2) == 32 + 420 * 5 * 3 // 2 + 36
    assert layout.packet_slice(1) == (5670, 5670)
    assert not layout_for(gf(88, 840)).geometry.padding(4)  # even last packet: no padding
    datagrams = module_datagrams(config, 3, 11)
    assert [len(d) for d in datagrams] == [layout.datagram_size(i) for i in range(3)]
    assert all(d[-36:] == bytes(36) for d in datagrams)
    _assert_assembles_via_datagrams(config, 11)


def test_unpack_12bit_example_and_roundtrip() -> None:
    assert unpack_12bit(bytes([0x01, 0x22, 0x20])).tolist() == [513, 514]
    assert pack_12bit(np.array([513, 514])).tobytes() == bytes([0x01, 0x22, 0x20])
    values = np.random.default_rng(1).integers(0, 4096, 1000, dtype=np.uint16)
    values[:4] = [0, 4095, 4095, 0]
    assert np.array_equal(unpack_12bit(pack_12bit(values)), values)
    with pytest.raises(ValueError, match="0..4095"):
        pack_12bit(np.array([4096, 1]))
    with pytest.raises(ValueError, match="multiple of 3"):
        unpack_12bit(b"\0\0")


def test_gigafrost_quadrant_placement() -> None:
    h, w = 128, 480
    config = gf(h, w)
    layout = layout_for(config)
    image = np.zeros((h, w), np.uint16)
    for m in range(8):
        # module rows numbered 1..32 + 100*m, constant along the row
        rows = np.repeat(np.arange(1, 33, dtype=np.uint16) + 100 * m, 240)
        layout.assemble(m, pack_12bit(rows), image)
    # SW (0,1) from row 64 downwards, SE (2,3) likewise on the right, NW (4,5) / NE (6,7) upwards from 63;
    # the odd link takes the row farther from the centre
    assert image[64, 0] == 1 and image[65, 0] == 101 and image[66, 0] == 2 and image[127, 239] == 132
    assert image[64, 240] == 201 and image[65, 479] == 301
    assert image[63, 0] == 401 and image[62, 0] == 501 and image[61, 0] == 402 and image[0, 0] == 532
    assert image[63, 240] == 601 and image[62, 479] == 701 and image[0, 479] == 732
    assert layout.uncovered_pixels.size == 0
    assert np.all(image > 0)


def test_gigafrost_rejects_8_bit() -> None:
    with pytest.raises(ConfigError, match="bit_depth"):
        layout_for(
            cfg(
                detector_type="gigafrost",
                n_modules=8,
                bit_depth=8,
                image_pixel_height=128,
                image_pixel_width=480,
            )
        )


# -- Eiger geometry --------------------------------------------------------------------------------


@pytest.mark.parametrize("bit_depth", [8, 16, 32])
def test_eiger_half_modules_gap_and_flip(bit_depth: int) -> None:
    config = eiger(bit_depth)
    layout = layout_for(config)
    assert isinstance(layout, EigerLayout)
    dtype = np.dtype(config.image_dtype)
    top = (np.arange(256 * 512, dtype=np.uint64) % 250 + 1).astype(dtype).reshape(256, 512)
    bottom = top + 3
    if bit_depth == 32:
        top = top * np.uint32(70000)  # use the high half of the word too
        bottom = bottom * np.uint32(70000)
    image = np.full((514, 514), 9, dtype)
    layout.zero_uncovered(image)
    layout.assemble(0, top.reshape(-1).view(np.uint8), image)
    layout.assemble(1, bottom.reshape(-1).view(np.uint8), image)
    # top half: rows 0..255, chip 0 at x 0..255, gap at 256..257, chip 1 at 258..513
    assert np.array_equal(image[0:256, 0:256], top[:, :256])
    assert np.array_equal(image[0:256, 258:514], top[:, 256:])
    # bottom half stored flipped: module row 0 at image row 513, row 255 at row 258
    assert np.array_equal(image[513:257:-1, 0:256], bottom[:, :256])
    assert np.array_equal(image[513:257:-1, 258:514], bottom[:, 256:])
    assert image[513, 0] == bottom[0, 0] and image[258, 513] == bottom[255, 511]
    assert not image[:, 256:258].any() and not image[256:258, :].any()


def test_eiger_0_5m_module_boxes() -> None:
    config = load_config(next(p for p in CONFIGS if p.name == "eiger_0_5m.json"))
    layout = layout_for(config)
    image = np.zeros(config.image_shape, np.uint16)
    for m in range(4):
        layout.assemble(m, np.full(layout.frame_nbytes // 2, m + 1, np.uint16).view(np.uint8), image)
    assert image[0, 0] == 1 and image[0, 516] == 2 and image[513, 0] == 3 and image[258, 1029] == 4
    assert not image[:, 514:516].any() and not image[256:258].any()
    layout.zero_module(3, image)
    assert not image[258:514, 516:1030].any() and image[258, 0] == 3


# -- Jungfrau geometry and conversion --------------------------------------------------------------


def test_jungfrau_4m_positions_and_flip() -> None:
    config = load_config(next(p for p in CONFIGS if p.name == "jungfrau_4m.json"))
    layout = layout_for(config)
    assert isinstance(layout, JungfrauLayout)
    image = np.zeros(config.image_shape, np.uint16)
    frame = np.arange(512 * 1024, dtype=np.uint16) % 16000
    layout.assemble(3, frame.view(np.uint8), image)
    assert np.array_equal(image[512:, 1024:], frame.reshape(512, 1024))
    assert not image[:512].any() and not image[:, :1024].any()
    flipped = parse_config({**config.to_json_dict(), "module_positions": {"0": [1023, 511, 0, 0]}})
    image = np.zeros(config.image_shape, np.uint16)
    layout_for(flipped).assemble(0, frame.view(np.uint8), image)
    assert np.array_equal(image[:512, :1024], frame.reshape(512, 1024)[::-1, ::-1])


def test_jungfrau_stacked_without_positions() -> None:
    config = jf(2)
    layout = layout_for(config)
    image = np.zeros((1024, 1024), np.uint16)
    layout.assemble(1, np.full(512 * 1024, 5, np.uint16).view(np.uint8), image)
    assert not image[:512].any() and np.all(image[512:] == 5)


def test_conversion_arithmetic() -> None:
    adc = np.array([[0, 1, 100, 0x3FFF]], np.uint16)
    ones, zeros = np.ones((3, 1, 4), np.float32), np.zeros((3, 1, 4), np.float32)
    out = np.empty((1, 4), np.float32)
    convert(adc, zeros, ones, out)
    assert out.tolist() == [[0, 1, 100, 16383]]  # gain 1, pedestal 0: identity
    convert(adc, zeros, 2 * ones, out)
    assert out.tolist() == [[0, 2, 200, 32766]]  # gain 2
    convert(adc, -ones, 2 * ones, out)
    assert out.tolist() == [[2, 4, 202, 32768]]  # gain 2, pedestal -1: 2 * (adc + 1)
    gains = np.stack([ones[0], 10 * ones[0], 100 * ones[0]])
    codes = np.array([[0 << 14 | 1, 1 << 14 | 1, 2 << 14 | 1, 3 << 14 | 1]], np.uint16)
    convert(codes, zeros, gains, out)
    assert out.tolist() == [[1, 10, 100, 100]]  # gain code 3 (binary 11) is G2, not G0


def _write_parameters(path: Path, shape: tuple[int, int], **datasets: np.ndarray) -> None:
    with h5py.File(path, "w") as f:
        for name, data in datasets.items():
            f[name] = data


def test_jungfrau_conversion_uses_image_position_parameters(tmp_path: Path) -> None:
    base = load_config(next(p for p in CONFIGS if p.name == "jungfrau_4m.json"))
    h, w = base.image_shape
    rng = np.random.default_rng(3)
    pedestals = rng.uniform(-50, 50, (3, h, w)).astype(np.float32)
    gains = rng.uniform(0.5, 2, (3, h, w)).astype(np.float32)
    path = tmp_path / "pg.h5"
    _write_parameters(path, (h, w), pedestals=pedestals, gains=gains)
    config = parse_config({**base.to_json_dict(), "pedestal_gain_file": str(path)})
    assert config.image_dtype == "float32"
    layout = layout_for(config)
    layout.prepare()
    raw = np.zeros((512, 1024), np.uint16)
    raw[0, 0] = 3 << 14 | 1000  # G2
    raw[511, 1023] = 1 << 14 | 20
    raw[7, 9] = 33
    image = np.zeros((h, w), np.float32)
    layout.assemble(3, raw.reshape(-1).view(np.uint8), image)
    assert image[512, 1024] == np.float32(1000 - pedestals[2, 512, 1024]) * gains[2, 512, 1024]
    assert image[1023, 2047] == np.float32(20 - pedestals[1, 1023, 2047]) * gains[1, 1023, 2047]
    assert image[519, 1033] == np.float32(33 - pedestals[0, 519, 1033]) * gains[0, 519, 1033]
    assert image[600, 1500] == np.float32(-pedestals[0, 600, 1500]) * gains[0, 600, 1500]
    for image_id in (1, 77):
        _assert_assembles(config, image_id)
        _assert_assembles_via_datagrams(config, image_id)


def test_jungfrau_parameter_file_errors(tmp_path: Path) -> None:
    good = np.zeros((3, 512, 1024), np.float32)
    cases = {
        "missing.h5": (None, "cannot open"),
        "no_pedestals.h5": ({"gains": good}, "no dataset 'pedestals'"),
        "shape.h5": ({"gains": good, "pedestals": np.zeros((3, 512, 1000))}, r"expected \(3, 512, 1024\)"),
        "legacy.h5": ({"gains": good, "gainsRMS": good}, "no dataset 'pedestals'"),
    }
    for name, (datasets, message) in cases.items():
        path = tmp_path / name
        if datasets is not None:
            _write_parameters(path, (512, 1024), **datasets)
        layout = layout_for(jf(pedestal_gain_file=str(path)))
        with pytest.raises(ConfigError, match=message):
            layout.prepare()


# -- assembling the simulator's frames -------------------------------------------------------------


def _assert_assembles(config: DetectorConfig, image_id: int) -> None:
    layout = layout_for(config)
    image = np.full(config.image_shape, 123, dtype=config.image_dtype)  # stale slot content
    layout.zero_uncovered(image)
    for m in config.required_modules:
        layout.assemble(m, np.frombuffer(module_frame_bytes(config, m, image_id), np.uint8), image)
    np.testing.assert_array_equal(image, expected_image(config, image_id))


def _assert_assembles_via_datagrams(config: DetectorConfig, image_id: int) -> None:
    layout = layout_for(config)
    image = np.full(config.image_shape, 45, dtype=config.image_dtype)
    layout.zero_uncovered(image)
    for m in config.required_modules:
        frame = np.full(layout.frame_nbytes, 0xEE, np.uint8)
        for datagram in module_datagrams(config, m, image_id):
            info = layout.parse(datagram)
            assert info is not None and layout.image_id(info) == image_id
            assert len(datagram) == layout.datagram_size(info.packet_index)
            offset, nbytes = layout.packet_slice(info.packet_index)
            frame[offset : offset + nbytes] = np.frombuffer(
                layout.payload(datagram, info.packet_index), np.uint8
            )
        layout.assemble(m, frame, image)
    np.testing.assert_array_equal(image, expected_image(config, image_id))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_example_configs_assemble_pixel_exact(path: Path) -> None:
    config = load_config(path)
    for image_id in IDS:
        _assert_assembles(config, image_id)
    _assert_assembles_via_datagrams(config, IDS[1])


def test_expected_image_is_the_documented_pattern() -> None:
    """Spot checks of the pattern formula, independent of the simulator's sequences."""
    j = load_config(next(p for p in CONFIGS if p.name == "jungfrau_4m.json"))
    img = expected_image(j, 10)
    # module 3 at rows 512+, columns 1024+; module-local pixel p = row * 1024 + column
    assert img[512 + 2, 1024 + 5] == (7 * 10 + 131 * 3 + 2 * 1024 + 5) % 16381
    e = eiger(32)
    img = expected_image(e, 4)
    assert img[513, 258] == ((7 * 4 + 131 * 1 + 256) % 65521) * 65537  # bottom half flipped, chip 1
    g = gf(128, 480)
    img = expected_image(g, 3)
    assert img[62, 240 + 7] == (7 * 3 + 131 * 7 + 7) % 4093  # NE, odd link: module row 0 at row 62


def test_assemble_validates_inputs() -> None:
    config = eiger(16)
    layout = layout_for(config)
    image = np.zeros((514, 514), np.uint16)
    with pytest.raises(ValueError, match="262144 uint8 bytes"):
        layout.assemble(0, np.zeros(10, np.uint8), image)
    with pytest.raises(ValueError, match="image must be"):
        layout.assemble(0, np.zeros(layout.frame_nbytes, np.uint8), np.zeros((514, 514), np.uint32))
    with pytest.raises(ValueError, match="module 2 is not part"):
        layout.assemble(2, np.zeros(layout.frame_nbytes, np.uint8), image)
    assert isinstance(layout_for(gf(128, 480)), GigaFrostLayout)
