"""REST client of the std-daq backend: the only way the ophyd devices talk to the DAQ.

Keeping every call here (and nothing else in the devices speaking HTTP) is what lets the beamline
IPython and the DAQ server be different machines. Both device families use it: the ophyd v1 devices
through the blocking :class:`StdDaqClient`, the ophyd-async device through :class:`AsyncStdDaqClient`.
Each endpoint is described once (:class:`Api` builds an :class:`ApiCall`: what is sent and which
model the answer is decoded into), so both clients send the same requests and return the same typed
answers — the REST API's own pydantic models (``daq_backend.rest.models``), not dicts.

Errors come back as two exception types with a message a scientist can act on:
:class:`StdDaqUnreachable` (nothing, or nothing that speaks the std-daq API, answers at the URL) and
:class:`StdDaqError` (the backend answered and refused; its own explanation is included).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from daq_backend.auth import TOKEN_ENV, client_token
from daq_backend.config import ConfigError, DetectorConfig, parse_config
from daq_backend.rest import models as m
from daq_backend.writer.request import WriteRequest

DEFAULT_URL = "http://127.0.0.1:5000"

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


class StdDaqError(RuntimeError):
    """The backend refused a call; ``status_code`` is its HTTP status, the message its reason."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class StdDaqUnreachable(StdDaqError, ConnectionError):
    """Nothing (or nothing that speaks the std-daq API) answers at the configured URL."""


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:500] or response.reason_phrase
    if isinstance(body, dict):
        for key in ("detail", "response", "message"):
            if isinstance(body.get(key), str):
                return str(body[key])
    return str(body)[:500]


def _body(request: Mapping[str, Any] | BaseModel) -> Any:
    if isinstance(request, BaseModel):
        return request.model_dump(mode="json", exclude_none=True)
    return dict(request)


@dataclass(frozen=True)
class ApiCall(Generic[T]):
    """One REST call: ``method path`` with an optional JSON body and query, how its answer is read, and
    which HTTP error codes still carry an answer to decode (``accept``)."""

    method: str
    path: str
    decode: Callable[[Any], T]
    json: Any = None
    params: dict[str, str] = field(default_factory=dict)
    accept: tuple[int, ...] = ()


def _model(model: type[M]) -> Callable[[Any], M]:
    return model.model_validate


def _request_id(body: Any) -> str:
    return m.WriteAsyncResponse.model_validate(body).request_id


class Api:
    """The std-daq REST endpoints the devices use, each as an :class:`ApiCall` (no I/O here)."""

    @staticmethod
    def health() -> ApiCall[m.HealthResponse]:
        """``GET /health``: detector name, broker state, pipeline state, active requests (also while
        the broker is down: the API answers 503 with the same body then)."""
        return ApiCall("GET", "/health", _model(m.HealthResponse), accept=(503,))

    @staticmethod
    def daq_config() -> ApiCall[DetectorConfig]:
        """``GET /config``: the DAQ's detector configuration (image size, bit depth, type ...)."""
        return ApiCall("GET", "/config", parse_config)

    @staticmethod
    def detector_settings(detector: str) -> ApiCall[m.DetectorConfigResponse]:
        """``GET /detector/<name>``: triggers, timing, frames, period, exptime, dr, ..."""
        return ApiCall("GET", f"/detector/{detector}", _model(m.DetectorConfigResponse))

    @staticmethod
    def configure_detector(detector: str, settings: Mapping[str, Any]) -> ApiCall[m.DetectorResponse]:
        """``POST /detector/<name>`` with ``{"config": settings}`` (validated as a whole by the backend)."""
        return ApiCall("POST", f"/detector/{detector}", _model(m.DetectorResponse),
                       json={"config": dict(settings)})

    @staticmethod
    def detector_command(detector: str, cmd: str) -> ApiCall[m.DetectorResponse]:
        """``POST /detector/<name>`` with ``{"cmd": START|STOP|STATUS}``."""
        return ApiCall("POST", f"/detector/{detector}", _model(m.DetectorResponse), json={"cmd": cmd})

    @staticmethod
    def write_async(request: Mapping[str, Any] | WriteRequest) -> ApiCall[str]:
        """``POST /write_async``; the answer is the request id."""
        return ApiCall("POST", "/write_async", _request_id, json=_body(request))

    @staticmethod
    def request_status(request_id: str) -> ApiCall[m.RequestStatus]:
        """``GET /requests/<id>``: state, n_written of n_images, bad-image counts, output_file, message."""
        return ApiCall("GET", f"/requests/{request_id}", _model(m.RequestStatus))

    @staticmethod
    def stop_request(request_id: str, *, finish: bool = False, wait: bool = True) -> ApiCall[m.RequestStatus]:
        """``POST /requests/<id>/stop``. ``finish``: end the file now as *completed* with the images
        written so far (the end of an open-ended acquisition) instead of *interrupted* (a kill)."""
        params = {"wait": "true" if wait else "false"}
        if finish:
            params["mode"] = "finish"
        return ApiCall("POST", f"/requests/{request_id}/stop", _model(m.RequestStatus), params=params)

    @staticmethod
    def epics_write_async(request: Mapping[str, Any]) -> ApiCall[str]:
        """``POST /epics/write_async`` (start/stop pulse id, channels, output_file); the answer is the
        request id, followed like any other request (its ``result`` names the datasets)."""
        return ApiCall("POST", "/epics/write_async", _request_id, json=dict(request))


