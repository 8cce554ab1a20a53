"""The slsdet side of :class:`~daq_backend.control.sls.SlsDetectorControl`, run in its own process.

Why a process: slsdet's C++ calls hold the GIL, and a detector that accepts TCP but never answers blocks
them for minutes. A thread cannot bound that, so every slsdet call happens here, in a child the parent
can kill when a call overruns. Only plain Python values cross the pipe: enums travel by name.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from daq_backend.control.base import ACTIVE_STATES, IDLE_STATES, format_speed, format_timing

UNREACHABLE_MARKERS: tuple[str, ...] = (
    "ClientSocket", "TCP socket read", "TCP socket sent", "Cannot connect",
)


class WorkerFailure(Exception):
    """An error with a kind the parent maps to a public exception (parameter/state/unreachable/command)."""

    def __init__(self, kind: str, message: str, parameter: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.parameter = parameter


def classify(exc: BaseException) -> str:
    """``"unreachable"`` for socket-level slsdet failures, ``"command"`` for refusals by the detector."""
    text = str(exc)
    return "unreachable" if any(marker in text for marker in UNREACHABLE_MARKERS) else "command"


def _collapse(value: Any) -> Any:
    """slsdet answers a list when modules disagree; one value when they agree."""
    if isinstance(value, list):
        return value[0] if value and all(v == value[0] for v in value) else value
    return value


def _named(value: Any, fmt: Callable[[str], str]) -> Any:
    value = _collapse(value)
    if isinstance(value, list):
        return [fmt(v.name) for v in value]
    return fmt(value.name)


class SlsSession:
    """One slsdet ``Detector`` (one shared-memory id) and the operations the control offers."""

    def __init__(self, shm_id: int) -> None:
        self.shm_id = shm_id
        self.detector_type = ""
        self._det: Any = None

    @property
    def det(self) -> Any:
        if self._det is None:
            raise WorkerFailure("unreachable", "not connected to the detector")
        return self._det

    def op_connect(self, hostname: list[str], detector_type: str, powerchip: bool | None) -> None:
        import slsdet

        self._det = None
        det = slsdet.Detector(self.shm_id)
        try:
            det.hostname = hostname  # frees any earlier modules of this shm id first
        except RuntimeError as exc:
            det.free()
            raise WorkerFailure(classify(exc), f"cannot connect to {'+'.join(hostname)}: {exc}") from None
        actual = det.type.name.lower()
        if actual != detector_type:
            det.free()
            hosts = "+".join(hostname)
            raise WorkerFailure("command", f"{hosts} is a {actual} detector, not {detector_type}")
        if powerchip is not None:
            det.powerchip = powerchip
        self._det = det
        self.detector_type = actual

    def op_status(self) -> str:
        states = self.det.status
        names = [s.name for s in states] if isinstance(states, list) else [states.name]
        for group in (("ERROR",), ("RUNNING", "TRANSMITTING", "WAITING")):
            for name in group:
                if name in names:
                    return name
        return names[0]

    def op_start(self) -> None:
        state = self.op_status()
        if state not in IDLE_STATES:
            raise WorkerFailure("state", f"cannot START: detector status is {state}")
        self.det.startDetector()

    def op_stop(self) -> None:
        state = self.op_status()
        if state not in ACTIVE_STATES:
            raise WorkerFailure("state", f"cannot STOP: detector status is {state}, no acquisition running")
        self.det.stopDetector()

    def op_get_config(self) -> dict[str, Any]:
        det = self.det
        eiger = self.detector_type == "eiger"
        return {
            "triggers": _collapse(det.triggers),
            "timing": _named(det.timing, format_timing),
            "frames": _collapse(det.frames),
            "period": _collapse(det.period),
            "exptime": _collapse(det.exptime),
            "dr": _collapse(det.dr),
            "speed": _named(det.readoutspeed, format_speed),
            "tengiga": bool(_collapse(det.tengiga)) if eiger else True,
            "threshold": _collapse(det.threshold) if eiger else None,
        }

    def _check_threshold(self, value: int) -> bool:
        """True when the threshold must be sent; refuses energies without trimbits before any change."""
        det = self.det
        if value == _collapse(det.threshold):
            return False
        energies = det.trimen
        energies = energies[0] if energies and isinstance(energies[0], list) else energies
        if not energies or not min(energies) <= value <= max(energies):
            loaded = f"{min(energies)}-{max(energies)} eV" if energies else "none loaded"
            raise WorkerFailure("parameter", f"{value} eV outside the module's trimmed energies ({loaded})",
                                "threshold")
        return True

    def op_apply(self, values: dict[str, Any]) -> None:
        import slsdet

        det = self.det
        send_threshold = "threshold" in values and self._check_threshold(values["threshold"])

        def set_threshold(value: int) -> None:
            if send_threshold:
                det.setThresholdEnergy(value, _collapse(det.settings))

        setters: dict[str, Callable[[Any], None]] = {
            "triggers": lambda v: setattr(det, "triggers", v),
            "timing": lambda v: setattr(det, "timing", getattr(slsdet.timingMode, v)),
            "frames": lambda v: setattr(det, "frames", v),
            "period": lambda v: setattr(det, "period", v),
            "exptime": lambda v: setattr(det, "exptime", v),
            "dr": lambda v: setattr(det, "dr", v),
            "speed": lambda v: setattr(det, "readoutspeed", getattr(slsdet.speedLevel, v)),
            "tengiga": lambda v: setattr(det, "tengiga", v) if self.detector_type == "eiger" else None,
            "threshold": set_threshold,
        }
        for name, value in values.items():
            try:
                setters[name](value)
            except RuntimeError as exc:
                raise WorkerFailure(classify(exc), f"setting {name}={value!r} failed: {exc}", name) from None

    def op_configure_udp(self, dst_ip: str, start_port: int, src_ip: str | None) -> None:
        det = self.det
        n_modules = det.size()
        two_ports = self.detector_type == "eiger" or _collapse(det.numinterfaces) == 2
        det.udp_dstip = dst_ip
        if two_ports and self.detector_type != "eiger":
            det.udp_dstip2 = dst_ip
        if src_ip is not None:
            det.udp_srcip = src_ip
        per_module = 2 if two_ports else 1
        for module in range(n_modules):
            det.setDestinationUDPPort(start_port + per_module * module, module)
            if two_ports:
                det.setDestinationUDPPort2(start_port + per_module * module + 1, module)

    def op_free(self) -> None:
        if self._det is not None:
            self._det.free()
        else:
            import slsdet

            slsdet.freeSharedMemory(self.shm_id)
        self._det = None


def worker_main(conn: Connection, shm_id: int) -> None:
    """Serve ``(op, kwargs)`` requests until EOF or ``shutdown``.

    Answers ``("ok", result)`` or ``("err", kind, parameter, message)``.
    """
    session = SlsSession(shm_id)
    while True:
        try:
            op, kwargs = conn.recv()
        except (EOFError, OSError):
            return
        if op == "shutdown":
            conn.send(("ok", None))
            return
        try:
            conn.send(("ok", getattr(session, f"op_{op}")(**kwargs)))
        except WorkerFailure as failure:
            conn.send(("err", failure.kind, failure.parameter, str(failure)))
        except RuntimeError as exc:
            conn.send(("err", classify(exc), None, str(exc)))
        except Exception as exc:  # noqa: BLE001 - any other failure must reach the caller, not kill the worker
            conn.send(("err", "command", None, f"{type(exc).__name__}: {exc}"))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the worker process: ``python -m daq_backend.control.sls_worker FD SHM_ID``.

    FD is this process's end of a socket pair inherited from :class:`SlsDetectorControl`.
    """
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m daq_backend.control.sls_worker FD SHM_ID", file=sys.stderr)
        return 2
    worker_main(Connection(int(args[0])), int(args[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
