"""The write request (``{output_file, n_images, metadata?, ...}``), validated once at the edge.

Every caller (broker message, REST, CLI) goes through :func:`parse_write_request`, so a bad request is
refused with a message naming the field before any file is touched. Checks that depend on the host
(the output roots, folder exists, is writable, existing file) run here too, because the agent and
the h5 writer always share the host that holds the image ring; the rules of where a file may go are
in :mod:`daq_backend.writer.roots` (a relative ``output_file`` is taken inside the first root).

Limits (also in the JSON schema of :class:`WriteRequest`): ``n_images`` 1..:data:`MAX_IMAGES`,
``start_id`` 0..2**64-1, ``timeout`` at most :data:`MAX_TIMEOUT` s, a path component at most 255 bytes
and the path at most 4095, ``metadata`` at most :data:`MAX_METADATA_BYTES` as JSON, nested at most
:data:`MAX_METADATA_DEPTH` levels (so are ``sources`` and ``user_id``), keys at most
:data:`MAX_METADATA_KEY_BYTES` bytes, strings UTF-8 without NUL.
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
from daq_backend.writer import nexus, roots
from daq_backend.writer.layout import replace_problem
from daq_backend.writer.roots import MAX_NAME_BYTES, MAX_PATH_BYTES, OUTPUT_ROOTS_ENV

__all__ = ["OUTPUT_ROOTS_ENV", "RequestError", "WriteRequest", "output_roots_from_env", "parse_write_request"]

#: Attribute names of ``/entry`` that the file layout itself uses.
RESERVED_METADATA_KEYS = frozenset({"NX_class", "default"})
MAX_METADATA_BYTES = 1 << 20
#: levels of objects/lists inside ``metadata``
MAX_METADATA_DEPTH = 32
#: bytes of one metadata key (an HDF5 attribute name)
MAX_METADATA_KEY_BYTES = 255
#: images of one request (10**12 images of one byte are a petabyte)
MAX_IMAGES = 10**12
MAX_IMAGE_ID = 2**64 - 1
#: seconds of the idle ``timeout`` (about 11.6 days)
MAX_TIMEOUT = 1e6
#: the writer agent's service name (the ``source`` of its statuses); ``writer_agent@<host>`` for
#: each readout host of a detector split over several
WRITER_AGENT_SERVICE = "writer_agent"


def writer_services(host_names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """The writer agents every write request of a detector over ``host_names`` (its readout hosts,
    in order; empty: one host) must end at: each host's ``writer_agent@<host>``, the first host's
    (which writes the master file) first; () for one host (whichever agent answers)."""
    return tuple(f"{WRITER_AGENT_SERVICE}@{host}" for host in host_names)


class RequestError(ValueError):
    """A write request that cannot be served; the message names the field."""


def output_roots_from_env() -> list[Path]:
    """The roots in force without ``--output-root``: ``STD_DAQ_OUTPUT_ROOTS``, else the default data
    root (see :func:`daq_backend.writer.roots.output_roots`)."""
    return roots.output_roots()


def _check_json_value(value: Any, where: str, depth: int) -> None:
    """Depth, keys and strings of a metadata value (what HDF5 attributes can hold)."""
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError(f"{where}: contains a NUL character")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{where}: is not valid UTF-8 text (a lone surrogate)") from None
        return
    if isinstance(value, dict | list):
        if depth > MAX_METADATA_DEPTH:
            field = where.split(".", 1)[0].split("[", 1)[0]
            raise ValueError(f"{field}: nested deeper than {MAX_METADATA_DEPTH} levels (at {where})")
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            if isinstance(key, str):
                _check_json_value(key, f"{where} key", depth)
            inner = f"{where}.{key}" if isinstance(key, str) else f"{where}[{key}]"
            _check_json_value(item, inner, depth + 1)


class WriteRequest(BaseModel):
    """One acquisition to write: the next ``n_images`` images (or from ``start_id`` on) into a new file.

    ``sources`` and ``user_id`` are accepted for compatibility with seed clients (the REST examples send
    ``"sources": "eiger"``) and ignored: the agent serves exactly one detector. Unknown fields are refused
    so a typo (``"overwite": true``) is not silently dropped."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    output_file: str = Field(
        min_length=1, max_length=MAX_PATH_BYTES,
        description=f"the HDF5 file to create: an absolute path inside one of the DAQ's output roots, or a "
                    f"path relative to its first root; each name at most {MAX_NAME_BYTES} bytes, the whole "
                    f"path at most {MAX_PATH_BYTES} bytes (UTF-8, no NUL)",
    )
    n_images: int = Field(strict=True, ge=1, le=MAX_IMAGES, description="number of images to write")
    metadata: dict[str, Any] = Field(
        default_factory=dict,
        description=f"stored as attributes of /entry: at most {MAX_METADATA_BYTES} bytes as JSON, nested at "
                    f"most {MAX_METADATA_DEPTH} levels, keys at most {MAX_METADATA_KEY_BYTES} bytes",
    )
    start_id: int | None = Field(default=None, strict=True, ge=0, le=MAX_IMAGE_ID,
                                 description="first image id to write")
    compression: Literal["none", "bitshuffle-lz4"] = "none"
    overwrite: bool = Field(
        default=False, strict=True, description="replace an existing file (only an HDF5 file this DAQ wrote)"
    )
    timeout: float | None = Field(
        default=None, gt=0, le=MAX_TIMEOUT,
        description="give up when no new image arrived for this many seconds",
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
            if len(key.encode("utf-8", "replace")) > MAX_METADATA_KEY_BYTES:
                raise ValueError(f"key {key[:40]!r}... is longer than {MAX_METADATA_KEY_BYTES} bytes")
        _check_json_value(value, "metadata", 1)
        try:
            text = json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"must be JSON-serialisable ({exc})") from None
        if len(text) > MAX_METADATA_BYTES:
            raise ValueError(f"is {len(text)} bytes as JSON, the limit is {MAX_METADATA_BYTES}")
        nexus.check_request_metadata(value)  # nxmx object, exptime/period: what the file's NXmx fields take
        return value

    @model_validator(mode="before")
    @classmethod
    def _relative_in_root(cls, data: Any, info: ValidationInfo) -> Any:
        """A relative ``output_file`` is taken inside the first output root (when the roots are known)."""
        value = data.get("output_file") if isinstance(data, dict) else None
        if isinstance(value, str) and value and not os.path.isabs(value):
            found = _context_roots(info)
            if found:
                data = {**data, "output_file": roots.resolve_output_path(value, found)}
        return data

    @field_validator("sources", "user_id")
    @classmethod
    def _shallow(cls, value: Any, info: ValidationInfo) -> Any:
        """Ignored, but forwarded with the request: as deep and as clean as metadata."""
        _check_json_value(value, str(info.field_name), 1)
        return value

    @field_validator("output_file")
    @classmethod
    def _path(cls, value: str) -> str:
        roots.check_path_text(value)
        if value.endswith("/"):
            raise ValueError(f"names a folder, not a file: {value!r}")
        return os.path.normpath(value)

    @model_validator(mode="after")
    def _host_checks(self, info: ValidationInfo) -> WriteRequest:
        found = _context_roots(info)
        if not os.path.isabs(self.output_file):
            if found or (info.context or {}).get("check_filesystem", True):
                raise ValueError(f"output_file: must be an absolute path, got {self.output_file!r}")
            return self  # a client's check: the DAQ takes it inside its first root
        try:
            if found:
                roots.confine(self.output_file, found)
            if (info.context or {}).get("check_filesystem", True):
                check_output_file(Path(self.output_file), overwrite=self.overwrite,
                                  master_elsewhere=bool((info.context or {}).get("master_elsewhere")))
        except ValueError as exc:
            raise ValueError(f"output_file: {exc}") from None
        return self

    def to_json_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


