"""Simulated EPICS IOC (caproto server) for the EPICS buffer's tests, the profile and the demo.

Every value is a pure function of the pulse id that triggered it, and every PV written on a pulse
carries exactly that pulse's EPICS timestamp. A test can therefore compute, without looking at
Redis, which value each PV had at any pulse id — the exact-values check of the EPICS writer
relies on this.

PVs (``<prefix>`` defaults to ``SIM:``):

========================  ==========  ==============================================  ============
PV                        CA type     value on update at pulse ``p``                  updated when
========================  ==========  ==============================================  ============
``<prefix>PULSE_ID``      DOUBLE      ``p`` (DOUBLE: pulse ids exceed int32)          every pulse
``<prefix>FLOAT``         DOUBLE      ``sin(2 pi p / 1000)``                          ``p % 10 == 0``
``<prefix>INT``           LONG        ``(p // 10) % 1_000_000``                       ``p % 10 == 0``
``<prefix>WAVEFORM``      DOUBLE[100] ``p % 1000 + arange(100) / 8``                   ``p % 10 == 0``
``<prefix>STRING``        STRING      ``"pulse <p>"``                                 ``p % 50 == 0``
``<prefix>BENCH:nnn``     DOUBLE      ``sin(2 pi (p + nnn) / 1000)``                  ``p % 10 == 0``
========================  ==========  ==============================================  ============

(``BENCH:000``... only with ``--n-bench-pvs N``: the buffer benchmark's load.)

Pulse ids follow the wall clock (``p = ceil(t * rate)`` at start), so a restarted IOC continues
with larger ids, as a real machine's pulse id does. If the IOC falls more than ten seconds behind
schedule (a stalled process) it jumps ahead (a gap in the pulse ids); shorter lags are caught up
in a burst, so a loaded machine gives late pulses, never missing ones.
"""

from __future__ import annotations

import asyncio
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any, cast

import numpy as np
from caproto import ChannelType
from caproto.server import PVGroup, pvproperty, run, template_arg_parser

EPICS_EPOCH_OFFSET_S = 631_152_000  # 1990-01-01 minus 1970-01-01, in seconds
DEFAULT_PULSE_RATE_HZ = 100.0
WAVEFORM_LENGTH = 100
SCALAR_EVERY = 10  # pulses between FLOAT / INT / WAVEFORM / BENCH updates
STRING_EVERY = 50  # pulses between STRING updates
MAX_LAG_S = 10.0


def float_value(pulse_id: int) -> float:
    return math.sin(2 * math.pi * pulse_id / 1000)


