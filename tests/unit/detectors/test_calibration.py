"""Jungfrau calibration as PSI ships it (jungfrau_utils gain + pedestal files) beside the single-file
layout: a known frame converts to hand-computed keV in both, masked pixels are NaN, high-gain mode
uses HG0, the inter-chip gap pixels follow jungfrau_utils' geometry, and a real readout (UDP
simulator -> receivers -> assembler) produces exactly those images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from daq_backend.config import ConfigError, DetectorConfig, parse_config
from daq_backend.detectors import layout_for
from daq_backend.simulator.pattern import expected_image, module_frame_bytes
from daq_backend.testing import (
    InProcessReadout,
    assert_no_leftovers,
    check_images,
    make_config,
    run_simulator,
)

H, W = 512, 1024
G0, G1, G2, HG0 = 0, 1, 3, 0  # gain codes in the two top bits (HG0 pixels report code 0)


def raw_pixel(code: int, adc: int) -> int:
    return code << 14 | adc


def config_for(**fields: Any) -> DetectorConfig:
    n_modules = fields.pop("n_modules", 1)
    rows, cols = (514, 1030) if fields.get("gap_pixels") else (512, 1024)
    data: dict[str, Any] = {"detector_name": "CAL", "detector_type": "jungfrau", "n_modules": n_modules,
                            "bit_depth": 16, "image_pixel_height": rows * n_modules,
                            "image_pixel_width": cols, "start_udp_port": 50000}
    return parse_config({**data, **fields})


def convert_frame(config: DetectorConfig, raw: np.ndarray, module: int = 0) -> np.ndarray:
    layout = layout_for(config)
    layout.prepare()
    image = np.zeros(config.image_shape, config.image_dtype)
    layout.assemble(module, np.ascontiguousarray(raw, dtype=np.uint16).reshape(-1).view(np.uint8), image)
    return image


def write_h5(path: Path, **datasets: np.ndarray) -> Path:
    with h5py.File(path, "w") as f:
        for name, data in datasets.items():
            f[name] = data
    return path


def planes(*values: float, rows: int = H) -> np.ndarray:
    return np.stack([np.full((rows, W), v, np.float32) for v in values])


@pytest.fixture
def jf_utils_files(tmp_path: Path) -> tuple[Path, Path]:
    """One module: gains G0=32, G1=-2, G2=-0.25, HG0=64 ADU/keV (powers of two: 1/G is exact, so the
    hand-computed keV are exact too), pedestals 1000, 14000, 15000, 1200 ADU; three bad pixels."""
    gains = planes(32, -2, -0.25, 64)
    gains[0, 0, 9] = 0  # a zero G0 gain cannot convert
    mask = np.zeros((H, W), np.uint32)
    mask[0, 4] = 1 << 0  # was not in G0 during the forced-G0 pedestal run
    mask[0, 5] = 1 << 4  # was not in HG0
    return (write_h5(tmp_path / "gains.h5", gains=gains),
            write_h5(tmp_path / "pedestal.h5", gains=planes(1000, 14000, 15000, 1200), pixel_mask=mask))


def known_frame() -> np.ndarray:
    raw = np.full((H, W), raw_pixel(G0, 1000), np.uint16)
    raw[0, :10] = [raw_pixel(G0, 3000), raw_pixel(G1, 12000), raw_pixel(G2, 10000), raw_pixel(2, 10000),
                   raw_pixel(G0, 3000), raw_pixel(G0, 3000), raw_pixel(HG0, 1840), raw_pixel(G1, 1840),
                   raw_pixel(G0, 0), raw_pixel(G0, 3000)]
    raw[511, 1023] = raw_pixel(G2, 15000 - 4)
    return raw


def test_jungfrau_utils_layout_converts_a_known_frame(jf_utils_files: tuple[Path, Path]) -> None:
    gain_file, pedestal_file = jf_utils_files
    config = config_for(gain_file=str(gain_file), pedestal_file=str(pedestal_file))
    assert config.converted and config.image_dtype == "float32"
    image = convert_frame(config, known_frame())
    expected_row = [
        (3000 - 1000) / 32,       # G0: 62.5 keV
        (12000 - 14000) / -2,     # G1: 1000 keV (G1 and G2 gains are negative: the ADC falls)
        (10000 - 15000) / -0.25,  # G2 (code 3): 20000 keV
        (10000 - 15000) / -0.25,  # code 2 does not occur in a working detector: G2, as jungfrau_utils
        np.nan, np.nan,           # masked in the pedestal file (any bit)
        (1840 - 1000) / 32,       # code 0 outside high-gain mode is G0: 26.25 keV
        (1840 - 14000) / -2,      # 6080 keV
        (0 - 1000) / 32,          # -31.25 keV: a plausible value, which is why missing pixels are NaN
        np.nan,                   # zero gain
    ]
    np.testing.assert_array_equal(image[0, :10], np.array(expected_row, np.float32))
    assert image[511, 1023] == np.float32(16)  # (15000 - 4 - 15000) / -0.25
    assert image[300, 300] == np.float32(0)  # (1000 - 1000) / 32
    assert np.isnan(image).sum() == 3


def test_high_gain_mode_uses_hg0_whatever_the_gain_bits(jf_utils_files: tuple[Path, Path]) -> None:
    gain_file, pedestal_file = jf_utils_files
    config = config_for(gain_file=str(gain_file), pedestal_file=str(pedestal_file), high_gain=True)
    image = convert_frame(config, known_frame())
    assert image[0, 6] == np.float32((1840 - 1200) / 64)  # 10 keV
    assert image[0, 7] == np.float32((1840 - 1200) / 64)  # the G1 bits are ignored, as in jungfrau_utils
    assert image[0, 0] == np.float32((3000 - 1200) / 64)
    assert image[300, 300] == np.float32((1000 - 1200) / 64)
    assert np.isnan(image[0, [4, 5]]).all()  # the mask applies in every mode
    assert not np.isnan(image[0, 9])  # the zero gain is in G0's plane, HG0's is fine


def test_single_file_layout_converts_the_same_frame(tmp_path: Path) -> None:
    """Today's layout: image coordinates, gains as multipliers (keV per ADU), no mask."""
    path = write_h5(tmp_path / "pg.h5", pedestals=planes(1000, 14000, 15000), gains=planes(1 / 32, -0.5, -4))
    image = convert_frame(config_for(pedestal_gain_file=str(path)), known_frame())
    np.testing.assert_array_equal(image[0, :4], np.array([62.5, 1000, 20000, 20000], np.float32))
    assert image[0, 4] == np.float32(62.5)  # no mask in this layout
    assert image[511, 1023] == np.float32(16)


