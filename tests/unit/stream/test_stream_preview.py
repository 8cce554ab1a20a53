"""PNG preview of the ring's newest image (``std-daq preview``, REST ``GET /preview``)."""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from daq_backend.config import DetectorConfig
from daq_backend.stream.preview import NoImageError, latest_image, main, preview_png_bytes, render_png
from daq_backend.testing.stream import Host, Producer, expected_image, make_config

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_SIGNATURE, "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture
def host_a(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[DetectorConfig, Host]]:
    config = make_config(height=512, width=264)
    a = Host(tmp_path, config, "a")
    monkeypatch.setenv("STD_DAQ_IPC_DIR", str(a.dir))
    monkeypatch.setenv("STD_DAQ_SHM_PREFIX", a.prefix)
    yield config, a
    a.cleanup()


def test_latest_image_and_png(host_a: tuple[DetectorConfig, Host], tmp_path: Path) -> None:
    config, a = host_a
    with pytest.raises(FileNotFoundError, match="does not exist"):
        latest_image(config)
    producer = Producer(config)
    try:
        with pytest.raises(NoImageError, match="holds no image yet"):
            latest_image(config)
        for image_id in (10, 11, 12):
            producer.publish(image_id)
        meta, image = latest_image(config)
        assert meta.id == 12 and meta.n_missing_packets == 12 % 3
        assert np.array_equal(image, expected_image(config, 12))
        meta, image = latest_image(config, image_id=10)
        assert np.array_equal(image, expected_image(config, 10))
        with pytest.raises(NoImageError, match=r"image 99 is not in ring .*newest image is 12"):
            latest_image(config, image_id=99)

        png = preview_png_bytes(config)
        width, height = png_size(png)
        assert width == 800 and height > 800  # a tall image gives a tall picture
        assert imread(io.BytesIO(png)).shape[:2] == (height, width)

        out = tmp_path / "preview.png"
        assert main([str(a.config_file), "--output", str(out), "--image-id", "11", "--width", "600"]) == 0
        assert png_size(out.read_bytes())[0] == 600
        assert main([str(a.config_file), "--output", str(out), "--image-id", "5"]) == 1
    finally:
        producer.close()


def test_render_png_is_a_sensible_picture(tmp_path: Path) -> None:
    """A gradient with hot pixels: percentile scaling keeps the gradient visible (not one colour)."""
    yy, xx = np.mgrid[0:300, 0:400]
    image = (xx * 10 + yy).astype(np.uint16)
    image[::37, ::41] = 65535  # hot pixels
    out = tmp_path / "gradient.png"
    size = render_png(image, out, title="test", image_id=7)
    assert png_size(out.read_bytes()) == size
    rgba = imread(out)
    # The middle row of the plotted image area spans many distinct colours.
    middle = rgba[rgba.shape[0] // 2, : int(rgba.shape[1] * 0.7)]
    assert len({tuple(np.round(px, 2)) for px in middle}) > 20


@pytest.mark.parametrize(
    "image",
    [np.zeros((64, 64), np.uint8), np.full((50, 80), np.nan, np.float32), np.ones((3000, 20), np.uint32)],
)
def test_render_png_degenerate_images(image: np.ndarray) -> None:
    buffer = io.BytesIO()
    size = render_png(image, buffer)
    assert png_size(buffer.getvalue()) == size


def test_render_png_bad_input() -> None:
    with pytest.raises(ValueError, match="2-D image, got shape"):
        render_png(np.zeros(10), io.BytesIO())
    with pytest.raises(ValueError, match="colormap 'no-such-map'"):
        render_png(np.zeros((4, 4)), io.BytesIO(), colormap="no-such-map")


def test_preview_cli_without_ring(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = make_config()
    monkeypatch.setenv("STD_DAQ_IPC_DIR", str(tmp_path))
    monkeypatch.setenv("STD_DAQ_SHM_PREFIX", "nonexistent-")
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config.to_json_dict()))
    assert main([str(path), "--output", str(tmp_path / "p.png")]) == 1
    assert "is its producer running?" in capsys.readouterr().err
