"""One detector-control interface for the REST API, whatever drives the detector (slsdet or simulator).

Why: the seed validated nothing before talking to the detector and answered errors with free text. Here
every setting is validated as a whole (names, types, ranges, enum names, per-detector-type limits) before
anything is sent, and failures are typed exceptions the API maps to HTTP codes:
:class:`ParameterError` (400), :class:`DetectorStateError` (409), :class:`DetectorUnreachableError`
(503/504), :class:`DetectorCommandError` (502: the detector refused a valid-looking command).

``get_config`` keeps the seed's ``GET /detector`` shape, including slsdet's enum spelling
(``"timingMode.AUTO_TIMING"``, ``"speedLevel.FULL_SPEED"``); ``set_config`` accepts that spelling as well
as the bare names (and speed as 0/1/2, tengiga as 0/1). Values that do not apply to a detector type are
``None`` in ``get_config`` (Jungfrau ``threshold``).
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal, Protocol, runtime_checkable

import pydantic
from pydantic import BaseModel, ConfigDict, Field, field_validator

TimingName = Literal["AUTO_TIMING", "TRIGGER_EXPOSURE", "GATED", "BURST_TRIGGER"]
SpeedName = Literal["FULL_SPEED", "HALF_SPEED", "QUARTER_SPEED"]
TIMING_NAMES: tuple[str, ...] = ("AUTO_TIMING", "TRIGGER_EXPOSURE", "GATED", "BURST_TRIGGER")
SPEED_NAMES: tuple[str, ...] = ("FULL_SPEED", "HALF_SPEED", "QUARTER_SPEED")
TIMING_PREFIX = "timingMode."
SPEED_PREFIX = "speedLevel."

#: Keys of :meth:`DetectorControl.get_config`, in the seed's order.
CONFIG_KEYS: tuple[str, ...] = (
    "det_name", "triggers", "timing", "frames", "period", "exptime", "dr", "speed", "tengiga", "threshold",
)


class ParameterError(ValueError):
    """A setting is unknown, of the wrong type or out of range; nothing was sent to the detector."""

    def __init__(self, parameter: str, reason: str | None = None) -> None:
        self.parameter = parameter
        self.reason = reason
        super().__init__(f"Parameter not valid: {parameter}" if reason is None else f"{parameter}: {reason}")


class DetectorStateError(RuntimeError):
    """The command does not fit the detector's state (START while running, STOP while idle)."""


class DetectorUnreachableError(ConnectionError):
    """The detector (control server) did not answer: refused, timed out or vanished."""


class DetectorCommandError(RuntimeError):
    """The detector answered but refused a command; the message carries its own reason."""


def _enum_name(value: Any, prefix: str) -> Any:
    """Reduce slsdet enum objects and their ``str()`` (``"timingMode.AUTO_TIMING"``) to the bare name."""
    name = getattr(value, "name", None)
    if isinstance(name, str) and not isinstance(value, str):
        return name
    if isinstance(value, str) and value.startswith(prefix):
        return value[len(prefix):]
    return value


def format_timing(name: str) -> str:
    """Seed spelling of a timing mode for ``get_config`` answers."""
    return f"{TIMING_PREFIX}{name}"


def format_speed(name: str) -> str:
    """Seed spelling of a readout speed for ``get_config`` answers."""
    return f"{SPEED_PREFIX}{name}"


