"""Fixtures of every test folder: a private ipc directory, the writer's embedded broker and harness,
the REST harness, the broker proxy, and the ophyd tests' DAQ and RunEngine. The helpers they build on
are shipped in ``daq_backend.testing`` and ``std_daq_ophyd.testing``; the virtual slsDetector servers'
fixtures are in ``tests/system/conftest.py``."""

from __future__ import annotations

import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from bluesky import RunEngine

from daq_backend.broker import EmbeddedBrokerHub, EmbeddedTransport, Transport
from daq_backend.testing.broker_proxy import BrokerProxy
from daq_backend.testing.rest import RestHarness
from daq_backend.testing.writer import Harness, make_config, unique
from daq_backend.writer.roots import OUTPUT_ROOTS_ENV
from std_daq_ophyd.sim import EmbeddedDaq, simulated_config
from std_daq_ophyd.testing import RUN_AS, Daq, Recorder, start_daq

# A test run started in the background of a non-interactive shell (`cmd &`, nohup) inherits SIGINT
# ignored, and an ignored signal stays ignored in every child it starts: the Ctrl-C tests (the CLI's
# KeyboardInterrupt, the benchmarks' restore on SIGINT) need it delivered. A handler is reset to the
# default in children at exec, so this also gives them back their own Ctrl-C.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session", autouse=True)
def _output_roots(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The DAQ writes only inside its output roots: every process a test starts (they inherit the
    environment) gets pytest's base temporary folder as its root, so files in ``tmp_path`` may be
    written, and a default data root (``$XDG_DATA_HOME/std-daq``) inside it, never the user's own.
    Tests of the rules themselves set their own."""
    base = tmp_path_factory.getbasetemp()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(OUTPUT_ROOTS_ENV, str(base))
        patch.setenv("XDG_DATA_HOME", str(base / "xdg-data"))
        yield base


@pytest.fixture
def ipc_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A private, short ipc directory (unix socket paths are limited to 107 bytes, pytest's
    tmp_path is too long for them)."""
    path = tempfile.mkdtemp(prefix="sdq", dir="/tmp")
    monkeypatch.setenv("STD_DAQ_IPC_DIR", path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def embedded_transport() -> Iterator[Transport]:
    hub = EmbeddedBrokerHub(unique("wtest-hub"))
    hub.start()
    transport = EmbeddedTransport(hub.name)
    try:
        yield transport
    finally:
        transport.close()
        hub.stop()


@pytest.fixture
def harness(tmp_path: Path, embedded_transport: Transport) -> Iterator[Harness]:
    h = Harness(tmp_path, make_config(), embedded_transport)
    try:
        yield h
    finally:
        h.close()


@pytest.fixture
def rest(ipc_env: str, tmp_path: Path) -> Iterator[RestHarness]:
    harness = RestHarness(tmp_path)
    try:
        yield harness
    finally:
        harness.close()


@pytest.fixture
def broker_proxy() -> Iterator[BrokerProxy]:
    """A :class:`BrokerProxy` to the machine's RabbitMQ on a free port, closed after the test."""
    proxy = BrokerProxy().start()
    try:
        yield proxy
    finally:
        proxy.close()


@pytest.fixture(scope="module")
def ipc_dir() -> Iterator[str]:
    """A private, short ipc directory for the module's DAQs (unix socket paths are limited)."""
    path = tempfile.mkdtemp(prefix="sdo", dir="/tmp")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STD_DAQ_IPC_DIR", path)
        yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def daq(ipc_dir: str) -> Iterator[EmbeddedDaq]:
    """One embedded DAQ (one-module Jungfrau, embedded broker) shared by a module's tests."""
    daq = EmbeddedDaq(simulated_config()).start()
    try:
        yield daq
    finally:
        daq.stop()


@pytest.fixture(scope="module", params=RUN_AS)
def daq_threads_and_processes(request: pytest.FixtureRequest, ipc_dir: str) -> Iterator[Daq]:
    """A module's tests run against a DAQ in threads of this process, then against the processes of
    ``std-daq up`` (one-module Jungfrau, embedded broker)."""
    daq = start_daq(run_as=request.param)
    try:
        yield daq
    finally:
        daq.stop()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


@pytest.fixture
def recorder() -> Recorder:
    """Every document of the test's runs, each validated against event-model's schema."""
    return Recorder()


@pytest.fixture
def RE(recorder: Recorder) -> RunEngine:
    """A RunEngine whose documents go to ``recorder``."""
    engine = RunEngine({}, call_returns_result=False)
    engine.subscribe(recorder)
    return engine