class _ClientBase:
    """What both clients share: the base URL, the time limit of one call, the bearer token, and
    turning an HTTP exchange into the typed answer or one of the two exceptions."""

    def __init__(self, url: str, timeout: float, token: str | None) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        token = client_token(token)
        self.token = token
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    def _transport_error(self, call: ApiCall[Any], exc: httpx.TransportError) -> StdDaqUnreachable:
        if isinstance(exc, httpx.TimeoutException):
            return StdDaqUnreachable(
                f"std-daq backend at {self.url} did not answer {call.method} {call.path} within "
                f"{self.timeout:g} s ({type(exc).__name__})"
            )
        return StdDaqUnreachable(
            f"std-daq backend at {self.url} is unreachable ({exc or type(exc).__name__}); "
            "is it running (`std-daq up CONFIG`, `std-daq rest CONFIG` or `std-daq demo`)?"
        )

    def _answer(self, call: ApiCall[T], response: httpx.Response) -> T:
        if response.status_code == 401:
            hint = ("the token this client sent is not the DAQ's" if self.token
                    else f"this client sent no token: pass token=... or set {TOKEN_ENV}")
            raise StdDaqError(f"std-daq {call.method} {call.path} refused (HTTP 401): {_detail(response)} "
                              f"({hint})", 401)
        if response.status_code >= 400 and response.status_code not in call.accept:
            raise StdDaqError(f"std-daq {call.method} {call.path} failed (HTTP {response.status_code}): "
                              f"{_detail(response)}", response.status_code)
        try:
            body = response.json()
        except ValueError:
            raise StdDaqUnreachable(
                f"{self.url}{call.path} answered with something that is not JSON: is this a std-daq backend?"
            ) from None
        try:
            return call.decode(body)
        except ConfigError as exc:
            raise StdDaqError(f"the DAQ at {self.url} reports an unusable configuration: {exc}") from None
        except (ValidationError, ValueError, TypeError, KeyError) as exc:
            raise StdDaqError(
                f"{self.url}{call.path} answered in an unexpected shape ({exc}); "
                "is the backend the same std-daq version as this client?"
            ) from None