class DetectorSettings(BaseModel):
    """The settable subset (seed list); every field optional, unknown names rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    triggers: Annotated[int, Field(strict=True, ge=1)] | None = None
    timing: TimingName | None = None
    frames: Annotated[int, Field(strict=True, ge=1)] | None = None
    period: Annotated[float, Field(strict=True, ge=0, allow_inf_nan=False)] | None = Field(
        default=None, description="seconds")
    exptime: Annotated[float, Field(strict=True, gt=0, allow_inf_nan=False)] | None = Field(
        default=None, description="seconds")
    dr: Literal[4, 8, 16, 32] | None = None
    speed: SpeedName | None = None
    tengiga: Annotated[bool, Field(strict=True)] | None = None
    threshold: Annotated[int, Field(strict=True, ge=-1)] | None = Field(default=None, description="eV")

    @field_validator("timing", mode="before")
    @classmethod
    def _timing_name(cls, value: Any) -> Any:
        return _enum_name(value, TIMING_PREFIX)

    @field_validator("speed", mode="before")
    @classmethod
    def _speed_name(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(SPEED_NAMES):
            return SPEED_NAMES[value]
        return _enum_name(value, SPEED_PREFIX)

    @field_validator("tengiga", mode="before")
    @classmethod
    def _tengiga_flag(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool) and value in (0, 1):
            return bool(value)
        return value

    def given(self) -> dict[str, Any]:
        """Only the fields the caller set, in the order they are applied to a detector."""
        fields_set = self.model_fields_set
        return {name: getattr(self, name) for name in type(self).model_fields if name in fields_set}


@dataclasses.dataclass(frozen=True)
class DetectorCapabilities:
    """What one detector type accepts beyond the generic ranges (checked before anything is sent)."""

    detector_type: str
    dynamic_ranges: frozenset[int]
    timing_modes: frozenset[str]
    speeds: frozenset[str] = frozenset(SPEED_NAMES)
    tengiga_fixed: bool | None = None  # the only allowed value, if the link speed is not switchable
    threshold: bool = False


CAPABILITIES: dict[str, DetectorCapabilities] = {
    "jungfrau": DetectorCapabilities(
        "jungfrau", frozenset({16}), frozenset({"AUTO_TIMING", "TRIGGER_EXPOSURE"}), tengiga_fixed=True,
    ),
    "eiger": DetectorCapabilities(
        "eiger", frozenset({4, 8, 16, 32}), frozenset(TIMING_NAMES), threshold=True,
    ),
}


def _describe(error: Any) -> str:
    reason = str(error["msg"])
    return f"{reason} (got {error['input']!r})" if "input" in error else reason


def validate_settings(values: Any, capabilities: DetectorCapabilities | None = None) -> DetectorSettings:
    """Validate a whole settings dict, raising one :class:`ParameterError` for the first problem found.

    Unknown names win over bad values so the seed's ``"Parameter not valid: <NAME>"`` answer is exact.
    """
    if not isinstance(values, dict):
        kind = type(values).__name__
        raise ParameterError("config", f"must be an object of parameter names to values, got {kind}")
    for name in values:
        if not isinstance(name, str) or name not in DetectorSettings.model_fields:
            raise ParameterError(str(name))
    for name, value in values.items():
        if value is None:
            raise ParameterError(name, "null is not a valid value")
    try:
        settings = DetectorSettings.model_validate(values)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        name = str(first["loc"][0]) if first["loc"] else "config"
        raise ParameterError(name, _describe(first)) from None
    if capabilities is not None:
        check_capabilities(settings, capabilities)
    return settings


def check_capabilities(settings: DetectorSettings, caps: DetectorCapabilities) -> None:
    """Reject values a detector type cannot take (e.g. ``dr=8`` on a Jungfrau)."""
    kind = caps.detector_type
    if settings.dr is not None and settings.dr not in caps.dynamic_ranges:
        allowed = ", ".join(str(v) for v in sorted(caps.dynamic_ranges))
        raise ParameterError("dr", f"{settings.dr} not supported by {kind} (allowed: {allowed})")
    if settings.timing is not None and settings.timing not in caps.timing_modes:
        allowed = ", ".join(t for t in TIMING_NAMES if t in caps.timing_modes)
        raise ParameterError("timing", f"{settings.timing} not supported by {kind} (allowed: {allowed})")
    if settings.speed is not None and settings.speed not in caps.speeds:
        allowed = ", ".join(s for s in SPEED_NAMES if s in caps.speeds)
        raise ParameterError("speed", f"{settings.speed} not supported by {kind} (allowed: {allowed})")
    fixed = caps.tengiga_fixed
    if settings.tengiga is not None and fixed is not None and settings.tengiga != fixed:
        raise ParameterError("tengiga", f"{kind} link speed is fixed (tengiga={caps.tengiga_fixed})")
    if settings.threshold is not None and not caps.threshold:
        raise ParameterError("threshold", f"not supported by {kind}")


@runtime_checkable
class DetectorControl(Protocol):
    """What the REST API and the Bluesky device need from any detector, real, virtual or simulated."""

    name: str
    detector_type: str

    def get_config(self) -> dict[str, Any]:
        """Seed ``GET /detector`` shape with JSON-safe values (keys: :data:`CONFIG_KEYS`)."""
        ...

    def set_config(self, values: dict[str, Any]) -> dict[str, Any]:
        """Validate all values first (:class:`ParameterError`), then apply; return the new config."""
        ...

    def start(self) -> None:
        """Start an acquisition; :class:`DetectorStateError` if one is running."""
        ...

    def stop(self) -> None:
        """Abort the acquisition; :class:`DetectorStateError` if idle."""
        ...

    def status(self) -> str:
        """slsdet run status name: IDLE, RUNNING, WAITING, TRANSMITTING, RUN_FINISHED, STOPPED or ERROR."""
        ...

    def configure_receiver(self, dst_ip: str, start_udp_port: int) -> None:
        """Send module i's UDP to ``dst_ip:start_udp_port + i`` (Eiger: ports ``+2i`` and ``+2i+1``)."""
        ...

    def close(self) -> None:
        """Release connections and shared memory; idempotent."""
        ...


IDLE_STATES: frozenset[str] = frozenset({"IDLE", "STOPPED", "RUN_FINISHED"})
ACTIVE_STATES: frozenset[str] = frozenset({"RUNNING", "WAITING", "TRANSMITTING"})