def test_division_convention_matches_jungfrau_utils_for_any_gain(tmp_path: Path) -> None:
    """jungfrau_utils computes (adc - P) * (1/G) in float32: the same numbers, within an ulp of a division."""
    rng = np.random.default_rng(5)
    gains = rng.uniform(30, 50, (4, H, W)).astype(np.float32)
    pedestals = rng.uniform(900, 1100, (4, H, W)).astype(np.float32)
    config = config_for(gain_file=str(write_h5(tmp_path / "g.h5", gains=gains)),
                        pedestal_file=str(write_h5(tmp_path / "p.h5", gains=pedestals,
                                                   pixel_mask=np.zeros((H, W), np.int32))))
    raw = rng.integers(0, 1 << 14, (H, W), dtype=np.uint16)
    raw[::7] |= np.uint16(1 << 14)
    raw[::11] |= np.uint16(3 << 14)
    image = convert_frame(config, raw)
    stage = np.minimum(raw >> 14, 2)
    r, c = np.indices(raw.shape)
    adc = (raw & 0x3FFF).astype(np.float32)
    p, g = pedestals[stage, r, c], gains[stage, r, c]
    np.testing.assert_array_equal(image, (adc - p) * (np.float32(1) / g))
    np.testing.assert_allclose(image, (adc - p) / g, rtol=1e-6, atol=1e-6)


def test_module_coordinates_of_the_jf_utils_files(tmp_path: Path) -> None:
    """Module m takes rows m*512.. of the files in readout order, wherever module_positions puts it
    (module 1 here is flipped into the top half of the image)."""
    gains = planes(32, -2, -0.25, 64, rows=2 * H)
    pedestals = planes(1000, 14000, 15000, 1200, rows=2 * H)
    pedestals[0, H + 0, 0] = 2000  # module 1's first read-out pixel
    mask = np.zeros((2 * H, W), np.uint8)
    mask[H + 1, 2] = 1
    config = config_for(n_modules=2, gain_file=str(write_h5(tmp_path / "g.h5", gains=gains)),
                        pedestal_file=str(write_h5(tmp_path / "p.h5", gains=pedestals, pixel_mask=mask)),
                        module_positions={"0": [0, 512, 1023, 1023], "1": [1023, 511, 0, 0]})
    raw = np.full((H, W), raw_pixel(G0, 3000), np.uint16)
    image = convert_frame(config, raw, module=1)
    assert image[511, 1023] == np.float32((3000 - 2000) / 32)  # flipped: local (0, 0) at the end corner
    assert np.isnan(image[510, 1021])  # local (1, 2)
    assert image[0, 0] == np.float32(62.5)
    assert np.isnan(image).sum() == 1
    assert not image[512:].any()  # module 0 not assembled


