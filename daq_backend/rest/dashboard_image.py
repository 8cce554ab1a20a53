"""The image of the live dashboard: the newest image of a detector's ring, shrunk and colour-mapped.

Cheap by construction, since it runs beside the data path: the ring stays mapped without faulting its
pages in (re-mapped when the producer re-creates it); a render looks at the slot headers for the newest
id, copies that one slot and checks it against the slot's seqlock, shrinks it by block maximum to at
most ``IMAGE_SIDE`` pixels a side (hits and hot pixels stay visible) and encodes an 8-bit palette PNG.
:class:`ImageRenderer` does nothing when the ring holds no newer image than the one last rendered.
"""

from __future__ import annotations

import io
import math
import os
import time

import numpy as np
from pydantic import BaseModel, Field

from daq_backend.formats import CODE_DTYPES, ImageMetadata, ImageStatus
from daq_backend.ram_buffer import RingBuffer, SlotOverwritten, shm_path

#: longest side of the image sent to the browser, in pixels
IMAGE_SIDE = 768
COLORMAP = "viridis"
#: colour of pixels without a value (NaN in converted images), the palette's last entry
NO_VALUE_COLOR = (255, 61, 245)
#: the colour scale spans these percentiles of the shown pixels
PERCENTILES = (1.0, 99.5)


class ImageInfo(BaseModel):
    """The image the dashboard shows (sent with every snapshot; its pixels come as an ``image``
    event when a newer one was rendered)."""

    seq: int = Field(description="number of images rendered by this API so far")
    image_id: int
    status: int = Field(description="0 good, 1 missing packets, 2 module id mismatch")
    status_name: str
    n_missing_packets: int
    height: int
    width: int
    dtype: str
    step: int = Field(description="each shown pixel is the maximum of step x step image pixels")
    shown_height: int
    shown_width: int
    vmin: float
    vmax: float
    scale: str = Field(description="how vmin/vmax were chosen")
    rendered: float = Field(description="unix time it was read from the ring")
    colormap: list[str] = Field(description="colours from vmin to vmax, for the colour bar")
    no_value_color: str


_STATUS_NAMES: dict[int, str] = {ImageStatus.GOOD: "good", ImageStatus.MISSING_PACKETS: "missing packets",
                                 ImageStatus.ID_MISMATCH: "module id mismatch", ImageStatus.LOST: "lost"}


def _palette(colormap: str) -> tuple[bytes, list[str]]:
    """256 RGB entries: 255 colours of ``colormap`` from low to high, then the no-value colour."""
    from matplotlib import colormaps

    rgb = (colormaps[colormap].resampled(255)(np.arange(255))[:, :3] * 255).round().astype(np.uint8)
    table = np.vstack([rgb, np.array([NO_VALUE_COLOR], dtype=np.uint8)])
    stops = ["#{:02x}{:02x}{:02x}".format(*rgb[i]) for i in np.linspace(0, 254, 11).astype(int)]
    return table.tobytes(), stops


def shrink(image: np.ndarray, side: int = IMAGE_SIDE) -> tuple[np.ndarray, int]:
    """Block maximum (NaN only where a whole block is NaN) so the longer side is at most ``side``."""
    h, w = image.shape
    step = max(1, math.ceil(max(h, w) / side))
    if step == 1:
        return image, 1
    hh, ww = h // step, w // step
    blocks = image[: hh * step, : ww * step].reshape(hh, step, ww, step)
    if np.issubdtype(image.dtype, np.floating):
        return np.fmax.reduce(np.fmax.reduce(blocks, axis=3), axis=1), step
    return blocks.max(axis=(1, 3)), step


def colour_scale(image: np.ndarray) -> tuple[float, float]:
    finite = image[np.isfinite(image)] if np.issubdtype(image.dtype, np.floating) else image.ravel()
    if finite.size == 0:
        return 0.0, 1.0
    vmin, vmax = (float(v) for v in np.percentile(finite, PERCENTILES))
    return (vmin, vmax) if vmax > vmin else (vmin, vmin + 1.0)


