"""slsdet detector control against slsDetectorPackage's own virtual Jungfrau and Eiger servers."""

from __future__ import annotations

import json
import socket
import struct
import threading
from collections.abc import Iterator

import psutil
import pytest

from daq_backend.control.base import (
    CONFIG_KEYS,
    DetectorControl,
    DetectorStateError,
    DetectorUnreachableError,
    ParameterError,
)
from daq_backend.control.sls import SlsDetectorControl, client_shm_paths
from daq_backend.control.sls_build import TARGETS, is_built
from daq_backend.control.sls_build import main as build_main
from daq_backend.control.virtual import (
    SlsReceiverProcess,
    VirtualDetectorServer,
    allocate_shm_id,
    remove_sysv_shm,
)
from daq_backend.testing import wait_for

pytestmark = pytest.mark.sls

SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
SLS_HEADER = struct.Struct("<QII")  # frameNumber, expLength, packetNumber (sls_detector_header start)
WAIT = 60.0  # generous: the two cores are shared with other test sessions


def udp_socket(port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 256 << 20)  # root: beyond net.core.rmem_max
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 << 20)
    sock.bind(("127.0.0.1", port))
    return sock


def consecutive_udp_sockets(count: int) -> list[socket.socket]:
    """``count`` sockets on consecutive ports (an Eiger module sends to start_port and start_port + 1)."""
    for _ in range(200):
        first = udp_socket()
        socks = [first]
        try:
            for i in range(1, count):
                socks.append(udp_socket(first.getsockname()[1] + i))
            return socks
        except OSError:
            for sock in socks:
                sock.close()
    raise AssertionError("no consecutive free UDP ports")