def test_gap_pixels_follow_jungfrau_utils_geometry() -> None:
    """Module-local (r, c) -> (r + 2*(r // 256), c + 2*(c // 256)) in a 514 x 1030 box; the gaps
    (rows 256-257, columns 256-257, 514-515, 772-773) stay 0."""
    config = config_for(gap_pixels=True)
    assert config.image_shape == (514, 1030) and config.image_dtype == "uint16"
    raw = (np.arange(H * W) % 60000 + 1).astype(np.uint16).reshape(H, W)
    image = convert_frame(config, raw)
    for (r, c), (y, x) in {(0, 0): (0, 0), (255, 255): (255, 255), (256, 256): (258, 258),
                           (0, 511): (0, 513), (0, 512): (0, 516), (300, 800): (302, 806),
                           (511, 1023): (513, 1029)}.items():
        assert image[y, x] == raw[r, c], (r, c)
    gap_rows, gap_cols = [256, 257], [256, 257, 514, 515, 772, 773]
    assert not image[gap_rows].any() and not image[:, gap_cols].any()
    covered = np.ones(config.image_shape, bool)
    covered[gap_rows] = False
    covered[:, gap_cols] = False
    assert np.array_equal(image != 0, covered)  # every sensor pixel placed once
    layout = layout_for(config)
    assert layout.uncovered_pixels.size == 514 * 1030 - H * W


def test_gap_pixels_with_conversion_and_flipped_modules(jf_utils_files: tuple[Path, Path]) -> None:
    gain_file, pedestal_file = jf_utils_files
    config = config_for(gain_file=str(gain_file), pedestal_file=str(pedestal_file), gap_pixels=True,
                        module_positions={"0": [1029, 513, 0, 0]})
    raw = known_frame()
    image = convert_frame(config, raw)
    assert image[513, 1029] == np.float32(62.5)  # local (0, 0), flipped to the far corner
    assert image[513, 1029 - 2] == np.float32(20000)  # local (0, 2)
    assert image[0, 0] == np.float32(16)  # local (511, 1023)
    assert image[513 - 302, 1029 - 302] == np.float32(0)  # local (300, 300): chip (1, 1)
    assert np.isnan(image).sum() == 3
    assert not image[[256, 257]].any()  # a flipped module has its gaps at the same rows


def test_real_readout_converts_with_jf_utils_files_and_gaps(ipc_env: str, tmp_path: Path) -> None:
    """UDP simulator -> receivers -> assembler -> image ring, 2 modules, jungfrau_utils calibration,
    gap pixels: every image equals the reference conversion, a lost packet's rows are NaN."""
    rng = np.random.default_rng(11)
    gains = rng.uniform(20, 60, (4, 2 * H, W)).astype(np.float32)
    gains[1:3] *= -0.05
    mask = (rng.random((2 * H, W)) < 0.001).astype(np.uint32)
    gain_file = write_h5(tmp_path / "g.h5", gains=gains)
    pedestals = rng.uniform(900, 1100, (4, 2 * H, W)).astype(np.float32)
    pedestal_file = write_h5(tmp_path / "p.h5", gains=pedestals, pixel_mask=mask)
    config = make_config("jungfrau", n_modules=2, image_ring_slots=8, gain_file=str(gain_file),
                         pedestal_file=str(pedestal_file), gap_pixels=True,
                         image_pixel_height=2 * 514, image_pixel_width=1030)
    with InProcessReadout(config) as readout:
        run_simulator(config, rate_hz=50, n_images=5, drop_packets=[(4, 1, 10)])
        readout.wait_images(5)
        check_images(readout, [1, 2, 3, 5])
        _, image = readout.image(4)
        expected = expected_image(config, 4)
        rows = 514 + 4 * 10 + np.arange(4)  # module 1's packet 10: its rows 40-43, below no chip gap
        assert np.isnan(image[rows][:, np.r_[0:256, 258:514, 516:772, 774:1030]]).all()
        others = np.ones(config.image_shape, bool)
        others[rows] = False
        np.testing.assert_array_equal(image[others], expected[others])
        assert np.isnan(expected).sum() == mask.sum()
    assert_no_leftovers(config, ipc_env)