class StdDaqClient(_ClientBase):
    """Blocking client of one backend (``url`` = its REST base URL, any host; ``token``: sent as
    ``Authorization: Bearer <token>``; None: ``STD_DAQ_TOKEN`` / ``STD_DAQ_TOKEN_FILE``, else none)."""

    def __init__(self, url: str = DEFAULT_URL, timeout: float = 30.0, token: str | None = None) -> None:
        super().__init__(url, timeout, token)
        self._http = httpx.Client(base_url=self.url, timeout=timeout, headers=self.headers)

    def close(self) -> None:
        self._http.close()

    def send(self, call: ApiCall[T]) -> T:
        """Make one call and return its decoded answer."""
        try:
            response = self._http.request(call.method, call.path, json=call.json, params=call.params or None)
        except httpx.TransportError as exc:
            raise self._transport_error(call, exc) from None
        return self._answer(call, response)

    # -- service --------------------------------------------------------------------------------
    def health(self) -> m.HealthResponse:
        return self.send(Api.health())

    def daq_config(self) -> DetectorConfig:
        return self.send(Api.daq_config())

    # -- detector -------------------------------------------------------------------------------
    def detector_settings(self, detector: str) -> m.DetectorConfigResponse:
        return self.send(Api.detector_settings(detector))

    def configure_detector(self, detector: str, settings: Mapping[str, Any]) -> m.DetectorResponse:
        return self.send(Api.configure_detector(detector, settings))

    def detector_command(self, detector: str, cmd: str) -> m.DetectorResponse:
        return self.send(Api.detector_command(detector, cmd))

    def detector_status(self, detector: str) -> str:
        """The detector's state as it reports it (IDLE, RUNNING, WAITING, ERROR, ...)."""
        return str(self.detector_command(detector, "STATUS").status)

    # -- writer ---------------------------------------------------------------------------------
    def write_async(self, request: Mapping[str, Any] | WriteRequest) -> str:
        return self.send(Api.write_async(request))

    def request_status(self, request_id: str) -> m.RequestStatus:
        return self.send(Api.request_status(request_id))

    def stop_request(self, request_id: str, *, finish: bool = False, wait: bool = True) -> m.RequestStatus:
        return self.send(Api.stop_request(request_id, finish=finish, wait=wait))

    # -- EPICS writer ---------------------------------------------------------------------------
    def epics_write_async(self, request: Mapping[str, Any]) -> str:
        return self.send(Api.epics_write_async(request))


class AsyncStdDaqClient(_ClientBase):
    """The same calls as :class:`StdDaqClient`, awaitable (for ophyd-async devices).

    The HTTP connection pool belongs to one event loop; it is opened on first use in the running
    loop (the RunEngine's) and opened anew if the client is later used from another loop."""

    def __init__(self, url: str = DEFAULT_URL, timeout: float = 30.0, token: str | None = None) -> None:
        super().__init__(url, timeout, token)
        self._http: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _client(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self._http is None or self._loop is not loop:
            self._http = httpx.AsyncClient(base_url=self.url, timeout=self.timeout, headers=self.headers)
            self._loop = loop
        return self._http

    async def aclose(self) -> None:
        if self._http is not None and self._loop is asyncio.get_running_loop():
            await self._http.aclose()
        self._http = None
        self._loop = None

    async def send(self, call: ApiCall[T]) -> T:
        """Make one call and return its decoded answer."""
        try:
            response = await self._client().request(call.method, call.path, json=call.json,
                                                    params=call.params or None)
        except httpx.TransportError as exc:
            raise self._transport_error(call, exc) from None
        return self._answer(call, response)

    # -- service --------------------------------------------------------------------------------
    async def health(self) -> m.HealthResponse:
        return await self.send(Api.health())

    async def daq_config(self) -> DetectorConfig:
        return await self.send(Api.daq_config())

    # -- detector -------------------------------------------------------------------------------
    async def detector_settings(self, detector: str) -> m.DetectorConfigResponse:
        return await self.send(Api.detector_settings(detector))

    async def configure_detector(self, detector: str, settings: Mapping[str, Any]) -> m.DetectorResponse:
        return await self.send(Api.configure_detector(detector, settings))

    async def detector_command(self, detector: str, cmd: str) -> m.DetectorResponse:
        return await self.send(Api.detector_command(detector, cmd))

    async def detector_status(self, detector: str) -> str:
        """The detector's state as it reports it (IDLE, RUNNING, WAITING, ERROR, ...)."""
        return str((await self.detector_command(detector, "STATUS")).status)

    # -- writer ---------------------------------------------------------------------------------
    async def write_async(self, request: Mapping[str, Any] | WriteRequest) -> str:
        return await self.send(Api.write_async(request))

    async def request_status(self, request_id: str) -> m.RequestStatus:
        return await self.send(Api.request_status(request_id))

    async def stop_request(self, request_id: str, *, finish: bool = False,
                           wait: bool = True) -> m.RequestStatus:
        return await self.send(Api.stop_request(request_id, finish=finish, wait=wait))

    # -- EPICS writer ---------------------------------------------------------------------------
    async def epics_write_async(self, request: Mapping[str, Any]) -> str:
        return await self.send(Api.epics_write_async(request))
