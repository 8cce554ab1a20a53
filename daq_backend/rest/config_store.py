"""The DAQ's detector config as the REST API changes it: partial updates, applied or refused.

:class:`ConfigStore` holds the live :class:`DetectorConfig`, validates a partial change against it
(the Era B field names of the image size are accepted, see :data:`daq_backend.config.ERA_B_NAMES`),
has the supervisor make it live (or refuses it), writes the applied config to its file and keeps the
deployment status of the last change (the admin interface's ``/daq/deployment``). Errors are
:mod:`daq_backend.rest.errors`: :class:`Invalid` for a bad change, :class:`Conflict` for one nothing
can apply or the supervisor refused, :class:`Unavailable` when the supervisor cannot be reached.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from daq_backend.config import ERA_B_NAMES, ConfigError, DetectorConfig, parse_config
from daq_backend.rest.errors import Conflict, Invalid, Unavailable


def config_id(config: DetectorConfig) -> str:
    """A short hash of the config's JSON form: the admin interface's ``config_id``."""
    text = json.dumps(config.to_json_dict(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class ConfigStore:
    """The detector config of this DAQ, changed by partial updates (a field the caller did not give —
    or gave as ``null`` — keeps its value).

    A change is only taken once ``apply`` made it live (the supervisor restarting what must restart;
    it answers with a message saying so, or raises ``ConfigNotApplied`` / ``SupervisorUnreachable``):
    without ``apply`` a change is refused, as nothing could make it take effect. An applied config is
    then written to ``path`` (atomically), if given."""

    def __init__(
        self,
        config: DetectorConfig,
        path: Path | None = None,
        apply: Callable[[DetectorConfig], str] | None = None,
    ) -> None:
        self._config = config
        self.path = path
        self.apply = apply
        self.last_message = "Initial configuration."
        self._lock = threading.Lock()
        now = time.time()
        self._deployment: dict[str, Any] = {
            "config_id": config_id(config),
            "status": "SUCCESS",
            "message": self.last_message,
            "servers": {socket.gethostname(): "Done"},
            "stats": {"start_time": now, "stop_time": now},
        }

    @property
    def config(self) -> DetectorConfig:
        return self._config

    @property
    def config_id(self) -> str:
        return str(self._deployment["config_id"])

    def deployment(self) -> dict[str, Any]:
        with self._lock:
            return json.loads(json.dumps(self._deployment))

    def merged(self, changes: Any) -> DetectorConfig:
        """Validate ``changes`` against the current config without applying them."""
        if not isinstance(changes, dict):
            raise Invalid(f"config update must be a JSON object, got {type(changes).__name__}")
        current = self._config.to_json_dict()
        known = set(DetectorConfig.model_fields) | set(current) | set(ERA_B_NAMES)
        unknown = sorted(str(k) for k in changes if k not in known)
        if unknown:
            raise Invalid(f"unknown config field(s): {', '.join(unknown)}")
        updates: dict[str, Any] = {ERA_B_NAMES.get(str(k), str(k)): v for k, v in changes.items()
                                   if v is not None}
        name = updates.get("detector_name", current["detector_name"])
        if name != current["detector_name"]:
            raise Invalid(
                f"detector_name cannot change on a running DAQ ({current['detector_name']!r} -> {name!r}): "
                "its broker tag and buffers are named after it; start a DAQ with the new config instead",
            )
        try:
            return parse_config({**current, **updates})
        except ConfigError as exc:
            raise Invalid(str(exc)) from None

    def update(self, changes: Any) -> DetectorConfig:
        """Apply ``changes``; returns the config once it is live (``last_message`` says how)."""
        from daq_backend.reconfigure import ConfigNotApplied, SupervisorUnreachable

        new = self.merged(changes)
        with self._lock:
            if new == self._config:
                self.last_message = "The config is live (unchanged)."
                return new
            if self.apply is None:
                raise Conflict("config not applied: nothing runs this DAQ's processes for this API "
                               "(start it with `std-daq up CONFIG`, which applies changes)")
            started = time.time()
            self._deploy_state(config_id(new), "RUNNING", "Deploying.", "Deploying", started, None)
            try:
                message = self.apply(new)
            except (ConfigNotApplied, SupervisorUnreachable) as exc:
                unreachable = isinstance(exc, SupervisorUnreachable)
                detail = f"config not applied: {exc}" + ("" if unreachable else "; the previous config runs")
                self._deploy_state(config_id(new), "ERROR", detail, "Error", started, time.time())
                raise (Unavailable if unreachable else Conflict)(detail) from None
            if self.path is not None:
                try:
                    tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
                    tmp.write_text(json.dumps(new.to_json_dict(), indent=1))
                    os.replace(tmp, self.path)
                except OSError as exc:
                    message += f" ({self.path} not updated: {exc.strerror})"
            self._config = new
            self.last_message = message[:1].upper() + message[1:] + ("" if message.endswith(".") else ".")
            self._deploy_state(config_id(new), "SUCCESS", self.last_message, "Done", started, time.time())
            return new

    def _deploy_state(
        self, cid: str, status: str, message: str, server: str, start: float, stop: float | None
    ) -> None:
        self._deployment = {
            "config_id": cid,
            "status": status,
            "message": message,
            "servers": {socket.gethostname(): server},
            "stats": {"start_time": start, "stop_time": stop},
        }
