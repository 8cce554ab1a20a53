"""Preview: the latest image of the ring as a colour-mapped PNG, so a person can see what the detector
sees (``std-daq preview``, REST ``GET /preview``).

Scaling uses robust percentiles (1 % .. 99.5 %) so a few hot or dead pixels do not wash the picture
out. Rendering uses matplotlib's object API with the Agg canvas (no pyplot global state), so it is safe
in a server thread.
"""

from __future__ import annotations

import argparse
import io
import logging
import math
import sys
from pathlib import Path
from typing import BinaryIO

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from mpl_toolkits.axes_grid1 import make_axes_locatable

from daq_backend import ipc
from daq_backend.config import DetectorConfig, load_config
from daq_backend.formats import DTYPE_CODES, ImageMetadata
from daq_backend.ram_buffer import RingBuffer, SlotOverwritten

log = logging.getLogger(__name__)

PERCENTILES = (1.0, 99.5)
#: Larger images are subsampled to about this many pixels per side before rendering.
RENDER_PIXELS = 1600


class NoImageError(LookupError):
    """The ring exists but does not hold the requested (or any) image."""


def _metadata(raw: bytes, image_id: int, config: DetectorConfig) -> ImageMetadata:
    """The slot's ImageMetadata (the assembler and stream-recv store it as slot metadata); falls back
    to the config's geometry if the producer stored something else."""
    try:
        meta = ImageMetadata.unpack(raw)
        if meta.id == image_id and meta.shape == config.image_shape and meta.dtype in DTYPE_CODES.values():
            return meta
    except ValueError:
        pass
    h, w = config.image_shape
    return ImageMetadata(image_id, h, w, DTYPE_CODES[config.image_dtype])


def latest_image(
    config: DetectorConfig, image_id: int | None = None, timeout: float = 0.0
) -> tuple[ImageMetadata, np.ndarray]:
    """A consistent copy of the newest image in the ring (or of ``image_id``) with its metadata.

    Raises FileNotFoundError if the ring does not exist and NoImageError if it lacks the image."""
    name = ipc.image_ring_name(config.detector_name)
    with RingBuffer.attach(name, timeout=timeout, populate=False) as ring:
        for _ in range(10):
            target = ring.newest_id() if image_id is None else image_id
            if target is None:
                raise NoImageError(f"ring /dev/shm/{name} holds no image yet")
            try:
                meta = _metadata(ring.meta(target, ImageMetadata.FORMAT.size), target, config)
                nbytes = meta.height * meta.width * meta.numpy_dtype.itemsize
                if nbytes > ring.slot_nbytes:
                    raise NoImageError(
                        f"image {target}: metadata says {nbytes} bytes, the slots hold {ring.slot_nbytes}"
                    )
                data = np.array(ring.view(target)[:nbytes])
                ring.check(target)
            except SlotOverwritten:
                if image_id is not None:
                    newest = ring.newest_id()
                    raise NoImageError(
                        f"image {image_id} is not in ring /dev/shm/{name} (newest image is {newest}, "
                        f"the ring keeps the last {ring.n_slots})"
                    ) from None
                continue  # the newest slot was being rewritten: take the newer newest
            return meta, data.view(meta.numpy_dtype).reshape(meta.shape)
    raise NoImageError(f"ring /dev/shm/{name} is rewritten faster than an image can be copied")


def _scale(image: np.ndarray) -> tuple[float, float]:
    step = max(1, int(math.sqrt(image.size / 1_000_000)))
    sample = np.asarray(image[::step, ::step], dtype=np.float64)
    finite = sample[np.isfinite(sample)]
    if finite.size == 0:
        return 0.0, 1.0
    vmin, vmax = (float(v) for v in np.percentile(finite, PERCENTILES))
    if vmax <= vmin:
        vmax = vmin + 1.0
    return vmin, vmax


def render_png(
    image: np.ndarray,
    path_or_buffer: str | Path | BinaryIO,
    colormap: str = "viridis",
    title: str | None = None,
    *,
    image_id: int | None = None,
    width: int = 800,
) -> tuple[int, int]:
    """Write ``image`` (2-D) as a colour-mapped PNG with a colour bar; returns (width, height) in px."""
    image = np.asarray(image)
    if image.ndim != 2 or 0 in image.shape:
        raise ValueError(f"render_png: expected a non-empty 2-D image, got shape {image.shape}")
    if width < 200:
        raise ValueError(f"render_png: width must be at least 200 px, got {width}")
    h, w = image.shape
    vmin, vmax = _scale(image)
    step = max(1, math.ceil(max(h, w) / RENDER_PIXELS))
    dpi = 100
    fig_w = width / dpi
    fig_h = min(max(fig_w * 0.8 * h / w + 1.0, 3.0), 2.0 * fig_w)
    fig = Figure(figsize=(fig_w, fig_h), dpi=dpi, layout="tight")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    try:
        shown = ax.imshow(
            image[::step, ::step], cmap=colormap, vmin=vmin, vmax=vmax, origin="upper",
            extent=(-0.5, w - 0.5, h - 0.5, -0.5), interpolation="nearest" if step == 1 else "antialiased",
        )
    except ValueError as exc:
        raise ValueError(f"render_png: colormap {colormap!r} is not known to matplotlib ({exc})") from None
    fig.colorbar(shown, cax=make_axes_locatable(ax).append_axes("right", size="4%", pad=0.1))
    parts = [title, f"image {image_id}" if image_id is not None else None, f"{h}x{w} {image.dtype}"]
    ax.set_title("  |  ".join(p for p in parts if p), fontsize=10)
    low, high = PERCENTILES
    scale = f"colour scale {vmin:.4g} .. {vmax:.4g} = percentiles {low:g}..{high:g}"
    ax.set_xlabel(f"x [px]   ({scale})", fontsize=8)
    ax.set_ylabel("y [px]", fontsize=8)
    fig.savefig(path_or_buffer, format="png", dpi=dpi)
    return round(fig_w * dpi), round(fig_h * dpi)


def preview_png_bytes(
    config: DetectorConfig, colormap: str = "viridis", image_id: int | None = None
) -> bytes:
    """PNG of the newest image (for REST ``GET /preview``). Raises FileNotFoundError (no ring: the
    readout is not running) or NoImageError (no image yet)."""
    meta, image = latest_image(config, image_id)
    buffer = io.BytesIO()
    render_png(image, buffer, colormap, config.detector_name, image_id=meta.id)
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    """std-daq preview CONFIG [--output preview.png] [--image-id N]: write the newest image as PNG."""
    parser = argparse.ArgumentParser(prog="std-daq preview", description=main.__doc__)
    parser.add_argument("config", help="detector JSON file")
    parser.add_argument("--output", "-o", default="preview.png")
    parser.add_argument("--image-id", type=int, default=None, help="this image instead of the newest")
    parser.add_argument("--colormap", default="viridis")
    parser.add_argument("--width", type=int, default=800, help="PNG width in pixels")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    try:
        meta, image = latest_image(config, args.image_id)
        size = render_png(
            image, args.output, args.colormap, config.detector_name, image_id=meta.id, width=args.width
        )
    except (FileNotFoundError, NoImageError, ValueError) as exc:
        print(f"std-daq preview: {exc}", file=sys.stderr)
        return 1
    shape = f"{meta.height}x{meta.width} {meta.numpy_dtype}"
    print(f"{args.output}: image {meta.id} ({shape}), {size[0]}x{size[1]} px")
    return 0


if __name__ == "__main__":
    sys.exit(main())
