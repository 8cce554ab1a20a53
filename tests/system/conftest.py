"""Pytest fixtures for slsDetectorPackage's virtual detectors and the C++ ``slsReceiver``.

Used by the system tests of this folder (test_control_sls.py, test_e2e_virtual_detectors.py). The
first use builds the binaries into the cache (see daq_backend.control.sls_build); later runs reuse
them. Every process is stopped by PID and every shared-memory segment removed at teardown, so tests
can run alongside other test sessions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from daq_backend.control.sls import remove_client_shm
from daq_backend.control.sls_build import ensure_built
from daq_backend.control.virtual import SlsReceiverProcess, VirtualDetectorServer


@pytest.fixture(scope="session")
def sls_bin_dir() -> Path:
    """The directory with the virtual servers and slsReceiver, built on first use."""
    return ensure_built()


def _server(kind: str, log_dir: Path) -> Iterator[VirtualDetectorServer]:
    server = VirtualDetectorServer(kind, log_path=log_dir / f"{kind}-server.log")
    server.start()
    try:
        yield server
    finally:
        server.cleanup()
        remove_client_shm(server.shm_id)


@pytest.fixture(scope="module")
def virtual_jungfrau(sls_bin_dir: Path,
                     tmp_path_factory: pytest.TempPathFactory) -> Iterator[VirtualDetectorServer]:
    """A running virtual Jungfrau module (shared by the tests of one module: leave it idle)."""
    yield from _server("jungfrau", tmp_path_factory.mktemp("virtual-jungfrau"))


@pytest.fixture(scope="module")
def virtual_eiger(sls_bin_dir: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[VirtualDetectorServer]:
    """A running virtual Eiger half-module (shared by the tests of one module: leave it idle)."""
    yield from _server("eiger", tmp_path_factory.mktemp("virtual-eiger"))


@pytest.fixture
def virtual_detector_factory(sls_bin_dir: Path,
                             tmp_path: Path) -> Iterator[Callable[[str], VirtualDetectorServer]]:
    """Start private virtual servers (``factory("jungfrau")``), all stopped when the test ends."""
    servers: list[VirtualDetectorServer] = []

    def factory(kind: str) -> VirtualDetectorServer:
        server = VirtualDetectorServer(kind, log_path=tmp_path / f"{kind}-{len(servers)}-server.log")
        servers.append(server)
        return server.start()

    try:
        yield factory
    finally:
        for server in servers:
            server.cleanup()
            remove_client_shm(server.shm_id)


@pytest.fixture
def sls_receiver(sls_bin_dir: Path, tmp_path: Path) -> Iterator[SlsReceiverProcess]:
    """A running ``slsReceiver`` on a free TCP port; use ``rx_hostname`` with slsdet."""
    receiver = SlsReceiverProcess(log_path=tmp_path / "slsReceiver.log")
    receiver.start()
    try:
        yield receiver
    finally:
        receiver.cleanup()