def encode_png(shown: np.ndarray, vmin: float, vmax: float, palette: bytes) -> bytes:
    """An 8-bit palette PNG: fast to make, small to send."""
    from PIL import Image

    values = np.asarray(shown, dtype=np.float32)
    index = np.clip((values - vmin) * (254.0 / (vmax - vmin)), 0, 254)
    index = np.where(np.isfinite(values), index, 255).astype(np.uint8)
    png = Image.frombytes("P", (index.shape[1], index.shape[0]), np.ascontiguousarray(index).tobytes())
    png.putpalette(palette)
    buffer = io.BytesIO()
    png.save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()


class NewestImage:
    """Short looks at the newest image of a detector's ring: mapped once (pages are not faulted in),
    re-mapped when the producer re-created the ring, released by :meth:`close`."""

    def __init__(self, ring_name: str) -> None:
        self.ring_name = ring_name
        self._ring: RingBuffer | None = None

    def _attached(self) -> RingBuffer:
        try:
            inode = os.stat(shm_path(self.ring_name)).st_ino
        except FileNotFoundError:
            self.close()
            raise
        if self._ring is not None and self._ring.inode != inode:
            self.close()
        if self._ring is None:
            self._ring = RingBuffer.attach(self.ring_name, timeout=0.0, populate=False)
        return self._ring

    def newest_id(self) -> int | None:
        return self._attached().newest_id()

    def read(self, image_id: int) -> tuple[ImageMetadata, np.ndarray]:
        """A checked copy of ``image_id`` and its metadata (``SlotOverwritten`` if it is gone)."""
        ring = self._attached()
        meta = ImageMetadata.unpack(ring.meta(image_id, ImageMetadata.FORMAT.size))
        dtype = np.dtype(CODE_DTYPES[meta.dtype]) if meta.dtype in CODE_DTYPES else None
        if meta.id != image_id or dtype is None:
            raise ValueError(f"slot of image {image_id} holds no image metadata")
        nbytes = meta.height * meta.width * dtype.itemsize
        if nbytes > ring.slot_nbytes or nbytes == 0:
            raise ValueError(f"image {image_id}: metadata says {nbytes} bytes, slots hold {ring.slot_nbytes}")
        data = np.array(ring.view(image_id)[:nbytes])
        ring.check(image_id)
        return meta, data.view(dtype).reshape(meta.height, meta.width)

    def close(self) -> None:
        if self._ring is not None:
            self._ring.close()
            self._ring = None


class ImageRenderer:
    """Renders the newest image when there is a newer one than last time (see module doc)."""

    def __init__(self, ring_name: str, colormap: str = COLORMAP) -> None:
        self.source = NewestImage(ring_name)
        self.palette, self.stops = _palette(colormap)
        self.seq = 0
        self.info: ImageInfo | None = None
        self.png: bytes | None = None
        self.error: str | None = "no image rendered yet"

    def render(self) -> bool:
        """Render the newest image if it is new; True if ``info``/``png`` changed."""
        try:
            for _ in range(5):
                newest = self.source.newest_id()
                if newest is None:
                    self.error = "the image ring holds no image yet"
                    return False
                if self.info is not None and newest == self.info.image_id:
                    return False
                try:
                    meta, image = self.source.read(newest)
                except SlotOverwritten:
                    continue  # rewritten while copied: the next newest
                self._show(meta, image)
                return True
            self.error = "the ring is rewritten faster than an image can be copied"
        except FileNotFoundError:
            self.error = f"no image ring /dev/shm/{self.source.ring_name}: is the readout up?"
        except (ValueError, OSError) as exc:
            self.error = f"cannot read the image ring: {exc}"
        return False

    def _show(self, meta: ImageMetadata, image: np.ndarray) -> None:
        shown, step = shrink(image)
        vmin, vmax = colour_scale(shown)
        self.png = encode_png(shown, vmin, vmax, self.palette)
        self.seq += 1
        self.error = None
        low, high = PERCENTILES
        self.info = ImageInfo(
            seq=self.seq, image_id=meta.id, status=meta.status,
            status_name=_STATUS_NAMES.get(meta.status, f"status {meta.status}"),
            n_missing_packets=meta.n_missing_packets, height=meta.height, width=meta.width,
            dtype=str(image.dtype), step=step, shown_height=shown.shape[0], shown_width=shown.shape[1],
            vmin=vmin, vmax=vmax, scale=f"percentiles {low:g}–{high:g}", rendered=time.time(),
            colormap=self.stops, no_value_color="#{:02x}{:02x}{:02x}".format(*NO_VALUE_COLOR),
        )

    def close(self) -> None:
        self.source.close()