def test_simulator_reference_matches_assembler_with_gaps(jf_utils_files: tuple[Path, Path]) -> None:
    gain_file, pedestal_file = jf_utils_files
    config = config_for(gain_file=str(gain_file), pedestal_file=str(pedestal_file), gap_pixels=True,
                        high_gain=True)
    layout = layout_for(config)
    image = np.full(config.image_shape, 7, np.float32)
    layout.zero_uncovered(image)
    layout.assemble(0, np.frombuffer(module_frame_bytes(config, 0, 3), np.uint8), image)
    np.testing.assert_array_equal(image, expected_image(config, 3))


@pytest.mark.parametrize(("fields", "message"), [
    ({"gain_file": "/g.h5"}, "pedestal_file: required together with gain_file"),
    ({"pedestal_file": "/p.h5"}, "gain_file: required together with pedestal_file"),
    ({"gain_file": "/g.h5", "pedestal_file": "/p.h5", "pedestal_gain_file": "/pg.h5"},
     "pedestal_gain_file: give either"),
    ({"pedestal_gain_file": "/pg.h5", "high_gain": True}, "high_gain: needs the jungfrau_utils layout"),
    ({"high_gain": True}, "high_gain: needs the jungfrau_utils layout"),
    ({"gain_file": ""}, "gain_file"),
    ({"gap_pixels": True, "image_pixel_height": 512, "image_pixel_width": 1024},
     r"module_positions: required unless the image is the modules stacked vertically \(514x1030\)"),
    ({"gap_pixels": True, "module_positions": {"0": [0, 0, 1023, 511]}},
     r"module_positions\[0\]: box is 1024x512 px, a jungfrau module needs 1030x514 \(width x height, gap"),
])
def test_calibration_config_errors_name_the_field(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_for(**fields)


def test_calibration_fields_only_for_jungfrau() -> None:
    with pytest.raises(ConfigError, match="gap_pixels: only jungfrau images"):
        parse_config({"detector_name": "E", "detector_type": "eiger", "n_modules": 1, "bit_depth": 16,
                      "image_pixel_height": 256, "image_pixel_width": 514, "start_udp_port": 50000,
                      "module_positions": {"0": [0, 0, 513, 255]}, "gap_pixels": True})


def test_jf_utils_file_errors_name_field_file_and_shape(tmp_path: Path) -> None:
    good_gains = write_h5(tmp_path / "g.h5", gains=planes(1, 1, 1, 1))
    no_mask = np.zeros((H, W), np.int32)
    good_pedestal = write_h5(tmp_path / "p.h5", gains=planes(1, 1, 1, 1), pixel_mask=no_mask)
    cases = [
        ({"gain_file": str(tmp_path / "nope.h5")}, "gain_file: cannot open"),
        ({"gain_file": str(write_h5(tmp_path / "g3.h5", gains=planes(1, 1, 1)))},
         r"gain_file: .*g3.h5:/gains has shape \(3, 512, 1024\), expected \(4, 512, 1024\) "
         r"\(planes G0, G1, G2, HG0"),
        ({"pedestal_file": str(write_h5(tmp_path / "nomask.h5", gains=planes(1, 1, 1, 1)))},
         "pedestal_file: .*nomask.h5 has no dataset 'pixel_mask'"),
        ({"pedestal_file": str(write_h5(tmp_path / "fmask.h5", gains=planes(1, 1, 1, 1),
                                        pixel_mask=np.zeros((H, W), np.float32)))},
         "pedestal_file: .*pixel_mask must hold integers"),
        ({"pedestal_file": str(write_h5(tmp_path / "p2.h5", pixel_mask=np.zeros((H, W), np.int32)))},
         "pedestal_file: .*p2.h5 has no dataset 'gains'"),
    ]
    for override, message in cases:
        fields = {"gain_file": str(good_gains), "pedestal_file": str(good_pedestal), **override}
        layout = layout_for(config_for(**fields))
        with pytest.raises(ConfigError, match=message):
            layout.prepare()