def _context_roots(info: ValidationInfo) -> list[Path]:
    """The output roots a validation applies: the context's ``output_roots``; without them, those in
    force on this host when the file system is checked here (a client-side check applies none)."""
    context = info.context or {}
    given = context.get("output_roots")
    if given is not None:
        return [Path(r) for r in given]
    return roots.output_roots() if context.get("check_filesystem", True) else []


def check_output_file(path: Path, *, overwrite: bool, master_elsewhere: bool = False) -> None:
    """Refuse a file whose folder is missing, not a folder or unwritable, and an existing file unless
    ``overwrite`` and it is an HDF5 file this DAQ wrote. Raises ``ValueError`` with a message for the
    user. (Where the file may be is :func:`daq_backend.writer.roots.confine`.) ``master_elsewhere``:
    another readout host's agent writes the file at ``path`` (the master; it may exist already):
    only the folder is checked here, this host's part names are checked when they are created."""
    folder = path.parent
    if not folder.exists():
        raise ValueError(f"folder {folder} does not exist")
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a file")
    if os.path.lexists(path) and not master_elsewhere:
        if not overwrite:
            raise ValueError(f"file {path} already exists (set overwrite: true to replace it)")
        problem = replace_problem(str(path), None, overwrite)
        if problem:
            raise ValueError(f"cannot replace {path}: {problem}")
    # os.access() says "yes" to root everywhere; creating a file is the only honest test.
    probe = folder / f".std-daq-probe-{uuid.uuid4().hex}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except OSError as exc:
        raise ValueError(f"folder {folder} is not writable ({exc.strerror})") from None
    os.close(fd)
    probe.unlink(missing_ok=True)


def parse_write_request(
    body: Any, *, output_roots: list[Path] | None = None, check_filesystem: bool = True,
    master_elsewhere: bool = False,
) -> WriteRequest:
    """Validate a request (dict, JSON text or bytes). Raises ``RequestError`` naming each bad field.
    ``master_elsewhere``: see :func:`check_output_file`."""
    if isinstance(body, bytes | bytearray | str):
        try:
            body = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RequestError(f"invalid write request: not valid JSON ({exc})") from None
        except RecursionError:
            raise RequestError("invalid write request: JSON nested too deeply") from None
    if not isinstance(body, dict):
        raise RequestError(f"invalid write request: expected a JSON object, got {type(body).__name__}")
    context: dict[str, Any] = {"check_filesystem": check_filesystem, "master_elsewhere": master_elsewhere}
    if output_roots is not None:
        context["output_roots"] = output_roots
    try:
        return WriteRequest.model_validate(body, context=context)
    except ValidationError as exc:
        raise RequestError(f"invalid write request: {explain(exc)}") from None
