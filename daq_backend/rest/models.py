"""Request and answer shapes of the REST API, for validation and the OpenAPI schema.

Three families share one server:

* the seed's REST v1 (``/write_sync``, ``/write_async``, ``/write_kill``, ``/detector``), shapes kept;
* what a client needs beyond the seed (``/requests/{id}``, ``/health``, ``/stats``, ``/config``);
* the later admin interface (REST v2: ``/writer/*``, ``/daq/*``) used by ``std_daq_client``.

The write request itself is :class:`daq_backend.writer.request.WriteRequest` (one definition for the
broker, the REST edge and the CLI).
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from daq_backend.messages import RequestState
from daq_backend.writer.request import WriteRequest

#: what a write request records: detector images, or EPICS channels
RequestKind = Literal["detector", "epics"]


class ErrorBody(BaseModel):
    """Every 4xx/5xx answer outside the admin interface: ``detail`` says what is wrong."""

    detail: str = Field(description="what is wrong, naming the field or resource")
    errors: list[dict[str, Any]] | None = Field(default=None, description="per-field validation errors")
    request_id: str | None = None


class DetectorErrorBody(ErrorBody):
    """Errors of ``/detector``: the seed's ``{"response": <text>}`` plus ``detail``."""

    response: str = Field(description="the seed's answer text, e.g. 'Parameter not valid: FOO'")


# -- seed REST v1 --------------------------------------------------------------------------------


class KillRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1, max_length=200, description="id returned by write_async")


class WriteResult(BaseModel):
    """The seed's ``response`` object (``output_file``, ``status``, timestamps) plus progress fields."""

    output_file: str | None
    status: str = Field(description="the broker's final action: request_success or request_fail")
    init_timestamp: float | None = None
    end_timestamp: float | None = None
    state: RequestState
    n_images: int | None = None
    n_written: int = 0
    message: str | None = None


class WriteSyncResponse(BaseModel):
    request_id: str
    response: WriteResult


class WriteAsyncResponse(BaseModel):
    request_id: str
    output_file: str | None = Field(default=None, description="the file this request writes")


class DetectorRequest(BaseModel):
    """``POST /detector`` / ``/detector/{name}``: a configuration change and/or a command."""

    model_config = ConfigDict(extra="forbid")

    det_name: str | None = Field(default=None, max_length=200, description="required on POST /detector")
    config: dict[str, Any] | None = Field(
        default=None,
        description="parameters: triggers, timing, frames, period, exptime, dr, speed, tengiga, threshold",
        examples=[{"frames": 5, "dr": 32}],
    )
    cmd: str | None = Field(default=None, max_length=50, description="START, STOP or STATUS")


class DetectorResponse(BaseModel):
    response: str = Field(description="request_success, or request_success (what else it changed: the DAQ's "
                                      "bit_depth following dr)")
    status: str | None = Field(default=None, description="detector status, answered to cmd STATUS")


class DetectorConfigResponse(BaseModel):
    """The seed's ``GET /detector/<name>`` answer."""

    model_config = ConfigDict(extra="allow")

    det_name: str
    triggers: Any = None
    timing: Any = None
    frames: Any = None
    period: Any = None
    exptime: Any = None
    dr: Any = None
    speed: Any = None
    tengiga: Any = None
    threshold: Any = None


# -- beyond the seed -----------------------------------------------------------------------------


class RequestStatus(BaseModel):
    request_id: str
    kind: RequestKind = Field(description="detector images or EPICS channels")
    state: RequestState
    n_written: int = Field(description="images written so far")
    n_images: int | None = Field(description="images requested")
    n_missing_images: int = Field(default=0, description="images written as lost (zero-filled rows)")
    n_incomplete_images: int = Field(
        default=0, description="images written with missing packets or a module id mismatch"
    )
    output_file: str | None
    message: str | None = Field(description="the writer's final message or failure reason")
    warning: str | None = Field(default=None, description="a warning of the writer, e.g. less free space "
                                "in the output folder than the requested images need")
    init_timestamp: float | None
    end_timestamp: float | None
    created: float = Field(description="when this API first saw the request (unix time)")
    request: dict[str, Any] | None = Field(description="the request body as the services received it")
    services: dict[str, str] = Field(description="last action reported by each service")
    result: Any = Field(default=None, description="the service's success message (file summary)")


class HealthResponse(BaseModel):
    """``GET /health``: 200 while the API can take requests; 503 (same body) while the broker is
    unreachable."""

    status: Literal["ok", "unavailable"] = "ok"
    detector_name: str
    uptime: float = Field(description="seconds since this API started")
    broker: Literal["up", "down"] = Field(description="whether this API reaches its broker now")
    broker_kind: str = Field(default="unknown", description="transport in use: embedded or amqp")
    broker_where: str = Field(default="", description="the broker's address (no credentials)")
    broker_error: str | None = Field(default=None, description="why the broker is unreachable")
    commands_need_token: bool = Field(
        default=False, description="commands (POST, PUT, DELETE) need 'Authorization: Bearer <token>'"
    )
    requests_active: int
    pipeline: Literal["up", "down", "stale", "unknown"]