class Capture:
    """Collects (frame number, packet number, size) from one socket in a background thread."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.packets: list[tuple[int, int, int]] = []
        self._stop = threading.Event()
        self.sock.settimeout(0.2)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        buf = bytearray(9000)
        while not self._stop.is_set():
            try:
                size = self.sock.recv_into(buf)
            except TimeoutError:
                continue
            frame, _, packet = SLS_HEADER.unpack_from(buf)
            self.packets.append((frame, packet, size))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture(scope="module")
def jungfrau(virtual_jungfrau: VirtualDetectorServer) -> Iterator[SlsDetectorControl]:
    control = virtual_jungfrau.make_control("jf-test")
    try:
        yield control
    finally:
        control.close()


@pytest.fixture(scope="module")
def eiger(virtual_eiger: VirtualDetectorServer) -> Iterator[SlsDetectorControl]:
    control = virtual_eiger.make_control("eiger-test")
    try:
        yield control
    finally:
        control.close()


@pytest.fixture
def idle_after(request: pytest.FixtureRequest) -> Iterator[None]:
    """Leave the shared detector idle for the next test even when an assertion failed mid-run."""
    yield
    for name in ("jungfrau", "eiger"):
        if name in request.fixturenames:
            control: SlsDetectorControl = request.getfixturevalue(name)
            if control.status() in ("RUNNING", "WAITING", "TRANSMITTING"):
                control.stop()


def unreachable_control(**kwargs: object) -> SlsDetectorControl:
    with socket.socket() as probe:  # a port nobody listens on: bind, read the number, close
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return SlsDetectorControl("nowhere", "jungfrau", f"127.0.0.1:{port}", allocate_shm_id(), **kwargs)


# --- build ---------------------------------------------------------------------------------------

def test_build_is_cached_and_idempotent(sls_bin_dir, capsys) -> None:
    assert is_built()
    assert all((sls_bin_dir / target).is_file() for target in TARGETS)
    assert build_main([]) == 0  # second call: the cache is complete, nothing rebuilt
    assert capsys.readouterr().out.strip() == str(sls_bin_dir)


# --- configuration ---------------------------------------------------------------------------------

def test_get_config_has_seed_shape(jungfrau: SlsDetectorControl) -> None:
    assert isinstance(jungfrau, DetectorControl)
    config = jungfrau.get_config()
    assert tuple(config) == CONFIG_KEYS
    assert config["det_name"] == "jf-test"
    assert config["dr"] == 16 and config["tengiga"] is True and config["threshold"] is None
    assert config["timing"].startswith("timingMode.") and config["speed"].startswith("speedLevel.")
    assert json.loads(json.dumps(config)) == config


def test_set_and_get_frames_period_exptime_timing(jungfrau: SlsDetectorControl) -> None:
    new = jungfrau.set_config({"frames": 7, "period": 0.005, "exptime": 2e-5, "timing": "TRIGGER_EXPOSURE",
                               "triggers": 3, "speed": 2})
    assert new == jungfrau.get_config()
    assert (new["frames"], new["triggers"]) == (7, 3)
    assert new["period"] == pytest.approx(0.005) and new["exptime"] == pytest.approx(2e-5)
    assert new["timing"] == "timingMode.TRIGGER_EXPOSURE"
    assert new["speed"] == "speedLevel.QUARTER_SPEED"
    # the seed's own spelling, as GET returns it, is accepted back
    back = jungfrau.set_config({"timing": "timingMode.AUTO_TIMING", "speed": "speedLevel.HALF_SPEED",
                                "triggers": 1, "dr": 16, "tengiga": True})
    assert back["timing"] == "timingMode.AUTO_TIMING" and back["speed"] == "speedLevel.HALF_SPEED"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"bogus": 1}, "Parameter not valid: bogus"),
        ({"frames": 5, "Frames": 5}, "Parameter not valid: Frames"),
        ({"frames": "ten"}, "frames: Input should be a valid integer (got 'ten')"),
        ({"frames": 2.5}, "frames: Input should be a valid integer (got 2.5)"),
        ({"frames": 0}, "frames: Input should be greater than or equal to 1 (got 0)"),
        ({"triggers": True}, "triggers: Input should be a valid integer (got True)"),
        ({"period": -0.1}, "period: Input should be greater than or equal to 0 (got -0.1)"),
        ({"exptime": 0}, "exptime: Input should be greater than 0 (got 0)"),
        ({"exptime": "1ms"}, "exptime: Input should be a valid number (got '1ms')"),
        ({"timing": "AUTO"}, "timing: Input should be 'AUTO_TIMING', 'TRIGGER_EXPOSURE', 'GATED' or "
                             "'BURST_TRIGGER' (got 'AUTO')"),
        ({"timing": "GATED"},
         "timing: GATED not supported by jungfrau (allowed: AUTO_TIMING, TRIGGER_EXPOSURE)"),
        ({"speed": 3}, "speed: Input should be 'FULL_SPEED', 'HALF_SPEED' or 'QUARTER_SPEED' (got 3)"),
        ({"dr": 8}, "dr: 8 not supported by jungfrau (allowed: 16)"),
        ({"dr": 12}, "dr: Input should be 4, 8, 16 or 32 (got 12)"),
        ({"tengiga": False}, "tengiga: jungfrau link speed is fixed (tengiga=True)"),
        ({"tengiga": "yes"}, "tengiga: Input should be a valid boolean (got 'yes')"),
        ({"threshold": 6000}, "threshold: not supported by jungfrau"),
        ({"frames": None}, "frames: null is not a valid value"),
    ],
)
def test_invalid_settings_never_reach_the_detector(values: dict, message: str) -> None:
    # The control points at a closed port: any contact would raise DetectorUnreachableError instead.
    control = unreachable_control()
    try:
        with pytest.raises(ParameterError) as err:
            control.set_config(values)
        assert str(err.value) == message
    finally:
        control.close()


def test_invalid_setting_leaves_the_detector_unchanged(jungfrau: SlsDetectorControl) -> None:
    jungfrau.set_config({"frames": 11, "period": 0.01})
    for bad in ({"frames": 12, "bogus": 1}, {"frames": 12, "period": -1}, {"frames": 12, "dr": 32}):
        with pytest.raises(ParameterError):
            jungfrau.set_config(bad)
    assert jungfrau.get_config()["frames"] == 11
    assert jungfrau.get_config()["period"] == pytest.approx(0.01)
    with pytest.raises(ParameterError, match="config: must be an object"):
        jungfrau.set_config(["frames", 1])  # type: ignore[arg-type]


def test_eiger_settings(eiger: SlsDetectorControl) -> None:
    config = eiger.set_config({"dr": 32, "speed": "QUARTER_SPEED", "timing": "BURST_TRIGGER", "tengiga": 1,
                               "frames": 4, "period": 0.1, "exptime": 0.001})
    assert (config["dr"], config["speed"], config["timing"]) == (32, "speedLevel.QUARTER_SPEED",
                                                                "timingMode.BURST_TRIGGER")
    assert config["tengiga"] is True and config["frames"] == 4
    assert config["threshold"] == -1  # nothing trimmed on a virtual module
    config = eiger.set_config({"timing": "GATED", "dr": 16, "speed": "FULL_SPEED", "threshold": -1})
    assert config["timing"] == "timingMode.GATED" and config["dr"] == 16
    # a threshold needs trimbits: refused before frames is touched
    with pytest.raises(ParameterError, match=r"threshold: 6000 eV outside the module's trimmed energies"):
        eiger.set_config({"frames": 9, "threshold": 6000})
    assert eiger.get_config()["frames"] == 4
    eiger.set_config({"timing": "AUTO_TIMING"})


# --- state machine ---------------------------------------------------------------------------------

def test_start_while_running_and_stop_while_idle(jungfrau: SlsDetectorControl, idle_after: None) -> None:
    sink = udp_socket()
    try:
        jungfrau.configure_receiver("127.0.0.1", sink.getsockname()[1])
        jungfrau.set_config({"frames": 1_000_000, "period": 0.01, "timing": "AUTO_TIMING", "triggers": 1})
        assert jungfrau.status() in ("IDLE", "STOPPED", "RUN_FINISHED")
        with pytest.raises(DetectorStateError, match="cannot STOP: detector status is"):
            jungfrau.stop()
        jungfrau.start()
        assert jungfrau.status() in ("RUNNING", "WAITING", "TRANSMITTING")
        with pytest.raises(DetectorStateError, match="cannot START: detector status is (RUNNING|WAITING)"):
            jungfrau.start()
        jungfrau.stop()
        wait_for(lambda: jungfrau.status() in ("IDLE", "STOPPED"), "detector idle after STOP")
        with pytest.raises(DetectorStateError):
            jungfrau.stop()
    finally:
        sink.close()


# --- unreachable detectors -------------------------------------------------------------------------

def test_refused_connection_is_unreachable_and_cleaned_up() -> None:
    control = unreachable_control(timeout=5, connect_timeout=5)
    try:
        calls = (control.get_config, control.status, control.start, lambda: control.set_config({"frames": 2}))
        for call in calls:
            with pytest.raises(DetectorUnreachableError, match="Cannot connect"):
                call()
    finally:
        control.close()
    assert client_shm_paths(control.shm_id) == []
    with pytest.raises(DetectorUnreachableError, match="closed"):
        control.status()


def test_silent_detector_times_out_instead_of_hanging() -> None:
    # accepts TCP connections but never answers: slsdet alone would block for minutes holding the GIL
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    host = f"127.0.0.1:{listener.getsockname()[1]}"
    control = SlsDetectorControl("silent", "eiger", host, allocate_shm_id(), timeout=2, connect_timeout=3)
    try:
        with pytest.raises(DetectorUnreachableError, match="no answer from .* to connect within 3 s"):
            control.status()
        wait_for(lambda: bool(accepted), "the control's connection attempt")
        worker = control._proc  # noqa: SLF001 - the killed worker must not linger
        assert worker is None
    finally:
        control.close()
        stop.set()
        thread.join(5)
        for conn in accepted:
            conn.close()
        listener.close()
    assert client_shm_paths(control.shm_id) == []


def test_control_recovers_when_the_detector_comes_back(virtual_detector_factory) -> None:
    server: VirtualDetectorServer = virtual_detector_factory("eiger")
    control = server.make_control(timeout=10, connect_timeout=20)
    try:
        assert control.status() == "IDLE"
        port = server.port
        server.stop()
        with pytest.raises(DetectorUnreachableError):
            control.status()
        server.port = port
        server.start()
        assert control.get_config()["det_name"] == control.name  # reconnected transparently
    finally:
        control.close()


# --- acquisitions ----------------------------------------------------------------------------------

def test_virtual_jungfrau_sends_n_frames_of_128_packets(jungfrau: SlsDetectorControl,
                                                        idle_after: None) -> None:
    n_frames = 5
    capture = Capture(udp_socket())
    try:
        jungfrau.configure_receiver("127.0.0.1", capture.sock.getsockname()[1])
        jungfrau.set_config({"frames": n_frames, "period": 0.01, "exptime": 1e-5, "timing": "AUTO_TIMING",
                             "triggers": 1})
        jungfrau.start()
        wait_for(lambda: len(capture.packets) >= n_frames * 128, f"{n_frames * 128} packets")
        wait_for(lambda: jungfrau.status() in ("IDLE", "RUN_FINISHED"), "end of acquisition")
    finally:
        capture.close()
    packets = capture.packets
    assert len(packets) == n_frames * 128
    assert {size for _, _, size in packets} == {8240}
    frames = [frame for frame, _, _ in packets]
    assert frames == sorted(frames)
    first = frames[0]
    assert sorted(set(frames)) == list(range(first, first + n_frames))
    for frame in set(frames):
        assert sorted(p for f, p, _ in packets if f == frame) == list(range(128))


def test_virtual_eiger_sends_4144_byte_packets_to_two_ports(eiger: SlsDetectorControl,
                                                            idle_after: None) -> None:
    n_frames = 3
    captures = [Capture(sock) for sock in consecutive_udp_sockets(2)]
    try:
        eiger.configure_receiver("127.0.0.1", captures[0].sock.getsockname()[1])
        eiger.set_config({"tengiga": True, "dr": 16, "frames": n_frames, "period": 0.05, "exptime": 1e-5,
                          "timing": "AUTO_TIMING", "triggers": 1})
        eiger.start()
        # 16 bit: each port carries 256 x 512 pixels = 64 packets of 4096 data bytes per frame
        wait_for(lambda: all(len(c.packets) >= n_frames * 64 for c in captures), "Eiger packets")
        wait_for(lambda: eiger.status() == "IDLE", "end of acquisition")
    finally:
        for capture in captures:
            capture.close()
    for capture in captures:
        assert len(capture.packets) == n_frames * 64
        assert {size for _, _, size in capture.packets} == {4144}
        frames = sorted({frame for frame, _, _ in capture.packets})
        assert frames == list(range(frames[0], frames[0] + n_frames))


# --- process management ----------------------------------------------------------------------------

def test_virtual_server_teardown_stops_both_processes_and_frees_shm(virtual_detector_factory) -> None:
    server: VirtualDetectorServer = virtual_detector_factory("eiger")
    pids, key = (server.pid, server.stop_pid), server.sysv_shm_key
    assert all(pid is not None and psutil.pid_exists(pid) for pid in pids)
    assert pids[0] != pids[1]
    server.cleanup()
    assert not any(psutil.pid_exists(pid) for pid in pids if pid is not None)
    assert remove_sysv_shm(key) is False  # already gone


def test_slsreceiver_catches_frames_of_the_virtual_jungfrau(
        virtual_jungfrau: VirtualDetectorServer, sls_receiver: SlsReceiverProcess, idle_after: None) -> None:
    import slsdet

    shm_id = allocate_shm_id()
    det = slsdet.Detector(shm_id)
    try:
        det.hostname = virtual_jungfrau.hostname
        det.rx_hostname = sls_receiver.rx_hostname
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(("127.0.0.1", 0))
            udp_port = probe.getsockname()[1]
        det.udp_dstip = "127.0.0.1"
        det.udp_dstport = udp_port
        det.udp_srcip = "127.0.0.1"
        det.powerchip = 1
        det.fwrite = 0
        det.frames = 4
        det.period = 0.01
        det.acquire()  # starts receiver and detector, returns once both are done
        assert det.rx_framescaught == [4]  # one entry per receiver
    finally:
        det.free()
