"""What the IPython beamline profile is made of, as plain functions a test can call.

``load_beamline(path)`` reads the YAML beamline config, makes sure a DAQ answers at its URL (starting
a :class:`~std_daq_ophyd.sim.LocalDaq`, the processes of ``std-daq up``, if it does not and the config
allows it), builds the devices it lists and a document store. The config::

    daq:
      url: http://127.0.0.1:5000      # REST API of the DAQ (any host)
      embedded_fallback: true         # nothing answers there: run a simulated DAQ from here
      detector_type: jungfrau         # ... of this type (jungfrau | eiger | gigafrost)
      data_dir: ~/beamtime            # default folder of the files (a folder the DAQ may write to;
                                      # unset: STD_DAQ_DATA_DIR, else the DAQ's data root)
    catalog: tiled                    # tiled (in-memory Tiled catalog + TiledWriter) | memory
    devices:
      det:
        class: std_daq_ophyd.StdDaqDetector     # any importable class; "url" is filled in for
        kwargs: {frames_per_trigger: 2}         # std-daq devices unless given
      motor:
        class: ophyd.sim.SynAxis

``kwargs`` that name a signal of the device (``frames_per_trigger``, ``period`` ...) are put on that
signal after construction, everything else goes to the constructor.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from ophyd import Device, Signal

from std_daq_ophyd.client import StdDaqClient, StdDaqUnreachable
from std_daq_ophyd.writer import default_output_dir

log = logging.getLogger(__name__)

CONFIG_ENV = "STD_DAQ_BEAMLINE"
STD_DAQ_CLASSES = ("StdDaqDetector", "EpicsBuffer")


class RunStore:
    """A databroker-free in-memory document store: ``store.runs[-1]`` is a list of (name, doc)."""

    def __init__(self) -> None:
        self.runs: list[list[tuple[str, dict[str, Any]]]] = []

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        if name == "start":
            self.runs.append([])
        if self.runs:
            self.runs[-1].append((name, doc))

    @property
    def last(self) -> list[tuple[str, dict[str, Any]]]:
        if not self.runs:
            raise LookupError("no run recorded yet")
        return self.runs[-1]

    def files(self, run: int = -1) -> list[str]:
        """Files referenced by a run (its StreamResources), in order."""
        from std_daq_ophyd.documents import uri_path

        seen: dict[str, None] = {}
        for name, doc in self.runs[run]:
            if name == "stream_resource":
                seen[uri_path(doc["uri"])] = None
        return list(seen)


@dataclass
class Beamline:
    """What the profile puts into the user namespace (``devices`` by name)."""

    url: str
    devices: dict[str, Any]
    store: RunStore
    tiled: Any = None  # a tiled client when catalog: tiled
    tiled_writer: Any = None
    daq: Any = None  # the LocalDaq when the fallback started one
    _closers: list[Any] = field(default_factory=list)

    def close(self) -> None:
        for closer in reversed(self._closers):
            try:
                closer()
            except Exception:
                log.exception("closing the beamline failed")
        self._closers.clear()


def read_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    with open(path) as f:
        config = yaml.safe_load(f) or {}
    if not isinstance(config, dict):
        raise ValueError(f"{path}: the beamline config must be a mapping, got {type(config).__name__}")
    unknown = set(config) - {"daq", "catalog", "devices"}
    if unknown:
        raise ValueError(f"{path}: unknown sections {sorted(unknown)} (expected daq, catalog, devices)")
    return config


def _import(dotted: str) -> Any:
    module, _, name = dotted.rpartition(".")
    if not module:
        raise ValueError(f"device class {dotted!r} must be a dotted path (module.Class)")
    return getattr(importlib.import_module(module), name)


def ensure_daq(url: str, fallback: bool, detector_type: str = "jungfrau") -> tuple[str, Any]:
    """``(url, None)`` if a DAQ answers at ``url``; else, with ``fallback``, start an embedded one and
    return its URL and itself; else raise :class:`StdDaqUnreachable`."""
    client = StdDaqClient(url, timeout=5.0)
    try:
        client.health()
        return url, None
    except StdDaqUnreachable:
        if not fallback:
            raise
    finally:
        client.close()
    from std_daq_ophyd.sim import LocalDaq, simulated_config

    daq = LocalDaq(simulated_config(detector_type)).start()
    log.warning("no std-daq at %s: started an embedded simulated %s DAQ at %s (the processes of "
                "`std-daq up`, stopped with this session)", url, detector_type, daq.url)
    return daq.url, daq


def build_device(name: str, spec: dict[str, Any], url: str, data_dir: str | None) -> Any:
    cls = _import(str(spec["class"]))
    kwargs = dict(spec.get("kwargs") or {})
    if cls.__name__ in STD_DAQ_CLASSES:
        kwargs.setdefault("url", url)
        if data_dir:
            kwargs.setdefault("output_dir", data_dir)
    is_device = isinstance(cls, type) and issubclass(cls, Device)
    components = set(cls.component_names) if is_device else set()
    signal_values = {k: kwargs.pop(k) for k in list(kwargs) if k in components}
    device = cls(name=name, **kwargs)
    for key, value in signal_values.items():
        signal = getattr(device, key)
        if not isinstance(signal, Signal):
            raise ValueError(f"devices.{name}.kwargs.{key}: not a signal of {cls.__name__}")
        signal.put(value)
    return device


def make_tiled(data_dir: str) -> tuple[Any, Any, list[Any]]:
    """An in-memory Tiled catalog served in-process, its client and a TiledWriter for it."""
    import tiled.catalog
    import tiled.client
    import tiled.server.app
    from bluesky.callbacks.tiled_writer import TiledWriter

    work = Path(tempfile.mkdtemp(prefix="std-daq-tiled-"))
    catalog = tiled.catalog.in_memory(
        writable_storage={"filesystem": str(work / "data"), "sql": f"duckdb:///{work}/catalog.db"},
        readable_storage=[data_dir, tempfile.gettempdir()],
    )
    context = tiled.client.Context.from_app(tiled.server.app.build_app(catalog))
    client = tiled.client.from_context(context)
    return client, TiledWriter(client), [lambda: shutil.rmtree(work, ignore_errors=True), context.close]


def load_beamline(path: str | os.PathLike[str] | None = None) -> Beamline:
    """Everything the profile needs, from the YAML config (default: ``$STD_DAQ_BEAMLINE``)."""
    path = path or os.environ.get(CONFIG_ENV)
    if not path:
        raise ValueError(f"no beamline config given (set {CONFIG_ENV})")
    config = read_config(path)
    daq_cfg = dict(config.get("daq") or {})
    data_dir = os.path.expanduser(str(daq_cfg.get("data_dir") or "")) or None
    if data_dir:
        os.makedirs(data_dir, exist_ok=True)
    url, daq = ensure_daq(str(daq_cfg.get("url", "http://127.0.0.1:5000")),
                          bool(daq_cfg.get("embedded_fallback", True)),
                          str(daq_cfg.get("detector_type", "jungfrau")))
    beamline = Beamline(url=url, devices={}, store=RunStore(), daq=daq)
    if daq is not None:
        beamline._closers.append(daq.stop)
    try:
        for name, spec in (config.get("devices") or {}).items():
            beamline.devices[name] = build_device(name, spec, url, data_dir)
        if str(config.get("catalog", "memory")) == "tiled":
            try:
                beamline.tiled, beamline.tiled_writer, closers = make_tiled(data_dir or default_output_dir())
                beamline._closers.extend(closers)
            except ImportError as exc:
                log.warning("catalog: tiled is not installed (%s); keeping documents in memory only", exc)
    except BaseException:
        beamline.close()
        raise
    return beamline
