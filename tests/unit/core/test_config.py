"""Detector config (daq_backend.config): the shipped configs load, fields are validated and every
error names its field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from daq_backend.config import ConfigError, DetectorConfig, DetectorType, load_config, parse_config

CONFIG_DIR = Path(__file__).resolve().parents[3] / "configs"

JUNGFRAU_1M = {
    "detector_name": "JF01T01V01",
    "detector_type": "jungfrau",
    "n_modules": 1,
    "bit_depth": 16,
    "image_pixel_height": 512,
    "image_pixel_width": 1024,
    "start_udp_port": 50100,
    "module_positions": {"0": [0, 0, 1023, 511]},
}


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.json")), ids=lambda p: p.name)
def test_seed_configs_load(path: Path) -> None:
    cfg = load_config(path)
    raw = json.loads(path.read_text())
    assert isinstance(cfg, DetectorConfig)
    assert cfg.detector_name == raw["detector_name"]
    assert cfg.detector_type.value == raw["detector_type"]
    assert cfg.image_shape == (raw["image_pixel_height"], raw["image_pixel_width"])
    assert set(cfg.module_positions) == {int(k) for k in raw["module_positions"]}


def test_parse_valid_config_and_derived_values() -> None:
    cfg = parse_config(JUNGFRAU_1M)
    assert cfg.detector_type is DetectorType.JUNGFRAU
    assert cfg.module_positions == {0: (0, 0, 1023, 511)}  # string keys become ints, lists tuples
    assert cfg.required_modules == (0,)
    assert cfg.image_shape == (512, 1024)
    assert cfg.image_dtype == "uint16"
    assert cfg.image_nbytes == 512 * 1024 * 2
    assert cfg.udp_port(0) == 50100
    assert not cfg.converted
    assert cfg.frame_ring_slots == 1000  # default


def test_eiger_32_bit_config_dtype() -> None:
    cfg = load_config(CONFIG_DIR / "eiger_500k_32.json")
    assert cfg.image_dtype == "uint32"
    assert cfg.image_nbytes == 514 * 514 * 4
    assert cfg.required_modules == (0, 1)
    assert cfg.udp_port(1) == 50401


def test_to_json_dict_round_trips() -> None:
    cfg = parse_config(JUNGFRAU_1M)
    data = cfg.to_json_dict()
    assert data["module_positions"] == {"0": [0, 0, 1023, 511]}
    assert json.loads(json.dumps(data)) == data
    assert parse_config(data) == cfg


def test_era_b_image_height_width_aliases() -> None:
    data = dict(JUNGFRAU_1M)
    data["image_height"] = data.pop("image_pixel_height")
    data["image_width"] = data.pop("image_pixel_width")
    cfg = parse_config(data)
    assert cfg.image_pixel_height == 512
    assert cfg.image_pixel_width == 1024
    assert cfg.image_shape == (512, 1024)


def test_new_names_win_over_era_b_names() -> None:
    data = {**JUNGFRAU_1M, "image_height": 99, "image_width": 77}
    cfg = parse_config(data)
    assert cfg.image_shape == (512, 1024)


def test_gf_is_an_alias_for_gigafrost() -> None:
    data = json.loads((CONFIG_DIR / "gigafrost_128x480.json").read_text())
    data["detector_type"] = "gf"
    cfg = parse_config(data)
    assert cfg.detector_type is DetectorType.GIGAFROST
    assert cfg.required_modules == tuple(range(8))


def test_missing_required_field_is_named() -> None:
    data = dict(JUNGFRAU_1M)
    del data["start_udp_port"]
    with pytest.raises(ConfigError, match=r"start_udp_port: missing \(required\)"):
        parse_config(data)


def test_wrong_type_is_named() -> None:
    with pytest.raises(ConfigError, match=r"n_modules: .*valid integer"):
        parse_config({**JUNGFRAU_1M, "n_modules": "four"})


def test_unknown_detector_type_is_named() -> None:
    with pytest.raises(ConfigError, match=r"detector_type: .*'jungfrau', 'eiger' or 'gigafrost'"):
        parse_config({**JUNGFRAU_1M, "detector_type": "pilatus"})


def test_bit_depth_not_allowed() -> None:
    with pytest.raises(ConfigError, match=r"bit_depth: .*8, 16 or 32"):
        parse_config({**JUNGFRAU_1M, "bit_depth": 12})


def test_jungfrau_needs_16_bit() -> None:
    with pytest.raises(ConfigError, match=r"bit_depth: jungfrau sends 16-bit pixels, got 32"):
        parse_config({**JUNGFRAU_1M, "bit_depth": 32})


def test_module_position_outside_module_range() -> None:
    data = {**JUNGFRAU_1M, "module_positions": {"3": [0, 0, 1023, 511]}}
    with pytest.raises(ConfigError, match=r"module_positions: module 3 is outside 0\.\.0"):
        parse_config(data)


def test_module_box_outside_image() -> None:
    data = {**JUNGFRAU_1M, "module_positions": {"0": [1, 0, 1024, 511]}}
    match = r"module_positions\[0\]: end_x=1024 lies outside the 512x1024 image"
    with pytest.raises(ConfigError, match=match):
        parse_config(data)


def test_module_box_of_wrong_size() -> None:
    data = {**JUNGFRAU_1M, "module_positions": {"0": [0, 0, 1022, 511]}}
    with pytest.raises(ConfigError, match=r"module_positions\[0\]: box is 1023x512 px.*1024x512"):
        parse_config(data)


def test_gigafrost_needs_8_modules() -> None:
    data = json.loads((CONFIG_DIR / "gigafrost_128x480.json").read_text())
    with pytest.raises(ConfigError, match=r"n_modules: gigafrost streams over 8 links, got 4"):
        parse_config({**data, "n_modules": 4})


def test_eiger_requires_module_positions() -> None:
    data = json.loads((CONFIG_DIR / "eiger_500k_16.json").read_text())
    with pytest.raises(ConfigError, match=r"module_positions: required for eiger"):
        parse_config({**data, "module_positions": {}})


def test_parse_config_rejects_non_object() -> None:
    with pytest.raises(ConfigError, match=r"config: expected a JSON object, got list"):
        parse_config([JUNGFRAU_1M])  # type: ignore[arg-type]


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


def test_load_config_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.json"
    with pytest.raises(ConfigError, match=r"cannot read detector config") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_load_config_invalid_json(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{"detector_name": ')
    with pytest.raises(ConfigError, match=r"not valid JSON") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_load_config_validates_content(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({**JUNGFRAU_1M, "bit_depth": 12}))
    with pytest.raises(ConfigError, match=r"bit_depth"):
        load_config(str(path))
