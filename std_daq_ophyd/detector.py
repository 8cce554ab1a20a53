"""``StdDaqDetector``: a std-daq detector as an ophyd device, talking to its DAQ's REST API only.

A composition in the manner of ophyd-async's ``StandardDetector`` (whose sim blob detector is three
logics glued together): :class:`~std_daq_ophyd.control.DetectorControl` drives the detector,
:class:`~std_daq_ophyd.writer.StdDaqWriter` the file, :class:`~std_daq_ophyd.documents.StreamDocuments`
turns images on disk into ``StreamResource``/``StreamDatum``, and
:class:`~std_daq_ophyd.acquisition.Acquisition` follows one acquisition to disk. This class only
decides *when* each part acts:

* ``stage``: validate the settings, configure the detector (``frames = frames_per_trigger``), open one
  file for the run — every check happens before the detector is started;
* ``trigger``: start ``frames_per_trigger`` images; the Status finishes when they are on disk;
  one event = one index of shape ``[frames_per_trigger, H, W]``;
* ``kickoff``/``complete``: one acquisition of ``frames_per_trigger * triggers`` images (fly scan);
* ``pause``/``resume``: a trigger cut short by a pause leaves its partial images in the file; the
  repeated trigger goes to a new file (a second StreamResource), so indices always match rows;
* ``unstage`` finishes the file, ``stop`` stops detector and writer at once (the file stays valid).

Timing modes other than ``AUTO_TIMING`` are passed to the detector; each trigger arms it for
``frames_per_trigger`` images, which then wait for the external trigger.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any

from ophyd import Component as Cpt
from ophyd import Device, Kind, Signal
from ophyd.device import Staged
from ophyd.status import Status

from std_daq_ophyd.acquisition import (
    POLICIES,
    Acquisition,
    AcquisitionCancelled,
    ProgressStatus,
    Timeouts,
    apply_policy,
)
from std_daq_ophyd.client import DEFAULT_URL, StdDaqClient, StdDaqError
from std_daq_ophyd.control import DetectorControl, Geometry, Settings, SettingsError
from std_daq_ophyd.documents import AssetDoc, Dataset, StreamDocuments
from std_daq_ophyd.writer import StdDaqWriter

log = logging.getLogger(__name__)

IMAGE_DATASET = "/entry/data/data"
STATUS_DATASET = "/entry/data/status"
META_CHUNK = 4096  # chunking of the per-image datasets in the std-daq file layout


class StdDaqDetector(Device):
    """A std-daq detector. ``StdDaqDetector(name="det", url="http://daq-host:5000")`` is enough;
    ``token``: the DAQ's REST token (default: ``STD_DAQ_TOKEN`` / ``STD_DAQ_TOKEN_FILE``).

    ``nxmx``: what the DAQ cannot know for an NXmx file (``sample_name``, ``source_name``,
    ``instrument_name``, ``incident_wavelength``, ``detector_distance``, ``beam_center_x/y``, ...; see
    the README's HDF5 layout); given, every file this device opens is an NXmx file. The DAQ checks it
    when the file is opened, so a missing field fails ``stage`` naming it."""

    exptime = Cpt(Signal, value=0.001, kind="config", doc="exposure time [s]")
    period = Cpt(Signal, value=0.01, kind="config", doc="frame period [s]")
    frames_per_trigger = Cpt(Signal, value=1, kind="config", doc="images per trigger (per event)")
    triggers = Cpt(Signal, value=1, kind="config", doc="triggers of one fly-scan acquisition")
    timing = Cpt(Signal, value="AUTO_TIMING", kind="config", doc="AUTO_TIMING, TRIGGER_EXPOSURE, ...")
    bit_depth = Cpt(Signal, value=0, kind="config", doc="dynamic range; 0 keeps the detector's")
    bad_image_policy = Cpt(Signal, value="fail", kind="config", doc="fail | warn | ignore")
    n_bad_images = Cpt(Signal, value=0, kind="normal", doc="images of this trigger not good")
    writer = Cpt(StdDaqWriter, "", kind=Kind.normal | Kind.config)

    def __init__(self, prefix: str = "", *, name: str, url: str = DEFAULT_URL,
                 detector_name: str | None = None, output_dir: str | None = None,
                 file_template: str | None = None, bad_image_policy: str = "fail",
                 timeouts: Timeouts | None = None, nxmx: Mapping[str, Any] | None = None,
                 token: str | None = None, **kwargs: Any) -> None:
        super().__init__(prefix, name=name, **kwargs)
        #: the request's ``nxmx`` metadata (sample, source, beam, geometry): every file is an NXmx file
        self.nxmx: dict[str, Any] | None = dict(nxmx) if nxmx else None
        self.client = StdDaqClient(url, token=token)
        self.control = DetectorControl(self.client, detector_name)
        self.timeouts = timeouts or Timeouts()
        if output_dir is not None:
            self.writer.output_dir.put(output_dir)
        if file_template is not None:
            self.writer.file_template.put(file_template)
        self.bad_image_policy.put(bad_image_policy)
        self.geometry: Geometry | None = None
        self._docs: StreamDocuments | None = None
        self._frames = 1
        self._bad_seen = 0  # bad images reported by the writer for the current file
        self._acquisition: Acquisition | None = None
        self._thread: threading.Thread | None = None
        self._fly_status: ProgressStatus | None = None
        self._needs_new_file = False
        self._lock = threading.RLock()

    # -- helpers --------------------------------------------------------------------------------
    @property
    def image_key(self) -> str:
        return f"{self.name}_image"

    @property
    def status_key(self) -> str:
        return f"{self.name}_image_status"

    def _settings(self, frames: int, triggers: int) -> Settings:
        return Settings(self.exptime.get(), self.period.get(), frames, triggers, self.timing.get(),
                        self.bit_depth.get())

    def _require_staged(self, what: str) -> StreamDocuments:
        if self._staged != Staged.yes or self._docs is None:
            raise RuntimeError(f"{self.name}: stage the detector before {what}")
        return self._docs

    def _configure(self, settings: Settings) -> None:
        readback = self.control.configure(settings)
        for signal, key in ((self.exptime, "exptime"), (self.period, "period"), (self.timing, "timing"),
                            (self.bit_depth, "dr")):
            if readback.get(key) is not None:
                signal.put(readback[key])

    # -- stage / unstage ------------------------------------------------------------------------
    def stage(self) -> list[object]:
        frames = self.frames_per_trigger.get()
        policy = self.bad_image_policy.get()
        try:
            settings = self._settings(frames, 1).validate()
            self._settings(frames, self.triggers.get()).validate()
            if policy not in POLICIES:
                raise SettingsError(f"bad_image_policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        except SettingsError as exc:
            raise SettingsError(f"{self.name}: cannot stage: {exc}") from None
        try:
            self.geometry = geometry = self.control.geometry()  # also: is the backend there at all?
            self._configure(settings)
        except StdDaqError as exc:
            raise type(exc)(f"{self.name}: cannot stage: {exc}", exc.status_code) from None
        h, w = geometry.shape
        source = f"std-daq:{self.client.url}/detector/{geometry.detector_name}"
        self._docs = StreamDocuments([
            Dataset(self.image_key, IMAGE_DATASET, (h, w), geometry.dtype.str, (1, h, w)),
            Dataset(self.status_key, STATUS_DATASET, (), "|u1", (META_CHUNK,)),
        ], frames, source)
        self._frames = frames
        staged = super().stage()
        try:
            self._open_file()
        except BaseException as exc:
            super().unstage()
            self._docs = None
            if isinstance(exc, StdDaqError):
                raise type(exc)(f"{self.name}: cannot stage: {exc}", exc.status_code) from None
            raise
        return staged

    def _open_file(self) -> None:
        assert self._docs is not None and self.geometry is not None
        metadata = {"frames_per_trigger": self._frames, "exptime": self.exptime.get(),
                    "period": self.period.get(), "timing": self.timing.get()}
        if self.nxmx:
            metadata["nxmx"] = self.nxmx
        path = self.writer.open(self.geometry.detector_name, metadata=metadata)
        with self._lock:
            self._docs.open_file(path)
            self._bad_seen = 0
        self._needs_new_file = False

    def unstage(self) -> list[object]:
        try:
            self._halt_acquisition()
            progress = self.writer.close()
            if progress is not None and progress.state not in ("completed", "interrupted"):
                log.warning("%s: file %s ended %s: %s", self.name, progress.output_file, progress.state,
                            progress.message)
        finally:
            self._docs = None
            self._fly_status = None
            self._needs_new_file = False
            unstaged = super().unstage()
        return unstaged

    def _halt_acquisition(self, timeout: float = 60.0, abandon: bool = False) -> None:
        """Stop a running acquisition (detector included) and wait until its thread let go."""
        acquisition, thread = self._acquisition, self._thread
        if acquisition is None:
            return
        acquisition.cancel(abandon)
        try:
            self.control.stop()
        except Exception as exc:  # the file must still be closed: report and go on
            log.warning("%s: stopping the detector failed: %s", self.name, exc)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                log.warning("%s: the acquisition thread did not end within %g s", self.name, timeout)

    # -- step scans -----------------------------------------------------------------------------
    def trigger(self) -> ProgressStatus:
        docs = self._require_staged("trigger")
        if self._acquisition is not None:
            raise RuntimeError(f"{self.name}: the previous acquisition is still running")
        if self._needs_new_file:
            self._new_file()
        status = ProgressStatus(self, self._frames, call_stop_on_failure=False)
        self._start(status, self._frames, n_indices=1, docs=docs, start=True)
        return status

    def _start(self, status: ProgressStatus, n_images: int, n_indices: int, docs: StreamDocuments,
               start: bool, incremental: bool = False) -> None:
        """Follow an acquisition in a thread (``start``: start the detector there first)."""
        with self._lock:
            first_row = docs.file_indices * self._frames
            acquisition = Acquisition(
                self.control, self.writer, n_images, first_row=first_row, bad_before=self._bad_seen,
                start=start, status=status, timeouts=self.timeouts,
                expected_duration=n_images * max(float(self.period.get()), float(self.exptime.get())),
            )
            self._acquisition = acquisition
        self._thread = threading.Thread(target=self._follow,
                                        args=(acquisition, status, docs, n_indices, incremental),
                                        name=f"{self.name}-acquisition", daemon=True)
        self._thread.start()

    def _follow(self, acquisition: Acquisition, status: ProgressStatus, docs: StreamDocuments, n_indices: int,
                incremental: bool) -> None:
        """The acquisition thread: follow it, account for its indices and bad images, then resolve the
        Status — last, once the device is ready for the next acquisition."""
        added = 0
        error: BaseException | None = None
        try:
            if incremental:  # fly scans: indices become collectable while the acquisition runs
                def on_rows(rows: int) -> None:
                    nonlocal added
                    done = min(rows // self._frames, n_indices)
                    with self._lock:
                        if done > added and self._docs is docs:
                            docs.add_indices(done - added)
                            added = done

                acquisition.on_rows = on_rows
            outcome = acquisition.run()
            with self._lock:
                if self._docs is docs:
                    docs.add_indices(n_indices - added)
                self._bad_seen = outcome.progress.n_bad
            self.n_bad_images.put(outcome.n_bad)
            apply_policy(self.bad_image_policy.get(), outcome.n_bad, acquisition.n_images,
                         f"{self.name}'s acquisition")
        except AcquisitionCancelled as exc:
            error = None if acquisition.abandoned else exc
        except Exception as exc:
            log.warning("%s: acquisition failed: %s", self.name, exc)
            try:
                self.control.stop()
            except Exception as stop_error:
                log.warning("%s: stopping the detector failed: %s", self.name, stop_error)
            error = exc
        if incremental and self._staged == Staged.yes and not acquisition.cancelled:
            self._restore_step_settings()
        with self._lock:
            if self._acquisition is acquisition:
                self._acquisition = None
        if error is not None:
            status.set_exception(error)
        elif not acquisition.abandoned:
            status.set_finished()

    def describe(self) -> OrderedDict[str, dict[str, Any]]:
        description = super().describe()
        if self._docs is not None:
            description.update(self._docs.data_keys)
        return description

    def collect_asset_docs(self, index: int | None = None) -> Iterator[AssetDoc]:
        with self._lock:
            docs = list(self._docs.collect(index)) if self._docs is not None else []
        yield from docs

    def get_index(self) -> int:
        with self._lock:
            return self._docs.get_index() if self._docs is not None else 0

    # -- fly scans ------------------------------------------------------------------------------
    def kickoff(self) -> Status:
        """Start one acquisition of ``frames_per_trigger * triggers`` images; done once it runs."""
        docs = self._require_staged("kickoff")
        if self._acquisition is not None:
            raise RuntimeError(f"{self.name}: an acquisition is already running")
        if self._needs_new_file:
            self._new_file()
        triggers = int(self.triggers.get())
        settings = self._settings(self._frames, triggers)
        self._configure(settings)
        status = ProgressStatus(self, self._frames * triggers, call_stop_on_failure=False)
        self._fly_status = status
        self.control.start()
        self._start(status, self._frames * triggers, n_indices=triggers, docs=docs, start=False,
                    incremental=True)
        kicked = Status(self)
        kicked.set_finished()
        return kicked

    def _restore_step_settings(self) -> None:
        """Back to one trigger per acquisition for the step scans that may follow in this stage."""
        try:
            self._configure(self._settings(self._frames, 1))
        except Exception as exc:
            log.warning("%s: restoring triggers=1 after the fly scan failed: %s", self.name, exc)

    def complete(self) -> ProgressStatus:
        """The Status of the kicked-off acquisition: done when all its images are on disk."""
        if self._fly_status is None:
            raise RuntimeError(f"{self.name}: complete() without kickoff()")
        status, self._fly_status = self._fly_status, None
        return status

    def describe_collect(self) -> dict[str, dict[str, Any]]:
        docs = self._require_staged("describe_collect")
        return docs.data_keys

    # -- interruptions --------------------------------------------------------------------------
    def pause(self) -> None:
        """A trigger cut short leaves partial images: the next one goes to a new file."""
        if self._acquisition is not None:
            self._halt_acquisition(abandon=True)  # its Status stays pending: the RE re-runs the step
            self._needs_new_file = True
        super().pause()

    def resume(self) -> None:
        if self._needs_new_file and self._staged == Staged.yes:
            self._new_file()
        super().resume()

    def _new_file(self) -> None:
        self._halt_acquisition()
        self.writer.close()
        self._open_file()

    def stop(self, *, success: bool = False) -> None:
        """Stop detector and writer now; the file is closed (valid, holding what was written)."""
        self._halt_acquisition()
        try:
            self.control.stop()
        except Exception as exc:
            log.warning("%s: stopping the detector failed: %s", self.name, exc)
        super().stop(success=success)  # StdDaqWriter.stop: kill the write request