class StreamStats(BaseModel):
    images_per_second: float = 0.0
    bytes_per_second: float = 0.0


class ReceiverStats(BaseModel):
    packets_per_second: float = 0.0
    bytes_per_second: float = 0.0


class LostStats(BaseModel):
    packets: int = Field(default=0, description="packets that never arrived (all receivers)")
    frames_incomplete: int = Field(default=0, description="module frames missing packets")
    images_missing_packets: int = Field(default=0, description="images completed with zero-filled gaps")
    images_id_mismatch: int = Field(default=0, description="images whose modules disagreed on the id")
    missing_module_frames: int = 0


class RejectedStats(BaseModel):
    bad_datagrams: int = Field(default=0, description="datagrams that are no packet of this detector")
    module_id: int = Field(default=0, description="packets of another header module id than the port's")
    out_of_range: int = Field(default=0,
                              description="packets with a frame number or pulse id no detector sends")
    out_of_window: int = Field(default=0, description="packets whose numbering never formed a stream")


class ProcessStats(BaseModel):
    pid: int | None = None
    alive: bool | None = None
    restarts: int = 0
    failed: str | None = Field(default=None, description="why the process cannot start (not restarted)")
    counters: dict[str, Any] = Field(default_factory=dict)
    rates: dict[str, float] = Field(default_factory=dict)


class StatsResponse(BaseModel):
    pipeline: Literal["up", "down", "stale", "unknown"]
    updated: float | None = Field(description="when the supervisor last refreshed the counters")
    detector: StreamStats = Field(description="assembled images leaving the readout")
    writer: StreamStats = Field(description="images written to disk")
    receivers: ReceiverStats
    rejected: RejectedStats = Field(default_factory=RejectedStats,
                                    description="packets the receivers refused, by reason (never placed)")
    lost: LostStats
    processes: dict[str, ProcessStats]


# -- admin interface (REST v2, std_daq_client) ---------------------------------------------------


class ApiStatus(str, Enum):
    OK = "ok"
    ERROR = "error"


class AdminWriteRequest(WriteRequest):
    """``/writer/write_sync`` and ``/writer/write_async``: the write request plus v2's ``run_id``
    (default: the request time in ns), stored as ``run_id`` in the file's metadata."""

    run_id: int | str | None = Field(
        default=None, description="run id, any number or text (default: the request time, time_ns())"
    )


class AcquisitionInfo(BaseModel):
    n_images: int | None = None
    output_file: str | None = None
    run_id: int | str | None = None


class AcquisitionStats(BaseModel):
    n_write_completed: int = 0
    n_write_requested: int = 0
    start_time: float | None = None
    stop_time: float | None = None


AcquisitionStateName = Literal[
    "FINISHED", "FAILED", "WRITING", "WAITING_IMAGES", "ACQUIRING_IMAGES", "FLUSHING_IMAGES"
]


class AcquisitionLog(BaseModel):
    state: AcquisitionStateName
    message: str = Field(description="Completed., Interrupted. or ERROR:...")
    info: AcquisitionInfo
    stats: AcquisitionStats


class WriterStatus(BaseModel):
    state: Literal["READY", "WRITING", "UNKNOWN"]
    acquisition: AcquisitionLog


class AdminResponse(BaseModel):
    """Every admin answer: ``status`` ok/error and a human-readable ``message`` (HTTP 200 even on
    errors, as REST v2 did, so ``std_daq_client`` raises its ``StdDaqAdminException``)."""

    status: ApiStatus
    message: str


class AdminWriterResponse(AdminResponse):
    writer: WriterStatus | None = None


class AdminConfigResponse(AdminResponse):
    config: dict[str, Any] | None = None
    config_id: str | None = None


class AdminStats(BaseModel):
    detector: StreamStats
    writer: StreamStats


class AdminStatsResponse(AdminResponse):
    stats: AdminStats | None = None


class AdminLogsResponse(AdminResponse):
    logs: list[AcquisitionLog] | None = Field(default=None, description="finished acquisitions, newest first")


class DeploymentStats(BaseModel):
    start_time: float | None = None
    stop_time: float | None = None


class DeploymentStatus(BaseModel):
    config_id: str | None
    status: Literal["UNKNOWN", "SUCCESS", "ERROR", "RUNNING"]
    message: str
    servers: dict[str, Literal["Deploying", "Done", "Error"]]
    stats: DeploymentStats


class AdminDeploymentResponse(AdminResponse):
    deployment: DeploymentStatus | None = None
