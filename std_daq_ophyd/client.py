"""REST client of the std-daq backend: the only way the ophyd devices talk to the DAQ.

Keeping every call here (and nothing else in the devices speaking HTTP) is what lets the beamline
IPython and the DAQ server be different machines. Errors come back as two exception types with a
message a scientist can act on: :class:`StdDaqUnreachable` (nothing answers at the URL) and
:class:`StdDaqError` (the backend answered and refused; its own explanation is included).
"""

from __future__ import annotations

from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:5000"


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


class StdDaqClient:
    """Thin, synchronous client of one backend (``url`` = its REST base URL, any host)."""

    def __init__(self, url: str = DEFAULT_URL, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._http = httpx.Client(base_url=self.url, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __repr__(self) -> str:
        return f"StdDaqClient({self.url!r})"

    # -- plumbing -----------------------------------------------------------------------------
    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise StdDaqUnreachable(
                f"std-daq backend at {self.url} did not answer {method} {path} within "
                f"{self.timeout:g} s ({type(exc).__name__})"
            ) from None
        except httpx.TransportError as exc:
            raise StdDaqUnreachable(
                f"std-daq backend at {self.url} is unreachable ({exc or type(exc).__name__}); "
                "is it running (`std-daq up CONFIG`, `std-daq rest CONFIG` or `std-daq demo`)?"
            ) from None
        if response.status_code >= 400:
            raise StdDaqError(
                f"std-daq {method} {path} failed (HTTP {response.status_code}): {_detail(response)}",
                response.status_code,
            )
        try:
            return response.json()
        except ValueError:
            raise StdDaqUnreachable(
                f"{self.url}{path} answered with something that is not JSON: is this a std-daq backend?"
            ) from None

    # -- service --------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        """``GET /health``: detector name, broker kind, pipeline state."""
        return dict(self._call("GET", "/health"))

    def daq_config(self) -> dict[str, Any]:
        """``GET /config``: the DAQ's detector JSON (image size, bit depth, type ...)."""
        return dict(self._call("GET", "/config"))

    # -- detector -------------------------------------------------------------------------------
    def detector_settings(self, detector: str) -> dict[str, Any]:
        """``GET /detector/<name>``: triggers, timing, frames, period, exptime, dr, ..."""
        return dict(self._call("GET", f"/detector/{detector}"))

    def configure_detector(self, detector: str, settings: dict[str, Any]) -> dict[str, Any]:
        """``POST /detector/<name>`` with ``{"config": settings}`` (validated as a whole by the backend)."""
        return dict(self._call("POST", f"/detector/{detector}", json={"config": settings}))

    def detector_command(self, detector: str, cmd: str) -> dict[str, Any]:
        """``POST /detector/<name>`` with ``{"cmd": START|STOP|STATUS}``."""
        return dict(self._call("POST", f"/detector/{detector}", json={"cmd": cmd}))

    def detector_status(self, detector: str) -> str:
        return str(self.detector_command(detector, "STATUS").get("status"))

    # -- writer ---------------------------------------------------------------------------------
    def write_async(self, request: dict[str, Any]) -> str:
        """``POST /write_async``; returns the request id."""
        return str(self._call("POST", "/write_async", json=request)["request_id"])

    def request_status(self, request_id: str) -> dict[str, Any]:
        """``GET /requests/<id>``: state, n_written, n_images, output_file, message, ..."""
        return dict(self._call("GET", f"/requests/{request_id}"))

    def stop_request(self, request_id: str, *, finish: bool = False, wait: bool = True) -> dict[str, Any]:
        """``POST /requests/<id>/stop``. ``finish``: end the file now as *completed* with the images
        written so far (the end of an open-ended acquisition) instead of *interrupted* (a kill)."""
        params: dict[str, Any] = {"wait": "true" if wait else "false"}
        if finish:
            params["mode"] = "finish"
        return dict(self._call("POST", f"/requests/{request_id}/stop", params=params))

    # -- EPICS writer ---------------------------------------------------------------------------
    def epics_write_async(self, request: dict[str, Any]) -> str:
        """``POST /epics/write_async`` (start/stop pulse id, channels, output_file); returns the request id,
        followed like any other with :meth:`request_status` (its ``result`` names the datasets)."""
        return str(self._call("POST", "/epics/write_async", json=request)["request_id"])
