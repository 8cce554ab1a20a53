"""The write request (``{output_file, n_images, metadata?, ...}``), validated once at the edge.

Every caller (broker message, REST, CLI) goes through :func:`parse_write_request`, so a bad request is
refused with a message naming the field before any file is touched. Checks that depend on the host
(folder exists, is writable, allowed output roots, existing file) run here too, because the agent and
the h5 writer always share the host that holds the image ring.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from daq_backend.validation import explain
from daq_backend.writer import nexus

#: ``:``-separated list of folders outside which no file may be written (unset: anywhere).
OUTPUT_ROOTS_ENV = "STD_DAQ_OUTPUT_ROOTS"
#: Attribute names of ``/entry`` that the file layout itself uses.
RESERVED_METADATA_KEYS = frozenset({"NX_class", "default"})
MAX_METADATA_BYTES = 1 << 20


class RequestError(ValueError):
    """A write request that cannot be served; the message names the field."""


def output_roots_from_env() -> list[Path] | None:
    value = os.environ.get(OUTPUT_ROOTS_ENV, "")
    roots = [Path(p) for p in value.split(":") if p.strip()]
    return roots or None


class WriteRequest(BaseModel):
    """One acquisition to write: the next ``n_images`` images (or from ``start_id`` on) into a new file.

    ``sources`` and ``user_id`` are accepted for compatibility with seed clients (the REST examples send
    ``"sources": "eiger"``) and ignored: the agent serves exactly one detector. Unknown fields are refused
    so a typo (``"overwite": true``) is not silently dropped."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    output_file: str = Field(min_length=1, description="absolute path of the HDF5 file to create")
    n_images: int = Field(strict=True, ge=1, description="number of images to write")
    metadata: dict[str, Any] = Field(default_factory=dict, description="stored as attributes of /entry")
    start_id: int | None = Field(default=None, strict=True, ge=0, description="first image id to write")
    compression: Literal["none", "bitshuffle-lz4"] = "none"
    overwrite: bool = Field(default=False, strict=True)
    timeout: float | None = Field(
        default=None, gt=0, description="give up when no new image arrived for this many seconds"
    )
    sources: Any = Field(default=None, description="seed compatibility; ignored")
    user_id: Any = Field(default=None, description="seed compatibility; ignored")

    @field_validator("timeout")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number of seconds")
        return value

    @field_validator("metadata")
    @classmethod
    def _json_safe(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            if not key:
                raise ValueError("keys must be non-empty strings")
            if key in RESERVED_METADATA_KEYS:
                raise ValueError(f"key {key!r} is reserved by the file layout")
        try:
            text = json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"must be JSON-serialisable ({exc})") from None
        if len(text) > MAX_METADATA_BYTES:
            raise ValueError(f"is {len(text)} bytes as JSON, the limit is {MAX_METADATA_BYTES}")
        nexus.check_request_metadata(value)  # nxmx object, exptime/period: what the file's NXmx fields take
        return value

    @field_validator("output_file")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if "\x00" in value:
            raise ValueError("contains a NUL character")
        if not os.path.isabs(value):
            raise ValueError(f"must be an absolute path, got {value!r}")
        if value.endswith("/"):
            raise ValueError(f"names a folder, not a file: {value!r}")
        return os.path.normpath(value)

    @model_validator(mode="after")
    def _host_checks(self, info: ValidationInfo) -> WriteRequest:
        context = info.context or {}
        if context.get("check_filesystem", True):
            roots = context.get("output_roots", output_roots_from_env())
            try:
                check_output_file(Path(self.output_file), overwrite=self.overwrite, roots=roots)
            except ValueError as exc:
                raise ValueError(f"output_file: {exc}") from None
        return self

    def to_json_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


def check_output_file(path: Path, *, overwrite: bool, roots: list[Path] | None) -> None:
    """Refuse a file whose folder is missing, not a folder, unwritable or outside the allowed roots,
    and an existing file unless ``overwrite``. Raises ``ValueError`` with a message for the user."""
    folder = path.parent
    if roots:
        real_folder = Path(os.path.realpath(folder))
        allowed = [Path(os.path.realpath(r)) for r in roots]
        if not any(real_folder == r or r in real_folder.parents for r in allowed):
            listed = ", ".join(str(r) for r in roots)
            raise ValueError(f"folder {folder} is outside the allowed output roots ({listed})")
    if not folder.exists():
        raise ValueError(f"folder {folder} does not exist")
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a file")
    if path.exists() and not overwrite:
        raise ValueError(f"file {path} already exists (set overwrite: true to replace it)")
    # os.access() says "yes" to root everywhere; creating a file is the only honest test.
    probe = folder / f".std-daq-probe-{uuid.uuid4().hex}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except OSError as exc:
        raise ValueError(f"folder {folder} is not writable ({exc.strerror})") from None
    os.close(fd)
    probe.unlink(missing_ok=True)


def parse_write_request(
    body: Any, *, output_roots: list[Path] | None = None, check_filesystem: bool = True
) -> WriteRequest:
    """Validate a request (dict, JSON text or bytes). Raises ``RequestError`` naming each bad field."""
    if isinstance(body, bytes | bytearray | str):
        try:
            body = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RequestError(f"invalid write request: not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise RequestError(f"invalid write request: expected a JSON object, got {type(body).__name__}")
    context: dict[str, Any] = {"check_filesystem": check_filesystem}
    if output_roots is not None:
        context["output_roots"] = output_roots
    try:
        return WriteRequest.model_validate(body, context=context)
    except ValidationError as exc:
        raise RequestError(f"invalid write request: {explain(exc)}") from None