def int_value(pulse_id: int) -> int:
    return (pulse_id // SCALAR_EVERY) % 1_000_000


def waveform_value(pulse_id: int) -> np.ndarray:
    return (pulse_id % 1000) + np.arange(WAVEFORM_LENGTH, dtype=np.float64) / 8


def string_value(pulse_id: int) -> str:
    return f"pulse {pulse_id}"


def bench_value(pulse_id: int, index: int) -> float:
    return float_value(pulse_id + index)


def updates_at(pulse_id: int) -> dict[str, Any]:
    """PV suffix -> value for every PV (bench PVs excluded) written on ``pulse_id``."""
    values: dict[str, Any] = {"PULSE_ID": float(pulse_id)}
    if pulse_id % SCALAR_EVERY == 0:
        values["FLOAT"] = float_value(pulse_id)
        values["INT"] = int_value(pulse_id)
        values["WAVEFORM"] = waveform_value(pulse_id)
    if pulse_id % STRING_EVERY == 0:
        values["STRING"] = string_value(pulse_id)
    return values


def epics_timestamp(time_ns: int) -> tuple[int, int]:
    """Unix ns -> the raw EPICS ``(seconds since 1990, nanoseconds)`` caproto accepts exactly."""
    seconds, nanoseconds = divmod(time_ns, 1_000_000_000)
    return seconds - EPICS_EPOCH_OFFSET_S, nanoseconds


class SimIoc(PVGroup):
    """Pulse-id counter plus scalar, waveform and string PVs driven by it."""

    pulse_id = pvproperty(value=0.0, name="PULSE_ID", read_only=True, doc="Pulse id (counts at --pulse-rate)")
    float_scalar = pvproperty(value=0.0, name="FLOAT", read_only=True, doc="Slow sine")
    int_scalar = pvproperty(value=0, name="INT", read_only=True, doc="Counter")
    waveform = pvproperty(
        value=[0.0] * WAVEFORM_LENGTH, name="WAVEFORM", max_length=WAVEFORM_LENGTH, read_only=True
    )
    string = pvproperty(value="", name="STRING", dtype=ChannelType.STRING, read_only=True)

    def __init__(self, *args: Any, pulse_rate: float = DEFAULT_PULSE_RATE_HZ, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if pulse_rate <= 0:
            raise ValueError(f"pulse_rate must be > 0, got {pulse_rate}")
        self.pulse_rate = pulse_rate
        self.bench_pvs = [
            getattr(self, name) for name in sorted(vars(type(self))) if name.startswith("bench_")
        ]

    @pulse_id.startup  # type: ignore[no-redef]  # caproto: the startup hook takes the PV's name
    async def pulse_id(self, instance: Any, async_lib: Any) -> None:
        """The pulse loop: one iteration per pulse, everything written with that pulse's timestamp."""
        pulse = math.ceil(time.time() * self.pulse_rate)
        while True:
            delay = pulse / self.pulse_rate - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            elif -delay > MAX_LAG_S:
                pulse = math.ceil(time.time() * self.pulse_rate)
            await self._write_pulse(pulse, epics_timestamp(time.time_ns()))
            pulse += 1

    async def _write_pulse(self, pulse: int, timestamp: tuple[int, int]) -> None:
        targets = {
            "FLOAT": self.float_scalar,
            "INT": self.int_scalar,
            "WAVEFORM": self.waveform,
            "STRING": self.string,
        }
        for suffix, value in updates_at(pulse).items():
            if suffix != "PULSE_ID":
                await targets[suffix].write(value, timestamp=timestamp)
        if pulse % SCALAR_EVERY == 0:
            for index, pv in enumerate(self.bench_pvs):
                await pv.write(bench_value(pulse, index), timestamp=timestamp)
        # The pulse id goes last: once a client sees pulse p, everything of pulse p was sent.
        await self.pulse_id.write(float(pulse), timestamp=timestamp)


def sim_ioc_class(n_bench_pvs: int = 0) -> type[SimIoc]:
    """``SimIoc`` plus ``n_bench_pvs`` DOUBLE PVs ``BENCH:000``... (the buffer benchmark's load)."""
    if n_bench_pvs <= 0:
        return SimIoc
    attrs = {
        f"bench_{i:03d}": pvproperty(value=0.0, name=f"BENCH:{i:03d}", read_only=True)
        for i in range(n_bench_pvs)
    }
    return cast(type[SimIoc], type("SimIocWithBench", (SimIoc,), attrs))  # PVGroup's metaclass builds it


def pv_names(prefix: str, n_bench_pvs: int = 0) -> dict[str, str]:
    """Suffix -> full PV name for every PV the IOC serves."""
    names = {suffix: prefix + suffix for suffix in ("PULSE_ID", "FLOAT", "INT", "WAVEFORM", "STRING")}
    names.update({f"BENCH:{i:03d}": f"{prefix}BENCH:{i:03d}" for i in range(n_bench_pvs)})
    return names


def _free_ca_port() -> int:
    """A port free for both TCP and UDP on 127.0.0.1 (a CA server binds both)."""
    for _ in range(100):
        with socket.socket() as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port for a CA server")


class SimIocProcess:
    """Runs ``main()`` in a subprocess on private loopback ports; stopped by its PID.

    ``client_env`` holds the ``EPICS_CA_*`` settings a caproto client needs to find it (caproto reads
    them from ``os.environ``). Beacons go to ``repeater_port``, where a socket held by this object
    swallows them (no repeater to run, no "connection refused" noise). ``restart()`` reuses the port.
    """

    def __init__(self, prefix: str = "SIM:", pulse_rate: float = DEFAULT_PULSE_RATE_HZ, n_bench_pvs: int = 0):
        self.prefix = prefix
        self.pulse_rate = pulse_rate
        self.n_bench_pvs = n_bench_pvs
        self.port = _free_ca_port()
        self._beacon_sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._beacon_sink.bind(("127.0.0.1", 0))
        self.repeater_port = self._beacon_sink.getsockname()[1]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def client_env(self) -> dict[str, str]:
        return {
            "EPICS_CA_ADDR_LIST": "127.0.0.1",
            "EPICS_CA_AUTO_ADDR_LIST": "NO",
            "EPICS_CA_SERVER_PORT": str(self.port),
            "EPICS_CA_REPEATER_PORT": str(self.repeater_port),
        }

    @property
    def server_env(self) -> dict[str, str]:
        return {
            **self.client_env,
            "EPICS_CAS_INTF_ADDR_LIST": "127.0.0.1",
            "EPICS_CAS_BEACON_ADDR_LIST": "127.0.0.1",
            "EPICS_CAS_AUTO_BEACON_ADDR_LIST": "NO",
            "EPICS_CAS_BEACON_PORT": str(self.repeater_port),
        }

    def pv(self, suffix: str) -> str:
        return self.prefix + suffix

    def start(self) -> None:
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError(f"sim IOC already running (pid {self.process.pid})")
        command = [sys.executable, "-m", "daq_backend.epics.sim_ioc", "--prefix", self.prefix, "-q"]
        command += ["--pulse-rate", str(self.pulse_rate), "--n-bench-pvs", str(self.n_bench_pvs)]
        self.process = subprocess.Popen(command, env={**os.environ, **self.server_env})

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        self._beacon_sink.close()

    def __enter__(self) -> SimIocProcess:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def main(argv: Sequence[str] | None = None) -> None:
    """``std-daq sim-ioc [--prefix SIM:] [--pulse-rate 100] [--n-bench-pvs 0]`` plus caproto's options.

    Ports come from caproto's environment (``EPICS_CA_SERVER_PORT``, ``EPICS_CAS_INTF_ADDR_LIST``...).
    """
    parser, split_args = template_arg_parser(
        desc="Simulated IOC: pulse id plus float, int, waveform and string PVs",
        default_prefix="SIM:",
        supported_async_libs=["asyncio"],
    )
    parser.add_argument(
        "--pulse-rate", type=float, default=DEFAULT_PULSE_RATE_HZ, help="pulse ids per second"
    )
    parser.add_argument("--n-bench-pvs", type=int, default=0, help="extra DOUBLE PVs updated at rate/10")
    args = parser.parse_args(argv)
    ioc_options, run_options = split_args(args)
    ioc = sim_ioc_class(args.n_bench_pvs)(pulse_rate=args.pulse_rate, **ioc_options)
    run(ioc.pvdb, **run_options)


if __name__ == "__main__":
    main()
